"""A real Debian guest: a qcow2 root disk made from Debian's packages, built once and cached.

Where the built-in guest (:mod:`balloonlab.image.build`) is a busybox initramfs with no page
cache worth the name, this guest runs what a real VM runs: systemd as init, udev, journald,
qemu-guest-agent (so the guest's own ``/proc/meminfo`` can be read from the host, see
:mod:`balloonlab.qemu.guest_agent`), a swap file and stress-ng for workloads.

How it is made, and why this way:

* ``debootstrap --variant=minbase`` of the host's own release (os-release VERSION_CODENAME)
  from the mirror the host's apt uses (as ``apt-get indextargets`` reports it, never
  hard-coded: on these machines the archive is reachable only through that mirror), into a
  temporary folder. It
  runs in a private mount namespace (``unshare --mount``) so the /proc and /sys it mounts in
  the target can never outlive a killed build.
* The kernel is Debian's cloud kernel package the project already fetches for the built-in
  guest (:mod:`balloonlab.image.kernel`), installed into the root with ``dpkg -i`` so the
  guest has the whole module tree (udev loads virtio_console for the agent's port by alias).
  The cloud kernel builds ext4 in but ``virtio_blk`` as a module (``CONFIG_VIRTIO_BLK=m`` in
  6.1 and 6.12), so the root disk cannot be mounted without an initramfs: the package's own
  postinst builds one with initramfs-tools inside the chroot, limited to the listed modules.
  Kernel and initramfs are copied next to the disk for direct kernel boot (``-kernel``/
  ``-initrd``), as the built-in guest boots: no bootloader, no firmware disk access.
* ``mkfs.ext4 -d ROOTFS`` writes the file system straight into a raw file (no loop mount, no
  root-only block devices), then ``qemu-img convert -O qcow2`` keeps only the used blocks.

The result lives under ``<cache>/debian/<key>/`` where the key hashes every input (release,
package list, kernel package and its bytes, disk and swap sizes, the configuration files and
:data:`RECIPE_VERSION`), so a build is reused until an input changes. ``base.qcow2`` there is
never booted (read-only); guests boot from thin qcow2 overlays on it, so the cached image stays
the one that was built. ``domain.xml`` next to it is a ready libvirt domain (for balloonlab's
``Guest.launch`` and for ``virsh create``) booting the overlay ``disk.qcow2`` beside it;
:func:`debian_domain` writes one with a fresh overlay anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from balloonlab.image.debs import apt_mirror
from balloonlab.image.debian_domain import debian_domain_spec, new_overlay
from balloonlab.image.debian_recipe import (CMDLINE, DEFAULT_DISK_SIZE, DEFAULT_PACKAGES, DEFAULT_SWAP_SIZE,
                                            MASKED_UNITS, RECIPE_VERSION, chroot_script, config_files)
from balloonlab.image.kernel import debian_kernel, default_cache_dir, kernel_package_file
from balloonlab.image.stacks import host_codename
from balloonlab.model.errors import GuestImageError
from balloonlab.model.units import parse_size

__all__ = ["DebianImage", "build_debian_image", "find_debian_image"]

Log = Callable[[str], None]

_FORMAT = 1  # manifest.json layout


@dataclass(frozen=True)
class DebianImage:
    """A built Debian guest.

    :param directory: ``<cache>/debian/<key>``.
    :param base: the pristine qcow2 root disk (read-only: boot an overlay on it).
    :param kernel: the kernel for direct kernel boot (from the image's /boot).
    :param initrd: the initramfs built inside the image for that kernel.
    :param cmdline: the kernel command line.
    :param domain_xml: the libvirt domain beside the image, booting ``overlay``.
    :param overlay: ``disk.qcow2``, the writable overlay ``domain_xml`` boots.
    :param release: the Debian codename (``bookworm``).
    :param kernel_version: ``uname -r`` in the guest.
    :param key: sha256 over every input.
    """

    directory: Path
    base: Path
    kernel: Path
    initrd: Path
    cmdline: str
    domain_xml: Path
    overlay: Path
    release: str
    kernel_version: str
    key: str


# --- building ---------------------------------------------------------------------------------

def _run(argv: Sequence[str], what: str, log: Log, timeout_s: float = 3600, **kwargs: object) -> str:
    started = time.monotonic()
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False,
                              **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise GuestImageError(f"{what}: {exc.filename} is not installed (apt-get install debootstrap "
                              "e2fsprogs qemu-utils util-linux)") from None
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"{what}: `{' '.join(argv)}` did not finish in {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise GuestImageError(f"{what}: `{' '.join(argv)}` failed (exit {proc.returncode}): {tail}")
    log(f"debian: {what} ({time.monotonic() - started:.1f} s)")
    return str(proc.stdout)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _image_from(directory: Path) -> DebianImage | None:
    """The image in ``directory`` if its manifest is complete and current, else None."""
    try:
        meta = json.loads((directory / "manifest.json").read_text())
        if meta.get("format") != _FORMAT or meta.get("inputs", {}).get("recipe") != RECIPE_VERSION:
            return None
        image = DebianImage(directory=directory, base=directory / "base.qcow2", kernel=directory / "vmlinuz",
                            initrd=directory / "initrd.img", cmdline=meta["cmdline"],
                            domain_xml=directory / "domain.xml", overlay=directory / "disk.qcow2",
                            release=meta["release"], kernel_version=meta["kernel_version"], key=meta["key"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(p.is_file() for p in (image.base, image.kernel, image.initrd)):
        return None
    return image


def find_debian_image(cache_dir: Path | None = None, release: str | None = None) -> DebianImage | None:
    """The newest built Debian image (of ``release`` when given), without building anything."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    found = [(p.stat().st_mtime_ns, image) for p in (root / "debian").glob("*/manifest.json")
             if not p.parent.name.startswith(".") and (image := _image_from(p.parent)) is not None
             and (release is None or image.release == release)]
    return max(found, key=lambda item: item[0])[1] if found else None


def build_debian_image(*, release: str | None = None, packages: Sequence[str] = DEFAULT_PACKAGES,
                       kernel_release: str | None = None, disk_size: int | str = DEFAULT_DISK_SIZE,
                       swap_size: int | str = DEFAULT_SWAP_SIZE, cache_dir: Path | None = None,
                       rebuild: bool = False, log: Log | None = None) -> DebianImage:
    """Build (or reuse from the cache) the Debian guest image.

    Needs root (debootstrap, chroot, unshare) and apt's mirror. A build takes minutes and a few
    hundred MB of downloads; a cached image is found in about a second (the time of the
    ``apt-cache depends`` that names the kernel package, and of hashing its .deb). The overlay ``disk.qcow2``
    beside a cached image is kept (it is the guest's disk state); :func:`new_overlay` resets it.

    :param release: the Debian codename (default: the host's; the mirror must serve it).
    :param packages: installed on top of minbase (see :data:`DEFAULT_PACKAGES`).
    :param kernel_release: Debian's cloud kernel of this series (default: the release's own);
        it must install in ``release`` (6.12 from bookworm-backports needs a newer linux-base).
    :param disk_size: the virtual disk size (bytes or "4G").
    :param swap_size: the swap file made at first boot (0: none).
    :raises GuestImageError: when a tool is missing or a step fails (the message has its output).
    """
    say: Log = log or (lambda line: None)
    if os.geteuid() != 0:
        raise GuestImageError("building the Debian guest needs root (debootstrap and chroot)")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    started = time.monotonic()
    codename = release or host_codename()
    if codename is None:
        raise GuestImageError("/etc/os-release names no release (VERSION_CODENAME): pass release=CODENAME "
                              "(--release), e.g. bookworm")
    # The Debian package, not acquire_kernel(): that prefers the host's own kernel, whose module
    # tree is not something dpkg can install into the guest.
    info = debian_kernel(root, say, kernel_release)
    deb = kernel_package_file(info)
    disk_bytes, swap_bytes = parse_size(disk_size), parse_size(swap_size)
    hostname = "balloonlab-debian"
    files = config_files(swap_bytes, hostname)
    inputs = {
        "recipe": RECIPE_VERSION, "release": codename, "variant": "minbase",
        "packages": sorted(set(packages)), "kernel_package": info.source, "kernel_version": info.version,
        "kernel_deb": _sha256_file(deb), "disk_bytes": disk_bytes, "swap_bytes": swap_bytes,
        "cmdline": CMDLINE, "masked": list(MASKED_UNITS),
        "files": {path: hashlib.sha256(text.encode()).hexdigest() for path, text in sorted(files.items())},
        "chroot": hashlib.sha256(chroot_script(deb.name, bool(swap_bytes)).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    final = root / "debian" / key
    if not rebuild and (cached := _image_from(final)) is not None:
        say(f"debian: cached {final} ({time.monotonic() - started:.2f} s)")
        return _with_domain(cached)

    mirror = apt_mirror(codename)
    (root / "debian").mkdir(parents=True, exist_ok=True)
    # Everything happens in a hidden folder renamed into place at the end: a killed build never
    # leaves something that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root / "debian"))
    rootfs = tmp / "rootfs"
    try:
        # unshare --mount: debootstrap mounts /proc and /sys in the target; in a private mount
        # namespace those mounts vanish with the process, even when the build is killed.
        argv = ["unshare", "--mount", "--propagation", "private", "debootstrap", "--variant=minbase",
                f"--include={','.join(sorted(set(packages)))}",
                codename, str(rootfs), mirror]
        say(f"debian: debootstrap {codename} from {mirror} ({len(packages)} extra packages)")
        t0 = time.monotonic()
        _run(argv, "debootstrap", say)
        timings = {"debootstrap_s": time.monotonic() - t0}

        for rel, text in files.items():
            path = rootfs / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (rootfs / "usr/sbin/policy-rc.d").chmod(0o755)
        shutil.copy2(deb, rootfs / deb.name)
        (tmp / "setup.sh").write_text(chroot_script(deb.name, bool(swap_bytes)))
        # /proc, /sys and /dev for the package scripts (depmod, mkinitramfs), again only inside
        # a private mount namespace.
        mounts = (f"mount -t proc proc {rootfs}/proc && mount -t sysfs sys {rootfs}/sys && "
                  f"mount --rbind /dev {rootfs}/dev && chroot {rootfs} /bin/sh -s < {tmp}/setup.sh")
        t0 = time.monotonic()
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", mounts], "kernel, initramfs, setup", say)
        timings["chroot_s"] = time.monotonic() - t0

        version = info.version
        kernel, initrd = rootfs / "boot" / f"vmlinuz-{version}", rootfs / "boot" / f"initrd.img-{version}"
        if not initrd.is_file():
            raise GuestImageError(f"the kernel package did not build {initrd} (is initramfs-tools in packages?)")
        shutil.copyfile(kernel, tmp / "vmlinuz")
        shutil.copyfile(initrd, tmp / "initrd.img")

        t0 = time.monotonic()
        raw = tmp / "root.raw"
        with open(raw, "wb") as f:
            f.truncate(disk_bytes)  # sparse: only what mkfs writes takes space
        # lazy_*_init=0: mkfs zeroes inode tables and journal now. Left lazy, the guest kernel's
        # ext4lazyinit thread would do it after every boot from the image: disk writes, page cache
        # and overlay growth that no workload asked for. The zeros cost nothing in the qcow2
        # (qemu-img convert skips zero clusters). A UUID derived from the key keeps builds stable.
        _run(["mkfs.ext4", "-q", "-F", "-L", "balloonlab-root", "-U", str(uuid.UUID(key[:32])),
              "-E", "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0", "-d", str(rootfs), str(raw)],
             "mkfs.ext4 -d", say)
        timings["mkfs_s"] = time.monotonic() - t0
        shutil.rmtree(rootfs)
        t0 = time.monotonic()
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(tmp / "base.qcow2")], "qemu-img convert", say)
        timings["convert_s"] = time.monotonic() - t0
        raw.unlink()
        (tmp / "setup.sh").unlink()
        (tmp / "base.qcow2").chmod(0o444)  # never booted directly: overlays only

        base_bytes = (tmp / "base.qcow2").stat().st_size
        manifest = {"format": _FORMAT, "key": key, "release": codename, "mirror": mirror,
                    "kernel_version": version, "kernel_package": info.source, "cmdline": CMDLINE,
                    "inputs": inputs, "timings": timings,
                    "base_bytes": base_bytes,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if final.exists():
            old = final.with_name(f".old-{key[:12]}-{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        image = DebianImage(directory=final, base=final / "base.qcow2", kernel=final / "vmlinuz",
                            initrd=final / "initrd.img", cmdline=CMDLINE, domain_xml=final / "domain.xml",
                            overlay=final / "disk.qcow2", release=codename, kernel_version=version, key=key)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # libvirt's QEMU user reads kernel, initrd and base too
        os.rename(tmp, final)
    except OSError as exc:
        raise GuestImageError(f"cannot build the Debian image in {tmp}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"debian: built {final} (base.qcow2 {base_bytes / 1e6:.0f} MB, "
        f"{time.monotonic() - started:.0f} s)")
    return _with_domain(image)


def _with_domain(image: DebianImage) -> DebianImage:
    """Make sure ``domain.xml`` and its overlay ``disk.qcow2`` are beside the image. The XML is
    written again every time (it is derived, and cheap), so it always follows the current domain
    builder; the overlay is kept when it exists: it is the disk state of that domain's guest."""
    if not image.overlay.exists():
        new_overlay(image.base, image.overlay)
    spec = debian_domain_spec(kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline, disk=image.overlay)
    if not image.domain_xml.is_file() or image.domain_xml.read_text() != spec.xml:
        image.domain_xml.write_text(spec.xml)
    return image
