"""``balloonlab demo``, ``record`` and ``plot``: experiments and recordings into run folders."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from balloonlab.cli.common import AddCommand, UsageError, open_run, runs_root, seconds
from balloonlab.experiments import Experiment, Schedule
from balloonlab.model.errors import BalloonLabError, MonitorError
from balloonlab.model.units import format_size

if TYPE_CHECKING:
    from balloonlab.domain import DomainSpec
    from balloonlab.record.store import Run


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
    experiment = demo_experiment(runs_root(args.runs), args.duration)
    print(f"balloonlab demo: built-in guest, 1 s stats, workload ramp + balloon steps for "
          f"{experiment.duration_s:.0f} s")
    run = asyncio.run(experiment.run(progress=_ProgressBar()))
    print_summary(run)
    print(f"\nrun folder: {run.path}\nplot:       {run.plot_path}")
    return 0


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


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 0 (any free one) to 65535, got {text!r}")
    return int(text)


async def _record(args: argparse.Namespace) -> Run:
    from balloonlab.qemu.guest import Guest
    from balloonlab.record.metrics import serve_metrics
    from balloonlab.record.sampler import Sampler
    from balloonlab.record.store import load_run, new_run_dir
    spec = _load_domain_xml(args.domain_xml) if args.domain_xml else None
    qmp = _check_qmp_socket(args.qmp)
    out = _check_new_run_folder(Path(args.out)) if args.out else None
    root = runs_root(args.runs) if out is None else Path(args.runs)
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
            made = not run_dir.exists()
            sampler = Sampler(run_dir=run_dir)
            try:  # bound before the recording starts: a port in use fails with nothing recorded
                metrics = None if args.metrics_port is None else serve_metrics(sampler, args.metrics_port,
                                                                               args.metrics_addr)
            except BalloonLabError:
                if made:
                    with contextlib.suppress(OSError):
                        run_dir.rmdir()  # the empty folder Sampler() made, and only if still empty
                raise
            async with contextlib.AsyncExitStack() as closing:  # first in: the endpoint closes if start() fails
                if metrics is not None:
                    closing.push_async_callback(metrics.aclose)
                await closing.enter_async_context(sampler)
                await sampler.add(guest)
                print(f"recording {guest.name} into {run_dir} (Ctrl-C to stop)", flush=True)
                if metrics is not None:
                    print(f"metrics: {metrics.url}", flush=True)
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
    folder = Path(args.run)
    if args.out is not None and Path(args.out).is_dir():
        raise BalloonLabError(f"--out {args.out} is a folder; pass the path of the PNG to write")
    run = open_run(args.run)
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



def register(command: AddCommand) -> None:
    """Add ``demo``, ``record`` and ``plot`` to the parser."""
    demo = command("demo", "a one-minute balloon experiment on the built-in guest", _cmd_demo)
    demo.add_argument("--duration", type=seconds, default=62.0,
                      help=f"seconds to run, at least {DEMO_MIN_DURATION_S:g} (default 62)")
    demo.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    record = command("record", "record a running QEMU through its QMP socket", _cmd_record)
    record.add_argument("--qmp", required=True, help="QEMU's QMP unix socket")
    record.add_argument("--domain-xml", help="its libvirt domain XML file (sets the stats period if running)")
    record.add_argument("--duration", type=seconds, help="seconds to record (default: until Ctrl-C)")
    record.add_argument("--out", help="a new run folder (default: RUNS/<time>-<name>)")
    record.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    record.add_argument("--metrics-port", type=_port, metavar="PORT",
                        help="serve Prometheus metrics of the recording on this port (0: any free one)")
    record.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                        help="address the metrics endpoint listens on (default 127.0.0.1; 0.0.0.0: every one)")
    plot = command("plot", "redraw a run's PNG", _cmd_plot)
    plot.add_argument("run", help="a run folder")
    plot.add_argument("--out", help="PNG path (default: RUN/plot.png)")
