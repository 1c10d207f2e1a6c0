"""The balloon of a libvirt domain: :class:`Balloon`'s logic over a :class:`DomainLink`.

Everything that is not about *how* the numbers are fetched (new/reset classification, target
validation, BALLOON_CHANGE tracking, ``wait_for_actual``, ``wait_for_stats``) is
:class:`~balloonlab.balloon.Balloon`'s own code, inherited. What differs:

- statistics: with ``via == "qmp"`` the inherited QMP read (``qom-get guest-stats`` +
  ``query-balloon``) runs through libvirt's QMP passthrough: QEMU's exact bytes, stats libvirt
  does not map, unset values as None, last-update 0 as None. With ``via == "libvirt"`` one
  ``virDomainMemoryStats`` call: libvirt's names mapped back to balloonlab's and KiB back to
  bytes (x1024), which loses the sub-KiB part libvirt truncated; unset and unmapped stats are
  simply absent; ``actual`` always comes with it (``query_actual`` changes nothing).
- the period goes through ``virDomainSetMemoryStatsPeriod`` (so libvirt's live XML agrees), the
  target through ``virDomainSetMemoryFlags`` (see :class:`DomainLink`).
"""

from __future__ import annotations

import time

from .balloon import Balloon, validate_period
from .discovery import Method
from .domain import DomainSpec
from .errors import BalloonNotFound
from .stats import LIBVIRT_NAMES, BalloonStats, libvirt_view
from ._libvirt_link import DomainLink


def _libvirt_units() -> dict[str, tuple[str, int]]:
    """libvirt memoryStats name -> (balloonlab name, multiplier back to balloonlab's unit).

    The inverse of :data:`balloonlab.stats.LIBVIRT_NAMES`; the units are read off
    :func:`libvirt_view` itself (a stat it divides by 1024 comes back x1024), so the two can
    never disagree.
    """
    probe_stats = BalloonStats(0.0, 1024, dict.fromkeys(
        ("swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
         "available_memory", "disk_caches", "htlb_pgalloc", "htlb_pgfail"), 1024), actual=1024)
    view = libvirt_view(probe_stats, rss_bytes=1024)
    by_libvirt = {libvirt_name: ours for ours, libvirt_name in LIBVIRT_NAMES.items()}
    return {name: (by_libvirt[name], 1024 // value) for name, value in view.items()}


#: libvirt memoryStats name -> (balloonlab name, factor): ``unused`` -> ``free_memory`` x1024.
FROM_LIBVIRT: dict[str, tuple[str, int]] = _libvirt_units()


def stats_from_libvirt(raw: dict[str, int], read_time: float | None = None) -> tuple[BalloonStats, int | None]:
    """``virDomainMemoryStats()`` -> (BalloonStats in balloonlab's names and bytes, rss bytes).

    KiB values are multiplied by 1024: the sub-KiB part libvirt truncated is lost. A name
    libvirt reports that balloonlab does not know is kept as libvirt gave it.
    """
    values: dict[str, int] = {}
    for name, value in raw.items():
        ours, factor = FROM_LIBVIRT.get(name, (name, 1))
        values[ours] = int(value) * factor
    actual, last_update, rss = (values.pop(k, None) for k in ("actual", "last_update", "rss"))
    record = BalloonStats(read_time=time.time() if read_time is None else read_time,
                          last_update=last_update or None, stats=values, actual=actual)
    return record, rss


class LibvirtBalloon(Balloon):
    """A libvirt domain's balloon (same API as :class:`Balloon`; see the module docstring).

    :param link: the domain's :class:`DomainLink` (it plays the monitor).
    :param domain: the domain's live spec (``memballoon`` None: ``<memballoon model='none'>``).
    """

    def __init__(self, link: DomainLink, domain: DomainSpec) -> None:
        super().__init__(link, domain.memballoon, max_bytes=domain.memory_bytes)  # type: ignore[arg-type]
        self.link = link
        self.has_device = domain.has_balloon
        #: QEMU's RSS in bytes from the last ``virDomainMemoryStats`` (libvirt's ``rss``).
        self.last_rss: int | None = None

    @property
    def stats_via(self) -> str:
        """``"qmp"`` (passthrough) or ``"libvirt"`` (memoryStats)."""
        return self.link.via

    async def path(self, method: Method = "auto") -> str:
        """The device's QOM path: found through passthrough with ``via == "qmp"``, else the
        path libvirt gives it (libvirt owns the device: informational).

        :raises BalloonNotFound: the domain has ``<memballoon model='none'>``.
        """
        if not self.has_device:
            raise BalloonNotFound(f"No memory balloon device configured: domain {self.link.name} "
                                  "has <memballoon model='none'>")
        if self.link.via == "qmp":
            return await super().path(method)
        return f"/machine/peripheral/{(self.spec.alias if self.spec else None) or 'balloon0'}"

    async def set_period(self, seconds: int) -> None:
        """Set the polling period through ``virDomainSetMemoryStatsPeriod`` (live).

        :raises TypeError, ValueError: a value QEMU or libvirt (C int) would refuse.
        :raises BalloonNotFound: libvirt's "No memory balloon device configured".
        """
        validate_period(seconds)
        await self.link.set_stats_period(seconds)
        self.period_s = seconds
        self._notify_setting("period", seconds)

    async def read_stats(self, *, query_actual: bool = True) -> BalloonStats:
        """One read of the statistics (``new``/``reset`` as :meth:`Balloon.read_stats`)."""
        if self.link.via == "qmp":
            return await super().read_stats(query_actual=query_actual)
        await self.path()
        record, self.last_rss = stats_from_libvirt(await self.link.memory_stats())
        if record.actual is not None:
            self.actual = record.actual
        return self._classify(record)
