"""Whole-host CPU per recorded sample: balloonlab's Sampler against a naive polling loop.

``--guests`` real built-in guests (TCG, stats period 1 s) are launched once; then, in
``--rounds`` rounds of one chunk per mode (the order rotates each round, so drift hits every
mode alike; ``--window`` seconds per mode in all), each mode samples all guests:

* ``idle``    no sampler: the guests' own CPU (their stats driver still reports every second),
              the baseline that is subtracted from the other modes;
* ``events``  ``Sampler(track_actual="events")``, the default: one ``qom-get guest-stats`` per
              read, ``actual`` from BALLOON_CHANGE events (the baseline of the ratios);
* ``poll``    ``Sampler(track_actual="poll")``: ``query-balloon`` with every read;
* ``naive``   what a quick script does: every ``--naive-interval`` s (0.25) send ``guest-stats``
              and ``query-balloon`` to each guest and keep the reads whose last-update/stats
              changed (list of dicts).

CPU is read from the kernel's per-process CPU clocks (user + system, all threads, ns
resolution) of this process and of every QEMU. For each mode: sampler-caused CPU = CPU in the
mode minus the idle mode's CPU rate x the mode's wall time (separately for this process,
``client``, and QEMU, ``qemu``), divided by the samples recorded. ``cmds/sample`` counts QMP
commands (``Monitor.round_trips``); ``reads/sample`` is reads per new sample (the Sampler's
polls/samples). ``missed`` counts reports the reader never saw: gaps in the recorded
``last_update`` of a guest above 1.5 periods (the naive loop reads 4x per period, so its
misses are the guests' own). ``x_events`` ratios are against ``events`` in this run.

``--with-libvirt``: polls ``virsh dommemstat`` and libvirt-python ``memoryStats()`` on libvirt
domains if a libvirtd runs and the guests are its domains (``--libvirt-domains``); the guests
launched here are not, so it says where to look instead (benchmarks/libvirt_compare.py).

Run from the project root: ``.venv/bin/python benchmarks/sampler_cost.py [--guests 2]
[--window 30] [--rounds 3] [--json PATH]``; about 20 s + 4 x window.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    environment,
    missed_reports,
    print_table,
    process_cpu_seconds,
    ratio,
    write_json,
)

from balloonlab import Guest, Sampler, builtin_spec

MODES = ("idle", "events", "poll", "naive")
COLUMNS = ("mode", "samples", "missed", "reads/sample", "cmds/sample", "client_ms/sample", "qemu_ms/sample",
           "total_ms/sample", "cpu_%core", "x_events")
FORMATS = {"reads/sample": ".2f", "cmds/sample": ".2f", "client_ms/sample": ".3f", "qemu_ms/sample": ".3f",
           "total_ms/sample": ".3f", "cpu_%core": ".3f", "x_events": ".2f"}


class Snapshot:
    """CPU times of this process and the QEMUs, and QMP commands sent, at one moment."""

    def __init__(self, guests: list[Guest]) -> None:
        self.wall = time.monotonic()
        self.client = process_cpu_seconds()
        self.qemu = [process_cpu_seconds(g.pid) for g in guests]  # type: ignore[arg-type]
        self.commands = sum(g.monitor.round_trips for g in guests)


def _lu_seconds(frame: Any, guest: str) -> list[float]:
    lu = frame.loc[frame["guest"] == guest, "last_update"].dropna()
    return [ts.timestamp() for ts in lu]


async def run_sampler(guests: list[Guest], seconds: float, track_actual: str) -> Callable[[], dict[str, Any]]:
    """Sample for ``seconds``; returns the tally, computed later (building the frame is not
    the sampler's steady-state cost, so it stays out of the CPU window)."""
    sampler = Sampler(track_actual=track_actual)
    for guest in guests:
        await sampler.add(guest)
    await sampler.start()
    try:
        await asyncio.sleep(seconds)
    finally:
        await sampler.stop()

    def tally() -> dict[str, Any]:
        states = sampler.states()
        frame = sampler.frame()
        return {"samples": sum(s.samples for s in states.values()), "reads": sum(s.polls for s in states.values()),
                "missed": sum(missed_reports(_lu_seconds(frame, g.name), 1.0) for g in guests),
                "errors": [s.error for s in states.values() if s.error]}
    return tally


async def run_naive(guests: list[Guest], seconds: float, interval: float) -> dict[str, Any]:
    """A blind loop per guest: guest-stats + query-balloon every ``interval``, keep new ones."""
    kept: dict[str, list[dict[str, Any]]] = {g.name: [] for g in guests}
    reads = 0

    async def loop(guest: Guest) -> None:
        nonlocal reads
        path = await guest.balloon.path()  # cached on the connection: no command
        last = None
        next_at = time.monotonic()
        while True:
            stats = await guest.monitor.execute("qom-get", {"path": path, "property": "guest-stats"})
            actual = (await guest.monitor.execute("query-balloon"))["actual"]
            reads += 1
            key = (stats["last-update"], stats["stats"])
            if key != last:
                last = key
                kept[guest.name].append({"time": time.time(), "last_update": stats["last-update"],
                                         "actual": actual, **stats["stats"]})
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    tasks = [asyncio.create_task(loop(g)) for g in guests]
    try:
        await asyncio.sleep(seconds)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"samples": sum(len(v) for v in kept.values()), "reads": reads,
            "missed": sum(missed_reports([float(r["last_update"]) for r in rows], 1.0) for rows in kept.values()),
            "errors": []}


async def run_mode(mode: str, guests: list[Guest], seconds: float, interval: float) -> dict[str, Any]:
    before = Snapshot(guests)
    if mode == "idle":
        await asyncio.sleep(seconds)
        counts: dict[str, Any] = {"samples": 0, "reads": 0, "missed": 0, "errors": []}
    elif mode == "naive":
        counts = await run_naive(guests, seconds, interval)
    else:
        tally = await run_sampler(guests, seconds, mode)
        after = Snapshot(guests)
        counts = tally()
    if mode in ("idle", "naive"):
        after = Snapshot(guests)
    return {"mode": mode, "wall_s": after.wall - before.wall, "client_cpu_s": after.client - before.client,
            "qemu_cpu_s": sum(a - b for a, b in zip(after.qemu, before.qemu)),
            "qemu_cpu_s_per_guest": [a - b for a, b in zip(after.qemu, before.qemu)],
            "commands": after.commands - before.commands, **counts}


def summarize(chunks: list[dict[str, Any]], n_guests: int) -> list[dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for c in chunks:
        t = totals.setdefault(c["mode"], {k: 0.0 for k in ("wall_s", "client_cpu_s", "qemu_cpu_s", "commands",
                                                            "samples", "reads", "missed")})
        for k in t:
            t[k] += c[k]
    idle = totals["idle"]
    idle_client_rate = idle["client_cpu_s"] / idle["wall_s"]
    idle_qemu_rate = idle["qemu_cpu_s"] / idle["wall_s"]
    rows = []
    for mode in MODES:
        t = totals[mode]
        row: dict[str, Any] = {"mode": mode, "samples": int(t["samples"]), "missed": int(t["missed"]),
                               "wall_s": t["wall_s"]}
        if mode == "idle":
            row["idle_qemu_%core_per_guest"] = 100 * idle_qemu_rate / n_guests
            row["idle_client_%core"] = 100 * idle_client_rate
        else:
            client = t["client_cpu_s"] - idle_client_rate * t["wall_s"]
            qemu = t["qemu_cpu_s"] - idle_qemu_rate * t["wall_s"]
            n = t["samples"] or None
            row.update({"reads/sample": ratio(t["reads"], n), "cmds/sample": ratio(t["commands"], n),
                        "client_ms/sample": ratio(client * 1e3, n), "qemu_ms/sample": ratio(qemu * 1e3, n),
                        "total_ms/sample": ratio((client + qemu) * 1e3, n),
                        "cpu_%core": 100 * (client + qemu) / t["wall_s"]})
        rows.append(row)
    base = next(r for r in rows if r["mode"] == "events")
    for row in rows:
        row["x_events"] = ratio(row.get("total_ms/sample"), base.get("total_ms/sample"))
    return rows


# -- libvirt hook (minimal; benchmarks/libvirt_compare.py has the full side) -------------------
SKIPPED = "libvirt comparison: skipped (run benchmarks/libvirt_compare.py)"


def _libvirtd_pid() -> int | None:
    try:
        pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def libvirt_side(domains: list[str], seconds: float) -> list[dict[str, Any]] | None:
    """Poll ``virsh dommemstat`` and ``memoryStats()`` once a second on each domain (one
    chunk each); CPU per call of this process + its children, and of libvirtd. None: skipped."""
    daemon = _libvirtd_pid()
    if daemon is None or not domains or shutil.which("virsh") is None:
        return None
    try:
        import libvirt
    except ImportError:
        return None
    try:
        conn = libvirt.open("qemu:///system")
        doms = [conn.lookupByName(name) for name in domains]
    except libvirt.libvirtError:
        return None
    import resource

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    calls = {
        "virsh dommemstat": lambda d: subprocess.run(["virsh", "-c", "qemu:///system", "dommemstat", d.name()],
                                                     capture_output=True, check=True),
        "memoryStats()": lambda d: d.memoryStats(),
    }
    rows = []
    try:
        for label, call in calls.items():
            c0, k0, d0, n = process_cpu_seconds(), children_cpu(), process_cpu_seconds(daemon), 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for dom in doms:
                    call(dom)
                    n += 1
                time.sleep(1.0)
            client = process_cpu_seconds() - c0 + children_cpu() - k0
            rows.append({"method": label, "calls": n, "client_ms/call": client * 1e3 / n,
                         "libvirtd_ms/call": (process_cpu_seconds(daemon) - d0) * 1e3 / n})
    finally:
        conn.close()
    return rows


async def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="blb-cost-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir)
    guests: list[Guest] = []
    try:
        specs = [builtin_spec(f"cost{i}-{os.getpid()}", memory=args.memory, period_s=1) for i in range(args.guests)]
        results = await asyncio.gather(*(Guest.launch(s) for s in specs), return_exceptions=True)
        guests = [g for g in results if isinstance(g, Guest)]
        failed = [r for r in results if not isinstance(r, Guest)]
        if failed:
            raise failed[0]  # type: ignore[misc]
        await asyncio.gather(*(g.balloon.wait_for_stats(30) for g in guests))
        # Warm up every code path once (lazy imports, first frame), untimed.
        (await run_sampler(guests, 1.2, "events"))()
        await run_naive(guests, 0.6, args.naive_interval)
        await asyncio.sleep(args.settle)  # let boot-time activity die down
        chunk = args.window / args.rounds
        chunks = []
        for r in range(args.rounds):
            order = MODES[r % len(MODES):] + MODES[:r % len(MODES)]
            for mode in order:
                chunks.append(await run_mode(mode, guests, chunk, args.naive_interval))
                chunks[-1]["round"] = r
        info = {"qemu_pids": [g.pid for g in guests], "accel": guests[0].record.accel if guests[0].record else None,
                "argv": guests[0].record.argv if guests[0].record else None}
        return chunks, info
    finally:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        for g in guests:  # belt and braces: our own QEMUs only, by pid
            if g.pid is not None and g._process is not None and g._process.poll() is None:
                g._process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--guests", type=int, default=2, help="real TCG guests (default 2)")
    parser.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    parser.add_argument("--window", type=float, default=30.0, help="seconds per mode in all (default 30)")
    parser.add_argument("--rounds", type=int, default=3, help="chunks per mode, order rotated (default 3)")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds to wait after boot (default 3)")
    parser.add_argument("--naive-interval", type=float, default=0.25, help="naive loop's read interval (0.25 s)")
    parser.add_argument("--with-libvirt", action="store_true", help="also poll libvirt (see module doc)")
    parser.add_argument("--libvirt-domains", default="", help="comma-separated libvirt domains for --with-libvirt")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/sampler_cost.json")
    args = parser.parse_args()
    if args.guests < 1 or args.rounds < 1 or args.window <= 0:
        parser.error("--guests, --rounds and --window must be positive")
    chunks, info = asyncio.run(run(args))
    rows = summarize(chunks, args.guests)
    print_table(rows, COLUMNS, FORMATS)
    idle = rows[0]
    print(f"\nidle (subtracted): QEMU {idle['idle_qemu_%core_per_guest']:.2f} % of a core per guest, this process "
          f"{idle['idle_client_%core']:.3f} %; {args.guests} guest(s) x {args.memory}, {args.window:g} s per mode "
          f"in {args.rounds} chunks; {info['accel']}")
    errors = [e for c in chunks for e in c["errors"]]
    if errors:
        print("sampler errors:", errors)
    libvirt_rows = None
    if args.with_libvirt:
        domains = [d for d in args.libvirt_domains.split(",") if d]
        libvirt_rows = libvirt_side(domains, args.window / args.rounds)
        if libvirt_rows is None:
            print(SKIPPED)
        else:
            print()
            print_table(libvirt_rows, ("method", "calls", "client_ms/call", "libvirtd_ms/call"))
    env = environment()
    out = write_json("sampler_cost", {"benchmark": "sampler_cost", "environment": env, "args": vars(args),
                                      "guests": info, "summary": rows, "chunks": chunks, "libvirt": libvirt_rows},
                     args.json)
    print(f"{env['qemu_version']}, {env['cpu_model']}, nproc {env['nproc']}; raw data: {out}")


if __name__ == "__main__":
    main()
