"""The polling-period study's analyses: bursts in a guest's own ground truth, what the
balloon's reports showed of each, and the table and figure per period.

Pure functions over frames. The ground truth (:func:`truth_frame`) is the guest's
/proc/meminfo and /proc/vmstat sampled inside the guest every 100 ms, on the host's clock;
the reports are the sampler's samples frame (index: when the host *read* each report, which
is when a management system could first act on it). One signal decides what a burst is and
what a report shows of it: the drop of ``MemAvailable`` (the guest's, and the report's
``available_memory``, which is the same kernel number) below its quiet level. Both burst
kinds lower it: an allocation by what it holds, a reclaim burst down to the guest's floor,
with swap-out and scans on top (kept per burst from the truth's counters).

Definitions (all per guest):

- quiet level: the 90th percentile of the signal over the run (bursts cover well under 90 %
  of it); a burst is a run of truth samples at least ``threshold_bytes`` below it, runs
  closer than ``merge_gap_s`` merged (a starved guest's sampler skips ticks);
- start / end: where the drop crosses the threshold, interpolated between the truth samples
  on either side (the truth's 100 ms steps would otherwise round every delay up);
- baseline: the median of the quiet truth samples in the ``baseline_s`` before the start;
  ``true_peak_bytes`` is the largest drop below it, ``seen_peak_bytes`` the largest drop any
  report read in ``[start, end + slack]`` showed (``slack_s``, cut at the next burst: a
  report taken in the burst is read a little later); 0 when none was read;
- missed: no report in that window dropped by the threshold; ``delay_s``: from the start to
  the read of the first report that did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from balloonlab.analysis.measures import guest_names, seconds

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MiB = 1 << 20
PAGE = 4096
#: Truth column and report column of the one signal.
SIGNAL, REPORT_SIGNAL = "MemAvailable", "available_memory"
#: Kinds, in the order tables and plots show them; "all" is every burst together.
KINDS = ("alloc", "reclaim", "all")
#: The columns of :func:`period_table` before the cost columns.
TABLE_COLUMNS = ("period_s", "kind", "bursts", "missed", "missed_pct", "delay_median_s", "delay_max_s",
                 "true_peak_median_mib", "under_median_mib", "under_median_pct", "under_max_pct")


def uptime_to_epoch(uptime_s: Sequence[float] | np.ndarray, first: tuple[float, float],
                    last: tuple[float, float]) -> np.ndarray:
    """Guest uptimes as host epoch seconds, the offset drifting linearly between two probes.

    :param uptime_s: guest /proc/uptime readings.
    :param first: ``(uptime_s, offset_s)`` of the probe before the recording
        (offset: host epoch at guest uptime 0).
    :param last: the same after it; equal to ``first`` for no drift correction.
    """
    u = np.asarray(uptime_s, dtype=float)
    (u0, o0), (u1, o1) = first, last
    slope = (o1 - o0) / (u1 - u0) if u1 != u0 else 0.0
    out: np.ndarray = u + o0 + slope * (u - u0)
    return out


def truth_frame(guest: str, fields: Sequence[str], rows: Sequence[Sequence[float]],
                first: tuple[float, float], last: tuple[float, float]) -> pd.DataFrame:
    """One guest's ground truth: index ``time`` (host clock, UTC), ``guest``, ``uptime_s``
    and one column per field (memory in bytes, counters as counts; /proc's own names).

    :param guest: the guest's name.
    :param fields: the recorded fields, in row order after the uptime.
    :param rows: ``(uptime_s, value...)`` per sample.
    :param first: clock probe before the recording, see :func:`uptime_to_epoch`.
    :param last: clock probe after it.

    /proc/uptime counts in 10 ms: two reads in one tick (the guest's sampling loop catching up
    after its vCPU was starved, seen on a loaded host) share an uptime; only the later is kept,
    so the times are strictly increasing.
    """
    data = np.asarray(rows, dtype=float).reshape(len(rows), len(fields) + 1)
    if len(data) > 1:
        data = data[np.append(np.diff(data[:, 0]) > 0, True)]
    epoch = uptime_to_epoch(data[:, 0], first, last)
    index = pd.DatetimeIndex(pd.to_datetime(np.round(epoch * 1e9).astype("int64"), unit="ns", utc=True), name="time")
    frame = pd.DataFrame({name: data[:, i + 1].astype("int64") for i, name in enumerate(fields)}, index=index)
    frame.insert(0, "uptime_s", data[:, 0])
    frame.insert(0, "guest", pd.Categorical([guest] * len(data)))
    return frame


def planned_bursts(events: pd.DataFrame, kinds: Mapping[int, str]) -> pd.DataFrame:
    """The bursts a workload schedule asked for, from the sampler's ``workload`` events.

    :param events: the events frame (a ``workload`` event's value is the bytes held after
        it, its ``duration_s`` how long the request took).
    :param kinds: held bytes -> burst kind (e.g. ``{48 MiB: "alloc", 128 MiB: "reclaim"}``);
        a level of 0 ends a burst.
    :returns: columns ``guest``, ``kind``, ``requested`` (when the burst's allocation was
        asked for), ``released`` (when its release was done).
    """
    rows = []
    work = events[events["kind"].astype(str) == "workload"]
    for guest in guest_names(work):
        mine = work[work["guest"].astype(str) == guest].sort_index(kind="stable")
        open_kind, opened = None, None
        for t, value, took in zip(mine.index, mine["value"], mine["duration_s"], strict=True):
            asked = t - pd.Timedelta(seconds=float(took) if pd.notna(took) else 0.0)
            if pd.notna(value) and int(value) in kinds:
                open_kind, opened = kinds[int(value)], asked
            elif pd.notna(value) and int(value) == 0 and open_kind is not None:
                rows.append({"guest": guest, "kind": open_kind, "requested": opened, "released": t})
                open_kind = None
    return pd.DataFrame(rows, columns=["guest", "kind", "requested", "released"])


def _crossing(t: np.ndarray, drop: np.ndarray, inside: int, outside: int, threshold: float) -> float:
    """Where ``drop`` crosses ``threshold`` between an inside and an outside sample."""
    if outside < 0 or outside >= len(t) or drop[inside] == drop[outside]:
        return float(t[inside])
    frac = (threshold - drop[outside]) / (drop[inside] - drop[outside])
    return float(t[outside] + min(1.0, max(0.0, frac)) * (t[inside] - t[outside]))


def find_bursts(truth: pd.DataFrame, *, threshold_bytes: float, merge_gap_s: float = 1.0,
                baseline_s: float = 2.0, plan: pd.DataFrame | None = None) -> pd.DataFrame:
    """Bursts in the ground truth, one row each (see the module docstring for the rules).

    :param truth: frames of :func:`truth_frame`, one or many guests.
    :param threshold_bytes: how far below its quiet level ``MemAvailable`` must drop.
    :param merge_gap_s: runs of samples this close together are one burst.
    :param baseline_s: how far before a burst its baseline is taken.
    :param plan: :func:`planned_bursts`: a burst gets the kind of the planned burst it
        overlaps most, else "reclaim" when the guest swapped out during it, else "alloc".
    :returns: columns ``guest``, ``burst`` (0, 1... per guest), ``kind``, ``start``, ``end``,
        ``duration_s``, ``baseline_bytes``, ``true_peak_bytes``, ``swapped_out_bytes`` and
        ``scanned_pages`` (from ``pswpout`` and ``pgscan_*`` when recorded, else NA).
    """
    rows: list[dict[str, object]] = []
    for guest in guest_names(truth):
        mine = truth[truth["guest"].astype(str) == guest].sort_index(kind="stable")
        t, v = seconds(mine.index), mine[SIGNAL].to_numpy(dtype=float)
        drop = np.nanquantile(v, 0.9) - v
        above = np.flatnonzero(drop >= threshold_bytes)
        if not len(above):
            continue
        # A new burst only where the drop really went back (a quiet sample in between) for
        # longer than merge_gap_s: a gap in the truth itself (the guest's sampler starved
        # during reclaim) does not split a burst.
        apart = (np.diff(above) > 1) & (np.diff(t[above]) > merge_gap_s)
        groups = np.split(above, np.flatnonzero(apart) + 1)
        for n, group in enumerate(groups):
            a, b = int(group[0]), int(group[-1])
            start = _crossing(t, drop, a, a - 1, threshold_bytes)
            end = _crossing(t, drop, b, b + 1, threshold_bytes)
            quiet = (t >= start - baseline_s) & (t < start) & (drop < threshold_bytes)
            base = float(np.median(v[quiet])) if quiet.any() else float(np.nanquantile(v, 0.9))
            before, after = max(a - 1, 0), min(b + 1, len(t) - 1)
            rows.append({"guest": guest, "burst": n, "kind": None, "start": start, "end": end,
                         "duration_s": end - start, "baseline_bytes": base,
                         "true_peak_bytes": base - float(np.nanmin(v[a:b + 1])),
                         "swapped_out_bytes": _delta(mine, ("pswpout",), before, after) * PAGE,
                         "scanned_pages": _delta(mine, ("pgscan_kswapd", "pgscan_direct"), before, after)})
    out = pd.DataFrame(rows, columns=["guest", "burst", "kind", "start", "end", "duration_s", "baseline_bytes",
                                      "true_peak_bytes", "swapped_out_bytes", "scanned_pages"])
    out["kind"] = [_kind(g, s, e, swapped, plan) for g, s, e, swapped in
                   zip(out["guest"], out["start"], out["end"], out["swapped_out_bytes"], strict=True)]
    for name in ("start", "end"):
        out[name] = pd.to_datetime(out[name].astype(float), unit="s", utc=True)
    return out


def _delta(frame: pd.DataFrame, names: tuple[str, ...], before: int, after: int) -> float:
    """Sum over ``names`` of how much each counter rose from row ``before`` to ``after``."""
    if not all(name in frame.columns for name in names):
        return float("nan")
    return float(sum(int(frame[name].iloc[after]) - int(frame[name].iloc[before]) for name in names))


def _kind(guest: str, start: float, end: float, swapped: float, plan: pd.DataFrame | None) -> str:
    """The planned kind of the burst ``[start, end]`` (epoch s), else one from its counters."""
    if plan is not None and len(plan):
        mine = plan[plan["guest"].astype(str) == guest]
        lo = np.maximum(seconds(mine["requested"]), start)
        hi = np.minimum(seconds(mine["released"]), end)
        overlap = hi - lo
        if len(overlap) and overlap.max() > 0:
            return str(mine["kind"].iloc[int(np.argmax(overlap))])
    return "reclaim" if swapped > 0 else "alloc"


def detect(bursts: pd.DataFrame, samples: pd.DataFrame, *, threshold_bytes: float,
           slack_s: float = 1.0) -> pd.DataFrame:
    """What each guest's reports showed of each of its bursts (module docstring: rules).

    :param bursts: :func:`find_bursts`.
    :param samples: the sampler's samples frame of the same guests.
    :param threshold_bytes: the drop a report must show to count as seeing the burst.
    :param slack_s: how long after a burst's end a report read still belongs to it.
    :returns: ``bursts`` plus ``period_s`` (the guest's polling period), ``reports``
        (read in the window), ``seen_peak_bytes``, ``missed``, ``first_seen``, ``delay_s``,
        ``under_bytes`` (true minus seen peak) and ``under_pct`` (of the true peak).
    """
    out = bursts.copy()
    extra: dict[str, list[object]] = {k: [] for k in ("period_s", "reports", "seen_peak_bytes", "missed",
                                                      "first_seen", "delay_s")}
    by_guest = {g: samples[samples["guest"].astype(str) == g].sort_index(kind="stable")
                for g in set(bursts["guest"].astype(str))}
    starts = seconds(bursts["start"]) if len(bursts) else np.array([])
    ends = seconds(bursts["end"]) if len(bursts) else np.array([])
    for i, guest in enumerate(bursts["guest"].astype(str)):
        mine = by_guest[guest]
        later = starts[(bursts["guest"].astype(str) == guest).to_numpy() & (starts > starts[i])]
        stop = min(ends[i] + slack_s, later.min() if len(later) else np.inf)
        read = seconds(mine.index)
        window = mine[(read >= starts[i]) & (read <= stop)]
        shown = float(bursts["baseline_bytes"].iloc[i]) - window[REPORT_SIGNAL].to_numpy(dtype=float, na_value=np.nan)
        hits = np.flatnonzero(shown >= threshold_bytes)
        period = mine["period_s"].dropna()
        extra["period_s"].append(int(period.mode().iloc[0]) if len(period) else pd.NA)
        extra["reports"].append(len(window))
        extra["seen_peak_bytes"].append(max(0.0, float(np.nanmax(shown))) if np.isfinite(shown).any() else 0.0)
        extra["missed"].append(not len(hits))
        first = window.index[hits[0]] if len(hits) else pd.NaT
        extra["first_seen"].append(first)
        extra["delay_s"].append(float(seconds(window.index[hits[:1]])[0] - starts[i]) if len(hits) else np.nan)
    for name, values in extra.items():
        out[name] = values
    out["missed"] = out["missed"].astype(bool)
    out["under_bytes"] = out["true_peak_bytes"] - out["seen_peak_bytes"].astype(float)
    out["under_pct"] = 100.0 * out["under_bytes"] / out["true_peak_bytes"]
    return out


def period_table(detections: pd.DataFrame, costs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The study's table: one row per (period, burst kind), "all" for every burst together.

    :param detections: :func:`detect`.
    :param costs: per guest: ``period_s``, ``duration_s``, ``qmp_commands``,
        ``cpu_s_per_command`` (the sampler's client plus QEMU's, measured per read) and
        ``qemu_service_cpu_s`` (QEMU's threads other than its vCPUs over the run, measured).
    :returns: columns ``period_s``, ``kind``, ``bursts``, ``missed``, ``missed_pct``,
        ``delay_median_s``, ``delay_max_s``, ``true_peak_median_mib``, ``under_median_mib``,
        ``under_median_pct``, ``under_max_pct``, and with ``costs``: ``commands_per_hour``,
        ``sampler_cpu_s_per_hour`` (commands per guest-hour x CPU per command: derived),
        ``qemu_service_cpu_s_per_hour`` (measured, including QEMU's idle work).
    """
    rows = []
    periods = sorted({int(p) for p in detections["period_s"].dropna()})
    for period in periods:
        at = detections[detections["period_s"] == period]
        for kind in KINDS:
            group = at if kind == "all" else at[at["kind"] == kind]
            if not len(group):
                continue
            delay = group["delay_s"].dropna()
            rows.append({"period_s": period, "kind": kind, "bursts": len(group), "missed": int(group["missed"].sum()),
                         "missed_pct": 100.0 * group["missed"].mean(),
                         "delay_median_s": delay.median() if len(delay) else np.nan,
                         "delay_max_s": delay.max() if len(delay) else np.nan,
                         "true_peak_median_mib": group["true_peak_bytes"].median() / MiB,
                         "under_median_mib": group["under_bytes"].median() / MiB,
                         "under_median_pct": group["under_pct"].median(), "under_max_pct": group["under_pct"].max()})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if costs is not None and len(table):
        hours = costs["duration_s"].astype(float) / 3600
        per = pd.DataFrame({"period_s": costs["period_s"].astype(int),
                            "commands_per_hour": costs["qmp_commands"] / hours,
                            "sampler_cpu_s_per_hour": costs["qmp_commands"] / hours * costs["cpu_s_per_command"],
                            "qemu_service_cpu_s_per_hour": costs["qemu_service_cpu_s"] / hours})
        table = table.merge(per.groupby("period_s", as_index=False).mean(), on="period_s", how="left")
    return table


def missed_by_duration(detections: pd.DataFrame, edges_s: Sequence[float] = (0, 2, 4, 8, 16)) -> pd.DataFrame:
    """Bursts missed per period and true burst length (the truth's ``duration_s``), tidy.

    :param detections: :func:`detect`.
    :param edges_s: bin edges in seconds; the last bin is open ("16+ s").
    :returns: columns ``period_s``, ``duration`` (a label such as "2-4 s"), ``bursts``,
        ``missed``, ``missed_pct``; bins without bursts are left out.
    """
    edges = [float(e) for e in edges_s] + [np.inf]
    labels = [f"{a:g}-{b:g} s" if np.isfinite(b) else f"{a:g}+ s" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    binned = detections.assign(duration=pd.cut(detections["duration_s"].astype(float), edges, labels=labels))
    out = (binned.groupby(["period_s", "duration"], observed=True)["missed"]
           .agg(bursts="count", missed="sum").reset_index())
    out["missed"] = out["missed"].astype(int)
    out["missed_pct"] = 100.0 * out["missed"] / out["bursts"]
    return out


def plot_period_study(table: pd.DataFrame, detections: pd.DataFrame, fig: Figure | None = None) -> Figure:
    """Four panels against the polling period (log scale): bursts missed, peak
    under-estimate and detection delay (per burst, with the median per kind), host cost.

    :param table: :func:`period_table` (with costs for the fourth panel).
    :param detections: :func:`detect`.
    :param fig: draw into this figure (default: a new 7.2 x 5.4 in figure).
    """
    from matplotlib.figure import Figure  # lazy: importing balloonlab must not load matplotlib
    fig = fig if fig is not None else Figure(figsize=(7.2, 5.4), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    axes[0, 0].set_xscale("log")
    periods = sorted(table["period_s"].unique())
    colors = {"alloc": "tab:blue", "reclaim": "tab:red", "all": "black"}
    rng = np.random.default_rng(0)  # the same jitter every time: the figure is reproducible
    for kind in KINDS:
        rows = table[table["kind"] == kind]
        style = {"color": colors[kind], "marker": "o", "ms": 4, "lw": 1.4 if kind == "all" else 1.0,
                 "ls": "-" if kind == "all" else "--", "label": kind}
        axes[0, 0].plot(rows["period_s"], rows["missed_pct"], **style)
        if kind == "all":
            continue
        points = detections[detections["kind"] == kind]
        jitter = np.exp(rng.uniform(-0.08, 0.08, len(points)))
        for ax, col, med in ((axes[0, 1], "under_pct", "under_median_pct"), (axes[1, 0], "delay_s", "delay_median_s")):
            ax.scatter(points["period_s"].astype(float) * jitter, points[col], s=9, alpha=0.45, color=colors[kind],
                       linewidths=0)
            ax.plot(rows["period_s"], rows[med], **style)
    axes[1, 0].plot(periods, periods, color="gray", lw=0.8, ls=":", label="delay = period")
    # Only detected bursts have a delay, and none is longer than its burst: keep the scale on them.
    most = np.nanmax(detections["delay_s"].to_numpy(dtype=float), initial=1.0)
    axes[1, 0].set_ylim(0, 1.25 * most)
    axes[0, 0].set(ylabel="bursts missed (%)", ylim=(-5, 105))
    axes[0, 1].set(ylabel="peak under-estimate (% of true)", ylim=(-5, 105))
    axes[1, 0].set(ylabel="detection delay (s)", xlabel="polling period (s)")
    if "sampler_cpu_s_per_hour" in table.columns:
        from matplotlib.ticker import FuncFormatter, LogLocator
        cost = table[table["kind"] == "all"]
        axes[1, 1].plot(cost["period_s"], cost["sampler_cpu_s_per_hour"], color="black", marker="o", ms=4,
                        label="sampler reads (client + QEMU)")
        axes[1, 1].plot(cost["period_s"], cost["qemu_service_cpu_s_per_hour"], color="gray", marker="s", ms=3,
                        ls="--", lw=1.0, label="QEMU non-vCPU threads, all")
        axes[1, 1].set(yscale="log", ylabel="host CPU s per guest-hour")
        axes[1, 1].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes[1, 1].yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axes[1, 1].set(xlabel="polling period (s)")
    for ax in axes.flat:
        ax.set_xticks(periods, [f"{p:g}" for p in periods])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, frameon=False)
    for ax, letter in zip(axes.flat, "abcd", strict=True):
        ax.set_title(f"({letter})", loc="left", fontsize=9)
    return fig
