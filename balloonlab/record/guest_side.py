"""The sampler's per-guest state and its view from inside each guest (a mixin of
:class:`~balloonlab.record.sampler.Sampler`, kept apart so each file keeps one job): the guest's
own meminfo beside each report, and the warning for a guest whose balloon never reports.

* **The guest's own view** (``Sampler(guest_view=True)``): after each new report, the guest's
  /proc/meminfo and /proc/vmstat are read through qemu-guest-agent (any guest whose domain has
  its channel, a user's image included) or balloonlab's agent (the built-in guest), into the
  same row as ``guest_*`` columns (:data:`~balloonlab.model.schema.GUEST_VIEW_COLUMNS`), with
  ``guest_view_lag_s``, how long after the report they were read. While the agent is not up (a
  booting guest) the columns are NA and it is asked again after :data:`VIEW_RETRY_S`; the sampling
  itself never waits on it longer than :data:`VIEW_TIMEOUT_S`.
* **Stats that never come**: a guest whose balloon has not reported once within
  ``stats_unset_warning_s`` of sampling (last-update still 0) gets one warning that says so and
  what to check (driver, period, the Windows balloon service), as a Python warning, in
  ``guest.warnings`` and as a ``warning`` event in the run.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from balloonlab.model.errors import AgentError, BalloonLabWarning
from balloonlab.model.guest import LOCAL_HOST
from balloonlab.model.guest_view import GuestView
from balloonlab.model.protocols import GuestProtocol
from balloonlab.model.stats import BalloonStats

#: Seconds a sample waits at most for the guest's own view (a stuck agent costs NA, not a row).
VIEW_TIMEOUT_S = 2.0
#: After the agent did not answer, seconds before the view is asked for again.
VIEW_RETRY_S = 5.0


@dataclass
class GuestSideState:
    """Per guest: when sampling began, whether the unset-stats warning was given, when the
    guest's view may be asked for next."""

    started: float = field(default_factory=time.monotonic)
    warned_unset: bool = False
    view_due: float = 0.0
    #: The agent answered once: views are read in line with the reports from then on.
    view_ok: bool = False
    #: Until then, a read in the background (a booting guest's agent is not waited for).
    probe: asyncio.Task[GuestView | None] | None = None


@dataclass
class SamplingState:
    """How sampling one guest is going.

    ``state``: starting, sampling, dead (the guest or its connection went away), failed (an
    unexpected error in balloonlab or a backend; ``error`` says which), removed.
    """

    name: str
    state: str = "starting"  # starting, sampling, dead, removed
    #: The machine the guest's QEMU runs on (GuestBase.host).
    host: str = LOCAL_HOST
    samples: int = 0
    polls: int = 0
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    unsubscribe: Callable[[], object] | None = field(default=None, repr=False)
    #: When balloonlab last set this guest's target (epoch s): a move may follow.
    target_set_at: float = 0.0
    #: Why the guest's own view (``Sampler(guest_view=True)``) was NA at the last try, if it was.
    view_error: str | None = None
    #: The guest's own view and the unset-stats check (record.guest_side).
    inside: GuestSideState = field(default_factory=GuestSideState, repr=False)


class GuestSide:
    """What :class:`~balloonlab.record.sampler.Sampler` reads from inside each guest."""

    guest_view: bool
    stats_unset_warning_s: float | None

    if TYPE_CHECKING:  # the Sampler's
        def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "",
                         duration_s: float | None = None, at: float | None = None) -> None: ...

    async def _read_view(self, guest: GuestProtocol, state: SamplingState) -> GuestView | None:
        """The guest's own view for the row of a new report, read now (None: NA this time).

        Until the agent has answered once, it is probed in the background instead, so sampling a
        booting guest never waits on an agent that is not up yet."""
        side = state.inside
        if not self.guest_view or time.monotonic() < side.view_due:
            return None
        if not side.view_ok:
            if side.probe is None:
                side.probe = asyncio.get_running_loop().create_task(guest.read_guest_view(),
                                                                     name=f"balloonlab-view-{guest.name}")
                return None
            if not side.probe.done():
                return None
            probe, side.probe = side.probe, None
            failure = probe.exception() if not probe.cancelled() else asyncio.CancelledError()
            if failure is not None:  # not up yet (AgentError), or anything else: ask again later
                side.view_due = time.monotonic() + VIEW_RETRY_S
                state.view_error = str(failure) or type(failure).__name__
                return None
            if probe.result() is None:  # neither agent: never ask again
                side.view_due = float("inf")
                return None
            side.view_ok = True  # then read in line below: the probe's read is older than this report
        try:
            view = await asyncio.wait_for(guest.read_guest_view(), VIEW_TIMEOUT_S)
        except (AgentError, TimeoutError) as exc:
            side.view_due = time.monotonic() + VIEW_RETRY_S
            state.view_error = str(exc) or type(exc).__name__
            return None
        if view is None:  # neither agent: never ask again
            side.view_due = float("inf")
        state.view_error = None
        return view

    async def _check_unset(self, guest: GuestProtocol, state: SamplingState, record: BalloonStats,
                           period: int) -> None:
        """Warn once when the balloon has not reported within ``stats_unset_warning_s``."""
        side = state.inside
        limit = self.stats_unset_warning_s
        if (side.warned_unset or limit is None or record.last_update is not None
                or time.monotonic() - side.started < limit):
            return
        side.warned_unset = True
        if await guest.balloon.status() != "running":
            side.warned_unset = False  # a paused guest cannot report: look again later
            side.started = time.monotonic()
            return
        why = ("its stats period is 0 (disabled): set one (<stats period='2'/>, or balloon.set_period)" if period == 0
               else f"the period is {period} s")
        message = (f"no balloon statistics from {guest.name} after {limit:.0f} s of sampling (last-update is still 0; "
                   f"{why}). The guest's balloon driver is not reporting: in a Linux guest check that "
                   "virtio_balloon is loaded (lsmod | grep virtio_balloon, or /sys/bus/virtio/drivers/virtio_balloon); "
                   "in a Windows guest the Balloon driver alone does not report: install and start the Balloon "
                   "service (blnsvr.exe -i, from virtio-win). Its rows keep NA stats until it does.")
        guest.warnings.append(message)
        warnings.warn(message, BalloonLabWarning, stacklevel=2)
        self.record_event(guest.name, "warning", None, message)
