"""A policy live over four real guests under a host budget below their sum, then replayed offline
on that very run: MOM's rules keep the guests' RAM within the budget where the same workloads
without a policy (replayed) go far over it; MOM replayed on the recorded frames takes the
decisions it took live; the four reference policies are scored side by side."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from balloonlab.analysis.policy_score import score
from balloonlab.experiments.overcommit import Overcommit
from balloonlab.experiments.policy_decisions import decision_times
from balloonlab.experiments.replay import compare_decisions, replay

pytestmark = pytest.mark.qemu
MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.timeout(400)
async def test_mom_keeps_four_guests_within_a_budget_live_and_replays_to_the_same_decisions(builtin_ready, tmp_path):
    experiment = Overcommit("mom", guests=4, memory="512M", budget="1G", duration_s=70, cycle_s=40,
                            run_root=tmp_path)
    run = await experiment.run()
    host, samples, events = run.host, run.samples, run.events
    names = sorted(map(str, samples["guest"].unique()))
    assert names == ["oc0", "oc1", "oc2", "oc3"]

    # -- the host frame: on the samples' clock, every guest's RSS and guest RAM, the budget
    assert 60 <= len(host) <= 90 and (host["budget"] == GiB).all()
    assert {f"rss.{n}" for n in names} | {f"guest_ram.{n}" for n in names} <= set(host.columns)
    assert (host["budget_available"] == host["budget"] - host["guests_ram"]).all()
    assert host.index.min() - samples.index.min() < pd.Timedelta(seconds=3)

    # -- every decision an event with its inputs; limits held: never below the floor or above max
    meta = run.metadata["policy"]
    assert meta["name"] == "mom" and meta["budget"] == GiB and meta["interval_s"] == 2.0
    floor = meta["limits"]["oc0"]["floor_bytes"]
    assert floor == 128 * MiB and meta["limits"]["oc0"]["max_bytes"] == 512 * MiB
    decisions = events[events["kind"] == "policy"]
    assert len(decisions) >= 4 * 25  # four guests, a decision every 2 s for ~70 s
    details = [json.loads(d) for d in decisions["detail"]]
    assert all(d["policy"] == "mom" and d["inputs"]["host_total"] == GiB for d in details)
    assert all("host_free_percent" in d["why"] for d in details)
    set_targets = events[events["kind"] == "target"]["value"].astype("int64")
    assert len(set_targets) >= 8 and set_targets.min() >= floor and set_targets.max() <= 512 * MiB
    assert (events["kind"] == "policy_error").sum() == 0

    # -- live: over the budget only while the first cycle's workloads rise (the guests boot with
    # 512 MiB each and MOM takes 5 % a decision: 13 of 70 s seen here); the balloons moved both ways
    live = score(samples, host, events, budget=GiB)
    assert live["budget_violation_s"] <= 0.35 * live["span_s"], live
    assert live["footprint_peak_bytes"] <= 1.25 * GiB, live
    assert samples.groupby("guest", observed=True)["actual"].min().max() < 400 * MiB
    assert set_targets.diff().dropna().gt(0).any() and set_targets.diff().dropna().lt(0).any()

    # -- replayed offline on this run: MOM open-loop takes its live decisions; without a policy the
    # same demand goes over the budget for most of the run
    result = replay(run, {"mom": "mom", "none": lambda view: {}, "qmemman": "qmemman", "psi": "psi", "pi": "pi"})
    compared = compare_decisions(run, result)
    open_loop = compared.summary.loc["open_loop"]
    assert open_loop["agreement"] >= 0.95, compared.table[compared.table["open_loop_diff"].isna()
                                                         | (compared.table["open_loop_diff"] > 0)].head(20)
    table = result.table()
    print(table.to_string())
    print(compared.summary.to_string())
    baseline = table.loc["none"]
    # (the model keeps what a never-ballooned guest touched resident: 48 s and 1.31 GiB seen here,
    # against 13 s live; analysis.demand says where it is not exact)
    assert baseline["budget_violation_s"] >= max(25.0, 1.5 * live["budget_violation_s"]), table
    assert baseline["footprint_peak_bytes"] >= 1.2 * GiB
    # MOM replayed closed-loop takes the targets it took live, so the model follows the recording
    assert table.loc["mom", "budget_violation_s"] == pytest.approx(live["budget_violation_s"], abs=2.0)
    assert table.loc["none", "target_changes"] == 0 and table.loc["mom", "target_changes"] >= 8
    for name in ("qmemman", "psi", "pi"):
        assert not math.isnan(table.loc[name, "footprint_gib_s"]) and table.loc[name, "policy_errors"] == 0
    # qmemman and the PI controller move balloons here (67-82 and 75-90 changes seen); hypeman's PSI
    # defaults protect max(512 MiB, 50 %) of each guest: all of these, so it never moves one
    assert table.loc["qmemman", "target_changes"] >= 10 and table.loc["pi", "target_changes"] >= 10
    assert table.loc["psi", "target_changes"] == 0
    # every call of the live policy is a tick event, and replay decides at exactly those times
    ticks = events[events["kind"] == "policy_tick"]
    assert len(ticks) >= 30 and len(decisions) <= 4 * len(ticks) and (ticks["guest"] == "policy").all()
    times, inferred = decision_times(events, 2.0)
    assert list(times) == list(ticks.index.unique()) and not inferred.any()
