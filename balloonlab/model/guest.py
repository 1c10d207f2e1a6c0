"""What every guest offers, whatever reaches it: the balloon, the workload agent, warnings,
libvirt's rule for the statistics period at attach, and the rollback of a failed launch.

:class:`GuestBase` is the shared part of :class:`~balloonlab.qemu.guest.Guest` and
:class:`~balloonlab.libvirt.guest.LibvirtGuest`; both satisfy
:class:`~balloonlab.model.protocols.GuestProtocol`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self

from balloonlab.model.balloon import BalloonBase
from balloonlab.model.errors import BalloonLabError, BalloonLabWarning, BalloonNotFound, CommandError, LaunchError
from balloonlab.model.protocols import AgentProtocol, GuestProtocol, Origin
from balloonlab.model.stats import BalloonStats, libvirt_view

log = logging.getLogger(__name__)


class GuestBase(abc.ABC):
    """What a guest offers whatever the backend: its balloon, the workload agent, warnings,
    and the period rule shared by launch and attach."""

    #: How balloonlab reaches this guest.
    backend = "qmp"
    balloon: BalloonBase
    origin: Origin

    def __init__(self, name: str) -> None:
        self.name = name
        #: Things that did not go as the domain XML asked (also emitted as Python warnings).
        self.warnings: list[str] = []
        #: The polling period found on the live guest at reconnect (never changed there).
        self.period_at_connect: int | None = None
        self._workload: AgentProtocol | None = None
        # Guests are built inside their backend's async constructors: this is the loop their
        # connections (QMP client, agent socket, libvirt callbacks) are bound to.
        self.loop: asyncio.AbstractEventLoop | None = _running_loop()

    @property
    def workload(self) -> AgentProtocol:
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

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the guest's QEMU runs."""

    @property
    @abc.abstractmethod
    def detached(self) -> bool:
        """True when :meth:`close` leaves the guest running."""

    @abc.abstractmethod
    def rss_bytes(self) -> int | None:
        """Host RSS of the QEMU process (libvirt's ``rss``), when known."""

    @abc.abstractmethod
    async def metadata(self) -> dict[str, Any]:
        """What a run records about this guest."""

    @abc.abstractmethod
    async def detach(self) -> None:
        """Let the guest outlive this handle."""

    @abc.abstractmethod
    async def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Stop the guest; True when it stopped gracefully."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release this handle (an owned guest is shut down, others keep running)."""

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``prelaunch``...)."""
        return await self.balloon.status()

    async def read_stats(self) -> BalloonStats:
        """One read of the balloon statistics, classified for interactive use
        (see :meth:`BalloonBase.read_stats`; a sampler keeps its own classification)."""
        return await self.balloon.read_stats()

    async def libvirt_stats(self) -> dict[str, int]:
        """This guest's numbers as ``virsh dommemstat`` would print them (a pure read)."""
        return libvirt_view(await self.balloon.read_report(), self.rss_bytes())

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


@contextlib.asynccontextmanager
async def rollback(undo: Callable[[], Awaitable[None]],
                   failed: Callable[[BaseException], LaunchError] | None = None) -> AsyncIterator[None]:
    """Run a launch step; if it fails, ``undo()`` what was made, always, then re-raise.

    :param failed: turns an expected failure (a balloonlab error, OSError, a timeout) into
        the :class:`LaunchError` the caller should see; cancellations and other
        BaseExceptions are never wrapped.
    """
    try:
        yield
    except BaseException as exc:
        await undo()
        if failed is not None and isinstance(exc, (BalloonLabError, OSError, TimeoutError)):
            raise failed(exc) from exc
        raise


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def async_guest(guest: object, user: str) -> GuestProtocol:
    """The async guest behind ``guest`` (a blocking twin's ``.aio``), checked to live on the
    running loop, for ``user`` (``"Sampler"``, ``"Experiment"``) to drive.

    :raises TypeError: not a balloonlab guest, or a guest bound to another event loop (its
        QMP and agent connections only work there); the message says what to pass instead.
    """
    inner = getattr(guest, "aio", guest)
    if not isinstance(inner, GuestBase):
        raise TypeError(f"{user} needs a balloonlab guest (Guest, LibvirtGuest, SyncGuest or "
                        f"SyncLibvirtGuest), got {type(guest).__name__}")
    if inner.loop is not None and inner.loop is not asyncio.get_running_loop():
        if inner is guest:
            raise TypeError(
                f"guest {inner.name} was made on another event loop (with `await ...launch()` in your "
                f"code) than this {user} runs on (balloonlab's own loop, behind the Sync* classes): "
                f"launch it with SyncGuest.launch(...) for SyncSampler/run_experiment, or use the "
                f"async {user} with `await` on the loop that made the guest")
        raise TypeError(
            f"guest {inner.name} is a {type(guest).__name__}, which lives on balloonlab's own loop, but "
            f"this {user} runs on another one (awaited in your code): pass it to SyncSampler or "
            f"run_experiment(...), or launch it with `await Guest.launch(...)` for the async {user}")
    return inner
