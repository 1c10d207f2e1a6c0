"""Experiments: what happens when, run against guests while they are sampled.

``schedule`` declares balloon-target and workload schedules, validated before any guest
starts; ``runner`` launches or takes guests, samples them into a run folder, plays the
schedules and returns the :class:`~balloonlab.record.store.Run`; ``period_study`` runs one
guest per stats period under the same bursts and holds their reports against each guest's
own ground truth; ``pressure_drive`` plays idle, pressure and OOM phases on one guest, aligned
to the memory-pressure classifier's windows. Mechanism comparisons and policies (live and
replayed on recorded runs) are sibling modules: ``compare``, ``overcommit`` (a policy live over
guests under a host budget), ``replay`` (policies tried offline on a recorded run, scored).
"""

from balloonlab.experiments.period_study import Burst, PeriodStudy, PeriodStudyResult, plan_bursts
from balloonlab.experiments.pressure_drive import DEFAULT_PHASES, Phase, PressureRun, drive_pressure
from balloonlab.experiments.overcommit import Overcommit
from balloonlab.experiments.replay import ReplayResult, compare_decisions, replay
from balloonlab.experiments.runner import Experiment
from balloonlab.experiments.schedule import Schedule, StressSchedule

__all__ = ["DEFAULT_PHASES", "Burst", "Experiment", "Overcommit", "PeriodStudy", "PeriodStudyResult", "Phase",
           "PressureRun", "ReplayResult", "Schedule", "StressSchedule", "compare_decisions", "drive_pressure",
           "plan_bursts", "replay"]
