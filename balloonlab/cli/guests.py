"""``balloonlab guest build``, ``list`` and ``stop``: the built-in guest and running guests."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import TYPE_CHECKING

from balloonlab.cli.common import AddCommand, UsageError, guest_name
from balloonlab.model.errors import BalloonLabError

if TYPE_CHECKING:
    from balloonlab.qemu.registry import RegistryEntry


def _cmd_guest_build(args: argparse.Namespace) -> int:
    if args.distro == "debian":
        return _build_debian(args)
    from balloonlab.image.build import build_guest_image
    if args.modules_dir is not None and args.kernel is None:
        raise UsageError("--modules-dir goes with --kernel (it holds that kernel's modules); pass --kernel too")
    if args.kernel_release is not None and args.kernel is not None:
        raise UsageError("--kernel-release picks Debian's kernel of that release; --kernel names one: pass one of them")
    image = build_guest_image(kernel=args.kernel, modules_dir=args.modules_dir, rebuild=args.rebuild,
                              kernel_release=args.kernel_release, log=lambda line: print(line, flush=True))
    print(f"kernel:    {image.kernel} ({image.kernel_source}, {image.kernel_version})")
    print(f"initramfs: {image.initrd}")
    print(f"modules:   {', '.join(image.modules)}")
    return 0


def _build_debian(args: argparse.Namespace) -> int:
    from balloonlab.image.debian import build_debian_image
    if args.kernel is not None or args.modules_dir is not None:
        raise UsageError("--kernel and --modules-dir are for the built-in guest; the Debian image installs "
                         "Debian's kernel package (pick its series with --kernel-release)")
    image = build_debian_image(kernel_release=args.kernel_release, release=args.release, rebuild=args.rebuild,
                               log=lambda line: print(line, flush=True))
    print(f"kernel: {image.kernel} ({image.kernel_version})")
    print(f"base:   {image.base} (read-only; guests boot overlays on it)")
    print(f"domain: {image.domain_xml}")
    return 0


# ---------------------------------------------------------------------------- list, stop

def _running_guests() -> list[RegistryEntry]:
    from balloonlab.qemu.fleet import list_guests
    try:
        return list_guests()
    except OSError as exc:
        where = exc.filename or os.environ.get("BALLOONLAB_RUNTIME_DIR") or "the runtime dir"
        raise BalloonLabError(f"cannot use the runtime dir {where}: {exc.strerror or exc}; set "
                              "BALLOONLAB_RUNTIME_DIR to a folder you can write") from None


def _cmd_list(args: argparse.Namespace) -> int:
    records = _running_guests()
    if not records:
        print("no guests running")
    for r in records:
        owner = "detached" if r.detached else f"owned by pid {r.owner_pid}"
        print(f"{r.name:20} pid {r.pid:<8} {r.accel:4} {owner}  {r.runtime_dir}")
    return 0


async def _stop(name: str) -> bool:
    from balloonlab.qemu.guest import Guest
    return await (await Guest.reconnect(name)).shutdown()


def _cmd_stop(args: argparse.Namespace) -> int:
    if args.name not in (running := [r.name for r in _running_guests()]):
        raise BalloonLabError(f"no running guest named {args.name!r} (running: {', '.join(running) or 'none'}); "
                              "'balloonlab list' shows the guests balloonlab launched")
    graceful = asyncio.run(_stop(args.name))
    print(f"{args.name}: {'quit' if graceful else 'killed'}")
    return 0



def register(command: AddCommand) -> None:
    """Add ``guest build``, ``list`` and ``stop`` to the parser."""
    guest = command("guest", "the built-in test guest and the Debian guest image").add_subparsers(
        dest="guest_command", metavar="{build}", required=True)
    build = command("build", "build (or find cached) a guest image: the built-in one, or Debian's with "
                    "--distro debian (prints `domain: PATH`, a domain XML that boots it)", _cmd_guest_build, guest)
    build.add_argument("--distro", choices=("builtin", "debian"), default="builtin",
                       help="builtin: the busybox test guest (seconds to boot); debian: a qcow2 with systemd, "
                            "qemu-guest-agent, swap and stress-ng, made by debootstrap (needs root, minutes once)")
    build.add_argument("--release", help="Debian codename for --distro debian (default: the host's)")
    build.add_argument("--kernel", type=Path, help="a kernel image to use instead of the host's or Debian's")
    build.add_argument("--modules-dir", type=Path, help="lib/modules/<version> of that kernel (with --kernel)")
    build.add_argument("--kernel-release", help="Debian's cloud kernel of this series or release, e.g. 6.12 or 6.1 "
                                                "(default: the host's, else the release's own)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    command("list", "guests balloonlab launched that still run", _cmd_list)
    stop = command("stop", "stop a running (e.g. detached) guest by name", _cmd_stop)
    stop.add_argument("name", type=guest_name, help="its name, as 'balloonlab list' shows it")
