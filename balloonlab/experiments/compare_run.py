"""One mechanism's run of the comparison (:mod:`balloonlab.experiments.compare`): touch, free,
shrink, grow, re-touch on one guest, each step timed until the guest and the host agree."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pandas as pd

from balloonlab.model.balloon import TARGET_TOLERANCE
from balloonlab.model.procfs import ProcessStat
from balloonlab.qemu.guest import Guest
from balloonlab.record.sampler import Sampler

if TYPE_CHECKING:
    from balloonlab.experiments.compare import CompareSettings, Mechanism

Progress = Callable[[str], None]

__all__ = ["run_once"]


class _Rss:
    """QEMU's RSS from /proc/PID/stat (kept open), followed every ``rss_poll_s``."""

    def __init__(self, pid: int | None, s: CompareSettings) -> None:
        self.stat, self.pid, self.s = ProcessStat(), pid, s
        #: Every reading as (monotonic time, RSS, step): the run's footprint trace.
        self.trace: list[tuple[float, int, str]] = []
        self.step = "boot"

    def now(self) -> int:
        value = self.stat.rss_bytes(self.pid)
        if value is None:
            raise RuntimeError(f"QEMU (pid {self.pid}) is gone")
        self.trace.append((time.monotonic(), value, self.step))
        return value

    async def settle(self, since: float) -> tuple[int, float]:
        """(RSS, seconds from ``since`` until the window it stopped moving in began)."""
        window: list[tuple[float, int]] = []
        deadline = time.monotonic() + self.s.timeout_s
        while True:
            t, value = time.monotonic(), self.now()
            window.append((t, value))
            # Keep the newest reading at least stable_s old as the window's first: a window
            # cut at exactly stable_s could hold one poll interval less than stable_s whenever
            # the polls drift (50.5 ms apart, a 0.5 s window spans 0.45 s) and never close.
            while len(window) > 1 and window[1][0] <= t - self.s.stable_s:
                window.pop(0)
            values = [wv for _, wv in window]
            if t - window[0][0] >= self.s.stable_s and max(values) - min(values) <= self.s.stable_bytes:
                return value, max(0.0, window[0][0] - since)
            if t > deadline:
                return value, t - since
            await asyncio.sleep(self.s.rss_poll_s)

    async def watch_fall(self, since: float, start: int) -> tuple[int, float | None]:
        """Follow RSS for ``free_watch_s`` after ``since``: (bytes it fell below ``start`` at
        its lowest, seconds from ``since`` until it had fallen 90 % of that; None: it did not fall)."""
        series: list[tuple[float, int]] = []
        while (t := time.monotonic()) - since < self.s.free_watch_s:
            series.append((t, self.now()))
            await asyncio.sleep(self.s.rss_poll_s)
        fell = start - min(v for _, v in series)
        if fell <= self.s.stable_bytes:
            return max(0, fell), None
        return fell, next(t - since for t, v in series if start - v >= 0.9 * fell)


async def _until(read: Callable[[], Awaitable[int]], goal: int, tolerance: int,
                 s: CompareSettings) -> tuple[bool, float]:
    """Poll ``read()`` every ``guest_poll_s`` until it is within ``tolerance`` of ``goal``:
    (reached, seconds). Polled, not event-driven: QEMU sends BALLOON_CHANGE and
    MEMORY_DEVICE_SIZE_CHANGE at most once a second, which would round every move up to that."""
    started = time.monotonic()
    while abs(await read() - goal) > tolerance:
        if time.monotonic() - started > s.timeout_s:
            return False, time.monotonic() - started
        await asyncio.sleep(s.guest_poll_s)
    return True, time.monotonic() - started


async def _guest_counters(guest: Guest, period_s: int) -> dict[str, int | None]:
    """The guest's cumulative counters, from a report made after now."""
    after = time.time()
    record = await guest.balloon.read_stats()
    deadline = time.monotonic() + 3 * period_s + 5
    while record.last_update is None or record.last_update < int(after) + 1:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
        record = await guest.balloon.read_stats()
    return dict(record.stats)


def _delta(before: dict[str, int | None], after: dict[str, int | None], key: str) -> int | None:
    b, a = before.get(key), after.get(key)
    return None if a is None or b is None else a - b


class _Mover:
    """Shrinks and grows a guest by the mechanism's own means, timed by polling."""

    def __init__(self, guest: Guest, mech: Mechanism, s: CompareSettings) -> None:
        self.guest, self.mech, self.s = guest, mech, s
        self.device_id: str | None = None
        self.full = s.memory

    async def prepare(self) -> None:
        if self.mech.virtio_mem:
            device = await self.guest.virtio_mem.wait(timeout_s=self.s.timeout_s)  # plugged as it boots
            self.device_id, self.full = device.id, device.requested

    async def to(self, size: int) -> tuple[bool, float]:
        """Ask for ``size`` (the device's requested size, or the balloon's target) and time it."""
        if self.mech.virtio_mem:
            assert self.device_id is not None
            await self.guest.virtio_mem.resize(size, device=self.device_id, wait=False)
            device_id = self.device_id

            async def plugged() -> int:
                return (await self.guest.virtio_mem.device(device_id)).size
            return await _until(plugged, size, 0, self.s)
        await self.guest.balloon.set_target(size)
        return await _until(self.guest.balloon.query_actual, size, TARGET_TOLERANCE, self.s)


async def run_once(guest: Guest, mech: Mechanism, s: CompareSettings, sampler: Sampler,
                   say: Progress) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Put ``guest`` through one run (see :mod:`balloonlab.experiments.compare`): QEMU's RSS
    as it was read (``t_s`` from the first touch, ``rss`` bytes, ``step``), and the measures."""
    await guest.balloon.wait_for_stats(s.timeout_s)
    mover = _Mover(guest, mech, s)
    await mover.prepare()
    rss = _Rss(guest.pid, s)
    await rss.settle(time.monotonic())
    work = guest.workload

    async def touch() -> float:
        started = time.monotonic()
        await work.alloc(s.touch)
        return time.monotonic() - started

    def mark(detail: str) -> None:
        rss.step = detail
        rss.now()  # a reading as each step begins: the trace shows where steps start
        sampler.record_event(guest.name, "workload", None, f"compare: {detail}")

    mark("touch")
    touch_s = await touch()
    peak, _ = await rss.settle(time.monotonic())
    mark("free")
    freed_at = time.monotonic()
    await work.free()
    free_returned, free_return_s = await rss.watch_fall(freed_at, peak)
    after_free, _ = await rss.settle(time.monotonic())

    # The latest report will do for "before": the guest is idle since RSS settled.
    before = dict((await guest.balloon.read_stats()).stats)
    mark("shrink")
    shrink_from = rss.now()
    started = time.monotonic()
    reached, guest_s = await mover.to(mover.full - s.shrink)
    shrunk, shrink_s = await rss.settle(started)
    after = await _guest_counters(guest, s.period_s)

    mark("grow")
    started = time.monotonic()
    grown, grow_guest_s = await mover.to(mover.full)
    regrown, grow_s = await rss.settle(started)

    mark("re-touch")
    retouch_s = await touch()
    await work.free()
    retouch2_s = await touch()
    await work.free()
    mark("done")
    touched = next(t for t, _, step in rss.trace if step == "touch")
    trace = pd.DataFrame([(t - touched, value, step) for t, value, step in rss.trace if t >= touched],
                         columns=["t_s", "rss", "step"])
    return trace, {
        "touch_s": touch_s, "rss_peak_bytes": peak, "rss_after_free_bytes": after_free,
        "free_returned_bytes": free_returned, "free_return_s": free_return_s,
        "shrink_reached": reached, "shrink_guest_s": guest_s, "shrink_s": max(shrink_s, guest_s),
        "host_returned_bytes": shrink_from - shrunk, "rss_shrunk_bytes": shrunk,
        "shrink_minor_faults": _delta(before, after, "minor_faults"),
        "shrink_major_faults": _delta(before, after, "major_faults"),
        "shrink_alloc_stalls": _delta(before, after, "alloc_stalls"),
        "grow_reached": grown, "grow_guest_s": grow_guest_s, "grow_s": max(grow_s, grow_guest_s),
        "host_regrown_bytes": regrown - shrunk, "retouch_s": retouch_s, "retouch2_s": retouch2_s,
    }
