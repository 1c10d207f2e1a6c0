"""One QMP connection to one QEMU, through qemu.qmp's ``QMPClient``.

The monitor is the only place that talks QMP. It maps qemu.qmp's errors onto balloonlab's
(``CommandError`` for QEMU's own error replies, ``MonitorError`` for a connection that failed,
dropped or went silent), counts round trips (discovery's cost is a benchmark), timestamps
events and hands them to subscribers through one bounded, named listener. It also owns the
per-connection state the layers above cache (the balloon's QOM path): a new connection starts
with an empty cache, as libvirt's does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, ExecInterruptedError, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import ConnectError, StateError

from balloonlab.model.errors import CommandError, MonitorError
from balloonlab.qemu.transport import ConnectionCache, QMPEvent

log = logging.getLogger(__name__)

#: How many recent events a monitor keeps for inspection (older ones are dropped).
RECENT_EVENTS = 256


class _Client(QMPClient):
    """qemu.qmp's client without the cost of its message hooks when nobody logs them.

    ``_cb_outbound``/``_cb_inbound`` are qemu.qmp's documented per-message hooks for
    subclasses; the base ones log ``str(msg)`` at debug level, and ``str()`` is built (an
    indented ``json.dumps`` of the whole message) before the logger checks its level: measured
    here, that was most of a ``qom-get guest-stats``'s client CPU. The messages still go
    through the base hooks whenever debug logging is on.
    """

    def _cb_outbound(self, msg: Any) -> Any:
        return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    def _cb_inbound(self, msg: Any) -> Any:
        return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg


class _BoundedListener(EventListener):
    """An EventListener that keeps no history: a day-long run must not grow memory."""

    async def put(self, event: Any) -> None:
        if self.accept(event):
            await self._queue.put(event)


class Monitor:
    """A QMP connection on a unix socket (a :class:`~balloonlab.qemu.transport.QMPTransport`).

    :param socket_path: QEMU's QMP unix socket.
    :param name: a label for logs and errors (the guest's name).
    :param command_timeout_s: a command with no reply after this long raises MonitorError.
    """

    def __init__(self, socket_path: str, *, name: str = "guest", command_timeout_s: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.name = name
        self.command_timeout_s = command_timeout_s
        #: QMP commands sent on this connection (qmp_capabilities excluded).
        self.round_trips = 0
        self.cache = ConnectionCache()
        self.recent_events: collections.deque[QMPEvent] = collections.deque(maxlen=RECENT_EVENTS)
        self._client: QMPClient | None = None
        self._listener: _BoundedListener | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._handlers: list[Callable[[QMPEvent], None]] = []
        self._closed_reason: str | None = None

    @property
    def connected(self) -> bool:
        """True while the QMP session is up."""
        from qemu.qmp import Runstate
        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def connect(self, timeout_s: float = 10.0) -> None:
        """Connect and negotiate capabilities. The per-connection cache starts empty.

        :raises MonitorError: the socket is missing, refused, or QEMU did not greet in time.
        """
        # qemu.qmp binds its client to the running loop: build it here, never earlier.
        client = _Client(self.name)
        # The default all-events listener cannot be removed and keeps every event forever;
        # make it accept nothing and use our own bounded listener instead.
        client.events.event_filter = lambda _event: False
        listener = _BoundedListener()
        client.register_listener(listener)
        try:
            async with asyncio.timeout(timeout_s):
                await client.connect(self.socket_path)
        except TimeoutError as exc:
            with contextlib.suppress(Exception):
                await client.disconnect()
            # QEMU serves one QMP client per socket; a second one waits without a greeting.
            raise MonitorError(f"QEMU did not greet on {self.socket_path} within {timeout_s} s: is another "
                               "client (another balloonlab process, libvirt) connected to it?") from exc
        except (ConnectError, OSError, QMPError) as exc:
            with contextlib.suppress(Exception):
                await client.disconnect()
            raise MonitorError(f"cannot connect to QMP socket {self.socket_path} of {self.name}: "
                               f"{_describe(exc)}") from exc
        self._client, self._listener = client, listener
        self.cache = ConnectionCache()
        self.round_trips = 0
        self._closed_reason = None
        self._drain_task = asyncio.get_running_loop().create_task(
            self._drain_events(listener), name=f"balloonlab-events-{self.name}")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float | None = None) -> Any:
        """Send one QMP command and return its ``return`` value.

        :raises CommandError: QEMU replied with an error (class and description kept).
        :raises MonitorError: not connected, the connection dropped, the reply was garbled,
            or no reply came within the timeout.
        """
        client = self._client
        if client is None:
            raise MonitorError(f"QMP of {self.name} is not connected"
                               + (f" ({self._closed_reason})" if self._closed_reason else ""))
        self.round_trips += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives with the reply (CPython gh-86296), and Sampler.stop() would hang.
            async with asyncio.timeout(timeout_s if timeout_s is not None else self.command_timeout_s):
                return await client.execute(command, arguments)
        except ExecuteError as exc:
            raise CommandError(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise MonitorError(f"{command}: no reply from QEMU ({self.name}) within "
                               f"{timeout_s or self.command_timeout_s} s") from exc
        except (ExecInterruptedError, StateError, QMPError, OSError, EOFError) as exc:
            raise MonitorError(f"{command}: QMP connection to {self.name} failed: {_describe(exc)}") from exc

    def add_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        """Call ``handler(event)`` for every QMP event from now on (on the monitor's loop)."""
        self._handlers.append(handler)

    def remove_event_handler(self, handler: Callable[[QMPEvent], None]) -> None:
        """Stop calling ``handler``."""
        with contextlib.suppress(ValueError):
            self._handlers.remove(handler)

    async def wait_disconnected(self) -> None:
        """Return once the connection has ended (QEMU quit, crashed, or :meth:`close`)."""
        if self._drain_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._drain_task)

    async def close(self) -> None:
        """Disconnect. Idempotent; a connection QEMU already dropped closes quietly."""
        client, self._client = self._client, None
        self._closed_reason = self._closed_reason or "closed"
        if client is not None:
            with contextlib.suppress(Exception):
                await client.disconnect()
        if self._drain_task is not None:
            self._drain_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._drain_task
            self._drain_task = None

    async def _drain_events(self, listener: _BoundedListener) -> None:
        client = self._client
        assert client is not None
        disconnected = asyncio.ensure_future(_wait_runstate_left_running(client))
        try:
            while True:
                getter = asyncio.ensure_future(listener.get())
                done, _ = await asyncio.wait({getter, disconnected}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    self._closed_reason = "QEMU closed the connection"
                    if self._client is client:
                        self._client = None
                        # Shielded: close() may cancel this task meanwhile, and a disconnect
                        # cut short leaves qemu.qmp's gathered EOFError unretrieved.
                        await asyncio.shield(_quiet_disconnect(client))
                    return
                self._dispatch(getter.result())
        finally:
            disconnected.cancel()

    def _dispatch(self, msg: Any) -> None:
        stamp = msg.get("timestamp") or {}
        when = (stamp.get("seconds", 0) + stamp.get("microseconds", 0) / 1e6) or time.time()
        event = QMPEvent(str(msg["event"]), dict(msg.get("data") or {}), when)
        self.recent_events.append(event)
        for handler in list(self._handlers):
            try:
                handler(event)
            except Exception:  # a subscriber's bug must not stop event delivery to others
                log.exception("event handler %r failed on %s", handler, event.name)


async def _quiet_disconnect(client: QMPClient) -> None:
    """Finish qemu.qmp's disconnect; the EOFError of a QEMU that quit is expected here."""
    with contextlib.suppress(Exception):
        await client.disconnect()


async def _wait_runstate_left_running(client: QMPClient) -> None:
    from qemu.qmp import Runstate
    while client.runstate == Runstate.RUNNING:
        await client.runstate_changed()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or getattr(exc, "exc", None)
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({cause})"
    return text
