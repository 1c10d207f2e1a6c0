"""What every backend's balloon does the same way: validation, event tracking, waiting.

:class:`BalloonBase` holds the logic that does not depend on how QEMU is reached: the target
and period checks, ``BALLOON_CHANGE`` and RESET bookkeeping, listeners, classification per
reader, :meth:`~BalloonBase.wait_for_stats` and :meth:`~BalloonBase.wait_for_actual`. A
backend implements the primitives marked abstract (QMP in :mod:`balloonlab.qemu.balloon`,
libvirt-python in :mod:`balloonlab.libvirt.balloon`) and feeds events in through
:meth:`~BalloonBase._balloon_changed` and :meth:`~BalloonBase._guest_reset`.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from balloonlab.model.classify import StatsClassifier
from balloonlab.model.deadline import wait_until
from balloonlab.model.errors import StatsUnavailable
from balloonlab.model.period import QEMU_MAX_PERIOD_S, validate_period
from balloonlab.model.stats import BalloonStats
from balloonlab.model.units import format_size, parse_size

#: A balloon target is reached when within this much (the guest works in 4 KiB pages, and
#: QEMU rounds the target to pages of its own).
TARGET_TOLERANCE = 1 << 20
#: The smallest target that can be meant: one guest page. ``set_target(256)`` is 256 bytes.
MIN_TARGET_BYTES = 4096
Method = Literal["auto", "alias", "anon", "walk"]


@dataclass(frozen=True)
class BalloonChange:
    """A ``BALLOON_CHANGE`` event: the guest moved ``actual`` (bytes) at ``time`` (epoch s)."""

    time: float
    actual: int


@dataclass(frozen=True)
class SettleResult:
    """How a balloon move went (:meth:`BalloonBase.wait_for_actual`).

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


class BalloonBase(abc.ABC):
    """A guest's balloon, whatever reaches it.

    :param max_bytes: the guest's memory size (``<memory>``), the highest target.
    """

    #: The highest period this backend accepts (libvirt's is lower than QEMU's).
    period_limit_s = QEMU_MAX_PERIOD_S

    def __init__(self, *, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        #: The last target balloonlab set (bytes), None until set.
        self.target: int | None = None
        #: ``actual`` as last seen in a query or BALLOON_CHANGE event.
        self.actual: int | None = None
        #: The polling period as last read or set (seconds), None until known.
        self.period_s: int | None = None
        #: RESET events seen on this connection (readers compare counts; none consumes them).
        self.resets = 0
        #: Host time (epoch s) of the newest of them, as QEMU (or libvirt) stamped the event.
        self.last_reset_time: float | None = None
        self.changes: collections.deque[BalloonChange] = collections.deque(maxlen=4096)
        self._change_waiters: list[asyncio.Event] = []
        self._listeners: list[Callable[[BalloonChange], None]] = []
        self._setting_listeners: list[Callable[[str, int], None]] = []
        self._classifier = StatsClassifier()  # the interactive reader's (read_stats() default)

    # -- what a backend implements --------------------------------------------------------
    @abc.abstractmethod
    async def path(self, method: Method = "auto") -> str:
        """The device's QOM path.

        :raises BalloonNotFound: the guest has no balloon.
        """

    @abc.abstractmethod
    async def get_period(self) -> int:
        """The live statistics polling period in seconds (0: polling off)."""

    @abc.abstractmethod
    async def query_actual(self) -> int:
        """The guest's memory after ballooning, in bytes, asked of QEMU now."""

    @abc.abstractmethod
    async def read_report(self, *, query_actual: bool = True) -> BalloonStats:
        """The guest's last report, as it is: ``new`` and ``reset`` are False (see :meth:`read_stats`).

        :param query_actual: also ask for ``actual`` now; without it ``actual`` is the value
            tracked from BALLOON_CHANGE events.
        """

    @abc.abstractmethod
    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``...)."""

    @abc.abstractmethod
    async def _write_period(self, seconds: int) -> None:
        """Send a validated period."""

    @abc.abstractmethod
    async def _write_target(self, target: int) -> None:
        """Send a validated target in bytes."""

    # -- period ---------------------------------------------------------------------------
    async def set_period(self, seconds: int) -> None:
        """Set the statistics polling period (0 disables; the first enable polls at once).

        :raises TypeError, ValueError: for a value QEMU (or libvirt) would refuse, checked first.
        :raises CommandError: QEMU refused anyway (its message is kept).
        """
        validate_period(seconds, self.period_limit_s)
        await self._write_period(seconds)
        self.period_s = seconds
        self._notify_setting("period", seconds)

    # -- stats ----------------------------------------------------------------------------
    async def read_stats(self, *, query_actual: bool = True,
                         classifier: StatsClassifier | None = None) -> BalloonStats:
        """Read the guest's report and classify it for one reader.

        ``new`` says whether this reader has not seen the report yet; ``reset`` marks its first
        sample after a guest reset. Reading never changes what another reader sees: each one
        passes its own ``classifier`` (the default one belongs to interactive calls, e.g. a
        notebook). Never raises :class:`StatsUnavailable`: a guest that never reported gives
        ``last_update=None`` (see :meth:`wait_for_stats`).

        :param query_actual: also ask for ``actual`` (one more command per read).
        :param classifier: whose view decides ``new``/``reset``.
        """
        record = await self.read_report(query_actual=query_actual)
        return (classifier or self._classifier).classify(record)

    async def wait_for_stats(self, timeout_s: float = 30.0, *, poll_s: float = 0.2) -> BalloonStats:
        """Wait until the guest has reported statistics at least once.

        :raises StatsUnavailable: it never answered (no virtio_balloon driver in the guest,
            polling off, or the guest paused); the message says which applies.
        """
        record: BalloonStats | None = None

        async def reported() -> bool:
            nonlocal record
            record = await self.read_report()
            return record.reported
        if await wait_until(reported, timeout_s, poll_s=poll_s):
            assert record is not None
            return record
        period = await self.get_period()
        status = await self.status()
        why = ("polling is off (period 0)" if period == 0 else
               f"the guest is not running (status {status})" if status != "running" else
               "the guest never answered: is the virtio_balloon driver loaded?")
        raise StatsUnavailable(f"no balloon statistics after {timeout_s} s: {why}", 0)

    # -- target ---------------------------------------------------------------------------
    async def set_target(self, size: int | str, *,
                         above_max: Literal["refuse", "clamp"] = "refuse") -> int:
        """Ask the guest to shrink or grow to ``size`` (bytes or a string like ``"256M"``).

        :param above_max: a target above the guest's memory is refused (ValueError) or
            clamped to it (QEMU itself clamps silently).
        :returns: the target sent, in bytes.
        :raises ValueError: below one page (``256`` is 256 bytes: write ``"256M"``), malformed,
            or above the guest's memory with "refuse".
        """
        target = parse_size(size)
        if target < MIN_TARGET_BYTES:
            hint = f"; did you mean '{size}M'?" if type(size) is int and size > 0 else ""
            raise ValueError(f"balloon target {size!r} is {target} bytes, below one page "
                             f"({MIN_TARGET_BYTES} bytes): give a size with a unit, like '256M'{hint}")
        limit = self.max_bytes
        if limit is not None and target > limit:
            if above_max == "refuse":
                raise ValueError(
                    f"balloon target {format_size(target)} is above the guest's memory "
                    f"{format_size(limit)}; pick a smaller target or pass above_max='clamp'")
            target = limit
        await self._write_target(target)
        self.target = target
        self._notify_setting("target", target)
        return target

    async def wait_for_actual(self, target: int | str | None = None, *, timeout_s: float = 60.0,
                              settle_s: float = 5.0, tolerance: int = TARGET_TOLERANCE) -> SettleResult:
        """Wait until ``actual`` reaches the target, or stops moving for ``settle_s``.

        Follows BALLOON_CHANGE events (QEMU rate-limits them) and confirms with a query of
        ``actual`` when the events go quiet.

        :param target: bytes or size string; defaults to the last target set.
        :param tolerance: how close counts as reached, bytes.
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

    # -- listeners ------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[BalloonChange], None]) -> None:
        """Call ``listener(change)`` on every BALLOON_CHANGE event."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[BalloonChange], None]) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def add_setting_listener(self, listener: Callable[[str, int], None]) -> None:
        """Call ``listener(kind, value)`` when balloonlab sets the ``"target"`` or ``"period"``."""
        self._setting_listeners.append(listener)

    def remove_setting_listener(self, listener: Callable[[str, int], None]) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        with contextlib.suppress(ValueError):
            self._setting_listeners.remove(listener)

    # -- what a backend feeds in ----------------------------------------------------------
    def _balloon_changed(self, actual: int, at: float) -> None:
        """The backend saw a BALLOON_CHANGE (``actual`` bytes at epoch ``at``)."""
        change = BalloonChange(at, actual)
        self.actual = actual
        self.changes.append(change)
        for waiter in self._change_waiters:
            waiter.set()
        for listener in list(self._listeners):
            listener(change)

    def _guest_reset(self, at: float | None = None) -> None:
        """The backend saw the guest reset (QMP RESET, libvirt's reboot event) at host time ``at``."""
        self.resets += 1
        self.last_reset_time = at

    def _notify_setting(self, kind: str, value: int) -> None:
        for listener in list(self._setting_listeners):
            listener(kind, value)
