"""libvirt-python's process-wide plumbing: its event loop thread, its call threads, its
errors, its states.

libvirt's events need an event implementation registered before a connection is opened and a
thread running it: :func:`ensure_event_loop` does both, once per process. libvirt-python's
calls block: :func:`blocking_call` runs them on a small pool of daemon threads of its own,
with a time limit. libvirt's errors become balloonlab's (:func:`map_error`) with libvirt's
message kept verbatim.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from balloonlab.model.errors import BalloonLabError, BalloonNotFound, CommandError, MonitorError

log = logging.getLogger(__name__)

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


#: Threads that run libvirt-python's blocking calls. A call that hangs (libvirtd stopped, a
#: dead remote host before keepalive notices) holds its thread until libvirt returns, since a
#: thread cannot be cancelled: the pool is bounded and apart from asyncio's default executor,
#: so hung calls starve neither the rest of the program nor (beyond this many) the machine.
CALL_THREADS = 4

_Job = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class _CallPool:
    """A fixed pool of daemon threads (a hung libvirt call must not block interpreter exit,
    as ThreadPoolExecutor's joined workers would)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        #: Calls running now (a hung one counts until libvirt returns).
        self.busy = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            # An idle thread is reserved for this job, else a new one starts while the pool
            # has room; a full pool queues it (such a job starts only when a call returns).
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < self.size:
                self._threads += 1
                threading.Thread(target=self._work, name=f"balloonlab-libvirt-call-{self._threads}",
                                 daemon=True).start()
            self._jobs.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future.set_running_or_notify_cancel():  # False: its caller gave up before it started
                with self._lock:
                    self.busy += 1
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller, as an executor does
                    future.set_exception(exc)
                finally:
                    with self._lock:
                        self.busy -= 1
            with self._lock:
                self._idle += 1


_pool = _CallPool(CALL_THREADS)


def _new_pool_after_fork() -> None:
    global _pool
    _pool = _CallPool(CALL_THREADS)  # the parent's threads do not exist in a forked child


os.register_at_fork(after_in_child=_new_pool_after_fork)


class CallTimedOut(MonitorError):
    """A libvirt call got no answer within its limit: libvirtd is hung or slow, not gone."""


async def blocking_call(api: str, fn: Callable[..., Any], *args: Any, timeout_s: float,
                        abandoned: Callable[[Any], None] | None = None) -> Any:
    """``fn(*args)`` on libvirt's call threads; its result, or its exception as raised.

    :param api: the libvirt API's name, for the error.
    :param abandoned: called (on the call thread) with the result of a call that returns
        after its caller gave up, to undo it (close a connection, destroy a domain).
    :raises MonitorError: no answer within ``timeout_s``; the call keeps its thread until
        libvirt returns (see :data:`CALL_THREADS`).
    """
    future = _pool.submit(fn, *args)
    try:
        async with asyncio.timeout(timeout_s) as limit:
            return await asyncio.wrap_future(future)
    except TimeoutError as exc:
        if not limit.expired():
            raise  # fn's own TimeoutError, not ours
        if abandoned is not None:
            future.add_done_callback(lambda done: _undo(api, done, abandoned))
        raise CallTimedOut(f"{api}: no answer from libvirt within {timeout_s} s (is libvirtd running "
                           f"and responsive?); {_pool.busy} of {_pool.size} libvirt call threads are "
                           "waiting for libvirt") from exc


def _undo(api: str, done: concurrent.futures.Future[Any], undo: Callable[[Any], None]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    try:
        undo(done.result())
    except Exception:  # nobody is left to tell but the log
        log.exception("could not undo %s that returned after its caller gave up", api)


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
    # A closed client socket (libvirtd restarted) is an internal error to libvirt, a lost
    # connection to us.
    lost = any(s in text for s in ("client socket is closed", "End of file while reading data"))
    if domain_gone(exc) or exc.get_error_code() in _CONNECTION_CODES or lost:
        return MonitorError(f"{api}: {text}")
    return CommandError(api, error_name(exc.get_error_code()), text)


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "prelaunch", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "guest-panicked", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def state_name(state: int) -> str:
    """libvirt's domain state as QEMU's run-state word where one fits (``running``, ``paused``)."""
    return _STATES.get(state, f"state {state}")
