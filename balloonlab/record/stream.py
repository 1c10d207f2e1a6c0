"""Streaming a sampler's buffers to its run folder without stalling the sampling loop.

On the loop a flush only freezes the rows not yet on disk (:meth:`RowBuffer.snapshot`, O(chunks))
and, afterwards, drops from memory what is on disk beyond ``max_rows_in_memory``; building the
frames and writing Parquet happen in a worker thread, one flush at a time. The writer
(:class:`~balloonlab.record.store.RunWriter`) skips rows another flush already wrote, so a
flush that overlaps or follows a failed one writes each row once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from balloonlab.record.buffer import BufferSnapshot, RowBuffer
from balloonlab.record.store import RunWriter

log = logging.getLogger(__name__)


class RunStream:
    """Flushes ``samples``, ``events`` and ``host`` (a sampler's buffers, appended on its loop)
    to ``writer``.

    :param max_rows_in_memory: rows on disk beyond this many are dropped from memory.
    """

    def __init__(self, writer: RunWriter, samples: RowBuffer, events: RowBuffer, max_rows_in_memory: int,
                 host: RowBuffer | None = None) -> None:
        self.writer = writer
        self._buffers = (samples, events)
        self._host = host
        self.max_rows_in_memory = max_rows_in_memory
        #: Rows of (samples, events) on disk: every row numbered below is durable.
        self.flushed = (0, 0)
        self.host_flushed = 0
        self._lock = threading.Lock()  # the writer is used by one flush at a time

    async def flush(self) -> None:
        """On the loop: freeze what is not on disk, write it in a worker thread, then drop.

        :raises OSError: a write failed; what is not on disk stays in memory.
        """
        pending = self._pending()
        if pending is None:
            return
        try:
            await asyncio.to_thread(self._write, *pending)
        except OSError:
            if pending[-1] is not None:
                self.writer.staged = True  # run.json was not written: next time
            raise
        finally:
            self._after()

    def flush_here(self) -> None:
        """:meth:`flush` on the calling thread (at interpreter exit, when no loop may run)."""
        pending = self._pending()
        if pending is None:
            return
        try:
            self._write(*pending)
        except OSError:
            if pending[-1] is not None:
                self.writer.staged = True
            raise
        finally:
            self._after()

    async def run(self, interval_s: float) -> None:
        """Flush every ``interval_s`` until cancelled, then once more; a full disk is logged,
        never raised (sampling goes on, the rows wait in memory)."""
        # Interpreter exit (also after Ctrl-C) without a stop: the writer's atexit hook runs
        # the flush on this loop while it still runs (balloonlab's loop thread), else directly.
        self.writer.flush_at_exit(self.flush_here, asyncio.get_running_loop())
        try:
            while True:
                await asyncio.sleep(interval_s)
                await self._flush_logged()
        except asyncio.CancelledError:
            # stop(), or asyncio.run tearing down after Ctrl-C or a return without stop().
            await self._flush_logged()
            raise

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except OSError as exc:
            log.error("could not flush the run to %s: %s", self.writer.path, exc)

    def _pending(self) -> tuple[int, int, BufferSnapshot, BufferSnapshot, tuple[int, BufferSnapshot] | None,
                                dict[str, Any] | None] | None:
        """On the loop: the rows not yet on disk, frozen, and run.json's staged metadata
        (None when there is nothing to write)."""
        (s0, e0), (samples, events) = self.flushed, self._buffers
        s1, e1 = samples.total_rows, events.total_rows
        h0, h1 = self.host_flushed, (self._host.total_rows if self._host is not None else 0)
        metadata = self.writer.staged_metadata()
        if s1 <= s0 and e1 <= e0 and h1 <= h0 and metadata is None:
            return None
        host = (h0, self._host.snapshot(h0, h1)) if self._host is not None and h1 > h0 else None
        return s0, e0, samples.snapshot(s0, s1), events.snapshot(e0, e1), host, metadata

    def _write(self, s0: int, e0: int, samples: BufferSnapshot, events: BufferSnapshot,
               host: tuple[int, BufferSnapshot] | None, metadata: dict[str, Any] | None) -> None:
        """Any thread, one at a time: build the frames and hand them to the writer."""
        with self._lock:
            self.writer.flush(samples.frame(), events.frame(), first=(s0, e0),
                              host=host[1].frame() if host else None, host_first=host[0] if host else None)
            if metadata is not None:
                self.writer.write_staged(metadata)

    def _after(self) -> None:
        """On the loop: count what is on disk (also after a failure part-way) and drop the
        oldest of it from memory beyond ``max_rows_in_memory``."""
        self.flushed = self.writer.durable
        self.host_flushed = self.writer.durable_rows("host")
        buffers = (*self._buffers, self._host) if self._host is not None else self._buffers
        for buffer, durable in zip(buffers, (*self.flushed, self.host_flushed)[:len(buffers)], strict=True):
            excess = min(len(buffer) - self.max_rows_in_memory, durable - buffer.dropped)
            if excess > 0:
                buffer.drop_head(excess)
