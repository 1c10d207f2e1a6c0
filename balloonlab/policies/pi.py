"""A PI controller holding the host's used memory at a setpoint by reclaiming from the guests.

No external reference: this is a textbook positional PI loop, designed for balloonlab (issue 14).

- measured: ``used = total - available`` from :meth:`PolicyView.host_memory` (MemTotal -
  MemAvailable; under a budget the guests' resident guest RAM), the setpoint ``setpoint_fraction x total``
  (the budget when there is one), ``error = used - setpoint`` (bytes; > 0: too much in use);
- output: the total reclaim ``R = kp x error + I`` (bytes the guests give up below their
  ``<memory>``), ``I += ki x error x dt`` with ``dt`` the seconds since the last decision
  (``interval_s`` for the first, at most ``max_dt_factor x interval_s`` after a pause);
- anti-windup (clamping): ``R`` is clamped to ``[0, sum(capacity)]``, and ``I`` to ``[0,
  sum(capacity) - kp x error]`` (no more than it takes to saturate the output): a setpoint out of
  reach leaves no stored error to unwind when it comes back in reach;
- distribution: guest ``g`` can give ``capacity_g = (memory - actual) + available - reserve`` (what
  it has already given plus its MemAvailable above ``reserve_fraction x memory``), at most
  ``memory - floor``; ``R`` is split in proportion to the capacities (the same integer split as
  :func:`~balloonlab.policies.psi.split_by_headroom`), ``target = memory - share``; a move smaller
  than ``min_change_bytes`` is not made (except the one back to the full memory). A guest without
  a sample (or ``actual``, or both ``available_memory`` and ``free_memory``) is skipped; with no
  readable host row (:func:`~balloonlab.policies.psi.host_now`) nothing is decided.

Tuning: the plant is close to a unit gain with one decision of delay (a byte reclaimed is a byte
no longer used on the host once the balloon has moved), so the integral term does the work; with
``kp`` 0.1 and ``ki`` 0.25/s at 2 s the closed loop's poles are ~0.57 and ~-0.17 (a few decisions
to settle, no sustained oscillation). The state (``integral``, the last decision's time) lives in
the object: a replay from the run's first decision reproduces the live one.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from balloonlab.model.policy import Decision, PolicyView
from balloonlab.policies.psi import guest_free, host_now, number, split_by_headroom

MiB = 2**20


class PiPolicy:
    """PI control of host usage (module docstring).

    :param setpoint_fraction: the host usage aimed at, as a share of its total (or budget).
    :param kp: proportional gain (bytes of reclaim per byte of error).
    :param ki: integral gain (per second).
    :param reserve_fraction: share of a guest's memory kept available inside it.
    :param min_change_bytes: smaller moves of a target are not made.
    :param interval_s: the nominal time between decisions (the first ``dt``).
    :param max_dt_factor: ``dt`` is at most this many intervals.
    """

    name = "pi"

    def __init__(self, *, setpoint_fraction: float = 0.80, kp: float = 0.1, ki: float = 0.25,
                 reserve_fraction: float = 0.10, min_change_bytes: int = 16 * MiB, interval_s: float = 2.0,
                 max_dt_factor: float = 5.0) -> None:
        if not 0 < setpoint_fraction <= 1 or kp < 0 or ki < 0 or interval_s <= 0 or not 0 <= reserve_fraction < 1:
            raise ValueError("setpoint_fraction in (0, 1], kp >= 0, ki >= 0, interval_s > 0, reserve in [0, 1)")
        self.setpoint_fraction, self.kp, self.ki = setpoint_fraction, kp, ki
        self.reserve_fraction, self.min_change_bytes = reserve_fraction, min_change_bytes
        self.interval_s, self.max_dt_factor = interval_s, max_dt_factor
        self.integral = 0.0
        self._last: pd.Timestamp | None = None

    def capacities(self, view: PolicyView) -> dict[str, int]:
        """What each guest with a usable sample can give below its memory (module docstring)."""
        capacity: dict[str, int] = {}
        for name in view.names:
            lim, last = view.limits[name], view.guest_last(name)
            actual = number(last.get("actual")) if last is not None else None
            free = guest_free(last) if last is not None else None
            if actual is None or free is None:
                continue
            can = lim.max_bytes - int(actual) + free - int(self.reserve_fraction * lim.max_bytes)
            capacity[name] = max(0, min(can, lim.max_bytes - lim.floor_bytes))
        return capacity

    def __call__(self, view: PolicyView) -> Decision:
        """One step of the loop: targets for the guests whose share moved enough."""
        memory = host_now(view)
        if memory is None:
            return Decision({}, {})
        if self._last is None:
            dt = self.interval_s
        else:
            dt = min(max(0.0, (view.now - self._last).total_seconds()), self.max_dt_factor * self.interval_s)
        self._last = view.now
        used = memory.total - memory.available
        setpoint = self.setpoint_fraction * memory.total
        error = used - setpoint
        capacity = self.capacities(view)
        top = float(sum(capacity.values()))
        # clamping anti-windup: never more integral than it takes to saturate the output, never < 0
        upper = top - self.kp * error if error > 0 else top
        self.integral = min(max(self.integral + self.ki * error * dt, 0.0), max(upper, 0.0))
        reclaim = int(min(max(self.kp * error + self.integral, 0.0), top))
        shares = split_by_headroom(reclaim, capacity)
        loop = {"used": used, "setpoint": setpoint, "error": error, "dt": dt, "integral": self.integral,
                "reclaim": reclaim, "capacity_total": int(top)}
        targets: dict[str, int] = {}
        why: dict[str, dict[str, Any]] = {}
        for name, share in shares.items():
            lim = view.limits[name]
            target = lim.max_bytes - share
            current = lim.target if lim.target is not None else lim.max_bytes
            moved = target != current and (abs(target - current) >= self.min_change_bytes or share == 0)
            if moved:
                targets[name] = target
            why[name] = {**loop, "capacity": capacity[name], "share": share, "target": target, "set": moved}
        return Decision(targets, why)
