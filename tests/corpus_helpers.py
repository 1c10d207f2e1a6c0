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

    Where the XML gives no address or a PCI one without a slot (libvirt placed the device
    itself), or a virtio-mmio one (no bus address), balloonlab leaves placement to QEMU: the
    address keys are dropped.
    """
    theirs = libvirt_balloon(argv)
    balloon = spec.memballoon
    address = balloon.address if balloon is not None else None
    if theirs is not None and (address is None or address.type == "virtio-mmio"
                               or address.type == "pci" and address.slot is None):
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
