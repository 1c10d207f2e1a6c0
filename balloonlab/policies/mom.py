"""oVirt MOM's default auto-balloon policy: ``doc/balloon.rules`` then ``doc/balloon-qos.rules``.

Source: https://github.com/oVirt/mom at 3de1c8e6bcb9da716b0aec96f8c38df6e79ef55a (rules last changed
in e0f3d3b "Reorder limit checks in grow quest", 2013, and 7e561ce "Renaming min_guarantee to
balloon_min"); the inputs from ``mom/Collectors/HostMemory.py``, ``mom/Entity.py`` (``StatAvg``),
``mom/Monitor.py`` (the sample history), ``mom/HypervisorInterfaces/libvirtInterface.py``
(``balloon_cur``/``balloon_max``/``balloon_min``) and ``mom/__init__.py`` (defaults).

The rules, rewritten (all sizes in the same unit; MOM's are KiB, ours bytes):

- constants: ``pressure_threshold`` 0.20, ``pressure_critical`` 0.05, ``min_guest_free_percent``
  0.20, ``max_balloon_change_percent`` 0.05, ``min_balloon_change_percent`` 0.0025;
- ``host_free_percent = StatAvg(mem_free) / mem_available`` where the host's ``mem_free`` is
  MemFree + Buffers + Cached and ``mem_available`` is MemTotal (newest sample);
- below ``pressure_threshold`` every guest is shrunk, else every guest is grown (there is no dead
  band between the two: at or above the threshold the grow rule runs);
- shrink: ``guest_free_percent`` is ``host_free_percent - 0.05`` when ``host_free_percent <=
  pressure_critical`` (negative: the guest is made to swap), else ``min_guest_free_percent x
  host_free_percent / pressure_threshold``; ``used = StatAvg(balloon_cur) - StatAvg(mem_unused)``;
  ``floor = max(balloon_min, used + guest_free_percent x balloon_cur)``; ``size = max(floor,
  balloon_cur x (1 - max_balloon_change_percent))``; set only if ``size <= balloon_cur`` and the
  change is big enough;
- grow (only when ``balloon_cur < balloon_max``): ``floor = max(balloon_min, used +
  min_guest_free_percent x balloon_cur)``; ``size = min(balloon_max, max(floor, balloon_cur x (1 +
  max_balloon_change_percent)))``; set if the change is big enough;
- big enough: ``|size - balloon_cur| > min_balloon_change_percent x balloon_cur``;
- balloon-qos.rules (evaluated after, so it wins): ``balloon_cur < balloon_min`` sets the target
  to ``balloon_min``;
- the Balloon controller sets ``int(target)`` (whole KiB).

Mapping and where it differs from MOM on a real host:

- ``balloon_cur`` = ``actual``, ``mem_unused`` = ``free_memory`` (libvirt "unused", as MOM's libvirt
  interface maps it), ``balloon_max`` = :attr:`GuestLimits.max_bytes` (libvirt's maxMem),
  ``balloon_min`` = :attr:`GuestLimits.min_guarantee` or 0. MOM's libvirt interface passes
  ``<min_guarantee>``'s *text* (a string) to the rules, which breaks their comparisons; we use the
  number, as the vdsm interface does.
- host free: ``view.host_memory().free_with_cache / total`` per host row, so a budget works (then
  "free" is the budget minus the guests' resident guest RAM; MOM always reads /proc/meminfo).
- history: MOM keeps ``sample-history-length`` = 10 samples (``mom/__init__.py``), taken every
  ``host-/guest-monitor-interval`` = 5 s, i.e. about 50 s, and evaluates every 10 s. Here the history
  is the last ``sample_history_length`` complete rows of the window (10 by default): the same
  count, but it spans 10 x the sampling period and never more than the window (30 s by default).
- MOM drops an incomplete collection (a mandatory field missing) and leaves the entity out of the
  evaluation until a complete one: here a row with ``actual`` or ``free_memory`` NA (host: any
  meminfo field, or ``guests_ram`` under a budget) is not part of the history, and a guest (or the
  host) whose newest row is incomplete is skipped this decision.
- targets are truncated to whole KiB (MOM's ``int()`` of a KiB value).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from balloonlab.model.policy import Decision, GuestLimits, PolicyView, host_memory

#: A guest's columns every history row needs (MOM's mandatory fields the rules read).
GUEST_FIELDS = ("actual", "free_memory")
#: ``balloon.rules``' shrink_guest: under critical pressure the guest's free share is this below
#: the host's (a literal in the rules).
CRITICAL_GUEST_FREE_OFFSET = -0.05


def _history(rows: pd.DataFrame, fields: tuple[str, ...], length: int) -> pd.DataFrame | None:
    """The last ``length`` complete rows, None when the newest row is incomplete (MOM: not ready)."""
    if not len(rows) or any(f not in rows.columns for f in fields):
        return None
    complete = rows[list(fields)].notna().all(axis=1)
    if not bool(complete.iloc[-1]):
        return None
    return rows[complete].iloc[-length:]


def _avg(values: list[int]) -> float:
    """``Entity.StatAvg``: the mean of the history's values, as a float."""
    return float(sum(values) / len(values))


class MomPolicy:
    """MOM's ``balloon.rules`` + ``balloon-qos.rules`` (module docstring), with MOM's defaults.

    :param pressure_threshold: host free share under which guests are shrunk.
    :param pressure_critical: host free share at or under which shrinking is aggressive.
    :param min_guest_free_percent: the free share an unconstrained guest keeps.
    :param max_balloon_change_percent: the largest move, as a share of ``balloon_cur``.
    :param min_balloon_change_percent: smaller moves are not made.
    :param sample_history_length: rows averaged by ``StatAvg`` (MOM's ``sample-history-length``).
    :param qos: apply ``balloon-qos.rules`` after ``balloon.rules``.
    """

    name = "mom"

    def __init__(self, *, pressure_threshold: float = 0.20, pressure_critical: float = 0.05,
                 min_guest_free_percent: float = 0.20, max_balloon_change_percent: float = 0.05,
                 min_balloon_change_percent: float = 0.0025, sample_history_length: int = 10,
                 qos: bool = True) -> None:
        if sample_history_length < 1:
            raise ValueError(f"sample_history_length must be >= 1, got {sample_history_length}")
        self.pressure_threshold = pressure_threshold
        self.pressure_critical = pressure_critical
        self.min_guest_free_percent = min_guest_free_percent
        self.max_balloon_change_percent = max_balloon_change_percent
        self.min_balloon_change_percent = min_balloon_change_percent
        self.sample_history_length = sample_history_length
        self.qos = qos

    def host_free_percent(self, view: PolicyView) -> tuple[float, float, int] | None:
        """(host_free_percent, StatAvg of host free, host total), None when the host is not ready."""
        fields = ("guests_ram",) if view.budget is not None else ("mem_total", "mem_free", "buffers", "cached")
        rows = _history(view.host, fields, self.sample_history_length)
        if rows is None:
            return None
        memories = [m for _, row in rows.iterrows() if (m := host_memory(row, view.budget)) is not None]
        if not memories:
            return None
        total = memories[-1].total
        if total <= 0:
            return None
        free = _avg([m.free_with_cache for m in memories])
        return free / total, free, total

    def __call__(self, view: PolicyView) -> Decision:
        """Targets for the guests the rules move, and why for every guest evaluated."""
        host = self.host_free_percent(view)
        if host is None:
            return Decision({}, {})
        host_free_percent, host_free, host_total = host
        pressure = host_free_percent < self.pressure_threshold
        targets: dict[str, int] = {}
        why: dict[str, dict[str, Any]] = {}
        for name in view.names:
            rows = _history(view.guest_rows(name), GUEST_FIELDS, self.sample_history_length)
            if rows is None:
                continue
            lim = view.limits[name]
            size, reason = (self._shrink if pressure else self._grow)(rows, lim, host_free_percent)
            reason.update(host_free_percent=host_free_percent, host_free_avg=host_free, host_total=host_total,
                          history_rows=len(rows))
            cur = int(rows["actual"].iloc[-1])
            balloon_min = lim.min_guarantee or 0
            if self.qos and cur < balloon_min:  # balloon-qos.rules' Control comes last and wins
                size, reason["qos"] = float(balloon_min), balloon_min
            if size is not None:
                targets[name] = int(size / 1024) * 1024
                reason["target"] = targets[name]
            why[name] = reason
        return Decision(targets, why)

    def _used(self, rows: pd.DataFrame) -> float:
        return _avg([int(v) for v in rows["actual"]]) - _avg([int(v) for v in rows["free_memory"]])

    def _big_enough(self, cur: int, size: float) -> bool:
        return abs(size - cur) > self.min_balloon_change_percent * cur

    def _shrink(self, rows: pd.DataFrame, lim: GuestLimits, host_free_percent: float
                ) -> tuple[float | None, dict[str, Any]]:
        cur = int(rows["actual"].iloc[-1])
        if host_free_percent <= self.pressure_critical:
            branch, guest_free_percent = "shrink_critical", CRITICAL_GUEST_FREE_OFFSET + host_free_percent
        else:
            branch = "shrink"
            guest_free_percent = self.min_guest_free_percent * (host_free_percent / self.pressure_threshold)
        used = self._used(rows)
        floor = max(lim.min_guarantee or 0, used + guest_free_percent * cur)
        size = max(cur * (1 - self.max_balloon_change_percent), floor)
        act = size <= cur and self._big_enough(cur, size)
        return (size if act else None), {"branch": branch, "balloon_cur": cur, "guest_used_avg": used,
                                         "guest_free_percent": guest_free_percent, "balloon_floor": floor,
                                         "balloon_size": size, "set": act}

    def _grow(self, rows: pd.DataFrame, lim: GuestLimits, host_free_percent: float
              ) -> tuple[float | None, dict[str, Any]]:
        cur = int(rows["actual"].iloc[-1])
        if cur >= lim.max_bytes:
            return None, {"branch": "grow", "balloon_cur": cur, "balloon_max": lim.max_bytes, "set": False}
        used = self._used(rows)
        floor = max(lim.min_guarantee or 0, used + self.min_guest_free_percent * cur)
        size = min(max(cur * (1 + self.max_balloon_change_percent), floor), float(lim.max_bytes))
        act = self._big_enough(cur, size)
        return (size if act else None), {"branch": "grow", "balloon_cur": cur, "guest_used_avg": used,
                                         "balloon_floor": floor, "balloon_size": size,
                                         "balloon_max": lim.max_bytes, "set": act}
