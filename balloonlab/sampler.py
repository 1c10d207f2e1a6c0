"""The sampler: balloon statistics, balloon size and events of many guests, into frames.

One asyncio task per guest reads ``guest-stats`` when a new sample is due and keeps only new
ones (last-update moved). ``actual`` is tracked from BALLOON_CHANGE events rather than polled,
so the steady state costs one QMP command per sample; reads are timed to the guest's period
(read just after the guest reports, back off when it has not) instead of a blind loop that
reads the same sample twice. A slow or dead guest only stalls its own task: a guest that dies
or disconnects is marked (event + state) and its rows stay. Rows go into columnar buffers
(:mod:`balloonlab.frames`) and, with a run folder, stream to Parquet every flush interval, so
memory stays bounded on day-long runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from .balloon import BalloonChange
from .errors import BalloonLabError, BalloonNotFound
from .frames import event_buffer, sample_buffer
from .stats import BalloonStats
from .store import RunWriter

log = logging.getLogger(__name__)


class SampledBalloon(Protocol):
    """What the sampler needs of a guest's balloon (QMP or libvirt backend)."""

    period_s: int | None
    target: int | None
    actual: int | None

    async def read_stats(self, *, query_actual: bool = True) -> BalloonStats: ...
    async def get_period(self) -> int: ...
    async def query_actual(self) -> int: ...
    def add_listener(self, listener: Callable[[BalloonChange], None]) -> None: ...
    def add_setting_listener(self, listener: Callable[[str, int], None]) -> None: ...


class SampledGuest(Protocol):
    """What the sampler needs of a guest (:class:`~balloonlab.guest.Guest`, ``LibvirtGuest``)."""

    name: str
    backend: str
    balloon: Any

    @property
    def alive(self) -> bool: ...
    def rss_bytes(self) -> int | None: ...
    async def metadata(self) -> dict[str, Any]: ...


@dataclass
class GuestState:
    """How sampling one guest is going."""

    name: str
    state: str = "starting"  # starting, sampling, dead, removed
    samples: int = 0
    polls: int = 0
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Sampler:
    """Record one or many guests into frames (async core; :class:`SyncSampler` blocks).

    :param run_dir: stream samples/events to this run folder (see :mod:`balloonlab.store`).
    :param flush_interval_s: how much a crash can lose at most.
    :param max_rows_in_memory: flushed rows beyond this are dropped from memory (they stay
        on disk: :func:`balloonlab.store.load_run`); without a run folder nothing is dropped.
    :param track_actual: ``"events"`` (default: one QMP command per sample) or ``"poll"``
        (also send query-balloon with each read).
    """

    def __init__(self, *, run_dir: str | Path | None = None, flush_interval_s: float = 5.0,
                 max_rows_in_memory: int = 1_000_000, track_actual: str = "events",
                 metadata: dict[str, Any] | None = None) -> None:
        if track_actual not in ("events", "poll"):
            raise ValueError(f"track_actual must be 'events' or 'poll', got {track_actual!r}")
        self._samples = sample_buffer()
        self._events = event_buffer()
        self._guests: dict[str, tuple[SampledGuest, GuestState]] = {}
        self._writer = RunWriter(run_dir) if run_dir is not None else None
        self._flushed = (0, 0)
        self._flush_task: asyncio.Task[None] | None = None
        self.flush_interval_s = flush_interval_s
        self.max_rows_in_memory = max_rows_in_memory
        self.track_actual = track_actual
        self.started: float | None = None
        self._metadata = dict(metadata or {})

    @property
    def run_dir(self) -> Path | None:
        """The run folder, when streaming to disk."""
        return self._writer.path if self._writer else None

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the flush task (guests can be added before or after)."""
        if self.started is not None:
            return
        self.started = time.time()
        if self._writer is not None:
            self._writer.write_metadata(status="running", start=_iso(self.started), guests={},
                                        **self._metadata)
            self._flush_task = asyncio.get_running_loop().create_task(self._flush_loop(), name="balloonlab-flush")
        for guest, state in self._guests.values():
            if state.task is None:
                self._start_task(guest, state)

    async def add(self, guest: SampledGuest) -> None:
        """Start sampling ``guest`` (while running or before :meth:`start`).

        :raises ValueError: a guest with this name is already being sampled.
        """
        if guest.name in self._guests and self._guests[guest.name][1].state in ("starting", "sampling"):
            raise ValueError(f"guest {guest.name!r} is already being sampled")
        state = GuestState(guest.name)
        self._guests[guest.name] = (guest, state)
        # Listeners cannot be unregistered from a guest's balloon or agent: each one checks that
        # its guest is still sampled under this state, so remove() (and a later add()) never
        # records an event twice or after the guest left the run.
        name = guest.name
        guest.balloon.add_listener(lambda change: self._listening(state) and self.record_event(
            name, "balloon_change", change.actual, at=change.time))
        guest.balloon.add_setting_listener(lambda kind, value: self._listening(state) and self.record_event(
            name, kind, value))
        if getattr(guest, "has_agent", False):
            guest.workload.add_listener(lambda change: self._listening(state) and self.record_event(
                name, "workload", change.held, change.detail, change.duration_s, change.time))
        if self._writer is not None:
            with contextlib.suppress(BalloonLabError):
                meta = await guest.metadata()
                self._writer.write_metadata(guests={**self._writer.metadata.get("guests", {}), guest.name: meta})
        if self.started is not None:
            self._start_task(guest, state)

    async def remove(self, name: str) -> None:
        """Stop sampling one guest (its rows stay)."""
        guest, state = self._guests[name]
        if state.task is not None:
            state.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.task
        if state.state != "dead":
            state.state = "removed"

    async def stop(self) -> None:
        """Stop every guest's task, flush, and close the run (run.json gets its end time)."""
        for name in list(self._guests):
            await self.remove(name)
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self._flush_task = None
        if self._writer is not None:
            self.flush()
            self._writer.write_metadata(status="finished", end=_iso(time.time()),
                                        samples=self._samples.total_rows, events=self._events.total_rows)

    async def __aenter__(self) -> Sampler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what was recorded ----------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        """Samples in memory as a DataFrame (see docs/design.md "Frames")."""
        return self._samples.frame(self._samples.dropped)

    def events(self) -> pd.DataFrame:
        """Events in memory as a DataFrame."""
        return self._events.frame(self._events.dropped)

    def states(self) -> dict[str, GuestState]:
        """Per guest: sampling / dead / removed, counts, last error."""
        return {name: state for name, (_, state) in self._guests.items()}

    def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "",
                     duration_s: float | None = None, at: float | None = None) -> None:
        """Record an event (``at``: epoch seconds, default now)."""
        self._events.append(int((time.time() if at is None else at) * 1e9),
                            {"guest": guest, "kind": kind, "value": value, "duration_s": duration_s,
                             "detail": detail})

    def flush(self) -> None:
        """Write rows recorded since the last flush to the run folder; drop old ones from memory."""
        if self._writer is None:
            return
        s0, e0 = self._flushed
        s1, e1 = self._samples.total_rows, self._events.total_rows
        if s1 > s0 or e1 > e0:
            self._writer.flush(self._samples.frame(s0, s1), self._events.frame(e0, e1))
        self._flushed = (s1, e1)
        for buffer in (self._samples, self._events):
            excess = len(buffer) - self.max_rows_in_memory
            if excess > 0:
                buffer.drop_head(excess)

    # -- per-guest work -------------------------------------------------------------------
    def _start_task(self, guest: SampledGuest, state: GuestState) -> None:
        state.task = asyncio.get_running_loop().create_task(self._sample(guest, state),
                                                            name=f"balloonlab-sample-{guest.name}")

    def _listening(self, state: GuestState) -> bool:
        current = self._guests.get(state.name)
        return current is not None and current[1] is state and state.state != "removed"

    async def _sample(self, guest: SampledGuest, state: GuestState) -> None:
        balloon = guest.balloon
        try:
            period = balloon.period_s if balloon.period_s is not None else await balloon.get_period()
            if balloon.actual is None:
                await balloon.query_actual()
            state.state = "sampling"
            clock = _ReportClock()
            while True:
                record = await balloon.read_stats(query_actual=self.track_actual == "poll")
                state.polls += 1
                period = balloon.period_s if balloon.period_s is not None else period
                if record.new:
                    self._append(guest, record, period)
                    state.samples += 1
                await asyncio.sleep(clock.next_delay(time.monotonic(), period, record.new))
        except asyncio.CancelledError:
            raise
        except BalloonNotFound as exc:
            self._mark_dead(guest, state, "error", f"no balloon: {exc}")
        except (BalloonLabError, OSError) as exc:
            kind = "error" if guest.alive else "shutdown"
            self._mark_dead(guest, state, kind, str(exc))

    def _append(self, guest: SampledGuest, record: BalloonStats, period: int) -> None:
        if record.reset:
            self.record_event(guest.name, "reset", None, "guest reset detected", at=record.read_time)
        row: dict[str, object] = dict(record.stats)
        row.update(guest=guest.name, last_update=record.last_update, actual=record.actual if record.actual is not None
                   else guest.balloon.actual, target=guest.balloon.target, period_s=period,
                   rss=guest.rss_bytes(), age_s=record.age_s, reset=record.reset)
        self._samples.append(int(record.read_time * 1e9), row)

    def _mark_dead(self, guest: SampledGuest, state: GuestState, kind: str, why: str) -> None:
        state.state, state.error = "dead", why
        self.record_event(guest.name, kind, None, why)
        log.warning("stopped sampling %s: %s", guest.name, why)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                self.flush()
            except OSError as exc:  # a full disk must not kill sampling; rows stay in memory
                log.error("could not flush the run to %s: %s", self.run_dir, exc)


class _ReportClock:
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

    def next_delay(self, now: float, period: int, new: bool) -> float:
        """Seconds to sleep after a read at ``now`` (monotonic) that was ``new`` or not."""
        prev, self.prev_read = self.prev_read, now
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
                self.lo, self.hi = now, None  # overdue: paused or stalled guest
                return min(float(period), step * 2 ** min(self.misses, 10))
        assert self.lo is not None and self.hi is not None
        target = self.hi + self.MARGIN_S if self.hi - self.lo <= step else (self.lo + self.hi) / 2
        return max(0.0, target - now)


def _iso(epoch: float) -> str:
    return pd.Timestamp(epoch, unit="s", tz="UTC").isoformat()
