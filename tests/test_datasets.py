"""Many run folders as one dataset (open_runs): every row once, equal to load_run, SQL over it,
and other engines (Dask) reading a run folder as it is. Runs are written by the store's own
writer, flush by flush, as a sampler writes them."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from balloonlab.record.buffer import concat_frames, event_buffer, sample_buffer
from balloonlab.record.datasets import open_runs
from balloonlab.record.store import RunWriter, SkippedPartWarning, load_run

T0 = 1_700_000_000
#: Runs of the fleet fixture: name -> (hosts, guests, rows, extra stat column or None).
FLEET = {
    "r1-two-hosts": (["lab1", "198.18.1.2"], 3, 240, None),
    "r2-new-qemu": (["lab1", "rack/7=b"], 4, 200, "future_stat"),  # a stat only a newer QEMU reports
    "r3-many-guests": (["lab2"], 130, 390, None),  # 130 categories: pandas writes int16 codes, not int8
}
CRASHED = "r4-crashed"


def write_run(path: Path, hosts: list[str], guests: int, n: int, extra: str | None = None, *,
              flushes: int = 4, merge_factor: int = 4, seed: int = 0) -> RunWriter:
    """A run of ``n`` sample rows (guests taking turns, guest i on host i % len(hosts)) and a
    few events, flushed in ``flushes`` batches by the store's writer."""
    rng = np.random.default_rng(seed)
    writer = RunWriter(path, merge_factor=merge_factor)
    writer.write_metadata(status="running", seed=seed)
    samples, events = sample_buffer(), event_buffer()
    for i in range(n):
        g, k = i % guests, i // guests
        row = {"guest": f"g{g:03d}", "host": hosts[g % len(hosts)], "last_update": T0 + k,
               "free_memory": int(rng.integers(100, 400)) << 20, "available_memory": (seed << 30) + i,
               "actual": 512 << 20, "age_s": float(rng.lognormal(-1, 1)), "reset": False}
        if extra is not None:
            row[extra] = 1000 + i
        samples.append((T0 + k) * 10**9 + g * 1000, row)
        if k == 0:
            events.append((T0 + k) * 10**9, {"guest": row["guest"], "host": row["host"], "kind": "launch",
                                             "detail": f"run {path.name}"})
    cuts = [n * j // flushes for j in range(flushes + 1)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        writer.flush(samples.frame(a, b), events.frame(min(a, len(events)), min(b, len(events))))
    writer.write_metadata(status="done")
    return writer


def crash_between_merge_and_cleanup(path: Path) -> Path:
    """A run whose last merge was written but whose inputs were never deleted (the process
    died in between): 3 parts of host lab1 and the part covering them, side by side."""
    writer = write_run(path, ["lab1"], 2, 60, flushes=3, merge_factor=1000, seed=4)
    folder = path / "samples/host=lab1"
    inputs = sorted(folder.iterdir())
    assert len(inputs) == 3
    keep = path.parent / "kept-parts"
    shutil.copytree(folder, keep)
    writer.compact()
    assert [p.name for p in folder.iterdir()] == ["p-000000000000-000000000060.parquet"]
    for part in keep.iterdir():
        shutil.copy(part, folder / part.name)
    shutil.rmtree(keep)
    return folder


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    for seed, (name, (hosts, guests, n, extra)) in enumerate(FLEET.items(), 1):
        write_run(root / name, hosts, guests, n, extra, seed=seed)
    crash_between_merge_and_cleanup(root / CRASHED)
    (root / "notes").mkdir()  # a folder that is not a run, skipped
    (root / "README.txt").write_text("not a run either")
    return root


def compared(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` in a fixed row order, categories as strings."""
    out = frame[columns].reset_index()
    for name in ("guest", "host", "kind"):
        if name in out.columns:
            out[name] = out[name].astype(str)
    return out.sort_values(["time", *[c for c in ("guest", "kind") if c in columns]], kind="stable").reset_index(
        drop=True)


def test_the_dataset_holds_every_run_row_once_equal_to_load_run(fleet):
    runs = open_runs(fleet)
    assert [p.name for p in runs.runs] == [*FLEET, CRASHED]
    table = runs.dataset.to_table()
    assert table.num_rows == sum(n for _, _, n, _ in FLEET.values()) + 60
    assert table.schema.field("run").type == "string" and table.schema.field("host").type == "string"
    for run in runs.runs:
        want = load_run(run).samples
        got = runs.to_pandas(filter=ds.field("run") == run.name)
        assert len(got) == len(want) and set(got["run"]) == {run.name}
        assert list(got.columns[:3]) == ["run", "guest", "host"] and got.index.name == "time"
        columns = [c for c in want.columns if c in got.columns]
        assert columns == list(want.columns)  # every column load_run gives, with its dtype
        pd.testing.assert_frame_equal(got[columns], want, check_categorical=False, check_freq=False)
        assert runs.metadata[run.name]["status"] == "done"


def test_a_crash_between_merge_and_cleanup_doubles_no_row(fleet):
    folder = fleet / CRASHED / "samples/host=lab1"
    assert len(list(folder.iterdir())) == 4  # the merged part and its three inputs
    runs = open_runs(fleet / CRASHED)
    assert [f.name for f in runs.files] == ["p-000000000000-000000000060.parquet"] and runs.skipped == []
    frame = runs.to_pandas()
    assert len(frame) == 60 and frame["available_memory"].tolist() == [(4 << 30) + i for i in range(60)]
    assert runs.sql("select count(*), count(distinct available_memory) from samples").fetchall() == [(60, 60)]


def test_an_unreadable_merged_part_gives_way_to_its_inputs(tmp_path):
    folder = crash_between_merge_and_cleanup(tmp_path / "run")
    merged = folder / "p-000000000000-000000000060.parquet"
    merged.write_bytes(merged.read_bytes()[:100])  # truncated: no footer
    with pytest.warns(SkippedPartWarning, match="p-000000000000-000000000060"):
        runs = open_runs(tmp_path / "run")
    assert runs.skipped == [merged] and len(runs.files) == 3
    assert runs.to_pandas()["available_memory"].tolist() == [(4 << 30) + i for i in range(60)]


def test_a_stat_column_of_one_run_is_null_in_the_others_and_guest_dictionaries_unify(fleet):
    runs = open_runs(fleet)
    counts = dict(runs.sql("select run, count(future_stat) from samples group by run").fetchall())
    assert counts == {"r1-two-hosts": 0, "r2-new-qemu": 200, "r3-many-guests": 0, CRASHED: 0}
    frame = runs.to_pandas(columns=["guest", "future_stat"], filter=ds.field("run") == "r2-new-qemu")
    assert frame["future_stat"].dtype == "Int64" and frame["future_stat"].tolist() == list(range(1000, 1200))
    guests = runs.to_pandas(columns=["run", "guest"])
    assert isinstance(guests["guest"].dtype, pd.CategoricalDtype)
    assert guests.groupby("run", observed=True)["guest"].nunique().to_dict() == {
        "r1-two-hosts": 3, "r2-new-qemu": 4, "r3-many-guests": 130, CRASHED: 2}


def test_sql_p99_age_and_mean_free_memory_per_host_and_guest_equal_pandas_over_load_run(fleet):
    runs = open_runs(fleet)
    got = runs.sql("select host, guest, quantile_cont(age_s, 0.99) as p99_age_s, avg(free_memory) as "
                   "mean_free_memory, count(*) as n from samples group by all order by host, guest").df()
    frames = [load_run(run).samples for run in runs.runs]
    whole = concat_frames(frames)
    want = (whole.astype({"host": str, "guest": str}).groupby(["host", "guest"])
            .agg(p99_age_s=("age_s", lambda s: s.quantile(0.99)), mean_free_memory=("free_memory", "mean"),
                 n=("age_s", "size")).reset_index())
    # lab1's g000 and g002 are in r1 and r2, lab1's g000 and g001 in r4: 3 + 4 + 130 + 2 - 3 groups
    assert len(got) == len(want) == 136
    assert got[["host", "guest"]].values.tolist() == want[["host", "guest"]].values.tolist()
    assert got["n"].tolist() == want["n"].tolist()
    for column in ("p99_age_s", "mean_free_memory"):
        for a, b in zip(got[column], want[column], strict=True):
            assert math.isclose(a, float(b), rel_tol=1e-9), column
    con = runs.duckdb()  # a connection of one's own, with the view named after the table
    assert con.sql("select count(distinct host) from samples").fetchall() == [(4,)]


def test_a_glob_a_list_and_a_folder_of_runs_give_the_same_runs(fleet):
    by_folder = open_runs(fleet).runs
    assert open_runs(str(fleet / "r*")).runs == by_folder
    assert open_runs([fleet / "r2-new-qemu", fleet / "r1-two-hosts", fleet / "notes"]).runs == by_folder[:2]
    assert [p.name for p in open_runs(f"{fleet}/r[12]-*").runs] == ["r1-two-hosts", "r2-new-qemu"]
    events = open_runs(fleet / "r1-two-hosts", table="events")
    assert compared(events.to_pandas(), ["guest", "host", "kind", "detail"]).equals(
        compared(load_run(fleet / "r1-two-hosts").events, ["guest", "host", "kind", "detail"]))


def test_filters_on_run_and_host_read_only_their_files(fleet):
    runs = open_runs(fleet)
    fragments = list(runs.dataset.get_fragments(filter=ds.field("host") == "rack/7=b"))
    assert [Path(f.path).parent.name for f in fragments] == ["host=rack%2F7%3Db"]
    frame = runs.to_pandas(columns=["free_memory"], filter=ds.field("host") == "rack/7=b")
    assert len(frame) == 100 and list(frame.columns) == ["free_memory"] and frame.index.name == "time"


def test_bad_input_says_what_was_given_and_what_a_run_folder_is(tmp_path, fleet):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.parquet").write_text("")
    (tmp_path / "no-runs" / "sub").mkdir(parents=True)
    cases = {
        str(tmp_path / "empty"): "is an empty folder",
        str(tmp_path / "file.parquet"): "file.parquet is a file, not a folder",
        str(tmp_path / "no-runs"): "no-runs is a folder with no run folders in it",
        str(tmp_path / "nothing-*"): "the glob .*nothing-\\*' matched nothing",
    }
    for given, message in cases.items():
        with pytest.raises(FileNotFoundError, match=f"no run folder found: .*{message}.*a run folder is a directory"
                                                    " holding run.json"):
            open_runs(given)
    with pytest.raises(FileNotFoundError, match="no run folder found: no paths were given"):
        open_runs([])
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        open_runs([fleet / "r1-two-hosts", tmp_path / "missing"])
    with pytest.raises(ValueError, match="table must be one of samples, events, host, got 'sample'"):
        open_runs(fleet, table="sample")
    shutil.copytree(fleet / "r1-two-hosts", tmp_path / "again" / "r1-two-hosts")
    with pytest.raises(ValueError, match="two runs are named 'r1-two-hosts'"):
        open_runs([fleet, tmp_path / "again"])


def test_an_older_format_run_says_to_use_load_run(tmp_path):
    old = tmp_path / "old"
    (old / "samples").mkdir(parents=True)
    (old / "run.json").write_text('{"format": 3}')
    with pytest.raises(ValueError, match=r"format-3 run folder and open_runs reads format 4; load it with balloonlab.load_run\("):
        open_runs(old)


def test_without_duckdb_sql_says_how_to_install_it(fleet, monkeypatch):
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'balloonlab\[fleet\]'"):
        open_runs(fleet / "r1-two-hosts").sql("select 1")


def test_dask_reads_a_run_folder_as_it_is_with_host_from_the_partitions(fleet):
    dd = pytest.importorskip("dask.dataframe")
    import dask
    run = fleet / "r2-new-qemu"
    with dask.config.set(scheduler="synchronous"):
        got = dd.read_parquet(run / "samples").compute()
    want = load_run(run).samples
    assert len(got) == len(want) == 200 and isinstance(got["host"].dtype, pd.CategoricalDtype)
    columns = ["guest", "host", "free_memory", "available_memory", "age_s", "future_stat", "last_update"]
    pd.testing.assert_frame_equal(compared(got, columns), compared(want, columns), check_dtype=False)


def test_dask_over_open_runs_files_skips_what_a_crash_left_that_the_folder_as_is_doubles(fleet):
    dd = pytest.importorskip("dask.dataframe")
    import dask
    run = fleet / CRASHED
    with dask.config.set(scheduler="synchronous"):
        as_is = dd.read_parquet(run / "samples").compute()
        files = [str(f) for f in open_runs(run).files]
        chosen = dd.read_parquet(files, dataset={"partitioning": "hive"}).compute()
    assert len(as_is) == 120  # the merged part and its inputs, both read
    assert len(chosen) == 60 and set(chosen["host"]) == {"lab1"}
    assert sorted(chosen["available_memory"]) == [(4 << 30) + i for i in range(60)]
