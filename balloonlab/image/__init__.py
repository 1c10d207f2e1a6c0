"""The built-in test guest: a kernel, its modules, a busybox initramfs and the workload agent.

``kernel`` finds or fetches a guest kernel (explicit, the host's, or Debian's cloud kernel via
``apt-get download``), ``kmod`` reads and orders its modules by ``.modinfo`` dependencies,
``cpio`` writes a reproducible newc archive, ``build`` assembles and caches the image,
``builtin`` gives its DomainSpec, ``initramfs/`` holds the init and agent scripts that go into
it, and ``agent`` is the host side of the agent's protocol (allocate, free, patterns).
"""

from balloonlab.image.agent import Workload
from balloonlab.image.build import GuestImage, build_guest_image, find_guest_image
from balloonlab.image.builtin import builtin_spec

__all__ = ["GuestImage", "Workload", "build_guest_image", "builtin_spec", "find_guest_image"]
