"""Columnar buffers that turn samples and events into pandas frames on demand.

Appending a sample is O(1): each column is a typed ``array`` (plus a missing-value mask for
nullable integers), never a DataFrame that is appended to or concatenated per row. A frame is
built only when asked for, with the dtypes of the frame schema (docs/design.md "Frames"):
UTC DatetimeIndex ``time``, categorical ``guest``, nullable ``Int64`` counters and bytes.
A stat name the buffer has not seen before becomes a new column, missing in earlier rows.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from balloonlab.model.schema import EVENT_COLUMNS, EVENT_KINDS, SAMPLE_HEAD, SAMPLE_TAIL, STAT_NAMES, SampleKind

Kind = SampleKind
_INT64_MAX = 2**63 - 1


class _Column:
    """One typed column; ``mask`` marks missing values of nullable kinds."""

    __slots__ = ("kind", "values", "mask")

    def __init__(self, kind: Kind, missing_rows: int = 0) -> None:
        self.kind = kind
        self.mask = bytearray(b"\x01" * missing_rows)
        if kind in ("int", "epoch_s", "category"):
            self.values: array[Any] | list[str | None] = array("q", bytes(8 * missing_rows))
        elif kind == "float":
            self.values = array("d", [float("nan")]) * missing_rows
        elif kind == "bool":
            self.values = array("b", bytes(missing_rows))
        else:
            self.values = [None] * missing_rows

    def append(self, value: object) -> None:
        # A value beyond int64 cannot be stored; it can only be a sentinel QEMU forgot to
        # document, so it is missing rather than a crash in a day-long run.
        missing = value is None or (self.kind in ("int", "epoch_s")
                                    and not -_INT64_MAX <= value <= _INT64_MAX)  # type: ignore[operator]
        self.mask.append(1 if missing else 0)
        if self.kind == "float":
            self.values.append(float("nan") if value is None else float(value))  # type: ignore[arg-type]
        elif self.kind == "str":
            self.values.append(value)  # type: ignore[arg-type]
        else:
            self.values.append(0 if missing else int(value))  # type: ignore[arg-type,call-overload]

    def drop_head(self, n: int) -> None:
        del self.values[:n]
        del self.mask[:n]


class ColumnarBuffer:
    """Rows appended as dicts, kept column by column, turned into a DataFrame on demand.

    :param columns: fixed columns and their kinds, in frame order.
    :param dynamic_kind: kind of columns that appear later (new stat names), or None to
        reject unknown columns.
    """

    def __init__(self, columns: Mapping[str, Kind], *, dynamic_kind: Kind | None = None) -> None:
        self._time = array("q")
        self._columns: dict[str, _Column] = {name: _Column(kind) for name, kind in columns.items()}
        self._dynamic_kind = dynamic_kind
        self._categories: dict[str, dict[str, int]] = {n: {} for n, k in columns.items() if k == "category"}
        #: Rows dropped from the head (already on disk): row numbers stay absolute.
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._time)

    @property
    def total_rows(self) -> int:
        """Rows ever appended, including those dropped from memory."""
        return self.dropped + len(self._time)

    @property
    def column_names(self) -> list[str]:
        """Column names in frame order."""
        return list(self._columns)

    def append(self, time_ns: int, row: Mapping[str, object]) -> None:
        """Append one row (missing columns are NA); O(1) unless a new column appears."""
        for name in row:
            if name not in self._columns:
                if self._dynamic_kind is None:
                    raise KeyError(f"unknown column {name!r}")
                self._columns[name] = _Column(self._dynamic_kind, len(self._time))
        self._time.append(time_ns)
        for name, column in self._columns.items():
            value = row.get(name)
            if column.kind == "category" and value is not None:
                codes = self._categories[name]
                value = codes.setdefault(str(value), len(codes))
            column.append(value)

    def drop_head(self, n: int) -> None:
        """Forget the oldest ``n`` rows (they were flushed to disk)."""
        n = min(n, len(self._time))
        del self._time[:n]
        for column in self._columns.values():
            column.drop_head(n)
        self.dropped += n

    def frame(self, start: int = 0, stop: int | None = None) -> pd.DataFrame:
        """Rows ``start..stop`` (absolute row numbers) as a DataFrame with the schema's dtypes."""
        lo = max(0, start - self.dropped)
        hi = len(self._time) if stop is None else max(lo, stop - self.dropped)
        times = np.frombuffer(self._time, dtype=np.int64)[lo:hi] if len(self._time) else np.empty(0, np.int64)
        index = pd.DatetimeIndex(times.astype("datetime64[ns]"), name="time").tz_localize("UTC")
        data = {name: self._series(name, column, lo, hi) for name, column in self._columns.items()}
        return pd.DataFrame(data, index=index)

    def _series(self, name: str, column: _Column, lo: int, hi: int) -> object:
        mask = np.frombuffer(bytes(column.mask[lo:hi]), dtype=np.uint8).astype(bool)
        if isinstance(column.values, list):  # the "str" kind
            return pd.array(column.values[lo:hi], dtype="string")
        if column.kind == "float":
            return pd.array(np.frombuffer(column.values, dtype=np.float64)[lo:hi].copy(), dtype="Float64")
        if column.kind == "bool":
            return np.frombuffer(column.values, dtype=np.int8)[lo:hi].astype(bool)
        values = np.frombuffer(column.values, dtype=np.int64)[lo:hi].copy() if hi > lo else np.empty(0, np.int64)
        if column.kind == "category":
            names = sorted(self._categories[name])
            codes_by_name = self._categories[name]
            remap = np.empty(len(codes_by_name), dtype=np.int64)
            for position, category in enumerate(names):
                remap[codes_by_name[category]] = position
            codes = np.where(mask, -1, remap[values] if len(remap) else values)
            return pd.Categorical.from_codes(codes, categories=names)
        ints = pd.arrays.IntegerArray(values, mask)
        if column.kind == "epoch_s":
            return pd.to_datetime(pd.Series(ints), unit="s", utc=True).astype("datetime64[ns, UTC]").array
        return ints


__all__ = ["EVENT_COLUMNS", "EVENT_KINDS", "ColumnarBuffer", "concat_frames", "event_buffer", "sample_buffer"]


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
