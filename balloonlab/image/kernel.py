"""Where the built-in guest's kernel comes from: an explicit path, the host's, or Debian's.

:func:`acquire_kernel` prefers an explicit kernel (with its modules directory), then the
host's own ``/boot/vmlinuz-$(uname -r)`` with ``/lib/modules`` when readable, and otherwise
Debian's cloud kernel package, fetched with ``apt-get download`` and unpacked in Python
without installing it. Downloads happen only here, through apt, at set-up time
(``balloonlab guest build``), and are cached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balloonlab.image import kmod
from balloonlab.image.debs import APT_HINT, apt_download, deb_members
from balloonlab.model.errors import GuestImageError

Log = Callable[[str], None]

#: Where the host's own kernel is looked for (tests point these elsewhere).
HOST_BOOT_DIR = Path("/boot")
HOST_MODULES_ROOT = Path("/lib/modules")
#: Debian's metapackage whose first dependency is the release's own cloud kernel package.
DEBIAN_METAPACKAGE = "linux-image-cloud-amd64"
#: Modules unpacked beside drivers/virtio (with their dependencies) when the kernel has them:
#: zram (a swap device in guest RAM, for pressure regimes that need swap) and its default
#: compressor, and virtio_blk (the scratch disk of page-cache workloads, in drivers/block);
#: virtio_mem lives in drivers/virtio already.
EXTRA_MODULES = ("zram", "lzo_rle", "virtio_blk")
#: ``<cache>/kernels/DEFAULT_KERNEL_MARKER`` names the package of the release's own kernel, the
#: one to fall back on when apt cannot answer and several kernels are cached.
DEFAULT_KERNEL_MARKER = "default"
#: Bump when what an unpacked kernel holds changes: older unpacks are redone from the .deb.
UNPACK_FORMAT = 3  # 3: virtio_blk


@dataclass(frozen=True)
class KernelInfo:
    """A kernel found or fetched for the guest.

    :param kernel: the kernel image file.
    :param modules_dir: its ``lib/modules/<version>`` directory (None: everything built in).
    :param source: ``"explicit"``, ``"host"`` or ``"debian-package:<pkgname>"``.
    :param version: the kernel release, as ``uname -r`` prints it.
    """

    kernel: Path
    modules_dir: Path | None
    source: str
    version: str


def default_cache_dir() -> Path:
    """``$BALLOONLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/balloonlab``, else ``~/.cache/balloonlab``;
    for root, ``/var/cache/balloonlab``.

    Root's home is 0700, and a guest started through libvirt runs QEMU as another user
    (libvirt-qemu) that must read the kernel and initramfs: root's cache lives where system
    caches do, world-readable.
    """
    if os.environ.get("BALLOONLAB_CACHE_DIR"):
        return Path(os.environ["BALLOONLAB_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "balloonlab"
    if os.getuid() == 0:
        return Path("/var/cache/balloonlab")
    return Path.home() / ".cache" / "balloonlab"


def kernel_release(path: Path) -> str | None:
    """The release string an x86 bzImage carries in its setup header (``kernel_version``).

    :returns: e.g. ``"6.1.0-56-cloud-amd64"``, or None for a file without that header.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return None
    # Boot protocol: "HdrS" at 0x202; the 16-bit field at 0x20E points 0x200 before the string.
    if head[0x202:0x206] != b"HdrS" or len(head) < 0x210:
        return None
    start = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    words = head[start:start + 256].split(b"\0")[0].decode("ascii", "replace").split()
    return words[0] if words else None


def _explicit_kernel(kernel: Path, modules_dir: Path | None) -> KernelInfo:
    if not kernel.is_file() or not os.access(kernel, os.R_OK):
        raise GuestImageError(f"kernel {kernel} does not exist or is not a readable file")
    version = kernel_release(kernel)
    if modules_dir is None:
        ver = version or "?"
        candidates = [kernel.parent / "lib/modules" / ver, kernel.parent.parent / "lib/modules" / ver,
                      HOST_MODULES_ROOT / ver]
        modules_dir = next((c for c in candidates if c.is_dir()), None)
        if modules_dir is None:
            raise GuestImageError(
                f"no modules found for kernel {kernel} (release {version or 'unknown'}); pass "
                "modules_dir=PATH (--modules-dir), the lib/modules/<version> directory holding "
                "kernel/drivers/virtio/virtio_balloon.ko (searched: " + ", ".join(map(str, candidates)) + ")")
    elif not Path(modules_dir).is_dir():
        raise GuestImageError(f"modules_dir {modules_dir} is not a directory")
    return KernelInfo(kernel, Path(modules_dir), "explicit", version or Path(modules_dir).name)


def _host_kernel(log: Log) -> KernelInfo | None:
    release = os.uname().release
    kernel, modules = HOST_BOOT_DIR / f"vmlinuz-{release}", HOST_MODULES_ROOT / release
    if not (os.access(kernel, os.R_OK) and kernel.is_file() and modules.is_dir()):
        return None
    builtin = kmod.builtin_modules(modules) or set()
    if "virtio_balloon" not in builtin and "virtio_balloon" not in kmod.module_index(modules):
        log(f"kernel: host kernel {release} has no virtio_balloon driver; not using it")
        return None
    return KernelInfo(kernel, modules, "host", release)


def _apt_first_depends(metapackage: str) -> str | None:
    """The first ``Depends:`` of a metapackage, None when apt does not know it."""
    try:
        proc = subprocess.run(["apt-cache", "depends", metapackage], capture_output=True,
                              text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise GuestImageError("no kernel: apt-cache is not installed (not a Debian-based system?); "
                              "pass kernel=PATH (--kernel) and modules_dir=PATH (--modules-dir)") from None
    for line in proc.stdout.splitlines():
        words = line.strip().lstrip("|").split()
        if len(words) >= 2 and words[0] == "Depends:" and not words[1].startswith("<"):
            return words[1]
    if metapackage == DEBIAN_METAPACKAGE:
        raise GuestImageError(f"no kernel: `apt-cache depends {metapackage}` names no kernel package "
                              f"({(proc.stderr or proc.stdout).strip() or 'no output'}); {APT_HINT}")
    return None


def release_matches(version: str, release: str) -> bool:
    """True when kernel ``version`` is ``release`` or of that series: "6.12" matches
    "6.12.118+deb12-cloud-amd64" but not "6.1.0-57-cloud-amd64" (nor "6.1" "6.12...")."""
    return version == release or version.startswith((release + ".", release + "-", release + "+"))


def _apt_kernel_package(release: str | None = None) -> str:
    """The cloud kernel package for ``release`` (a series like "6.12" or a full release).

    The release's own kernel is the first ``Depends:`` of ``linux-image-cloud-amd64``; another
    series comes from its own metapackage (``linux-image-6.12-cloud-amd64`` in
    bookworm-backports); a full release names its package directly.
    """
    default = _apt_first_depends(DEBIAN_METAPACKAGE)
    assert default is not None  # _apt_first_depends raises for the main metapackage
    if release is None or release_matches(default.removeprefix("linux-image-"), release):
        return default
    if re.fullmatch(r"\d+\.\d+", release):
        series = _apt_first_depends(f"linux-image-{release}-cloud-amd64")
        if series is not None:
            return series
        raise GuestImageError(f"no Debian kernel package for the {release} series here (neither "
                              f"{DEBIAN_METAPACKAGE}, which is {default.removeprefix('linux-image-')}, nor "
                              f"linux-image-{release}-cloud-amd64); on Debian 12, 6.12 comes from bookworm-backports "
                              "(scripts/ensure-system-packages adds it), or pass --kernel")
    return f"linux-image-{release}"


def _modules_root(path: str) -> list[str] | None:
    """``[prefix..., version, rest...]`` parts of a module tree path, trixie's merged /usr too."""
    parts = path.split("/")
    if parts[:2] == ["usr", "lib"]:
        parts = parts[1:]
    return parts if parts[:2] == ["lib", "modules"] and len(parts) >= 4 else None


def _unpack_kernel(deb: Path, pkg: str, dest: Path, log: Log) -> None:
    """Unpack the kernel, the virtio modules, :data:`EXTRA_MODULES` and whatever module they
    need into ``dest`` (bookworm ships lib/modules, trixie usr/lib/modules: both become
    lib/modules here)."""
    extra: set[str] = set(EXTRA_MODULES)

    def want(path: str) -> bool:
        if path.startswith("boot/vmlinuz-"):
            return True
        parts = _modules_root(path)
        if parts is None:
            return False
        return (parts[3:6] == ["kernel", "drivers", "virtio"] and path.endswith(kmod.MODULE_SUFFIXES)
                or parts[3] == "modules.builtin" or kmod.module_name_from_path(Path(path)) in extra)

    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        while True:
            files = {("/".join(p) if (p := _modules_root(path)) else path): data
                     for path, data in deb_members(deb, want).items()}
            for path, data in files.items():
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(data)
            kernels = sorted(p for p in files if p.startswith("boot/vmlinuz-"))
            mod_dirs = sorted({"/".join(p.split("/")[:3]) for p in files if p.startswith("lib/modules/")})
            if not kernels or not mod_dirs:
                raise GuestImageError(f"{deb} holds no boot/vmlinuz-* or lib/modules/*: not a kernel package")
            # Dependencies outside the unpacked set need another pass.
            index = kmod.module_index(tmp / mod_dirs[0])
            builtin = kmod.builtin_modules(tmp / mod_dirs[0]) or set()
            missing = {d for p in index.values() for d in kmod.read_module(p).depends
                       if d not in index and d not in builtin} - extra
            if not missing:
                break
            log(f"kernel: unpacking modules needed outside drivers/virtio: {', '.join(sorted(missing))}")
            extra |= missing
        meta = {"package": pkg, "kernel": kernels[0], "modules_dir": mod_dirs[0], "format": UNPACK_FORMAT,
                "version": kernels[0].removeprefix("boot/vmlinuz-")}
        (tmp / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if dest.exists() and _unpacked_kernel(dest) is None:
            old = dest.with_name(f".old-{os.getpid()}")
            os.rename(dest, old)  # an unpack of an older format: replaced, not merged
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, dest)  # atomic: "dest exists" means "unpacked completely"
        except OSError:
            if _unpacked_kernel(dest) is None:
                raise  # not a concurrent build that finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpacked_kernel(dest: Path) -> KernelInfo | None:
    try:
        meta = json.loads((dest / "kernel.json").read_text())
        if meta.get("format") != UNPACK_FORMAT:
            return None
        info = KernelInfo(dest / meta["kernel"], dest / meta["modules_dir"],
                          f"debian-package:{meta['package']}", meta["version"])
    except (OSError, ValueError, KeyError):
        return None
    return info if info.kernel.is_file() else None


def debian_kernel(root: Path, log: Log, release: str | None = None) -> KernelInfo:
    """Debian's cloud kernel package (of ``release``'s series, else the release's own), fetched
    with ``apt-get download`` and unpacked under ``<root>/kernels/<pkg>/`` once; its .deb is kept
    there (:func:`kernel_package_file`), so a distro image can install the whole package.

    :raises GuestImageError: apt cannot name or fetch the package and nothing is cached.
    """
    kernels = root / "kernels"
    try:
        pkg = _apt_kernel_package(release)
    except GuestImageError as exc:
        # No apt answer (no lists, not Debian): an earlier download still does the job.
        cached = [i for d in sorted(kernels.glob("*/root")) if (i := _unpacked_kernel(d))
                  and (release is None or release_matches(i.version, release))]
        if not cached:
            raise
        if release is None:  # the release's own kernel, as apt named it last time
            try:
                default = (kernels / DEFAULT_KERNEL_MARKER).read_text().strip()
            except OSError:
                default = None
            cached = [i for i in cached if i.source == f"debian-package:{default}"] or cached
        newest = max(cached, key=lambda i: i.kernel.stat().st_mtime_ns)
        log(f"kernel: Debian package {newest.source.split(':', 1)[1]} (cached; apt-cache failed: {exc})")
        return newest
    pkg_dir = kernels / pkg
    if release is None:
        pkg_dir.mkdir(parents=True, exist_ok=True)
        (kernels / DEFAULT_KERNEL_MARKER).write_text(pkg + "\n")
    info = _unpacked_kernel(pkg_dir / "root")
    if info is not None:
        log(f"kernel: Debian package {pkg} (cached)")
        return info
    pkg_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(pkg_dir.glob(f"{pkg}_*.deb"))  # kept: a re-unpack needs no download
    state = "cached .deb" if debs else "downloaded"
    if not debs:
        debs = [apt_download(pkg, pkg_dir)]
    _unpack_kernel(debs[0], pkg, pkg_dir / "root", log)
    info = _unpacked_kernel(pkg_dir / "root")
    if info is None:
        raise GuestImageError(f"unpacking {debs[0]} gave no usable kernel")
    log(f"kernel: Debian package {pkg} ({state})")
    # An unpacked package always has its modules directory (see _unpacked_kernel).
    modules = sum(1 for p in (info.modules_dir or pkg_dir).rglob("*") if p.name.endswith(kmod.MODULE_SUFFIXES))
    log(f"kernel: unpacked {info.kernel.name} and {modules} modules into {pkg_dir / 'root'}")
    return info


def kernel_package_file(info: KernelInfo) -> Path:
    """The cached .deb of a kernel :func:`debian_kernel` fetched (``<root>/kernels/<pkg>/``).

    :raises GuestImageError: ``info`` is not a Debian package's, or its .deb was removed.
    """
    if not info.source.startswith("debian-package:"):
        raise GuestImageError(f"{info.kernel} is not from a Debian package ({info.source})")
    pkg = info.source.removeprefix("debian-package:")
    pkg_dir = info.kernel.parents[2]  # <pkg>/root/boot/vmlinuz-*
    debs = sorted(pkg_dir.glob(f"{pkg}_*.deb"))
    if not debs:
        raise GuestImageError(f"the .deb of {pkg} is not in {pkg_dir}: remove {pkg_dir} and build again")
    return debs[0]


def acquire_kernel(*, kernel: Path | None = None, modules_dir: Path | None = None,
                   cache_dir: Path | None = None, log: Log | None = None,
                   kernel_release: str | None = None) -> KernelInfo:
    """Find a kernel for the guest: ``kernel``, else the host's, else Debian's cloud kernel.

    :param kernel: use this kernel image.
    :param modules_dir: its ``lib/modules/<version>`` (searched next to ``kernel`` if omitted).
    :param kernel_release: a series ("6.12", "6.1") or a full release: the host's kernel only
        when it is of that release, else Debian's package for it (ignored with ``kernel``).
    :param cache_dir: where downloaded kernels are kept (``<cache>/kernels/<pkg>/``).
    :param log: receives a line saying which kernel was chosen and whether it was cached.
    :raises GuestImageError: when the explicit kernel or its modules are missing, or apt cannot
        fetch the Debian kernel (the message says to run ``apt-get update`` or pass --kernel).
    """
    say: Log = log or (lambda line: None)
    if kernel is not None:
        explicit = _explicit_kernel(Path(kernel), None if modules_dir is None else Path(modules_dir))
        say(f"kernel: explicit {explicit.kernel} ({explicit.version}, modules from {explicit.modules_dir})")
        return explicit
    host = _host_kernel(say)
    if host is not None and (kernel_release is None or release_matches(host.version, kernel_release)):
        say(f"kernel: host {host.kernel} with {host.modules_dir}")
        return host
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return debian_kernel(root, say, kernel_release)


