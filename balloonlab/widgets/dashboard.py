"""The dashboard: launcher, balloon and workload panels for several guests, one live plot.

All guests share one :class:`~balloonlab.blocking.SyncSampler`, so the live plot and the frames
cover them together. The plot's toggle switches between the memory lines and the attribution
view (each guest's bytes stacked by where they are, from the host's side too). Nothing here
blocks the kernel: actions run on balloonlab's loop and the plot refreshes from a timer.
:meth:`Dashboard.close` shuts down every guest a panel launched (they are owned by the kernel
process anyway, so they also die with it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as w
import pandas as pd

from balloonlab.blocking import SyncGuest, SyncSampler
from balloonlab.widgets.balloon_panel import BalloonPanel
from balloonlab.widgets.controller import GuestController
from balloonlab.widgets.launcher import LauncherPanel
from balloonlab.widgets.live_plot import VIEWS, LivePlot
from balloonlab.widgets.panel_state import LaunchParams
from balloonlab.widgets.workload_panel import WorkloadPanel


class Dashboard:
    """Panels for ``n_guests`` guests and a live plot; display it, then :meth:`close` it.

    Build it with :func:`dashboard`. ``slots[i]`` is guest i's
    :class:`~balloonlab.widgets.controller.GuestController`, its state and actions (for
    scripts: ``dash.slots[0].launch()``, ``dash.wait()``); ``launchers``, ``balloons``,
    ``workloads`` are the panels and ``plot`` the live plot.
    """

    def __init__(self, params: Sequence[LaunchParams], *, refresh_s: float = 1.0,
                 window_s: float | None = 300, run_dir: str | os.PathLike[str] | None = None,
                 plot_view: str = "memory") -> None:
        if plot_view not in dict(VIEWS).values():  # before the sampler's thread starts
            raise ValueError(f"plot_view must be one of {[v for _, v in VIEWS]}, got {plot_view!r}")
        self.sampler = SyncSampler(run_dir=Path(run_dir) if run_dir is not None else None).start()
        self.slots = [GuestController(p, self.sampler) for p in params]
        self.launchers = [LauncherPanel(s) for s in self.slots]
        self.balloons = [BalloonPanel(s) for s in self.slots]
        self.workloads = [WorkloadPanel(s) for s in self.slots]
        self.plot = LivePlot(self.sampler, lambda: [s.name for s in self.slots], refresh_s=refresh_s,
                             window_s=window_s, on_tick=self._tick, view=plot_view)
        rows = [w.HBox([launcher.widget, w.VBox([balloon.widget, workload.widget], layout=w.Layout(flex="1 1 auto"))])
                for launcher, balloon, workload in zip(self.launchers, self.balloons, self.workloads, strict=True)]
        self.widget = w.VBox([*rows, self.plot.widget])
        self.closed = False
        self.plot.start()

    def _tick(self) -> None:
        for slot, balloon, workload in zip(self.slots, self.balloons, self.workloads, strict=True):
            slot.poll()
            balloon.refresh()  # actual as the library last saw it, also between events
            workload.refresh()

    @property
    def guests(self) -> list[SyncGuest]:
        """The guests running now."""
        return [g for s in self.slots if (g := s.guest) is not None]

    def wait(self, timeout_s: float = 120.0) -> None:
        """Block until every panel action started so far has finished (for scripts and tests)."""
        for slot in self.slots:
            slot.wait(timeout_s)

    def frame(self) -> pd.DataFrame:
        """The shared sampler's samples so far."""
        return self.sampler.frame()

    def events(self) -> pd.DataFrame:
        """The shared sampler's events so far."""
        return self.sampler.events()

    def close(self) -> None:
        """Stop the plot, shut down every guest the panels launched, stop the sampler."""
        if self.closed:
            return
        self.closed = True
        self.plot.stop()
        errors = []
        for slot in self.slots:
            try:
                slot.close()
            except Exception as exc:  # go on with the other guests
                errors.append(f"{slot.name}: {exc}")
        self.sampler.stop()
        self.plot.close()
        self.widget.close()
        if errors:
            raise RuntimeError("some guests did not shut down cleanly: " + "; ".join(errors))

    def __enter__(self) -> Dashboard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        states = ", ".join(f"{s.name}: {s.status}" for s in self.slots)
        return f"<Dashboard {states}{' closed' if self.closed else ''}>"


def dashboard(n_guests: int = 2, *, names: Sequence[str] | None = None, memory: str = "512M",
              period_s: int = 1, vcpus: int = 1, refresh_s: float = 1.0, window_s: float | None = 300,
              run_dir: str | os.PathLike[str] | None = None, plot_view: str = "memory") -> Dashboard:
    """Panels for several guests with one shared sampler and a live plot.

    Display the returned object (last expression of a cell); for a live ipympl plot run
    ``%matplotlib widget`` first. Each guest starts as the built-in guest with these
    settings; its launcher panel can change them or point at a domain XML.

    :param n_guests: how many guest panels.
    :param names: the guests' names (default ``guest-1`` ...); each must be unique on the host.
    :param memory: the built-in guests' memory (``"512M"``).
    :param period_s: their balloon stats period.
    :param refresh_s: seconds between plot refreshes.
    :param window_s: seconds of the run the plot shows (0 or None: all).
    :param run_dir: also stream the samples to this run folder (see :mod:`balloonlab.record.store`).
    :param plot_view: the live plot's first view, ``"memory"`` or ``"attribution"`` (its toggle
        switches it).
    :raises ValueError: for a bad count or a names list of the wrong length, or an unknown view.
    """
    if type(n_guests) is not int or n_guests < 1:
        raise ValueError(f"n_guests must be an int >= 1, got {n_guests!r}")
    names = list(names) if names is not None else [f"guest-{i + 1}" for i in range(n_guests)]
    if len(names) != n_guests:
        raise ValueError(f"names must give {n_guests} names, got {len(names)}")
    params = [LaunchParams(name=n, memory=memory, period_s=period_s, vcpus=vcpus) for n in names]
    return Dashboard(params, refresh_s=refresh_s, window_s=window_s, run_dir=run_dir, plot_view=plot_view)
