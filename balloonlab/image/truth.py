"""The guest's own view of its memory, recorded inside the built-in guest by the agent.

:class:`GuestTruth` (``Workload.truth``) has the agent sample /proc/meminfo and /proc/vmstat
every 100 ms inside the guest, a ground truth to hold the balloon's reports against;
:class:`ClockProbe` maps the guest's uptime onto the host's clock and :class:`TruthRecording`
holds what was recorded. It speaks through a :class:`~balloonlab.image.agent.Workload`'s
connection (the agent's ``truth`` and ``uptime`` verbs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from balloonlab.model.errors import AgentError

if TYPE_CHECKING:  # the agent client imports this module: no import cycle at run time
    from balloonlab.image.agent import Workload

__all__ = ["TRUTH_FIELDS", "ClockProbe", "GuestTruth", "TruthRecording"]


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
