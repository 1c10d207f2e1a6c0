"""Schedules: what happens when, as ``(seconds from start, bytes)`` points, validated up front.

A :class:`Schedule` drives balloon targets or the memory the in-guest workload holds.
Constructors cover the usual shapes (steps, ramp, sine, sawtooth, a list). A negative target,
a unit typo or a non-increasing time is refused with a message that says which.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from balloonlab.model.units import parse_size


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
        require_positive_s(every_s, "every_s")
        return cls(tuple((start_s + i * every_s, _size(v)) for i, v in enumerate(levels)), kind)

    @classmethod
    def ramp(cls, start: int | str, stop: int | str, duration_s: float, *, n_steps: int = 10,
             start_s: float = 0.0, kind: str = "target") -> Schedule:
        """From ``start`` to ``stop`` in ``n_steps`` equal steps over ``duration_s``."""
        require_positive_s(duration_s, "duration_s")
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
            require_positive_s(value, name)
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


@dataclass(frozen=True)
class StressSchedule:
    """Runs of Debian's ``stress-ng`` in the guests: ``(at_s, arguments, seconds)`` each, started
    at ``at_s`` and lasting ``seconds`` (runs may overlap). They need qemu-guest-agent (a Debian
    guest; the built-in guest has no stress-ng): ``StressSchedule.of((5, "--vm 1 --vm-bytes
    300M --vm-keep", 20), (30, "--page-in --vm 1 --vm-bytes 200M", 15))``.
    """

    runs: tuple[tuple[float, tuple[str, ...], float], ...]

    def __post_init__(self) -> None:
        last = -math.inf
        for at_s, args, seconds in self.runs:
            if not isinstance(at_s, (int, float)) or isinstance(at_s, bool) or at_s < max(0.0, last):
                raise ValueError(f"stress runs must start at numbers >= 0 in increasing order, got {at_s!r}")
            last = at_s
            require_positive_s(seconds, "a stress run's seconds")
            if not args or any(a.startswith(("--timeout", "-t")) for a in args):
                raise ValueError(f"stress run at {at_s} s: give stress-ng's stressor arguments without --timeout "
                                 f"(its seconds are the third item), got {args!r}")

    @classmethod
    def of(cls, *runs: tuple[float, str | Sequence[str], float]) -> StressSchedule:
        """From ``(at_s, "--vm 1 --vm-bytes 300M", seconds)`` items (arguments as one string or a list)."""
        return cls(tuple((at_s, tuple(shlex.split(a) if isinstance(a, str) else a), seconds)
                         for at_s, a, seconds in runs))

    @property
    def duration_s(self) -> float:
        """When the last run ends."""
        return max((at_s + seconds for at_s, _, seconds in self.runs), default=0.0)

    def as_list(self) -> list[list[object]]:
        """JSON-friendly runs, for run.json."""
        return [[at_s, list(args), seconds] for at_s, args, seconds in self.runs]


def _size(value: int | str) -> int:
    return parse_size(value)


def require_positive_s(value: object, name: str) -> None:
    """Refuse anything but a finite number of seconds above 0 (nan and inf included).

    :raises ValueError: with the name and the value given.
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
