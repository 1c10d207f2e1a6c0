"""Run folders under faults: a disk that fills up mid-run (a real tmpfs), a flush failing
part-way, truncated parts, long runs (names, merge cost), any guest name, exit without stop."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from balloonlab import Sampler, load_run
from balloonlab.record import store
from balloonlab.record.buffer import event_buffer, sample_buffer
from balloonlab.record.store import RunWriter, SkippedPartWarning

from .conftest import RUNTIME_ROOT, qemu_pids_under


def rows(buffer, n, guest="g", start=0):
    for i in range(start, start + n):
        buffer.append(1_700_000_000_000_000_000 + i * 10**9,
                      {"guest": guest, "host": "h", "last_update": 1_700_000_000 + i, "free_memory": 1000 + i,
                       "actual": 512 << 20, "age_s": 0.25, "reset": False})


#: The host partition of the rows above (format 4: RUN/TABLE/host=NAME/).
H = "host=h"


def part_names(folder: Path) -> list[str]:
    """The part files of a table, in all its host partitions."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def name(first: int, end: int) -> str:
    return f"p-{first:012d}-{end:012d}.parquet"


@pytest.fixture
def small_fs(tmp_path):
    """Mount a real tmpfs (``small_fs(size="4m")``); unmounted after the test."""
    mounted = []
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where
    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run([*sudo, "umount", str(where)], check=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem has not one block left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 64 << 10, 4 << 10, 512):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    assert os.statvfs(path.parent).f_bavail == 0


async def until(condition, what, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- a flush failing part-way ------------------------------------------------------------
def second_write_fails(monkeypatch) -> list[Path]:
    """The store's second part write raises ENOSPC (once); returns the paths of every write."""
    real, calls = store._write_parquet, []

    def fail_second(path, frame):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, frame)
    monkeypatch.setattr(store, "_write_parquet", fail_second)
    return calls


async def test_a_flush_failing_after_its_first_part_leaves_nothing_twice_and_keeps_the_rest_in_memory(
        tmp_path, monkeypatch):
    # no host frame: its parts would be written by the same flush and shift the count of writes
    sampler = Sampler(run_dir=tmp_path / "run", max_rows_in_memory=1, flush_interval_s=600, host_interval_s=None)
    await sampler.start()  # no guest: rows are appended below, flushes called by hand
    rows(sampler._samples, 3, "a", 0)
    rows(sampler._samples, 2, "b", 3)
    sampler.record_event("a", "target", 1 << 28)
    calls = second_write_fails(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        await sampler.flush()  # the samples part is written, the events part fails
    samples, events = tmp_path / "run/samples", tmp_path / "run/events"
    assert part_names(samples) == [name(0, 5)] and part_names(events) == []
    assert sampler._flushed == (5, 0)  # the samples on disk count, the event does not...
    assert len(sampler._samples) == 1 and len(sampler._events) == 1  # ...and stays in memory
    rows(sampler._samples, 2, "a", 5)
    await sampler.flush()
    assert len(calls) == 4  # the two new samples and the event: nothing written twice
    assert part_names(samples) == [name(0, 5), name(5, 7)] and part_names(events) == [name(0, 1)]
    assert sampler._flushed == (7, 1) and len(sampler._samples) == 1  # on disk: dropped from memory
    await sampler.stop()
    run = load_run(tmp_path / "run")
    assert run.samples["free_memory"].tolist() == [1000 + i for i in range(7)]
    assert run.samples["guest"].tolist() == ["a"] * 3 + ["b"] * 2 + ["a"] * 2
    assert run.events[["guest", "kind", "value"]].values.tolist() == [["a", "target", 1 << 28]]


def test_a_part_renamed_but_not_fsynced_is_removed_and_written_again_once(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path / "run")
    writer.write_metadata(status="running")
    buf = sample_buffer()
    rows(buf, 2, "a", 0)
    rows(buf, 2, "b", 2)
    from balloonlab.model import files
    real, failed = files.fsync_dir, []

    def folder_fsync_fails_once(path):
        if path.name == H and not failed:  # the fsync after the part's rename
            failed.append(path)
            raise OSError(errno.EIO, "Input/output error")
        real(path)
    monkeypatch.setattr(files, "fsync_dir", folder_fsync_fails_once)
    with pytest.raises(OSError, match="Input/output"):
        writer.flush(buf.frame(), event_buffer().frame())
    folder = tmp_path / "run/samples" / H
    assert failed and list(folder.iterdir()) == [] and writer.durable == (0, 0)
    rows(buf, 1, "b", 4)
    assert writer.flush(buf.frame(), event_buffer().frame(), first=(0, 0)) == (5, 0)
    assert part_names(folder) == [name(0, 5)]
    assert store.read_table(tmp_path / "run", "samples")["free_memory"].tolist() == [1000, 1001, 1002, 1003, 1004]


# -- names and long runs -----------------------------------------------------------------
def test_part_names_past_a_million_rows_load_in_numeric_order(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_metadata(status="running")
    def events(lo, hi):  # event rows lo..hi, the value being the row number
        return pd.DataFrame({"guest": pd.Categorical(["g"] * (hi - lo)), "host": "h", "kind": pd.Categorical(["target"] * (hi - lo)),
                             "value": pd.array(range(lo, hi), dtype="Int64")},
                            index=pd.DatetimeIndex(pd.to_datetime(range(lo, hi), unit="s", utc=True), name="time"))
    n = 1_000_003
    writer.flush(sample_buffer().frame(), events(0, n))
    for i in range(n, n + 3):
        writer.flush(sample_buffer().frame(), events(i, i + 1))
    assert part_names(tmp_path / "run/events") == [
        name(0, n), name(n, n + 1), name(n + 1, n + 2), name(n + 2, n + 3)]
    events = load_run(tmp_path / "run").events
    assert len(events) == n + 3 and events["value"].tolist()[-4:] == [n - 1, n, n + 1, n + 2]
    assert (events["value"].to_numpy() == range(n + 3)).all()


def test_a_format_1_run_loads_past_flush_999999_with_names_unescaped(tmp_path):
    run = tmp_path / "old"
    folder = run / "samples" / "guest=a%2Fb"  # format 1 did not escape: this is the name
    folder.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": 1, "status": "finished"}))
    buf = sample_buffer()
    rows(buf, 6, "a%2Fb")
    parts = {"p-000001-999998.parquet": (0, 3), "p-000002-000002.parquet": (1, 2),  # covered
             "p-999999-999999.parquet": (3, 4), "p-1000000-1000000.parquet": (4, 5),
             "p-1000001-1000001.parquet": (5, 6)}
    for part, (lo, hi) in parts.items():
        buf.frame(lo, hi).drop(columns="guest").to_parquet(folder / part)
    loaded = load_run(run)
    assert loaded.samples["free_memory"].tolist() == [1000, 1001, 1002, 1003, 1004, 1005]
    assert set(loaded.samples["guest"]) == {"a%2Fb"} and loaded.skipped == []


def test_tiered_merges_rewrite_each_row_a_logarithmic_number_of_times(small_fs, monkeypatch):
    root = small_fs("256m")
    writer = RunWriter(root / "run")
    writer.write_metadata(status="running")
    real, written = store.write_durably, {"files": 0, "bytes": 0, "rows": 0}

    def counting(path, write, **kwargs):
        real(path, write, **kwargs)
        written["files"] += 1
        written["bytes"] += path.stat().st_size
        written["rows"] += pq.read_metadata(path).num_rows
    monkeypatch.setattr(store, "write_durably", counting)
    rng = random.Random(7)
    sizes = [60 if flush % 197 == 0 else rng.randint(1, 5) for flush in range(1, 1001)]  # a backlog now and then
    events = event_buffer()
    for i in range(sum(sizes)):
        events.append(10**18 + i * 10**9, {"guest": "g", "kind": "target", "value": i, "detail": ""})
    all_events, no_samples, done, ratios = events.frame(), sample_buffer().frame(), 0, {}
    for flush, size in enumerate(sizes, 1):
        writer.flush(no_samples, all_events.iloc[done:done + size])
        done += size
        if flush in (250, 1000):
            ratios[flush] = (written["rows"] - done) / done
            files = len(list((root / "run/events").iterdir()))
            # Each merge's result is >= 4x its largest input: <= log4(rows) rewrites per row.
            assert 1.5 < ratios[flush] <= math.log(done, 4), (flush, ratios, written)
            assert files <= 3 * math.log(done, 4) + 4, (flush, files)
    # n log n, not n^2: 4x the flushes adds about log4(4) = 1 rewrite per row (v1's compaction,
    # a whole history rewritten every 120 flushes, would have grown 4x).
    assert ratios[1000] - ratios[250] <= 1.5, ratios
    assert load_run(root / "run").events["value"].tolist() == list(range(done))


# -- unreadable parts --------------------------------------------------------------------
def three_parts(run: Path) -> RunWriter:
    """A run of guest ``a``'s rows 0..5 in three unmerged parts of two rows (free_memory 1000+)."""
    writer = RunWriter(run, merge_factor=1000)
    writer.write_metadata(status="running")
    buf = sample_buffer()
    for flush in range(3):
        rows(buf, 2, "a", flush * 2)
        writer.flush(buf.frame(flush * 2), event_buffer().frame())
    return writer


def test_a_truncated_part_is_skipped_with_a_warning_and_the_rest_loads(tmp_path):
    three_parts(tmp_path / "run")
    middle = tmp_path / "run/samples" / H / name(2, 4)
    data = middle.read_bytes()
    middle.write_bytes(data[: len(data) // 2])  # a crash mid-write on a filesystem without ordering
    with pytest.warns(SkippedPartWarning, match=name(2, 4)):
        run = load_run(tmp_path / "run")
    assert run.skipped == [middle]
    assert run.samples["free_memory"].tolist() == [1000, 1001, 1004, 1005]


def test_an_unreadable_merged_part_falls_back_to_its_inputs_still_on_disk(tmp_path):
    writer = three_parts(tmp_path / "run")
    folder = tmp_path / "run/samples" / H
    inputs = {p.name: p.read_bytes() for p in folder.iterdir()}
    writer.compact()
    merged = folder / name(0, 6)
    assert part_names(folder) == [merged.name]
    for part, data in inputs.items():  # the crash came before the inputs were deleted...
        (folder / part).write_bytes(data)
    merged.write_bytes(b"PAR1 garbage")  # ...and the merged file is garbage
    with pytest.warns(SkippedPartWarning):
        run = load_run(tmp_path / "run")
    assert run.skipped == [merged]
    assert run.samples["free_memory"].tolist() == [1000 + i for i in range(6)]


# -- guest names -------------------------------------------------------------------------
NAMES = ["a/b", "x=y", "50%", "with space", "..", ".", "ünï", "plus+", "g1"]


def test_any_guest_name_round_trips_through_load_run_and_pyarrow(tmp_path):
    writer = RunWriter(tmp_path / "run")
    writer.write_metadata(status="running")
    buf, events = sample_buffer(), event_buffer()
    for i, guest in enumerate(NAMES):
        rows(buf, i + 1, guest, 100 * i)
        events.append(10**18 + i, {"guest": guest, "kind": "target", "value": i, "detail": guest})
    writer.flush(buf.frame(), events.frame())
    # One file for all guests: a name is a value in a column, never a path.
    assert part_names(tmp_path / "run/samples") == [name(0, 45)]
    run = load_run(tmp_path / "run")
    counts = run.samples.groupby("guest", observed=True).size().to_dict()
    assert counts == {guest: i + 1 for i, guest in enumerate(NAMES)}
    assert dict(zip(run.events["detail"], run.events["guest"], strict=True)) == {g: g for g in NAMES}
    table = ds.dataset(tmp_path / "run/samples").to_table().to_pandas()  # another engine, as it is
    assert table.groupby("guest", observed=True).size().to_dict() == counts
    first = table.sort_values("free_memory").groupby("guest", observed=True)["free_memory"].first().to_dict()
    assert first == {guest: 1000 + 100 * i for i, guest in enumerate(NAMES)}


def test_a_format_2_run_with_escaped_guest_folders_loads_with_the_names_decoded(tmp_path):
    run = tmp_path / "v2"
    (run / "samples").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": 2, "status": "finished"}))
    buf = sample_buffer()
    for i, guest in enumerate(NAMES):
        rows(buf, 2, guest, 10 * i)
        folder = run / "samples" / ("guest=" + urllib.parse.quote(guest, safe=""))
        folder.mkdir()
        buf.frame(2 * i, 2 * i + 2).drop(columns="guest").to_parquet(folder / name(2 * i, 2 * i + 2))
    loaded = load_run(run)
    assert loaded.samples.groupby("guest", observed=True).size().to_dict() == dict.fromkeys(NAMES, 2)
    assert loaded.samples["free_memory"].tolist() == [1000 + 10 * i + k for i in range(len(NAMES)) for k in (0, 1)]


# -- a real guest on a disk that fills up ------------------------------------------------
async def test_a_full_disk_keeps_samples_in_memory_and_writes_each_once_when_space_returns(
        guest, small_fs, caplog):
    root = small_fs("4m")
    caplog.set_level(logging.ERROR, logger="balloonlab.record.sampler")
    async with Sampler(run_dir=root / "run", flush_interval_s=0.5) as sampler:
        await sampler.add(guest)
        await until(lambda: sampler._flushed[0] >= 3, "3 flushed samples")
        fill(root / "ballast")
        on_disk = sampler._flushed[0]
        await until(lambda: len(sampler.frame()) >= on_disk + 4, "4 samples while full")
        await until(lambda: sum("No space left" in r.getMessage() for r in caplog.records) >= 2, "2 failed flushes")
        sampler.record_event(guest.name, "target", 1, "recorded while full")
        assert sampler._flushed[0] == on_disk and sampler.states()[guest.name].state == "sampling"
        while_full = sampler.frame().iloc[on_disk:]
        assert len(load_run(root / "run").samples) == on_disk  # nothing more went to disk...
        (root / "ballast").unlink()
        await until(lambda: sampler._flushed[0] >= on_disk + len(while_full), "a flush after space returned")
    frame, events = sampler.frame(), sampler.events()
    run = load_run(root / "run")
    assert run.metadata["status"] == "finished" and run.skipped == []
    pd.testing.assert_frame_equal(run.samples, frame, check_freq=False)  # every sample exactly once
    pd.testing.assert_frame_equal(run.events, events, check_freq=False)
    assert len(while_full) >= 4 and not run.samples.index.duplicated().any()
    pd.testing.assert_frame_equal(run.samples.loc[while_full.index], while_full, check_freq=False)
    assert "recorded while full" in set(run.events["detail"])
    assert not [p for p in (root / "run").rglob(".*")]  # no temporary file left behind


async def test_samples_not_on_disk_stay_in_memory_beyond_max_rows_in_memory(guest, small_fs):
    root = small_fs("4m")
    seen: list[pd.DataFrame] = []
    async with Sampler(run_dir=root / "run", flush_interval_s=0.5, max_rows_in_memory=2) as sampler:
        await sampler.add(guest)

        async def watch(condition, what):  # every row lives >= 2 s in memory: 0.05 s sees each
            deadline = time.monotonic() + 30
            while not condition():
                seen.append(sampler.frame())
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.05)
            seen.append(sampler.frame())
        await watch(lambda: sampler._flushed[0] >= 4, "4 flushed samples")
        await watch(lambda: sampler._samples.dropped >= 1, "flushed rows left memory")
        fill(root / "ballast")
        on_disk = sampler._flushed[0]
        await watch(lambda: sampler._samples.total_rows >= on_disk + 5, "5 samples while full")
        assert len(sampler.frame()) >= 5 and sampler._samples.dropped <= on_disk  # kept: not on disk
        (root / "ballast").unlink()
        await watch(lambda: sampler._flushed[0] >= on_disk + 5, "the backlog flushed")
        await watch(lambda: len(sampler.frame()) <= 2, "the flushed backlog dropped")
    seen.append(sampler.frame())
    recorded = pd.concat([f for f in seen if len(f)])  # one guest: the same categories in each
    recorded = recorded[~recorded.index.duplicated()]
    run = load_run(root / "run")
    assert len(run.samples) == sampler._samples.total_rows == len(recorded)
    pd.testing.assert_frame_equal(run.samples, recorded, check_freq=False)


# -- interpreter exit and Ctrl-C without stop() --------------------------------------------
PRINT_ROWS = "print(json.dumps([int(t.value) for t in frame.index]), flush=True)"
BLOCKING = textwrap.dedent(f"""
    import json, sys, time
    import balloonlab as bl
    guest = bl.SyncGuest.launch(bl.builtin_spec(sys.argv[2], period_s=1))
    sampler = bl.SyncSampler(run_dir=sys.argv[1], flush_interval_s=600).start()
    sampler.add(guest)
    while len(frame := sampler.frame()) < 3:
        time.sleep(0.1)
    {PRINT_ROWS}
    if sys.argv[3] == "sleep":
        time.sleep(600)
""")
ASYNC = textwrap.dedent(f"""
    import asyncio, json, sys
    from balloonlab import Guest, Sampler, builtin_spec
    async def main():
        guest = await Guest.launch(builtin_spec(sys.argv[2], period_s=1))
        sampler = Sampler(run_dir=sys.argv[1], flush_interval_s=600)
        await sampler.start()
        await sampler.add(guest)
        while len(frame := sampler.frame()) < 3:
            await asyncio.sleep(0.1)
        {PRINT_ROWS}
        await asyncio.sleep(600)
    asyncio.run(main())
""")


@pytest.mark.parametrize("script, mode, interrupt", [
    (BLOCKING, "exit", False), (BLOCKING, "sleep", True), (ASYNC, "sleep", True),
], ids=["blocking-script-returns", "blocking-script-ctrl-c", "asyncio-run-ctrl-c"])
def test_exit_without_stop_flushes_what_the_sampler_holds(builtin_ready, guest_name, tmp_path, script, mode,
                                                          interrupt):
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run"), guest_name, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"the script printed nothing: {proc.communicate(timeout=30)[1]}")
        printed = json.loads(line)
        if interrupt:
            proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert ("KeyboardInterrupt" in stderr) == interrupt and "could not flush" not in stderr, stderr
    # flush_interval_s=600: nothing was flushed before exit, so every row here came from it.
    run = load_run(tmp_path / "run")
    assert run.metadata["status"] == "running" and len(printed) >= 3
    assert [t.value for t in run.samples.index[: len(printed)]] == printed
    assert not run.samples.index.duplicated().any()
    deadline = time.monotonic() + 10
    while qemu_pids_under(RUNTIME_ROOT) and time.monotonic() < deadline:
        time.sleep(0.1)  # its owned guest goes with it


# -- flushes off the loop ------------------------------------------------------------------
async def test_a_slow_flush_never_stalls_the_loop_and_rows_appended_meanwhile_go_in_the_next(tmp_path, monkeypatch):
    sampler = Sampler(run_dir=tmp_path / "run", flush_interval_s=600)
    await sampler.start()
    rows(sampler._samples, 1000, "a", 0)
    real = store._write_parquet

    def slow(path, frame):  # a disk that takes half a second per part
        time.sleep(0.5)
        real(path, frame)
    monkeypatch.setattr(store, "_write_parquet", slow)
    gaps, done = [], asyncio.Event()

    async def ticker():  # what every guest's task needs: the loop turning
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            rows(sampler._samples, 1, "b", sampler._samples.total_rows)

    tick = asyncio.get_running_loop().create_task(ticker())
    await sampler.flush()
    done.set()
    await tick
    assert len(gaps) >= 30 and max(gaps) < 0.2, max(gaps)  # the loop kept turning
    assert sampler._flushed[0] == 1000  # what was frozen when the flush began
    appended = sampler._samples.total_rows
    await sampler.stop()
    run = load_run(tmp_path / "run")
    assert len(run.samples) == appended and run.samples["free_memory"].tolist() == [1000 + i for i in range(appended)]


async def test_guest_metadata_reaches_run_json_with_the_next_flush_not_a_rewrite_per_guest(tmp_path, monkeypatch):
    from balloonlab.model import files
    sampler = Sampler(run_dir=tmp_path / "run", flush_interval_s=600)
    await sampler.start()
    writes, real = [], files.atomic_write_json
    monkeypatch.setattr(store, "atomic_write_json", lambda path, *a, **k: writes.append(path) or real(path, *a, **k))
    for i in range(200):  # what Sampler.add does per guest, without guests to attach
        sampler._writer.stage_guest(f"g{i}", {"backend": "qmp", "index": i})
    assert writes == []  # staged: 200 guests did not mean 200 rewrites of a growing file
    await sampler.flush()
    assert len(writes) == 1
    on_disk = json.loads((tmp_path / "run/run.json").read_text())
    assert on_disk["status"] == "running" and len(on_disk["guests"]) == 200 and on_disk["guests"]["g7"]["index"] == 7
    await sampler.flush()
    assert len(writes) == 1  # nothing new staged: not written again
    await sampler.stop()
    assert load_run(tmp_path / "run").metadata["guests"]["g199"] == {"backend": "qmp", "index": 199}


def test_two_writers_of_one_path_never_rename_each_others_temporary_file(tmp_path):
    """Two builds marking the default guest image at once used one temporary name: one renamed
    the other's file away (FileNotFoundError, seen in CI). Each writer now has its own."""
    import threading

    from balloonlab.model.files import write_durably
    target, errors = tmp_path / "default", []

    def writer(text: bytes) -> None:
        try:
            for _ in range(200):
                write_durably(target, lambda f: f.write(text), new=False, fsync=False)
        except OSError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(bytes([65 + i]) * 64,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and [p.name for p in tmp_path.iterdir()] == ["default"]
    assert target.read_bytes() in {bytes([65 + i]) * 64 for i in range(4)}


# -- format 4: a partition per host ------------------------------------------------------
def test_rows_of_two_hosts_go_to_their_partitions_and_a_failed_flush_leaves_no_row_twice(tmp_path, monkeypatch):
    writer = RunWriter(tmp_path / "run")
    writer.write_metadata(status="running")
    buf = sample_buffer()
    for i in range(6):  # interleaved hosts, as a sampler appends them
        buf.append(1_700_000_000_000_000_000 + i * 10**9, {"guest": f"g{i % 2}", "host": ("lab", "198.18.1.2")[i % 2],
                                                            "free_memory": 1000 + i})
    second_write_fails(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        writer.flush(buf.frame(0, 4), event_buffer().frame())
    orphan = tmp_path / "run/samples/host=198.18.1.2" / name(0, 4)  # sorted: this host's part came first
    assert orphan.exists() and writer.durable == (0, 0)
    assert writer.flush(buf.frame(), event_buffer().frame()) == (6, 0)  # the retry covers rows 0..6
    assert not orphan.exists()
    assert part_names(tmp_path / "run/samples/host=lab") == [name(0, 6)]
    assert part_names(tmp_path / "run/samples/host=198.18.1.2") == [name(0, 6)]
    run = load_run(tmp_path / "run")
    assert run.samples["free_memory"].tolist() == [1000 + i for i in range(6)]
    assert run.samples["host"].tolist() == ["lab", "198.18.1.2"] * 3
    assert list(run.samples.columns[:3]) == ["guest", "host", "last_update"]
    hive = ds.dataset(tmp_path / "run/samples", partitioning="hive").to_table().to_pandas()  # the host from the path
    assert sorted(zip(hive["host"], hive["free_memory"], strict=True)) == sorted(
        zip(run.samples["host"], run.samples["free_memory"], strict=True))
    assert "host" not in pq.read_schema(tmp_path / "run/samples/host=lab" / name(0, 6)).names
