"""What every guest offers, whatever reaches it: the balloon, the workload agent, warnings,
libvirt's rule for the statistics period at attach, and the rollback of a failed launch.

:class:`GuestBase` is the shared part of :class:`~balloonlab.qemu.guest.Guest` and
:class:`~balloonlab.libvirt.guest.LibvirtGuest`; both satisfy
:class:`~balloonlab.model.protocols.GuestProtocol`.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal, Self

from balloonlab.model.balloon import BalloonBase
from balloonlab.model.errors import BalloonLabError, BalloonLabWarning, BalloonNotFound, CommandError, LaunchError
from balloonlab.model.guest_view import AgentExecute, GuestView, read_guest_view
from balloonlab.model.procfs import HostLayout, HostMemory, HostMemoryReader, ProcessStat
from balloonlab.model.protocols import AgentProtocol, GuestProtocol, Origin
from balloonlab.model.schema import HOST_MEMINFO
from balloonlab.model.stats import BalloonStats, libvirt_view

log = logging.getLogger(__name__)
#: What :meth:`GuestBase.host_memory` reads: ``"split"`` (smaps_rollup and guest RAM / TCG /
#: other), ``"rollup"`` (smaps_rollup only) or ``"off"`` (nothing: None).
HostView = Literal["split", "rollup", "off"]
#: How often a guest asks QEMU again whether its memory backends changed (one QMP command):
#: a backend hot-added later joins the split within this long (until then it counts as other).
LAYOUT_RECHECK_S = 60.0
#: How often a guest with virtio-mem reads its devices again although QEMU reported no size
#: change: a requested size another QMP client set shows within this long.
VMEM_RECHECK_S = 5.0
#: A virtio-mem device as the sample columns need it: (QEMU id, plugged, requested, backend
#: size), bytes.
VmemDevice = tuple[str, int, int, int]


#: This machine's name (the ``host`` of local guests and of the host frame).
LOCAL_HOST = socket.gethostname()


def vmem_columns(devices: Sequence[VmemDevice]) -> dict[str, int]:
    """The virtio-mem sample columns of ``devices`` (:data:`~balloonlab.model.schema.VMEM_COLUMNS`):
    sums over every device, plus ``vmem_size.<id>`` and ``vmem_requested.<id>`` per device when
    there are several; empty (NA in the frame) for none."""
    if not devices:
        return {}
    row = {"vmem_size": sum(d[1] for d in devices), "vmem_requested": sum(d[2] for d in devices),
           "vmem_max_size": sum(d[3] for d in devices)}
    if len(devices) > 1:
        for dev_id, size, requested, _ in devices:
            row[f"vmem_size.{dev_id}"], row[f"vmem_requested.{dev_id}"] = size, requested
    return row


class GuestBase(abc.ABC):
    """What a guest offers whatever the backend: its balloon, the workload agent, warnings,
    and the period rule shared by launch and attach."""

    #: How balloonlab reaches this guest.
    backend = "qmp"
    balloon: BalloonBase
    origin: Origin
    #: The QEMU process on this host, when known (the backends set it).
    pid: int | None = None
    #: What :meth:`host_memory` reads (see :data:`HostView`); set it per guest.
    host_view: HostView = "split"
    #: The machine QEMU runs on, the frames' ``host`` column: this machine's name, or a remote
    #: libvirt URI's host. Set it before the guest is sampled to name hosts your own way.
    host: str = LOCAL_HOST
    #: QEMU runs on this machine: its last-update is on this clock (model.clock), its memory
    #: is this host's (the host frame counts it).
    on_this_host: bool = True

    def __init__(self, name: str) -> None:
        self.name = name
        #: Things that did not go as the domain XML asked (also emitted as Python warnings).
        self.warnings: list[str] = []
        #: The polling period found on the live guest at reconnect (never changed there).
        self.period_at_connect: int | None = None
        self._workload: AgentProtocol | None = None
        #: qemu-guest-agent's command channel, when the domain has one (the backends set it).
        self._agent_execute: AgentExecute | None = None
        # Guests are built inside their backend's async constructors: this is the loop their
        # connections (QMP client, agent socket, libvirt callbacks) are bound to.
        self.loop: asyncio.AbstractEventLoop | None = _running_loop()
        self._stat = ProcessStat()  # /proc/PID/stat kept open for rss
        self._host = HostMemoryReader()  # smaps_rollup and pagemap kept open for host_memory()
        #: Where QEMU keeps guest RAM and the TCG buffer, once found (see :meth:`host_memory`).
        self.host_layout: HostLayout | None = None
        #: Why the layout could not be found, if it could not.
        self.host_layout_error: str | None = None
        self._layout_job: asyncio.Future[None] | concurrent.futures.Future[None] | None = None
        self._layout_due = 0.0
        self._vmem: dict[str, int] = {}  # the virtio-mem columns last read (vmem_columns())
        self._vmem_job: asyncio.Future[None] | concurrent.futures.Future[None] | None = None
        self._vmem_due = 0.0
        self._vmem_seen = -1  # _vmem_version() when the devices were last asked for
        #: Grows with every virtio-mem size change the backend hears of (QEMU's
        #: MEMORY_DEVICE_SIZE_CHANGE): a change makes the next sample ask for the devices again.
        self._vmem_version: Callable[[], int] = lambda: 0

    @property
    def workload(self) -> AgentProtocol:
        """The in-guest workload: balloonlab's agent in the built-in guest, else qemu-guest-agent
        (commands run through ``guest-exec``: :class:`~balloonlab.model.qga_workload.QgaWorkload`).

        :raises BalloonLabError: this guest has neither.
        """
        if self._workload is None and self._agent_execute is not None:
            from balloonlab.model.qga_workload import QgaWorkload
            self._workload = QgaWorkload(self._agent_execute, self.name)
        if self._workload is None:
            raise BalloonLabError(f"guest {self.name} has no workload agent: balloonlab's built-in guest has one, "
                                  "and any guest with a qemu-guest-agent <channel> (org.qemu.guest_agent.0) in its "
                                  "domain XML can run workloads through it")
        return self._workload

    @property
    def has_agent(self) -> bool:
        """True when workloads can be driven in the guest (balloonlab's agent or qemu-guest-agent)."""
        return self._workload is not None or self._agent_execute is not None

    @property
    def has_guest_agent(self) -> bool:
        """True when the domain has a qemu-guest-agent channel (whether the agent answers or not)."""
        return self._agent_execute is not None

    async def read_guest_view(self) -> GuestView | None:
        """The guest's own /proc/meminfo and /proc/vmstat as the frame's ``guest_*`` columns:
        through qemu-guest-agent when the domain has its channel, else balloonlab's agent's
        meminfo (five fields); None when the guest has neither.

        :raises AgentError: the agent does not answer (yet) or refused.
        """
        if self._agent_execute is not None:
            return await read_guest_view(self._agent_execute)
        if self._workload is None:
            return None
        read_time, started = time.time(), time.monotonic()
        fields = await self._workload.meminfo()
        columns = {f"guest_{HOST_MEMINFO[name]}": value for name, value in fields.items() if name in HOST_MEMINFO}
        return GuestView(read_time, time.monotonic() - started, columns, "agent")

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """True while the guest's QEMU runs."""

    @property
    @abc.abstractmethod
    def detached(self) -> bool:
        """True when :meth:`close` leaves the guest running."""

    def rss_bytes(self) -> int | None:
        """Host RSS of the QEMU process (libvirt's ``rss``), when its pid is known."""
        return self._stat.rss_bytes(self.pid)

    def host_memory(self) -> HostMemory | None:
        """QEMU's memory as the host sees it now; None when its process is not on this host.

        One ``pread`` of a kept-open ``/proc/PID/smaps_rollup`` (every field, bytes) and, once
        the guest's RAM blocks and TCG buffer are known (:attr:`host_layout`), one
        ``PAGEMAP_SCAN`` per range for the split into guest RAM, TCG buffer and the rest
        (see :mod:`balloonlab.model.procfs` for what each read costs). The layout is asked of
        QEMU in the background at the first call and checked again every
        :data:`LAYOUT_RECHECK_S` (the split is NA until it is known, and stays NA when the
        backend cannot tell, e.g. libvirt without QMP passthrough). :attr:`host_view` chooses
        how much is read. Not a coroutine: the sampler calls it with each sample.
        """
        pid = self.pid
        if pid is None or self.host_view == "off":
            return None
        return self._host.read(pid, self._layout_of(pid) if self.host_view == "split" else None)

    async def _host_layout(self, previous: HostLayout | None) -> HostLayout | None:
        """Where this guest's QEMU keeps guest RAM and the TCG buffer (None: this backend
        cannot tell); ``previous`` may be returned when nothing changed."""
        return None

    def _layout_of(self, pid: int) -> HostLayout | None:
        """The known layout of ``pid``; starts a lookup when none runs and one is due."""
        job = self._layout_job
        if (job is None or job.done()) and time.monotonic() >= self._layout_due and self.alive:
            self._layout_due = time.monotonic() + LAYOUT_RECHECK_S
            self._layout_job = self._in_background(self._learn_layout())
        layout = self.host_layout
        return layout if layout is not None and layout.pid == pid else None

    async def _learn_layout(self) -> None:
        try:
            self.host_layout = await self._host_layout(self.host_layout)
            self.host_layout_error = None
        except (BalloonLabError, OSError, ValueError, KeyError, TypeError) as exc:
            if self.host_layout_error is None:
                log.info("%s: guest RAM not found in QEMU's address space: %s", self.name, exc)
            self.host_layout_error = f"{type(exc).__name__}: {exc}"

    def _in_background(self, coro: Coroutine[Any, Any, None]
                       ) -> asyncio.Future[None] | concurrent.futures.Future[None] | None:
        """Run ``coro`` on this guest's loop without waiting (from its loop or any thread)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            coro.close()
            return None
        if _running_loop() is loop:
            return loop.create_task(coro, name=f"balloonlab-host-layout-{self.name}")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def vmem_columns(self) -> dict[str, int]:
        """The guest's virtio-mem devices as sample columns (:func:`vmem_columns`), as last read.

        Not a coroutine and no QMP command per sample: the devices are asked for
        (``query-memory-devices``, in the background) at the first call, again at the next
        call after QEMU reported a size change, and every :data:`VMEM_RECHECK_S` (every
        :data:`LAYOUT_RECHECK_S` for a guest that had none: one may be hot-plugged). Until the
        first answer, and for a guest without virtio-mem, it is empty (NA columns).
        """
        version = self._vmem_version()
        job = self._vmem_job
        if ((job is None or job.done()) and (version != self._vmem_seen or time.monotonic() >= self._vmem_due)
                and self.alive):
            self._vmem_due = time.monotonic() + LAYOUT_RECHECK_S  # until the answer says more
            self._vmem_job = self._in_background(self._learn_vmem(version))
        return self._vmem

    async def _vmem_devices(self) -> list[VmemDevice] | None:
        """This guest's virtio-mem devices (None: this backend cannot ask)."""
        return None

    async def _learn_vmem(self, version: int) -> None:
        try:
            devices = await self._vmem_devices()
        except (BalloonLabError, OSError, ValueError, KeyError, TypeError) as exc:
            log.info("%s: virtio-mem devices not read: %s", self.name, exc)
            return
        self._vmem_seen = version
        self._vmem = vmem_columns(devices or [])
        if devices is None:
            self._vmem_due = float("inf")
        elif devices:
            self._vmem_due = time.monotonic() + VMEM_RECHECK_S

    def _close_host_view(self) -> None:
        """Close the /proc files kept open and stop lookups still running."""
        self._stat.close()
        self._host.close()
        for job in (self._layout_job, self._vmem_job):
            if job is not None and not job.done():
                job.cancel()
        self._layout_job = self._vmem_job = None

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
