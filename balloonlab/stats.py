"""Balloon statistics as QEMU reports them, and libvirt's view of the same numbers.

QEMU's ``guest-stats`` property is parsed into :class:`BalloonStats` keeping QEMU's meaning:
memory in bytes, counters as counts, the unset sentinel (2^64-1 on the wire, -1 in QEMU's
docs) as ``None``, stat names QEMU added later kept rather than dropped. libvirt renames and
rescales the same values (``stat-total-memory`` becomes ``available`` in KiB, truncated);
:func:`libvirt_view` reproduces ``virsh dommemstat`` exactly so results can be compared line
by line, but it is a view: balloonlab never stores libvirt's names or units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

#: QEMU's "not set" marker: -1 in its docs, 2^64-1 on the wire (it overflows int64).
UNSET = 2**64 - 1

#: Stats QEMU 7.2 reports, by balloonlab's name (QEMU's name without ``stat-``, snake case).
KNOWN_STATS: tuple[str, ...] = (
    "swap_in", "swap_out", "major_faults", "minor_faults", "free_memory", "total_memory",
    "available_memory", "disk_caches", "htlb_pgalloc", "htlb_pgfail",
)
#: Cumulative counters: they only grow until the guest resets.
COUNTERS: tuple[str, ...] = ("swap_in", "swap_out", "major_faults", "minor_faults",
                             "htlb_pgalloc", "htlb_pgfail")

# libvirt's dommemstat rows in the order virsh prints them: (libvirt name, source, divisor).
# Source is a balloonlab stat name, or "actual"/"last_update"/"rss" (see qemuMonitorJSON-
# GetMemoryStats: memory values are divided by 1024 with truncation, counts are not).
_LIBVIRT_ROWS: tuple[tuple[str, str, int], ...] = (
    ("actual", "actual", 1024),
    ("swap_in", "swap_in", 1024),
    ("swap_out", "swap_out", 1024),
    ("major_fault", "major_faults", 1),
    ("minor_fault", "minor_faults", 1),
    ("unused", "free_memory", 1024),
    ("available", "total_memory", 1024),
    ("usable", "available_memory", 1024),
    ("last_update", "last_update", 1),
    ("disk_caches", "disk_caches", 1024),
    ("hugetlb_pgalloc", "htlb_pgalloc", 1),
    ("hugetlb_pgfail", "htlb_pgfail", 1),
    ("rss", "rss", 1024),
)
#: balloonlab stat name -> libvirt dommemstat name, for the stats libvirt maps.
LIBVIRT_NAMES: dict[str, str] = {src: name for name, src, _ in _LIBVIRT_ROWS}


def stat_name(qemu_name: str) -> str:
    """``"stat-free-memory"`` -> ``"free_memory"`` (the column name balloonlab uses)."""
    return qemu_name.removeprefix("stat-").replace("-", "_")


def clean_value(value: object) -> int | None:
    """QEMU's number, or None for the unset sentinel (2^64-1 or -1) and non-integers."""
    if type(value) is not int or value == UNSET or value < 0:
        return None
    return value


@dataclass(frozen=True)
class BalloonStats:
    """One read of the balloon: the guest's last report plus the balloon's size.

    :param read_time: host wall clock (epoch s) when balloonlab read the values.
    :param last_update: QEMU's last-update (host epoch s of the guest's report), None when 0
        (the guest never reported since the device reset).
    :param stats: every stat QEMU returned, by :func:`stat_name`; None where unset.
    :param actual: query-balloon ``actual`` in bytes (guest memory after ballooning).
    :param new: True when ``last_update`` moved since the previous read on this connection.
    :param reset: True when a guest reset/reboot was seen before this sample.
    """

    read_time: float
    last_update: int | None
    stats: dict[str, int | None] = field(default_factory=dict)
    actual: int | None = None
    new: bool = False
    reset: bool = False

    @property
    def available(self) -> bool:
        """True once the guest has reported at least once (last-update is not 0)."""
        return self.last_update is not None

    @property
    def age_s(self) -> float | None:
        """Seconds between the guest's report and the read: how fresh the numbers are."""
        return None if self.last_update is None else max(0.0, self.read_time - self.last_update)

    @property
    def time(self) -> datetime:
        """``read_time`` as a UTC datetime."""
        return datetime.fromtimestamp(self.read_time, UTC)

    def __getitem__(self, name: str) -> int | None:
        return self.stats.get(name)


def parse_guest_stats(reply: dict[str, object], *, actual: int | None = None,
                      read_time: float | None = None) -> BalloonStats:
    """Build a :class:`BalloonStats` from QEMU's ``guest-stats`` reply (``new`` left False).

    :raises ValueError: when the reply does not have QEMU's shape.
    """
    if not isinstance(reply, dict) or "stats" not in reply or "last-update" not in reply:
        raise ValueError(f"guest-stats reply has no 'stats'/'last-update': {reply!r}")
    raw = reply["stats"]
    if not isinstance(raw, dict):
        raise ValueError(f"guest-stats 'stats' is not an object: {raw!r}")
    last_update = clean_value(reply["last-update"]) or None
    return BalloonStats(
        read_time=time.time() if read_time is None else read_time,
        last_update=last_update,
        stats={stat_name(k): clean_value(v) for k, v in raw.items()},
        actual=actual,
    )


def process_rss_bytes(pid: int) -> int | None:
    """RSS of a host process as libvirt computes it (``/proc/PID/stat`` field 24 x page size)."""
    import os
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def libvirt_view(stats: BalloonStats, rss_bytes: int | None = None) -> dict[str, int]:
    """The same numbers as ``virsh dommemstat`` prints them: libvirt's names, KiB (truncated).

    Unset stats are left out (as libvirt does); ``actual`` and ``rss`` are there whenever
    known, even when the guest never reported. Newer stats libvirt does not map are omitted.
    """
    values: dict[str, int | None] = dict(stats.stats)
    values["actual"] = stats.actual
    values["last_update"] = stats.last_update or 0
    values["rss"] = rss_bytes
    view: dict[str, int] = {}
    for name, source, divisor in _LIBVIRT_ROWS:
        value = values.get(source)
        if value is not None:
            view[name] = value // divisor
    return view


def format_dommemstat(view: dict[str, int]) -> str:
    """Render a :func:`libvirt_view` the way ``virsh dommemstat`` prints it."""
    return "".join(f"{name} {value}\n" for name, value in view.items())
