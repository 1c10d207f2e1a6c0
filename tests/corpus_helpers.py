"""Reading libvirt's expected QEMU command lines (its test ``.args`` files) for comparison with ours.

Shared by tests/test_command.py (the excerpt in ../shared) and tests/test_libvirt_corpus.py
(libvirt's whole corpus from Debian's source package).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from balloonlab.domain import DomainSpec

#: The balloon ``-device`` properties that place it on a bus.
ADDRESS_KEYS = ("bus", "addr", "devno")
_SIZE = re.compile(r"(?:size=)?(\d+)([kKmMgGtT]?)")
_KIB_PER = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}


def read_args(path: Path) -> list[str]:
    """A libvirt ``.args`` file (environment, binary and options, one per continued line) as argv."""
    return shlex.split(path.read_text().replace("\\\n", " "))


def option(argv: list[str], name: str) -> str | None:
    """The value after the first ``name`` in ``argv``; None when it is not there."""
    return argv[argv.index(name) + 1] if name in argv else None


def libvirt_balloon(argv: list[str]) -> dict[str, object] | None:
    """The balloon's JSON ``-device`` properties in a libvirt argv; None without one."""
    devices = [json.loads(argv[i + 1]) for i, arg in enumerate(argv)
               if arg == "-device" and argv[i + 1].startswith("{")]
    balloons = [d for d in devices if d["driver"].startswith("virtio-balloon")]
    assert len(balloons) <= 1
    return balloons[0] if balloons else None


def comparable_balloon(spec: DomainSpec, argv: list[str]) -> dict[str, object] | None:
    """libvirt's balloon ``-device`` as balloonlab's :func:`balloon_device` should write it.

    Where the XML gives no address or an empty PCI one, all 0 (libvirt placed the device
    itself), or a virtio-mmio one (no bus address), balloonlab leaves placement to QEMU: the
    address keys are dropped.
    """
    theirs = libvirt_balloon(argv)
    balloon = spec.memballoon
    address = balloon.address if balloon is not None else None
    if theirs is not None and (address is None or address.type == "virtio-mmio"
                               or not address.placed):
        theirs = {k: v for k, v in theirs.items() if k not in ADDRESS_KEYS}
    return theirs


def memory_kib(value: str) -> int:
    """The initial memory of a ``-m`` value in KiB: ``size=219136k,slots=..`` or libvirt 9's ``214`` (MiB)."""
    match = _SIZE.fullmatch(value.split(",")[0])
    if match is None:
        raise ValueError(f"-m {value!r} has no size")
    return int(match.group(1)) * _KIB_PER[(match.group(2) or "M").upper()]


def normalized_memory_option(value: str) -> str:
    """A libvirt ``-m`` value as libvirt >= 9 writes it: ``size=<KiB>k`` with the rest as is.

    libvirt 9 still writes a plain ``-m 214`` (MiB) when there is no ``<maxMemory>``; with it
    (and always in 11) it writes ``size=219136k,slots=16,maxmem=1099511627776k``, which is
    what :func:`balloonlab.qemu.argv.memory_option` writes.
    """
    rest = value.split(",", 1)[1:]
    return ",".join([f"size={memory_kib(value)}k", *rest])


#: Memory backend properties libvirt writes for what balloonlab does not set up: hugepages,
#: file or memfd backing, sharing, preallocation, discard, alignment (``<memoryBacking>``,
#: ``<source><pagesize>``, memAccess, discard). balloonlab backs all guest memory with
#: ``memory-backend-ram`` (see balloonlab/qemu/memory_argv.py); the rest must be libvirt's.
BACKING_ONLY = frozenset({"mem-path", "share", "prealloc", "prealloc-context", "prealloc-threads", "discard-data",
                          "hugetlb", "hugetlbsize", "align", "pmem"})
MEMORY_DEVICES = frozenset({"virtio-mem-pci", "pc-dimm", "nvdimm", "virtio-pmem-pci"})
#: The backends of guest RAM: NUMA cells' and memory devices' (libvirt's ids).
GUEST_RAM_BACKEND = re.compile(r"ram-node\d+|mem(dimm|nvdimm|virtiomem|virtiopmem)\d+")


def memory_lines(argv: list[str], placement: bool = True) -> list[str]:
    """The memory a command line gives the guest: ``-numa node`` lines, memory backends and
    memory devices, with libvirt's backing-only properties (:data:`BACKING_ONLY`) taken out,
    every backend written as ``memory-backend-ram``, the NUMA cells' ``<numatune><memnode>``
    host policy, HMAT initiators, ``-numa dist``/``hmat-*`` and backends of anything but guest RAM
    (libvirt's explicit ``pc.ram``, pstore, ivshmem) left out (balloonlab renders none of them); without ``placement`` the memory
    devices' bus and addr too (libvirt placed them)."""
    lines = []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-numa" and value.startswith("node,"):
            lines.append("-numa " + ",".join(p for p in value.split(",") if not p.startswith("initiator=")))
        elif flag in ("-object", "-device") and value.startswith("{"):
            props = json.loads(value)
            if flag == "-object" and str(props.get("qom-type", "")).startswith("memory-backend"):
                if not GUEST_RAM_BACKEND.fullmatch(str(props.get("id"))):
                    continue  # libvirt's explicit pc.ram (QEMU names -m's implicit one so), pstore, ivshmem
                props = {k: v for k, v in props.items() if k not in BACKING_ONLY}
                props["qom-type"] = "memory-backend-ram"
                if str(props.get("id", "")).startswith("ram-node"):  # <numatune><memnode>
                    props.pop("host-nodes", None)
                    props.pop("policy", None)
            elif flag == "-device" and props.get("driver") in MEMORY_DEVICES:
                props.pop("prealloc", None)  # libvirt preallocates what it backs with hugepages
                if not placement:
                    props.pop("bus", None)
                    props.pop("addr", None)
            else:
                continue
            lines.append(f"{flag} {json.dumps(props, separators=(',', ':'))}")
    return lines
