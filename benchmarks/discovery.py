"""How much it costs to find the virtio balloon in QEMU's object tree (QOM), by each method.

Every balloon command after ``query-balloon`` (stats period, ``guest-stats``) needs the
balloon's QOM path. libvirt's original search (2013) walked the whole QOM tree from ``/``
with one ``qom-list`` per object, looking for a ``link<virtio-balloon-pci>`` or
``child<...>`` property: about 200 QMP round trips on a minimal machine. balloonlab tries the
device's id first (``/machine/peripheral/<alias>``: one ``qom-list``), then the devices
added without an id (``/machine/peripheral-anon``), and keeps the walk as the last resort;
the result is cached per connection. This script puts numbers on that, for machines ``pc``
and ``q35`` (a bigger tree: PCIe root, ICH9, AHCI):

* ``alias``  ``find_balloon(method="alias")`` on a real built-in guest (``Guest.launch``);
* ``anon``   ``method="anon"`` on a second, paused QEMU of the same machine and accel whose
             ``-device virtio-balloon-pci`` has no id (an id'd balloon is not in
             peripheral-anon); started bare, as tests/qemu_helpers.py does;
* ``walk``   ``method="walk"``, libvirt's recursive walk, on the real guest;
* ``cached`` ``method="auto"`` after a first call on the same connection: 0 round trips.

Each method has one untimed warm-up call, then ``--reps`` timed calls, interleaved across
methods so drift hits them all alike. ``anon`` runs on another QEMU process, so its time
ratio also carries that process's own latency: for the same two round trips it came out
1.1-1.5x ``alias`` (its round-trip ratio, 1.0, is the discovery cost). Every found path is checked for the stats-polling
property (one more ``qom-list``), as balloonlab does. Round trips are ``Monitor.round_trips``
deltas and must be the same in every repetition; times are ``time.perf_counter`` around one
call. ``x_alias_*`` are ratios of the median time / round trips against ``alias`` of the same
machine in the same run. Raw samples and the environment go to benchmarks/results/discovery.json.

Run from the project root: ``.venv/bin/python benchmarks/discovery.py [--reps N] [--json PATH]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from _common import environment, median, print_table, quantile, ratio, write_json

from balloonlab import Guest, Monitor, builtin_spec
from balloonlab.qemu.discovery import find_balloon
from balloonlab.qemu.monitor import ConnectionCache

METHODS = ("alias", "anon", "walk", "cached")
COLUMNS = ("machine", "method", "round_trips", "median_ms", "p10_ms", "p90_ms", "x_alias_time", "x_alias_rtt")
FORMATS = {"median_ms": ".3f", "p10_ms": ".3f", "p90_ms": ".3f", "x_alias_time": ".2f", "x_alias_rtt": ".2f"}


@contextlib.asynccontextmanager
async def anon_qemu(workdir: Path, machine: str, accel: str, binary: str) -> AsyncIterator[Monitor]:
    """A bare, paused QEMU whose balloon has no id; yields a connected monitor. Killed after."""
    sock, log = workdir / "qmp.sock", workdir / "qemu.log"
    argv = [binary, "-machine", machine, "-accel", accel, "-m", "128", "-nodefaults", "-display", "none",
            "-no-user-config", "-qmp", f"unix:{sock},server=on,wait=off", "-S",
            "-device", "virtio-balloon-pci"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    monitor = Monitor(str(sock), name=f"anon-{machine}")
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"bare QEMU failed ({proc.returncode}): {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("bare QEMU did not create its QMP socket within 10 s")
            await asyncio.sleep(0.02)
        await monitor.connect()
        yield monitor
    finally:
        await monitor.close()
        proc.kill()
        proc.wait()


async def timed(monitor: Monitor, find: Callable[[], Awaitable[str]]) -> tuple[int, float, str]:
    """One find: (round trips, seconds, path)."""
    before = monitor.round_trips
    start = time.perf_counter()
    path = await find()
    elapsed = time.perf_counter() - start
    return monitor.round_trips - before, elapsed, path


async def measure_machine(machine: str, reps: int, workdir: Path) -> dict:
    spec = builtin_spec(f"disc-{machine}-{os.getpid()}", machine=machine)
    guest = await Guest.launch(spec)
    try:
        assert guest.record is not None
        accel, binary = guest.record.accel, guest.record.argv[0]
        anon_dir = workdir / f"anon-{machine}"
        anon_dir.mkdir()
        async with anon_qemu(anon_dir, machine, accel, binary) as anon_mon:
            balloon, mon = guest.balloon, guest.monitor
            finds: dict[str, tuple[Monitor, Callable[[], Awaitable[str]]]] = {
                "alias": (mon, lambda: balloon.path(method="alias")),
                "anon": (anon_mon, lambda: find_balloon(anon_mon, spec.memballoon, method="anon")),
                "walk": (mon, lambda: balloon.path(method="walk")),
                "cached": (mon, lambda: balloon.path(method="auto")),
            }
            # Launch already searched (to set the period): start the cache afresh, as a new
            # connection would, and record that first "auto" search (the cached one's cold call).
            mon.cache = ConnectionCache()
            cold_rtt, cold_s, _ = await timed(mon, finds["cached"][1])
            samples = {m: {"round_trips": [], "seconds": [], "path": None} for m in METHODS}
            for method, (m, find) in finds.items():  # warm-up, untimed
                samples[method]["path"] = (await timed(m, find))[2]
            for _ in range(reps):
                for method, (m, find) in finds.items():
                    rtt, seconds, _path = await timed(m, find)
                    samples[method]["round_trips"].append(rtt)
                    samples[method]["seconds"].append(seconds)
        return {"machine": machine, "accel": accel, "guest_argv": guest.record.argv,
                "auto_cold": {"round_trips": cold_rtt, "seconds": cold_s}, "samples": samples}
    finally:
        await guest.close()


def summarize(result: dict) -> list[dict]:
    rows, samples = [], result["samples"]
    for method in METHODS:
        rtts, secs = samples[method]["round_trips"], samples[method]["seconds"]
        if len(set(rtts)) != 1:
            raise RuntimeError(f"{result['machine']}/{method}: round trips vary across reps: {sorted(set(rtts))}")
        rows.append({"machine": result["machine"], "method": method, "round_trips": rtts[0],
                     "median_ms": median(secs) * 1e3, "p10_ms": quantile(secs, 0.1) * 1e3,
                     "p90_ms": quantile(secs, 0.9) * 1e3})
    base = rows[0]
    for row in rows:
        row["x_alias_time"] = ratio(row["median_ms"], base["median_ms"])
        row["x_alias_rtt"] = ratio(row["round_trips"], base["round_trips"])
    return rows


async def run(machines: list[str], reps: int) -> list[dict]:
    # All runtime dirs (the launched guests' and the bare QEMUs') live in one temp dir, removed after.
    workdir = Path(tempfile.mkdtemp(prefix="blb-disc-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir)
    try:
        return [await measure_machine(machine, reps, workdir) for machine in machines]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed finds per method and machine (default 30)")
    parser.add_argument("--json", metavar="PATH", help="where to write the JSON (default benchmarks/results/discovery.json)")
    parser.add_argument("--machines", default="pc,q35", help="comma-separated machine types (default pc,q35)")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    results = asyncio.run(run([m for m in args.machines.split(",") if m], args.reps))
    rows = [row for result in results for row in summarize(result)]
    print_table(rows, COLUMNS, FORMATS)
    for result in results:
        paths = ", ".join(f"{m}={s['path']}" for m, s in result["samples"].items())
        print(f"{result['machine']} ({result['accel']}): {paths}; first auto call "
              f"{result['auto_cold']['round_trips']} round trips")
    env = environment()
    out = write_json("discovery", {"benchmark": "discovery", "environment": env, "reps": args.reps,
                                   "summary": rows, "results": results}, args.json)
    print(f"\n{env['qemu_version']}, {env['cpu_model']}, nproc {env['nproc']}; raw samples: {out}")


if __name__ == "__main__":
    main()
