"""The host as an entity beside the guests: one host row every ``interval_s``, on the samples'
clock (host time when read), into the run's ``host`` table.

A row is the host's /proc/meminfo, vmstat counters, memory PSI and KSM
(:class:`~balloonlab.model.hostfs.HostReader`), each sampled guest's QEMU RSS and resident guest
RAM read at the same moment, and the host memory budget a policy was given (see ``HOST_FRAME`` in
:mod:`balloonlab.model.schema`). Policies read this frame; so do the plots.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from balloonlab.model.hostfs import HostReader
from balloonlab.record.buffer import RowBuffer, host_buffer

log = logging.getLogger(__name__)


class HostTask:
    """Reads the host every ``interval_s`` into ``buffer`` until cancelled.

    :param guests: called at each read: the sampled guests' QEMU (RSS, resident guest RAM) in
        bytes (None unknown).
    :param budget: the host memory budget in bytes (a policy's), None for the real host; it may
        be changed while the task runs.
    """

    def __init__(self, guests: Callable[[], Mapping[str, tuple[int | None, int | None]]], *, interval_s: float = 1.0,
                 reader: HostReader | None = None, budget: int | None = None) -> None:
        if not isinstance(interval_s, (int, float)) or isinstance(interval_s, bool) or not 0 < interval_s < 3600:
            raise ValueError(f"host_interval_s must be a number of seconds in (0, 3600), got {interval_s!r}")
        self.buffer: RowBuffer = host_buffer()
        self.interval_s = float(interval_s)
        self.reader = reader or HostReader()
        self.budget = budget
        self._guests = guests
        #: Per guest, its QEMU's RSS minus its guest RAM at the last read that had both (the VMM's
        #: own memory): a read without the split counts RSS minus this as the guest's RAM.
        self.vmm_rest: dict[str, int] = {}
        self.task: asyncio.Task[None] | None = None

    def read_once(self) -> dict[str, object]:
        """Read and append one row now; returns it."""
        row = self.reader.read(self._guests(), self.budget)
        self.buffer.append(time.time_ns(), row)
        return row

    async def run(self) -> None:
        """Read every ``interval_s`` (on a fixed grid: a slow read does not drift the next)."""
        start = time.monotonic()
        n = 0
        while True:
            try:
                self.read_once()
            except Exception:  # a bug must not stop the guests' sampling: logged, next tick tries again
                log.exception("reading the host failed")
            n += 1
            await asyncio.sleep(max(0.0, start + n * self.interval_s - time.monotonic()))

    def start(self) -> None:
        """Start :meth:`run` on the running loop."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.run(), name="balloonlab-host")

    async def stop(self) -> None:
        """Cancel the task (after one last row, so the frame reaches the run's end)."""
        if self.task is None:
            return
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.task = None
        try:
            self.read_once()
        except Exception:
            log.exception("reading the host failed")
