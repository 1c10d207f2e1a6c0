"""Matplotlib figure of memory attribution: each guest's bytes stacked by where they are.

Draws :func:`balloonlab.analysis.attribution.attribution` over time, one row of axes per guest
(a shared UTC time axis, as :func:`~balloonlab.analysis.plotting.plot_memory`): the bands of
:data:`~balloonlab.analysis.attribution.BANDS` stacked from the VMM's own memory up, host-resident
bands solid and the rest hatched, so the top of the solid part is QEMU's RSS (drawn as a thin
black line: where it parts from the stack, ``resident_gap`` is not 0) and the top of the guest's
bands is its ``actual``. The balloon's target is drawn where it steers that top (VMM overhead +
target), a virtio-mem device's requested size where it steers the unplugged band, and events as
vertical markers like the memory plot's. :func:`update_attribution_plot` redraws the same axes
with newer frames (live plots). Like the other plots it returns a
:class:`matplotlib.figure.Figure` and never touches pyplot's state.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory, offset_copy

from balloonlab.analysis.attribution import BANDS, RESIDENT, VMEM_REQUESTED, attribution
from balloonlab.analysis.measures import column, conform
from balloonlab.analysis.plotting import (EVENT_COLORS, MAX_LABELS, RARE, _cut, _event_label, _event_style, _rows,
                                          _since, _x, guest_axes, utc_time_axis)

MiB = 1 << 20
#: Band colours (host-resident ones solid, the others hatched over a light fill).
COLORS: dict[str, str] = {
    "vmm_tcg": "#8c564b", "vmm_other": "#c49c94", "guest_used": "#1f77b4", "guest_cache": "#9ecae1",
    "guest_reserved": "#7f7f7f", "guest_free_resident": "#ff7f0e", "guest_free_unbacked": "#fdd0a2",
    "ballooned": "#74c476", "vmem_unplugged": "#c7e9c0",
}
#: The lines: name -> (legend label, style keywords).
LINES: dict[str, tuple[str, dict[str, object]]] = {
    "host_rss": ("QEMU RSS (smaps_rollup)", {"color": "black", "lw": 0.9}),
    "target": ("balloon target (+ VMM, + virtio-mem plugged)",
               {"color": "tab:red", "lw": 1.4, "ls": "--", "drawstyle": "steps-post"}),
    "requested": ("virtio-mem requested", {"color": "darkgreen", "lw": 1.4, "ls": "--", "drawstyle": "steps-post"}),
}
_ATTR = "_balloonlab_attribution"


@dataclass
class _Kept:
    """What a figure made by :func:`plot_attribution` keeps for :func:`update_attribution_plot`."""

    axes: dict[str, Axes]
    drawn: dict[str, list[Artist]]
    window: pd.Timedelta | float | None
    ram_size: int | Mapping[str, int] | None
    #: guest -> samples stacked at the last draw
    points: dict[str, int]


def _stack(a: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The rows to stack and whether they carry the host's side. Rows with the split are
    drawn when the guest has any (without ``PAGEMAP_SCAN`` only some rows do); a guest the
    host cannot see gets its guest-side bands alone, VMM and residency taken as 0."""
    known = a["vmm_tcg"].notna()
    if known.any():
        return a[known.to_numpy()], True
    guest = a.copy()
    for name in ("vmm_tcg", "vmm_other", "guest_free_resident"):
        guest[name] = 0
    guest["guest_free_unbacked"] = (guest["memory"] - guest["guest_used"] - guest["guest_cache"]
                                    - guest["guest_reserved"]).clip(lower=0)
    return guest, False


def _mib(values: pd.Series) -> np.ndarray:
    mib: np.ndarray = values.astype("Float64").to_numpy(dtype=float, na_value=np.nan) / MiB
    return mib


def _draw_guest(fig: Figure, ax: Axes, samples: pd.DataFrame, ev: pd.DataFrame | None,
                ram_size: int | Mapping[str, int] | None) -> tuple[list[Artist], list[np.ndarray]]:
    """One guest's bands, lines and event markers (to be removed at the next draw), and the
    x and y of everything drawn (matplotlib's relim ignores the bands' collections)."""
    drawn: list[Artist] = []
    reach: list[np.ndarray] = [np.zeros(0)]
    a, host_side = _stack(attribution(samples, ram_size=ram_size))
    if len(a):
        x = _x(a.index)
        ys = [np.nan_to_num(_mib(a[name])) for name in BANDS]
        for name, poly in zip(BANDS, ax.stackplot(x, *ys, colors=[COLORS[n] for n in BANDS], lw=0), strict=True):
            poly.set_gid(f"attribution:{name}")
            if name not in RESIDENT:
                poly.set_hatch("//")
                poly.set_edgecolor("white")
            drawn.append(poly)
        reach.append(sum(ys))
        vmm = np.nan_to_num(_mib(a["vmm_tcg"])) + np.nan_to_num(_mib(a["vmm_other"]))
        # The balloon steers the top of the guest's bands (memory = actual + vmem_size) towards
        # target + vmem_size; virtio-mem steers the border between ballooned and unplugged.
        plugged = _mib(a["memory"]) - _mib(a["actual"])
        lines = {"host_rss": _mib(a["host_rss"]), "target": vmm + _mib(a["target"]) + plugged}
        if VMEM_REQUESTED in samples.columns and samples[VMEM_REQUESTED].notna().any():
            top = vmm + sum(np.nan_to_num(_mib(a[n])) for n in list(BANDS)[2:8])
            lines["requested"] = top + _mib(a["vmem_requested"]) - plugged
        for name, y in lines.items():
            drawn += ax.plot(x, y, label=LINES[name][0], **LINES[name][1])  # type: ignore[arg-type]
            reach.append(y)
        reach = [np.concatenate(reach), x]
    if len(a) and not host_side:
        drawn.append(ax.text(0.995, 0.98, "no host view: guest side only", transform=ax.transAxes,
                             ha="right", va="top", fontsize=7, color="dimgray"))
    if ev is not None:
        drawn += _markers(fig, ax, ev)
    return drawn, reach


def _markers(fig: Figure, ax: Axes, ev: pd.DataFrame) -> list[Artist]:
    """Event markers as :func:`~balloonlab.analysis.plotting.plot_memory` draws them."""
    marked = ev[ev["kind"].astype(str).isin(list(EVENT_COLORS)).to_numpy()]
    crowded = len(marked) > MAX_LABELS
    rare = int(marked["kind"].astype(str).isin(RARE).sum())
    trans = offset_copy(blended_transform_factory(ax.transData, ax.transAxes), fig, x=1.5, units="points")
    out: list[Artist] = []
    for t, kind, value, detail in zip(_x(marked.index), marked["kind"].astype(str), marked["value"],
                                      column(marked, "detail", "string"), strict=True):
        full = not crowded or kind in RARE
        out.append(ax.axvline(t, ymax=1.0 if full else 0.04, **_event_style(kind)))
        if full and (not crowded or rare <= MAX_LABELS):
            out.append(ax.text(t, 0.98, _event_label(kind, value, detail), transform=trans, rotation=90,
                               va="top", ha="left", fontsize=7, color=EVENT_COLORS[kind], clip_on=True,
                               bbox={"fc": "white", "ec": "none", "alpha": 0.6, "pad": 0.3}))
    return out


def plot_attribution(samples: pd.DataFrame, events: pd.DataFrame | None = None, *,
                     guests: list[str] | None = None, window: pd.Timedelta | float | None = None,
                     ram_size: int | Mapping[str, int] | None = None, fig: Figure | None = None) -> Figure:
    """Each guest's memory attribution over time: stacked bands, target and RSS lines, events.

    Each band is a PolyCollection with the gid ``"attribution:<band>"``; the axes, the artists
    drawn and the samples stacked per guest (``.points``) are kept on the figure for
    :func:`update_attribution_plot` (``fig._balloonlab_attribution``).

    :param samples: the samples frame (with the host columns for the host's side).
    :param events: the events frame, or None for no markers.
    :param guests: the guests to draw (default: every guest in the frames).
    :param window: show only the last ``window`` (a Timedelta, or seconds) of the run.
    :param ram_size: passed to :func:`~balloonlab.analysis.attribution.attribution`.
    :param fig: draw into this figure (cleared first), e.g. an ipympl canvas's figure.
    :returns: the figure (never shown here).
    """
    samples = conform(samples, "samples")
    events = None if events is None else conform(events, "events")
    fig, guests, axes = guest_axes(samples, events, guests, fig, height_per_guest=2.8)
    kept = _Kept(axes={}, drawn={}, window=window, ram_size=ram_size, points={})
    setattr(fig, _ATTR, kept)
    for ax, guest in zip(axes, guests, strict=False):
        ax.xaxis_date(_dt.UTC)
        ax.set_title(guest, loc="left", fontsize=10, fontweight="bold")
        ax.set_ylabel("MiB")
        ax.grid(True, lw=0.4, alpha=0.5)
        kept.axes[guest] = ax
    utc_time_axis(axes, None if guests else "no samples")
    if guests:
        handles: list[Artist] = [Patch(facecolor=COLORS[name], hatch=None if name in RESIDENT else "//",
                                       edgecolor="white", label=label) for name, label in reversed(BANDS.items())]
        vmem = VMEM_REQUESTED in samples.columns
        handles += [Line2D([], [], label=label, **style)  # type: ignore[arg-type]
                    for name, (label, style) in LINES.items() if name != "requested" or vmem]
        handles += [Line2D([], [], label=f"{k} event", **_event_style(k)) for k in EVENT_COLORS]
        fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    update_attribution_plot(fig, samples, events, draw=False)
    return fig


def update_attribution_plot(fig: Figure, samples: pd.DataFrame, events: pd.DataFrame | None = None,
                            *, draw: bool = True) -> None:
    """Redraw a :func:`plot_attribution` figure's bands, lines and markers with newer frames.

    No axes are created: a guest not in the figure is ignored (call :func:`plot_attribution`).

    :param fig: a figure made by :func:`plot_attribution`.
    :param samples: the samples frame (the whole run so far; the figure's window applies).
    :param events: the events frame, or None to leave markers out.
    :param draw: call ``fig.canvas.draw_idle()`` at the end.
    :raises ValueError: when ``fig`` was not made by :func:`plot_attribution`.
    """
    kept = getattr(fig, _ATTR, None)
    if not isinstance(kept, _Kept):
        raise ValueError("update_attribution_plot needs a figure made by plot_attribution")
    samples = conform(samples, "samples")
    events = None if events is None else conform(events, "events")
    since = _since(samples, events, kept.window)
    shown, shown_events = _cut(samples, since), _cut(events, since)
    xs: list[np.ndarray] = []
    for guest, ax in kept.axes.items():
        for artist in kept.drawn.get(guest, []):
            artist.remove()
        rows = _rows(shown, guest)
        kept.drawn[guest], reach = _draw_guest(fig, ax, rows if rows is not None else shown,
                                               _rows(shown_events, guest), kept.ram_size)
        kept.points[guest] = len(reach[-1]) if len(reach) > 1 else 0
        high = np.nanmax(reach[0]) if len(reach) > 1 and np.isfinite(reach[0]).any() else 1.0
        ax.set_ylim(0, 1.15 * high)  # headroom for the event labels
        xs += reach[1:]
    x = np.concatenate(xs) if xs else np.zeros(0)
    if len(x) and x.max() > x.min():
        next(iter(kept.axes.values())).set_xlim(x.min(), x.max())  # shared by every guest's axes
    if draw:
        fig.canvas.draw_idle()
