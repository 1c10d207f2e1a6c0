"""The sampler: balloon statistics, balloon size and events of many guests, into frames.

One asyncio task per guest reads ``guest-stats`` when a new sample is due and keeps only new
ones (last-update moved). ``actual`` is tracked from BALLOON_CHANGE events rather than polled,
so the steady state costs one QMP command per sample; reads are timed to the guest's period
(read just after the guest reports, back off when it has not) instead of a blind loop that
reads the same sample twice. A slow or dead guest only stalls its own task: a guest that dies
or disconnects is marked (event + state) and its rows stay. Rows go into columnar buffers
(:mod:`balloonlab.record.buffer`) and, with a run folder, stream to Parquet every flush interval, so
memory stays bounded on day-long runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from balloonlab.model.balloon import BalloonChange
from balloonlab.model.classify import StatsClassifier
from balloonlab.model.errors import BalloonLabError, BalloonNotFound
from balloonlab.model.clock import HostClock
from balloonlab.model.guest import LOCAL_HOST, async_guest
from balloonlab.model.protocols import BalloonProtocol, GuestProtocol, WorkloadChange
from balloonlab.record.buffer import BufferSnapshot, event_buffer, sample_buffer
from balloonlab.record.guest_side import GuestSide, SamplingState
from balloonlab.record.host_side import HostSide
from balloonlab.record.host_task import HostTask
from balloonlab.record.metrics import MetricsSide
from balloonlab.record.policy_loop import PolicyLoop
from balloonlab.record.report_clock import ReportClock
from balloonlab.record.sample_rows import SampleRows
from balloonlab.record.store import RunWriter
from balloonlab.record.stream import RunStream

log = logging.getLogger(__name__)
#: How long after a target or a BALLOON_CHANGE the balloon may still be moving: QEMU
#: rate-limits the event to one a second and sends the last pending one after that.
MOVE_SETTLE_S = 2.0


class Sampler(HostSide, SampleRows, GuestSide, MetricsSide):
    """Record one or many guests into frames (async core; :class:`SyncSampler` blocks).

    :param run_dir: stream samples/events to this run folder (see :mod:`balloonlab.record.store`).
    :param flush_interval_s: how much a crash can lose at most.
    :param max_rows_in_memory: flushed rows beyond this are dropped from memory (they stay
        on disk: :func:`balloonlab.record.store.load_run`); without a run folder nothing is dropped.
    :param track_actual: ``"events"`` (default: one QMP command per sample while the balloon
        is still; ``actual`` is also asked with each read for 2 s after a target or a
        BALLOON_CHANGE, so a sample's ``actual`` is the balloon's size at that sample's time)
        or ``"poll"`` (query-balloon with every read). A row is stamped at the time its report
        most likely came; a row whose ``actual`` was asked with its read is stamped at that read
        (its stats up to a quarter period older: ``age_s``), so ``actual`` is never early.
    :param period_check_every: re-read the live polling period every this many reports (and
        whenever a report is a quarter period overdue), so a period changed outside balloonlab
        (virsh, another QMP client) is noticed, recorded as a "period" event and kept true in
        ``period_s``. A longer period is noticed at its first late report; a shorter one
        (reports still come when expected) at the next periodic check. The default, 100,
        costs 1 % more commands; a smaller value notices sooner.
    :param host_interval_s: read the host (meminfo, vmstat, PSI, KSM, each QEMU's memory) into the
        host frame this often (:meth:`host_frame`, the run's ``host`` table); None: no host frame.
    :param host_budget: a host memory budget in bytes for policies; None: the real host.
    :param guest_view: read each guest's own /proc/meminfo and /proc/vmstat after each new
        report (qemu-guest-agent, or balloonlab's agent) into its ``guest_*`` columns.
    :param stats_unset_warning_s: warn when a guest's balloon has not reported this long after
        sampling began (None: never); see :mod:`balloonlab.record.guest_side`.
    """

    def __init__(self, *, run_dir: str | Path | None = None, flush_interval_s: float = 5.0,
                 max_rows_in_memory: int = 1_000_000, track_actual: str = "events",
                 period_check_every: int = 100, metadata: dict[str, Any] | None = None,
                 host_interval_s: float | None = 1.0, host_budget: int | None = None,
                 guest_view: bool = False, stats_unset_warning_s: float | None = 60.0) -> None:
        if track_actual not in ("events", "poll"):
            raise ValueError(f"track_actual must be 'events' or 'poll', got {track_actual!r}")
        if type(period_check_every) is not int or period_check_every < 1:
            raise ValueError(f"period_check_every must be an int >= 1, got {period_check_every!r}")
        self._samples = sample_buffer()
        self._events = event_buffer()
        self._guests: dict[str, tuple[GuestProtocol, SamplingState]] = {}
        self._host = None if host_interval_s is None else HostTask(self._guests_memory, interval_s=host_interval_s)
        self.host_budget = host_budget  # checked: bytes above 0
        self._writer = RunWriter(run_dir) if run_dir is not None else None
        self._stream = (RunStream(self._writer, self._samples, self._events, max_rows_in_memory,
                                  self._host.buffer if self._host is not None else None)
                        if self._writer is not None else None)
        self._flush_task: asyncio.Task[None] | None = None
        self.flush_interval_s = flush_interval_s
        self._max_rows_in_memory = max_rows_in_memory
        self.track_actual = track_actual
        self.period_check_every = period_check_every
        self.started: float | None = None
        self._metadata = dict(metadata or {})
        self._policies: list[PolicyLoop] = []
        self._clocks: dict[str, HostClock] = {}  # per host (record.sample_rows)
        self._hosts_meta: dict[str, dict[str, Any]] = {}
        self.guest_view = guest_view
        self.stats_unset_warning_s = stats_unset_warning_s

    @property
    def max_rows_in_memory(self) -> int:
        """Rows on disk beyond this many are dropped from memory (see the class docstring)."""
        return self._max_rows_in_memory

    @max_rows_in_memory.setter
    def max_rows_in_memory(self, rows: int) -> None:
        self._max_rows_in_memory = rows
        if self._stream is not None:
            self._stream.max_rows_in_memory = rows

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
            self._writer.metadata.setdefault("guests", {})  # guests added before start() stay
            self._writer.write_metadata(status="running", start=_iso(self.started), **self._metadata)
            assert self._stream is not None
            self._flush_task = asyncio.get_running_loop().create_task(self._stream.run(self.flush_interval_s),
                                                                      name="balloonlab-flush")
        for guest, state in self._guests.values():
            if state.task is None:
                self._start_task(guest, state)
        if self._host is not None:
            self._host.start()

    async def add(self, guest: GuestProtocol | Any) -> None:
        """Start sampling ``guest`` (while running or before :meth:`start`).

        :param guest: a ``Guest`` or ``LibvirtGuest`` made on this loop (a blocking twin's
            ``.aio`` is taken when this sampler runs on balloonlab's own loop).
        :raises ValueError: a guest with this name is already being sampled, or its ``host``
            name is taken by a host on the other side (this machine against a remote one).
        :raises TypeError: not a guest, or one bound to another event loop (the message says
            what to pass instead).
        """
        guest = async_guest(guest, type(self).__name__)
        if guest.name in self._guests and self._guests[guest.name][1].state in ("starting", "sampling"):
            raise ValueError(f"guest {guest.name!r} is already being sampled")
        self._register_host(guest)  # raises before anything else is set up for a clashing host name
        state = SamplingState(guest.name, host=guest.host)
        self._guests[guest.name] = (guest, state)
        # Each listener also checks that its guest is still sampled under this state, so an
        # event already queued when remove() ran is never recorded after the guest left.
        name = guest.name

        def on_change(change: BalloonChange) -> None:
            if self._listening(state):
                self.record_event(name, "balloon_change", change.actual, at=change.time)

        def on_setting(kind: str, value: int) -> None:
            if kind == "target":
                state.target_set_at = time.time()
            if self._listening(state):
                self.record_event(name, kind, value)

        def on_workload(change: WorkloadChange) -> None:
            if self._listening(state):
                self.record_event(name, "workload", change.held, change.detail, change.duration_s, change.time)

        guest.balloon.add_listener(on_change)
        guest.balloon.add_setting_listener(on_setting)
        workload = guest.workload if guest.has_agent else None
        if workload is not None:
            workload.add_listener(on_workload)

        def unsubscribe() -> None:
            guest.balloon.remove_listener(on_change)
            guest.balloon.remove_setting_listener(on_setting)
            if workload is not None:
                workload.remove_listener(on_workload)
        state.unsubscribe = unsubscribe
        if self._writer is not None:
            try:
                meta = await guest.metadata()
            except BalloonLabError as exc:  # libvirtd restarting, say: the run still names the guest
                meta = {"name": guest.name, "backend": guest.backend, "metadata_error": str(exc)}
            self._writer.stage_guest(guest.name, meta)  # into run.json with the next flush
        if self.started is not None:
            self._start_task(guest, state)

    async def remove(self, name: str) -> None:
        """Stop sampling one guest (its rows stay)."""
        await self._remove([name])

    async def _remove(self, names: list[str]) -> None:
        """Stop sampling these guests: every task cancelled at once, then awaited together
        (5000 guests stop in one pass of the loop, not 5000)."""
        states = [self._guests[name][1] for name in names]
        tasks = [state.task for state in states if state.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in states:
            if state.inside.probe is not None:
                state.inside.probe.cancel()
            if state.state not in ("dead", "failed"):  # how it ended stays visible
                state.state = "removed"
            if state.unsubscribe is not None:
                state.unsubscribe()
                state.unsubscribe = None

    async def stop(self) -> None:
        """Stop every guest's task, flush, and close the run (run.json gets its end time)."""
        await self._close_metrics()  # the endpoints first: closed even if the flush below raises
        await self.stop_host()  # the policies, then the host frame's last row
        await self._remove(list(self._guests))
        if self._flush_task is not None:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self._flush_task = None
        if self._writer is not None:
            # A full disk raises here; the rows stay in memory and the exit hook tries again.
            await self.flush()
            if self._hosts_meta:
                self._save_hosts()  # each host's clock as it stood at the end
            self._writer.write_metadata(status="finished", end=_iso(time.time()),
                                        samples=self._samples.total_rows, events=self._events.total_rows)
            self._writer.close()

    async def __aenter__(self) -> Sampler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- what was recorded ----------------------------------------------------------------
    def frame(self) -> pd.DataFrame:
        """Samples in memory as a DataFrame (see docs/design.md "Frames"), built here.

        With a run folder, rows already on disk are dropped from memory beyond
        ``max_rows_in_memory``: ``frame.attrs["dropped_rows"]`` says how many earlier rows
        are not in this frame (:func:`~balloonlab.record.store.load_run` has them all).
        Another thread should build from :meth:`samples_snapshot` instead (as
        :class:`~balloonlab.blocking.SyncSampler` does), so the sampling loop never waits.
        """
        return self.samples_snapshot().frame()

    def events(self) -> pd.DataFrame:
        """Events in memory as a DataFrame (``attrs["dropped_rows"]`` as in :meth:`frame`)."""
        return self.events_snapshot().frame()

    def samples_snapshot(self, since_row: int = 0) -> BufferSnapshot:
        """The samples in memory, frozen on this loop in O(chunks) (1-2 ms at 10 M rows); its
        ``.frame()`` builds the same frame as :meth:`frame` on any thread, while sampling goes on.

        :param since_row: only rows numbered from this on (rows are numbered from 0 in recording
            order; ``snapshot.start + len(snapshot)`` is where the next call can start), so a
            live view builds only what is new.
        """
        dropped = self._samples.dropped
        return self._samples.snapshot(max(dropped, since_row), attrs={"dropped_rows": dropped})

    def events_snapshot(self, since_row: int = 0) -> BufferSnapshot:
        """The events in memory, frozen (see :meth:`samples_snapshot`)."""
        dropped = self._events.dropped
        return self._events.snapshot(max(dropped, since_row), attrs={"dropped_rows": dropped})

    def states(self) -> dict[str, SamplingState]:
        """Per guest: sampling / dead / removed, counts, last error."""
        return {name: state for name, (_, state) in self._guests.items()}

    def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "",
                     duration_s: float | None = None, at: float | None = None) -> None:
        """Record an event (``at``: epoch seconds, default now)."""
        sampled = self._guests.get(guest)
        self._events.append(int((time.time() if at is None else at) * 1e9),
                            {"guest": guest, "host": sampled[0].host if sampled else LOCAL_HOST, "kind": kind,
                             "value": value, "duration_s": duration_s, "detail": detail})

    async def flush(self) -> None:
        """Write rows not yet on disk to the run folder; drop old ones (on disk) from memory.

        The loop only freezes the rows (a snapshot) and drops what is on disk; the frames are
        built and written in a worker thread, so sampling goes on meanwhile.

        :raises OSError: a write failed (ENOSPC, EIO): rows not on disk stay in memory and the
            next flush writes exactly those (none twice).
        """
        if self._stream is not None:
            await self._stream.flush()

    @property
    def _flushed(self) -> tuple[int, int]:
        """Rows of (samples, events) on disk."""
        return self._stream.flushed if self._stream is not None else (0, 0)

    # -- per-guest work -------------------------------------------------------------------
    def _start_task(self, guest: GuestProtocol, state: SamplingState) -> None:
        state.inside.started = time.monotonic()  # the unset-stats clock runs from here
        state.task = asyncio.get_running_loop().create_task(self._sample(guest, state),
                                                            name=f"balloonlab-sample-{guest.name}")

    def _listening(self, state: SamplingState) -> bool:
        current = self._guests.get(state.name)
        return current is not None and current[1] is state and state.state != "removed"

    async def _sample(self, guest: GuestProtocol, state: SamplingState) -> None:
        balloon = guest.balloon
        try:
            # The live period, not a cached one: someone may have changed it since.
            period = await balloon.get_period()
            if balloon.actual is None:
                await balloon.query_actual()
            state.state = "sampling"
            clock = ReportClock()
            classifier = StatsClassifier()  # this sampler's own view: other readers take nothing
            since_check = 0
            previous_sent: float | None = None  # the previous read's read_time (epoch s)
            while True:
                sent = time.monotonic()  # as the request leaves, like the record's read_time
                actual_asked = self._actual_needed(balloon, state)
                record = await balloon.read_stats(query_actual=actual_asked, classifier=classifier)
                state.polls += 1
                if record.new:  # bounds this guest's host's clock (model.clock)
                    self._observe_clock(guest, record, record.read_time + time.monotonic() - sent, previous_sent)
                previous_sent = record.read_time
                if balloon.period_s is not None:
                    period = balloon.period_s  # set through balloonlab (already an event)
                since_check += record.new
                delay = clock.next_delay(sent, period, record.new)
                if since_check >= self.period_check_every or clock.became_overdue:
                    since_check = 0
                    period = await self._check_period(guest, period)
                if record.new:
                    # Stamped when the report most likely came, not when a late read found it;
                    # but when the balloon's size was asked with the stats, at that read: actual
                    # is then true at the row's time (a 300 MiB deflate takes 0.1 s, a late read
                    # comes up to a quarter period after the report), the stats as old as age_s.
                    report_time = sent if actual_asked or clock.report_time is None else clock.report_time
                    view = await self._read_view(guest, state)
                    self._append(guest, record, period, at=record.read_time - (sent - report_time), view=view)
                    state.samples += 1
                else:
                    await self._check_unset(guest, state, record, period)
                await asyncio.sleep(max(0.0, delay - (time.monotonic() - sent)))
        except asyncio.CancelledError:
            raise
        except BalloonNotFound as exc:
            self._mark_dead(guest, state, "error", f"no balloon: {exc}")
        except (BalloonLabError, OSError) as exc:
            kind = "error" if guest.alive else "shutdown"
            self._mark_dead(guest, state, kind, str(exc))
        except Exception as exc:  # a bug (ours or a backend's) stops this guest only
            log.exception("sampling %s failed", guest.name)
            self._mark_dead(guest, state, "error", f"{type(exc).__name__}: {exc}", failed=True)

    def _actual_needed(self, balloon: BalloonProtocol, state: SamplingState) -> bool:
        """Ask for ``actual`` with this read? Always in "poll" mode; in "events" mode while the
        balloon may be moving: QEMU sends at most one BALLOON_CHANGE a second, so during a move
        the tracked value lags the balloon by up to that."""
        if self.track_actual == "poll":
            return True
        last_change = balloon.changes[-1].time if balloon.changes else 0.0
        return time.time() - max(last_change, state.target_set_at) < MOVE_SETTLE_S

    async def _check_period(self, guest: GuestProtocol, period: int) -> int:
        """The live period; a change nobody made through balloonlab becomes a "period" event."""
        live = await guest.balloon.get_period()
        if live != period:
            self.record_event(guest.name, "period", live, f"changed outside balloonlab (was {period} s)")
        return live

    def _mark_dead(self, guest: GuestProtocol, state: SamplingState, kind: str, why: str, *,
                   failed: bool = False) -> None:
        state.state, state.error = ("failed" if failed else "dead"), why
        self.record_event(guest.name, kind, None, why)
        log.warning("stopped sampling %s: %s", guest.name, why)


def _iso(epoch: float) -> str:
    return str(pd.Timestamp(epoch, unit="s", tz="UTC").isoformat())
