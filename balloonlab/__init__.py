"""balloonlab: study how QEMU guests use memory under a virtio balloon.

The async core (``Guest``, ``Balloon``, ``Monitor``) is re-exported here with the blocking
facade for notebooks and scripts (``SyncGuest``). See README.md for a tour.
"""

from .balloon import Balloon, BalloonChange, SettleResult, validate_period
from .builtin import builtin_spec
from .domain import DomainSpec, MemballoonSpec, load_domain_xml, parse_domain_xml, render_domain_xml
from .errors import (AgentError, BalloonLabError, BalloonLabWarning, BalloonNotFound, CommandError, DomainXMLError,
                     GuestImageError, GuestNameInUse, LaunchError, MonitorError, StatsUnavailable)
from . import accessor as accessor  # registers the df.balloon accessor
from .guest import Guest, list_guests
from .monitor import Monitor, QMPEvent
from .stats import BalloonStats, format_dommemstat, libvirt_view
from .sync import SyncBalloon, SyncGuest, SyncSampler, SyncWorkload, run_experiment
from .units import format_size, parse_size
from .workload import Workload
from .experiment import Experiment, Schedule
from .sampler import Sampler
from .store import Run, load_run

from ._version import __version__ as __version__

__all__ = [
    "AgentError", "Balloon", "BalloonChange", "BalloonLabError", "BalloonLabWarning", "BalloonNotFound",
    "BalloonStats", "CommandError", "DomainSpec", "DomainXMLError", "Guest", "GuestImageError",
    "GuestNameInUse", "LaunchError", "MemballoonSpec", "Monitor", "MonitorError", "QMPEvent",
    "SettleResult", "StatsUnavailable", "SyncBalloon", "SyncGuest", "SyncSampler", "SyncWorkload", "Workload",
    "builtin_spec", "format_dommemstat", "format_size", "libvirt_view", "list_guests",
    "load_domain_xml", "parse_domain_xml", "parse_size", "render_domain_xml", "validate_period",
    "Experiment", "Schedule", "Sampler", "Run", "load_run", "run_experiment", "dashboard",
]


def __getattr__(name: str) -> object:
    # Lazy: `import balloonlab` in an analysis script must not pull in the widget stack.
    if name == "dashboard":
        from .widgets import dashboard
        return dashboard
    raise AttributeError(f"module 'balloonlab' has no attribute {name!r}")
