"""Workloads beyond anonymous memory in the built-in guest, against real QEMU under TCG.

The page cache: a scratch disk (``builtin_spec(scratch_disk=...)``) written and read through
the guest's page cache fills the balloon's ``disk_caches`` stat. The working set: the same
pages re-touched pass after pass, also while the balloon inflates, and counted by
``retouch_cost``. Plus the scratch disk's file: sparse, checked, and never left behind.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from balloonlab import AgentError, Guest, Sampler
from balloonlab.analysis import retouch_cost
from balloonlab.image import make_scratch_disk

MiB = 1 << 20


async def fresh_stats(guest, after: float, timeout_s: float = 15.0):
    """The first balloon report taken after ``after`` (epoch s; last-update counts whole seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = await guest.balloon.read_stats()
        if stats.last_update is not None and stats.last_update > after:
            return stats
        await asyncio.sleep(0.2)
    raise AssertionError(f"no guest-stats sample within {timeout_s} s")


async def test_page_cache_beyond_free_memory_fills_disk_caches(spec, tmp_path):
    disk = tmp_path / "scratch.raw"
    try:
        async with await Guest.launch(spec(memory="192M", scratch_disk="1G", scratch_path=disk)) as guest:
            assert os.stat(disk).st_blocks == 0  # sparse until the guest writes
            changes = []
            guest.workload.add_listener(changes.append)
            await guest.balloon.wait_for_stats(30)
            before = await fresh_stats(guest, time.time())
            free = before["free_memory"]
            size = 192 * MiB  # half as much again as the guest has free
            assert size > 1.4 * free
            durations = await guest.workload.page_cache(size, reads=2)
            after = await fresh_stats(guest, time.time())
            rise = after["disk_caches"] - before["disk_caches"]
            # The cache took (nearly) all the free memory: most of what was read stays cached.
            assert rise > 0.8 * free and rise > 0.5 * size, (before, after)
            assert after["free_memory"] < 0.2 * free
            assert after["available_memory"] > 0.8 * before["available_memory"]  # and it is reclaimable
            assert [c.detail for c in changes] == ["write 192 MiB", "read 192 MiB", "read 192 MiB"]
            assert [c.duration_s for c in changes] == durations and all(d > 0 for d in durations)
            assert all(c.held == 0 for c in changes) and guest.workload.held == 0
            assert os.stat(disk).st_blocks * 512 >= size  # the write reached the host's file
            with pytest.raises(AgentError, match="do not fit on the scratch disk"):
                await guest.workload.page_cache("2G")
    finally:
        disk.unlink(missing_ok=True)


async def test_working_set_passes_retouch_the_same_pages_while_the_balloon_inflates(spec):
    async with await Guest.launch(spec(memory="256M")) as guest, Sampler() as sampler:
        with pytest.raises(AgentError, match="no scratch disk"):
            await guest.workload.page_cache("32M")
        await sampler.add(guest)
        await guest.balloon.wait_for_stats(30)
        assert await guest.workload.working_set("64M", passes=0) == []  # allocates only
        assert guest.workload.held == 64 * MiB
        await guest.balloon.set_target("192M")  # inflate by 64 MiB, while the set is re-touched
        inflating = await guest.workload.working_set("64M", passes=4)
        await guest.balloon.wait_for_actual(timeout_s=20)
        await guest.balloon.set_target("256M")  # deflate: the next pass re-touches after it
        await guest.balloon.wait_for_actual(timeout_s=20)
        after_deflate = await guest.workload.working_set(64 * MiB, pause_s=0.1, passes=2)
        assert guest.workload.held == 64 * MiB  # the same set: nothing allocated again
        listed = await guest.workload._request("list")
        assert sum(int(item.split(":")[1]) for item in listed.split(",")) == 64 * MiB
        with pytest.raises(ValueError, match="free"):
            await guest.workload.working_set("96M")
        events = sampler.events()
    assert len(inflating) == 4 and len(after_deflate) == 2 and all(d > 0 for d in inflating + after_deflate)
    work = events[events["kind"] == "workload"]
    assert work["detail"].tolist() == ["alloc 64 MiB"] + ["touch 64 MiB"] * 6
    cost = retouch_cost(events)
    touches = cost[cost["detail"] == "touch 64 MiB"]
    assert touches["duration_s"].tolist() == pytest.approx(inflating + after_deflate)
    assert touches["after_deflate"].tolist() == [False] * 4 + [True] * 2
    assert (touches["alloc_bytes"] == 64 * MiB).all() and (touches["held_bytes"] == 64 * MiB).all()


async def test_working_set_is_freed_like_held_memory_and_topped_up_after_a_partial_free(spec):
    async with await Guest.launch(spec(memory="256M", period_s=None)) as guest:
        await guest.workload.working_set("48M", passes=1)
        assert guest.workload.held == 48 * MiB
        await guest.workload.free("16M")  # the set's newest chunk (16 MiB) goes
        assert guest.workload.held == 32 * MiB
        await guest.workload.working_set("48M", passes=1)  # topped up, then re-touched
        assert guest.workload.held == 48 * MiB
        assert await guest.workload.free() == 0
        await guest.workload.working_set("16M", passes=1)  # gone: a new size is a new set
        assert guest.workload.held == 16 * MiB
        with pytest.raises(ValueError, match="passes"):
            await guest.workload.working_set("16M", passes=-1)


def test_scratch_disk_files_are_sparse_checked_and_temporary_ones_go_at_exit(builtin_ready, spec, tmp_path):
    made = make_scratch_disk(tmp_path / "a.raw", "10M")
    assert made.stat().st_size == 10 * MiB and made.stat().st_blocks == 0
    with pytest.raises(FileExistsError):
        make_scratch_disk(made, "10M")  # never overwritten
    with pytest.raises(ValueError, match="exists but is not a raw file of 20971520 bytes"):
        spec(scratch_disk="20M", scratch_path=made)
    with pytest.raises(ValueError, match="give scratch_disk"):
        spec(scratch_path=made)
    reused = spec(scratch_disk="10M", scratch_path=made)
    assert [(d.source, d.format, d.bus, d.target) for d in reused.disks] == [(str(made), "raw", "virtio", "vda")]
    assert "<disk type=\"file\" device=\"disk\">" in reused.xml or "<disk type='file' device='disk'>" in reused.xml
    made.unlink()
    # Without a path: a file in the temp dir, removed when the process that made it exits.
    code = ("from balloonlab import builtin_spec; import os; s = builtin_spec('t', scratch_disk='1G'); "
            "p = s.disks[0].source; print(p, os.path.getsize(p), os.stat(p).st_blocks)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    path, size, blocks = out.stdout.split()
    assert int(size) == 1 << 30 and int(blocks) == 0
    assert not os.path.exists(path)
