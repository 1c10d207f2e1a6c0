"""The experiment runner: guests, schedules and a duration, sampled into one run folder.

An :class:`Experiment` launches (or takes) guests, samples them into a run folder, plays its
:class:`~balloonlab.experiments.schedule.Schedule` s and returns the
:class:`~balloonlab.record.store.Run`. Everything is validated before any guest starts: a
target above a guest's memory, a balloon schedule for a guest without a balloon, a workload
for a guest without the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloonlab._version import __version__ as _version
from balloonlab.domain import DomainSpec
from balloonlab.experiments.schedule import Schedule, StressSchedule, require_positive_s
from balloonlab.model.guest import async_guest
from balloonlab.model.protocols import GuestProtocol
from balloonlab.model.units import format_size
from balloonlab.qemu.guest import Guest
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import Run, load_run, new_run_dir


@dataclass
class Experiment:
    """Guests, schedules and a duration; :meth:`run` does it and returns the Run.

    :param guests: domain specs to launch (shut down afterwards) or running guests to use
        (``Guest``/``LibvirtGuest`` on the loop that runs the experiment; ``SyncGuest`` s with
        :func:`~balloonlab.run_experiment`).
    :param duration_s: how long to sample (at least as long as the schedules).
    :param balloon: a target schedule applied to every guest.
    :param workload: a workload schedule (guests with a workload agent: balloonlab's, or
        qemu-guest-agent).
    :param stress: stress-ng runs in the guests (qemu-guest-agent guests with stress-ng).
    :param run_root: where the run folder is made (``runs/`` by default).
    """

    guests: Sequence[DomainSpec | GuestProtocol | Any]
    duration_s: float
    balloon: Schedule | None = None
    workload: Schedule | None = None
    stress: StressSchedule | None = None
    run_root: str | Path = "runs"
    name: str = "experiment"
    flush_interval_s: float = 5.0
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check everything that can be checked before a guest starts.

        :raises ValueError: with what is wrong and which guest it concerns.
        """
        require_positive_s(self.duration_s, "duration_s")
        if not self.guests:
            raise ValueError("an experiment needs at least one guest")
        for schedule, kind in ((self.balloon, "target"), (self.workload, "workload")):
            if schedule is not None and schedule.kind != kind:
                raise ValueError(f"the {kind} schedule was built as a {schedule.kind!r} schedule")
            if schedule is not None and schedule.duration_s > self.duration_s:
                raise ValueError(f"the {kind} schedule lasts {schedule.duration_s} s, longer than "
                                 f"duration_s={self.duration_s}")
        if self.stress is not None and self.stress.duration_s > self.duration_s:
            raise ValueError(f"the stress runs end at {self.stress.duration_s} s, after duration_s={self.duration_s}")
        for g in self.guests:
            spec = g if isinstance(g, DomainSpec) else getattr(g, "spec", None)
            name = spec.name if spec else getattr(g, "name", "?")
            if self.balloon is not None and spec is not None:
                if spec.memballoon is None:
                    raise ValueError(f"guest {name} has no balloon (<memballoon model='none'>) "
                                     "but the experiment has a balloon schedule")
                too_big = [v for _, v in self.balloon.points if v > spec.memory_bytes]
                if too_big:
                    raise ValueError(f"balloon target {format_size(too_big[0])} is above guest {name}'s "
                                     f"memory {format_size(spec.memory_bytes)}")
            if self.workload is not None:
                has_agent = (spec.agent or spec.agent_channel is not None) if spec is not None else getattr(
                    g, "has_agent", False)
                if not has_agent:
                    raise ValueError(f"guest {name} has no workload agent: a workload schedule needs balloonlab's "
                                     "built-in guest or a qemu-guest-agent <channel> in the domain")
            qga = spec.agent_channel is not None if spec is not None else getattr(g, "has_guest_agent", False)
            if self.stress is not None and not qga:
                raise ValueError(f"guest {name} has no qemu-guest-agent channel: stress-ng runs need one (and "
                                 "stress-ng in the guest: balloonlab guest build --distro debian)")

    async def run(self, progress: Callable[[float, str], None] | None = None) -> Run:
        """Launch, sample, play the schedules, stop; returns the loaded Run.

        :param progress: called with (fraction done, message) about once a second.
        """
        self.validate()
        # Guests that cannot be driven here are refused before a run folder exists.
        given = [g if isinstance(g, DomainSpec) else async_guest(g, "Experiment") for g in self.guests]
        run_dir = new_run_dir(self.run_root, self.name)
        meta = {"balloonlab_version": _version, "experiment": self.name, "duration_s": self.duration_s,
                "schedule": {"balloon": self.balloon.as_list() if self.balloon else None,
                             "workload": self.workload.as_list() if self.workload else None,
                             "stress": self.stress.as_list() if self.stress else None},
                **self.extra}
        sampler = Sampler(run_dir=run_dir, flush_interval_s=self.flush_interval_s, metadata=meta)
        launched: list[GuestProtocol] = []
        try:
            guests: list[GuestProtocol] = []
            for g in given:
                if isinstance(g, DomainSpec):
                    guests.append(await launch_recorded(g, sampler, launched))
                else:
                    guests.append(g)
            await sampler.start()
            for each in guests:
                await sampler.add(each)
            await self._play(guests, progress)
        finally:
            await finish_run(sampler, launched)
        run = load_run(run_dir)
        if self.plot and len(run.samples):
            from balloonlab.analysis.plotting import save_run_plot
            save_run_plot(run.samples, run.events, run.plot_path)
        return run

    async def _play(self, guests: list[GuestProtocol], progress: Callable[[float, str], None] | None) -> None:
        start = time.monotonic()

        async def follow(schedule: Schedule, apply: Callable[[GuestProtocol, int], Any]) -> None:
            for at_s, value in schedule.points:
                await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
                await asyncio.gather(*(apply(g, value) for g in guests))

        tasks = []
        if self.balloon is not None:
            tasks.append(asyncio.ensure_future(follow(self.balloon, lambda g, v: g.balloon.set_target(v))))
        if self.workload is not None:
            tasks.append(asyncio.ensure_future(follow(self.workload, lambda g, v: g.workload.hold(v))))
        for at_s, args, seconds in self.stress.runs if self.stress is not None else ():
            tasks.append(asyncio.ensure_future(self._stress(guests, start + at_s, args, seconds)))
        try:
            while (elapsed := time.monotonic() - start) < self.duration_s:
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                if progress is not None:
                    progress(min(1.0, elapsed / self.duration_s), f"{elapsed:5.1f}/{self.duration_s:.0f} s")
                await asyncio.sleep(min(1.0, self.duration_s - elapsed))
            if progress is not None:
                progress(1.0, f"{self.duration_s:.0f}/{self.duration_s:.0f} s")
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


    @staticmethod
    async def _stress(guests: list[GuestProtocol], at: float, args: tuple[str, ...], seconds: float) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        await asyncio.gather(*(g.workload.stress(args, seconds=seconds)  # type: ignore[attr-defined]
                               for g in guests))


async def launch_recorded(spec: DomainSpec, sampler: Sampler, launched: list[GuestProtocol]) -> Guest:
    """Launch ``spec``, append it to ``launched`` (the guests the run must shut down) and record
    a ``launch`` event with how long it took."""
    t0 = time.monotonic()
    made = await Guest.launch(spec)
    launched.append(made)
    took = time.monotonic() - t0
    sampler.record_event(made.name, "launch", None, f"launched in {took:.2f} s", took)
    return made


async def finish_run(sampler: Sampler, launched: list[GuestProtocol]) -> None:
    """End a run whatever failed before or fails here: its policies and host frame first (no
    decision about, nor host row without, a guest shutting down), then every launched guest shut
    down (a ``shutdown`` event each), then the sampler stopped; the first error of the clean-up is
    raised after it all, unless an exception is already on its way."""
    problems: list[BaseException] = []
    try:
        await sampler.stop_host()
    except Exception as exc:
        problems.append(exc)
    for guest in launched:
        try:
            with contextlib.suppress(KeyError):
                await sampler.remove(guest.name)
            graceful = await guest.shutdown()
            sampler.record_event(guest.name, "shutdown", None, "quit" if graceful else "killed")
        except Exception as exc:
            problems.append(exc)
    try:
        await sampler.stop()
    except Exception as exc:
        problems.append(exc)
    if problems and sys.exc_info()[1] is None:
        raise problems[0]
