"""Replaying policies on a recorded run: the demand model, open/closed-loop decisions, scores, plot.

The recorded run is synthesized here with the sampler's own buffers (its columns and dtypes):
three 1 GiB guests for three minutes at 1 s, their demand out of phase, and a stateful "live"
policy whose decisions the generator makes with its own view and enforce_limits, as PolicyLoop
makes them. Pure: no QEMU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from balloonlab.analysis.demand import guest_state, guest_traces, sort_samples  # noqa: E402
from balloonlab.analysis.policy_plot import plot_replay  # noqa: E402
from balloonlab.analysis.policy_score import score, score_table  # noqa: E402
from balloonlab.experiments.policy_decisions import decision_times, live_decisions  # noqa: E402
from balloonlab.experiments.replay import MODELLED, compare_decisions, replay  # noqa: E402
from balloonlab.model.policy import Decision, GuestLimits, PolicyView, enforce_limits  # noqa: E402
from balloonlab.record.buffer import event_buffer, host_buffer, sample_buffer  # noqa: E402
from balloonlab.record.store import Run  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
T0 = pd.Timestamp("2024-05-01 12:00:00", tz="UTC")
GUESTS = ("a", "b", "c")
RESERVE, HEAD, OVERHEAD, UNTOUCHED = 40 * MiB, 32 * MiB, 30 * MiB, 50 * MiB


def _ns(seconds: float) -> int:
    return T0.value + round(seconds * 1e9)


def demand(guest: str, t: float) -> int:
    """Out of phase: 200-500 MiB over a 90 s period, a third of a period apart."""
    k = GUESTS.index(guest)
    return 200 * MiB + int(300 * MiB * (1 + math.sin(2 * math.pi * t / 90 + 2 * math.pi * k / 3)) / 2)


class Ewma:
    """A stateful live policy: target = smoothed demand x 1.3 + reserve; every 4th call names nobody."""

    name = "ewma"

    def __init__(self) -> None:
        self.smooth: dict[str, float] = {}
        self.calls = 0

    def __call__(self, view: PolicyView) -> Decision:
        self.calls += 1
        if self.calls % 4 == 0:
            return Decision({})
        targets, why = {}, {}
        for g in view.names:
            last = view.guest_last(g)
            if last is None:
                continue
            used = (int(last["total_memory"]) - int(last["available_memory"])
                    + int(last["swap_out"]) - int(last["swap_in"]))
            self.smooth[g] = used if g not in self.smooth else 0.5 * used + 0.5 * self.smooth[g]
            targets[g] = int(self.smooth[g] * 1.3) + RESERVE
            why[g] = {"used": used, "rows": len(view.guest_rows(g))}
        return Decision(targets, why)


class Static:
    """Every guest at ``fraction`` of its memory."""

    def __init__(self, fraction: float) -> None:
        self.fraction, self.name = fraction, f"static{fraction:g}"

    def __call__(self, view: PolicyView) -> dict[str, int]:
        return {g: int(self.fraction * lim.max_bytes) for g, lim in view.limits.items()}


def record(policy, *, seconds: int = 180, interval: int = 5, window: float = 30.0, budget: int | None = None) -> Run:
    """A live run of ``policy``: samples at s + 0.1 k, host rows at s + 0.5, decisions at s + 0.7."""
    sb, hb, eb = sample_buffer(), host_buffer(), event_buffer()
    limits = {g: GuestLimits.for_guest(g, GiB, target=GiB) for g in GUESTS}
    actual = dict.fromkeys(GUESTS, GiB)
    swap = {g: [0, 0, 0] for g in GUESTS}  # held, in, out
    rss: dict[str, int] = {}
    for s in range(seconds):
        for k, g in enumerate(GUESTS):
            t, total = s + 0.1 * k, actual[g] - RESERVE
            d = demand(g, t)
            held = max(0, d - (total - HEAD))
            swap[g][1 if held < swap[g][0] else 2] += abs(held - swap[g][0])
            swap[g][0] = held
            avail = total - (d - held)
            cache = min(100 * MiB, max(0, avail - 16 * MiB))
            ram = actual[g] - UNTOUCHED
            rss[g] = ram + OVERHEAD
            sb.append(_ns(t), {"guest": g, "actual": actual[g], "target": limits[g].target, "total_memory": total,
                               "available_memory": avail, "free_memory": avail - cache, "disk_caches": cache,
                               "swap_in": swap[g][1], "swap_out": swap[g][2], "oom_kills": 0, "alloc_stalls": 0,
                               "host_rss": rss[g], "host_guest_ram": ram, "rss": rss[g]})
        used, ram = sum(rss.values()), sum(rss.values()) - 3 * OVERHEAD
        hb.append(_ns(s + 0.5), {"host": "h", "mem_total": 8 * GiB, "mem_free": 6 * GiB - used,
                                 "mem_available": 6 * GiB - used + 400 * MiB, "cached": 400 * MiB,
                                 "buffers": 100 * MiB, "guests": 3, "guests_rss": used, "guests_ram": ram,
                                 **{f"rss.{g}": v for g, v in rss.items()},
                                 **{f"guest_ram.{g}": v - OVERHEAD for g, v in rss.items()},
                                 **({"budget": budget, "budget_available": budget - ram} if budget else {})})
        if s and s % interval == 0:  # a decision, as PolicyLoop.view/decide_once/_apply make it
            now = s + 0.7
            cut, t_now = T0 + pd.Timedelta(seconds=now - window), T0 + pd.Timedelta(seconds=now)
            frames = [f[(f.index >= cut) & (f.index <= t_now)] for f in (sb.frame(), hb.frame())]
            view = PolicyView(t_now, frames[1], frames[0], dict(limits), budget)
            decision = policy(view)
            proposed = decision.targets if isinstance(decision, Decision) else decision
            enforced = enforce_limits(proposed, limits)
            for g in sorted(set(proposed) & set(limits) - set(enforced.refused)):
                target = enforced.targets[g]
                detail = {"policy": policy.name, "proposed": proposed[g], "notes": enforced.notes.get(g, "")}
                eb.append(_ns(now), {"guest": g, "kind": "policy", "value": target, "detail": json.dumps(detail)})
                if g in enforced.changed:
                    eb.append(_ns(now + 0.01), {"guest": g, "kind": "target", "value": target, "detail": ""})
                    limits[g] = GuestLimits(g, GiB, None, limits[g].floor_bytes, target)
                    actual[g] = target  # the balloon gets there before the next sample
    meta = {"policy": {"name": policy.name, "interval_s": float(interval), "window_s": window, "budget": budget,
                       "max_step_fraction": 0.25,
                       "limits": {g: {"max_bytes": GiB, "min_guarantee": None, "floor_bytes": 256 * MiB,
                                      "initial_target": GiB} for g in GUESTS}}}
    run = Run(Path("synthetic"), sb.frame(), eb.frame(), meta)
    run.host = hb.frame()
    return run


@pytest.fixture(scope="module")
def live() -> Run:
    return record(Ewma())


def test_open_loop_replay_reproduces_the_live_decisions_exactly(live):
    result = replay(live, Ewma())
    decisions = live_decisions(live.events)
    assert len(decisions) == 3 * 27  # 35 calls, 8 of them named nobody
    times, inferred = decision_times(live.events, 5.0)
    assert len(times) == 35 and inferred.sum() == 8  # the silent ticks are found again
    assert times.tolist() == [pd.Timestamp(_ns(s + 0.7), tz="UTC") for s in range(5, 180, 5)]
    opened = live_decisions(result.policies["ewma"].open_loop)
    pd.testing.assert_frame_equal(opened, decisions)  # targets and what the policy proposed, at the same times
    comparison = compare_decisions(live, result)
    row = comparison.summary.loc["open_loop"]
    assert row["agreement"] == 1.0 and row["extra"] == 0 and pd.isna(row["first_divergence"])
    assert row["max_abs_diff_bytes"] == 0
    # Closed loop: the model follows the recording while the decisions agree, so they agree throughout.
    assert comparison.summary.loc["closed_loop", "agreement"] == 1.0


def test_a_stale_state_shows_in_the_comparison(live):
    """A policy that has already been called once (its call count is one ahead) names nobody a
    tick early, at 15.7 s, and its EWMA drifts from then on: the comparison says when and how much."""
    used = Ewma()
    used.calls = 1
    comparison = compare_decisions(live, replay(live, {"ewma": used}))
    row = comparison.summary.loc["open_loop"]
    assert row["agreement"] < 0.5 and row["first_divergence"] == pd.Timestamp(_ns(15.7), tz="UTC")
    assert row["extra"] > 0 and row["median_abs_diff_bytes"] >= 0


def test_the_closed_loop_replay_of_the_live_policy_is_the_recorded_run(live):
    replayed = replay(live, Ewma()).policies["ewma"]
    recorded = sort_samples(live.samples)
    for column in MODELLED:
        assert replayed.samples[column].equals(recorded[column]), column
    for column in ("guests_rss", "guests_ram", "mem_free", "mem_available", "cached", "rss.a", "guest_ram.c"):
        assert replayed.host[column].equals(live.host[column]), column


def test_the_model_is_exact_on_the_recorded_allotment(live):
    samples = sort_samples(live.samples)
    for g, trace in guest_traces(samples).items():
        rows = samples.iloc[trace.rows]
        for i in range(0, len(trace.rows), 7):
            st = guest_state(trace, i, trace.actual[i])
            assert (st.total, st.available, st.free, st.caches, st.extra_swap, st.unmet) == (
                rows["total_memory"].iloc[i], rows["available_memory"].iloc[i], rows["free_memory"].iloc[i],
                rows["disk_caches"].iloc[i], 0.0, 0.0), (g, i)
            assert st.shift == 0 and st.guest_ram == rows["host_guest_ram"].iloc[i] and st.reserve == RESERVE


def test_the_model_conserves_memory_and_demand(live):
    """Squeezed to their floors the guests swap; every byte is accounted for."""
    result = replay(live, Static(0.25), budget=2 * GiB, swap_bytes=dict.fromkeys(GUESTS, math.inf))
    replayed = result.policies["static0.25"]
    samples, recorded = replayed.samples, sort_samples(live.samples)
    traces = guest_traces(recorded, swap_bytes=dict.fromkeys(GUESTS, math.inf))
    for trace in traces.values():
        mine = samples.iloc[trace.rows]
        for i in range(len(trace.rows)):
            st = guest_state(trace, i, float(mine["actual"].iloc[i]))
            assert st.allotment == st.reserve + st.resident + st.available  # allotment = used + free
            assert st.demand == st.resident + st.swap_held + st.unmet
            assert mine["available_memory"].iloc[i] == round(st.available)
        held = (mine["swap_out"] - mine["swap_in"]).to_numpy(dtype=float)
        # The same demand as recorded: what is not in RAM is in swap.
        need = (mine["total_memory"] - mine["available_memory"]).to_numpy(dtype=float) + held
        np.testing.assert_array_equal(need, trace.demand)
    assert (samples["actual"] >= 256 * MiB).all() and samples["actual"].min() == 256 * MiB  # the floor
    assert (samples["swap_out"] > recorded["swap_out"]).any()
    host = replayed.host
    rss, ram = host[[f"rss.{g}" for g in GUESTS]].sum(axis=1), host[[f"guest_ram.{g}" for g in GUESTS]].sum(axis=1)
    assert (host["guests_rss"] == rss).all() and (host["guests_ram"] == ram).all()
    assert (host["guests_rss"] - host["guests_ram"] == 3 * OVERHEAD).all()  # the VMMs' own memory is kept
    assert (host["budget_available"] == 2 * GiB - host["guests_ram"]).all()
    scores = result.scores()
    assert scores["static0.25"]["swap_bytes"] > scores["live"]["swap_bytes"]
    assert scores["static0.25"]["pressure_s"] > scores["live"]["pressure_s"]


def test_without_swap_a_squeezed_guest_runs_out_of_memory(live):
    replayed = replay(live, Static(0.25), swap_bytes=dict.fromkeys(GUESTS, 0)).policies["static0.25"]
    ooms = replayed.samples.groupby("guest", observed=True)["oom_kills"].max()
    assert (ooms > 0).all()
    assert score(replayed.samples, replayed.host, replayed.events, budget=None)["oom_kills"] == ooms.sum()


def test_a_budget_violation_is_counted(live):
    """Guests left at their full memory give no page back (no balloon, no reporting): each one
    holds at least the RAM it held live (where the live policy's balloon took pages), more once the
    live guest was squeezed, and every second over the budget counts."""
    result = replay(live, Static(1.0), budget=2 * GiB)
    replayed = result.policies["static1"]
    host = replayed.host
    for g in GUESTS:
        ram, recorded = host[f"guest_ram.{g}"].astype(float), live.host[f"guest_ram.{g}"].astype(float)
        assert (ram >= recorded).all() and (ram > recorded).any()
    assert (host["guests_rss"] - host["guests_ram"] == 3 * OVERHEAD).all()
    scores = result.scores()["static1"]
    over = (host["guests_ram"] > 2 * GiB).to_numpy()
    seconds = (host.index - host.index[0]).total_seconds().to_numpy()
    held = np.diff(seconds, append=scores["span_s"] + seconds[0] - (host.index[0] - live.samples.index.min())
                   .total_seconds())
    assert over.any() and scores["budget_violation_s"] == pytest.approx(float(held[over].sum()), abs=1.0)
    assert scores["budget_worst_excess_bytes"] == float(host["guests_ram"].max()) - 2 * GiB
    assert scores["target_changes"] == 0

def test_bad_policy_output_goes_through_enforce_limits(live):
    def bad(view: PolicyView) -> dict[str, object]:
        return {"a": -5, "b": float("nan"), "zz": GiB, "c": 10}

    def raises(view: PolicyView) -> dict[str, int]:
        raise RuntimeError("boom")

    result = replay(live, {"bad": bad, "raises": raises, "list": lambda view: [1, 2]})
    events = result.policies["bad"].events
    errors = events[events["kind"] == "policy_error"]
    per = len(live_decisions(result.policies["bad"].events).index.unique())
    assert per == 35 and len(errors) == 3 * 35
    details = errors.groupby("guest", observed=True)["detail"].first()
    assert "negative" in details["a"] and "not finite" in details["b"] and "no guest 'zz'" in details["policy"]
    c = live_decisions(events).query("guest == 'c'")["value"].tolist()
    assert c[:4] == [768 * MiB, 512 * MiB, 256 * MiB, 256 * MiB]  # max_step 25 %, then the floor
    assert set(live_decisions(events)["guest"]) == {"c"}  # refused guests keep their targets, no decision
    for name, text in (("raises", "the policy raised RuntimeError: boom"), ("list", "not list")):
        ev = result.policies[name].events
        assert len(ev) == 35 and (ev["kind"] == "policy_error").all() and text in ev["detail"].iloc[0]
        assert (result.policies[name].samples["actual"] == GiB).all()  # no target ever set: where it started


def test_scores_by_hand():
    at = [T0 + pd.Timedelta(seconds=s) for s in (0, 1, 2)]
    samples = pd.DataFrame({
        "guest": pd.Categorical(["a", "b"] * 3),
        "total_memory": pd.array([1000 * MiB, 200 * MiB] * 3, dtype="Int64"),
        "available_memory": pd.array([200 * MiB, 10 * MiB, 50 * MiB, 40 * MiB, 50 * MiB, 10 * MiB], dtype="Int64"),
        "swap_in": pd.array([0, None, 10 * MiB, None, 10 * MiB, None], dtype="Int64"),
        "swap_out": pd.array([0, None, 20 * MiB, None, 50 * MiB, None], dtype="Int64"),
        "oom_kills": pd.array([0, None, 0, None, 1, None], dtype="Int64"),
        "actual": pd.array([GiB] * 6, dtype="Int64")},
        index=pd.DatetimeIndex([t for t in at for _ in (0, 1)], name="time"))
    host = pd.DataFrame({"guests_ram": pd.array([GiB, 2 * GiB, 4 * GiB], dtype="Int64")},
                        index=pd.DatetimeIndex(at, name="time"))
    events = pd.DataFrame({"guest": pd.Categorical(["a", "b", "policy"]),
                           "kind": pd.Categorical(["target", "target", "policy_error"]),
                           "value": pd.array([1, 2, None], dtype="Int64"),
                           "duration_s": pd.array([None] * 3, dtype="Float64"),
                           "detail": pd.array(["", "", "x"], dtype="string")}, index=pd.DatetimeIndex(at, name="time"))
    s = score(samples, host, events, budget=int(1.5 * GiB))
    assert s["footprint_gib_s"] == 3.0  # 1 GiB for 1 s, then 2 GiB for 1 s
    assert s["footprint_peak_bytes"] == 4 * GiB and s["footprint_mean_bytes"] == 1.5 * GiB
    assert s["budget_violation_s"] == 1.0 and s["budget_worst_excess_bytes"] == 2.5 * GiB
    # a: threshold 100 MiB (10 % of 1000), short 50 MiB from t=1; b: 32 MiB floor, short 22 MiB at t=0.
    assert s["pressure_s"] == 2.0 and s["pressure_depth_mib_s"] == 72.0
    assert s["swap_bytes"] == 60 * MiB and s["oom_kills"] == 1 and math.isnan(s["alloc_stalls"])
    assert s["target_changes"] == 2 and s["policy_errors"] == 1 and s["span_s"] == 2.0
    assert math.isnan(score(samples, host, events, budget=None)["budget_violation_s"])
    # Without target events: policy events whose value changed, or that say so.
    policy = events.assign(kind=pd.Categorical(["policy"] * 3), guest=pd.Categorical(["a", "a", "b"]),
                           value=pd.array([5, 6, 7], dtype="Int64"))
    assert score(samples, host, policy, budget=None)["target_changes"] == 1
    flagged = policy.assign(detail=pd.array(['{"changed": true}', '{"changed": false}', '{"changed": true}'],
                                            dtype="string"))
    assert score(samples, host, flagged, budget=None)["target_changes"] == 2
    # Without a host frame: the samples' host_guest_ram, else host_rss, each guest's last value held.
    no_host = samples.assign(host_rss=pd.array([GiB, GiB, GiB, 2 * GiB, GiB, GiB], dtype="Int64"),
                             host_guest_ram=pd.array([None, None, None, GiB, None, None], dtype="Int64"))
    assert score(no_host, None, events, budget=None)["footprint_gib_s"] == 4.0  # b: 1 GiB RAM at 1 s
    assert score(no_host, None, events, budget=None)["rss_gib_s"] == 5.0
    table = score_table({"live": s, "x": s})
    assert list(table.index) == ["live", "x"] and table.loc["x", "target_changes"] == 2


def test_the_live_run_is_scored_with_its_recorded_frames(live):
    result = replay(live, [Static(0.5), Ewma()])
    table = result.table()
    assert list(table.index) == ["live", "static0.5", "ewma"]
    pd.testing.assert_series_equal(table.loc["live"], table.loc["ewma"], check_names=False)
    assert table.loc["static0.5", "footprint_gib_s"] < table.loc["live", "footprint_gib_s"] * 1.5


class Nudge:
    """A live policy that reads the balloon: 64 MiB down while the guest has 150 MiB available, else up."""

    name = "nudge"

    def __call__(self, view: PolicyView) -> dict[str, int]:
        targets = {}
        for g in view.names:
            last = view.guest_last(g)
            if last is not None:
                step = -64 * MiB if int(last["available_memory"]) > 150 * MiB else 64 * MiB
                targets[g] = min(GiB, int(last["actual"]) + step)
        return targets


def test_a_demand_policy_cannot_tell_the_model_from_the_recording(live):
    """The model keeps each guest's demand (T - A + swap) whatever its allotment, so a policy
    that reads only the demand decides as live even with a balloon that lags far behind."""
    slow = compare_decisions(live, replay(live, Ewma(), follow_recorded=False, rate_bytes_s=MiB))
    assert slow.summary.loc["closed_loop", "agreement"] == 1.0


def test_the_closed_loop_model_is_exact_with_the_balloon_at_once_and_diverges_with_a_slow_one():
    """Without following the recorded balloon: moved at once (as the generator's balloon) the
    closed loop takes every live decision; at 10 MiB/s it diverges, and the comparison says from
    the second decision on (the first saw the same start) and by how much."""
    nudged = record(Nudge())
    at_once = compare_decisions(nudged, replay(nudged, Nudge(), follow_recorded=False, rate_bytes_s=math.inf))
    assert at_once.summary.loc["closed_loop", "agreement"] == 1.0
    slow = compare_decisions(nudged, replay(nudged, Nudge(), follow_recorded=False, rate_bytes_s=10 * MiB))
    row = slow.summary.loc["closed_loop"]
    assert slow.summary.loc["open_loop", "agreement"] == 1.0  # the open loop does not depend on the model
    assert row["agreement"] < 0.5 and row["first_divergence"] == pd.Timestamp(_ns(10.7), tz="UTC")
    assert row["median_abs_diff_bytes"] >= 14 * MiB  # 64 MiB asked, 50 MiB moved in the 5 s between
    first = slow.table.loc[pd.Timestamp(_ns(5.7), tz="UTC")]
    assert (first["closed_loop"] == first["live"]).all() and (first["closed_loop_diff"] == 0).all()
    # Following the recorded balloon while the targets agree, the same slow model is exact.
    assert compare_decisions(nudged, replay(nudged, Nudge(), rate_bytes_s=10 * MiB)).summary.loc[
        "closed_loop", "agreement"] == 1.0


def test_the_balloon_moves_at_the_given_rate(live):
    """Static(0.75) asks 768 MiB at 5.7 s; at 100 MiB/s the balloon is 30 MiB lower at the sample at
    6.0 s, 80 MiB lower at the host row at 6.5 s, 130 MiB at 7.0 s and there from 8.26 s."""
    replayed = replay(live, Static(0.75), rate_bytes_s=100 * MiB, follow_recorded=False).policies["static0.75"]
    a = replayed.samples[replayed.samples["guest"] == "a"]
    expected = {5: GiB, 6: GiB - 30 * MiB, 7: GiB - 130 * MiB, 8: GiB - 230 * MiB, 9: 768 * MiB, 10: 768 * MiB}
    assert {s: a["actual"].iloc[s] for s in expected} == expected
    assert replayed.host["rss.a"].iloc[6] == GiB - 80 * MiB - UNTOUCHED + OVERHEAD
    assert a["target"].iloc[6] == 768 * MiB and a["target"].iloc[5] == GiB


def test_a_run_without_policy_or_host_frame(live):
    """A plain run: the limits from the samples, a host row a second from the guests' QEMU RSS,
    decisions every interval_s from the first sample."""
    plain = Run(Path("plain"), live.samples, live.events.iloc[:0], {})
    result = replay(plain, Static(0.5), interval_s=10.0)
    assert result.live_name is None and set(result.limits) == set(GUESTS)
    assert result.limits["a"].max_bytes == GiB and result.limits["a"].target == GiB
    assert len(result.live_host) == 180 and (result.live_host.index[1] - result.live_host.index[0]).total_seconds() == 1
    first = result.live_host.iloc[0]
    assert first["guests_rss"] == first["rss.a"] == GiB - UNTOUCHED + OVERHEAD  # only a has a sample at 0.0 s
    assert first["guests_ram"] == first["guest_ram.a"] == GiB - UNTOUCHED
    events = result.policies["static0.5"].events
    assert events.index.unique().tolist()[0] == T0 + pd.Timedelta(seconds=10)
    assert (events["kind"] == "target").sum() == 3 * 2  # 1 GiB -> 768 -> 512 MiB


def test_a_baseline_without_policy_keeps_its_budget_from_the_host_frame(live):
    """Overcommit(None) records no policy: the budget is in its host frame, and replay uses it."""
    budgeted = record(Ewma(), budget=2 * GiB)
    baseline = Run(Path("baseline"), budgeted.samples, budgeted.events.iloc[:0], {"overcommit": {"budget": 2 * GiB}},
                   host=budgeted.host)
    assert (budgeted.host["budget"] == 2 * GiB).all()
    assert replay(baseline, Static(1.0)).budget == 2 * GiB
    assert replay(baseline, Static(1.0), budget="none").budget is None
    assert replay(Run(Path("plain"), live.samples, live.events.iloc[:0], {}), Static(1.0)).budget is None


def test_plot_replay_returns_a_figure(live, tmp_path):
    fig = plot_replay(replay(live, [Static(0.5)], budget=2 * GiB))
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 2 + 6
    fig.savefig(tmp_path / "replay.png")  # renders under Agg
    assert (tmp_path / "replay.png").stat().st_size > 10_000


def test_a_policy_spec_is_loaded_by_name(live):
    result = replay(live, "mom")
    assert len(result.policies) == 1 and len(next(iter(result.policies.values())).samples) == len(live.samples)
