"""balloonlab: study how QEMU guests use memory under a virtio balloon.

The flat public API. The async core (``Guest``, ``Balloon``, ``Sampler``) and its blocking
twins for notebooks and scripts (``SyncGuest``, ``SyncSampler``) are re-exported here from
the layer packages (see README.md, "Where things live"). The widgets and the libvirt backend
load only when asked for (``bl.dashboard``, ``bl.LibvirtGuest``, ``bl.SyncLibvirtGuest``), so
an analysis script's ``import balloonlab`` needs neither ipywidgets nor libvirt-python;
matplotlib loads with the first plot (``bl.plot_memory``, ``df.balloon.plot()``).
"""

import sys

from balloonlab import analysis as analysis  # registers the df.balloon accessor
from balloonlab._version import __version__ as __version__
from balloonlab.blocking import SyncBalloon, SyncGuest, SyncSampler, SyncWorkload, run_experiment
from balloonlab.domain import DomainSpec, MemballoonSpec, load_domain_xml, parse_domain_xml, render_domain_xml
from balloonlab.experiments import Experiment, Overcommit, Schedule, StressSchedule, replay
from balloonlab.image import Workload, builtin_spec
from balloonlab.model import BalloonBase, BalloonChange, BalloonStats, SettleResult, StatsClassifier, validate_period
from balloonlab.model.errors import (
    AgentError,
    AgentUnavailable,
    GuestAgentError,
    BalloonLabError,
    BalloonLabWarning,
    BalloonNotFound,
    CommandError,
    DomainXMLError,
    GuestImageError,
    GuestNameInUse,
    LaunchError,
    MonitorError,
    StatsUnavailable,
)
from balloonlab.model.policy import Decision, GuestLimits, PolicyView
from balloonlab.model.stats import format_dommemstat, libvirt_view
from balloonlab.model.units import format_size, parse_size
from balloonlab.qemu import Balloon, Guest, Monitor, QMPEvent, attach_many, list_guests
from balloonlab.record import Run, Sampler, SamplingState, load_run, new_run_dir
from balloonlab.record import store as store  # deprecated path, see below
from balloonlab.record.datasets import open_runs

# Deprecated module path, kept for notebooks and scripts written against the flat layout:
# ``balloonlab.store`` (``from balloonlab.store import new_run_dir``, ``bl.store.load_run``)
# is ``balloonlab.record.store``. New code uses the flat names (``bl.new_run_dir``).
sys.modules.setdefault(f"{__name__}.store", store)

__all__ = [
    "AgentError", "AgentUnavailable", "Balloon", "BalloonBase", "BalloonChange", "BalloonLabError", "BalloonLabWarning",
    "Decision", "GuestAgentError",
    "GuestLimits", "Overcommit", "PolicyView", "replay",
    "BalloonNotFound", "BalloonStats", "CommandError", "DomainSpec", "DomainXMLError", "Experiment", "Guest",
    "GuestImageError", "GuestNameInUse", "LaunchError", "LibvirtGuest", "MemballoonSpec", "Monitor",
    "MonitorError", "QMPEvent", "Run", "Sampler", "SamplingState", "Schedule", "SettleResult", "StressSchedule",
    "StatsClassifier", "StatsUnavailable", "SyncBalloon", "SyncGuest", "SyncLibvirtGuest", "SyncSampler",
    "SyncWorkload", "Workload", "builtin_spec", "dashboard", "format_dommemstat", "format_size",
    "attach_many", "libvirt_view", "list_guests", "load_domain_xml", "load_run", "new_run_dir", "parse_domain_xml",
    "open_runs", "parse_size", "plot_memory", "render_domain_xml", "run_experiment", "validate_period",
]


def __getattr__(name: str) -> object:
    # Lazy: `import balloonlab` in an analysis script must not pull in the widget stack or
    # need libvirt-python.
    if name == "dashboard":
        from balloonlab.widgets import dashboard
        return dashboard
    if name == "plot_memory":  # matplotlib takes longer to import than the rest of balloonlab
        from balloonlab.analysis.plotting import plot_memory
        return plot_memory
    if name == "LibvirtGuest":
        from balloonlab.libvirt import LibvirtGuest
        return LibvirtGuest
    if name == "SyncLibvirtGuest":
        from balloonlab.blocking.libvirt import SyncLibvirtGuest
        return SyncLibvirtGuest
    raise AttributeError(f"module 'balloonlab' has no attribute {name!r}")
