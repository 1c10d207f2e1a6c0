"""Reading the host itself: /proc/meminfo, /proc/vmstat, memory PSI and KSM, as one row.

The columns are :data:`~balloonlab.model.schema.HOST_FRAME`'s. A file the kernel does not have
(no PSI: ``CONFIG_PSI`` off or ``psi=0``; no KSM: ``CONFIG_KSM`` off) leaves its columns out of
the row, so they are NA in the frame, never 0: a policy can tell "no pressure" from "no
pressure information".

A budget counts the guests' resident guest RAM (``guests_ram``), not their whole QEMU RSS: the
rest (the TCG translation buffer and QEMU's own heap, about 110 MiB per built-in guest under TCG,
a few MiB under KVM) is no policy's to reclaim, and under TCG it would use up a small budget
before any guest touched memory. One read costs about 0.33 ms of CPU (benchmarks/policy_cost.py: 11x a
read of /proc/meminfo alone; four /proc files and seven one-line KSM files), so the host is read
once per ``host_interval_s`` (0.03 % of a core at 1 s), not per guest sample. Each host row also
reads every local guest's ``host_memory()`` (0.26-0.35 ms per guest, benchmarks/host_view_cost.py).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path

from balloonlab.model.schema import HOST_KSM, HOST_MEMINFO, HOST_VMSTAT


class HostReader:
    """Reads the host's memory state; ``root`` lets a test point it at a fake /proc and /sys.

    :param name: the host's name in the ``host`` column (default: this machine's hostname).
    """

    def __init__(self, name: str | None = None, *, root: str | Path = "/") -> None:
        self.name = name or socket.gethostname()
        root = Path(root)
        self._meminfo = root / "proc/meminfo"
        self._vmstat = root / "proc/vmstat"
        self._psi = root / "proc/pressure/memory"
        self._ksm = root / "sys/kernel/mm/ksm"

    def read(self, guests: Mapping[str, tuple[int | None, int | None]] | None = None,
             budget: int | None = None) -> dict[str, object]:
        """One host row.

        :param guests: each sampled guest's QEMU ``(RSS, resident guest RAM)`` in bytes (None
            where unknown: a remote guest, a layout not found yet); gives ``guests``,
            ``guests_rss``, ``guests_ram``, ``rss.<guest>`` and ``guest_ram.<guest>``.
        :param budget: the host memory budget in bytes, if a policy has one: ``budget_available``
            is the budget minus the guests' footprints (guest RAM, or RSS where it is unknown);
            ``guests_ram`` and ``budget_available`` are left out (NA) while a guest's footprint is
            unknown: a missing guest never makes the budget look emptier than it is.
        """
        row: dict[str, object] = {"host": self.name}
        row.update(parse_meminfo(_read(self._meminfo)))
        row.update(parse_vmstat(_read(self._vmstat)))
        row.update(parse_psi(_read(self._psi)))
        row.update(self._read_ksm())
        given = guests or {}
        row["guests"] = len(given)
        row["guests_rss"] = sum(rss for rss, _ in given.values() if rss is not None)
        footprints = [footprint(rss, ram) for rss, ram in given.values()]
        if None not in footprints:
            row["guests_ram"] = sum(f for f in footprints if f is not None)
        for guest, (rss, ram) in given.items():
            if rss is not None:
                row[f"rss.{guest}"] = rss
            if ram is not None:
                row[f"guest_ram.{guest}"] = ram
        if budget is not None:
            row["budget"] = budget
            if "guests_ram" in row:
                row["budget_available"] = budget - int(row["guests_ram"])  # type: ignore[call-overload]
        return row

    def _read_ksm(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in HOST_KSM:
            text = _read(self._ksm / name).strip()
            if text.lstrip("-").isdigit():
                # general_profit is in bytes already; the pages_* are page counts, kept as such.
                out[f"ksm_{name}"] = int(text)
        return out


def footprint(rss: int | None, guest_ram: int | None) -> int | None:
    """What a guest counts against a budget: its resident guest RAM (what a balloon or virtio-mem
    can give back), its QEMU's RSS where that is unknown, None when neither is known."""
    return guest_ram if guest_ram is not None else rss


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # absent (no PSI, no KSM) or unreadable: its columns stay NA
        return ""


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` -> the host columns, in bytes (the kernel prints kB = KiB)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        column = HOST_MEMINFO.get(key)
        if column is None:
            continue
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[column] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


def parse_vmstat(text: str) -> dict[str, int]:
    """``/proc/vmstat`` -> the counters of :data:`HOST_VMSTAT`."""
    wanted = set(HOST_VMSTAT)
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in wanted and value.strip().isdigit():
            out[key] = int(value)
    return out


def parse_psi(text: str) -> dict[str, float | int]:
    """``/proc/pressure/memory`` -> ``psi_some_avg10`` ... ``psi_full_total_us``."""
    out: dict[str, float | int] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        if kind not in ("some", "full"):
            continue
        for pair in pairs:
            key, _, value = pair.partition("=")
            try:
                if key == "total":
                    out[f"psi_{kind}_total_us"] = int(value)
                elif key in ("avg10", "avg60", "avg300"):
                    out[f"psi_{kind}_{key}"] = float(value)
            except ValueError:
                continue
    return out
