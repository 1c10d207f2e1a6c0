"""The built-in test guest as a domain: balloonlab's guest image + the domain builder.

``builtin_spec()`` returns the libvirt domain XML (as a DomainSpec) of a tiny guest that
boots in about two seconds under TCG and carries the workload agent. It never downloads:
the image must have been built by the setup step (``balloonlab guest build``). With
``scratch_disk=`` the guest gets a raw virtio disk for page-cache workloads
(:meth:`~balloonlab.image.agent.Workload.page_cache`): a sparse file :func:`make_scratch_disk`
creates, at a path the caller gives or in the temp dir until this process exits.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from pathlib import Path

from balloonlab.domain import DiskSpec, DomainSpec, VirtioMemArg, builtin_domain, with_changes
from balloonlab.image.build import find_guest_image
from balloonlab.model.errors import GuestImageError
from balloonlab.model.units import parse_size

__all__ = ["builtin_spec", "make_scratch_disk"]

_MIB = 1 << 20
#: Scratch disks builtin_spec made in the temp dir: removed when this process exits.
_TEMPORARY_DISKS: set[Path] = set()


def make_scratch_disk(path: str | os.PathLike[str], size: int | str) -> Path:
    """Create a sparse raw disk image: ``size`` bytes (or ``"1G"``, rounded up to a whole MiB)
    that take no room on the host until the guest writes to them.

    :returns: the file's path.
    :raises ValueError: a size that is not positive.
    :raises FileExistsError: something is at ``path`` already (a disk is never overwritten).
    """
    nbytes = _disk_bytes(size)
    target = Path(path)
    _fill_sparse(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), target, nbytes)
    return target


def _disk_bytes(size: int | str) -> int:
    nbytes = -(-parse_size(size) // _MIB) * _MIB
    if nbytes <= 0:
        raise ValueError(f"a scratch disk must be larger than 0 bytes, got {size!r}")
    return nbytes


def _fill_sparse(fd: int, path: Path, nbytes: int) -> None:
    """Give the new file ``fd`` (at ``path``) its size as a hole, closing it; no file on failure."""
    try:
        os.ftruncate(fd, nbytes)  # no block is allocated until written
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _remove_temporary_disks() -> None:
    # A QEMU still running (a detached guest) keeps its open file: only the name goes.
    for path in list(_TEMPORARY_DISKS):
        path.unlink(missing_ok=True)
        _TEMPORARY_DISKS.discard(path)


def _scratch_file(name: str, size: int | str, path: str | os.PathLike[str] | None) -> Path:
    """The file behind ``builtin_spec``'s scratch disk: made, or checked when it exists."""
    nbytes = _disk_bytes(size)
    if path is None:
        fd, temporary = tempfile.mkstemp(prefix=f"balloonlab-{name}-scratch-", suffix=".raw")
        if not _TEMPORARY_DISKS:
            atexit.register(_remove_temporary_disks)
        _TEMPORARY_DISKS.add(Path(temporary))
        _fill_sparse(fd, Path(temporary), nbytes)
        return Path(temporary)
    target = Path(path)
    if not target.exists():
        return make_scratch_disk(target, nbytes)
    if not target.is_file() or target.stat().st_size != nbytes:
        raise ValueError(f"scratch_path {str(target)!r} exists but is not a raw file of {nbytes} bytes "
                         "(scratch_disk): remove it, or give another path")
    return target


def builtin_spec(name: str = "balloonlab", *, memory: int | str = "512M",
                 current_memory: int | str | None = None, vcpus: int = 1, period_s: int | None = 1,
                 model: str = "virtio", autodeflate: bool | None = None,
                 free_page_reporting: bool | None = None, machine: str = "pc",
                 balloon_driver: bool = True, extra_cmdline: str = "", kernel_release: str | None = None,
                 qemu_binary: str | None = None, swap: int | str | None = None,
                 virtio_mem: VirtioMemArg | None = None, min_guarantee: int | str | None = None,
                 scratch_disk: int | str | None = None,
                 scratch_path: str | os.PathLike[str] | None = None) -> DomainSpec:
    """The domain of the built-in test guest.

    The image loads ``virtio_mem`` and onlines hot-plugged memory as movable
    (``memhp_default_state=online_movable``), so a virtio-mem device works as it boots.

    :param balloon_driver: False boots the guest without loading virtio_balloon (the device
        is there, the guest never answers: last-update stays 0).
    :param kernel_release: the guest kernel, a series ("6.12", "6.1") or a full release; None:
        the default image (``balloonlab stacks`` lists the kernels built).
    :param qemu_binary: the QEMU to run it (``<emulator>``), e.g. a stack's wrapper from
        ``balloonlab stacks``; None: ``qemu-system-x86_64`` from PATH.
    :param swap: give the guest a zram swap device of this size (bytes or "128M"), so pressure
        reaches reclaim and swap before the OOM killer.
    :param virtio_mem: one virtio-mem device (QEMU id ``virtiomem0``, on guest NUMA node 0): a size
        (``"256M"``), ``(size, requested)`` or ``(size, requested, block)``; ``memory`` stays the boot
        memory (see :func:`~balloonlab.domain.builtin_domain`: NUMA cell 0, ``<maxMemory>``).
    :param min_guarantee: ``<memtune><min_guarantee>``: the least memory a policy leaves the guest.
    :param scratch_disk: give the guest a scratch disk of this size (bytes or ``"1G"``, whole
        MiB): a ``<disk type='file' device='disk'>`` of a sparse raw file on virtio (``/dev/vda``
        in the guest), which :meth:`~balloonlab.image.agent.Workload.page_cache` writes and reads.
    :param scratch_path: the scratch disk's file: created (:func:`make_scratch_disk`) when
        missing, used as it is when it is a file of that size; the caller removes it. None: a
        new file in the temp dir, removed when this process exits (a guest still running keeps
        its open file, only the name goes).
    :raises GuestImageError: the image (for that kernel) was not built yet.
    :raises ValueError: for a virtio_mem libvirt would refuse (the message says what to change),
        a scratch_path without scratch_disk, or one that exists with another size.
    """
    if scratch_path is not None and scratch_disk is None:
        raise ValueError("scratch_path names the file of a scratch disk: give scratch_disk (its size) too")
    image = find_guest_image(kernel_release=kernel_release)
    if image is None:
        which = f"for kernel {kernel_release} " if kernel_release else ""
        build = "balloonlab guest build" + (f" --kernel-release {kernel_release}" if kernel_release else "")
        raise GuestImageError(f"the built-in guest image {which}is not built yet: run `{build}` "
                              "(or `make guest`/`make stacks`) once; it fetches a kernel through apt")
    cmdline = image.cmdline
    if not balloon_driver:
        cmdline += " balloonlab.nodriver=1"
    if swap is not None:
        cmdline += f" balloonlab.swap={parse_size(swap)}"
    if extra_cmdline:
        cmdline += " " + extra_cmdline
    spec = builtin_domain(name=name, kernel=str(image.kernel), initrd=str(image.initrd), cmdline=cmdline,
                          memory=memory, current_memory=current_memory, vcpus=vcpus, period_s=period_s,
                          model=model, autodeflate=autodeflate, free_page_reporting=free_page_reporting,
                          machine=machine, emulator=qemu_binary, virtio_mem=virtio_mem,
                          min_guarantee=min_guarantee)
    if scratch_disk is None:
        return spec
    # Made only now: a spec refused above leaves no file behind.
    disk = _scratch_file(name, scratch_disk, scratch_path)
    return with_changes(spec, disks=(DiskSpec(source=str(disk), format="raw", bus="virtio", target="vda"),))
