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
                      {"guest": guest, "last_update": 1_700_000_000 + i, "free_memory": 1000 + i,
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
    buf.append(3 * 10**18, {"guest": "g", "oom_kills": 4})
    df = buf.frame()
    assert df["oom_kills"].dtype == "Int64"
    assert df["oom_kills"].isna().tolist() == [True, True, False] and df["oom_kills"].iloc[-1] == 4


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


def test_run_folder_round_trips_frames_across_flushes_and_compaction(tmp_path):
    writer = RunWriter(tmp_path / "run", compact_every=3)
    writer.write_metadata(status="running")
    samples, events = sample_buffer(), event_buffer()
    done = 0
    for flush in range(5):
        rows(samples, 4, "a", flush * 4)
        rows(samples, 2, "b", flush * 4)
        events.append(10**18 + flush, {"guest": "a", "kind": "target", "value": 256 << 20, "detail": "x"})
        writer.flush(samples.frame(done), events.frame(flush, flush + 1))
        done = samples.total_rows
    files = sorted(p.name for p in (tmp_path / "run/samples/guest=a").iterdir())
    assert files == ["p-000001-000003.parquet", "p-000004-000004.parquet", "p-000005-000005.parquet"]
    run = load_run(tmp_path / "run")
    expected = samples.frame().sort_index(kind="stable")
    pd.testing.assert_frame_equal(run.samples, expected, check_freq=False)
    assert run.events["kind"].tolist() == ["target"] * 5


def test_crash_between_merge_and_cleanup_does_not_duplicate_rows(tmp_path):
    writer = RunWriter(tmp_path / "run", compact_every=1000)
    writer.write_metadata(status="running")
    buf = sample_buffer()
    for flush in range(3):
        rows(buf, 2, "a", flush * 2)
        writer.flush(buf.frame(flush * 2), event_buffer().frame())
    folder = tmp_path / "run/samples/guest=a"
    keep = tmp_path / "parts"
    shutil.copytree(folder, keep)
    writer.compact()
    for part in keep.iterdir():  # the parts are back, as if the process died before unlinking
        shutil.copy(part, folder / part.name)
    assert len(read_table(tmp_path / "run", "samples")) == 6


def test_a_run_folder_is_not_overwritten(tmp_path):
    RunWriter(tmp_path / "run").write_metadata(status="running")
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunWriter(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="not a balloonlab run folder"):
        load_run(tmp_path)
