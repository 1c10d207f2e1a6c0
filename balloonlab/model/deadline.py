"""Waiting for a condition with a time limit: the one loop every "wait until" uses."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable


class WaitAborted(RuntimeError):
    """What :func:`wait_until` waited on went away (the message says how)."""


class Deadline:
    """A monotonic deadline ``timeout_s`` seconds from now."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s

    @property
    def left_s(self) -> float:
        """Seconds left (never below 0)."""
        return max(0.0, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() >= self.end


async def wait_until(ready: Callable[[], bool | Awaitable[bool]], timeout_s: float, *,
                     poll_s: float = 0.05, failed: Callable[[], str | None] | None = None) -> bool:
    """Poll ``ready()`` (plain or async) every ``poll_s`` until it is true or ``timeout_s`` passes.

    :param failed: checked after each poll that was not ready; a message (e.g. "QEMU exited
        with code 1") raises :class:`WaitAborted` at once, so a wait never outlasts what it
        waits on.
    :returns: True when ready, False when the time ran out.
    """
    deadline = Deadline(timeout_s)
    while True:
        result = ready()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if failed is not None and (why := failed()) is not None:
            raise WaitAborted(why)
        if deadline.expired:
            return False
        await asyncio.sleep(min(poll_s, max(deadline.left_s, 0.001)))
