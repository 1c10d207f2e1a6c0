"""ipywidgets panels over balloonlab: launch guests, move balloons, make memory pressure, watch it live.

Thin views over the library: what the panels read lives in :mod:`balloonlab.widgets.panel_state`
and what they do in :mod:`balloonlab.widgets.controller` (one :class:`GuestController` per
guest), the panels only copy that state into widgets, and every action runs on balloonlab's
loop so the kernel never blocks. :func:`dashboard` composes the panels for several guests
with one shared sampler and a live plot (``%matplotlib widget``).
"""

from balloonlab.widgets.balloon_panel import BalloonPanel
from balloonlab.widgets.controller import GuestController
from balloonlab.widgets.dashboard import Dashboard, dashboard
from balloonlab.widgets.launcher import LauncherPanel
from balloonlab.widgets.live_plot import LivePlot
from balloonlab.widgets.panel_state import LaunchParams, Message, PatternParams, describe_error
from balloonlab.widgets.workload_panel import WorkloadPanel

#: Deprecated: the old name of :class:`GuestController`; kept so existing code still imports.
GuestSlot = GuestController

__all__ = ["BalloonPanel", "Dashboard", "GuestController", "GuestSlot", "LaunchParams", "LauncherPanel",
           "LivePlot", "Message", "PatternParams", "WorkloadPanel", "dashboard", "describe_error"]
