"""How a row buffer packs rows: the layout of one run of rows, and a block of sealed rows.

A layout groups the fixed-size columns by kind (int64, uint16 category codes, float64, bool) so
that a row's :mod:`struct` arguments are a concatenation, and describes the same bytes as a
numpy structured dtype, so packed rows become arrays without a copy. Text columns (an event's
detail) are kept beside the packed rows as Python strings.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from balloonlab.model.schema import SampleKind

Kind = SampleKind
#: An int value that is missing (int64's minimum: no stat, size or count is negative).
MISSING = -(2**63)
#: A category code that is missing; a column holds at most this many distinct values.
NO_CODE = 0xFFFF
_STRUCT_CODES = {"int": "q", "epoch_s": "q", "category": "H", "float": "d", "bool": "?"}
_NUMPY_CODES = {"int": "<i8", "epoch_s": "<i8", "category": "<u2", "float": "<f8", "bool": "?"}


@dataclass(frozen=True)
class Layout:
    """How one run of rows is packed: the fixed-size columns grouped by kind (so a row's pack
    arguments are a concatenation: time, ints, floats, category codes, bools), and the text
    columns kept beside them."""

    kinds: dict[str, Kind]
    ints: tuple[str, ...]
    categories: tuple[str, ...]
    floats: tuple[str, ...]
    bools: tuple[str, ...]
    texts: tuple[str, ...]
    packer: struct.Struct
    dtype: np.dtype[Any]
    #: ``pack_row(time_ns, row, code)``: the row's packed bytes (``code(name, value)`` gives a
    #: category's code); raises ``struct.error`` for an int beyond int64 or a non-number.
    pack_row: Callable[[int, Mapping[str, object], Callable[[str, object], int]], bytes]

    @classmethod
    def of(cls, kinds: Mapping[str, Kind]) -> Layout:
        groups: dict[str, list[str]] = {"int": [], "category": [], "float": [], "bool": [], "str": []}
        for name, kind in kinds.items():
            groups["int" if kind == "epoch_s" else kind].append(name)
        # 8-byte fields first and the row padded to 8 bytes: every int64/float64 is aligned,
        # which numpy copies several times faster than unaligned fields.
        packed = ("time", *groups["int"], *groups["float"], *groups["category"], *groups["bool"])
        all_kinds: dict[str, Kind] = {"time": "int", **kinds}
        codes = "".join(_STRUCT_CODES[all_kinds[n]] for n in packed)
        pad = -struct.calcsize("<" + codes) % 8
        packer = struct.Struct("<" + codes + "x" * pad)
        fields = np.dtype([(n, _NUMPY_CODES[all_kinds[n]]) for n in packed])  # packed, like '<' in struct
        padded: Any = {"names": list(packed), "formats": [fields[n] for n in packed],
                       "offsets": [fields.fields[n][1] for n in packed] if fields.fields else [],
                       "itemsize": packer.size}
        dtype = np.dtype(padded)
        return cls(dict(kinds), tuple(groups["int"]), tuple(groups["category"]), tuple(groups["float"]),
                   tuple(groups["bool"]), tuple(groups["str"]), packer, dtype,
                   _compile_pack_row(groups, packer))

    @property
    def row_bytes(self) -> int:
        """Bytes one row takes in the packed rows."""
        return self.packer.size


class Block:
    """Packed rows over one row range (a structured array, never written once made) and
    their text columns."""

    __slots__ = ("rows", "texts", "layout")

    def __init__(self, rows: np.ndarray, texts: dict[str, list[str | None]], layout: Layout) -> None:
        self.rows, self.texts, self.layout = rows, texts, layout

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, rows: slice | np.ndarray) -> Block:
        """Some rows: a slice (a view) or a boolean mask (a copy)."""
        if isinstance(rows, slice):
            texts = {n: v[rows] for n, v in self.texts.items()}
        else:
            picked = np.flatnonzero(rows)
            texts = {n: [v[i] for i in picked] for n, v in self.texts.items()}
        return Block(self.rows[rows], texts, self.layout)




def _compile_pack_row(groups: dict[str, list[str]], packer: struct.Struct) -> Callable[..., bytes]:
    """The row packer of one layout as straight-line code, made once per layout (as
    ``collections.namedtuple`` and ``dataclasses`` make theirs): one ``row.get`` and one
    test per column, no loop or comprehension per row. Column names enter the code only as
    ``repr()`` literals."""
    args = ["time_ns"]
    body = ["def pack_row(time_ns, row, code):", "    get = row.get"]
    for i, name in enumerate(groups["int"]):
        body.append(f"    i{i} = get({name!r})")
        args.append(f"MISSING if i{i} is None else i{i}")
    for i, name in enumerate(groups["float"]):
        body.append(f"    f{i} = get({name!r})")
        args.append(f"NAN if f{i} is None else f{i}")
    args += [f"code({name!r}, get({name!r}))" for name in groups["category"]]
    args += [f"bool(get({name!r}))" for name in groups["bool"]]
    body.append(f"    return pack({', '.join(args)})")
    namespace: dict[str, Any] = {"MISSING": MISSING, "NAN": math.nan, "pack": packer.pack}
    exec("\n".join(body), namespace)  # the code above: literals and repr()s of names only
    pack_row: Callable[..., bytes] = namespace["pack_row"]
    return pack_row
