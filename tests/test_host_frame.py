"""The host as an entity: /proc/meminfo, vmstat, PSI and KSM parsed exactly, read from the real
host, written by the sampler as the run's ``host`` table and read back; the budget columns."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from balloonlab.model.hostfs import HostReader, footprint, parse_meminfo, parse_psi, parse_vmstat
from balloonlab.model.schema import HOST_FRAME
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import load_run

MEMINFO = """MemTotal:       16384000 kB
MemFree:         8000000 kB
MemAvailable:   12000000 kB
Buffers:          100000 kB
Cached:          2000000 kB
SwapCached:            0 kB
SwapTotal:       1048576 kB
SwapFree:        1000000 kB
AnonPages:       3000000 kB
Shmem:             50000 kB
Committed_AS:    5000000 kB
HugePages_Total:       0
"""
PSI = """some avg10=1.25 avg60=0.50 avg300=0.10 total=123456
full avg10=0.75 avg60=0.25 avg300=0.00 total=6543
"""


def fake_root(tmp_path: Path, *, psi: bool = True, ksm: bool = True) -> Path:
    (tmp_path / "proc/pressure").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    (tmp_path / "proc/vmstat").write_text("nr_free_pages 5\npswpin 7\npswpout 11\npgfault 1000\n"
                                          "pgmajfault 3\noom_kill 2\n")
    if psi:
        (tmp_path / "proc/pressure/memory").write_text(PSI)
    if ksm:
        folder = tmp_path / "sys/kernel/mm/ksm"
        folder.mkdir(parents=True)
        for name, value in {"run": 1, "pages_shared": 10, "pages_sharing": 40, "pages_unshared": 5,
                            "pages_volatile": 2, "full_scans": 9, "general_profit": -4096}.items():
            (folder / name).write_text(f"{value}\n")
    return tmp_path


def test_meminfo_vmstat_and_psi_are_parsed_to_bytes_counts_and_percent():
    info = parse_meminfo(MEMINFO)
    assert info["mem_total"] == 16384000 * 1024 and info["mem_available"] == 12000000 * 1024
    assert info["cached"] == 2000000 * 1024 and info["committed_as"] == 5000000 * 1024
    assert "hugepages_total" not in info and len(info) == 11
    assert parse_vmstat("pswpin 7\npswpout 11\nnr_free_pages 5\npgfault x\n") == {"pswpin": 7, "pswpout": 11}
    psi = parse_psi(PSI)
    assert psi["psi_some_avg10"] == 1.25 and psi["psi_full_avg60"] == 0.25
    assert psi["psi_some_total_us"] == 123456 and psi["psi_full_total_us"] == 6543


def test_a_host_row_has_every_source_the_guests_and_the_budget(tmp_path):
    reader = HostReader("h1", root=fake_root(tmp_path))
    row = reader.read({"a": (300 << 20, 200 << 20), "b": (150 << 20, None)}, budget=1 << 30)
    assert row["host"] == "h1" and row["mem_free"] == 8000000 * 1024 and row["oom_kill"] == 2
    assert row["psi_some_avg10"] == 1.25 and row["ksm_pages_sharing"] == 40 and row["ksm_general_profit"] == -4096
    assert row["guests"] == 2 and row["guests_rss"] == 450 << 20
    # a's guest RAM; b's RSS (no RAM blocks known)
    assert row["guests_ram"] == 350 << 20
    assert row["rss.a"] == 300 << 20 and row["guest_ram.a"] == 200 << 20 and "guest_ram.b" not in row
    assert row["budget"] == 1 << 30 and row["budget_available"] == (1 << 30) - (350 << 20)
    assert footprint(None, None) is None and footprint(5, 3) == 3 and footprint(5, None) == 5
    # a guest the host cannot see (a remote one): the budget's use is unknown, never read as 0
    unseen = reader.read({"a": (300 << 20, 200 << 20), "remote": (None, None)}, budget=1 << 30)
    assert unseen["guests"] == 2 and unseen["guests_rss"] == 300 << 20 and "rss.remote" not in unseen
    assert "guests_ram" not in unseen and "budget_available" not in unseen and unseen["budget"] == 1 << 30


def test_a_host_without_psi_or_ksm_leaves_those_columns_missing_not_zero(tmp_path):
    row = HostReader("h", root=fake_root(tmp_path, psi=False, ksm=False)).read()
    assert not any(key.startswith(("psi_", "ksm_")) for key in row)
    assert row["guests"] == 0 and row["guests_rss"] == 0 and "budget" not in row


def test_the_real_host_row_agrees_with_proc_meminfo():
    row = HostReader().read()
    total_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemTotal:")).split()[1])
    assert row["mem_total"] == total_kib * 1024
    assert 0 < row["mem_available"] <= row["mem_total"]  # type: ignore[operator]
    assert row["pgfault"] > 0  # type: ignore[operator]
    if Path("/proc/pressure/memory").exists():
        assert 0.0 <= row["psi_some_avg10"] <= 100.0  # type: ignore[operator]
    assert set(row) - {"host"} <= set(HOST_FRAME)


async def test_the_sampler_writes_the_host_table_on_its_interval_and_load_run_reads_it(tmp_path):
    run_dir = tmp_path / "run"
    sampler = Sampler(run_dir=run_dir, host_interval_s=0.1, host_budget=512 << 20, flush_interval_s=0.2)
    await sampler.start()
    await asyncio.sleep(1.05)
    sampler.host_budget = 256 << 20
    await asyncio.sleep(0.5)
    live = sampler.host_frame()
    await sampler.stop()
    run = load_run(run_dir)
    # about 15 reads on the 0.1 s grid plus the last one at stop
    assert 13 <= len(run.host) <= 18 and len(run.host) >= len(live)
    assert list(run.host.columns) == list(HOST_FRAME)
    assert isinstance(run.host.index, pd.DatetimeIndex) and str(run.host.index.tz) == "UTC"
    assert run.host.index.is_monotonic_increasing
    assert str(run.host["host"].dtype) == "category"
    budgets = run.host["budget"].astype("int64")
    assert set(budgets) == {512 << 20, 256 << 20} and budgets.is_monotonic_decreasing
    assert (run.host["budget_available"] == run.host["budget"] - run.host["guests_ram"]).all()
    assert (run.host["mem_total"] > 0).all()
    assert (run.host.index.to_series().diff().dropna().dt.total_seconds() < 0.5).all()


async def test_a_sampler_without_a_host_frame_says_so():
    sampler = Sampler(host_interval_s=None)
    assert sampler.host_frame().empty and not sampler.has_host
    with pytest.raises(RuntimeError, match="host_interval_s=None"):
        sampler.host_budget = 1 << 30
    with pytest.raises(ValueError, match="host_interval_s"):
        Sampler(host_interval_s=0)
    with pytest.raises(ValueError, match="bytes above 0"):
        Sampler().host_budget = -5
