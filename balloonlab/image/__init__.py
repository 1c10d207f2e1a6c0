"""Guest images: the built-in test guest, and a Debian guest for real-guest work.

The built-in guest is a kernel, its modules, a busybox initramfs and the workload agent:
``kernel`` finds or fetches a guest kernel (explicit, the host's, or Debian's cloud kernel via
``apt-get download``), ``kmod`` reads and orders its modules by ``.modinfo`` dependencies,
``cpio`` writes a reproducible newc archive, ``build`` assembles and caches the image,
``builtin`` gives its DomainSpec (and its optional scratch disk), ``initramfs/`` holds the
init and agent scripts that go into it, ``agent`` is the host side of the agent's protocol
(allocate, free, patterns, working sets, page cache) and ``truth`` its in-guest recorder.

The Debian guest is a qcow2 made from Debian's packages (``debian``: debootstrap, the recipe in
``debian_recipe``, the host's apt mirror from ``debs.apt_mirror``), with systemd, qemu-guest-agent,
swap and stress-ng; ``debian_domain`` writes domain XML booting it like any user's image.
"""

from balloonlab.image.agent import Workload
from balloonlab.image.build import GuestImage, build_guest_image, find_guest_image
from balloonlab.image.builtin import builtin_spec, make_scratch_disk
from balloonlab.image.debian import DebianImage, build_debian_image, find_debian_image
from balloonlab.image.debian_domain import debian_domain, debian_domain_spec

__all__ = ["DebianImage", "GuestImage", "Workload", "build_debian_image", "build_guest_image", "builtin_spec",
           "debian_domain", "debian_domain_spec", "find_debian_image", "find_guest_image", "make_scratch_disk"]
