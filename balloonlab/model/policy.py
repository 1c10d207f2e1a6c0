"""The policy API: what a balloon policy sees, what it returns, and the limits no policy passes.

A policy is any callable ``policy(view) -> targets`` (a function, or an object with
``__call__``; a class keeps its own state between calls). ``view`` is a :class:`PolicyView`:
the recent window of the host frame and of the guests' samples, each guest's
:class:`GuestLimits`, the host budget and the time of the decision. It returns balloon targets
in bytes, ``{guest: bytes}`` for the guests it wants to move, or a :class:`Decision` that also
says why (``why[guest]``: a small dict of the numbers that decided it, recorded in the run).

The same callable runs live (:class:`balloonlab.record.policy_loop.PolicyLoop`, at its own
interval beside the sampler) and offline (:mod:`balloonlab.experiments.replay`), so a policy
is tried on a recorded run before it touches a guest. Whatever it returns goes through
:func:`enforce_limits` first; a buggy policy cannot starve or kill a guest:

- a value that is not a finite number >= 0, a value above the guest's memory, or a guest that
  is not in the run is **refused**: that guest keeps its last safe target, and the refusal is
  a ``policy_error`` event;
- a value below the guest's floor is raised to the floor: ``max(min_guarantee, floor_fraction
  x memory, MIN_FLOOR_BYTES)`` (``<memtune><min_guarantee>`` when the domain has one);
- one decision moves a target by at most ``max_step_fraction`` x the guest's memory.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

#: No floor is below this: the built-in guest's kernel and agent fit in it with room to spare,
#: and a Debian guest with systemd still boots its shell.
MIN_FLOOR_BYTES = 96 * 2**20
#: Default share of a guest's memory it always keeps (the floor, with min_guarantee).
DEFAULT_FLOOR_FRACTION = 0.25
#: Default largest move of one target in one decision, as a share of the guest's memory.
DEFAULT_MAX_STEP_FRACTION = 0.25


@dataclass(frozen=True)
class GuestLimits:
    """One guest's limits, as the policy sees them and as :func:`enforce_limits` applies them.

    :param name: the guest.
    :param max_bytes: its memory (``<memory>``): no target above it.
    :param min_guarantee: ``<memtune><min_guarantee>`` in bytes, None when the domain has none.
    :param floor_bytes: no target below this (see the module docstring for how it is set).
    :param target: the target in force now (the last safe one), None before the first.
    """

    name: str
    max_bytes: int
    min_guarantee: int | None
    floor_bytes: int
    target: int | None = None

    @classmethod
    def for_guest(cls, name: str, max_bytes: int, min_guarantee: int | None = None, *,
                  target: int | None = None, floor_fraction: float = DEFAULT_FLOOR_FRACTION) -> GuestLimits:
        """Limits with the documented floor: max(min_guarantee, floor_fraction x max, 96 MiB),
        never above ``max_bytes``."""
        floor = max(min_guarantee or 0, int(floor_fraction * max_bytes), MIN_FLOOR_BYTES)
        return cls(name, max_bytes, min_guarantee, min(floor, max_bytes), target)


@dataclass(frozen=True)
class PolicyView:
    """What a policy decides from.

    :param now: the decision's time (UTC).
    :param host: the host frame's rows of the recent window (``HOST_FRAME`` in
        :mod:`balloonlab.model.schema`; :meth:`host_memory` reads it the same way with and
        without a budget).
    :param guests: the samples frame's rows of the recent window (every guest).
    :param limits: every guest's :class:`GuestLimits`, by name.
    :param budget: the host memory budget in bytes, None when the real host's memory is used.
    """

    now: pd.Timestamp
    host: pd.DataFrame
    guests: pd.DataFrame
    limits: Mapping[str, GuestLimits]
    budget: int | None = None

    @property
    def names(self) -> list[str]:
        """The guests a policy may set, in name order."""
        return sorted(self.limits)

    def host_last(self) -> pd.Series:
        """The newest host row (an empty Series before the first)."""
        return self.host.iloc[-1] if len(self.host) else pd.Series(dtype=object)

    def host_memory(self) -> HostMemory | None:
        """The host's memory now: the budget's virtual host when there is a budget, else the
        real one (None before the first host row)."""
        return host_memory(self.host_last(), self.budget) if len(self.host) else None

    def guest_rows(self, name: str) -> pd.DataFrame:
        """One guest's rows of the window, oldest first."""
        if not len(self.guests):
            return self.guests
        return self.guests[self.guests["guest"] == name]

    def guest_last(self, name: str) -> pd.Series | None:
        """One guest's newest sample, None when the window has none."""
        rows = self.guest_rows(name)
        return rows.iloc[-1] if len(rows) else None


@dataclass(frozen=True)
class HostMemory:
    """The host's memory as a policy counts it (bytes).

    :param total: MemTotal, or the budget.
    :param available: MemAvailable, or the budget minus the guests' resident guest RAM.
    :param free_with_cache: MemFree + Buffers + Cached (MOM's "host free"), or as ``available``
        under a budget (the virtual host has no page cache of its own).
    :param used_by_guests: the sum of the sampled guests' resident guest RAM (``guests_ram``).
    """

    total: int
    available: int
    free_with_cache: int
    used_by_guests: int


def host_memory(row: pd.Series, budget: int | None) -> HostMemory | None:
    """:class:`HostMemory` from one host-frame row: a budget stands in for a host under pressure
    whose only tenants are the guests (used = the sum of their resident guest RAM).

    None when the row cannot say: ``guests_ram`` missing under a budget; without one, MemTotal
    missing, or both MemAvailable and MemFree + Buffers + Cached. A missing value is never read
    as 0, which would make a budget look empty or a host look full. Without MemAvailable (kernels
    before 3.14) ``available`` is MemFree + Buffers + Cached, and the other way round.
    """
    values = {name: _int_or_none(row.get(name))
              for name in ("guests_ram", "mem_total", "mem_available", "mem_free", "buffers", "cached")}
    used = values["guests_ram"]
    if budget is not None:
        return None if used is None else HostMemory(budget, budget - used, budget - used, used)
    parts = [values[name] for name in ("mem_free", "buffers", "cached")]
    free = None if None in parts else sum(v for v in parts if v is not None)
    available = values["mem_available"] if values["mem_available"] is not None else free
    total = values["mem_total"]
    if total is None or available is None:
        return None
    return HostMemory(total, available, available if free is None else free, used or 0)


def _int_or_none(value: object) -> int | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)  # type: ignore[call-overload, no-any-return]


@dataclass(frozen=True)
class Decision:
    """Targets and why: ``why[guest]`` holds the numbers that decided that guest's target
    (JSON-able scalars), recorded with the decision's event."""

    targets: Mapping[str, Any]
    why: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


#: A policy: a callable from the view to targets (bytes by guest) or a :class:`Decision`.
Policy = Callable[[PolicyView], "Mapping[str, Any] | Decision"]


def policy_name(policy: object) -> str:
    """A policy's name for events and tables: its ``name`` attribute, else its qualified name."""
    name = getattr(policy, "name", None)
    if isinstance(name, str) and name:
        return name
    target = policy if callable(policy) and hasattr(policy, "__qualname__") else type(policy)
    return str(getattr(target, "__qualname__", repr(policy)))


@dataclass(frozen=True)
class Enforced:
    """:func:`enforce_limits`' answer.

    :param targets: the target each guest gets now (every guest: unchanged ones keep theirs).
    :param changed: the guests whose target moves.
    :param notes: per guest, how its value was limited (``floor``, ``max_step``), if it was.
    :param refused: per guest (or per unknown name), why its value was refused.
    """

    targets: dict[str, int]
    changed: tuple[str, ...]
    notes: dict[str, str]
    refused: dict[str, str]


def enforce_limits(proposed: Mapping[str, Any], limits: Mapping[str, GuestLimits], *,
                   max_step_fraction: float = DEFAULT_MAX_STEP_FRACTION) -> Enforced:
    """Apply the limits to a policy's targets (see the module docstring); never raises."""
    targets = {name: lim.target if lim.target is not None else lim.max_bytes for name, lim in limits.items()}
    notes: dict[str, str] = {}
    refused: dict[str, str] = {}
    changed: list[str] = []
    for name, value in proposed.items():
        lim = limits.get(name) if isinstance(name, str) else None
        if lim is None:
            refused[str(name)] = f"no guest {name!r} in this run (guests: {', '.join(sorted(limits))})"
            continue
        why = _refusal(value, lim)
        if why is not None:
            refused[name] = why
            continue
        current = targets[name]
        wanted = int(round(float(value)))
        limited = max(wanted, lim.floor_bytes)
        if limited != wanted:
            notes[name] = f"floor {lim.floor_bytes}"
        step = int(max_step_fraction * lim.max_bytes)
        if abs(limited - current) > step:
            limited = current + step if limited > current else current - step
            notes[name] = (notes[name] + ", " if name in notes else "") + f"max_step {step}"
        if limited != current:
            targets[name] = limited
            changed.append(name)
    return Enforced(targets, tuple(changed), notes, refused)


def _refusal(value: object, lim: GuestLimits) -> str | None:
    """Why ``value`` cannot be a target of this guest, or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"target {value!r} is not a number of bytes"
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float: far above any guest's memory
        return f"target {value!r:.40} is above the guest's memory {lim.max_bytes} B"
    if not math.isfinite(number):
        return f"target {value!r} is not finite"
    if number < 0:
        return f"target {value!r} is negative"
    if number > lim.max_bytes:
        return f"target {int(number)} B is above the guest's memory {lim.max_bytes} B"
    return None


def split_decision(result: object) -> tuple[Mapping[str, Any], Mapping[str, Mapping[str, Any]]]:
    """A policy's return value as (targets, why).

    :raises TypeError: it is neither a mapping nor a :class:`Decision` (the message says what
        was returned).
    """
    if isinstance(result, Decision):
        if not isinstance(result.targets, Mapping):
            raise TypeError(f"a Decision's targets are {{guest: bytes}}, not {type(result.targets).__name__}")
        if not isinstance(result.why, Mapping) or not all(isinstance(v, Mapping) for v in result.why.values()):
            raise TypeError("a Decision's why is {guest: {name: value}}: a dict of reasons per guest")
        return result.targets, result.why
    if isinstance(result, Mapping):
        return result, {}
    if result is None:
        return {}, {}
    raise TypeError(f"a policy returns {{guest: bytes}} or a Decision, not {type(result).__name__}: {result!r:.80}")


def decision_details(view: PolicyView, proposed: Mapping[str, Any], why: Mapping[str, Mapping[str, Any]],
                     enforced: Enforced, name: str) -> dict[str, dict[str, Any]]:
    """What a run records of one decision, per guest: every guest the policy named (with a
    target, or only with its reasons for leaving it be) that was not refused, in name order. The
    live loop and the offline replay both write their ``policy`` events from this, so their
    decisions compare one for one.

    Each detail: the policy's ``name``, what it ``proposed`` (None for reasons only), whether the
    target ``changed``, how the limits ``notes`` changed it, its ``why`` and the ``inputs``: the
    host's total and available (budget-aware) and the guest's newest actual, free and available.
    """
    memory = view.host_memory()
    out: dict[str, dict[str, Any]] = {}
    for guest in sorted((set(proposed) | set(why)) & set(enforced.targets) - set(enforced.refused)):
        last = view.guest_last(guest)

        def stat(column: str, row: pd.Series | None = last) -> float | int | None:
            return None if row is None else json_number(row.get(column))

        out[guest] = {"policy": name, "proposed": json_number(proposed.get(guest)),
                      "changed": guest in enforced.changed, "notes": enforced.notes.get(guest, ""),
                      "why": dict(why.get(guest, {})),
                      "inputs": {"host_total": memory.total if memory else None,
                                 "host_available": memory.available if memory else None,
                                 "actual": stat("actual"), "free_memory": stat("free_memory"),
                                 "available_memory": stat("available_memory")}}
    return out


def json_number(value: object) -> float | int | None:
    """A finite number as JSON takes it (numpy scalars unwrapped), else None (NA, NaN, text)."""
    if value is None or value is pd.NA or isinstance(value, bool):
        return None
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None

