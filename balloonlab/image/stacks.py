"""QEMU/libvirt/kernel stacks: the system's own, and newer ones from Debian unpacked beside it.

A *stack* is a QEMU (with the libvirt that goes with it) plus the guest kernel of the same
vintage. The system's packages are one stack. On Debian 12 a second, current one comes from
bookworm-backports (QEMU 10, libvirt 11, Linux 6.12): :func:`install_stacks` has apt resolve
those packages against the installed system and download only what differs
(``apt-get install --download-only -t bookworm-backports``), unpacks the .debs under the cache
(``<cache>/stacks/<name>/root``) without touching the system's dpkg database, and writes a
wrapper that runs that QEMU with its own libraries, modules and firmware. Debian 13 ships the
current stack itself, so there is nothing extra to install there. The libvirt of an unpacked
stack runs in a private mount namespace with the stack's /usr overlaid on the system's
(``scripts/libvirtd start --stack NAME``). Every built guest kernel runs under every QEMU.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balloonlab.image.build import build_guest_image, guest_images
from balloonlab.image.debs import apt_download_closure, unpack_debs
from balloonlab.image.kernel import default_cache_dir
from balloonlab.model.errors import GuestImageError

__all__ = ["EXTRA_STACKS", "Stack", "StackSource", "find_stacks", "install_stacks", "qemu_version"]

Log = Callable[[str], None]

#: Where a namespaced libvirtd of an unpacked stack keeps its sockets and state
#: (``scripts/libvirtd start --stack NAME``): ``<LIBVIRT_STATE_ROOT>/<name>/run/libvirt-sock``.
LIBVIRT_STATE_ROOT = Path("/run/balloonlab-stacks")
_STACK_FORMAT = 1


@dataclass(frozen=True)
class StackSource:
    """Debian packages that make a stack beside the system's own.

    :param name: the stack's name and folder (``<cache>/stacks/<name>``).
    :param target_release: apt's ``-t`` (where the packages come from).
    :param packages: what to install; apt adds what they need beyond the installed system.
    :param kernel_release: the guest kernel series of the same vintage.
    """

    name: str
    target_release: str
    packages: tuple[str, ...]
    kernel_release: str


#: The stacks to unpack beside the system's own, by Debian codename (os-release
#: VERSION_CODENAME). Debian 13 (trixie) ships QEMU 10, libvirt 11 and Linux 6.12 as its own.
EXTRA_STACKS: dict[str, tuple[StackSource, ...]] = {
    "bookworm": (StackSource("bookworm-backports", "bookworm-backports",
                             ("qemu-system-x86", "libvirt-daemon-system", "libvirt-clients",
                              "libvirt-daemon-driver-qemu"), "6.12"),),
    "trixie": (),
}


@dataclass(frozen=True)
class Stack:
    """A QEMU this machine can run, with its libvirt and the guest kernels built here.

    :param name: ``"system"`` for the system's own packages, else the unpacked stack's name.
    :param qemu: an executable that runs as it is (a wrapper for an unpacked stack).
    :param qemu_version: e.g. ``"10.0.2"``.
    :param libvirt_version: the libvirt of the same stack, None when not installed.
    :param libvirt_uri: how to reach that libvirt once its daemon runs.
    :param root: where an unpacked stack's files are (None: the system's own).
    :param kernel_release: the guest kernel series of the same vintage (None: not known).
    :param kernels: releases of every built-in guest image built here (any runs with any QEMU).
    """

    name: str
    qemu: Path
    qemu_version: str
    libvirt_version: str | None
    libvirt_uri: str | None
    root: Path | None
    kernel_release: str | None
    kernels: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        """The stack as ``balloonlab stacks --json`` prints it."""
        return {"name": self.name, "qemu": str(self.qemu), "qemu_version": self.qemu_version,
                "libvirt_version": self.libvirt_version, "libvirt_uri": self.libvirt_uri,
                "root": None if self.root is None else str(self.root), "kernel_release": self.kernel_release,
                "kernels": list(self.kernels)}


def host_codename() -> str | None:
    """VERSION_CODENAME from /etc/os-release (``bookworm``, ``trixie``), None if unknown."""
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    found = re.search(r'^VERSION_CODENAME="?([a-z]+)"?$', text, re.M)
    return found.group(1) if found else None


@functools.cache
def _version_of(binary: str, mtime_ns: int) -> str:
    proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False)
    found = re.search(r"QEMU emulator version (\d+\.\d+\.\d+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise GuestImageError(f"{binary} --version did not print a QEMU version "
                              f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}")
    return found.group(1)


def qemu_version(binary: str | Path) -> str:
    """``"10.0.2"`` from ``binary --version`` (cached while the file is unchanged).

    :raises GuestImageError: when it does not run or prints no version.
    """
    path = shutil.which(str(binary)) or str(binary)
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise GuestImageError(f"QEMU binary {binary} not found: {exc.strerror}") from None
    return _version_of(path, mtime)


def _system_libvirt_version() -> str | None:
    for binary in ("libvirtd", "/usr/sbin/libvirtd"):
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if found := re.search(r"(\d+\.\d+\.\d+)", out):
            return found.group(1)
    return None


def _kernel_series(release: str) -> str:
    """``"6.12.118+deb12-cloud-amd64"`` -> ``"6.12"``."""
    return ".".join(release.split(".")[:2])


def find_stacks(cache_dir: Path | None = None) -> list[Stack]:
    """The system's QEMU (when installed) and every unpacked stack, oldest QEMU first.

    :param cache_dir: the cache root (default: :func:`default_cache_dir`).
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images = guest_images(root)
    kernels = tuple(sorted({image.kernel_version for image in images}))
    default = next((image for image in images if image.key == _default_key(root)), None)
    stacks = []
    system_qemu = shutil.which("qemu-system-x86_64")
    if system_qemu is not None:
        stacks.append(Stack("system", Path(system_qemu), qemu_version(system_qemu), _system_libvirt_version(),
                            "qemu:///system", None,
                            None if default is None else _kernel_series(default.kernel_version), kernels))
    for meta_path in sorted((root / "stacks").glob("*/stack.json")):
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != _STACK_FORMAT:
                continue
            wrapper = meta_path.parent / meta["qemu"]
            socket = LIBVIRT_STATE_ROOT / meta["name"] / "run" / "libvirt-sock"
            stacks.append(Stack(meta["name"], wrapper, qemu_version(wrapper), meta.get("libvirt_version"),
                                f"qemu+unix:///system?socket={socket}" if meta.get("libvirt_version") else None,
                                meta_path.parent / "root", meta.get("kernel_release"), kernels))
        except (OSError, ValueError, KeyError, GuestImageError):
            continue  # a half-written or broken stack: `balloonlab stacks install` redoes it
    return sorted(stacks, key=lambda s: tuple(int(x) for x in s.qemu_version.split(".")))


def _default_key(root: Path) -> str | None:
    try:
        return (root / "guest" / "default").read_text().strip()
    except OSError:
        return None


def _wrapper(stack_dir: Path) -> str:
    """A shell wrapper running the unpacked QEMU with its own libraries, modules and firmware."""
    r = stack_dir / "root"
    return f"""#!/bin/sh
# QEMU from {stack_dir.name}, unpacked by `balloonlab stacks install` beside the system's QEMU.
# Its own shared libraries first, its own loadable modules (QEMU refuses another version's),
# its own firmware and option ROMs first (-L); the system's where the stack has none.
R='{r}'
export LD_LIBRARY_PATH="$R/usr/lib/x86_64-linux-gnu${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
export QEMU_MODULE_DIR="$R/usr/lib/x86_64-linux-gnu/qemu"
exec "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" "$@"
"""


def _deb_version(debs: list[Path], package: str) -> str | None:
    """The upstream version of ``package`` among downloaded .debs (``11.3.0`` of
    ``libvirt-daemon_11.3.0-2~bpo12+1_amd64.deb``)."""
    for deb in debs:
        name, _, rest = deb.name.partition("_")
        if name == package and (found := re.match(r"(?:\d+%3a)?(\d+\.\d+\.\d+)", rest)):
            return found.group(1)
    return None


def _install_stack(source: StackSource, root: Path, say: Log) -> None:
    final = root / "stacks" / source.name
    (root / "stacks").mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=root / "stacks"))
    try:
        (staging / "debs").mkdir()
        debs = apt_download_closure(source.packages, source.target_release, staging / "debs")
        say(f"stacks: {source.name}: {len(debs)} packages downloaded "
            f"({sum(d.stat().st_size for d in debs) / 1e6:.0f} MB)")
        unpack_debs(debs, staging / "root")
        shutil.rmtree(staging / "debs")
        if final.exists():
            shutil.rmtree(final)
        os.chmod(staging, 0o755)  # libvirt's QEMU user reads it too
        os.rename(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (final / "bin").mkdir()
    wrapper = final / "bin" / "qemu-system-x86_64"
    wrapper.write_text(_wrapper(final))
    wrapper.chmod(0o755)
    version = qemu_version(wrapper)  # runs it: a stack whose QEMU cannot start is not installed
    meta = {"format": _STACK_FORMAT, "name": source.name, "qemu": "bin/qemu-system-x86_64",
            "qemu_version": version, "libvirt_version": _deb_version(debs, "libvirt-daemon"),
            "kernel_release": source.kernel_release, "target_release": source.target_release,
            "packages": sorted(d.name for d in debs)}
    (final / "stack.json").write_text(json.dumps(meta, indent=1) + "\n")
    say(f"stacks: {source.name}: QEMU {version}, libvirt {meta['libvirt_version']} in {final / 'root'}")


def install_stacks(cache_dir: Path | None = None, log: Log | None = None,
                   codename: str | None = None) -> list[Stack]:
    """Unpack the stacks this Debian release lacks, and build the guest for every stack's kernel.

    Idempotent: a stack already unpacked and a guest already built are kept.

    :param cache_dir: the cache root (default: :func:`default_cache_dir`).
    :param log: receives a line per step.
    :param codename: the Debian release (default: this machine's, from /etc/os-release).
    :raises GuestImageError: when apt cannot fetch the packages or the unpacked QEMU cannot run.
    """
    say: Log = log or (lambda line: None)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    release = codename or host_codename()
    sources = EXTRA_STACKS.get(release or "", ())
    if release not in EXTRA_STACKS:
        say(f"stacks: no extra stack known for {release or 'this system'}: only the system's own QEMU")
    built = {stack.name for stack in find_stacks(root)}
    for source in sources:
        if source.name in built:
            say(f"stacks: {source.name}: unpacked (cached)")
        else:
            _install_stack(source, root, say)
    build_guest_image(cache_dir=root, log=say)  # the default image, for the system's kernel
    for source in sources:
        build_guest_image(cache_dir=root, log=say, kernel_release=source.kernel_release)
    return find_stacks(root)
