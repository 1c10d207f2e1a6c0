"""The Debian guest (``balloonlab guest build --distro debian``) under balloonlab's own launcher.

A boot costs 10-30 s under TCG, so one guest serves the module: the ``debian`` fixture boots a
fresh qcow2 overlay on the cached image from domain XML with a ``<disk>`` and a qemu-guest-agent
``<channel>`` (as any user's image), samples it with the guest's own view
(``Sampler(guest_view=True)``), plays the scenario (a quiet spell, a balloon step, the page cache
with the balloon inflated, a working set, stress-ng from a schedule), shuts the guest down and
hands what it saw to the tests, which each check one part.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from balloonlab import Experiment, Guest, Run, Sampler, StressSchedule, format_size
from balloonlab.analysis import retouch_cost, step_response
from balloonlab.image import debian_domain, find_debian_image

pytestmark = pytest.mark.qemu
MiB = 1 << 20
PERIOD_S = 2


@dataclass
class Seen:
    """What the scenario recorded."""

    disk: tuple[str, str | None, str | None]
    backing: str = ""
    shell: dict[str, str] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)  # epoch s at each step's start
    page_cache_size: int = 0
    page_cache_durations: list[float] = field(default_factory=list)
    working_set_durations: list[float] = field(default_factory=list)
    held_after_working_set: int = 0
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: pd.DataFrame = field(default_factory=pd.DataFrame)
    stress_run: Run | None = None
    socket_was_there: bool = False
    cache_before: pd.Series | None = None  # the rows just before and after the page-cache workload
    cache_after: pd.Series | None = None


async def _sh(guest: Guest, script: str) -> str:
    done = await guest.workload.exec(["/bin/sh", "-c", script])  # type: ignore[attr-defined]
    assert done.exit_code == 0, (script, done)
    return str(done.stdout)


async def _viewed(sampler: Sampler, since: float, count: int, timeout_s: float = 40.0) -> pd.DataFrame:
    """At least ``count`` rows after ``since`` (epoch s) carrying the guest's own view."""
    deadline = time.monotonic() + timeout_s
    while True:
        frame = sampler.frame()
        rows = frame[(frame.index > pd.Timestamp(since, unit="s", tz="UTC")) & frame["guest_mem_free"].notna()]
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} rows with the guest's view in {timeout_s} s"
        await asyncio.sleep(0.5)


async def _scenario(xml: Path, run_root: Path) -> Seen:
    guest = await Guest.launch(xml)
    try:
        disk = guest.spec.disks[0]
        seen = Seen(disk=(disk.format, disk.bus, disk.target))
        seen.backing = subprocess.run(["qemu-img", "info", "-U", "--output=json", disk.source], capture_output=True,
                                      text=True, check=True).stdout
        seen.socket_was_there = guest.guest_agent_socket is not None and guest.guest_agent_socket.is_socket()
        async with Sampler(guest_view=True) as sampler:
            await sampler.add(guest)
            await guest.balloon.wait_for_stats(120)
            await guest.workload.connect(120)  # qemu-guest-agent comes up a few seconds after the stats
            for name, script in (("root", "findmnt -no SOURCE,FSTYPE /"), ("init", "cat /proc/1/comm"),
                                 ("qga", "systemctl is-active qemu-guest-agent"), ("lsmod", "lsmod")):
                seen.shell[name] = await _sh(guest, script)
            seen.marks["quiet"] = time.time()
            await _viewed(sampler, seen.marks["quiet"], 4)

            seen.marks["step"] = time.time()
            await guest.balloon.set_target("768M")
            assert (await guest.balloon.wait_for_actual(timeout_s=60)).reached
            seen.marks["stepped"] = time.time()
            await _viewed(sampler, seen.marks["stepped"], 2)
            seen.marks["inflate"] = time.time()
            await guest.balloon.set_target("512M")  # less free memory than the file below: it must evict
            assert (await guest.balloon.wait_for_actual(timeout_s=60)).reached

            seen.cache_before = (await _viewed(sampler, time.time(), 1)).iloc[-1]
            seen.page_cache_size = int(seen.cache_before["free_memory"]) // MiB * MiB + 64 * MiB
            seen.page_cache_durations = await guest.workload.page_cache(seen.page_cache_size, reads=1)
            seen.cache_after = (await _viewed(sampler, time.time(), 1)).iloc[0]
            await guest.balloon.set_target("1G")
            assert (await guest.balloon.wait_for_actual(timeout_s=60)).reached

            seen.working_set_durations = await guest.workload.working_set("64M", passes=2)
            seen.held_after_working_set = guest.workload.held
            seen.marks["working_set_done"] = time.time()
            await _viewed(sampler, seen.marks["working_set_done"], 1)
            await guest.workload.free()
            seen.samples, seen.events = sampler.frame(), sampler.events()
        seen.stress_run = await Experiment(
            guests=[guest], duration_s=10, plot=False, name="debian-stress", run_root=run_root,
            stress=StressSchedule.of((1, "--vm 1 --vm-bytes 200M --vm-keep", 6))).run()
        return seen
    finally:
        await guest.shutdown()


@pytest.fixture(scope="module")
def debian(tmp_path_factory) -> Seen:
    """The scenario, once, on the image `make test` builds first (never built here: a minute)."""
    image = find_debian_image()
    if image is None:
        pytest.fail("the Debian guest image is not built: run `make test` (or `balloonlab guest build --distro "
                    "debian`) first", pytrace=False)
    folder = tmp_path_factory.mktemp("debian")
    xml = debian_domain(image, folder, name=f"deb{time.monotonic_ns() % 10**6}", memory="1G", period_s=PERIOD_S)
    seen = asyncio.run(_scenario(xml, folder / "runs"))
    seen.shell["base"] = str(image.base)
    return seen


def _between(frame: pd.DataFrame, start: float, end: float | None = None) -> pd.DataFrame:
    since = frame.index > pd.Timestamp(start, unit="s", tz="UTC")
    until = frame.index < pd.Timestamp(end, unit="s", tz="UTC") if end is not None else True
    return frame[since & until & frame["guest_mem_free"].notna()]


def test_boots_from_its_qcow2_with_systemd_swap_and_the_agent(debian):
    assert debian.disk == ("qcow2", "virtio", "vda")
    assert f'"backing-filename": "{debian.shell["base"]}"' in debian.backing  # an overlay: the base stays pristine
    assert debian.shell["root"].split() == ["/dev/vda", "ext4"]
    assert debian.shell["init"].strip() == "systemd"
    assert debian.shell["qga"].strip() == "active"
    assert "virtio_balloon" in debian.shell["lsmod"]
    assert debian.socket_was_there
    rows = debian.samples[debian.samples["guest_mem_free"].notna()]
    assert (rows["guest_swap_total"] == 256 * MiB - 4096).all()  # the swap file made at first boot, less its header
    # The balloon's stats flow, one report a period.
    updates = debian.samples["last_update"].drop_duplicates().sort_values()
    assert len(updates) >= 10
    assert (updates.diff().dropna().dt.total_seconds().between(PERIOD_S - 1, PERIOD_S + 1)).all()


def test_the_agents_meminfo_agrees_with_the_balloons_report_within_a_period(debian):
    rows = _between(debian.samples, debian.marks["quiet"], debian.marks["step"])
    assert len(rows) >= 4
    assert rows["guest_view_lag_s"].between(0, PERIOD_S).all()
    # Both are the guest kernel's own counters: MemTotal is totalram, the balloon's total_memory,
    # exactly; free and available as they stood a fraction of a second apart in a quiet guest
    # (a journald write, a timer: a few pages).
    assert (rows["guest_mem_total"] == rows["total_memory"]).all()
    assert ((rows["guest_mem_free"] - rows["free_memory"]).abs() < 4 * MiB).all()
    assert ((rows["guest_mem_available"] - rows["available_memory"]).abs() < 4 * MiB).all()
    # The balloon's disk_caches is the guest's file pages less swap cache: Cached + Buffers.
    caches = rows["guest_cached"] + rows["guest_buffers"] - rows["guest_swap_cached"]
    assert ((caches - rows["disk_caches"]).abs() < 4 * MiB).all()


def test_a_balloon_step_shows_in_the_guests_own_memtotal(debian):
    before = _between(debian.samples, debian.marks["quiet"], debian.marks["step"])["guest_mem_total"].iloc[-1]
    after = _between(debian.samples, debian.marks["stepped"], debian.marks["inflate"])["guest_mem_total"]
    assert len(after) >= 2 and (before - after == 256 * MiB).all()  # 768M reached: 256 MiB out of MemTotal
    steps = step_response(debian.samples, debian.events)
    first = steps.iloc[0]
    assert first["target"] == 768 * MiB and first["reached"] and first["direction"] == "inflate"


def test_the_page_cache_workload_shows_in_disk_caches(debian):
    before, after = debian.cache_before, debian.cache_after
    assert before is not None and after is not None
    free = before["free_memory"]
    assert debian.page_cache_size > free  # bigger than free memory: the cache evicts as it reads
    assert after["disk_caches"] - before["disk_caches"] > 0.7 * free, (before["disk_caches"], after["disk_caches"])
    assert after["guest_cached"] - before["guest_cached"] > 0.7 * free
    assert after["free_memory"] < 0.3 * free
    work = debian.events[debian.events["kind"] == "workload"]
    size = format_size(debian.page_cache_size)
    cache_events = work[work["detail"].isin([f"write {size}", f"read {size}"])]
    assert list(cache_events["detail"]) == [f"write {size}", f"read {size}"]
    assert list(cache_events["duration_s"]) == pytest.approx(debian.page_cache_durations)


def test_a_working_set_is_anonymous_memory_retouched_pass_after_pass(debian):
    assert len(debian.working_set_durations) == 2 and all(d > 0 for d in debian.working_set_durations)
    assert debian.held_after_working_set == 64 * MiB
    during = _between(debian.samples, debian.marks["working_set_done"]).iloc[0]
    quiet = _between(debian.samples, debian.marks["quiet"], debian.marks["step"]).iloc[-1]
    assert during["guest_anon_pages"] - quiet["guest_anon_pages"] > 60 * MiB  # anonymous, not page cache
    touches = retouch_cost(debian.events)
    assert list(touches[touches["detail"] == "touch 64 MiB"]["duration_s"]) == pytest.approx(
        debian.working_set_durations)


def test_stress_ng_runs_in_the_guest_from_a_schedule(debian):
    run = debian.stress_run
    assert run is not None and run.metadata["schedule"]["stress"] == [[1, ["--vm", "1", "--vm-bytes", "200M",
                                                                          "--vm-keep"], 6]]
    stress = run.events[run.events["detail"].astype(str).str.startswith("stress-ng")]
    assert list(stress["detail"]) == ["stress-ng " + shlex.join(["--vm", "1", "--vm-bytes", "200M", "--vm-keep"])]
    assert 6 <= stress["duration_s"].iloc[0] < 15
    # While it ran, the balloon saw the guest's free memory drop by most of the 200 MiB.
    free = run.samples["free_memory"].dropna()
    assert free.max() - free.min() > 150 * MiB
