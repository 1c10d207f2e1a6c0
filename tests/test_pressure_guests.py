"""The memory-pressure classifier on a real guest: QEMU >= 9.2 with a Linux 6.12 guest.

One built-in guest (512 MiB, 192 MiB of zram swap, stats every second) plays
:data:`balloonlab.experiments.pressure_drive.DEFAULT_PHASES`, each phase one 10 s window of
the classifier with its default thresholds: idle; 300 MiB allocated by the workload agent
and the balloon inflated to 256 MiB, which leaves RAM too small for it (direct reclaim swaps
the surplus to zram); then 160 MiB more, beyond what RAM and swap have left, so the OOM
killer takes some of the agent's holders. Each test checks the counters for what physically
happened in its phase first, then the regime the classifier gave that phase's window.
"""

from __future__ import annotations

import asyncio
import os

import pandas as pd
import pytest

from balloonlab import Guest, builtin_spec
from balloonlab.analysis import PressureThresholds
from balloonlab.experiments.pressure_drive import PressureRun, drive_pressure
from balloonlab.image.stacks import find_stacks

pytestmark = pytest.mark.qemu
MiB = 1 << 20


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:2])


@pytest.fixture(scope="module")
def drive() -> PressureRun:
    """The three phases, run once on a QEMU >= 9.2 stack with the 6.12 guest kernel."""
    stacks = [s for s in find_stacks() if _version(s.qemu_version) >= (9, 2)]
    if not stacks or not any(_version(k) >= (6, 12) for k in stacks[-1].kernels):
        pytest.fail("needs QEMU >= 9.2 and a Linux 6.12 guest image: run `make stacks` "
                    f"(found {[(s.qemu_version, s.kernels) for s in find_stacks()]})", pytrace=False)
    spec = builtin_spec(f"pr{os.getpid()}", kernel_release="6.12", qemu_binary=str(stacks[-1].qemu),
                        memory="512M", swap="192M", period_s=1)

    async def run() -> PressureRun:
        guest = await Guest.launch(spec)
        try:
            return await drive_pressure(guest)
        finally:
            await guest.shutdown()
    return asyncio.run(run())


def _windows(drive: PressureRun, phase: str) -> pd.DataFrame:
    p = drive.pressure()
    windows = p[p["phase"] == phase]
    assert len(windows) >= 1 and (windows["intervals"] >= 5).all(), windows  # reads every second
    return windows


def _rise(drive: PressureRun, phase: str, counter: str) -> int:
    """How much ``counter`` rose over ``phase``: its last read before the phase's end minus its
    last read before the phase's start (the first read of all for the first phase)."""
    row = drive.phases.set_index("phase").loc[phase]
    s = drive.samples[counter]
    before = s[s.index < row["start"]]
    return int(s[s.index < row["end"]].iloc[-1] - (before.iloc[-1] if len(before) else s.iloc[0]))


def test_guest_reports_the_reclaim_counters_and_is_never_reset(drive):
    assert drive.samples[["oom_kills", "alloc_stalls", "direct_scans", "direct_reclaims"]].notna().all().all()
    assert not drive.samples["reset"].any()
    assert list(drive.phases["phase"]) == ["idle", "pressure", "oom"]


def test_an_idle_guest_neither_stalls_nor_scans_and_reads_none(drive):
    windows = _windows(drive, "idle")
    for counter in ("oom_kills", "alloc_stalls", "async_scans", "direct_scans"):
        assert (windows[f"{counter}_delta"] == 0).all(), windows[f"{counter}_delta"]
    assert list(windows["regime"].astype(str)) == ["none"] * len(windows)


def test_allocation_under_an_inflated_balloon_is_effective_global_direct_reclaim(drive):
    # 300 MiB held in a guest the balloon shrank to 256 MiB: the surplus went to zram, and
    # allocations waited for it in direct reclaim, which freed what it scanned.
    phase = drive.phases.set_index("phase").loc["pressure"]
    assert phase["held"] == 300 * MiB and phase["error"] == ""
    s = drive.samples
    assert int(s.loc[s.index < phase["end"], "total_memory"].iloc[-1]) < 256 * MiB  # the balloon took the rest
    windows = _windows(drive, "pressure")
    assert int(windows["oom_kills_delta"].sum()) == 0
    stalls, scanned, reclaimed = (int(windows[f"{c}_delta"].sum()) for c in
                                  ("alloc_stalls", "direct_scans", "direct_reclaims"))
    th = PressureThresholds()
    assert stalls >= th.stall_rate_high * drive.window_s * len(windows)  # STALL high
    assert scanned >= th.direct_scan_high * 512 * MiB * drive.window_s  # DSCAN high
    assert reclaimed / scanned >= th.thrashing_ratio  # DRCLM high: not thrashing
    assert windows["regime"].max() == "global"


def test_allocating_beyond_ram_and_swap_kills_a_holder_and_reads_critical(drive):
    phase = drive.phases.set_index("phase").loc["oom"]
    assert _rise(drive, "oom", "oom_kills") >= 1
    assert _rise(drive, "pressure", "oom_kills") == 0 and _rise(drive, "idle", "oom_kills") == 0
    # The agent no longer lists the holders the OOM killer took (its chunks are 32 MiB).
    assert phase["expected_held"] - phase["held"] >= 32 * MiB, phase
    assert phase["error"]  # the allocation said so
    failed = drive.events[drive.events["kind"] == "step_failed"]
    assert list(failed["detail"].str.split(":").str[0]) == ["alloc 160M"]  # the balloon reached 256M before
    regimes = drive.regimes()
    assert regimes.loc["oom", "worst"] == "critical"
    assert list(regimes["worst"].astype(str)) == ["none", "global", "critical"]
