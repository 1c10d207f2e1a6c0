"""A link to one libvirt domain: libvirt's API for it, its events, and QMP passthrough.

libvirt-python is blocking: every call runs on libvirt's own call threads with a time limit
(:func:`~balloonlab.libvirt.api.blocking_call`; a hung libvirtd raises MonitorError). Events
arrive on libvirt's event thread (:func:`~balloonlab.libvirt.api.ensure_event_loop`) and are
handed to the asyncio loop with ``call_soon_threadsafe``. With ``via == "qmp"`` the link is
also a :class:`~balloonlab.qemu.transport.QMPTransport`: QEMU's own commands go through
``qemuMonitorCommand``, so the QMP backend's discovery and balloon reads run over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import libvirt

from balloonlab.domain import DomainSpec, parse_domain_xml
from balloonlab.libvirt.api import (CallTimedOut, blocking_call, domain_gone, ensure_event_loop, error_text, map_error,
                                    state_name)
from balloonlab.model.errors import AgentUnavailable, CommandError, GuestAgentError, MonitorError
from balloonlab.model.period import LIBVIRT_MAX_PERIOD_S, validate_period
from balloonlab.qemu.transport import ConnectionCache, QMPEvent

#: How long libvirt waits for the guest agent's answer (seconds; libvirt's own default blocks).
AGENT_TIMEOUT_S = 10

try:
    import libvirt_qemu
except ImportError:  # pragma: no cover - shipped with libvirt-python
    libvirt_qemu = None

log = logging.getLogger(__name__)
StatsVia = Literal["auto", "qmp", "libvirt"]
#: How long a call on a domain waits for a restarted libvirtd (its first start takes ~8 s).
RECONNECT_S = 30.0
#: How long one libvirt call may take by default before it raises MonitorError: above
#: libvirt's own waits (a graceful destroy's 15 s, a QEMU monitor job's), about what its
#: keepalive (5 s x 5) takes to notice a dead connection.
CALL_TIMEOUT_S = 30.0


def is_local_qemu(uri: str) -> bool:
    """True for a QEMU driver URI on this host (``qemu:///system``, ``qemu:///session``)."""
    parts = urlsplit(uri)
    return parts.scheme.split("+")[0] == "qemu" and not parts.hostname


def resolve_via(stats_via: str, uri: str) -> str:
    """``auto`` -> ``qmp`` on a local QEMU URI with libvirt_qemu, else ``libvirt``.

    :raises ValueError: not one of auto, qmp, libvirt.
    """
    if stats_via not in ("auto", "qmp", "libvirt"):
        raise ValueError(f"stats_via must be 'auto', 'qmp' or 'libvirt', got {stats_via!r}")
    if stats_via == "auto":
        return "qmp" if libvirt_qemu is not None and is_local_qemu(uri) else "libvirt"
    return stats_via


class DomainLink:
    """One libvirt connection to one domain: libvirt's API for it, its events, and QEMU's QMP
    through passthrough (a :class:`~balloonlab.qemu.transport.QMPTransport`).

    :param conn: an open ``virConnect`` (opened after :func:`ensure_event_loop`).
    :param name: the domain's name (events are matched by it until the UUID is known).
    :param via: ``"qmp"`` allows QMP passthrough (``qemuMonitorCommand``), ``"libvirt"``
        uses libvirt's API only.
    :param call_timeout_s: the time limit of every call on this link (see :meth:`call`).
    :param uri: the connection's URI; with it, calls on the domain survive a libvirtd restart
        (the link reopens the connection, finds the domain by UUID, subscribes again and
        retries once; see :meth:`reopen`).
    """

    socket_path = None  # libvirt owns QEMU's monitor socket

    def __init__(self, conn: libvirt.virConnect, name: str, *, via: str,
                 call_timeout_s: float = CALL_TIMEOUT_S, uri: str | None = None) -> None:
        self.conn = conn
        #: Where to reopen the connection when libvirtd restarts (None: never reopen).
        self.uri = uri
        #: How long a call waits for a restarted libvirtd to answer again.
        self.reconnect_s = RECONNECT_S
        #: Connections reopened after libvirtd went away.
        self.reconnects = 0
        self.name = name
        self.via = via
        #: A libvirt call with no answer after this long raises MonitorError (settable).
        self.call_timeout_s = call_timeout_s
        self.dom: libvirt.virDomain | None = None
        self.uuid: str | None = None
        #: libvirt calls made through this link (one per sample for memoryStats).
        self.round_trips = 0
        self.cache = ConnectionCache()  # the QOM path found through passthrough, per link
        #: Set once libvirt reported the domain stopped, or said it is gone.
        self.stopped: str | None = None
        self.closed_reason: str | None = None
        self._handlers: list[Callable[[QMPEvent], None]] = []
        self._lifecycle: list[Callable[[int, int], None]] = []
        self._callback_ids: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, dom: libvirt.virDomain) -> None:
        """The domain this link follows from now on."""
        self.dom = dom
        self.uuid = dom.UUIDString()
        self.name = dom.name()

    # -- the QMP transport ----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.closed_reason is None and self.stopped is None

    def add_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        """``handler(QMPEvent)`` for BALLOON_CHANGE (actual in bytes) and RESET (guest reboot)."""
        self._handlers.append(handler)

    def remove_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._handlers.remove(handler)

    def add_lifecycle_handler(self, handler: Callable[[int, int], None]) -> None:
        """``handler(event, detail)`` for libvirt lifecycle events (on the asyncio loop)."""
        self._lifecycle.append(handler)

    async def call(self, api: str, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None,
                   abandoned: Callable[[Any], None] | None = None) -> Any:
        """Run a blocking libvirt call on libvirt's call threads; libvirt errors become balloonlab's.

        :param timeout_s: the time limit (default :attr:`call_timeout_s`).
        :param abandoned: undoes the result of a call that returns after the time limit.
        :raises MonitorError: no answer within the limit, the domain or connection is gone.
        :raises CommandError: libvirt refused (its error code name and message kept).
        """
        self.round_trips += 1
        try:
            return await blocking_call(api, fn, *args, abandoned=abandoned,
                                       timeout_s=self.call_timeout_s if timeout_s is None else timeout_s)
        except libvirt.libvirtError as exc:
            if domain_gone(exc) and self.stopped is None:
                self.stopped = error_text(exc)
            raise map_error(exc, api) from exc

    async def _on_domain(self, api: str, call: Callable[[libvirt.virDomain], Any],
                         timeout_s: float | None = None) -> Any:
        """``call(domain)`` on libvirt's call threads; when the connection was lost (libvirtd
        restarted) it is reopened and the call made once more on the domain found again."""
        try:
            return await self.call(api, call, self._domain(), timeout_s=timeout_s)
        except CallTimedOut:
            raise  # libvirtd hung or slow: reopening would only wait on it again
        except MonitorError:
            if self.uri is None or self.stopped is not None or await self._alive():
                raise
        await self.reopen()
        return await self.call(api, call, self._domain(), timeout_s=timeout_s)

    async def _alive(self) -> bool:
        try:
            return bool(await blocking_call("virConnectIsAlive", self.conn.isAlive, timeout_s=5.0))
        except (libvirt.libvirtError, MonitorError):
            return False

    async def reopen(self) -> None:
        """Open the connection again after libvirtd went away, find the domain by UUID and
        subscribe to its events again, waiting up to :attr:`reconnect_s` for libvirtd.

        :raises MonitorError: libvirtd did not come back in time, or the domain is gone.
        """
        assert self.uri is not None and self.uuid is not None
        deadline = time.monotonic() + self.reconnect_s
        while True:
            try:
                conn = await blocking_call("virConnectOpen", libvirt.open, self.uri, timeout_s=self.call_timeout_s,
                                           abandoned=lambda late: late.close())
                dom = await blocking_call("virDomainLookupByUUIDString", conn.lookupByUUIDString, self.uuid,
                                          timeout_s=self.call_timeout_s)
                break
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    self.stopped = error_text(exc)
                    raise map_error(exc, "virDomainLookupByUUIDString") from exc
                if time.monotonic() > deadline:
                    raise MonitorError(f"libvirt at {self.uri} did not come back within {self.reconnect_s} s: "
                                       f"{error_text(exc)}") from exc
                await asyncio.sleep(0.5)
        old, self.conn = self.conn, conn
        self._callback_ids = []  # they belonged to the old connection
        with contextlib.suppress(libvirt.libvirtError):
            old.close()
        self.bind(dom)
        self.closed_reason = None
        self.reconnects += 1
        await self.watch()
        log.warning("%s: libvirt connection to %s reopened", self.name, self.uri)

    def _domain(self) -> libvirt.virDomain:
        if self.dom is None:
            raise MonitorError(f"{self.name}: no libvirt domain bound yet")
        return self.dom

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None,
                  timeout_s: float | None = None) -> Any:
        """One QMP command straight to QEMU through libvirt (``virsh qemu-monitor-command``).

        libvirt marks the domain tainted (``custom-monitor``) on first use and logs it.

        :raises CommandError: QEMU's error reply (class and text kept), or passthrough not
            allowed on this link.
        """
        if self.via != "qmp" or libvirt_qemu is None:
            raise CommandError(command, "NotSupported",
                               f"QMP command {command!r} needs QMP passthrough (stats_via='qmp', the default "
                               f"on a local qemu:// URI; libvirt-qemu passes it on over remote URIs too, when "
                               f"asked); this link uses libvirt's API only")
        message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        passthrough = libvirt_qemu.qemuMonitorCommand
        text = await self._on_domain("qemuMonitorCommand", lambda dom: passthrough(dom, message, 0), timeout_s)
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise MonitorError(f"{command}: garbled QMP reply through libvirt: {text[:200]!r}") from exc
        if "error" in reply:
            error = reply["error"]
            raise CommandError(command, error.get("class", "GenericError"), error.get("desc", ""))
        return reply.get("return")

    async def agent(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One qemu-guest-agent command through libvirt (``virsh qemu-agent-command``): libvirt
        owns the agent's channel, so this is the only way to it; it works over remote URIs too.

        :raises AgentUnavailable: no agent connected (not started yet, not installed) or it timed out.
        :raises GuestAgentError: the agent (or libvirt for it) refused the command.
        """
        if libvirt_qemu is None:
            raise AgentUnavailable("libvirt-python's libvirt_qemu module is missing: qemu-guest-agent commands "
                                   "need it (pip install libvirt-python)")
        message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        passthrough = libvirt_qemu.qemuAgentCommand
        try:
            text = await self._on_domain("qemuAgentCommand",
                                         lambda dom: passthrough(dom, message, AGENT_TIMEOUT_S, 0))
        except CommandError as exc:
            if exc.error_class in ("AGENT_UNRESPONSIVE", "AGENT_UNSYNCED", "AGENT_COMMAND_TIMEOUT") or (
                    "agent is not connected" in exc.desc):
                raise AgentUnavailable(f"{self.name}: guest agent: {exc.desc}") from exc
            raise GuestAgentError(command, exc.error_class, exc.desc) from exc
        return json.loads(text).get("return")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        """The QMP transport's command: QEMU's own command through passthrough (see :meth:`qmp`).

        ``timeout_s`` bounds the libvirt call (default :attr:`call_timeout_s`).

        :raises CommandError: QEMU's error, or passthrough not allowed on this link.
        """
        return await self.qmp(command, arguments, timeout_s=timeout_s)

    async def set_memory(self, target_bytes: int) -> None:
        """``virDomainSetMemoryFlags(KiB, LIVE)``: the balloon target (libvirt takes KiB;
        rounded up, so the guest never gets less than asked)."""
        kib = -(-int(target_bytes) // 1024)
        await self._on_domain("virDomainSetMemoryFlags",
                              lambda dom: dom.setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE))

    async def state(self) -> str:
        """``virDomainGetState`` as QEMU's run-state word where one fits (``running``, ``paused``)."""
        state, _reason = await self._on_domain("virDomainGetState", lambda dom: dom.state())
        return state_name(state)

    async def set_stats_period(self, seconds: int) -> None:
        """``virDomainSetMemoryStatsPeriod(seconds, VIR_DOMAIN_AFFECT_LIVE)``.

        :raises TypeError, ValueError: a period libvirt (a C int) would refuse.
        """
        validate_period(seconds, LIBVIRT_MAX_PERIOD_S)
        await self._on_domain("virDomainSetMemoryStatsPeriod",
                              lambda dom: dom.setMemoryStatsPeriod(seconds, libvirt.VIR_DOMAIN_AFFECT_LIVE))

    async def memory_stats(self) -> dict[str, int]:
        """``virDomainMemoryStats``: libvirt's names, KiB (counts unchanged)."""
        return dict(await self._on_domain("virDomainMemoryStats", lambda dom: dom.memoryStats()))

    async def live_xml(self) -> str:
        return str(await self._on_domain("virDomainGetXMLDesc", lambda dom: dom.XMLDesc(0)))

    async def live_spec(self) -> DomainSpec:
        """The running domain's XML as a DomainSpec."""
        return parse_domain_xml(await self.live_xml())

    # -- events ---------------------------------------------------------------------------
    def _mine(self, dom: libvirt.virDomain) -> bool:
        return bool(dom.UUIDString() == self.uuid if self.uuid else dom.name() == self.name)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(fn, *args)

    def _dispatch(self, event: QMPEvent) -> None:
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:
                log.exception("event handler %r failed on %s", handler, event.name)

    def _on_lifecycle(self, event: int, detail: int) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED and self.stopped is None:
            self.stopped = f"stopped (libvirt lifecycle detail {detail})"
        for handler in list(self._lifecycle):
            handler(event, detail)

    async def watch(self) -> None:
        """Subscribe to this domain's balloon, lifecycle and reboot events (all domains,
        filtered by name/UUID, so a launch can subscribe before the domain exists)."""
        self._loop = asyncio.get_running_loop()

        def balloon(_conn: Any, dom: Any, actual_kib: int, _opaque: Any) -> None:
            if self._mine(dom):
                self._post(self._dispatch, QMPEvent("BALLOON_CHANGE", {"actual": actual_kib * 1024}, time.time()))

        def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            if self._mine(dom):
                self._post(self._on_lifecycle, event, detail)

        def reboot(_conn: Any, dom: Any, _opaque: Any) -> None:
            if self._mine(dom):
                self._post(self._dispatch, QMPEvent("RESET", {}, time.time()))

        conn = self.conn

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            def mark() -> None:
                if conn is self.conn:  # not an old connection that reopen() replaced
                    self.closed_reason = f"libvirt connection closed (reason {reason})"
            self._post(mark)

        for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot)):
            self._callback_ids.append(await self.call(
                "virConnectDomainEventRegisterAny", self.conn.domainEventRegisterAny, None, event_id,
                callback, None))
        with contextlib.suppress(CommandError):  # e.g. one is registered already
            await self.call("virConnectRegisterCloseCallback", self.conn.registerCloseCallback, closed, None)

    async def close(self) -> None:
        """Unsubscribe and close the connection. Idempotent."""
        if self.closed_reason == "closed":
            return
        ids, self._callback_ids = self._callback_ids, []

        def shut() -> None:
            for callback_id in ids:
                with contextlib.suppress(libvirt.libvirtError):
                    self.conn.domainEventDeregisterAny(callback_id)
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()

        self.closed_reason = "closed"
        try:
            await blocking_call("virConnectClose", shut, timeout_s=self.call_timeout_s)
        except MonitorError as exc:  # the handle is closed for us; libvirt lets go when it can
            log.warning("%s: %s", self.name, exc)


async def open_link(uri: str, name: str, stats_via: str, *,
                    call_timeout_s: float = CALL_TIMEOUT_S) -> DomainLink:
    """Open a libvirt connection for domain ``name`` (after libvirt's event loop runs).

    :param call_timeout_s: the limit of the open and of every call on the link.
    :raises MonitorError: libvirt is not reachable at ``uri`` (its message kept), or did not
        answer within ``call_timeout_s``.
    """
    via = resolve_via(stats_via, uri)
    ensure_event_loop()  # before the connection opens, or it gets no events
    try:
        conn = await blocking_call("virConnectOpen", libvirt.open, uri, timeout_s=call_timeout_s,
                                   abandoned=lambda late: late.close())
    except libvirt.libvirtError as exc:
        raise MonitorError(f"cannot connect to libvirt at {uri}: {error_text(exc)} "
                           "(is libvirtd running? scripts/libvirtd start)") from exc
    return DomainLink(conn, name, via=via, call_timeout_s=call_timeout_s, uri=uri)
