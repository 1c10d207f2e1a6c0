"""The libvirt backend: a domain managed by libvirt, with the API of :class:`balloonlab.Guest`.

:class:`LibvirtGuest` drives a domain on any libvirt URI (default ``qemu:///system``) and
offers what the sampler uses from a :class:`~balloonlab.Guest`: ``name``, ``backend``,
``alive``, ``rss_bytes()``, ``metadata()`` and a ``balloon`` with the same methods and
attributes (:class:`~balloonlab._libvirt_balloon.LibvirtBalloon`, which runs
:class:`~balloonlab.balloon.Balloon`'s own logic over libvirt).

libvirt's rules for the stats period are kept: :meth:`LibvirtGuest.launch` lets libvirt start
the domain (libvirt sets ``<stats period>`` itself before the vCPUs run); :meth:`attach` sets
it again only when asked and only if the domain is running; :meth:`reconnect` never does.

Statistics come two ways (``stats_via``): ``"qmp"`` sends QEMU's own commands through
libvirt's QMP passthrough (``qemuMonitorCommand``: exact bytes, newer stats, unset values,
last-update 0; libvirt marks the domain tainted ``custom-monitor``); ``"libvirt"`` uses
``virDomainMemoryStats`` only (libvirt's KiB back to bytes: the sub-KiB part is lost, unmapped
and unset stats are absent). ``"auto"`` picks ``"qmp"`` on a local ``qemu://`` URI.

libvirt-python is blocking: every call runs in a worker thread; libvirt's events run on one
daemon thread per process and reach the asyncio loop thread-safely.
"""

from __future__ import annotations

try:
    import libvirt
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "balloonlab.libvirt needs libvirt-python: pip install 'balloonlab[libvirt]' (it builds "
        "against libvirt's C library: apt-get install libvirt-dev pkg-config)") from _exc

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from ._libvirt_balloon import LibvirtBalloon, stats_from_libvirt
from ._libvirt_files import (
    agent_root,
    pid_is_domain,
    prepare_xml,
    qemu_log_size,
    qemu_log_tail,
    qemu_pid,
)
from ._libvirt_link import DomainLink, ensure_event_loop, error_text, libvirt_qemu
from .domain import DomainSpec
from .errors import (
    BalloonLabError,
    BalloonNotFound,
    CommandError,
    LaunchError,
    MonitorError,
)
from .guestbase import GuestBase, Origin, as_spec
from .stats import process_rss_bytes
from .workload import Workload

__all__ = ["DEFAULT_URI", "LibvirtBalloon", "LibvirtGuest", "agent_root", "stats_from_libvirt"]

log = logging.getLogger(__name__)
DEFAULT_URI = "qemu:///system"
StatsVia = Literal["auto", "qmp", "libvirt"]


def _is_local_qemu(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme.split("+")[0] == "qemu" and not parts.hostname


def _resolve_via(stats_via: str, uri: str) -> str:
    if stats_via not in ("auto", "qmp", "libvirt"):
        raise ValueError(f"stats_via must be 'auto', 'qmp' or 'libvirt', got {stats_via!r}")
    if stats_via == "auto":
        return "qmp" if libvirt_qemu is not None and _is_local_qemu(uri) else "libvirt"
    return stats_via


async def _open_link(uri: str, name: str, stats_via: str) -> DomainLink:
    via = _resolve_via(stats_via, uri)
    ensure_event_loop()  # before the connection opens, or it gets no events
    try:
        conn = await asyncio.to_thread(libvirt.open, uri)
    except libvirt.libvirtError as exc:
        raise MonitorError(f"cannot connect to libvirt at {uri}: {error_text(exc)} "
                           "(is libvirtd running? scripts/libvirtd start)") from exc
    return DomainLink(conn, name, via=via)


class LibvirtGuest(GuestBase):
    """One libvirt domain and its balloon (async; build with :meth:`launch`, :meth:`attach`
    or :meth:`reconnect`)."""

    #: How balloonlab reaches this guest.
    backend = "libvirt"

    def __init__(self, *, link: DomainLink, spec: DomainSpec, origin: Origin, uri: str,
                 persistent: bool, agent_dir: Path | None = None) -> None:
        super().__init__(spec.name)
        self.link = link
        self.spec = spec
        self.uri = uri
        self.origin: Origin = origin
        self.persistent = persistent
        self.balloon = LibvirtBalloon(link, spec)
        #: QEMU's pid when libvirt runs it on this host (None for remote URIs).
        self.pid = qemu_pid(spec.name, uri) if _is_local_qemu(uri) else None
        self._agent_dir = agent_dir
        self._detached = False
        self._closed = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    async def launch(cls, domain: DomainSpec | str | os.PathLike[str], *, uri: str = DEFAULT_URI,
                     persistent: bool = False, stats_via: StatsVia = "auto", agent: bool = True,
                     boot_timeout_s: float = 90.0) -> LibvirtGuest:
        """Start a domain from domain XML (a DomainSpec, XML text or a file) under libvirt.

        Transient (``virDomainCreateXML``) by default; ``persistent=True`` defines it first
        (``virDomainDefineXML`` + ``virDomainCreate``) and the definition outlives the run. A
        ``<serial type='unix'>`` without a path (the built-in guest's agent port: libvirt
        refuses it with "Missing source path attribute for char device") gets a socket in
        :func:`agent_root`/<name>/ before libvirt sees the XML.

        :param agent: connect to balloonlab's workload agent when the domain has one (waits
            for the guest's first stats report, then the agent's ping).
        :raises LaunchError: libvirt refused or the guest did not come up (libvirt's message
            and the tail of its QEMU log kept). No domain is left defined or running.
        """
        spec = as_spec(domain)
        xml, made_dir = prepare_xml(spec)
        log_start = qemu_log_size(spec.name)
        link: DomainLink | None = None
        try:
            link = await _open_link(uri, spec.name, stats_via)
            await link.watch()  # before the domain exists: no early BALLOON_CHANGE is missed
            dom = await _create(link, spec.name, xml, persistent, log_start)
        except BaseException:
            if link is not None:
                await link.close()
            if made_dir is not None:
                shutil.rmtree(made_dir, ignore_errors=True)
            raise
        link.bind(dom)
        try:
            guest = cls(link=link, spec=await link.live_spec(), origin="launched", uri=uri,
                        persistent=persistent, agent_dir=made_dir)
            if agent and guest.agent_socket is not None:
                await guest._connect_agent(boot_timeout_s)
        except BaseException as exc:
            await _destroy(link, dom, undefine=persistent)
            if made_dir is not None:
                shutil.rmtree(made_dir, ignore_errors=True)
            if isinstance(exc, (BalloonLabError, OSError, asyncio.TimeoutError)):
                raise LaunchError(f"domain {spec.name} did not come up under libvirt: {exc}",
                                  output=qemu_log_tail(spec.name, log_start)) from exc
            raise
        return guest

    @classmethod
    async def attach(cls, name_or_uuid: str, *, uri: str = DEFAULT_URI, set_period: bool = False,
                     stats_via: StatsVia = "auto", agent: bool = False) -> LibvirtGuest:
        """Attach to a running domain (by name or UUID); its live XML becomes ``spec``.

        With ``set_period=True`` the live XML's ``<stats period>`` is applied again, only if
        the domain is running (libvirt's own start already set it: the default does nothing).

        :raises MonitorError: no such domain, or it is not running (libvirt's message kept).
        """
        guest = await cls._adopt(name_or_uuid, uri, stats_via, "attached")

        async def period_rule() -> None:
            if set_period and guest.spec.period_s is not None:
                await guest._apply_period_at_attach(guest.spec.period_s)
        return await guest._settle(period_rule, agent)

    @classmethod
    async def reconnect(cls, name_or_uuid: str, *, uri: str = DEFAULT_URI,
                        stats_via: StatsVia = "auto", agent: bool = False) -> LibvirtGuest:
        """Reconnect to a running domain (e.g. after a kernel restart). Never sets the period:
        a period changed on the live guest stays (:attr:`period_at_connect` holds it)."""
        guest = await cls._adopt(name_or_uuid, uri, stats_via, "reconnected")

        async def read_live_period() -> None:
            if guest.balloon.has_device:
                with contextlib.suppress(BalloonNotFound, CommandError):
                    guest.period_at_connect = await guest.balloon.get_period()
        return await guest._settle(read_live_period, agent)

    async def _settle(self, period_rule: Callable[[], Awaitable[None]], agent: bool) -> LibvirtGuest:
        """Apply the origin's period rule and connect the agent if asked; on any failure the
        handle is disconnected (the domain itself is left as it was)."""
        try:
            await period_rule()
            if agent and self.agent_socket is not None:
                await self._connect_agent(30.0)
        except BaseException:
            await self._disconnect()
            raise
        return self

    @classmethod
    async def _adopt(cls, name_or_uuid: str, uri: str, stats_via: str, origin: Origin) -> LibvirtGuest:
        link = await _open_link(uri, name_or_uuid, stats_via)
        try:
            looks_uuid = len(name_or_uuid) == 36 and name_or_uuid.count("-") == 4
            lookup = link.conn.lookupByUUIDString if looks_uuid else link.conn.lookupByName
            dom = await link.call("virDomainLookupBy" + ("UUIDString" if looks_uuid else "Name"),
                                  lookup, name_or_uuid)
            link.bind(dom)
            await link.watch()
            if not await link.call("virDomainIsActive", dom.isActive):
                raise MonitorError(f"domain {link.name} is not running: start it (virsh start "
                                   f"{link.name}) or use LibvirtGuest.launch")
            persistent = bool(await link.call("virDomainIsPersistent", dom.isPersistent))
            return cls(link=link, spec=await link.live_spec(), origin=origin, uri=uri,
                       persistent=persistent)
        except BaseException:
            await link.close()
            raise

    # -- state ----------------------------------------------------------------------------
    @property
    def stats_via(self) -> str:
        """``"qmp"`` or ``"libvirt"``: how statistics are read (see the module docstring)."""
        return self.link.via

    @property
    def alive(self) -> bool:
        """True while the domain's QEMU runs (paused counts): False once libvirt reported it
        stopped, or the QEMU process is gone."""
        if self._closed or self.link.stopped is not None:
            return False
        if self.pid is not None:
            return pid_is_domain(self.pid, self.name)
        return self.link.closed_reason is None

    @property
    def detached(self) -> bool:
        """True when :meth:`close` leaves the domain running."""
        return self._detached or self.origin != "launched"

    @property
    def agent_socket(self) -> str | None:
        """The host end of the workload agent's serial port (the built-in guest only)."""
        if not self.spec.agent:
            return None
        return next((s.path for s in self.spec.serials if s.port == 1 and s.type == "unix"), None)

    async def status(self) -> str:
        """The domain's run state (``running``, ``paused``, ``shutoff``...)."""
        return str((await self.link.execute("query-status"))["status"])

    def rss_bytes(self) -> int | None:
        """Host RSS of QEMU: from /proc when local, else libvirt's last reported ``rss``."""
        if self.pid is not None:
            return process_rss_bytes(self.pid)
        return self.balloon.last_rss

    async def metadata(self) -> dict[str, object]:
        """What a run records about this guest: URI, live domain XML, versions, stats path."""
        conn = self.link.conn
        hv = await self.link.call("virConnectGetVersion", conn.getVersion)
        lib = await self.link.call("virConnectGetLibVersion", conn.getLibVersion)
        try:
            xml = await self.link.live_xml()
        except BalloonLabError:
            xml = self.spec.xml
        argv = None
        if self.pid is not None:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        return {"name": self.name, "backend": self.backend, "origin": self.origin, "pid": self.pid,
                "uri": self.uri, "uuid": self.link.uuid, "persistent": self.persistent,
                "qemu_version": _version(hv), "libvirt_version": _version(lib),
                "argv": argv, "accel": "kvm" if self.spec.domain_type == "kvm" else "tcg",
                "qmp_socket": None, "domain_xml": xml, "stats_via": self.stats_via,
                "warnings": list(self.warnings)}

    # -- ownership and shutdown -----------------------------------------------------------
    def detach(self) -> None:
        """Let the domain outlive this handle (:meth:`close` leaves it running)."""
        self._detached = True

    async def shutdown(self, timeout_s: float = 10.0, *, undefine: bool = False) -> bool:
        """Stop the domain: ``virDomainDestroyFlags(GRACEFUL)`` (SIGTERM, QEMU exits cleanly,
        as QMP ``quit``), else a plain destroy (SIGKILL). libvirt applies its own wait (about
        10 s); ``timeout_s`` is accepted for :meth:`Guest.shutdown`'s signature.

        :param undefine: also remove a persistent domain's definition.
        :returns: True when QEMU stopped on SIGTERM (or was already gone).
        """
        if self._closed:
            return True
        if self._workload is not None:
            await self._workload.close()
        graceful = await _destroy(self.link, self.link.dom, undefine=undefine)
        if self._agent_dir is not None and (not self.persistent or undefine):
            shutil.rmtree(self._agent_dir, ignore_errors=True)
        self._closed = True
        return graceful

    async def close(self) -> None:
        """Release this handle: a launched domain is stopped (a persistent one stays defined);
        attached, reconnected and detached ones keep running."""
        if self._closed:
            return
        if not self.detached:
            await self.shutdown()
        else:
            await self._disconnect()

    # -- internals ------------------------------------------------------------------------
    async def _connect_agent(self, timeout_s: float) -> None:
        # The agent starts right after the guest loaded its modules: wait for the balloon
        # driver's first report (read through libvirt, so the sampler's first read is "new").
        deadline = time.monotonic() + timeout_s
        nodriver = "balloonlab.nodriver=1" in (self.spec.cmdline or "")
        while self.balloon.has_device and self.spec.period_s and not nodriver:
            if (await self.link.memory_stats()).get("last_update"):
                break
            if time.monotonic() > deadline:
                raise LaunchError(f"guest {self.name} never reported balloon stats within {timeout_s} s")
            await asyncio.sleep(0.1)
        workload = Workload(str(self.agent_socket))
        await workload.connect(timeout_s=max(5.0, deadline - time.monotonic()))
        self._workload = workload

    async def _disconnect(self) -> None:
        if self._workload is not None:
            await self._workload.close()
        await self.link.close()
        self._closed = True

    def __repr__(self) -> str:
        return f"<LibvirtGuest {self.name} {self.origin} {self.uri} via={self.stats_via} pid={self.pid}>"


async def _create(link: DomainLink, name: str, xml: str, persistent: bool,
                  log_start: int) -> libvirt.virDomain:
    conn = link.conn
    try:
        existing = await asyncio.to_thread(conn.lookupByName, name)
    except libvirt.libvirtError:
        existing = None
    if existing is not None:  # defineXML would silently replace its definition
        raise LaunchError(f"a libvirt domain named {name!r} already exists on {conn.getURI()}: "
                          "choose another name, or attach to it")
    dom = None
    try:
        if persistent:
            dom = await asyncio.to_thread(conn.defineXML, xml)
            await asyncio.to_thread(dom.create)
        else:
            dom = await asyncio.to_thread(conn.createXML, xml, 0)
    except libvirt.libvirtError as exc:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.undefine)
        raise LaunchError(f"libvirt could not start domain {name}: {error_text(exc)}",
                          output=qemu_log_tail(name, log_start)) from exc
    return dom


async def _destroy(link: DomainLink, dom: libvirt.virDomain | None, *, undefine: bool) -> bool:
    """Stop ``dom`` (graceful first), optionally undefine it, close the link."""
    graceful = True
    if dom is not None:
        def active() -> bool:
            try:
                return bool(dom.isActive())
            except libvirt.libvirtError as exc:  # a transient domain that stopped is gone
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        def stop() -> bool:
            try:
                if not active():
                    return True
                dom.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)
                return True
            except libvirt.libvirtError as exc:
                log.warning("%s did not stop on SIGTERM (%s): destroying it", dom.name(), error_text(exc))
            with contextlib.suppress(libvirt.libvirtError):
                if active():
                    dom.destroy()
            return False

        graceful = await asyncio.to_thread(stop)
        if undefine:
            with contextlib.suppress(libvirt.libvirtError):
                await asyncio.to_thread(dom.undefine)
    await link.close()
    return graceful


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
