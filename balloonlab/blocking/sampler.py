"""Blocking twins of the :class:`~balloonlab.record.sampler.Sampler` and the experiment runner.

Sampling runs in the background on balloonlab's loop: :meth:`SyncSampler.start` returns at
once and the notebook stays free. Guests handed to a ``SyncSampler`` must live on that loop
too: ``SyncGuest``/``SyncLibvirtGuest`` (or their ``.aio``); an async guest awaited on your own
loop is refused with a ``TypeError`` that says what to pass instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from balloonlab.blocking.loop import run
from balloonlab.experiments.runner import Experiment
from balloonlab.experiments.overcommit import Overcommit
from balloonlab.model.clock import ClockEstimate
from balloonlab.model.policy import Policy
from balloonlab.record.metrics import MetricsEndpoint, serve_metrics
from balloonlab.record.policy_loop import PolicyLoop
from balloonlab.record.guest_side import SamplingState
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import Run


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class SyncSampler:
    """Blocking view of :class:`~balloonlab.record.sampler.Sampler` (same parameters)."""

    def __init__(self, *, run_dir: str | Path | None = None, flush_interval_s: float = 5.0,
                 max_rows_in_memory: int = 1_000_000, track_actual: str = "events",
                 period_check_every: int = 100, metadata: dict[str, Any] | None = None,
                 host_interval_s: float | None = 1.0, host_budget: int | None = None,
                 guest_view: bool = False, stats_unset_warning_s: float | None = 60.0) -> None:
        async def make() -> Sampler:  # built on the loop it samples on
            return Sampler(run_dir=run_dir, flush_interval_s=flush_interval_s,
                           max_rows_in_memory=max_rows_in_memory, track_actual=track_actual,
                           period_check_every=period_check_every, metadata=metadata,
                           host_interval_s=host_interval_s, host_budget=host_budget,
                           guest_view=guest_view, stats_unset_warning_s=stats_unset_warning_s)
        self.aio = run(make())

    @property
    def run_dir(self) -> Path | None:
        """The run folder, when streaming to disk."""
        return self.aio.run_dir

    def start(self) -> SyncSampler:
        """Start sampling (returns immediately)."""
        run(self.aio.start())
        return self

    def add(self, guest: Any) -> None:
        """Sample one more guest (a ``SyncGuest``, ``SyncLibvirtGuest`` or their ``.aio``)."""
        run(self.aio.add(guest))

    def remove(self, name: str) -> None:
        """Stop sampling one guest (its rows stay)."""
        run(self.aio.remove(name))

    def stop(self) -> None:
        """Stop sampling, flush, close the run."""
        run(self.aio.stop())

    def flush(self) -> None:
        """Write what was recorded since the last flush to the run folder (built and written
        off balloonlab's loop)."""
        run(self.aio.flush())

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve the latest data per guest as Prometheus metrics at ``http://addr:port/metrics``
        (see ``balloonlab.record.metrics.serve_metrics``; port 0: any free one, ``.url`` says which).
        The endpoint is bound on balloonlab's loop; ``.close()`` it, or :meth:`stop` does.

        :raises BalloonLabError: the port is in use or the address cannot be bound.
        """
        endpoint: MetricsEndpoint = run(_call(lambda: serve_metrics(self.aio, port, addr)))
        return endpoint

    def frame(self) -> pd.DataFrame:
        """Samples so far: a snapshot taken on the loop thread (so never half-appended, and
        sub-millisecond to milliseconds however many rows), the frame built on the calling
        thread while sampling goes on. ``attrs["dropped_rows"]``: see ``Sampler.frame``."""
        return run(_call(self.aio.samples_snapshot)).frame()

    def events(self) -> pd.DataFrame:
        """Events so far (snapshot on the loop, frame built here, as :meth:`frame`)."""
        return run(_call(self.aio.events_snapshot)).frame()

    def host_frame(self) -> pd.DataFrame:
        """The host frame so far (snapshot on the loop, frame built here, as :meth:`frame`)."""
        if not self.aio.has_host:
            return pd.DataFrame()
        return run(_call(self.aio.host_snapshot)).frame()

    def run_policy(self, policy: Policy, guests: list[str] | None = None, **options: Any) -> PolicyLoop:
        """Let ``policy`` set the guests' targets from now on (see ``Sampler.run_policy``)."""
        loop: PolicyLoop = run(_call(lambda: self.aio.run_policy(policy, guests, **options)))
        return loop

    def stop_policies(self) -> None:
        """Stop every policy started with :meth:`run_policy` (sampling goes on)."""
        run(self.aio.stop_policies())

    def stop_host(self) -> None:
        """Stop the policies and the host frame (its last row now); the guests' sampling goes on."""
        run(self.aio.stop_host())

    def states(self) -> dict[str, SamplingState]:
        """Per-guest sampling state."""
        return run(_call(self.aio.states))

    def host_clocks(self) -> dict[str, ClockEstimate | None]:
        """Each host's clock minus this one's, as now estimated (None: not yet bounded)."""
        return run(_call(self.aio.host_clocks))

    def record_event(self, guest: str, kind: str, value: int | None = None, detail: str = "",
                     duration_s: float | None = None, at: float | None = None) -> None:
        """Record an event of your own (e.g. a note), at ``at`` (epoch s) or now."""
        run(_call(lambda: self.aio.record_event(guest, kind, value, detail, duration_s, at)))

    def __enter__(self) -> SyncSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_experiment(experiment: Experiment | Overcommit, progress: Callable[[float, str], None] | None = None) -> Run:
    """Run an :class:`~balloonlab.experiments.runner.Experiment` (or an
    :class:`~balloonlab.experiments.overcommit.Overcommit`) and block until it is done.

    The blocking twin of ``await experiment.run()``; its guests may be specs, ``SyncGuest`` s or
    guests made on balloonlab's loop.
    """
    return run(experiment.run(progress))
