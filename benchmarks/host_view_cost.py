"""What the sampler's host view costs per sample, per guest, against the stats read every sample makes.

``Sampler._append`` (balloonlab/record/sampler.py) calls, with each sample of each guest,
``guest.host_memory()`` (one ``pread`` of a kept-open ``/proc/PID/smaps_rollup``, then one
``PAGEMAP_SCAN`` ioctl per guest RAM block and TCG buffer range: host_rss/pss/anon/swap... and
the split into guest RAM / TCG / other) and ``guest.vmem_columns()`` (cached: no QMP command).
The baseline is what a sample costs anyway: the stats read over QMP. Operations, each called
``--calls`` times (500) per scenario and timed call by call:

* ``read_stats()``                the baseline: ``await guest.balloon.read_stats()`` (its default
                                  ``query_actual=True``: ``qom-get guest-stats`` and ``query-balloon``);
* ``read_stats(actual=False)``    one command, ``qom-get guest-stats``: the sampler's usual read
                                  in its default ``track_actual="events"`` mode (for reference);
* ``rss_bytes()``                 the ``rss`` column: a ``pread`` of a kept-open ``/proc/PID/stat``;
* ``host_memory()``               the full host view (``host_view="split"``, the default);
* ``host_memory() rollup``        the same with ``guest.host_view = "rollup"``: smaps_rollup alone,
                                  so ``host_memory() - rollup`` is what the PAGEMAP_SCANs add;
* ``vmem_columns()``              the virtio-mem columns as last read;
* ``(timer floor)``               nothing between the clock reads: what the timing itself costs.

Per call: wall time (``time.perf_counter_ns``) and this thread's CPU time
(``time.thread_time_ns``: user + system, ns resolution; the asyncio loop and the QMP client run
in this one thread, so an ``await`` counts the client's CPU and not the time spent waiting).
Only the client's CPU is counted: QEMU's side of a QMP read (dispatch, reply) is not, whereas
the host view's cost is all in this process (the kernel walks QEMU's page tables on the
reader's CPU time). benchmarks/sampler_cost.py measures both sides of a whole sample.
Calls are taken in ``--rounds`` (5) chunks per operation, the order rotating each round, so
the machine's drift hits every operation alike; with several guests the calls cycle through
them (cost per guest per call). ``x_read_stats`` is an operation's median over ``read_stats()``'s
median in the same scenario (wall, and ``x_read_stats_cpu`` for CPU).

Scenarios, built-in TCG guests (stats period 1 s), one after the other:

* ``1``             one guest of ``--memory`` (512M);
* ``4``             three more of the same, launched next to it (calls cycle through all four);
* ``1 virtio-mem``  the four shut down, one guest of 384M with a virtio-mem device of 256M,
                    128M requested (``builtin_spec(..., virtio_mem=("256M", "128M"))``).

Before measuring, each guest is waited for (``--deadline`` s, 30) until it has reported stats,
its split is known (``host_memory().guest_ram is not None``: the RAM blocks and TCG buffer
are asked of QEMU in the background after the first call) and, with virtio-mem, until
``vmem_columns()`` is filled; then ``--settle`` s (2). What was scanned is printed and kept
per guest: guest RAM mapped (``host_ram_size``, what the RAM scans cover), TCG buffer mapped,
resident bytes of each and RSS, the ranges scanned, the mappings of the QEMU (smaps_rollup
walks them all) and whether PAGEMAP_SCAN was used (Linux >= 6.7) or smaps (older kernels).

Run from the project root: ``.venv/bin/python benchmarks/host_view_cost.py [--calls 500]
[--rounds 5] [--json PATH]``; about 30 s (mostly boots). Results:
benchmarks/results/host_view_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import environment, markdown_table, median, quantile, ratio, write_json

from balloonlab import Guest, builtin_spec

MIB = 1 << 20
BASELINE = "read_stats()"


def _floor(guest: Guest) -> None:
    return None


#: The operations timed: plain calls and coroutines, each of one guest ("host_memory() rollup"
#: is "host_memory()" with the guests' host_view set to "rollup" for the chunk).
SYNC_OPS: dict[str, Callable[[Guest], Any]] = {
    "rss_bytes()": lambda g: g.rss_bytes(),
    "host_memory()": lambda g: g.host_memory(),
    "vmem_columns()": lambda g: g.vmem_columns(),
    "(timer floor)": _floor,
}
ASYNC_OPS: dict[str, Callable[[Guest], Awaitable[Any]]] = {
    "read_stats()": lambda g: g.balloon.read_stats(),
    "read_stats(actual=False)": lambda g: g.balloon.read_stats(query_actual=False),
}
OPS = ("read_stats()", "read_stats(actual=False)", "rss_bytes()", "host_memory()", "host_memory() rollup",
       "vmem_columns()", "(timer floor)")
COLUMNS = ("operation", "guests", "calls", "median_us", "p90_us", "cpu_us", "cpu_p90_us", "x_read_stats",
           "x_read_stats_cpu")
FORMATS = {"median_us": ".1f", "p90_us": ".1f", "cpu_us": ".1f", "cpu_p90_us": ".1f", "x_read_stats": ".3f",
           "x_read_stats_cpu": ".3f"}


async def time_calls(op: str, guests: list[Guest], n: int, start: int) -> list[tuple[int, int]]:
    """``n`` calls of ``op`` cycling through ``guests`` from index ``start``: (wall ns, CPU ns) each."""
    out: list[tuple[int, int]] = []
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    if op in ASYNC_OPS:
        afn = ASYNC_OPS[op]
        for i in range(n):
            g = guests[(start + i) % len(guests)]
            c0, w0 = cpu(), wall()
            await afn(g)
            w1, c1 = wall(), cpu()
            out.append((w1 - w0, c1 - c0))
        return out
    if op == "host_memory() rollup":
        for g in guests:
            g.host_view = "rollup"
        fn: Callable[[Guest], Any] = SYNC_OPS["host_memory()"]
    else:
        fn = SYNC_OPS[op]
    try:
        for i in range(n):
            g = guests[(start + i) % len(guests)]
            c0, w0 = cpu(), wall()
            fn(g)
            w1, c1 = wall(), cpu()
            out.append((w1 - w0, c1 - c0))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the loop breathe (events, background lookups)
    finally:
        for g in guests:
            g.host_view = "split"
    return out


async def measure(guests: list[Guest], label: str, calls: int, rounds: int) -> list[dict[str, Any]]:
    """Every operation ``calls`` times on ``guests``, in ``rounds`` rotated chunks; one row each."""
    for op in OPS:  # warm-up, untimed
        await time_calls(op, guests, 20, 0)
    samples: dict[str, list[tuple[int, int]]] = {op: [] for op in OPS}
    per_round = [calls // rounds + (1 if r < calls % rounds else 0) for r in range(rounds)]
    for r in range(rounds):
        order = OPS[r % len(OPS):] + OPS[:r % len(OPS)]
        for op in order:
            samples[op] += await time_calls(op, guests, per_round[r], len(samples[op]))
    rows = []
    for op in OPS:
        walls = [w / 1e3 for w, _ in samples[op]]
        cpus = [c / 1e3 for _, c in samples[op]]
        rows.append({"operation": op, "guests": label, "calls": len(walls), "median_us": median(walls),
                     "p90_us": quantile(walls, 0.9), "mean_us": sum(walls) / len(walls), "cpu_us": median(cpus),
                     "cpu_p90_us": quantile(cpus, 0.9), "cpu_mean_us": sum(cpus) / len(cpus)})
    base = next(r for r in rows if r["operation"] == BASELINE)
    for row in rows:
        row["x_read_stats"] = ratio(row["median_us"], base["median_us"])
        row["x_read_stats_cpu"] = ratio(row["cpu_us"], base["cpu_us"])
    return rows


async def ready(guest: Guest, deadline_s: float, want_vmem: bool) -> None:
    """Wait until ``guest`` reported stats, its split is known and (``want_vmem``) its
    virtio-mem columns are filled.

    :raises TimeoutError: not within ``deadline_s``.
    """
    end = time.monotonic() + deadline_s
    await guest.balloon.wait_for_stats(deadline_s)
    while True:
        host = guest.host_memory()
        vmem = guest.vmem_columns()
        if host is not None and host.guest_ram is not None and (vmem or not want_vmem):
            return
        if time.monotonic() > end:
            raise TimeoutError(f"{guest.name}: split or virtio-mem columns not known after {deadline_s} s "
                               f"(layout error: {guest.host_layout_error})")
        await asyncio.sleep(0.1)


def scanned(guest: Guest) -> dict[str, Any]:
    """What the host view of ``guest`` reads: its layout and the sizes found now."""
    host = guest.host_memory()
    layout = guest.host_layout
    assert host is not None and layout is not None
    try:
        with open(f"/proc/{guest.pid}/maps", "rb") as f:
            mappings: int | None = sum(1 for _ in f)
    except OSError:
        mappings = None
    return {"guest": guest.name, "pid": guest.pid, "layout_how": layout.how,
            "pagemap_scan": guest._host.uses_scan,
            "ram_ranges": [(r.name, r.size) for r in layout.ram], "tcg_ranges": [r.size for r in layout.tcg],
            "host_ram_size": layout.ram_size, "tcg_size": sum(r.size for r in layout.tcg),
            "mappings": mappings, **host.columns(), "vmem": guest.vmem_columns()}


def scanned_row(label: str, s: dict[str, Any]) -> dict[str, Any]:
    def mib(v: int | None) -> float | None:
        return v / MIB if v is not None else None
    return {"guests": label, "guest": s["guest"], "ranges": len(s["ram_ranges"]) + len(s["tcg_ranges"]),
            "ram_MiB": mib(s["host_ram_size"]), "tcg_MiB": mib(s["tcg_size"]),
            "rss_MiB": mib(s["host_rss"]), "guest_ram_MiB": mib(s["host_guest_ram"]),
            "tcg_res_MiB": mib(s["host_tcg"]), "other_MiB": mib(s["host_other"]), "mappings": s["mappings"],
            "scan": "PAGEMAP_SCAN" if s["pagemap_scan"] else "smaps",
            "vmem_MiB": mib(s["vmem"].get("vmem_size")) if s["vmem"] else None}


SCANNED_COLUMNS = ("guests", "guest", "ranges", "ram_MiB", "tcg_MiB", "rss_MiB", "guest_ram_MiB", "tcg_res_MiB",
                   "other_MiB", "mappings", "scan", "vmem_MiB")
SCANNED_FORMATS = {c: ".1f" for c in SCANNED_COLUMNS if c.endswith("MiB")}


async def launch(specs: list[Any], guests: list[Guest]) -> list[Guest]:
    """Launch ``specs`` at once; every guest that started is appended to ``guests`` (for cleanup)."""
    results = await asyncio.gather(*(Guest.launch(s) for s in specs), return_exceptions=True)
    started = [g for g in results if isinstance(g, Guest)]
    guests += started
    failed = [r for r in results if not isinstance(r, Guest)]
    if failed:
        raise failed[0]  # type: ignore[misc]
    return started


async def stop(guests: list[Guest]) -> None:
    """Shut ``guests`` down (and empty the list); a QEMU still running is killed, by its own pid."""
    await asyncio.gather(*(g.shutdown() for g in guests), return_exceptions=True)
    for g in guests:  # belt and braces: our own QEMUs only
        if g._process is not None and g._process.poll() is None:
            g._process.kill()
    guests.clear()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="blb-hostview-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir)
    tag = os.getpid()
    guests: list[Guest] = []
    rows: list[dict[str, Any]] = []
    found: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {}
    try:
        scenarios: list[tuple[str, list[Any], bool, bool]] = [
            ("1", [builtin_spec(f"hv-1-{tag}", memory=args.memory, period_s=1)], False, False),
            ("4", [builtin_spec(f"hv-{i}-{tag}", memory=args.memory, period_s=1) for i in (2, 3, 4)], True, False),
            ("1 virtio-mem", [builtin_spec(f"hv-vmem-{tag}", memory="384M", virtio_mem=("256M", "128M"),
                                           period_s=1)], False, True),
        ]
        for label, specs, keep, vmem in scenarios:
            began = time.monotonic()
            if not keep:
                await stop(guests)
            await launch(specs, guests)
            await asyncio.gather(*(ready(g, args.deadline, vmem) for g in guests))
            await asyncio.sleep(args.settle)
            timings[f"{label}: ready_s"] = time.monotonic() - began
            began = time.monotonic()
            rows += await measure(guests, label, args.calls, args.rounds)
            timings[f"{label}: measure_s"] = time.monotonic() - began
            found[label] = [scanned(g) for g in guests]
        return {"rows": rows, "scanned": found, "timings": timings}
    finally:
        await stop(guests)
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls per operation and scenario (500)")
    parser.add_argument("--rounds", type=int, default=5, help="chunks per operation, order rotated (5)")
    parser.add_argument("--memory", default="512M", help="memory of the plain guests (512M)")
    parser.add_argument("--deadline", type=float, default=30.0, help="seconds to wait for stats and split (30)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait once ready (2)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/host_view_cost.json")
    args = parser.parse_args()
    if args.calls < args.rounds or args.rounds < 1 or args.deadline <= 0 or args.settle < 0:
        parser.error("--rounds must be positive and at most --calls, --deadline positive, --settle not negative")
    env = environment()
    began = time.monotonic()
    out = asyncio.run(run(args))
    wall = time.monotonic() - began
    print(markdown_table(out["rows"], COLUMNS, FORMATS))
    print()
    print(markdown_table([scanned_row(label, s) for label, ss in out["scanned"].items() for s in ss],
                         SCANNED_COLUMNS, SCANNED_FORMATS))
    try:
        load: str | None = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = None
    print(f"\n{args.calls} calls per operation and scenario in {args.rounds} rotated chunks; client CPU only "
          f"(QEMU's side of a QMP read not counted); TCG guests, period 1 s; {env['qemu_version']}, "
          f"{env['cpu_model']}, nproc {env['nproc']}, kernel {env['kernel']}, load {load}; {wall:.0f} s in all")
    path = write_json("host_view_cost", {"benchmark": "host_view_cost", "environment": env, "args": vars(args),
                                         "loadavg": load, "wall_s": wall, **out}, args.json)
    print(f"raw data: {path}")


if __name__ == "__main__":
    main()
