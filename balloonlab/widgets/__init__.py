"""ipywidgets panels over balloonlab: launch guests, move balloons, make memory pressure, watch it live.

Thin views over the library: state and actions live in :mod:`balloonlab.widgets._state`
(one :class:`GuestSlot` per guest), the panels only copy that state into widgets, and every
action runs on balloonlab's loop so the kernel never blocks. :func:`dashboard` composes the
panels for several guests with one shared sampler and a live plot (``%matplotlib widget``).
"""

from ._state import GuestSlot, LaunchParams, Message, PatternParams, describe_error
from .balloon_panel import BalloonPanel
from .dashboard import Dashboard, dashboard
from .launcher import LauncherPanel
from .live_plot import LivePlot
from .workload_panel import WorkloadPanel

__all__ = ["BalloonPanel", "Dashboard", "GuestSlot", "LaunchParams", "LauncherPanel", "LivePlot", "Message",
           "PatternParams", "WorkloadPanel", "dashboard", "describe_error"]
