"""Experiments: what happens when, declared up front, run against guests while sampling.

A :class:`Schedule` is a list of ``(seconds from start, bytes)`` points: balloon targets, or
memory the in-guest workload holds. Constructors cover the usual shapes (steps, ramp, sine,
sawtooth, a list). Everything is validated before any guest starts: a negative target, a unit
typo or a target above a guest's memory is refused with a message that says which. An
:class:`Experiment` launches (or takes) guests, samples them into a run folder, plays the
schedules, and returns the :class:`~balloonlab.store.Run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__ as _version
from .domain import DomainSpec
from .guest import Guest
from .sampler import Sampler
from .store import Run, load_run, new_run_dir
from .units import format_size, parse_size


@dataclass(frozen=True)
class Schedule:
    """Points ``(at_s, bytes)`` in time order; ``kind`` says what they drive."""

    points: tuple[tuple[float, int], ...]
    kind: str = "target"

    def __post_init__(self) -> None:
        if self.kind not in ("target", "workload"):
            raise ValueError(f"schedule kind must be 'target' or 'workload', got {self.kind!r}")
        last = -math.inf
        for at_s, value in self.points:
            if not isinstance(at_s, (int, float)) or isinstance(at_s, bool) or at_s < 0 or at_s < last:
                raise ValueError(f"schedule times must be numbers >= 0 in increasing order, got {at_s!r}")
            last = at_s
            if type(value) is not int or value < 0 or (value == 0 and self.kind == "target"):
                what = "a balloon target above 0 bytes" if self.kind == "target" else "a size >= 0 bytes"
                raise ValueError(f"schedule value at {at_s} s must be {what}, got {value!r}")

    @property
    def duration_s(self) -> float:
        """Time of the last point."""
        return self.points[-1][0] if self.points else 0.0

    def as_list(self) -> list[list[float | int]]:
        """JSON-friendly points, for run.json."""
        return [[t, v] for t, v in self.points]

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_list(cls, points: Iterable[tuple[float, int | str]], kind: str = "target") -> Schedule:
        """From ``[(0, "512M"), (10, "256M"), ...]``; sizes in bytes or with libvirt units."""
        return cls(tuple((t, _size(v)) for t, v in points), kind)

    @classmethod
    def steps(cls, levels: Sequence[int | str], every_s: float, *, start_s: float = 0.0,
              kind: str = "target") -> Schedule:
        """One level every ``every_s`` seconds: ``Schedule.steps(["256M", "384M"], 15)``."""
        _positive(every_s, "every_s")
        return cls(tuple((start_s + i * every_s, _size(v)) for i, v in enumerate(levels)), kind)

    @classmethod
    def ramp(cls, start: int | str, stop: int | str, duration_s: float, *, n_steps: int = 10,
             start_s: float = 0.0, kind: str = "target") -> Schedule:
        """From ``start`` to ``stop`` in ``n_steps`` equal steps over ``duration_s``."""
        _positive(duration_s, "duration_s")
        if type(n_steps) is not int or n_steps < 1:
            raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
        a, b = _size(start), _size(stop)
        return cls(tuple((start_s + duration_s * i / n_steps, a + (b - a) * i // n_steps)
                         for i in range(n_steps + 1)), kind)

    @classmethod
    def sine(cls, low: int | str, high: int | str, period_s: float, duration_s: float, *,
             step_s: float = 1.0, start_s: float = 0.0, kind: str = "target") -> Schedule:
        """A sine between ``low`` and ``high`` bytes, sampled every ``step_s`` seconds."""
        for value, name in ((period_s, "period_s"), (duration_s, "duration_s"), (step_s, "step_s")):
            _positive(value, name)
        a, b = _size(low), _size(high)
        n = int(duration_s / step_s)
        mid, amp = (a + b) / 2, (b - a) / 2
        return cls(tuple((start_s + i * step_s, int(mid + amp * math.sin(2 * math.pi * i * step_s / period_s)))
                         for i in range(n + 1)), kind)

    @classmethod
    def sawtooth(cls, low: int | str, high: int | str, period_s: float, cycles: int, *,
                 n_steps: int = 5, start_s: float = 0.0, kind: str = "workload") -> Schedule:
        """Ramp ``low`` -> ``high`` and drop back, ``cycles`` times."""
        points: list[tuple[float, int]] = []
        for cycle in range(cycles):
            ramp_part = cls.ramp(low, high, period_s * n_steps / (n_steps + 1), n_steps=n_steps,
                                 start_s=start_s + cycle * period_s, kind=kind)
            points.extend(ramp_part.points)
        points.append((start_s + cycles * period_s, _size(low)))
        return cls(tuple(points), kind)


def _size(value: int | str) -> int:
    return parse_size(value)


def _positive(value: object, name: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass
class Experiment:
    """Guests, schedules and a duration; :meth:`run` does it and returns the Run.

    :param guests: domain specs to launch (shut down afterwards) or running Guests to use.
    :param duration_s: how long to sample (at least as long as the schedules).
    :param balloon: a target schedule applied to every guest.
    :param workload: a workload schedule (guests with balloonlab's agent only).
    :param run_root: where the run folder is made (``runs/`` by default).
    """

    guests: Sequence[DomainSpec | Guest]
    duration_s: float
    balloon: Schedule | None = None
    workload: Schedule | None = None
    run_root: str | Path = "runs"
    name: str = "experiment"
    flush_interval_s: float = 5.0
    plot: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check everything that can be checked before a guest starts.

        :raises ValueError: with what is wrong and which guest it concerns.
        """
        _positive(self.duration_s, "duration_s")
        if not self.guests:
            raise ValueError("an experiment needs at least one guest")
        for schedule, kind in ((self.balloon, "target"), (self.workload, "workload")):
            if schedule is not None and schedule.kind != kind:
                raise ValueError(f"the {kind} schedule was built as a {schedule.kind!r} schedule")
            if schedule is not None and schedule.duration_s > self.duration_s:
                raise ValueError(f"the {kind} schedule lasts {schedule.duration_s} s, longer than "
                                 f"duration_s={self.duration_s}")
        for g in self.guests:
            spec = g if isinstance(g, DomainSpec) else g.spec
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
                has_agent = spec.agent if spec is not None else getattr(g, "has_agent", False)
                if not has_agent:
                    raise ValueError(f"guest {name} has no workload agent: a workload schedule needs "
                                     "balloonlab's built-in guest")

    async def run(self, progress: Callable[[float, str], None] | None = None) -> Run:
        """Launch, sample, play the schedules, stop; returns the loaded Run.

        :param progress: called with (fraction done, message) about once a second.
        """
        self.validate()
        run_dir = new_run_dir(self.run_root, self.name)
        meta = {"balloonlab_version": _version, "experiment": self.name, "duration_s": self.duration_s,
                "schedule": {"balloon": self.balloon.as_list() if self.balloon else None,
                             "workload": self.workload.as_list() if self.workload else None},
                **self.extra}
        sampler = Sampler(run_dir=run_dir, flush_interval_s=self.flush_interval_s, metadata=meta)
        launched: list[Guest] = []
        try:
            guests = []
            for g in self.guests:
                if isinstance(g, DomainSpec):
                    t0 = time.monotonic()
                    guest = await Guest.launch(g)
                    launched.append(guest)
                    sampler.record_event(guest.name, "launch", None,
                                         f"launched in {time.monotonic() - t0:.2f} s", time.monotonic() - t0)
                    guests.append(guest)
                else:
                    guests.append(g)
            await sampler.start()
            for guest in guests:
                await sampler.add(guest)
            await self._play(guests, progress)
        finally:
            for guest in launched:
                with contextlib.suppress(KeyError):
                    await sampler.remove(guest.name)
                graceful = await guest.shutdown()
                sampler.record_event(guest.name, "shutdown", None, "quit" if graceful else "killed")
            await sampler.stop()
        run = load_run(run_dir)
        if self.plot and len(run.samples):
            from .plotting import save_run_plot
            save_run_plot(run.samples, run.events, run.plot_path)
        return run

    async def _play(self, guests: list[Guest], progress: Callable[[float, str], None] | None) -> None:
        start = time.monotonic()

        async def follow(schedule: Schedule, apply: Callable[[Guest, int], Any]) -> None:
            for at_s, value in schedule.points:
                await asyncio.sleep(max(0.0, start + at_s - time.monotonic()))
                await asyncio.gather(*(apply(g, value) for g in guests))

        tasks = []
        if self.balloon is not None:
            tasks.append(asyncio.ensure_future(follow(self.balloon, lambda g, v: g.balloon.set_target(v))))
        if self.workload is not None:
            tasks.append(asyncio.ensure_future(follow(self.workload, lambda g, v: g.workload.hold(v))))
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
