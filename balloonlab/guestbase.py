"""What every guest offers, whatever reaches it: QMP (:mod:`balloonlab.guest`) or libvirt
(:mod:`balloonlab.libvirt`). The balloon, the workload agent, warnings, libvirt's rule for the
statistics period at attach, and turning XML text or a file into a DomainSpec live here once.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Literal, Self

from .balloon import Balloon
from .domain import DomainSpec, load_domain_xml, parse_domain_xml
from .errors import BalloonLabError, BalloonLabWarning, BalloonNotFound, CommandError
from .stats import BalloonStats, libvirt_view
from .workload import Workload

log = logging.getLogger(__name__)
#: How a guest handle came to be.
Origin = Literal["launched", "attached", "reconnected"]


def as_spec(domain: DomainSpec | str | os.PathLike[str]) -> DomainSpec:
    """A DomainSpec from a spec, XML text (starts with ``<``) or the path of an XML file."""
    if isinstance(domain, DomainSpec):
        return domain
    if isinstance(domain, str) and domain.lstrip().startswith("<"):
        return parse_domain_xml(domain)
    return load_domain_xml(Path(domain))


class GuestBase:
    """What a guest offers whatever the backend (QMP here, libvirt in :mod:`balloonlab.libvirt`):
    its balloon, the workload agent, warnings, and the period rule shared by launch/attach."""

    #: How balloonlab reaches this guest.
    backend = "qmp"
    balloon: Balloon

    def __init__(self, name: str) -> None:
        self.name = name
        #: Things that did not go as the domain XML asked (also emitted as Python warnings).
        self.warnings: list[str] = []
        #: The polling period found on the live guest at reconnect (never changed there).
        self.period_at_connect: int | None = None
        self._workload: Workload | None = None

    @property
    def workload(self) -> Workload:
        """The in-guest workload agent (built-in guest only).

        :raises BalloonLabError: this guest has no agent.
        """
        if self._workload is None:
            raise BalloonLabError(f"guest {self.name} has no workload agent (only guests built "
                                  "with balloonlab's guest image have one)")
        return self._workload

    @property
    def has_agent(self) -> bool:
        """True when the guest carries balloonlab's workload agent."""
        return self._workload is not None

    def rss_bytes(self) -> int | None:
        """Host RSS of the QEMU process (libvirt's ``rss``), when known."""
        raise NotImplementedError

    async def read_stats(self) -> BalloonStats:
        """One read of the balloon statistics (see :meth:`Balloon.read_stats`)."""
        return await self.balloon.read_stats()

    async def libvirt_stats(self) -> dict[str, int]:
        """This guest's numbers as ``virsh dommemstat`` would print them."""
        return libvirt_view(await self.read_stats(), self.rss_bytes())

    async def close(self) -> None:
        """Release this handle (see the backend's docs for what happens to the guest)."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _apply_period(self, seconds: int) -> None:
        """Set the period; a refusal is a recorded warning, never a failed launch or attach."""
        try:
            await self.balloon.set_period(seconds)
        except (CommandError, BalloonNotFound, ValueError, TypeError) as exc:
            self._warn(f"could not set the balloon stats period to {seconds} s: {exc}")

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``prelaunch``...)."""
        raise NotImplementedError

    async def _apply_period_at_attach(self, seconds: int) -> None:
        """libvirt's attach rule: set the period only if the VM is running; a paused one keeps
        whatever it has (its owner may have reasons)."""
        status = await self.status()
        if status == "running":
            await self._apply_period(seconds)
        else:
            log.info("%s is %s: stats period left as it is", self.name, status)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(f"{self.name}: {message}", BalloonLabWarning, stacklevel=3)
