"""Memory pressure inside the built-in guest, driven from the host.

The guest's workload agent listens on its second serial port (a unix socket on the host)
and speaks one line per request: ``<seq> <verb> [args]`` -> ``<seq> ok [data]`` or
``<seq> err <message>``. Memory is held in chunks, each a process in the guest that touched
its pages, so "free some" is exact to a chunk. Patterns (:class:`balloonlab.experiments.runner.Schedule`
with kind "workload") are timed on the host, so every change is a host-timestamped event the
sampler can record. :class:`GuestTruth` (``workload.truth``) records the guest's own
/proc/meminfo and /proc/vmstat every 100 ms inside the guest, a ground truth to hold the
balloon's reports against.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from balloonlab.model.deadline import Deadline, wait_until
from balloonlab.model.errors import AgentError
from balloonlab.model.protocols import WorkloadChange
from balloonlab.model.units import format_size, parse_size

#: Allocation granularity: "hold N bytes" is met to within one chunk.
CHUNK_BYTES = 32 << 20


class Workload:
    """Client of the in-guest workload agent on ``socket_path`` (an
    :class:`~balloonlab.model.protocols.AgentProtocol`).

    :param socket_path: the host end of the guest's serial port 1 (QEMU listens on it).
    """

    def __init__(self, socket_path: str) -> None:
        self.socket_path = str(socket_path)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()
        self._chunks: list[tuple[str, int]] = []
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[WorkloadChange], None]] = []
        self._truth: GuestTruth | None = None

    @property
    def truth(self) -> GuestTruth:
        """The guest's ground-truth recorder (/proc/meminfo and /proc/vmstat sampled inside
        the guest), on this agent connection."""
        if self._truth is None:
            self._truth = GuestTruth(self)
        return self._truth

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
            raise AgentError(f"guest agent refused {verb}: {data}")
        return data

    async def ping(self) -> None:
        """Round trip to the agent."""
        await self._request("ping")

    async def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo highlights, in bytes (MemTotal, MemFree, MemAvailable...)."""
        data = await self._request("meminfo")
        return {k: int(v) for k, v in (item.split("=") for item in data.split())}

    async def alloc(self, size: int | str) -> int:
        """Allocate and touch ``size`` more bytes in the guest; returns once they are held.

        :returns: bytes held in total afterwards.
        :raises AgentError: the guest could not allocate (what was allocated before stays).
        """
        nbytes = parse_size(size)
        if nbytes <= 0:
            raise ValueError(f"allocation size must be above 0, got {size!r}")
        started = time.monotonic()
        before = self.held
        try:
            for chunk in _split(nbytes):
                chunk_id = f"c{next(self._ids)}"
                await self._request("alloc", chunk_id, chunk, timeout_s=120.0)
                self._chunks.append((chunk_id, chunk))
            # Under pressure the guest's OOM killer may take earlier holders while new ones
            # succeed: check what is really held before saying the memory is there.
            if await self.sync():
                raise AgentError(f"the guest's OOM killer took memory during this allocation: it holds "
                                 f"{format_size(self.held)} now, not {format_size(before + nbytes)}")
        finally:
            self._notify(f"alloc {format_size(nbytes)}", started)
        return self.held

    async def free(self, size: int | str | None = None) -> int:
        """Free ``size`` bytes (most recent first), or everything when ``size`` is None.

        :returns: bytes held afterwards.
        """
        if size is None:
            started = time.monotonic()
            await self._request("freeall")
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
            await self._request("free", chunk_id)
            self._chunks.pop()
            changed = True
        if self.held > target:
            # The last chunk straddles the target: swap it for one of the exact remainder.
            chunk_id, _ = self._chunks.pop()
            await self._request("free", chunk_id)
            changed = True
        if target > self.held:
            await self.alloc(target - self.held)
        elif changed:
            self._notify(f"hold {format_size(target)}", started)
        return self.held

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

    async def sync(self) -> bool:
        """Forget chunks the guest no longer holds (the OOM killer may have taken them).

        :returns: True when something was forgotten.
        """
        data = await self._request("list")
        alive = {item.split(":")[0] for item in data.split(",") if item}
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

    def _notify(self, detail: str, started: float) -> None:
        change = WorkloadChange(time.time(), self.held, detail, time.monotonic() - started)
        for listener in list(self._listeners):
            listener(change)


#: What the guest records by default: the memory picture and the reclaim counters. A field the
#: guest's kernel lacks (allocstall_dma on a kernel without ZONE_DMA...) is left out.
TRUTH_FIELDS = ("MemTotal", "MemFree", "MemAvailable", "Cached", "AnonPages", "Shmem", "SwapTotal", "SwapFree",
                "pgfault", "pgmajfault", "pswpin", "pswpout", "pgscan_kswapd", "pgscan_direct", "pgsteal_kswapd",
                "pgsteal_direct", "allocstall_dma", "allocstall_dma32", "allocstall_normal", "allocstall_movable",
                "oom_kill")


@dataclass(frozen=True)
class ClockProbe:
    """One reading of the guest's /proc/uptime between two host clock readings (epoch s).

    The uptime was read somewhere in ``[host_before, host_after]`` and is truncated to
    hundredths, so ``offset_s`` (host epoch minus guest uptime) is exact to ``error_s``.
    """

    host_before: float
    host_after: float
    uptime_s: float

    @property
    def offset_s(self) -> float:
        """Host epoch seconds at guest uptime 0, from this probe."""
        return (self.host_before + self.host_after) / 2 - (self.uptime_s + 0.005)

    @property
    def error_s(self) -> float:
        """Half the round trip plus half the uptime's 10 ms resolution: the offset's bound."""
        return (self.host_after - self.host_before) / 2 + 0.005


@dataclass(frozen=True)
class TruthRecording:
    """What the guest recorded: ``rows`` of ``(uptime_s, value, ...)`` in ``fields`` order.

    Memory fields are in bytes (the guest writes kB), counters as the kernel counts them;
    ``full`` says the guest stopped at its ``max_samples``.
    """

    fields: tuple[str, ...]
    rows: list[tuple[float, ...]]
    full: bool


class GuestTruth:
    """The built-in guest's own view of its memory, sampled inside the guest by the agent.

    One long-lived awk in the guest reads /proc/uptime, /proc/meminfo and /proc/vmstat every
    ``interval_s`` on an absolute schedule of the guest's clock, with no process forked per
    sample (a fork would add page faults to the counters it records), and appends one line
    per sample to a file in the guest's tmpfs (about 110 bytes a sample: 4 MB an hour at
    100 ms, counted in the guest's Shmem). The host fetches it afterwards in bounded batches,
    one reply line each, and maps guest uptime to host time with :meth:`probe_clock`.

    :param workload: the agent connection to use.
    """

    def __init__(self, workload: Workload) -> None:
        self._workload = workload

    async def start(self, interval_s: float = 0.1, max_samples: int = 36_000,
                    fields: Sequence[str] = TRUTH_FIELDS) -> tuple[str, ...]:
        """Start recording (a new recording: an earlier one in the guest is dropped).

        :param interval_s: time between samples, a multiple of 10 ms (the guest's uptime
            counts hundredths).
        :param max_samples: the guest stops after this many (bounds its tmpfs file).
        :param fields: /proc/meminfo and /proc/vmstat names to record.
        :returns: the fields this guest's kernel has, in recording order.
        :raises ValueError: an interval that is not a positive multiple of 10 ms.
        :raises AgentError: already recording, or the guest refused (bad field name...).
        """
        interval_ms = round(interval_s * 1000)
        if interval_ms < 10 or interval_ms % 10 or abs(interval_ms - interval_s * 1000) > 1e-6:
            raise ValueError(f"interval_s must be a positive multiple of 0.01 s, got {interval_s!r}")
        data = await self._workload._request("truth", "start", interval_ms, max_samples, *fields)
        header = data.split()[2:]  # "<pid> uptime <field>..."
        return tuple(name.removesuffix(":kB") for name in header)

    async def stop(self) -> int:
        """Stop recording (what was recorded stays for :meth:`fetch`).

        :returns: samples recorded.
        """
        return int(await self._workload._request("truth", "stop"))

    async def fetch(self, batch_lines: int = 300) -> TruthRecording:
        """Everything recorded so far, ``batch_lines`` (and at most about 30 KB) per request.

        :raises AgentError: nothing was ever started in this guest.
        """
        lines: list[str] = []
        while True:
            data = await self._workload._request("truth", "fetch", len(lines), batch_lines)
            parts = data.split(" ", 3)  # state, from, count, records
            if int(parts[2]) == 0:
                break
            lines.extend(parts[3].split(";"))
        if not lines or not lines[0].startswith("# uptime"):
            raise AgentError(f"the guest's ground truth has no header line (got {lines[:1]!r})")
        names = lines[0].split()[2:]
        scale = [1024 if name.endswith(":kB") else 1 for name in names]
        rows = []
        for line in lines[1:]:
            values = line.split()
            if values[0] == "#" or len(values) != len(names) + 2:
                continue  # "# full", or a line the guest never finished
            rows.append((float(values[0]), *(int(v) * k for v, k in zip(values[1:-1], scale, strict=True))))
        return TruthRecording(tuple(n.removesuffix(":kB") for n in names), rows, lines[-1] == "# full")

    async def probe_clock(self, probes: int = 5) -> ClockProbe:
        """The guest's uptime against the host's clock: the tightest of ``probes`` round trips.

        :raises ValueError: ``probes`` below 1.
        """
        if probes < 1:
            raise ValueError(f"probes must be at least 1, got {probes!r}")
        best: ClockProbe | None = None
        for _ in range(probes):
            before = time.time()
            uptime = float(await self._workload._request("uptime"))
            probe = ClockProbe(before, time.time(), uptime)
            if best is None or probe.error_s < best.error_s:
                best = probe
        assert best is not None
        return best


def _split(nbytes: int) -> Iterator[int]:
    while nbytes > 0:
        chunk = min(CHUNK_BYTES, nbytes)
        yield chunk
        nbytes -= chunk
