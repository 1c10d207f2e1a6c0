"""Memory pressure inside a guest, driven from the host, whatever carries the commands.

Memory is held in chunks, each a process in the guest that touched its pages, so "free some"
is exact to a chunk. Beyond anonymous memory: a working set (:meth:`ChunkedWorkload.working_set`)
is a fixed set of chunks re-touched pass after pass, and :meth:`ChunkedWorkload.page_cache`
writes and reads a disk through the guest's page cache. Every step is timed and told to the
listeners as a :class:`~balloonlab.model.protocols.WorkloadChange`, so the sampler records it as
a host-timestamped ``workload`` event that the step-response and re-touch analyses read.

:class:`ChunkedWorkload` is that bookkeeping, once; a transport implements six primitives
(allocate a chunk, free one, free all, list the live ones, touch some, a disk step): balloonlab's
own agent in the built-in guest (:class:`balloonlab.image.agent.Workload`) and qemu-guest-agent
in any other guest (:class:`balloonlab.model.qga_workload.QgaWorkload`), so both guests are
driven the same way.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from balloonlab.model.errors import AgentError
from balloonlab.model.protocols import WorkloadChange
from balloonlab.model.units import format_size, parse_size

__all__ = ["CHUNK_BYTES", "ChunkedWorkload"]

#: Allocation granularity: "hold N bytes" is met to within one chunk.
CHUNK_BYTES = 32 << 20
#: Time allowed per MiB moved in one request (a working-set pass, a disk write or read),
#: beyond the 120 s any request gets: TCG guests copy tens of MiB a second, not one.
_TIMEOUT_S_PER_MIB = 1.0


class ChunkedWorkload(abc.ABC):
    """The host's bookkeeping of memory held in a guest (an
    :class:`~balloonlab.model.protocols.AgentProtocol` once a transport adds its primitives)."""

    def __init__(self) -> None:
        self._chunks: list[tuple[str, int]] = []
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[WorkloadChange], None]] = []
        # The working set: its chunks' ids (in _chunks while held) and the size asked for.
        self._working: list[str] = []
        self._working_size = 0

    # -- the transport's primitives -------------------------------------------------------
    @abc.abstractmethod
    async def _alloc_chunk(self, chunk_id: str, nbytes: int) -> None:
        """Make a process in the guest hold ``nbytes``, every page touched; return once it does."""

    @abc.abstractmethod
    async def _free_chunk(self, chunk_id: str) -> None:
        """End the chunk's process (its memory is free once this returns)."""

    @abc.abstractmethod
    async def _free_all(self) -> None:
        """End every chunk's process."""

    @abc.abstractmethod
    async def _alive_chunks(self) -> set[str]:
        """The ids of the chunks whose process still runs."""

    @abc.abstractmethod
    async def _touch(self, chunk_ids: Sequence[str], timeout_s: float) -> None:
        """Write every page of these chunks again (swapped-out pages come back)."""

    @abc.abstractmethod
    async def _disk(self, op: str, nbytes: int, timeout_s: float) -> None:
        """``op`` "write" or "read": ``nbytes`` through the guest's page cache."""

    # -- what the host asks for -----------------------------------------------------------
    @property
    def held(self) -> int:
        """Bytes the agent holds now on balloonlab's behalf."""
        return sum(size for _, size in self._chunks)

    def add_listener(self, listener: Callable[[WorkloadChange], None]) -> None:
        """Call ``listener(change)`` whenever held memory changes."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[WorkloadChange], None]) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def alloc(self, size: int | str) -> int:
        """Allocate and touch ``size`` more bytes in the guest; returns once they are held.

        :returns: bytes held in total afterwards.
        :raises AgentError: the guest could not allocate (what was allocated before stays).
        """
        await self._allocate(_positive_size(size, "allocation size"))
        return self.held

    async def _allocate(self, nbytes: int, ids: list[str] | None = None) -> None:
        """Allocate ``nbytes`` in chunks (each chunk's id appended to ``ids`` once held)."""
        started = time.monotonic()
        before = self.held
        try:
            for chunk in _split(nbytes):
                chunk_id = f"c{next(self._ids)}"
                await self._alloc_chunk(chunk_id, chunk)
                self._chunks.append((chunk_id, chunk))
                if ids is not None:
                    ids.append(chunk_id)
            # Under pressure the guest's OOM killer may take earlier holders while new ones
            # succeed: check what is really held before saying the memory is there.
            if await self.sync():
                raise AgentError(f"the guest's OOM killer took memory during this allocation: it holds "
                                 f"{format_size(self.held)} now, not {format_size(before + nbytes)}")
        finally:
            self._notify(f"alloc {format_size(nbytes)}", started)

    async def working_set(self, size: int | str, *, passes: int = 1, pause_s: float = 0.0) -> list[float]:
        """Re-touch a fixed working set of ``size`` bytes, ``passes`` times.

        The first call allocates the set (in chunks, counted in :attr:`held`, an ``"alloc N
        MiB"`` event as :meth:`alloc` makes, every page touched); every pass then writes every
        page of the SAME memory again (a ``"touch N MiB"`` event with the pass's duration),
        with ``pause_s`` between passes. A later call with the same size re-touches the set
        it finds, after allocating again what :meth:`free`, :meth:`hold` or the guest's OOM
        killer took from it. This is what a re-touch experiment runs while the balloon
        inflates: pages reclaimed or swapped under the balloon must come back on every pass.
        :meth:`free` releases the set like any held memory.

        :param size: bytes (or ``"64M"``).
        :param passes: re-touch passes after the set exists (0: only make sure it does).
        :param pause_s: seconds between two passes.
        :returns: each pass's duration in seconds, as timed on the host (one request each).
        :raises ValueError: a size that is not positive, a size other than the existing set's
            (``free()`` it first), negative ``passes`` or ``pause_s``.
        :raises AgentError: the guest could not allocate, or its OOM killer took part of the
            set during a pass (what is left stays held and is topped up by the next call).
        """
        nbytes = _positive_size(size, "working set size")
        if type(passes) is not int or passes < 0:
            raise ValueError(f"passes must be an int >= 0, got {passes!r}")
        if not pause_s >= 0:
            raise ValueError(f"pause_s must be >= 0, got {pause_s!r}")
        await self.sync()  # holders the OOM killer took are not part of the set any more
        live = self._working_set_chunks()
        if live and nbytes != self._working_size:
            raise ValueError(f"the working set is {format_size(self._working_size)}, not {format_size(nbytes)}: "
                             "free() it before asking for another size")
        self._working = [chunk_id for chunk_id, _ in live]
        self._working_size = nbytes
        if missing := nbytes - sum(chunk for _, chunk in live):
            await self._allocate(missing, self._working)
        durations: list[float] = []
        for number in range(passes):
            if number and pause_s:
                await asyncio.sleep(pause_s)
            started = time.monotonic()
            try:
                await self._touch(self._working, _timeout_s(nbytes))
            except AgentError as exc:
                await self.sync()
                raise AgentError(f"pass {number + 1} over the {format_size(nbytes)} working set failed: {exc}; "
                                 f"the agent holds {format_size(self.held)} now") from exc
            durations.append(self._notify(f"touch {format_size(nbytes)}", started))
        return durations

    def _working_set_chunks(self) -> list[tuple[str, int]]:
        """The working set's chunks the agent still holds."""
        mine = set(self._working)
        return [(chunk_id, chunk) for chunk_id, chunk in self._chunks if chunk_id in mine]

    async def page_cache(self, size: int | str, *, reads: int = 1) -> list[float]:
        """Write ``size`` bytes to a disk of the guest, then read them back ``reads`` times, all
        through the guest's page cache (no O_DIRECT): the built-in guest's scratch disk, or a
        file on the root file system of a qemu-guest-agent guest.

        The disk's cached pages are file pages: they show in the balloon's ``disk_caches``
        (the guest's file pages less swap cache) and compete with the balloon, which only
        gets them once reclaim drops them. More than the guest's free memory, read and read
        again, keeps the cache full and evicting. The write ends with an fsync (the data is on
        the disk, not waiting for writeback). Each step is a workload event, ``"write N MiB"``
        and ``"read N MiB"``, with its duration; :attr:`held` does not change.

        :param size: bytes (or ``"512M"``), from the start of the disk; at most its size.
        :param reads: how many times to read it back after writing it (0: write only).
        :returns: the durations in seconds, as timed on the host: the write, then each read.
        :raises ValueError: a size that is not positive or negative ``reads``.
        :raises AgentError: the guest has no disk to write (the built-in guest needs
            ``builtin_spec(..., scratch_disk="1G")``) or it is smaller than ``size``.
        """
        nbytes = _positive_size(size, "page cache size")
        if type(reads) is not int or reads < 0:
            raise ValueError(f"reads must be an int >= 0, got {reads!r}")
        durations: list[float] = []
        for op in ("write", *("read",) * reads):
            started = time.monotonic()
            await self._disk(op, nbytes, _timeout_s(nbytes))
            durations.append(self._notify(f"{op} {format_size(nbytes)}", started))
        return durations

    async def free(self, size: int | str | None = None) -> int:
        """Free ``size`` bytes (most recent first), or everything when ``size`` is None.

        :returns: bytes held afterwards.
        """
        if size is None:
            started = time.monotonic()
            await self._free_all()
            self._chunks.clear()
            self._notify("free all", started)
            return 0
        return await self.hold(max(0, self.held - parse_size(size)))

    async def hold(self, size: int | str) -> int:
        """Make the agent hold ``size`` bytes, allocating or freeing the difference."""
        target = parse_size(size)
        started = time.monotonic()
        changed = await self.sync()
        while self._chunks and self.held - self._chunks[-1][1] >= target:
            chunk_id, _ = self._chunks[-1]
            await self._free_chunk(chunk_id)
            self._chunks.pop()
            changed = True
        if self.held > target:
            # The last chunk straddles the target: swap it for one of the exact remainder.
            chunk_id, _ = self._chunks.pop()
            await self._free_chunk(chunk_id)
            changed = True
        if target > self.held:
            await self.alloc(target - self.held)
        elif changed:
            self._notify(f"hold {format_size(target)}", started)
        return self.held

    async def sync(self) -> bool:
        """Forget chunks the guest no longer holds (the OOM killer may have taken them).

        :returns: True when something was forgotten.
        """
        alive = await self._alive_chunks()
        kept = [(cid, size) for cid, size in self._chunks if cid in alive]
        lost = len(kept) != len(self._chunks)
        self._chunks = kept
        return lost

    async def run_pattern(self, pattern: Iterable[tuple[float, int]]) -> None:
        """Follow a schedule of ``(seconds from start, bytes to hold)`` steps."""
        start = time.monotonic()
        for at_s, level in pattern:
            await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
            await self.hold(level)

    def _notify(self, detail: str, started: float) -> float:
        """Tell the listeners that a step begun at ``started`` ended; returns its duration (s)."""
        change = WorkloadChange(time.time(), self.held, detail, time.monotonic() - started)
        for listener in list(self._listeners):
            listener(change)
        return change.duration_s


def _positive_size(size: int | str, what: str) -> int:
    nbytes = parse_size(size)
    if nbytes <= 0:
        raise ValueError(f"{what} must be above 0, got {size!r}")
    return nbytes


def _timeout_s(nbytes: int) -> float:
    return max(120.0, nbytes / (1 << 20) * _TIMEOUT_S_PER_MIB)


def _split(nbytes: int) -> Iterator[int]:
    while nbytes > 0:
        chunk = min(CHUNK_BYTES, nbytes)
        yield chunk
        nbytes -= chunk
