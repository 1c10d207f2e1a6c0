"""What the dashboard's panels show and do, kept apart from the widgets themselves.

As in mpl-interactions, parameters and live state live in small plain classes:
:class:`LaunchParams` (what to launch), :class:`PatternParams` (a workload pattern) and
:class:`GuestSlot` (one guest: its handle, status and last message per panel, and the
actions). An action never blocks its caller: it is a coroutine submitted to balloonlab's
loop (``_loop.submit``) that updates the slot *before* its future completes, so a notebook
kernel stays free while a guest boots and a waiter never sees stale state. Errors become
one-line messages (:func:`describe_error`), never tracebacks. Panels observe a slot and only
copy its state into widgets; the numbers (actual, target, held) are read from the library's
own objects, not copied.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from balloonlab.blocking import SyncGuest, SyncSampler
from balloonlab.blocking import loop as _loop
from balloonlab.domain import DiskSpec, DomainSpec, load_domain_xml, with_changes
from balloonlab.experiments.runner import Schedule
from balloonlab.image.builtin import builtin_spec
from balloonlab.model.errors import BalloonLabError, DomainXMLError, LaunchError
from balloonlab.model.units import format_size, parse_size
from balloonlab.qemu.guest import Guest

log = logging.getLogger(__name__)
Level = Literal["info", "ok", "warning", "error"]
#: Panels of a slot; each shows its own last message.
CHANNELS = ("launcher", "balloon", "workload")


@dataclass(frozen=True)
class Message:
    """One line for a panel's status, plus optional details (e.g. QEMU's output tail)."""

    text: str
    level: Level = "info"
    details: str = ""


def describe_error(exc: BaseException) -> Message:
    """A one-line message for an error from the library (no traceback)."""
    if isinstance(exc, LaunchError):
        text = exc.message + (f" (QEMU exit code {exc.exitcode})" if exc.exitcode is not None else "")
        return Message(text, "error", exc.output.strip())
    if isinstance(exc, DomainXMLError):
        return Message(f"invalid domain XML: {exc}", "error")
    if isinstance(exc, (BalloonLabError, ValueError, TypeError, OSError)):
        text = str(exc).strip() or type(exc).__name__
        first, _, rest = text.partition("\n")
        return Message(first, "error", rest.strip())
    log.debug("unexpected error in a dashboard action", exc_info=exc)
    return Message(f"{type(exc).__name__}: {exc}", "error")


@dataclass
class LaunchParams:
    """What the launcher panel would launch.

    :param source: ``"builtin"`` (balloonlab's test guest, built from the fields below) or
        ``"xml"`` (a libvirt domain XML file; its memory, vCPUs and balloon options apply).
    :param image_path: with ``"xml"``: a disk image replacing the XML's first disk.
    """

    name: str = "guest-1"
    source: Literal["builtin", "xml"] = "builtin"
    xml_path: str = ""
    image_path: str = ""
    memory: str = "512M"
    vcpus: int = 1
    period_s: int = 1
    autodeflate: bool = False
    free_page_reporting: bool = False

    def to_spec(self) -> DomainSpec:
        """The domain to launch.

        :raises ValueError, TypeError: a bad field (the message says which).
        :raises DomainXMLError: the XML file is not a valid domain.
        :raises GuestImageError: the built-in image is not built yet.
        """
        if self.source == "builtin":
            return builtin_spec(self.name, memory=self.memory, vcpus=self.vcpus, period_s=self.period_s,
                                autodeflate=self.autodeflate or None,
                                free_page_reporting=self.free_page_reporting or None)
        if self.source != "xml":
            raise ValueError(f"source must be 'builtin' or 'xml', got {self.source!r}")
        if not self.xml_path.strip():
            raise ValueError("give the path of a libvirt domain XML file")
        path = Path(self.xml_path.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"domain XML file {path} does not exist")
        spec = load_domain_xml(path)
        image = self.image_path.strip()
        if image:
            if not Path(image).expanduser().is_file():
                raise ValueError(f"disk image {image} does not exist")
            fmt = "qcow2" if image.endswith(".qcow2") else "raw"
            first = (dataclasses.replace(spec.disks[0], source=image, format=fmt) if spec.disks
                     else DiskSpec(source=image, format=fmt, bus="virtio", target="vda"))
            spec = with_changes(spec, disks=(first, *spec.disks[1:]))
        return spec


@dataclass
class PatternParams:
    """A workload pattern for the workload panel (see :meth:`to_schedule`)."""

    kind: Literal["steps", "ramp", "sawtooth"] = "steps"
    low: str = "0"
    high: str = "192M"
    step_s: float = 3.0
    n_steps: int = 3
    cycles: int = 2

    def to_schedule(self) -> Schedule:
        """The workload :class:`~balloonlab.experiments.runner.Schedule`.

        ``steps``: ``low`` up to ``high`` and back down in ``n_steps``, one every ``step_s``;
        ``ramp``: ``low`` to ``high`` in ``n_steps`` over ``n_steps * step_s``;
        ``sawtooth``: ``cycles`` ramps of ``n_steps`` steps, each ``(n_steps + 1) * step_s``.

        :raises ValueError: a bad size, count or duration.
        """
        low, high = parse_size(self.low), parse_size(self.high)
        if type(self.n_steps) is not int or self.n_steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.n_steps!r}")
        if self.kind == "steps":
            up = [low + (high - low) * i // self.n_steps for i in range(self.n_steps + 1)]
            return Schedule.steps(up + up[-2::-1], self.step_s, kind="workload")
        if self.kind == "ramp":
            return Schedule.ramp(low, high, self.step_s * self.n_steps, n_steps=self.n_steps, kind="workload")
        if self.kind == "sawtooth":
            if type(self.cycles) is not int or self.cycles < 1:
                raise ValueError(f"cycles must be an int >= 1, got {self.cycles!r}")
            return Schedule.sawtooth(low, high, self.step_s * (self.n_steps + 1), self.cycles,
                                     n_steps=self.n_steps, kind="workload")
        raise ValueError(f"pattern must be steps, ramp or sawtooth, got {self.kind!r}")


class GuestSlot:
    """One guest of a dashboard: launch parameters, the guest once up, status and messages.

    :param params: what to launch (the launcher panel edits it).
    :param sampler: a sampler shared by the dashboard: a launched guest is added to it.

    Status: ``not launched``, ``launching``, ``running``, ``stopping``, ``stopped``,
    ``failed`` (launch failed), ``exited`` (QEMU went away by itself).
    """

    def __init__(self, params: LaunchParams | None = None, sampler: SyncSampler | None = None) -> None:
        self.params = params or LaunchParams()
        self.sampler = sampler
        self.status = "not launched"
        self.messages: dict[str, Message] = {}
        self._guest: Guest | None = None
        self._lock = threading.RLock()
        self._observers: list[Callable[[GuestSlot], None]] = []
        self._tasks: set[asyncio.Task[object]] = set()
        self._futures: list[concurrent.futures.Future[object]] = []
        self._pattern: concurrent.futures.Future[object] | None = None

    # -- what panels read -----------------------------------------------------------------
    @property
    def name(self) -> str:
        """The guest's name (its runtime dir and its row in the frames)."""
        return self.params.name

    @property
    def guest(self) -> SyncGuest | None:
        """The running guest as a blocking handle, None before launch / after shutdown."""
        guest = self._guest
        return SyncGuest(guest) if guest is not None and self.status == "running" else None

    @property
    def memory_bytes(self) -> int | None:
        """The guest's memory (``<memory>``), the highest balloon target."""
        guest = self._guest
        return guest.spec.memory_bytes if guest is not None and guest.spec is not None else None

    @property
    def actual(self) -> int | None:
        """The balloon's ``actual`` as the library last saw it (query or BALLOON_CHANGE)."""
        return self._guest.balloon.actual if self._guest is not None else None

    @property
    def target(self) -> int | None:
        """The last balloon target set (None until one was)."""
        return self._guest.balloon.target if self._guest is not None else None

    @property
    def period_s(self) -> int | None:
        """The stats polling period as last read or set."""
        return self._guest.balloon.period_s if self._guest is not None else None

    @property
    def held(self) -> int | None:
        """Bytes the in-guest workload agent holds (None without an agent)."""
        guest = self._guest
        return guest.workload.held if guest is not None and guest.has_agent else None

    @property
    def pattern_running(self) -> bool:
        """True while a workload pattern plays."""
        return self._pattern is not None and not self._pattern.done()

    def message(self, channel: str) -> Message | None:
        """The last message for one panel (``launcher``, ``balloon``, ``workload``)."""
        return self.messages.get(channel)

    def observe(self, callback: Callable[[GuestSlot], None]) -> None:
        """Call ``callback(slot)`` after any change (from whichever thread made it)."""
        self._observers.append(callback)

    # -- actions (never block; each returns the job's future, or None if refused) ---------
    def launch(self) -> concurrent.futures.Future[object] | None:
        """Launch a guest from :attr:`params` and add it to the sampler."""
        with self._lock:
            if self.status in ("launching", "stopping"):
                return self._refuse("launcher", f"{self.name} is {self.status}: wait for it to finish")
            if self.status == "running" and self._guest is not None and self._guest.alive:
                return self._refuse("launcher", f"{self.name} is already running (pid {self._guest.pid}): "
                                                "shut it down first")
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

    def shutdown(self) -> concurrent.futures.Future[object] | None:
        """Shut the guest down (a launch in progress is cancelled instead)."""
        with self._lock:
            if self.status == "launching":
                for task in list(self._tasks):
                    _loop.get_loop().call_soon_threadsafe(task.cancel)
                return self._refuse("launcher", f"cancelling the launch of {self.name}…")
            if self.status == "stopping":
                return self._refuse("launcher", f"{self.name} is already stopping")
            guest = self._guest
            if guest is None:
                return self._refuse("launcher", f"{self.name} is not running: nothing to shut down")
            self.status = "stopping"
        self._changed()
        return self._submit("launcher", lambda: self._shutdown(guest))

    def set_target(self, size: int | str) -> concurrent.futures.Future[object] | None:
        """Move the balloon target (bytes or ``"256M"``); above the guest's memory is refused."""
        guest = self._running("balloon")
        if guest is None:
            return None

        async def act() -> Message:
            sent = await guest.balloon.set_target(size)
            return Message(f"target {format_size(sent)} sent", "ok")
        return self._submit("balloon", act)

    def set_period(self, seconds: int) -> concurrent.futures.Future[object] | None:
        """Set the stats polling period (0 disables)."""
        guest = self._running("balloon")
        if guest is None:
            return None

        async def act() -> Message:
            await guest.balloon.set_period(seconds)
            return Message(f"stats period set to {seconds} s" + (" (polling off)" if seconds == 0 else ""), "ok")
        return self._submit("balloon", act)

    def alloc(self, size: int | str) -> concurrent.futures.Future[object] | None:
        """Allocate and touch ``size`` more bytes in the guest."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None

        async def act() -> Message:
            held = await guest.workload.alloc(size)
            return Message(f"allocated {format_size(parse_size(size))}; holding {format_size(held)}", "ok")
        return self._submit("workload", act)

    def free(self, size: int | str | None = None) -> concurrent.futures.Future[object] | None:
        """Free ``size`` bytes (everything when None)."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None

        async def act() -> Message:
            held = await guest.workload.free(size)
            return Message(f"freed; holding {format_size(held)}", "ok")
        return self._submit("workload", act)

    def run_pattern(self, pattern: PatternParams) -> concurrent.futures.Future[object] | None:
        """Play a workload pattern in the guest (one at a time; :meth:`stop_pattern` stops it)."""
        guest = self._running("workload", agent=True)
        if guest is None:
            return None
        if self.pattern_running:
            return self._refuse("workload", "a pattern is already running: stop it first")
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
        """Wait until every action started so far has finished (errors stay in messages)."""
        deadline = time.monotonic() + timeout_s
        for future in list(self._futures):
            with contextlib.suppress(Exception, concurrent.futures.CancelledError):
                future.result(max(0.0, deadline - time.monotonic()))

    def close(self, timeout_s: float = 60.0) -> None:
        """Cancel running actions and shut the guest down; blocks until done."""
        _loop.run(self._close(), timeout_s)

    # -- internals ------------------------------------------------------------------------
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
            self._refuse(channel, f"{self.name} has no workload agent (only the built-in guest has one)")
            return None
        return guest

    def _submit(self, channel: str, action: Callable[[], Awaitable[Message]], *,
                on_cancel: str | None = None, task_name: str = "action") -> concurrent.futures.Future[object]:
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
        future: concurrent.futures.Future[object] = _loop.submit(job())
        self._futures = [f for f in self._futures if not f.done()] + [future]
        return future

    def _refuse(self, channel: str, text: str) -> None:
        self._say(channel, Message(text, "warning"))

    def _say(self, channel: str, message: Message) -> None:
        self.messages[channel] = message
        self._changed()

    def _changed(self) -> None:
        for callback in list(self._observers):
            try:
                callback(self)
            except Exception:  # a broken view must not break the guest's actions
                log.exception("dashboard view update failed")


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
