"""The sampler's rows: one sample row per new report, its host, and each host's clock (a mixin
of :class:`~balloonlab.record.sampler.Sampler`, kept apart so each file keeps one job).

Guests may run on several hosts (local QEMU, local and remote libvirt). Every row and event
carries its guest's ``host``; each host's clock offset is learnt from the reports
(:mod:`balloonlab.model.clock`) and corrects ``age_s``. run.json's ``hosts`` holds, per host, the
URIs it was reached by and its offset: the first estimate, then one whenever it moved by more than
its uncertainty or a clock stepped (at most :data:`HISTORY` kept), so a reader sees how the clocks
stood through the run.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

from balloonlab.model.clock import ClockEstimate, HostClock, corrected_age
from balloonlab.model.guest_view import GuestView
from balloonlab.model.protocols import GuestProtocol
from balloonlab.model.stats import BalloonStats
from balloonlab.record.buffer import RowBuffer
from balloonlab.record.store import RunWriter

#: Estimates kept per host in run.json's ``hosts.<host>.clock_history``.
HISTORY = 32


class SampleRows:
    """What :class:`~balloonlab.record.sampler.Sampler` does to turn a read into a row."""

    _samples: RowBuffer
    _writer: RunWriter | None
    _clocks: dict[str, HostClock]
    _hosts_meta: dict[str, dict[str, Any]]

    if TYPE_CHECKING:  # the Sampler's and HostSide's
        def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "",
                         duration_s: float | None = None, at: float | None = None) -> None: ...

        def add_metadata(self, **fields: Any) -> None: ...

    def host_clocks(self) -> dict[str, ClockEstimate | None]:
        """Each host's clock minus this one's, as now estimated (None: not yet bounded)."""
        now = time.time()
        return {host: clock.estimate(now) for host, clock in self._clocks.items()}

    def _register_host(self, guest: GuestProtocol) -> HostClock:
        """The guest's host clock, made (and the host added to run.json) on its first guest.

        :raises ValueError: the host's name was already taken by a host on the other side (this
            machine against a remote one): their clocks would be mixed.
        """
        clock = self._clocks.get(guest.host)
        if clock is None:
            clock = self._clocks[guest.host] = HostClock(local=guest.on_this_host)
        elif clock.local != guest.on_this_host:
            here, there = ("this machine", "a remote host") if clock.local else ("a remote host", "this machine")
            raise ValueError(f"host name {guest.host!r} already names {here}, and guest {guest.name!r} runs on "
                             f"{there}: set guest.host to another name before adding it")
        meta = self._hosts_meta.setdefault(guest.host, {"on_this_host": guest.on_this_host, "reached_by": []})
        reached_by = str(getattr(guest, "uri", None) or guest.backend)
        if reached_by not in meta["reached_by"]:
            meta["reached_by"].append(reached_by)
            self._save_hosts()
        return clock

    def _observe_clock(self, guest: GuestProtocol, record: BalloonStats, received: float,
                       previous_sent: float | None) -> None:
        """Bound the guest's host's clock by a read that found a new report; run.json's history
        gets the estimate whenever it moved from the last one recorded by more than that one's
        uncertainty (or half a second), so a slow drift is recorded too."""
        clock = self._clocks[guest.host]
        if clock.local or record.last_update is None:
            return
        if clock.observe(record.last_update, received=received, previous_sent=previous_sent):
            self.record_event(guest.name, "clock", None,
                              f"the clock of host {guest.host} stepped (or this one did): its offset is learnt again")
        now = clock.estimate(received)
        history = self._hosts_meta[guest.host].setdefault("clock_history", [])
        last = history[-1] if history else None
        if now is not None and (last is None or abs(now.offset_s - last["offset_s"]) > max(last["uncertainty_s"], 0.5)):
            history.append(now.as_dict())
            del history[:-HISTORY]
            self._save_hosts()

    def _save_hosts(self) -> None:
        """Stage run.json's ``hosts`` with each clock as now estimated (a deep copy: the flush
        thread writes it while this loop goes on changing the lists)."""
        for host, meta in self._hosts_meta.items():
            estimate = self._clocks[host].estimate(time.time()) if host in self._clocks else None
            meta["clock"] = estimate.as_dict() if estimate is not None else None
        self.add_metadata(hosts=copy.deepcopy(self._hosts_meta))

    def _append(self, guest: GuestProtocol, record: BalloonStats, period: int, at: float,
                view: GuestView | None = None) -> None:
        """One row at host time ``at`` (the report's estimated time, a little before
        ``record.read_time``, or the read's own while ``actual`` was asked with it; ``age_s``
        stays the age at the read, on this host's clock)."""
        if record.reset:
            self.record_event(guest.name, "reset", None, "guest reset detected", at=at)
        offset = self._clocks[guest.host].estimate(record.read_time)
        row: dict[str, object] = dict(record.stats)
        row.update(guest=guest.name, host=guest.host, last_update=record.last_update,
                   actual=record.actual if record.actual is not None else guest.balloon.actual,
                   target=guest.balloon.target, period_s=period, rss=guest.rss_bytes(),
                   age_s=corrected_age(record.read_time, record.last_update, offset), reset=record.reset,
                   clock_offset_s=offset.offset_s if offset is not None else None)
        # -- the host's view (model.schema.HOST_COLUMNS): one smaps_rollup pread and a
        # PAGEMAP_SCAN per guest RAM block and TCG range, read now (the stats are the report's);
        # virtio-mem (VMEM_COLUMNS) as last read: no QMP command here
        host = guest.host_memory()
        if host is not None:
            row.update(host.columns())
        row.update(guest.vmem_columns())
        # -- end of the host's view
        if view is not None:  # the guest's own (record.guest_side), read just after the report
            row.update(view.columns)
            row["guest_view_lag_s"] = view.read_time - at
        self._samples.append(int(at * 1e9), row)
