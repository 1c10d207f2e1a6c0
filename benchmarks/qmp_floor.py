"""Client CPU per sample of balloonlab's Sampler against the floor: bare qemu.qmp, one qom-get.

One built-in guest (TCG, ``--memory`` 256M, stats period 1 s) is launched with
``Guest.launch``. QEMU serves one QMP client per ``-qmp`` socket, so the phases take turns on
that one socket: balloonlab's ``Monitor`` is closed (``guest.monitor.close()``), a bare
``qemu.qmp.QMPClient`` connects to the same socket (``guest.paths.qmp_socket``) for the floor,
disconnects, and the same ``Monitor`` object connects again (``guest.monitor.connect()``: the
Guest, its Balloon and their event handlers stay as they were; only the per-connection cache,
the balloon's QOM path, is found afresh, outside every timed window). For the blocking facade
the Monitor is closed once more and a ``SyncGuest.attach`` (the same domain spec,
``set_period=False``, so QEMU's stats timer is not touched) takes the socket on balloonlab's
own loop thread; its ``pid`` is set to QEMU's so the sampler reads QEMU's RSS per sample
exactly as it does for the launched guest. Finally the Monitor reconnects and
``guest.shutdown()`` stops QEMU (in a ``finally``, with a SIGKILL by pid as a last resort).

Phases (run as: the layer rows on balloonlab's connection, the floor, the samplers; CPU is
``time.process_time()`` of this process: every thread, user + system, ns resolution; the
machine's load does not enter it, only CPU this process used):

* ``floor b2b``     the bare ``QMPClient``: ``execute("qom-get", {path, "guest-stats"})``
                    ``--n`` times back to back in batches of ``--batch``; CPU per command,
                    median over batches (no idle subtracted: the batches are milliseconds).
* ``floor 1/s``     the same command once a second for ``--window`` s (an absolute 1 s
                    schedule, ``asyncio.sleep`` in between, as any periodic reader does); CPU
                    per command per ``--batch-s`` chunk minus the idle rate of this process
                    with the bare client connected and nothing sent (measured for ``--idle``
                    s just before), median over chunks. Its ``samples`` are the distinct
                    reports among the replies (last-update or values changed).
* ``Monitor b2b``,  balloonlab's layers over the same command, back to back as ``floor b2b``:
  ``read_stats b2b``  ``guest.monitor.execute(...)`` and
                    ``guest.balloon.read_stats(query_actual=False)`` (parse + classify);
                    they show where a per-read cost above the floor comes from.
* drift probes      ``Monitor.execute`` back to back (the row above before the floor, 300
                    commands after it and after each sampler phase): how much the
                    machine's speed moved meanwhile.
* ``Sampler()``     ``balloonlab.Sampler()`` (no run folder) sampling the guest for
                    ``--window`` s; ``Sampler(run_dir)`` the same with ``run_dir=`` a temporary
                    folder (Parquet flushes every 5 s, in a worker thread, counted too);
                    ``SyncSampler()`` the blocking facade over the ``SyncGuest``.

For the Sampler rows: ``samples`` and ``polls`` from ``sampler.states()[name]``, ``cmds`` is
the delta of ``guest.monitor.round_trips`` from before ``add()`` to after ``stop()`` (so the
start-up ``qom-get`` of the period, a metadata ``query-version`` with a run folder, the
report-phase bisection and the periodic period checks all count), ``us/sample`` is the CPU
from before ``add()`` to after ``stop()`` minus the idle rate of this process (balloonlab's
monitor connected, no sampler; ``--idle`` s before each phase) x that wall time, divided by
the samples; ``steady_us/sample`` is the median of the same per ``--batch-s`` chunk inside
the window (start and stop excluded). ``x_floor`` is ``us/sample`` over the ``floor 1/s``
CPU per command (the like-for-like floor: one command a second, sleeps in between);
``x_b2b`` over ``floor b2b``'s. Targets from the issue: ``x_floor`` <= 1.5 and
``cmds/sample`` <= 1.02 over the 10-minute window. ``missed``: gaps in the recorded
last-update above 1.5 s (benchmarks/_common.missed_reports; an upper bound, as last-update
has whole-second resolution). Every sampler variant is warmed up untimed first (lazy
imports, pyarrow's first write, the facade's loop thread).

``--profile S``: after the timed phases, three windows of S s each under cProfile with a CPU
timer (``time.thread_time``): the bare client's paced loop (the floor, as the reference), one
``Sampler()`` and one ``Sampler(run_dir)``. The asyncio loop runs on the main thread, which is
profiled; with a run folder each flush's worker thread gets a profiler of its own, merged in.
Prints tottime per sample grouped by source (balloonlab file, qemu.qmp, asyncio, json, ...),
the top 25 functions by tottime and balloonlab's functions by cumulative time (a coroutine's
cumtime is the CPU of its steps, callees run inline included), then the sources side by side.

The phases run one after another on a shared, loaded machine: drift between them (CPU
frequency, cache pressure from neighbours) is not controlled for, only shown by the drift
probes; read small ratios as rough.

Run from the project root, under nice on a shared machine:
``nice -n 10 .venv/bin/python benchmarks/qmp_floor.py [--window 600] [--profile 60]``;
about 4 x window + 1 min, + 3 x S with ``--profile S`` (``--no-sync``: one window less);
``--window 60`` for a smoke run.
Results: benchmarks/results/qmp_floor.json.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import cProfile
import io
import itertools
import os
import pstats
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import environment, median, missed_reports, print_table, process_cpu_seconds, ratio, write_json
from qemu.qmp import QMPClient

from balloonlab import Guest, Sampler, SyncGuest, SyncSampler, builtin_spec

COLUMNS = ("phase", "cmds", "samples", "polls", "cmds/sample", "missed", "wall_s", "us/cmd", "us/sample",
           "steady_us/sample", "x_floor", "x_b2b")
FORMATS = {"cmds/sample": ".4f", "wall_s": ".1f", "us/cmd": ".1f", "us/sample": ".1f", "steady_us/sample": ".1f",
           "x_floor": ".2f", "x_b2b": ".2f"}
GUEST_STATS = "guest-stats"


def cpu() -> float:
    """CPU seconds of this process so far (all threads)."""
    return process_cpu_seconds()


def _lu_seconds(frame: Any) -> list[float]:
    return [ts.timestamp() for ts in frame["last_update"].dropna()]


def distinct_reports(replies: list[tuple[Any, Any]]) -> list[float]:
    """last-update of each reply that holds a report the previous reply did not (as the
    sampler's classifier decides: last-update moved, or the values changed)."""
    kept, prev = [], None
    for lu, stats in replies:
        if lu and (prev is None or lu != prev[0] or stats != prev[1]):
            kept.append(float(lu))
        prev = (lu, stats)
    return kept


# -- measuring ---------------------------------------------------------------------------------
async def idle_rate(seconds: float) -> float:
    """CPU seconds per wall second of this process while nothing is sent."""
    c0, w0 = cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu() - c0) / (time.monotonic() - w0)


def idle_rate_blocking(seconds: float) -> float:
    """:func:`idle_rate` from a thread that may block (the facade's phase)."""
    c0, w0 = cpu(), time.monotonic()
    time.sleep(seconds)
    return (cpu() - c0) / (time.monotonic() - w0)


async def back_to_back(label: str, call: Callable[[], Awaitable[Any]], n: int, batch: int,
                       round_trips: Callable[[], int] | None = None) -> dict[str, Any]:
    """``call()`` ``n`` times back to back; CPU and wall time per call, median over batches."""
    cpu_per, wall_per = [], []
    rt0 = round_trips() if round_trips else 0
    for _ in range(max(1, n // batch)):
        c0, w0 = cpu(), time.perf_counter()
        for _ in range(batch):
            await call()
        cpu_per.append((cpu() - c0) / batch)
        wall_per.append((time.perf_counter() - w0) / batch)
    calls = len(cpu_per) * batch
    cmds = round_trips() - rt0 if round_trips else calls
    return {"phase": label, "cmds": cmds, "calls": calls, "us/cmd": median(cpu_per) * 1e6 * calls / cmds,
            "latency_us": median(wall_per) * 1e6, "batches_us/call": [c * 1e6 for c in cpu_per]}


def chunk_costs(marks: list[tuple[float, float, int]], idle: float) -> list[float]:
    """Per chunk between consecutive (cpu, wall, count) marks: (CPU - idle x wall) / count, in us."""
    out = []
    for (c0, w0, n0), (c1, w1, n1) in itertools.pairwise(marks):
        if n1 > n0:
            out.append(((c1 - c0) - idle * (w1 - w0)) / (n1 - n0) * 1e6)
    return out


async def paced_floor(client: QMPClient, path: str, seconds: float, chunk_s: float, idle: float) -> dict[str, Any]:
    """The bare client's ``qom-get`` once a second on an absolute schedule for ``seconds``."""
    args = {"path": path, "property": GUEST_STATS}
    replies: list[tuple[Any, Any]] = []  # kept as they come; compared after the window
    c0, w0 = cpu(), time.monotonic()
    marks = [(c0, w0, 0)]
    end, next_at, next_mark = w0 + seconds, w0, w0 + chunk_s
    while next_at < end:
        reply = await client.execute("qom-get", args)
        replies.append((reply.get("last-update"), reply.get("stats")))
        next_at += 1.0
        now = time.monotonic()
        if now >= next_mark:
            marks.append((cpu(), now, len(replies)))
            next_mark += chunk_s
        await asyncio.sleep(max(0.0, next_at - now))
    c1, w1 = cpu(), time.monotonic()
    reports = distinct_reports(replies)
    n = len(replies)
    client_s = (c1 - c0) - idle * (w1 - w0)
    per_chunk = chunk_costs(marks, idle)
    return {"phase": "floor 1/s (bare QMPClient)", "cmds": n, "samples": len(reports), "polls": n,
            "cmds/sample": ratio(n, len(reports)), "missed": missed_reports(reports, 1.0), "wall_s": w1 - w0,
            "client_cpu_s": client_s, "us/cmd": median(per_chunk) if per_chunk else client_s / n * 1e6,
            "us/cmd_whole": client_s / n * 1e6, "us/sample": ratio(client_s * 1e6, len(reports)),
            "chunks_us/cmd": per_chunk, "idle_%core": 100 * idle}


def sampler_row(label: str, *, samples: int, polls: int, cmds: int, missed: int, wall: float, cpu_s: float,
                idle: float, per_chunk: list[float], errors: list[str]) -> dict[str, Any]:
    client_s = cpu_s - idle * wall
    return {"phase": label, "cmds": cmds, "samples": samples, "polls": polls, "cmds/sample": ratio(cmds, samples),
            "missed": missed, "wall_s": wall, "client_cpu_s": client_s, "us/cmd": ratio(client_s * 1e6, cmds),
            "us/sample": ratio(client_s * 1e6, samples), "steady_us/sample": median(per_chunk) if per_chunk else None,
            "chunks_us/sample": per_chunk, "idle_%core": 100 * idle, "errors": errors}


async def sampler_window(label: str, guest: Guest, seconds: float, chunk_s: float, idle: float,
                         run_dir: Path | None) -> dict[str, Any]:
    """``Sampler(run_dir=...)`` over ``guest`` for ``seconds``: the whole window from add() to stop()."""
    name = guest.name
    rt0 = guest.monitor.round_trips
    c0, w0 = cpu(), time.monotonic()
    sampler = Sampler(run_dir=run_dir) if run_dir is not None else Sampler()
    await sampler.add(guest)
    await sampler.start()
    marks: list[tuple[float, float, int]] = []
    try:
        end = w0 + seconds
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(chunk_s, left))
            marks.append((cpu(), time.monotonic(), sampler.states()[name].samples))
    finally:
        await sampler.stop()
    c1, w1 = cpu(), time.monotonic()
    cmds = guest.monitor.round_trips - rt0
    state = sampler.states()[name]
    frame = sampler.frame()  # outside the window: building frames is not the per-sample cost
    return sampler_row(label, samples=state.samples, polls=state.polls, cmds=cmds,
                       missed=missed_reports(_lu_seconds(frame), 1.0), wall=w1 - w0, cpu_s=c1 - c0, idle=idle,
                       per_chunk=chunk_costs(marks, idle), errors=[state.error] if state.error else [])


async def warm_up(guest: Guest, seconds: float, run_dir: Path | None) -> None:
    sampler = Sampler(run_dir=run_dir) if run_dir is not None else Sampler()
    await sampler.add(guest)
    await sampler.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await sampler.stop()


def sync_phase(socket: str, guest: Guest, seconds: float, chunk_s: float, idle_s: float,
               warm_s: float) -> dict[str, Any]:
    """The blocking facade, run in a worker thread: SyncGuest.attach + SyncSampler()."""
    sg = SyncGuest.attach(socket, guest.spec, name=guest.name, set_period=False)
    try:
        sg.aio.pid = guest.pid  # rss per sample read from QEMU's /proc, as for the launched guest
        sg.balloon.path()  # discovery on this connection: outside the window
        warm = SyncSampler()
        warm.add(sg)
        warm.start()
        try:
            time.sleep(warm_s)
        finally:
            warm.stop()
        idle = idle_rate_blocking(idle_s)
        monitor = sg.aio.monitor
        rt0 = monitor.round_trips
        c0, w0 = cpu(), time.monotonic()
        sampler = SyncSampler()
        sampler.add(sg)
        sampler.start()
        marks: list[tuple[float, float, int]] = []
        try:
            end = w0 + seconds
            while (left := end - time.monotonic()) > 0:
                time.sleep(min(chunk_s, left))
                marks.append((cpu(), time.monotonic(), sampler.states()[guest.name].samples))
        finally:
            sampler.stop()
        c1, w1 = cpu(), time.monotonic()
        cmds = monitor.round_trips - rt0
        state = sampler.states()[guest.name]
        frame = sampler.frame()
        return sampler_row("SyncSampler() (SyncGuest)", samples=state.samples, polls=state.polls, cmds=cmds,
                           missed=missed_reports(_lu_seconds(frame), 1.0), wall=w1 - w0, cpu_s=c1 - c0,
                           idle=idle, per_chunk=chunk_costs(marks, idle),
                           errors=[state.error] if state.error else [])
    finally:
        sg.close()  # attached: disconnects only, QEMU keeps running


# -- profile -----------------------------------------------------------------------------------
def _group(filename: str) -> str:
    path = filename.replace("\\", "/")
    if "/balloonlab/" in path:
        return "balloonlab/" + path.rsplit("/balloonlab/", 1)[1]
    if "/qemu/qmp/" in path:
        return "qemu.qmp"
    if "/asyncio/" in path:
        return "asyncio"
    if path.endswith("/qmp_floor.py"):
        return "this benchmark"
    if "/json/" in path:
        return "json (stdlib)"
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0]
    if path.startswith("~") or path == "":
        return "builtins (C)"
    return "stdlib: " + Path(path).name


class _ProfilingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, each job run under a cProfile of its own while ``gate``
    says so (the profiles are collected in ``profiles``)."""

    def __init__(self, profiles: list[cProfile.Profile], gate: dict[str, bool]) -> None:
        super().__init__(thread_name_prefix="qmp-floor-worker")
        self._profiles, self._gate = profiles, gate

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        if not self._gate["active"]:
            return super().submit(fn, *args, **kwargs)
        profiles = self._profiles

        def profiled() -> Any:
            prof = cProfile.Profile(time.thread_time)
            try:
                return prof.runcall(fn, *args, **kwargs)
            finally:
                profiles.append(prof)
        return super().submit(profiled)


async def profile_window(label: str, guest: Guest, seconds: float, run_dir: Path | None) -> dict[str, Any]:
    """One sampler window under cProfile, steady state (enabled 3 s after start, disabled before
    stop). The timer is ``time.thread_time`` (CPU, not wall: waiting in epoll and preemption by
    neighbours on a loaded machine are not charged). With a run folder, each flush the sampler
    hands to a worker thread (``asyncio.to_thread``, i.e. the loop's default executor, replaced
    here by one that profiles each job) runs under a profiler of its own, merged in."""
    sampler = Sampler(run_dir=run_dir) if run_dir is not None else Sampler()
    workers: list[cProfile.Profile] = []
    gate = {"active": False}
    loop = asyncio.get_running_loop()
    executor = _ProfilingExecutor(workers, gate)
    loop.set_default_executor(executor)  # asyncio.to_thread runs its work here
    await sampler.add(guest)
    await sampler.start()
    await asyncio.sleep(3.0)  # past the report-phase bisection at start
    state = sampler.states()[guest.name]
    s0, p0, rt0, c0 = state.samples, state.polls, guest.monitor.round_trips, cpu()
    prof = cProfile.Profile(time.thread_time)
    try:
        gate["active"] = True
        prof.enable()
        await asyncio.sleep(seconds)
        prof.disable()
        gate["active"] = False
    finally:
        await sampler.stop()
    process_cpu = cpu() - c0  # includes the final flush at stop(): rough
    return summarize_profile(label, prof, workers, seconds=seconds, samples=state.samples - s0,
                             polls=state.polls - p0, cmds=guest.monitor.round_trips - rt0, process_cpu=process_cpu)


async def profile_floor(client: QMPClient, path: str, seconds: float) -> dict[str, Any]:
    """The bare client's paced loop (as ``floor 1/s``) under the same profiler: the reference
    the sampler's profile is read against (per command)."""
    prof = cProfile.Profile(time.thread_time)
    c0 = cpu()
    prof.enable()
    row = await paced_floor(client, path, seconds, seconds, 0.0)
    prof.disable()
    return summarize_profile("floor 1/s (bare QMPClient)", prof, [], seconds=seconds, samples=row["cmds"],
                             polls=row["cmds"], cmds=row["cmds"], process_cpu=cpu() - c0)


def summarize_profile(label: str, prof: cProfile.Profile, workers: list[cProfile.Profile], *, seconds: float,
                      samples: int, polls: int, cmds: int, process_cpu: float) -> dict[str, Any]:
    n = max(1, samples)
    stats = pstats.Stats(prof)
    for worker in workers:
        with contextlib.suppress(TypeError):  # an empty profile
            stats.add(worker)
    raw = stats.stats  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    for (filename, _line, _func), (_cc, _nc, tt, _ct, _callers) in raw.items():
        groups[_group(filename)] = groups.get(_group(filename), 0.0) + tt
    total = sum(groups.values())
    worker_s = 0.0
    for worker in workers:
        with contextlib.suppress(TypeError):
            worker_s += sum(v[2] for v in pstats.Stats(worker).stats.values())  # type: ignore[attr-defined]
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(25)
    text.write("balloonlab (and qemu.qmp's execute) by cumulative time:\n")
    stats.sort_stats("cumulative").print_stats(r"balloonlab/|qmp_client.py:\d+\(execute", 20)
    top = [{"function": f"{Path(fn).name}:{line}({func})", "file": fn, "ncalls": nc, "tottime_s": tt,
            "cumtime_s": ct, "us/sample": tt * 1e6 / n}
           for (fn, line, func), (_cc, nc, tt, ct, _c) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:40]]
    return {"label": label, "seconds": seconds, "samples": samples, "polls": polls, "cmds": cmds,
            "flushes_profiled": len(workers), "total_tottime_s": total, "worker_tottime_s": worker_s,
            "process_cpu_s": process_cpu, "total_us/sample": total * 1e6 / n,
            "groups_us/sample": {k: v * 1e6 / n for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": top, "text": text.getvalue()}


# -- the run -----------------------------------------------------------------------------------
async def probe(guest: Guest, path: str, when: str, probes: list[dict[str, Any]], n: int = 300) -> None:
    """Drift probe between phases: ``Monitor.execute`` qom-get back to back (median us/cmd)."""
    args = {"path": path, "property": GUEST_STATS}
    row = await back_to_back(when, lambda: guest.monitor.execute("qom-get", args), n, 100)
    probes.append({"when": when, "us/cmd": row["us/cmd"], "latency_us": row["latency_us"]})


async def reconnect_monitor(guest: Guest, timeout_s: float = 15.0) -> None:
    """Connect balloonlab's Monitor again (QEMU accepts the next client once the last one left)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await guest.monitor.connect(timeout_s=max(1.0, deadline - time.monotonic()))
            return
        except Exception:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="blb-floor-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir / "runtime")
    (workdir / "runtime").mkdir(mode=0o700)
    name = f"floor-{os.getpid()}"
    guest: Guest | None = None
    client: QMPClient | None = None
    rows: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    out: dict[str, Any] = {"rows": rows, "drift_probes": probes}
    try:
        guest = await Guest.launch(builtin_spec(name, memory=args.memory, period_s=1))
        await guest.balloon.wait_for_stats(30)
        path = await guest.balloon.path()
        assert guest.paths is not None
        socket = str(guest.paths.qmp_socket)
        out["guest"] = {"name": name, "pid": guest.pid, "qmp_socket": socket, "balloon_path": path,
                        "accel": guest.record.accel if guest.record else None,
                        "argv": guest.record.argv if guest.record else None}
        print(f"guest {name} pid {guest.pid}, balloon {path}, socket {socket}", flush=True)

        # Warm every sampler path once, untimed (lazy imports, pyarrow's first write).
        await warm_up(guest, args.warm, None)
        await warm_up(guest, args.warm, workdir / "warm-run")
        await asyncio.sleep(args.settle)

        # balloonlab's layers over the same command, back to back.
        args_qom = {"path": path, "property": GUEST_STATS}
        monitor = guest.monitor
        for label, call in (("Monitor.execute b2b", lambda: monitor.execute("qom-get", args_qom)),
                            ("read_stats(query_actual=False) b2b",
                             lambda: guest.balloon.read_stats(query_actual=False))):
            await call()
            rows.append(await back_to_back(label, call, args.n, args.batch, lambda: monitor.round_trips))
            print(f"{label}: {rows[-1]['us/cmd']:.1f} us/cmd", flush=True)
        probes.append({"when": "before the floor", "us/cmd": rows[0]["us/cmd"], "latency_us": rows[0]["latency_us"]})

        # The floor: a bare QMPClient on the same socket, balloonlab's monitor closed.
        await guest.monitor.close()
        client = QMPClient("floor")
        await client.connect(socket)
        await client.execute("qom-get", args_qom)
        bare = client
        b2b = await back_to_back("floor b2b (bare QMPClient)", lambda: bare.execute("qom-get", args_qom),
                                 args.n, args.batch)
        rows.insert(0, b2b)
        print(f"floor b2b: {b2b['us/cmd']:.1f} us/cmd, latency {b2b['latency_us']:.0f} us", flush=True)
        idle = await idle_rate(args.idle)
        paced = await paced_floor(client, path, args.window, args.batch_s, idle)
        rows.insert(1, paced)
        print(f"floor 1/s: {paced['us/cmd']:.1f} us/cmd over {paced['cmds']} commands", flush=True)
        await client.disconnect()
        client = None

        # The Sampler on balloonlab's monitor again.
        await reconnect_monitor(guest)
        await guest.balloon.path()  # discovery on the new connection, outside the windows
        await probe(guest, path, "after the floor", probes)
        idle = await idle_rate(args.idle)
        rows.append(await sampler_window("Sampler()", guest, args.window, args.batch_s, idle, None))
        print(f"Sampler(): {rows[-1]['us/sample']:.1f} us/sample", flush=True)
        await probe(guest, path, "after Sampler()", probes)
        idle = await idle_rate(args.idle)
        rows.append(await sampler_window("Sampler(run_dir)", guest, args.window, args.batch_s, idle,
                                         workdir / "run"))
        print(f"Sampler(run_dir): {rows[-1]['us/sample']:.1f} us/sample", flush=True)
        await probe(guest, path, "after Sampler(run_dir)", probes)

        if args.sync:
            await guest.monitor.close()
            try:
                rows.append(await asyncio.to_thread(sync_phase, socket, guest, args.window, args.batch_s,
                                                    args.idle, args.warm))
                print(f"SyncSampler(): {rows[-1]['us/sample']:.1f} us/sample", flush=True)
            finally:
                await reconnect_monitor(guest)
            await guest.balloon.path()
            await probe(guest, path, "after SyncSampler()", probes)

        if args.profile > 0:
            await guest.monitor.close()
            client = QMPClient("floor-profile")
            await client.connect(socket)
            await client.execute("qom-get", args_qom)
            floor_profile = await profile_floor(client, path, args.profile)
            await client.disconnect()
            client = None
            await reconnect_monitor(guest)
            await guest.balloon.path()
            out["profiles"] = [floor_profile, await profile_window("Sampler()", guest, args.profile, None),
                               await profile_window("Sampler(run_dir)", guest, args.profile, workdir / "prof-run")]
        return out
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()
        if guest is not None:
            if not guest.monitor.connected:
                with contextlib.suppress(Exception):
                    await reconnect_monitor(guest, 5.0)
            with contextlib.suppress(Exception):
                await guest.shutdown()
            # Belt and braces: our own QEMU only, by pid.
            if guest._process is not None and guest._process.poll() is None:
                guest._process.kill()
                guest._process.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


def finish(rows: list[dict[str, Any]]) -> None:
    floor = next(r for r in rows if r["phase"].startswith("floor 1/s"))
    b2b = next(r for r in rows if r["phase"].startswith("floor b2b"))
    for row in rows:
        cost = row.get("us/sample") if "samples" in row and not row["phase"].startswith("floor") else row["us/cmd"]
        row["x_floor"] = ratio(cost, floor["us/cmd"])
        row["x_b2b"] = ratio(cost, b2b["us/cmd"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=600.0,
                        help="seconds of the paced floor and of each sampler (default 600, the issue's 10 min)")
    parser.add_argument("--memory", default="256M", help="guest memory (default 256M)")
    parser.add_argument("--n", type=int, default=2000, help="back-to-back commands per b2b row (default 2000)")
    parser.add_argument("--batch", type=int, default=100, help="commands per back-to-back batch (default 100)")
    parser.add_argument("--batch-s", type=float, default=60.0, help="seconds per chunk of a paced window (60)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle measured before a phase (10)")
    parser.add_argument("--warm", type=float, default=3.0, help="seconds of each untimed warm-up (3)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after boot (3)")
    parser.add_argument("--no-sync", dest="sync", action="store_false", help="skip the SyncSampler phase")
    parser.add_argument("--profile", type=float, default=0.0, metavar="S",
                        help="then profile one Sampler() window of S s with cProfile (default off)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/qmp_floor.json")
    args = parser.parse_args()
    if args.window <= 0 or args.n < 1 or args.batch < 1 or args.batch_s <= 0 or args.idle <= 0:
        parser.error("--window, --n, --batch, --batch-s and --idle must be positive")
    env = environment()  # now: the git commit of the code this process imports and measures
    out = asyncio.run(run(args))
    rows = out["rows"]
    finish(rows)
    print()
    print_table(rows, COLUMNS, FORMATS)
    sampled = [r for r in rows if r.get("samples") and not r["phase"].startswith("floor")]
    print(f"\nfloor: {rows[1]['us/cmd']:.1f} us CPU per qom-get at 1/s (median of {len(rows[1]['chunks_us/cmd'])} "
          f"chunks), {rows[0]['us/cmd']:.1f} back to back (latency {rows[0]['latency_us']:.0f} us); idle "
          f"subtracted: {rows[1]['idle_%core']:.4f} % of a core (bare), "
          + ", ".join(f"{r['idle_%core']:.4f} %" for r in sampled) + " (samplers)")
    for r in sampled:
        ok_cpu = r["x_floor"] is not None and r["x_floor"] <= 1.5
        ok_cmd = r["cmds/sample"] is not None and r["cmds/sample"] <= 1.02
        print(f"{r['phase']}: x_floor {r['x_floor']:.2f} ({'meets' if ok_cpu else 'misses'} <= 1.5), "
              f"cmds/sample {r['cmds/sample']:.4f} ({'meets' if ok_cmd else 'misses'} <= 1.02)"
              + (f"; errors: {r['errors']}" if r["errors"] else ""))
    print("drift probe (Monitor.execute qom-get back to back, us CPU/cmd): "
          + ", ".join(f"{p['when']} {p['us/cmd']:.0f}" for p in out["drift_probes"]))
    for prof in out.get("profiles", []):
        print(f"\nprofile: {prof['label']} {prof['seconds']:g} s, {prof['samples']} samples, {prof['polls']} polls, "
              f"{prof['cmds']} cmds, {prof['flushes_profiled']} flushes; profiled CPU "
              f"{prof['total_us/sample']:.0f} us/sample ({prof['worker_tottime_s'] * 1e6 / max(1, prof['samples']):.0f}"
              f" in flush threads); tottime per sample by source (cProfile inflates it):")
        for group, us in list(prof["groups_us/sample"].items())[:15]:
            print(f"  {us:8.1f} us  {group}")
        print(prof["text"])
    if out.get("profiles"):
        profiles = out["profiles"]
        names = list(dict.fromkeys(g for p in profiles for g in list(p["groups_us/sample"])[:12]))
        table = [{"source": g, **{p["label"]: p["groups_us/sample"].get(g, 0.0) for p in profiles}} for g in names]
        table.append({"source": "total", **{p["label"]: p["total_us/sample"] for p in profiles}})
        print("profiled CPU (tottime) per sample by source, us (floor: per command; cProfile inflates all):")
        print_table(table, ["source"] + [p["label"] for p in profiles], {p["label"]: ".1f" for p in profiles})
    path = write_json("qmp_floor", {"benchmark": "qmp_floor", "environment": env, "args": vars(args), **out},
                      args.json)
    print(f"{env['qemu_version']}, {env['cpu_model']}, nproc {env['nproc']}; {out['guest']['accel']}; raw data: {path}")


if __name__ == "__main__":
    main()
