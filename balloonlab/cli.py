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

import pandas as pd

from balloonlab.experiments import Experiment, Schedule
from balloonlab.model.errors import BalloonLabError
from balloonlab.model.units import format_size
from balloonlab.record.store import Run


def _cmd_guest_build(args: argparse.Namespace) -> int:
    from balloonlab.image.build import build_guest_image
    image = build_guest_image(kernel=args.kernel, modules_dir=args.modules_dir, rebuild=args.rebuild,
                              log=lambda line: print(line, flush=True))
    print(f"kernel:    {image.kernel} ({image.kernel_source}, {image.kernel_version})")
    print(f"initramfs: {image.initrd}")
    print(f"modules:   {', '.join(image.modules)}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from balloonlab.qemu.guest import list_guests
    records = list_guests()
    if not records:
        print("no guests running")
    for r in records:
        owner = "detached" if r.detached else f"owned by pid {r.owner_pid}"
        print(f"{r.name:20} pid {r.pid:<8} {r.accel:4} {owner}  {r.runtime_dir}")
    return 0


async def _stop(name: str) -> bool:
    from balloonlab.qemu.guest import Guest
    guest = await Guest.reconnect(name)
    return await guest.shutdown()


def _cmd_stop(args: argparse.Namespace) -> int:
    graceful = asyncio.run(_stop(args.name))
    print(f"{args.name}: {'quit' if graceful else 'killed'}")
    return 0


def demo_experiment(run_root: str | Path = "runs", duration_s: float = 62.0) -> Experiment:
    """The main job: the built-in guest under a workload ramp and balloon steps, ~1 minute."""
    from balloonlab.image.builtin import builtin_spec
    balloon = Schedule.from_list([(0, "512M"), (10, "384M"), (20, "288M"), (32, "512M"),
                                  (44, "320M"), (54, "512M")])
    workload = Schedule.from_list([(0, 0), (4, "40M"), (8, "80M"), (12, "120M"), (16, "160M"),
                                   (40, 0), (48, "128M"), (58, 0)], kind="workload")
    return Experiment([builtin_spec("balloonlab-demo", memory="512M", period_s=1)], duration_s=duration_s,
                      balloon=balloon, workload=workload, run_root=run_root, name="demo")


class _ProgressBar:
    """A one-line bar on a terminal; a line per 10% when output goes to a file or CI log."""

    def __init__(self, width: int = 40) -> None:
        self.width = width
        self.tty = sys.stdout.isatty()
        self.shown = -1

    def __call__(self, fraction: float, message: str) -> None:
        filled = int(self.width * fraction)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {fraction:4.0%} {message}"
        if self.tty:
            print("\r" + bar, end="\n" if fraction >= 1.0 else "", flush=True)
        elif int(fraction * 10) > self.shown:
            self.shown = int(fraction * 10)
            print(bar, flush=True)


def print_summary(run: Run) -> None:
    """The summary table of a run: samples per guest and the balloon's step responses."""
    from balloonlab.analysis.measures import step_response
    samples, events = run.samples, run.events
    for guest, rows in samples.groupby("guest", observed=True):
        resets = int(rows["reset"].sum())
        print(f"guest {guest}: {len(rows)} samples over {(rows.index[-1] - rows.index[0]).total_seconds():.0f} s, "
              f"{resets} resets, median age {rows['age_s'].median():.2f} s")
    steps = step_response(samples, events)
    steps = steps[steps["start_actual"].notna()]  # a target sent before any sample: nothing measured
    if len(steps):
        print(f"\n{'at':>6} {'direction':9} {'from':>9} {'target':>9} {'reached':>7} {'time_s':>7} {'MiB/s':>7}")
        t0 = samples.index[0]
        for _, r in steps.iterrows():
            took = r["time_to_target_s"]
            rate = r["rate_mib_per_s"]
            direction = r["direction"] if isinstance(r["direction"], str) else "-"
            print(f"{(r['time'] - t0).total_seconds():6.1f} {direction:9} {format_size(r['start_actual']):>9} "
                  f"{format_size(r['target']):>9} {('yes' if r['reached'] else 'no'):>7} "
                  f"{'-' if pd.isna(took) else f'{took:.2f}':>7} {'-' if pd.isna(rate) else f'{rate:.0f}':>7}")


def _cmd_demo(args: argparse.Namespace) -> int:
    experiment = demo_experiment(args.runs, args.duration)
    print(f"balloonlab demo: built-in guest, 1 s stats, workload ramp + balloon steps for "
          f"{experiment.duration_s:.0f} s")
    run = asyncio.run(experiment.run(progress=_ProgressBar()))
    print_summary(run)
    print(f"\nrun folder: {run.path}\nplot:       {run.plot_path}")
    return 0


async def _record(args: argparse.Namespace) -> Run:
    from balloonlab.qemu.guest import Guest
    from balloonlab.record.sampler import Sampler
    from balloonlab.record.store import load_run, new_run_dir
    guest = await Guest.attach(args.qmp, args.domain_xml)
    run_dir = Path(args.out) if args.out else new_run_dir(args.runs, guest.name)
    sampler = Sampler(run_dir=run_dir)
    try:
        async with sampler:
            await sampler.add(guest)
            print(f"recording {guest.name} into {run_dir} (Ctrl-C to stop)", flush=True)
            end = time.monotonic() + args.duration if args.duration else None
            while end is None or time.monotonic() < end:
                await asyncio.sleep(1)
                state = sampler.states()[guest.name]
                print(f"\r{state.samples} samples ({state.state})", end="", flush=True)
                if state.state == "dead":
                    break
    finally:
        await guest.close()
        print()
    run = load_run(run_dir)
    if len(run.samples):
        from balloonlab.analysis.plotting import save_run_plot
        save_run_plot(run.samples, run.events, run.plot_path)
    return run


def _cmd_record(args: argparse.Namespace) -> int:
    run = asyncio.run(_record(args))
    print(f"run folder: {run.path} ({len(run.samples)} samples)")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from balloonlab.analysis.plotting import save_run_plot
    from balloonlab.record.store import load_run
    run = load_run(args.run)
    if not len(run.samples):
        raise BalloonLabError(f"run {args.run} has no samples to plot")
    path = save_run_plot(run.samples, run.events, args.out or run.plot_path)
    print(path)
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
    demo = sub.add_parser("demo", help="a one-minute balloon experiment on the built-in guest")
    demo.add_argument("--duration", type=float, default=62.0, help="seconds to run (default 62)")
    demo.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    demo.set_defaults(func=_cmd_demo)
    record = sub.add_parser("record", help="record a running QEMU through its QMP socket")
    record.add_argument("--qmp", required=True, help="QEMU's QMP unix socket")
    record.add_argument("--domain-xml", help="its libvirt domain XML (sets the stats period if running)")
    record.add_argument("--duration", type=float, help="seconds to record (default: until Ctrl-C)")
    record.add_argument("--out", help="run folder (default: runs/<time>-<name>)")
    record.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    record.set_defaults(func=_cmd_record)
    plot = sub.add_parser("plot", help="redraw a run's PNG")
    plot.add_argument("run", help="a run folder")
    plot.add_argument("--out", help="PNG path (default: RUN/plot.png)")
    plot.set_defaults(func=_cmd_plot)
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
