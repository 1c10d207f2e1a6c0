"""How many guests one core of balloonlab's Sampler keeps up with at a 1 s stats period.

This process (the sampler: one asyncio loop, ``Sampler(track_actual="events")``) is pinned to
one core (``--cpu``, default the last one); everything it samples is pinned to the others, so
the sampler's CPU is its own:

* ``real``: ``--real`` counts (1, 2, 4) of real built-in TCG guests (``--real-memory``,
  256 MiB), all launched up front (a row with 0 sampled guests measures their idle cost);
* ``sim``: ``--sim`` counts (100, 250, 500, 1000) of simulated guests served by
  benchmarks/qmp_simulator.py, one separate process for all of them, attached with
  ``Guest.attach(socket, domain_xml)`` (``<memballoon model='virtio'>``, alias ``balloon0``,
  ``<stats period='1'/>``, so attach sets the period as on a real QEMU).

For each count the Sampler runs ``--window`` (real) / ``--sim-window`` seconds on that many
guests: ``samples/s`` (against ``expected/s``, one report per guest per period), ``missed``
(reports never read: gaps in a guest's recorded ``last_update`` above 1.5 periods, as a % of
samples + missed), the sampler's CPU as % of its core, the event loop's lag (a ticker that
sleeps 50 ms measures its overshoot; p99) and the CPU of what it samples (QEMUs or the
simulator, % of a core). ``us_cpu/sample`` is the sampler's CPU net of the same kind's
0-guest row (the loop, the lag ticker, idle connections), per sample; ``reads/sample`` is
QMP reads per recorded sample (above 1 while the sampler learns each guest's report phase,
which short windows weigh heavily). A count keeps up when samples/s is at least 95 % of
expected, the loop lag p99 stays under 10 % of the period and misses stay under 5 % (a
before-2026-11 Sampler that re-read a period + 20 ms after each sample drifted and missed
about 2 % at any scale; the current one should miss none). Ratios (``x_cpu/guest``) are the
sampler's CPU per guest against the smallest count of the same kind.

``Sampler.stop()`` is timed (``stop_s`` in the JSON); when it has not returned after 30 s
the stuck tasks are reported on stderr and cancelled again (a guard kept from when the
monitor's ``asyncio.wait_for`` could lose a cancellation, CPython gh-86296).

Run from the project root: ``.venv/bin/python benchmarks/sampler_scale.py [--real 1,2,4]
[--sim 100,250,500,1000] [--window 15] [--sim-window 20] [--json PATH]``; about 2.5 minutes.
More: ``--sim 1000,2000,4000`` (the open-files limit is raised to the hard limit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
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

from balloonlab import Guest, Sampler, builtin_spec

PERIOD = 1
#: Misses the Sampler has even when idle-fast: it re-reads a period + 20 ms after a new sample
#: while QEMU reports exactly every period, so its reads drift 20 ms a period later and skip
#: one report in about 50 (2 %); above this it is falling behind.
MISS_LIMIT_PCT = 5.0
#: Per-sample CPU is shown only from this many samples on (a few real guests give too few
#: to rise above the idle loop's noise: benchmarks/sampler_cost.py measures those).
MIN_SAMPLES_FOR_CPU = 500
SIM_XML = ("<domain type='qemu'><name>sim</name><memory unit='MiB'>512</memory><os><type>hvm</type></os>"
           "<devices><memballoon model='virtio'><alias name='balloon0'/><stats period='1'/></memballoon>"
           "</devices></domain>")
COLUMNS = ("kind", "guests", "samples/s", "expected/s", "missed", "missed_%", "reads/sample", "sampler_%core",
           "us_cpu/sample", "x_cpu/guest", "lag_p99_ms", "lag_max_ms", "target_%core", "keeps_up")
FORMATS = {"samples/s": ".1f", "expected/s": ".0f", "missed_%": ".1f", "reads/sample": ".2f", "sampler_%core": ".1f",
           "us_cpu/sample": ".0f", "x_cpu/guest": ".2f", "lag_p99_ms": ".1f", "lag_max_ms": ".1f",
           "target_%core": ".1f"}


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


async def measure(kind: str, guests: list[Guest], seconds: float, target_pids: list[int]) -> dict[str, Any]:
    """Sample ``guests`` for ``seconds`` (none: just measure the targets' idle CPU)."""
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(loop_lag(lags, stop))
    sampler = Sampler(track_actual="events")
    for guest in guests:
        await sampler.add(guest)
    print(f"{kind} {len(guests)}: sampling {seconds:g} s", file=sys.stderr, flush=True)
    t0, c0 = time.monotonic(), process_cpu_seconds()
    targets0 = [process_cpu_seconds(p) for p in target_pids]
    await sampler.start()
    try:
        await asyncio.sleep(seconds)
        wall, cpu = time.monotonic() - t0, process_cpu_seconds() - c0
        targets = sum(process_cpu_seconds(p) - b for p, b in zip(target_pids, targets0))
        # Count what the window saw: a slow stop must not add samples to it.
        end_epoch = time.time()
        samples = sum(s.samples for s in sampler.states().values())
        reads = sum(s.polls for s in sampler.states().values())
    finally:
        t1 = time.monotonic()
        stuck = await stop_sampler(sampler)
        stop_s = time.monotonic() - t1
        stop.set()
        await ticker
    states = sampler.states()
    t1 = time.monotonic()
    frame = sampler.frame()
    if len(frame):
        frame = frame[frame.index <= pd.Timestamp(end_epoch, unit="s", tz="UTC")]
    missed = sum(missed_reports(lus, PERIOD) for lus in _lu_seconds(frame).values())
    print(f"  {samples} samples, stop {stop_s:.2f} s, tally {time.monotonic() - t1:.2f} s", file=sys.stderr, flush=True)
    errors = sorted({s.error for s in states.values() if s.error})
    n = len(guests)
    return {"kind": kind, "guests": n, "wall_s": wall, "samples": samples, "reads": reads, "missed": missed,
            "samples/s": samples / wall, "expected/s": n / PERIOD, "missed_%": ratio(100 * missed, samples + missed),
            "reads/sample": ratio(reads, samples), "sampler_%core": 100 * cpu / wall,
            "cpu_s": cpu,
            "lag_p99_ms": quantile(lags, 0.99) * 1e3 if lags else None,
            "lag_max_ms": max(lags) * 1e3 if lags else None, "target_%core": 100 * targets / wall,
            "errors": errors[:5], "dead": sum(1 for s in states.values() if s.state == "dead"), "stop_s": stop_s,
            "stuck_tasks_at_stop": stuck}


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


async def attach_all(sockets: list[Path], batch: int = 100) -> list[Guest]:
    guests: list[Guest] = []
    for i in range(0, len(sockets), batch):
        guests += await asyncio.gather(*(Guest.attach(s, SIM_XML, name=f"sim{i + j:05d}")
                                         for j, s in enumerate(sockets[i:i + batch])))
    return guests


async def run_real(counts: list[int], memory: str, seconds: float, others: set[int] | None) -> list[dict[str, Any]]:
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
        rows = [await measure("real", [], min(seconds, 10), pids)]  # idle: no sampler
        for n in counts:
            rows.append(await measure("real", guests[:n], seconds, pids))
        for row in rows:
            row["real_guests_running"] = len(guests)
        return rows
    finally:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        shutil.rmtree(workdir, ignore_errors=True)


async def run_sim(counts: list[int], seconds: float, others: set[int] | None) -> tuple[list[dict[str, Any]], dict]:
    if not counts:
        return [], {}
    limit = raise_open_files_limit()
    need = max(counts) + 64
    if limit < need:
        raise SystemExit(f"open-files limit {limit} is below the {need} that {max(counts)} guests need")
    simdir = Path(tempfile.mkdtemp(prefix="blb-sim-", dir="/tmp"))
    proc = None
    guests: list[Guest] = []
    info: dict[str, Any] = {}
    try:
        proc, sockets = qmp_simulator.start(simdir, max(counts), cpus=sorted(others) if others else None)
        start = time.monotonic()
        guests = await attach_all(sockets)
        info = {"attach_s": time.monotonic() - start, "attached": len(guests), "nofile": limit}
        await asyncio.sleep(1.0)
        rows = [await measure("sim", [], min(seconds, 5), [proc.pid])]  # the loop with all attached, idle
        for n in counts:
            rows.append(await measure("sim", guests[:n], seconds, [proc.pid]))
        return rows, info
    finally:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        if proc is not None:
            proc.terminate()
            try:
                out, _ = proc.communicate(timeout=10)
                info["simulator_counters"] = out.strip().splitlines()[-1] if out.strip() else None
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(simdir, ignore_errors=True)


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


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    cpus = sorted(os.sched_getaffinity(0))
    sampler_cpu = args.cpu if args.cpu is not None else cpus[-1]
    others = {c for c in cpus if c != sampler_cpu} or None
    # Children inherit this process's core: QEMUs (all their threads) and the simulator are
    # moved to the other cores as soon as they exist.
    pinned = pin_self(sampler_cpu) if others else False
    real = await run_real(args.real_counts, args.real_memory, args.window, others)
    sim, info = await run_sim(args.sim_counts, args.sim_window, others)
    info.update({"sampler_cpu": sampler_cpu, "pinned": pinned, "others": sorted(others or [])})
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
        print(f"sim: attached {info['attached']} guests in {info['attach_s']:.2f} s; simulator counters "
              f"{info.get('simulator_counters')}; open-files limit {info['nofile']}")
    print(f"sampler pinned to cpu {info['sampler_cpu']}: {info['pinned']}; targets on {info['others']}")
    kept = [r for r in rows if r["kind"] == "sim" and r["keeps_up"] == "yes"]
    lost = [r for r in rows if r["kind"] == "sim" and r["keeps_up"] == "NO"]
    if kept:
        print(f"kept up with up to {max(r['guests'] for r in kept)} simulated guests"
              + (f"; not with {min(r['guests'] for r in lost)}" if lost else " (the largest count tried)"))
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
