"""The plumbing under :mod:`balloonlab.libvirt`: libvirt's event loop, errors, and a link to
one domain that looks like a :class:`~balloonlab.monitor.Monitor` to :class:`Balloon`.

libvirt-python is blocking: every call runs in a worker thread (``asyncio.to_thread``).
libvirt's events need an event implementation registered before a connection is opened and a
thread running it: :func:`ensure_event_loop` does both, once per process. Callbacks fire on
that thread and are handed to the asyncio loop with ``call_soon_threadsafe``.

:class:`DomainLink` is what lets :class:`~balloonlab.balloon.Balloon`'s own logic (new/reset
classification, target checks, BALLOON_CHANGE tracking, ``wait_for_actual``,
``wait_for_stats``) run unchanged over libvirt: it answers the few QMP commands ``Balloon``
sends with libvirt's API where libvirt has one (``balloon`` -> ``virDomainSetMemoryFlags``,
the polling interval -> ``virDomainSetMemoryStatsPeriod``, ``query-status`` ->
``virDomainGetState``) and passes the rest through to QEMU (``qemuMonitorCommand``) when the
link is allowed to (``via == "qmp"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from .discovery import POLLING_PROPERTY
from .domain import DomainSpec, parse_domain_xml
from .errors import BalloonLabError, BalloonNotFound, CommandError, MonitorError
from .monitor import ConnectionCache, QMPEvent

try:
    import libvirt_qemu
except ImportError:  # pragma: no cover - shipped with libvirt-python
    libvirt_qemu = None

log = logging.getLogger(__name__)

#: libvirt keeps the stats period in a C int (QEMU would take up to 2^32-1).
LIBVIRT_MAX_PERIOD = 2**31 - 1

_event_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it on a daemon thread (once).

    Must happen before the connections whose events we want are opened. Also silences
    libvirt's default error handler, which prints every error to stderr: balloonlab raises
    them as exceptions instead (with libvirt's message).
    """
    global _event_thread
    with _event_lock:
        if _event_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # keep delivering events whatever one callback did
                    log.exception("libvirt event loop iteration failed")
                    time.sleep(0.1)

        _event_thread = threading.Thread(target=run, name="balloonlab-libvirt-events", daemon=True)
        _event_thread.start()


# ------------------------------------------------------------------------------ errors

_ERROR_NAMES: dict[int, str] = {}
# Error *levels* share numbers with error codes: never name a code after them.
_LEVELS = {"VIR_ERR_NONE", "VIR_ERR_WARNING", "VIR_ERR_ERROR"}


def error_name(code: int | None) -> str:
    """``VIR_ERR_NO_DOMAIN`` -> ``"NO_DOMAIN"`` (libvirt's error code, by name)."""
    if not _ERROR_NAMES:
        for attr in dir(libvirt):
            if attr.startswith("VIR_ERR_") and attr not in _LEVELS:
                _ERROR_NAMES.setdefault(getattr(libvirt, attr), attr.removeprefix("VIR_ERR_"))
    return _ERROR_NAMES.get(code or 0, f"code {code}")


def error_text(exc: libvirt.libvirtError) -> str:
    """libvirt's message, verbatim."""
    return exc.get_error_message() or str(exc)


def domain_gone(exc: libvirt.libvirtError) -> bool:
    """The domain (or its QEMU) is no longer there."""
    text = error_text(exc)
    return (exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN or "domain is not running" in text
            or "monitor" in text and any(w in text for w in ("closed", "Unable to read", "End of file")))


_CONNECTION_CODES = {getattr(libvirt, n, -1) for n in (
    "VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN", "VIR_ERR_RPC", "VIR_ERR_AUTH_FAILED",
    "VIR_ERR_AUTH_CANCELLED", "VIR_ERR_AUTH_UNAVAILABLE")}


def map_error(exc: libvirt.libvirtError, api: str) -> BalloonLabError:
    """balloonlab's error for a libvirt error, keeping libvirt's message text.

    No balloon -> :class:`BalloonNotFound`; the domain or the connection gone ->
    :class:`MonitorError`; anything else -> :class:`CommandError` (``command`` is the libvirt
    API, ``error_class`` libvirt's error code name, ``desc`` libvirt's message).
    """
    text = error_text(exc)
    if "No memory balloon device configured" in text or "without the balloon device" in text:
        return BalloonNotFound(text)
    if domain_gone(exc) or exc.get_error_code() in _CONNECTION_CODES:
        return MonitorError(f"{api}: {text}")
    return CommandError(api, error_name(exc.get_error_code()), text)


# ------------------------------------------------------------------------------ states

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "prelaunch", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "guest-panicked", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def state_name(state: int) -> str:
    """libvirt's domain state as QEMU's run-state word where one fits (``running``, ``paused``)."""
    return _STATES.get(state, f"state {state}")


# ------------------------------------------------------------------------------ the link

class DomainLink:
    """One libvirt connection to one domain, shaped like a Monitor for :class:`Balloon`.

    :param conn: an open ``virConnect`` (opened after :func:`ensure_event_loop`).
    :param name: the domain's name (events are matched by it until the UUID is known).
    :param via: ``"qmp"`` allows QMP passthrough (``qemuMonitorCommand``), ``"libvirt"``
        uses libvirt's API only.
    """

    socket_path = None  # libvirt owns QEMU's monitor socket

    def __init__(self, conn: libvirt.virConnect, name: str, *, via: str) -> None:
        self.conn = conn
        self.name = name
        self.via = via
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

    # -- Monitor's shape ------------------------------------------------------------------
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

    async def call(self, api: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking libvirt call in a worker thread; libvirt errors become balloonlab's."""
        self.round_trips += 1
        try:
            return await asyncio.to_thread(fn, *args)
        except libvirt.libvirtError as exc:
            if domain_gone(exc) and self.stopped is None:
                self.stopped = error_text(exc)
            raise map_error(exc, api) from exc

    def _domain(self) -> libvirt.virDomain:
        if self.dom is None:
            raise MonitorError(f"{self.name}: no libvirt domain bound yet")
        return self.dom

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command straight to QEMU through libvirt (``virsh qemu-monitor-command``).

        libvirt marks the domain tainted (``custom-monitor``) on first use and logs it.

        :raises CommandError: QEMU's error reply (class and text kept), or passthrough not
            allowed on this link.
        """
        if self.via != "qmp" or libvirt_qemu is None:
            raise CommandError(command, "NotSupported",
                               f"QMP command {command!r} needs QMP passthrough (stats_via='qmp' on a "
                               f"local qemu:// URI); this link uses libvirt's API only")
        message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})})
        text = await self.call("qemuMonitorCommand", libvirt_qemu.qemuMonitorCommand,
                               self._domain(), message, 0)
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise MonitorError(f"{command}: garbled QMP reply through libvirt: {text[:200]!r}") from exc
        if "error" in reply:
            error = reply["error"]
            raise CommandError(command, error.get("class", "GenericError"), error.get("desc", ""))
        return reply.get("return")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        """Answer a QMP command the way QEMU would, through libvirt's API where it has one.

        ``timeout_s`` is ignored: libvirt applies its own job and keepalive timeouts.
        """
        args = arguments or {}
        dom = self._domain()
        prop = args.get("property")
        if command == "balloon":
            kib = -(-int(args["value"]) // 1024)  # libvirt takes KiB; round up, never below
            await self.call("virDomainSetMemoryFlags", dom.setMemoryFlags, kib,
                            libvirt.VIR_DOMAIN_AFFECT_LIVE)
            return {}
        if command == "qom-set" and prop == POLLING_PROPERTY:
            await self.set_stats_period(int(args["value"]))
            return {}
        if command == "query-status":
            state, _reason = await self.call("virDomainGetState", dom.state)
            return {"status": state_name(state), "running": state_name(state) == "running"}
        if self.via == "qmp":
            return await self.qmp(command, arguments)
        if command == "qom-get" and prop == POLLING_PROPERTY:
            # libvirt's live XML records the period libvirt set (at start or through its API).
            return (await self.live_spec()).period_s or 0
        if command == "query-balloon":
            stats = await self.memory_stats()
            if "actual" not in stats:
                raise BalloonNotFound(f"No memory balloon device configured on domain {self.name}")
            return {"actual": int(stats["actual"]) * 1024}
        return await self.qmp(command, arguments)  # raises the NotSupported CommandError

    async def set_stats_period(self, seconds: int) -> None:
        """``virDomainSetMemoryStatsPeriod(seconds, VIR_DOMAIN_AFFECT_LIVE)``."""
        if seconds > LIBVIRT_MAX_PERIOD:
            raise ValueError(f"libvirt keeps the stats period in a C int: at most "
                             f"{LIBVIRT_MAX_PERIOD} seconds, got {seconds}")
        await self.call("virDomainSetMemoryStatsPeriod", self._domain().setMemoryStatsPeriod,
                        seconds, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    async def memory_stats(self) -> dict[str, int]:
        """``virDomainMemoryStats``: libvirt's names, KiB (counts unchanged)."""
        return dict(await self.call("virDomainMemoryStats", self._domain().memoryStats))

    async def live_xml(self) -> str:
        return str(await self.call("virDomainGetXMLDesc", self._domain().XMLDesc, 0))

    async def live_spec(self) -> DomainSpec:
        """The running domain's XML as a DomainSpec."""
        return parse_domain_xml(await self.live_xml())

    # -- events ---------------------------------------------------------------------------
    def _mine(self, dom: libvirt.virDomain) -> bool:
        return dom.UUIDString() == self.uuid if self.uuid else dom.name() == self.name

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

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            self._post(setattr, self, "closed_reason", f"libvirt connection closed (reason {reason})")

        for event_id, callback in ((libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle),
                                   (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, reboot)):
            self._callback_ids.append(await self.call(
                "virConnectDomainEventRegisterAny", self.conn.domainEventRegisterAny, None, event_id,
                callback, None))
        with contextlib.suppress(libvirt.libvirtError):
            await asyncio.to_thread(self.conn.registerCloseCallback, closed, None)

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
        await asyncio.to_thread(shut)
