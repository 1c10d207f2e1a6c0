"""Balloon statistics as QEMU reports them, and libvirt's view of the same numbers.

QEMU's ``guest-stats`` property is parsed into :class:`BalloonStats` keeping QEMU's meaning:
memory in bytes, counters as counts, the unset sentinel (2^64-1 on the wire, -1 in QEMU's
docs) as ``None``, stat names QEMU added later kept rather than dropped. libvirt renames and
rescales the same values (``stat-total-memory`` becomes ``available`` in KiB, truncated);
:func:`libvirt_view` reproduces ``virsh dommemstat`` exactly so results can be compared line
by line, but it is a view: balloonlab never stores libvirt's names or units.
"""

from __future__ import annotations

import reprlib
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime

from balloonlab.model.schema import FROM_LIBVIRT, LIBVIRT_ROWS, stat_name

#: QEMU's "not set" marker: -1 in its docs, 2^64-1 on the wire (it overflows int64).
UNSET = 2**64 - 1

def clean_value(value: object) -> int | None:
    """QEMU's number, or None for the unset sentinel (2^64-1 or -1) and for what cannot be a
    QEMU stat: non-integers (bool included), negatives and integers beyond uint64."""
    if type(value) is not int or not 0 <= value < UNSET:
        return None
    return value


# Replies are outside input: messages show them through reprlib, which bounds depth and length
# (repr() of a deeply nested reply raises RecursionError).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxlong = 3, 4, 4, 24, 24


def _shown(value: object, limit: int = 200) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class BalloonStats:
    """One read of the balloon: the guest's last report plus the balloon's size.

    :param read_time: host wall clock (epoch s) when balloonlab read the values.
    :param last_update: QEMU's last-update (host epoch s of the guest's report), None when 0
        (the guest never reported since the device reset).
    :param stats: every stat QEMU returned, by :func:`stat_name`; None where unset.
    :param actual: query-balloon ``actual`` in bytes (guest memory after ballooning).
    :param new: True when the reader's classifier found a report it had not seen
        (:class:`~balloonlab.model.classify.StatsClassifier`); False on a raw read.
    :param reset: True when that classifier saw a guest reset/reboot before this sample.
    :param resets: RESET events the balloon had seen on its connection when it was read
        (a count every reader can compare, so none consumes another's reset).
    :param reset_time: host time (epoch s) of the newest of those resets, None when unknown:
        a report whose last-update is older was made before that reset.
    """

    read_time: float
    last_update: int | None
    stats: dict[str, int | None] = field(default_factory=dict)
    actual: int | None = None
    new: bool = False
    reset: bool = False
    resets: int = 0
    reset_time: float | None = None

    @property
    def reported(self) -> bool:
        """True once the guest has reported at least once (last-update is not 0)."""
        return self.last_update is not None

    @property
    def available(self) -> bool:
        """Deprecated name of :attr:`reported` ("available" is also a stat and a libvirt name)."""
        warnings.warn("BalloonStats.available is deprecated: use .reported", DeprecationWarning, stacklevel=2)
        return self.reported

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
                      read_time: float | None = None, resets: int = 0,
                      reset_time: float | None = None) -> BalloonStats:
    """Build a :class:`BalloonStats` from QEMU's ``guest-stats`` reply (``new`` left False).

    :raises ValueError: when the reply does not have QEMU's shape (an object with a ``stats``
        object keyed by stat names, and ``last-update``).
    """
    if not isinstance(reply, dict) or "stats" not in reply or "last-update" not in reply:
        raise ValueError(f"guest-stats reply has no 'stats'/'last-update': {_shown(reply)}")
    raw = reply["stats"]
    if not isinstance(raw, dict):
        raise ValueError(f"guest-stats 'stats' is not an object: {_shown(raw)}")
    if not all(isinstance(key, str) for key in raw):
        bad = next(key for key in raw if not isinstance(key, str))
        raise ValueError(f"guest-stats 'stats' has a key that is not a stat name: {_shown(bad)}")
    last_update = clean_value(reply["last-update"]) or None
    names = _NAMES
    stats: dict[str, int | None] = {}
    for key, value in raw.items():  # the per-sample path: no call per stat but the dict's
        name = names.get(key)
        if name is None:
            name = names[key] = stat_name(key)
        stats[name] = value if type(value) is int and 0 <= value < UNSET else None  # as clean_value
    return BalloonStats(time.time() if read_time is None else read_time, last_update, stats, actual,
                        False, False, resets, reset_time)


#: QEMU key -> stat name, filled as keys are met (a reply's keys are a handful per QEMU version).
_NAMES: dict[str, str] = {}


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
    for name, source, divisor in LIBVIRT_ROWS:
        value = values.get(source)
        if value is not None:
            view[name] = value // divisor
    return view


def format_dommemstat(view: dict[str, int]) -> str:
    """Render a :func:`libvirt_view` the way ``virsh dommemstat`` prints it."""
    return "".join(f"{name} {value}\n" for name, value in view.items())


def stats_from_libvirt(raw: dict[str, int], read_time: float | None = None,
                       resets: int = 0, reset_time: float | None = None) -> tuple[BalloonStats, int | None]:
    """``virDomainMemoryStats()`` -> (BalloonStats in balloonlab's names and bytes, rss bytes).

    The inverse of :func:`libvirt_view`: KiB values are multiplied by 1024 (the sub-KiB part
    libvirt truncated is lost); unset and unmapped stats are simply absent. A name libvirt
    reports that balloonlab does not know is kept as libvirt gave it.
    """
    values: dict[str, int] = {}
    for name, value in raw.items():
        ours, factor = FROM_LIBVIRT.get(name, (name, 1))
        values[ours] = int(value) * factor
    actual, last_update, rss = (values.pop(k, None) for k in ("actual", "last_update", "rss"))
    record = BalloonStats(read_time=time.time() if read_time is None else read_time,
                          last_update=last_update or None, stats=dict(values), actual=actual, resets=resets,
                          reset_time=reset_time)
    return record, rss
