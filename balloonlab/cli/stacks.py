"""``balloonlab stacks``: the QEMU binaries and guest kernels found here; ``stacks install``."""

from __future__ import annotations

import argparse
import json

from balloonlab.cli.common import AddCommand


def _cmd_stacks(args: argparse.Namespace) -> int:
    from balloonlab.image.stacks import find_stacks, install_stacks
    if args.action == "install":
        stacks = install_stacks(log=lambda line: print(line, flush=True))
        if args.json:
            print(json.dumps([s.as_json() for s in stacks], indent=1))
        return 0
    stacks = find_stacks()
    if args.json:
        print(json.dumps([s.as_json() for s in stacks], indent=1))
        return 0
    if not stacks:
        print("no QEMU found: install qemu-system-x86 (make test does), then `balloonlab stacks install`")
    for s in stacks:
        libvirt = f"libvirt {s.libvirt_version}" if s.libvirt_version else "no libvirt"
        print(f"{s.name:20} QEMU {s.qemu_version:8} {libvirt:15} kernel {s.kernel_release or '-':5} {s.qemu}")
    kernels = stacks[0].kernels if stacks else ()
    print(f"guest kernels built: {', '.join(kernels) or 'none (run `balloonlab guest build`)'}")
    return 0


def register(command: AddCommand) -> None:
    """Add ``stacks [install] [--json]`` to the parser."""
    stacks = command("stacks", "QEMU binaries and guest kernels found here; `install` adds the current stack",
                     _cmd_stacks)
    stacks.add_argument("action", nargs="?", choices=("list", "install"), default="list",
                        help="list (default) or install: unpack the stacks this Debian release lacks "
                             "(QEMU 10 and libvirt 11 from bookworm-backports on Debian 12) and build "
                             "the built-in guest for each stack's kernel")
    stacks.add_argument("--json", action="store_true",
                        help="print a JSON list of objects: name, qemu, qemu_version, libvirt_version, "
                             "libvirt_uri, root, kernel_release, kernels")
