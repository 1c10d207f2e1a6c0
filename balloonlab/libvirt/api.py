"""libvirt-python's process-wide plumbing: its event loop thread, its errors, its states.

libvirt's events need an event implementation registered before a connection is opened and a
thread running it: :func:`ensure_event_loop` does both, once per process. libvirt's errors
become balloonlab's (:func:`map_error`) with libvirt's message kept verbatim.
"""

from __future__ import annotations

import logging
import threading
import time

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


_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "prelaunch", libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running", libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutdown", libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "guest-panicked", libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


def state_name(state: int) -> str:
    """libvirt's domain state as QEMU's run-state word where one fits (``running``, ``paused``)."""
    return _STATES.get(state, f"state {state}")
