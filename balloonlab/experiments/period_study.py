"""The polling-period study: what a stats period of 1, 2, 5, 10 or 30 s sees of memory bursts.

KubeVirt took 10 s "from OpenStack" and CloudStack argued 0 against 60 without measuring.
:class:`PeriodStudy` launches one guest per period side by side, identical but for the
period, plays the same host-timed burst schedule on all of them through an
:class:`~balloonlab.experiments.runner.Experiment` (one sampler records every guest), and
holds each guest's balloon reports against a ground truth sampled inside that guest every
100 ms by the workload agent (``workload.truth``). The analyses are
:mod:`balloonlab.analysis.period_study`; everything lands in the run folder.

Bursts (the workload schedule): an **alloc** burst holds ``alloc_bytes`` (by default 45 % of
the guest's MemAvailable: it fits, nothing is reclaimed); a **reclaim** burst holds
``reclaim_bytes`` (by default MemAvailable plus 32 MiB), more than the guest has free, so its
kernel must reclaim (kswapd and direct reclaim swap anonymous pages out) before the
allocation completes; the guest needs swap for that (``builtin_spec(swap="128M")``; without
swap the OOM killer would end the burst). Each is held ``hold_s`` from its request, or as
long as the guest takes to touch the memory if that is longer: under TCG with five guests on
two cores, 48 MiB took 1-1.5 s and 128 MiB with reclaim 4-8 s here. The truth, not the
schedule, says when each burst really started and ended.

Time: each guest stamps its samples with its own /proc/uptime; the host maps that to its
clock by the tightest of five ``uptime`` round trips to the agent just after the truth starts
and just before it stops (exact to half the round trip plus the uptime's 10 ms resolution:
5-11 ms here, under TCG on a loaded host), the offset taken as drifting linearly in between
(it moved by less than that bound over three minutes here).

Report phases: with ``align_phases`` every guest's stats timer is restarted at one instant
(period 0, then the period: QEMU reports at once and re-arms from there), so the guests'
report grids are nested (each 30 s report is also a 10 s, 5 s, 2 s and 1 s one) and differ
in period only; the bursts' start times carry a seeded random jitter, so they land at every
phase of the grids.

Cost: the QMP commands the sampler sent each guest are counted (measured); the CPU of one
stats read is measured after the run over 300 back-to-back reads, in this process and in
QEMU's non-vCPU threads (QEMU's idle rate taken off); CPU per guest-hour is the product of
the two (derived). QEMU's non-vCPU CPU over the whole run is kept too (measured, idle work
included). The guest's side of a report (its driver filling in the stats) runs on its vCPU,
where under TCG it cannot be told from the rest of the guest's work: it is not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import pandas as pd

from balloonlab.analysis.period_study import (detect, find_bursts, period_table, planned_bursts,
                                              plot_period_study, truth_frame)
from balloonlab.domain import DomainSpec, with_changes
from balloonlab.experiments.runner import Experiment
from balloonlab.experiments.schedule import Schedule, require_positive_s
from balloonlab.model.errors import AgentError
from balloonlab.model.units import parse_size
from balloonlab.qemu.guest import Guest
from balloonlab.record.store import Run

MiB = 1 << 20
DEFAULT_PERIODS = (1, 2, 5, 10, 30)
#: How long a burst's allocation may take before its release is due (see the module docstring).
RAMP_S = {"alloc": 2.0, "reclaim": 8.0}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Burst:
    """One planned burst: ``size`` bytes held from ``at_s`` (seconds into the schedule)."""

    at_s: float
    kind: str
    size: int
    hold_s: float


class _Probe(Protocol):
    uptime_s: float
    offset_s: float
    error_s: float


class _Truth(Protocol):
    """The agent's ground-truth recorder (``balloonlab.image.agent.GuestTruth``)."""

    async def start(self, interval_s: float = ..., max_samples: int = ...) -> tuple[str, ...]: ...
    async def stop(self) -> int: ...
    async def fetch(self, batch_lines: int = ...) -> Any: ...
    async def probe_clock(self, probes: int = ...) -> _Probe: ...


def plan_bursts(duration_s: float, *, alloc_bytes: int, reclaim_bytes: int, holds_s: Sequence[float] = (1, 2, 4, 8, 16),
                kinds: Sequence[str] = ("alloc", "reclaim"), lead_s: float = 5.0, gap_s: float = 4.0,
                jitter_s: float = 3.0, seed: int = 12) -> list[Burst]:
    """Bursts of every kind for each hold in turn, cycling, as many as fit in ``duration_s``.

    :param holds_s: how long each burst is held (the cycle of durations).
    :param kinds: "alloc" and/or "reclaim".
    :param lead_s: quiet time first (the first burst's baseline).
    :param gap_s: quiet time after a burst's release at least (plus up to ``jitter_s``, seeded).
    :raises ValueError: an unknown kind, or not even one burst fits.
    """
    if not kinds or set(kinds) - set(RAMP_S):
        raise ValueError(f"kinds must be some of {sorted(RAMP_S)}, got {list(kinds)!r}")
    if not holds_s:
        raise ValueError("holds_s must name at least one hold time")
    for hold in holds_s:
        require_positive_s(hold, "a hold time")
    rng = random.Random(seed)
    sizes = {"alloc": alloc_bytes, "reclaim": reclaim_bytes}
    plan, at, i = [], lead_s, 0
    while True:
        hold, kind = float(holds_s[(i // len(kinds)) % len(holds_s)]), kinds[i % len(kinds)]
        release = at + max(hold, RAMP_S[kind])
        if release + gap_s > duration_s:
            break
        plan.append(Burst(round(at, 2), kind, sizes[kind], hold))
        at, i = release + gap_s + rng.uniform(0, jitter_s), i + 1
    if not plan:
        raise ValueError(f"a duration of {duration_s:g} s leaves no room for a burst ({lead_s:g} s quiet first, "
                         f"the burst, {gap_s:g} s quiet after)")
    return plan


def bursts_schedule(plan: Sequence[Burst]) -> Schedule:
    """The workload schedule of a plan: hold ``size`` at ``at_s``, nothing at ``at_s + hold_s``."""
    return Schedule(tuple(p for b in plan for p in ((b.at_s, b.size), (round(b.at_s + b.hold_s, 2), 0))),
                    kind="workload")


@dataclass
class PeriodStudyResult:
    """What a study measured (all of it is also in the run folder ``run.path``)."""

    run: Run
    truth: pd.DataFrame
    bursts: pd.DataFrame
    table: pd.DataFrame
    costs: pd.DataFrame
    clock: pd.DataFrame
    plan: list[Burst]

    def figure(self) -> Any:
        """The study's figure (:func:`~balloonlab.analysis.period_study.plot_period_study`)."""
        return plot_period_study(self.table, self.bursts)


@dataclass
class PeriodStudy:
    """The study; :meth:`run` does it: ``await study.run()`` in a notebook or a coroutine, or
    ``balloonlab.run_experiment(study)`` to block until it is done (it runs ``study.run()`` on
    balloonlab's own loop, as for an :class:`Experiment`).

    :param spec: a guest to copy once per period (name ``<name>-p<period>``, the balloon's
        period replaced), e.g. ``builtin_spec("period", memory="160M", swap="128M")`` or with
        ``kernel_release="6.12"`` and another ``qemu_binary``; or ``f(name, period_s) -> spec``.
    :param periods: stats periods in seconds, one guest each.
    :param duration_s: how long the workload runs and everything is sampled.
    :param alloc_bytes: size of an alloc burst (None: 45 % of the guests' MemAvailable).
    :param reclaim_bytes: size of a reclaim burst (None: MemAvailable + 32 MiB).
    :param holds_s: the hold times :func:`plan_bursts` cycles through.
    :param kinds: the burst kinds it alternates ("alloc", "reclaim").
    :param plan: explicit bursts instead of :func:`plan_bursts` over ``holds_s`` and ``kinds``.
    :param seed: seed of the random gaps between bursts (the same seed, the same plan).
    :param align_phases: restart every guest's stats timer at one instant (module docstring).
    :param threshold_bytes: the drop that makes a burst (None: half the smaller burst size).
    :param truth_interval_s: the guest's own sampling interval.
    :param run_root: where the run folder is made; ``name`` ends its name.
    :param plot: save the run's plot and the study's figure in the run folder.
    :param extra: more metadata for run.json.
    """

    spec: DomainSpec | Callable[[str, int], DomainSpec]
    periods: Sequence[int] = DEFAULT_PERIODS
    duration_s: float = 180.0
    alloc_bytes: int | str | None = None
    reclaim_bytes: int | str | None = None
    holds_s: Sequence[float] = (1, 2, 4, 8, 16)
    kinds: Sequence[str] = ("alloc", "reclaim")
    plan: Sequence[Burst] | None = None
    seed: int = 12
    align_phases: bool = True
    threshold_bytes: int | None = None
    truth_interval_s: float = 0.1
    run_root: str | Path = "runs"
    name: str = "period-study"
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check the parameters before any guest starts.

        :raises ValueError: what is wrong.
        """
        require_positive_s(self.duration_s, "duration_s")
        if not self.periods or any(type(p) is not int or p < 1 for p in self.periods):
            raise ValueError(f"periods must be whole seconds >= 1, got {list(self.periods)!r}")
        if len(set(self.periods)) != len(self.periods):
            raise ValueError(f"periods must differ (one guest each), got {list(self.periods)!r}")
        if self.plan is not None and any(b.at_s + b.hold_s > self.duration_s for b in self.plan):
            raise ValueError(f"a planned burst ends after duration_s={self.duration_s}")
        if self.plan is None:  # the sizes do not change what fits
            plan_bursts(self.duration_s, alloc_bytes=1, reclaim_bytes=2, holds_s=self.holds_s, kinds=self.kinds)

    def guest_specs(self) -> list[DomainSpec]:
        """The guests, one per period, identical but for name and period."""
        if callable(self.spec):
            return [self.spec(f"{self.name}-p{p}", p) for p in self.periods]
        template = self.spec
        if template.memballoon is None:
            raise ValueError(f"guest {template.name} has no balloon: the study needs one")
        return [with_changes(template, name=f"{template.name}-p{p}", uuid=None,
                             memballoon=dataclasses.replace(template.memballoon, period_s=p)) for p in self.periods]

    async def run(self, progress: Callable[[float, str], None] | None = None) -> PeriodStudyResult:
        """Launch the guests, record, analyse, shut them down, save; returns the result.

        :param progress: called with (fraction done, message), as :meth:`Experiment.run`.
        :raises ValueError: bad parameters, or a guest without the workload agent.
        :raises LaunchError: a guest failed to start (the others are shut down).
        """
        self.validate()
        say = progress or (lambda _f, _m: None)
        specs = self.guest_specs()
        if not all(s.agent for s in specs):
            raise ValueError("the study needs balloonlab's built-in guest (its workload agent samples the truth)")
        say(0.0, f"launching {len(specs)} guests")
        launched = await asyncio.gather(*(Guest.launch(s) for s in specs), return_exceptions=True)
        guests = [g for g in launched if isinstance(g, Guest)]
        try:
            failed = [g for g in launched if isinstance(g, BaseException)]
            if failed:
                raise failed[0]
            return await self._run(guests, say)
        finally:
            await asyncio.gather(*(g.shutdown() for g in guests), return_exceptions=True)

    async def _run(self, guests: list[Guest], say: Callable[[float, str], None]) -> PeriodStudyResult:
        found = [getattr(g.workload, "truth", None) for g in guests]
        if any(t is None for t in found):
            raise ValueError("these guests' agent client cannot record a ground truth (not balloonlab's Workload)")
        truths = [cast(_Truth, t) for t in found]
        available = min([(await g.workload.meminfo())["MemAvailable"] for g in guests])
        alloc = parse_size(self.alloc_bytes) if self.alloc_bytes is not None else int(available * 0.45) // MiB * MiB
        reclaim = (parse_size(self.reclaim_bytes) if self.reclaim_bytes is not None
                   else -(-(available + 32 * MiB) // MiB) * MiB)
        plan = list(self.plan) if self.plan is not None else plan_bursts(
            self.duration_s, alloc_bytes=alloc, reclaim_bytes=reclaim, holds_s=self.holds_s, kinds=self.kinds,
            seed=self.seed)
        if alloc == reclaim and len({b.kind for b in plan}) > 1:
            raise ValueError(f"alloc and reclaim bursts must differ in size (a burst's kind is read from it), "
                             f"both are {alloc} bytes")
        threshold = self.threshold_bytes or min(b.size for b in plan) // 2
        max_samples = int(self.duration_s / self.truth_interval_s * 1.5) + 600
        try:
            await asyncio.gather(*(t.start(self.truth_interval_s, max_samples) for t in truths))
        except AgentError as exc:
            if "unknown verb" not in str(exc):
                raise
            raise AgentError(f"the guest image predates the ground truth ({exc}): rebuild it with "
                             "`balloonlab guest build`") from exc
        first = await asyncio.gather(*(t.probe_clock() for t in truths))
        aligned_at = await self._align(guests) if self.align_phases else None
        before = [(g.monitor.round_trips, _service_cpu_s(g.pid)) for g in guests]
        experiment = Experiment(guests, self.duration_s, workload=bursts_schedule(plan), run_root=self.run_root,
                                 name=self.name, plot=False,
                                 extra={"period_study": {"periods": list(self.periods), "aligned_at": aligned_at,
                                                         "plan": [dataclasses.asdict(b) for b in plan]}, **self.extra})
        started = time.monotonic()
        run = await experiment.run(lambda f, m: say(0.05 + 0.85 * f, m))
        wall = time.monotonic() - started
        after = [(g.monitor.round_trips, _service_cpu_s(g.pid)) for g in guests]
        if self.plot and len(run.samples):  # drawn after the cost window closed
            from balloonlab.analysis.plotting import save_run_plot
            save_run_plot(run.samples, run.events, run.plot_path)
        say(0.9, "fetching the ground truth")
        last = await asyncio.gather(*(t.probe_clock() for t in truths))
        await asyncio.gather(*(t.stop() for t in truths))
        recordings = [await t.fetch() for t in truths]
        client_s, qemu_s = await _calibrate(guests[0])
        clock = pd.DataFrame([{"guest": g.name, "offset_start_s": a.offset_s, "error_start_s": a.error_s,
                               "offset_end_s": b.offset_s, "error_end_s": b.error_s,
                               "offset_change_s": b.offset_s - a.offset_s,
                               "drift_ppm": (b.offset_s - a.offset_s) / max(1e-9, b.uptime_s - a.uptime_s) * 1e6,
                               "samples": len(r.rows), "full": r.full}
                              for g, a, b, r in zip(guests, first, last, recordings, strict=True)])
        truth = pd.concat([truth_frame(g.name, r.fields, r.rows, (a.uptime_s, a.offset_s), (b.uptime_s, b.offset_s))
                           for g, a, b, r in zip(guests, first, last, recordings, strict=True)])
        costs = pd.DataFrame([{"guest": g.name, "period_s": p, "duration_s": wall, "qmp_commands": a[0] - b[0],
                               "samples": int((run.samples["guest"].astype(str) == g.name).sum()),
                               "client_cpu_s_per_command": client_s, "qemu_cpu_s_per_command": qemu_s,
                               "cpu_s_per_command": client_s + qemu_s, "qemu_service_cpu_s": a[1] - b[1]}
                              for g, p, b, a in zip(guests, self.periods, before, after, strict=True)])
        kinds = {b.size: b.kind for b in plan}
        bursts = find_bursts(truth, threshold_bytes=threshold, plan=planned_bursts(run.events, kinds))
        detections = detect(bursts, run.samples, threshold_bytes=threshold)
        table = period_table(detections, costs)
        result = PeriodStudyResult(run, truth, detections, table, costs, clock, plan)
        _save(result, {"alloc_bytes": alloc, "reclaim_bytes": reclaim, "threshold_bytes": threshold,
                       "available_bytes": available, "truth_interval_s": self.truth_interval_s,
                       "aligned_at": aligned_at}, self.plot)
        say(1.0, f"done: {run.path}")
        return result

    async def _align(self, guests: list[Guest]) -> float:
        """Restart every guest's stats timer now; returns when (epoch s)."""
        await asyncio.gather(*(g.balloon.set_period(0) for g in guests))
        at = time.time()
        await asyncio.gather(*(g.balloon.set_period(p) for g, p in zip(guests, self.periods, strict=True)))
        return at


def _service_cpu_s(pid: int | None) -> float:
    """CPU seconds of QEMU's threads other than its vCPUs (the main loop that serves QMP and the
    balloon's timer, the monitor's I/O thread...): the whole process, which keeps the time of
    threads that exited, minus the vCPU threads ("CPU 0/TCG"), which live as long as it does."""
    if pid is None:
        return float("nan")

    def ticks(stat: Path) -> int:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime

    with contextlib.suppress(OSError):
        total = ticks(Path(f"/proc/{pid}/stat"))
        vcpus = sum(ticks(task / "stat") for task in Path(f"/proc/{pid}/task").iterdir()
                    if (task / "comm").read_text().startswith("CPU "))
        return (total - vcpus) / _CLK_TCK
    return float("nan")


async def _calibrate(guest: Guest, reads: int = 300) -> tuple[float, float]:
    """CPU per stats read, measured: (this process, QEMU's service threads), the latter with
    QEMU's idle rate over an equal quiet window taken off. The sampler's reads are this same
    ``qom-get``; what it costs per guest-hour is this times the reads it made."""
    quiet_wall, quiet_cpu = time.monotonic(), _service_cpu_s(guest.pid)
    await asyncio.sleep(1.0)
    idle_rate = (_service_cpu_s(guest.pid) - quiet_cpu) / (time.monotonic() - quiet_wall)
    wall, cpu, qemu = time.monotonic(), time.process_time(), _service_cpu_s(guest.pid)
    for _ in range(reads):
        await guest.balloon.read_report(query_actual=False)
    wall = time.monotonic() - wall
    return ((time.process_time() - cpu) / reads,
            max(0.0, (_service_cpu_s(guest.pid) - qemu - idle_rate * wall) / reads))


def _save(result: PeriodStudyResult, sizes: dict[str, Any], plot: bool) -> None:
    """Truth, bursts and table beside the run's samples; the parameters in period-study.json."""
    path = result.run.path
    result.truth.to_parquet(path / "truth.parquet")
    result.bursts.to_parquet(path / "bursts.parquet")
    result.table.to_parquet(path / "table.parquet")
    result.table.to_csv(path / "table.csv", index=False, float_format="%.4g")
    info = {**sizes, "plan": [dataclasses.asdict(b) for b in result.plan],
            "clock": result.clock.to_dict(orient="records"), "costs": result.costs.to_dict(orient="records")}
    (path / "period-study.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    if plot:
        result.figure().savefig(path / "period-study.png", dpi=200)
