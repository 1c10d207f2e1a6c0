"""balloonlab over QMP vs libvirt, side by side on the same host in the same run.

Two built-in guests (512 MiB, stats period 1 s) run together: one launched by balloonlab
(its QMP socket is balloonlab's), one by libvirt (libvirt owns its monitor). For each way of
reading the balloon statistics the script samples back to back for a fixed time and reports:

- latency per sample (median, p90), measured around the call;
- host CPU per sample, from utime+stime deltas in /proc: the client (this process, plus
  cutime+cstime of waited-for children for the ``virsh`` rows), the guest's QEMU and
  libvirtd. /proc counts in clock ticks (10 ms), so each batch runs a few seconds; the idle
  CPU of each QEMU and of libvirtd (measured first, with nobody sampling) is subtracted.

Ways: balloonlab ``Guest.read_stats(query_actual=False)`` (one QMP command) and
``read_stats()`` (two: ``qom-get guest-stats`` + ``query-balloon``, the same QMP work
libvirt's memoryStats does, hence the reference for the ratios); libvirt-python
``memoryStats()`` called directly; balloonlab's LibvirtGuest (``stats_via`` libvirt and qmp);
``virsh dommemstat`` and ``virsh domstats --balloon`` (all domains) as a process per sample.
Then the time from "create" to the first stats sample: ``balloonlab.Guest.launch`` vs
``virsh create`` vs ``LibvirtGuest.launch``.

Run: ``.venv/bin/python benchmarks/libvirt_compare.py`` as root (qemu:///system). libvirtd
is started through scripts/libvirtd if nothing answers, and stopped again afterwards.
Results: benchmarks/results/libvirt_compare.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median, print_table, quantile, ratio, write_json  # noqa: E402

import libvirt  # noqa: E402

from balloonlab import Guest, builtin_spec  # noqa: E402
from balloonlab.libvirt.files import prepare_xml  # noqa: E402
from balloonlab.libvirt import LibvirtGuest  # noqa: E402

URI = "qemu:///system"
ROOT = Path(__file__).resolve().parent.parent
TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")
REFERENCE = "balloonlab QMP read_stats() [2 cmds]"


def cpu_ticks(pid: int | str, children: bool = False) -> int:
    """utime+stime (+cutime+cstime) of a process, in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    used = int(fields[11]) + int(fields[12])
    return used + int(fields[13]) + int(fields[14]) if children else used


def libvirtd_pid() -> int:
    pid = int(Path("/run/libvirtd.pid").read_text().strip())
    os.kill(pid, 0)
    return pid


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True,
                          text=True).stdout


async def idle_rates(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Ticks per second each process burns while nobody samples."""
    start = {k: cpu_ticks(p) for k, p in pids.items()}
    await asyncio.sleep(seconds)
    return {k: (cpu_ticks(p) - start[k]) / seconds for k, p in pids.items()}


async def measure(name: str, call: Callable[[], Awaitable[object]], *, qemu_pid: int, lvd_pid: int,
                  idle: dict[str, float], qemu_key: str, seconds: float, max_n: int) -> dict[str, object]:
    for _ in range(3):  # warm-up: connections, discovery, caches
        await call()
    lat: list[float] = []
    c0, q0, l0 = cpu_ticks("self", children=True), cpu_ticks(qemu_pid), cpu_ticks(lvd_pid)
    w0 = time.monotonic()
    while time.monotonic() - w0 < seconds and len(lat) < max_n:
        t = time.perf_counter()
        await call()
        lat.append((time.perf_counter() - t) * 1000)
    wall = time.monotonic() - w0
    n = len(lat)
    client = (cpu_ticks("self", children=True) - c0) * TICK_MS / n
    qemu = ((cpu_ticks(qemu_pid) - q0) - idle[qemu_key] * wall) * TICK_MS / n
    lvd = ((cpu_ticks(lvd_pid) - l0) - idle["libvirtd"] * wall) * TICK_MS / n
    return {"method": name, "n": n, "lat_median_ms": median(lat), "lat_p90_ms": quantile(lat, 0.9),
            "client_cpu_ms": client, "qemu_cpu_ms": max(qemu, 0.0), "libvirtd_cpu_ms": max(lvd, 0.0),
            "total_cpu_ms": client + max(qemu, 0.0) + max(lvd, 0.0),
            "samples_ms": [round(x, 4) for x in lat]}


async def sampling(bl: Guest, lv: LibvirtGuest, lv_qmp: LibvirtGuest, dom: libvirt.virDomain,
                   seconds: float) -> tuple[list[dict[str, object]], dict[str, float]]:
    lvd = libvirtd_pid()
    pids = {"bl": bl.pid, "lv": lv.pid, "libvirtd": lvd}
    idle = await idle_rates(pids, 3.0)

    async def virsh_dommemstat() -> None:
        await asyncio.to_thread(virsh, "dommemstat", lv.name)

    async def virsh_domstats() -> None:
        await asyncio.to_thread(virsh, "domstats", "--balloon")

    async def memory_stats() -> None:
        dom.memoryStats()  # blocking, on purpose: libvirt-python's own cost, no thread hop

    plan: list[tuple[str, Callable[[], Awaitable[object]], int, str, int]] = [
        ("balloonlab QMP read_stats(query_actual=False) [1 cmd]",
         lambda: bl.balloon.read_stats(query_actual=False), bl.pid, "bl", 20000),
        (REFERENCE, lambda: bl.balloon.read_stats(), bl.pid, "bl", 20000),
        ("libvirt-python memoryStats()", memory_stats, lv.pid, "lv", 20000),
        ("balloonlab LibvirtGuest stats_via=libvirt", lambda: lv.balloon.read_stats(), lv.pid, "lv", 20000),
        ("balloonlab LibvirtGuest stats_via=qmp", lambda: lv_qmp.balloon.read_stats(), lv.pid, "lv", 20000),
        ("virsh dommemstat (process)", virsh_dommemstat, lv.pid, "lv", 2000),
        ("virsh domstats --balloon (all domains)", virsh_domstats, lv.pid, "lv", 2000),
    ]
    rows = []
    for name, call, qpid, key, max_n in plan:
        rows.append(await measure(name, call, qemu_pid=qpid, lvd_pid=lvd, idle=idle, qemu_key=key,
                                  seconds=seconds, max_n=max_n))
    ref = next(r for r in rows if r["method"] == REFERENCE)
    for r in rows:
        r["lat_ratio"] = ratio(r["lat_median_ms"], ref["lat_median_ms"])
        r["cpu_ratio"] = ratio(r["total_cpu_ms"], ref["total_cpu_ms"])
    return rows, {k: v * TICK_MS / 1000 for k, v in idle.items()}


# ---------------------------------------------------------------------------- start-up

async def _poll(read: Callable[[], Awaitable[bool]], t0: float, timeout_s: float = 60.0) -> float:
    while time.monotonic() - t0 < timeout_s:
        if await read():
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise TimeoutError("no stats sample")


async def startup_balloonlab(name: str) -> tuple[float, float]:
    return await _startup_guest(lambda: Guest.launch(builtin_spec(name, period_s=1)))


async def startup_libvirtguest(name: str) -> tuple[float, float]:
    return await _startup_guest(lambda: LibvirtGuest.launch(builtin_spec(name, period_s=1), agent=False))


async def _startup_guest(launch: Callable[[], Awaitable[Guest | LibvirtGuest]]) -> tuple[float, float]:
    """Seconds from the call to "launched" and to the first available stats sample."""
    t0 = time.monotonic()
    guest = await launch()
    launched = time.monotonic() - t0
    try:
        first = await _poll(lambda: _available(guest.balloon.read_stats(query_actual=False)), t0)
    finally:
        await guest.shutdown()
    return launched, first


async def _available(read: Awaitable[object]) -> bool:
    return (await read).reported  # type: ignore[attr-defined]


async def startup_virsh(name: str, conn: libvirt.virConnect) -> tuple[float, float]:
    # The built-in XML as libvirt takes it (its agent serial port needs a socket path).
    xml, made = prepare_xml(builtin_spec(name, period_s=1))
    with tempfile.NamedTemporaryFile("w", suffix=".xml", delete=False) as handle:
        handle.write(xml)
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(virsh, "create", handle.name)
        launched = time.monotonic() - t0
        dom = await asyncio.to_thread(conn.lookupByName, name)

        async def ready() -> bool:
            return bool((await asyncio.to_thread(dom.memoryStats)).get("last_update"))
        try:
            first = await _poll(ready, t0)
        finally:
            await asyncio.to_thread(virsh, "destroy", name)
    finally:
        os.unlink(handle.name)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
    return launched, first


async def startup(rounds: int, conn: libvirt.virConnect) -> list[dict[str, object]]:
    tag = f"{os.getpid()}"
    runs: dict[str, list[tuple[float, float]]] = {"balloonlab Guest.launch": [], "virsh create": [],
                                                  "LibvirtGuest.launch": []}
    for i in range(rounds):  # interleaved, so drift hits all three alike
        runs["balloonlab Guest.launch"].append(await startup_balloonlab(f"blb-start-{tag}-{i}"))
        runs["virsh create"].append(await startup_virsh(f"blv-start-{tag}-{i}", conn))
        runs["LibvirtGuest.launch"].append(await startup_libvirtguest(f"blv-startg-{tag}-{i}"))
    ref = median([f for _, f in runs["balloonlab Guest.launch"]])
    return [{"method": k, "n": len(v), "create_returned_s": median([a for a, _ in v]),
             "first_stats_s": median([f for _, f in v]), "ratio": ratio(median([f for _, f in v]), ref),
             "runs": v} for k, v in runs.items()]


# ---------------------------------------------------------------------------- main

def _ensure_libvirtd() -> bool:
    """Start libvirtd through scripts/libvirtd when nothing answers; True if started."""
    if subprocess.run(["virsh", "-q", "-c", URI, "version"], capture_output=True).returncode == 0:
        return False
    subprocess.run([str(ROOT / "scripts" / "libvirtd"), "start"], check=True)
    return True


async def run(seconds: float, rounds: int) -> dict[str, object]:
    tag = os.getpid()
    conn = await asyncio.to_thread(libvirt.open, URI)
    bl = lv = lv_qmp = None
    try:
        bl = await Guest.launch(builtin_spec(f"blb-bench-{tag}", period_s=1))
        lv = await LibvirtGuest.launch(builtin_spec(f"blv-bench-{tag}", period_s=1), agent=False,
                                       stats_via="libvirt")
        lv_qmp = await LibvirtGuest.attach(lv.name, stats_via="qmp")
        await bl.balloon.wait_for_stats()
        await lv.balloon.wait_for_stats()
        dom = await asyncio.to_thread(conn.lookupByName, lv.name)
        domains = len(await asyncio.to_thread(conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        rows, idle = await sampling(bl, lv, lv_qmp, dom, seconds)
    finally:
        for guest in (lv_qmp, lv, bl):
            if guest is not None:
                await guest.close()
    starts = await startup(rounds, conn)
    conn.close()
    return {"sampling": rows, "idle_cpu_fraction": idle, "running_libvirt_domains": domains,
            "startup": starts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="sampling time per method")
    parser.add_argument("--rounds", type=int, default=3, help="start-up measurements per method")
    args = parser.parse_args()
    started = _ensure_libvirtd()
    try:
        result = asyncio.run(run(args.seconds, args.rounds))
    finally:
        if started:
            subprocess.run([str(ROOT / "scripts" / "libvirtd"), "stop"], check=False)
    print(f"\nPer sample (reference for ratios: {REFERENCE}; idle CPU subtracted; "
          f"{result['running_libvirt_domains']} libvirt domain(s) running)")
    print_table(result["sampling"], ["method", "n", "lat_median_ms", "lat_p90_ms", "client_cpu_ms",
                                     "qemu_cpu_ms", "libvirtd_cpu_ms", "total_cpu_ms", "lat_ratio",
                                     "cpu_ratio"],
                formats={"lat_ratio": ".2f", "cpu_ratio": ".2f"})
    print("\nCreate -> first stats sample (built-in guest, period 1 s; medians)")
    print_table(result["startup"], ["method", "n", "create_returned_s", "first_stats_s", "ratio"],
                formats={"ratio": ".2f"})
    path = write_json("libvirt_compare", {"environment": environment(), "params": vars(args), **result})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
