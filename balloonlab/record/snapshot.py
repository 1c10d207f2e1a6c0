"""A row buffer's rows frozen at one moment, and the DataFrame built from them on any thread.

Each column is copied once out of the packed rows into the array pandas keeps: nullable
``Int64`` from the values and a mask computed from them (:data:`~balloonlab.record.layout.MISSING`
marks a missing int), ``Float64`` with NaN as missing, the categorical from codes remapped to
sorted categories, the UTC index from int64 ns, epoch seconds as UTC datetimes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from balloonlab.record.layout import MISSING, NO_CODE, Block, Kind

#: Epoch seconds whose nanoseconds fit in int64 (datetime64[ns]); others take pandas' own path.
_MAX_EPOCH_S = 9_223_372_035


class BufferSnapshot:
    """Rows of a :class:`RowBuffer` frozen at one moment; :meth:`frame` works on any thread.

    Taken in O(chunks) by :meth:`RowBuffer.snapshot`; appends and drops that follow do not
    change it. ``start`` is the absolute row number of its first row; ``attrs`` go to the
    frame's ``DataFrame.attrs``.
    """

    def __init__(self, blocks: list[Block], kinds: dict[str, Kind], categories: dict[str, dict[str, int]],
                 start: int, attrs: dict[str, Any] | None = None) -> None:
        self._blocks, self._kinds, self._categories = blocks, kinds, categories
        self.start = start
        self.attrs: dict[str, Any] = dict(attrs or {})

    def __len__(self) -> int:
        return sum(len(b) for b in self._blocks)

    def max_time_ns(self) -> int | None:
        """The latest row time (ns since the epoch), None without rows."""
        ends = [int(b.rows["time"].max()) for b in self._blocks if len(b)]
        return max(ends) if ends else None

    def since(self, time_ns: int) -> BufferSnapshot:
        """The rows whose time is at or after ``time_ns`` (by value: rows need not be in time
        order), as a smaller snapshot (``start`` stays: its rows are no longer contiguous)."""
        kept = []
        for block in self._blocks:
            times = block.rows["time"]
            if not len(block) or times.max() < time_ns:
                continue
            kept.append(block if times.min() >= time_ns else block.take(times >= time_ns))
        return BufferSnapshot(kept, self._kinds, self._categories, self.start, self.attrs)

    def categories_present(self, name: str) -> list[str]:
        """The values of category column ``name`` that occur in these rows, sorted by name
        (the frame's category order)."""
        table = self._categories[name]
        seen = np.zeros(len(table) + 1, dtype=np.int64)
        for block in self._blocks:
            if name in block.layout.kinds and len(block):
                codes = block.rows[name].astype(np.int64)
                codes[codes == NO_CODE] = len(table)
                seen += np.bincount(codes, minlength=len(table) + 1)
        return [category for category in sorted(table) if seen[table[category]]]

    def frame(self) -> pd.DataFrame:
        """These rows as a DataFrame with the schema's dtypes, in time order (built on the
        calling thread; each column is copied once out of the packed rows, twice when rows
        came out of time order: a sample is stamped with its report's time, which may be a
        little before a row another guest appended just before it)."""
        arrays = self._gather()
        index = pd.DatetimeIndex(arrays.pop("time").view("datetime64[ns]"), name="time", copy=False).tz_localize("UTC")
        data = {name: self._series(name, kind, arrays.get(name)) for name, kind in self._kinds.items()}
        frame = pd.DataFrame(data, index=index, copy=False)
        if not index.is_monotonic_increasing:
            frame = frame.iloc[np.argsort(index.asi8, kind="stable")]
        frame.attrs.update(self.attrs)
        return frame

    def _gather(self) -> dict[str, np.ndarray]:
        """Every fixed-size column (and the time) into its own new array. Slice by slice of
        rows, all columns of a slice at once: the packed rows are read from memory once, not
        once per column. Category codes are remapped to the sorted categories on the way."""
        kinds: dict[str, Kind] = {"time": "int", **{n: k for n, k in self._kinds.items() if k != "str"}}
        out = {name: np.empty(len(self), dtype=_OUT_DTYPES[kind]) for name, kind in kinds.items()}
        remaps = {name: self._remap(name) for name, kind in kinds.items() if kind == "category"}
        at = 0
        for block in self._blocks:
            present = block.rows.dtype.names or ()
            for lo in range(0, len(block), _SLICE_ROWS):
                rows = block.rows[lo:lo + _SLICE_ROWS]
                hi = at + len(rows)
                for name, column in out.items():
                    if name not in present:
                        column[at:hi] = _MISSING_OUT[kinds[name]]
                    elif name in remaps:
                        np.take(remaps[name], rows[name], out=column[at:hi])
                    else:
                        column[at:hi] = rows[name]
                at = hi
        return out

    def _remap(self, name: str) -> np.ndarray:
        """Category code (appearance order) -> position in the sorted categories (-1: missing)."""
        table = self._categories[name]
        remap = np.full(NO_CODE + 1, -1, dtype=np.int32)
        for position, category in enumerate(sorted(table)):
            remap[table[category]] = position
        return remap

    def _series(self, name: str, kind: Kind, values: np.ndarray | None) -> object:
        if kind == "str":
            texts: list[str | None] = []
            for block in self._blocks:
                texts += block.texts.get(name) or [None] * len(block)
            return pd.array(texts, dtype="string")
        assert values is not None
        if kind == "float":
            return pd.arrays.FloatingArray(values, np.isnan(values))
        if kind == "bool":
            return values
        if kind == "category":
            dtype = pd.CategoricalDtype(sorted(self._categories[name]))
            return pd.Categorical.from_codes(values, dtype=dtype, validate=False)
        mask = values == MISSING
        if kind == "epoch_s":
            return _datetimes(values, mask)
        if mask.any():
            values[mask] = 0
        return pd.arrays.IntegerArray(values, mask)


#: Rows copied per pass of the gather: about half a megabyte of packed rows, so a slice
#: stays in cache while each of its columns is copied out.
_SLICE_ROWS = 4096
_OUT_DTYPES: dict[str, Any] = {"int": np.int64, "epoch_s": np.int64, "category": np.int32, "float": np.float64,
                               "bool": np.bool_}
_MISSING_OUT: dict[str, object] = {"int": MISSING, "epoch_s": MISSING, "category": -1, "float": math.nan,
                                   "bool": False}


def _datetimes(seconds: np.ndarray, mask: np.ndarray) -> object:
    """Epoch seconds (masked: NaT) as datetime64[ns, UTC]."""
    seconds[mask] = 0
    if len(seconds) and np.abs(seconds).max() > _MAX_EPOCH_S:  # pandas says what is out of range
        ints = pd.arrays.IntegerArray(seconds, mask)
        return pd.to_datetime(pd.Series(ints), unit="s", utc=True).astype("datetime64[ns, UTC]").array
    ns = seconds * 1_000_000_000
    ns[mask] = np.iinfo(np.int64).min  # NaT
    return pd.DatetimeIndex(ns.view("datetime64[ns]"), copy=False).tz_localize("UTC").array


