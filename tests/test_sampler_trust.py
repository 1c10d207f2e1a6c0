"""The sampler's numbers hold whoever else looks: every report recorded by every reader, the
balloon's size as it was at each sample, periods changed behind balloonlab's back, rates
from the right clock. All on real guests."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pandas as pd

from balloonlab import Guest, Sampler, StatsClassifier

MiB = 1 << 20


def report_times(frame: pd.DataFrame, guest: str) -> np.ndarray:
    rows = frame[frame["guest"] == guest]
    return rows.index.asi8 / 1e9


async def test_every_report_is_recorded_by_each_sampler_while_a_user_reads(guest):
    await guest.balloon.wait_for_stats(30)
    first, second = Sampler(), Sampler()
    reads = 0

    async def user() -> None:  # a notebook looking at the numbers every 0.3 s
        nonlocal reads
        while True:
            await guest.read_stats()
            await guest.libvirt_stats()
            await guest.balloon.wait_for_stats(1)
            reads += 1
            await asyncio.sleep(0.3)

    async with first, second:
        await first.add(guest)
        await second.add(guest)
        looker = asyncio.ensure_future(user())
        await asyncio.sleep(30)
        looker.cancel()
        await asyncio.gather(looker, return_exceptions=True)
    assert reads >= 60
    a, b = first.frame(), second.frame()
    # The guest reports once a second: 30 s gives 30 reports (give or take the edges) ...
    assert len(a) >= 29 and len(b) >= 29
    # ... each one read once, a period apart (a lost report would leave a 2 s hole) ...
    for frame in (a, b):
        gaps = np.diff(report_times(frame, guest.name))
        assert gaps.max() < 1.5, f"a report was lost: gaps {gaps.round(2).tolist()}"
        assert not frame["reset"].any()
    # ... and both samplers saw the same reports.
    key = ["last_update", "free_memory", "minor_faults"]
    common = a[key].merge(b[key], how="inner", on=key)
    assert len(common) >= min(len(a), len(b)) - 2


async def test_a_readers_classifier_is_its_own(guest):
    await guest.balloon.wait_for_stats(30)
    await guest.balloon.set_period(0)  # freeze the report: every reader sees the same one
    mine, yours = StatsClassifier(), StatsClassifier()
    assert (await guest.balloon.read_stats(classifier=mine)).new
    assert (await guest.balloon.read_stats(classifier=yours)).new  # not taken by mine
    assert not (await guest.balloon.read_stats(classifier=mine)).new


async def test_actual_in_events_mode_is_the_balloons_size_at_each_samples_time(guest):
    """During a move BALLOON_CHANGE comes at most once a second; the samples must not lag."""
    await guest.balloon.wait_for_stats(30)
    truth: list[tuple[float, int]] = []

    async def watch() -> None:  # query-balloon every 50 ms on the same connection
        while True:
            truth.append((time.time(), await guest.balloon.query_actual()))
            await asyncio.sleep(0.05)

    async with Sampler(track_actual="events") as sampler:
        await sampler.add(guest)
        await asyncio.sleep(2.5)
        watcher = asyncio.ensure_future(watch())
        for target in ("200M", "512M", "300M"):
            await guest.balloon.set_target(target)
            await guest.balloon.wait_for_actual(timeout_s=30, settle_s=3)
            await asyncio.sleep(2.5)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    samples = sampler.frame()
    t_truth = np.array([t for t, _ in truth])
    v_truth = np.array([v for _, v in truth])
    checked = 0
    for at, actual in zip(samples.index.asi8 / 1e9, samples["actual"], strict=True):
        near = (t_truth > at - 0.3) & (t_truth < at + 0.3)  # QMP round trips under load
        if not near.any():
            continue
        checked += 1
        lo, hi = v_truth[near].min(), v_truth[near].max()
        assert lo - MiB <= actual <= hi + MiB, (
            f"sample at {at:.2f} says actual {actual >> 20} MiB; query-balloon said "
            f"{lo >> 20}-{hi >> 20} MiB around then")
    assert checked >= 8
    assert samples["actual"].min() <= 201 * MiB and samples["actual"].max() >= 511 * MiB


async def test_a_period_changed_behind_balloonlabs_back_is_noticed_and_recorded(guest):
    await guest.balloon.wait_for_stats(30)
    path = await guest.balloon.path()

    async def set_behind(seconds: int) -> float:  # as another QMP client or virsh would
        await guest.monitor.execute("qom-set", {"path": path, "property": "guest-stats-polling-interval",
                                                "value": seconds})
        return time.time()

    async with Sampler(period_check_every=3) as sampler:
        await sampler.add(guest)
        await asyncio.sleep(4)
        longer = await set_behind(2)  # the next report is overdue: noticed at once
        await asyncio.sleep(8)
        shorter = await set_behind(1)  # reports still look on time: noticed by the periodic check
        await asyncio.sleep(8)
    events = sampler.events()
    changes = events[(events["kind"] == "period") & events["detail"].str.contains("outside")]
    assert changes["value"].tolist() == [2, 1]
    noticed = changes.index.asi8 / 1e9
    assert noticed[0] - longer < 4.5 and noticed[1] - shorter < 3 * 2 + 2.5
    samples = sampler.frame()
    at = samples.index.asi8 / 1e9
    assert (samples["period_s"][(at > noticed[0]) & (at < shorter)] == 2).all()
    assert (samples["period_s"][at > noticed[1]] == 1).all()
    assert samples["period_s"][at < longer].eq(1).all()


async def test_a_steady_counter_gives_a_steady_rate(spec):
    """The guest's churn faults pages at a fixed pace of its own clock; whole-second
    last-update differences (1, 2 or 3 at a 2 s period) would make its rate jump by half."""
    async with await Guest.launch(spec(period_s=2)) as guest:
        await guest.balloon.wait_for_stats(30)
        await guest.workload.churn(True)
        try:
            async with Sampler() as sampler:
                await sampler.add(guest)
                await asyncio.sleep(28)
        finally:
            await guest.workload.churn(False)
    rates = sampler.frame().balloon.rates()["minor_faults_per_s"].dropna().astype(float)
    steady = rates.iloc[1:]  # the first report may predate the churn's start
    assert len(steady) >= 11 and steady.median() > 500
    spread = steady.std() / steady.mean()
    print(f"relative spread {spread:.4f}: {steady.round(0).tolist()}")
    assert spread < 0.05, f"relative spread {spread:.3f}: {steady.round(0).tolist()}"


def test_rates_use_read_times_not_whole_second_last_update():
    """At a 1 s period last_update steps 1, 1, 2, 0, 1... when the report phase sits on a second
    boundary; reads a second apart must give the same rate every time."""
    from balloonlab.record.buffer import sample_buffer
    buffer = sample_buffer()
    t0 = 1_700_000_000.0
    for i, lu_step in enumerate([0, 1, 1, 2, 0, 1, 2, 0, 1]):
        read = t0 + i + 0.999
        buffer.append(int(read * 1e9), {"guest": "g", "last_update": int(t0) + i + (lu_step > 1) - (lu_step == 0),
                                        "minor_faults": 1000 * i, "actual": 1})
    rates = buffer.frame().balloon.rates()["minor_faults_per_s"]
    assert rates.dropna().round(6).tolist() == [1000.0] * 8


async def test_two_samplers_and_a_guest_launched_for_them_share_nothing_but_the_guest(spec):
    async with await Guest.launch(spec()) as guest:
        await guest.balloon.wait_for_stats(30)
        async with Sampler() as one, Sampler() as two:
            await one.add(guest)
            await asyncio.sleep(3)
            await two.add(guest)
            await asyncio.sleep(4)
            await one.remove(guest.name)
            await asyncio.sleep(3)
        assert one.states()[guest.name].state == "removed"
        assert two.states()[guest.name].samples >= 6
        assert len(one.frame()) >= 6
