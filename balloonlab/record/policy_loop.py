"""Running a balloon policy live, beside the sampler, with limits it cannot pass.

Every ``interval_s`` the loop freezes the last ``window_s`` of the host frame and of the guests'
samples (row numbers remembered per tick, so a decision builds only its window, never the whole
run), calls the policy in a worker thread (the sampling loop never waits for it), puts its
answer through :func:`~balloonlab.model.policy.enforce_limits` and sets the targets that moved.

What a run keeps of each decision: a ``policy_tick`` event (guest ``policy``) when the policy is
called, a ``policy`` event per guest the policy named (value = the
target set, detail = JSON with the policy's name, what it proposed, how the limits changed it
and the inputs that decided it), and a ``target`` event where the target moved (the balloon's
own). What goes wrong becomes a ``policy_error`` event and a :class:`PolicyWarning`, and the run
goes on with the last safe targets: a policy that raises, returns something that is not
``{guest: bytes}``, a value that is refused (see :mod:`balloonlab.model.policy`), or that runs
longer than ``timeout_s`` (its late answer is dropped; while it still runs, ticks are skipped, as
a thread cannot be stopped). Events about the policy as a whole (it raised, ran too long) have
the guest ``policy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pandas as pd

from balloonlab.model.errors import BalloonLabError
from balloonlab.model.policy import (
    DEFAULT_FLOOR_FRACTION,
    DEFAULT_MAX_STEP_FRACTION,
    Enforced,
    GuestLimits,
    Policy,
    PolicyView,
    decision_details,
    enforce_limits,
    policy_name,
    split_decision,
)
from balloonlab.model.protocols import GuestProtocol

if TYPE_CHECKING:
    from balloonlab.record.sampler import Sampler

log = logging.getLogger(__name__)
#: The guest named by events about the policy as a whole.
POLICY_GUEST = "policy"


class PolicyWarning(RuntimeWarning):
    """A policy raised, ran too long, or returned a target that was refused."""


class PolicyLoop:
    """One policy deciding the targets of ``guests`` (see the module docstring).

    :param interval_s: time between decisions.
    :param window_s: how much recent history each decision sees.
    :param timeout_s: the longest a decision may take (default: ``interval_s``).
    :param min_guarantee: per guest, overrides the domain's ``<memtune><min_guarantee>`` (libvirt's
        QEMU driver refuses that element, so a libvirt guest's guarantee is given here).
    :param floor_fraction: and ``max_step_fraction``: the limits (:mod:`balloonlab.model.policy`).
    """

    def __init__(self, sampler: Sampler, guests: list[GuestProtocol], policy: Policy, *,
                 interval_s: float = 2.0, window_s: float = 30.0, timeout_s: float | None = None,
                 min_guarantee: Mapping[str, int] | None = None,
                 floor_fraction: float = DEFAULT_FLOOR_FRACTION,
                 max_step_fraction: float = DEFAULT_MAX_STEP_FRACTION) -> None:
        if not callable(policy):
            raise TypeError(f"a policy is a callable taking a PolicyView, got {type(policy).__name__}")
        for value, what in ((interval_s, "interval_s"), (window_s, "window_s")):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        if not 0 < max_step_fraction <= 1 or not 0 <= floor_fraction < 1:
            raise ValueError("max_step_fraction must be in (0, 1] and floor_fraction in [0, 1)")
        if sampler.host_budget is None and not sampler.has_host:
            raise ValueError("a policy reads the host frame: make the Sampler with host_interval_s (the default)")
        self.sampler, self.policy, self.name = sampler, policy, policy_name(policy)
        self.guests = {guest.name: guest for guest in guests}
        self.interval_s, self.window_s = float(interval_s), float(window_s)
        self.timeout_s = float(timeout_s) if timeout_s is not None else float(interval_s)
        self.max_step_fraction = max_step_fraction
        given = dict(min_guarantee or {})
        unknown = sorted(set(given) - set(self.guests))
        if unknown:
            raise ValueError(f"min_guarantee names guests not given to the policy: {', '.join(unknown)}")
        self.limits: dict[str, GuestLimits] = {}
        for name, guest in self.guests.items():
            maximum = guest.balloon.max_bytes
            if maximum is None:
                raise ValueError(f"guest {name}'s memory size is unknown: a policy needs its <memory>")
            spec_guarantee = getattr(getattr(guest, "spec", None), "min_guarantee_bytes", None)
            current = guest.balloon.target or guest.balloon.actual or maximum
            self.limits[name] = GuestLimits.for_guest(name, maximum, given.get(name, spec_guarantee),
                                                      target=current, floor_fraction=floor_fraction)
        self.decisions = 0
        self.errors = 0
        # (time, samples rows, host rows) at each decision; the first: from the rows in memory.
        self._ticks: deque[tuple[float, int, int]] = deque([(-math.inf, 0, 0)])
        self._running: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._task is not None

    def metadata(self) -> dict[str, Any]:
        """What run.json keeps of this policy (replay reads it)."""
        return {"name": self.name, "interval_s": self.interval_s, "window_s": self.window_s,
                "timeout_s": self.timeout_s, "budget": self.sampler.host_budget,
                "max_step_fraction": self.max_step_fraction,
                "limits": {name: {"max_bytes": lim.max_bytes, "min_guarantee": lim.min_guarantee,
                                  "floor_bytes": lim.floor_bytes, "initial_target": lim.target}
                           for name, lim in self.limits.items()}}

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start deciding on the running loop (the first decision one interval from now)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"balloonlab-policy-{self.name}")

    async def stop(self, wait_s: float = 10.0) -> None:
        """Stop deciding. A call still running in its thread is waited for up to ``wait_s``
        (a thread cannot be stopped), its answer unheard."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._running is not None and not self._running.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._running), wait_s)

    async def _run(self) -> None:
        start = time.monotonic()
        n = 0
        while True:
            # The next tick on the grid still ahead: ticks missed during a stall (a slow
            # set_target) are skipped, not fired back to back, so the step limit stays per interval.
            n = max(n + 1, int((time.monotonic() - start) / self.interval_s) + 1)
            await asyncio.sleep(max(0.0, start + n * self.interval_s - time.monotonic()))
            try:
                await self.decide_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not end the run: the error is an event
                log.exception("policy loop %s failed", self.name)
                self._error(POLICY_GUEST, f"the policy loop failed: {type(exc).__name__}: {exc}")

    # -- one decision ---------------------------------------------------------------------
    def view(self, now: float | None = None) -> PolicyView:
        """The policy's view now: the last ``window_s`` of the host frame and samples."""
        now = time.time() if now is None else now
        self._ticks.append((now, *self.sampler.rows_recorded()))
        # The newest tick at or before the window's start says from which rows to build.
        while len(self._ticks) > 1 and self._ticks[1][0] <= now - self.window_s:
            self._ticks.popleft()
        since = self._ticks[0]
        samples = self.sampler.samples_snapshot(since_row=since[1]).frame()
        host = self.sampler.host_snapshot(since_row=since[2]).frame()
        cut = pd.Timestamp(now - self.window_s, unit="s", tz="UTC")
        if len(samples):
            samples = samples[samples.index >= cut]
        if len(host):
            host = host[host.index >= cut]
        # Only guests still running: a dead guest's memory is not the policy's to share any more.
        living = {name: lim for name, lim in self.limits.items() if self.guests[name].alive}
        return PolicyView(pd.Timestamp(now, unit="s", tz="UTC"), host, samples, living, self.sampler.host_budget)

    async def decide_once(self) -> dict[str, int]:
        """One decision now; returns the targets set (empty when nothing moved)."""
        if self._running is not None and not self._running.done():
            self._error(POLICY_GUEST, f"skipped a decision: the last call is still running "
                                      f"(> {self.timeout_s:g} s)", warn=False)
            return {}
        view = self.view()
        # Every call is a tick event, named guests or not: replay calls the policy at these times.
        self.sampler.record_event(POLICY_GUEST, "policy_tick", None, self.name, at=view.now.timestamp())
        self._running = running = self._call_in_thread(view)
        try:
            result = await asyncio.wait_for(asyncio.shield(running), self.timeout_s)
        except TimeoutError:
            self._error(POLICY_GUEST, f"the policy ran longer than {self.timeout_s:g} s: its answer is "
                                      "dropped and the targets stay as they are")
            running.add_done_callback(self._late)
            return {}
        except Exception as exc:
            self._error(POLICY_GUEST, f"{_raised(exc)}; the targets stay as they are")
            return {}
        try:
            proposed, why = split_decision(result)
        except TypeError as exc:
            self._error(POLICY_GUEST, str(exc))
            return {}
        enforced = enforce_limits(proposed, view.limits, max_step_fraction=self.max_step_fraction)
        for name, reason in enforced.refused.items():
            self._error(name if name in self.limits else POLICY_GUEST, f"refused: {reason}; kept the last safe target")
        self.decisions += 1
        return await self._apply(view, proposed, why, enforced)

    async def _apply(self, view: PolicyView, proposed: Mapping[str, Any], why: Mapping[str, Mapping[str, Any]],
                     enforced: Enforced) -> dict[str, int]:
        set_now: dict[str, int] = {}
        for name, detail in decision_details(view, proposed, why, enforced, self.name).items():
            target = enforced.targets[name]
            if not self.guests[name].alive:
                continue  # it died or was shut down: the sampler records how it ended
            if detail["changed"]:
                try:
                    await self.guests[name].balloon.set_target(target)
                except (BalloonLabError, OSError, ValueError) as exc:
                    self._error(name, f"could not set the target {target} B: {exc}")
                    continue
                self.limits[name] = replace(self.limits[name], target=target)
                set_now[name] = target
            self.sampler.record_event(name, "policy", target, json.dumps(detail, default=str),
                                      at=view.now.timestamp())
        return set_now

    def _call_in_thread(self, view: PolicyView) -> asyncio.Future[Any]:
        """The policy called on a daemon thread of its own, its outcome a future of this loop.
        Not the loop's executor: a call that never returns would hold up the interpreter's exit
        (the executor's threads are joined at exit); a daemon thread is left behind."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if not future.done():
                future.set_exception(error) if error is not None else future.set_result(result)

        def call() -> None:
            try:
                result, error = self.policy(view), None
            except BaseException as exc:  # handed to the loop: a policy's bug is an event there
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody to tell
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=call, name=f"balloonlab-policy-{self.name}", daemon=True).start()
        return future

    def _late(self, running: asyncio.Future[Any]) -> None:
        """A call that outran its timeout ended: its answer stays dropped; an exception is still
        recorded (it would otherwise go unread)."""
        if not running.cancelled() and running.exception() is not None:
            self._error(POLICY_GUEST, f"the late call {_raised(running.exception())}", warn=False)

    def _error(self, guest: str, message: str, *, warn: bool = True) -> None:
        self.errors += 1
        self.sampler.record_event(guest, "policy_error", None, f"{self.name}: {message}")
        log.warning("policy %s: %s", self.name, message)
        if warn:
            warnings.warn(f"policy {self.name}: {message}", PolicyWarning, stacklevel=2)


def _raised(exc: BaseException | None) -> str:
    """``the policy raised ZeroDivisionError: ... at file:line``."""
    if exc is None:
        return "the policy raised nothing"
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {where.filename}:{where.lineno}" if where else ""
    return f"the policy raised {type(exc).__name__}: {exc}{at}"
