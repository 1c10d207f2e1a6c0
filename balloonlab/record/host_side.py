"""The sampler's host side: the host frame beside the guests' samples, the budget, and the
policies that decide targets from both (a mixin of :class:`~balloonlab.record.sampler.Sampler`,
kept apart so each file keeps one job)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import pandas as pd

from balloonlab.model.policy import Policy
from balloonlab.model.protocols import GuestProtocol
from balloonlab.record.buffer import BufferSnapshot, RowBuffer
from balloonlab.record.host_task import HostTask
from balloonlab.record.policy_loop import PolicyLoop
from balloonlab.record.store import RunWriter

if TYPE_CHECKING:
    from balloonlab.record.sampler import Sampler


class HostSide:
    """What :class:`~balloonlab.record.sampler.Sampler` does for the host and its policies."""

    _host: HostTask | None
    _samples: RowBuffer
    _guests: dict[str, tuple[GuestProtocol, Any]]
    _policies: list[PolicyLoop]
    _metadata: dict[str, Any]
    _writer: RunWriter | None

    def run_policy(self, policy: Policy, guests: list[str] | None = None, **options: Any) -> PolicyLoop:
        """Let ``policy`` set the targets of ``guests`` (default: every guest sampled now), from
        the next interval on, until :meth:`stop` (see :mod:`balloonlab.record.policy_loop`; its
        settings, e.g. ``interval_s``, ``window_s``, ``min_guarantee``, go in ``options``).

        :raises ValueError: an unknown guest, a setting out of range (the message says which), or a
            policy already running.
        """
        if any(loop.running for loop in self._policies):
            raise ValueError("a policy is already running on this sampler: stop_policies() first (run.json "
                             "records one policy's settings and limits, and two would fight over the targets)")
        names = list(self._guests) if guests is None else guests
        unknown = [name for name in names if name not in self._guests]
        if unknown:
            raise ValueError(f"not sampled here: {', '.join(unknown)}; add() them first")
        loop = PolicyLoop(cast("Sampler", self), [self._guests[name][0] for name in names], policy, **options)
        self.add_metadata(policy=loop.metadata())
        loop.start()
        self._policies.append(loop)
        return loop

    async def stop_host(self) -> None:
        """Stop the policies, then the host frame (after one last row): before the guests shut
        down, so the frame ends with the run, not with guests leaving one by one."""
        await self.stop_policies()
        if self._host is not None:
            await self._host.stop()

    async def stop_policies(self) -> None:
        """Stop every policy started with :meth:`run_policy` (before its guests shut down)."""
        for policy in self._policies:
            await policy.stop()

    def host_frame(self) -> pd.DataFrame:
        """The host frame in memory (``HOST_FRAME`` in :mod:`balloonlab.model.schema`); empty
        without ``host_interval_s``."""
        return self.host_snapshot().frame() if self._host is not None else pd.DataFrame()

    def host_snapshot(self, since_row: int = 0) -> BufferSnapshot:
        """The host rows in memory, frozen (see :meth:`samples_snapshot`).

        :raises RuntimeError: this sampler reads no host (``host_interval_s=None``).
        """
        if self._host is None:
            raise RuntimeError("this sampler was made with host_interval_s=None: it has no host frame")
        buffer = self._host.buffer
        return buffer.snapshot(max(buffer.dropped, since_row), attrs={"dropped_rows": buffer.dropped})

    @property
    def has_host(self) -> bool:
        """True when this sampler reads the host frame."""
        return self._host is not None

    def rows_recorded(self) -> tuple[int, int]:
        """Rows ever recorded of (samples, host): where the next row of each will be numbered."""
        return self._samples.total_rows, self._host.buffer.total_rows if self._host is not None else 0

    def add_metadata(self, **fields: Any) -> None:
        """Add ``fields`` to the run's run.json (with the next flush); no-op without a run folder."""
        self._metadata.update(fields)
        if self._writer is not None:
            self._writer.metadata.update(fields)
            self._writer.staged = True

    @property
    def host_budget(self) -> int | None:
        """The host memory budget in bytes written into the host frame (None: the real host)."""
        return self._host.budget if self._host is not None else None

    @host_budget.setter
    def host_budget(self, budget: int | None) -> None:
        if self._host is None and budget is None:
            return
        if self._host is None:
            raise RuntimeError("this sampler was made with host_interval_s=None: it has no host frame")
        if budget is not None and (type(budget) is not int or budget <= 0):
            raise ValueError(f"a host budget is a number of bytes above 0, got {budget!r}")
        self._host.budget = budget

    def _guests_memory(self) -> dict[str, tuple[int | None, int | None]]:
        """Every guest being sampled: its QEMU's (RSS, resident guest RAM) now (None where the
        host cannot see it). Between two reads of the split (kernels before 6.7 read it from
        /proc/PID/smaps at most every 10 s) a guest's RAM is its RSS minus the rest last seen,
        so its footprint does not jump by the VMM's ~110 MiB from one host row to the next."""
        rest = self._host.vmm_rest if self._host is not None else {}
        out: dict[str, tuple[int | None, int | None]] = {}
        for name, (guest, state) in self._guests.items():
            if state.state not in ("starting", "sampling") or not guest.on_this_host:
                continue  # a remote guest's memory is its own host's, not this one's
            host = guest.host_memory()
            if host is None:
                out[name] = (guest.rss_bytes(), None)
                continue
            rss, ram = host.rss, host.guest_ram
            if rss is not None and ram is not None:
                rest[name] = rss - ram
            elif rss is not None and name in rest:
                ram = max(0, rss - rest[name])
            out[name] = (rss, ram)
        return out
