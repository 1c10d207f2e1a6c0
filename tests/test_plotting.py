"""Plots of runs built by the sampler's buffers: one axes per guest, labelled lines, live updates, PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import balloonlab.analysis.accessor  # noqa: E402,F401  (registers df.balloon)
from balloonlab.analysis.plotting import plot_memory, save_run_plot, update_memory_plot  # noqa: E402

from .test_analysis import MiB, events_frame, samples_frame  # noqa: E402

LABELS = ["total_memory", "free_memory", "available_memory", "disk_caches", "actual", "target"]


def run(seconds: int = 30) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two guests sampled each second: a inflates 512M -> 256M at 5 s, then holds 128M."""
    rows, events = [], [(0, "a", "launch"), (0, "b", "launch")]
    for t in range(seconds):
        actual = 512 * MiB if t < 6 else 256 * MiB
        held = 0 if t < 12 else 128 * MiB
        rows.append({"t": t, "guest": "a", "lu": t, "actual": actual,
                     "target": None if t < 5 else 256 * MiB, "total_memory": actual - 30 * MiB,
                     "free_memory": actual - 80 * MiB - held, "available_memory": actual - 60 * MiB - held,
                     "disk_caches": 20 * MiB, "rss": 300 * MiB + held})
        rows.append({"t": t, "guest": "b", "lu": t, "actual": 512 * MiB, "total_memory": 480 * MiB,
                     "free_memory": 400 * MiB, "available_memory": 420 * MiB, "disk_caches": 10 * MiB})
    events += [(5, "a", "target", 256 * MiB)]
    events += [(5 + 0.2 * k, "a", "balloon_change", 512 * MiB - 256 * MiB * k // 5) for k in range(1, 6)]
    events += [(12, "a", "workload", 128 * MiB, 0.8, "alloc 128 MiB"), (20, "b", "reset"),
               (25, "b", "error", None, None, "guest-stats timed out")]
    return samples_frame(rows), events_frame(sorted(events, key=lambda e: e[0]))


def test_plot_memory_one_axes_per_guest_with_labelled_lines():
    samples, events = run()
    fig = plot_memory(samples, events)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["a", "b"]
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()][:6] == LABELS
    assert fig.axes[0].get_legend() is not None and fig.axes[1].get_legend() is None
    lines = fig._balloonlab_lines["a"]
    assert lines["actual"].get_drawstyle() == "steps-post" and lines["target"].get_linestyle() == "--"
    assert lines["actual"].get_ydata()[-1] == pytest.approx(256.0)  # MiB
    assert len(lines["balloon_change"].get_xdata()) == 5
    texts = [t.get_text().strip() for ax in fig.axes for t in ax.texts]
    assert {"target 256 MiB", "alloc 128 MiB", "reset", "launch"} <= set(texts)
    assert any(t.startswith("error") for t in texts)
    assert fig.axes[-1].get_xlabel() == "time (UTC)"


def test_plot_memory_guest_selection_window_and_accessor():
    samples, events = run()
    fig = plot_memory(samples, events, guests=["b"], window=pd.Timedelta(seconds=10))
    assert len(fig.axes) == 1 and fig.axes[0].get_title(loc="left") == "b"
    assert len(fig._balloonlab_lines["b"]["actual"].get_xdata()) == 11  # t = 19..29
    assert len(samples.balloon.plot(window=5.0).axes) == 2
    empty = plot_memory(samples.iloc[:0])
    assert len(empty.axes) == 1


def test_update_memory_plot_changes_data_in_place():
    samples, events = run()
    fig = plot_memory(samples.iloc[:10], events[events.index <= samples.index[9]])
    axes = list(fig.axes)
    actual = fig._balloonlab_lines["a"]["actual"]
    free = fig._balloonlab_lines["a"]["free_memory"]
    assert len(free.get_xdata()) == 5
    draws = []
    fig.canvas.draw_idle = lambda *a, **k: draws.append(1)
    update_memory_plot(fig, samples, events)
    assert fig.axes == axes and len(draws) == 1
    assert fig._balloonlab_lines["a"]["actual"] is actual
    assert len(free.get_xdata()) == 30 and actual.get_ydata()[-1] == pytest.approx(256.0)
    low, high = axes[0].get_xlim()
    assert high >= actual.get_xdata()[-1]  # rescaled to the new data
    texts = [t.get_text().strip() for t in axes[1].texts]
    assert "reset" in texts and texts.count("launch") == 1  # markers redrawn, not duplicated
    with pytest.raises(ValueError, match="plot_memory"):
        update_memory_plot(Figure(), samples)


def test_save_run_plot_writes_png(tmp_path):
    samples, events = run()
    path = save_run_plot(samples, events, tmp_path / "plots" / "run.png")
    assert path == tmp_path / "plots" / "run.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "plots" / "run-pressure.png").exists()  # no reclaim counters in this run


def test_save_run_plot_adds_the_pressure_plot_when_the_run_has_reclaim_counters(tmp_path):
    rows = [{"t": t, "guest": "g", "lu": t, "actual": 512 * MiB, "total_memory": 480 * MiB,
             "free_memory": 100 * MiB, "available_memory": 120 * MiB, "oom_kills": 0, "alloc_stalls": 5 * t,
             "async_scans": 0, "async_reclaims": 0, "direct_scans": 4 * MiB * t, "direct_reclaims": 3 * MiB * t}
            for t in range(30)]
    path = save_run_plot(samples_frame(rows), None, tmp_path / "plot.png")
    pressure = tmp_path / "plot-pressure.png"
    assert path.read_bytes()[:8] == pressure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pressure.stat().st_size > 10_000


def host_run(seconds: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run of :func:`run` with the host's view of guest a (b is remote: no host columns)."""
    samples, events = run(seconds)
    a = (samples["guest"] == "a").to_numpy()
    held = samples.loc[a, "rss"] - 300 * MiB
    samples.loc[a, "host_tcg"] = 40 * MiB
    samples.loc[a, "host_guest_ram"] = 200 * MiB + held
    samples.loc[a, "host_other"] = 60 * MiB
    samples.loc[a, "host_rss"] = 300 * MiB + held
    samples.loc[a, "host_ram_size"] = 512 * MiB
    return samples, events


def test_plot_attribution_stacks_every_band_per_guest_and_redraws_in_place():
    from balloonlab.analysis.attribution import BANDS, attribution
    from balloonlab.analysis.attribution_plot import plot_attribution, update_attribution_plot
    samples, events = host_run()
    fig = samples.balloon.plot_attribution(events)
    assert isinstance(fig, Figure) and [ax.get_title(loc="left") for ax in fig.axes] == ["a", "b"]
    polys = {c.get_gid(): c for c in fig.axes[0].collections if c.get_gid()}
    assert set(polys) == {f"attribution:{name}" for name in BANDS}
    # the top of the stack of guest a at its last sample is ram_size + VMM, in MiB
    top = max(p.get_paths()[0].vertices[:, 1].max() for p in polys.values())
    assert top == pytest.approx((512 + 40 + 60), abs=0.5)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    a = attribution(samples[samples["guest"] == "a"])
    assert list(lines["QEMU RSS (smaps_rollup)"].get_ydata()) == pytest.approx(list(a["host_rss"] / MiB))
    assert any("no host view" in t.get_text() for t in fig.axes[1].texts)  # b: guest side only, said so
    kept = fig._balloonlab_attribution
    assert kept.points == {"a": 20, "b": 20}
    more, _ = host_run(25)
    update_attribution_plot(fig, more, events, draw=False)
    assert kept.points == {"a": 25, "b": 25}
    with pytest.raises(ValueError, match="plot_attribution"):
        update_attribution_plot(plot_memory(samples), samples)
    assert plot_attribution(samples.iloc[:0]).axes  # an empty run still draws (no guests)


def test_save_run_plot_adds_the_attribution_plot_only_when_the_host_saw_a_guest(tmp_path):
    samples, events = host_run()
    save_run_plot(samples, events, tmp_path / "plot.png")
    assert (tmp_path / "plot-attribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    remote, _ = run()
    save_run_plot(remote, events, tmp_path / "remote" / "plot.png")
    assert not (tmp_path / "remote" / "plot-attribution.png").exists()
