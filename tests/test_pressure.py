"""The memory-pressure classifier on frames built by the sampler's own buffer.

Every frame comes out of :func:`balloonlab.record.buffer.sample_buffer` through
``tests.test_analysis.samples_frame`` (rows appended in read order, then ``.frame()``), so
the classifier sees the sampler's columns and dtypes: the six Linux 6.12 counters as Int64,
NA where a guest does not send them, ``reset`` as bool, a UTC ``time`` index. The traces are
synthetic: each test says what the counters rose by between reads and checks the regime,
rates and ratios computed by hand.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgba

import balloonlab.analysis.accessor  # noqa: F401  (registers df.balloon)
from balloonlab.analysis import REGIMES, PressureThresholds, classify_pressure
from balloonlab.analysis.pressure import PRESSURE_COUNTERS, parse_window

from .test_analysis import MiB, at, samples_frame

KiB = 1 << 10
ZERO = dict.fromkeys(PRESSURE_COUNTERS, 0)


def reads(guest: str, times: list[float], rises: list[dict[str, int]], *, total: int | None = 512 * MiB,
          base: dict[str, int] | None = None) -> list[dict]:
    """Rows of one guest read at ``times``: the counters start at ``base`` (zeros) and rise by
    ``rises[i]`` in the interval that ends at read ``i`` (``rises[0]`` is ignored)."""
    counters = dict(ZERO if base is None else base)
    rows = []
    for i, (t, rise) in enumerate(zip(times, rises, strict=True)):
        if i:
            for name, value in rise.items():
                counters[name] += value
        rows.append({"t": t, "guest": guest, "lu": int(t), "total_memory": total, **counters})
    return rows


#: Ten seconds of each regime, read every second, in the kernel commit's terms.
PHASES: list[tuple[str, dict[str, int]]] = [
    ("none", {"async_scans": 64 * KiB}),  # kswapd barely scans: 576 KiB in the window < 1 MiB
    ("background", {"async_scans": 8 * MiB, "async_reclaims": 6 * MiB}),  # ARCLM/ASCAN 0.75
    ("struggling", {"async_scans": 8 * MiB, "async_reclaims": 1 * MiB}),  # ARCLM/ASCAN 0.125
    ("global", {"alloc_stalls": 5, "direct_scans": 4 * MiB, "direct_reclaims": 3 * MiB,
                "async_scans": 8 * MiB, "async_reclaims": 6 * MiB}),  # STALL h, DSCAN h, DRCLM/DSCAN 0.75
    ("thrashing", {"alloc_stalls": 20, "direct_scans": 16 * MiB, "direct_reclaims": 1 * MiB}),  # 0.0625
    ("cgroup", {"alloc_stalls": 5}),  # STALL h, DSCAN 0
    ("critical", {"alloc_stalls": 20, "direct_scans": 16 * MiB, "direct_reclaims": 1 * MiB}),  # + 2 OOM kills
    ("none", {}),
]


def regime_trace(guest: str = "a", total: int | None = 512 * MiB) -> list[dict]:
    times = list(range(10 * len(PHASES)))
    rises = [dict(PHASES[t // 10][1]) for t in times]
    rises[62]["oom_kills"] = 1
    rises[67]["oom_kills"] = 1
    return reads(guest, times, rises, total=total)


def test_every_regime_of_the_commit_with_its_rates_and_ratios():
    p = classify_pressure(samples_frame(regime_trace()))
    assert p["regime"].tolist() == [name for name, _ in PHASES]
    assert list(p["regime"].cat.categories) == list(REGIMES) and p["regime"].cat.ordered
    assert p.index.tolist() == [at(10 * k + 9) for k in range(8)] and p.index.name == "time"
    assert p["start"].tolist() == [at(0)] + [at(10 * k - 1) for k in range(1, 8)]  # windows abut
    assert p["span_s"].tolist() == [9.0] + [10.0] * 7 and p["intervals"].tolist() == [9] + [10] * 7
    none, background, struggling, glob, thrashing, cgroup, critical, idle = (p.iloc[k] for k in range(8))
    assert none["async_scans_delta"] == 9 * 64 * KiB and none["async_scans_bytes_per_s"] == 64 * KiB
    assert pd.isna(none["async_reclaim_ratio"])  # 576 KiB scanned: too little for a ratio
    assert background["async_scans_bytes_per_s"] == 8 * MiB and background["async_reclaims_bytes_per_s"] == 6 * MiB
    assert background["async_scan_share_per_s"] == 8 / 512 and background["async_reclaim_ratio"] == 0.75
    assert background["alloc_stalls_per_s"] == 0.0
    assert struggling["async_reclaim_ratio"] == 0.125 and struggling["alloc_stalls_delta"] == 0
    assert glob["alloc_stalls_per_s"] == 5.0 and glob["direct_scans_bytes_per_s"] == 4 * MiB
    assert glob["direct_scan_share_per_s"] == 4 / 512 and glob["direct_reclaim_ratio"] == 0.75
    assert thrashing["alloc_stalls_per_s"] == 20.0 and thrashing["direct_reclaim_ratio"] == 1 / 16
    assert thrashing["direct_reclaims_bytes_per_s"] == 1 * MiB and thrashing["direct_scan_share_per_s"] == 16 / 512
    assert cgroup["alloc_stalls_per_s"] == 5.0 and cgroup["direct_scan_share_per_s"] == 0.0
    assert pd.isna(cgroup["direct_reclaim_ratio"])
    assert critical["oom_kills_delta"] == 2 and critical["direct_reclaim_ratio"] == 1 / 16  # OOM wins over thrashing
    assert idle["alloc_stalls_delta"] == 0 and idle["async_scans_delta"] == 0 and idle["oom_kills_delta"] == 0
    assert p["total_memory"].tolist() == [512.0 * MiB] * 8
    assert (p["guest"] == "a").all() and isinstance(p["guest"].dtype, pd.CategoricalDtype)
    # Ordered: the worst regime a guest went through is a max.
    assert p.groupby("guest", observed=True)["regime"].max().to_dict() == {"a": "critical"}


def test_a_reset_inside_a_window_adds_before_and_after_never_a_negative_rise_or_a_spike():
    before = {"oom_kills": 3, "alloc_stalls": 1000, "async_scans": 40 * MiB, "direct_scans": 30 * MiB,
              "async_reclaims": 20 * MiB, "direct_reclaims": 20 * MiB}
    rise = {"alloc_stalls": 2, "direct_scans": 2 * MiB, "direct_reclaims": 1 * MiB}
    old = reads("a", list(range(15)), [rise] * 15, base=before)
    # The guest rebooted between the reads at 14 and 15: its counters restart near 0.
    new = reads("a", list(range(15, 20)), [rise] * 5,
                base={"oom_kills": 0, "alloc_stalls": 3, "async_scans": 1 * MiB, "direct_scans": 1 * MiB,
                      "async_reclaims": 0, "direct_reclaims": 0})
    flagged = [*old, {**new[0], "reset": True}, *new[1:]]
    for rows in (flagged, old + new):  # flagged by the sampler, or only seen as counters going down
        p = classify_pressure(samples_frame(rows))
        second = p.iloc[1]
        assert p.index[1] == at(19) and second["start"] == at(9)
        assert second["intervals"] == 9 and second["span_s"] == 9.0  # 10..14 and 16..19; 14 -> 15 dropped
        assert second["alloc_stalls_delta"] == 18 and second["alloc_stalls_per_s"] == 2.0
        assert second["oom_kills_delta"] == 0 and second["regime"] == "global"  # not "critical" from 3 -> 0
        assert second["direct_scans_delta"] == 18 * MiB and second["direct_reclaim_ratio"] == 0.5
        assert (p.filter(like="_delta").fillna(0) >= 0).all().all()
    # A flagged reset whose counters come back higher than before is no spike either.
    last = {k: old[-1][k] for k in PRESSURE_COUNTERS}  # every counter at or above its value at 14
    high = reads("a", list(range(15, 20)), [rise] * 5,
                 base={**last, "oom_kills": 5, "alloc_stalls": 10_000, "direct_scans": 900 * MiB})
    second = classify_pressure(samples_frame([*old, {**high[0], "reset": True}, *high[1:]])).iloc[1]
    assert second["alloc_stalls_delta"] == 18 and second["alloc_stalls_per_s"] == 2.0
    assert second["direct_scans_bytes_per_s"] == 2 * MiB and second["regime"] == "global"  # no OOM 3 -> 5


def test_old_stacks_without_the_counters_are_unknown_not_none():
    rows = [{"t": t, "guest": "old", "lu": t, "total_memory": 512 * MiB, "major_faults": 10 * t} for t in range(25)]
    for frame in (samples_frame(rows), samples_frame(rows, drop=PRESSURE_COUNTERS)):
        p = classify_pressure(frame)
        assert p["regime"].tolist() == ["unknown"] * 3
        assert p["intervals"].tolist() == [0, 0, 0] and p["span_s"].tolist() == [0.0, 0.0, 0.0]
        assert p["oom_kills_delta"].isna().all() and p["alloc_stalls_per_s"].isna().all()
        assert p["direct_reclaim_ratio"].isna().all()
    # A guest's first read alone says nothing either, even with the counters.
    lone = classify_pressure(samples_frame(reads("new", [3.0], [{}])))
    assert lone["regime"].tolist() == ["unknown"] and lone["start"].tolist() == [at(3)]


def test_two_interleaved_guests_with_uneven_reads_use_read_times():
    a = reads("a", [0, 1, 4, 8, 12.5], [
        {}, {"alloc_stalls": 1, "direct_scans": 1 * MiB, "direct_reclaims": 512 * KiB},
        {"alloc_stalls": 3, "direct_scans": 3 * MiB, "direct_reclaims": 1536 * KiB},
        {"alloc_stalls": 12, "direct_scans": 12 * MiB, "direct_reclaims": 6 * MiB},
        {"alloc_stalls": 9, "direct_scans": 9 * MiB, "direct_reclaims": 4608 * KiB}])
    b = reads("b", [0.5, 2.5, 3, 9.5, 11], [
        {}, {"alloc_stalls": 4}, {"alloc_stalls": 1}, {"alloc_stalls": 13},
        {"async_scans": 3 * MiB, "async_reclaims": 3 * MiB}], total=1024 * MiB)
    # last_update (whole seconds) would say a's first window spans 0..8 too, but b's 0.5..9.5 as 0..9.
    rows = sorted(a + b, key=lambda r: r["t"])
    frame = samples_frame(rows)
    p = classify_pressure(frame)
    assert p["guest"].tolist() == ["a", "a", "b", "b"]
    assert p.index.tolist() == [at(8), at(12.5), at(9.5), at(11)]
    assert p["start"].tolist() == [at(0), at(8), at(0.5), at(9.5)]
    assert p["span_s"].tolist() == [8.0, 4.5, 9.0, 1.5]
    # Rise over seconds, not a mean of per-interval rates (a's would be (1 + 1 + 3) / 3).
    assert p["alloc_stalls_per_s"].tolist() == [2.0, 2.0, 2.0, 0.0]
    assert p["direct_scans_bytes_per_s"].tolist() == [2.0 * MiB, 2.0 * MiB, 0.0, 0.0]
    assert p["direct_scan_share_per_s"].tolist() == [2 / 512, 2 / 512, 0.0, 0.0]
    assert p["regime"].tolist() == ["global", "global", "cgroup", "background"]
    assert p["async_reclaim_ratio"].iloc[3] == 1.0 and p["async_scan_share_per_s"].iloc[3] == 2 / 1024
    # Row order in the frame does not matter: reads are put in time order per guest first.
    shuffled = frame.iloc[np.random.default_rng(7).permutation(len(frame))]
    pd.testing.assert_frame_equal(classify_pressure(shuffled), p)
    # Windows of n report intervals: a's intervals 1-2 then 3-4.
    by_two = classify_pressure(frame, window=2)
    a2 = by_two[by_two["guest"] == "a"]
    assert a2.index.tolist() == [at(4), at(12.5)] and a2["start"].tolist() == [at(0), at(4)]
    assert a2["span_s"].tolist() == [4.0, 8.5] and a2["alloc_stalls_delta"].tolist() == [4, 21]
    assert a2["alloc_stalls_per_s"].tolist() == [1.0, 21 / 8.5]
    b2 = by_two[by_two["guest"] == "b"]
    assert b2["intervals"].tolist() == [2, 2] and b2["alloc_stalls_delta"].tolist() == [5, 13]


def test_thresholds_change_the_verdicts_they_name():
    frame = samples_frame(regime_trace())

    def regimes(th: PressureThresholds) -> list[str]:
        return classify_pressure(frame, thresholds=th)["regime"].tolist()

    # Stalls of 5 and 20 per second no longer "high": global's kswapd work reads as background.
    assert regimes(PressureThresholds(stall_rate_high=25)) == [
        "none", "background", "struggling", "background", "none", "none", "critical", "none"]
    assert regimes(PressureThresholds(thrashing_ratio=0.05))[4] == "global"  # DRCLM/DSCAN 0.0625 now fine
    assert regimes(PressureThresholds(direct_scan_high=0.01))[3:6] == ["cgroup", "thrashing", "cgroup"]
    assert regimes(PressureThresholds(struggling_ratio=0.1))[2] == "background"
    assert regimes(PressureThresholds(async_scan_high=0.02))[2] == "background"  # 8/512 = 0.0156 not high
    no_floor = classify_pressure(frame, thresholds=PressureThresholds(min_scan_bytes=0))
    assert no_floor["async_reclaim_ratio"].iloc[0] == 0.0 and no_floor["regime"].iloc[0] == "background"
    assert regimes(PressureThresholds(window="20s")) == ["background", "global", "thrashing", "critical"]
    twenty = classify_pressure(frame, window="20s")  # the argument overrides thresholds.window
    assert twenty["alloc_stalls_per_s"].tolist() == [0.0, 2.5, 12.5, 10.0]
    assert twenty["direct_reclaim_ratio"].iloc[2] == 1 / 16
    assert classify_pressure(frame, window=pd.Timedelta(seconds=20))["regime"].tolist() == regimes(
        PressureThresholds(window="20s"))


def test_without_total_memory_a_verdict_that_needs_a_scan_share_is_unknown():
    p = classify_pressure(samples_frame(regime_trace(total=None)))
    assert p["regime"].tolist() == ["none", "background", "unknown", "unknown", "unknown", "unknown",
                                    "critical", "none"]
    assert p["direct_scan_share_per_s"].isna().all() and p["alloc_stalls_per_s"].iloc[3] == 5.0


@pytest.mark.parametrize("bad, error, match", [
    ("10", ValueError, "has no unit"), ("0s", ValueError, "positive"), ("-1s", ValueError, "positive"),
    (0, ValueError, "at least 1"), (2.5, TypeError, "duration"), (True, TypeError, "duration"),
])
def test_bad_windows_say_what_is_expected(bad, error, match):
    with pytest.raises(error, match=match):
        parse_window(bad)
    with pytest.raises(error, match=match):
        PressureThresholds(window=bad)


@pytest.mark.parametrize("field, value", [
    ("stall_rate_high", -1.0), ("direct_scan_high", float("nan")), ("thrashing_ratio", 1.5),
    ("struggling_ratio", -0.1), ("min_scan_bytes", -1), ("min_scan_bytes", 1.5), ("async_scan_high", "1"),
])
def test_bad_thresholds_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        PressureThresholds(**{field: value})


def test_defaults_and_frozen():
    th = PressureThresholds()
    assert (th.window, th.stall_rate_high, th.direct_scan_high, th.async_scan_high, th.thrashing_ratio,
            th.struggling_ratio, th.min_scan_bytes) == ("10s", 1.0, 0.001, 0.001, 0.3, 0.3, MiB)
    assert parse_window("10s") == pd.Timedelta(seconds=10) and parse_window(3) == 3
    with pytest.raises(AttributeError):
        th.stall_rate_high = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="PressureThresholds"):
        classify_pressure(samples_frame(regime_trace()), thresholds={"stall_rate_high": 2})  # type: ignore[arg-type]


def test_accessor_is_the_function_and_empty_runs_give_empty_frames():
    frame = samples_frame(regime_trace("g1") + regime_trace("g2"))
    pd.testing.assert_frame_equal(frame.balloon.pressure(), classify_pressure(frame))
    th = PressureThresholds(stall_rate_high=25)
    pd.testing.assert_frame_equal(frame.balloon.pressure("20s", th), classify_pressure(frame, "20s", th))
    assert frame.balloon.pressure()["guest"].tolist() == ["g1"] * 8 + ["g2"] * 8
    for empty in (pd.DataFrame(), frame.iloc[:0]):
        p = classify_pressure(empty)
        assert len(p) == 0 and "regime" in p.columns and str(p["regime"].dtype) == "category"


def test_plot_pressure_bands_follow_the_regimes_and_lines_the_rates():
    matplotlib.use("Agg")
    from balloonlab.analysis.pressure_plot import BAND_ALPHA, REGIME_COLORS, plot_pressure
    old_stack = [{"t": t, "guest": "old", "lu": t, "total_memory": 512 * MiB} for t in (0, 5, 10)]
    frame = samples_frame(regime_trace("a") + old_stack)
    p = frame.balloon.pressure()
    fig = plot_pressure(p)
    ax_a, ax_old, stalls_a = fig.axes[0], fig.axes[1], fig.axes[2]
    assert [ax.get_title(loc="left") for ax in (ax_a, ax_old)] == ["a", "old"]
    bands = [patch for patch in ax_a.patches if (patch.get_gid() or "").startswith("pressure:")]
    assert [b.get_gid() for b in bands] == [f"pressure:{name}" for name, _ in PHASES if name != "none"]
    assert all(b.get_facecolor() == to_rgba(REGIME_COLORS[b.get_gid().split(":")[1]], BAND_ALPHA) for b in bands)
    thrashing = bands[3]  # spans its window: from the read at 39 to the read at 49
    x0, x1 = thrashing.get_x(), thrashing.get_x() + thrashing.get_width()
    assert (x0, x1) == pytest.approx((matplotlib.dates.date2num(at(39)), matplotlib.dates.date2num(at(49))))
    scans = {line.get_label(): line.get_ydata() for line in ax_a.get_lines()}
    assert list(scans) == ["kswapd scan", "kswapd reclaim", "direct scan", "direct reclaim"]
    assert list(scans["kswapd scan"][:6]) == [1 / 16, 1 / 16, 8.0, 8.0, 8.0, 8.0]  # MiB/s per window
    assert list(scans["direct reclaim"][8:10]) == [1.0, 1.0]  # thrashing's 1 MiB/s
    assert list(stalls_a.get_lines()[0].get_ydata()[6:12]) == [5.0, 5.0, 20.0, 20.0, 5.0, 5.0]
    assert [t.get_text() for t in ax_a.texts] == ["OOM x2"]
    assert [b.get_gid() for b in ax_old.patches] == ["pressure:unknown"] * 2  # reads 0-5, then 5-10
    legend = [t.get_text() for t in ax_a.get_legend().get_texts()]
    assert legend[:5] == ["kswapd scan", "kswapd reclaim", "direct scan", "direct reclaim", "alloc stalls/s"]
    assert legend[5:] == list(REGIMES)  # every regime occurs here, listed least severe first
    assert len(frame.balloon.plot_pressure(guests=["a"]).axes) == 2  # one guest: its axes and its twin
    with pytest.raises(ValueError, match="pressure"):
        plot_pressure(frame)
