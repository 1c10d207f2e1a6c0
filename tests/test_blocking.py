"""The blocking facade cannot drift from the async core, and the two loops never mix silently.

Every public async method of Guest, Balloon, Workload, Sampler and LibvirtGuest (and their
constructors) must have a blocking twin with the same parameters, kinds and defaults, so
Shift-Tab in a notebook shows the same signature. Handing an object of one loop to an
object of the other either works (a Sync twin's `.aio` on balloonlab's loop) or raises a
TypeError that says what to pass instead; both are tried on real guests.
"""

from __future__ import annotations

import inspect

import pytest

from balloonlab import (Balloon, Experiment, Guest, Sampler, Schedule, SyncBalloon, SyncGuest, SyncSampler,
                        SyncWorkload, Workload, run_experiment)
from balloonlab.blocking.libvirt import SyncLibvirtGuest
from balloonlab.libvirt import LibvirtBalloon, LibvirtGuest

PAIRS = [(Guest, SyncGuest), (Balloon, SyncBalloon), (LibvirtBalloon, SyncBalloon), (Workload, SyncWorkload),
         (Sampler, SyncSampler), (LibvirtGuest, SyncLibvirtGuest)]


def public_async_methods(cls: type) -> list[str]:
    return sorted(name for name in dir(cls)
                  if not name.startswith("_") and inspect.iscoroutinefunction(getattr(cls, name)))


def shape(fn: object) -> list[tuple[str, object, object]]:
    """Parameters as (name, kind, default), without self/cls: what Shift-Tab shows."""
    params = list(inspect.signature(fn).parameters.values())  # type: ignore[arg-type]
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


def drift(async_cls: type, sync_cls: type) -> list[str]:
    problems = []
    for name in public_async_methods(async_cls):
        twin = getattr(sync_cls, name, None)
        if twin is None:
            problems.append(f"{sync_cls.__name__}.{name} is missing")
        elif inspect.iscoroutinefunction(twin):
            problems.append(f"{sync_cls.__name__}.{name} is async")
        elif shape(getattr(async_cls, name)) != shape(twin):
            problems.append(f"{sync_cls.__name__}.{name}{inspect.signature(twin)} differs from "
                            f"{async_cls.__name__}.{name}{inspect.signature(getattr(async_cls, name))}")
    return problems


@pytest.mark.parametrize("async_cls, sync_cls", PAIRS, ids=lambda c: c.__name__)
def test_every_async_method_has_a_blocking_twin_with_its_signature(async_cls, sync_cls):
    assert public_async_methods(async_cls)  # the enumeration finds something to compare
    assert drift(async_cls, sync_cls) == []


def test_the_sampler_twin_takes_the_samplers_parameters():
    assert shape(SyncSampler.__init__) == shape(Sampler.__init__)
    assert shape(SyncSampler.record_event) == shape(Sampler.record_event)


def test_drift_is_caught():
    class Async:
        async def read(self, size: int, *, timeout_s: float = 1.0) -> None: ...
        async def gone(self) -> None: ...

    class Blocking:
        def read(self, size: int, *, timeout_s: float = 2.0) -> None: ...

    assert drift(Async, Blocking) == [
        "Blocking.gone is missing",
        "Blocking.read(self, size: 'int', *, timeout_s: 'float' = 2.0) -> 'None' differs from "
        "Async.read(self, size: 'int', *, timeout_s: 'float' = 1.0) -> 'None'"]


def test_the_backends_agree_on_names_defaults_and_sync_async():
    """Guest and LibvirtGuest: the same method names, async choice and defaults where shared."""
    for name in ("attach", "reconnect", "detach", "shutdown", "close", "status", "metadata", "read_stats",
                 "libvirt_stats"):
        qmp, lv = getattr(Guest, name), getattr(LibvirtGuest, name)
        assert inspect.iscoroutinefunction(qmp) and inspect.iscoroutinefunction(lv), name
    assert inspect.signature(Guest.attach).parameters["set_period"].default is True
    assert inspect.signature(LibvirtGuest.attach).parameters["set_period"].default is True
    assert shape(Guest.shutdown)[0] == shape(LibvirtGuest.shutdown)[0] == (
        "timeout_s", inspect.Parameter.POSITIONAL_OR_KEYWORD, 10.0)


async def test_an_awaited_guest_in_a_sync_sampler_is_refused_clearly(spec):
    guest = await Guest.launch(spec())
    sampler = SyncSampler()
    try:
        with pytest.raises(TypeError, match=r"was made on another event loop.*SyncGuest\.launch"):
            sampler.add(guest)
        assert sampler.states() == {}
    finally:
        sampler.stop()
        await guest.shutdown()


async def test_a_sync_guest_in_an_awaited_sampler_or_experiment_is_refused_clearly(spec, tmp_path):
    guest = SyncGuest.launch(spec())
    try:
        with pytest.raises(TypeError, match=r"is a SyncGuest.*pass it to SyncSampler"):
            await Sampler().add(guest)
        with pytest.raises(TypeError, match=r"is a SyncGuest.*run_experiment"):
            await Experiment([guest], duration_s=1, plot=False, run_root=tmp_path / "runs").run()
        assert not (tmp_path / "runs").exists()  # refused before a run folder was made
        with pytest.raises(TypeError, match="needs a balloonlab guest"):
            await Sampler().add("not a guest")
    finally:
        guest.shutdown()


def test_sync_guests_work_in_a_sync_sampler_and_run_experiment(spec, tmp_path):
    guest = SyncGuest.launch(spec(period_s=1))
    try:
        guest.balloon.wait_for_stats(30)
        with SyncSampler() as sampler:
            sampler.add(guest)
            assert sampler.states()[guest.name].state in ("starting", "sampling")
        run = run_experiment(Experiment([guest], duration_s=3, run_root=tmp_path, plot=False,
                                        balloon=Schedule.from_list([(0.5, "400M")])))
        assert (run.samples["guest"] == guest.name).sum() >= 2
        assert (run.events["kind"] == "target").sum() == 1
        assert guest.alive  # a guest the experiment did not launch is not shut down by it
    finally:
        guest.shutdown()
