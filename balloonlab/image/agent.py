"""Memory pressure inside the built-in guest, driven from the host.

The guest's workload agent listens on its second serial port (a unix socket on the host)
and speaks one line per request: ``<seq> <verb> [args]`` -> ``<seq> ok [data]`` or
``<seq> err <message>``. What is held, and how, is :class:`~balloonlab.model.workload.ChunkedWorkload`'s
bookkeeping (shared with qemu-guest-agent guests); this module is the built-in agent's transport.
Memory is held in chunks, each a process in the guest that touched
its pages, so "free some" is exact to a chunk. Patterns (:class:`balloonlab.experiments.runner.Schedule`
with kind "workload") are timed on the host, so every change is a host-timestamped event the
sampler can record. Beyond anonymous memory: a working set (:meth:`Workload.working_set`)
is a fixed set of chunks re-touched pass after pass, and :meth:`Workload.page_cache` writes and
reads the guest's scratch disk through its page cache. :class:`~balloonlab.image.truth.GuestTruth`
(``workload.truth``) records the guest's own /proc/meminfo and /proc/vmstat every 100 ms
inside the guest, a ground truth to hold the balloon's reports against.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Sequence

from balloonlab.image.truth import TRUTH_FIELDS, ClockProbe, GuestTruth, TruthRecording
from balloonlab.model.deadline import Deadline, wait_until
from balloonlab.model.errors import AgentError
from balloonlab.model.workload import CHUNK_BYTES, ChunkedWorkload

# The ground-truth names lived here before image.truth: still importable from this module.
__all__ = ["CHUNK_BYTES", "TRUTH_FIELDS", "ClockProbe", "GuestTruth", "TruthRecording", "Workload"]

class Workload(ChunkedWorkload):
    """Client of the in-guest workload agent on ``socket_path`` (an
    :class:`~balloonlab.model.protocols.AgentProtocol`).

    :param socket_path: the host end of the guest's serial port 1 (QEMU listens on it).
    """

    def __init__(self, socket_path: str) -> None:
        super().__init__()
        self.socket_path = str(socket_path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._truth: GuestTruth | None = None

    @property
    def truth(self) -> GuestTruth:
        """The guest's ground-truth recorder (/proc/meminfo and /proc/vmstat sampled inside
        the guest), on this agent connection."""
        if self._truth is None:
            self._truth = GuestTruth(self)
        return self._truth

    async def connect(self, timeout_s: float = 60.0) -> None:
        """Connect and wait until the agent answers ``ping`` (the guest has booted).

        :raises AgentError: no answer within ``timeout_s``.
        """
        deadline = Deadline(timeout_s)
        last_error: Exception | None = None

        async def answered() -> bool:
            nonlocal last_error
            try:
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path)
                await self._request("ping", timeout_s=min(2.0, max(0.1, deadline.left_s)))
                return True
            except (TimeoutError, OSError, AgentError) as exc:
                last_error = exc
                # A timed-out ping may still be answered later: start the stream afresh.
                await self.close()
                return False
        if not await wait_until(answered, timeout_s, poll_s=0.02):
            raise AgentError(f"workload agent on {self.socket_path} did not answer within {timeout_s} s "
                             f"(last error: {last_error})")

    async def close(self) -> None:
        """Close the connection (held memory stays held in the guest)."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _request(self, verb: str, *args: object, timeout_s: float = 30.0) -> str:
        if self._writer is None or self._reader is None:
            raise AgentError("workload agent is not connected")
        async with self._lock:
            seq = str(next(self._seq))
            self._writer.write(" ".join([seq, verb, *map(str, args)]).encode() + b"\n")
            await self._writer.drain()
            while True:
                async with asyncio.timeout(timeout_s):
                    line = await self._reader.readline()
                if not line:
                    raise AgentError("workload agent closed the connection (guest gone?)")
                parts = line.decode(errors="replace").strip().split(" ", 2)
                # Lines for other sequence numbers are late replies to a timed-out request.
                if len(parts) >= 2 and parts[0] == seq:
                    break
        data = parts[2] if len(parts) > 2 else ""
        if parts[1] != "ok":
            hint = ""
            if data.startswith(f"unknown verb '{verb}'"):
                hint = " (the guest's image predates this verb: rebuild it with `balloonlab guest build`)"
            raise AgentError(f"guest agent refused {verb}: {data}{hint}")
        return data

    # -- the transport's primitives (ChunkedWorkload) ------------------------------------------
    async def _alloc_chunk(self, chunk_id: str, nbytes: int) -> None:
        await self._request("alloc", chunk_id, nbytes, timeout_s=120.0)

    async def _free_chunk(self, chunk_id: str) -> None:
        await self._request("free", chunk_id)

    async def _free_all(self) -> None:
        await self._request("freeall")

    async def _alive_chunks(self) -> set[str]:
        data = await self._request("list")
        return {item.split(":")[0] for item in data.split(",") if item}

    async def _touch(self, chunk_ids: Sequence[str], timeout_s: float) -> None:
        await self._request("touch", *chunk_ids, timeout_s=timeout_s)

    async def _disk(self, op: str, nbytes: int, timeout_s: float) -> None:
        await self._request("disk", op, nbytes, timeout_s=timeout_s)

    # -- beyond the chunks ------------------------------------------------------------------
    async def ping(self) -> None:
        """Round trip to the agent."""
        await self._request("ping")

    async def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo highlights, in bytes (MemTotal, MemFree, MemAvailable...)."""
        data = await self._request("meminfo")
        return {k: int(v) for k, v in (item.split("=") for item in data.split())}

    async def churn(self, on: bool = True) -> None:
        """Start (or stop) a steady stream of page faults in the guest: ``/bin/true`` 10 times a
        second on an absolute schedule of the guest's clock, each exec faulting the same pages,
        so the fault counters rise at a steady rate (a known input for rate measurements)."""
        await self._request("churn", "on" if on else "off")

    async def reboot(self) -> None:
        """Reboot the guest from inside (``reboot -f`` in the guest, as a user's ``reboot``
        would, not QMP ``system_reset``). Memory held before is gone afterwards."""
        await self._request("reboot")
        self._chunks.clear()
        self._notify("reboot", time.monotonic())
