"""The blocking twin of :class:`~balloonlab.libvirt.guest.LibvirtGuest` (needs libvirt-python)."""

from __future__ import annotations

import os

from balloonlab.blocking.guest import SyncGuestBase
from balloonlab.blocking.loop import run
from balloonlab.domain import DomainSpec
from balloonlab.libvirt.guest import DEFAULT_URI, LibvirtGuest
from balloonlab.libvirt.link import StatsVia


class SyncLibvirtGuest(SyncGuestBase[LibvirtGuest]):
    """Blocking view of :class:`~balloonlab.libvirt.guest.LibvirtGuest`; a context manager."""

    @classmethod
    def launch(cls, domain: DomainSpec | str | os.PathLike[str], *, uri: str = DEFAULT_URI,
               persistent: bool = False, stats_via: StatsVia = "auto", agent: bool | None = None,
               boot_timeout_s: float = 90.0) -> SyncLibvirtGuest:
        """Start a domain under libvirt (see :meth:`LibvirtGuest.launch`)."""
        return cls(run(LibvirtGuest.launch(domain, uri=uri, persistent=persistent, stats_via=stats_via,
                                           agent=agent, boot_timeout_s=boot_timeout_s)))

    @classmethod
    def attach(cls, name_or_uuid: str, *, uri: str = DEFAULT_URI, set_period: bool = True,
               stats_via: StatsVia = "auto", agent: bool = False) -> SyncLibvirtGuest:
        """Attach to a running domain (see :meth:`LibvirtGuest.attach`)."""
        return cls(run(LibvirtGuest.attach(name_or_uuid, uri=uri, set_period=set_period,
                                           stats_via=stats_via, agent=agent)))

    @classmethod
    def reconnect(cls, name_or_uuid: str, *, uri: str = DEFAULT_URI, stats_via: StatsVia = "auto",
                  agent: bool = False) -> SyncLibvirtGuest:
        """Reconnect to a running domain, never setting its period (see :meth:`LibvirtGuest.reconnect`)."""
        return cls(run(LibvirtGuest.reconnect(name_or_uuid, uri=uri, stats_via=stats_via, agent=agent)))

    @property
    def pid(self) -> int | None:
        """QEMU's pid when libvirt runs it on this host."""
        return self.aio.pid

    @property
    def spec(self) -> DomainSpec:
        """The domain's live spec."""
        return self.aio.spec

    @property
    def uri(self) -> str:
        """The libvirt URI."""
        return self.aio.uri

    @property
    def stats_via(self) -> str:
        """``qmp`` (passthrough) or ``libvirt`` (memoryStats)."""
        return self.aio.stats_via

    def shutdown(self, timeout_s: float = 10.0, *, undefine: bool = False) -> bool:
        """Stop the domain (graceful first); True when it stopped on SIGTERM."""
        return run(self.aio.shutdown(timeout_s, undefine=undefine))
