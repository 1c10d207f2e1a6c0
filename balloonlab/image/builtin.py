"""The built-in test guest as a domain: balloonlab's guest image + the domain builder.

``builtin_spec()`` returns the libvirt domain XML (as a DomainSpec) of a tiny guest that
boots in about two seconds under TCG and carries the workload agent. It never downloads:
the image must have been built by the setup step (``balloonlab guest build``).
"""

from __future__ import annotations

from balloonlab.domain import DomainSpec, builtin_domain
from balloonlab.image.build import find_guest_image
from balloonlab.model.errors import GuestImageError


def builtin_spec(name: str = "balloonlab", *, memory: int | str = "512M",
                 current_memory: int | str | None = None, vcpus: int = 1, period_s: int | None = 1,
                 model: str = "virtio", autodeflate: bool | None = None,
                 free_page_reporting: bool | None = None, machine: str = "pc",
                 balloon_driver: bool = True, extra_cmdline: str = "") -> DomainSpec:
    """The domain of the built-in test guest.

    :param balloon_driver: False boots the guest without loading virtio_balloon (the device
        is there, the guest never answers: last-update stays 0).
    :raises GuestImageError: the image was not built yet (run ``balloonlab guest build``).
    """
    image = find_guest_image()
    if image is None:
        raise GuestImageError("the built-in guest image is not built yet: run `balloonlab guest build` "
                              "(or `make guest`) once; it fetches a kernel through apt")
    cmdline = image.cmdline
    if not balloon_driver:
        cmdline += " balloonlab.nodriver=1"
    if extra_cmdline:
        cmdline += " " + extra_cmdline
    return builtin_domain(name=name, kernel=str(image.kernel), initrd=str(image.initrd), cmdline=cmdline,
                          memory=memory, current_memory=current_memory, vcpus=vcpus, period_s=period_s,
                          model=model, autodeflate=autodeflate, free_page_reporting=free_page_reporting,
                          machine=machine)
