"""Memory, append cost and frame() time of balloonlab's packed row buffer against their floors.

Rows are what the Sampler appends (``Sampler._append``): guest, last_update, the ten QEMU 7.2
stats, actual, target, period_s, rss, age_s, reset, for ``--guests`` guests taking turns, each
row a fresh dict of fresh int objects (as parsed from QMP JSON). Every part runs in its own
child process, so one's freed memory cannot hide another's growth:

* ``buffer``  ``balloonlab.record.buffer.sample_buffer()``: ``append(time_ns, row)`` for
              ``--frame-rows`` rows (10 M), in batches of 1,000 rows whose dicts are built
              beforehand. Each batch is also appended to two floors in the same process, the
              order of the three rotating per batch: ``list.append(row)`` of the same dicts, and
              ``list.append(dict(row))`` (a fresh list per batch, dropped untimed). Append cost
              is the median over batches of ``perf_counter_ns`` around the appends only.
              Memory: RSS growth over the first ``--rows`` rows (1 M), the RSS slope from there
              to ``--frame-rows`` (measured after the 1 M frame is freed), and
              ``buffer.nbytes``, each per row, against the payload the buffer holds:
              ``buffer.row_bytes``, the packed values of one row (target <= 1.1x).
              ``frame()`` is timed (median of ``--repeats``) at ``--rows`` and ``--frame-rows``
              rows against its floor: ``pd.DataFrame(columns, index=..., copy=False)`` over the
              numpy arrays the frame already holds, re-wrapped per column as ``IntegerArray`` /
              ``FloatingArray`` (values, mask), ``Categorical.from_codes`` (codes), the existing
              ``DatetimeArray`` (last_update) and ``DatetimeIndex`` (time), timed from the
              arrays to the DataFrame (target frame <= 3x floor). A second, informative floor
              copies each of those arrays once before wrapping them (``one-copy``): what any
              build that hands pandas new arrays must pay;
* ``dicts``   the old baseline: the rows (with their time) kept in a list for ``--rows`` rows,
              its RSS growth per row, and ``pd.DataFrame(list_of_dicts)`` timed once (10 M dicts
              would take about 15 GB). pandas is 3.x here: it infers int64/float64/str columns,
              not the buffer's Int64/categorical/UTC schema.

``x_floor`` is value / floor, both from this run. Run from the project root:
``nice -n 10 .venv/bin/python benchmarks/frames_memory.py [--frame-rows N] [--rows N] [--json PATH]``;
about 8 minutes (2 loaded CPUs) and 5 GB at the default 10 M rows (``--frame-rows 2000000`` for a smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import environment, median, print_table, quantile, ratio, write_json

GUEST_NAMES = ("web-0", "db-0", "cache-0", "batch-0")
MEMORY, TOTAL = 536_870_912, 492_847_104
BATCH = 1000
FLOOR_REPEATS = 7
COLUMNS = ("measure", "rows", "unit", "value", "floor", "floor is", "x_floor", "target", "ok")
FORMATS = {"value": ".4g", "floor": ".4g", "x_floor": ".3g"}


def make_row(i: int, guests: int) -> dict[str, Any]:
    """Row ``i``: a fresh dict of fresh ints, as the Sampler builds from one QMP reply."""
    g, k = i % guests, i // guests
    jitter = (i * 2654435761) % 50_000_000
    return {"swap_in": k & 0, "swap_out": k & 0, "major_faults": 150 + k // 600,
            "minor_faults": 30_000 + 37 * k + i % 37,
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


def make_batch(start: int, n: int, guests: int) -> list[tuple[int, dict[str, Any]]]:
    return [(time_ns_of(j, guests), make_row(j, guests)) for j in range(start, start + n)]


# -- the floors of frame() -----------------------------------------------------------------------
def frame_arrays(frame: Any) -> tuple[dict[str, tuple[Any, ...]], Any]:
    """The numpy arrays (and the datetime arrays) ``frame`` holds, per column, to rebuild it from."""
    import pandas as pd
    parts: dict[str, tuple[Any, ...]] = {}
    for name in frame.columns:
        array = frame[name].array
        if isinstance(array, (pd.arrays.IntegerArray, pd.arrays.FloatingArray)):
            parts[name] = ("masked", type(array), array._data, array._mask)
        elif isinstance(array, pd.Categorical):
            parts[name] = ("category", array.codes, array.dtype)
        elif isinstance(array, pd.arrays.DatetimeArray):
            parts[name] = ("datetime", array)
        else:
            parts[name] = ("numpy", array.to_numpy(copy=False))
    return parts, frame.index.array


def build_floor(parts: dict[str, tuple[Any, ...]], index: Any, copy: bool) -> Any:
    """``pd.DataFrame(..., copy=False)`` over ``parts``' arrays, each copied once first if ``copy``."""
    import pandas as pd
    data: dict[str, Any] = {}
    for name, part in parts.items():
        if part[0] == "masked":
            values, mask = (part[2].copy(), part[3].copy()) if copy else (part[2], part[3])
            data[name] = part[1](values, mask)
        elif part[0] == "category":
            data[name] = pd.Categorical.from_codes(part[1].copy() if copy else part[1], dtype=part[2], validate=False)
        else:
            data[name] = part[1].copy() if copy else part[1]
    times = pd.DatetimeIndex(index.copy() if copy else index, name="time", copy=False)
    return pd.DataFrame(data, index=times, copy=False)


def shares_memory(frame: Any, parts: dict[str, tuple[Any, ...]], index: Any) -> bool:
    """Whether every column (and the index) of ``frame`` is a view of ``parts``' arrays."""
    import numpy as np
    def arrays(part: tuple[Any, ...]) -> list[Any]:
        if part[0] == "masked":
            return [part[2], part[3]]
        return [part[1].asi8 if part[0] == "datetime" else part[1]]

    rebuilt, times = frame_arrays(frame)
    same = [np.shares_memory(times.asi8, index.asi8)]
    for name, part in parts.items():
        same += [np.shares_memory(a, b) for a, b in zip(arrays(rebuilt[name]), arrays(part), strict=True)]
    return all(same)


def time_frames(buf: Any, rows: int, repeats: int) -> dict[str, Any]:
    """frame() of the first ``rows`` rows against its two floors."""
    per_frame: list[float] = []
    for _ in range(repeats):
        frame = None
        gc.collect()
        start = time.perf_counter()
        frame = buf.frame(0, rows)
        per_frame.append(time.perf_counter() - start)
    assert frame is not None and len(frame) == rows
    parts, index = frame_arrays(frame)
    floors: dict[str, list[float]] = {"zero_copy": [], "one_copy": []}
    shared = []
    for kind, copy in (("zero_copy", False), ("one_copy", True)):
        for _ in range(FLOOR_REPEATS if not copy else repeats):
            gc.collect()
            start = time.perf_counter()
            floor = build_floor(parts, index, copy)
            floors[kind].append(time.perf_counter() - start)
            if not copy:
                shared.append(shares_memory(floor, parts, index))
            del floor
    return {"frame_s": median(per_frame), "frame_s_all": per_frame,
            "floor_s": median(floors["zero_copy"]), "floor_s_all": floors["zero_copy"],
            "one_copy_s": median(floors["one_copy"]), "one_copy_s_all": floors["one_copy"],
            "floor_shares_memory": all(shared), "frame_bytes": int(frame.memory_usage(deep=True).sum()),
            "dtypes": {k: str(v) for k, v in frame.dtypes.items()}}


# -- parts (each in its own process) -----------------------------------------------------------
def part_buffer(rows: int, frame_rows: int, guests: int, repeats: int) -> dict[str, Any]:
    from balloonlab.record.buffer import sample_buffer
    buf = sample_buffer()
    append = buf.append
    per_row: dict[str, list[float]] = {"buffer": [], "list_append": [], "list_append_dict": []}
    out: dict[str, Any] = {"row_bytes": buf.row_bytes}

    def run_buffer(batch: list[tuple[int, dict[str, Any]]]) -> None:
        start = time.perf_counter_ns()
        for t, row in batch:
            append(t, row)
        per_row["buffer"].append((time.perf_counter_ns() - start) / len(batch))

    def run_list(batch: list[tuple[int, dict[str, Any]]]) -> None:
        kept: list[dict[str, Any]] = []
        keep = kept.append
        start = time.perf_counter_ns()
        for _t, row in batch:
            keep(row)
        per_row["list_append"].append((time.perf_counter_ns() - start) / len(batch))

    def run_list_dict(batch: list[tuple[int, dict[str, Any]]]) -> None:
        kept: list[dict[str, Any]] = []
        keep = kept.append
        start = time.perf_counter_ns()
        for _t, row in batch:
            keep(dict(row))
        per_row["list_append_dict"].append((time.perf_counter_ns() - start) / len(batch))

    methods = (run_buffer, run_list, run_list_dict)
    warm = make_batch(0, BATCH, guests)  # one batch made and freed, as before every RSS reading
    del warm
    gc.collect()
    rss0 = rss_bytes()
    rss_after_first_frame = None
    i = k = 0
    while i < frame_rows:
        n = min(BATCH, frame_rows - i)
        batch = make_batch(i, n, guests)
        for m in range(3):
            methods[(k + m) % 3](batch)
        i += n
        k += 1
        if i == rows or i == frame_rows:
            del batch
            gc.collect()
            rss = rss_bytes()
            if i == rows:
                out["rss_growth_first"] = rss - rss0
                out["nbytes_first"] = buf.nbytes
                out["frames_first"] = time_frames(buf, rows, repeats)
                gc.collect()
                rss_after_first_frame = rss_bytes()
                out["rss_kept_by_first_frames"] = rss_after_first_frame - rss
            if i == frame_rows and frame_rows > rows:
                assert rss_after_first_frame is not None
                out["rss_growth_rest"] = rss - rss_after_first_frame
                out["nbytes"] = buf.nbytes
                out["rss_growth_total"] = rss - rss0
    out["rows"], out["frame_rows"] = rows, frame_rows
    for name, samples in per_row.items():
        out[f"{name}_ns"] = median(samples)
        out[f"{name}_ns_p90"] = quantile(samples, 0.9)
        out[f"{name}_batches"] = len(samples)
    if frame_rows > rows:
        out["frames"] = time_frames(buf, frame_rows, repeats)
    return out


def part_dicts(rows: int, guests: int) -> dict[str, Any]:
    import pandas as pd
    kept: list[dict[str, Any]] = []
    gc.collect()
    rss0 = rss_bytes()
    for i in range(0, rows, BATCH):
        for t, row in make_batch(i, min(BATCH, rows - i), guests):
            row["time"] = t
            kept.append(row)
    gc.collect()
    growth = rss_bytes() - rss0
    start = time.perf_counter()
    frame = pd.DataFrame(kept)
    build = time.perf_counter() - start
    return {"rows": rows, "rss_growth": growth, "frame_s": build,
            "frame_bytes": int(frame.memory_usage(deep=True).sum()),
            "dtypes": {k: str(v) for k, v in frame.dtypes.items()}}


def run_part(name: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--rows", str(args.rows),
            "--frame-rows", str(args.frame_rows), "--guests", str(args.guests), "--repeats", str(args.repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"part {name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(measure: str, rows: int, unit: str, value: float | None, floor: float | None, floor_is: str,
         target: float | None = None) -> dict[str, Any]:
    x = ratio(value, floor)
    ok = "-" if target is None or x is None else ("yes" if x <= target else "NO")
    return {"measure": measure, "rows": rows, "unit": unit, "value": value, "floor": floor, "floor is": floor_is,
            "x_floor": x, "target": f"<= {target:g}x" if target is not None else "-", "ok": ok}


def summarize(res: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    buf, dic = res["buffer"], res["dicts"]
    payload, n, big = buf["row_bytes"], args.rows, args.frame_rows
    rest = big - n
    rows = [
        _row("bytes/row: RSS growth, rows 0..rows", n, "B", buf["rss_growth_first"] / n, payload,
             "payload (row_bytes)", 1.1),
        _row("bytes/row: buffer.nbytes / rows", big, "B", buf.get("nbytes", buf["nbytes_first"]) / big, payload,
             "payload (row_bytes)", 1.1),
        _row("bytes/row: list of dicts (old baseline)", n, "B", dic["rss_growth"] / n, payload,
             "payload (row_bytes)"),
        _row("append, median of 1000-row batches", big, "ns/row", buf["buffer_ns"], buf["list_append_ns"],
             "list.append(row)"),
        _row("append, median of 1000-row batches", big, "ns/row", buf["buffer_ns"], buf["list_append_dict_ns"],
             "list.append(dict(row))"),
    ]
    if rest:
        rows.insert(1, _row("bytes/row: RSS growth, rows..frame-rows", rest, "B", buf["rss_growth_rest"] / rest,
                            payload, "payload (row_bytes)", 1.1))
    sizes = [(buf["frames_first"], n)] + ([(buf["frames"], big)] if "frames" in buf else [])
    for frames, count in sizes:
        rows.append(_row("frame()", count, "s", frames["frame_s"], frames["floor_s"],
                         "DataFrame(copy=False) over its arrays", 3))
    for frames, count in sizes:
        rows.append(_row("frame() (info)", count, "s", frames["frame_s"], frames["one_copy_s"],
                         "one copy per array + DataFrame"))
    rows.append(_row("frame() vs old baseline", n, "s", buf["frames_first"]["frame_s"], dic["frame_s"],
                     "pd.DataFrame(list_of_dicts)"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="rows for memory, the first frame() and the dicts baseline (1M)")
    parser.add_argument("--frame-rows", type=int, default=10_000_000,
                        help="rows appended in all, for the append median and the second frame() (10M)")
    parser.add_argument("--guests", type=int, default=4, help="guests taking turns in the rows (4)")
    parser.add_argument("--repeats", type=int, default=3, help="frame() builds per size; the median is kept (3)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/frames_memory.json")
    parser.add_argument("--part", choices=("buffer", "dicts"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.frame_rows < args.rows or args.rows % BATCH or args.rows <= 0 or args.repeats < 1:
        parser.error("need --frame-rows >= --rows > 0, --rows a multiple of 1000, --repeats >= 1")
    if args.part == "buffer":
        print(json.dumps(part_buffer(args.rows, args.frame_rows, args.guests, args.repeats)))
        return
    if args.part == "dicts":
        print(json.dumps(part_dicts(args.rows, args.guests)))
        return
    results = {}
    for name in ("buffer", "dicts"):
        start = time.monotonic()
        results[name] = run_part(name, args)
        results[name]["part_wall_s"] = time.monotonic() - start
    rows = summarize(results, args)
    print_table(rows, COLUMNS, FORMATS)
    buf, dic = results["buffer"], results["dicts"]
    first = buf["frames_first"]
    print(f"\nbuffer: row_bytes {buf['row_bytes']}; RSS grew {buf['rss_growth_first'] / 1e6:.1f} MB over "
          f"{args.rows:,} rows (nbytes {buf['nbytes_first'] / 1e6:.1f} MB)"
          + (f", {buf['rss_growth_total'] / 1e6:.1f} MB over {args.frame_rows:,} (nbytes {buf['nbytes'] / 1e6:.1f} MB)"
             if "nbytes" in buf else "")
          + f"; the {args.rows:,}-row frames left {buf['rss_kept_by_first_frames'] / 1e6:.1f} MB of RSS behind")
    print(f"append p90 ns/row: buffer {buf['buffer_ns_p90']:.0f}, list.append(row) {buf['list_append_ns_p90']:.0f}, "
          f"list.append(dict(row)) {buf['list_append_dict_ns_p90']:.0f} ({buf['buffer_batches']} batches)")
    for label, frames in ((f"{args.rows:,}", first), (f"{args.frame_rows:,}", buf.get("frames"))):
        if frames is None:
            continue
        print(f"frame() of {label} rows: {frames['frame_bytes'] / 1e6:.1f} MB; all builds "
              + ", ".join(f"{s:.3f}" for s in frames["frame_s_all"]) + " s; floor "
              + ", ".join(f"{s * 1e3:.2f}" for s in frames["floor_s_all"]) + " ms (shares the frame's memory: "
              f"{frames['floor_shares_memory']}); one-copy "
              + ", ".join(f"{s:.3f}" for s in frames["one_copy_s_all"]) + " s")
    print(f"dicts: frame of {args.rows:,} rows {dic['frame_bytes'] / 1e6:.1f} MB, "
          f"{sum(1 for v in dic['dtypes'].values() if v == 'int64')} int64 / "
          f"{sum(1 for v in dic['dtypes'].values() if v == 'float64')} float64 columns (not the buffer's schema)")
    env = environment()
    out = write_json("frames_memory", {"benchmark": "frames_memory", "environment": env, "args": vars(args),
                                       "summary": rows, "results": results}, args.json)
    print(f"pandas {_pandas_version()}, Python {env['python']}, {env['cpu_model']}; raw data: {out}")


def _pandas_version() -> str:
    import pandas as pd
    return pd.__version__


if __name__ == "__main__":
    main()
