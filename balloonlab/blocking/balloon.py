"""Blocking twins of a guest's balloon and of the workload agent.

Each method runs its async original on balloonlab's private loop (:mod:`balloonlab.blocking.loop`)
with the same parameters and defaults; ``tests/test_blocking.py`` fails when one drifts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from balloonlab.blocking.loop import run
from balloonlab.model.balloon import TARGET_TOLERANCE, BalloonChange, Method, SettleResult
from balloonlab.model.classify import StatsClassifier
from balloonlab.model.errors import AgentError
from balloonlab.model.protocols import AgentProtocol, BalloonProtocol
from balloonlab.model.qga_workload import ExecResult
from balloonlab.model.stats import BalloonStats


class SyncBalloon:
    """Blocking view of a balloon (:class:`~balloonlab.qemu.balloon.Balloon` or ``LibvirtBalloon``)."""

    def __init__(self, balloon: BalloonProtocol) -> None:
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
    def period_s(self) -> int | None:
        """The polling period as last read or set, seconds."""
        return self.aio.period_s

    @property
    def max_bytes(self) -> int | None:
        """The guest's memory size, the highest target."""
        return self.aio.max_bytes

    @property
    def changes(self) -> list[BalloonChange]:
        """Recent BALLOON_CHANGE events."""
        return list(getattr(self.aio, "changes", ()))

    def path(self, method: Method = "auto") -> str:
        """The device's QOM path."""
        return run(self.aio.path(method))

    def get_period(self) -> int:
        """The live polling period, seconds."""
        return run(self.aio.get_period())

    def set_period(self, seconds: int) -> None:
        """Set the polling period (0 disables)."""
        run(self.aio.set_period(seconds))

    def query_actual(self) -> int:
        """Ask for ``actual`` now, bytes."""
        return run(self.aio.query_actual())

    def read_report(self, *, query_actual: bool = True) -> BalloonStats:
        """The guest's last report, unclassified (a pure read)."""
        return run(self.aio.read_report(query_actual=query_actual))

    def read_stats(self, *, query_actual: bool = True, classifier: StatsClassifier | None = None) -> BalloonStats:
        """One read, classified for this reader (``new``/``reset``)."""
        return run(self.aio.read_stats(query_actual=query_actual, classifier=classifier))

    def wait_for_stats(self, timeout_s: float = 30.0, *, poll_s: float = 0.2) -> BalloonStats:
        """Wait until the guest has reported once."""
        return run(self.aio.wait_for_stats(timeout_s, poll_s=poll_s))

    def set_target(self, size: int | str, *, above_max: Literal["refuse", "clamp"] = "refuse") -> int:
        """Move the balloon target (bytes or ``"256M"``)."""
        return run(self.aio.set_target(size, above_max=above_max))

    def wait_for_actual(self, target: int | str | None = None, *, timeout_s: float = 60.0,
                        settle_s: float = 5.0, tolerance: int = TARGET_TOLERANCE) -> SettleResult:
        """Wait until ``actual`` reaches the target or stops moving."""
        return run(self.aio.wait_for_actual(target, timeout_s=timeout_s, settle_s=settle_s, tolerance=tolerance))

    def status(self) -> str:
        """QEMU's run state."""
        return run(self.aio.status())

    def add_listener(self, listener: Callable[[BalloonChange], None]) -> None:
        """Call ``listener(change)`` on every BALLOON_CHANGE (on balloonlab's loop thread)."""
        self.aio.add_listener(listener)

    def remove_listener(self, listener: Callable[[BalloonChange], None]) -> None:
        """Stop calling ``listener``."""
        self.aio.remove_listener(listener)


class SyncWorkload:
    """Blocking view of the workload agent (:class:`~balloonlab.image.agent.Workload`)."""

    def __init__(self, workload: AgentProtocol) -> None:
        self.aio = workload

    @property
    def held(self) -> int:
        """Bytes held in the guest."""
        return self.aio.held

    def connect(self, timeout_s: float = 60.0) -> None:
        """Connect to the agent (a guest's launch does this already)."""
        run(self.aio.connect(timeout_s))

    def close(self) -> None:
        """Close the connection to the agent (the guest keeps running)."""
        run(self.aio.close())

    def ping(self) -> None:
        """Check that the agent answers."""
        run(self.aio.ping())

    def sync(self) -> bool:
        """Reconcile with the guest's list of held chunks (True when they agreed)."""
        return run(self.aio.sync())

    def reboot(self) -> None:
        """Reboot the guest from inside (not QMP ``system_reset``)."""
        run(self.aio.reboot())

    def churn(self, on: bool = True) -> None:
        """Start (or stop) a steady stream of page faults in the guest."""
        run(self.aio.churn(on))

    def alloc(self, size: int | str) -> int:
        """Allocate and touch ``size`` bytes more; returns bytes held."""
        return run(self.aio.alloc(size))

    def free(self, size: int | str | None = None) -> int:
        """Free ``size`` bytes (all when None); returns bytes held."""
        return run(self.aio.free(size))

    def hold(self, size: int | str) -> int:
        """Hold exactly ``size`` bytes (to a chunk)."""
        return run(self.aio.hold(size))

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo highlights, bytes."""
        return run(self.aio.meminfo())

    def run_pattern(self, pattern: Iterable[tuple[float, int]]) -> None:
        """Follow a ``(seconds, bytes)`` schedule, blocking until it ends."""
        run(self.aio.run_pattern(pattern))

    def page_cache(self, size: int | str, *, reads: int = 1) -> list[float]:
        """Write ``size`` bytes to the scratch disk through the guest's page cache, then read
        them ``reads`` times; returns the durations (s): the write, then each read."""
        return run(self.aio.page_cache(size, reads=reads))

    def exec(self, argv: Sequence[str], *, timeout_s: float = 120.0) -> ExecResult:
        """Run a program in the guest and wait for its end (qemu-guest-agent guests only:
        :meth:`~balloonlab.model.qga_workload.QgaWorkload.exec`).

        :raises AgentError: the guest's workload runs on balloonlab's built-in agent.
        """
        result: ExecResult = run(self._qga("exec", "programs run through qemu-guest-agent")(argv, timeout_s=timeout_s))
        return result

    def _qga(self, method: str, what: str) -> Any:
        found = getattr(self.aio, method, None)
        if found is None:
            raise AgentError(f"{what} (a Debian guest: balloonlab guest build --distro debian); the built-in guest's "
                             "agent has no such verb")
        return found

    def stress(self, args: str | Sequence[str], *, seconds: float) -> ExecResult:
        """Run Debian's stress-ng in the guest for ``seconds`` (qemu-guest-agent guests only:
        :meth:`~balloonlab.model.qga_workload.QgaWorkload.stress`).

        :raises AgentError: the guest's workload runs on balloonlab's built-in agent (no stress-ng).
        """
        result: ExecResult = run(self._qga("stress", "stress-ng runs through qemu-guest-agent")(args, seconds=seconds))
        return result

    def working_set(self, size: int | str, *, passes: int = 1, pause_s: float = 0.0) -> list[float]:
        """Re-touch a fixed working set of ``size`` bytes (allocated by the first call)
        ``passes`` times, ``pause_s`` apart; returns each pass's duration (s)."""
        return run(self.aio.working_set(size, passes=passes, pause_s=pause_s))
