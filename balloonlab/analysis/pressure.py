"""Memory pressure per guest and time window, read from the six counters Linux 6.12 reports.

Linux 6.12's virtio balloon driver (commit "virtio_balloon: introduce memory scan/reclaim
info", zhenwei pi; QEMU reports the stats from 9.2) sends the guest's OOM kills
(``oom_kills``), allocation stalls (``alloc_stalls``: entries into global direct reclaim, the
sum of ``allocstall_*`` over zones) and the pages kswapd and direct reclaim scanned and
reclaimed (``async_scans``, ``direct_scans``, ``async_reclaims``, ``direct_reclaims``:
``pgscan_kswapd``, ``pgscan_direct``, ``pgsteal_kswapd``, ``pgsteal_direct`` in bytes), all
cumulative since the guest booted. The commit's message reads them as (y: the counter rose;
n: it did not; h/l: its rate is high/low):

- OOM[y]: really critical memory pressure;
- OOM[n] STALL[h] DSCAN[l] DRCLM[l]: allocations stall because of a cgroup, not global pressure;
- OOM[n] STALL[h] DSCAN[h] DRCLM[h]: stalls from global pressure, reclaim effective;
- OOM[n] STALL[h] DSCAN[h] DRCLM[l]: global pressure with a low DRCLM/DSCAN ratio: thrashing;
- OOM[n] STALL[n] ASCAN[h] DSCAN[n] ARCLM[l] DRCLM[n]: kswapd tries to reclaim but can't.

:func:`classify_pressure` turns that table into one regime per guest and window, from
counter rises over the window divided by the seconds between the sampler's reads, with the
thresholds of :class:`PressureThresholds` standing for "high" and "low". Pure: it reads a
samples frame and returns a new frame; ``df.balloon.pressure()`` is the same call.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import pandas as pd

from balloonlab.analysis.measures import column, conform, guest_names

MiB = 1 << 20
#: The counters the classifier reads, in the kernel's order (VIRTIO_BALLOON_S_OOM_KILL ..
#: VIRTIO_BALLOON_S_DIRECT_RECLAIM, tags 10-15).
PRESSURE_COUNTERS: tuple[str, ...] = ("oom_kills", "alloc_stalls", "async_scans", "direct_scans",
                                      "async_reclaims", "direct_reclaims")
#: The regimes, least severe first; ``unknown`` sorts lowest so that the max over windows is
#: the worst regime that was actually seen.
REGIMES: tuple[str, ...] = ("unknown", "none", "background", "struggling", "cgroup", "global",
                            "thrashing", "critical")
#: dtype of :func:`classify_pressure`'s ``regime`` column.
REGIME_DTYPE = pd.CategoricalDtype(list(REGIMES), ordered=True)

#: A window: a duration (``"10s"``; a pandas Timedelta is a ``datetime.timedelta``) or a count.
Window: TypeAlias = str | _dt.timedelta | int


@dataclass(frozen=True)
class PressureThresholds:
    """What "high" and "low" mean in the kernel commit's table; every field can be changed.

    :param window: the window a regime is decided over: a duration (``"10s"``, a Timedelta;
        windows are aligned on the epoch, so every guest's windows share their boundaries) or
        a whole number of report intervals (``10``: each window holds that many consecutive
        intervals of one guest, the first starting from the previous window's last read).
        Default ``"10s"``: PSI, the kernel's own pressure measure, averages over 10 s at its
        shortest (``avg10``); at a 1 s stats period a window holds ten reports, so one late
        report or one reclaim burst does not decide it, and at a 10 s period it still holds
        one interval.
    :param stall_rate_high: allocation stalls per second at and above which STALL is "high".
        Default 1.0: a guest with room never enters direct reclaim (0 stalls); a sporadic
        stall (one burst, one high-order allocation) is noise, but one every second sustained
        over the window (10 in 10 s) means allocations keep waiting for reclaim.
    :param direct_scan_high: direct-reclaim scanning per second, as a share of the guest's
        ``total_memory`` (MemTotal, averaged over the window's reads), at and above which DSCAN
        is "high"; below it DSCAN is "low". Default 0.001 (0.1 % of memory per second: 0.5
        MiB/s in a 512 MiB guest, 4 MiB/s in 4 GiB): global direct reclaim scans about as
        fast as the guest allocates, MiB/s to GiB/s, while stalls that find nothing to scan on
        the global LRU lists add close to 0. Relative to memory so that one default fits small
        and large guests. Each stall asks reclaim for 32 pages (SWAP_CLUSTER_MAX, 128 KiB), so
        a guest stalling only a few times a second can stay under this and read as ``cgroup``.
    :param async_scan_high: kswapd scanning per second as a share of ``total_memory`` at and
        above which ASCAN is "high" (the commit's last row). Default 0.001, as for direct scans.
    :param thrashing_ratio: DRCLM/DSCAN (bytes reclaimed per byte scanned by direct reclaim)
        below which stalling global reclaim is ``thrashing`` rather than ``global``. Default
        0.3: sar(1) documents the same ratio (pgsteal/pgscan, ``%vmeff``) as "near 100 %:
        almost every page coming off the tail of the inactive list is being reaped; too low
        (e.g. less than 30 %): the virtual memory is having some difficulty".
    :param struggling_ratio: ARCLM/ASCAN below which high kswapd scanning is ``struggling``.
        Default 0.3, sar's figure again.
    :param min_scan_bytes: scanning (bytes) a window must hold before its reclaim/scan ratio is
        computed (NA below, and no ``thrashing``/``struggling`` verdict from it). Default 1 MiB
        (256 pages of 4 KiB, eight of reclaim's 32-page batches): below a few batches the ratio
        jumps by a whole batch at a time. It also is the kswapd scanning a window needs to be
        ``background`` rather than ``none``.
    :raises ValueError: for a negative rate, a ratio outside [0, 1], a negative
        ``min_scan_bytes`` or a window that is not a positive duration or count.
    :raises TypeError: for a window of another type (a float is ambiguous: write ``"10s"``).
    """

    window: Window = "10s"
    stall_rate_high: float = 1.0
    direct_scan_high: float = 0.001
    async_scan_high: float = 0.001
    thrashing_ratio: float = 0.3
    struggling_ratio: float = 0.3
    min_scan_bytes: int = MiB

    def __post_init__(self) -> None:
        parse_window(self.window)
        for name in ("stall_rate_high", "direct_scan_high", "async_scan_high"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{name} must be a rate >= 0, not {value!r}")
        for name in ("thrashing_ratio", "struggling_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be a ratio in [0, 1], not {value!r}")
        least: object = self.min_scan_bytes  # checked as a caller may have passed anything
        if isinstance(least, bool) or not isinstance(least, int) or least < 0:
            raise ValueError(f"min_scan_bytes must be a whole number of bytes >= 0, not {least!r}")


def parse_window(window: object) -> pd.Timedelta | int:
    """A window as :func:`classify_pressure` uses it: a positive Timedelta or a count >= 1.

    :param window: ``"10s"``, a Timedelta / timedelta, or a whole number of report intervals.
    :raises ValueError: for a duration <= 0, a string without a unit (``"10"``) or a count < 1.
    :raises TypeError: for any other type (a float or a bool).
    """
    if isinstance(window, bool) or not isinstance(window, str | _dt.timedelta | int):
        raise TypeError(f"window is a duration ('10s', a Timedelta) or a whole number of report "
                        f"intervals (10), not {window!r}")
    if isinstance(window, int):
        if window < 1:
            raise ValueError(f"window must be at least 1 report interval, not {window}")
        return window
    if isinstance(window, str) and window.strip().replace(".", "", 1).isdigit():
        raise ValueError(f"window {window!r} has no unit: write '{window.strip()}s', or "
                         f"{window.strip()} (an int) for that many report intervals")
    span = pd.Timedelta(window)
    if pd.isna(span) or span <= pd.Timedelta(0):
        raise ValueError(f"window must be a positive duration, not {window!r}")
    return span


def classify_pressure(samples: pd.DataFrame, window: Window | None = None,
                      thresholds: PressureThresholds | None = None) -> pd.DataFrame:
    """One memory-pressure regime per guest and window, after the kernel commit's table.

    Per guest, in read-time order, each read after the first closes an *interval* since the
    guest's previous read. An interval counts only when time passed, its end is not flagged
    ``reset``, all six counters are known at both ends and none went down (a reset the
    sampler did not flag); it belongs to the window of its closing read. So a window that
    spans a guest reset adds what happened before and after it, never a negative rise or the
    jump from 0 to the counters' new values. A window's rise of each counter is the sum over
    its counted intervals, and its rates divide by their seconds (``span_s``, read times from
    the index: QEMU's ``last_update`` has whole-second resolution). The regime, first match
    wins:

    - ``unknown``: no interval counted (the counters are NA, as on QEMU < 9.2 or Linux < 6.12,
      or the window holds only a guest's first read, or only reset intervals); also where
      ``total_memory`` is unknown and the verdict needs a scan rate against it (stalls high,
      so DSCAN decides; or kswapd's reclaim/scan ratio low, so ASCAN decides).
    - ``critical`` (OOM[y]): ``oom_kills`` rose.
    - ``thrashing`` (STALL[h] DSCAN[h] DRCLM[l]): stalls high, direct scanning high, and
      DRCLM/DSCAN below ``thrashing_ratio``: direct reclaim scans a lot and frees little.
    - ``global`` (STALL[h] DSCAN[h] DRCLM[h]): stalls high, direct scanning high, reclaim
      effective (or too little scanned to judge the ratio): global memory is short.
    - ``cgroup`` (STALL[h] DSCAN[l] DRCLM[l]): stalls high, direct scanning low: the commit
      reads this as stalls due to a cgroup rather than global pressure. Note: in Linux 6.12's
      mm/vmscan.c, reclaim on behalf of a cgroup limit (``cgroup_reclaim()``) counts neither
      ``allocstall`` nor the global ``pgscan``/``pgsteal`` events, so what this row sees is
      global direct reclaim that found little to scan on the global LRU lists. Seen on real
      guests (tests/test_pressure_guests.py's set-up, README): a balloon inflated past what the
      guest can give, swap full, reads as this row (about 10 stalls/s, no scanning: the driver
      retries a failed page allocation every 200 ms); read it beside ``actual`` short of
      ``target``.
    - ``struggling`` (STALL[n] ASCAN[h] ARCLM[l]): stalls not high, kswapd scanning high,
      ARCLM/ASCAN below ``struggling_ratio``: kswapd tries to reclaim but can't; the next
      demand for memory will stall.
    - ``background``: stalls not high, kswapd scanned at least ``min_scan_bytes`` and is not
      struggling: reclaim keeps up in the background.
    - ``none``: none of the above: no stalls to speak of, kswapd (nearly) idle.

    Stalls that are not high (sporadic) fall through to ``struggling``/``background``/``none``.

    :param samples: a samples frame (index ``time``, ``guest``, the counters, ``reset``,
        ``total_memory``); guests may be interleaved and their reads unevenly spaced.
    :param window: overrides ``thresholds.window`` (see :class:`PressureThresholds`).
    :param thresholds: the thresholds (default :class:`PressureThresholds()`).
    :returns: one row per guest and window that holds at least one read, by guest (category
        order) then time. Index ``time``: the window's last read (as ``rates()`` puts a rate
        on the later read). Columns: ``guest``; ``start`` (the read its first interval starts
        from: the window covers ``start``..``time``, and a guest's windows abut); ``span_s``
        (seconds of counted intervals, Float64; 0 when none) and ``intervals`` (their number); ``regime``
        (ordered categorical, :data:`REGIMES`); ``<counter>_delta`` (Int64: the counter's
        rise over the counted intervals, counts or bytes); ``alloc_stalls_per_s`` and
        ``async_scans_bytes_per_s``, ``direct_scans_bytes_per_s``,
        ``async_reclaims_bytes_per_s``, ``direct_reclaims_bytes_per_s`` (Float64, the names
        ``rates()`` uses); ``total_memory`` (Float64 bytes, mean over the window's reads);
        ``async_scan_share_per_s``, ``direct_scan_share_per_s`` (scan rate / total_memory);
        ``async_reclaim_ratio`` (ARCLM/ASCAN) and ``direct_reclaim_ratio`` (DRCLM/DSCAN), NA
        below ``min_scan_bytes`` scanned.
    :raises TypeError: when ``thresholds`` is not a :class:`PressureThresholds` or the window's
        type is wrong.
    :raises ValueError: for a window that is not positive.
    """
    th = PressureThresholds() if thresholds is None else thresholds
    if not isinstance(th, PressureThresholds):
        raise TypeError(f"thresholds must be a PressureThresholds, not {type(th).__name__}")
    step = parse_window(th.window if window is None else window)
    frame = conform(samples, "samples")
    ns = pd.DatetimeIndex(frame.index).as_unit("ns").asi8
    order = np.argsort(ns, kind="stable")
    s, ns = frame.iloc[order], ns[order]
    guests = s["guest"]
    if not isinstance(guests.dtype, pd.CategoricalDtype):
        guests = guests.astype(pd.CategoricalDtype(guest_names(s)))
    d = pd.DataFrame({"guest": guests.array, "ns": pd.array(ns, dtype="Int64")})
    for c in PRESSURE_COUNTERS:
        d[c] = column(s, c).astype("Int64").array
    by_guest = d.groupby("guest", observed=True, sort=False)
    previous = by_guest["ns"].shift(1)
    dt_ns = (d["ns"] - previous).fillna(0).to_numpy(dtype=np.int64)
    reset = column(s, "reset", "boolean").fillna(False).to_numpy(dtype=bool)
    deltas = {c: d[c] - by_guest[c].shift(1) for c in PRESSURE_COUNTERS}
    valid = (dt_ns > 0) & ~reset
    for rise in deltas.values():
        valid &= (rise >= 0).fillna(False).to_numpy(dtype=bool)
    if isinstance(step, int):
        key = np.maximum(by_guest.cumcount().to_numpy() - 1, 0) // step
    else:
        key = ns // step.value
    parts = pd.DataFrame({
        "guest": d["guest"], "key": key, "end": ns,
        "start": previous.fillna(d["ns"]).to_numpy(dtype=np.int64),
        "span": np.where(valid, dt_ns, 0), "intervals": valid.astype(np.int64),
        **{c: np.where(valid, rise.fillna(0).to_numpy(dtype=np.int64), 0) for c, rise in deltas.items()},
        "total": column(s, "total_memory").astype("Float64").to_numpy(dtype=float, na_value=np.nan),
    })
    agg = parts.groupby(["guest", "key"], observed=True, sort=True).agg(
        end=("end", "max"), start=("start", "min"), span=("span", "sum"), intervals=("intervals", "sum"),
        total=("total", "mean"), **{c: (c, "sum") for c in PRESSURE_COUNTERS})
    return _verdicts(agg.reset_index(), guests.dtype, frame.index, th)


def _verdicts(agg: pd.DataFrame, guest_dtype: pd.CategoricalDtype, like: pd.Index,
              th: PressureThresholds) -> pd.DataFrame:
    """The output frame of :func:`classify_pressure` from its per-window sums."""
    span_s = agg["span"].to_numpy(dtype=float) / 1e9
    known = agg["intervals"].to_numpy(dtype=np.int64) > 0
    rise = {c: agg[c].to_numpy(dtype=float) for c in PRESSURE_COUNTERS}
    with np.errstate(divide="ignore", invalid="ignore"):
        per_s = {c: np.where(known, rise[c] / np.where(known, span_s, 1.0), np.nan) for c in PRESSURE_COUNTERS}
        total = agg["total"].to_numpy(dtype=float)
        share = {c: per_s[c] / np.where(total > 0, total, np.nan) for c in ("async_scans", "direct_scans")}

        def ratio(reclaimed: str, scanned: str) -> np.ndarray:
            enough = known & (rise[scanned] > 0) & (rise[scanned] >= th.min_scan_bytes)
            return np.where(enough, rise[reclaimed] / np.where(enough, rise[scanned], 1.0), np.nan)

        direct_ratio = ratio("direct_reclaims", "direct_scans")
        async_ratio = ratio("async_reclaims", "async_scans")
        # NaN compares False both ways: an unknown share or ratio never decides a regime.
        stall_high = known & (per_s["alloc_stalls"] >= th.stall_rate_high)
        dscan_high = share["direct_scans"] >= th.direct_scan_high
        dscan_low = share["direct_scans"] < th.direct_scan_high
        thrashing = stall_high & dscan_high & (direct_ratio < th.thrashing_ratio)
        kswapd_low_ratio = known & ~stall_high & (async_ratio < th.struggling_ratio)
        struggling = kswapd_low_ratio & (share["async_scans"] >= th.async_scan_high)
    conditions = [
        ~known,
        rise["oom_kills"] > 0,
        thrashing,
        stall_high & dscan_high,
        stall_high & dscan_low,
        stall_high,  # DSCAN unknown: total_memory missing
        struggling,
        kswapd_low_ratio & np.isnan(share["async_scans"]),  # ASCAN unknown: struggling or not
        rise["async_scans"] >= max(th.min_scan_bytes, 1),
    ]
    choices = ["unknown", "critical", "thrashing", "global", "cgroup", "unknown", "struggling", "unknown",
               "background"]
    regime = np.select(conditions, choices, default="none")
    tz = getattr(like, "tz", None)

    def when(values: pd.Series) -> pd.DatetimeIndex:
        index = pd.DatetimeIndex(values.to_numpy(dtype=np.int64).astype("datetime64[ns]"))
        return index.tz_localize(tz) if tz is not None else index

    out = pd.DataFrame({
        "guest": pd.Categorical(agg["guest"].astype(str), dtype=guest_dtype),
        "start": when(agg["start"]),
        "span_s": pd.array(span_s, dtype="Float64"),
        "intervals": pd.array(agg["intervals"].to_numpy(dtype=np.int64), dtype="Int64"),
        "regime": pd.Categorical(regime, dtype=REGIME_DTYPE),
        **{f"{c}_delta": pd.array(agg[c].to_numpy(dtype=np.int64), dtype="Int64") for c in PRESSURE_COUNTERS},
        "alloc_stalls_per_s": pd.array(per_s["alloc_stalls"], dtype="Float64"),
        **{f"{c}_bytes_per_s": pd.array(per_s[c], dtype="Float64") for c in PRESSURE_COUNTERS[2:]},
        "total_memory": pd.array(total, dtype="Float64"),
        "async_scan_share_per_s": pd.array(share["async_scans"], dtype="Float64"),
        "direct_scan_share_per_s": pd.array(share["direct_scans"], dtype="Float64"),
        "async_reclaim_ratio": pd.array(async_ratio, dtype="Float64"),
        "direct_reclaim_ratio": pd.array(direct_ratio, dtype="Float64"),
    }, index=when(agg["end"]).rename("time"))
    for c in PRESSURE_COUNTERS:  # no interval counted: the rise is unknown, not 0
        out.loc[~known, f"{c}_delta"] = pd.NA
    return out
