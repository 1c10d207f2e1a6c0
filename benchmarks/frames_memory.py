"""Memory and time of balloonlab's columnar sample buffer against the usual alternatives.

Rows are what the Sampler appends (``Sampler._append``): guest, last_update, the ten QEMU 7.2
stats, actual, target, period_s, rss, age_s, reset, for ``--guests`` guests taking turns, each
row a fresh dict of fresh int objects (as parsed from QMP JSON). Every method runs in its own
child process, so one's freed memory cannot hide another's growth:

* ``columnar``  ``balloonlab.record.buffer.sample_buffer()``: ``append(time_ns, row)`` for
                ``--frame-rows`` rows (10 M); memory = RSS growth over the first 1 M rows (and
                the bytes its arrays hold); ``frame()`` is timed at 1 M and at 10 M rows;
* ``dicts``     the baseline: rows (with their time) kept in a list, then
                ``pd.DataFrame(list_of_dicts)``, for 1 M rows only (10 M dicts would take about
                15 GB): the 10 M figure is extrapolated linearly (x10) and marked ``~``;
* ``concat``    a DataFrame grown with ``pd.concat`` per row, for ``--concat-rows`` (2,000)
                rows; its per-row time grows with the frame, so totals for 1 M / 10 M rows are
                extrapolated from a fit ``t(n) = a n + b n^2`` over the measured prefix (``~``).

Append cost is the median over batches of 1,000 rows (``perf_counter_ns`` around the appends
only; building the row dict is not counted). ``MB/1M`` is RSS growth per million rows held
(for ``concat``: the final frame's ``memory_usage(deep=True)`` scaled). ``x_dicts`` columns
are ratios against ``dicts`` in the same run. pandas is 3.x here: ``DataFrame(list_of_dicts)``
infers int64/float64/str columns, not the buffer's Int64/categorical/UTC schema.

Run from the project root: ``.venv/bin/python benchmarks/frames_memory.py [--frame-rows N]
[--json PATH]``; about 1-2 minutes and 4 GB at the default 10 M rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from _common import environment, median, print_table, ratio, write_json

GUEST_NAMES = ("web-0", "db-0", "cache-0", "batch-0")
MEMORY, TOTAL = 536_870_912, 492_847_104
BATCH = 1000
COLUMNS = ("method", "rows", "MB/1M", "bytes/row", "append_ns", "frame_1M_s", "frame_10M_s", "us/row_total",
           "x_dicts_mem", "x_dicts_append", "x_dicts_frame", "x_dicts_total")
FORMATS = {"MB/1M": ".1f", "bytes/row": ".0f", "append_ns": ".0f", "x_dicts_mem": ".2f", "x_dicts_append": ".2f",
           "x_dicts_frame": ".3g",
           "us/row_total": ".3g", "x_dicts_total": ".3g"}


def make_row(i: int, guests: int) -> dict[str, Any]:
    """Row ``i``: a fresh dict of fresh ints, as the Sampler builds from one QMP reply."""
    g, k = i % guests, i // guests
    jitter = (i * 2654435761) % 50_000_000
    return {"swap_in": k & 0, "swap_out": k & 0, "major_faults": 150 + k // 600, "minor_faults": 30_000 + 37 * k + i % 37,
            "free_memory": 200_000_000 + jitter, "total_memory": TOTAL + (k & 0),
            "available_memory": 230_000_000 + jitter, "disk_caches": 2_281_472 + 4096 * (i % 512),
            "htlb_pgalloc": k & 0, "htlb_pgfail": k & 0,
            "guest": GUEST_NAMES[g], "last_update": 1_790_000_000 + k, "actual": MEMORY - 4096 * (k % 3),
            "target": MEMORY // 2 + (k & 0) if g % 2 else None, "period_s": 1, "rss": 210_000_000 + 4096 * (i % 997),
            "age_s": 0.01 + (i % 100) / 1000, "reset": False}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_ns_of(i: int, guests: int) -> int:
    return 1_790_000_000_000_000_000 + (i // guests) * 1_000_000_000 + (i % guests) * 50_000


# -- parts (each in its own process) -----------------------------------------------------------
def part_columnar(rows: int, frame_rows: int, guests: int) -> dict[str, Any]:
    from balloonlab.record.buffer import sample_buffer
    buf = sample_buffer()
    gc.collect()
    rss0 = rss_bytes()
    per_row: list[float] = []
    out: dict[str, Any] = {}
    i = 0
    while i < frame_rows:
        n = min(BATCH, frame_rows - i)
        batch = [(time_ns_of(j, guests), make_row(j, guests)) for j in range(i, i + n)]
        start = time.perf_counter_ns()
        for t, row in batch:
            buf.append(t, row)
        per_row.append((time.perf_counter_ns() - start) / n)
        i += n
        if i == rows:
            del batch
            gc.collect()
            out["rss_growth"] = rss_bytes() - rss0
            out["array_bytes"] = sum(c.values.buffer_info()[1] * c.values.itemsize + len(c.mask)
                                     for c in buf._columns.values()) + len(buf._time) * 8
            start = time.perf_counter()
            frame = buf.frame()
            out["frame_1M_s"] = time.perf_counter() - start
            out["frame_bytes_1M"] = int(frame.memory_usage(deep=True).sum())
            out["dtypes"] = {k: str(v) for k, v in frame.dtypes.items()}
            del frame
    out["append_ns"] = median(per_row)
    out["append_ns_p90"] = sorted(per_row)[int(0.9 * (len(per_row) - 1))]
    if frame_rows > rows:
        start = time.perf_counter()
        frame = buf.frame()
        out["frame_10M_s"] = time.perf_counter() - start
        out["frame_rows"] = len(frame)
        out["frame_bytes"] = int(frame.memory_usage(deep=True).sum())
    out["rows"] = rows
    return out


def part_dicts(rows: int, guests: int) -> dict[str, Any]:
    import pandas as pd
    kept: list[dict[str, Any]] = []
    gc.collect()
    rss0 = rss_bytes()
    per_row: list[float] = []
    for i in range(0, rows, BATCH):
        batch = []
        for j in range(i, min(rows, i + BATCH)):
            row = make_row(j, guests)
            row["time"] = time_ns_of(j, guests)
            batch.append(row)
        start = time.perf_counter_ns()
        for row in batch:
            kept.append(row)  # noqa: PERF402 (timing list.append itself)
        per_row.append((time.perf_counter_ns() - start) / len(batch))
    del batch
    gc.collect()
    growth = rss_bytes() - rss0
    start = time.perf_counter()
    frame = pd.DataFrame(kept)
    build = time.perf_counter() - start
    return {"rows": rows, "rss_growth": growth, "append_ns": median(per_row), "frame_1M_s": build,
            "frame_bytes_1M": int(frame.memory_usage(deep=True).sum()),
            "dtypes": {k: str(v) for k, v in frame.dtypes.items()}}


def part_concat(rows: int, guests: int) -> dict[str, Any]:
    import pandas as pd
    warnings.simplefilter("ignore")  # pandas warns about all-NA columns in concat
    frame = pd.DataFrame([{**make_row(0, guests), "time": time_ns_of(0, guests)}])
    per_row: list[float] = []
    cumulative: list[tuple[int, float]] = []
    total = 0.0
    for j in range(1, rows):
        row = {**make_row(j, guests), "time": time_ns_of(j, guests)}
        start = time.perf_counter_ns()
        frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
        elapsed = time.perf_counter_ns() - start
        per_row.append(elapsed)
        total += elapsed / 1e9
        if (j + 1) % 100 == 0:
            cumulative.append((j + 1, total))
    return {"rows": rows, "append_ns": median(per_row), "append_ns_first100": median(per_row[:100]),
            "append_ns_last100": median(per_row[-100:]), "total_s": total, "cumulative": cumulative,
            "frame_bytes": int(frame.memory_usage(deep=True).sum())}


def fit_quadratic(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares of t = a n + b n^2 (no intercept)."""
    s11 = sum(n * n for n, _ in points)
    s12 = sum(n ** 3 for n, _ in points)
    s22 = sum(n ** 4 for n, _ in points)
    y1 = sum(n * t for n, t in points)
    y2 = sum(n * n * t for n, t in points)
    det = s11 * s22 - s12 * s12
    return (y1 * s22 - y2 * s12) / det, (s11 * y2 - s12 * y1) / det


def run_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--rows", str(args.rows),
            "--frame-rows", str(args.frame_rows), "--concat-rows", str(args.concat_rows), "--guests", str(args.guests)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"part {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(res: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    col, dic, cat = res["columnar"], res["dicts"], res["concat"]
    per_m = 1_000_000 / args.rows
    a, b = fit_quadratic(cat["cumulative"])
    cat["fit_a_s"], cat["fit_b_s"] = a, b
    cat["extrapolated_1M_s"] = a * 1e6 + b * 1e12
    cat["extrapolated_10M_s"] = a * 1e7 + b * 1e14
    rows = [
        {"method": "columnar", "rows": max(args.rows, args.frame_rows), "MB/1M": col["rss_growth"] * per_m / 1e6,
         "bytes/row": col["rss_growth"] / args.rows, "append_ns": col["append_ns"],
         "frame_1M_s": f"{col['frame_1M_s']:.3f}",
         "frame_10M_s": f"{col['frame_10M_s']:.2f}" if "frame_10M_s" in col else "-",
         "_f1": col["frame_1M_s"], "_f10": col.get("frame_10M_s")},
        {"method": "dicts (baseline)", "rows": args.rows, "MB/1M": dic["rss_growth"] * per_m / 1e6,
         "bytes/row": dic["rss_growth"] / args.rows, "append_ns": dic["append_ns"],
         "frame_1M_s": f"{dic['frame_1M_s']:.3f}", "frame_10M_s": f"~{dic['frame_1M_s'] * 10:.1f}",
         "_f1": dic["frame_1M_s"], "_f10": dic["frame_1M_s"] * 10},
        {"method": "concat per row", "rows": args.concat_rows, "MB/1M": cat["frame_bytes"] * 1e6 / args.concat_rows / 1e6,
         "bytes/row": cat["frame_bytes"] / args.concat_rows, "append_ns": cat["append_ns"],
         "frame_1M_s": f"~{cat['extrapolated_1M_s']:.3g}", "frame_10M_s": f"~{cat['extrapolated_10M_s']:.3g}",
         "_f1": cat["extrapolated_1M_s"], "_f10": cat["extrapolated_10M_s"]},
    ]
    base = rows[1]
    for row in rows:
        row["x_dicts_mem"] = ratio(row["MB/1M"], base["MB/1M"])
        row["x_dicts_append"] = ratio(row["append_ns"], base["append_ns"])
        row["x_dicts_frame"] = ratio(row["_f10"], base["_f10"])
        # What having the frame of 1M rows costs in all, per row: appends + the build.
        row["us/row_total"] = (row["append_ns"] * 1e-3 + row["_f1"] * 1e6 / args.rows
                               if row["method"] != "concat per row"
                               else row["_f1"])  # concat: the frame exists after the appends; _f1 is for 1M rows
    for row in rows:
        row["x_dicts_total"] = ratio(row["us/row_total"], base["us/row_total"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for memory and the dicts baseline (1M)")
    parser.add_argument("--frame-rows", type=int, default=10_000_000, help="rows in the buffer for frame() (10M)")
    parser.add_argument("--concat-rows", type=int, default=2000, help="rows grown by pd.concat (2000)")
    parser.add_argument("--guests", type=int, default=4, help="guests taking turns in the rows (4)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/frames_memory.json")
    parser.add_argument("--part", choices=("columnar", "dicts", "concat"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frame_rows < args.rows or args.rows % BATCH or args.concat_rows < 300:
        parser.error("need --frame-rows >= --rows, --rows a multiple of 1000, --concat-rows >= 300")
    if args.part == "columnar":
        print(json.dumps(part_columnar(args.rows, args.frame_rows, args.guests)))
        return
    if args.part == "dicts":
        print(json.dumps(part_dicts(args.rows, args.guests)))
        return
    if args.part == "concat":
        print(json.dumps(part_concat(args.concat_rows, args.guests)))
        return
    results = {}
    for name in ("columnar", "dicts", "concat"):
        start = time.monotonic()
        results[name] = run_part(name, args)
        results[name]["part_wall_s"] = time.monotonic() - start
    rows = summarize(results, args)
    print_table(rows, COLUMNS, FORMATS)
    col, cat = results["columnar"], results["concat"]
    print(f"\ncolumnar: arrays hold {col['array_bytes'] / 1e6:.1f} MB per {args.rows:,} rows (RSS grew "
          f"{col['rss_growth'] / 1e6:.1f} MB); frame of {args.rows:,} rows: {col['frame_bytes_1M'] / 1e6:.1f} MB "
          f"(dicts' frame {results['dicts']['frame_bytes_1M'] / 1e6:.1f} MB); append p90 {col['append_ns_p90']:.0f} ns")
    print(f"concat per row: {cat['append_ns_first100'] / 1e3:.0f} us/row for the first 100 rows, "
          f"{cat['append_ns_last100'] / 1e3:.0f} us/row at {args.concat_rows}; {cat['total_s']:.2f} s in all; "
          f"fit t(n) = {cat['fit_a_s'] * 1e6:.1f} us n + {cat['fit_b_s'] * 1e9:.3f} ns n^2")
    print("~ marks extrapolations: dicts x10 from 1M rows; concat from the fit (frame_*: time to have the frame)")
    env = environment()
    out = write_json("frames_memory", {"benchmark": "frames_memory", "environment": env, "args": vars(args),
                                       "summary": [{k: v for k, v in r.items()} for r in rows],
                                       "results": results}, args.json)
    print(f"pandas {_pandas_version()}, Python {env['python']}, {env['cpu_model']}; raw data: {out}")


def _pandas_version() -> str:
    import pandas as pd
    return pd.__version__


if __name__ == "__main__":
    main()
