"""The overcommit experiment: several built-in guests under a host memory budget below their sum,
workloads that rise and fall out of phase, and a policy keeping the guests' footprint in budget.

Each guest's in-guest workload holds ``low`` most of the time and ``high`` during its own slice of
each ``cycle_s`` (guest *i* of *n* from ``i/n`` to ``(i+1)/n`` of the cycle): one guest at a time
needs memory, the others have freed theirs. Without reporting, freed guest memory stays resident
in QEMU, so the guests' summed RSS creeps up to everything each ever touched, over the budget,
unless a policy inflates the idle guests' balloons (QEMU discards ballooned pages: RSS falls) and
deflates the busy one's. ``policy=None`` records the same run without one: the baseline.

The run folder is an ordinary run (samples, events, the host frame with ``budget`` and
``budget_available``, run.json with the policy's settings and limits), so
:func:`balloonlab.experiments.replay.replay` can try other policies on it offline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balloonlab._version import __version__ as _version
from balloonlab.domain import DomainSpec
from balloonlab.experiments.runner import finish_run, launch_recorded
from balloonlab.experiments.schedule import Schedule, require_positive_s
from balloonlab.image.builtin import builtin_spec
from balloonlab.model.policy import Policy, policy_name
from balloonlab.model.protocols import GuestProtocol
from balloonlab.model.units import format_size, parse_size
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import Run, load_run, new_run_dir


@dataclass
class Overcommit:
    """Guests under a budget, out-of-phase workloads, a policy; :meth:`run` returns the Run.

    :param policy: a policy callable, a built-in name (``mom``, ``qmemman``, ``psi``, ``pi``) or
        ``module:callable``; None records the baseline without a policy.
    :param guests: how many built-in guests (``memory`` each, ``swap`` of zram each).
    :param budget: the host memory budget (bytes or a size); None: the real host's memory.
    :param cycle_s: one rise and fall of every guest's workload in turn.
    :param low: and ``high``: what each guest's workload holds outside and inside its slice.
    :param min_guarantee: every guest's ``<memtune><min_guarantee>`` (None: none).
    :param interval_s: and ``window_s``, ``max_step_fraction``: the policy loop's settings.
    :param kernel_release: and ``qemu_binary``: the guests' stack (:func:`~balloonlab.builtin_spec`;
        Linux 6.12 on QEMU >= 9.2 adds OOM kills and allocation stalls to the stats).
    """

    policy: Policy | str | None
    guests: int = 4
    memory: int | str = "512M"
    swap: int | str | None = "128M"
    budget: int | str | None = "1G"
    duration_s: float = 120.0
    cycle_s: float = 60.0
    low: int | str = "32M"
    high: int | str = "288M"
    min_guarantee: int | str | None = None
    interval_s: float = 2.0
    window_s: float = 30.0
    max_step_fraction: float = 0.25
    period_s: int = 1
    kernel_release: str | None = None
    qemu_binary: str | None = None
    run_root: str | Path = "runs"
    name: str = "overcommit"
    plot: bool = True

    def validate(self) -> tuple[Policy | None, list[DomainSpec], dict[str, Schedule], int | None]:
        """Everything checked before a guest starts: the policy resolved, the specs, each guest's
        workload schedule and the budget in bytes.

        :raises ValueError: with what is wrong.
        """
        if type(self.guests) is not int or not 1 <= self.guests <= 16:
            raise ValueError(f"guests must be an int from 1 to 16, got {self.guests!r}")
        for value, what in ((self.duration_s, "duration_s"), (self.cycle_s, "cycle_s")):
            require_positive_s(value, what)
        memory, low, high = parse_size(self.memory), parse_size(self.low), parse_size(self.high)
        if not 0 <= low <= high < memory:
            raise ValueError(f"need 0 <= low <= high < memory, got low={format_size(low)}, "
                             f"high={format_size(high)}, memory={format_size(memory)}")
        budget = parse_size(self.budget) if self.budget is not None else None
        if budget is not None and budget <= 0:
            raise ValueError(f"budget must be above 0, got {self.budget!r}")
        policy = _resolve(self.policy)
        specs = [builtin_spec(f"oc{i}", memory=memory, swap=self.swap, period_s=self.period_s,
                              min_guarantee=self.min_guarantee, kernel_release=self.kernel_release,
                              qemu_binary=self.qemu_binary) for i in range(self.guests)]
        return policy, specs, {spec.name: self.schedule(i, low, high) for i, spec in enumerate(specs)}, budget

    def schedule(self, index: int, low: int, high: int) -> Schedule:
        """Guest ``index``'s workload: ``high`` in its slice of each cycle, ``low`` otherwise."""
        slice_s = self.cycle_s / self.guests
        points: list[tuple[float, int]] = [(0.0, low)]
        start = index * slice_s
        while start < self.duration_s:
            points += [(start, high), (min(start + slice_s, self.duration_s), low)]
            start += self.cycle_s
        points = sorted(dict(points).items())  # one value per time: a slice starting at 0 wins
        return Schedule(tuple((at, value) for at, value in points if at < self.duration_s), "workload")

    async def run(self, progress: Callable[[float, str], None] | None = None) -> Run:
        """Launch the guests, sample them with the host frame, run the policy and the workloads
        for ``duration_s``, shut everything down; returns the loaded Run (and writes
        ``plot.png`` and ``plot-policy.png``)."""
        policy, specs, schedules, budget = self.validate()
        run_dir = new_run_dir(self.run_root, self.name)
        meta = {"balloonlab_version": _version, "experiment": self.name, "duration_s": self.duration_s,
                "overcommit": {"guests": self.guests, "memory": parse_size(self.memory), "budget": budget,
                               "cycle_s": self.cycle_s, "low": parse_size(self.low), "high": parse_size(self.high),
                               "policy": policy_name(policy) if policy is not None else None},
                "schedule": {"workload": {name: s.as_list() for name, s in schedules.items()}}}
        sampler = Sampler(run_dir=run_dir, metadata=meta, host_budget=budget)
        launched: list[GuestProtocol] = []
        try:
            for spec in specs:
                await launch_recorded(spec, sampler, launched)
            await sampler.start()
            for each in launched:
                await sampler.add(each)
            if policy is not None:
                sampler.run_policy(policy, interval_s=self.interval_s, window_s=self.window_s,
                                   max_step_fraction=self.max_step_fraction)
            await _play(sampler, launched, schedules, self.duration_s, progress)
        finally:
            await finish_run(sampler, launched)
        run = load_run(run_dir)
        if self.plot and len(run.samples):
            from balloonlab.analysis.overcommit_plot import plot_policy_run
            from balloonlab.analysis.plotting import save_run_plot
            save_run_plot(run.samples, run.events, run.plot_path)
            figure = plot_policy_run(run)
            figure.savefig(run.path / "plot-policy.png", dpi=100)
            import matplotlib.pyplot as plt
            plt.close(figure)
        return run


def _resolve(policy: Policy | str | None) -> Policy | None:
    if policy is None or callable(policy):
        return policy
    if isinstance(policy, str):
        from balloonlab.policies import load_policy
        return load_policy(policy)
    raise TypeError(f"policy must be a callable, a built-in name or 'module:callable', got {type(policy).__name__}")


async def _play(sampler: Sampler, guests: list[GuestProtocol], schedules: dict[str, Schedule], duration_s: float,
                progress: Callable[[float, str], None] | None) -> None:
    """Each guest's workload schedule in its own task; a step the guest cannot take (its OOM
    killer took the agent's memory) is an event, and the schedule goes on."""
    start = time.monotonic()

    async def follow(guest: GuestProtocol, schedule: Schedule) -> None:
        for at_s, value in schedule.points:
            await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
            try:
                await guest.workload.hold(value)
            except Exception as exc:  # AgentError (the guest's OOM killer), or the guest died
                if not guest.alive:
                    return  # the sampler records how it ended
                sampler.record_event(guest.name, "step_failed", None, f"hold {format_size(value)}: {exc}")

    tasks = [asyncio.ensure_future(follow(g, schedules[g.name])) for g in guests]
    try:
        while (elapsed := time.monotonic() - start) < duration_s:
            if progress is not None:
                progress(min(1.0, elapsed / duration_s), f"{elapsed:5.1f}/{duration_s:.0f} s")
            await asyncio.sleep(min(1.0, duration_s - elapsed))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

