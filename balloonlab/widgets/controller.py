"""What the dashboard's panels do: one guest's actions, run on balloonlab's loop.

:class:`GuestController` is the state and actions of one guest's panel set: it extends the
:class:`~balloonlab.widgets.panel_state.GuestPanelState` the panels read with launch,
shutdown, balloon target and period, workload allocate/free and patterns. An action never
blocks its caller: it is a coroutine submitted to balloonlab's loop
(:func:`balloonlab.blocking.loop.submit`) that updates the state *before* its future
completes, so a notebook kernel stays free while a guest boots and a waiter never sees
stale state. A refused action, a result and an error all end as the panel's
:class:`~balloonlab.widgets.panel_state.Message` (errors through
:func:`~balloonlab.widgets.panel_state.describe_error`, never a traceback).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from balloonlab.blocking import SyncSampler
from balloonlab.blocking import loop as _loop
from balloonlab.domain import DomainSpec
from balloonlab.model.units import format_size, parse_size
from balloonlab.qemu.guest import Guest
from balloonlab.widgets.panel_state import GuestPanelState, LaunchParams, Message, PatternParams, describe_error

log = logging.getLogger(__name__)
#: What every action returns: the job's future (its result is the panel's message), or
#: None when the action was refused or its input was bad (the panel's message says why).
ActionFuture: TypeAlias = concurrent.futures.Future[Message] | None


class GuestController(GuestPanelState):
    """The state and actions of one guest's panel set (launcher, balloon and workload).

    :param params: what to launch (the launcher panel edits it).
    :param sampler: a sampler shared by the dashboard: a launched guest is added to it.
    """

    def __init__(self, params: LaunchParams | None = None, sampler: SyncSampler | None = None) -> None:
        super().__init__(params, sampler)
        self._tasks: set[asyncio.Task[object]] = set()
        self._futures: list[concurrent.futures.Future[Message]] = []

    # -- actions (never block; each returns the job's future, or None if refused) ---------
    def launch(self) -> ActionFuture:
        """Launch a guest from :attr:`params` and add it to the sampler."""
        with self._lock:
            if self.status in ("launching", "stopping"):
                self._refuse("launcher", f"{self.name} is {self.status}: wait for it to finish")
                return None
            if self.status == "running" and self._guest is not None and self._guest.alive:
                self._refuse("launcher", f"{self.name} is already running (pid {self._guest.pid}): "
                                         "shut it down first")
                return None
            try:
                spec = self.params.to_spec()
            except Exception as exc:  # bad input: say so, launch nothing
                self._say("launcher", describe_error(exc))
                return None
            self.status = "launching"
            self.messages.pop("balloon", None)
            self.messages.pop("workload", None)
        self._say("launcher", Message(f"launching {self.name}…"))
        return self._submit("launcher", lambda: self._launch(spec), on_cancel="not launched")

    def shutdown(self) -> ActionFuture:
        """Shut the guest down (a launch in progress is cancelled instead)."""
        with self._lock:
            if self.status == "launching":
                for task in list(self._tasks):
                    _loop.get_loop().call_soon_threadsafe(task.cancel)
                self._refuse("launcher", f"cancelling the launch of {self.name}…")
                return None
            if self.status == "stopping":
                self._refuse("launcher", f"{self.name} is already stopping")
                return None
            guest = self._guest
            if guest is None:
                self._refuse("launcher", f"{self.name} is not running: nothing to shut down")
                return None
            self.status = "stopping"
        self._changed()
        return self._submit("launcher", lambda: self._shutdown(guest))

    def set_target(self, size: int | str) -> ActionFuture:
        """Move the balloon target (bytes or ``"256M"``); above the guest's memory is refused."""
        guest = self._running("balloon")
        if guest is None:
            return None

        async def act() -> Message:
            sent = await guest.balloon.set_target(size)
            return Message(f"target {format_size(sent)} sent", "ok")
        return self._submit("balloon", act)

    def set_period(self, seconds: int) -> ActionFuture:
        """Set the stats polling period (0 disables)."""
        guest = self._running("balloon")
        if guest is None:
            return None

        async def act() -> Message:
            await guest.balloon.set_period(seconds)
            return Message(f"stats period set to {seconds} s" + (" (polling off)" if seconds == 0 else ""), "ok")
        return self._submit("balloon", act)

    def alloc(self, size: int | str) -> ActionFuture:
        """Allocate and touch ``size`` more bytes in the guest."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None

        async def act() -> Message:
            held = await guest.workload.alloc(size)
            return Message(f"allocated {format_size(parse_size(size))}; holding {format_size(held)}", "ok")
        return self._submit("workload", act)

    def free(self, size: int | str | None = None) -> ActionFuture:
        """Free ``size`` bytes (everything when None)."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None

        async def act() -> Message:
            held = await guest.workload.free(size)
            return Message(f"freed; holding {format_size(held)}", "ok")
        return self._submit("workload", act)

    def run_pattern(self, pattern: PatternParams) -> ActionFuture:
        """Play a workload pattern in the guest (one at a time; :meth:`stop_pattern` stops it)."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None
        if self.pattern_running:
            self._refuse("workload", "a pattern is already running: stop it first")
            return None
        try:
            schedule = pattern.to_schedule()
        except Exception as exc:
            self._say("workload", describe_error(exc))
            return None

        async def act() -> Message:
            await guest.workload.run_pattern(schedule.points)
            return Message(f"{pattern.kind} pattern done; holding {format_size(guest.workload.held)}", "ok")
        self._say("workload", Message(f"{pattern.kind} pattern: {len(schedule.points)} points over "
                                      f"{schedule.duration_s:.0f} s…"))
        self._pattern = self._submit("workload", act, task_name="pattern")
        return self._pattern

    def stop_pattern(self) -> None:
        """Stop a running pattern (memory held so far stays held); blocks until it stopped."""
        if not self.pattern_running:
            self._refuse("workload", "no pattern is running")
            return

        async def stop() -> None:
            await _cancel_and_wait([t for t in self._tasks if t.get_name() == "pattern"])
        _loop.run(stop(), timeout_s=30)

    def poll(self) -> None:
        """Notice a guest whose QEMU went away by itself (called by the live plot's timer)."""
        with self._lock:
            guest = self._guest
            if self.status != "running" or guest is None or guest.alive:
                return
            self.status = "exited"
        self._say("launcher", Message(f"{self.name}: QEMU exited by itself; Shutdown cleans up, "
                                      "Launch starts it again", "warning"))

    # -- blocking helpers for scripts, tests and notebook cells ---------------------------
    def wait(self, timeout_s: float = 120.0) -> None:
        """Wait until every action started so far has finished (errors stay in messages).

        :param timeout_s: the longest to wait for all of them together.
        """
        deadline = time.monotonic() + timeout_s
        for future in list(self._futures):
            with contextlib.suppress(Exception, concurrent.futures.CancelledError):
                future.result(max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float = 60.0) -> None:
        """Cancel running actions and shut the guest down; blocks until done.

        :param timeout_s: give up waiting after this long.
        :raises TimeoutError: when ``timeout_s`` passes first.
        """
        _loop.run(self._close(), timeout_s)

    # -- the jobs, on balloonlab's loop ---------------------------------------------------
    async def _launch(self, spec: DomainSpec) -> Message:
        old = self._guest
        if old is not None:  # a guest that exited by itself: clean its runtime dir first
            await old.shutdown()
        started = time.monotonic()
        guest = await Guest.launch(spec, name=self.name)
        try:
            took = time.monotonic() - started
            guest.balloon.add_listener(lambda _change: self._changed())
            if guest.spec is not None and guest.spec.memballoon is not None:
                if guest.balloon.actual is None:
                    await guest.balloon.query_actual()
                if guest.balloon.period_s is None:
                    await guest.balloon.get_period()
            if guest.has_agent:
                guest.workload.add_listener(lambda _change: self._changed())
            if self.sampler is not None:
                await self.sampler.aio.add(guest)
                self.sampler.aio.record_event(guest.name, "launch", None, f"launched in {took:.2f} s", took)
        except BaseException:
            await guest.shutdown()
            raise
        with self._lock:
            self._guest = guest
            self.status = "running"
        notes = "; ".join(guest.warnings)
        memory = format_size(guest.spec.memory_bytes if guest.spec else None)
        return Message(f"{guest.name} running: pid {guest.pid}, {memory}, up in {took:.1f} s"
                       + (f" (warning: {notes})" if notes else ""), "warning" if notes else "ok")

    async def _shutdown(self, guest: Guest) -> Message:
        was_alive = guest.alive
        if self.sampler is not None:
            await _stop_sampling(self.sampler, guest.name)
        try:
            graceful = await guest.shutdown()
        finally:
            with self._lock:
                self._guest = None
                self.status = "stopped"
        if self.sampler is not None:
            self.sampler.aio.record_event(guest.name, "shutdown", None, "quit" if graceful else "killed")
        if not was_alive:
            return Message(f"{guest.name} had already exited; cleaned up", "warning")
        return Message(f"{guest.name} shut down ({'quit' if graceful else 'killed after the quit timeout'})", "ok")

    async def _close(self) -> None:
        current = asyncio.current_task()
        await _cancel_and_wait([t for t in self._tasks if t is not current])
        guest = self._guest
        if guest is not None:
            await self._shutdown(guest)
            self._say("launcher", Message(f"{guest.name} shut down (dashboard closed)", "ok"))

    # -- guards and submission --------------------------------------------------------------
    def _running(self, channel: str, *, agent: bool = False) -> Guest | None:
        guest = self._guest
        if guest is None or self.status != "running":
            self._refuse(channel, f"{self.name} is {self.status}: launch it first")
            return None
        if not guest.alive:
            self.poll()
            self._refuse(channel, f"{self.name} is not running any more (QEMU exited)")
            return None
        if agent and not guest.has_agent:
            self._refuse(channel, f"{self.name} has no workload agent (the built-in guest has one; so does a domain "
                                  "with a qemu-guest-agent <channel>)")
            return None
        return guest

    def _submit(self, channel: str, action: Callable[[], Awaitable[Message]], *,
                on_cancel: str | None = None, task_name: str = "action") -> concurrent.futures.Future[Message]:
        async def job() -> Message:
            task = asyncio.current_task()
            assert task is not None
            task.set_name(task_name)
            self._tasks.add(task)
            try:
                message = await action()
            except asyncio.CancelledError:
                with self._lock:
                    if on_cancel is not None:
                        self.status = on_cancel
                self._say(channel, Message("cancelled", "warning"))
                raise
            except Exception as exc:
                with self._lock:
                    if self.status == "launching":
                        self.status = "failed"
                self._say(channel, describe_error(exc))
                raise
            finally:
                self._tasks.discard(task)
            self._say(channel, message)
            return message
        future = _loop.submit(job())
        self._futures = [f for f in self._futures if not f.done()] + [future]
        return future

    def _refuse(self, channel: str, text: str) -> None:
        self._say(channel, Message(text, "warning"))


async def _cancel_and_wait(tasks: list[asyncio.Task[object]]) -> None:
    """Cancel tasks and wait until they really ended (a cancelled launch kills its QEMU)."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def _stop_sampling(sampler: SyncSampler, name: str) -> None:
    """Stop sampling one guest, if it is being sampled."""
    if name in sampler.aio.states():
        await sampler.aio.remove(name)
