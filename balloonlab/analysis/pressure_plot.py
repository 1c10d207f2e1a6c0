"""Matplotlib figure of memory pressure: reclaim rates over time on bands coloured by regime.

Draws the frame :func:`balloonlab.analysis.pressure.classify_pressure` returns (or
``df.balloon.pressure()``): one row of axes per guest, a shared UTC time axis, the kswapd and
direct-reclaim scan and reclaim rates (MiB/s, one step per window), allocation stalls per
second on a second y axis, and behind them each window's regime as a coloured band, with the
OOM kills of ``critical`` windows written on their band. Like :mod:`balloonlab.analysis.plotting`
it builds a :class:`matplotlib.figure.Figure` and returns it, never touching pyplot's state;
this module is imported only when a pressure plot is asked for, so ``import balloonlab`` does
not load matplotlib.
"""

from __future__ import annotations

import datetime as _dt

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from balloonlab.analysis.measures import guest_names
from balloonlab.analysis.plotting import utc_time_axis
from balloonlab.analysis.pressure import REGIMES

MiB = 1 << 20
#: Band colour of each regime: cool to hot with severity; ``none`` draws no band.
REGIME_COLORS: dict[str, str] = {
    "unknown": "#d9d9d9", "none": "#ffffff", "background": "#c7e9c0", "struggling": "#fee391",
    "cgroup": "#9ecae1", "global": "#fdae6b", "thrashing": "#f03b20", "critical": "#7a0177",
}
#: Band opacity: the lines must stay readable on the darkest band.
BAND_ALPHA = 0.35
#: Rate lines on the left axis (MiB/s): column -> (label, style keywords). kswapd blue,
#: direct reclaim red; scans dashed, reclaims solid, so reclaim/scan reads as solid/dashed.
RATE_LINES: dict[str, tuple[str, dict[str, object]]] = {
    "async_scans_bytes_per_s": ("kswapd scan", {"color": "tab:blue", "ls": "--", "lw": 1.2}),
    "async_reclaims_bytes_per_s": ("kswapd reclaim", {"color": "tab:blue", "lw": 1.6}),
    "direct_scans_bytes_per_s": ("direct scan", {"color": "tab:red", "ls": "--", "lw": 1.2}),
    "direct_reclaims_bytes_per_s": ("direct reclaim", {"color": "tab:red", "lw": 1.6}),
}
#: The stall line on the right axis (stalls/s).
STALL_LINE: tuple[str, dict[str, object]] = ("alloc stalls/s", {"color": "black", "ls": ":", "lw": 1.4})


def _x(values: pd.Series | pd.Index) -> np.ndarray:
    """UTC times as matplotlib date numbers (floats)."""
    naive = pd.DatetimeIndex(values).tz_convert("UTC").tz_localize(None)
    days = mdates.date2num(naive.to_numpy())  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
    return np.asarray(days, dtype=float)


def _steps(start: np.ndarray, end: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each window's value held from its start to its end; NaN breaks where windows do not abut."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (a, b, v) in enumerate(zip(start, end, values, strict=True)):
        if i and a != end[i - 1]:
            xs.append(np.nan)
            ys.append(np.nan)
        xs += [a, b]
        ys += [v, v]
    return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)


def plot_pressure(pressure: pd.DataFrame, *, guests: list[str] | None = None, yscale: str = "linear",
                  fig: Figure | None = None) -> Figure:
    """Each guest's reclaim rates over time, on bands coloured by its pressure regime.

    Per guest one axes: the four scan/reclaim rates in MiB/s (kswapd blue, direct red; scans
    dashed, reclaims solid) as steps over each window (``start`` to the index), the stall rate
    on a right-hand axis (black dotted), and behind them one band per window in the colour of
    its regime (:data:`REGIME_COLORS`; ``none`` leaves the background white). Each band is an
    artist with the gid ``"pressure:<regime>"``; a ``critical`` band is labelled with its OOM
    kills. The legend lists the lines and the regimes that occur.

    :param pressure: :func:`~balloonlab.analysis.pressure.classify_pressure`'s frame.
    :param guests: the guests to draw (default: every guest in the frame).
    :param yscale: the rate axes' scale (``"linear"``, ``"log"``, ``"symlog"``).
    :param fig: draw into this figure (cleared first), e.g. an ipympl canvas's figure.
    :returns: the figure (never shown here).
    :raises ValueError: when ``pressure`` is not a pressure frame (a samples frame, say).
    """
    needed = {"guest", "start", "regime", "oom_kills_delta", "alloc_stalls_per_s", *RATE_LINES}
    if not needed <= set(pressure.columns):
        raise ValueError("plot_pressure draws classify_pressure's frame: pass samples.balloon.pressure() "
                         f"(missing columns: {sorted(needed - set(pressure.columns))})")
    if guests is None:
        guests = guest_names(pressure)
    n = max(1, len(guests))
    if fig is None:
        fig = Figure(figsize=(11, 0.8 + 2.3 * n), layout="constrained")
    else:
        fig.clear()
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    seen: set[str] = set()
    handles: list[Artist] = []  # the first guest's lines, for the legend
    for ax, guest in zip(axes, guests, strict=False):
        rows = pressure[(pressure["guest"].astype(str) == guest).to_numpy()].sort_index(kind="stable")
        start, end = _x(rows["start"]), _x(rows.index)
        regimes = rows["regime"].astype(str).to_numpy()
        for a, b, regime, kills in zip(start, end, regimes, rows["oom_kills_delta"], strict=True):
            seen.add(regime)
            if regime == "none" or b <= a:
                continue
            ax.axvspan(a, b, color=REGIME_COLORS[regime], alpha=BAND_ALPHA, lw=0, zorder=0,
                       gid=f"pressure:{regime}")
            if regime == "critical" and pd.notna(kills):
                ax.text((a + b) / 2, 0.97, f"OOM x{int(kills)}", transform=ax.get_xaxis_transform(),
                        ha="center", va="top", fontsize=7, color=REGIME_COLORS["critical"])
        for name, (label, style) in RATE_LINES.items():
            mib = rows[name].astype("Float64").to_numpy(dtype=float, na_value=np.nan) / MiB
            line = ax.plot(*_steps(start, end, mib), label=label, **style)[0]
            handles += [] if ax is not axes[0] else [line]
        stalls_ax = ax.twinx()
        stalls = rows["alloc_stalls_per_s"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        line = stalls_ax.plot(*_steps(start, end, stalls), label=STALL_LINE[0], **STALL_LINE[1])[0]
        handles += [] if ax is not axes[0] else [line]
        stalls_ax.set_ylabel("stalls/s", fontsize=8)
        stalls_ax.set_ylim(bottom=0)
        ax.set_yscale(yscale)
        if yscale == "linear":
            ax.set_ylim(bottom=0)
        ax.set_title(guest, loc="left", fontsize=10, fontweight="bold")
        ax.set_ylabel("MiB/s")
        ax.xaxis_date(_dt.UTC)
        ax.grid(True, lw=0.4, alpha=0.5)
    utc_time_axis(axes, None if guests else "no pressure windows")
    if guests:
        handles += [Patch(facecolor=REGIME_COLORS[r], alpha=BAND_ALPHA if r != "none" else 1.0,
                          edgecolor="#999999", label=r) for r in REGIMES if r in seen]
        axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8, frameon=False)
    return fig
