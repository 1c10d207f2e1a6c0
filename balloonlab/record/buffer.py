"""Columnar buffers that turn samples and events into pandas frames on demand, on any thread.

Appending a sample is O(1): each column's newest rows are a typed ``array`` (plus a
missing-value mask for nullable integers), never a DataFrame that is appended to or
concatenated per row. Every :data:`CHUNK_ROWS` rows they are sealed into read-only numpy
chunks that are never written again, so :meth:`ColumnarBuffer.snapshot`, taken on the thread
that appends (the sampler's loop), holds references to the sealed chunks and copies only the
unsealed rows and the category tables: at most a few milliseconds however long the run. The
snapshot's :meth:`~BufferSnapshot.frame` then builds the DataFrame on any thread, with the
dtypes of the frame schema (docs/design.md "Frames"): UTC DatetimeIndex ``time``, categorical
``guest`` (categories sorted by name), nullable ``Int64`` counters and bytes. A stat name the
buffer has not seen before becomes a new column, missing in earlier rows.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from balloonlab.model.schema import EVENT_COLUMNS, EVENT_KINDS, SAMPLE_HEAD, SAMPLE_TAIL, STAT_NAMES, SampleKind

Kind = SampleKind
Arrays = tuple[np.ndarray, np.ndarray | None]  # values, mask (True = missing) where the kind has one
#: Rows per sealed chunk: a snapshot copies fewer than this many rows per column.
CHUNK_ROWS = 65_536
_INT64_MAX = 2**63 - 1
_MASKED = frozenset({"int", "epoch_s", "category"})
_DTYPES: dict[str, Any] = {"int": np.int64, "epoch_s": np.int64, "category": np.int64, "float": np.float64,
                           "bool": np.int8, "str": object}
_TYPECODES = {"int": "q", "epoch_s": "q", "category": "q", "float": "d", "bool": "b"}
#: Epoch seconds whose nanoseconds fit in int64 (datetime64[ns]); others take pandas' own path.
_MAX_EPOCH_S = 9_223_372_035


class _Column:
    """The unsealed rows of one typed column; ``mask`` marks missing values of nullable kinds."""

    __slots__ = ("kind", "values", "mask")

    def __init__(self, kind: Kind, missing_rows: int = 0) -> None:
        self.kind = kind
        self.mask = bytearray(b"\x01" * missing_rows) if kind in _MASKED else bytearray()
        if kind == "str":
            self.values: array[Any] | list[str | None] = [None] * missing_rows
        elif kind == "float":
            self.values = array("d", [float("nan")]) * missing_rows
        else:
            self.values = array(_TYPECODES[kind], bytes(8 * missing_rows if kind != "bool" else missing_rows))

    def append(self, value: object) -> None:
        kind = self.kind
        if kind == "float":
            self.values.append(float("nan") if value is None else float(value))  # type: ignore[arg-type]
        elif kind == "str":
            self.values.append(value)  # type: ignore[arg-type]
        elif kind == "bool":
            self.values.append(0 if value is None else int(value))  # type: ignore[arg-type,call-overload]
        # A value beyond int64 cannot be stored; it can only be a sentinel QEMU forgot to
        # document, so it is missing rather than a crash in a day-long run.
        elif value is None or (kind != "category" and not -_INT64_MAX <= value <= _INT64_MAX):  # type: ignore[operator]
            self.mask.append(1)
            self.values.append(0)  # type: ignore[arg-type]
        else:
            self.mask.append(0)
            self.values.append(int(value))  # type: ignore[call-overload]

    def extend(self, arrays: Arrays | None, lo: int, hi: int) -> None:
        """Append rows ``lo..hi`` of converted arrays (None: all missing)."""
        if arrays is None:
            filler = _Column(self.kind, hi - lo)
            self.values += filler.values  # type: ignore[operator]
            self.mask += filler.mask
            return
        values, mask = arrays
        if isinstance(self.values, list):
            self.values.extend(values[lo:hi].tolist())
        else:
            self.values.frombytes(values[lo:hi].tobytes())
        if mask is not None:
            self.mask += mask[lo:hi].tobytes()

    def arrays(self, lo: int, hi: int) -> Arrays:
        """Rows ``lo..hi`` as new numpy arrays."""
        if isinstance(self.values, list):
            values = np.empty(hi - lo, dtype=object)
            values[:] = self.values[lo:hi]
        else:
            values = np.frombuffer(self.values[lo:hi], dtype=_DTYPES[self.kind])  # the slice is a copy
        mask = np.frombuffer(self.mask[lo:hi], dtype=np.bool_) if self.kind in _MASKED else None
        return values, mask


class _Block:
    """Rows of every column over one row range: numpy arrays, never written once made."""

    __slots__ = ("time", "columns")

    def __init__(self, time: np.ndarray, columns: dict[str, Arrays]) -> None:
        self.time, self.columns = time, columns

    def __len__(self) -> int:
        return len(self.time)

    def take(self, rows: slice | np.ndarray) -> _Block:
        """Some rows: a slice (views, no copy) or a boolean mask (copies)."""
        return _Block(self.time[rows], {n: (v[rows], None if m is None else m[rows])
                                        for n, (v, m) in self.columns.items()})


class BufferSnapshot:
    """Rows of a :class:`ColumnarBuffer` frozen at one moment; :meth:`frame` works on any thread.

    Taken in O(chunks) by :meth:`ColumnarBuffer.snapshot`; appends and drops that follow do not
    change it. ``start`` is the absolute row number of its first row; ``attrs`` go to the
    frame's ``DataFrame.attrs``.
    """

    def __init__(self, blocks: list[_Block], kinds: dict[str, Kind], categories: dict[str, dict[str, int]],
                 start: int, attrs: dict[str, Any] | None = None) -> None:
        self._blocks, self._kinds, self._categories = blocks, kinds, categories
        self.start = start
        self.attrs: dict[str, Any] = dict(attrs or {})

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks)

    def max_time_ns(self) -> int | None:
        """The latest row time (ns since the epoch), None without rows."""
        ends = [int(b.time.max()) for b in self._blocks if len(b)]
        return max(ends) if ends else None

    def since(self, time_ns: int) -> BufferSnapshot:
        """The rows whose time is at or after ``time_ns`` (by value: rows need not be in time
        order), as a smaller snapshot (``start`` stays: its rows are no longer contiguous)."""
        kept = []
        for block in self._blocks:
            if not len(block) or block.time.max() < time_ns:
                continue
            kept.append(block if block.time.min() >= time_ns else block.take(block.time >= time_ns))
        return BufferSnapshot(kept, self._kinds, self._categories, self.start, self.attrs)

    def categories_present(self, name: str) -> list[str]:
        """The values of category column ``name`` that occur in these rows, sorted by name
        (the frame's category order)."""
        table = self._categories[name]
        seen = np.zeros(len(table), dtype=np.int64)
        for block in self._blocks:
            if name in block.columns and len(block):
                values, mask = block.columns[name]
                seen += np.bincount(values[~mask] if mask is not None else values, minlength=len(table))
        return [category for category in sorted(table) if seen[table[category]]]

    def frame(self) -> pd.DataFrame:
        """These rows as a DataFrame with the schema's dtypes (built on the calling thread)."""
        times = _concat([b.time for b in self._blocks], np.int64)
        index = pd.DatetimeIndex(times.view("datetime64[ns]"), name="time").tz_localize("UTC")
        data = {name: self._series(name, kind) for name, kind in self._kinds.items()}
        frame = pd.DataFrame(data, index=index, copy=False)
        frame.attrs.update(self.attrs)
        return frame

    def _series(self, name: str, kind: Kind) -> object:
        values_parts, mask_parts = [], []
        for block in self._blocks:
            arrays = block.columns.get(name)
            if arrays is None:  # the column appeared after these rows: missing in all of them
                arrays = _Column(kind, len(block)).arrays(0, len(block))
            values_parts.append(arrays[0])
            if arrays[1] is not None:
                mask_parts.append(arrays[1])
        values = _concat(values_parts, _DTYPES[kind])
        mask = _concat(mask_parts, np.bool_)
        if kind == "str":
            return pd.array(values, dtype="string")
        if kind == "float":
            return pd.arrays.FloatingArray(values, np.isnan(values))
        if kind == "bool":
            return values.astype(bool)
        if kind == "category":
            table = self._categories[name]
            names = sorted(table)
            remap = np.empty(len(table), dtype=np.int64)
            for position, category in enumerate(names):
                remap[table[category]] = position
            codes = remap[values] if len(remap) else np.zeros(len(values), np.int64)
            codes[mask] = -1
            return pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(names))
        if kind == "epoch_s":
            return _datetimes(values, mask)
        return pd.arrays.IntegerArray(values, mask)


def _concat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    """One new array of ``parts`` (always a copy: a frame never shares a buffer's chunks)."""
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _datetimes(seconds: np.ndarray, mask: np.ndarray) -> object:
    """Epoch seconds (masked: NaT) as datetime64[ns, UTC]."""
    if len(seconds) and np.abs(seconds).max() > _MAX_EPOCH_S:  # pandas says what is out of range
        ints = pd.arrays.IntegerArray(seconds, mask)
        return pd.to_datetime(pd.Series(ints), unit="s", utc=True).astype("datetime64[ns, UTC]").array
    ns = seconds * 1_000_000_000
    ns[mask] = np.iinfo(np.int64).min  # NaT
    return pd.DatetimeIndex(ns.view("datetime64[ns]"), copy=False).tz_localize("UTC").array


class ColumnarBuffer:
    """Rows appended as dicts, kept column by column, turned into a DataFrame on demand.

    Not thread-safe: append, :meth:`drop_head` and :meth:`snapshot` on one thread (the
    sampler's loop); a snapshot's :meth:`~BufferSnapshot.frame` on any.

    :param columns: fixed columns and their kinds, in frame order.
    :param dynamic_kind: kind of columns that appear later (new stat names), or None to
        reject unknown columns.
    """

    def __init__(self, columns: Mapping[str, Kind], *, dynamic_kind: Kind | None = None) -> None:
        self._time = array("q")
        self._kinds: dict[str, Kind] = dict(columns)
        self._columns: dict[str, _Column] = {name: _Column(kind) for name, kind in columns.items()}
        self._dynamic_kind = dynamic_kind
        self._categories: dict[str, dict[str, int]] = {n: {} for n, k in columns.items() if k == "category"}
        self._sealed: list[_Block] = []
        self._head = 0  # rows of _sealed[0] already dropped
        self._sealed_rows = 0  # rows of _sealed still in memory
        #: Rows dropped from the head (already on disk): row numbers stay absolute.
        self.dropped = 0

    def __len__(self) -> int:
        return self._sealed_rows + len(self._time)

    @property
    def total_rows(self) -> int:
        """Rows ever appended, including those dropped from memory."""
        return self.dropped + len(self)

    @property
    def column_names(self) -> list[str]:
        """Column names in frame order."""
        return list(self._columns)

    def _add_column(self, name: str) -> None:
        if self._dynamic_kind is None:
            raise KeyError(f"unknown column {name!r}")
        self._kinds[name] = self._dynamic_kind
        self._columns[name] = _Column(self._dynamic_kind, len(self._time))

    def append(self, time_ns: int, row: Mapping[str, object]) -> None:
        """Append one row (missing columns are NA); O(1) unless a new column appears."""
        for name in row:
            if name not in self._columns:
                self._add_column(name)
        self._time.append(time_ns)
        for name, column in self._columns.items():
            value = row.get(name)
            if column.kind == "category" and value is not None:
                codes = self._categories[name]
                value = codes.setdefault(str(value), len(codes))
            column.append(value)
        if len(self._time) >= CHUNK_ROWS:
            self._seal()

    def extend(self, frame: pd.DataFrame) -> None:
        """Append every row of ``frame`` (a frame of this schema, e.g. one :meth:`frame` or
        :func:`~balloonlab.record.store.load_run` gave), as many :meth:`append` calls would,
        at the speed of copying arrays.

        :raises KeyError: a column this buffer does not take.
        """
        for name in frame.columns:
            if name not in self._columns:
                self._add_column(name)
        times = pd.DatetimeIndex(frame.index).as_unit("ns").asi8  # UTC, or naive taken as UTC
        converted = {name: _convert(frame[name], kind, self._categories.get(name)) if name in frame.columns
                     else None for name, kind in self._kinds.items()}
        done = 0
        while done < len(frame):
            hi = min(len(frame), done + CHUNK_ROWS - len(self._time))
            self._time.frombytes(np.ascontiguousarray(times[done:hi], dtype=np.int64).tobytes())
            for name, column in self._columns.items():
                column.extend(converted[name], done, hi)
            done = hi
            if len(self._time) >= CHUNK_ROWS:
                self._seal()

    def _seal(self) -> None:
        """Move the unsealed rows into a read-only block."""
        n = len(self._time)  # the array is never appended to again: the block may keep it
        block = _Block(np.frombuffer(self._time, dtype=np.int64), {k: c.arrays(0, n) for k, c in self._columns.items()})
        for part in (block.time, *(a for arrays in block.columns.values() for a in arrays if a is not None)):
            part.flags.writeable = False
        self._sealed.append(block)
        self._sealed_rows += n
        self._time = array("q")
        self._columns = {name: _Column(column.kind) for name, column in self._columns.items()}

    def drop_head(self, n: int) -> None:
        """Forget the oldest ``n`` rows (they were flushed to disk); whole chunks are freed."""
        n = min(n, len(self))
        self.dropped += n
        while n and self._sealed:
            left = len(self._sealed[0]) - self._head
            if n < left:
                self._head += n
                self._sealed_rows -= n
                return
            self._sealed.pop(0)
            self._sealed_rows -= left
            self._head = 0
            n -= left
        if n:
            del self._time[:n]
            for column in self._columns.values():
                del column.values[:n], column.mask[:n]

    def snapshot(self, start: int = 0, stop: int | None = None, *,
                 attrs: dict[str, Any] | None = None) -> BufferSnapshot:
        """Rows ``start..stop`` (absolute row numbers) frozen now, in O(chunks): references to
        sealed chunks, a copy of the unsealed rows (fewer than :data:`CHUNK_ROWS`) and of the
        category tables. Call it where rows are appended; build its frame anywhere.

        :param attrs: put into the frame's ``DataFrame.attrs``.
        """
        lo = min(len(self), max(0, start - self.dropped))
        hi = len(self) if stop is None else min(len(self), max(lo, stop - self.dropped))
        blocks, at = [], -self._head  # in-memory row number of the block's first row
        for block in self._sealed:
            a, b = max(lo, at), min(hi, at + len(block))
            if a < b:
                blocks.append(block if b - a == len(block) else block.take(slice(a - at, b - at)))
            at += len(block)
        a, b = max(lo, at) - at, min(hi, at + len(self._time)) - at
        if a < b:
            tail = np.frombuffer(self._time[a:b], dtype=np.int64)  # the slice is a copy
            blocks.append(_Block(tail, {name: column.arrays(a, b) for name, column in self._columns.items()}))
        categories = {name: dict(table) for name, table in self._categories.items()}
        return BufferSnapshot(blocks, dict(self._kinds), categories, self.dropped + lo, attrs)

    def frame(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows ``start..stop`` (absolute row numbers) as a DataFrame with the schema's dtypes."""
        return self.snapshot(start, stop).frame()


def _convert(series: pd.Series, kind: Kind, table: dict[str, int] | None) -> Arrays:
    """A frame column as the arrays a buffer keeps (category names get this buffer's codes)."""
    if kind in ("int", "epoch_s") and pd.api.types.is_datetime64_any_dtype(series.dtype):
        index = pd.DatetimeIndex(series)
        mask = np.asarray(index.isna())
        values = np.where(mask, 0, index.as_unit("ns").asi8 // 1_000_000_000)
        return values, mask
    if kind in ("int", "epoch_s"):
        return series.to_numpy(dtype=np.int64, na_value=0), np.asarray(series.isna())
    if kind == "float":
        return series.to_numpy(dtype=np.float64, na_value=np.nan), None
    if kind == "bool":
        return series.astype("boolean").to_numpy(dtype=np.int8, na_value=0), None
    if kind == "str":
        return series.astype("string").to_numpy(dtype=object, na_value=None), None
    assert table is not None
    categorical = pd.Categorical(series.astype("string") if not isinstance(series.dtype, pd.CategoricalDtype)
                                 else series)
    remap = np.array([table.setdefault(str(c), len(table)) for c in categorical.categories], dtype=np.int64)
    codes = np.asarray(categorical.codes, dtype=np.int64)
    mask = codes < 0
    return (np.where(mask, 0, remap[codes]) if len(remap) else np.zeros(len(codes), np.int64)), mask


__all__ = ["CHUNK_ROWS", "EVENT_COLUMNS", "EVENT_KINDS", "BufferSnapshot", "ColumnarBuffer", "concat_frames",
           "event_buffer", "sample_buffer"]


def sample_buffer() -> ColumnarBuffer:
    """An empty buffer with the samples frame's columns."""
    columns: dict[str, Kind] = {**SAMPLE_HEAD, **dict.fromkeys(STAT_NAMES, "int"), **SAMPLE_TAIL}
    return ColumnarBuffer(columns, dynamic_kind="int")


def event_buffer() -> ColumnarBuffer:
    """An empty buffer with the events frame's columns."""
    return ColumnarBuffer(EVENT_COLUMNS)


def concat_frames(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames of one schema (columns may differ: missing ones become NA),
    sorted by time, with ``guest``/``kind`` categories sorted by name."""
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, sort=False)
    for name in ("guest", "kind"):
        if name in out.columns:
            out[name] = out[name].astype("string").astype(pd.CategoricalDtype(sorted(out[name].dropna().unique())))
    return out.sort_index(kind="stable")
