"""Analysis: pure functions over recorded frames, the ``df.balloon`` accessor, plots.

``measures`` holds the analyses (step responses, held vs available memory, re-touch cost,
summaries), each a pure function of the samples and events frames; ``accessor`` registers
``DataFrame.balloon`` (libvirt's view, the peers' "used memory" side by side, counter
rates, pressure, plotting); ``pressure`` classifies memory pressure per guest and window
from Linux 6.12's reclaim counters (``classify_pressure``, ``PressureThresholds``);
``plotting`` draws memory over time with matplotlib, afterwards or live, and
``pressure_plot`` the pressure regimes (both load matplotlib only when imported).
Nothing here talks to a guest: it reads frames from :mod:`balloonlab.record` or any Parquet
run folder.
"""

from balloonlab.analysis import accessor as accessor  # registers the df.balloon accessor
from balloonlab.analysis.measures import memory_held_vs_available, retouch_cost, step_response, summary
from balloonlab.analysis.pressure import REGIMES, PressureThresholds, classify_pressure

__all__ = ["REGIMES", "PressureThresholds", "classify_pressure", "memory_held_vs_available", "retouch_cost",
           "step_response", "summary"]
