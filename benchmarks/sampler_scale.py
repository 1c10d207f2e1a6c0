"""How many guests one core of balloonlab's Sampler keeps up with at a 1 s stats period.

This process (the sampler: one asyncio loop, ``Sampler(track_actual="events")`` streaming to
a run folder, ``run_dir`` in a temporary folder, ``flush_interval_s=5``: one Parquet file per
table per flush for all guests, frames built and written in a worker thread) is pinned to one
core (``--cpu``, default the last one), its worker threads too; everything it samples is
pinned to the others, so the sampler's CPU is its own:

* ``real``: ``--real`` counts (1, 2, 4) of real built-in TCG guests (``--real-memory``,
  256 MiB), all launched up front (a row with 0 sampled guests measures their idle cost);
* ``sim``: ``--sim`` counts (100, 250, 500, 1000; up to 5000 and more) of simulated guests
  served by benchmarks/qmp_simulator.py, spread over ``--sim-procs`` processes (default one
  per 1500 guests, so the simulator is never the bottleneck), all attached once, up front, by
  ``attach_many(sockets, domain_xml, concurrency=--attach-parallel)`` (200 at a time, each a
  ``Guest.attach(socket, domain_xml)``; ``<memballoon model='virtio'>``, alias ``balloon0``,
  ``<stats period='1'/>``, so attach sets the period as on a real QEMU); the time to attach
  them all is printed.

For each count the Sampler runs ``--window`` (real) / ``--sim-window`` seconds on that many
guests: ``samples/s`` (against ``expected/s``, one report per guest per period), ``missed``
(reports never read: gaps in a guest's recorded ``last_update`` above 1.5 periods, as a % of
samples + missed), the sampler's CPU as % of its core, the event loop's lag (a ticker that
sleeps 50 ms measures its overshoot; p99) and the CPU of what it samples (QEMUs or the
simulator, % of a core). ``us_cpu/sample`` is the sampler's CPU net of the same kind's
0-guest row (the loop, the lag ticker, idle connections), per sample; ``flush_%core`` is the
part of the sampler's CPU spent in its flush thread (frames + Parquet); ``reads/sample`` is
QMP reads per recorded sample (above 1 while the sampler learns each guest's report phase,
which short windows weigh heavily) and ``cmds/sample`` every QMP command sent in the window
(the monitors' ``round_trips``: reads, ``query-balloon`` during moves, period checks) per
sample. ``missed`` is counted on the rows read back from the run folder (``load_run``), which
must hold every row recorded (``disk_ok``); ``files_s/e``: Parquet files written by flushes
(samples/events; merges not counted), ``add_s``: ``Sampler.add`` of every guest (with a run
folder each writes run.json). A count keeps up when samples/s is at least 95 % of expected,
the loop lag p99 stays under 10 % of the period and misses stay under 5 % (a before-2026-11
Sampler that re-read a period + 20 ms after each sample drifted and missed about 2 % at any
scale); ``goal`` is the issue's bar ("Performance near the floor", Scale): no missed report,
lag p99 under 100 ms, ``Sampler.stop()`` under 2 s (else it names what failed). Ratios
(``x_cpu/guest``) are the sampler's CPU per guest against the smallest count of the same kind.

``Sampler.stop()`` is timed (``stop_s``); when it has not returned after 30 s the stuck tasks
are reported on stderr and cancelled again (a guard kept from when the monitor's
``asyncio.wait_for`` could lose a cancellation, CPython gh-86296). ``--profile N`` runs
cProfile on the loop thread during the window of the ``N``-guest simulated row (that row's
CPU figures then include the profiler's overhead), prints the top 30 functions by own time to
stderr and saves the stats next to the JSON (only the first such row: ``--sim 5000,5000
--profile 5000`` gives one profiled row and one not).

Run from the project root: ``.venv/bin/python benchmarks/sampler_scale.py [--real 1,2,4]
[--sim 100,250,500,1000] [--window 15] [--sim-window 20] [--json PATH]``; about 2.5 minutes.
More: ``--real '' --sim 1000,2500,5000 --sim-window 30`` (the open-files limit is raised to the
hard limit; the sampler needs one file per guest, each simulator process two).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from _common import (
    environment,
    missed_reports,
    pin_process,
    print_table,
    process_cpu_seconds,
    quantile,
    raise_open_files_limit,
    ratio,
    write_json,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import qmp_simulator

from balloonlab import Guest, Sampler, attach_many, builtin_spec
from balloonlab.record import store
from balloonlab.record.store import load_run

PERIOD = 1
#: Misses the Sampler has even when idle-fast: it re-reads a period + 20 ms after a new sample
#: while QEMU reports exactly every period, so its reads drift 20 ms a period later and skip
#: one report in about 50 (2 %); above this it is falling behind.
MISS_LIMIT_PCT = 5.0
#: Per-sample CPU is shown only from this many samples on (a few real guests give too few
#: to rise above the idle loop's noise: benchmarks/sampler_cost.py measures those).
MIN_SAMPLES_FOR_CPU = 500
#: How often the Sampler flushes its rows to the run folder (s).
FLUSH_INTERVAL_S = 5.0
#: The issue's bar for Sampler.stop() (s).
STOP_LIMIT_S = 2.0
SIM_XML = ("<domain type='qemu'><name>sim</name><memory unit='MiB'>512</memory><os><type>hvm</type></os>"
           "<devices><memballoon model='virtio'><alias name='balloon0'/><stats period='1'/></memballoon>"
           "</devices></domain>")
COLUMNS = ("kind", "guests", "samples/s", "expected/s", "missed", "missed_%", "reads/sample", "cmds/sample",
           "sampler_%core", "flush_%core", "us_cpu/sample", "x_cpu/guest", "lag_p99_ms", "lag_max_ms", "stop_s",
           "files_s/e", "disk_ok", "add_s", "target_%core", "keeps_up", "goal")
FORMATS = {"samples/s": ".1f", "expected/s": ".0f", "missed_%": ".1f", "reads/sample": ".2f", "cmds/sample": ".2f",
           "sampler_%core": ".1f", "flush_%core": ".1f", "us_cpu/sample": ".0f", "x_cpu/guest": ".2f",
           "lag_p99_ms": ".1f", "lag_max_ms": ".1f", "stop_s": ".2f", "add_s": ".1f", "target_%core": ".1f"}


def pin_self(cpu: int) -> bool:
    """Pin every thread of this process to ``cpu`` (new threads inherit it)."""
    return pin_process(os.getpid(), {cpu})


async def loop_lag(samples: list[float], stop: asyncio.Event, interval: float = 0.05) -> None:
    """Append how late each ``sleep(interval)`` woke up (seconds) until ``stop`` is set."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(interval)
        samples.append(time.perf_counter() - start - interval)


def _lu_seconds(frame: Any) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if not len(frame):
        return out
    for guest, group in frame.groupby("guest", observed=True, sort=False)["last_update"]:
        out[str(guest)] = [ts.timestamp() for ts in group.dropna()]
    return out


class PartCounter:
    """Counts the Parquet files a run's flushes write, per table (merges not counted), by
    wrapping balloonlab.record.store's part writer while installed."""

    def __init__(self) -> None:
        self.written: dict[str, int] = dict.fromkeys(store.TABLES, 0)
        self._original: Any = None

    def __enter__(self) -> PartCounter:
        self._original = original = store._write_parquet

        def counted(path: Path, frame: pd.DataFrame) -> None:
            original(path, frame)
            table = path.parent.name
            self.written[table] = self.written.get(table, 0) + 1
        store._write_parquet = counted
        return self

    def __exit__(self, *exc: object) -> None:
        store._write_parquet = self._original


def time_flush_thread(sampler: Sampler) -> list[float]:
    """Wrap ``sampler``'s flush write (frames + Parquet, on a worker thread: its RunStream's
    ``_write``) to add up its thread CPU time; returns the list it appends each flush's to."""
    spent: list[float] = []
    owner: Any = getattr(sampler, "_stream", None) or sampler  # before record/stream.py: the Sampler's own
    write = owner._write

    def timed(*args: Any) -> None:
        c0 = time.thread_time()
        try:
            write(*args)
        finally:
            spent.append(time.thread_time() - c0)
    owner._write = timed
    return spent


def round_trips(guests: list[Guest]) -> int:
    """QMP commands sent so far on the guests' connections (qmp_capabilities excluded)."""
    return sum(g.monitor.round_trips for g in guests)


def disk_rows(run_dir: Path, table: str) -> tuple[int, int]:
    """(files, rows) of one table of a run folder, from the Parquet footers."""
    files = sorted((run_dir / table).glob("p-*.parquet"))
    return len(files), sum(pq.read_metadata(f).num_rows for f in files)


def _source(filename: str) -> str:
    """What a profiled function belongs to: a balloonlab file, qemu.qmp, asyncio, ..."""
    path = filename.replace("\\", "/")
    for marker, label in (("/balloonlab/", "balloonlab/"), ("/qemu/qmp/", "qemu.qmp/"), ("/asyncio/", "asyncio/"),
                          ("/json/", "json/"), ("/pandas/", "pandas"), ("/pyarrow/", "pyarrow"),
                          ("/numpy/", "numpy")):
        if marker in path:
            rest = path.rsplit(marker, 1)[1]
            return label + rest if label.endswith("/") else label
    if filename == "~":
        return "builtins (C)"
    return Path(path).name


def profile_groups(stats: pstats.Stats, samples: int) -> str:
    """Own time (tottime) per source file, in us per sample, largest first."""
    groups: dict[str, float] = {}
    total = 0.0
    for (filename, _line, _name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        source = _source(filename)
        groups[source] = groups.get(source, 0.0) + tt
        total += tt
    lines = [f"  own time by source, us/sample ({samples} samples, {total:.2f} s profiled):"]
    for name, tt in sorted(groups.items(), key=lambda kv: -kv[1])[:20]:
        lines.append(f"    {tt * 1e6 / max(1, samples):8.1f}  {100 * tt / total if total else 0:5.1f} %  {name}")
    return "\n".join(lines) + "\n"


async def measure(kind: str, guests: list[Guest], seconds: float, target_pids: list[int], run_root: Path,
                  profile_path: Path | None = None) -> dict[str, Any]:
    """Sample ``guests`` for ``seconds`` into a run folder (none: just measure the targets'
    idle CPU); ``profile_path``: cProfile the loop during the window, stats saved there."""
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(loop_lag(lags, stop))
    run_dir = run_root / f"{kind}-{len(guests)}"
    sampler = Sampler(run_dir=run_dir, flush_interval_s=FLUSH_INTERVAL_S, track_actual="events")
    flush_cpu = time_flush_thread(sampler)
    t_add = time.monotonic()
    for guest in guests:
        await sampler.add(guest)
    add_s = time.monotonic() - t_add
    print(f"{kind} {len(guests)}: added in {add_s:.1f} s; sampling {seconds:g} s", file=sys.stderr, flush=True)
    profiler = cProfile.Profile() if profile_path is not None else None
    with PartCounter() as parts:
        t0, c0, times0 = time.monotonic(), process_cpu_seconds(), os.times()
        targets0 = [process_cpu_seconds(p) for p in target_pids]
        trips0 = round_trips(guests)
        await sampler.start()
        try:
            if profiler is not None:
                profiler.enable()
            await asyncio.sleep(seconds)
            if profiler is not None:
                profiler.disable()
            wall, cpu, times1 = time.monotonic() - t0, process_cpu_seconds() - c0, os.times()
            targets = sum(process_cpu_seconds(p) - b for p, b in zip(target_pids, targets0, strict=True))
            # Count what the window saw: a slow stop must not add samples to it.
            end_epoch = time.time()
            samples = sum(s.samples for s in sampler.states().values())
            reads = sum(s.polls for s in sampler.states().values())
            commands = round_trips(guests) - trips0
            flush_cpu_s, flushes = sum(flush_cpu), len(flush_cpu)
        finally:
            if profiler is not None:
                profiler.disable()
            t1 = time.monotonic()
            stuck = await stop_sampler(sampler)
            stop_s = time.monotonic() - t1
            stop.set()
            await ticker
    states = sampler.states()
    t1 = time.monotonic()
    recorded = sampler._samples.total_rows
    files = {table: disk_rows(run_dir, table) for table in store.TABLES}
    run = load_run(run_dir)  # what the run folder holds, read back: every recorded row must be there
    frame = run.samples
    if len(frame):
        frame = frame[frame.index <= pd.Timestamp(end_epoch, unit="s", tz="UTC")]
    missed = sum(missed_reports(lus, PERIOD) for lus in _lu_seconds(frame).values())
    print(f"  {samples} samples, stop {stop_s:.2f} s, {files['samples'][1]} rows on disk in {files['samples'][0]} "
          f"file(s) ({parts.written['samples']} written), tally {time.monotonic() - t1:.2f} s",
          file=sys.stderr, flush=True)
    if profiler is not None and profile_path is not None:
        profiler.dump_stats(profile_path)
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(30)
        print(f"  cProfile of the loop thread, {kind} {len(guests)} ({profile_path}):\n"
              f"{text.getvalue()}{profile_groups(stats, samples)}", file=sys.stderr, flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    errors = sorted({s.error for s in states.values() if s.error})
    n = len(guests)
    return {"kind": kind, "guests": n, "wall_s": wall, "samples": samples, "reads": reads, "missed": missed,
            "samples/s": samples / wall, "expected/s": n / PERIOD, "missed_%": ratio(100 * missed, samples + missed),
            "reads/sample": ratio(reads, samples), "commands": commands, "cmds/sample": ratio(commands, samples),
            "sampler_%core": 100 * cpu / wall, "cpu_s": cpu,
            "user_s": times1.user - times0.user, "system_s": times1.system - times0.system,
            "flush_%core": 100 * flush_cpu_s / wall, "flush_cpu_s": flush_cpu_s, "flushes": flushes,
            "lag_p99_ms": quantile(lags, 0.99) * 1e3 if lags else None,
            "lag_max_ms": max(lags) * 1e3 if lags else None, "target_%core": 100 * targets / wall,
            "errors": errors[:5], "dead": sum(1 for s in states.values() if s.state == "dead"), "stop_s": stop_s,
            "stuck_tasks_at_stop": stuck, "add_s": add_s,
            "files_written": dict(parts.written), "files_s/e": f"{parts.written['samples']}/{parts.written['events']}",
            "files_on_disk": {t: f for t, (f, _) in files.items()},
            "rows_on_disk": {t: r for t, (_, r) in files.items()}, "rows_recorded": recorded,
            "disk_ok": "yes" if files["samples"][1] == recorded == len(run.samples) else "NO",
            "profiled": profile_path is not None}


async def stop_sampler(sampler: Sampler, timeout_s: float = 30.0) -> int:
    """``sampler.stop()``, but if it has not returned after ``timeout_s`` (a per-guest task that
    survived its cancel), report the stuck tasks on stderr and cancel them again. Returns how
    many were stuck."""
    stopping = asyncio.ensure_future(sampler.stop())
    done, _ = await asyncio.wait({stopping}, timeout=timeout_s)
    if done:
        stopping.result()
        return 0
    stuck = [st for st in sampler.states().values() if st.task is not None and not st.task.done()]
    print(f"  Sampler.stop() still waiting after {timeout_s:g} s: {len(stuck)} task(s) survived cancel(); "
          f"first: {stuck[0].name if stuck else '-'}", file=sys.stderr, flush=True)
    for st in stuck[:1]:
        assert st.task is not None
        st.task.print_stack(file=sys.stderr)
    while not stopping.done():
        for st in stuck:
            assert st.task is not None
            st.task.cancel()
        await asyncio.wait({stopping}, timeout=1.0)
    stopping.result()
    return len(stuck)


async def attach_all(sockets: list[Path], parallel: int = 200) -> list[Guest]:
    """``attach_many``: a guest on each socket, at most ``parallel`` attaching at a time (all
    or nothing)."""
    return await attach_many(sockets, SIM_XML, names=[f"sim{i:05d}" for i in range(len(sockets))],
                             concurrency=parallel)


async def run_real(counts: list[int], memory: str, seconds: float, others: set[int] | None,
                   run_root: Path) -> list[dict[str, Any]]:
    if not counts:
        return []
    workdir = Path(tempfile.mkdtemp(prefix="blb-scale-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir)
    guests: list[Guest] = []
    try:
        specs = [builtin_spec(f"scale{i}-{os.getpid()}", memory=memory, period_s=PERIOD) for i in range(max(counts))]
        results = await asyncio.gather(*(Guest.launch(s) for s in specs), return_exceptions=True)
        guests = [g for g in results if isinstance(g, Guest)]
        failed = [r for r in results if not isinstance(r, Guest)]
        if failed:
            raise failed[0]  # type: ignore[misc]
        pids = [g.pid for g in guests if g.pid is not None]
        if others:
            for pid in pids:
                pin_process(pid, others)
        await asyncio.gather(*(g.balloon.wait_for_stats(30) for g in guests))
        await asyncio.sleep(3)  # boot-time activity dies down
        rows = [await measure("real", [], min(seconds, 10), pids, run_root)]  # idle: no sampler
        for n in counts:
            rows.append(await measure("real", guests[:n], seconds, pids, run_root))
        for row in rows:
            row["real_guests_running"] = len(guests)
        return rows
    finally:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        shutil.rmtree(workdir, ignore_errors=True)


async def run_sim(counts: list[int], seconds: float, others: set[int] | None, run_root: Path,
                  args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict]:
    if not counts:
        return [], {}
    limit = raise_open_files_limit()
    need = max(counts) + 64
    if limit < need:
        raise SystemExit(f"open-files limit {limit} is below the {need} that {max(counts)} guests need")
    simdir = Path(tempfile.mkdtemp(prefix="blb-sim-", dir="/tmp"))
    procs = None
    guests: list[Guest] = []
    info: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        procs, sockets = qmp_simulator.start(simdir, max(counts), cpus=sorted(others) if others else None,
                                             processes=args.sim_procs, niceness=args.sim_nice)
        info["simulator_start_s"] = time.monotonic() - t0
        info["simulator_processes"] = len(procs)
        start = time.monotonic()
        guests = await attach_all(sockets, args.attach_parallel)
        info.update({"attach_s": time.monotonic() - start, "attached": len(guests), "nofile": limit,
                     "attach_parallel": args.attach_parallel})
        print(f"sim: {len(procs)} simulator process(es) up in {info['simulator_start_s']:.1f} s; attached "
              f"{len(guests)} guests in {info['attach_s']:.1f} s", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)
        rows = [await measure("sim", [], min(seconds, 5), procs.pids, run_root)]  # the loop with all attached, idle
        for n in counts:  # the first row of --profile's count is profiled (--sim 5000,5000: one of each)
            profile = (run_root.parent / f"sampler_scale-{n}.pstats") if n == args.profile and "profile" not in info \
                else None
            rows.append(await measure("sim", guests[:n], seconds, procs.pids, run_root, profile))
            if profile is not None:
                info["profile"] = str(_keep_profile(profile))
        return rows, info
    finally:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        if procs is not None:
            procs.terminate()
            try:
                out, _ = procs.communicate(timeout=10)
                info["simulator_counters"] = out.strip().splitlines()[-1] if out.strip() else None
            except subprocess.TimeoutExpired:
                procs.kill()
                procs.wait()
        shutil.rmtree(simdir, ignore_errors=True)


def _keep_profile(path: Path) -> Path:
    """Move a profile out of the temporary run root, next to the JSON results."""
    from _common import RESULTS_DIR
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    target = RESULTS_DIR / path.name
    shutil.move(str(path), target)
    return target


def judge(rows: list[dict[str, Any]]) -> None:
    """Net CPU per sample (minus the same kind's 0-guest loop), ratios, and keeps_up."""
    idle_rate = {r["kind"]: r["cpu_s"] / r["wall_s"] for r in rows if r["guests"] == 0}
    firsts: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["guests"] == 0:
            row["keeps_up"] = "-"
            continue
        net = row["cpu_s"] - idle_rate.get(row["kind"], 0.0) * row["wall_s"]
        row["net_cpu_s"] = net
        if row["samples"] >= MIN_SAMPLES_FOR_CPU:  # fewer: below the noise of the idle loop
            row["us_cpu/sample"] = ratio(net * 1e6, row["samples"])
            row["cpu_per_guest_s"] = net / row["guests"]
            first = firsts.setdefault(row["kind"], row)
            row["x_cpu/guest"] = ratio(row["cpu_per_guest_s"], first["cpu_per_guest_s"])
        lag_ok = row["lag_p99_ms"] is not None and row["lag_p99_ms"] < 100 * PERIOD
        rate_ok = row["samples/s"] >= 0.95 * row["expected/s"]
        miss_ok = (row["missed_%"] or 0.0) <= MISS_LIMIT_PCT and not row["dead"]
        row["keeps_up"] = "yes" if lag_ok and rate_ok and miss_ok else "NO"
        failed = [what for what, ok in (("rate", rate_ok), ("missed", row["missed"] == 0 and not row["dead"]),
                                         ("lag", lag_ok), ("stop", row["stop_s"] < STOP_LIMIT_S),
                                         ("disk", row["disk_ok"] == "yes")) if not ok]
        row["goal"] = "NO:" + ",".join(failed) if failed else "yes"


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cpus = sorted(os.sched_getaffinity(0))
    sampler_cpu = args.cpu if args.cpu is not None else cpus[-1]
    others = {c for c in cpus if c != sampler_cpu} or None
    # Children inherit this process's core: QEMUs (all their threads) and the simulator are
    # moved to the other cores as soon as they exist.
    pinned = pin_self(sampler_cpu) if others else False
    run_root = Path(tempfile.mkdtemp(prefix="blb-scale-runs-", dir=args.run_root))
    try:
        real = await run_real(args.real_counts, args.real_memory, args.window, others, run_root / "runs")
        sim, info = await run_sim(args.sim_counts, args.sim_window, others, run_root / "runs", args)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
    info.update({"sampler_cpu": sampler_cpu, "pinned": pinned, "others": sorted(others or []),
                 "sampler_nice": os.getpriority(os.PRIO_PROCESS, 0)})
    return real + sim, info


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", default="1,2,4", help="real guest counts (default 1,2,4; '' for none)")
    parser.add_argument("--real-memory", default="256M", help="memory per real guest (default 256M)")
    parser.add_argument("--sim", default="100,250,500,1000", help="simulated guest counts (default 100,250,500,1000)")
    parser.add_argument("--window", type=float, default=15.0, help="seconds per real count (default 15)")
    parser.add_argument("--sim-window", type=float, default=20.0, help="seconds per simulated count (default 20)")
    parser.add_argument("--sim-procs", type=int, help="simulator processes (default: one per 1500 guests)")
    parser.add_argument("--sim-nice", type=int, default=0, help="renice the simulator processes by this (default 0)")
    parser.add_argument("--attach-parallel", type=int, default=200, help="attaches in flight at a time (default 200)")
    parser.add_argument("--run-root", default=None, help="where the temporary run folders go (default: the temp dir)")
    parser.add_argument("--profile", type=int, metavar="N", help="cProfile the loop during the N-guest sim window")
    parser.add_argument("--cpu", type=int, help="the sampler's core (default: the last usable one)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/sampler_scale.json")
    args = parser.parse_args()
    args.real_counts, args.sim_counts = sorted(_counts(args.real)), sorted(_counts(args.sim))
    rows, info = asyncio.run(run(args))
    judge(rows)
    print_table(rows, COLUMNS, FORMATS)
    idle = next((r for r in rows if r["kind"] == "real" and r["guests"] == 0), None)
    if idle is not None:
        n = idle["real_guests_running"]
        print(f"\nreal: {n} TCG guest(s) x {args.real_memory} running throughout; idle they cost "
              f"{idle['target_%core'] / n:.2f} % of a core each (target_%core: all of them)")
    if info.get("attach_s") is not None:
        print(f"sim: attached {info['attached']} guests in {info['attach_s']:.2f} s "
              f"({info['attach_parallel']} in flight at a time, {info['attached'] / info['attach_s']:.0f}/s); "
              f"{info['simulator_processes']} simulator process(es), counters {info.get('simulator_counters')}; "
              f"open-files limit {info['nofile']}")
    print(f"sampler pinned to cpu {info['sampler_cpu']}: {info['pinned']} (nice {info['sampler_nice']}); "
          f"targets on {info['others']}; run folders flushed every {FLUSH_INTERVAL_S:g} s")
    if info.get("profile"):
        print(f"profile of the {args.profile}-guest window (its CPU figures include cProfile): {info['profile']}")
    kept = [r for r in rows if r["kind"] == "sim" and r["keeps_up"] == "yes"]
    lost = [r for r in rows if r["kind"] == "sim" and r["keeps_up"] == "NO"]
    if kept:
        print(f"kept up with up to {max(r['guests'] for r in kept)} simulated guests"
              + (f"; not with {min(r['guests'] for r in lost)}" if lost else " (the largest count tried)"))
    elif lost:
        print(f"kept up with none of the simulated counts tried (smallest: {min(r['guests'] for r in lost)})")
    errors = sorted({e for r in rows for e in r["errors"]})
    if errors:
        print("sampler errors:", errors[:5])
    env = environment()
    out = write_json("sampler_scale", {"benchmark": "sampler_scale", "environment": env,
                                       "args": {k: v for k, v in vars(args).items()}, "info": info, "rows": rows},
                     args.json)
    print(f"{env['qemu_version']}, {env['cpu_model']}, nproc {env['nproc']}; raw data: {out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
