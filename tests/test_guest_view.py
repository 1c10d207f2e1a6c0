"""The guest's own view in the frames, and the warning for a balloon that never reports, on the
built-in guest (seconds to boot). The Debian guest's view through qemu-guest-agent is checked in
test_debian_guest.py (QMP) and test_debian_libvirt.py (through libvirt)."""

from __future__ import annotations

import asyncio
import time
import warnings

import pytest

from balloonlab import BalloonLabWarning, Guest, Sampler
from balloonlab.model.guest_view import read_agent_file, read_guest_view, view_columns
from balloonlab.model.schema import GUEST_VIEW_COLUMNS

pytestmark = pytest.mark.qemu
MiB = 1 << 20
MEMINFO = """MemTotal:        1003520 kB
MemFree:          797004 kB
MemAvailable:     745612 kB
Buffers:            3340 kB
Cached:            35932 kB
SwapCached:            0 kB
AnonPages:        104960 kB
Shmem:              2048 kB
SwapTotal:        262140 kB
SwapFree:         262140 kB
Committed_AS:     117012 kB
HugePages_Total:       0
"""


def test_meminfo_and_vmstat_become_guest_columns_in_bytes():
    columns = view_columns(MEMINFO, "nr_free_pages 199251\npswpin 7\npswpout 12\npgfault 100\noom_kill 1\n")
    assert columns["guest_mem_free"] == 797004 * 1024 and columns["guest_swap_total"] == 262140 * 1024
    assert columns["guest_committed_as"] == 117012 * 1024
    assert (columns["guest_pswpout"], columns["guest_oom_kill"]) == (12, 1)  # counters as the kernel counts
    assert set(columns) <= set(GUEST_VIEW_COLUMNS) and "guest_nr_free_pages" not in columns


async def test_files_are_read_through_any_agent_channel_and_closed():
    """The guest-file-* sequence over an ``execute`` (what QGA and libvirt's passthrough carry)."""
    import base64
    calls: list[tuple[str, object]] = []
    chunks = [MEMINFO.encode()[:100], MEMINFO.encode()[100:], b""]

    async def execute(command: str, arguments: dict | None = None):
        calls.append((command, arguments))
        if command == "guest-file-open":
            return 7
        if command == "guest-file-read":
            data = chunks.pop(0) if chunks else b""
            return {"buf-b64": base64.b64encode(data).decode(), "count": len(data), "eof": not data}
        return {}
    assert await read_agent_file(execute, "/proc/meminfo") == MEMINFO.encode()
    assert [c for c, _ in calls] == ["guest-file-open", "guest-file-read", "guest-file-read", "guest-file-read",
                                     "guest-file-close"]
    assert calls[-1] == ("guest-file-close", {"handle": 7})
    chunks.extend([MEMINFO.encode(), b"", b"pswpout 3\n", b""])
    view = await read_guest_view(execute)
    assert view.source == "qga" and view.columns["guest_mem_total"] == 1003520 * 1024
    assert view.columns["guest_pswpout"] == 3


async def test_the_built_in_guest_gives_its_view_through_its_own_agent(spec):
    async with await Guest.launch(spec(memory="256M")) as guest, Sampler(guest_view=True) as sampler:
        assert not guest.has_guest_agent and guest.has_agent
        await sampler.add(guest)
        await guest.balloon.wait_for_stats(30)
        deadline = time.monotonic() + 20
        while (rows := sampler.frame().dropna(subset=["guest_mem_free"])).shape[0] < 3:
            assert time.monotonic() < deadline, "no rows with the guest's view"
            await asyncio.sleep(0.3)
        assert (rows["guest_mem_total"] == rows["total_memory"]).all()
        assert ((rows["guest_mem_free"] - rows["free_memory"]).abs() < 2 * MiB).all()
        assert rows["guest_cached"].isna().all()  # the built-in agent reports five fields, the rest stays NA
        assert rows["guest_view_lag_s"].between(0, 1).all()
        assert sampler.states()[guest.name].view_error is None


async def test_a_balloon_that_never_reports_gets_one_warning_that_says_what_to_check(spec):
    async with await Guest.launch(spec(balloon_driver=False)) as guest:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            async with Sampler(stats_unset_warning_s=2.5) as sampler:
                await sampler.add(guest)
                await asyncio.sleep(5)  # the warning comes once, not once a poll
        ours = [w for w in caught if issubclass(w.category, BalloonLabWarning) and "no balloon statistics" in str(
            w.message)]
        assert len(ours) == 1
        message = str(ours[0].message)
        for hint in ("last-update is still 0", "virtio_balloon", "Windows", "blnsvr.exe", "the period is 1 s"):
            assert hint in message
        assert guest.warnings == [message]
        events = sampler.events()
        assert list(events[events["kind"] == "warning"]["detail"]) == [message]
        assert sampler.frame().empty  # and no made-up rows
