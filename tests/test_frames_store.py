"""Columnar buffers and run folders, without guests: dtypes, new columns, compaction, crashes."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from balloonlab.record.buffer import event_buffer, sample_buffer
from balloonlab.record.store import RunWriter, load_run, read_table


def rows(buffer, n, guest="g", start=0):
    for i in range(start, start + n):
        buffer.append(1_700_000_000_000_000_000 + i * 10**9,
                      {"guest": guest, "host": "h", "last_update": 1_700_000_000 + i, "free_memory": 1000 + i,
                       "actual": 512 << 20, "age_s": 0.25, "reset": i == 2})


def test_sample_frame_has_the_schema_dtypes():
    buf = sample_buffer()
    rows(buf, 3)
    df = buf.frame()
    assert str(df.index.dtype) == "datetime64[ns, UTC]" and df.index.name == "time"
    assert isinstance(df["guest"].dtype, pd.CategoricalDtype)
    assert str(df["last_update"].dtype) == "datetime64[ns, UTC]"
    assert df["free_memory"].dtype == "Int64" and df["swap_in"].isna().all()
    assert df["age_s"].dtype == "Float64" and df["reset"].dtype == bool
    assert df["free_memory"].tolist() == [1000, 1001, 1002] and df["reset"].tolist() == [False, False, True]


def test_a_new_stat_name_becomes_a_column_missing_in_earlier_rows():
    buf = sample_buffer()
    rows(buf, 2)
    buf.append(3 * 10**18, {"guest": "g", "unknown_stat": 4})
    df = buf.frame()
    assert df["unknown_stat"].dtype == "Int64"
    assert df["unknown_stat"].isna().tolist() == [True, True, False] and df["unknown_stat"].iloc[-1] == 4



def test_rows_appended_out_of_time_order_come_out_in_time_order_like_a_saved_run():
    # Two guests: b's sample is stamped with its report's time, a little before a's row that
    # was appended first (the sampler stamps rows with ReportClock.report_time).
    buf = sample_buffer()
    buf.append(1_000_000_300, {"guest": "a", "free_memory": 1})
    buf.append(1_000_000_200, {"guest": "b", "free_memory": 2})
    buf.append(1_000_000_200, {"guest": "a", "free_memory": 3})  # equal times keep append order
    buf.append(1_000_000_400, {"guest": "b", "free_memory": 4})
    df = buf.frame()
    assert df.index.is_monotonic_increasing
    assert df["free_memory"].tolist() == [2, 3, 1, 4] and df["guest"].tolist() == ["b", "a", "a", "b"]

def test_values_beyond_int64_become_missing_not_a_crash():
    buf = sample_buffer()
    buf.append(1, {"guest": "g", "free_memory": 2**64 - 2})
    assert buf.frame()["free_memory"].isna().all()


def test_dropping_flushed_rows_keeps_absolute_row_numbers():
    buf = sample_buffer()
    rows(buf, 10)
    buf.drop_head(7)
    assert len(buf) == 3 and buf.total_rows == 10
    assert buf.frame(7)["free_memory"].tolist() == [1007, 1008, 1009]
    assert buf.frame(8, 9)["free_memory"].tolist() == [1008]


def test_run_folder_round_trips_frames_across_flushes_and_merges(tmp_path):
    writer = RunWriter(tmp_path / "run", merge_factor=2)
    writer.write_metadata(status="running")
    samples, events = sample_buffer(), event_buffer()
    done = 0
    for flush in range(5):
        rows(samples, 4, "a", flush * 4)
        rows(samples, 2, "b", flush * 4)
        events.append(10**18 + flush, {"guest": "a", "kind": "target", "value": 256 << 20, "detail": "x"})
        assert writer.flush(samples.frame(done), events.frame(flush, flush + 1)) == (6 * (flush + 1), flush + 1)
        done = samples.total_rows
    # One part per flush for both guests (rows numbered across guests, 6 a flush), merged
    # 6+6, 12+6+6 (each merge at least doubles); the fifth is still alone.
    files = sorted(p.name for p in (tmp_path / "run/samples/host=h").iterdir())
    assert files == ["p-000000000000-000000000024.parquet", "p-000000000024-000000000030.parquet"]
    run = load_run(tmp_path / "run")
    expected = samples.frame().sort_index(kind="stable")
    pd.testing.assert_frame_equal(run.samples, expected, check_freq=False)
    assert run.events["kind"].tolist() == ["target"] * 5 and run.skipped == []


def test_crash_between_merge_and_cleanup_does_not_duplicate_rows(tmp_path):
    writer = RunWriter(tmp_path / "run", merge_factor=1000)
    writer.write_metadata(status="running")
    buf = sample_buffer()
    for flush in range(3):
        rows(buf, 2, "a", flush * 2)
        writer.flush(buf.frame(flush * 2), event_buffer().frame())
    folder = tmp_path / "run/samples/host=h"
    keep = tmp_path / "parts"
    shutil.copytree(folder, keep)
    assert len(list(keep.iterdir())) == 3
    writer.compact()
    assert [p.name for p in folder.iterdir()] == ["p-000000000000-000000000006.parquet"]
    for part in keep.iterdir():  # the parts are back, as if the process died before unlinking
        shutil.copy(part, folder / part.name)
    table = read_table(tmp_path / "run", "samples")
    assert table["free_memory"].tolist() == [1000 + i for i in range(6)]


def test_a_run_folder_is_not_overwritten(tmp_path):
    RunWriter(tmp_path / "run").write_metadata(status="running")
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunWriter(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a balloonlab run folder"):
        load_run(tmp_path)


# -- snapshots: frames built off the appending thread -------------------------------------------

def _chunked_buffer(monkeypatch, n: int = 23, chunk: int = 4):
    """A samples buffer of ``n`` rows sealed every ``chunk`` rows; ``unknown_stat`` appears at row 9,
    guest ``a`` at row 5 (so its code is not its sorted position)."""
    import balloonlab.record.buffer as buffer
    monkeypatch.setattr(buffer, "CHUNK_ROWS", chunk)
    buf = buffer.sample_buffer()
    for i in range(n):
        row = {"guest": "z" if i < 5 else ("a" if i % 2 else "m"), "last_update": 1_700_000_000 + i,
               "free_memory": 1000 + i, "age_s": None if i % 3 else 0.5, "reset": i == 7}
        if i >= 9:
            row["unknown_stat"] = i
        buf.append(1_700_000_000_000_000_000 + i * 10**9, row)
    return buf


def test_snapshot_frames_over_sealed_chunks_are_the_rows_appended(monkeypatch):
    buf = _chunked_buffer(monkeypatch)
    # Sealed: rows 0-3, 4-7, 8 (sealed when unknown_stat widened the layout at row 9), 9-12, 13-16,
    # 17-20; rows 21 and 22 unsealed.
    assert [len(b) for b in buf._sealed] == [4, 4, 1, 4, 4, 4] and buf._unsealed == 2
    buf.drop_head(6)  # one chunk freed, two rows of the next dropped
    assert len(buf._sealed) == 5 and buf.total_rows == 23 and len(buf) == 17
    df = buf.snapshot(6).frame()
    assert df["free_memory"].tolist() == [1000 + i for i in range(6, 23)]
    assert df["unknown_stat"].isna().tolist() == [True] * 3 + [False] * 14 and df["unknown_stat"].iloc[-1] == 22
    assert list(df["guest"].cat.categories) == ["a", "m", "z"] and df["guest"].iloc[0] == "m"
    assert df["age_s"].isna().sum() == 11 and df["reset"].tolist() == [i == 7 for i in range(6, 23)]
    assert str(df.index.dtype) == "datetime64[ns, UTC]" and str(df["last_update"].dtype) == "datetime64[ns, UTC]"
    assert df["last_update"].iloc[0] == pd.Timestamp(1_700_000_006, unit="s", tz="UTC")
    # Absolute row numbers across the chunk boundaries, as RowBuffer.frame(start, stop) gives them.
    assert buf.snapshot(7, 13).frame()["free_memory"].tolist() == list(range(1007, 1013))
    pd.testing.assert_frame_equal(buf.snapshot(10, 21).frame(), buf.frame(10, 21))
    assert len(buf.snapshot(0, 3).frame()) == 0 and len(buf.snapshot(30).frame()) == 0


def test_a_snapshot_stays_as_taken_while_rows_are_appended_and_dropped(monkeypatch):
    buf = _chunked_buffer(monkeypatch, n=10)
    snap = buf.snapshot()
    before = snap.frame()
    for i in range(10, 30):  # seals chunks, adds a guest and fills the unsealed rows taken
        buf.append(1_800_000_000_000_000_000 + i, {"guest": "b", "free_memory": -i, "swap_in": i})
    buf.drop_head(15)
    after = snap.frame()
    pd.testing.assert_frame_equal(after, before)
    assert list(after["guest"].cat.categories) == ["a", "m", "z"] and len(after) == 10
    after.loc[after.index[-1], "free_memory"] = -1  # a frame never shares the buffer's chunks
    assert buf.frame(15)["free_memory"].iloc[0] == -15 and snap.frame()["free_memory"].iloc[-1] == 1009


def test_frames_built_in_another_thread_while_rows_are_appended_are_exact_prefixes(monkeypatch):
    import threading
    buf = _chunked_buffer(monkeypatch, n=0, chunk=64)
    snapshots, stop = [], threading.Event()
    built: list[pd.DataFrame] = []

    def build() -> None:  # the notebook's thread: builds whatever the appending thread froze last
        while not stop.is_set() or snapshots:
            if snapshots:
                built.append(snapshots.pop().frame())
    worker = threading.Thread(target=build)
    worker.start()
    for i in range(5000):  # this thread plays the sampling loop: it appends and takes snapshots
        buf.append(10**18 + i, {"guest": f"g{i % 7}", "free_memory": i, "age_s": i / 8})
        if i % 97 == 0:
            snapshots.append(buf.snapshot())
    stop.set()
    worker.join(60)
    whole = buf.frame()
    assert len(built) >= 2 and {len(f) for f in built} <= {i + 1 for i in range(0, 5000, 97)}
    for frame in built:
        expected = whole.iloc[:len(frame)].copy()
        expected["guest"] = expected["guest"].cat.set_categories(sorted(set(frame["guest"].astype(str))))
        pd.testing.assert_frame_equal(frame, expected, check_freq=False)


def test_extend_with_a_frame_gives_the_rows_appends_would(monkeypatch):
    buf = _chunked_buffer(monkeypatch, n=23, chunk=5)
    source = buf.frame()
    other = sample_buffer()
    other.append(1, {"guest": "m", "free_memory": 1})  # "m" already has code 0 here
    other.extend(source)
    pd.testing.assert_frame_equal(other.frame(1), source)
    assert other.total_rows == 24 and other.frame()["unknown_stat"].isna().sum() == 10
    events = event_buffer()
    events.append(5, {"guest": "a", "kind": "target", "value": 7, "detail": None})
    events.append(6, {"guest": "b", "kind": "error", "duration_s": 0.5, "detail": "boom"})
    copy = event_buffer()
    copy.extend(events.frame())
    pd.testing.assert_frame_equal(copy.frame(), events.frame())
    with pytest.raises(KeyError, match="unknown column 'nope'"):
        copy.extend(events.frame().assign(nope=1))


def test_snapshot_since_and_categories_present_select_by_time_not_position(monkeypatch):
    buf = _chunked_buffer(monkeypatch, n=0, chunk=4)
    for i, t in enumerate([5, 1, 9, 2, 8, 3, 7, 7, 0, 6]):  # out of time order, as events can be
        buf.append(t * 10**9, {"guest": "late" if t >= 7 else "early", "free_memory": i})
    snap = buf.snapshot()
    assert snap.max_time_ns() == 9 * 10**9 and buf.snapshot(3, 3).max_time_ns() is None
    later = snap.since(6 * 10**9)
    # Rows at times 9, 8, 7, 7, 6 (appended in that order): the frame is in time order.
    assert later.frame()["free_memory"].tolist() == [9, 6, 7, 4, 2] and len(later) == 5
    assert snap.categories_present("guest") == ["early", "late"]
    assert later.categories_present("guest") == ["early", "late"] and snap.since(7 * 10**9).categories_present(
        "guest") == ["late"]


def test_sync_sampler_and_live_plot_build_frames_off_the_sampling_loop(monkeypatch):
    import threading

    import matplotlib
    import numpy as np
    matplotlib.use("Agg")
    from balloonlab.analysis.plotting import plot_memory
    from balloonlab.blocking import SyncSampler
    from balloonlab.blocking import loop as bl_loop
    from balloonlab.record.buffer import BufferSnapshot
    from balloonlab.widgets.live_plot import LivePlot

    MiB = 1 << 20
    builders = []
    original = BufferSnapshot.frame
    built_rows = []
    monkeypatch.setattr(BufferSnapshot, "frame", lambda self: builders.append(threading.current_thread().name)
                        or built_rows.append(len(self)) or original(self))
    sampler = SyncSampler()

    async def on_loop(fn):
        return fn()

    def fill() -> None:  # 20 minutes of two guests, and one that left before the plot's window
        for t in range(1200):
            for guest in ("a", "b") if t >= 100 else ("a", "b", "gone"):
                sampler.aio._samples.append(t * 10**9, {"guest": guest, "free_memory": t * MiB,
                                                        "total_memory": 512 * MiB, "actual": 512 * MiB})
        sampler.aio.record_event("a", "target", 256 * MiB, at=1000.0)
        sampler.aio.record_event("gone", "shutdown", None, at=50.0)
    bl_loop.run(on_loop(fill))
    frame, events = sampler.frame(), sampler.events()
    assert builders == ["MainThread", "MainThread"]  # not "balloonlab-loop"
    pd.testing.assert_frame_equal(frame, bl_loop.run(on_loop(sampler.aio.frame)))
    assert len(frame) == 2500 and frame.attrs == {"dropped_rows": 0} and len(events) == 2
    plot = LivePlot(sampler, refresh_s=5, window_s=300)
    try:
        builders.clear()
        assert plot.refresh() == 2500 and set(builders) == {"MainThread"}
        # Only the window's rows were built, yet the lines are what the whole frames draw.
        whole = plot_memory(frame, events, guests=["a", "b", "gone"], window=300)
        for guest, lines in whole._balloonlab_lines.items():
            for name, line in lines.items():
                shown = plot.figure._balloonlab_lines[guest][name]
                np.testing.assert_array_equal(shown.get_xdata(), line.get_xdata(), err_msg=f"{guest} {name}")
                np.testing.assert_array_equal(shown.get_ydata(), line.get_ydata(), err_msg=f"{guest} {name}")
        assert plot.points == 2 * 301 and 'data-samples="2500" data-events="2"' in plot.info.value
        assert list(plot.figure._balloonlab_lines) == ["a", "b", "gone"]  # "gone" is before the window

        def more() -> None:  # one more minute of both guests, and an event dated earlier
            for t in range(1200, 1260):
                for guest in ("a", "b"):
                    sampler.aio._samples.append(t * 10**9, {"guest": guest, "free_memory": t * MiB,
                                                            "total_memory": 512 * MiB, "actual": 512 * MiB})
            sampler.aio.record_event("b", "target", 128 * MiB, at=1150.0)
        bl_loop.run(on_loop(more))
        built_rows.clear()
        assert plot.refresh() == 2620
        assert built_rows == [120, 1]  # only the rows recorded since the last refresh were built
        whole = plot_memory(sampler.frame(), sampler.events(), guests=["a", "b", "gone"], window=300)
        for guest, lines in whole._balloonlab_lines.items():
            for name, line in lines.items():
                shown = plot.figure._balloonlab_lines[guest][name]
                np.testing.assert_array_equal(shown.get_xdata(), line.get_xdata(), err_msg=f"{guest} {name}")
                np.testing.assert_array_equal(shown.get_ydata(), line.get_ydata(), err_msg=f"{guest} {name}")
        assert 'data-samples="2620" data-events="3"' in plot.info.value
    finally:
        plot.close()
        sampler.stop()
