"""Where a QEMU keeps guest RAM and its TCG buffer in its address space, asked over QMP.

Guest RAM lives in RAM blocks, one per memory backend (``query-memdev``: the machine's
``pc.ram`` for ``-m``, each NUMA node's or memory device's backend); the block's name is the
backend's id, behind the device's path for a memory device (``0000:00:02.0/vmem0``). HMP's
``info ramblock`` (through QMP's ``human-monitor-command``) lists every block's size, and from
QEMU 8.1 on its host address (an ``HVA`` column). QEMU 7.2 prints no address: there the guest
physical address where the backend is mapped comes from the flat view of the system address
space (``info mtree -f``, which names each range's region and its offset in it) and HMP's
``gpa2hva`` turns it into the host address (minus that offset: the block's start). Both ways
are checked against ``/proc/PID/maps``: QEMU maps each block as one mapping of exactly its
size (``MappedRange.exact``). The TCG buffer is found in the maps alone
(:func:`~balloonlab.model.procfs.tcg_ranges`).

Runs over any :class:`~balloonlab.qemu.transport.QMPTransport`: balloonlab's own monitor or
libvirt's QMP passthrough.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from balloonlab.model.errors import BalloonLabError
from balloonlab.model.guest import VmemDevice
from balloonlab.model.procfs import HostLayout, MappedRange, Vma, read_vmas, tcg_ranges
from balloonlab.qemu.transport import QMPTransport

__all__ = ["RamBlock", "host_layout", "parse_flatview", "parse_ramblocks", "vmem_devices"]

_RAMBLOCK = re.compile(r"^\s*(\S+)\s+\d+ \w+\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)"
                       r"(?:\s+(0x[0-9a-f]+))?(?:\s+(rw|ro))?\s*$", re.M)
_FLAT_RANGE = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [^)]*\): (\S+)(?: @([0-9a-f]+))?")
_GPA2HVA = re.compile(r"Host virtual address for \S+ \((.*)\) is (0x[0-9a-f]+)")


@dataclass(frozen=True)
class RamBlock:
    """A line of ``info ramblock``: name, bytes in use and mapped, host address (QEMU >= 8.1)."""

    name: str
    used: int
    total: int
    hva: int | None = None

    def backend(self, memdevs: set[str] | list[str] | tuple[str, ...]) -> str | None:
        """The memory backend id this block belongs to (None for ROMs, firmware, VRAM...).

        A memory device's block is named ``<device path>/<id>``; ROM blobs are ``/rom@...``.
        """
        for memdev in memdevs:
            if self.name == memdev or (self.name.endswith("/" + memdev) and not self.name.startswith("/")):
                return memdev
        return None


def parse_ramblocks(text: str) -> list[RamBlock]:
    """``info ramblock``'s table (QEMU 7.2: no HVA column; 8.1+: HVA and RO)."""
    return [RamBlock(m[1], int(m[3], 16), int(m[4], 16), int(m[5], 16) if m[5] else None)
            for m in _RAMBLOCK.finditer(text)]


def parse_flatview(text: str) -> dict[str, tuple[int, int]]:
    """From ``info mtree -f``: region name -> (guest physical address, offset in the region)
    of the first range of the system address space (``AS "memory"``) it backs."""
    out: dict[str, tuple[int, int]] = {}
    in_memory = listing = False
    for line in text.splitlines():
        if line.startswith("FlatView"):
            in_memory = listing = False
        elif line.startswith(" AS "):
            in_memory = in_memory or line.startswith(' AS "memory"')
        elif line.startswith(" Root memory region"):
            listing = in_memory
        elif listing and (m := _FLAT_RANGE.match(line)):
            out.setdefault(m[3], (int(m[1], 16), int(m[4] or "0", 16)))
    return out


async def _hmp(transport: QMPTransport, command: str) -> str:
    return str(await transport.execute("human-monitor-command", {"command-line": command}))


async def host_layout(transport: QMPTransport, pid: int, previous: HostLayout | None = None) -> HostLayout:
    """Guest RAM blocks (one range per memory backend) and the TCG buffer of QEMU ``pid``.

    :param previous: a layout found before: kept as it is when the process and its memory
        backends are the same (one ``query-memdev``, so a guest can check every minute).
    :raises CommandError: QEMU refused a command (e.g. passthrough not allowed).
    :raises BalloonLabError: a memory backend whose host address cannot be found.
    """
    memdevs = tuple(sorted(str(m["id"]) for m in await transport.execute("query-memdev") if "id" in m))
    if previous is not None and previous.pid == pid and previous.memdevs == memdevs:
        return previous
    blocks = [b for b in parse_ramblocks(await _hmp(transport, "info ramblock")) if b.backend(memdevs)]
    how = "info ramblock (HVA column)"
    if any(b.hva is None for b in blocks):  # QEMU < 8.1
        how = "info mtree -f + gpa2hva"
        flat = parse_flatview(await _hmp(transport, "info mtree -f"))
        found = []
        for block in blocks:
            memdev = block.backend(memdevs) or block.name
            if memdev not in flat:  # a backend nothing maps (not guest RAM yet)
                continue
            gpa, offset = flat[memdev]
            reply = await _hmp(transport, f"gpa2hva {gpa:#x}")
            match = _GPA2HVA.search(reply)
            if match is None or match[1] != memdev:
                raise BalloonLabError(f"gpa2hva {gpa:#x} did not name memory backend {memdev}: {reply.strip()!r}")
            found.append(RamBlock(block.name, block.used, block.total, int(match[2], 16) - offset))
        blocks = found
    vmas = read_vmas(pid)
    ram = tuple(MappedRange(b.backend(memdevs) or b.name, b.hva, b.total, _exact(vmas, b.hva, b.total))
                for b in blocks if b.hva is not None)
    return HostLayout(pid, ram, tcg_ranges(vmas), how, memdevs)


def _exact(vmas: list[Vma], start: int, size: int) -> bool:
    """True when one mapping is exactly ``[start, start + size)``."""
    return any(v.start == start and v.end - v.start == size for v in vmas)


async def vmem_devices(transport: QMPTransport) -> list[VmemDevice]:
    """The guest's virtio-mem devices as the sample columns need them (one
    ``query-memory-devices``): (id, plugged, requested, backend size) in bytes."""
    return [(str(d["id"]), int(d["size"]), int(d["requested-size"]), int(d["max-size"]))
            for entry in await transport.execute("query-memory-devices")
            if entry.get("type") == "virtio-mem" and (d := entry["data"])]
