"""A recorded policy run's decisions: made again as the live loop made them, and compared.

:func:`decide` is one decision as :class:`~balloonlab.record.policy_loop.PolicyLoop` makes it
(policy call, :func:`~balloonlab.model.policy.enforce_limits`, the same events), without a
guest. :func:`open_loop` feeds a policy the recorded frames themselves at each live decision time
(with the targets that were in force live): a deterministic policy must repeat the live decisions
exactly. :func:`compare_decisions` holds the live decisions against the open-loop ones and against
a closed-loop replay's (:func:`balloonlab.experiments.replay.replay`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd

from balloonlab.analysis.measures import conform
from balloonlab.model.policy import (DEFAULT_MAX_STEP_FRACTION, GuestLimits, Policy, PolicyView, decision_details,
                                     enforce_limits, policy_name, split_decision)
from balloonlab.model.schema import EVENT_COLUMNS

#: The guest of events about the policy as a whole (PolicyLoop's POLICY_GUEST).
POLICY_GUEST = "policy"
#: An event row: (time, guest, kind, value, detail).
EventRow = tuple[pd.Timestamp, str, str, int | None, str]


class RecordedRun(Protocol):
    """What replay reads of a run (:class:`balloonlab.record.store.Run`; its ``host`` frame is
    read with ``getattr``: runs recorded before it have none)."""

    samples: pd.DataFrame
    events: pd.DataFrame
    metadata: dict[str, Any]


def ns(index: pd.Index) -> np.ndarray:
    """UTC times as int64 epoch ns, whatever the index's unit."""
    out: np.ndarray = pd.DatetimeIndex(index).as_unit("ns").asi8
    return out


def policy_meta(run: RecordedRun) -> dict[str, Any]:
    """``run.metadata["policy"]`` ({} for a run without a policy)."""
    meta = run.metadata.get("policy") if isinstance(run.metadata, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


def recorded_budget(run: RecordedRun) -> int | None:
    """The run's host budget: its policy's, else the host frame's last ``budget`` (a run recorded
    without a policy, e.g. ``Overcommit(None)``'s baseline, keeps it there), else None."""
    budget = policy_meta(run).get("budget")
    if budget is not None:
        return int(budget)
    host = getattr(run, "host", None)
    if isinstance(host, pd.DataFrame) and "budget" in host.columns and host["budget"].notna().any():
        return int(host["budget"].dropna().iloc[-1])
    return None


def recorded_limits(run: RecordedRun) -> dict[str, GuestLimits]:
    """Each guest's limits as recorded (target: ``initial_target``); a run without a policy gets
    the default limits of its guests, the memory being the largest ``actual``/``target`` seen."""
    limits: dict[str, GuestLimits] = {}
    for name, lim in (policy_meta(run).get("limits") or {}).items():
        initial = lim.get("initial_target")
        limits[str(name)] = GuestLimits(str(name), int(lim["max_bytes"]), lim.get("min_guarantee"),
                                        int(lim["floor_bytes"]), None if initial is None else int(initial))
    if limits or not len(run.samples):
        return limits
    for name, rows in run.samples.groupby(run.samples["guest"].astype(str), observed=True):
        rows = rows.sort_index(kind="stable")
        cols = [pd.to_numeric(rows[c], errors="coerce") for c in ("actual", "target") if c in rows.columns]
        values = pd.concat(cols).dropna() if cols else pd.Series(dtype=float)
        if not len(values):
            continue
        first = next((int(s.dropna().iloc[0]) for s in reversed(cols) if s.notna().any()), None)
        limits[str(name)] = GuestLimits.for_guest(str(name), int(values.max()), target=first)
    return limits


def live_decisions(events: pd.DataFrame) -> pd.DataFrame:
    """The ``policy`` events: index time, ``guest``, ``value`` (the target set) and ``proposed``."""
    events = conform(events, "events")
    rows = events[(events["kind"].astype(str) == "policy").to_numpy()].sort_index(kind="stable")

    def proposed(detail: object) -> float:
        try:
            value = json.loads(str(detail)).get("proposed")
        except (ValueError, AttributeError):
            return math.nan
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

    return pd.DataFrame({"guest": rows["guest"].astype(str), "value": pd.to_numeric(rows["value"]).astype("Int64"),
                         "proposed": [proposed(d) for d in rows["detail"]]}, index=rows.index)


def decision_times(events: pd.DataFrame, interval_s: float) -> tuple[pd.DatetimeIndex, np.ndarray]:
    """The live decision times: the ``policy_tick`` events (the live loop records one per call);
    for runs without them, those of ``policy`` events, each gap of ``k`` intervals (k >= 2: ticks
    with no event, the policy named nobody or failed) filled with ``k - 1`` evenly spaced ticks.
    Returns (times, inferred: a bool per time)."""
    kinds = events["kind"].astype(str).to_numpy() if len(events) else np.array([], dtype=str)
    if (kinds == "policy_tick").any():
        ticks = np.unique(ns(events.index[kinds == "policy_tick"]))
        return pd.DatetimeIndex(pd.to_datetime(ticks, utc=True), name="time"), np.zeros(len(ticks), dtype=bool)
    live = np.unique(ns(live_decisions(events).index))
    times: list[int] = []
    inferred: list[bool] = []
    for k, t in enumerate(live):
        if k:
            gap = int(t - live[k - 1])
            steps = round(gap / (interval_s * 1e9))
            for j in range(1, steps):
                times.append(int(live[k - 1]) + gap * j // steps)
                inferred.append(True)
        times.append(int(t))
        inferred.append(False)
    return pd.DatetimeIndex(pd.to_datetime(times, utc=True), name="time"), np.array(inferred, dtype=bool)


def window(frame: pd.DataFrame, times_ns: np.ndarray, now_ns: int, window_s: float, upto: int | None = None
           ) -> tuple[int, int]:
    """Row positions ``[lo, hi)`` of a time-sorted frame in ``now - window_s <= time <= now``."""
    hi = int(np.searchsorted(times_ns, now_ns, side="right")) if upto is None else upto
    lo = int(np.searchsorted(times_ns, now_ns - round(window_s * 1e9), side="left"))
    return min(lo, hi), hi


def decide(policy: Policy, view: PolicyView, limits: dict[str, GuestLimits], name: str, *,
           max_step_fraction: float = DEFAULT_MAX_STEP_FRACTION) -> tuple[list[EventRow], dict[str, int]]:
    """One decision as the live loop makes it: its event rows, and the targets that moved
    (``limits`` is updated with them)."""
    now = view.now
    rows: list[EventRow] = []

    def error(guest: str, message: str) -> tuple[list[EventRow], dict[str, int]]:
        rows.append((now, guest, "policy_error", None, f"{name}: {message}"))
        return rows, {}

    try:
        result = policy(view)
    except Exception as exc:  # a policy's bug is an event, as live
        return error(POLICY_GUEST, f"the policy raised {type(exc).__name__}: {exc}; the targets stay as they are")
    try:
        proposed, why = split_decision(result)
    except TypeError as exc:
        return error(POLICY_GUEST, str(exc))
    enforced = enforce_limits(proposed, limits, max_step_fraction=max_step_fraction)
    for guest, reason in enforced.refused.items():
        error(guest if guest in limits else POLICY_GUEST, f"refused: {reason}; kept the last safe target")
    moved: dict[str, int] = {}
    for guest, detail in decision_details(view, proposed, why, enforced, name).items():
        target = enforced.targets[guest]
        if detail["changed"]:
            limits[guest] = replace(limits[guest], target=target)
            moved[guest] = target
        rows.append((now, guest, "policy", target, json.dumps(detail, default=str)))
        if detail["changed"]:
            rows.append((now, guest, "target", target, ""))
    return rows, moved


def guest_hosts(samples: pd.DataFrame) -> dict[str, str]:
    """Each guest's host in a samples frame (empty for a run recorded before frames had hosts)."""
    if "host" not in samples.columns or samples.empty:
        return {}
    pairs = samples[["guest", "host"]].drop_duplicates()
    return {str(g): str(h) for g, h in zip(pairs["guest"], pairs["host"], strict=True) if not pd.isna(h)}


def events_frame(rows: list[EventRow], hosts: dict[str, str] | None = None) -> pd.DataFrame:
    """Event rows as an events frame (the schema's columns and dtypes, index ``time``); each
    guest's ``host`` from ``hosts`` (:func:`guest_hosts` of the run), NA for the rest."""
    index = pd.DatetimeIndex([r[0] for r in rows], name="time").as_unit("ns") if rows else \
        pd.DatetimeIndex([], dtype="datetime64[ns, UTC]", name="time")
    hosts = hosts or {}
    frame = pd.DataFrame({"guest": pd.Categorical([r[1] for r in rows]),
                          "host": pd.Categorical([hosts.get(r[1]) for r in rows]),
                          "kind": pd.Categorical([r[2] for r in rows]),
                          "value": pd.array([r[3] for r in rows], dtype="Int64"),
                          "duration_s": pd.array([None] * len(rows), dtype="Float64"),
                          "detail": pd.array([r[4] for r in rows], dtype="string")}, index=index)
    return frame[list(EVENT_COLUMNS)]


def open_loop(run: RecordedRun, policy: Policy, *, name: str | None = None, host: pd.DataFrame | None = None,
              interval_s: float | None = None, window_s: float | None = None,
              max_step_fraction: float | None = None) -> pd.DataFrame:
    """``policy`` fed the recorded frames at each live decision time (:func:`decision_times`),
    with the targets in force live then (the last live ``policy`` value of each guest before, else
    ``initial_target``); its decisions as an events frame. Pass a fresh policy: it keeps state."""
    meta = policy_meta(run)
    interval = float(interval_s or meta.get("interval_s") or 2.0)
    win = float(window_s or meta.get("window_s") or 30.0)
    step = float(max_step_fraction or meta.get("max_step_fraction") or DEFAULT_MAX_STEP_FRACTION)
    samples = run.samples.sort_index(kind="stable")
    host = getattr(run, "host", None) if host is None else host
    host = host.sort_index(kind="stable") if isinstance(host, pd.DataFrame) and len(host) else pd.DataFrame()
    s_ns, h_ns = ns(samples.index), ns(host.index) if len(host) else np.array([], dtype=np.int64)
    targets = live_targets(run, kind="policy")
    initial = recorded_limits(run)
    rows: list[EventRow] = []
    for now in decision_times(run.events, interval)[0]:
        t = int(now.value) - 1  # the targets in force: set by decisions before this one
        limits = {guest: replace(lim, target=last_before(*targets[guest], t, lim.target)) if guest in targets else lim
                  for guest, lim in initial.items()}
        lo, hi = window(samples, s_ns, t, win)
        hlo, hhi = window(host, h_ns, t, win) if len(host) else (0, 0)
        view = PolicyView(now, host.iloc[hlo:hhi], samples.iloc[lo:hi], dict(limits), recorded_budget(run))
        rows += decide(policy, view, limits, name or policy_name(policy), max_step_fraction=step)[0]
    return events_frame(rows, guest_hosts(samples))


@dataclass(frozen=True)
class DecisionComparison:
    """:func:`compare_decisions`' answer.

    :param table: one row per live decision and guest: ``live``, ``open_loop``, ``closed_loop``
        (targets set, bytes; NA where that replay named no target then) and their differences.
    :param summary: per replay (``open_loop``, ``closed_loop``): ``decisions`` (live ones),
        ``agreement`` (share within the tolerance; a missing one disagrees),
        ``first_divergence`` (time), ``median_abs_diff_bytes`` and ``max_abs_diff_bytes`` (over
        the decisions both made), ``extra`` (replayed decisions the live run did not make).
    """

    table: pd.DataFrame
    summary: pd.DataFrame


def compare_decisions(run: RecordedRun, replayed: Any, *, tolerance_bytes: int = 0) -> DecisionComparison:
    """The live policy's decisions against its open-loop and closed-loop replays.

    :param replayed: a :class:`~balloonlab.experiments.replay.ReplayResult` holding the live
        policy (its ``policies[live_name]``: ``events`` closed-loop, ``open_loop``).
    :raises ValueError: the replay does not hold the run's live policy.
    """
    name = replayed.live_name
    if name is None or name not in replayed.policies:
        raise ValueError(f"the replay has no run of the live policy {name!r}: replay it ({sorted(replayed.policies)})")
    mine = replayed.policies[name]
    live = live_decisions(run.events)
    table = pd.DataFrame({"time": live.index, "guest": live["guest"].to_numpy(), "live": live["value"].to_numpy()})
    summary = {}
    for label, events in (("open_loop", mine.open_loop), ("closed_loop", mine.events)):
        other = live_decisions(events if events is not None else pd.DataFrame())
        other = pd.DataFrame({"time": other.index, "guest": other["guest"].to_numpy(),
                              label: other["value"].to_numpy()})
        table = table.merge(other.drop_duplicates(["time", "guest"], keep="last"), on=["time", "guest"], how="left")
        diff = (table[label].astype("Float64") - table["live"].astype("Float64")).abs()
        table[f"{label}_diff"] = diff
        agree = (diff <= tolerance_bytes).fillna(False).to_numpy(dtype=bool)
        both = diff.dropna().to_numpy(dtype=float)
        keys = set(zip(table["time"], table["guest"], strict=True))
        summary[label] = {"decisions": len(table), "agreement": float(agree.mean()) if len(agree) else math.nan,
                          "first_divergence": table["time"][~agree].min() if (~agree).any() else pd.NaT,
                          "median_abs_diff_bytes": float(np.median(both)) if len(both) else math.nan,
                          "max_abs_diff_bytes": float(both.max()) if len(both) else math.nan,
                          "extra": int(sum((t, g) not in keys for t, g in zip(other["time"], other["guest"],
                                                                              strict=True)))}
    return DecisionComparison(table.set_index("time"), pd.DataFrame(summary).T)


def last_before(times_ns: np.ndarray, values: list[int | None], t: int, default: int | None) -> int | None:
    """The value at the last time ``<= t``, else ``default``."""
    k = int(np.searchsorted(times_ns, t, side="right"))
    return values[k - 1] if k else default


def live_targets(run: RecordedRun, kind: str | None = None) -> dict[str, tuple[np.ndarray, list[int | None]]]:
    """Per guest, the targets the recording set, as (times ns, values): its ``policy`` events
    (``kind`` None: a run without them, its ``target`` events)."""
    events = conform(run.events, "events")
    kinds = events["kind"].astype(str)
    kind = kind or ("policy" if (kinds == "policy").any() else "target")
    rows = events[(kinds == kind).to_numpy()].sort_index(kind="stable")
    out: dict[str, tuple[np.ndarray, list[int | None]]] = {}
    for guest, part in rows.groupby(rows["guest"].astype(str), observed=True):
        values = [None if pd.isna(v) else int(v) for v in part["value"]]
        out[str(guest)] = (ns(part.index), values)
    return out
