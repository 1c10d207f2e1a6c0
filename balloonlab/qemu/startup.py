"""Waiting for a QEMU that balloonlab launched to come up: its QMP socket file, then a line on
the guest's serial console log (the built-in guest's READY line).

Both waits poll files QEMU writes into the guest's runtime directory and give up at once when
QEMU exits (``failed`` says so), so a launch never outlasts the process it waits on. Every
failure is a :class:`~balloonlab.model.errors.LaunchError`; :class:`balloonlab.qemu.Guest`
adds the command line and QEMU's output when it rolls the launch back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from balloonlab.model.deadline import WaitAborted, wait_until
from balloonlab.model.errors import LaunchError


async def wait_for_socket(path: Path, timeout_s: float, failed: Callable[[], str | None]) -> None:
    """Wait until QEMU has created its QMP socket file at ``path``.

    :param failed: a message when QEMU is gone (e.g. "QEMU exited during start-up with code 1"), else None.
    :raises LaunchError: QEMU exited, or the file did not appear within ``timeout_s``.
    """
    try:
        appeared = await wait_until(path.exists, timeout_s, poll_s=0.02, failed=failed)
    except WaitAborted as exc:
        raise LaunchError(str(exc)) from None
    if not appeared:
        raise LaunchError(f"QEMU did not create its QMP socket within {timeout_s} s")


async def wait_for_console(console: Path, marker: bytes, timeout_s: float, failed: Callable[[], str | None]) -> None:
    """Wait until the guest has printed ``marker`` on its console log ``console``.

    :param failed: a message when QEMU is gone, else None.
    :raises LaunchError: QEMU exited, or the marker did not appear within ``timeout_s``.
    """
    offset = 0  # bytes of the console already searched: each poll reads only what is new

    def printed() -> bool:
        nonlocal offset
        start = max(0, offset - len(marker) + 1)  # the marker may straddle two reads
        with contextlib.suppress(OSError), open(console, "rb") as log_file:
            log_file.seek(start)
            data = log_file.read()
            offset = start + len(data)
            return marker in data
        return False
    try:
        ready = await wait_until(printed, timeout_s, poll_s=0.01, failed=failed)
    except WaitAborted as exc:
        raise LaunchError(str(exc)) from None
    if not ready:
        raise LaunchError(f"the guest did not print {marker.decode()} within {timeout_s} s")
