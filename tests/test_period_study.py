"""The polling-period study: the guest's ground truth, the analyses, the study on real guests, the CLI.

The analyses are checked on constructed frames with numbers worked out by hand. The study
runs once (module fixture) on two real guests, periods 1 and 5 s, their report timers
restarted at one instant, with bursts placed on the 5 s guest's report grid: a 2 s burst
that falls between two of its reports (it must be missed there, and seen at 1 s), and two
long ones that span a report. The agent's new verbs are tried on a guest of their own.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from balloonlab import AgentError, Guest, builtin_spec
from balloonlab.analysis.period_study import (detect, find_bursts, missed_by_duration, period_table, planned_bursts,
                                              truth_frame, uptime_to_epoch)
from balloonlab.experiments.period_study import Burst, PeriodStudy, bursts_schedule, plan_bursts

from .test_analysis import T0, events_frame, samples_frame
from .test_cli import assert_one_error, run

MiB = 1 << 20
T0_S = T0.value / 1e9
ALLOC, RECLAIM = 48 * MiB, 128 * MiB


# ---------------------------------------------------------------------------- pure analyses

def test_uptime_maps_to_host_time_with_the_offset_drifting_linearly_between_probes():
    # offset 1000 s at uptime 10, 1000.002 s at uptime 110: 20 ppm
    mapped = uptime_to_epoch([10.0, 60.0, 110.0, 210.0], (10.0, 1000.0), (110.0, 1000.002))
    assert mapped == pytest.approx([1010.0, 1060.001, 1110.002, 1210.004], abs=1e-9)
    assert uptime_to_epoch([5.0], (7.0, 3.0), (7.0, 3.0)) == pytest.approx([8.0])  # one probe: no drift


def synthetic_truth() -> pd.DataFrame:
    """Guest g, 100 ms samples over 20 s, MemAvailable 100 MiB with three bursts (MiB):
    5.0: 90, 5.1: 70, 5.2-6.9: 52, 7.0: 90 (alloc, drop 48);
    12.0-15.0: 10, no samples from 13.1 to 14.4 (the guest's sampler starved), swap-out 1000 pages;
    17.0-17.4 and 17.6-17.9: 70, one quiet sample between (a flicker: one burst)."""
    uptimes = [round(u, 1) for u in np.arange(0, 20.05, 0.1) if not 13.05 < u < 14.45]
    rows = []
    for u in uptimes:
        avail = {5.0: 90, 5.1: 70, 7.0: 90}.get(u, 52 if 5.2 <= u <= 6.9 else 10 if 12.0 <= u <= 15.0
                                                 else 70 if 17.0 <= u <= 17.9 and u != 17.5 else 100)
        swapped = 0 if u < 12.0 else 1000 if u > 15.0 else 500
        rows.append((u, avail * MiB, swapped, 300 if u >= 12.0 else 0, 200 if u >= 12.0 else 0))
    return truth_frame("g", ["MemAvailable", "pswpout", "pgscan_kswapd", "pgscan_direct"], rows,
                       (0.0, T0_S), (20.0, T0_S))


PLAN = pd.DataFrame({"guest": ["g", "g"], "kind": ["alloc", "reclaim"],
                     "requested": [T0 + pd.Timedelta(seconds=4.8), T0 + pd.Timedelta(seconds=11.5)],
                     "released": [T0 + pd.Timedelta(seconds=7.2), T0 + pd.Timedelta(seconds=15.5)]})


def rel(times: pd.Series) -> list[float]:
    return list((times - T0).dt.total_seconds())


def test_bursts_are_found_in_the_truth_with_interpolated_edges_and_their_own_baseline():
    bursts = find_bursts(synthetic_truth(), threshold_bytes=20 * MiB, plan=PLAN)
    assert list(bursts["kind"]) == ["alloc", "reclaim", "alloc"]  # the third from its counters (no swap-out)
    # alloc: the drop crosses 20 MiB halfway between 5.0 (10) and 5.1 (30); back between 6.9 (48) and 7.0 (10)
    # reclaim: between 11.9 (0) and 12.0 (90), and 15.0 (90) and 15.1 (0); the gap in the truth does not split it
    # flicker: 16.9 (0) -> 17.0 (30) and 17.9 (30) -> 18.0 (0); the quiet 17.5 sample does not split it
    expected = [5.05, 7.0 - 0.1 * 10 / 38, 11.9 + 0.1 * 20 / 90, 15.1 - 0.1 * 20 / 90, 16.9 + 0.1 * 20 / 30,
                18.0 - 0.1 * 20 / 30]
    assert [x for pair in zip(rel(bursts["start"]), rel(bursts["end"]), strict=True) for x in pair] == \
        pytest.approx(expected, abs=1e-6)
    assert list(bursts["true_peak_bytes"]) == [48 * MiB, 90 * MiB, 30 * MiB]
    assert list(bursts["baseline_bytes"]) == [100 * MiB] * 3
    assert list(bursts["swapped_out_bytes"]) == [0, 1000 * 4096, 0]
    assert list(bursts["scanned_pages"]) == [0, 500, 0]


def synthetic_reports() -> pd.DataFrame:
    """Reports of g (period 5) read at 3.0 (100 MiB), 6.5 (60), 13.5 (30), 15.9 (100), 18.5 (100)."""
    return samples_frame([{"t": t, "guest": "g", "available_memory": v * MiB, "period_s": 5}
                          for t, v in ((3.0, 100), (6.5, 60), (13.5, 30), (15.9, 100), (18.5, 100))])


def test_detection_says_what_the_reports_saw_of_each_burst():
    bursts = find_bursts(synthetic_truth(), threshold_bytes=20 * MiB, plan=PLAN)
    seen = detect(bursts, synthetic_reports(), threshold_bytes=20 * MiB)
    assert list(seen["period_s"]) == [5, 5, 5]
    assert list(seen["reports"]) == [1, 2, 1]  # 15.9 is within a second of the reclaim's end: it counts
    assert list(seen["missed"]) == [False, False, True]  # 18.5 shows nothing of the flicker
    assert list(seen["delay_s"][:2]) == pytest.approx([6.5 - 5.05, 13.5 - (11.9 + 0.1 * 20 / 90)], abs=1e-6)
    assert np.isnan(seen["delay_s"].iloc[2]) and pd.isna(seen["first_seen"].iloc[2])
    assert list(seen["seen_peak_bytes"]) == [40 * MiB, 70 * MiB, 0]
    assert list(seen["under_bytes"]) == [8 * MiB, 20 * MiB, 30 * MiB]
    assert list(seen["under_pct"]) == pytest.approx([100 * 8 / 48, 100 * 20 / 90, 100.0])


def test_the_table_aggregates_per_period_and_kind_and_costs_per_guest_hour():
    seen = detect(find_bursts(synthetic_truth(), threshold_bytes=20 * MiB, plan=PLAN), synthetic_reports(),
                  threshold_bytes=20 * MiB)
    costs = pd.DataFrame({"guest": ["g"], "period_s": [5], "duration_s": [1800.0], "qmp_commands": [360],
                          "cpu_s_per_command": [0.001], "qemu_service_cpu_s": [18.0]})
    table = period_table(seen, costs).set_index("kind")
    assert list(table.index) == ["alloc", "reclaim", "all"]
    assert list(table["bursts"]) == [2, 1, 3] and list(table["missed"]) == [1, 0, 1]
    assert list(table["missed_pct"]) == pytest.approx([50.0, 0.0, 100 / 3])
    assert list(table["delay_median_s"]) == pytest.approx([1.45, 1.577778, (1.45 + 1.577778) / 2], abs=1e-6)
    assert list(table["true_peak_median_mib"]) == [39.0, 90.0, 48.0]
    assert list(table["under_median_mib"]) == [19.0, 20.0, 20.0]
    assert list(table["under_median_pct"]) == pytest.approx([(100 * 8 / 48 + 100) / 2, 100 * 20 / 90, 100 * 20 / 90])
    assert list(table["commands_per_hour"]) == [720.0] * 3
    assert list(table["sampler_cpu_s_per_hour"]) == pytest.approx([0.72] * 3)
    assert list(table["qemu_service_cpu_s_per_hour"]) == [36.0] * 3


def test_misses_are_counted_by_how_long_each_burst_really_lasted():
    seen = detect(find_bursts(synthetic_truth(), threshold_bytes=20 * MiB, plan=PLAN), synthetic_reports(),
                  threshold_bytes=20 * MiB)
    # lengths: the alloc 1.92 s, the reclaim 3.16 s, the flicker 0.97 s (the one missed)
    table = missed_by_duration(seen, edges_s=(0, 2, 8))
    assert table.to_dict("list") == {"period_s": [5, 5], "duration": ["0-2 s", "2-8 s"], "bursts": [2, 1],
                                     "missed": [1, 0], "missed_pct": [50.0, 0.0]}


def test_planned_bursts_come_from_the_workload_events():
    events = events_frame([(1.0, "g", "workload", 48 * MiB, 0.5), (3.0, "g", "workload", 0, 0.1),
                           (9.0, "g", "workload", 128 * MiB, 4.0), (12.0, "g", "workload", 0, 0.2),
                           (13.0, "g", "target", 100 * MiB)])
    plan = planned_bursts(events, {48 * MiB: "alloc", 128 * MiB: "reclaim"})
    assert list(plan["kind"]) == ["alloc", "reclaim"]
    assert rel(plan["requested"]) == [0.5, 5.0] and rel(plan["released"]) == [3.0, 12.0]


def test_a_plan_cycles_holds_for_each_kind_and_leaves_room_for_slow_allocations():
    plan = plan_bursts(60, alloc_bytes=ALLOC, reclaim_bytes=RECLAIM, holds_s=(1, 10), jitter_s=0)
    # alloc: released at max(hold, 2 s) after its start, reclaim at max(hold, 8 s); 4 s quiet after each
    assert plan == [Burst(5.0, "alloc", ALLOC, 1.0), Burst(11.0, "reclaim", RECLAIM, 1.0),
                    Burst(23.0, "alloc", ALLOC, 10.0), Burst(37.0, "reclaim", RECLAIM, 10.0),
                    Burst(51.0, "alloc", ALLOC, 1.0)]  # a reclaim after it would end at 65 s
    assert bursts_schedule(plan[:2]).points == ((5.0, ALLOC), (6.0, 0), (11.0, RECLAIM), (12.0, 0))
    jittered = plan_bursts(60, alloc_bytes=ALLOC, reclaim_bytes=RECLAIM, holds_s=(1, 10), seed=3)
    assert jittered == plan_bursts(60, alloc_bytes=ALLOC, reclaim_bytes=RECLAIM, holds_s=(1, 10), seed=3)
    assert [b.at_s for b in jittered][1:] != [b.at_s for b in plan][1:]
    with pytest.raises(ValueError, match="leaves no room for a burst"):
        plan_bursts(8, alloc_bytes=ALLOC, reclaim_bytes=RECLAIM)


# ---------------------------------------------------------------------------- the agent's verbs

async def test_the_agent_records_a_bounded_truth_and_refuses_bad_requests(spec):
    guest = await Guest.launch(spec(memory="160M"))
    try:
        truth = guest.workload.truth
        with pytest.raises(AgentError, match="nothing recorded"):
            await truth.fetch()
        await truth.start()
        with pytest.raises(AgentError, match="already being recorded"):
            await truth.start()
        await truth.stop()
        with pytest.raises(AgentError, match="bad interval '15'"):
            await guest.workload._request("truth", "start", 15, 10)
        with pytest.raises(ValueError, match="multiple of 0.01 s"):
            await truth.start(0.015)
        fields = await truth.start(0.05, 8, ["MemAvailable", "no_such_counter", "pgfault", "Active(anon)"])
        assert fields == ("MemAvailable", "pgfault", "Active(anon)")  # what this kernel has, in that order
        await asyncio.sleep(1.5)
        recording = await truth.fetch(batch_lines=3)  # three lines a request: several round trips
        assert recording.full and len(recording.rows) == 8  # it stopped itself at max_samples
        uptimes = [row[0] for row in recording.rows]
        assert np.median(np.diff(uptimes)) == pytest.approx(0.05, abs=0.011)
        assert all(row[1] % 1024 == 0 and 0 < row[1] < 160 * MiB for row in recording.rows)  # kB -> bytes
        assert await truth.stop() == 8
        probe = await truth.probe_clock()
        assert probe.uptime_s > uptimes[-1] and probe.error_s < 0.05
        await guest.workload.ping()  # the agent answers as before
    finally:
        await guest.shutdown()


# ---------------------------------------------------------------------------- the study, on real guests

@pytest.fixture(scope="module")
def study(builtin_ready, tmp_path_factory):
    """Periods 1 and 5 over 36 s. The 5 s guest reports at 0, 5, 10... s after the timers were
    restarted, the schedule starting a moment later: the 2 s alloc at 5.8 s ends before 10 s;
    the reclaim (13-22 s) spans 15 and 20 s, the last alloc (26-31 s) spans 30 s."""
    plan = [Burst(5.8, "alloc", ALLOC, 2.0), Burst(13.0, "reclaim", RECLAIM, 9.0), Burst(26.0, "alloc", ALLOC, 5.0)]
    study = PeriodStudy(builtin_spec(f"ps{os.getpid()}", memory="160M", swap="128M"), periods=(1, 5),
                        duration_s=36, plan=plan, run_root=tmp_path_factory.mktemp("runs"), plot=False)
    return asyncio.run(study.run())


def of(frame: pd.DataFrame, period: int) -> pd.DataFrame:
    return frame[frame["guest"].astype(str) == f"ps{os.getpid()}-p{period}"]


def test_a_burst_between_two_reports_is_missed_at_5_s_and_seen_at_1_s(study):
    for period in (1, 5):
        bursts = of(study.bursts, period)
        assert list(bursts["kind"]) == ["alloc", "reclaim", "alloc"], bursts
    assert list(of(study.bursts, 1)["missed"]) == [False, False, False]
    assert list(of(study.bursts, 5)["missed"]) == [True, False, False]
    assert (of(study.bursts, 1)["delay_s"] <= 1.5).all()
    assert (of(study.bursts, 5)["delay_s"].iloc[1:] <= 5.5).all()
    assert of(study.bursts, 5)["under_pct"].iloc[0] > 90  # what it saw of the missed one: nothing like it
    table = study.table.set_index(["period_s", "kind"])
    assert table.loc[(5, "alloc"), "missed"] == 1 and table.loc[(1, "all"), "missed"] == 0


def test_reclaim_bursts_swap_out_and_alloc_bursts_do_not(study):
    for period in (1, 5):
        alloc1, reclaim, alloc2 = of(study.bursts, period).itertuples()
        assert reclaim.swapped_out_bytes > 8 * MiB and reclaim.scanned_pages > 0
        assert alloc1.swapped_out_bytes == alloc2.swapped_out_bytes == 0
        assert alloc1.true_peak_bytes == pytest.approx(ALLOC, abs=4 * MiB)
        assert reclaim.true_peak_bytes > 80 * MiB  # MemAvailable went down to the guest's floor


def test_the_truth_is_sampled_every_100_ms_on_a_monotonic_clock(study):
    for period in (1, 5):
        truth = of(study.truth, period)
        assert len(truth) > 300  # 36 s and more
        assert np.median(np.diff(truth["uptime_s"])) == pytest.approx(0.1, abs=0.005)
        assert (np.diff(truth["uptime_s"]) > 0).all() and truth.index.is_monotonic_increasing
        clock = study.clock.set_index("guest").loc[f"ps{os.getpid()}-p{period}"]
        assert clock["error_start_s"] < 0.05 and clock["error_end_s"] < 0.05
        assert abs(clock["offset_change_s"]) < 0.05  # guest and host clocks agree over the run


def test_truth_edges_fall_between_the_hosts_request_and_the_agents_reply(study):
    """Mapped to host time, an allocation burst starts after the host asked for it and before
    the agent said it was done, and ends while the host's release was under way."""
    events = study.run.events[study.run.events["kind"].astype(str) == "workload"]
    for period in (1, 5):
        clock = study.clock.set_index("guest").loc[f"ps{os.getpid()}-p{period}"]
        bound = pd.Timedelta(seconds=max(clock["error_start_s"], clock["error_end_s"]) + 0.1)
        mine = of(events, period)
        done = list(mine.index)
        asked = list(mine.index - pd.to_timedelta(mine["duration_s"].astype(float).to_numpy(), unit="s"))
        for n, burst in enumerate(of(study.bursts, period).itertuples()):
            if burst.kind != "alloc":
                continue
            assert asked[2 * n] - bound <= burst.start <= done[2 * n] + bound
            assert asked[2 * n + 1] - bound <= burst.end <= done[2 * n + 1] + bound


def test_costs_are_measured_per_guest_and_scale_with_the_period(study):
    costs = study.costs.set_index("period_s")
    assert costs.loc[1, "qmp_commands"] >= 2 * costs.loc[5, "qmp_commands"]
    assert costs.loc[1, "samples"] >= 25 and 5 <= costs.loc[5, "samples"] <= 10
    assert 0 < costs.loc[1, "client_cpu_s_per_command"] < 0.01 and 0 <= costs.loc[1, "qemu_cpu_s_per_command"] < 0.01
    table = study.table[study.table["kind"] == "all"].set_index("period_s")
    assert table.loc[1, "sampler_cpu_s_per_hour"] > 2 * table.loc[5, "sampler_cpu_s_per_hour"]


def test_the_run_folder_holds_the_truth_the_bursts_and_the_table(study):
    path = study.run.path
    pd.testing.assert_frame_equal(pd.read_parquet(path / "truth.parquet"), study.truth)
    assert len(pd.read_parquet(path / "bursts.parquet")) == 6
    assert pd.read_csv(path / "table.csv")["period_s"].tolist() == study.table["period_s"].tolist()
    assert (path / "period-study.json").stat().st_size > 0 and (path / "run.json").exists()


# ---------------------------------------------------------------------------- the command line

CLI_CASES = {
    ("--periods", "1,1"): "argument --periods: one guest per period, so no period twice; got '1,1'",
    ("--periods", "1,x"): "argument --periods: expected whole seconds separated by commas, got '1,x'",
    ("--periods", "0,5"): "argument --periods: expected periods of at least 1 s, got '0,5'",
    ("--holds", "1,-2"): "argument --holds: expected a positive number of seconds, got '-2'",
    ("--kinds", "alloc,oom"): "argument --kinds: expected alloc and/or reclaim, got 'alloc,oom'",
    ("--memory", "0"): "argument --memory: a guest needs some memory; got 0",
    ("--duration", "8"): "a duration of 8 s leaves no room for a burst (5 s quiet first, the burst, 4 s quiet after)",
}


def test_the_command_refuses_a_wrong_command_line_in_one_line(tmp_path):
    def one(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        return run("period-study", *args, cwd=tmp_path)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, CLI_CASES))
    for message, result in zip(CLI_CASES.values(), results, strict=True):
        assert_one_error(result, 2, f"{message}; see 'balloonlab period-study --help'")
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_two_truth_reads_in_one_uptime_tick_keep_the_later_so_times_strictly_increase():
    """/proc/uptime counts in 10 ms; a starved guest's loop catching up reads twice in one tick
    (seen in CI: uptimes 4.26, 4.26): one time, one row, the newer read."""
    frame = truth_frame("g", ["MemFree"], [(4.02, 1), (4.04, 2), (4.26, 3), (4.26, 4), (4.31, 5)], (4.0, 100.0),
                        (4.0, 100.0))
    assert frame["uptime_s"].tolist() == [4.02, 4.04, 4.26, 4.31] and frame["MemFree"].tolist() == [1, 2, 4, 5]
    assert frame.index.is_unique and frame.index.is_monotonic_increasing and list(frame["guest"]) == ["g"] * 4
