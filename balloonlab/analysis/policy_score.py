"""Scores of a policy run, recorded live or replayed: what it cost the host, what it cost the guests.

:func:`score` reads the frames a run has (samples, host, events) and returns one number per
measure; :func:`score_table` puts several runs side by side. Pure. Every time integral holds each
row's value until the next row of the same series (a step function, as the sampler saw it), over
the span from the series' first row to its last; a row's value is NA -> the row is skipped.

The measures (units in the names):

- ``footprint_gib_s``: ∫ Σ footprint dt, the host memory the guests held over time, with
  footprint = what a budget counts (``model.hostfs.footprint``: the guest's resident guest RAM,
  its QEMU RSS where that is unknown): the host frame's ``guests_ram`` (without it, the samples'
  ``host_guest_ram``, else ``host_rss``, each guest's last value held); ``footprint_mean_bytes``
  (that integral over the span) and ``footprint_peak_bytes``; ``rss_gib_s``: the same over the
  QEMUs' whole RSS (``guests_rss``: the VMMs' own memory too);
- ``pressure_s``: Σ over guests of the seconds a guest's MemAvailable (``available_memory``, else
  ``free_memory + disk_caches``) is under its threshold ``max(pressure_threshold x total_memory,
  pressure_min_bytes)`` (10 % of its current MemTotal, never under 32 MiB: below that a Linux
  guest reclaims and swaps hard); ``pressure_depth_mib_s``: ∫ Σ max(0, threshold - available) dt;
- ``oom_kills``, ``alloc_stalls``: the counters' rises, summed over guests (NaN when no guest
  reports them: kernels before 6.12);
- ``swap_bytes``: swap traffic, the rises of ``swap_in`` plus ``swap_out``;
- ``target_changes``: ``target`` events (the balloon was given a new target); a run without
  them counts its ``policy`` events with ``"changed": true`` in their detail (what the live loop
  and the replay write), else those whose value differs from that guest's previous one;
- ``policy_errors``: ``policy_error`` events;
- ``budget_violation_s``: seconds with Σ footprint above ``budget`` (what the live loop's
  ``budget_available`` counts);
  ``budget_worst_excess_bytes``: the most it was above (0 when never; both NaN without budget).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from balloonlab.analysis.measures import EPOCH, MiB, column, conform

GiB = 1 << 30
#: Defaults of the pressure threshold: 10 % of MemTotal, at least 32 MiB.
PRESSURE_FRACTION = 0.10
PRESSURE_MIN_BYTES = 32 * MiB
#: The measures, in table order.
MEASURES: tuple[str, ...] = ("footprint_gib_s", "footprint_mean_bytes", "footprint_peak_bytes", "rss_gib_s",
                             "pressure_s",
                             "pressure_depth_mib_s", "oom_kills", "alloc_stalls", "swap_bytes", "target_changes",
                             "policy_errors", "budget_violation_s", "budget_worst_excess_bytes", "span_s")


def _seconds(index: pd.Index) -> np.ndarray:
    out: np.ndarray = ((pd.DatetimeIndex(index) - EPOCH) / pd.Timedelta(seconds=1)).to_numpy(dtype=float)
    return out


def _numbers(series: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(seconds, values) of the rows whose value is known."""
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    keep = ~np.isnan(values)
    return _seconds(series.index)[keep], values[keep]


def hold_integral(t: np.ndarray, values: np.ndarray) -> float:
    """∫ of a step function: ``values[i]`` holds from ``t[i]`` to ``t[i + 1]`` (the last row ends
    the span)."""
    if len(t) < 2:
        return 0.0
    return float(np.sum(values[:-1] * np.diff(t)))


_EMPTY = pd.Series([], index=pd.DatetimeIndex([], dtype="datetime64[ns, UTC]", name="time"), dtype=float)


def footprint_series(samples: pd.DataFrame, host: pd.DataFrame | None, *, rss: bool = False) -> pd.Series:
    """Σ footprint over time (bytes): the host frame's ``guests_ram`` (``rss``: ``guests_rss``),
    else the samples' ``host_guest_ram`` or ``host_rss`` (``rss``: ``host_rss``) per guest, each
    held until its next sample, summed where every guest has one."""
    name = "guests_rss" if rss else "guests_ram"
    if host is not None and len(host) and name in host.columns and host[name].notna().any():
        return pd.to_numeric(host[name], errors="coerce").dropna().sort_index(kind="stable").astype(float)
    if not len(samples):
        return _EMPTY.copy()
    value = pd.to_numeric(column(samples, "host_rss"), errors="coerce")
    if not rss:
        value = pd.to_numeric(column(samples, "host_guest_ram"), errors="coerce").fillna(value)
    if not value.notna().any():
        return _EMPTY.copy()
    frame = pd.DataFrame({"t": samples.index, "guest": samples["guest"].astype(str).to_numpy(),
                          "v": value.to_numpy(dtype=float, na_value=np.nan)})
    wide = frame.groupby(["t", "guest"], sort=True)["v"].last().unstack("guest")
    return wide.sort_index().ffill().dropna().sum(axis=1).astype(float)


def _rises(series: pd.Series) -> float:
    """Sum of a counter's rises (a drop, a guest's reset, adds nothing)."""
    values = pd.to_numeric(series, errors="coerce").dropna().to_numpy(dtype=float)
    return float(np.clip(np.diff(values), 0, None).sum()) if len(values) >= 2 else 0.0


def score(samples: pd.DataFrame, host: pd.DataFrame | None, events: pd.DataFrame | None, *, budget: int | None,
          pressure_threshold: float = PRESSURE_FRACTION,
          pressure_min_bytes: int = PRESSURE_MIN_BYTES) -> dict[str, float]:
    """The measures of one run (module docstring), by name; floats, NaN where not applicable.

    :param budget: the host budget the footprint is held against (None: no violations counted).
    :param pressure_threshold: share of a guest's MemTotal under which its MemAvailable is pressure.
    :param pressure_min_bytes: the threshold's floor.
    """
    samples, events = conform(samples, "samples"), conform(events, "events")
    out = dict.fromkeys(MEASURES, math.nan)
    fp = footprint_series(samples, host)
    t, v = _seconds(fp.index), fp.to_numpy(dtype=float)
    span = float(t[-1] - t[0]) if len(t) >= 2 else 0.0
    out["span_s"] = span
    out["footprint_gib_s"] = hold_integral(t, v) / GiB
    out["footprint_mean_bytes"] = hold_integral(t, v) / span if span > 0 else (float(v[0]) if len(v) else math.nan)
    out["footprint_peak_bytes"] = float(v.max()) if len(v) else math.nan
    rss = footprint_series(samples, host, rss=True)
    out["rss_gib_s"] = hold_integral(_seconds(rss.index), rss.to_numpy(dtype=float)) / GiB
    if budget is not None:
        over = v - budget
        out["budget_violation_s"] = hold_integral(t, (over > 0).astype(float))
        out["budget_worst_excess_bytes"] = float(max(0.0, over.max())) if len(v) else 0.0
    pressure = depth = swap = 0.0
    counters: dict[str, list[float]] = {"oom_kills": [], "alloc_stalls": []}
    for _, rows in samples.groupby(samples["guest"].astype(str), sort=True, observed=True):
        rows = rows.sort_index(kind="stable")
        gt = _seconds(rows.index)
        total = pd.to_numeric(column(rows, "total_memory"), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        avail = pd.to_numeric(column(rows, "available_memory"), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
        if np.isnan(avail).all():  # QEMU < 4.1: free + cache, as the demand model reads it
            free = pd.to_numeric(column(rows, "free_memory"), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            caches = pd.to_numeric(column(rows, "disk_caches"), errors="coerce").to_numpy(dtype=float, na_value=0.0)
            avail = free + np.nan_to_num(caches)
        threshold = np.maximum(pressure_threshold * total, pressure_min_bytes)
        known = ~np.isnan(avail) & ~np.isnan(threshold)
        short = np.where(known, np.maximum(0.0, threshold - np.where(known, avail, 0.0)), 0.0)
        pressure += hold_integral(gt, (short > 0).astype(float))
        depth += hold_integral(gt, short) / MiB
        swap += sum(_rises(rows[c]) for c in ("swap_in", "swap_out") if c in rows.columns)
        for name, found in counters.items():
            if name in rows.columns and rows[name].notna().any():
                found.append(_rises(rows[name]))
    out["pressure_s"], out["pressure_depth_mib_s"], out["swap_bytes"] = pressure, depth, swap
    for name, found in counters.items():
        out[name] = float(sum(found)) if found else math.nan
    kinds = events["kind"].astype(str)
    out["policy_errors"] = float((kinds == "policy_error").sum())
    out["target_changes"] = float((kinds == "target").sum()) if (kinds == "target").any() else _value_changes(
        events[(kinds == "policy").to_numpy()])
    return out


def _value_changes(policy: pd.DataFrame) -> float:
    """Target changes told by ``policy`` events: those whose detail says ``"changed": true`` (the
    live loop's and replay's), else those whose value differs from the guest's previous one."""
    flags = [_changed(d) for d in policy["detail"]]
    if any(f is not None for f in flags):
        return float(sum(bool(f) for f in flags))
    changes = 0
    for _, rows in policy.groupby(policy["guest"].astype(str), sort=False, observed=True):
        values = pd.to_numeric(rows.sort_index(kind="stable")["value"], errors="coerce").dropna().to_numpy()
        changes += int(np.count_nonzero(np.diff(values)))
    return float(changes)


def _changed(detail: object) -> bool | None:
    try:
        found = json.loads(str(detail))
    except ValueError:
        return None
    value = found.get("changed") if isinstance(found, dict) else None
    return value if isinstance(value, bool) else None


def score_table(scores: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Runs side by side: one row per run (``live`` and each policy, as given), one column per
    measure; counts as integers where every run has them."""
    table = pd.DataFrame({name: dict(values) for name, values in scores.items()}).T
    table = table.reindex(columns=[m for m in MEASURES if m in table.columns]
                          + [c for c in table.columns if c not in MEASURES])
    table.index.name = "run"
    for name in ("oom_kills", "alloc_stalls", "target_changes", "policy_errors"):
        if name in table.columns:
            table[name] = table[name].astype("Int64") if table[name].notna().all() else table[name]
    return table
