"""A domain managed by libvirt: launch from domain XML, attach, reconnect, detach, shut down.

The lifecycle half of the libvirt backend (see :mod:`balloonlab.libvirt` for the period
rules and the two ways statistics are read). libvirt-python is blocking: every call runs on
libvirt's call threads with a time limit (:meth:`DomainLink.call`); libvirt's events run on
one daemon thread per process and reach the asyncio loop thread-safely.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import libvirt

from balloonlab.domain import DomainSpec, as_spec
from balloonlab.image.agent import Workload
from balloonlab.libvirt.balloon import LibvirtBalloon
from balloonlab.libvirt.files import agent_root, launch_log_tail, pid_is_domain, prepare_xml, qemu_log_size, qemu_pid
from balloonlab.libvirt.link import DomainLink, StatsVia, is_local_qemu, open_link
from balloonlab.model.deadline import Deadline, wait_until
from balloonlab.model.errors import BalloonLabError, BalloonNotFound, CommandError, LaunchError, MonitorError
from balloonlab.model.guest import LOCAL_HOST, GuestBase, VmemDevice, rollback
from balloonlab.model.procfs import HostLayout, process_args
from balloonlab.model.protocols import Origin
from balloonlab.qemu.host_memory import host_layout, vmem_devices

__all__ = ["DEFAULT_URI", "LibvirtGuest", "agent_root"]

log = logging.getLogger(__name__)
DEFAULT_URI = "qemu:///system"
#: The least time libvirt is given to start a domain (QEMU's start under load).
_START_TIMEOUT_S = 60.0


class LibvirtGuest(GuestBase):
    """One libvirt domain and its balloon (async; build with :meth:`launch`, :meth:`attach`
    or :meth:`reconnect`)."""

    #: How balloonlab reaches this guest.
    backend = "libvirt"
    balloon: LibvirtBalloon

    def __init__(self, *, link: DomainLink, spec: DomainSpec, origin: Origin, uri: str,
                 persistent: bool, agent_dir: Path | None = None) -> None:
        super().__init__(spec.name)
        self.link = link
        self.spec = spec
        self._agent_execute = link.agent if spec.agent_channel is not None else None  # qemu-guest-agent, via libvirt
        self.uri = uri
        self.origin: Origin = origin
        self.persistent = persistent
        self.balloon = LibvirtBalloon(link, spec)
        #: QEMU's pid when libvirt runs it on this host (None for remote URIs).
        self.pid = qemu_pid(spec.name, uri) if is_local_qemu(uri) else None
        self.on_this_host = is_local_qemu(uri)
        self.host = LOCAL_HOST if self.on_this_host else (urlsplit(uri).hostname or uri)
        self._agent_dir = agent_dir
        self._detached = False
        self._closed = False

    # -- construction ---------------------------------------------------------------------
    @classmethod
    async def launch(cls, domain: DomainSpec | str | os.PathLike[str], *, uri: str = DEFAULT_URI,
                     persistent: bool = False, stats_via: StatsVia = "auto", agent: bool | None = None,
                     boot_timeout_s: float = 90.0) -> LibvirtGuest:
        """Start a domain from domain XML (a DomainSpec, XML text or a file) under libvirt.

        Transient (``virDomainCreateXML``) by default; ``persistent=True`` defines it first
        (``virDomainDefineXML`` + ``virDomainCreate``) and the definition outlives the run. A
        ``<serial type='unix'>`` without a path (the built-in guest's agent port: libvirt
        refuses it with "Missing source path attribute for char device") gets a socket in
        :func:`agent_root`/<name>/ before libvirt sees the XML.

        :param agent: connect to balloonlab's workload agent when the domain has one (waits
            for the guest's first stats report, then the agent's ping). None (the default):
            on a local URI; never on a remote one, whose agent port is a socket on the other
            host, out of balloonlab's reach (the port is then connected to nothing).
        :raises LaunchError: libvirt refused or the guest did not come up (libvirt's message
            and the tail of its QEMU log kept); ``agent=True`` on a remote URI. No domain is
            left defined or running.
        """
        spec = as_spec(domain)
        remote = not is_local_qemu(uri)
        if agent and remote:
            raise LaunchError(f"the workload agent talks over a unix socket on QEMU's host, which {uri} is not: "
                              "launch with agent=False (the default there) and drive memory in the guest another way")
        agent = not remote if agent is None else agent
        xml, made_dir = prepare_xml(spec, remote=remote)
        log_start = qemu_log_size(spec.name)
        link = await open_link(uri, spec.name, stats_via)

        async def close_link() -> None:
            await link.close()
            if made_dir is not None:
                shutil.rmtree(made_dir, ignore_errors=True)
        async with rollback(close_link):
            await link.watch()  # before the domain exists: no early BALLOON_CHANGE is missed
            dom = await _create(link, uri, spec.name, xml, persistent, log_start)
        link.bind(dom)

        async def destroy() -> None:
            await _destroy(link, dom, undefine=persistent, pid=qemu_pid(spec.name, uri) if is_local_qemu(uri) else None)
            if made_dir is not None:
                shutil.rmtree(made_dir, ignore_errors=True)

        def failed(exc: BaseException) -> LaunchError:
            return LaunchError(f"domain {spec.name} did not come up under libvirt: {exc}",
                               output=launch_log_tail(uri, spec.name, log_start))
        async with rollback(destroy, failed):
            guest = cls(link=link, spec=await link.live_spec(), origin="launched", uri=uri,
                        persistent=persistent, agent_dir=made_dir)
            if agent and guest.agent_socket is not None:
                await guest._connect_agent(boot_timeout_s)
        return guest

    @classmethod
    async def attach(cls, name_or_uuid: str, *, uri: str = DEFAULT_URI, set_period: bool = True,
                     stats_via: StatsVia = "auto", agent: bool = False) -> LibvirtGuest:
        """Attach to a running domain (by name or UUID); its live XML becomes ``spec``.

        As :meth:`Guest.attach`: the live XML's ``<stats period>`` is applied only if the
        domain is running (libvirt's own start already set it, so this normally changes
        nothing; ``set_period=False`` leaves the period alone).

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
        async with rollback(self._disconnect):
            await period_rule()
            if agent and self.agent_socket is not None:
                await self._connect_agent(30.0)
        return self

    @classmethod
    async def _adopt(cls, name_or_uuid: str, uri: str, stats_via: str, origin: Origin) -> LibvirtGuest:
        link = await open_link(uri, name_or_uuid, stats_via)
        async with rollback(link.close):
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
            guest = cls(link=link, spec=await link.live_spec(), origin=origin, uri=uri,
                        persistent=persistent)
        return guest

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

    def rss_bytes(self) -> int | None:
        """Host RSS of QEMU: from /proc when local (a kept-open /proc/PID/stat), else libvirt's
        last reported ``rss``."""
        if self.pid is not None:
            return super().rss_bytes()
        return self.balloon.last_rss

    async def _host_layout(self, previous: HostLayout | None) -> HostLayout | None:
        """Guest RAM blocks and the TCG buffer of a local domain's QEMU, asked through QMP
        passthrough (the same commands as the QEMU backend's); None without passthrough
        (``stats_via="libvirt"``: host_memory() then has the rollup, not the split)."""
        if self.pid is None or self.link.via != "qmp":
            return None
        return await host_layout(self.link, self.pid, previous)

    async def _vmem_devices(self) -> list[VmemDevice] | None:
        """Its virtio-mem devices through QMP passthrough (local or not; None without it).
        No size-change events here: read again every :data:`~balloonlab.model.guest.VMEM_RECHECK_S`."""
        return await vmem_devices(self.link) if self.link.via == "qmp" else None

    async def metadata(self) -> dict[str, object]:
        """What a run records about this guest: URI, live domain XML, versions, stats path."""
        conn = self.link.conn
        hv = await self.link.call("virConnectGetVersion", conn.getVersion)
        lib = await self.link.call("virConnectGetLibVersion", conn.getLibVersion)
        try:
            xml = await self.link.live_xml()
        except BalloonLabError:
            xml = self.spec.xml
        args = process_args(self.pid) if self.pid is not None else None
        argv = [a.decode(errors="replace") for a in args] if args is not None else None
        return {"name": self.name, "backend": self.backend, "origin": self.origin, "pid": self.pid,
                "uri": self.uri, "uuid": self.link.uuid, "persistent": self.persistent,
                "qemu_version": _version(hv), "libvirt_version": _version(lib),
                "argv": argv, "accel": "kvm" if self.spec.domain_type == "kvm" else "tcg",
                "qmp_socket": None, "domain_xml": xml, "stats_via": self.stats_via,
                "warnings": list(self.warnings)}

    # -- ownership and shutdown -----------------------------------------------------------
    async def detach(self) -> None:
        """Let the domain outlive this handle (:meth:`close` leaves it running)."""
        self._detached = True

    async def shutdown(self, timeout_s: float = 10.0, *, undefine: bool = False) -> bool:
        """Stop the domain: ``virDomainDestroyFlags(GRACEFUL)`` (SIGTERM, QEMU exits cleanly,
        as QMP ``quit``) for at most ``timeout_s``, then SIGKILL. On this host QEMU is killed
        by its pid and libvirt stops the domain about 2 s later; on a remote URI libvirt's own
        graceful wait (about 15 s) cannot be cut short and the plain destroy follows it. Every
        libvirt call is bounded by the link's
        :attr:`~balloonlab.libvirt.link.DomainLink.call_timeout_s`.

        :param timeout_s: how long QEMU may take to exit on SIGTERM.
        :param undefine: also remove a persistent domain's definition.
        :returns: True when QEMU stopped on SIGTERM (or was already gone).
        """
        if self._closed:
            return True
        self._close_host_view()
        if self._workload is not None:
            await self._workload.close()
        graceful = await _destroy(self.link, self.link.dom, undefine=undefine, timeout_s=timeout_s, pid=self.pid)
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
        deadline = Deadline(timeout_s)
        nodriver = "balloonlab.nodriver=1" in (self.spec.cmdline or "")
        if self.balloon.has_device and self.spec.period_s and not nodriver:
            async def reported() -> bool:
                return bool((await self.link.memory_stats()).get("last_update"))
            if not await wait_until(reported, timeout_s, poll_s=0.1):
                raise LaunchError(f"guest {self.name} never reported balloon stats within {timeout_s} s")
        workload = Workload(str(self.agent_socket))
        await workload.connect(timeout_s=max(5.0, deadline.left_s))
        self._workload = workload

    async def _disconnect(self) -> None:
        self._close_host_view()
        if self._workload is not None:
            await self._workload.close()
        await self.link.close()
        self._closed = True

    def __repr__(self) -> str:
        return f"<LibvirtGuest {self.name} {self.origin} {self.uri} via={self.stats_via} pid={self.pid}>"


async def _create(link: DomainLink, uri: str, name: str, xml: str, persistent: bool,
                  log_start: int) -> libvirt.virDomain:
    conn = link.conn

    def lookup() -> libvirt.virDomain | None:
        try:
            return conn.lookupByName(name)
        except libvirt.libvirtError:
            return None
    if await link.call("virDomainLookupByName", lookup) is not None:  # defineXML would silently replace it
        raise LaunchError(f"a libvirt domain named {name!r} already exists on {uri}: "
                          "choose another name, or attach to it")

    def start() -> libvirt.virDomain:
        if not persistent:
            return conn.createXML(xml, 0)
        dom = conn.defineXML(xml)
        try:
            dom.create()
        except libvirt.libvirtError:
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
            raise
        return dom

    def undo(late: libvirt.virDomain) -> None:
        # libvirt started it after launch gave up: a domain nobody holds must not keep running.
        with contextlib.suppress(libvirt.libvirtError):
            late.destroy()
        if persistent:
            with contextlib.suppress(libvirt.libvirtError):
                late.undefine()
    try:
        # QEMU starting (and libvirt's first QMP exchange) under load can take a while.
        dom = await link.call("virDomainCreateXML", start, abandoned=undo,
                              timeout_s=max(link.call_timeout_s, _START_TIMEOUT_S))
    except BalloonLabError as exc:  # libvirt's refusal (its words kept), or no answer in time
        why = exc.desc if isinstance(exc, CommandError) else str(exc)
        raise LaunchError(f"libvirt could not start domain {name}: {why}",
                          output=launch_log_tail(uri, name, log_start)) from exc
    return dom


async def _destroy(link: DomainLink, dom: libvirt.virDomain | None, *, undefine: bool,
                   timeout_s: float = 10.0, pid: int | None = None) -> bool:
    """Stop ``dom``: SIGTERM through ``destroyFlags(GRACEFUL)``, waiting at most ``timeout_s``,
    then SIGKILL; optionally undefine it; close the link.

    :param pid: QEMU's pid on this host, if known (see below).
    :returns: True when QEMU stopped on SIGTERM (or was not running).
    """
    graceful = True
    if dom is not None:
        def active() -> bool:
            try:
                return bool(dom.isActive())
            except libvirt.libvirtError as exc:  # a transient domain that stopped is gone
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise

        try:
            if await link.call("virDomainIsActive", active):
                await link.call("virDomainDestroyFlags", dom.destroyFlags, libvirt.VIR_DOMAIN_DESTROY_GRACEFUL,
                                timeout_s=max(timeout_s, 0.0))
        except BalloonLabError as exc:
            graceful = False
            log.warning("%s did not stop on SIGTERM within %s s (%s): killing it", link.name, timeout_s, exc)
            if pid is not None and pid_is_domain(pid, link.name):
                # libvirt holds the domain for as long as its graceful destroy waits (about
                # 15 s for a QEMU that ignores SIGTERM), so a plain destroy would wait behind
                # it: SIGKILL QEMU as that destroy would, and libvirt stops the domain within
                # about 2 s. Remote (or unseen) QEMUs get the plain destroy alone.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                if await link.call("virDomainIsActive", active):
                    await link.call("virDomainDestroy", dom.destroy)
            except BalloonLabError as again:
                log.error("%s: could not destroy the domain: %s", link.name, again)
        if undefine:
            with contextlib.suppress(BalloonLabError):
                await link.call("virDomainUndefine", dom.undefine)
    await link.close()
    return graceful


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
