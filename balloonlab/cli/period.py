"""``balloonlab period-study``: the polling-period study (one guest per period, a burst
workload, the balloon's reports against the guest's own ground truth) into a run folder."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from balloonlab.cli.common import AddCommand, UsageError, runs_root, seconds, size
from balloonlab.cli.runs import _ProgressBar
from balloonlab.model.units import format_size

if TYPE_CHECKING:
    import pandas as pd

    from balloonlab.domain import DomainSpec

#: Columns the command prints, with their headings and formats.
COLUMNS = (("period_s", "period_s", "{:.0f}"), ("kind", "kind", "{}"), ("bursts", "bursts", "{:.0f}"),
           ("missed", "missed", "{:.0f}"), ("delay_median_s", "delay_med_s", "{:.2f}"),
           ("delay_max_s", "delay_max_s", "{:.2f}"), ("true_peak_median_mib", "peak_MiB", "{:.0f}"),
           ("under_median_pct", "under_med_%", "{:.0f}"), ("under_max_pct", "under_max_%", "{:.0f}"),
           ("commands_per_hour", "reads/h", "{:.0f}"), ("sampler_cpu_s_per_hour", "cpu_s/h", "{:.2f}"))


def _periods(text: str) -> tuple[int, ...]:
    """An argparse type: stats periods, whole seconds >= 1 separated by commas, none twice."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected periods of at least 1 s, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"one guest per period, so no period twice; got {text!r}")
    return values


def _holds(text: str) -> tuple[float, ...]:
    """An argparse type: positive, finite seconds separated by commas."""
    return tuple(seconds(part) for part in text.split(","))


def format_table(table: pd.DataFrame) -> str:
    """The study's table as aligned text (NA as '-')."""
    rows = [[heading for _, heading, _ in COLUMNS]]
    for _, row in table.iterrows():
        rows.append(["-" if name not in row or row[name] != row[name] else fmt.format(row[name])
                     for name, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows)


def _cmd_period_study(args: argparse.Namespace) -> int:
    from balloonlab.experiments.period_study import PeriodStudy
    from balloonlab.image.builtin import builtin_spec
    periods = args.periods
    kinds = tuple(args.kinds.split(","))
    if not kinds or set(kinds) - {"alloc", "reclaim"}:
        raise UsageError(f"argument --kinds: expected alloc and/or reclaim, got {args.kinds!r}")
    if args.memory == 0:
        raise UsageError("argument --memory: a guest needs some memory; got 0")

    def spec(name: str, period_s: int) -> DomainSpec:  # built at launch: usage errors come first
        return builtin_spec(name, memory=args.memory, period_s=period_s, swap=args.swap or None,
                            kernel_release=args.kernel_release, qemu_binary=args.qemu_binary)

    study = PeriodStudy(spec, periods=periods, duration_s=args.duration, holds_s=args.holds, kinds=kinds,
                        alloc_bytes=args.alloc, reclaim_bytes=args.reclaim, seed=args.seed,
                        align_phases=not args.no_align, run_root=runs_root(args.runs), plot=not args.no_plot)
    try:
        study.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"balloonlab period-study: {len(periods)} guests ({format_size(args.memory)}, swap "
          f"{format_size(args.swap) if args.swap else 'none'}), periods "
          f"{', '.join(f'{p} s' for p in periods)}, bursts for {args.duration:g} s")
    result = asyncio.run(study.run(progress=_ProgressBar()))
    planned = {b.kind: (sum(c.kind == b.kind for c in result.plan), b.size) for b in result.plan}
    print("\nbursts: " + ", ".join(f"{n} {kind} of {format_size(size)}" for kind, (n, size) in planned.items())
          + f"; ground truth: {int(result.clock['samples'].sum())} samples, clock offset known to "
          f"±{1000 * result.clock[['error_start_s', 'error_end_s']].max().max():.0f} ms\n")
    print(format_table(result.table))
    from balloonlab.analysis.period_study import missed_by_duration
    lengths = missed_by_duration(result.bursts).pivot(index="period_s", columns="duration", values="missed_pct")
    print("\nbursts missed (%) by their true length:")
    print(lengths.to_string(na_rep="-", float_format=lambda v: f"{v:.0f}"))
    print(f"\nrun folder: {result.run.path}")
    if not args.no_plot:
        print(f"figure:     {result.run.path / 'period-study.png'}")
    return 0


def register(command: AddCommand) -> None:
    """Add ``period-study`` to the parser."""
    study = command("period-study", "what each stats period sees of memory bursts, against the guest's truth",
                    _cmd_period_study)
    study.add_argument("--periods", type=_periods, default=(1, 2, 5, 10, 30),
                       help="stats periods, one guest each (default 1,2,5,10,30)")
    study.add_argument("--duration", type=seconds, default=180.0, help="seconds of bursts (default 180)")
    study.add_argument("--runs", default="runs", help="where the run folder is made (default runs/)")
    study.add_argument("--holds", type=_holds, default=(1, 2, 4, 8, 16),
                       help="burst hold times, cycled (default 1,2,4,8,16)")
    study.add_argument("--kinds", default="alloc,reclaim", help="burst kinds, alternating (default alloc,reclaim)")
    study.add_argument("--alloc", type=size, default=None, help="alloc burst size (default 45%% of MemAvailable)")
    study.add_argument("--reclaim", type=size, default=None, help="reclaim burst size (default MemAvailable + 32M)")
    study.add_argument("--memory", type=size, default=160 << 20, help="each guest's memory (default 160M)")
    study.add_argument("--swap", type=size, default=128 << 20, help="zram swap per guest, 0: none (default 128M)")
    study.add_argument("--kernel-release", default=None, help="guest kernel, e.g. 6.12 (default: the default image)")
    study.add_argument("--qemu-binary", default=None, help="QEMU to run the guests (default qemu-system-x86_64)")
    study.add_argument("--seed", type=int, default=12, help="seed of the bursts' random gaps (default 12)")
    study.add_argument("--no-align", action="store_true", help="leave each guest's report phase where launch put it")
    study.add_argument("--no-plot", action="store_true", help="skip the figures")
