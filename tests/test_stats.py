"""Balloon statistics, target and events on real guests: units, freshness, resets."""

from __future__ import annotations

import asyncio
import time

import pytest

from balloonlab import Guest, StatsUnavailable, format_dommemstat, libvirt_view
from balloonlab.model.stats import UNSET, parse_guest_stats

MiB = 1 << 20


def test_sentinel_and_newer_stat_names_are_kept_honest():
    reply = {"last-update": 1700000000, "stats": {
        "stat-free-memory": 1234, "stat-swap-in": UNSET, "stat-swap-out": -1, "stat-oom-kills": 3}}
    stats = parse_guest_stats(reply, actual=4096, read_time=1700000002.5)
    assert stats["free_memory"] == 1234
    assert stats["swap_in"] is None and stats["swap_out"] is None  # 2^64-1 and -1: unset
    assert stats["oom_kills"] == 3  # a stat newer QEMUs add is kept, not dropped
    assert stats.age_s == 2.5
    never = parse_guest_stats({"last-update": 0, "stats": {"stat-free-memory": UNSET}})
    assert never.last_update is None and not never.reported and never.age_s is None


async def test_guest_without_balloon_driver_never_reports(spec):
    async with await Guest.launch(spec(balloon_driver=False)) as guest:
        await asyncio.sleep(3)  # three polling periods
        stats = await guest.read_stats()
        assert stats.last_update is None
        assert all(v is None for v in stats.stats.values())
        with pytest.raises(StatsUnavailable, match="virtio_balloon driver") as err:
            await guest.balloon.wait_for_stats(timeout_s=1)
        assert err.value.last_update == 0


async def test_only_new_samples_are_marked_new_per_reader(guest):
    from balloonlab import StatsClassifier
    await guest.balloon.wait_for_stats(30)
    await guest.balloon.set_period(0)  # polling off: the last report stays as it is
    mine = StatsClassifier()
    first = await guest.balloon.read_stats(classifier=mine)
    again = await guest.balloon.read_stats(classifier=mine)
    assert first.new and not again.new  # the same report, read twice by one reader
    assert again.last_update == first.last_update
    # Reading is pure: another reader (the interactive default) still sees it as new.
    assert (await guest.read_stats()).new
    assert not (await guest.read_stats()).new
    raw = await guest.balloon.read_report()
    assert not raw.new and raw.last_update == first.last_update
    await guest.balloon.set_period(1)  # the first enable polls at once
    deadline = time.monotonic() + 5
    while not (later := await guest.balloon.read_stats(classifier=mine)).new:
        assert time.monotonic() < deadline, "no new sample within 5 periods"
        await asyncio.sleep(0.2)
    assert later.stats != first.stats or later.last_update > first.last_update


async def test_paused_guest_gives_no_new_samples_and_no_error(guest):
    await guest.balloon.wait_for_stats(30)
    await guest.monitor.execute("stop")
    await guest.read_stats()
    news = []
    for _ in range(10):
        await asyncio.sleep(0.3)
        news.append((await guest.read_stats()).new)
    assert not any(news)  # the polling timer runs on the guest's clock: frozen while paused
    await guest.monitor.execute("cont")
    deadline = time.monotonic() + 5
    while not (await guest.read_stats()).new:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def test_guest_reset_is_marked_on_the_next_sample(guest):
    await guest.balloon.wait_for_stats(30)
    await guest.workload.alloc("64M")  # make the fault counters move
    assert (await guest.read_stats()).new  # this reader has seen the guest before the reset
    await guest.monitor.execute("system_reset")
    deadline = time.monotonic() + 30
    while True:
        stats = await guest.read_stats()
        if stats.new:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert stats.reset
    await asyncio.sleep(1.5)
    following = await guest.read_stats()
    assert not following.reset  # marked once, on the first sample after the reset


async def test_libvirt_view_matches_the_mapping_table_on_real_values(guest):
    await guest.balloon.wait_for_stats(30)
    path = await guest.balloon.path()
    raw = await guest.monitor.execute("qom-get", {"path": path, "property": "guest-stats"})
    actual = (await guest.monitor.execute("query-balloon"))["actual"]
    rss = guest.rss_bytes()
    view = libvirt_view(parse_guest_stats(raw, actual=actual), rss)
    s = raw["stats"]
    expected = {"actual": actual // 1024}
    for qemu, virsh, div in [("stat-swap-in", "swap_in", 1024), ("stat-swap-out", "swap_out", 1024),
                             ("stat-major-faults", "major_fault", 1), ("stat-minor-faults", "minor_fault", 1),
                             ("stat-free-memory", "unused", 1024), ("stat-total-memory", "available", 1024),
                             ("stat-available-memory", "usable", 1024), ("last-update", "last_update", 1),
                             ("stat-disk-caches", "disk_caches", 1024), ("stat-htlb-pgalloc", "hugetlb_pgalloc", 1),
                             ("stat-htlb-pgfail", "hugetlb_pgfail", 1)]:
        value = raw["last-update"] if qemu == "last-update" else s[qemu]
        if value != UNSET:
            expected[virsh] = value // div
    expected["rss"] = rss // 1024
    assert view == expected
    assert list(view) == list(expected)  # virsh's order
    assert view["available"] == s["stat-total-memory"] // 1024  # libvirt's name shift, exactly
    assert format_dommemstat(view).splitlines()[0] == f"actual {actual // 1024}"


async def test_balloon_change_events_arrive_with_host_timestamps(guest):
    await guest.balloon.wait_for_stats(30)
    t0 = time.time()
    await guest.balloon.set_target("300M")
    await guest.balloon.wait_for_actual(timeout_s=30)
    changes = [c for c in guest.balloon.changes if c.time >= t0 - 1]
    assert changes, "no BALLOON_CHANGE event"
    assert all(t0 - 1 <= c.time <= time.time() + 1 for c in changes)
    assert abs(changes[-1].actual - 300 * MiB) <= MiB


@pytest.mark.parametrize("target, error, match", [
    (0, ValueError, "below one page"), (256, ValueError, "did you mean .256M."), (-5, ValueError, "negative"), ("256Mbit", ValueError, "unknown memory unit"),
    ("1G", ValueError, "above the guest's memory"), (True, TypeError, "int"), (2.5, TypeError, "int")])
async def test_bad_targets_are_refused_with_a_clear_message(guest, target, error, match):
    before = guest.monitor.round_trips
    with pytest.raises(error, match=match):
        await guest.balloon.set_target(target)
    assert guest.monitor.round_trips == before


async def test_target_above_memory_can_be_clamped(guest):
    assert await guest.balloon.set_target("1G", above_max="clamp") == 512 * MiB


def test_a_report_made_before_a_reset_but_read_after_its_event_is_not_the_reset_sample():
    # QEMU 7.2 keeps the last report readable across a reset; a reader may get the RESET event
    # (at host time 100.8) before it reads the report the guest made at 100.5 (last-update 100).
    from balloonlab import StatsClassifier
    from balloonlab.model.stats import BalloonStats

    def report(t, lu, faults, resets=0, reset_time=None):
        return BalloonStats(t, lu, {"minor_faults": faults, "free_memory": 1000 + faults}, None,
                            resets=resets, reset_time=reset_time)

    c = StatsClassifier()
    assert c.classify(report(99.6, 99, 5000)).new
    late = c.classify(report(100.9, 100, 5100, resets=1, reset_time=100.8))
    assert late.new and not late.reset  # made before the reset: the old boot's counters
    stale = c.classify(report(101.9, 100, 5100, resets=1, reset_time=100.8))
    assert not stale.new and not stale.reset  # 7.2: the same stale report until the guest reports
    first = c.classify(report(103.1, 103, 450, resets=1, reset_time=100.8))
    assert first.new and first.reset  # the new boot's first report, once
    after = c.classify(report(104.1, 104, 500, resets=1, reset_time=100.8))
    assert after.new and not after.reset
    # A reset whose first report's counters did not go back is still marked, by its time.
    d = StatsClassifier()
    d.classify(report(10.2, 10, 100))
    marked = d.classify(report(14.3, 14, 900, resets=1, reset_time=11.5))
    assert marked.new and marked.reset
    # QEMU >= 9.2: the stats drop to unset (last-update 0) at the reset; the next report is it.
    e = StatsClassifier()
    e.classify(report(20.2, 20, 100))
    gone = e.classify(BalloonStats(21.0, None, {"minor_faults": None}, None, resets=1, reset_time=20.9))
    assert not gone.new and not gone.reset
    back = e.classify(report(23.4, 23, 800, resets=1, reset_time=20.9))
    assert back.new and back.reset
