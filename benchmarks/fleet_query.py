"""One question over a fleet of run folders: DuckDB over ``open_runs`` against pandas over ``load_run``.

The question: "p99 age and mean free memory per host and guest" (``age_s`` quantile 0.99,
linear interpolation, and ``free_memory`` mean, grouped by host and guest over every run).

Data (generated once, cached under ``--data``, default /tmp/balloonlab-fleet-bench, in a
folder per ``--guests``/``--hours``; runs already there are reused): ``--runs`` run folders
(100) of ``--guests`` guests (20) sampled every second for ``--hours`` (24), written by the
store's own writer (``RunWriter.flush`` of frames built with numpy, ``--flush-hours`` at a
time, 6: four flushes a day, which the writer's tiered merge turns into one part per host).
Rows are what a QEMU 7.2 guest reports (frames_memory.py's row): the ten stats (free memory a
random walk, counters that grow), ``last_update``, ``actual`` (a balloon step for half the
guests), ``target`` (NA for the other half), ``period_s``, ``rss``, ``age_s`` (exponential
with a 1 % tail of 1-5 s), ``reset``; each run spreads its guests over 2-5 of 8 hosts.

Measured, each in its own child process (so one's freed memory cannot hide another's peak;
``peak_rss`` is the child's ``ru_maxrss``, imports included, ``floor_rss`` its RSS after
imports), ``--repeats`` times (3), median kept, wall time from the paths to the answer frame:

* ``duckdb``   ``open_runs(paths).sql(...).df()``: DuckDB scans the pyarrow dataset in place;
* ``pandas``   the baseline: ``load_run(path).samples`` of each run, its four columns kept
               (host, guest, age_s, free_memory), recoded to one category set per column (or
               ``pd.concat`` makes object columns of categories that differ) and concatenated,
               ``groupby([host, guest]).age_s.quantile(0.99)`` and ``.free_memory.mean()``;
* ``duckdb read_parquet`` (info) DuckDB's own Parquet reader over ``open_runs(...).files``
               (host from the paths): what the pyarrow dataset costs DuckDB.

pandas needs the rows in memory: its peak is predicted from two probes (2 and 8 runs, a line
through their peaks; it predicted 10.6 GB for 100 runs that took 13.8), and when that exceeds
``--memory-fraction`` (0.6) of MemAvailable for all runs it runs on the largest number of runs
that fits, DuckDB on that number too (the ratio) and on all runs. Before each engine every part
file is read once (untimed), so each starts with the files in the page cache. The answers
of both engines are compared (to 1e-9). Run from the project root:
``.venv/bin/python benchmarks/fleet_query.py [--runs 100 --guests 20 --hours 24] [--json PATH]``;
the first run generates 172.8 M rows (8 minutes on 2 cores, 6.5 GB), then about 15 minutes (pandas' peak: 14 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import environment, median, print_table, ratio, write_json

QUERY = ("select host, guest, quantile_cont(age_s, 0.99) as p99_age_s, avg(free_memory) as mean_free_memory "
         "from {source} group by host, guest order by host, guest")
HOSTS = ("lab1", "lab2", "rack3-a", "rack3-b", "198.18.1.2", "198.18.1.3", "edge-1", "edge-2")
MIB, GIB = 1 << 20, 1 << 30
START_S = 1_790_000_000
COLUMNS = ("engine", "runs", "rows", "median_s", "x_pandas", "peak_rss_GB", "floor_rss_GB", "repeats_s")
FORMATS = {"median_s": ".2f", "x_pandas": ".3f", "peak_rss_GB": ".2f", "floor_rss_GB": ".2f"}
PROBE_RUNS = (2, 8)


# -- the data --------------------------------------------------------------------------------------
def run_frame(index: int, guests: int, hours: int) -> Any:
    """Run ``index``'s samples: every guest every second, in time order (as a sampler appends)."""
    import numpy as np
    import pandas as pd
    rng = np.random.default_rng(index)
    seconds, n = hours * 3600, hours * 3600 * guests
    hosts = [HOSTS[(index + j) % len(HOSTS)] for j in range(2 + index % 4)]
    t0 = START_S + index * 86_400
    second = np.repeat(np.arange(seconds, dtype=np.int64), guests)
    code = np.tile(np.arange(guests, dtype=np.int64), seconds)
    memory = np.full(n, 2 * GIB, dtype=np.int64)
    total = memory - 75 * MIB

    def walk(start_lo: int, start_hi: int, step: int, lo: int, hi: Any) -> Any:
        """A random walk per guest, clipped, in 4 KiB pages."""
        steps = rng.normal(0, step, (seconds, guests))
        steps[0] = rng.uniform(start_lo, start_hi, guests)
        return (np.clip(np.cumsum(steps, axis=0).ravel(), lo, hi) // 4096 * 4096).astype(np.int64)

    free = walk(200 * MIB, 1200 * MIB, 2 * MIB, 40 * MIB, total - 300 * MIB)
    caches = walk(100 * MIB, 400 * MIB, MIB, 20 * MIB, 600 * MIB)
    stepped = (code % 2 == 1) & (second >= seconds // 3) & (second < 2 * seconds // 3)
    actual = np.where(stepped, memory - 512 * MIB, memory)
    age = 0.05 + rng.exponential(0.25, n)
    tail = rng.random(n) < 0.01
    age[tail] = rng.uniform(1, 5, int(tail.sum()))
    per_guest = (seconds, guests)

    def ints(values: Any, mask: Any = None) -> Any:
        return pd.arrays.IntegerArray(np.asarray(values, dtype=np.int64),
                                      np.zeros(n, dtype=bool) if mask is None else mask)

    zeros = np.zeros(n, dtype=np.int64)
    time_ns = (t0 + second) * 1_000_000_000 + code * 37_000_000  # guests read 37 ms apart
    columns = {
        "guest": pd.Categorical.from_codes(code, [f"vm-{g:02d}" for g in range(guests)]),
        "host": pd.Categorical.from_codes(code % len(hosts), hosts),
        "last_update": pd.DatetimeIndex((t0 + second) * 1_000_000_000, tz="UTC"),
        "swap_in": ints(zeros), "swap_out": ints(zeros),
        "major_faults": ints(150 + np.cumsum(rng.poisson(0.01, per_guest), axis=0).ravel()),
        "minor_faults": ints(30_000 + np.cumsum(rng.poisson(40, per_guest), axis=0).ravel()),
        "free_memory": ints(free), "total_memory": ints(total),
        "available_memory": ints(np.minimum(free + caches * 4 // 5, total)), "disk_caches": ints(caches),
        "htlb_pgalloc": ints(zeros), "htlb_pgfail": ints(zeros),
        "actual": ints(actual), "target": ints(actual, code % 2 == 0), "period_s": ints(zeros + 1),
        "rss": ints(actual * 3 // 5 + rng.integers(0, 64, n) * 4096),
        "age_s": pd.arrays.FloatingArray(age, np.zeros(n, dtype=bool)), "reset": np.zeros(n, dtype=bool),
    }
    return pd.DataFrame(columns, index=pd.DatetimeIndex(time_ns, tz="UTC", name="time"))


def generate(folder: Path, runs: int, guests: int, hours: int, flush_hours: int) -> list[Path]:
    """The run folders, written where missing (a run without status "done" is written again)."""
    from balloonlab.record.buffer import event_buffer
    from balloonlab.record.store import RunWriter
    paths = [folder / f"run-{i:03d}" for i in range(runs)]
    events = event_buffer().frame()
    for i, path in enumerate(paths):
        meta = path / "run.json"
        if meta.exists() and json.loads(meta.read_text()).get("status") == "done":
            continue
        shutil.rmtree(path, ignore_errors=True)
        start = time.monotonic()
        frame = run_frame(i, guests, hours)
        writer = RunWriter(path)
        writer.write_metadata(status="running", benchmark="fleet_query", guests=guests, hours=hours)
        step = flush_hours * 3600 * guests
        for a in range(0, len(frame), step):
            writer.flush(frame.iloc[a:a + step], events)
        writer.write_metadata(status="done", rows=len(frame))
        print(f"  wrote {path.name}: {len(frame):,} rows in {time.monotonic() - start:.1f} s", file=sys.stderr)
        del frame
    return paths


def disk_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in p.rglob("*.parquet"))


# -- the parts (each in its own child process) ---------------------------------------------------------
def part_duckdb(paths: list[str]) -> Any:
    from balloonlab import open_runs
    return open_runs(paths).sql(QUERY.format(source="samples")).df()


def part_duckdb_native(paths: list[str]) -> Any:
    import duckdb

    from balloonlab import open_runs
    files = [str(f) for f in open_runs(paths).files]
    source = f"read_parquet({files!r}, hive_partitioning = true, union_by_name = true)"
    return duckdb.connect().sql(QUERY.format(source=source)).df()


def part_pandas(paths: list[str]) -> Any:
    import pandas as pd

    from balloonlab import load_run
    frames = [load_run(p).samples[["host", "guest", "age_s", "free_memory"]] for p in paths]
    # One category set per column, so the concatenation stays categorical (pd.concat of differing
    # categories gives object columns); no time sort (concat_frames' sort): the question needs none.
    dtypes = {c: pd.CategoricalDtype(sorted(set().union(*(f[c].cat.categories for f in frames))))
              for c in ("host", "guest")}
    whole = pd.concat([f.astype(dtypes) for f in frames])
    del frames
    groups = whole.groupby(["host", "guest"], observed=True)
    out = groups["age_s"].quantile(0.99).rename("p99_age_s").to_frame()
    out["mean_free_memory"] = groups["free_memory"].mean()
    return out.reset_index().astype({"host": str, "guest": str}).sort_values(["host", "guest"])


PARTS = {"duckdb": part_duckdb, "duckdb_native": part_duckdb_native, "pandas": part_pandas}


def child(name: str, paths: list[str], repeats: int, answer: str) -> dict[str, Any]:
    import numpy  # noqa: F401  (imports before the floor RSS: they are not the question's cost)
    import pandas  # noqa: F401
    import pyarrow.dataset  # noqa: F401

    import balloonlab  # noqa: F401
    if name != "pandas":
        import duckdb  # noqa: F401
    floor = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    times, result = [], None
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = PARTS[name](paths)
        times.append(time.perf_counter() - start)
    assert result is not None
    result.to_parquet(answer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"times_s": times, "median_s": median(times), "peak_rss": peak, "floor_rss": floor,
            "groups": len(result)}


def warm(paths: list[Path]) -> float:
    """Read every part file once, so each engine starts with the files in the page cache (the
    one before it may have pushed them out); returns the seconds it took."""
    start = time.monotonic()
    for part in (f for p in paths for f in p.rglob("*.parquet")):
        with open(part, "rb", buffering=0) as file:
            while file.read(16 << 20):
                pass
    return time.monotonic() - start


def run_part(name: str, paths: list[Path], args: argparse.Namespace, answer: Path) -> dict[str, Any]:
    warm_s = warm(paths)
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--repeats", str(args.repeats),
            "--answer", str(answer), *map(str, paths)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"part {name} on {len(paths)} runs failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "warm_s": warm_s}


def same_answer(a: Path, b: Path) -> bool:
    import math

    import pandas as pd
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if x[["host", "guest"]].astype(str).values.tolist() != y[["host", "guest"]].astype(str).values.tolist():
        return False
    return all(math.isclose(float(p), float(q), rel_tol=1e-9) for column in ("p99_age_s", "mean_free_memory")
               for p, q in zip(x[column], y[column], strict=True))


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/balloonlab-fleet-bench"), help="cache folder")
    parser.add_argument("--runs", type=int, default=100, help="run folders (100)")
    parser.add_argument("--guests", type=int, default=20, help="guests per run (20)")
    parser.add_argument("--hours", type=int, default=24, help="hours per run, a sample a second (24)")
    parser.add_argument("--flush-hours", type=int, default=6, help="hours of rows per RunWriter.flush (6)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per engine; the median is kept (3)")
    parser.add_argument("--memory-fraction", type=float, default=0.6,
                        help="of MemAvailable, the most pandas' predicted peak may take (0.6)")
    parser.add_argument("--pandas-runs", type=int, help="runs for pandas (default: the most that fit)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/fleet_query.json")
    parser.add_argument("--part", choices=tuple(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--answer", help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(child(args.part, args.paths, args.repeats, args.answer)))
        return
    folder = args.data / f"g{args.guests}-h{args.hours}"
    start = time.monotonic()
    print(f"data: {folder} ({args.runs} runs x {args.guests} guests x {args.hours} h at 1 s)", file=sys.stderr)
    paths = generate(folder, args.runs, args.guests, args.hours, args.flush_hours)
    generated_s = time.monotonic() - start
    rows_per_run = args.guests * args.hours * 3600
    answers = Path(folder / "answers")
    answers.mkdir(exist_ok=True)
    results: dict[str, Any] = {}
    pandas_runs = args.pandas_runs
    if pandas_runs is None:  # predict pandas' peak from two probes (a line: per run + fixed), keep inside memory
        small, big = (min(n, args.runs) for n in PROBE_RUNS)
        probes = {n: run_part("pandas", paths[:n], argparse.Namespace(repeats=1), answers / f"probe-{n}.parquet")
                  for n in (small, big)}
        per_run = (probes[big]["peak_rss"] - probes[small]["peak_rss"]) / max(1, big - small)
        fixed = probes[small]["peak_rss"] - small * per_run
        budget = args.memory_fraction * mem_available()
        pandas_runs = max(1, min(args.runs, int((budget - fixed) / per_run))) if per_run > 0 else args.runs
        results["prediction"] = {"probes": probes, "bytes_per_run": per_run, "fixed_bytes": fixed,
                                 "bytes_per_row": per_run / rows_per_run, "budget": budget, "runs": pandas_runs,
                                 "all_runs_bytes": fixed + per_run * args.runs}
    rows: list[dict[str, Any]] = []
    sizes = [pandas_runs] + ([args.runs] if pandas_runs < args.runs else [])
    for name, counts in (("pandas", [pandas_runs]), ("duckdb", sizes), ("duckdb_native", sizes)):
        for count in counts:
            print(f"measuring {name} on {count} runs ...", file=sys.stderr)
            res = run_part(name, paths[:count], args, answers / f"{name}-{count}.parquet")
            results[f"{name}-{count}"] = res
            rows.append({"engine": {"duckdb_native": "duckdb read_parquet (info)",
                                    "pandas": "pandas load_run (baseline)"}.get(name, "duckdb open_runs"),
                         "runs": count, "rows": count * rows_per_run, "median_s": res["median_s"],
                         "peak_rss_GB": res["peak_rss"] / 1e9, "floor_rss_GB": res["floor_rss"] / 1e9,
                         "repeats_s": " ".join(f"{t:.1f}" for t in res["times_s"])})
    base = results[f"pandas-{pandas_runs}"]["median_s"]
    for row in rows:
        row["x_pandas"] = ratio(row["median_s"], base) if row["runs"] == pandas_runs else None
    agree = {name: same_answer(answers / f"{name}-{pandas_runs}.parquet", answers / f"pandas-{pandas_runs}.parquet")
             for name in ("duckdb", "duckdb_native")}
    print_table(rows, COLUMNS, FORMATS)
    disk = disk_bytes(paths)
    print(f"\n{args.runs} runs x {args.guests} guests x {args.hours} h = {args.runs * rows_per_run:,} rows, "
          f"{disk / 1e9:.2f} GB of Parquet on disk ({disk / (args.runs * rows_per_run):.1f} B/row), "
          f"{sum(1 for p in paths for _ in p.rglob('*.parquet'))} files; generated/checked in {generated_s:.0f} s")
    pred = results.get("prediction")
    if pandas_runs < args.runs and pred is not None:
        print(f"pandas ran on {pandas_runs} of {args.runs} runs: all {args.runs} would need about "
              f"{pred['all_runs_bytes'] / 1e9:.1f} GB (probes: {pred['bytes_per_row']:.0f} B/row), more "
              f"than {args.memory_fraction:.0%} of MemAvailable ({pred['budget'] / args.memory_fraction / 1e9:.1f} GB)")
    elif pred is not None:
        print(f"pandas' peak predicted from the probes: {pred['all_runs_bytes'] / 1e9:.1f} GB "
              f"({pred['bytes_per_row']:.0f} B/row), within {args.memory_fraction:.0%} of MemAvailable")
    elif pandas_runs < args.runs:
        print(f"pandas ran on {pandas_runs} of {args.runs} runs (--pandas-runs)")
    print(f"answers equal to pandas' (1e-9): {agree}")
    env = environment()
    out = write_json("fleet_query", {"benchmark": "fleet_query", "environment": env, "args": vars(args),
                                     "rows_total": args.runs * rows_per_run, "disk_bytes": disk, "summary": rows,
                                     "results": results, "answers_agree": agree}, args.json)
    print(f"Python {env['python']}, {env['cpu_model']}, {env['nproc']} CPUs; raw data: {out}")


if __name__ == "__main__":
    main()
