"""ipywidgets panels over balloonlab: launch guests, move balloons, make memory pressure, watch it live.

Thin views over the library: state and actions live in :mod:`balloonlab.widgets._state`
(one :class:`GuestSlot` per guest), the panels only copy that state into widgets, and every
action runs on balloonlab's loop so the kernel never blocks. :func:`dashboard` composes the
panels for several guests with one shared sampler and a live plot (``%matplotlib widget``).
"""

from balloonlab.widgets._state import GuestSlot, LaunchParams, Message, PatternParams, describe_error
from balloonlab.widgets.balloon_panel import BalloonPanel
from balloonlab.widgets.dashboard import Dashboard, dashboard
from balloonlab.widgets.launcher import LauncherPanel
from balloonlab.widgets.live_plot import LivePlot
from balloonlab.widgets.workload_panel import WorkloadPanel

__all__ = ["BalloonPanel", "Dashboard", "GuestSlot", "LaunchParams", "LauncherPanel", "LivePlot", "Message",
           "PatternParams", "WorkloadPanel", "dashboard", "describe_error"]
