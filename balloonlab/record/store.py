"""Run folders: Parquet samples and events written as a run goes, ``run.json``, a plot.

Layout (format 4: each table a hive-partitioned Parquet dataset, by the host the guests run
on, that pyarrow.dataset, DuckDB, Dask, Polars or Spark read as it is; ``guest`` is a
dictionary-encoded column, so one flush writes one file per table and host however many guests
are sampled; the ``host`` column lives in the folder name only, as hive partitioning expects)::

    RUN/run.json                                 metadata, updated at start and end
    RUN/samples/host=lab1/p-000000000000-000000000042.parquet
    RUN/samples/host=198.18.1.2/p-000000000010-000000000042.parquet
    RUN/events/host=lab1/p-000000000000-000000000007.parquet
    RUN/host/host=lab1/p-000000000000-000000000040.parquet     the host frame (schema.HOST_FRAME)
    RUN/plot.png

Rows are numbered per table, across guests and hosts, in recording order; ``p-FIRST-END`` in a
host's folder holds that host's rows among rows FIRST <= n < END. The writer remembers where the
rows on disk end, so a flush retried after a failure part-way (ENOSPC, EIO) writes exactly what is
missing; a part one host got before another's failed is covered by the retry's and then deleted.
A part is written to a temporary name, fsynced, renamed and its folder fsynced before its rows
count (run.json likewise). Parts
are merged in tiers: a merge's result is at least ``merge_factor`` times its largest input, so
a row is rewritten at most log_factor(rows) times. Overlapping ranges are always nested (a merge
covers its inputs) and readers keep the outermost part they can read: a crash between a merge
and the deletion of its inputs, or an unreadable merged file whose inputs remain, neither loses
nor doubles a row. Older formats (3: no partitions; 1 and 2: one folder per guest,
``RUN/samples/guest=NAME/``) still load (:mod:`balloonlab.record.store_read`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from balloonlab.model.files import atomic_write_json, fsync_dir, write_durably
from balloonlab.record.store_read import (
    READ_ERRORS, RUN_FORMAT, TABLES, Run, SkippedPartWarning, load_run, partition_name, read_table)

log = logging.getLogger(__name__)
# The readers live in store_read; these names stay importable from here, as before.
__all__ = ["RUN_FORMAT", "TABLES", "Run", "RunWriter", "SkippedPartWarning", "load_run", "new_run_dir", "read_table"]

#: A part's host when a row has none.
UNKNOWN_HOST = "unknown"


class _Part(NamedTuple):
    first: int
    end: int
    rows: int
    path: Path


class RunWriter:
    """Writes one run folder incrementally.

    :param path: the run folder (created; must not hold another run).
    :param merge_factor: merge a table's newest parts of one host once they add up to this many
        times the largest of them (2 or more).
    :raises FileExistsError: ``path`` already holds a run.
    """

    def __init__(self, path: str | os.PathLike[str], *, merge_factor: int = 4) -> None:
        if merge_factor < 2:
            raise ValueError(f"merge_factor must be 2 or more, got {merge_factor}")
        self.path = Path(path)
        if (self.path / "run.json").exists():
            raise FileExistsError(f"{self.path} already holds a run: choose a new folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.metadata: dict[str, Any] = {}
        self.merge_factor = merge_factor
        self._durable = dict.fromkeys(TABLES, 0)  # every row numbered below is on disk
        self._parts: dict[tuple[str, str], list[_Part]] = {}  # per (table, host)
        self._folders: set[Path] = set()
        #: Parts of a flush that failed part-way: a later part covers them; deleted once it is written.
        self._orphans: list[Path] = []
        #: Metadata changed since run.json was last written (see :meth:`stage_guest`).
        self.staged = False
        self._exit_flush: tuple[Callable[[], object], asyncio.AbstractEventLoop | None] | None = None

    @property
    def durable(self) -> tuple[int, int]:
        """Rows of (samples, events) on disk: every row numbered below is durable."""
        return self.durable_rows("samples"), self.durable_rows("events")

    def durable_rows(self, table: str) -> int:
        """Rows of ``table`` on disk."""
        return self._durable[table]

    def write_metadata(self, **fields: Any) -> None:
        """Merge ``fields`` into run.json and rewrite it atomically and durably.

        :raises OSError: the write failed (the fields are kept for the next write).
        """
        self.metadata.update(fields)
        self.metadata.setdefault("format", RUN_FORMAT)
        self.staged = False
        atomic_write_json(self.path / "run.json", self.metadata, fsync=True)

    def stage_guest(self, name: str, metadata: dict[str, Any]) -> None:
        """Add a guest's metadata to run.json at the next :meth:`flush` (or metadata write):
        rewriting the whole file per guest would be quadratic in the guests added."""
        self.metadata.setdefault("guests", {})[name] = metadata
        self.staged = True

    def staged_metadata(self) -> dict[str, Any] | None:
        """On the thread that stages: a copy of the metadata to write, when some was staged
        since the last write (None otherwise). The copy is what a flush in another thread
        writes, so that thread never reads a dict this one is changing."""
        if not self.staged:
            return None
        self.staged = False
        return {key: dict(value) if isinstance(value, dict) else value for key, value in self.metadata.items()}

    def write_staged(self, metadata: dict[str, Any]) -> None:
        """Write a :meth:`staged_metadata` copy as run.json (any thread).

        :raises OSError: the write failed (the caller stages again).
        """
        atomic_write_json(self.path / "run.json", {"format": RUN_FORMAT, **metadata}, fsync=True)

    def flush(self, samples: pd.DataFrame, events: pd.DataFrame,
              first: tuple[int, int] | None = None, *, host: pd.DataFrame | None = None,
              host_first: int | None = None) -> tuple[int, int]:
        """Write the rows not yet on disk, one part per table; return :attr:`durable`.

        :param samples: and ``events``, ``host``: consecutive rows of each table (may be empty).
        :param first: the numbers of each frame's first row (default :attr:`durable`: the
            frames continue where the disk ends). Rows already on disk are skipped, so frames
            taken before an earlier flush can be handed again harmlessly.
        :raises ValueError: a frame starts beyond :attr:`durable` (rows would be lost).
        :raises OSError: a write failed; the parts written before it count, and a later flush
            of the same rows (and more) writes exactly the rest.
        """
        starts = self.durable if first is None else first
        for table, frame, start in zip(TABLES[:2], (samples, events), starts, strict=True):
            self._flush_table(table, frame, start)
        if host is not None:
            self._flush_table("host", host, self._durable["host"] if host_first is None else host_first)
        return self.durable

    def _flush_table(self, table: str, frame: pd.DataFrame, start: int) -> None:
        durable, end = self._durable[table], start + len(frame)
        if start > durable:
            raise ValueError(f"{table}: rows {durable}..{start} were never handed to the writer")
        if end <= durable:
            return
        rows = frame if start == durable else frame.iloc[durable - start:]
        written: list[tuple[list[_Part], _Part]] = []
        try:
            for host, host_rows in _by_host(rows):
                path = self._folder(table, host) / _part_name(durable, end)
                _write_parquet(path, host_rows)
                written.append((self._parts.setdefault((table, host), []), _Part(durable, end, len(host_rows), path)))
        except BaseException:
            # Nested in the range the retry writes, so readers skip them: removed after it.
            self._orphans += [part.path for _, part in written]
            raise
        self._durable[table] = end
        for parts, part in written:
            parts.append(part)
            try:
                self._merge_tail(parts)
            except READ_ERRORS as exc:  # the rows are durable; the merge is retried next flush
                log.warning("could not merge parts of %s: %s", part.path.parent, exc)
        mine = {part.path for _, part in written}
        for orphan in [p for p in self._orphans if p not in mine]:
            orphan.unlink(missing_ok=True)
        self._orphans = [p for p in self._orphans if p in mine]

    def _merge_tail(self, parts: list[_Part]) -> None:
        while (k := self._mergeable(parts)) >= 2:
            _merge(parts, len(parts) - k)

    def _mergeable(self, parts: list[_Part]) -> int:
        """The longest run of newest parts that adds up to merge_factor x its largest (or 0)."""
        total = largest = best = 0
        for k, part in enumerate(reversed(parts), 1):
            total, largest = total + part.rows, max(largest, part.rows)
            if k >= 2 and total >= self.merge_factor * largest:
                best = k
        return best

    def compact(self) -> None:
        """Merge each table's parts into one file per host now (crash-safe: see the module docstring)."""
        for parts in self._parts.values():
            if len(parts) >= 2:
                _merge(parts, 0)

    def _folder(self, table: str, host: str) -> Path:
        folder = self.path / table / partition_name("host", host)
        if folder not in self._folders:
            folder.parent.mkdir(exist_ok=True)
            folder.mkdir(exist_ok=True)
            fsync_dir(folder.parent)
            fsync_dir(folder.parent.parent)
            self._folders.add(folder)
        return folder

    # -- at interpreter exit ------------------------------------------------------------
    def flush_at_exit(self, flush: Callable[[], object], loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Call ``flush`` (a sampler's) at interpreter exit, after Ctrl-C too, unless
        :meth:`close` came first.

        :param loop: the loop that owns the caller's rows: ``flush`` runs on it while it runs
            on another thread (balloonlab's loop thread, during atexit), else on this one.
        """
        global _exit_hook_registered
        self._exit_flush = (flush, loop)
        with _exit_lock:
            if not _exit_hook_registered:
                atexit.register(_flush_open_writers)
                _exit_hook_registered = True
            _open_writers.add(self)

    def close(self) -> None:
        """Forget the exit flush (the run was closed properly)."""
        self._exit_flush = None
        with _exit_lock:
            _open_writers.discard(self)

    def _run_exit_flush(self, timeout_s: float = 30.0) -> None:
        if self._exit_flush is None:
            return
        flush, loop = self._exit_flush
        try:
            if loop is not None and loop.is_running() and not _running_here(loop):
                asyncio.run_coroutine_threadsafe(_call(flush), loop).result(timeout_s)
            else:
                flush()
        except Exception as exc:  # at exit nobody is left to raise to; the rows are lost
            log.error("could not flush the run %s at exit: %r", self.path, exc)


_exit_lock = threading.Lock()
_exit_hook_registered = False
_open_writers: weakref.WeakSet[RunWriter] = weakref.WeakSet()


def _flush_open_writers() -> None:
    with _exit_lock:
        writers = list(_open_writers)
    for writer in writers:
        writer._run_exit_flush()


def _running_here(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


async def _call(fn: Callable[[], object]) -> None:
    fn()


def _merge(parts: list[_Part], start: int) -> None:
    """Replace ``parts[start:]`` (adjacent ranges) by one file; its inputs go only once it is
    durable, and until then readers prefer it, since its range covers theirs."""
    sources = parts[start:]
    tables = [pq.ParquetFile(p.path).read() for p in sources]
    path = sources[0].path.with_name(_part_name(sources[0].first, sources[-1].end))
    if all(t.schema.equals(tables[0].schema) for t in tables):
        merged = pa.concat_tables(tables)  # the usual case, without a round trip through pandas
        write_durably(path, lambda file: pq.write_table(merged, file))
    else:  # a stat column appeared: pandas unifies the columns and keeps their dtypes
        merged = pd.concat([t.to_pandas() for t in tables])
        _write_parquet(path, merged)
    parts[start:] = [_Part(sources[0].first, sources[-1].end, len(merged), path)]
    for p in sources:
        p.path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def _by_host(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The rows of each host, without the ``host`` column (the partition folder names it)."""
    if "host" not in rows.columns:
        return [(UNKNOWN_HOST, rows)]
    hosts = rows["host"].astype("string").fillna(UNKNOWN_HOST)
    rest = rows.drop(columns="host")
    names = hosts.unique()
    if len(names) == 1:
        return [(str(names[0]), rest)]
    return [(str(name), rest[(hosts == name).to_numpy()]) for name in sorted(names)]


def _part_name(first: int, end: int) -> str:
    return f"p-{first:012d}-{end:012d}.parquet"


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    write_durably(path, lambda file: frame.to_parquet(file, engine="pyarrow"))


def new_run_dir(root: str | os.PathLike[str] = "runs", name: str = "run") -> Path:
    """A fresh folder ``root/<UTC time>-<name>`` for a new run."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = Path(root) / f"{stamp}-{name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate
