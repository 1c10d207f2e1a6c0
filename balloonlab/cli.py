"""The ``balloonlab`` command: build the test guest, run the demo, record, plot, list and stop guests.

A thin layer over the library. Every error is one line on stderr, ``balloonlab: error: <what
was wrong and what to do>``, never a traceback (``--debug`` or ``BALLOONLAB_DEBUG=1`` shows it).
Exit status 2: the command line itself is wrong (unknown option, missing argument, a value that
cannot be right such as a negative duration), as argparse does; 1: what it names did not work
(missing file or socket, not a run folder, bad domain XML, no such guest, QEMU failing); 130: interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pandas as pd

from balloonlab.experiments import Experiment, Schedule
from balloonlab.model.errors import BalloonLabError, LaunchError, MonitorError
from balloonlab.model.units import format_size

if TYPE_CHECKING:
    from balloonlab.domain import DomainSpec
    from balloonlab.qemu.registry import RegistryEntry
    from balloonlab.record.store import Run

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with balloonlab's one-line errors: no usage block, a pointer to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"balloonlab: error: {message}; see '{self.prog} --help'\n")


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _guest_name(text: str) -> str:
    """An argparse type: a name balloonlab could have given a guest."""
    from balloonlab.qemu.registry import validate_name
    try:
        return validate_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _runs_root(path: str) -> Path:
    """The folder run folders go into (made by the run when missing), refused when it is a file."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise BalloonLabError(f"--runs {root} is not a folder; pass the folder run folders should go into")
    return root


# ---------------------------------------------------------------------------- guest build

def _cmd_guest_build(args: argparse.Namespace) -> int:
    from balloonlab.image.build import build_guest_image
    if args.modules_dir is not None and args.kernel is None:
        raise UsageError("--modules-dir goes with --kernel (it holds that kernel's modules); pass --kernel too")
    image = build_guest_image(kernel=args.kernel, modules_dir=args.modules_dir, rebuild=args.rebuild,
                              log=lambda line: print(line, flush=True))
    print(f"kernel:    {image.kernel} ({image.kernel_source}, {image.kernel_version})")
    print(f"initramfs: {image.initrd}")
    print(f"modules:   {', '.join(image.modules)}")
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


# ---------------------------------------------------------------------------- demo

def _demo_schedules() -> tuple[Schedule, Schedule]:
    balloon = Schedule.from_list([(0, "512M"), (10, "384M"), (20, "288M"), (32, "512M"),
                                  (44, "320M"), (54, "512M")])
    workload = Schedule.from_list([(0, 0), (4, "40M"), (8, "80M"), (12, "120M"), (16, "160M"),
                                   (40, 0), (48, "128M"), (58, 0)], kind="workload")
    return balloon, workload


#: The shortest ``balloonlab demo --duration``: its schedules' last step.
DEMO_MIN_DURATION_S = max(s.duration_s for s in _demo_schedules())


def demo_experiment(run_root: str | Path = "runs", duration_s: float = 62.0) -> Experiment:
    """The main job: the built-in guest under a workload ramp and balloon steps, ~1 minute."""
    from balloonlab.image.builtin import builtin_spec
    balloon, workload = _demo_schedules()
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
    if args.duration < DEMO_MIN_DURATION_S:
        raise UsageError(f"argument --duration: the demo's schedules last {DEMO_MIN_DURATION_S:g} s; "
                         f"expected at least that, got {args.duration:g}")
    experiment = demo_experiment(_runs_root(args.runs), args.duration)
    print(f"balloonlab demo: built-in guest, 1 s stats, workload ramp + balloon steps for "
          f"{experiment.duration_s:.0f} s")
    run = asyncio.run(experiment.run(progress=_ProgressBar()))
    print_summary(run)
    print(f"\nrun folder: {run.path}\nplot:       {run.plot_path}")
    return 0


# ---------------------------------------------------------------------------- record

def _load_domain_xml(path: str) -> DomainSpec:
    from balloonlab.domain import load_domain_xml
    from balloonlab.model.errors import DomainXMLError
    try:
        return load_domain_xml(path)
    except OSError as exc:
        raise BalloonLabError(f"cannot read domain XML {path}: {exc.strerror or exc}") from None
    except DomainXMLError as exc:
        raise BalloonLabError(f"domain XML {path}: {exc}") from None


def _check_qmp_socket(path: str) -> str:
    hint = f"start QEMU with -qmp unix:{path},server=on,wait=off or pass the socket it listens on"
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise BalloonLabError(f"no QMP socket at {path} ({exc.strerror}); {hint}") from None
    if not stat.S_ISSOCK(mode):
        raise BalloonLabError(f"{path} is not a unix socket; {hint}")
    return path


def _check_new_run_folder(path: Path) -> Path:
    if path.exists() and not path.is_dir() or (path / "run.json").exists():
        what = "already holds a run (run.json)" if path.is_dir() else "is a file"
        raise BalloonLabError(f"--out {path} {what}; pass a new folder")
    return path


async def _record(args: argparse.Namespace) -> Run:
    from balloonlab.qemu.guest import Guest
    from balloonlab.record.sampler import Sampler
    from balloonlab.record.store import load_run, new_run_dir
    spec = _load_domain_xml(args.domain_xml) if args.domain_xml else None
    qmp = _check_qmp_socket(args.qmp)
    out = _check_new_run_folder(Path(args.out)) if args.out else None
    root = _runs_root(args.runs) if out is None else Path(args.runs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        guest = await Guest.attach(qmp, spec)
    except MonitorError as exc:
        if "Connection refused" not in str(exc):
            raise
        raise BalloonLabError(f"{exc}; the socket is there but nothing listens: is its QEMU still running?") from None
    failed: str | None = None
    try:
        run_dir = out or new_run_dir(root, guest.name)
        # Ctrl-C ends the recording normally (the run is saved and plotted); a second one interrupts.
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            async with Sampler(run_dir=run_dir) as sampler:
                await sampler.add(guest)
                print(f"recording {guest.name} into {run_dir} (Ctrl-C to stop)", flush=True)
                end = time.monotonic() + args.duration if args.duration else math.inf
                while not stop.is_set() and (left := end - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), min(1.0, left))
                    state = sampler.states()[guest.name]
                    print(f"\r{state.samples} samples ({state.state})", end="", flush=True)
                    if state.state == "dead":  # QEMU quit or closed QMP: the recording is over
                        print(f"\n{guest.name} went away: recording stopped", end="", flush=True)
                        break
                    if state.state == "failed":
                        failed = state.error or "sampling failed"
                        break
        finally:
            loop.remove_signal_handler(signal.SIGINT)
    finally:
        await guest.close()
        print()
    run = load_run(run_dir)
    if len(run.samples):
        from balloonlab.analysis.plotting import save_run_plot
        save_run_plot(run.samples, run.events, run.plot_path)
    if failed is not None:
        raise BalloonLabError(f"recording {guest.name} stopped: {failed}; the run so far is in {run.path}")
    return run


def _cmd_record(args: argparse.Namespace) -> int:
    run = asyncio.run(_record(args))
    print(f"run folder: {run.path} ({len(run.samples)} samples)")
    return 0


# ---------------------------------------------------------------------------- plot

def _cmd_plot(args: argparse.Namespace) -> int:
    from balloonlab.record.store import load_run
    folder, hint = Path(args.run), "pass a folder made by 'balloonlab demo' or 'balloonlab record'"
    if not folder.exists():
        raise BalloonLabError(f"run folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise BalloonLabError(f"{folder} is not a folder; pass a run folder (the one holding run.json)")
    if not (folder / "run.json").is_file():
        raise BalloonLabError(f"{folder} is not a balloonlab run folder (no run.json); {hint}")
    if args.out is not None and Path(args.out).is_dir():
        raise BalloonLabError(f"--out {args.out} is a folder; pass the path of the PNG to write")
    try:
        run = load_run(folder)
    except json.JSONDecodeError as exc:
        raise BalloonLabError(f"{folder / 'run.json'} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                              "the run folder is damaged") from None
    if not len(run.samples):
        raise BalloonLabError(f"run {folder} has no samples to plot")
    from balloonlab.analysis.plotting import save_run_plot
    target = Path(args.out) if args.out else run.plot_path
    try:
        path = save_run_plot(run.samples, run.events, target)
    except OSError as exc:
        raise BalloonLabError(f"cannot write the plot to {target}: {exc.strerror or exc}; pass another --out") from None
    print(path)
    return 0


# ---------------------------------------------------------------------------- the parser

def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``balloonlab`` command."""
    debug_help = "show the traceback of an error (also: BALLOONLAB_DEBUG=1)"
    debug = _Parser(add_help=False)  # --debug after the subcommand too; SUPPRESS keeps the main one's value
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    parser = _Parser(prog="balloonlab", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--debug", action="store_true", default=False, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, func: Any = None, under: Any = sub) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = under.add_parser(name, help=summary, parents=[debug])
        made.set_defaults(func=func, prog=made.prog)
        return made

    guest = command("guest", "the built-in test guest").add_subparsers(
        dest="guest_command", metavar="{build}", required=True)
    build = command("build", "build (or find cached) the built-in guest image", _cmd_guest_build, guest)
    build.add_argument("--kernel", type=Path, help="a kernel image to use instead of the host's or Debian's")
    build.add_argument("--modules-dir", type=Path, help="lib/modules/<version> of that kernel (with --kernel)")
    build.add_argument("--rebuild", action="store_true", help="rebuild even when cached")
    demo = command("demo", "a one-minute balloon experiment on the built-in guest", _cmd_demo)
    demo.add_argument("--duration", type=_seconds, default=62.0,
                      help=f"seconds to run, at least {DEMO_MIN_DURATION_S:g} (default 62)")
    demo.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    record = command("record", "record a running QEMU through its QMP socket", _cmd_record)
    record.add_argument("--qmp", required=True, help="QEMU's QMP unix socket")
    record.add_argument("--domain-xml", help="its libvirt domain XML file (sets the stats period if running)")
    record.add_argument("--duration", type=_seconds, help="seconds to record (default: until Ctrl-C)")
    record.add_argument("--out", help="a new run folder (default: RUNS/<time>-<name>)")
    record.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    plot = command("plot", "redraw a run's PNG", _cmd_plot)
    plot.add_argument("run", help="a run folder")
    plot.add_argument("--out", help="PNG path (default: RUN/plot.png)")
    command("list", "guests balloonlab launched that still run", _cmd_list)
    stop = command("stop", "stop a running (e.g. detached) guest by name", _cmd_stop)
    stop.add_argument("name", type=_guest_name, help="its name, as 'balloonlab list' shows it")
    return parser


def _one_line(exc: BaseException) -> str:
    """What went wrong, in one line; details (QEMU's output, a traceback) are for --debug."""
    more = False
    if isinstance(exc, LaunchError):
        text = exc.message + (f" (QEMU exit code {exc.exitcode})" if exc.exitcode is not None else "")
        more = bool(exc.command or exc.output.strip())
    elif isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, (BalloonLabError, OSError, ValueError, TypeError)):
        text = str(exc)
    else:  # not an error balloonlab raises on purpose: a bug
        text = f"unexpected {type(exc).__name__}: {exc} (a bug in balloonlab: please report it with --debug's output)"
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    return lines[0] + ("; rerun with --debug for the details" if more or len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``balloonlab`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("BALLOONLAB_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print("balloonlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"balloonlab: error: {exc}; see '{args.prog} --help'", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if debug:
            raise
        print(f"balloonlab: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
