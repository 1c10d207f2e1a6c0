"""The error hierarchy of balloonlab.

Everything balloonlab raises on purpose derives from :class:`BalloonLabError`, and each error
carries the structured facts a caller needs to act on it (the command that failed, QEMU's
error class, the line of bad XML) rather than only a message. Bad arguments to public
functions raise the builtin :class:`ValueError` / :class:`TypeError` with a message that says
what was expected. ``asyncio.CancelledError`` and other ``BaseException`` s are never wrapped.
"""

from __future__ import annotations

from collections.abc import Sequence


class BalloonLabError(Exception):
    """Root of every error balloonlab raises on purpose."""


class LaunchError(BalloonLabError):
    """QEMU could not be started, or died before the guest was up.

    :param message: what went wrong, in one sentence.
    :param command: the argv that was run (empty when QEMU never ran).
    :param exitcode: QEMU's exit status, or None when it did not exit (it was killed by us).
    :param output: the tail of QEMU's stderr/stdout and the guest's serial console.
    """

    def __init__(self, message: str, command: Sequence[str] = (), exitcode: int | None = None,
                 output: str = "") -> None:
        self.message = message
        self.command = list(command)
        self.exitcode = exitcode
        self.output = output
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.exitcode is not None:
            parts.append(f"QEMU exit code: {self.exitcode}")
        if self.command:
            parts.append("command: " + " ".join(self.command))
        if self.output.strip():
            parts.append("output (tail):\n" + self.output.rstrip())
        return "\n".join(parts)


class GuestNameInUse(LaunchError):
    """Another live guest already uses this name (each guest needs its own runtime dir)."""


class MonitorError(BalloonLabError):
    """The QMP connection failed or dropped (QEMU exited, socket closed, garbled reply)."""


class CommandError(BalloonLabError):
    """QEMU answered a QMP command with an error.

    :param command: the QMP command name.
    :param error_class: QEMU's error class (``GenericError``, ``DeviceNotFound``...).
    :param desc: QEMU's human-readable description, kept verbatim.
    """

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command = command
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"{command}: {error_class}: {desc}")


class BalloonNotFound(BalloonLabError):
    """The guest has no virtio balloon device balloonlab could find.

    :param searched: the QOM paths / type names that were tried, in order.
    """

    def __init__(self, message: str, searched: Sequence[str] = ()) -> None:
        self.searched = list(searched)
        super().__init__(message + (f" (searched: {', '.join(self.searched)})" if self.searched else ""))


class StatsUnavailable(BalloonLabError):
    """The guest has never answered a statistics request.

    :param last_update: QEMU's last-update value (0 means the guest never reported: no
        virtio_balloon driver in the guest, or polling is disabled).
    """

    def __init__(self, message: str, last_update: int = 0) -> None:
        self.last_update = last_update
        super().__init__(message)


class DomainXMLError(BalloonLabError):
    """A libvirt domain XML document could not be understood.

    :param line: 1-based line of the offending element or syntax error, when known.
    :param message: what was wrong and what was expected.
    :param element: the element's tag (e.g. ``memballoon``), when known.
    """

    def __init__(self, message: str, line: int | None = None, element: str | None = None) -> None:
        self.line = line
        self.message = message
        self.element = element
        where = []
        if line is not None:
            where.append(f"line {line}")
        if element:
            where.append(f"<{element}>")
        super().__init__((", ".join(where) + ": " if where else "") + message)


class GuestImageError(BalloonLabError):
    """The built-in test guest could not be built (no kernel, no busybox, bad modules)."""


class AgentError(BalloonLabError):
    """The in-guest workload agent refused or failed a request (e.g. allocation failed)."""


class GuestAgentError(AgentError):
    """qemu-guest-agent answered a command with an error (its ``class`` and ``desc`` kept)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent: {command} failed: {error_class}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class AgentUnavailable(AgentError):
    """No qemu-guest-agent answered (not started yet, not installed, or no channel for it)."""


class BalloonLabWarning(UserWarning):
    """Something worked, but not as the domain XML asked (e.g. the period could not be set)."""
