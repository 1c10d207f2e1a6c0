"""Row buffers that turn samples and events into pandas frames on demand, on any thread.

A row is packed into one ``bytearray`` with :mod:`struct` (one C call per row, no per-column
Python objects): int64 time, int64 values (missing: :data:`MISSING`, so no per-column mask is
stored), uint16 category codes, float64 (missing: NaN), bool; only text (an event's detail)
is kept as Python strings. Every :data:`CHUNK_ROWS` rows the bytes are sealed into a read-only
numpy structured array over the same memory (no copy) that is never written again, so
:meth:`RowBuffer.snapshot`, taken on the thread that appends (the sampler's loop), holds
references to sealed chunks and copies only the unsealed bytes (under 5 MB) and the category
tables. The snapshot's :meth:`~BufferSnapshot.frame` then builds the DataFrame on any thread,
copying each column once out of the packed rows into the arrays pandas keeps (nullable
``Int64`` from the values and a mask computed from them, the categorical from remapped codes,
the UTC index from int64 ns), with the dtypes of the frame schema (docs/design.md "Frames"). A
stat name the buffer has not seen before becomes a new column (missing in earlier rows): the
unsealed rows are sealed and the rows that follow are packed with the wider layout.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from balloonlab.model.schema import EVENT_COLUMNS, EVENT_KINDS, HOST_FRAME, SAMPLE_HEAD, SAMPLE_TAIL, STAT_NAMES
from balloonlab.record.layout import MISSING, NO_CODE, Block, Kind, Layout
from balloonlab.record.snapshot import BufferSnapshot

#: Rows per sealed chunk: a snapshot copies fewer than this many rows.
CHUNK_ROWS = 32_768
_INT_MAX = 2**63 - 1


class RowBuffer:
    """Rows appended as dicts, packed, turned into a DataFrame on demand.

    Not thread-safe: append, :meth:`drop_head` and :meth:`snapshot` on one thread (the
    sampler's loop); a snapshot's :meth:`~BufferSnapshot.frame` on any.

    :param columns: fixed columns and their kinds, in frame order.
    :param dynamic_kind: kind of columns that appear later (new stat names), or None to
        reject unknown columns.
    """

    def __init__(self, columns: Mapping[str, Kind], *, dynamic_kind: Kind | None = None) -> None:
        self._layout = Layout.of(columns)
        self._chunk_bytes = CHUNK_ROWS * self._layout.row_bytes  # seal when the open rows reach this
        self._dynamic_kind = dynamic_kind
        self._categories: dict[str, dict[str, int]] = {n: {} for n, k in columns.items() if k == "category"}
        self._rows = bytearray()
        self._texts: dict[str, list[str | None]] = {n: [] for n in self._layout.texts}
        self._sealed: list[Block] = []
        self._head = 0  # rows of _sealed[0] already dropped
        self._sealed_rows = 0  # rows of _sealed still in memory
        #: Rows dropped from the head (already on disk): row numbers stay absolute.
        self.dropped = 0

    def __len__(self) -> int:
        return self._sealed_rows + self._unsealed

    @property
    def _unsealed(self) -> int:
        return len(self._rows) // self._layout.row_bytes

    @property
    def total_rows(self) -> int:
        """Rows ever appended, including those dropped from memory."""
        return self.dropped + len(self)

    @property
    def column_names(self) -> list[str]:
        """Column names in frame order."""
        return list(self._layout.kinds)

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes in memory (text columns excluded: they are Python strings)."""
        return self._layout.row_bytes

    @property
    def nbytes(self) -> int:
        """Bytes the packed rows in memory take (sealed and unsealed)."""
        return sum(b.rows.nbytes for b in self._sealed) + len(self._rows)

    def _add_columns(self, names: Iterable[str]) -> None:
        new = [n for n in names if n not in self._layout.kinds]
        if self._dynamic_kind is None:
            raise KeyError(f"unknown column {new[0]!r}")
        self._seal()  # the rows so far keep the layout they were packed with
        self._layout = Layout.of({**self._layout.kinds, **dict.fromkeys(new, self._dynamic_kind)})
        self._chunk_bytes = CHUNK_ROWS * self._layout.row_bytes
        self._texts = {n: self._texts.get(n, []) for n in self._layout.texts}
        for name in new:
            if self._dynamic_kind == "category":
                self._categories[name] = {}

    def _code(self, name: str, value: object) -> int:
        if value is None:
            return NO_CODE
        table = self._categories[name]
        key = str(value)
        code = table.get(key)
        if code is None:
            if len(table) >= NO_CODE:
                raise OverflowError(f"column {name!r} holds {NO_CODE} distinct values, the most a buffer keeps")
            code = table[key] = len(table)
        return code

    def append(self, time_ns: int, row: Mapping[str, object]) -> None:
        """Append one row (missing columns are NA); O(1) unless a new column appears.

        An int beyond int64 cannot be stored; it can only be a sentinel QEMU forgot to document,
        so it is missing rather than a crash in a day-long run.
        """
        layout = self._layout
        if not row.keys() <= layout.kinds.keys():
            self._add_columns(row)
            layout = self._layout
        try:
            self._rows += layout.pack_row(time_ns, row, self._code)
        except struct.error:  # an int beyond int64, or a number that is not an int: the slow way
            get = row.get
            self._rows += layout.packer.pack(
                time_ns, *[MISSING if (v := get(n)) is None else _int_or_missing(v) for n in layout.ints],
                *[math.nan if (v := get(n)) is None else v for n in layout.floats],
                *[self._code(n, get(n)) for n in layout.categories], *[bool(get(n)) for n in layout.bools])
        for name, texts in self._texts.items():
            texts.append(row.get(name))  # type: ignore[arg-type]
        if len(self._rows) >= self._chunk_bytes:
            self._seal()

    def extend(self, frame: pd.DataFrame) -> None:
        """Append every row of ``frame`` (a frame of this schema, e.g. one :meth:`frame` or
        :func:`~balloonlab.record.store.load_run` gave), as many :meth:`append` calls would,
        at the speed of copying arrays.

        :raises KeyError: a column this buffer does not take.
        """
        if not set(frame.columns) <= self._layout.kinds.keys():
            self._add_columns(frame.columns)
        layout = self._layout
        rows = np.empty(len(frame), dtype=layout.dtype)
        rows["time"] = pd.DatetimeIndex(frame.index).as_unit("ns").asi8  # UTC, or naive taken as UTC
        for name, kind in layout.kinds.items():
            if kind != "str":
                rows[name] = _convert(frame[name], kind, self._categories.get(name)) if name in frame.columns \
                    else _missing_value(kind)
        texts = {name: (frame[name].astype("string").to_numpy(dtype=object, na_value=None).tolist()
                        if name in frame.columns else [None] * len(frame)) for name in layout.texts}
        done = 0
        while done < len(frame):
            hi = min(len(frame), done + CHUNK_ROWS - self._unsealed)
            self._rows += rows[done:hi].tobytes()
            for name, values in texts.items():
                self._texts[name] += values[done:hi]
            done = hi
            if self._unsealed >= CHUNK_ROWS:
                self._seal()

    def _seal(self) -> None:
        """Move the unsealed rows into a read-only block over the same bytes."""
        if not self._rows:
            return
        rows = np.frombuffer(self._rows, dtype=self._layout.dtype)  # keeps the bytearray alive
        rows.flags.writeable = False
        self._sealed.append(Block(rows, self._texts, self._layout))
        self._sealed_rows += len(rows)
        self._rows = bytearray()
        self._texts = {name: [] for name in self._layout.texts}

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
            del self._rows[:n * self._layout.row_bytes]
            for texts in self._texts.values():
                del texts[:n]

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
        a, b = max(lo, at) - at, min(hi, at + self._unsealed) - at
        if a < b:
            # A copy, and the temporary view that exports the bytearray is gone at once (an
            # exported bytearray cannot grow).
            rows = np.frombuffer(self._rows, dtype=self._layout.dtype, count=b - a,
                                 offset=a * self._layout.row_bytes).copy()
            blocks.append(Block(rows, {n: v[a:b] for n, v in self._texts.items()}, self._layout))
        categories = {name: dict(table) for name, table in self._categories.items()}
        return BufferSnapshot(blocks, dict(self._layout.kinds), categories, self.dropped + lo, attrs)

    def frame(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows ``start..stop`` (absolute row numbers) as a DataFrame with the schema's dtypes."""
        return self.snapshot(start, stop).frame()


def _int_or_missing(value: Any) -> int:
    number = int(value)
    return number if -_INT_MAX <= number <= _INT_MAX else MISSING


def _missing_value(kind: Kind) -> object:
    return {"category": NO_CODE, "float": math.nan, "bool": False}.get(kind, MISSING)


def _convert(series: pd.Series, kind: Kind, table: dict[str, int] | None) -> np.ndarray:
    """A frame column as the packed values a buffer keeps (category names get this buffer's codes)."""
    if kind in ("int", "epoch_s") and pd.api.types.is_datetime64_any_dtype(series.dtype):
        index = pd.DatetimeIndex(series)
        return np.where(np.asarray(index.isna()), MISSING, index.as_unit("ns").asi8 // 1_000_000_000)
    if kind in ("int", "epoch_s"):
        return np.asarray(series.to_numpy(dtype=np.int64, na_value=MISSING))
    if kind == "float":
        return np.asarray(series.to_numpy(dtype=np.float64, na_value=np.nan))
    if kind == "bool":
        return np.asarray(series.astype("boolean").to_numpy(dtype=np.bool_, na_value=False))
    assert table is not None
    categorical = pd.Categorical(series.astype("string") if not isinstance(series.dtype, pd.CategoricalDtype)
                                 else series)
    remap = np.array([table.setdefault(str(c), len(table)) for c in categorical.categories] + [NO_CODE],
                     dtype=np.int64)
    if len(table) > NO_CODE:
        raise OverflowError(f"a column holds more than {NO_CODE} distinct values, the most a buffer keeps")
    return remap[np.asarray(categorical.codes, dtype=np.int64)]  # code -1 (missing) takes the last


__all__ = ["CHUNK_ROWS", "EVENT_COLUMNS", "EVENT_KINDS", "MISSING", "BufferSnapshot", "RowBuffer",
           "concat_frames", "event_buffer", "host_buffer", "sample_buffer"]


def sample_buffer() -> RowBuffer:
    """An empty buffer with the samples frame's columns."""
    columns: dict[str, Kind] = {**SAMPLE_HEAD, **dict.fromkeys(STAT_NAMES, "int"), **SAMPLE_TAIL}
    return RowBuffer(columns, dynamic_kind="int")


def host_buffer() -> RowBuffer:
    """An empty buffer with the host frame's columns (``rss.<guest>`` columns come later)."""
    return RowBuffer(HOST_FRAME, dynamic_kind="int")


def event_buffer() -> RowBuffer:
    """An empty buffer with the events frame's columns."""
    return RowBuffer(EVENT_COLUMNS)


def concat_frames(frames: Iterable[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate frames of one schema (columns may differ: missing ones become NA),
    sorted by time, with ``guest``/``kind`` categories sorted by name.

    Category columns are recoded onto the union of their categories before the concatenation
    (cheap: the categories, not the rows), so the result stays categorical without a round
    trip through strings.
    """
    frames = [f for f in frames if len(f.columns)]
    if not frames:
        return pd.DataFrame()
    for name in ("guest", "kind", "host"):
        present = [f for f in frames if name in f.columns]
        if not present:
            continue
        union: set[str] = set()
        for f in present:
            column = f[name]
            union.update(map(str, column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype)
                             else column.dropna().unique()))
        dtype = pd.CategoricalDtype(sorted(union))
        frames = [f.assign(**{name: _recode(f[name], dtype)}) if name in f.columns else f for f in frames]
    out = pd.concat(frames, sort=False) if len(frames) > 1 else frames[0]
    return out.sort_index(kind="stable")


def _recode(column: pd.Series, dtype: pd.CategoricalDtype) -> pd.Series:
    if isinstance(column.dtype, pd.CategoricalDtype):
        return column.cat.set_categories(dtype.categories)
    return column.astype("string").astype(dtype)
