"""model.clock: a remote host's clock offset bounded by the balloon's reports, against a model
of QEMU's stats timer on a host whose clock is off by a known amount."""

from __future__ import annotations

import math
import random
import types

import pytest

from balloonlab.model.clock import ClockEstimate, HostClock, corrected_age


def reads(offset_s: float, *, period_s: float = 2.0, reports: int = 30, poll_s: float = 0.25,
          seed: int = 1, start: float = 1_700_000_000.3):
    """Reads of one guest every ``poll_s`` (with jitter), on the local clock: (sent, received,
    last_update) for each read that found a new report, and the previous read's sent time.
    QEMU stamps a report with ``floor(remote time)``; the remote clock is local + offset."""
    rng = random.Random(seed)
    report_times = [start + 0.7 + k * (period_s + 0.003) for k in range(reports)]  # local time of each report
    t, previous, seen = start, None, None
    out = []
    while t < report_times[-1] + period_s:
        sent = t
        received = sent + rng.uniform(0.001, 0.02)
        served = rng.uniform(sent, received)  # when QEMU answered the read
        done = [r for r in report_times if r <= served]
        if done:
            last_update = math.floor(done[-1] + offset_s)
            if last_update != seen:
                out.append((received, last_update, previous))
                seen = last_update
        previous = sent
        t += poll_s * rng.uniform(0.8, 1.2)
    return out


@pytest.mark.parametrize("offset_s", [90.0, -90.0, 0.0, 0.4, -3.7, 86_400.25])
def test_the_bounds_hold_the_true_offset_within_about_a_second(offset_s):
    clock = HostClock(local=False)
    for received, last_update, previous in reads(offset_s):
        assert clock.observe(last_update, received=received, previous_sent=previous) is False
    estimate = clock.estimate(0.0)
    assert estimate is not None and estimate.method == "reports" and estimate.reports == 30
    assert abs(estimate.offset_s - offset_s) <= estimate.uncertainty_s  # the truth is inside the bounds
    assert estimate.uncertainty_s <= 0.6  # whole-second stamps, reads within 0.3 s of a report


def test_a_first_read_alone_gives_no_estimate_and_a_local_host_is_exactly_zero():
    clock = HostClock(local=False)
    clock.observe(1_700_000_090, received=1_700_000_000.5, previous_sent=None)
    assert clock.estimate(1.0) is None  # a lower bound only
    local = HostClock(local=True)
    assert local.observe(5, received=1.0, previous_sent=0.5) is False
    assert local.estimate(7.0) == ClockEstimate(0.0, 0.0, "local", 7.0, 0)


def test_a_stepped_clock_restarts_the_window_and_is_reported():
    clock = HostClock(local=False)
    for received, last_update, previous in reads(90.0, reports=10):
        clock.observe(last_update, received=received, previous_sent=previous)
    later = reads(30.0, reports=10, start=1_700_000_100.3, seed=2)  # NTP stepped the remote clock by -60 s
    stepped = [clock.observe(lu, received=r, previous_sent=p) for r, lu, p in later]
    assert stepped[0] is True and not any(stepped[1:]) and clock.steps == 1
    estimate = clock.estimate(0.0)
    assert estimate is not None and abs(estimate.offset_s - 30.0) <= estimate.uncertainty_s <= 0.6


def test_ages_are_taken_on_one_clock():
    ahead = ClockEstimate(90.0, 0.4, "reports", 0.0, 10)
    # a report stamped 1090 on a clock 90 s ahead came at local 1000; read at local 1001.5
    assert corrected_age(1001.5, 1090, ahead) == pytest.approx(1.5)
    assert corrected_age(1001.5, 1090, None) is None  # unknown offset: no age rather than a wrong one
    assert corrected_age(1001.5, None, ahead) is None  # no report yet
    assert corrected_age(999.9, 1090, ahead) == 0.0  # within the uncertainty: clipped, never negative


# -- the sampler's side: run.json's hosts ---------------------------------------------------
def remote_guest(name: str, host: str, *, on_this_host: bool = False):
    """What the sampler reads of a guest to place it on a host (no QEMU behind it)."""
    return types.SimpleNamespace(name=name, host=host, on_this_host=on_this_host, backend="libvirt",
                                 uri=f"qemu+tcp://{host}/system")


def test_a_slowly_drifting_clock_is_followed_in_run_json(tmp_path):
    from balloonlab import Sampler
    from balloonlab.model.stats import BalloonStats
    sampler = Sampler(run_dir=tmp_path / "run", host_interval_s=None)
    guest = remote_guest("far", "rack3")
    sampler._register_host(guest)
    start = 1_700_000_000.3
    for k in range(1800):  # an hour of reports at 2 s, the remote clock gaining 1 ms a report: 90 -> 91.8 s
        report = start + k * 2.003
        record = BalloonStats(read_time=report + 0.005, last_update=math.floor(report + 90 + k * 0.001), new=True)
        sampler._observe_clock(guest, record, report + 0.012, report - 0.05)
    sampler._save_hosts()
    clock = sampler._writer.metadata["hosts"]["rack3"]
    assert clock["on_this_host"] is False and clock["reached_by"] == ["qemu+tcp://rack3/system"]
    assert abs(clock["clock"]["offset_s"] - 91.8) <= 0.6  # the offset now, not the first one
    history = clock["clock_history"]
    assert len(history) >= 3 and abs(history[-1]["offset_s"] - 91.8) <= 0.6
    for entry in history:  # each within its bounds of the offset at its time, give or take the window's drift
        true = 90 + (entry["measured_at"] - start) / 2.003 * 0.001
        assert abs(entry["offset_s"] - true) <= entry["uncertainty_s"] + 0.07, (entry, true)


def test_a_host_name_cannot_be_this_machine_and_a_remote_one():
    from balloonlab import Sampler
    sampler = Sampler(host_interval_s=None)
    sampler._register_host(remote_guest("here", "lab1", on_this_host=True))
    with pytest.raises(ValueError, match="host name 'lab1' already names this machine, and guest 'there' runs on a "
                                         "remote host: set guest.host to another name"):
        sampler._register_host(remote_guest("there", "lab1"))
    sampler._register_host(remote_guest("there", "lab1-remote"))
    clocks = sampler.host_clocks()
    assert clocks.keys() == {"lab1", "lab1-remote"} and clocks["lab1-remote"] is None  # not bounded yet
    assert (clocks["lab1"].offset_s, clocks["lab1"].uncertainty_s, clocks["lab1"].method) == (0.0, 0.0, "local")
