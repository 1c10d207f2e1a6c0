"""A trace-driven model of each guest's memory demand, and of the host, for replaying policies.

A recorded run says what each guest needed while it had the memory the live policy gave it. The
model keeps that need and asks what the guest (and the host) would have looked like with another
allotment, so that a policy can be tried offline (:mod:`balloonlab.experiments.replay`). Pure:
numbers in, numbers out. Bytes everywhere; per guest and recorded sample ``i`` (columns of the
samples frame):

- ``M`` = ``actual`` (the memory the guest has), ``T`` = ``total_memory`` (MemTotal: it drops with
  the balloon), ``A`` = ``available_memory`` (MemAvailable; before QEMU 4.1: ``free_memory +
  disk_caches``), ``F`` = ``free_memory``, ``C`` = ``disk_caches``;
- reserve ``r = M - T``: what the kernel holds outside MemTotal (taken per sample, not as a
  constant, so that the model is exact on the recorded allotment);
- swap held ``S = max(0, swap_out - swap_in)`` (cumulative since boot, NA -> 0);
- demand ``d = (T - A) + S``: ``T - A`` is what the kernel could not hand back without swapping
  (MemAvailable already counts free memory and reclaimable cache and slab), and ``S`` is what it
  did hand back by swapping: the guest needed it, and faults it back when it touches it;
- the page cache ``C`` is not demand: it is what the guest keeps when it has room.

Replaying allotment ``M'`` (room ``e = M' - M`` more than recorded; ``H`` the headroom the guest
keeps before it swaps, ``x = max(0, A - H)`` the recorded room above it):

- ``T' = T + e``;
- swap: ``S' = S + min(T - A, max(0, -e - x)) - min(S, max(0, e))``: less room first eats the
  available memory above ``H``, then pushes memory out to swap; more room takes back swapped
  memory first (assumed touched again as soon as it fits: the demand says it is needed);
- OOM: swap holds at most ``swap_capacity``; ``unmet = max(0, S' - capacity)`` fits nowhere;
- ``resident = d - S'`` (non-reclaimable memory in RAM), ``A' = T' - resident``;
- free and cache: ``A' - A`` more is free memory; less comes out of free memory down to
  ``min(F, H)``, then out of the page cache, then out of free memory again;
- the host's cost, resident guest RAM: a page the guest ever used stays resident in QEMU until
  the balloon takes it (no free page reporting), and nothing outside the allotment is resident.
  So ``R(i) = min(M(i), max(R(i-1), U(i)))`` with ``U = T - F`` (everything the guest uses, page
  cache and kernel included) and ``R(-1) = G(0)`` (``G`` = ``host_guest_ram``), computed on the
  recording (``R``) and on the replay (``R'``, with ``U' = T' - F'``); then
  ``G' = clip(G + R' - R, 0, M')``: the recording's own residency, moved by what the model says
  the other allotment changes. A guest deflated by a policy thus stays as resident as it was
  until it uses more; one never ballooned keeps everything it ever touched. The guest's footprint
  (what a budget counts, ``model.hostfs.footprint``: its resident guest RAM, its QEMU RSS where
  that is unknown) and its QEMU RSS move by the same
  ``G' - G``: the VMM's own memory (``host_rss - G``, :attr:`GuestTrace.overhead` its median)
  is kept as recorded.

Exact: with ``M' = M`` every modelled column equals the recorded one (integers in float64).
Not modelled: the guest's choices (swappiness swaps with room to spare; a cache that would have
grown into more room), stale swap (pages of exited processes, never swapped in, count as
demand), work lost or changed by an OOM kill, alloc stalls (copied), ``deflate-on-oom`` guests
(MemTotal does not drop with the balloon there, so ``T - A`` counts the balloon).

The host (:func:`host_state`): every guest's ``rss.<guest>``, ``guest_ram.<guest>`` and the
sums ``guests_rss``, ``guests_ram`` (Σ footprints) move by that guest's ``G' - G``; under a budget
``budget_available = budget - guests_ram`` (the virtual host has only the guests); without one
``mem_available = MemTotal - other - guests_rss`` where ``other = MemTotal - MemAvailable -
guests_rss`` is the recorded non-guest use (VMM overheads included in ``guests_rss``), i.e. the
recorded value shifted by the RSS change, which also comes out of MemFree first, then Cached,
then Buffers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

MiB = 1 << 20
#: Default headroom ``H``: the MemAvailable a guest still reports while it swaps. Then MemFree
#: sits near the high watermark, which MemAvailable subtracts (with the lowmem reserves), and only
#: half of the page cache left (the files in use, which the kernel keeps re-reading) counts: a few
#: to a few tens of MiB. 16 MiB sits under the pressure score's 32 MiB floor, so a guest squeezed
#: to its headroom reads as under pressure.
DEFAULT_HEADROOM_BYTES = 16 * MiB
FloatArray = npt.NDArray[np.float64]


def _col(frame: pd.DataFrame, name: str) -> FloatArray:
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    out: FloatArray = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    return out


@dataclass(frozen=True)
class GuestTrace:
    """One guest's recorded trace (float arrays, NaN = NA) and the constants of its model.

    :param rows: positions of its rows in the time-sorted samples frame (:func:`sort_samples`).
    :param headroom: ``H``; :param swap_capacity: the most its swap holds (inf: unknown, large).
    :param overhead: the median of ``host_rss - host_guest_ram`` (0 when never known).

    ``guest_ram`` and ``host_rss`` are filled where the recording lacks them (RSS minus overhead;
    RAM plus overhead; without a host view, the allotment); ``footprint`` is what a budget counts.
    """

    name: str
    rows: npt.NDArray[np.int64]
    times: pd.DatetimeIndex
    actual: FloatArray
    total: FloatArray
    available: FloatArray
    free: FloatArray
    caches: FloatArray
    swap_in: FloatArray
    swap_out: FloatArray
    oom_kills: FloatArray
    guest_ram: FloatArray
    host_rss: FloatArray
    footprint: FloatArray
    rss: FloatArray
    headroom: float
    swap_capacity: float
    overhead: float
    #: ``R``: the residency model run on the recording (module docstring).
    resident: FloatArray

    @property
    def swap_held(self) -> FloatArray:
        """``S = max(0, swap_out - swap_in)`` (NA counters read as 0)."""
        held: FloatArray = np.maximum(0.0, np.nan_to_num(self.swap_out) - np.nan_to_num(self.swap_in))
        return held

    @property
    def demand(self) -> FloatArray:
        """``d = (T - A) + S`` (NaN where T or A is unknown)."""
        out: FloatArray = self.total - self.available + self.swap_held
        return out


def sort_samples(samples: pd.DataFrame) -> pd.DataFrame:
    """The samples in time order (stable: a guest's rows keep their recording order)."""
    return samples.sort_index(kind="stable")


def guest_traces(samples: pd.DataFrame, *, headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
                 swap_bytes: Mapping[str, float] | None = None) -> dict[str, GuestTrace]:
    """Every guest's :class:`GuestTrace`, from a samples frame sorted by :func:`sort_samples`.

    :param swap_bytes: per guest, its swap's size; default: unlimited for a guest whose
        ``swap_out`` rose or held swap in the recording, 0 for one that never swapped (its swap
        is unknown: the model then reads "needs more than it has" as an OOM).
    """
    guests = samples["guest"].astype("string").to_numpy(dtype=object, na_value=None)
    traces: dict[str, GuestTrace] = {}
    for name in sorted({str(g) for g in guests if g is not None}):
        rows = np.flatnonzero(guests == name).astype(np.int64)
        part = samples.iloc[rows]
        free, caches, available = _col(part, "free_memory"), _col(part, "disk_caches"), _col(part, "available_memory")
        # QEMU before 4.1 has no MemAvailable: free + cache is the closest it reports.
        available = np.where(np.isnan(available), free + np.nan_to_num(caches), available)
        actual, host_rss, guest_ram = _col(part, "actual"), _col(part, "host_rss"), _col(part, "host_guest_ram")
        both = ~np.isnan(host_rss) & ~np.isnan(guest_ram)
        overhead = float(np.median(host_rss[both] - guest_ram[both])) if both.any() else 0.0
        # model.hostfs.footprint: the resident guest RAM, else the RSS (no host view: the allotment)
        footprint = np.where(np.isnan(guest_ram), host_rss, guest_ram)
        footprint = np.where(np.isnan(footprint), actual, footprint)
        guest_ram = np.where(np.isnan(guest_ram), host_rss - overhead, guest_ram)
        guest_ram = np.where(np.isnan(guest_ram), actual, guest_ram)
        host_rss = np.where(np.isnan(host_rss), guest_ram + overhead, host_rss)
        swap_out, swap_in = _col(part, "swap_out"), _col(part, "swap_in")
        swapped = bool(np.nanmax(np.nan_to_num(swap_out), initial=0.0) > 0)
        capacity = float(swap_bytes[name]) if swap_bytes and name in swap_bytes else (math.inf if swapped else 0.0)
        total = _col(part, "total_memory")
        resident = np.empty(len(rows))
        before = float(guest_ram[0]) if len(rows) else math.nan
        for i in range(len(rows)):
            resident[i] = before = resident_step(before, float(actual[i]), float(total[i] - free[i]))
        traces[name] = GuestTrace(name, rows, pd.DatetimeIndex(part.index), actual, total,
                                  available, free, caches, swap_in, swap_out, _col(part, "oom_kills"), guest_ram,
                                  host_rss, footprint, _col(part, "rss"), float(headroom_bytes), capacity, overhead,
                                  resident)
    return traces


@dataclass(frozen=True)
class GuestState:
    """The modelled guest at one recorded sample (bytes; NaN where the recording lacks it).

    ``allotment = reserve + resident + available`` and ``demand = resident + swap_held + unmet``.
    """

    allotment: float
    reserve: float
    demand: float
    total: float
    available: float
    free: float
    caches: float
    resident: float
    swap_held: float
    unmet: float
    extra_swap: float  # S' - S: swap this allotment adds to (or spares) the recording's
    guest_ram: float
    shift: float  # G' - G: the change of its resident guest RAM, footprint and QEMU RSS
    resident_ram: float  # R': the residency model after this sample (the next sample's resident_before)


def resident_step(before: float, allotment: float, in_use: float) -> float:
    """``R(i) = min(M(i), max(R(i-1), U(i)))``: used pages stay resident, the balloon's leave
    (NaN ``before`` or ``in_use``: the other one alone; NaN allotment: no bound)."""
    touched = before if math.isnan(in_use) else in_use if math.isnan(before) else max(before, in_use)
    return touched if math.isnan(allotment) else min(allotment, touched)


def ram_shift(trace: GuestTrace, i: int, allotment: float, resident: float) -> float:
    """``G' - G`` at sample ``i`` for the replay's residency ``resident`` (``R'``) and allotment."""
    g, recorded = float(trace.guest_ram[i]), float(trace.resident[i])
    if math.isnan(g) or math.isnan(resident) or math.isnan(recorded):
        return 0.0
    return min(max(g + resident - recorded, 0.0), allotment) - g


def guest_state(trace: GuestTrace, i: int, allotment: float, resident_before: float | None = None) -> GuestState:
    """The guest at its sample ``i`` had it had ``allotment`` bytes (module docstring).

    :param resident_before: ``R'`` after the replay's previous sample of this guest (None: the
        recording's, so a replay that keeps the recorded allotment stays exact).
    """
    m, t, a = trace.actual[i], trace.total[i], trace.available[i]
    e = allotment - m if not math.isnan(m) else 0.0
    g = trace.guest_ram[i]
    if resident_before is None:
        resident_before = float(trace.resident[i - 1]) if i else float(g)
    if math.isnan(t) or math.isnan(a):  # no stats yet: only the balloon and the host's side move
        nan = math.nan
        r_new = resident_step(resident_before, allotment, nan)
        shift = ram_shift(trace, i, allotment, r_new)
        return GuestState(allotment, allotment - t, nan, t + e, nan, nan, nan, nan, nan, 0.0, 0.0, g + shift, shift,
                          r_new)
    used, s = t - a, float(trace.swap_held[i])
    room_above = max(0.0, a - trace.headroom)
    pushed = min(used, max(0.0, -e - room_above))
    s_new = s + pushed - min(s, max(0.0, e))
    held = min(s_new, trace.swap_capacity)
    resident = used + s - s_new
    total = t + e
    available = total - resident
    free, caches = _split(trace.free[i], trace.caches[i], available - a, trace.headroom)
    r_new = resident_step(resident_before, allotment, total - free)
    shift = ram_shift(trace, i, allotment, r_new)
    return GuestState(allotment, allotment - total, used + s, total, available, free, caches, resident, held,
                      s_new - held, s_new - s, g + shift, shift, r_new)


def _split(free: float, caches: float, delta: float, headroom: float) -> tuple[float, float]:
    """Free memory and page cache after available memory changes by ``delta``."""
    if math.isnan(free) or delta >= 0:
        return free + delta, caches
    loss = -delta
    from_free = min(loss, max(0.0, free - min(free, headroom)))  # the balloon takes free pages first
    cache = 0.0 if math.isnan(caches) else caches
    from_cache = min(loss - from_free, cache)  # then the kernel reclaims page cache
    rest = loss - from_free - from_cache
    return max(0.0, free - from_free - rest), caches - from_cache if not math.isnan(caches) else caches


def swap_step(d_in: float, d_out: float, d_extra: float) -> tuple[float, float]:
    """The replay's swap-in and swap-out over one step, from the recording's (``d_in``,
    ``d_out``; NaN -> 0) and the change of ``extra_swap`` (``d_extra``): more swap held first
    cancels swap-ins, then swaps out more; less first cancels swap-outs, then swaps in more.
    The least traffic that moves the swap by the recorded amount plus ``d_extra``."""
    d_in, d_out = (0.0 if math.isnan(v) else max(0.0, v) for v in (d_in, d_out))
    if d_extra >= 0:
        new_in = max(0.0, d_in - d_extra)
        return new_in, d_out + d_extra - (d_in - new_in)
    new_out = max(0.0, d_out + d_extra)
    return d_in - d_extra - (d_out - new_out), new_out


def host_state(row: Mapping[str, float], shifts: Mapping[str, float], budget: int | None) -> dict[str, float]:
    """The modelled host columns for one recorded host row (module docstring).

    :param row: the recorded row's numbers (NaN or absent: NA).
    :param shifts: per guest, the change of its resident guest RAM (``GuestState.shift``).
    :param budget: the replay's budget (None: the real host's memory).
    """
    def num(key: str) -> float:
        return float(row.get(key, math.nan))

    out: dict[str, float] = {}
    for g, shift in shifts.items():
        out[f"rss.{g}"], out[f"guest_ram.{g}"] = num(f"rss.{g}") + shift, num(f"guest_ram.{g}") + shift
    change = float(sum(shifts.values()))
    rss = [num(f"rss.{g}") for g in shifts]
    footprints = [ram if not math.isnan(ram) else r for ram, r in zip((num(f"guest_ram.{g}") for g in shifts), rss,
                                                                       strict=True)]
    for key, parts in (("guests_rss", rss), ("guests_ram", footprints)):
        recorded = num(key)
        if math.isnan(recorded):  # an older run: the sum of what is known
            recorded = float(sum(v for v in parts if not math.isnan(v)))
        out[key] = recorded + change
    out["budget"] = math.nan if budget is None else float(budget)
    out["budget_available"] = math.nan if budget is None else budget - out["guests_ram"]
    out["mem_available"] = num("mem_available") - change
    free, cached, buffers = num("mem_free"), num("cached"), num("buffers")
    free -= change
    for key, value in (("cached", cached), ("buffers", buffers)):  # a bigger footprint: reclaim
        take = min(max(0.0, -free), 0.0 if math.isnan(value) else value)
        free += take
        out[key] = value - take
    out["mem_free"] = free
    return out


def balloon_rate(samples: pd.DataFrame, *, quantile: float = 0.95, min_move_bytes: int = MiB) -> float:
    """How fast the recorded balloons moved (bytes/s): a high quantile of ``|delta actual| /
    delta t`` over consecutive samples where ``actual`` moved by ``min_move_bytes`` or more; inf
    when none moved. A lower bound (a move that ends within a sample period looks slower)."""
    rates: list[FloatArray] = []
    for trace in guest_traces(sort_samples(samples)).values():
        t = (trace.times - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
        dt, dm = np.diff(np.asarray(t, dtype=float)), np.abs(np.diff(trace.actual))
        moved = (dm >= min_move_bytes) & (dt > 0)
        rates.append(dm[moved] / dt[moved])
    allrates = np.concatenate(rates) if rates else np.array([])
    return float(np.quantile(allrates, quantile)) if len(allrates) else math.inf
