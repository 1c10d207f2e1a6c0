"""Loop lag and missed reports while a notebook builds 10-million-row frames and a live plot redraws.

``--guests`` (100) simulated guests (benchmarks/qmp_simulator.py, its own process) are recorded
by a ``SyncSampler`` on balloonlab's loop thread at a 1 s period. Before sampling starts, the
sampler's samples buffer is prefilled with ``--prefill`` (10 M) generated rows: the same
guests taking turns once a second, ending just before now, so the plot's window holds both.
The fill goes through ``RowBuffer.extend``, the bulk twin of ``append`` (same chunks,
same codes; 10 M appends would take minutes here). A ticker task on balloonlab's loop sleeps
50 ms and records how late it wakes. Then, ``--window`` seconds each, one after the other
(the sampler and the ticker run throughout):

* ``baseline``  the sampler alone;
* ``snapshot``  a "notebook" thread calls ``SyncSampler.frame()`` back to back (10 M+ rows:
                a snapshot on the loop, the frame built in that thread) while a
                ``LivePlot(sampler, 4 guests, refresh_s=1, window_s=300)`` redraws from its own
                thread (Agg, PNG into its Image widget: more work than ipympl's
                ``draw_idle``): snapshots on the loop, only the window's rows built, off it;
* ``on-loop``   the same load the way it ran before snapshots (``--no-on-loop`` skips it):
                the notebook's frame built on the loop (``Sampler.frame()`` in a coroutine,
                as ``SyncSampler.frame`` did) and the plot's two whole frames built there too,
                then drawn by the same code (``LivePlot`` before: ``_frames()`` on the loop).
                The builder is today's (faster) one, so this is the cost of *where* frames
                are built, not of the old builder.

A mode's window runs from starting its load to the end of its last frame build and plot
refresh (``window_s``: ``--window`` plus that join). Reports: per guest, the report stamps
(``last_update``) recorded live; a gap between consecutive stamps above 1.5 periods holds
``round(gap / period) - 1`` missed reports, each counted in the window it was made in.
``produced`` = recorded + missed: what the simulator reported in the window. Lag samples
belong to the window in which their sleep began. ``x_p99``/``x_max``: lag against the
baseline in the same run. ``snapshot_ms``: ``Sampler.samples_snapshot()`` timed on the loop at
the prefilled size (median and max of 20).

Run from the project root: ``.venv/bin/python benchmarks/loop_lag.py [--guests 100]
[--prefill 10000000] [--window 30] [--no-on-loop] [--json PATH]``; about 2.5 minutes and 6 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pandas as pd
from _common import environment, median, print_table, quantile, raise_open_files_limit, ratio, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qmp_simulator

from balloonlab import Guest, SyncSampler
from balloonlab.analysis.measures import guest_names
from balloonlab.blocking import loop as bl_loop
from balloonlab.widgets.live_plot import LivePlot, _PlotData

PERIOD = 1
TICK_S = 0.05
SIM_XML = ("<domain type='qemu'><name>sim</name><memory unit='MiB'>512</memory><os><type>hvm</type></os>"
           "<devices><memballoon model='virtio'><alias name='balloon0'/><stats period='1'/></memballoon>"
           "</devices></domain>")
COLUMNS = ("mode", "window_s", "produced", "recorded", "missed", "missed_%", "lag_p50_ms", "lag_p99_ms",
           "lag_max_ms", "x_p99", "x_max", "frames", "frame_s", "refreshes", "load1")
FORMATS = {"window_s": ".0f", "missed_%": ".2f", "lag_p50_ms": ".2f", "lag_p99_ms": ".1f", "lag_max_ms": ".1f",
           "x_p99": ".2f", "x_max": ".2f", "frame_s": ".2f", "load1": ".1f"}


async def _on_loop(fn: Any) -> Any:
    return fn()


def prefill_frame(rows: int, names: list[str], end_s: float) -> pd.DataFrame:
    """``rows`` samples of ``names`` taking turns once a second, the last just before ``end_s``."""
    g = len(names)
    i = np.arange(rows, dtype=np.int64)
    k = i // g
    start_ns = int((end_s - rows // g - 2) * 1e9)
    times = start_ns + k * 1_000_000_000 + (i % g) * (1_000_000_000 // g)
    jitter = (i * 2654435761) % 50_000_000
    zeros = np.zeros(rows, np.int64)
    columns = {"guest": pd.Categorical.from_codes((i % g).astype(np.int32), categories=names),
               "last_update": times // 1_000_000_000 - 1, "swap_in": zeros, "swap_out": zeros,
               "major_faults": 150 + k // 600, "minor_faults": 30_000 + 37 * k + i % 37,
               "free_memory": 200_000_000 + jitter, "total_memory": np.full(rows, 492_847_104),
               "available_memory": 230_000_000 + jitter, "disk_caches": 2_281_472 + 4096 * (i % 512),
               "htlb_pgalloc": zeros, "htlb_pgfail": zeros, "actual": np.full(rows, 536_870_912),
               "target": np.full(rows, 536_870_912), "period_s": np.ones(rows, np.int64),
               "rss": 210_000_000 + 4096 * (i % 997), "age_s": 0.01 + (i % 100) / 1000, "reset": np.zeros(rows, bool)}
    index = pd.DatetimeIndex(times.view("datetime64[ns]"), name="time").tz_localize("UTC")
    return pd.DataFrame(columns, index=index, copy=False)


class OnLoopLivePlot(LivePlot):
    """``LivePlot`` as it was before snapshots: both whole frames built on balloonlab's loop
    (its old ``_frames()`` coroutine), then drawn by the same code on the plot's thread."""

    def refresh(self) -> int:
        aio = self.sampler.aio
        samples, events = bl_loop.run(_on_loop(lambda: (aio.frame(), aio.events())), timeout_s=600)
        names = guest_names(samples) + [g for g in guest_names(events) if g not in guest_names(samples)]
        last = samples.index.max() if len(samples) else None
        self._tick()
        self._draw(_PlotData(samples, events, self.window.value, len(samples), len(events), names, last))
        return self.samples


async def ticker(lags: list[tuple[float, float]], stop: threading.Event) -> None:
    """(wall time the sleep began, how late it woke) every TICK_S until ``stop``."""
    while not stop.is_set():
        began, start = time.time(), time.perf_counter()
        await asyncio.sleep(TICK_S)
        lags.append((began, time.perf_counter() - start - TICK_S))


async def close_all(guests: list[Guest]) -> None:
    await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)


async def attach_all(sockets: list[Path]) -> list[Guest]:
    return list(await asyncio.gather(*(Guest.attach(s, SIM_XML, name=f"sim{i:05d}") for i, s in enumerate(sockets))))


def run_mode(name: str, sampler: SyncSampler, seconds: float, plot_guests: list[str]) -> dict[str, Any]:
    """One mode's window: the notebook thread and the plot (unless baseline), then join them."""
    stop = threading.Event()
    builds: list[tuple[float, int]] = []
    refreshes: list[float] = []

    def notebook() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            frame = sampler.frame() if name == "snapshot" else bl_loop.run(_on_loop(sampler.aio.frame))
            builds.append((time.perf_counter() - start, len(frame)))
            del frame

    plot: LivePlot | None = None
    worker = threading.Thread(target=notebook, name="notebook", daemon=True)
    print(f"{name}: {seconds:g} s", file=sys.stderr, flush=True)
    t0, load0 = time.time(), os.getloadavg()[0]
    if name != "baseline":
        cls = LivePlot if name == "snapshot" else OnLoopLivePlot
        plot = cls(sampler, plot_guests, refresh_s=1.0, window_s=300, on_tick=lambda: refreshes.append(time.time()))
        worker.start()
        plot.start()
    time.sleep(seconds)
    stop.set()
    t_stop = time.time()
    error = None
    if plot is not None:
        plot.stop(timeout_s=600)
        if "bl-plot-error" in plot.info.value:
            error = plot.info.value
        points = plot.points
        plot.close()
        worker.join(600)
    t1 = time.time()  # the load is over only when its last frame is built: count until then
    return {"mode": name, "t0": t0, "t1": t1, "window_s": t1 - t0, "join_s": t1 - t_stop,
            "frames": len(builds), "frame_s": median([b for b, _ in builds]) if builds else None,
            "frame_s_all": [round(b, 3) for b, _ in builds], "frame_rows": builds[-1][1] if builds else None,
            "refreshes": len(refreshes) if plot is not None else None, "plot_points": points if plot else None,
            "plot_error": error, "load1": (load0 + os.getloadavg()[0]) / 2}


def tally(rows: list[dict[str, Any]], live: pd.DataFrame, lags: list[tuple[float, float]]) -> None:
    """Reports recorded/missed and lag quantiles per mode (see the module docstring)."""
    def mode_of(t: float) -> dict[str, Any] | None:
        return next((r for r in rows if r["t0"] <= t < r["t1"]), None)

    for row in rows:
        row.update(recorded=0, missed=0, lags=[])
    for _, stamps in live.groupby("guest", observed=True)["last_update"]:
        seconds = sorted({ts.timestamp() for ts in stamps.dropna()})
        for a, b in zip(seconds, seconds[1:] + [None], strict=True):
            if (row := mode_of(a)) is not None:
                row["recorded"] += 1
            if b is not None and b - a > 1.5 * PERIOD:
                n = max(1, round((b - a) / PERIOD) - 1)
                for k in range(1, n + 1):  # each missed report counts where it was made
                    if (row := mode_of(a + k * (b - a) / (n + 1))) is not None:
                        row["missed"] += 1
    for began, lag in lags:
        if (row := mode_of(began)) is not None:
            row["lags"].append(lag)
    for row in rows:
        lag = row.pop("lags")
        row["produced"] = row["recorded"] + row["missed"]
        row["missed_%"] = ratio(100 * row["missed"], row["produced"])
        row["ticks"] = len(lag)
        row["lag_p50_ms"] = quantile(lag, 0.5) * 1e3 if lag else None
        row["lag_p99_ms"] = quantile(lag, 0.99) * 1e3 if lag else None
        row["lag_max_ms"] = max(lag) * 1e3 if lag else None
    base = rows[0]
    for row in rows:
        row["x_p99"] = ratio(row["lag_p99_ms"], base["lag_p99_ms"])
        row["x_max"] = ratio(row["lag_max_ms"], base["lag_max_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=100, help="simulated guests (default 100)")
    parser.add_argument("--prefill", type=int, default=10_000_000, help="rows in the buffer before sampling (10M)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per mode (default 30)")
    parser.add_argument("--no-on-loop", action="store_true", help="skip the on-loop mode (frames built on the loop)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/loop_lag.json")
    args = parser.parse_args()
    raise_open_files_limit()
    names = [f"sim{i:05d}" for i in range(args.guests)]
    simdir = Path(tempfile.mkdtemp(prefix="blb-lag-", dir="/tmp"))
    proc, guests, info, rows = None, [], {}, []
    lags: list[tuple[float, float]] = []
    stop_ticker = threading.Event()
    sampler = SyncSampler(track_actual="events")
    try:
        proc, sockets = qmp_simulator.start(simdir, args.guests)
        start = time.monotonic()
        frame = prefill_frame(args.prefill, names, time.time())
        info["generate_s"] = time.monotonic() - start
        start = time.monotonic()
        bl_loop.run(_on_loop(functools.partial(sampler.aio._samples.extend, frame)))
        info["extend_s"] = time.monotonic() - start
        frame = None
        print(f"prefilled {args.prefill:,} rows (generate {info['generate_s']:.1f} s, extend {info['extend_s']:.1f} s)",
              file=sys.stderr, flush=True)

        async def timed_snapshot() -> float:
            start = time.perf_counter()
            sampler.aio.samples_snapshot()
            return time.perf_counter() - start
        snaps = [bl_loop.run(timed_snapshot()) for _ in range(20)]
        info["snapshot_ms_median"], info["snapshot_ms_max"] = median(snaps) * 1e3, max(snaps) * 1e3
        guests = bl_loop.run(attach_all(sockets))
        sampler.start()
        for guest in guests:
            sampler.add(guest)
        ticking = bl_loop.submit(ticker(lags, stop_ticker))
        time.sleep(5)  # each guest's report phase is learnt
        modes = ["baseline", "snapshot"] + ([] if args.no_on_loop else ["on-loop"])
        for mode in modes:
            rows.append(run_mode(mode, sampler, args.window, names[:4]))
            time.sleep(3)  # gaps that began in this mode close before the next one
        stop_ticker.set()
        ticking.result(30)
        states = sampler.states()
        info["dead"] = sum(1 for s in states.values() if s.state != "sampling")
        live = bl_loop.run(_on_loop(lambda: sampler.aio._samples.snapshot(args.prefill))).frame()
    finally:
        stop_ticker.set()
        sampler.stop()
        bl_loop.run(close_all(guests))
        if proc is not None:
            proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(simdir, ignore_errors=True)
    tally(rows, live, lags)
    print_table(rows, COLUMNS, FORMATS)
    print(f"\n{args.guests} simulated guests at {PERIOD} s; buffer prefilled with {args.prefill:,} rows; "
          f"Sampler.samples_snapshot() on the loop: median {info['snapshot_ms_median']:.2f} ms, "
          f"max {info['snapshot_ms_max']:.2f} ms (20 calls)")
    for row in rows:
        if row["frames"]:
            print(f"{row['mode']}: {row['frames']} frames of {row['frame_rows']:,} rows, median {row['frame_s']:.2f} s "
                  f"each; {row['refreshes']} plot refreshes ({row['plot_points']} points shown); "
                  f"joined {row['join_s']:.1f} s after the window" + (f"; PLOT ERROR {row['plot_error']}"
                                                                      if row["plot_error"] else ""))
    if info["dead"]:
        print(f"{info['dead']} guests stopped sampling")
    env = environment()
    out = write_json("loop_lag", {"benchmark": "loop_lag", "environment": env, "args": vars(args), "info": info,
                                  "rows": rows}, args.json)
    print(f"{env['cpu_model']}, nproc {env['nproc']}, load average {os.getloadavg()[0]:.1f}; raw data: {out}")


if __name__ == "__main__":
    main()
