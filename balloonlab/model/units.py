"""Memory sizes: libvirt's units, parsed exactly, and formatted for people.

libvirt's ``unit=`` attribute and balloonlab's size strings share one table, so ``"256M"``
means the same in a domain XML, a balloon target and a workload request: ``M`` is MiB
(as in QEMU and libvirt) and ``MB`` is 10^6 bytes (libvirt's decimal unit).
"""

from __future__ import annotations

import re

#: libvirt's memory units as its docs list them (docs/formatdomain.rst "Memory Allocation"), to
#: bytes. libvirt itself (virScaleInteger) reads any case and P/E too: :func:`unit_factor`.
UNITS: dict[str, int] = {
    "b": 1, "bytes": 1,
    "KB": 10**3, "k": 2**10, "K": 2**10, "KiB": 2**10,
    "MB": 10**6, "M": 2**20, "MiB": 2**20,
    "GB": 10**9, "G": 2**30, "GiB": 2**30,
    "TB": 10**12, "T": 2**40, "TiB": 2**40,
}
_UNIT_HELP = "b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB (any case; P and E too)"
_BINARY: dict[str, int] = {prefix: 1 << (10 * (i + 1)) for i, prefix in enumerate("kmgtpe")}
_DECIMAL: dict[str, int] = {prefix: 1000 ** (i + 1) for i, prefix in enumerate("kmgtpe")}
# [0-9], not \d: \d also matches other scripts' digits ("\u0663" is an Arabic-Indic 3), which
# int() would read, but libvirt and QEMU would not.
_SIZE_RE = re.compile(r"\s*(-?)([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*\Z")
#: More digits than any size needs (2^64 has 20; one byte in TiB has 40 after the point).
MAX_DIGITS = 60


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut short for an error message (sizes come from users and files)."""
    if isinstance(value, int) and value.bit_length() > 128:  # str() refuses ints of > 4300 digits
        return f"a {value.bit_length()}-bit integer"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unit_factor(unit: str) -> int:
    """Bytes per ``unit``, read as libvirt reads it (virScaleInteger): case-insensitive;
    ``b``/``byte``/``bytes`` are 1; a prefix letter (k, m, g, t, p, e) alone or with ``iB`` is
    binary (``M``, ``MiB``, ``mib``), with ``B`` decimal (``MB``, ``mb``: 10^6).

    :raises ValueError: for a unit libvirt does not accept (e.g. ``"Mbytes"``, ``"x"``).
    :raises TypeError: for a unit that is not a str.
    """
    if not isinstance(unit, str):
        raise TypeError(f"a memory unit must be a str like 'MiB', got {type(unit).__name__}")
    lower = unit.lower() if unit.isascii() else ""
    if lower in ("b", "byte", "bytes"):
        return 1
    if lower[:1] in _BINARY and lower[1:] in ("", "ib"):
        return _BINARY[lower[:1]]
    if lower[:1] in _DECIMAL and lower[1:] == "b":
        return _DECIMAL[lower[:1]]
    raise ValueError(f"unknown memory unit {_shown(unit)}; expected one of: {_UNIT_HELP}")


def parse_size(value: int | str, default_unit: str = "b") -> int:
    """Parse a size such as ``268435456``, ``"256M"``, ``"1.5GiB"`` or ``"512 MB"`` to bytes.

    A string is an optional ``-`` (only for zero), ASCII digits with an optional ``.`` and
    more digits (at most :data:`MAX_DIGITS` in all), then an optional unit of libvirt's table
    (:data:`UNITS`), with any whitespace around them. A bare number uses ``default_unit``.
    Fractions are allowed when they make whole bytes.

    :raises TypeError: for anything but an int or str (bool included), or a non-str unit.
    :raises ValueError: for a negative or malformed size or an unknown unit.
    """
    if type(value) is int:
        if value < 0:
            raise ValueError(f"size must not be negative, got {_shown(value)}")
        return value * unit_factor(default_unit)
    if not isinstance(value, str):
        raise TypeError(f"size must be an int (bytes) or a string like '256M', got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"cannot read size {_shown(value)}; expected a number with an optional unit, like '256M'")
    sign, number, unit = match.groups()
    if len(number.replace(".", "")) > MAX_DIGITS:
        raise ValueError(f"size {_shown(value)} has more than {MAX_DIGITS} digits; expected a size like '256M'")
    if sign and number.strip("0.") != "":
        raise ValueError(f"size must not be negative, got {_shown(value)}")
    factor = unit_factor(unit or default_unit)
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * factor
        denominator: int = 10 ** len(frac)  # int ** int is Any to mypy (negative powers are floats)
        if numerator % denominator:
            raise ValueError(f"size {_shown(value)} is not a whole number of bytes")
        return numerator // denominator
    return int(number) * factor


def format_size(nbytes: object) -> str:
    """Format bytes for people with binary units: ``268435456`` -> ``"256 MiB"``; NA as "NA"."""
    try:
        value = float(nbytes)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "NA"  # None, pandas.NA
    if value != value:
        return "NA"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
