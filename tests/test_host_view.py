"""The host's view of every guest byte, on real built-in guests (QEMU from PATH under TCG).

host_rss against the kernel's VmRSS at the same moment; guest RAM resident on the host growing
with what the guest's agent touches and staying after a free without free page reporting, and
falling within seconds with it; the TCG buffer; virtio-mem columns following a resize; the
attribution bands summing as documented on real frames; the run's attribution PNG.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pandas as pd

from balloonlab import Experiment, Guest, Sampler, Schedule
from balloonlab.analysis.attribution import BANDS, RESIDENT, attribution
from balloonlab.analysis.plotting import attribution_plot_path
from balloonlab.model.schema import HOST_COLUMNS, VMEM_COLUMNS

MiB = 1 << 20
TOUCH = 128 * MiB


def vm_rss(pid: int) -> int:
    """VmRSS of ``pid`` (the kernel's per-process counters), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def split_known(guest: Guest, timeout_s: float = 15.0):
    """The guest's host memory once its RAM blocks are known (the layout is asked in the background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        host = guest.host_memory()
        if host is not None and host.guest_ram is not None:
            return host
        assert time.monotonic() < deadline, f"split still unknown: {guest.host_layout_error}"
        await asyncio.sleep(0.1)


async def test_host_columns_are_plausible_and_host_rss_is_the_kernels_vmrss(guest):
    host = await split_known(guest)
    assert guest.host_layout is not None and [r.name for r in guest.host_layout.ram] == ["pc.ram"]
    assert host.ram_size == 512 * MiB and host.tcg is not None and host.tcg > 1 * MiB  # TCG: the buffer is used
    assert 20 * MiB < host.guest_ram < 512 * MiB and host.other is not None and host.other > 5 * MiB
    assert host.guest_ram + host.tcg + host.other == host.rss  # nothing lost to the clamp here
    gaps = []
    for _ in range(10):  # the rollup walks page tables; VmRSS is counters: agree within a few pages
        rss = guest.host_memory().rss
        gaps.append(abs(rss - vm_rss(guest.pid)))
        await asyncio.sleep(0.05)
    assert statistics.median(gaps) < 2 * MiB, gaps
    costs = []
    for _ in range(200):  # what the sampler adds per sample: the host read and the virtio-mem columns
        start = time.perf_counter()
        guest.host_memory()
        guest.vmem_columns()
        costs.append(time.perf_counter() - start)
    cost_us = statistics.median(costs) * 1e6
    print(f"host view per sample: median {cost_us:.0f} us over {len(costs)}")
    assert cost_us < 5000
    async with Sampler() as sampler:
        await sampler.add(guest)
        deadline = time.monotonic() + 20
        while True:
            frame = sampler.frame()
            if len(frame) >= 3 and frame["host_guest_ram"].notna().sum() >= 3:
                break
            assert time.monotonic() < deadline, frame
            await asyncio.sleep(0.2)
    rows = frame[frame["host_guest_ram"].notna()]
    assert set(HOST_COLUMNS) <= set(frame.columns) and set(VMEM_COLUMNS) <= set(frame.columns)
    assert (rows["host_ram_size"] == 512 * MiB).all() and (rows["host_tcg"] > 0).all()
    assert (rows["host_guest_ram"] + rows["host_tcg"] + rows["host_other"] == rows["host_rss"]).all()
    assert (rows["host_pss"] <= rows["host_rss"]).all() and (rows["host_swap"] >= 0).all()
    assert ((rows["host_rss"] - rows["rss"]).abs() < 16 * MiB).all()  # rss: /proc/PID/stat, read just before
    assert frame[list(VMEM_COLUMNS)].isna().all().all()  # no virtio-mem device: NA, not 0


async def touch(guest: Guest) -> tuple[int, int]:
    """Guest RAM resident on the host before and after the agent touches :data:`TOUCH` more.

    A first 64 MiB uses up what the guest freed during boot, still resident (its allocator
    hands those pages out first): then every new page the agent touches is a new host page."""
    await split_known(guest)
    await guest.workload.alloc(64 * MiB)
    before = guest.host_memory().guest_ram
    await guest.workload.alloc(TOUCH)
    return before, guest.host_memory().guest_ram


async def test_touched_guest_memory_stays_resident_after_a_free_without_free_page_reporting(guest):
    before, touched = await touch(guest)
    assert 0.9 * TOUCH <= touched - before <= TOUCH + 32 * MiB, (before, touched)
    await guest.workload.free()
    await asyncio.sleep(5)  # longer than free page reporting takes when it is on (see below)
    after = guest.host_memory().guest_ram
    assert after >= touched - 8 * MiB, (touched, after)  # nothing gave it back


async def test_free_page_reporting_gives_freed_guest_memory_back_within_seconds(spec):
    guest = await Guest.launch(spec(free_page_reporting=True))
    try:
        before, touched = await touch(guest)
        assert touched - before >= 0.9 * TOUCH, (before, touched)
        await guest.workload.free()
        freed_at = time.monotonic()
        trace = []
        while (elapsed := time.monotonic() - freed_at) < 12:
            trace.append((elapsed, touched - guest.host_memory().guest_ram))
            await asyncio.sleep(0.1)
        freed = touched - before + 64 * MiB  # free() let go of the warm-up's 64 MiB too
        returned = trace[-1][1]
        half = next(t for t, back in trace if back >= freed / 2)
        most = next(t for t, back in trace if back >= 0.9 * returned)
        print(f"free page reporting: {returned / MiB:.0f} MiB of {freed / MiB:.0f} MiB freed back in 12 s; "
              f"half after {half:.1f} s, 90 % of that after {most:.1f} s")
        assert returned >= 0.75 * freed and half < 8
    finally:
        await guest.shutdown()


async def test_virtio_mem_columns_follow_a_resize_and_the_bands_sum_on_the_frame(spec):
    guest = await Guest.launch(spec(memory="384M", virtio_mem=("256M", "128M")))
    try:
        async with Sampler() as sampler:
            await sampler.add(guest)

            async def rows_where(cond, timeout_s=30.0) -> pd.DataFrame:
                deadline = time.monotonic() + timeout_s
                while True:
                    frame = sampler.frame()
                    if len(frame) and cond(frame).fillna(False).any():
                        return frame
                    assert time.monotonic() < deadline, frame[list(VMEM_COLUMNS)].tail()
                    await asyncio.sleep(0.2)
            frame = await rows_where(lambda f: (f["vmem_size"] == 128 * MiB) & f["host_guest_ram"].notna())
            row = frame[frame["vmem_size"].notna()].iloc[-1]
            assert (row["vmem_requested"], row["vmem_max_size"]) == (128 * MiB, 256 * MiB)
            assert row["host_ram_size"] == 640 * MiB  # boot RAM and the device's backend
            asked = time.monotonic()
            await guest.virtio_mem.resize(256 * MiB, timeout_s=30)
            frame = await rows_where(lambda f: f["vmem_size"] == 256 * MiB)
            print(f"vmem_size 256 MiB in the frame {time.monotonic() - asked:.1f} s after the resize was asked")
            assert frame[frame["vmem_size"] == 256 * MiB]["vmem_requested"].eq(256 * MiB).all()
            # The guest's MemTotal comes with its report, vmem_size from the last read: a row
            # may have one before the other (one sample apart); wait for both, twice.
            frame = await rows_where(lambda f: (f["vmem_size"] == 256 * MiB) & (f["total_memory"] > 500 * MiB)
                                     & (f["vmem_size"].shift() == 256 * MiB) & (f["total_memory"].shift() > 500 * MiB))
        a = attribution(frame)
        a = a[frame["host_guest_ram"].notna().to_numpy() & frame["vmem_size"].notna().to_numpy()]
        assert len(a) >= 3
        resident = sum(a[name] for name in RESIDENT)
        assert (resident + a["resident_gap"] == a["host_rss"]).all()
        guest_bands = a["guest_used"] + a["guest_cache"] + a["guest_reserved"] + a["guest_free_resident"] \
            + a["guest_free_unbacked"]
        assert (guest_bands == a["memory"]).all()
        assert (guest_bands + a["ballooned"] + a["vmem_unplugged"] == a["ram_size"]).all()
        last = a.iloc[-1]
        assert last["vmem_unplugged"] == 0 and last["ballooned"] == 0  # all plugged, no balloon
        assert last["memory"] == 640 * MiB and last["vmem_requested"] == 256 * MiB
        # reserved: what MemTotal leaves out of the memory the guest has (105 MiB of this one's
        # 384 MiB boot RAM, before and after the plug alike); the gap: what the guest's numbers
        # cannot place in the resident guest RAM
        assert 32 * MiB < last["guest_reserved"] < 128 * MiB and abs(last["resident_gap"]) < 64 * MiB
        assert list(BANDS)[:2] == ["vmm_tcg", "vmm_other"] and (a["vmm_tcg"] > 0).all()
    finally:
        await guest.shutdown()


async def test_a_runs_pngs_include_the_attribution_plot(spec, tmp_path):
    exp = Experiment([spec(memory="384M", virtio_mem=("256M", "128M"))], duration_s=8,
                     balloon=Schedule.steps(["384M", "320M"], 4), workload=Schedule.steps([0, "64M"], 4,
                                                                                           kind="workload"),
                     run_root=tmp_path, flush_interval_s=1)
    run = await exp.run()
    png = attribution_plot_path(run.plot_path)
    assert png.name == "plot-attribution.png" and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000
    assert run.samples["host_guest_ram"].notna().sum() >= 3 and run.samples["vmem_size"].eq(128 * MiB).any()


async def test_a_libvirt_guest_has_the_split_through_qmp_passthrough_and_the_rollup_without(builtin_ready,
                                                                                          libvirt_domains):
    from balloonlab import builtin_spec
    from balloonlab.libvirt import LibvirtGuest
    spec = builtin_spec(libvirt_domains(), period_s=1)
    guest = await LibvirtGuest.launch(spec, agent=False, stats_via="qmp")
    plain = await LibvirtGuest.attach(spec.name, stats_via="libvirt")
    try:
        assert guest.pid is not None and plain.pid == guest.pid  # the QEMU pid libvirt reports
        host = await split_known(guest)
        assert host.ram_size == 512 * MiB and host.tcg > 0 and 0 < host.guest_ram < host.rss
        assert abs(host.rss - vm_rss(guest.pid)) < 4 * MiB
        rollup = plain.host_memory()  # no QMP: the rollup, never the split
        assert rollup is not None and rollup.rss > 50 * MiB
        await asyncio.sleep(1)
        assert plain.host_memory().guest_ram is None and plain.host_layout is None
        deadline = time.monotonic() + 10
        while not guest._vmem_seen >= 0:  # the devices asked for once: none
            guest.vmem_columns()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert guest.vmem_columns() == {} and plain.vmem_columns() == {}
    finally:
        await plain.close()
        await guest.shutdown()
