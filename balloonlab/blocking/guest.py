"""Blocking twins of :class:`~balloonlab.qemu.guest.Guest` (and the part every guest shares).

Every call runs on balloonlab's private loop (:mod:`balloonlab.blocking.loop`) and blocks the
caller until it finishes, so it works inside Jupyter (whose own loop is already running) as
well as in scripts. ``SyncGuest.launch(...)`` is ``await Guest.launch(...)`` with the same
parameters and defaults; ``tests/test_blocking.py`` fails when a twin drifts.
"""

from __future__ import annotations

import os
from typing import Any, Generic, Self, TypeVar

from balloonlab.blocking.balloon import SyncBalloon, SyncWorkload
from balloonlab.blocking.loop import run
from balloonlab.domain import DomainSpec
from balloonlab.model.guest import GuestBase
from balloonlab.model.guest_view import GuestView
from balloonlab.model.procfs import HostMemory
from balloonlab.model.stats import BalloonStats
from balloonlab.qemu.guest import Guest

G = TypeVar("G", bound=GuestBase)


class SyncGuestBase(Generic[G]):
    """What the blocking twins of every backend's guest share; use one as a context manager."""

    def __init__(self, guest: G) -> None:
        self.aio: G = guest
        self.balloon = SyncBalloon(guest.balloon)

    @property
    def name(self) -> str:
        """The guest's name."""
        return self.aio.name

    @property
    def backend(self) -> str:
        """How balloonlab reaches the guest (``qmp`` or ``libvirt``)."""
        return self.aio.backend

    @property
    def origin(self) -> str:
        """``launched``, ``attached`` or ``reconnected``."""
        return self.aio.origin

    @property
    def alive(self) -> bool:
        """True while QEMU runs."""
        return self.aio.alive

    @property
    def detached(self) -> bool:
        """True when :meth:`close` leaves the guest running."""
        return self.aio.detached

    @property
    def warnings(self) -> list[str]:
        """What did not go as the XML asked."""
        return self.aio.warnings

    @property
    def period_at_connect(self) -> int | None:
        """The live polling period read at reconnect (never changed there)."""
        return self.aio.period_at_connect

    @property
    def has_agent(self) -> bool:
        """True when workloads can be driven in the guest (balloonlab's agent or qemu-guest-agent)."""
        return self.aio.has_agent

    @property
    def has_guest_agent(self) -> bool:
        """True when the domain has a qemu-guest-agent channel."""
        return self.aio.has_guest_agent

    @property
    def workload(self) -> SyncWorkload:
        """The in-guest workload (balloonlab's agent, or qemu-guest-agent's ``guest-exec``)."""
        return SyncWorkload(self.aio.workload)

    def read_guest_view(self) -> GuestView | None:
        """The guest's own /proc/meminfo and /proc/vmstat as ``guest_*`` columns (None: no agent)."""
        return run(self.aio.read_guest_view())

    def rss_bytes(self) -> int | None:
        """Host RSS of QEMU, bytes."""
        return self.aio.rss_bytes()

    def host_memory(self) -> HostMemory | None:
        """QEMU's memory as the host sees it (:meth:`~balloonlab.model.guest.GuestBase.host_memory`)."""
        return self.aio.host_memory()

    def vmem_columns(self) -> dict[str, int]:
        """The virtio-mem columns as last read (:meth:`~balloonlab.model.guest.GuestBase.vmem_columns`)."""
        return self.aio.vmem_columns()

    def status(self) -> str:
        """QEMU's run state."""
        return run(self.aio.status())

    def metadata(self) -> dict[str, Any]:
        """What a run records about this guest."""
        return run(self.aio.metadata())

    def read_stats(self) -> BalloonStats:
        """One read of the balloon statistics (classified for interactive use)."""
        return run(self.aio.read_stats())

    def libvirt_stats(self) -> dict[str, int]:
        """The numbers as ``virsh dommemstat`` prints them."""
        return run(self.aio.libvirt_stats())

    def detach(self) -> None:
        """Let the guest outlive this handle."""
        run(self.aio.detach())

    def close(self) -> None:
        """Shut down an owned guest; just disconnect from others."""
        run(self.aio.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        text = repr(self.aio)
        return "<Sync" + text[1:] if text.startswith("<") else text


class SyncGuest(SyncGuestBase[Guest]):
    """Blocking view of :class:`~balloonlab.qemu.guest.Guest`; use it as a context manager."""

    @classmethod
    def launch(cls, domain: DomainSpec | str | os.PathLike[str], *, name: str | None = None,
               accel: str = "auto", detached: bool = False, qemu_binary: str | None = None,
               boot_timeout_s: float = 90.0) -> SyncGuest:
        """Launch a guest (see :meth:`Guest.launch` for the arguments and errors)."""
        return cls(run(Guest.launch(domain, name=name, accel=accel, detached=detached,
                                    qemu_binary=qemu_binary, boot_timeout_s=boot_timeout_s)))

    @classmethod
    def attach(cls, qmp_socket: str | os.PathLike[str], domain: DomainSpec | str | os.PathLike[str] | None = None,
               *, name: str | None = None, set_period: bool = True) -> SyncGuest:
        """Attach to a running QEMU (see :meth:`Guest.attach`)."""
        return cls(run(Guest.attach(qmp_socket, domain, name=name, set_period=set_period)))

    @classmethod
    def reconnect(cls, name: str) -> SyncGuest:
        """Reconnect to a detached guest (see :meth:`Guest.reconnect`)."""
        return cls(run(Guest.reconnect(name)))

    @property
    def pid(self) -> int | None:
        """QEMU's pid, when known."""
        return self.aio.pid

    @property
    def spec(self) -> DomainSpec | None:
        """The guest's DomainSpec, when known."""
        return self.aio.spec

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send any QMP command (``stop``, ``cont``, ``system_reset``...)."""
        return run(self.aio.monitor.execute(command, arguments))

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Quit -> wait -> kill; True when it quit by itself."""
        return run(self.aio.shutdown(timeout_s))
