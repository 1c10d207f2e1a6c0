"""Drive a guest through memory-pressure phases, one or more classifier windows each.

:func:`drive_pressure` samples one guest with the built-in workload agent while it plays
:class:`Phase` s in order (idle, then pressure, then an OOM kill, by default), each made of
steps (allocate in the guest, hold, set the balloon target) and lasting whole windows of
:func:`~balloonlab.analysis.pressure.classify_pressure`: every phase starts on a window
boundary (windows are aligned on the epoch), so each window belongs to exactly one phase and
:meth:`PressureRun.regimes` can say which regimes the classifier saw in which phase. The
defaults (:data:`DEFAULT_PHASES`) are sized for the built-in guest with ``memory="512M"`` and
``swap="192M"`` on Linux 6.12 (the six reclaim counters need QEMU >= 9.2 too): 300 MiB held
and the balloon at 256 MiB push about 130 MiB into zram through direct reclaim (``global``);
160 MiB more do not fit in what RAM and swap have left, and the OOM killer takes the agent's
holders (``critical``). The agent's memory is zero-filled, which 6.12 swaps out without
compressing or writing anything, so swap absorbs it as fast as reclaim scans it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from balloonlab.analysis.pressure import REGIME_DTYPE, PressureThresholds, classify_pressure
from balloonlab.model.deadline import wait_until
from balloonlab.model.errors import AgentError
from balloonlab.model.guest import async_guest
from balloonlab.model.units import parse_size
from balloonlab.record.sampler import Sampler

#: One step of a phase: ``("alloc", size)`` more memory for the agent to touch, ``("hold",
#: size)`` in total, or ``("target", size)`` for the balloon (returns once QEMU took it).
Step = tuple[Literal["alloc", "hold", "target"], int | str]


@dataclass(frozen=True)
class Phase:
    """A named phase: its steps, run in order from its first window boundary, then idle until
    ``windows`` windows have passed (longer if the steps take longer, to the next boundary at
    least ``settle_s`` after the last step, so their reclaim is reported inside the phase)."""

    name: str
    steps: tuple[Step, ...] = ()
    windows: int = 1


#: Idle, pressure (direct reclaim into zram), OOM; for ``builtin_spec(memory="512M", swap="192M")``.
DEFAULT_PHASES: tuple[Phase, ...] = (
    Phase("idle"),
    Phase("pressure", (("alloc", "300M"), ("target", "256M"))),
    Phase("oom", (("alloc", "160M"),)),
)


@dataclass(frozen=True)
class PressureRun:
    """What :func:`drive_pressure` recorded.

    ``samples`` and ``events`` are the sampler's frames (with a ``phase`` event at each phase's
    start, detail = its name, and a ``step_failed`` event for each allocation the guest's OOM
    killer cut short);
    ``phases`` has one row per phase: ``phase``, ``start``/``end`` (UTC, window boundaries),
    ``expected_held`` (bytes the agent would hold had every step succeeded), ``held`` (bytes
    it still holds at the end, after forgetting what the OOM killer took) and ``error``.
    """

    samples: pd.DataFrame
    events: pd.DataFrame
    phases: pd.DataFrame
    window_s: float

    def pressure(self, thresholds: PressureThresholds | None = None) -> pd.DataFrame:
        """:func:`~balloonlab.analysis.pressure.classify_pressure` over this run's windows,
        with a ``phase`` column (NA for a window before the first phase).

        :param thresholds: the classifier's thresholds; their window is this run's.
        """
        out = classify_pressure(self.samples, window=f"{self.window_s}s", thresholds=thresholds)
        step = pd.Timedelta(seconds=self.window_s)
        keys = np.asarray((out.index - pd.Timestamp(0, tz="UTC")) // step)
        starts = (self.phases["start"] - pd.Timestamp(0, tz="UTC")) // step
        ends = (self.phases["end"] - pd.Timestamp(0, tz="UTC")) // step
        phase = pd.Series(pd.NA, index=out.index, dtype="string")
        for name, first, stop in zip(self.phases["phase"], starts, ends, strict=True):
            phase[(keys >= first) & (keys < stop)] = name
        return out.assign(phase=phase.array)

    def regimes(self, thresholds: PressureThresholds | None = None) -> pd.DataFrame:
        """Per phase: the worst regime of its windows and every regime seen, in window order."""
        p = self.pressure(thresholds)
        rows = [{"phase": name,
                 "worst": p.loc[p["phase"] == name, "regime"].max(),
                 "seen": list(p.loc[p["phase"] == name, "regime"].astype(str))}
                for name in self.phases["phase"]]
        return pd.DataFrame(rows).astype({"worst": REGIME_DTYPE}).set_index("phase")


async def drive_pressure(guest: Any, phases: Sequence[Phase] = DEFAULT_PHASES, *, window_s: float = 10.0,
                         settle_s: float = 2.0, run_dir: str | Path | None = None,
                         first_report_timeout_s: float = 30.0, settle_timeout_s: float = 60.0) -> PressureRun:
    """Sample ``guest`` while it plays ``phases``, each starting on a window boundary.

    The memory held and the balloon's target are left as the last phase left them.

    :param guest: a guest with balloonlab's workload agent (``Guest``, or a ``SyncGuest`` when
        this runs on balloonlab's loop: ``balloonlab.blocking.loop.run(drive_pressure(g))``).
    :param phases: what to do (default :data:`DEFAULT_PHASES`).
    :param window_s: the classifier window the phases are aligned to (seconds, >= 1).
    :param settle_s: seconds after a phase's last step before the phase may end; also how long
        the balloon must stand still after a ``target`` step to count as stopped.
    :param settle_timeout_s: the longest a ``target`` step waits for the balloon to stop.
    :param run_dir: also stream the recording to this run folder.
    :param first_report_timeout_s: how long to wait for the guest's first stats report.
    :raises ValueError: for no phases, a bad window or an unknown step.
    :raises TimeoutError: the guest sent no stats report in time.
    :raises AgentError: the agent stopped answering (a refused allocation is recorded instead).
    """
    if not phases or window_s < 1:
        raise ValueError(f"need at least one phase and window_s >= 1, got {len(phases)} phases, {window_s} s")
    for phase in phases:
        for verb, size in phase.steps:
            if verb not in ("alloc", "hold", "target"):
                raise ValueError(f"phase {phase.name!r}: unknown step {verb!r} (alloc, hold or target)")
            parse_size(size)
    g = async_guest(guest, "drive_pressure")
    workload = g.workload
    await workload.connect()
    sampler = Sampler(run_dir=run_dir, metadata={"experiment": "pressure-drive", "window_s": window_s})
    rows: list[dict[str, Any]] = []
    async with sampler:
        await sampler.add(g)
        state = sampler.states()[g.name]
        if not await wait_until(lambda: state.samples >= 1, first_report_timeout_s, poll_s=0.1):
            raise TimeoutError(f"guest {g.name} sent no stats report within {first_report_timeout_s} s")
        start = _next_boundary(time.time() + 0.5, window_s)
        for phase in phases:
            await asyncio.sleep(max(0.0, start - time.time()))
            sampler.record_event(g.name, "phase", None, phase.name, at=start)
            expected, error = workload.held, ""
            for verb, size in phase.steps:
                if verb == "target":
                    # The reclaim an inflation causes comes while the balloon moves, which takes
                    # seconds under TCG on a loaded host: the phase lasts until it stopped.
                    await g.balloon.set_target(size)
                    settled = await g.balloon.wait_for_actual(timeout_s=settle_timeout_s, settle_s=settle_s)
                    if not settled.reached:
                        sampler.record_event(g.name, "step_failed", settled.final_actual,
                                             f"target {size}: balloon stopped at {settled.final_actual} bytes")
                    continue
                expected = parse_size(size) + (expected if verb == "alloc" else 0)
                try:
                    await (workload.alloc(size) if verb == "alloc" else workload.hold(size))
                except AgentError as exc:
                    # The OOM killer took a holder (an earlier chunk, or the one being touched:
                    # then the agent says the allocation failed). A lost agent fails sync() below.
                    error = str(exc)
                    sampler.record_event(g.name, "step_failed", workload.held, f"{verb} {size}: {exc}")
            await workload.sync()
            end = _next_boundary(max(start + phase.windows * window_s - 0.5, time.time() + settle_s), window_s)
            rows.append({"phase": phase.name, "start": start, "end": end, "expected_held": expected,
                         "held": workload.held, "error": error})
            start = end
        await asyncio.sleep(max(0.0, start - time.time()) + 0.2)  # the last window's reads are in
    frame = pd.DataFrame(rows)
    for col in ("start", "end"):
        frame[col] = pd.to_datetime(frame[col], unit="s", utc=True)
    return PressureRun(sampler.frame(), sampler.events(), frame, float(window_s))


def _next_boundary(t: float, window_s: float) -> float:
    """The first epoch-aligned window boundary at or after ``t``."""
    return -(-t // window_s) * window_s
