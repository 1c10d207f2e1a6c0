"""A live plot of a running sampler that never blocks the kernel.

The figure is drawn once by :func:`balloonlab.analysis.plotting.plot_memory`; a timer then calls
:func:`balloonlab.analysis.plotting.update_memory_plot` (``set_data`` + ``draw_idle``) with the
growing frames. A toggle switches it to the memory attribution view
(:func:`balloonlab.analysis.attribution_plot.plot_attribution`, then
:func:`~balloonlab.analysis.attribution_plot.update_attribution_plot`): the same frames, grown
the same way, drawn as stacked bands (the host's view of every guest byte). Each refresh takes
snapshots of the sampler's buffers on balloonlab's loop (1-2 ms at 10 M rows here) and builds
the frames elsewhere, so the sampling loop never waits for a plot. Each refresh builds only the
rows recorded since the previous one (the first, only the window's) and appends them to the
frames it keeps, cut to the window (the counts in the info line are the whole run's). Inside a
notebook kernel the timer is an asyncio task on the kernel's own loop: it runs between cells,
awaits the snapshots without blocking, builds the frames in a worker thread, and touches the
figure only on the kernel's main thread (matplotlib is not thread-safe, and ipympl renders on
that thread when the browser asks). Outside a kernel (scripts, tests) it is a daemon thread that
builds and draws. With ipympl (``%matplotlib widget``) the canvas itself is the widget;
otherwise the figure is shown as a PNG in an Image widget.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ipywidgets as w
import pandas as pd

from balloonlab.analysis.attribution_plot import plot_attribution, update_attribution_plot
from balloonlab.analysis.plotting import plot_memory, update_memory_plot
from balloonlab.blocking import SyncSampler
from balloonlab.blocking import loop as _loop
from balloonlab.record.buffer import BufferSnapshot, concat_frames

log = logging.getLogger(__name__)
#: Window choices: label -> seconds (0 means the whole run).
WINDOWS: list[tuple[str, int]] = [("last minute", 60), ("last 5 minutes", 300), ("last 15 minutes", 900),
                                  ("last hour", 3600), ("all", 0)]
#: View choices: label -> what is drawn (balloon and stats lines, or the attribution's bands).
VIEWS: list[tuple[str, str]] = [("memory", "memory"), ("attribution", "attribution")]


@dataclass(frozen=True)
class _PlotData:
    """One refresh's input: the frames (only the window's rows when there is a window) and what
    the info line and the default guests come from (the whole run)."""

    samples: pd.DataFrame
    events: pd.DataFrame
    window: int  # seconds, 0 for the whole run
    n_samples: int
    n_events: int
    guests: list[str]  # in the run: the samples' guests, then those only in events
    last: pd.Timestamp | None  # the latest sample's time


class _Shown:
    """What a live plot shows, grown tick by tick: each refresh builds only the rows recorded
    since the last one (the first builds only the window's) and appends them to the frames
    kept, which are cut to the window. Counts and guests are the whole run's.

    Not thread-safe: one refresh at a time (:class:`LivePlot` holds a lock around it).
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.next = (0, 0)  # rows of (samples, events) already built: the next snapshot starts here
        self._samples: pd.DataFrame | None = None
        self._events: pd.DataFrame | None = None
        self._sample_guests: set[str] = set()
        self._event_guests: set[str] = set()
        self._last_ns: int | None = None

    def update(self, samples: BufferSnapshot, events: BufferSnapshot) -> _PlotData:
        """Add the rows of snapshots taken from :attr:`next` on; the data to draw."""
        self.next = (samples.start + len(samples), events.start + len(events))
        self._sample_guests.update(samples.categories_present("guest"))
        self._event_guests.update(events.categories_present("guest"))
        ends = [t for t in (samples.max_time_ns(), events.max_time_ns(), self._last_ns) if t is not None]
        if samples.max_time_ns() is not None:
            self._last_ns = max(t for t in (samples.max_time_ns(), self._last_ns) if t is not None)
        since = max(ends) - (self.window + 1) * 1_000_000_000 if self.window and ends else None
        if since is not None and self._samples is None:  # the first tick: only the window's rows
            samples, events = samples.since(since), events.since(since)
        self._samples = self._grow(self._samples, samples.frame(), since)
        self._events = self._grow(self._events, events.frame(), since)
        names = sorted(self._sample_guests) + sorted(self._event_guests - self._sample_guests)
        last = None if self._last_ns is None else pd.Timestamp(self._last_ns, unit="ns", tz="UTC")
        return _PlotData(self._samples, self._events, self.window, self.next[0], self.next[1], names, last)

    @staticmethod
    def _grow(kept: pd.DataFrame | None, new: pd.DataFrame, since: int | None) -> pd.DataFrame:
        frame = new if kept is None or not len(kept) else concat_frames([kept, new]) if len(new) else kept
        if since is not None and len(frame) and frame.index.asi8.min() < since:
            frame = frame[frame.index.asi8 >= since]  # rows may come out of time order (events)
        return frame


class LivePlot:
    """Memory of the sampled guests, refreshed every ``refresh_s``; ``.widget`` shows it.

    :param sampler: the running sampler to plot.
    :param guests: the guest names to draw (a list, or a callable giving the current list;
        the axes are rebuilt when it changes). Default: the guests in the frames.
    :param refresh_s: seconds between refreshes.
    :param window_s: seconds of the run shown (0 or None: all of it).
    :param on_tick: called (on the same thread as the drawing) at every refresh.
    :param view: ``"memory"`` (the stats and the balloon as lines) or ``"attribution"`` (each
        byte by where it is, stacked; the host's view); the widget's toggle switches it live.
    """

    def __init__(self, sampler: SyncSampler, guests: Sequence[str] | Callable[[], Sequence[str]] | None = None,
                 *, refresh_s: float = 1.0, window_s: float | None = 300,
                 on_tick: Callable[[], None] | None = None, view: str = "memory") -> None:
        import matplotlib.pyplot as plt
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be a positive number of seconds, got {refresh_s!r}")
        if view not in dict(VIEWS).values():
            raise ValueError(f"view must be one of {[v for _, v in VIEWS]}, got {view!r}")
        self.sampler = sampler
        self.refresh_s = refresh_s
        self._guests = guests
        self._on_tick = on_tick
        self._names: list[str] | None = None
        self._drawn_window: int | None = None
        self._drawn_view: str | None = None
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._task_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        n = max(1, len(self._guest_names() or [""]))
        with plt.ioff():  # or the figure shows twice under ipympl
            self.figure = plt.figure(figsize=(10, 0.8 + 2.4 * n), layout="constrained")
        # ipympl's canvas is also an ipywidgets DOMWidget, and ipywidgets has no types.
        canvas: Any = self.figure.canvas
        self.interactive = isinstance(canvas, w.DOMWidget)
        if self.interactive:
            canvas.header_visible = False
            self._view: w.Widget = canvas
        else:
            self._view = w.Image(format="png", layout=w.Layout(max_width="100%"))
        choices = {s for _, s in WINDOWS}
        window = int(window_s or 0)
        options = WINDOWS if window in choices else [*WINDOWS, (f"last {window} s", window)]
        self.window = w.Dropdown(options=options, value=window, description="window",
                                 layout=w.Layout(width="16em"))
        self.window.observe(lambda _c: self._replot_soon(), names="value")
        self.view = w.ToggleButtons(options=VIEWS, value=view, layout=w.Layout(width="auto"),
                                    style={"button_width": "7em"})
        self.view.observe(lambda _c: self._switch_view(), names="value")
        self.info = w.HTML()
        self.widget = w.VBox([w.HBox([self.window, self.view, self.info]), self._view])
        self.samples = 0
        self.points = 0
        self._shown = _Shown(int(self.window.value))
        self._build_lock = threading.Lock()

    # -- drawing --------------------------------------------------------------------------
    def _guest_names(self) -> list[str] | None:
        guests = self._guests() if callable(self._guests) else self._guests
        return list(guests) if guests is not None else None

    async def _snapshots(self) -> tuple[_Shown, BufferSnapshot, BufferSnapshot]:
        """On balloonlab's loop: the sampler's rows not yet shown, frozen (nothing is built there)."""
        shown = self._shown
        s0, e0 = shown.next
        return shown, self.sampler.aio.samples_snapshot(s0), self.sampler.aio.events_snapshot(e0)

    def _build(self, shown: _Shown, samples: BufferSnapshot, events: BufferSnapshot) -> _PlotData | None:
        """Grow the shown rows (any thread); None when the window changed since the snapshots."""
        with self._build_lock:
            if shown is not self._shown or (samples.start, events.start) != shown.next:
                return None
            return shown.update(samples, events)

    def refresh(self) -> int:
        """Redraw now with the rows recorded since the last refresh, built on this thread
        (blocks briefly); returns the samples count."""
        data = None
        while data is None:  # a window change between the snapshots and the build: again
            data = self._build(*_loop.run(self._snapshots(), timeout_s=30))
        self._tick()
        self._draw(data)
        return self.samples

    def _tick(self) -> None:
        if self._on_tick is not None:
            self._on_tick()

    def _draw(self, data: _PlotData) -> None:
        with self._lock:
            names = self._guest_names()
            if names is None:
                names = data.guests
            view = str(self.view.value)
            attributed = view == "attribution"
            # The window is fixed when the axes are made: a refresh built for another window
            # (or view) than the figure's makes them again.
            if names != self._names or data.window != self._drawn_window or view != self._drawn_view:
                height = 0.8 + 2.4 * max(1, len(names))  # also when the guests are first known
                if self.figure.get_figheight() != height:
                    self.figure.set_size_inches(10, height)
                plot = plot_attribution if attributed else plot_memory
                plot(data.samples, data.events, guests=names, window=data.window or None, fig=self.figure)
                self._names, self._drawn_window, self._drawn_view = names, data.window, view
                if self.interactive:
                    self.figure.canvas.draw_idle()
            elif attributed:
                update_attribution_plot(self.figure, data.samples, data.events, draw=self.interactive)
            else:
                # Without ipympl, draw_idle would render now and savefig below again: render once.
                update_memory_plot(self.figure, data.samples, data.events, draw=self.interactive)
            if attributed:  # plot_attribution keeps the samples stacked per guest on the figure
                self.points = sum(self.figure._balloonlab_attribution.points.values())  # type: ignore[attr-defined]
            else:  # plot_memory keeps its artists on the figure, untyped (guest -> line name -> Line2D)
                lines = self.figure._balloonlab_lines  # type: ignore[attr-defined]
                self.points = sum(len(lines[g]["total_memory"].get_xdata()) for g in lines)
            self.samples = n = data.n_samples
            when = f" · last sample {data.last:%H:%M:%S} UTC" if data.last is not None else ""
            self.info.value = (f'<span class="bl-points" data-samples="{n}" data-events="{data.n_events}" '
                               f'data-points="{self.points}">{n} samples, {data.n_events} events, '
                               f"{self.points} points shown</span>{when}")
            if not self.interactive:
                buffer = io.BytesIO()
                self.figure.savefig(buffer, format="png", dpi=80)
                self._view.value = buffer.getvalue()

    def _replot_soon(self) -> None:
        self._names = None  # the window is fixed when the axes are made: make them again
        with self._build_lock:
            self._shown = _Shown(int(self.window.value))  # other rows: build them again
        if self.running:
            return  # the timer redraws within refresh_s
        try:
            self.refresh()
        except Exception as exc:
            self._show_error(exc)

    def _switch_view(self) -> None:
        """Draw the other view: the same rows (nothing is built again), new axes."""
        self._names = None
        if not self.running:
            try:
                self.refresh()
            except Exception as exc:
                self._show_error(exc)

    def _show_error(self, exc: BaseException) -> None:
        self.info.value = (f'<span class="bl-plot-error" style="color:#cf222e">plot not updated: '
                           f"{html.escape(f'{type(exc).__name__}: {exc}')}</span>")

    # -- the timer ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the timer runs."""
        return (self._task is not None and not self._task.done()) or (
            self._thread is not None and self._thread.is_alive())

    def start(self) -> LivePlot:
        """Start refreshing (an asyncio task on the caller's running loop, else a thread)."""
        if self.running:
            return self
        self._stop.clear()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and not _loop.in_library_loop():
            self._task_loop = loop
            self._task = loop.create_task(self._run_async(), name="balloonlab-live-plot")
        else:
            self._thread = threading.Thread(target=self._run_thread, name="balloonlab-live-plot", daemon=True)
            self._thread.start()
        return self

    async def _run_async(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                snapshots = await asyncio.wrap_future(_loop.submit(self._snapshots()))
                # Built in a worker thread: the kernel stays free; drawn here, on its thread.
                data = await asyncio.to_thread(self._build, *snapshots)
                if data is None:
                    continue  # the window changed meanwhile: the next tick builds it
                self._tick()
                self._draw(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the timer alive; say why in the plot's line
                self._show_error(exc)

    def _run_thread(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception as exc:
                self._show_error(exc)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop refreshing and wait for the timer to end."""
        self._stop.set()
        task, loop, self._task = self._task, self._task_loop, None
        if task is not None and loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                task.cancel()
            else:
                loop.call_soon_threadsafe(task.cancel)
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def close(self) -> None:
        """Stop the timer and release the figure and widgets."""
        import matplotlib.pyplot as plt
        self.stop()
        plt.close(self.figure)
        for widget in (self.window, self.view, self.info, self._view, self.widget):
            widget.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
