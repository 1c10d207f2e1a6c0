"""/proc readings: the kept-open /proc/PID/stat the sampler reads rss through, and the host's
view of a QEMU's memory (smaps_rollup, the TCG buffer in the maps, RAM blocks as QEMU lists
them, resident bytes per address range)."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import time
from pathlib import Path

from balloonlab.model.procfs import (HostLayout, HostMemory, HostMemoryReader, MappedRange, ProcessStat, SmapsRollup,
                                     Vma, _ResidentCounter, parse_smaps_rollup, process_rss_bytes, tcg_ranges)
from balloonlab.model.schema import HOST_COLUMNS
from balloonlab.qemu.host_memory import RamBlock, parse_flatview, parse_ramblocks


def settled(pid: int) -> None:
    """Wait until a just-started ``sleep`` sleeps: its loader is done, its RSS stops moving."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
        assert time.monotonic() < deadline, "the child never went to sleep"
        time.sleep(0.01)


def test_a_kept_open_stat_reads_what_a_fresh_open_reads_and_none_once_the_process_is_gone():
    child = subprocess.Popen(["sleep", "30"])
    stat = ProcessStat()
    try:
        settled(child.pid)
        first = stat.rss_bytes(child.pid)
        fd = stat._fd
        assert first is not None and first == process_rss_bytes(child.pid) and first > 0
        for _ in range(5):  # the same open file, read again: no open per read
            assert stat.rss_bytes(child.pid) == first and stat._fd == fd
        assert os.readlink(f"/proc/self/fd/{fd}") == f"/proc/{child.pid}/stat"
    finally:
        child.kill()
        child.wait()
    assert stat.rss_bytes(child.pid) is None  # reaped: ESRCH through the open file, not a newcomer's numbers
    other = subprocess.Popen(["sleep", "30"])
    try:
        settled(other.pid)
        assert stat.rss_bytes(other.pid) == process_rss_bytes(other.pid)  # another pid: its own file
    finally:
        other.kill()
        other.wait()
        stat.close()
    assert stat.rss_bytes(None) is None


# -- the host's view: smaps_rollup, the TCG buffer, RAM blocks, resident bytes per range ------

ROLLUP = b"""55d0c0a00000-7ffd3e5f1000 ---p 00000000 00:00 0                          [rollup]
Rss:              298900 kB
Pss:              296708 kB
Pss_Anon:         275204 kB
Anonymous:        275204 kB
AnonHugePages:    241664 kB
Swap:                 12 kB
Locked:                0 kB
"""


def test_smaps_rollup_fields_are_parsed_to_bytes_under_the_kernels_names():
    assert parse_smaps_rollup(ROLLUP) == {"Rss": 298900 * 1024, "Pss": 296708 * 1024, "Pss_Anon": 275204 * 1024,
                                          "Anonymous": 275204 * 1024, "AnonHugePages": 241664 * 1024,
                                          "Swap": 12 * 1024, "Locked": 0}
    mine = parse_smaps_rollup(Path("/proc/self/smaps_rollup").read_bytes())
    assert {"Rss", "Pss", "Anonymous", "Swap"} <= set(mine) and mine["Rss"] > 0 and mine["Pss"] <= mine["Rss"]


def test_a_kept_open_smaps_rollup_reads_its_process_and_none_once_it_is_gone():
    child = subprocess.Popen(["sleep", "30"])
    rollup = SmapsRollup()
    try:
        settled(child.pid)
        first = rollup.read(child.pid)
        assert first is not None and first["Rss"] == parse_smaps_rollup(
            Path(f"/proc/{child.pid}/smaps_rollup").read_bytes())["Rss"]
        assert first["Rss"] > 0 and os.readlink(f"/proc/self/fd/{rollup._fd}") == f"/proc/{child.pid}/smaps_rollup"
    finally:
        child.kill()
        child.wait()
    assert rollup.read(child.pid) is None
    rollup.close()


PAGE = os.sysconf("SC_PAGE_SIZE")


def test_the_tcg_buffer_is_found_in_the_maps_in_each_layout_qemu_uses():
    gib = 1 << 30
    heap = Vma(0x1000_0000, 0x1100_0000, "rw-p", "[heap]")
    default = [heap, Vma(0x7f00_0000_0000, 0x7f00_0000_0000 + gib - PAGE, "rwxp", ""),
               Vma(0x7f00_0000_0000 + gib - PAGE, 0x7f00_0000_0000 + gib, "---p", ""),
               Vma(0x7f10_0000_0000, 0x7f10_0001_0000, "r-xp", "/usr/lib/libc.so.6")]
    assert tcg_ranges(default) == (MappedRange("tcg", 0x7f00_0000_0000, gib - PAGE),)
    region = 64 << 20  # MTTCG: one rwxp region per 64 MiB, a guard page after each
    mttcg = []
    for i in range(3):
        start = 0x7f00_0000_0000 + i * region
        mttcg += [Vma(start, start + region - PAGE, "rwxp", ""), Vma(start + region - PAGE, start + region, "---p", "")]
    assert tcg_ranges(mttcg) == (MappedRange("tcg", 0x7f00_0000_0000, 3 * region - PAGE, exact=False),)
    split_wx = [Vma(0x7e00_0000_0000, 0x7e00_4000_0000, "rw-s", "/memfd:tcg-jit (deleted)"),
                Vma(0x7e80_0000_0000, 0x7e80_4000_0000, "r-xs", "/memfd:tcg-jit (deleted)")]
    assert tcg_ranges(split_wx) == (MappedRange("tcg", 0x7e00_0000_0000, gib),
                                    MappedRange("tcg", 0x7e80_0000_0000, gib))
    assert tcg_ranges([heap]) == ()  # KVM: no translation buffer


# `info ramblock` as QEMU 7.2 and 10.0 print it (a NUMA node's backend and a virtio-mem device's)
RAMBLOCK_72 = """\
              Block Name    PSize              Offset               Used              Total
               ram-node0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000
     0000:00:02.0/memvm0    4 KiB  0x0000000008000000 0x0000000008000000 0x0000000008000000
    /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000
                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000
"""
RAMBLOCK_10 = """\
              Block Name    PSize              Offset               Used              Total                HVA  RO
               ram-node0    4 KiB  0x0000000000000000 0x0000000008000000 0x0000000008000000 0x00007efefbe00000  rw
     0000:00:02.0/memvm0    4 KiB  0x0000000008000000 0x0000000008000000 0x0000000008000000 0x00007efef3c00000  rw
    /rom@etc/acpi/tables    4 KiB  0x0000000010080000 0x0000000000020000 0x0000000000200000 0x00007eff48200000  ro
                 pc.bios    4 KiB  0x0000000010000000 0x0000000000040000 0x0000000000040000 0x00007eff48800000  ro
"""
# `info mtree -f` of the same QEMU 7.2 (trimmed: the I/O space and one empty view)
MTREE_72 = """\
FlatView #0
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #2
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): ram-node0
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom
  00000000000e0000-00000000000fffff (prio 0, rom): pc.bios @0000000000020000
  0000000000100000-0000000007ffffff (prio 0, ram): ram-node0 @0000000000100000
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-0000000107ffffff (prio 0, ram): memvm0

FlatView #3
 AS "i440FX", root: bus master container
 Root memory region: (none)
  No rendered FlatView
"""


def test_ram_blocks_are_parsed_with_and_without_host_addresses_and_matched_to_backends():
    mib128 = 128 << 20
    old, new = parse_ramblocks(RAMBLOCK_72), parse_ramblocks(RAMBLOCK_10)
    assert [b.name for b in old] == [b.name for b in new] == ["ram-node0", "0000:00:02.0/memvm0",
                                                              "/rom@etc/acpi/tables", "pc.bios"]
    assert old[0] == RamBlock("ram-node0", mib128, mib128, None)
    assert new[1] == RamBlock("0000:00:02.0/memvm0", mib128, mib128, 0x7EFEF3C00000)
    assert new[2].used == 0x20000 and new[2].total == 0x200000
    memdevs = ("memvm0", "ram-node0")
    assert [b.backend(memdevs) for b in new] == ["ram-node0", "memvm0", None, None]
    assert RamBlock("/rom@memvm0", 1, 1).backend(memdevs) is None  # a ROM named like a backend is no RAM


def test_the_flat_view_gives_each_backends_first_guest_address_and_offset_in_the_system_space_only():
    flat = parse_flatview(MTREE_72)
    assert flat["ram-node0"] == (0, 0) and flat["memvm0"] == (0x1_0000_0000, 0)
    assert flat["pc.bios"] == (0xE0000, 0x20000) and "dma-chan" not in flat  # I/O space left out


def _mapped(size: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


def test_resident_bytes_of_a_range_are_counted_by_pagemap_scan_and_by_smaps_alike():
    """A real mapping of this process: 12 MiB written, 4 MiB only read (the zero page: not
    resident, as smaps' Rss says), the rest untouched."""
    mib = 1 << 20
    buf, addr = _mapped(32 * mib)
    try:
        with contextlib.suppress(OSError):  # keep huge pages out: counts would be 2 MiB-grained
            ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(32 * mib), 15)
        for off in range(0, 12 * mib, PAGE):
            buf[off] = 1
        assert sum(buf[off] for off in range(16 * mib, 20 * mib, PAGE)) == 0
        pid = os.getpid()
        ranges = (MappedRange("ram", addr, 32 * mib), MappedRange("part", addr + 8 * mib, 8 * mib, exact=False))
        scan, smaps = _ResidentCounter(use_scan=True), _ResidentCounter(use_scan=False)
        try:
            assert scan.resident(pid, ranges) == [12 * mib, 4 * mib] and scan.use_scan  # 6.18: the ioctl exists
            # smaps counts whole mappings: the range that is one mapping agrees, the part does not split one
            assert smaps.resident(pid, ranges[:1]) == [12 * mib]
            layout = HostLayout(pid, ranges[:1], (MappedRange("tcg", addr + 16 * mib, 16 * mib),))
            reader = HostMemoryReader()
            host = reader.read(pid, layout)
            assert host is not None and host.ram_blocks == {"ram": 12 * mib} and host.tcg == 0
            assert host.guest_ram == 12 * mib and host.ram_size == 32 * mib
            cols = host.columns()
            assert set(cols) == set(HOST_COLUMNS) and cols["host_rss"] == host.rollup["Rss"] > 12 * mib
            assert cols["host_other"] == host.rollup["Rss"] - 12 * mib
            assert reader.read(pid).columns()["host_guest_ram"] is None  # no layout: the rollup alone
            reader.close()
        finally:
            scan.close()
            smaps.close()
    finally:
        buf.close()


def test_host_memory_bands_are_none_without_a_layout_and_other_never_negative():
    bare = HostMemory({"Rss": 100, "Pss": 90, "Anonymous": 80, "Swap": 0})
    cols = bare.columns()
    assert set(cols) == set(HOST_COLUMNS) and {k: cols[k] for k in ("host_rss", "host_pss", "host_anon", "host_swap")} \
        == {"host_rss": 100, "host_pss": 90, "host_anon": 80, "host_swap": 0}
    assert {k for k, v in cols.items() if v is None} == set(HOST_COLUMNS) - {"host_rss", "host_pss", "host_anon",
                                                                             "host_swap"}  # fields not read: NA
    raced = HostMemory({"Rss": 100}, {"ram": 90, "vmem": 8}, 5, 1000)  # a touch between rollup and scan
    assert raced.guest_ram == 98 and raced.other == 0


def test_virtio_mem_columns_sum_devices_and_name_each_one_when_there_are_several():
    from balloonlab.model.guest import vmem_columns
    mib = 1 << 20
    assert vmem_columns([]) == {}  # no device: NA columns
    assert vmem_columns([("vm0", 128 * mib, 256 * mib, 512 * mib)]) == {
        "vmem_size": 128 * mib, "vmem_requested": 256 * mib, "vmem_max_size": 512 * mib}
    two = vmem_columns([("vm0", 128 * mib, 128 * mib, 256 * mib), ("vm1", 0, 64 * mib, 128 * mib)])
    assert two == {"vmem_size": 128 * mib, "vmem_requested": 192 * mib, "vmem_max_size": 384 * mib,
                   "vmem_size.vm0": 128 * mib, "vmem_requested.vm0": 128 * mib,
                   "vmem_size.vm1": 0, "vmem_requested.vm1": 64 * mib}
