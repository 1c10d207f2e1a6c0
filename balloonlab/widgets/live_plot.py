"""A live plot of a running sampler that never blocks the kernel.

The figure is drawn once by :func:`balloonlab.analysis.plotting.plot_memory`; a timer then calls
:func:`balloonlab.analysis.plotting.update_memory_plot` (``set_data`` + ``draw_idle``) with the growing
frames. Inside a notebook kernel the timer is an asyncio task on the kernel's own loop: it
runs between cells, awaits the frames from balloonlab's loop without blocking, and touches
the figure only on the kernel's main thread (matplotlib is not thread-safe, and ipympl
renders on that thread when the browser asks). Outside a kernel (scripts, tests) it is a
daemon thread. With ipympl (``%matplotlib widget``) the canvas itself is the widget;
otherwise the figure is shown as a PNG in an Image widget.
"""

from __future__ import annotations

import asyncio
import html
import io
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets as w
import pandas as pd

from balloonlab.analysis.measures import guest_names
from balloonlab.analysis.plotting import plot_memory, update_memory_plot
from balloonlab.blocking import SyncSampler
from balloonlab.blocking import loop as _loop

log = logging.getLogger(__name__)
#: Window choices: label -> seconds (0 means the whole run).
WINDOWS: list[tuple[str, int]] = [("last minute", 60), ("last 5 minutes", 300), ("last 15 minutes", 900),
                                  ("last hour", 3600), ("all", 0)]


class LivePlot:
    """Memory of the sampled guests, refreshed every ``refresh_s``; ``.widget`` shows it.

    :param sampler: the running sampler to plot.
    :param guests: the guest names to draw (a list, or a callable giving the current list;
        the axes are rebuilt when it changes). Default: the guests in the frames.
    :param refresh_s: seconds between refreshes.
    :param window_s: seconds of the run shown (0 or None: all of it).
    :param on_tick: called (on the same thread as the drawing) at every refresh.
    """

    def __init__(self, sampler: SyncSampler, guests: Sequence[str] | Callable[[], Sequence[str]] | None = None,
                 *, refresh_s: float = 1.0, window_s: float | None = 300,
                 on_tick: Callable[[], None] | None = None) -> None:
        import matplotlib.pyplot as plt
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be a positive number of seconds, got {refresh_s!r}")
        self.sampler = sampler
        self.refresh_s = refresh_s
        self._guests = guests
        self._on_tick = on_tick
        self._names: list[str] | None = None
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
        self.info = w.HTML()
        self.widget = w.VBox([w.HBox([self.window, self.info]), self._view])
        self.samples = 0
        self.points = 0

    # -- drawing --------------------------------------------------------------------------
    def _guest_names(self) -> list[str] | None:
        guests = self._guests() if callable(self._guests) else self._guests
        return list(guests) if guests is not None else None

    async def _frames(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.sampler.aio.frame(), self.sampler.aio.events()

    def refresh(self) -> int:
        """Redraw now with the sampler's frames (blocks briefly); returns the samples count."""
        samples, events = _loop.run(self._frames(), timeout_s=30)
        self._tick()
        self._draw(samples, events)
        return self.samples

    def _tick(self) -> None:
        if self._on_tick is not None:
            self._on_tick()

    def _draw(self, samples: pd.DataFrame, events: pd.DataFrame) -> None:
        with self._lock:
            names = self._guest_names()
            if names is None:
                names = guest_names(samples) + [g for g in guest_names(events) if g not in guest_names(samples)]
            if names != self._names:
                if self._names is not None and len(names) != len(self._names):
                    self.figure.set_size_inches(10, 0.8 + 2.4 * max(1, len(names)))
                plot_memory(samples, events, guests=names, window=self.window.value or None, fig=self.figure)
                self._names = names
                self.figure.canvas.draw_idle()
            else:
                update_memory_plot(self.figure, samples, events)
            # plot_memory keeps its artists on the figure, untyped (guest -> line name -> Line2D)
            lines = self.figure._balloonlab_lines  # type: ignore[attr-defined]
            self.points = sum(len(lines[g]["total_memory"].get_xdata()) for g in lines)
            self.samples = len(samples)
            last = samples.index.max() if len(samples) else None
            when = f" · last sample {last:%H:%M:%S} UTC" if last is not None else ""
            self.info.value = (f'<span class="bl-points" data-samples="{len(samples)}" data-events="{len(events)}" '
                               f'data-points="{self.points}">{len(samples)} samples, {len(events)} events, '
                               f"{self.points} points shown</span>{when}")
            if not self.interactive:
                buffer = io.BytesIO()
                self.figure.savefig(buffer, format="png", dpi=80)
                self._view.value = buffer.getvalue()

    def _replot_soon(self) -> None:
        self._names = None  # the window is fixed when the axes are made: make them again
        if self.running:
            return  # the timer redraws within refresh_s
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
                samples, events = await asyncio.wrap_future(_loop.submit(self._frames()))
                self._tick()
                self._draw(samples, events)
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
        for widget in (self.window, self.info, self._view, self.widget):
            widget.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
