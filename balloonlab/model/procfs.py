"""Reading host processes from /proc: command lines, run state, RSS, and QEMU's memory as the
host sees it.

The QEMU registry, libvirt's pid lookup and the sampler's ``rss`` column all ask the same
questions of /proc; the answers (and their edge cases: a command name with spaces or ``)``,
a zombie that is gone but not reaped) are written here once. The host's view of a guest's
memory (:class:`HostMemoryReader`) is here too: ``/proc/PID/smaps_rollup`` (every field, in
bytes) and the resident bytes of the address ranges a :class:`HostLayout` names (guest RAM
blocks, the TCG translation buffer), counted with the ``PAGEMAP_SCAN`` ioctl.

Why these reads, measured on a 512 MiB TCG guest holding 128 MiB (about 330 MiB RSS, 320
mappings; CPU per read): ``smaps_rollup`` 620-810 us (a walk of every page table: it grows with
resident memory), ``/proc/PID/smaps`` 1.6-2.1 ms before any parsing, ``numa_maps`` 1.0-1.3 ms,
a ``pagemap`` read of the 512 MiB RAM range 1.3-1.6 ms (and it counts zero-page mappings that
Rss does not), ``PAGEMAP_SCAN`` of the same range 19 us and of the 1 GiB TCG buffer 18 us,
equal to smaps' Rss of those mappings to the page. So a sample reads ``smaps_rollup`` once and
scans only the ranges; before Linux 6.7 (no ``PAGEMAP_SCAN``) the ranges' Rss comes from one
read of ``/proc/PID/smaps`` (4 ms parsed, six times a rollup), at most every 10 s by default.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from balloonlab.model.schema import HOST_ROLLUP

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces and ')')."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_args(pid: int) -> list[bytes] | None:
    """The argv of a live (not zombie) process; None when it is gone or unreadable."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":  # exited, waiting to be reaped by its parent
        return None
    return args[:-1] if args and args[-1] == b"" else args


def process_rss_bytes(pid: int) -> int | None:
    """RSS of a host process as libvirt computes it (``/proc/PID/stat`` field 24 x page size)."""
    fields = _stat_fields(pid)
    return int(fields[21]) * _PAGE_SIZE if fields is not None else None


class _KeptOpen:
    """One /proc/PID file kept open per pid: a read is one ``pread``, with no path lookup or
    open per sample. Once the process is gone (reaped) the open file reads as ESRCH (or
    nothing), so a pid the kernel hands to a newcomer is never read as this process. Asked
    about another pid, it opens that one's file instead."""

    def __init__(self, name: str = "stat") -> None:
        self._name = name
        self.pid: int | None = None
        self._fd: int | None = None

    def _file(self, pid: int | None) -> int | None:
        """The open file of ``pid`` (opened now if it is another pid than last time)."""
        if pid != self.pid:
            self.close()
            self.pid = pid
            with contextlib.suppress(OSError):
                self._fd = os.open(f"/proc/{pid}/{self._name}", os.O_RDONLY | os.O_CLOEXEC) if pid is not None else None
        return self._fd

    def _read(self, pid: int | None, size: int = 4096) -> bytes | None:
        """Up to ``size`` bytes of the file from its start; None once the process is gone."""
        fd = self._file(pid)
        if fd is None:
            return None
        try:
            data = os.pread(fd, size, 0)
        except OSError:
            return None
        return data or None

    def close(self) -> None:
        """Close the file (idempotent; the next read opens it again)."""
        fd, self._fd, self.pid = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


class ProcessStat(_KeptOpen):
    """``/proc/PID/stat`` of one process through a file kept open (see :class:`_KeptOpen`)."""

    def rss_bytes(self, pid: int | None) -> int | None:
        """RSS of ``pid`` as :func:`process_rss_bytes` gives it; None once it is gone."""
        data = self._read(pid)
        return int(data[data.rindex(b")") + 2:].split()[21]) * _PAGE_SIZE if data is not None else None


def parse_smaps_rollup(data: bytes) -> dict[str, int]:
    """``/proc/PID/smaps_rollup``'s fields in bytes, under the kernel's names (``Rss``, ``Pss``,
    ``Pss_Anon``, ``Anonymous``, ``AnonHugePages``, ``Swap``, ``SwapPss``, ``Locked``...: every
    ``Name: N kB`` line the running kernel writes; the first line, the address span, is skipped)."""
    out: dict[str, int] = {}
    for line in data.split(b"\n")[1:]:
        name, _, rest = line.partition(b":")
        value = rest.split()
        if value and value[0].isdigit():
            out[name.decode()] = int(value[0]) * (1024 if value[1:] == [b"kB"] else 1)
    return out


class SmapsRollup(_KeptOpen):
    """``/proc/PID/smaps_rollup`` through a file kept open: one ``pread`` a sample."""

    def __init__(self) -> None:
        super().__init__("smaps_rollup")

    def read(self, pid: int | None) -> dict[str, int] | None:
        """Every field in bytes (:func:`parse_smaps_rollup`); None once the process is gone."""
        data = self._read(pid)
        return parse_smaps_rollup(data) if data is not None else None


@dataclass(frozen=True)
class Vma:
    """One line of ``/proc/PID/maps``: ``[start, end)``, permissions (``rwxp``) and path."""

    start: int
    end: int
    perms: str
    path: str


def read_vmas(pid: int) -> list[Vma]:
    """The mappings of ``pid`` in address order (empty when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    vmas = []
    for line in text.splitlines():
        span, perms, _offset, _dev, _inode, *path = line.split(maxsplit=5)
        start, end = (int(a, 16) for a in span.split("-"))
        vmas.append(Vma(start, end, perms, path[0] if path else ""))
    return vmas


@dataclass(frozen=True)
class MappedRange:
    """An address range of a process: a RAM block's mapping or part of the TCG buffer.

    :param name: the RAM block's memory backend id, or ``"tcg"``.
    :param exact: True when one mapping (VMA) is exactly this range, as QEMU maps a RAM block.
    """

    name: str
    start: int
    size: int
    exact: bool = True

    @property
    def end(self) -> int:
        return self.start + self.size


def tcg_ranges(vmas: list[Vma]) -> tuple[MappedRange, ...]:
    """QEMU's TCG translation buffer in a process's mappings (empty without TCG).

    Seen on QEMU 7.2 and 10.0 (x86-64 host): by default one anonymous ``rwxp`` mapping of
    ``tb-size`` (1 GiB, ``-accel tcg,tb-size=N`` MiB) less the one-page guard after it; with
    several vCPU threads (MTTCG) one ``rwxp`` mapping per region (16 x 64 MiB for 2 vCPUs),
    each followed by its guard page; with ``split-wx=on`` a memfd named ``tcg-jit`` mapped
    twice, ``rw-s`` and ``r-xs``. Nothing else in QEMU maps anonymous memory executable. Ranges
    that touch, or are one guard page apart, are merged (one scan covers them).
    """
    out: list[MappedRange] = []
    for v in vmas:
        if not ((v.perms == "rwxp" and not v.path)
                or (v.path.startswith("/memfd:tcg-jit") and v.perms[:3] != "---")):
            continue
        if out and v.start - out[-1].end in (0, _PAGE_SIZE):
            out[-1] = MappedRange("tcg", out[-1].start, v.end - out[-1].start, exact=False)
        else:
            out.append(MappedRange("tcg", v.start, v.end - v.start))
    return tuple(out)


@dataclass(frozen=True)
class HostLayout:
    """Where a QEMU keeps guest RAM and its TCG buffer: what :class:`HostMemoryReader` splits by.

    :param pid: the QEMU process.
    :param ram: one range per memory backend (boot RAM, NUMA nodes, memory devices' backends).
    :param tcg: the translation buffer's ranges (none under KVM).
    :param how: how the RAM blocks' addresses were found (for the record).
    """

    pid: int
    ram: tuple[MappedRange, ...]
    tcg: tuple[MappedRange, ...]
    how: str = ""
    memdevs: tuple[str, ...] = ()

    @property
    def ram_size(self) -> int:
        """Bytes of guest RAM mapped: every memory backend's size."""
        return sum(r.size for r in self.ram)


# PAGEMAP_SCAN (Linux 6.7, fs/proc/task_mmu.c): _IOWR('f', 16, struct pm_scan_arg), 96 bytes.
_PAGEMAP_SCAN = (3 << 30) | (96 << 16) | (ord("f") << 8) | 16
_PAGE_IS_PRESENT, _PAGE_IS_PFNZERO = 1 << 3, 1 << 5
_SCAN_ARG = struct.Struct("<12Q")
_REGIONS = 4096  # page_region {start, end, categories} per ioctl


class _ResidentCounter:
    """Resident bytes of address ranges of one process, as smaps' ``Rss`` counts them.

    ``PAGEMAP_SCAN`` on a kept-open ``/proc/PID/pagemap`` walks only the ranges' page tables
    and returns runs of present pages (the shared zero page excluded, as Rss excludes it).
    Where the kernel lacks the ioctl (before 6.7: ENOTTY), one read of ``/proc/PID/smaps``
    sums the Rss of the mappings inside the ranges instead (``use_scan=False`` forces that).
    """

    def __init__(self, use_scan: bool = True) -> None:
        self.use_scan = use_scan
        self._pagemap = _KeptOpen("pagemap")
        self._smaps = _KeptOpen("smaps")
        self._vec = (ctypes.c_uint64 * (3 * _REGIONS))()
        self._regions = memoryview(self._vec).cast("B").cast("Q")

    def resident(self, pid: int, ranges: tuple[MappedRange, ...]) -> list[int] | None:
        """Resident bytes in each range; None once the process is gone."""
        if self.use_scan:
            fd = self._pagemap._file(pid)
            try:
                return [self._scan(fd, r) for r in ranges] if fd is not None else None
            except OSError as exc:
                if exc.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    return None
                self.use_scan = False  # no PAGEMAP_SCAN in this kernel: smaps from now on
        return self._from_smaps(pid, ranges)

    def _scan(self, fd: int, r: MappedRange) -> int:
        total, start = 0, r.start
        while start < r.end:
            arg = bytearray(_SCAN_ARG.pack(96, 0, start, r.end, 0, ctypes.addressof(self._vec), _REGIONS, 0,
                                           _PAGE_IS_PFNZERO, _PAGE_IS_PFNZERO, _PAGE_IS_PRESENT, _PAGE_IS_PRESENT))
            n = fcntl.ioctl(fd, _PAGEMAP_SCAN, arg, True)
            regions = self._regions[:3 * n]
            total += sum(regions[1::3]) - sum(regions[0::3])
            walked = _SCAN_ARG.unpack(arg)[4]
            if n < _REGIONS or walked <= start:
                break
            start = walked
        return total

    def _from_smaps(self, pid: int, ranges: tuple[MappedRange, ...]) -> list[int] | None:
        fd = self._smaps._file(pid)
        if fd is None:
            return None
        chunks, offset = [], 0
        try:
            while chunk := os.pread(fd, 1 << 20, offset):
                chunks.append(chunk)
                offset += len(chunk)
        except OSError:
            return None
        out = [0] * len(ranges)
        start = -1
        for match in _SMAPS_LINE.finditer(b"".join(chunks)):
            if match.group(1) is not None:
                start = int(match.group(1), 16)
                continue
            for i, r in enumerate(ranges):
                if r.start <= start < r.end:
                    out[i] += int(match.group(2)) * 1024
        return out if offset else None

    def close(self) -> None:
        self._pagemap.close()
        self._smaps.close()


_SMAPS_LINE = re.compile(rb"^([0-9a-f]+)-[0-9a-f]+ |^Rss: +(\d+) kB", re.M)


@dataclass(frozen=True)
class HostMemory:
    """A QEMU's memory as the host sees it, in bytes, from one :meth:`HostMemoryReader.read`.

    :param rollup: every field of ``/proc/PID/smaps_rollup``, kernel names, bytes.
    :param ram_blocks: resident bytes per memory backend (empty when the layout is unknown).
    :param tcg: resident bytes of the TCG translation buffer (None when the layout is unknown;
        0 under KVM).
    :param ram_size: bytes of guest RAM mapped (every memory backend's size), when known.
    """

    rollup: Mapping[str, int]
    ram_blocks: Mapping[str, int] = field(default_factory=dict)
    tcg: int | None = None
    ram_size: int | None = None

    @property
    def rss(self) -> int | None:
        """``Rss``: every page mapped, shared ones in full (a page mapped twice counts twice)."""
        return self.rollup.get("Rss")

    @property
    def guest_ram(self) -> int | None:
        """Resident bytes inside guest RAM (every memory backend), None when the layout is unknown."""
        return sum(self.ram_blocks.values()) if self.tcg is not None else None

    @property
    def other(self) -> int | None:
        """The rest of ``Rss``: QEMU's heap, libraries, stacks, ROMs and device memory. The
        rollup and the ranges are read a few microseconds apart: clamped at 0 in case a
        guest's touch between them made the ranges outgrow the rollup."""
        rss, ram = self.rss, self.guest_ram
        if rss is None or ram is None or self.tcg is None:
            return None
        return max(0, rss - ram - self.tcg)

    def columns(self) -> dict[str, int | None]:
        """The sample columns (:data:`~balloonlab.model.schema.HOST_COLUMNS`) of this read."""
        row: dict[str, int | None] = {column: self.rollup.get(name) for column, name in HOST_ROLLUP.items()}
        row.update(host_ram_size=self.ram_size, host_guest_ram=self.guest_ram, host_tcg=self.tcg,
                   host_other=self.other)
        return row


class HostMemoryReader:
    """The host's view of one QEMU per read: ``smaps_rollup`` (one ``pread`` of a kept-open
    file) and, given a :class:`HostLayout`, the resident bytes of guest RAM and the TCG buffer
    (one ``PAGEMAP_SCAN`` per range). The rollup is read first, then the ranges.

    :param use_scan: False counts the ranges from ``/proc/PID/smaps`` (what kernels before
        6.7 get anyway).
    :param smaps_every_s: without ``PAGEMAP_SCAN`` the split costs a read of the whole
        ``/proc/PID/smaps`` (4 ms, parsed, against 0.04 ms scanned, on a 512 MiB guest): it is
        then read at most this often, and reads in between have the rollup without the split.
    """

    def __init__(self, use_scan: bool = True, smaps_every_s: float = 10.0) -> None:
        self._rollup = SmapsRollup()
        self._resident = _ResidentCounter(use_scan)
        self.smaps_every_s = smaps_every_s
        self._smaps_due = 0.0

    @property
    def uses_scan(self) -> bool:
        """True while ranges are counted with ``PAGEMAP_SCAN`` (False: from smaps)."""
        return self._resident.use_scan

    def read(self, pid: int | None, layout: HostLayout | None = None) -> HostMemory | None:
        """One read of ``pid``; the split only when ``layout`` is of that pid. None when gone."""
        rollup = self._rollup.read(pid)
        if rollup is None or pid is None:
            return None
        if layout is None or layout.pid != pid:
            return HostMemory(rollup)
        if not self._resident.use_scan:
            if time.monotonic() < self._smaps_due:
                return HostMemory(rollup)
            self._smaps_due = time.monotonic() + self.smaps_every_s
        resident = self._resident.resident(pid, layout.ram + layout.tcg)
        if resident is None:
            return HostMemory(rollup)
        blocks: dict[str, int] = {}
        for r, n in zip(layout.ram, resident, strict=False):
            blocks[r.name] = blocks.get(r.name, 0) + n
        return HostMemory(rollup, blocks, sum(resident[len(layout.ram):]), layout.ram_size)

    def close(self) -> None:
        """Close the files kept open (idempotent)."""
        self._rollup.close()
        self._resident.close()
