"""When to read a guest's balloon next, so every report is read once and few reads find nothing.

How QEMU times reports (hw/virtio/virtio-balloon.c): its stats timer asks the guest for a
report, and is re-armed for one period *when the guest's reply arrives*. So report k+1 comes
one period plus the guest's reply latency after report k: never earlier than a period after
it, and later by a small, mostly steady latency (milliseconds under TCG). last-update has
whole-second resolution, so the phase is learnt from reads: a report came after the last read
that found nothing new and no later than the first that did.

:class:`ReportClock` keeps bounds for the next report: ``lo`` moves by exactly one period per
report (QEMU's guarantee), ``hi`` by a period plus the learnt latency, and ``likely_lo`` by a
period plus the latency less its spread. It reads just after ``hi``; while ``(likely_lo, hi]``
is wider than a tenth of a period it reads in its middle instead (bisection: a few reads when
sampling starts, one now and then later), and it also bisects ``(lo, hi]`` once that is half a
period wide, so a latency learnt too high can never make the reads lag a whole period behind
(a lost report). A read that finds nothing after ``hi`` (the guest replied later than
learnt) is retried a margin later; such a miss-then-hit pins the report down to the margin,
and pins at least :attr:`ReportClock.MIN_PIN_SPAN` reports apart are what the latency is
learnt from. tests/test_report_clock.py plays this against a model of QEMU's timer: no
report lost, about 1-2 % of reads find nothing.

After a read that found a new report, :attr:`ReportClock.report_time` is the clock's best
estimate of when that report came, which a read that came late (a busy event loop, a stalled
host, a probe in the middle of a wide interval) would otherwise blur: the middle of
``(previous read, this read]`` after a read that found nothing, else the time the report was
expected when the read came after it. Samples are stamped with it, so rates over them follow
the guest, not the reader's timing.
"""

from __future__ import annotations


class ReportClock:
    """When to read next, so that every report is read once and few reads find nothing."""

    #: Read this long (or 1.5 % of the period, if more) after the latest expected report time.
    MARGIN_S = 0.015
    #: Weight of a new latency measurement in the learnt mean.
    LATENCY_WEIGHT = 0.3
    #: Reports between two pins for their difference to count as a latency measurement.
    MIN_PIN_SPAN = 8
    #: Uncertainty added per period beyond the latency's learnt spread.
    CREEP_S = 0.0005

    def __init__(self) -> None:
        self.period: int | None = None
        self.lo: float | None = None  # the next report comes after lo ...
        self.hi: float | None = None  # ... and (expected) no later than hi (None: unknown)
        self.likely_lo: float | None = None  # ... most likely after likely_lo
        #: Learnt mean lateness of a report beyond one period after the previous one (s), and
        #: how much it varies (mean absolute deviation).
        self.latency = 0.0
        self.spread = 0.0
        self.prev_read: float | None = None
        self._prev_new = True
        self._pin: tuple[float, int] | None = None  # (report time, reports since) of the last pin
        self._measurements = 0
        self.misses = 0
        #: True right after the read that found the next report well overdue (once per stall):
        #: the moment to ask whether the period changed behind the reader's back.
        self.became_overdue = False
        self._stall_reported = False
        #: After a read that found a new report: when that report most likely came (same clock
        #: as ``now``); None before the first.
        self.report_time: float | None = None

    def next_delay(self, now: float, period: int, new: bool) -> float:
        """Seconds to sleep after a read at ``now`` (monotonic) that was ``new`` or not."""
        prev, prev_new = self.prev_read, self._prev_new
        self.prev_read, self._prev_new = now, new
        self.became_overdue = False
        if not period:
            self.period = self.lo = self.hi = self.likely_lo = None
            return 1.0  # polling is off: look again now and then (the period may change)
        if period != self.period:  # QEMU restarted its timer: the phase is unknown again
            self.period, self.lo, self.hi, self.likely_lo, self._pin = period, None, None, None, None
            self.latency = self.spread = 0.0
            self._measurements = 0
        wide = max(0.05, period / 10)  # bisect while the interval is wider than this
        step = max(0.02, period / 50)
        margin = max(self.MARGIN_S, period * 0.015)
        if new:
            self.misses, self._stall_reported = 0, False
            expected = self.hi
            # The report came after the previous read (which saw an older one, or nothing)
            # and by now; within the last period, as reports come one a period.
            lo = max(x for x in (self.lo, prev, now - period) if x is not None)
            hi = now if self.hi is None else min(self.hi, now)
            likely = lo if self.likely_lo is None else max(lo, self.likely_lo)
            if not prev_new and prev is not None:
                self.report_time = (lo + now) / 2  # between the read that found nothing and this one
            elif expected is not None and lo < expected < now:
                self.report_time = expected  # this read came after the report was due
            else:
                self.report_time = now
            if hi <= lo:  # the prediction was wrong (a pause, a jump): trust this read only
                lo, hi = (prev if prev is not None else now - period), now
                likely = lo
                self.report_time = now
            if not prev_new and prev is not None and now - prev <= 2 * margin:
                self._learn((prev + now) / 2, period)  # a miss, then this hit: pinned down
            elif self._pin is not None:
                self._pin = (self._pin[0], self._pin[1] + 1)
            # lo moves by one period: QEMU's guarantee. hi moves by the mean latency more, and
            # likely_lo by the latency less its spread: between them the report is likely, so
            # probing is needed only as fast as the latency is uncertain.
            self.lo = lo + period
            self.likely_lo = min(hi, likely) + period + max(0.0, self.latency - self.spread - self.CREEP_S)
            self.hi = hi + period + self.latency
        else:
            self.misses += 1
            if self.hi is not None and now < self.hi:
                self.lo = now  # still due: it comes after this read
                self.likely_lo = max(now, self.likely_lo or now)
            else:
                # Later than expected: retry soon, backing off; a stall of a quarter period
                # or more is worth asking whether the period changed.
                overdue_by = now - self.hi if self.hi is not None else 0.0
                if self.hi is not None and overdue_by >= max(period / 4, 3 * step) and not self._stall_reported:
                    self.became_overdue = self._stall_reported = True
                self.lo = self.likely_lo = now
                # Backing off to a quarter period at most: a guest paused or stalled for long
                # is then read within a quarter period of its first report after it (a fresh
                # row, age_s under a period and a quarter) for about 4 cheap reads a period.
                cap = max(margin, period / 4)
                return min(cap, margin * (1 << max(0, min(self.misses - 2, 10))))
        assert self.lo is not None and self.hi is not None
        # Probe (read in the middle) when the likely interval is wide, or the sure one is
        # (the latency learnt too high would otherwise let the reads lag ever later).
        likely_lo = max(self.lo, self.likely_lo if self.likely_lo is not None else self.lo)
        if self.hi - likely_lo > wide:
            target = (likely_lo + self.hi) / 2
        elif self.hi - self.lo > period / 2:
            target = (self.lo + self.hi) / 2
        else:
            target = self.hi + margin
        return max(0.0, target - now)

    def _learn(self, report: float, period: int) -> None:
        """A report pinned at ``report``: the mean lateness per period since the last pin."""
        if self._pin is not None:
            since, reports = self._pin
            n = reports + 1
            if n < self.MIN_PIN_SPAN:  # keep the older pin: over a short span the pins' own
                self._pin = (since, n)  # width would dominate the measurement
                return
            measured = min(max(0.0, ((report - since) - n * period) / n), period / 50)
            self._measurements += 1
            weight = max(self.LATENCY_WEIGHT, 1 / self._measurements)  # a plain mean at first
            if self._measurements > 1:
                self.spread += weight * (abs(measured - self.latency) - self.spread)
            self.latency += weight * (measured - self.latency)
        self._pin = (report, 0)
