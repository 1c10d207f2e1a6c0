"""Deciding, for one reader, whether a read holds a new report and whether the guest reset.

Reading the balloon is pure: a read returns the guest's last report and changes nothing that
another reader sees. What is "new" depends on who asks (a sampler that read a second ago, a
notebook that last looked a minute ago), so each consumer keeps its own
:class:`StatsClassifier`. A reset is seen three ways: QEMU sent a RESET event since this
consumer's last read (the record's ``resets`` count moved), last-update went back to 0
(QEMU >= 9.2 zeroes the stats on a guest reset; 7.2 keeps the last report), or a cumulative
counter went backwards. The sample marked is the first report made after the reset: a report
the guest made just before it (QEMU 7.2 keeps it readable, and a reader may see the RESET
event before it reads that report) is not, by its last-update against the event's time.
"""

from __future__ import annotations

from balloonlab.model.schema import COUNTERS
from balloonlab.model.stats import BalloonStats


class StatsClassifier:
    """One consumer's view of a balloon's reports: which reads are new, which follow a reset."""

    def __init__(self) -> None:
        self._last_update: int | None = None
        self._last_stats: dict[str, int | None] = {}
        self._last_counters: dict[str, int] = {}
        self._resets: int | None = None
        self._reset_pending = False
        self._reset_time: float | None = None

    def classify(self, record: BalloonStats) -> BalloonStats:
        """``record`` with ``new`` and ``reset`` set for this consumer (the input is unchanged)."""
        if self._resets is not None and record.resets != self._resets:
            self._reset_pending = True
            self._reset_time = record.reset_time
        self._resets = record.resets
        lu = record.last_update
        if lu is None:
            if self._last_update is not None:
                self._reset_pending = True  # QEMU >= 9.2 zeroes the stats on guest reset
            self._last_update = None
            return _with(record, False, False)
        # last-update has whole-second resolution: two reports within one second differ only
        # in their values.
        new = lu != self._last_update or record.stats != self._last_stats
        self._last_stats = record.stats
        reset = False
        if new:
            last = self._last_counters
            counters = {k: v for k, v in record.stats.items() if v is not None and k in COUNTERS}
            went_back = any(v < last.get(k, 0) for k, v in counters.items())
            # last-update is whole seconds, truncated: a report in the reset's own second counts
            # as made before it (a guest cannot reboot and report within a second), and one
            # with counters gone back is a reset whatever its time says.
            after = self._reset_time is None or lu >= self._reset_time
            reset = went_back or self._reset_pending and after
            if reset:
                self._reset_pending = False
            self._last_counters = counters
            self._last_update = lu
        return _with(record, new, reset)


def _with(record: BalloonStats, new: bool, reset: bool) -> BalloonStats:
    """``record`` with ``new`` and ``reset`` set (the constructor: dataclasses.replace costs
    several times more, and this runs once per sample)."""
    return BalloonStats(record.read_time, record.last_update, record.stats, record.actual, new, reset,
                        record.resets, record.reset_time)
