"""The built-in test guest as a domain: balloonlab's guest image + the domain builder.

``builtin_spec()`` returns the libvirt domain XML (as a DomainSpec) of a tiny guest that
boots in about two seconds under TCG and carries the workload agent. It never downloads:
the image must have been built by the setup step (``balloonlab guest build``).
"""

from __future__ import annotations

from balloonlab.domain import DomainSpec, VirtioMemArg, builtin_domain
from balloonlab.image.build import find_guest_image
from balloonlab.model.errors import GuestImageError
from balloonlab.model.units import parse_size


def builtin_spec(name: str = "balloonlab", *, memory: int | str = "512M",
                 current_memory: int | str | None = None, vcpus: int = 1, period_s: int | None = 1,
                 model: str = "virtio", autodeflate: bool | None = None,
                 free_page_reporting: bool | None = None, machine: str = "pc",
                 balloon_driver: bool = True, extra_cmdline: str = "", kernel_release: str | None = None,
                 qemu_binary: str | None = None, swap: int | str | None = None,
                 virtio_mem: VirtioMemArg | None = None, min_guarantee: int | str | None = None) -> DomainSpec:
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
    :raises GuestImageError: the image (for that kernel) was not built yet.
    :raises ValueError: for a virtio_mem libvirt would refuse (the message says what to change).
    """
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
    return builtin_domain(name=name, kernel=str(image.kernel), initrd=str(image.initrd), cmdline=cmdline,
                          memory=memory, current_memory=current_memory, vcpus=vcpus, period_s=period_s,
                          model=model, autodeflate=autodeflate, free_page_reporting=free_page_reporting,
                          machine=machine, emulator=qemu_binary, virtio_mem=virtio_mem,
                          min_guarantee=min_guarantee)
