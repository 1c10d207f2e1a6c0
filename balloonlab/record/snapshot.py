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
        """These rows as a DataFrame with the schema's dtypes (built on the calling thread;
        each column is copied once out of the packed rows)."""
        times = self._gather("time", np.dtype(np.int64), 0)
        index = pd.DatetimeIndex(times.view("datetime64[ns]"), name="time", copy=False).tz_localize("UTC")
        data = {name: self._series(name, kind) for name, kind in self._kinds.items()}
        frame = pd.DataFrame(data, index=index, copy=False)
        frame.attrs.update(self.attrs)
        return frame

    def _gather(self, name: str, dtype: np.dtype[Any], missing: object) -> np.ndarray:
        """Column ``name`` of every block into one new array (``missing`` where a block
        predates the column)."""
        out = np.empty(len(self), dtype=dtype)
        at = 0
        for block in self._blocks:
            n = len(block)
            if name in block.rows.dtype.names:  # type: ignore[operator]
                out[at:at + n] = block.rows[name]
            else:
                out[at:at + n] = missing
            at += n
        return out

    def _series(self, name: str, kind: Kind) -> object:
        if kind == "str":
            values: list[str | None] = []
            for block in self._blocks:
                values += block.texts.get(name) or [None] * len(block)
            return pd.array(values, dtype="string")
        if kind == "float":
            floats = self._gather(name, np.dtype(np.float64), math.nan)
            return pd.arrays.FloatingArray(floats, np.isnan(floats))
        if kind == "bool":
            return self._gather(name, np.dtype(np.bool_), False)
        if kind == "category":
            return self._categorical(name)
        ints = self._gather(name, np.dtype(np.int64), MISSING)
        mask = ints == MISSING
        if kind == "epoch_s":
            return _datetimes(ints, mask)
        ints[mask] = 0
        return pd.arrays.IntegerArray(ints, mask)

    def _categorical(self, name: str) -> pd.Categorical:
        """Codes (in appearance order) remapped to the sorted categories, in one pass."""
        table = self._categories[name]
        names = sorted(table)
        remap = np.full(NO_CODE + 1, -1, dtype=np.int16 if len(table) < 2**15 else np.int32)
        for position, category in enumerate(names):
            remap[table[category]] = position
        codes = np.empty(len(self), dtype=remap.dtype)
        at = 0
        for block in self._blocks:
            n = len(block)
            if name in block.rows.dtype.names:  # type: ignore[operator]
                np.take(remap, block.rows[name], out=codes[at:at + n])
            else:
                codes[at:at + n] = -1
            at += n
        return pd.Categorical.from_codes(codes, dtype=pd.CategoricalDtype(names), validate=False)


def _datetimes(seconds: np.ndarray, mask: np.ndarray) -> object:
    """Epoch seconds (masked: NaT) as datetime64[ns, UTC]."""
    seconds[mask] = 0
    if len(seconds) and np.abs(seconds).max() > _MAX_EPOCH_S:  # pandas says what is out of range
        ints = pd.arrays.IntegerArray(seconds, mask)
        return pd.to_datetime(pd.Series(ints), unit="s", utc=True).astype("datetime64[ns, UTC]").array
    ns = seconds * 1_000_000_000
    ns[mask] = np.iinfo(np.int64).min  # NaT
    return pd.DatetimeIndex(ns.view("datetime64[ns]"), copy=False).tz_localize("UTC").array


