"""The built-in test guest: a kernel plus a tiny busybox initramfs, built once and cached.

:func:`build_guest_image` finds a kernel (an explicit path, the host's own, or Debian's cloud
kernel package, fetched with ``apt-get download`` and unpacked without installing it), picks
the virtio modules it needs in dependency order from their ``.modinfo``, and writes a
reproducible gzip'd newc initramfs holding a static busybox, ``/init`` and the workload
``/agent`` (see ``balloonlab/guest_init``). Images live under ``<cache>/guest/<key>/`` where
the key hashes every input, so an image is rebuilt only when an input changes;
:func:`find_guest_image` returns an already-built image without any download, for launch time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from balloonlab import _kmod
from balloonlab._cpio import CpioWriter, gzip_bytes
from balloonlab.errors import GuestImageError

__all__ = ["GuestImage", "KernelInfo", "acquire_kernel", "build_guest_image", "default_cache_dir",
           "find_guest_image", "guest_image", "CMDLINE", "MODULE_ROOTS"]

#: Bump when the image layout or the way inputs are combined changes: old images are ignored.
FORMAT_VERSION = 1
#: The kernel command line the image is made for (the launcher may append to it).
CMDLINE = "console=ttyS0 quiet panic=1"
#: The modules the guest needs; their dependencies are found from .modinfo.
MODULE_ROOTS = ("virtio_pci", "virtio_balloon")
#: Busybox applets the scripts use, linked in /bin (plus a few for debugging by hand).
APPLETS = (
    "sh", "ash", "cat", "dd", "echo", "free", "grep", "head", "insmod", "kill", "ls", "lsmod",
    "mkdir", "mkfifo", "mount", "printf", "ps", "reboot", "rm", "sleep", "stty", "sync", "tail",
    "test", "[", "true", "false", "umount", "uname", "poweroff", "dmesg", "wc",
)
_SCRIPTS_DIR = Path(__file__).with_name("guest_init")
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


# --- kernel acquisition -------------------------------------------------------------------

#: Where the host's own kernel is looked for (tests point these elsewhere).
HOST_BOOT_DIR = Path("/boot")
HOST_MODULES_ROOT = Path("/lib/modules")
#: Debian's metapackage whose first dependency is the current cloud kernel package.
DEBIAN_METAPACKAGE = "linux-image-cloud-amd64"
_APT_HINT = ("run `apt-get update` as root first (the project's Makefile does this), "
             "or pass kernel=PATH (--kernel) and modules_dir=PATH (--modules-dir)")


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
    builtin = _kmod.builtin_modules(modules) or set()
    if "virtio_balloon" not in builtin and "virtio_balloon" not in _kmod.module_index(modules):
        log(f"kernel: host kernel {release} has no virtio_balloon driver; not using it")
        return None
    return KernelInfo(kernel, modules, "host", release)


def _apt_kernel_package() -> str:
    """The cloud kernel package name: the first ``Depends:`` of the metapackage."""
    try:
        proc = subprocess.run(["apt-cache", "depends", DEBIAN_METAPACKAGE], capture_output=True,
                              text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise GuestImageError("no kernel: apt-cache is not installed (not a Debian-based system?); "
                              "pass kernel=PATH (--kernel) and modules_dir=PATH (--modules-dir)") from None
    for line in proc.stdout.splitlines():
        words = line.strip().lstrip("|").split()
        if len(words) >= 2 and words[0] == "Depends:" and not words[1].startswith("<"):
            return words[1]
    raise GuestImageError(f"no kernel: `apt-cache depends {DEBIAN_METAPACKAGE}` names no kernel package "
                          f"({(proc.stderr or proc.stdout).strip() or 'no output'}); {_APT_HINT}")


def _read_deb_data(deb: Path) -> tuple[str, bytes]:
    """(name, bytes) of the ``data.tar.*`` member of a .deb (an ``ar`` archive)."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise GuestImageError(f"{deb} is not a .deb (ar) archive")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                return name, f.read(size)
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to even offsets
    raise GuestImageError(f"{deb} has no data.tar member")


def _deb_members(deb: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular files in a .deb whose path (without "./") ``want`` accepts."""
    name, data = _read_deb_data(deb)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestImageError(f"{deb} is zstd-compressed; install zstd (apt-get install zstd)")
        data = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=True).stdout
    found: dict[str, bytes] = {}
    # Stream mode ("r|*") reads the xz/gz archive once, front to back.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and want(path):
                found[path] = tar.extractfile(member).read()  # type: ignore[union-attr]
    return found


def _unpack_kernel(deb: Path, pkg: str, dest: Path, log: Log) -> None:
    """Unpack the kernel, the virtio modules (and any module they need) into ``dest``."""
    extra: set[str] = set()

    def want(path: str) -> bool:
        parts = path.split("/")
        if path.startswith("boot/vmlinuz-"):
            return True
        if parts[:2] != ["lib", "modules"] or len(parts) < 4:
            return False
        return (parts[3:6] == ["kernel", "drivers", "virtio"] and path.endswith(_kmod.MODULE_SUFFIXES)
                or parts[3] == "modules.builtin" or _kmod.module_name_from_path(Path(path)) in extra)

    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        while True:
            files = _deb_members(deb, want)
            for path, data in files.items():
                (tmp / path).parent.mkdir(parents=True, exist_ok=True)
                (tmp / path).write_bytes(data)
            kernels = sorted(p for p in files if p.startswith("boot/vmlinuz-"))
            mod_dirs = sorted({"/".join(p.split("/")[:3]) for p in files if p.startswith("lib/modules/")})
            if not kernels or not mod_dirs:
                raise GuestImageError(f"{deb} holds no boot/vmlinuz-* or lib/modules/*: not a kernel package")
            # Dependencies outside drivers/virtio (none in 6.1) need a second pass.
            index = _kmod.module_index(tmp / mod_dirs[0])
            builtin = _kmod.builtin_modules(tmp / mod_dirs[0]) or set()
            missing = {d for p in index.values() for d in _kmod.read_module(p).depends
                       if d not in index and d not in builtin} - extra
            if not missing:
                break
            log(f"kernel: unpacking modules needed outside drivers/virtio: {', '.join(sorted(missing))}")
            extra |= missing
        meta = {"package": pkg, "kernel": kernels[0], "modules_dir": mod_dirs[0],
                "version": kernels[0].removeprefix("boot/vmlinuz-")}
        (tmp / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.chmod(tmp, 0o755)
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
        info = KernelInfo(dest / meta["kernel"], dest / meta["modules_dir"],
                          f"debian-package:{meta['package']}", meta["version"])
    except (OSError, ValueError, KeyError):
        return None
    return info if info.kernel.is_file() else None


def _debian_kernel(root: Path, log: Log) -> KernelInfo:
    kernels = root / "kernels"
    try:
        pkg = _apt_kernel_package()
    except GuestImageError as exc:
        # No apt answer (no lists, not Debian): an earlier download still does the job.
        cached = [i for d in sorted(kernels.glob("*/root")) if (i := _unpacked_kernel(d))]
        if not cached:
            raise
        info = max(cached, key=lambda i: i.kernel.stat().st_mtime_ns)
        log(f"kernel: Debian package {info.source.split(':', 1)[1]} (cached; apt-cache failed: {exc})")
        return info
    pkg_dir = kernels / pkg
    info = _unpacked_kernel(pkg_dir / "root")
    if info is not None:
        log(f"kernel: Debian package {pkg} (cached)")
        return info
    pkg_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(pkg_dir.glob(f"{pkg}_*.deb"))  # kept: a re-unpack needs no download
    state = "cached .deb" if debs else "downloaded"
    if not debs:
        debs = [_apt_download(pkg, pkg_dir)]
    _unpack_kernel(debs[0], pkg, pkg_dir / "root", log)
    info = _unpacked_kernel(pkg_dir / "root")
    if info is None:
        raise GuestImageError(f"unpacking {debs[0]} gave no usable kernel")
    log(f"kernel: Debian package {pkg} ({state})")
    log(f"kernel: unpacked {info.kernel.name} and {len(list(info.modules_dir.rglob('*.ko')))} modules "
        f"into {pkg_dir / 'root'}")
    return info


def _apt_download(pkg: str, pkg_dir: Path) -> Path:
    """``apt-get download pkg`` into ``pkg_dir``; the .deb's path."""
    # Download into a private directory so a killed download never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=pkg_dir))
    try:
        try:
            proc = subprocess.run(["apt-get", "download", pkg], cwd=tmp, capture_output=True,
                                  text=True, timeout=900, check=False)
        except FileNotFoundError:
            raise GuestImageError(f"no kernel: apt-get is not installed; {_APT_HINT}") from None
        got = sorted(tmp.glob("*.deb"))
        if proc.returncode != 0 or not got:
            raise GuestImageError(f"no kernel: `apt-get download {pkg}` failed: "
                                  f"{proc.stderr.strip()[-500:] or 'no .deb'}; {_APT_HINT}")
        os.rename(got[0], pkg_dir / got[0].name)
        return pkg_dir / got[0].name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def acquire_kernel(*, kernel: Path | None = None, modules_dir: Path | None = None,
                   cache_dir: Path | None = None, log: Log | None = None) -> KernelInfo:
    """Find a kernel for the guest: ``kernel``, else the host's, else Debian's cloud kernel.

    :param kernel: use this kernel image.
    :param modules_dir: its ``lib/modules/<version>`` (searched next to ``kernel`` if omitted).
    :param cache_dir: where downloaded kernels are kept (``<cache>/kernels/<pkg>/``).
    :param log: receives a line saying which kernel was chosen and whether it was cached.
    :raises GuestImageError: when the explicit kernel or its modules are missing, or apt cannot
        fetch the Debian kernel (the message says to run ``apt-get update`` or pass --kernel).
    """
    say: Log = log or (lambda line: None)
    if kernel is not None:
        info = _explicit_kernel(Path(kernel), None if modules_dir is None else Path(modules_dir))
        say(f"kernel: explicit {info.kernel} ({info.version}, modules from {info.modules_dir})")
        return info
    info = _host_kernel(say)
    if info is not None:
        say(f"kernel: host {info.kernel} with {info.modules_dir}")
        return info
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _debian_kernel(root, say)


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
    elf = _kmod.ElfFile(data, f"busybox {path}")
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
    index = _kmod.module_index(info.modules_dir)
    builtin = _kmod.builtin_modules(info.modules_dir)
    order = _kmod.resolve_load_order(MODULE_ROOTS, index, builtin, log)
    result = []
    release = info.version.split()[0]
    for mod in order:
        data = _kmod.load_module_bytes(mod.path)
        magic = _kmod.read_module(mod.path, data).vermagic.split(" ")[0]
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


def find_guest_image(cache_dir: Path | None = None) -> GuestImage | None:
    """The most recently built image in the cache, without building or downloading anything.

    :param cache_dir: the cache root (default: :func:`default_cache_dir`).
    :returns: the image, or None when none has been built (run :func:`build_guest_image`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    candidates = []
    try:
        entries = list((root / "guest").iterdir())
    except OSError:
        return None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # a build in progress, or one that was killed
        image = _image_from_manifest(entry)
        if image is not None:
            candidates.append(((entry / "manifest.json").stat().st_mtime_ns, entry.name, image))
    return max(candidates, key=lambda c: c[:2])[2] if candidates else None


def build_guest_image(*, kernel: Path | None = None, modules_dir: Path | None = None,
                      busybox: Path | None = None, cache_dir: Path | None = None,
                      rebuild: bool = False, log: Log | None = None) -> GuestImage:
    """Build (or reuse from the cache) the test guest image.

    :param kernel: a kernel image to use instead of looking for one.
    :param modules_dir: its ``lib/modules/<version>`` directory (found next to ``kernel`` when
        omitted).
    :param busybox: a statically linked busybox (default ``/bin/busybox``).
    :param cache_dir: the cache root (default: ``$BALLOONLAB_CACHE_DIR``,
        ``$XDG_CACHE_HOME/balloonlab`` or ``~/.cache/balloonlab``).
    :param rebuild: build the image again even when the cache has it.
    :param log: receives one human-readable line per step (which kernel, cached or built).
    :raises GuestImageError: when no kernel can be found or fetched (the message says what to
        run or pass), or busybox or the modules are unusable.
    """
    say: Log = log or (lambda line: None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    started = time.monotonic()
    info = acquire_kernel(kernel=kernel, modules_dir=modules_dir, cache_dir=root, log=say)
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

    if not rebuild and _image_from_manifest(final) is not None:
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
    say(f"image: built {final} ({len(initrd) / 1e6:.1f} MB initramfs, modules {', '.join(names) or 'none'}, "
        f"{time.monotonic() - started:.1f} s)")
    return result(final)


def guest_image(*, cache_dir: Path | None = None, log: Log | None = None, **build_args: object) -> GuestImage:
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
    return build_guest_image(cache_dir=cache_dir, log=log, **build_args)  # type: ignore[arg-type]
