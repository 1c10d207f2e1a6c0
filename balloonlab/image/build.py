"""The built-in test guest: a kernel plus a tiny busybox initramfs, built once and cached.

:func:`build_guest_image` takes a kernel from :mod:`balloonlab.image.kernel` (an explicit path, the
host's own, or Debian's cloud kernel package fetched with ``apt-get download``), picks
the virtio modules it needs in dependency order from their ``.modinfo``, and writes a
reproducible gzip'd newc initramfs holding a static busybox, ``/init`` and the workload
``/agent`` (see ``balloonlab/image/initramfs``). Images live under ``<cache>/guest/<key>/`` where
the key hashes every input, so an image is rebuilt only when an input changes;
:func:`find_guest_image` returns an already-built image without any download, for launch time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, Unpack

from balloonlab.image import kmod
from balloonlab.image.cpio import CpioWriter, gzip_bytes
from balloonlab.image.kernel import KernelInfo, acquire_kernel, default_cache_dir, release_matches
from balloonlab.model.errors import GuestImageError
from balloonlab.model.files import write_durably

__all__ = ["GuestImage", "build_guest_image", "find_guest_image", "guest_image", "guest_images", "CMDLINE",
           "MODULE_ROOTS"]

#: Bump when the image layout or the way inputs are combined changes: old images are ignored.
FORMAT_VERSION = 1
#: The kernel command line the image is made for (the launcher may append to it).
#: memhp_default_state: memory a virtio-mem device plugs is onlined as movable, so it can be
#: unplugged again (without it hot-plugged memory stays offline in this init-less guest).
CMDLINE = "console=ttyS0 quiet panic=1 memhp_default_state=online_movable"
#: The modules the guest needs; their dependencies are found from .modinfo.
MODULE_ROOTS = ("virtio_pci", "virtio_balloon")
#: Loaded when the kernel has them (as a module or built in): virtio-mem, zram with its
#: default compressor for guests given swap (``builtin_spec(swap=...)``), and virtio_blk for
#: the scratch disk of page-cache workloads (``builtin_spec(scratch_disk=...)``).
OPTIONAL_MODULES = ("virtio_mem", "zram", "lzo_rle", "virtio_blk")
#: ``<cache>/guest/DEFAULT_MARKER`` names the image ``balloonlab guest build`` made without a
#: kernel choice: the one :func:`find_guest_image` gives when no release is asked for.
DEFAULT_MARKER = "default"
#: Busybox applets the scripts use, linked in /bin (plus a few for debugging by hand).
APPLETS = (
    "sh", "ash", "cat", "dd", "echo", "free", "grep", "head", "insmod", "kill", "ls", "lsmod",
    "mkdir", "mkfifo", "mount", "printf", "ps", "reboot", "rm", "sleep", "stty", "sync", "tail",
    "test", "[", "true", "false", "umount", "uname", "poweroff", "dmesg", "wc", "mkswap", "swapon",
)
_SCRIPTS_DIR = Path(__file__).with_name("initramfs")
_DEFAULT_BUSYBOX = Path("/bin/busybox")
_EM_X86_64 = 62

Log = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built test guest, ready for ``-kernel``/``-initrd``/``-append``.

    :param kernel: the kernel image (a copy inside the image directory).
    :param initrd: the gzip'd newc initramfs.
    :param cmdline: the kernel command line to boot it with.
    :param kernel_source: ``"explicit"``, ``"host"`` or ``"debian-package:<pkgname>"``.
    :param kernel_version: the kernel release (``uname -r`` in the guest).
    :param modules: module names in load order (``virtio_balloon`` last among its dependents).
    :param key: the cache key: sha256 over every input.
    """

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_source: str
    kernel_version: str
    modules: tuple[str, ...]
    key: str


# --- the image ------------------------------------------------------------------------------

def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_busybox(path: Path) -> bytes:
    """Read busybox and make sure it can run as the guest's only binary.

    :raises GuestImageError: when it is missing, not an x86-64 ELF, or dynamically linked.
    """
    hint = "install busybox-static (apt-get install busybox-static) or pass busybox=PATH to a static busybox"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GuestImageError(f"cannot read busybox {path}: {exc.strerror or exc}; {hint}") from exc
    elf = kmod.ElfFile(data, f"busybox {path}")
    if elf.machine != _EM_X86_64:
        raise GuestImageError(f"busybox {path} is not an x86-64 program (ELF machine {elf.machine}); {hint}")
    if elf.has_interp():
        # The initramfs has no libc or dynamic loader, so a dynamic busybox cannot start.
        raise GuestImageError(f"busybox {path} is dynamically linked (it has a PT_INTERP header), "
                              f"but the guest has no shared libraries; {hint}")
    # A static x86-64 binary runs here too: ask it which applets it has, so a trimmed-down
    # busybox fails now and not as "not found" deep inside the guest. (A copy without the
    # x bit is still fine for the guest, which gets it as 0755: then the check is skipped.)
    if not os.access(path, os.X_OK):
        return data
    try:
        listed = subprocess.run([str(path), "--list"], capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestImageError(f"cannot run busybox {path} --list: {exc}; {hint}") from exc
    # "[", test, echo and printf are ash builtins as well: the scripts never exec them.
    if missing := sorted(set(APPLETS) - {"[", "test", "echo", "printf"} - set(listed)):
        raise GuestImageError(f"busybox {path} lacks applets the guest needs: {', '.join(missing)}; {hint}")
    return data


def _load_modules(info: KernelInfo, log: Log) -> list[tuple[str, bytes]]:
    """(name, uncompressed bytes) of the modules to load, dependencies first."""
    if info.modules_dir is None:
        return []
    index = kmod.module_index(info.modules_dir)
    builtin = kmod.builtin_modules(info.modules_dir)
    optional = [m for m in OPTIONAL_MODULES if m in index]  # built-in ones need no insmod
    order = kmod.resolve_load_order((*MODULE_ROOTS, *optional), index, builtin, log)
    result = []
    release = info.version.split()[0]
    for mod in order:
        data = kmod.load_module_bytes(mod.path)
        magic = kmod.read_module(mod.path, data).vermagic.split(" ")[0]
        if release and magic and magic != release:
            # insmod would refuse it in the guest ("invalid module format"): fail here instead.
            raise GuestImageError(f"module {mod.path} is built for kernel {magic}, but the kernel is {release}; "
                                  "pass the matching modules_dir (lib/modules/<version>)")
        result.append((mod.name, data))
    return result


def _initramfs(busybox: bytes, init: str, agent: str, modules: list[tuple[str, bytes]]) -> bytes:
    """The uncompressed newc archive: same inputs, same bytes."""
    cpio = CpioWriter()
    for d in ("bin", "sbin", "dev", "etc", "lib", "lib/modules", "proc", "run", "sys", "tmp"):
        cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
    # The kernel opens /dev/console for PID 1 before /init can mount devtmpfs.
    cpio.add_device("dev/console", "c", 5, 1, 0o600)
    cpio.add_file("bin/busybox", busybox, 0o755)
    for applet in APPLETS:
        cpio.add_symlink(f"bin/{applet}", "busybox")
    cpio.add_file("init", init.encode(), 0o755)
    cpio.add_file("agent", agent.encode(), 0o755)
    for name, data in modules:
        cpio.add_file(f"lib/modules/{name}.ko", data, 0o644)
    cpio.add_file("lib/modules/load-order", "".join(f"{n}\n" for n, _ in modules).encode(), 0o644)
    return cpio.getvalue()


def _image_from_manifest(directory: Path) -> GuestImage | None:
    """The image described by ``directory/manifest.json``, or None when it is incomplete."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_VERSION:
            return None
        image = GuestImage(kernel=directory / manifest["kernel"], initrd=directory / manifest["initrd"],
                           cmdline=manifest["cmdline"], kernel_source=manifest["kernel_source"],
                           kernel_version=manifest["kernel_version"], modules=tuple(manifest["modules"]),
                           key=manifest["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (image.kernel.is_file() and image.initrd.is_file()):
        return None
    return image


def _built_images(root: Path) -> list[tuple[int, str, GuestImage]]:
    """(manifest mtime, key, image) of every complete image in the cache."""
    candidates = []
    try:
        entries = list((root / "guest").iterdir())
    except OSError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # a build in progress or one that was killed; the default marker
        image = _image_from_manifest(entry)
        if image is not None:
            candidates.append(((entry / "manifest.json").stat().st_mtime_ns, entry.name, image))
    return candidates


def guest_images(cache_dir: Path | None = None) -> list[GuestImage]:
    """Every built image in the cache, newest first (one per kernel and agent version)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return [image for *_, image in sorted(_built_images(root), key=lambda c: c[:2], reverse=True)]


def find_guest_image(cache_dir: Path | None = None, kernel_release: str | None = None) -> GuestImage | None:
    """An already-built image, without building or downloading anything.

    :param cache_dir: the cache root (default: :func:`default_cache_dir`).
    :param kernel_release: a kernel series ("6.12") or release: the newest image of that kernel.
        None: the image ``balloonlab guest build`` made without a kernel choice (else the newest).
    :returns: the image, or None when none has been built (run :func:`build_guest_image`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if kernel_release is None:
        try:
            marked = _image_from_manifest(root / "guest" / (root / "guest" / DEFAULT_MARKER).read_text().strip())
        except (OSError, ValueError):
            marked = None
        if marked is not None:
            return marked
    candidates = [c for c in _built_images(root)
                  if kernel_release is None or release_matches(c[2].kernel_version, kernel_release)]
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def build_guest_image(*, kernel: Path | None = None, modules_dir: Path | None = None,
                      busybox: Path | None = None, cache_dir: Path | None = None,
                      rebuild: bool = False, log: Log | None = None,
                      kernel_release: str | None = None) -> GuestImage:
    """Build (or reuse from the cache) the test guest image.

    Built without ``kernel`` or ``kernel_release``, the image becomes the default one
    (:func:`find_guest_image` without a release, ``builtin_spec()``).

    :param kernel: a kernel image to use instead of looking for one.
    :param modules_dir: its ``lib/modules/<version>`` directory (found next to ``kernel`` when
        omitted).
    :param busybox: a statically linked busybox (default ``/bin/busybox``).
    :param cache_dir: the cache root (default: ``$BALLOONLAB_CACHE_DIR``,
        ``$XDG_CACHE_HOME/balloonlab`` or ``~/.cache/balloonlab``).
    :param rebuild: build the image again even when the cache has it.
    :param log: receives one human-readable line per step (which kernel, cached or built).
    :param kernel_release: a kernel series ("6.12", "6.1") or full release to build for
        (Debian's cloud kernel of that series, fetched with apt; see :func:`acquire_kernel`).
    :raises GuestImageError: when no kernel can be found or fetched (the message says what to
        run or pass), or busybox or the modules are unusable.
    """
    say: Log = log or (lambda line: None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    started = time.monotonic()
    info = acquire_kernel(kernel=kernel, modules_dir=modules_dir, cache_dir=root, log=say,
                          kernel_release=kernel_release)
    bb_path = Path(busybox) if busybox is not None else _DEFAULT_BUSYBOX
    bb = _check_busybox(bb_path)
    modules = _load_modules(info, say)
    init = (_SCRIPTS_DIR / "init").read_text()
    agent = (_SCRIPTS_DIR / "agent").read_text()
    kernel_bytes = info.kernel.read_bytes()
    inputs = {
        "format": FORMAT_VERSION,
        "cmdline": CMDLINE,
        "kernel": _sha256_bytes(kernel_bytes),
        "modules": [[name, _sha256_bytes(data)] for name, data in modules],
        "busybox": _sha256_bytes(bb),
        "init": _sha256_bytes(init.encode()),
        "agent": _sha256_bytes(agent.encode()),
    }
    key = _sha256_bytes(json.dumps(inputs, sort_keys=True).encode())
    names = tuple(name for name, _ in modules)
    final = root / "guest" / key

    def result(directory: Path) -> GuestImage:
        # kernel_source describes this call; the bytes are identical whatever the source.
        return GuestImage(kernel=directory / "vmlinuz", initrd=directory / "initramfs.cpio.gz",
                          cmdline=CMDLINE, kernel_source=info.source, kernel_version=info.version,
                          modules=names, key=key)

    def mark_default() -> None:
        if kernel is None and kernel_release is None:
            data = (key + "\n").encode()
            write_durably(root / "guest" / DEFAULT_MARKER, lambda f: f.write(data), new=False, fsync=False)

    if not rebuild and _image_from_manifest(final) is not None:
        mark_default()
        say(f"image: cached {final} ({time.monotonic() - started:.1f} s)")
        return result(final)

    initrd = gzip_bytes(_initramfs(bb, init, agent, modules))
    manifest = {
        "format": FORMAT_VERSION, "key": key, "kernel": "vmlinuz", "initrd": "initramfs.cpio.gz",
        "cmdline": CMDLINE, "kernel_source": info.source, "kernel_version": info.version,
        "modules": list(names), "busybox": str(bb_path), "inputs": inputs,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (root / "guest").mkdir(parents=True, exist_ok=True)
    # Build in a hidden temporary directory and rename it into place: a killed build never
    # leaves a directory that looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:12]}-", dir=root / "guest"))
    try:
        (tmp / "vmlinuz").write_bytes(kernel_bytes)
        (tmp / "initramfs.cpio.gz").write_bytes(initrd)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; QEMU under libvirt runs as another user
        if final.exists():
            old = final.with_name(f".old-{key[:12]}-{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if _image_from_manifest(final) is None:
                raise
            # Another process finished the same image first: its bytes are the same as ours.
    except OSError as exc:
        raise GuestImageError(f"cannot write the guest image to {final}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mark_default()
    say(f"image: built {final} ({len(initrd) / 1e6:.1f} MB initramfs, modules {', '.join(names) or 'none'}, "
        f"{time.monotonic() - started:.1f} s)")
    return result(final)


class _BuildArgs(TypedDict, total=False):
    """The arguments of :func:`build_guest_image` that :func:`guest_image` passes on."""

    kernel: Path | None
    kernel_release: str | None
    modules_dir: Path | None
    busybox: Path | None
    rebuild: bool


def guest_image(*, cache_dir: Path | None = None, log: Log | None = None,
                **build_args: Unpack[_BuildArgs]) -> GuestImage:
    """An image from the cache when there is one, else :func:`build_guest_image`.

    :param cache_dir: the cache root.
    :param log: as for :func:`build_guest_image`.
    :param build_args: passed to :func:`build_guest_image` when it has to build; when any
        are given the cache is not searched blindly: the image is built (or reused) for them.
    :raises GuestImageError: as :func:`build_guest_image`.
    """
    if not build_args:
        found = find_guest_image(cache_dir)
        if found is not None:
            if log:
                log(f"image: found {found.initrd.parent}")
            return found
    return build_guest_image(cache_dir=cache_dir, log=log, **build_args)
