"""Domains booting the Debian guest image: libvirt domain XML with a ``<disk>``, as a user's own
image would have, that balloonlab's launcher and libvirt both boot as they are.

Every guest needs a disk of its own: two QEMUs writing one qcow2 would corrupt it (QEMU's image
locking refuses the second). So a domain boots a thin qcow2 overlay on the image's read-only
``base.qcow2``; :func:`debian_domain` makes a fresh overlay and the XML that boots it, wherever
the caller wants them (one per guest, or per run for a clean disk).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Protocol

from balloonlab.domain import (AGENT_CHANNEL, ChannelSpec, DiskSpec, DomainSpec, MemballoonSpec, SerialSpec,
                               render_domain_xml)
from balloonlab.model.errors import GuestImageError
from balloonlab.model.units import parse_size

__all__ = ["BootableImage", "debian_domain", "debian_domain_spec", "new_overlay"]


class BootableImage(Protocol):
    """What a domain needs of a built image (:class:`~balloonlab.image.debian.DebianImage`)."""

    @property
    def base(self) -> Path: ...
    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def cmdline(self) -> str: ...


def new_overlay(base: Path, overlay: Path) -> Path:
    """A fresh, empty qcow2 overlay on ``base`` (replacing any old one at that path).

    The backing file is recorded relative to the overlay when both share a folder, so the image
    directory can be moved (the build renames it into place) without breaking the chain.

    :raises GuestImageError: when qemu-img fails.
    """
    backing = base.name if base.parent.resolve() == overlay.parent.resolve() else str(base.resolve())
    overlay.unlink(missing_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(overlay)]
    try:
        proc = subprocess.run(argv, cwd=overlay.parent, capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError:
        raise GuestImageError("qemu-img is not installed (apt-get install qemu-utils)") from None
    if proc.returncode != 0:
        raise GuestImageError(f"cannot make the overlay {overlay}: {proc.stderr.strip()}")
    return overlay


def debian_domain_spec(*, kernel: Path, initrd: Path, cmdline: str, disk: Path, name: str = "debian",
                       memory: int | str = "1G", current_memory: int | str | None = None, vcpus: int = 1,
                       period_s: int | None = 2, agent_socket: Path | None = None,
                       emulator: str | None = None) -> DomainSpec:
    """The domain of a Debian guest booting ``disk`` (an overlay on the image's base).

    Direct kernel boot of the image's own kernel and initramfs (no bootloader: faster under TCG);
    the root file system is the qcow2 ``<disk>`` on virtio (``/dev/vda``). qemu-guest-agent is on
    a virtio-serial ``<channel>`` named ``org.qemu.guest_agent.0``, as libvirt users declare it.

    :param agent_socket: the host end of the agent's port; None leaves the path out, and libvirt
        (or balloonlab's launcher, in the guest's runtime folder) picks one.
    :param period_s: the balloon's stats period (None: no ``<stats>``).
    """
    memory_bytes = parse_size(memory)
    current = memory_bytes if current_memory is None else parse_size(current_memory)
    if current > memory_bytes:
        raise ValueError(f"current_memory ({current} bytes) must not exceed memory ({memory_bytes} bytes)")
    spec = DomainSpec(
        name=name, uuid=None, domain_type="qemu", memory_bytes=memory_bytes, current_memory_bytes=current,
        max_memory_bytes=None, vcpus=vcpus, arch="x86_64", machine="pc", emulator=emulator,
        kernel=str(kernel), initrd=str(initrd), cmdline=cmdline,
        disks=(DiskSpec(source=str(disk), format="qcow2", bus="virtio", target="vda"),),
        serials=(SerialSpec("pty", 0),),
        channels=(ChannelSpec(type="unix", path=None if agent_socket is None else str(agent_socket),
                              target_type="virtio", target_name=AGENT_CHANNEL),),
        memballoon=MemballoonSpec(model="virtio", period_s=period_s), agent=False)
    return dataclasses.replace(spec, xml=render_domain_xml(spec))


def debian_domain(image: BootableImage, directory: Path, *, name: str = "debian", **options: object) -> Path:
    """Write ``<name>.xml`` booting a fresh overlay ``<name>.qcow2`` on ``image`` into
    ``directory``; the XML's path (for ``Guest.launch`` or ``LibvirtGuest.launch``).

    :param options: as for :func:`debian_domain_spec` (memory, vcpus, period_s, ...).
    """
    directory.mkdir(parents=True, exist_ok=True)
    overlay = new_overlay(image.base, directory / f"{name}.qcow2")
    spec = debian_domain_spec(kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline, disk=overlay,
                              name=name, **options)  # type: ignore[arg-type]
    path = directory / f"{name}.xml"
    path.write_text(spec.xml)
    return path
