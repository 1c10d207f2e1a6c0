"""Launch to first balloon stats sample: a bare QEMU floor vs balloonlab vs ``virsh create``.

One built-in guest (256 MiB, stats period 1 s, the same kernel, initramfs and command line in
all three) is started, until QEMU holds its first balloon statistics report, then stopped;
three ways, side by side in one run:

- ``floor``: a shell script in a temp dir ``exec``\\ s ``qemu-system-x86_64`` with the argv
  balloonlab itself builds for the guest (:func:`balloonlab.qemu.argv.build_argv`, called as
  ``Guest.launch`` calls it, with the same accel and binary: only the socket and log paths are
  this script's). It starts paused (``-S``) with a QMP unix socket. This process polls for the
  socket every 10 ms, connects a bare ``qemu.qmp.QMPClient``, checks the balloon with one
  ``qom-list /machine/peripheral/balloon0`` (it must carry ``guest-stats-polling-interval``),
  ``qom-set``\\ s that to 1, sends ``cont`` and polls ``qom-get guest-stats`` every 10 ms until
  ``last-update`` is non-zero. The least any launcher can do to get there.
- ``balloonlab``: ``Guest.launch(spec)``, then ``guest.balloon.wait_for_stats(30, poll_s=0.01)``
  (``qom-get guest-stats`` + ``query-balloon`` per poll); ``await guest.shutdown()`` after.
- ``virsh``: ``virsh create`` of the same domain XML (``prepare_xml``, as
  benchmarks/libvirt_compare.py gives it to libvirt), then libvirt-python ``memoryStats()``
  every 10 ms until ``last_update`` is non-zero; ``virsh destroy`` after.

The clock (``time.monotonic``) starts right before the launcher is started (``Popen`` of the
script, the ``Guest.launch`` call, the ``virsh create`` process); the spec, the argv and the XML
are built before it, for every way alike. "first stats" is when the first read that saw a
report returned. Rounds are interleaved and the order rotates every round (floor, balloonlab,
virsh; then balloonlab, virsh, floor; ...), so load drift on a shared host hits all three
alike. Per way: median and p90 over the rounds, the ratio of each to the floor's and to
virsh's median (p90) of the same run, and the paired ratio (``*_paired``: the median over
rounds of this way's time over the reference's time in the same round).

Breakdown (medians, seconds from the start): what can be seen from outside the launcher. A
watcher task polls every 10 ms for QEMU's pid (the floor's ``Popen``, balloonlab's
``guest.json``, libvirt's ``/run/libvirt/qemu/<name>.pid``), for the run time of QEMU's vCPU 0
thread (``/proc/PID/task/TID/schedstat``; the thread is named ``CPU 0/TCG`` by
``debug-threads=on`` and does not run before ``cont``, so "has run 2 ms" marks ``cont`` for
all three ways, libvirt's included), and, for the floor and balloonlab, for the QMP socket file
and init's ``BALLOONLAB-READY`` line on the console log (the kernel boots ``quiet``; init prints
READY after the last module, virtio_balloon, is loaded and the workload agent started).
balloonlab's runtime dir too. The floor's own steps (connected, ``cont`` answered) are timed
inline, and the floor keeps watching after its first report until READY, so "first stats ->
READY" is measured on the boot that gave the report. libvirt's console is a pty nobody reads.
Medians of differences (the ``[interval]`` rows) are taken per launch, then over the rounds.
The watcher shares the event loop with the launcher: while ``Guest.launch`` runs blocking code
(its two ``Popen`` calls) the watcher cannot look, so a mark can be late by that much.

Run as root (qemu:///system), from the project root, under ``nice``:
``nice -n 5 .venv/bin/python benchmarks/launch.py [--rounds 7]``. libvirtd is started through
scripts/libvirtd when nothing answers (libvirt_compare.py's helper) and stopped again after.
Results: benchmarks/results/launch.json (every round's timestamps, the environment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import environment, median, print_table, quantile, ratio, write_json
from libvirt_compare import ROOT, URI, _ensure_libvirtd, virsh

import libvirt
from qemu.qmp import QMPClient

from balloonlab import Guest, builtin_spec
from balloonlab.domain import DomainSpec
from balloonlab.libvirt.files import prepare_xml
from balloonlab.model.period import POLLING_PROPERTY
from balloonlab.qemu.argv import build_argv, qemu_binary_for, resolve_accel
from balloonlab.qemu.guest import READY_LINE
from balloonlab.qemu.registry import RuntimePaths, runtime_root

WAYS = ("floor", "balloonlab", "virsh")
BALLOON_PATH = "/machine/peripheral/balloon0"  # the built-in guest's balloon has id balloon0
POLL_S = 0.01
#: vCPU 0's run time that counts as "the vCPUs run" (a paused vCPU thread has run microseconds).
VCPU_RAN_NS = 2_000_000
MEMORY = "256M"
#: Milestones of the breakdown table, in boot order (key, label).
MILESTONES = (
    ("runtime_dir", "runtime dir exists"),
    ("qemu_pid", "QEMU pid known (Popen / guest.json / libvirt pid file)"),
    ("qmp_socket", "QMP socket file exists"),
    ("connected", "QMP connected (greeting + capabilities)"),
    ("cont", "cont answered"),
    ("vcpu_ran", "vCPU 0 has run 2 ms (~ cont)"),
    ("first_stats", "first stats sample read"),
    ("ready", "console: BALLOONLAB-READY"),
    ("returned", "launcher returned (launch() / virsh create)"),
)
#: Intervals of the breakdown table (label, later mark, earlier mark, ways it means something for).
INTERVALS = (
    ("QEMU pid -> QMP socket (QEMU's own start-up)", "qmp_socket", "qemu_pid", WAYS),
    ("QMP socket -> vCPU ran (monitor work before cont)", "vcpu_ran", "qmp_socket", WAYS),
    ("QEMU pid -> vCPU ran", "vcpu_ran", "qemu_pid", WAYS),
    ("vCPU ran -> first stats (boot to virtio_balloon probe)", "first_stats", "vcpu_ran", ("floor", "virsh")),
    ("vCPU ran -> console READY (boot to init's READY)", "ready", "vcpu_ran", WAYS),
    ("vCPU ran -> launcher returned", "returned", "vcpu_ran", WAYS),
    ("first stats -> console READY (same boot)", "ready", "first_stats", ("floor",)),
    ("console READY -> launch() returned", "returned", "ready", WAYS),
    ("launcher returned -> first stats read", "first_stats", "returned", WAYS),
)


def since(t0: float) -> float:
    return time.monotonic() - t0


def vcpu_runtime_ns(pid: int, tid: int) -> int | None:
    """Run time of one thread so far (the first field of its schedstat), None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def vcpu_thread(pid: int) -> int | None:
    """The tid of vCPU 0 (``-name ...,debug-threads=on`` names it ``CPU 0/TCG`` or ``CPU 0/KVM``)."""
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/task/{task}/comm").read_text().startswith("CPU 0/"):
                    return int(task)
    return None


async def watch(t0: float, marks: dict[str, float], files: dict[str, Path], console: Path | None,
                pid_of: Callable[[], int | None], ready: asyncio.Event | None = None) -> None:
    """Every 10 ms, note when each of ``files`` first exists, when QEMU's pid is known, when its
    vCPU thread has run :data:`VCPU_RAN_NS` (it does not run before ``cont``), and the console's
    first byte and READY line."""
    pid = tid = None
    while True:
        for key, path in files.items():
            if key not in marks and path.exists():
                marks[key] = since(t0)
        if "vcpu_ran" not in marks:
            if pid is None and (pid := pid_of()) is not None:
                marks["qemu_pid"] = since(t0)
            if pid is not None and tid is None:
                tid = vcpu_thread(pid)
            if pid is not None and tid is not None and (vcpu_runtime_ns(pid, tid) or 0) >= VCPU_RAN_NS:
                marks["vcpu_ran"] = since(t0)
        if console is not None and "ready" not in marks:
            with contextlib.suppress(OSError):
                text = console.read_bytes()
                if text and "console_first" not in marks:
                    marks["console_first"] = since(t0)
                if READY_LINE in text:
                    marks["ready"] = since(t0)
                    if ready is not None:
                        ready.set()
        if ("ready" in marks or console is None) and "vcpu_ran" in marks and all(k in marks for k in files):
            return
        await asyncio.sleep(POLL_S)


async def stop_task(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# ---------------------------------------------------------------------------- floor

async def way_floor(spec: DomainSpec, accel: str, binary: str, timeout_s: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="blb-launch-"))  # short: unix socket paths are <108 bytes
    qmp, console, agent = work / "qmp.sock", work / "console.log", work / "agent.sock"
    argv = build_argv(spec, qmp_socket=str(qmp), console_log=str(console),
                      agent_socket=str(agent) if spec.agent else None, accel=accel, qemu_binary=binary)
    script = work / "start-qemu.sh"
    script.write_text("#!/bin/sh\n# The floor: QEMU paused (-S) with a QMP unix socket, nothing else.\n"
                      f"exec {shlex.join(argv)}\n")
    script.chmod(0o700)
    marks: dict[str, float] = {}
    ready = asyncio.Event()
    client = QMPClient(spec.name)
    proc: subprocess.Popen[bytes] | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        with open(work / "qemu.log", "wb") as log_file:
            t0 = time.monotonic()
            proc = subprocess.Popen([str(script)], stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        pid = proc.pid  # the script exec()s QEMU: same process
        watcher = asyncio.create_task(watch(t0, marks, {"qmp_socket": qmp}, console, lambda: pid, ready))

        def check(what: str) -> None:
            assert proc is not None
            if proc.poll() is not None:
                raise RuntimeError(f"floor QEMU exited with {proc.returncode} {what}: "
                                   + (work / "qemu.log").read_text(errors="replace")[-500:])
            if since(t0) > timeout_s:
                raise TimeoutError(f"floor: no {what} after {timeout_s} s")

        while True:  # QEMU binds the socket before it listens: retry until it answers
            if qmp.exists():
                try:
                    await client.connect(str(qmp))
                    break
                except Exception:  # qemu.qmp's ConnectError (refused) or an OSError
                    pass
            check("QMP connection")
            await asyncio.sleep(POLL_S)
        marks["connected"] = since(t0)
        props = {p["name"] for p in await client.execute("qom-list", {"path": BALLOON_PATH})}  # type: ignore[union-attr]
        if POLLING_PROPERTY not in props:
            raise RuntimeError(f"{BALLOON_PATH} has no {POLLING_PROPERTY}: {sorted(props)}")
        await client.execute("qom-set", {"path": BALLOON_PATH, "property": POLLING_PROPERTY, "value": 1})
        await client.execute("cont")
        marks["cont"] = since(t0)
        while True:
            reply: Any = await client.execute("qom-get", {"path": BALLOON_PATH, "property": "guest-stats"})
            if reply.get("last-update"):
                break
            check("stats sample")
            await asyncio.sleep(POLL_S)
        marks["first_stats"] = since(t0)
        # Keep going until init's READY line: how long after the first report does it come?
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ready.wait(), timeout_s)
        return marks
    finally:
        if watcher is not None:
            await stop_task(watcher)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.execute("quit"), 5)
        with contextlib.suppress(Exception):
            await client.disconnect()
        if proc is not None:
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()  # this script's own QEMU, by its Popen handle
                proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------- balloonlab

def _record_pid(record: Path) -> int | None:
    """QEMU's pid from balloonlab's guest.json (written right after QEMU and the reaper start)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(record.read_text())["pid"])
    return None


async def way_balloonlab(spec: DomainSpec, timeout_s: float) -> dict[str, float]:
    paths = RuntimePaths(runtime_root() / spec.name)
    marks: dict[str, float] = {}
    guest: Guest | None = None
    t0 = time.monotonic()
    watcher = asyncio.create_task(watch(t0, marks, {"runtime_dir": paths.dir, "qmp_socket": paths.qmp_socket},
                                        paths.console_log, lambda: _record_pid(paths.record)))
    try:
        async with asyncio.timeout(timeout_s):
            guest = await Guest.launch(spec)
            marks["returned"] = since(t0)
            await guest.balloon.wait_for_stats(30, poll_s=POLL_S)
            marks["first_stats"] = since(t0)
        return marks
    finally:
        await stop_task(watcher)
        if guest is not None:
            await guest.shutdown()


# ---------------------------------------------------------------------------- virsh

def _libvirt_pid(name: str) -> int | None:
    """QEMU's pid from libvirt's pid file (qemu:///system)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    return None


async def way_virsh(spec: DomainSpec, conn: libvirt.virConnect, timeout_s: float) -> dict[str, float]:
    xml, made = prepare_xml(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".xml", prefix="blb-launch-", delete=False) as handle:
        handle.write(xml)
    marks: dict[str, float] = {}
    watcher: asyncio.Task[None] | None = None
    try:
        t0 = time.monotonic()
        watcher = asyncio.create_task(watch(t0, marks, {}, None, lambda: _libvirt_pid(spec.name)))
        await asyncio.to_thread(virsh, "create", handle.name)
        marks["returned"] = since(t0)
        dom = await asyncio.to_thread(conn.lookupByName, spec.name)
        while not (await asyncio.to_thread(dom.memoryStats)).get("last_update"):
            if since(t0) > timeout_s:
                raise TimeoutError(f"virsh: no stats sample after {timeout_s} s")
            await asyncio.sleep(POLL_S)
        marks["first_stats"] = since(t0)
        return marks
    finally:
        if watcher is not None:
            await stop_task(watcher)
        # Only this round's own transient domain, by name; it is gone once destroyed.
        await asyncio.to_thread(subprocess.run, ["virsh", "-q", "-c", URI, "destroy", spec.name],
                                capture_output=True)
        os.unlink(handle.name)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


# ---------------------------------------------------------------------------- run + report

async def run(rounds: int, timeout_s: float, settle_s: float) -> dict[str, Any]:
    tag = os.getpid()
    probe = builtin_spec(f"launch-probe-{tag}", memory=MEMORY, period_s=1)
    accel = resolve_accel("auto")  # as Guest.launch(accel="auto") resolves it
    binary = shutil.which(qemu_binary_for(probe)) or qemu_binary_for(probe)
    conn = await asyncio.to_thread(libvirt.open, URI)
    samples: list[dict[str, Any]] = []
    try:
        for i in range(rounds):
            order = WAYS[i % len(WAYS):] + WAYS[:i % len(WAYS)]
            for way in order:
                spec = builtin_spec(f"launch-{way}-{tag}-{i}", memory=MEMORY, period_s=1)
                launch: Awaitable[dict[str, float]] = (
                    way_floor(spec, accel, binary, timeout_s) if way == "floor"
                    else way_balloonlab(spec, timeout_s) if way == "balloonlab"
                    else way_virsh(spec, conn, timeout_s))
                row: dict[str, Any] = {"round": i, "way": way, "position": order.index(way)}
                try:
                    row["marks"] = await launch
                except Exception as exc:  # one failed sample must not lose the run
                    row["error"] = f"{type(exc).__name__}: {exc}"
                samples.append(row)
                first = row.get("marks", {}).get("first_stats")
                print(f"round {i + 1}/{rounds} {way:10s} "
                      + (f"first stats {first:.3f} s" if first is not None else f"FAILED {row['error']}"),
                      flush=True)
                await asyncio.sleep(settle_s)  # let the previous QEMU's exit settle
    finally:
        conn.close()
    return {"accel": accel, "qemu_binary": binary, "samples": samples}


def summarise(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ok = {w: [s["marks"] for s in samples if s["way"] == w and "first_stats" in s.get("marks", {})]
          for w in WAYS}
    failed = {w: sum(1 for s in samples if s["way"] == w and "error" in s) for w in WAYS}

    def stat(way: str, key: str, q: float) -> float | None:
        values = [m[key] for m in ok[way] if key in m]
        return quantile(values, q) if values else None

    by_round = {(s["round"], s["way"]): s["marks"]["first_stats"] for s in samples
                if "first_stats" in s.get("marks", {})}

    def paired(way: str, ref: str) -> float | None:
        """Median over rounds of this way's time / the reference way's time in the same round."""
        values = [by_round[(r, way)] / by_round[(r, ref)] for r, w in by_round if w == way and (r, ref) in by_round]
        return median(values) if values else None

    rows = []
    for way in WAYS:
        med, p90 = stat(way, "first_stats", 0.5), stat(way, "first_stats", 0.9)
        rows.append({"way": way, "n": len(ok[way]), "failed": failed[way],
                     "returned_s": stat(way, "returned", 0.5) if way != "floor" else stat(way, "cont", 0.5),
                     "first_median_s": med, "first_p90_s": p90,
                     "x_floor": ratio(med, stat("floor", "first_stats", 0.5)),
                     "x_virsh": ratio(med, stat("virsh", "first_stats", 0.5)),
                     "x_floor_p90": ratio(p90, stat("floor", "first_stats", 0.9)),
                     "x_virsh_p90": ratio(p90, stat("virsh", "first_stats", 0.9)),
                     "x_floor_paired": paired(way, "floor"), "x_virsh_paired": paired(way, "virsh")})
    breakdown = []
    for key, label in MILESTONES:
        f, b, v = (stat(w, key, 0.5) for w in WAYS)
        if f is None and b is None and v is None:
            continue
        breakdown.append({"milestone": label, "floor_s": f, "balloonlab_s": b,
                          "balloonlab_minus_floor_s": None if f is None or b is None else b - f, "virsh_s": v})

    for label, later, earlier, ways in INTERVALS:
        cells: dict[str, Any] = {f"{way}_s": None for way in WAYS}
        for way in ways:
            values = [m[later] - m[earlier] for m in ok[way] if later in m and earlier in m]
            cells[f"{way}_s"] = median(values) if values else None
        if any(v is not None for v in cells.values()):
            f, b = cells["floor_s"], cells["balloonlab_s"]
            breakdown.append({"milestone": f"[interval] {label}", **cells,
                              "balloonlab_minus_floor_s": None if f is None or b is None else b - f})
    return rows, breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds; each launches every way once")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one launch may take")
    parser.add_argument("--settle", type=float, default=0.5, help="pause between launches, seconds")
    args = parser.parse_args()
    started = _ensure_libvirtd()
    try:
        result = asyncio.run(run(args.rounds, args.timeout, args.settle))
    finally:
        if started:
            subprocess.run([str(ROOT / "scripts" / "libvirtd"), "stop"], check=False)
    rows, breakdown = summarise(result["samples"])
    print(f"\nLaunch -> first stats sample (built-in guest {MEMORY}, period 1 s, accel {result['accel']}; "
          f"{args.rounds} interleaved rounds; returned_s: launch()/virsh create returned, floor: cont answered)")
    print_table(rows, ["way", "n", "failed", "returned_s", "first_median_s", "first_p90_s", "x_floor", "x_virsh",
                       "x_floor_p90", "x_virsh_p90", "x_floor_paired", "x_virsh_paired"],
                formats={k: ".2f" for k in ("x_floor", "x_virsh", "x_floor_p90", "x_virsh_p90",
                                            "x_floor_paired", "x_virsh_paired")})
    print("\nBreakdown (medians, seconds from the start; watcher polls every 10 ms)")
    print_table(breakdown, ["milestone", "floor_s", "balloonlab_s", "balloonlab_minus_floor_s", "virsh_s"])
    path = write_json("launch", {"environment": environment(result["qemu_binary"]), "params": vars(args),
                                 "accel": result["accel"], "summary": rows, "breakdown": breakdown,
                                 "samples": result["samples"]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
