"""Analyses and the ``df.balloon`` accessor on frames built by the sampler's own buffers.

Every frame here comes out of :func:`balloonlab.record.buffer.sample_buffer` /
:func:`~balloonlab.record.buffer.event_buffer` (``.append`` row by row, then ``.frame()``),
as the sampler builds them, so the analyses see the sampler's columns and dtypes, not a copy.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

import balloonlab.analysis.accessor  # noqa: F401  (registers df.balloon)
from balloonlab.analysis import memory_held_vs_available, retouch_cost, step_response, summary
from balloonlab.model.schema import GUEST_VIEW_COLUMNS, HOST_COLUMNS, STAT_NAMES, VMEM_COLUMNS
from balloonlab.model.stats import BalloonStats, libvirt_view
from balloonlab.record.buffer import event_buffer, sample_buffer

MiB = 1 << 20
T0 = pd.Timestamp("2024-05-01 12:00:00", tz="UTC")
#: T0 in epoch seconds: QEMU's last_update is whole host seconds.
T0_S = T0.value // 10**9


def _ns(seconds: float) -> int:
    """Epoch ns ``seconds`` after T0, as the sampler stamps a row (``int(read_time * 1e9)``)."""
    return T0.value + round(seconds * 1e9)


def at(seconds: float) -> pd.Timestamp:
    return pd.Timestamp(_ns(seconds), tz="UTC")


def samples_frame(rows: list[dict], *, drop: tuple[str, ...] = ()) -> pd.DataFrame:
    """A samples frame from the sampler's buffer: each row appended in the order given (the
    order the sampler's reads complete), then ``.frame()``.

    Each row: ``t`` (read time, s after T0), ``guest``, ``lu`` (last_update, whole s after
    T0; absent or None: the guest never reported) and any sampler column (a stat, ``actual``,
    ``target``, ``period_s``, ``rss``, ``age_s``, ``reset``, or a stat the buffer has not
    seen, which becomes a new column); what a row leaves out is NA, as in the sampler's rows.
    ``drop`` removes columns afterwards: a frame of a run that never had them.
    """
    buffer = sample_buffer()
    for r in rows:
        row = {k: v for k, v in r.items() if k not in ("t", "lu")}
        if r.get("lu") is not None:
            assert isinstance(r["lu"], int), "QEMU's last_update is whole seconds"
            row["last_update"] = T0_S + r["lu"]
        buffer.append(_ns(r["t"]), row)
    frame = buffer.frame().drop(columns=list(drop))
    assert str(frame.index.dtype) == "datetime64[ns, UTC]"
    return frame


def events_frame(rows: list[tuple]) -> pd.DataFrame:
    """An events frame from the sampler's event buffer: rows of ``(t, guest, kind, value=None,
    duration_s=None, detail="")``, appended as ``Sampler.record_event`` appends them."""
    buffer = event_buffer()
    for t, guest, kind, *rest in rows:
        value, duration_s, detail = (*rest, None, None, None)[:3]
        buffer.append(_ns(t), {"guest": guest, "kind": kind, "value": value, "duration_s": duration_s,
                               "detail": "" if detail is None else detail})
    return buffer.frame()


def test_frames_come_from_the_sampler_buffer_with_its_dtypes():
    samples = samples_frame([{"t": 0, "guest": "b", "lu": 0, "actual": 512 * MiB, "unknown_stat": 1},
                             {"t": 1.5, "guest": "a", "actual": 256 * MiB, "age_s": 0.25}])
    assert list(samples.columns[:3]) == ["guest", "host", "last_update"]
    assert list(samples.columns[3:3 + len(STAT_NAMES)]) == list(STAT_NAMES)
    assert list(samples.columns[3 + len(STAT_NAMES):]) == ["actual", "target", "period_s", "rss", "age_s", "reset",
                                                           "clock_offset_s", *HOST_COLUMNS, *VMEM_COLUMNS,
                                                           *GUEST_VIEW_COLUMNS, "guest_view_lag_s", "unknown_stat"]
    assert samples.index.tolist() == [at(0), at(1.5)] and samples.index.name == "time"
    assert list(samples["guest"].cat.categories) == ["a", "b"] and samples["guest"].tolist() == ["b", "a"]
    assert samples["last_update"].iloc[0] == T0 and pd.isna(samples["last_update"].iloc[1])
    assert str(samples["last_update"].dtype) == "datetime64[ns, UTC]"
    assert {str(samples[c].dtype) for c in (*STAT_NAMES, "actual", "target", "unknown_stat")} == {"Int64"}
    assert samples["actual"].tolist() == [512 * MiB, 256 * MiB] and samples["free_memory"].isna().all()
    assert str(samples["age_s"].dtype) == "Float64" and samples["age_s"].iloc[1] == 0.25
    assert samples["reset"].tolist() == [False, False]
    events = events_frame([(0.5, "a", "target", 256 * MiB), (0.75, "a", "workload", 64 * MiB, 0.5, "alloc 64 MiB")])
    assert list(events.columns) == ["guest", "host", "kind", "value", "duration_s", "detail"]
    assert list(events["kind"].cat.categories) == ["target", "workload"]  # kinds seen, sorted
    assert events["detail"].tolist() == ["", "alloc 64 MiB"] and pd.isna(events["duration_s"].iloc[0])


def test_libvirt_view_names_units_and_order_match_virsh():
    row = {"t": 0.75, "guest": "a", "lu": 0, "actual": 512 * MiB + 1023, "swap_in": 1023,
           "swap_out": 2048, "major_faults": 7, "minor_faults": 1023, "free_memory": 100 * 1024 + 1023,
           "total_memory": 480 * MiB, "available_memory": 300 * MiB, "disk_caches": 5000,
           "htlb_pgalloc": 3, "rss": 1023, "unknown_stat": 2}
    frame = samples_frame([row, {"t": 1, "guest": "a", "actual": 1024}], drop=("htlb_pgfail",))
    view = frame.balloon.libvirt()
    assert list(view.columns) == ["guest", "actual", "swap_in", "swap_out", "major_fault",
                                  "minor_fault", "unused", "available", "usable", "last_update",
                                  "disk_caches", "hugetlb_pgalloc", "hugetlb_pgfail", "rss"]
    first = view.iloc[0]
    assert first["actual"] == 512 * 1024 and first["swap_in"] == 0 and first["swap_out"] == 2
    assert first["major_fault"] == 7 and first["minor_fault"] == 1023  # counts unchanged
    assert first["unused"] == 100 and first["available"] == 480 * 1024 and first["usable"] == 300 * 1024
    assert first["disk_caches"] == 4 and first["rss"] == 0  # 1023 bytes -> 0 KiB
    assert first["last_update"] == T0_S  # epoch seconds
    assert pd.isna(first["hugetlb_pgfail"])  # not in the frame: NA, like libvirt leaving it out
    assert view.iloc[1]["last_update"] == 0 and view.iloc[1]["actual"] == 1
    assert view.index.equals(frame.index) and view["guest"].tolist() == ["a", "a"]
    # Same numbers as the per-sample libvirt_view in balloonlab.model.stats.
    stats = {k: row[k] for k in STAT_NAMES if k in row}
    expected = libvirt_view(BalloonStats(0.75, T0_S, stats, row["actual"]), row["rss"])
    assert {k: int(v) for k, v in first.drop("guest").dropna().items()} == expected


def _used_frame() -> pd.DataFrame:
    """Guest a every second (free_memory missing at t=3), guest b in between, in read order."""
    return samples_frame([
        {"t": 0, "guest": "a", "actual": 1000, "free_memory": 300, "total_memory": 900,
         "available_memory": 500, "rss": 1200},
        {"t": 0.5, "guest": "b", "actual": 2000, "free_memory": 1500, "rss": 800},
        {"t": 1, "guest": "a", "actual": 1000, "free_memory": 100, "total_memory": 900,
         "available_memory": 450, "rss": 1250},
        {"t": 2, "guest": "a", "actual": 700, "free_memory": 100, "total_memory": 600,
         "available_memory": 300, "rss": 1000},
        {"t": 2.5, "guest": "b", "actual": 2000, "free_memory": 1200},
        {"t": 3, "guest": "a", "actual": 700, "total_memory": 600, "available_memory": 250},
        {"t": 4, "guest": "a", "actual": 400, "free_memory": 40, "total_memory": 300,
         "available_memory": 100, "rss": 900},
    ])


def test_used_per_sample_definitions_by_hand():
    frame = _used_frame()
    used = frame.balloon.used()
    assert list(used.columns) == ["guest", "virt_manager", "exporter", "host_rss", "mom"]
    assert used.index.equals(frame.index) and used["guest"].tolist() == ["a", "b", "a", "a", "b", "a", "a"]
    assert {c: str(used[c].dtype) for c in used.columns[1:]} == {
        "virt_manager": "Int64", "exporter": "Int64", "host_rss": "Int64", "mom": "Float64"}
    # actual - free_memory; total_memory - available_memory; rss. NA where a term is missing.
    assert used["virt_manager"].tolist() == [700, 500, 900, 600, 800, pd.NA, 360]
    assert used["exporter"].tolist() == [400, pd.NA, 450, 300, pd.NA, 350, 200]
    assert used["host_rss"].tolist() == [1200, 800, 1250, 1000, pd.NA, pd.NA, 900]


def test_used_mom_is_moms_moving_average_by_hand():
    # MOM's samples of guest a are its complete rows: (actual, free) = (1000, 300) t0,
    # (1000, 100) t1, (700, 100) t2, (400, 40) t4; t3 lacks free_memory: NA, and no place
    # in the window. Guest b: (2000, 1500), (2000, 1200). mom = mean(actual) - mean(free).
    frame = _used_frame()
    rows = {"a": [0, 2, 3, 5, 6], "b": [1, 4]}

    def mom(window: int) -> dict[str, list]:
        column = frame.balloon.used(mom_window=window)["mom"]
        return {g: [column.iloc[i] for i in where] for g, where in rows.items()}

    by_default = mom(10)  # MOM's sample-history-length: the whole history here
    assert by_default["a"][:2] == [1000 - 300, 1000 - (300 + 100) / 2]
    assert by_default["a"][2] == pytest.approx((1000 + 1000 + 700) / 3 - (300 + 100 + 100) / 3, rel=1e-12)
    assert pd.isna(by_default["a"][3])
    assert by_default["a"][4] == (1000 + 1000 + 700 + 400) / 4 - (300 + 100 + 100 + 40) / 4 == 640
    assert by_default["b"] == [500, 2000 - (1500 + 1200) / 2]
    assert mom(10) == mom(4)  # guest a has 4 complete rows: a window of 4 holds them all
    three = mom(3)
    assert three["a"][4] == (1000 + 700 + 400) / 3 - (100 + 100 + 40) / 3 == 620  # t0 left the window
    two = mom(2)
    assert two["a"][1:3] == [1000 - (300 + 100) / 2, (1000 + 700) / 2 - (100 + 100) / 2]
    assert two["a"][4] == (700 + 400) / 2 - (100 + 40) / 2 == 480  # t2 and t4: t3 is skipped
    assert mom(1) == {"a": [700, 900, 600, pd.NA, 360], "b": [500, 800]}
    # Rows in any order give each row its own value: the window follows time, per guest.
    shuffled = frame.iloc[[6, 1, 3, 0, 5, 4, 2]]
    assert shuffled.balloon.used()["mom"].tolist() == frame.balloon.used()["mom"].iloc[[6, 1, 3, 0, 5, 4, 2]].tolist()
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="mom_window"):
            frame.balloon.used(mom_window=bad)


def test_rates_per_guest_with_reset_row_and_time_fallback():
    rows = [
        {"t": 0, "guest": "a", "lu": 0, "major_faults": 10, "swap_in": 0, "minor_faults": 100},
        {"t": 0.1, "guest": "b", "lu": 0, "major_faults": 5000},
        {"t": 2, "guest": "a", "lu": 2, "major_faults": 30, "swap_in": 4096, "minor_faults": 300},
        {"t": 2.1, "guest": "b", "lu": 2, "major_faults": 5002},
        {"t": 4, "guest": "a", "lu": 4, "major_faults": 70, "swap_in": 4096, "minor_faults": 700},
        {"t": 6, "guest": "a", "lu": 6, "major_faults": 3, "swap_in": 0, "minor_faults": 50,
         "reset": True},
        {"t": 7, "guest": "a", "lu": None, "major_faults": 5, "swap_in": 0, "minor_faults": 60},
    ]
    rates = samples_frame(rows).balloon.rates()
    a = rates[rates["guest"] == "a"]
    assert a["major_faults_per_s"].tolist()[:3] == [pd.NA, 10.0, 20.0]
    assert a["swap_in_bytes_per_s"].tolist()[:3] == [pd.NA, 2048.0, 0.0]
    assert pd.isna(a["major_faults_per_s"].iloc[3]) and pd.isna(a["minor_faults_per_s"].iloc[3])
    assert a["major_faults_per_s"].iloc[4] == 2.0  # last_update NaT: index time (1 s) used
    b = rates[rates["guest"] == "b"]
    assert pd.isna(b["major_faults_per_s"].iloc[0]) and b["major_faults_per_s"].iloc[1] == 1.0
    assert rates["swap_out_bytes_per_s"].isna().all()  # counter without values: NA, no error
    assert (rates.drop(columns="guest").fillna(0) >= 0).all().all()
    assert rates.index.equals(samples_frame(rows).index)


def test_counter_going_down_without_reset_flag_is_na_not_negative():
    rows = [{"t": t, "guest": "a", "lu": t, "minor_faults": v, "major_faults": 1}
            for t, v in [(0, 100), (1, 200), (2, 20), (3, 50)]]
    rates = samples_frame(rows, drop=("swap_in", "swap_out")).balloon.rates()
    assert rates["minor_faults_per_s"].tolist() == [pd.NA, 100.0, pd.NA, 30.0]
    assert rates["swap_in_bytes_per_s"].isna().all()


def _step_frames():
    samples, events = [], []
    for t in range(11):  # guests a and b sampled every second; c polled only
        samples.append({"t": t, "guest": "a", "actual": 512 * MiB if t <= 1 else
                        (256 * MiB if t < 7 else 512 * MiB)})
        samples.append({"t": t, "guest": "b", "actual": 512 * MiB if t <= 1 else 300 * MiB})
    events += [(1.0, "a", "target", 256 * MiB)]
    events += [(1.0 + 0.2 * k, "a", "balloon_change", 512 * MiB - 256 * MiB * k // 5) for k in range(1, 6)]
    events += [(6.0, "a", "target", 512 * MiB), (6.5, "a", "balloon_change", 512 * MiB)]
    events += [(1.0, "b", "target", 256 * MiB)]
    events += [(1.0 + 0.2 * k, "b", "balloon_change", 512 * MiB - 212 * MiB * k // 3) for k in range(1, 4)]
    samples += [{"t": 0, "guest": "c", "actual": 512 * MiB}, {"t": 1, "guest": "c", "actual": 512 * MiB},
                {"t": 2, "guest": "c", "actual": 450 * MiB}, {"t": 3, "guest": "c", "actual": 384 * MiB}]
    events += [(1.5, "c", "target", 384 * MiB)]
    return samples_frame(samples), events_frame(sorted(events, key=lambda e: e[0]))


def test_step_response_inflate_stall_deflate_and_polled_only():
    result = step_response(*_step_frames())
    assert list(result["guest"]) == ["a", "a", "b", "c"]
    inflate = result.iloc[0]
    assert inflate["time"] == at(1.0) and inflate["direction"] == "inflate"
    assert inflate["start_actual"] == 512 * MiB and inflate["final_actual"] == 256 * MiB
    assert inflate["reached"] and not inflate["stalled"]
    assert inflate["time_to_target_s"] == pytest.approx(1.0)
    assert inflate["rate_mib_per_s"] == pytest.approx(256.0)
    deflate = result.iloc[1]
    assert deflate["direction"] == "deflate" and deflate["start_actual"] == 256 * MiB
    assert deflate["time_to_target_s"] == pytest.approx(0.5)
    assert deflate["rate_mib_per_s"] == pytest.approx(512.0)
    stalled = result.iloc[2]
    assert stalled["final_actual"] == 300 * MiB and not stalled["reached"] and stalled["stalled"]
    assert pd.isna(stalled["time_to_target_s"])
    assert stalled["rate_mib_per_s"] == pytest.approx(212 / 0.6)
    polled = result.iloc[3]  # no balloon_change events: the samples' actual column
    assert polled["reached"] and polled["time_to_target_s"] == pytest.approx(1.5)
    assert not polled["stalled"]


def test_step_response_not_stalled_while_still_moving_or_too_short():
    samples, events = _step_frames()
    result = step_response(samples, events, settle_s=60.0)
    assert not result.iloc[2]["stalled"]  # still for 8.4 s, not 60 s
    assert step_response(samples.iloc[:0], events.iloc[:0]).empty
    # The last balloon_change is the guest's last record: it still counts.
    last = step_response(samples_frame([{"t": 0, "guest": "a", "actual": 512 * MiB}]),
                         events_frame([(1, "a", "target", 256 * MiB),
                                       (1.5, "a", "balloon_change", 384 * MiB),
                                       (2, "a", "balloon_change", 256 * MiB)])).iloc[0]
    assert last["reached"] and last["time_to_target_s"] == pytest.approx(1.0)


def test_retouch_cost_classifies_allocations_after_deflate():
    events = events_frame([
        (0.5, "a", "balloon_change", 512 * MiB),
        (1, "a", "workload", 64 * MiB, 0.5, "alloc 64 MiB"),
        (2, "a", "target", 256 * MiB),  # inflate (below actual 512M)
        (2.5, "a", "balloon_change", 256 * MiB),
        (3, "a", "workload", 96 * MiB, 1.0, "alloc 32 MiB"),
        (4, "a", "target", 512 * MiB),  # deflate (above actual 256M)
        (4.5, "b", "workload", 32 * MiB, 0.25, "alloc 32 MiB"),
        (5, "a", "workload", 224 * MiB, 2.0, "alloc 128 MiB"),
        (5.5, "a", "workload", 0, 0.1, "free all"),
        (5.8, "a", "target", 512 * MiB),  # no move: neither inflate nor deflate
        (5.9, "a", "workload", 16 * MiB, 0.5, "alloc 16 MiB"),
        (6, "a", "target", 128 * MiB),  # inflate again
        (7, "a", "workload", 48 * MiB, 1.0, "alloc 32 MiB"),
    ])
    cost = retouch_cost(events)
    a = cost[cost["guest"] == "a"].set_index("time")
    assert a["after_deflate"].tolist() == [False, False, True, True, False]
    assert a["alloc_bytes"].tolist() == [64 * MiB, 32 * MiB, 128 * MiB, 16 * MiB, 32 * MiB]
    assert a.loc[at(5), "mib_per_s"] == pytest.approx(64.0)
    assert a.loc[at(5), "since_deflate_s"] == pytest.approx(1.0) and a.loc[at(5), "deflate_time"] == at(4)
    assert pd.isna(a.loc[at(7), "deflate_time"]) and pd.isna(a.loc[at(7), "since_deflate_s"])
    assert cost[cost["guest"] == "b"]["after_deflate"].tolist() == [False]  # a's deflate is a's
    assert "free all" not in set(cost["detail"])
    medians = cost.groupby("after_deflate")["mib_per_s"].median()
    assert medians[True] == pytest.approx(48.0) and medians[False] == pytest.approx(80.0)


def test_retouch_cost_counts_working_set_passes_and_page_cache_reads_beside_allocations():
    events = events_frame([
        (1, "a", "workload", 64 * MiB, 0.5, "alloc 64 MiB"),
        (2, "a", "workload", 64 * MiB, 0.25, "touch 64 MiB"),  # a re-touch: held does not rise
        (3, "a", "workload", 64 * MiB, 2.0, "write 256 MiB"),  # writing the disk touches nothing held
        (4, "a", "target", 256 * MiB),
        (4.5, "a", "balloon_change", 256 * MiB),
        (5, "a", "target", 512 * MiB),  # deflate
        (6, "a", "workload", 64 * MiB, 0.5, "touch 64 MiB"),
        (7, "a", "workload", 64 * MiB, 1.0, "read 256 MiB"),
        (8, "a", "workload", 0, 0.1, "free all"),
    ])
    cost = retouch_cost(events).set_index("time")
    assert cost["detail"].tolist() == ["alloc 64 MiB", "touch 64 MiB", "touch 64 MiB", "read 256 MiB"]
    assert cost["alloc_bytes"].tolist() == [64 * MiB, 64 * MiB, 64 * MiB, 256 * MiB]
    assert cost["mib_per_s"].tolist() == pytest.approx([128.0, 256.0, 128.0, 256.0])
    assert cost["after_deflate"].tolist() == [False, False, True, True]
    assert cost.loc[at(7), "since_deflate_s"] == pytest.approx(2.0)


def test_memory_held_vs_available_aligns_on_samples():
    samples = samples_frame([{"t": t, "guest": g, "available_memory": 400 * MiB - t * MiB,
                              "free_memory": 300 * MiB, "actual": 512 * MiB}
                             for t in range(5) for g in ("a", "b")])
    events = events_frame([(1.5, "a", "workload", 64 * MiB, 0.2, "alloc 64 MiB"),
                           (3, "a", "workload", 128 * MiB, 0.2, "alloc 64 MiB"),
                           (3.5, "a", "target", 256 * MiB)])
    held = memory_held_vs_available(samples, events)
    assert held.index.equals(samples.index) and held["guest"].tolist() == samples["guest"].tolist()
    assert held[held["guest"] == "a"]["held_bytes"].tolist() == [pd.NA, pd.NA, 64 * MiB, 128 * MiB, 128 * MiB]
    assert held[held["guest"] == "b"]["held_bytes"].isna().all()
    assert held["available_memory"].iloc[-1] == 396 * MiB


def test_summary_per_guest():
    samples = samples_frame([{"t": 0, "guest": "a", "actual": 512 * MiB, "age_s": 0.5},
                             {"t": 1, "guest": "a", "actual": 256 * MiB, "age_s": 1.5, "reset": True},
                             {"t": 2, "guest": "a", "actual": 300 * MiB, "age_s": 0.1},
                             {"t": 1, "guest": "b"}])
    events = events_frame([(0, "a", "launch"), (1, "a", "error", None, None, "boom")])
    table = summary(samples, events)
    a = table.loc["a"]
    assert a["samples"] == 3 and a["first"] == at(0) and a["last"] == at(2) and a["resets"] == 1
    assert a["min_actual"] == 256 * MiB and a["max_actual"] == 512 * MiB
    assert math.isclose(a["median_age_s"], 0.5) and a["events"] == 2 and a["errors"] == 1
    assert table.loc["b", "samples"] == 1 and pd.isna(table.loc["b", "min_actual"])


# -- attribution: where every byte is (analysis.attribution) ----------------------------------

def _host(rss: int, guest_ram: int, tcg: int, ram_size: int) -> dict:
    """Host columns as HostMemory.columns() writes them (host_other = the rest of the rollup's Rss)."""
    return {"host_rss": rss, "host_guest_ram": guest_ram, "host_tcg": tcg, "host_other": rss - guest_ram - tcg,
            "host_ram_size": ram_size}


def test_attribution_bands_are_what_their_definitions_say_and_sum_to_memory_ram_size_and_rss():
    from balloonlab.analysis.attribution import BANDS, RESIDENT, attribution
    rows = [
        # 512 MiB guest, no balloon: MemTotal 480 (32 reserved), 300 free, 50 cache -> 130 used;
        # 260 resident: 212 known (used + cache + reserved), 48 free but resident
        {"t": 0, "guest": "a", "lu": 0, "actual": 512 * MiB, "target": 512 * MiB, "total_memory": 480 * MiB,
         "free_memory": 300 * MiB, "disk_caches": 50 * MiB, **_host(360 * MiB, 260 * MiB, 40 * MiB, 512 * MiB)},
        # ballooned to 384: MemTotal 352, 180 free, 40 cache -> 132 used; only 150 resident (host swap?):
        # nothing free is resident and the gap is negative
        {"t": 1, "guest": "a", "lu": 1, "actual": 384 * MiB, "target": 384 * MiB, "total_memory": 352 * MiB,
         "free_memory": 180 * MiB, "disk_caches": 40 * MiB, **_host(250 * MiB, 150 * MiB, 40 * MiB, 512 * MiB)},
        # virtio-mem: 256 boot + 96 of a 256 MiB device plugged (requested 128); MemTotal 320
        {"t": 2, "guest": "b", "lu": 2, "actual": 256 * MiB, "target": 256 * MiB, "total_memory": 320 * MiB,
         "free_memory": 200 * MiB, "disk_caches": 20 * MiB, "vmem_size": 96 * MiB, "vmem_requested": 128 * MiB,
         "vmem_max_size": 256 * MiB, **_host(200 * MiB, 150 * MiB, 30 * MiB, 512 * MiB)},
    ]
    a = attribution(samples_frame(rows))
    mib = {name: [None if pd.isna(v) else v // MiB for v in a[name]] for name in a.columns if name != "guest"}
    assert mib["guest_used"] == [130, 132, 100] and mib["guest_cache"] == [50, 40, 20]
    assert mib["guest_reserved"] == [32, 32, 32] and mib["memory"] == [512, 384, 352]
    assert mib["guest_free_resident"] == [48, 0, 0] and mib["guest_free_unbacked"] == [252, 180, 200]
    assert mib["ballooned"] == [0, 128, 0] and mib["vmem_unplugged"] == [0, 0, 160]
    assert mib["vmm_tcg"] == [40, 40, 30] and mib["vmm_other"] == [60, 60, 20]
    assert mib["resident_gap"] == [0, -54, -2] and mib["vmem_requested"] == [0, 0, 128]
    guest_side = sum(a[n] for n in list(BANDS)[2:7])
    assert (guest_side == a["memory"]).all()
    assert (guest_side + a["ballooned"] + a["vmem_unplugged"] == a["ram_size"]).all()
    assert (sum(a[n] for n in RESIDENT) + a["resident_gap"] == a["host_rss"]).all()


def test_attribution_without_the_host_view_has_na_host_bands_and_takes_ram_size_when_given():
    from balloonlab.analysis.attribution import attribution
    rows = [{"t": 0, "guest": "remote", "lu": 0, "actual": 384 * MiB, "target": 384 * MiB,
             "total_memory": 352 * MiB, "free_memory": 200 * MiB, "disk_caches": 30 * MiB}]
    frame = samples_frame(rows)
    a = attribution(frame)
    for name in ("vmm_tcg", "vmm_other", "guest_free_resident", "host_rss", "resident_gap", "ballooned"):
        assert pd.isna(a[name].iloc[0]), name
    assert a["guest_used"].iloc[0] == 122 * MiB and a["vmem_unplugged"].iloc[0] == 0  # guest side still known
    given = frame.balloon.attribution(ram_size={"remote": 512 * MiB})
    assert given["ballooned"].iloc[0] == 128 * MiB and given["ram_size"].iloc[0] == 512 * MiB
    assert pd.isna(given["vmm_tcg"].iloc[0])


def test_free_resident_is_capped_by_memfree_and_the_rest_is_gap():
    """A report older than a move: 100 MiB more resident than the guest's used + cache + reserved
    + MemFree explains: free_resident stops at MemFree and the excess shows as a positive gap."""
    from balloonlab.analysis.attribution import attribution
    rows = [{"t": 0, "guest": "a", "lu": 0, "actual": 256 * MiB, "target": 256 * MiB, "total_memory": 256 * MiB,
             "free_memory": 20 * MiB, "disk_caches": 10 * MiB, **_host(400 * MiB, 356 * MiB, 30 * MiB, 256 * MiB)}]
    a = attribution(samples_frame(rows))
    assert a["guest_free_resident"].iloc[0] == 20 * MiB and a["guest_free_unbacked"].iloc[0] == 0
    assert a["resident_gap"].iloc[0] == 100 * MiB
