"""What the QEMU backend needs of a QMP connection, whoever carries it.

A :class:`~balloonlab.qemu.monitor.Monitor` (balloonlab's own socket) and the libvirt
backend's QMP passthrough (:class:`~balloonlab.libvirt.link.DomainLink`, through
``qemuMonitorCommand``) both implement :class:`QMPTransport`, so discovery and the QMP
balloon run unchanged over either. The per-connection cache lives on the transport: a new
connection starts with an empty one, as libvirt's monitor does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class QMPEvent:
    """An event QEMU sent: its name, data and QEMU's own host timestamp (epoch seconds)."""

    name: str
    data: dict[str, Any]
    time: float


@dataclass
class ConnectionCache:
    """State cached for the life of one QMP connection (libvirt keeps the same per monitor).

    ``balloon_path`` is the found QOM path; ``balloon_searched`` says a search already ran,
    so a failed search is not repeated; ``balloon_search_log`` is what it tried.
    """

    balloon_path: str | None = None
    balloon_searched: bool = False
    balloon_search_log: list[str] = field(default_factory=list)


class QMPTransport(Protocol):
    """A QMP connection: commands, events, round-trip count and the per-connection cache."""

    name: str
    round_trips: int
    cache: ConnectionCache

    @property
    def connected(self) -> bool:
        """True while commands can be sent."""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        """Send one command and return its ``return`` value.

        :raises CommandError: QEMU's error reply.
        :raises MonitorError: the connection failed.
        """

    def add_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        """Call ``handler(event)`` for every event from now on."""

    def remove_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        """Stop calling ``handler``."""
