"""Memory sizes: libvirt's units, parsed exactly, and formatted for people.

libvirt's ``unit=`` attribute and balloonlab's size strings share one table, so ``"256M"``
means the same in a domain XML, a balloon target and a workload request: ``M`` is MiB
(as in QEMU and libvirt) and ``MB`` is 10^6 bytes (libvirt's decimal unit).
"""

from __future__ import annotations

import re

#: libvirt's memory units (docs/formatdomain.rst "Memory Allocation"), to bytes.
UNITS: dict[str, int] = {
    "b": 1, "bytes": 1,
    "KB": 10**3, "k": 2**10, "K": 2**10, "KiB": 2**10,
    "MB": 10**6, "M": 2**20, "MiB": 2**20,
    "GB": 10**9, "G": 2**30, "GiB": 2**30,
    "TB": 10**12, "T": 2**40, "TiB": 2**40,
}
_UNIT_HELP = "b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB"
_SIZE_RE = re.compile(r"^\s*(-?)(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def unit_factor(unit: str) -> int:
    """Bytes per ``unit`` (libvirt's table; ``k``/``K`` and ``M`` etc. are binary).

    :raises ValueError: for a unit libvirt does not accept (e.g. ``"Mb"``, ``"mib"``).
    """
    try:
        return UNITS[unit]
    except KeyError:
        raise ValueError(f"unknown memory unit {unit!r}; expected one of: {_UNIT_HELP}") from None


def parse_size(value: int | str, default_unit: str = "b") -> int:
    """Parse a size such as ``268435456``, ``"256M"``, ``"1.5GiB"`` or ``"512 MB"`` to bytes.

    A bare number uses ``default_unit``. Fractions are allowed when they make whole bytes.

    :raises TypeError: for anything but an int or str (bool included).
    :raises ValueError: for a negative or malformed size or an unknown unit.
    """
    if type(value) is int:
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value * unit_factor(default_unit)
    if not isinstance(value, str):
        raise TypeError(f"size must be an int (bytes) or a string like '256M', got {type(value).__name__}")
    match = _SIZE_RE.match(value)
    if not match:
        raise ValueError(f"cannot read size {value!r}; expected a number with an optional unit, like '256M'")
    sign, number, unit = match.groups()
    if sign and float(number) != 0:
        raise ValueError(f"size must not be negative, got {value!r}")
    factor = unit_factor(unit or default_unit)
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * factor
        denominator: int = 10 ** len(frac)  # int ** int is Any to mypy (negative powers are floats)
        if numerator % denominator:
            raise ValueError(f"size {value!r} is not a whole number of bytes")
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
