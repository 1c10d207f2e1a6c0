"""The guest's virtio balloon: polling period, statistics, target size and events.

A :class:`Balloon` sits on one :class:`~balloonlab.monitor.Monitor` connection. It finds the
device once per connection (:mod:`balloonlab.discovery`), validates a polling period before
QEMU sees it, reads ``guest-stats`` into :class:`~balloonlab.stats.BalloonStats` (marking new
samples and guest resets), moves the balloon target and follows ``BALLOON_CHANGE`` events.
The launch / attach / reconnect rules for the period live in :mod:`balloonlab.guest`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .discovery import POLLING_PROPERTY, Method, find_balloon
from .errors import StatsUnavailable
from .monitor import Monitor, QMPEvent
from .stats import COUNTERS, BalloonStats, parse_guest_stats
from .units import format_size, parse_size

if TYPE_CHECKING:
    from .domain import MemballoonSpec

#: The polling interval is a uint32 in QEMU.
MAX_PERIOD_S = 2**32 - 1
#: A balloon target is reached when within this much (the guest works in 4 KiB pages, and
#: QEMU rounds the target to pages of its own).
TARGET_TOLERANCE = 1 << 20


def validate_period(seconds: object) -> int:
    """Check a polling period the way QEMU will, but before it does, with a clearer message.

    :raises TypeError: not an int (``True``, ``1.5`` and ``"5"`` are refused, as QEMU does).
    :raises ValueError: outside 0..2^32-1.
    """
    if type(seconds) is not int:
        raise TypeError(f"stats period must be an int number of seconds (0 disables polling), "
                        f"got {seconds!r} ({type(seconds).__name__})")
    if not 0 <= seconds <= MAX_PERIOD_S:
        raise ValueError(f"stats period must be between 0 (disable) and {MAX_PERIOD_S} seconds, "
                         f"got {seconds}")
    return seconds


@dataclass(frozen=True)
class BalloonChange:
    """A ``BALLOON_CHANGE`` event: the guest moved ``actual`` (bytes) at ``time`` (epoch s)."""

    time: float
    actual: int


@dataclass(frozen=True)
class SettleResult:
    """How a balloon move went (:meth:`Balloon.wait_for_actual`).

    :param reached: ``actual`` got within tolerance of ``target``.
    :param stalled: it stopped moving short of the target for ``settle_s``.
    """

    target: int
    start_actual: int
    final_actual: int
    elapsed_s: float
    reached: bool
    stalled: bool

    @property
    def moved_bytes(self) -> int:
        """Bytes ``actual`` moved (positive: the guest got memory back)."""
        return self.final_actual - self.start_actual

    @property
    def rate_bytes_per_s(self) -> float | None:
        """Average speed of the move, bytes per second."""
        return abs(self.moved_bytes) / self.elapsed_s if self.elapsed_s > 0 else None


class Balloon:
    """The balloon device of one guest, over one monitor connection.

    :param monitor: the guest's QMP connection (discovery is cached on it).
    :param spec: the domain XML's ``<memballoon>``, when known (picks the QOM type).
    :param max_bytes: the guest's memory size (``<memory>``), the highest target.
    """

    def __init__(self, monitor: Monitor, spec: MemballoonSpec | None = None, *,
                 max_bytes: int | None = None) -> None:
        self.monitor = monitor
        self.spec = spec
        self.max_bytes = max_bytes
        #: The last target balloonlab set (bytes), None until set.
        self.target: int | None = None
        #: ``actual`` as last seen in a query or BALLOON_CHANGE event.
        self.actual: int | None = None
        #: The polling period as last read or set (seconds), None until known.
        self.period_s: int | None = None
        self.changes: collections.deque[BalloonChange] = collections.deque(maxlen=4096)
        self._change_waiters: list[asyncio.Event] = []
        self._listeners: list[Callable[[BalloonChange], None]] = []
        self._setting_listeners: list[Callable[[str, int], None]] = []
        self._last_update: int | None = None
        self._last_stats: dict[str, int | None] = {}
        self._last_counters: dict[str, int] = {}
        self._reset_pending = False
        monitor.add_event_handler(self._on_event)

    # -- discovery and period -------------------------------------------------------------
    async def path(self, method: Method = "auto") -> str:
        """The device's QOM path (cached per connection; see :mod:`balloonlab.discovery`).

        :raises BalloonNotFound: no balloon device (the failure is cached too).
        """
        return await find_balloon(self.monitor, self.spec, method=method)

    async def get_period(self) -> int:
        """The live statistics polling period in seconds (0: polling off)."""
        self.period_s = int(await self.monitor.execute(
            "qom-get", {"path": await self.path(), "property": POLLING_PROPERTY}))
        return self.period_s

    async def set_period(self, seconds: int) -> None:
        """Set the statistics polling period (0 disables; the first enable polls at once).

        :raises TypeError, ValueError: for a value QEMU would refuse (checked first).
        :raises CommandError: QEMU refused anyway (its message is kept).
        """
        validate_period(seconds)
        await self.monitor.execute("qom-set", {"path": await self.path(),
                                               "property": POLLING_PROPERTY, "value": seconds})
        self.period_s = seconds
        self._notify_setting("period", seconds)

    # -- stats ----------------------------------------------------------------------------
    async def query_actual(self) -> int:
        """``query-balloon``: the guest's memory after ballooning, in bytes."""
        reply = await self.monitor.execute("query-balloon")
        self.actual = int(reply["actual"])
        return self.actual

    async def read_stats(self, *, query_actual: bool = True) -> BalloonStats:
        """Read ``guest-stats`` (+ ``query-balloon``) into a record.

        ``new`` says whether the guest reported since the previous read on this object;
        ``reset`` marks the first sample after a guest reset (RESET event, last-update back
        to 0, or a cumulative counter going backwards), so counters are not read as a jump.
        Never raises :class:`StatsUnavailable`: a guest that never reported gives
        ``last_update=None`` (see :meth:`wait_for_stats`).

        :param query_actual: also send ``query-balloon``; without it ``actual`` is the value
            tracked from BALLOON_CHANGE events (one QMP command per sample instead of two).
        """
        reply = await self.monitor.execute("qom-get", {"path": await self.path(),
                                                       "property": "guest-stats"})
        actual = await self.query_actual() if query_actual else self.actual
        record = parse_guest_stats(reply, actual=actual)
        return self._classify(record)

    def _classify(self, record: BalloonStats) -> BalloonStats:
        lu = record.last_update
        if lu is None:
            if self._last_update is not None:
                self._reset_pending = True  # QEMU >= 8 zeroes the stats on guest reset
            self._last_update = None
            return record
        # last-update has whole-second resolution: two reports within one second differ only
        # in their values.
        new = lu != self._last_update or record.stats != self._last_stats
        self._last_stats = record.stats
        reset = False
        if new:
            counters = {k: v for k, v in record.stats.items() if k in COUNTERS and v is not None}
            went_back = any(v < self._last_counters.get(k, 0) for k, v in counters.items())
            reset = self._reset_pending or went_back
            self._reset_pending = False
            self._last_counters = counters
            self._last_update = lu
        return BalloonStats(record.read_time, lu, record.stats, record.actual, new, reset)

    async def wait_for_stats(self, timeout_s: float = 30.0, *, poll_s: float = 0.2) -> BalloonStats:
        """Wait until the guest has reported statistics at least once.

        :raises StatsUnavailable: it never answered (no virtio_balloon driver in the guest,
            polling off, or the guest paused); the message says which applies.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            record = await self.read_stats()
            if record.available:
                return record
            if time.monotonic() >= deadline:
                period = await self.get_period()
                status = (await self.monitor.execute("query-status")).get("status")
                why = ("polling is off (period 0)" if period == 0 else
                       f"the guest is not running (status {status})" if status != "running" else
                       "the guest never answered: is the virtio_balloon driver loaded?")
                raise StatsUnavailable(f"no balloon statistics after {timeout_s} s: {why}", 0)
            await asyncio.sleep(poll_s)

    # -- target and events ----------------------------------------------------------------
    async def set_target(self, size: int | str, *,
                         above_max: Literal["refuse", "clamp"] = "refuse") -> int:
        """Ask the guest to shrink or grow to ``size`` (bytes or a string like ``"256M"``).

        :param above_max: a target above the guest's memory is refused (ValueError) or
            clamped to it (QEMU itself clamps silently).
        :returns: the target sent to QEMU, in bytes.
        :raises ValueError: size <= 0, malformed, or above the guest's memory with "refuse".
        """
        target = parse_size(size)
        if target <= 0:
            raise ValueError(f"balloon target must be above 0 bytes, got {size!r}")
        limit = self.max_bytes
        if limit is not None and target > limit:
            if above_max == "refuse":
                raise ValueError(
                    f"balloon target {format_size(target)} is above the guest's memory "
                    f"{format_size(limit)}; pick a smaller target or pass above_max='clamp'")
            target = limit
        await self.path()  # a guest without a balloon says so here, not as DeviceNotActive
        await self.monitor.execute("balloon", {"value": target})
        self.target = target
        self._notify_setting("target", target)
        return target

    def add_listener(self, listener: Callable[[BalloonChange], None]) -> None:
        """Call ``listener(change)`` on every BALLOON_CHANGE event."""
        self._listeners.append(listener)

    def add_setting_listener(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(kind, value)`` when balloonlab sets the ``"target"`` or ``"period"``."""
        self._setting_listeners.append(listener)

    def _notify_setting(self, kind: str, value: int) -> None:
        for listener in list(self._setting_listeners):
            listener(kind, value)

    def _on_event(self, event: QMPEvent) -> None:
        if event.name == "BALLOON_CHANGE":
            change = BalloonChange(event.time, int(event.data["actual"]))
            self.actual = change.actual
            self.changes.append(change)
            for waiter in self._change_waiters:
                waiter.set()
            for listener in list(self._listeners):
                listener(change)
        elif event.name == "RESET":
            self._reset_pending = True

    async def wait_for_actual(self, target: int | str | None = None, *, timeout_s: float = 60.0,
                              settle_s: float = 5.0, tolerance: int = TARGET_TOLERANCE) -> SettleResult:
        """Wait until ``actual`` reaches the target, or stops moving for ``settle_s``.

        Follows BALLOON_CHANGE events (QEMU rate-limits them) and confirms with
        ``query-balloon`` when the events go quiet.

        :param target: bytes or size string; defaults to the last target set.
        """
        goal = parse_size(target) if target is not None else self.target
        if goal is None:
            raise ValueError("no target given and none set yet: call set_target() first")
        start = time.monotonic()
        start_actual = last = await self.query_actual()
        last_move = start
        wake = asyncio.Event()
        self._change_waiters.append(wake)
        try:
            while True:
                if abs(last - goal) <= tolerance:
                    return SettleResult(goal, start_actual, last, time.monotonic() - start, True, False)
                now = time.monotonic()
                if now - last_move >= settle_s or now - start >= timeout_s:
                    return SettleResult(goal, start_actual, last, now - start, False,
                                        now - last_move >= settle_s)
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(1.0, settle_s)):
                        await wake.wait()
                current = await self.query_actual()
                if current != last:
                    last, last_move = current, time.monotonic()
        finally:
            self._change_waiters.remove(wake)
