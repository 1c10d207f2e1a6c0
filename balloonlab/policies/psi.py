"""A PSI-driven policy after hypeman's active ballooning: reclaim under host pressure, give back after.

Source: https://github.com/kernel/hypeman ``lib/guestmemory/`` (stored versions:
``active_ballooning.go`` 010cec5a for the defaults, ``controller.go`` ede5689d for the reconcile
loop, ``planner.go`` 98e0577c for the state machine and the split, ``pressure_parse.go`` f4e57281
for the PSI test). What is taken from it, with its defaults:

- pressure state with hysteresis: *healthy* -> *pressure* when host MemAvailable < 10 % of MemTotal
  (``PressureHighWatermarkAvailablePercent``) or the host is *stressed* (``/proc/pressure/memory``
  ``some avg10 >= 0.1``); *pressure* -> *healthy* only when available >= 15 %
  (``PressureLowWatermarkAvailablePercent``) and not stressed;
- under pressure, reclaim ``15 % x total - available`` (nothing more when stressed but above
  that), split over the guests in proportion to their headroom (integer shares, what rounding
  leaves goes to the first guests with room);
- a protected floor per guest: ``max(512 MiB, 50 % of its memory)`` (``ProtectedFloor*``);
- per guest: a move smaller than 64 MiB is not made (``MinAdjustmentBytes``), a guest moved less
  than 5 s ago is left alone (``PerVMCooldown``), one move is at most 256 MiB
  (``PerVMMaxStepBytes``), the result is clamped to [floor, memory];
- healthy: every guest goes back toward its full memory, by those steps (memory is given back
  gradually).

Where this differs from hypeman, and why:

- headroom: hypeman has no guest signal yet and splits by ``memory - floor``. Here a guest's
  headroom is what it can give without going under a reserve: ``available - reserve - (actual -
  target)`` (``available_memory``, else ``free_memory``; ``reserve_fraction`` x memory, 10 % by
  default; what the balloon still has to take counted as given), at most ``target - floor``. A
  guest without a sample (or ``actual``) is skipped; with no readable host row (:func:`host_now`)
  nothing is decided and the state stays as it was.
- hypeman plans the *total* reclaim (``needed``) from the full sizes, so a reclaim that worked
  lowers ``needed`` and its next plan gives memory back while the host is still in pressure. Here
  ``needed`` is reclaimed on top of the targets in force (the controller is incremental).
- the 64 MiB minimum does not stop the last move back to the full memory (hypeman would leave a
  guest up to 64 MiB short of it for good).
- the PSI stress test reads the host frame's ``psi_some_avg10`` (NA: not stressed), and under a
  budget "available" is the budget minus the guests' resident guest RAM (:meth:`PolicyView.host_memory`).
- time is ``view.now``; the state (pressure, last moves) lives in the object, so a replay from the
  run's first decision reproduces the live one.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from balloonlab.model.policy import Decision, GuestLimits, HostMemory, PolicyView

MiB = 2**20


def host_now(view: PolicyView) -> HostMemory | None:
    """:meth:`PolicyView.host_memory`, None when the newest host row cannot say it (no row, no
    total, or NA in what it needs: ``guests_ram`` under a budget, else MemTotal/MemAvailable,
    which :func:`~balloonlab.model.policy.host_memory` would read as 0)."""
    needed = ("guests_ram",) if view.budget is not None else ("mem_total", "mem_available")
    last = view.host_last()
    if not len(last) or any(number(last.get(column)) is None for column in needed):
        return None
    memory = view.host_memory()
    return memory if memory is not None and memory.total > 0 else None


def number(value: object) -> float | None:
    """A sample's value as a float, None when it is missing (None, NA, NaN)."""
    if value is None or value is pd.NA:
        return None
    result = float(value)  # type: ignore[arg-type]
    return None if result != result else result


def guest_free(row: pd.Series) -> int | None:
    """What the guest could give: MemAvailable (``available_memory``), else MemFree."""
    for column in ("available_memory", "free_memory"):
        value = number(row.get(column))
        if value is not None:
            return int(value)
    return None


def split_by_headroom(total: int, headroom: dict[str, int]) -> dict[str, int]:
    """``total`` (clamped to the sum of ``headroom``) split in proportion to ``headroom``; the
    rounding's remainder goes to the first guests with room (hypeman's ``planGuestTargets``)."""
    room = sum(headroom.values())
    shares = dict.fromkeys(headroom, 0)
    if room <= 0:
        return shares
    total = min(max(total, 0), room)
    for name, value in headroom.items():
        shares[name] = min(total * value // room, value)
    left = total - sum(shares.values())
    for name, value in headroom.items():
        extra = min(value - shares[name], left)
        shares[name] += extra
        left -= extra
    return shares


class PsiPolicy:
    """Hypeman-like pressure controller (module docstring); the defaults are hypeman's."""

    name = "psi"

    def __init__(self, *, high_watermark_percent: float = 10.0, low_watermark_percent: float = 15.0,
                 psi_threshold: float = 0.1, protected_floor_percent: float = 50.0,
                 protected_floor_min_bytes: int = 512 * MiB, reserve_fraction: float = 0.10,
                 min_adjustment_bytes: int = 64 * MiB, max_step_bytes: int = 256 * MiB,
                 cooldown_s: float = 5.0) -> None:
        if not 0 < high_watermark_percent < low_watermark_percent < 100:
            raise ValueError("the watermarks must be 0 < high < low < 100 (percent of host memory available)")
        if max_step_bytes <= 0 or min_adjustment_bytes < 0 or cooldown_s < 0 or not 0 <= reserve_fraction < 1:
            raise ValueError("max_step_bytes > 0, min_adjustment_bytes >= 0, cooldown_s >= 0, reserve in [0, 1)")
        self.high_watermark_percent, self.low_watermark_percent = high_watermark_percent, low_watermark_percent
        self.psi_threshold = psi_threshold
        self.protected_floor_percent = protected_floor_percent
        self.protected_floor_min_bytes = protected_floor_min_bytes
        self.reserve_fraction = reserve_fraction
        self.min_adjustment_bytes, self.max_step_bytes = min_adjustment_bytes, max_step_bytes
        self.cooldown_s = cooldown_s
        self.pressure = False
        self._last_moved: dict[str, pd.Timestamp] = {}

    def floor(self, lim: GuestLimits) -> int:
        """The guest's protected floor: hypeman's, and never under the run's own floor."""
        protected = max(self.protected_floor_min_bytes, int(lim.max_bytes * self.protected_floor_percent / 100))
        return max(lim.floor_bytes, min(protected, lim.max_bytes))

    def __call__(self, view: PolicyView) -> Decision:
        """One reconcile: update the pressure state, plan, and apply the per-guest limits."""
        memory = host_now(view)
        if memory is None:
            return Decision({}, {})
        psi = number(view.host_last().get("psi_some_avg10"))
        stressed = psi is not None and psi >= self.psi_threshold
        available_percent = memory.available / memory.total * 100
        if self.pressure:
            self.pressure = available_percent < self.low_watermark_percent or stressed
        else:
            self.pressure = available_percent < self.high_watermark_percent or stressed
        needed = max(0, int(memory.total * self.low_watermark_percent / 100) - memory.available)
        host = {"pressure": self.pressure, "stressed": stressed, "psi_some_avg10": psi,
                "host_available_percent": available_percent, "needed": needed if self.pressure else 0}
        current: dict[str, int] = {}
        headroom: dict[str, int] = {}
        for name in view.names:
            lim, last = view.limits[name], view.guest_last(name)
            actual = number(last.get("actual")) if last is not None else None
            if last is None or actual is None:
                continue
            current[name] = lim.target if lim.target is not None else lim.max_bytes
            free = guest_free(last)
            reserve = int(self.reserve_fraction * lim.max_bytes)
            pending = max(0, int(actual) - current[name])
            give = free - reserve - pending if free is not None else 0
            headroom[name] = max(0, min(give, current[name] - self.floor(lim)))
        shares = split_by_headroom(needed if self.pressure else 0, headroom)
        targets: dict[str, int] = {}
        why: dict[str, dict[str, Any]] = {}
        for name, now in current.items():
            lim = view.limits[name]
            planned = now - shares[name] if self.pressure else lim.max_bytes
            applied, held = self._apply(name, view.now, now, planned, lim)
            why[name] = {**host, "headroom": headroom[name], "current": now, "planned": planned, "held": held}
            if applied != now:
                targets[name] = applied
                self._last_moved[name] = view.now
        return Decision(targets, why)

    def _apply(self, name: str, at: pd.Timestamp, current: int, planned: int, lim: GuestLimits) -> tuple[int, str]:
        """controller.go's apply step: (the target, what held it back or "")."""
        applied, held = planned, ""
        if abs(planned - current) < self.min_adjustment_bytes and planned != lim.max_bytes:
            applied, held = current, "min_adjustment"
        last = self._last_moved.get(name)
        if last is not None and (at - last).total_seconds() < self.cooldown_s:
            applied, held = current, "cooldown"
        if abs(applied - current) > self.max_step_bytes:
            applied, held = current + (self.max_step_bytes if applied > current else -self.max_step_bytes), "max_step"
        return min(max(applied, self.floor(lim)), lim.max_bytes), held
