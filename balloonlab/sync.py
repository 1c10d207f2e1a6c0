"""The blocking facade: the async core, callable from a notebook cell or a plain script.

Every call runs on balloonlab's private loop (:mod:`balloonlab._loop`) and blocks the caller
until it finishes, so it works inside Jupyter (whose own loop is already running) as well as
in scripts. The objects mirror the async ones: ``SyncGuest.launch(...)`` is
``await Guest.launch(...)``; ``guest.balloon.set_target("256M")`` is
``await guest.balloon.set_target("256M")``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from . import _loop
from .balloon import Balloon, BalloonChange, SettleResult
from .domain import DomainSpec
from .experiment import Experiment
from .guest import Guest
from .sampler import GuestState, Sampler
from .stats import BalloonStats
from .store import Run
from .workload import Workload


class SyncBalloon:
    """Blocking view of :class:`~balloonlab.balloon.Balloon`."""

    def __init__(self, balloon: Balloon) -> None:
        self.aio = balloon

    @property
    def target(self) -> int | None:
        """The last target set, bytes."""
        return self.aio.target

    @property
    def actual(self) -> int | None:
        """``actual`` as last seen (query or BALLOON_CHANGE), bytes."""
        return self.aio.actual

    @property
    def changes(self) -> list[BalloonChange]:
        """Recent BALLOON_CHANGE events."""
        return list(self.aio.changes)

    def path(self) -> str:
        """The device's QOM path."""
        return _loop.run(self.aio.path())

    def get_period(self) -> int:
        """The live polling period, seconds."""
        return _loop.run(self.aio.get_period())

    def set_period(self, seconds: int) -> None:
        """Set the polling period (0 disables)."""
        _loop.run(self.aio.set_period(seconds))

    def read_stats(self) -> BalloonStats:
        """One read of guest-stats + query-balloon."""
        return _loop.run(self.aio.read_stats())

    def wait_for_stats(self, timeout_s: float = 30.0) -> BalloonStats:
        """Wait until the guest has reported once."""
        return _loop.run(self.aio.wait_for_stats(timeout_s))

    def query_actual(self) -> int:
        """``query-balloon`` actual, bytes."""
        return _loop.run(self.aio.query_actual())

    def set_target(self, size: int | str, *, above_max: Literal["refuse", "clamp"] = "refuse") -> int:
        """Move the balloon target (bytes or ``"256M"``)."""
        return _loop.run(self.aio.set_target(size, above_max=above_max))

    def wait_for_actual(self, target: int | str | None = None, *, timeout_s: float = 60.0,
                        settle_s: float = 5.0) -> SettleResult:
        """Wait until ``actual`` reaches the target or stops moving."""
        return _loop.run(self.aio.wait_for_actual(target, timeout_s=timeout_s, settle_s=settle_s))


class SyncWorkload:
    """Blocking view of :class:`~balloonlab.workload.Workload`."""

    def __init__(self, workload: Workload) -> None:
        self.aio = workload

    @property
    def held(self) -> int:
        """Bytes held in the guest."""
        return self.aio.held

    def alloc(self, size: int | str) -> int:
        """Allocate and touch ``size`` bytes more; returns bytes held."""
        return _loop.run(self.aio.alloc(size))

    def free(self, size: int | str | None = None) -> int:
        """Free ``size`` bytes (all when None); returns bytes held."""
        return _loop.run(self.aio.free(size))

    def hold(self, size: int | str) -> int:
        """Hold exactly ``size`` bytes (to a chunk)."""
        return _loop.run(self.aio.hold(size))

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo highlights, bytes."""
        return _loop.run(self.aio.meminfo())

    def run_pattern(self, pattern: list[tuple[float, int]]) -> None:
        """Follow a ``(seconds, bytes)`` schedule, blocking until it ends."""
        _loop.run(self.aio.run_pattern(pattern))


class SyncGuest:
    """Blocking view of :class:`~balloonlab.guest.Guest`; use it as a context manager."""

    def __init__(self, guest: Guest) -> None:
        self.aio = guest
        self.balloon = SyncBalloon(guest.balloon)

    @classmethod
    def launch(cls, domain: DomainSpec | str | os.PathLike[str], **kwargs: Any) -> SyncGuest:
        """Launch a guest (see :meth:`Guest.launch` for the arguments and errors)."""
        return cls(_loop.run(Guest.launch(domain, **kwargs)))

    @classmethod
    def attach(cls, qmp_socket: str | os.PathLike[str], domain: DomainSpec | str | os.PathLike[str] | None = None,
               **kwargs: Any) -> SyncGuest:
        """Attach to a running QEMU (see :meth:`Guest.attach`)."""
        return cls(_loop.run(Guest.attach(qmp_socket, domain, **kwargs)))

    @classmethod
    def reconnect(cls, name: str) -> SyncGuest:
        """Reconnect to a detached guest (see :meth:`Guest.reconnect`)."""
        return cls(_loop.run(Guest.reconnect(name)))

    name = property(lambda self: self.aio.name, doc="The guest's name.")
    pid = property(lambda self: self.aio.pid, doc="QEMU's pid, when known.")
    spec = property(lambda self: self.aio.spec, doc="The guest's DomainSpec, when known.")
    alive = property(lambda self: self.aio.alive, doc="True while QEMU runs.")
    warnings = property(lambda self: self.aio.warnings, doc="What did not go as the XML asked.")
    detached = property(lambda self: self.aio.detached, doc="True when it outlives this process.")
    period_at_connect = property(lambda self: self.aio.period_at_connect,
                                 doc="The live polling period read at reconnect (never changed there).")

    @property
    def workload(self) -> SyncWorkload:
        """The in-guest workload agent (built-in guest only)."""
        return SyncWorkload(self.aio.workload)

    def status(self) -> str:
        """QEMU's run state."""
        return _loop.run(self.aio.status())

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send any QMP command (``stop``, ``cont``, ``system_reset``...)."""
        return _loop.run(self.aio.monitor.execute(command, arguments))

    def read_stats(self) -> BalloonStats:
        """One read of the balloon statistics."""
        return _loop.run(self.aio.read_stats())

    def libvirt_stats(self) -> dict[str, int]:
        """The numbers as ``virsh dommemstat`` prints them."""
        return _loop.run(self.aio.libvirt_stats())

    def detach(self) -> None:
        """Let the guest outlive this process."""
        _loop.run(self.aio.detach())

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Quit -> wait -> kill; True when it quit by itself."""
        return _loop.run(self.aio.shutdown(timeout_s))

    def close(self) -> None:
        """Shut down an owned guest; just disconnect from others."""
        _loop.run(self.aio.close())

    def __enter__(self) -> SyncGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.aio).replace("<Guest", "<SyncGuest", 1)


class SyncSampler:
    """Blocking view of :class:`~balloonlab.sampler.Sampler`.

    Sampling runs in the background on balloonlab's loop: :meth:`start` returns at once and
    the notebook stays free; :meth:`frame` gives what has been recorded so far.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.aio = _loop.run(_make_sampler(kwargs))

    @property
    def run_dir(self) -> Path | None:
        """The run folder, when streaming to disk."""
        return self.aio.run_dir

    def start(self) -> SyncSampler:
        """Start sampling (returns immediately)."""
        _loop.run(self.aio.start())
        return self

    def add(self, guest: SyncGuest | Guest) -> None:
        """Sample one more guest."""
        _loop.run(self.aio.add(guest.aio if isinstance(guest, SyncGuest) else guest))

    def remove(self, name: str) -> None:
        """Stop sampling one guest (its rows stay)."""
        _loop.run(self.aio.remove(name))

    def stop(self) -> None:
        """Stop sampling, flush, close the run."""
        _loop.run(self.aio.stop())

    def frame(self) -> pd.DataFrame:
        """Samples so far (built on the loop thread, so never half-appended)."""
        return _loop.run(_call(self.aio.frame))

    def events(self) -> pd.DataFrame:
        """Events so far."""
        return _loop.run(_call(self.aio.events))

    def states(self) -> dict[str, GuestState]:
        """Per-guest sampling state."""
        return _loop.run(_call(self.aio.states))

    def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "") -> None:
        """Record an event of your own (e.g. a note) at the current time."""
        _loop.run(_call(lambda: self.aio.record_event(guest, kind, value, detail)))

    def __enter__(self) -> SyncSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_experiment(experiment: Experiment, progress: Any = None) -> Run:
    """Run an :class:`~balloonlab.experiment.Experiment` and block until it is done.

    The blocking twin of ``await experiment.run()``, for scripts and notebook cells.
    """
    return _loop.run(experiment.run(progress))


async def _make_sampler(kwargs: dict[str, Any]) -> Sampler:
    return Sampler(**kwargs)


async def _call(fn: Any) -> Any:
    return fn()
