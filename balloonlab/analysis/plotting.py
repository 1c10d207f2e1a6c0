"""Matplotlib plots of a run: each guest's memory over time with the balloon and the events.

Pure functions over the sampler's frames. :func:`plot_memory` draws one row of axes per
guest; :func:`update_memory_plot` refreshes the same lines in place for live plots (a
widget timer calls it with the growing frames); :func:`save_run_plot` writes a PNG of a
run. Nothing here calls ``plt.show()`` or touches pyplot's global state: figures are built
as :class:`matplotlib.figure.Figure` and returned (a notebook displays a returned figure;
for an interactive canvas such as ipympl pass ``fig=plt.figure()``).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import TypedDict

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import blended_transform_factory, offset_copy

from balloonlab.analysis.measures import _int, column, conform, guest_names
from balloonlab.analysis.pressure import PRESSURE_COUNTERS, classify_pressure
from balloonlab.model.units import format_size

MiB = 1 << 20
#: Lines drawn per guest: column -> (style keywords). Labels are the frames' column names.
LINES: dict[str, dict[str, object]] = {
    "total_memory": {"color": "tab:gray", "lw": 1.2},
    "free_memory": {"color": "tab:green", "lw": 1.2},
    "available_memory": {"color": "tab:blue", "lw": 1.2},
    "disk_caches": {"color": "tab:olive", "lw": 1.0, "alpha": 0.8},
    "actual": {"color": "tab:orange", "lw": 1.8, "drawstyle": "steps-post"},
    "target": {"color": "tab:red", "lw": 1.4, "ls": "--", "drawstyle": "steps-post"},
}
#: Event kinds marked with a vertical line and a short label, and their colours.
EVENT_COLORS: dict[str, str] = {"target": "tab:red", "workload": "tab:purple", "reset": "black",
                                "launch": "tab:green", "shutdown": "dimgray", "error": "crimson"}
#: Above this many marked events in one axes, target and workload events are drawn as short
#: unlabelled ticks at the bottom; the rare kinds below keep full lines (and labels, if few).
MAX_LABELS = 30
RARE = ("reset", "launch", "shutdown", "error")


class _EventStyle(TypedDict):
    """Line keywords of an event marker (see :func:`_event_style`)."""

    color: str
    lw: float
    alpha: float
    ls: str


@dataclass(frozen=True)
class _PlotArtists:
    """What :func:`plot_memory` keeps on its figure for :func:`update_memory_plot`.

    :param lines: guest -> {line name -> Line2D} (names of :data:`LINES` plus ``"balloon_change"``).
    :param axes: guest -> its Axes.
    :param events: guest -> the event markers drawn last (removed before the next draw).
    :param window: the ``window`` the figure was made with.
    """

    lines: dict[str, dict[str, Line2D]]
    axes: dict[str, Axes]
    events: dict[str, list[Artist]]
    window: pd.Timedelta | float | None


# The figure attributes that hold a _PlotArtists (documented in plot_memory; tests and the
# live plot read them).
_LINES_ATTR = "_balloonlab_lines"
_AXES_ATTR = "_balloonlab_axes"
_EVENTS_ATTR = "_balloonlab_events"
_WINDOW_ATTR = "_balloonlab_window"


def _attach(fig: Figure, artists: _PlotArtists) -> None:
    """Keep ``artists`` on ``fig`` as its ``_balloonlab_*`` attributes (the same dicts, not copies)."""
    setattr(fig, _LINES_ATTR, artists.lines)
    setattr(fig, _AXES_ATTR, artists.axes)
    setattr(fig, _EVENTS_ATTR, artists.events)
    setattr(fig, _WINDOW_ATTR, artists.window)


def _attached(fig: Figure) -> _PlotArtists:
    """The artists :func:`_attach` put on ``fig``.

    :raises ValueError: when ``fig`` was not made by :func:`plot_memory`.
    """
    if not hasattr(fig, _LINES_ATTR):
        raise ValueError("update_memory_plot needs a figure made by plot_memory")
    return _PlotArtists(lines=getattr(fig, _LINES_ATTR), axes=getattr(fig, _AXES_ATTR),
                        events=getattr(fig, _EVENTS_ATTR), window=getattr(fig, _WINDOW_ATTR))


def _cut(frame: pd.DataFrame | None, since: pd.Timestamp | None) -> pd.DataFrame | None:
    """Rows of ``frame`` at or after ``since`` (all of them when ``since`` is None)."""
    if frame is None or since is None:
        return frame
    return frame[frame.index >= since]


def _since(samples: pd.DataFrame, events: pd.DataFrame | None,
           window: pd.Timedelta | float | None) -> pd.Timestamp | None:
    """Start of the shown window: the latest time in the frames minus ``window``."""
    if window is None:
        return None
    span = window if isinstance(window, pd.Timedelta) else pd.Timedelta(seconds=float(window))
    ends = [f.index.max() for f in (samples, events) if f is not None and len(f)]
    return max(ends) - span if ends else None


def _x(index: pd.Index) -> np.ndarray:
    """UTC times as matplotlib date numbers (floats), so ``set_data`` needs no unit logic."""
    naive = pd.DatetimeIndex(index).tz_convert("UTC").tz_localize(None)
    days = mdates.date2num(naive.to_numpy())  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
    return np.asarray(days, dtype=float)


def _mib(values: pd.Series) -> np.ndarray:
    """Bytes (nullable ints) as float MiB with NaN for NA."""
    mib: np.ndarray = values.astype("Float64").to_numpy(dtype=float, na_value=np.nan) / MiB
    return mib


def _rows(frame: pd.DataFrame | None, guest: str) -> pd.DataFrame | None:
    """One guest's rows, in time order."""
    if frame is None:
        return None
    return frame[(frame["guest"].astype(str) == guest).to_numpy()].sort_index(kind="stable")


def _event_label(kind: str, value: object, detail: object) -> str:
    """Short text for an event marker (``"target 256 MiB"``, ``"alloc 128 MiB"``, ...)."""
    text = "" if detail is None or detail is pd.NA else str(detail)
    if kind == "target" and value is not pd.NA:
        return f"target {format_size(_int(value))}"
    if kind == "workload":
        return text or (f"held {format_size(_int(value))}" if value is not pd.NA else "workload")
    if kind == "error":
        return f"error {text[:24]}".strip()
    return kind


def _event_style(kind: str) -> _EventStyle:
    """Line style of an event marker (also used for the legend)."""
    return {"color": EVENT_COLORS[kind], "lw": 1.6 if kind == "error" else 0.9, "alpha": 0.7,
            "ls": ":" if kind in ("target", "workload") else "-"}


def _stepped(sampled: pd.Series, moves: pd.Series, index: pd.Index) -> pd.Series | None:
    """A step series from event values, starting at the first sample, ending at the last."""
    if not len(moves) or not len(index):
        return None
    head = sampled[sampled.index < moves.index[0]].iloc[:1].astype(moves.dtype)
    tail = pd.Series([moves.iloc[-1]], index=index[-1:], dtype=moves.dtype)
    return pd.concat([head, moves, tail[tail.index > moves.index[-1]]])


def _fill(fig: Figure, ax: Axes, lines: dict[str, Line2D], s: pd.DataFrame,
          ev: pd.DataFrame | None) -> list[Artist]:
    """Put one guest's data into its lines and draw its event markers (returned); ``ax`` is in ``fig``."""
    x = _x(s.index)
    for name, line in lines.items():
        if name in LINES:
            line.set_data(x, _mib(column(s, name)))
    artists: list[Artist] = []
    if ev is None:
        return artists
    kinds = ev["kind"].astype(str)
    changes = ev[(kinds == "balloon_change").to_numpy()]
    lines["balloon_change"].set_data(_x(changes.index), _mib(changes["value"]))
    # Events say exactly when `actual` and `target` moved; a sample only sees what had been
    # delivered by its read (QEMU rate-limits BALLOON_CHANGE). Draw those lines from events.
    for name, kind in (("actual", "balloon_change"), ("target", "target")):
        stepped = _stepped(column(s, name), ev[(kinds == kind).to_numpy()]["value"], s.index)
        if stepped is not None:
            lines[name].set_data(_x(stepped.index), _mib(stepped))
    marked = ev[kinds.isin(list(EVENT_COLORS)).to_numpy()]
    crowded = len(marked) > MAX_LABELS  # then frequent kinds become short ticks at the bottom
    rare = int(marked["kind"].astype(str).isin(RARE).sum())
    trans = offset_copy(blended_transform_factory(ax.transData, ax.transAxes), fig,
                        x=1.5, units="points")  # labels just right of their line
    for t, kind, value, detail in zip(_x(marked.index), marked["kind"].astype(str),
                                      marked["value"], column(marked, "detail", "string"),
                                      strict=True):
        full = not crowded or kind in RARE
        artists.append(ax.axvline(t, ymax=1.0 if full else 0.04, **_event_style(kind)))
        if full and (not crowded or rare <= MAX_LABELS):
            artists.append(ax.text(t, 0.98, _event_label(kind, value, detail), transform=trans,
                                   rotation=90, va="top", ha="left", fontsize=7,
                                   color=EVENT_COLORS[kind], clip_on=True,
                                   bbox={"fc": "white", "ec": "none", "alpha": 0.6, "pad": 0.3}))
    return artists


def utc_time_axis(axes: Sequence[Axes] | np.ndarray, empty: str | None = None) -> None:
    """The shared time axis of stacked per-guest axes: concise UTC dates on the bottom one;
    ``empty`` written in the top one when there is nothing to draw."""
    if empty is not None:
        axes[0].text(0.5, 0.5, empty, ha="center", va="center", transform=axes[0].transAxes)
    locator = mdates.AutoDateLocator(tz=_dt.UTC)  # type: ignore[no-untyped-call]  # matplotlib.dates is unannotated
    axes[-1].xaxis.set_major_locator(locator)
    formatter = mdates.ConciseDateFormatter(locator, tz=_dt.UTC)  # type: ignore[no-untyped-call]  # as above
    axes[-1].xaxis.set_major_formatter(formatter)
    axes[-1].set_xlabel("time (UTC)")


def guest_axes(samples: pd.DataFrame, events: pd.DataFrame | None, guests: list[str] | None, fig: Figure | None,
               height_per_guest: float) -> tuple[Figure, list[str], np.ndarray]:
    """A figure (``fig`` cleared, or a new one) with one row of axes per guest, sharing x: the
    guests asked for, else every guest of the samples then of the events."""
    if guests is None:
        guests = guest_names(samples)
        guests += [g for g in (guest_names(events) if events is not None else []) if g not in guests]
    n = max(1, len(guests))
    if fig is None:
        fig = Figure(figsize=(11, 0.8 + height_per_guest * n), layout="constrained")
    else:
        fig.clear()
    return fig, guests, fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]


def plot_memory(samples: pd.DataFrame, events: pd.DataFrame | None = None, *,
                guests: list[str] | None = None, window: pd.Timedelta | float | None = None,
                fig: Figure | None = None) -> Figure:
    """Each guest's memory over time: one row of axes per guest, shared UTC time axis.

    Lines (MiB): ``total_memory``, ``free_memory``, ``available_memory``, ``disk_caches``,
    and the balloon's ``actual`` (solid steps) against its ``target`` (dashed steps).
    Events: ``target``, ``workload``, ``reset``, ``launch``, ``shutdown`` and ``error`` as
    vertical lines with short labels; ``balloon_change`` as small ticks on the actual line.
    The figure keeps its artists for :func:`update_memory_plot`: ``fig._balloonlab_lines``
    (guest -> {line name -> Line2D}, line names as in :data:`LINES` plus
    ``"balloon_change"``), ``fig._balloonlab_axes`` (guest -> Axes),
    ``fig._balloonlab_events`` (guest -> event artists) and ``fig._balloonlab_window``.

    :param samples: the samples frame.
    :param events: the events frame, or None for no markers.
    :param guests: the guests to draw (default: every guest in the frames).
    :param window: show only the last ``window`` (a Timedelta, or seconds) of the run.
    :param fig: draw into this figure (cleared first), e.g. an ipympl canvas's figure.
    :returns: the figure (never shown here).
    """
    samples = conform(samples, "samples")
    events = None if events is None else conform(events, "events")
    fig, guests, axes = guest_axes(samples, events, guests, fig, height_per_guest=2.5)
    kept = _PlotArtists(lines={}, axes={}, events={}, window=window)
    _attach(fig, kept)
    for ax, guest in zip(axes, guests, strict=False):
        ax.xaxis_date(_dt.UTC)
        lines = {name: ax.plot([], [], label=name, **style)[0] for name, style in LINES.items()}
        lines["balloon_change"] = ax.plot([], [], ls="none", marker="|", ms=6, mew=1,
                                          color=LINES["actual"]["color"], label="_balloon_change")[0]
        kept.lines[guest], kept.axes[guest] = lines, ax
        ax.set_title(guest, loc="left", fontsize=10, fontweight="bold")
        ax.set_ylabel("MiB")
        ax.grid(True, lw=0.4, alpha=0.5)
    utc_time_axis(axes, None if guests else "no samples")
    if guests:
        marks = [Line2D([], [], label=f"{k} event", **_event_style(k)) for k in EVENT_COLORS]
        handles = list(kept.lines[guests[0]].values())[:len(LINES)] + marks
        axes[0].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
                       fontsize=8, frameon=False)
    update_memory_plot(fig, samples, events, draw=False)
    return fig


def update_memory_plot(fig: Figure, samples: pd.DataFrame, events: pd.DataFrame | None = None,
                       *, draw: bool = True) -> None:
    """Refresh a :func:`plot_memory` figure in place with newer frames (for live plots).

    Sets the existing lines' data, redraws the event markers, rescales each axes
    (``relim``/``autoscale_view``) and asks the canvas for a redraw (``draw_idle``). No axes
    are created: a guest not in the figure is ignored (call :func:`plot_memory` again).

    :param fig: a figure made by :func:`plot_memory`.
    :param samples: the samples frame (the whole run so far; the figure's window applies).
    :param events: the events frame, or None to leave markers out.
    :param draw: call ``fig.canvas.draw_idle()`` at the end.
    :raises ValueError: when ``fig`` was not made by :func:`plot_memory`.
    """
    kept = _attached(fig)
    samples = conform(samples, "samples")
    events = None if events is None else conform(events, "events")
    since = _since(samples, events, kept.window)
    shown, shown_events = _cut(samples, since), _cut(events, since)
    for guest, lines in kept.lines.items():
        ax = kept.axes[guest]
        for artist in kept.events.get(guest, []):
            artist.remove()
        ev = _rows(shown_events, guest)
        if ev is None:
            lines["balloon_change"].set_data([], [])
        kept.events[guest] = _fill(fig, ax, lines, _rows(shown, guest), ev)
        ax.relim()
        ax.autoscale_view()
        low, high = ax.get_ylim()  # headroom for the event labels; autoscaling stays on
        ax.set_ylim(low, high + 0.15 * (high - low), auto=None)
    if draw:
        fig.canvas.draw_idle()


def pressure_plot_path(path: str | Path) -> Path:
    """Where :func:`save_run_plot` puts the pressure plot beside ``path`` (``plot-pressure.png``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-pressure{path.suffix}")


def attribution_plot_path(path: str | Path) -> Path:
    """Where :func:`save_run_plot` puts the attribution plot beside ``path`` (``plot-attribution.png``)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-attribution{path.suffix}")


def save_run_plot(samples: pd.DataFrame, events: pd.DataFrame | None, path: str | Path) -> Path:
    """Write :func:`plot_memory` of a whole run to ``path`` as a PNG (110 dpi, tight box).

    When the run has the reclaim counters of QEMU >= 9.2 with Linux >= 6.12 (any guest), the
    pressure regimes and reclaim rates (:func:`~balloonlab.analysis.pressure_plot.plot_pressure`)
    go beside it, at :func:`pressure_plot_path`. When the host saw a guest's QEMU (the host
    columns, any guest), its memory attribution
    (:func:`~balloonlab.analysis.attribution_plot.plot_attribution`) goes beside it too, at
    :func:`attribution_plot_path`.

    :param samples: the samples frame.
    :param events: the events frame (or None).
    :param path: the PNG file to write; missing parent folders are created.
    :returns: ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plot_memory(samples, events)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    if any(name in samples and samples[name].notna().any() for name in PRESSURE_COUNTERS):
        from balloonlab.analysis.pressure_plot import plot_pressure
        plot_pressure(classify_pressure(samples)).savefig(pressure_plot_path(path), format="png", dpi=110,
                                                          bbox_inches="tight")
    if "host_rss" in samples and samples["host_rss"].notna().any():
        from balloonlab.analysis.attribution_plot import plot_attribution
        plot_attribution(samples, events).savefig(attribution_plot_path(path), format="png", dpi=110,
                                                  bbox_inches="tight")
    return path
