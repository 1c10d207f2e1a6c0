"""Replaying balloon policies on a recorded run, without its guests (issue 14).

:func:`replay` runs each policy (the very callable that runs live, or a spec for
``balloonlab.policies.load_policy``) *closed-loop* on a model of the run: the recorded rows keep
their times, each balloon follows the policy's enforced targets, and the guests and the host
follow the trace-driven model of :mod:`balloonlab.analysis.demand`; the policy reads frames with
the live columns and dtypes through the same :class:`~balloonlab.model.policy.PolicyView`, and
its answers go through :func:`~balloonlab.model.policy.enforce_limits` and become the live loop's
events (:mod:`balloonlab.experiments.policy_decisions`: view window, limits, decision times).

The balloon: while the replay's target is the recorded one and its balloon was where the
recorded one was, it follows the recorded ``actual`` (the replay of the live policy *is* the
recorded run until a decision differs); otherwise it moves towards its target at ``rate_bytes_s``
(default :func:`~balloonlab.analysis.demand.balloon_rate` of the recording, ``math.inf``: at once
within the step), and follows the recording again once both targets agree and both balloons are
within :data:`SYNC_TOLERANCE_BYTES`. Not modelled (copied as recorded): host PSI, vmstat and KSM,
the guest stats other than :data:`MODELLED`, alloc stalls; live decisions that timed out or whose
``set_target`` failed are made and applied here.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd

from balloonlab.analysis.demand import (DEFAULT_HEADROOM_BYTES, GuestTrace, balloon_rate, guest_state, guest_traces,
                                        host_state, ram_shift, resident_step, sort_samples, swap_step)
from balloonlab.analysis.policy_score import score, score_table
from balloonlab.experiments.policy_decisions import (DecisionComparison, RecordedRun, compare_decisions, decide,
                                                     decision_times, events_frame, guest_hosts, last_before,
                                                     live_targets, ns, open_loop, policy_meta, recorded_budget,
                                                     recorded_limits, window)
from balloonlab.model.policy import DEFAULT_MAX_STEP_FRACTION, GuestLimits, Policy, PolicyView, policy_name

#: The live loop's defaults, for runs recorded without a policy.
DEFAULT_INTERVAL_S, DEFAULT_WINDOW_S = 2.0, 30.0
#: A desynchronised balloon follows the recording again within this of the recorded ``actual``.
SYNC_TOLERANCE_BYTES = 1 << 20
#: Sample columns the model rewrites (the others are copied as recorded).
MODELLED = ("actual", "target", "total_memory", "available_memory", "free_memory", "disk_caches", "swap_in",
            "swap_out", "oom_kills", "host_rss", "host_guest_ram", "rss")


@dataclass
class PolicyReplay:
    """One policy's replay: the simulated ``samples`` and ``host`` frames, its decisions as
    ``events``, and ``open_loop`` (the live policy only: its decisions on the recorded frames)."""

    name: str
    samples: pd.DataFrame
    host: pd.DataFrame
    events: pd.DataFrame
    open_loop: pd.DataFrame | None = None


@dataclass
class ReplayResult:
    """:func:`replay`'s answer: the settings used, the recorded (``live_*``) frames and each
    policy's :class:`PolicyReplay` by name."""

    live_name: str | None
    budget: int | None
    interval_s: float
    window_s: float
    max_step_fraction: float
    rate_bytes_s: float
    limits: dict[str, GuestLimits]
    live_samples: pd.DataFrame
    live_host: pd.DataFrame
    live_events: pd.DataFrame
    policies: dict[str, PolicyReplay] = field(default_factory=dict)

    def runs(self) -> dict[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]:
        """(samples, host, events) by run: ``live`` first, then each policy."""
        out = {"live": (self.live_samples, self.live_host, self.live_events)}
        out.update({name: (p.samples, p.host, p.events) for name, p in self.policies.items()})
        return out

    def scores(self, **kwargs: Any) -> dict[str, dict[str, float]]:
        """:func:`~balloonlab.analysis.policy_score.score` of every run (``kwargs`` passed on)."""
        return {name: score(*frames, budget=self.budget, **kwargs) for name, frames in self.runs().items()}

    def table(self, **kwargs: Any) -> pd.DataFrame:
        """The scores side by side (:func:`~balloonlab.analysis.policy_score.score_table`)."""
        return score_table(self.scores(**kwargs))


def resolve_policy(policy: Policy | str) -> Policy:
    """A policy object, or ``balloonlab.policies.load_policy(spec)`` for a string."""
    if isinstance(policy, str):
        from balloonlab.policies import load_policy  # only when a spec is given

        return load_policy(policy)
    return policy


def _fresh(policy: Policy | str) -> Policy:
    """A policy in its initial state: a spec is loaded again, an object deep-copied (a policy
    keeps state between calls, and each replay must start from the same one)."""
    return resolve_policy(policy) if isinstance(policy, str) else copy.deepcopy(policy)


def _typed(values: np.ndarray, like: pd.Series | None) -> Any:
    """Model values (floats, NaN = NA) in the recorded column's dtype (nullable ints by default)."""
    if like is not None and pd.api.types.is_float_dtype(like.dtype):
        return pd.array(values, dtype=like.dtype)
    return pd.array(values, dtype="Float64").round().astype("Int64")


def _with(base: pd.DataFrame, arrays: Mapping[str, np.ndarray], lo: int, hi: int) -> pd.DataFrame:
    """Rows ``[lo, hi)`` of ``base`` with the modelled columns from ``arrays``."""
    part = base.iloc[lo:hi].copy()
    for name, values in arrays.items():
        part[name] = _typed(values[lo:hi], base[name] if name in base.columns else None)
    return part


def _host_frame(run: RecordedRun, samples: pd.DataFrame, traces: Mapping[str, GuestTrace]) -> pd.DataFrame:
    """The recorded host frame; a run without one gets a row a second with the guests' footprints."""
    host = getattr(run, "host", None)
    if isinstance(host, pd.DataFrame) and len(host):
        return host.sort_index(kind="stable")
    if not len(samples):
        return pd.DataFrame(index=pd.DatetimeIndex([], dtype="datetime64[ns, UTC]", name="time"))
    grid = pd.date_range(samples.index.min(), samples.index.max(), freq="1s", name="time")
    frame = pd.DataFrame(index=grid)
    columns: dict[str, list[str]] = {"rss": [], "guest_ram": [], "footprint": []}
    for name, trace in traces.items():
        k = np.searchsorted(ns(trace.times), ns(grid), side="right") - 1
        part = samples.iloc[trace.rows]
        for kind, values in (("rss", _floats(part, "host_rss")), ("guest_ram", _floats(part, "host_guest_ram")),
                             ("footprint", trace.footprint)):
            frame[f"{kind}.{name}"] = np.where(k >= 0, values[np.maximum(k, 0)], np.nan)
            columns[kind].append(f"{kind}.{name}")
    frame["guests"] = frame[columns["footprint"]].notna().sum(axis=1)
    frame["guests_rss"] = frame[columns["rss"]].sum(axis=1, min_count=1)
    frame["guests_ram"] = frame[columns["footprint"]].sum(axis=1, min_count=1)  # what a budget counts
    frame = frame.drop(columns=columns["footprint"])
    return frame.astype({c: "Float64" for c in frame.columns}).round().astype("Int64")


def _floats(frame: pd.DataFrame, name: str) -> np.ndarray:
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    out: np.ndarray = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return out


@dataclass
class _Balloon:
    """The replay's balloon of one guest (see the module docstring)."""

    value: float
    target: int | None
    time_ns: int  # ns, not float epoch seconds: those are 0.2 us coarse, 25 B at 100 MiB/s
    synced: bool = True

    def advance(self, t_ns: int, recorded: float, recorded_target: int | None, rate: float, follow: bool) -> float:
        budget = rate * max(0, t_ns - self.time_ns) / 1e9 if math.isfinite(rate) else math.inf
        self.time_ns = t_ns
        moved = self.value
        if self.target is not None and not math.isnan(moved):
            moved = min(self.target, moved + budget) if self.target > moved else max(self.target, moved - budget)
        if math.isnan(moved):
            moved = recorded
        moved = float(round(moved))  # whole bytes, as the frames hold them (a balloon moves in pages)
        if follow and self.target == recorded_target and not math.isnan(recorded) and (
                self.synced or abs(recorded - moved) <= SYNC_TOLERANCE_BYTES):
            self.value, self.synced = recorded, True
        else:
            self.value, self.synced = moved, False
        return self.value


def _simulate(policy: Policy, name: str, run: RecordedRun, samples: pd.DataFrame, host: pd.DataFrame,
              traces: Mapping[str, GuestTrace], times: pd.DatetimeIndex, r: ReplayResult,
              follow: bool) -> PolicyReplay:
    """One closed-loop replay (module docstring): samples, host rows and decisions in time order."""
    limits = dict(r.limits)
    recorded = live_targets(run)
    s_ns, h_ns = ns(samples.index), ns(host.index)
    # Only the columns the recording has (and the balloon's): a policy sees the live frame's shape.
    out = {c: _floats(samples, c) for c in MODELLED if c in samples.columns or c in ("actual", "target")}
    h_cols = ["guests_rss", "guests_ram", "budget", "budget_available", "mem_available", "mem_free", "cached",
              "buffers", *(f"rss.{g}" for g in traces), *(f"guest_ram.{g}" for g in traces)]
    h_rec = {c: _floats(host, c) for c in h_cols}
    h_out = {c: v.copy() for c, v in h_rec.items()}
    guest_of = np.empty(len(samples), dtype=object)
    index_of = np.zeros(len(samples), dtype=np.int64)
    for g, trace in traces.items():
        guest_of[trace.rows], index_of[trace.rows] = g, np.arange(len(trace.rows))
    balloons = {g: _Balloon(float(t.actual[0]), limits[g].target, int(s_ns[t.rows[0]]))
                for g, t in traces.items() if g in limits}
    last: dict[str, int] = {}
    swap = {g: [0.0, 0.0, 0.0, 0, False] for g in traces}  # offset in, offset out, extra, OOMs, in OOM
    shift = dict.fromkeys(traces, 0.0)
    resident: dict[str, float] = {}  # R' after each guest's last sample (analysis.demand)

    def recorded_target(g: str, t: int) -> int | None:
        # In force at t: set before t (a decision at t sets its targets after its rows at t were read).
        return last_before(*recorded[g], t - 1, r.limits[g].target) if g in recorded else r.limits[g].target

    def allot(g: str, t: int, i: int) -> float:
        trace = traces[g]
        if g not in balloons:  # not a guest of the policy: as recorded
            return float(trace.actual[i])
        return balloons[g].advance(t, float(trace.actual[i]), recorded_target(g, t), r.rate_bytes_s, follow)

    def sample(p: int, t: int) -> None:
        if guest_of[p] is None:  # a row without a guest: nothing to model
            return
        g, i = str(guest_of[p]), int(index_of[p])
        trace, m = traces[g], allot(g, t, i)
        if math.isnan(m):
            return
        st = guest_state(trace, i, m, resident.get(g))
        resident[g] = st.resident_ram
        acc, j = swap[g], last.get(g)
        if j is not None:
            new_in, new_out = swap_step(trace.swap_in[i] - trace.swap_in[j], trace.swap_out[i] - trace.swap_out[j],
                                        st.extra_swap - acc[2])
            acc[0] += new_in - _rise(trace.swap_in[i] - trace.swap_in[j])
            acc[1] += new_out - _rise(trace.swap_out[i] - trace.swap_out[j])
        acc[2] = st.extra_swap
        acc[3] += int(st.unmet > 0 and not acc[4])  # one OOM per episode: then the trace is no longer the guest's
        acc[4] = st.unmet > 0
        shift[g], last[g] = st.shift, i
        # In step with the recording: its target column as recorded (the sampler's view of it).
        synced = g not in balloons or balloons[g].synced
        target = out["target"][p] if synced else float(balloons[g].target or math.nan)
        oom = trace.oom_kills[i] if acc[3] == 0 else np.nan_to_num(trace.oom_kills[i]) + acc[3]
        for col, value in (("actual", m), ("target", target), ("total_memory", st.total),
                           ("available_memory", st.available if not math.isnan(trace.available[i]) else math.nan),
                           ("free_memory", st.free), ("disk_caches", st.caches),
                           ("swap_in", trace.swap_in[i] + acc[0]), ("swap_out", trace.swap_out[i] + acc[1]),
                           ("oom_kills", oom)):
            if col in out:
                out[col][p] = value
        for col in ("host_rss", "host_guest_ram", "rss"):
            if col in out:
                out[col][p] += shift[g]

    def host_row(q: int, t: int) -> None:
        for g, i in last.items():  # the host reads RSS now: each balloon where it is now
            trace, m = traces[g], allot(g, t, i)
            if not math.isnan(m) and g in resident:  # a balloon inflated since takes its pages out
                resident[g] = resident_step(resident[g], m, math.nan)
                shift[g] = ram_shift(trace, i, m, resident[g])
        row = {c: float(v[q]) for c, v in h_rec.items()}
        for col, value in host_state(row, shift, r.budget).items():
            h_out.setdefault(col, np.full(len(host), np.nan))[q] = value

    rows: list[Any] = []
    kinds = np.concatenate([np.zeros(len(s_ns)), np.ones(len(h_ns)), np.full(len(times), 2)])
    at = np.concatenate([s_ns, h_ns, ns(times)])
    which = np.concatenate([np.arange(len(s_ns)), np.arange(len(h_ns)), np.arange(len(times))])
    done_s = done_h = 0
    for k in np.lexsort((kinds, at)):
        t, idx = int(at[k]), int(which[k])
        if kinds[k] == 0:
            sample(idx, t)
            done_s = idx + 1
        elif kinds[k] == 1:
            host_row(idx, t)
            done_h = idx + 1
        else:
            for g in balloons:  # the balloons reach the decision under the old targets
                if g in last:
                    allot(g, t, last[g])
            lo, hi = window(samples, s_ns, t, r.window_s, done_s)
            hlo, hhi = window(host, h_ns, t, r.window_s, done_h)
            view = PolicyView(times[idx], _with(host, h_out, hlo, hhi), _with(samples, out, lo, hi), dict(limits),
                              r.budget)
            new_rows, moved = decide(policy, view, limits, name, max_step_fraction=r.max_step_fraction)
            rows += new_rows
            for g, target in moved.items():
                if g in balloons:
                    balloons[g].target = target
    if "oom_kills" in out:  # a guest whose kernel has no OOM counter: the model's count, from 0
        for g, acc in swap.items():
            if acc[3]:
                column = out["oom_kills"][traces[g].rows]
                out["oom_kills"][traces[g].rows] = np.where(np.isnan(column), 0.0, column)
    return PolicyReplay(name, _with(samples, out, 0, len(samples)), _with(host, h_out, 0, len(host)),
                        events_frame(rows, guest_hosts(samples)))


def _rise(delta: float) -> float:
    return 0.0 if math.isnan(delta) else max(0.0, delta)


def replay(run: RecordedRun, policies: Policy | str | Sequence[Policy | str] | Mapping[str, Policy | str], *,
           budget: int | Literal["none"] | None = None, interval_s: float | None = None,
           window_s: float | None = None, max_step_fraction: float | None = None,
           rate_bytes_s: float | None = None, follow_recorded: bool = True,
           headroom_bytes: int = DEFAULT_HEADROOM_BYTES, swap_bytes: Mapping[str, float] | None = None) -> ReplayResult:
    """Replay each policy closed-loop on ``run`` (module docstring); the live policy (same name as
    ``run.metadata["policy"]["name"]``) also open-loop.

    :param policies: one policy or spec, several, or ``{name: policy}``.
    :param budget: the host budget in bytes; None: the recorded one (the policy's, else the host
        frame's); ``"none"``: no budget.
    :param interval_s: and ``window_s``, ``max_step_fraction``: default the recorded ones (a run
        without a policy: the live loop's defaults).
    :param rate_bytes_s: how fast a balloon moves (default: the recording's; ``math.inf``: at once).
    :param follow_recorded: a balloon in step with the recording follows its recorded path.
    :param headroom_bytes: and ``swap_bytes``: the demand model's (:func:`~balloonlab.analysis.demand.guest_traces`).
    """
    meta = policy_meta(run)
    interval = float(interval_s or meta.get("interval_s") or DEFAULT_INTERVAL_S)
    if not len(run.samples) or "guest" not in run.samples.columns:
        raise ValueError("the run has no samples: there is nothing to replay a policy on")
    samples = sort_samples(run.samples)
    traces = guest_traces(samples, headroom_bytes=headroom_bytes, swap_bytes=swap_bytes)
    host = _host_frame(run, samples, traces)
    result = ReplayResult(
        meta.get("name"), None if budget == "none" else (recorded_budget(run) if budget is None else int(budget)),
        interval, float(window_s or meta.get("window_s") or DEFAULT_WINDOW_S),
        float(max_step_fraction or meta.get("max_step_fraction") or DEFAULT_MAX_STEP_FRACTION),
        float(rate_bytes_s if rate_bytes_s is not None else balloon_rate(samples)),
        recorded_limits(run), run.samples, host, run.events)
    times, _ = decision_times(run.events, interval)
    if not len(times) or interval != float(meta.get("interval_s") or -1):
        first = samples.index.min() if len(samples) else None
        times = pd.DatetimeIndex([] if first is None else pd.date_range(
            first + pd.Timedelta(seconds=interval), samples.index.max(), freq=pd.Timedelta(seconds=interval)),
            name="time")
    named = dict(policies) if isinstance(policies, Mapping) else None
    given = list(named.values()) if named is not None else (
        [policies] if isinstance(policies, str) or callable(policies) else list(policies))
    for k, policy in enumerate(given):
        name = list(named)[k] if named is not None else policy_name(resolve_policy(policy))
        name = name if name not in result.policies and name != "live" else f"{name}#{k + 1}"
        pristine = _fresh(policy)
        replayed = _simulate(_fresh(pristine), name, run, samples, host, traces, times, result, follow_recorded)
        if name == result.live_name:
            replayed.open_loop = open_loop(run, _fresh(pristine), name=name, host=host, interval_s=interval,
                                           window_s=result.window_s, max_step_fraction=result.max_step_fraction)
        result.policies[name] = replayed
    return result


__all__ = ["MODELLED", "DecisionComparison", "PolicyReplay", "ReplayResult", "compare_decisions", "open_loop",
           "replay", "resolve_policy"]
