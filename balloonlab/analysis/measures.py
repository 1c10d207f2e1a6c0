"""Analyses over the sampler's frames: balloon step responses, held vs available memory,
the cost of re-touching memory after a deflate, and per-guest summaries.

Every function is pure: it takes the samples frame (index ``time``, one row per guest and
new sample) and/or the events frame (index ``time``, ``guest``, ``kind``, ``value``,
``duration_s``, ``detail``) as the sampler writes them, returns a new DataFrame and never
modifies its inputs. Units are in the column names (``_bytes``, ``_s``, ``_mib_per_s``);
bare memory columns (``actual``, ``target``, ...) are bytes like in the frames. Stat columns
a QEMU did not report (or newer ones it added) are tolerated: a missing one reads as NA.
"""

from __future__ import annotations

import re
from typing import SupportsIndex, SupportsInt

import numpy as np
import pandas as pd

from balloonlab.model.units import UNITS

MiB = 1 << 20
#: The epoch as a UTC timestamp, to turn datetimes into seconds whatever their unit.
EPOCH = pd.Timestamp(0, tz="UTC")
_SIZE_IN_DETAIL = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)")
#: Workload details of steps that touch memory (see :func:`retouch_cost`).
_TOUCHING = r"alloc|(?:touch|read)\b"


def column(frame: pd.DataFrame, name: str, dtype: str = "Int64") -> pd.Series:
    """``frame[name]``, or an all-NA column of ``dtype`` when the frame lacks it.

    :param frame: a samples or events frame.
    :param name: the column wanted (e.g. ``"swap_in"``, absent on some QEMUs).
    :param dtype: dtype of the all-NA stand-in.
    """
    if name in frame.columns:
        return frame[name]
    return pd.Series(pd.array([pd.NA] * len(frame), dtype=dtype), index=frame.index, name=name)


def seconds(values: pd.Series | pd.Index) -> np.ndarray:
    """UTC datetimes as float epoch seconds (NaN for NaT), whatever the datetime unit.

    :param values: datetime64[*, UTC] values (a Series or an Index).
    """
    delta = (pd.Series(values) - EPOCH) / pd.Timedelta(seconds=1)
    out: np.ndarray = delta.to_numpy(dtype=float, na_value=np.nan)
    return out


def _int(value: object) -> int:
    """``int(value)`` of a frame cell (a Python or numpy integer); TypeError for NA or a non-number."""
    if isinstance(value, (str, bytes, bytearray, SupportsInt, SupportsIndex)):
        return int(value)
    raise TypeError(f"int() argument must be a string, a bytes-like object or a real number, "
                    f"not {type(value).__name__!r}")


_REQUIRED = {"samples": {"guest": "category", "actual": "Int64"},
             "events": {"guest": "category", "kind": "category", "value": "Int64",
                        "duration_s": "Float64", "detail": "string"}}


def conform(frame: pd.DataFrame | None, what: str) -> pd.DataFrame:
    """``frame`` with the columns the analyses need (all-NA when missing) and, when it has no
    rows, a UTC ``time`` index: an empty run (``pd.DataFrame()``) then gives empty results.

    :param frame: a samples or events frame, possibly empty or None.
    :param what: ``"samples"`` or ``"events"``.
    """
    frame = pd.DataFrame() if frame is None else frame
    missing = {name: dtype for name, dtype in _REQUIRED[what].items() if name not in frame.columns}
    if not missing and (len(frame) or isinstance(frame.index, pd.DatetimeIndex)):
        return frame
    if not len(frame) and not isinstance(frame.index, pd.DatetimeIndex):
        frame = frame.set_axis(pd.DatetimeIndex([], dtype="datetime64[ns, UTC]", name="time"))
    return frame.assign(**{name: column(frame, name, dtype) for name, dtype in missing.items()})


def guest_names(frame: pd.DataFrame) -> list[str]:
    """The guests present in ``frame``, in category order (else order of appearance).

    :param frame: a samples or events frame with a ``guest`` column.
    """
    guests = frame["guest"]
    present = set(guests.dropna().astype(str))
    if isinstance(guests.dtype, pd.CategoricalDtype):
        return [str(g) for g in guests.cat.categories if str(g) in present]
    return [str(g) for g in pd.unique(guests.dropna().astype(str))]


def _of(frame: pd.DataFrame, guest: str, kind: str | None = None) -> pd.DataFrame:
    """Rows of one guest (and one event kind), sorted by time (stable)."""
    mask = frame["guest"].astype(str) == guest
    if kind is not None:
        mask &= frame["kind"].astype(str) == kind
    return frame[mask.to_numpy()].sort_index(kind="stable")


def _window(series: pd.Series, t0: pd.Timestamp, t_end: pd.Timestamp, last: bool) -> pd.Series:
    """Values after ``t0`` and before the next target at ``t_end`` (up to it if ``last``)."""
    before_end = (series.index <= t_end) if last else (series.index < t_end)
    return series[(series.index > t0) & before_end]


def step_response(samples: pd.DataFrame, events: pd.DataFrame, *, tolerance_bytes: int = MiB,
                  settle_s: float = 5.0) -> pd.DataFrame:
    """How the balloon followed each target: one row per ``target`` event per guest.

    The balloon's path after a target is read from ``balloon_change`` events when the guest
    has any inside the step's window (they carry every move QEMU announced), else from the
    samples' ``actual`` column. A step's window ends at the guest's next target event, or at
    the guest's last sample/event.

    Columns: ``time`` (of the target event), ``guest``, ``start_actual`` (bytes, the latest
    known actual at the target), ``target`` (bytes), ``final_actual`` (bytes, last actual in
    the window), ``reached`` (actual came within ``tolerance_bytes`` of the target),
    ``time_to_target_s`` (first time it did, NA if never; 0 if it already was),
    ``stalled`` (not reached and actual did not move for ``settle_s`` before the window
    ended), ``direction`` (``"inflate"`` when target < start_actual, else ``"deflate"``),
    ``rate_mib_per_s`` (|MiB moved| / seconds taken: up to the reach, or up to the last move
    when not reached; NA when nothing moved).

    :param samples: the samples frame.
    :param events: the events frame.
    :param tolerance_bytes: how close to the target counts as reached.
    :param settle_s: how long actual must stay still, short of the target, to call it stalled.
    """
    samples, events = conform(samples, "samples"), conform(events, "events")
    rows: list[dict[str, object]] = []
    for guest in guest_names(events[events["kind"].astype(str) == "target"]):
        targets = _of(events, guest, "target").dropna(subset=["value"])
        changes = _of(events, guest, "balloon_change")["value"].dropna()
        polled = column(_of(samples, guest), "actual").dropna()
        known = pd.concat([polled, changes]).sort_index(kind="stable")
        end_of_data = max(t for t in (_of(samples, guest).index.max(),
                                      _of(events, guest).index.max()) if pd.notna(t))
        times = list(targets.index)
        for i, (t0, target) in enumerate(zip(times, targets["value"], strict=True)):
            last = i + 1 == len(times)
            t_end = end_of_data if last else times[i + 1]
            before = known[known.index <= t0]
            start = before.iloc[-1] if len(before) else pd.NA
            path = _window(changes, t0, t_end, last)
            path = path if len(path) else _window(polled, t0, t_end, last)
            points = list(zip(path.index, path, strict=True))
            if start is not pd.NA:
                points.insert(0, (t0, start))
            rows.append(_one_step(guest, t0, int(target), start, points, t_end,
                                  tolerance_bytes, settle_s))
    out = pd.DataFrame(rows, columns=["time", "guest", "start_actual", "target", "final_actual",
                                      "reached", "time_to_target_s", "stalled", "direction",
                                      "rate_mib_per_s"])
    return out.astype({"start_actual": "Int64", "target": "Int64", "final_actual": "Int64",
                       "reached": bool, "time_to_target_s": "Float64", "stalled": bool,
                       "direction": "string", "rate_mib_per_s": "Float64"})


def _one_step(guest: str, t0: pd.Timestamp, target: int, start: object,
              points: list[tuple[pd.Timestamp, int]], t_end: pd.Timestamp,
              tolerance: int, settle_s: float) -> dict[str, object]:
    """One row of :func:`step_response` from the actual values seen after ``t0``."""
    reach = next(((t, v) for t, v in points if abs(int(v) - target) <= tolerance), None)
    last_move = t0
    for (_, prev), (t, v) in zip(points, points[1:], strict=False):
        if v != prev:
            last_move = t
    final = points[-1][1] if points else pd.NA
    moved_to, taken = (reach[1], (reach[0] - t0).total_seconds()) if reach else \
        (final, (last_move - t0).total_seconds())
    rate = pd.NA
    if start is not pd.NA and moved_to is not pd.NA and taken > 0:
        rate = abs(int(moved_to) - _int(start)) / MiB / taken
    return {
        "time": t0, "guest": guest, "start_actual": start, "target": target,
        "final_actual": final, "reached": reach is not None,
        "time_to_target_s": (reach[0] - t0).total_seconds() if reach else pd.NA,
        "stalled": reach is None and (t_end - last_move).total_seconds() >= settle_s,
        "direction": pd.NA if start is pd.NA else ("inflate" if target < _int(start) else "deflate"),
        "rate_mib_per_s": rate,
    }


def memory_held_vs_available(samples: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """The workload's held memory beside what the guest says it has, on the samples' index.

    ``held_bytes`` is the value of the guest's latest ``workload`` event at or before each
    sample (``merge_asof`` backward, per guest): NA before the first workload event. Beside
    it: ``available_memory``, ``free_memory`` and ``actual`` (bytes) from the same sample.

    :param samples: the samples frame.
    :param events: the events frame.
    :returns: index ``time`` (the samples'), columns ``guest``, ``held_bytes``,
        ``available_memory``, ``free_memory``, ``actual``.
    """
    samples, events = conform(samples, "samples"), conform(events, "events")
    stats = ["available_memory", "free_memory", "actual"]
    left = pd.DataFrame({"time": pd.DatetimeIndex(samples.index).as_unit("ns"),
                         "guest": pd.array(samples["guest"].astype(str), dtype="str"),
                         **{name: column(samples, name).astype("Int64").array for name in stats},
                         "_row": np.arange(len(samples))})
    work = events[events["kind"].astype(str) == "workload"]
    right = pd.DataFrame({"time": pd.DatetimeIndex(work.index).as_unit("ns"),
                          "guest": pd.array(work["guest"].astype(str), dtype="str"),
                          "held_bytes": work["value"].astype("Int64").array})
    merged = pd.merge_asof(left.sort_values("time", kind="stable"),
                           right.sort_values("time", kind="stable"),
                           on="time", by="guest", direction="backward")
    out = merged.sort_values("_row")[["guest", "held_bytes", *stats]].set_axis(samples.index)
    return out.assign(guest=samples["guest"].array)


def _detail_bytes(detail: object) -> float:
    """Bytes named in a workload detail such as ``"alloc 128 MiB"`` (NaN if none)."""
    match = _SIZE_IN_DETAIL.search(str(detail)) if isinstance(detail, str) else None
    if not match or match.group(2) not in UNITS:
        return np.nan
    return float(match.group(1)) * UNITS[match.group(2)]


def _target_directions(events: pd.DataFrame, guest: str) -> pd.Series:
    """Direction (+1 deflate, -1 inflate) of each of a guest's target events that moved.

    A target is compared with the guest's latest earlier reference: the last
    ``balloon_change`` (actual) or the previous target, whichever came later.
    """
    refs = _of(events, guest)
    refs = refs[refs["kind"].astype(str).isin(["balloon_change", "target"])].dropna(subset=["value"])
    prev = refs["value"].shift(1)
    is_target = refs["kind"].astype(str) == "target"
    sign = np.sign((refs["value"] - prev).astype("Float64"))
    return sign[is_target & sign.notna() & (sign != 0)].astype(int)


def retouch_cost(events: pd.DataFrame) -> pd.DataFrame:
    """Cost of each workload step that touches memory, marked by whether it came after a
    balloon deflate.

    Definition: a touching step is a ``workload`` event whose ``detail`` starts with
    ``"alloc"`` (fresh pages allocated and touched), ``"touch"`` (a working-set pass writing
    the same pages again, :meth:`~balloonlab.image.agent.Workload.working_set`) or ``"read"``
    (the scratch disk read through the page cache, :meth:`~balloonlab.image.agent.Workload.page_cache`).
    ``alloc_bytes`` is the size its detail names (``"alloc 128 MiB"``, ``"touch 64 MiB"``;
    the detail is rounded to 0.1 of its unit), else the rise of the held bytes since the
    guest's previous workload event (NA when it did not rise, as for a re-touch). It came
    ``after_deflate`` when the guest's latest target event before it that moved the target was
    a deflate: a target above the reference (the last ``balloon_change`` actual, or the
    previous target, whichever was later), with no inflate target (below its reference)
    between that deflate and the step. Such a step re-touches pages the balloon handed back,
    so ``retouch_cost(ev).groupby("after_deflate")["mib_per_s"].median()`` is the comparison;
    ``detail.str.split().str[0]`` tells the kinds of step apart. Resets are not considered.

    :param events: the events frame.
    :returns: columns ``time``, ``guest``, ``detail``, ``alloc_bytes``, ``held_bytes``,
        ``duration_s``, ``mib_per_s``, ``after_deflate`` (bool), ``deflate_time`` (the
        deflate's target event, NaT when none) and ``since_deflate_s``.
    """
    events = conform(events, "events")
    parts: list[pd.DataFrame] = []
    for guest in guest_names(events):
        work = _of(events, guest, "workload")
        if work.empty:
            continue
        held_rise = work["value"].astype("Float64").diff().fillna(work["value"].astype("Float64"))
        detail = work["detail"].astype("string").fillna("")
        allocs = detail.str.match(_TOUCHING).to_numpy(dtype=bool)
        named = pd.Series([_detail_bytes(d) for d in detail], index=work.index, dtype="Float64")
        alloc_bytes = named.fillna(held_rise.where(held_rise > 0))[allocs]
        directions = _target_directions(events, guest)
        times = work.index[allocs]
        pos = directions.index.searchsorted(times, side="left") - 1  # last moving target before
        after = np.append(directions.to_numpy(dtype=int), 0)[pos] == 1  # pos -1: none before
        when = pd.Series(pd.NaT, index=range(len(times)), dtype=work.index.dtype)
        when[after] = directions.index[pos[after]]
        duration = work["duration_s"].astype("Float64")[allocs]
        parts.append(pd.DataFrame({
            "time": times, "guest": guest, "detail": detail[allocs].to_numpy(),
            "alloc_bytes": alloc_bytes.round().astype("Int64").to_numpy(),
            "held_bytes": work["value"].astype("Int64")[allocs].to_numpy(),
            "duration_s": duration.to_numpy(),
            "mib_per_s": (alloc_bytes / MiB / duration.where(duration > 0)).to_numpy(),
            "after_deflate": after,
            "deflate_time": when.array,
        }))
    cols = ["time", "guest", "detail", "alloc_bytes", "held_bytes", "duration_s", "mib_per_s",
            "after_deflate", "deflate_time"]
    if not parts:
        none = pd.DatetimeIndex([], dtype=events.index.dtype)
        parts = [pd.DataFrame({"time": none, "guest": pd.array([], dtype="str"),
                               "deflate_time": none}, columns=cols)]
    out = pd.concat(parts, ignore_index=True)
    out["since_deflate_s"] = (out["time"] - out["deflate_time"]) / pd.Timedelta(seconds=1)
    return out.astype({"detail": "string", "alloc_bytes": "Int64", "held_bytes": "Int64",
                       "duration_s": "Float64", "mib_per_s": "Float64", "after_deflate": bool,
                       "since_deflate_s": "Float64"})


def summary(samples: pd.DataFrame, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per guest: how much was sampled, when, resets, the balloon's range, freshness.

    :param samples: the samples frame.
    :param events: the events frame (optional): adds ``events`` and ``errors`` counts.
    :returns: index ``guest``; columns ``samples``, ``first``, ``last`` (UTC times),
        ``resets`` (rows flagged ``reset``), ``min_actual``, ``max_actual`` (bytes),
        ``median_age_s`` (median seconds between the guest's report and the read).
    """
    samples = conform(samples, "samples")
    events = None if events is None else conform(events, "events")
    rows = []
    for guest in guest_names(samples):
        s = _of(samples, guest)
        actual = column(s, "actual").astype("Float64")
        row = {"guest": guest, "samples": len(s), "first": s.index.min(), "last": s.index.max(),
               "resets": int(column(s, "reset", "boolean").fillna(False).sum()),
               "min_actual": actual.min(), "max_actual": actual.max(),
               "median_age_s": column(s, "age_s", "Float64").median()}
        if events is not None:
            kinds = events["kind"].astype(str)[(events["guest"].astype(str) == guest).to_numpy()]
            row.update(events=len(kinds), errors=int((kinds == "error").sum()))
        rows.append(row)
    extra = ["events", "errors"] if events is not None else []
    out = pd.DataFrame(rows, columns=["guest", "samples", "first", "last", "resets", "min_actual",
                                      "max_actual", "median_age_s", *extra])
    return out.astype({"min_actual": "Int64", "max_actual": "Int64",
                       "median_age_s": "Float64"}).set_index("guest")
