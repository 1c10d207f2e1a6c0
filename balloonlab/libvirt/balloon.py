"""The balloon of a libvirt domain, over libvirt-python (and QEMU's own QMP when allowed).

:class:`LibvirtBalloon` implements :class:`~balloonlab.model.balloon.BalloonBase`'s
primitives with libvirt's API; what is not about *how* the numbers are fetched (classification,
target checks, BALLOON_CHANGE tracking, ``wait_for_actual``, ``wait_for_stats``) is the base's.

- statistics: with ``via == "qmp"`` a QMP :class:`~balloonlab.qemu.balloon.Balloon` runs over
  libvirt's QMP passthrough (the :class:`DomainLink` is a QMP transport): QEMU's exact bytes,
  stats libvirt does not map, unset values as None, last-update 0 as None. With
  ``via == "libvirt"`` one ``virDomainMemoryStats`` call: libvirt's names mapped back to
  balloonlab's and KiB back to bytes (x1024), which loses the sub-KiB part libvirt truncated;
  unset and unmapped stats are simply absent; ``actual`` always comes with it.
- the period goes through ``virDomainSetMemoryStatsPeriod`` (so libvirt's live XML agrees), the
  target through ``virDomainSetMemoryFlags``, the run state through ``virDomainGetState``.
"""

from __future__ import annotations

import dataclasses
import time

from balloonlab.domain import DomainSpec
from balloonlab.libvirt.link import DomainLink
from balloonlab.model.balloon import BalloonBase, Method
from balloonlab.model.errors import BalloonNotFound
from balloonlab.model.period import LIBVIRT_MAX_PERIOD_S
from balloonlab.model.stats import BalloonStats, stats_from_libvirt
from balloonlab.qemu.balloon import Balloon
from balloonlab.qemu.transport import QMPEvent


class LibvirtBalloon(BalloonBase):
    """A libvirt domain's balloon (the same API as :class:`~balloonlab.qemu.balloon.Balloon`).

    :param link: the domain's :class:`DomainLink`.
    :param domain: the domain's live spec (``memballoon`` None: ``<memballoon model='none'>``).
    """

    period_limit_s = LIBVIRT_MAX_PERIOD_S

    def __init__(self, link: DomainLink, domain: DomainSpec) -> None:
        super().__init__(max_bytes=domain.memory_bytes)
        self.link = link
        self.spec = domain.memballoon
        self.has_device = domain.has_balloon
        #: QEMU's RSS in bytes from the last ``virDomainMemoryStats`` (libvirt's ``rss``).
        self.last_rss: int | None = None
        # Passthrough reads use the QMP backend's balloon over the link (public API only).
        self._qmp = Balloon(link, self.spec, max_bytes=domain.memory_bytes) if link.via == "qmp" else None
        link.add_event_handler(self._on_event)

    @property
    def stats_via(self) -> str:
        """``"qmp"`` (passthrough) or ``"libvirt"`` (memoryStats)."""
        return self.link.via

    def _require_device(self) -> None:
        if not self.has_device:
            raise BalloonNotFound(f"No memory balloon device configured: domain {self.link.name} "
                                  "has <memballoon model='none'>")

    async def path(self, method: Method = "auto") -> str:
        """The device's QOM path: found through passthrough with ``via == "qmp"``, else the
        path libvirt gives it (libvirt owns the device: informational).

        :raises BalloonNotFound: the domain has ``<memballoon model='none'>``.
        """
        self._require_device()
        if self._qmp is not None:
            return await self._qmp.path(method)
        return f"/machine/peripheral/{(self.spec.alias if self.spec else None) or 'balloon0'}"

    async def get_period(self) -> int:
        """The live period: QEMU's property through passthrough, else libvirt's live XML
        (which records every period libvirt set, at start or through its API)."""
        self._require_device()
        if self._qmp is not None:
            self.period_s = await self._qmp.get_period()
        else:
            self.period_s = (await self.link.live_spec()).period_s or 0
        return self.period_s

    async def query_actual(self) -> int:
        """``actual`` in bytes: QEMU's ``query-balloon`` through passthrough, else memoryStats."""
        self._require_device()
        if self._qmp is not None:
            self.actual = await self._qmp.query_actual()
            return self.actual
        stats = await self.link.memory_stats()
        if "actual" not in stats:
            raise BalloonNotFound(f"No memory balloon device configured on domain {self.link.name}")
        self.actual = int(stats["actual"]) * 1024
        return self.actual

    async def read_report(self, *, query_actual: bool = True) -> BalloonStats:
        """One read of the guest's report, unclassified (see the module docstring)."""
        self._require_device()
        resets, reset_time = self.resets, self.last_reset_time
        if self._qmp is not None:
            record = await self._qmp.read_report(query_actual=query_actual)
            if query_actual:
                self.actual = record.actual
            return dataclasses.replace(record, actual=record.actual if query_actual else self.actual,
                                       resets=resets, reset_time=reset_time)
        sent = time.time()  # as for QMP: when the request left (see qemu/balloon.py)
        record, self.last_rss = stats_from_libvirt(await self.link.memory_stats(), read_time=sent, resets=resets,
                                                   reset_time=reset_time)
        if record.actual is not None:
            self.actual = record.actual
        return record

    async def status(self) -> str:
        """The domain's run state from ``virDomainGetState`` (QEMU's words where one fits)."""
        return await self.link.state()

    async def _write_period(self, seconds: int) -> None:
        self._require_device()
        await self.link.set_stats_period(seconds)

    async def _write_target(self, target: int) -> None:
        self._require_device()
        await self.link.set_memory(target)

    def _on_event(self, event: QMPEvent) -> None:
        if event.name == "BALLOON_CHANGE":
            self._balloon_changed(int(event.data["actual"]), event.time)
        elif event.name == "RESET":
            self._guest_reset(event.time)
