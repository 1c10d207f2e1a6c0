"""How far each host's clock is from this one's, learnt from the balloon's own reports.

A guest's ``last-update`` is QEMU's ``time(NULL)`` when the guest's report arrived: the wall
clock of the host QEMU runs on, in whole seconds. For a guest on another host, the age of its
numbers (the read's time minus last-update) mixes two clocks; a remote clock 90 s ahead makes
fresh numbers look 90 s in the future, one behind makes them look stale.

Every read that finds a new report bounds the offset (remote minus local), with no extra
channel to the host (it works over libvirt's TCP, TLS or SSH transports alike):

- the report came before the read returned (local ``received``), and QEMU stamped it with
  ``last_update <= remote time``: ``offset > last_update - received``;
- it came after the previous read of the same guest left (local ``previous_sent``: that read
  still found the older report), and the stamp is truncated: ``remote time < last_update + 1``,
  so ``offset < last_update + 1 - previous_sent``.

The bounds of the reports in a window are intersected. Under balloonlab's read timing
(record.report_clock brackets each report within a few tens of milliseconds) that leaves an
interval about a second wide, whole-second truncation being the main term: the estimate is
its middle, the uncertainty half its width, which is finer than last-update's own resolution.
Bounds that stop intersecting mean a clock stepped (NTP, a suspended host): the window starts
again from the newest report, and the caller records a ``clock`` event.
"""

from __future__ import annotations

import collections
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

Method = Literal["local", "reports"]


@dataclass(frozen=True)
class ClockEstimate:
    """A host's clock minus this host's, in seconds.

    :param offset_s: the estimate (the middle of the bounds).
    :param uncertainty_s: the most it can be off by while the offset holds still (half the
        bounds' width; 0 for this host). A drifting clock is followed through the window of
        reports, so during drift the estimate can lag by the drift over that window.
    :param method: ``local`` (the same clock) or ``reports`` (bounded by balloon reports).
    :param measured_at: this host's epoch seconds when the estimate was made.
    :param reports: how many reports' bounds it rests on.
    """

    offset_s: float
    uncertainty_s: float
    method: Method
    measured_at: float
    reports: int

    def as_dict(self) -> dict[str, Any]:
        """For run.json (rounded to the millisecond)."""
        out = asdict(self)
        for key in ("offset_s", "uncertainty_s", "measured_at"):
            out[key] = round(out[key], 3)
        return out


class HostClock:
    """The offset of one host's clock, bounded by the reports of all its guests.

    :param local: the host is this one (the offset is 0 and never learnt).
    :param window: reports whose bounds are intersected (older ones are forgotten, so a clock
        that drifts is followed).
    """

    def __init__(self, *, local: bool, window: int = 64) -> None:
        self.local = local
        self._lower: collections.deque[float] = collections.deque(maxlen=window)
        self._upper: collections.deque[float] = collections.deque(maxlen=window)
        self._estimate: ClockEstimate | None = None
        #: How many times the bounds stopped intersecting (the remote clock stepped).
        self.steps = 0

    def observe(self, last_update: int, *, received: float, previous_sent: float | None) -> bool:
        """Learn from one read that found a new report.

        :param last_update: the report's last-update (the remote host's epoch seconds).
        :param received: this host's epoch seconds when the read's answer came back.
        :param previous_sent: when the previous read of the same guest left (it found an older
            report); None for a guest's first read, which gives only a lower bound.
        :returns: True when the new bounds contradict the window's (the remote clock stepped,
            or this one did): the window then restarts from this report.
        """
        if self.local:
            return False
        lower = last_update - received
        upper = math.inf if previous_sent is None else last_update + 1 - previous_sent
        stepped = bool(self._lower) and (lower >= min(self._upper) or upper <= max(self._lower))
        if stepped:
            self.steps += 1
            self._lower.clear()
            self._upper.clear()
        self._lower.append(lower)
        self._upper.append(upper)
        self._estimate = None
        return stepped

    def estimate(self, now: float) -> ClockEstimate | None:
        """The offset now: exactly 0 for this host; for another, None until a report has
        bounded it from both sides."""
        if self.local:
            return ClockEstimate(0.0, 0.0, "local", now, 0)
        if self._estimate is None:
            if not self._upper:
                return None
            lower, upper = max(self._lower), min(self._upper)
            if math.isinf(upper):
                return None
            self._estimate = ClockEstimate((lower + upper) / 2, (upper - lower) / 2, "reports", now,
                                           len(self._lower))
        return self._estimate


def corrected_age(read_time: float, last_update: int | None, offset: ClockEstimate | None) -> float | None:
    """Seconds between the report and the read, on one clock: NA without a report or an offset.

    A report cannot be younger than 0 s; the offset's uncertainty can make the difference a
    little negative, which is clipped.
    """
    if last_update is None or offset is None:
        return None
    return max(0.0, read_time - (last_update - offset.offset_s))
