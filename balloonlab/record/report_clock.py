"""When to read a guest's balloon next, so every report is read once and few reads find nothing."""

from __future__ import annotations


class ReportClock:
    """When to read next, so that every report is read once and few reads find nothing.

    The guest reports once per period, but QEMU's last-update has whole-second resolution,
    so the report's phase is learnt from reads: it lies after the last read that found
    nothing new and no later than the first that did. The clock keeps that interval for the
    next report, shifted by a period each time; while it is wider than a retry step it reads
    in the middle (bisection, a few reads once), then just after its end. The interval's start
    creeps earlier by a few ms per period, so a guest clock running slightly fast can never
    leave the reads a whole period behind (a lost sample).
    """

    MARGIN_S = 0.010  # read this long after the latest possible report time
    CREEP_S = 0.002   # uncertainty added per period for clock drift

    def __init__(self) -> None:
        self.lo: float | None = None  # the next report comes after lo ...
        self.hi: float | None = None  # ... and no later than hi (None: unknown)
        self.prev_read: float | None = None
        self.misses = 0
        #: True right after the read that found the next report overdue (once per stall):
        #: the moment to ask whether the period changed behind the reader's back.
        self.became_overdue = False

    def next_delay(self, now: float, period: int, new: bool) -> float:
        """Seconds to sleep after a read at ``now`` (monotonic) that was ``new`` or not."""
        prev, self.prev_read = self.prev_read, now
        self.became_overdue = False
        if not period:
            self.lo = self.hi = None
            return 1.0  # polling is off: look again now and then (the period may change)
        step = max(0.02, period / 50)
        if new:
            self.misses = 0
            lo = max(x for x in (self.lo, prev, now - period) if x is not None)
            hi = now if self.hi is None else min(self.hi, now)
            if hi <= lo:  # the prediction was wrong (a pause, a jump): trust this read only
                lo, hi = (prev if prev is not None else now - period), now
            self.lo, self.hi = lo + period - self.CREEP_S, hi + period
        else:
            self.misses += 1
            if self.hi is not None and now < self.hi:
                self.lo = now  # still due: it comes after this read
            else:
                self.became_overdue = self.hi is not None
                self.lo, self.hi = now, None  # overdue: paused or stalled guest
                return min(float(period), step * (1 << min(self.misses, 10)))
        assert self.lo is not None and self.hi is not None
        target = self.hi + self.MARGIN_S if self.hi - self.lo <= step else (self.lo + self.hi) / 2
        return max(0.0, target - now)
