"""``balloonlab compare``: the ways of taking memory back, side by side.

The table's arithmetic on rows made by hand; the command's bad input (one line, nothing
launched); and ``compare --quick`` for real: five built-in guests, one per mechanism, under
QEMU and a real guest kernel, whose JSON must show what each mechanism is known to do: a
balloon or virtio-mem shrink gives the host back about what was asked, free page reporting
gives back what the guest freed and its absence gives back nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import pandas as pd
import pytest

from balloonlab.analysis.mechanisms import MEASURES, compare_table, plot_compare, plot_footprint
from balloonlab.record.store import load_run
from balloonlab.experiments.compare import (MECHANISMS, CompareSettings, compare_mechanisms, parse_mechanisms,
                                            table_records)

from .test_cli import assert_one_error, run

MiB = 1 << 20


def rows(mechanism: str, **measures: list[float]) -> list[dict[str, object]]:
    n = len(next(iter(measures.values())))
    out = []
    for i in range(n):
        row: dict[str, object] = {"mechanism": mechanism, "repetition": i + 1, "shrink_reached": True,
                                  "grow_reached": i != 1}
        row.update({m: None for m in MEASURES})
        row.update({k: v[i] for k, v in measures.items()})
        out.append(row)
    return out


def test_the_table_gives_median_spread_share_and_reached_per_mechanism():
    returned = [100 * MiB, 120 * MiB, 110 * MiB]
    frame = pd.DataFrame(rows("balloon", shrink_s=[1.0, 3.0, 2.0], host_returned_bytes=returned)
                         + rows("virtio-mem", shrink_s=[0.1, 0.3, 0.2], host_returned_bytes=[128 * MiB] * 3))
    table = compare_table(frame, shrink_bytes=128 * MiB).set_index("mechanism")
    assert list(table.index) == ["balloon", "virtio-mem"]  # the rows' order, not sorted
    assert table.loc["balloon", ["shrink_s", "shrink_s_min", "shrink_s_max"]].tolist() == [2.0, 1.0, 3.0]
    assert table.loc["balloon", "host_returned_pct"] == pytest.approx(100 * 110 / 128)
    assert table.loc["virtio-mem", "host_returned_pct"] == 100.0
    assert table.loc["balloon", "runs"] == 3 and table.loc["balloon", "reached"] == 2  # run 2 never grew back
    assert math.isnan(table.loc["balloon", "retouch_s"])  # nothing measured: NaN, not 0
    records = table_records(table.reset_index())
    assert records[0]["retouch_s"] is None and json.dumps(records)  # JSON has null, not NaN
    assert len(plot_compare(table.reset_index()).axes) == 4


def test_the_footprint_plot_draws_a_line_per_mechanism_and_refuses_other_frames():
    trace = pd.DataFrame({"mechanism": ["balloon"] * 3 + ["virtio-mem"] * 3, "repetition": 1,
                          "t_s": [0.0, 1.0, 2.0] * 2, "rss": [300 * MiB, 420 * MiB, 300 * MiB] * 2,
                          "step": ["touch", "free", "shrink"] * 2})
    ax = plot_footprint(trace).axes[0]
    assert [line.get_label() for line in ax.lines] == ["balloon", "virtio-mem"]
    assert list(ax.lines[0].get_ydata()) == [300, 420, 300]  # MiB
    with pytest.raises(ValueError, match="CompareResult.trace"):
        plot_footprint(pd.DataFrame({"rss": [1]}))


def test_rows_without_a_mechanism_are_refused_with_what_to_pass():
    with pytest.raises(ValueError, match="compare_mechanisms\\(\\)'s per-run rows"):
        compare_table(pd.DataFrame({"shrink_s": [1.0]}), shrink_bytes=MiB)


def test_mechanism_names_are_checked_and_listed():
    assert [m.name for m in parse_mechanisms("virtio-mem, balloon")] == ["virtio-mem", "balloon"]
    assert parse_mechanisms("all") == list(MECHANISMS)
    with pytest.raises(ValueError, match="unknown mechanism balloon-fpr; expected 'all' or a comma-separated "
                                         "list of: balloon, balloon\\+fpr"):
        parse_mechanisms("balloon,balloon-fpr")


@pytest.mark.parametrize("settings, match", [
    (CompareSettings(shrink=3 * MiB), "shrink must be a positive multiple of 2 MiB"),
    (CompareSettings(memory=256 * MiB, shrink=192 * MiB), "cannot shrink by 192 MiB"),
    (CompareSettings(memory=256 * MiB, touch=200 * MiB, shrink=64 * MiB), "or touch 200 MiB"),
])
async def test_settings_a_guest_cannot_do_are_refused_before_anything_starts(settings, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        await compare_mechanisms(MECHANISMS, settings, run_root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no run folder, no guest


@pytest.mark.parametrize("args, message", [
    (("--shrink", "3M"), "shrink must be a positive multiple of 2 MiB (virtio-mem's block), and touch positive: "
                         "got shrink 3 MiB, touch 128 MiB; see 'balloonlab compare --help'"),
    (("--mechanisms", "ballon"), "argument --mechanisms: unknown mechanism ballon; expected 'all' or a "
                                 "comma-separated list of: balloon, balloon+fpr, balloon+deflate-on-oom, "
                                 "virtio-mem, virtio-mem+fpr; see 'balloonlab compare --help'"),
    (("--repeat", "0"), "argument --repeat: expected a whole number of at least 1, got '0'; "
                        "see 'balloonlab compare --help'"),
    (("--json", "."), "--json . is a folder; pass the path of the JSON file to write; see 'balloonlab compare --help'"),
])
def test_bad_compare_options_are_one_line_and_start_nothing(args, message, tmp_path):
    result = run("compare", "--quick", *args, cwd=tmp_path)
    assert_one_error(result, 2, message)
    assert not (tmp_path / "runs").exists()


def test_compare_quick_shows_what_each_mechanism_gives_back(tmp_path):
    result = run("compare", "--quick", "--json", "table.json", cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr
    table = {row["mechanism"]: row for row in json.loads((tmp_path / "table.json").read_text())}
    assert list(table) == [m.name for m in MECHANISMS]
    quick = CompareSettings.quick()
    for name, row in table.items():
        assert {"shrink_s", "grow_s", "host_returned_bytes", "retouch_s"} <= row.keys()
        assert row["runs"] == 1 and row["reached"] == 1, (name, row)  # shrank and grew back, in the guest
        assert 0 < row["shrink_s"] < 30 and 0 <= row["grow_s"] < 30 and row["retouch_s"] > 0, (name, row)
        if name.endswith("+fpr"):  # the freed 128 MiB go back to the host, most of it
            assert row["free_returned_bytes"] >= 0.5 * quick.touch, (name, row)
            assert 0 < row["free_return_s"] <= quick.free_watch_s
        else:  # without reporting, freed guest memory stays resident on the host
            assert row["free_returned_bytes"] <= 16 * MiB, (name, row)
            # ... so the shrink is what gives it back: most of the 128 MiB
            assert row["host_returned_bytes"] >= 0.8 * quick.shrink, (name, row)
    run_dir = next((tmp_path / "runs").iterdir())
    # --quick's own watches and windows, not the defaults' (the CLI once kept only the sizes)
    assert load_run(run_dir).metadata["settings"] == dataclasses.asdict(quick)
    samples = load_run(run_dir).samples
    assert set(samples["guest"]) == {f"cmp-{m.name.replace('+', '-')}-1" for m in MECHANISMS}
    assert (run_dir / "compare.png").stat().st_size > 10_000 and (run_dir / "compare-rss.png").stat().st_size > 10_000
    trace = pd.read_parquet(run_dir / "compare-rss.parquet")
    for name, steps in trace.groupby("mechanism"):  # QEMU's RSS read all through, every step seen
        assert list(dict.fromkeys(steps["step"])) == ["touch", "free", "shrink", "grow", "re-touch", "done"], name
        assert steps["t_s"].iloc[0] == 0 and steps["t_s"].is_monotonic_increasing and len(steps) > 100, name
    assert (run_dir / "compare.json").read_text() == (tmp_path / "table.json").read_text()
    assert "virtio-mem+fpr" in result.stdout and run_dir.name in result.stdout


async def test_rss_settles_within_a_window_when_the_polls_drift():
    """A flat RSS read every 50.5 ms settles in a 0.5 s window (a window cut at exactly 0.5 s
    then held 0.45 s of readings and never closed: a 60 s timeout per step on QEMU 10)."""
    from balloonlab.experiments.compare_run import _Rss
    s = dataclasses.replace(CompareSettings.quick(), rss_poll_s=0.0505, stable_bytes=64 << 20, timeout_s=10)
    rss = _Rss(os.getpid(), s)
    started = time.monotonic()
    value, stable_from = await rss.settle(started)
    took = time.monotonic() - started
    assert value > 0 and stable_from < 0.2 and 0.5 <= took < 2.0, (stable_from, took)
    assert rss.trace[-1][0] - rss.trace[0][0] >= 0.5
