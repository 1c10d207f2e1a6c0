"""The ``balloonlab`` command: build the test guest, run the demo, list and stop guests.

A thin layer over the library: every subcommand is a few calls into it, and errors from the
library are printed as one clear message (no traceback) with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from .errors import BalloonLabError
from .units import format_size


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from .guestimage import build_guest_image
    image = build_guest_image(kernel=args.kernel, modules_dir=args.modules_dir, rebuild=args.rebuild,
                              log=lambda line: print(line, flush=True))
    print(f"kernel:    {image.kernel} ({image.kernel_source}, {image.kernel_version})")
    print(f"initramfs: {image.initrd}")
    print(f"modules:   {', '.join(image.modules)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .guest import list_guests
    records = list_guests()
    if not records:
        print("no guests running")
    for r in records:
        owner = "detached" if r.detached else f"owned by pid {r.owner_pid}"
        print(f"{r.name:20} pid {r.pid:<8} {r.accel:4} {owner}  {r.runtime_dir}")
    return 0


async def _stop(name: str) -> bool:
    from .guest import Guest
    guest = await Guest.reconnect(name)
    return await guest.shutdown()


def _cmd_stop(args: argparse.Namespace) -> int:
    graceful = asyncio.run(_stop(args.name))
    print(f"{args.name}: {'quit' if graceful else 'killed'}")
    return 0


def _stats_row(stats, elapsed: float) -> str:  # type: ignore[no-untyped-def]
    s = stats.stats
    return (f"{elapsed:6.1f}s  total {format_size(s.get('total_memory')):>10}  "
            f"free {format_size(s.get('free_memory')):>10}  avail {format_size(s.get('available_memory')):>10}  "
            f"actual {format_size(stats.actual):>10}  age {stats.age_s if stats.age_s is not None else float('nan'):4.1f}s")


async def _demo(args: argparse.Namespace) -> None:
    from .builtin import builtin_spec
    from .guest import Guest
    spec = builtin_spec("balloonlab-demo", memory="512M", period_s=1)
    t0 = time.monotonic()
    async with await Guest.launch(spec) as guest:
        print(f"launched {guest.name} (pid {guest.pid}) in {time.monotonic() - t0:.1f} s; "
              f"balloon at {await guest.balloon.path()}, period {await guest.balloon.get_period()} s")
        first = await guest.balloon.wait_for_stats(30)
        print(_stats_row(first, time.monotonic() - t0))
        for label, action in (("allocate 128M in the guest", lambda: guest.workload.alloc("128M")),
                              ("inflate the balloon to 256M", lambda: guest.balloon.set_target("256M")),
                              ("deflate back to 512M", lambda: guest.balloon.set_target("512M")),
                              ("free the guest's memory", lambda: guest.workload.free())):
            print(f"-- {label}")
            await action()
            if "balloon" in label:
                result = await guest.balloon.wait_for_actual(timeout_s=30)
                print(f"   actual {format_size(result.final_actual)} after {result.elapsed_s:.1f} s "
                      f"({'reached' if result.reached else 'stalled'})")
            end = time.monotonic() + args.step_s
            while time.monotonic() < end:
                await asyncio.sleep(1)
                stats = await guest.read_stats()
                if stats.new:
                    print(_stats_row(stats, time.monotonic() - t0))
        print("-- the same numbers as virsh dommemstat prints them:")
        for name, value in (await guest.libvirt_stats()).items():
            print(f"   {name} {value}")
    print("guest shut down")


def _cmd_demo(args: argparse.Namespace) -> int:
    asyncio.run(_demo(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``balloonlab`` command."""
    parser = argparse.ArgumentParser(prog="balloonlab", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    guest = sub.add_parser("guest", help="the built-in test guest").add_subparsers(dest="guest_command", required=True)
    build = guest.add_parser("build", help="build (or find cached) the built-in guest image")
    build.add_argument("--kernel", type=Path, help="a kernel image to use instead of the host's or Debian's")
    build.add_argument("--modules-dir", type=Path, help="lib/modules/<version> of that kernel")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    build.set_defaults(func=_cmd_guest_build)
    demo = sub.add_parser("demo", help="boot the built-in guest and show its balloon at work")
    demo.add_argument("--step-s", type=float, default=4.0, help="seconds to watch after each step")
    demo.set_defaults(func=_cmd_demo)
    sub.add_parser("list", help="guests balloonlab launched that still run").set_defaults(func=_cmd_list)
    stop = sub.add_parser("stop", help="stop a running (e.g. detached) guest by name")
    stop.add_argument("name")
    stop.set_defaults(func=_cmd_stop)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``balloonlab`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BalloonLabError as exc:
        print(f"balloonlab: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
