"""``balloonlab policy run``: a policy live over built-in guests under a host memory budget, and
``balloonlab replay RUN``: policies tried offline on a recorded run, scored side by side."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from balloonlab.cli.common import AddCommand, UsageError, open_run, runs_root, seconds, size
from balloonlab.model.units import format_size, parse_size

if TYPE_CHECKING:
    import pandas as pd

POLICY_HELP = "mom, qmemman, psi, pi, or module:callable (a policy of your own)"


def _policy(text: str) -> str:
    """Checked when parsed: a built-in name or ``module:callable`` that imports."""
    from balloonlab.policies import load_policy
    try:
        load_policy(text)
    except (ValueError, ImportError, AttributeError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def format_scores(table: pd.DataFrame) -> str:
    """A score table (:func:`balloonlab.analysis.policy_score.score_table`) as aligned text."""
    shown = table.copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "-" if v != v else f"{v:.1f}")
    return str(shown.to_string())


def _cmd_policy_run(args: argparse.Namespace) -> int:
    from balloonlab.analysis.policy_score import score, score_table
    from balloonlab.experiments.overcommit import Overcommit
    experiment = Overcommit(None if args.policy == "none" else args.policy, guests=args.guests, memory=args.memory,
                            budget=None if args.budget == 0 else args.budget, duration_s=args.duration,
                            cycle_s=args.cycle, low=args.low, high=args.high, interval_s=args.interval,
                            kernel_release=args.kernel_release, qemu_binary=args.qemu_binary,
                            run_root=runs_root(args.runs))
    try:
        experiment.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    budget = None if args.budget == 0 else args.budget
    print(f"{args.guests} guests of {format_size(parse_size(args.memory))}, budget "
          f"{format_size(budget) if budget else 'none (the real host)'}, policy {args.policy}, "
          f"{args.duration:g} s", flush=True)
    run = asyncio.run(experiment.run(lambda fraction, text: print(f"  {text}", end="\r", flush=True)))
    print()
    print(format_scores(score_table({args.policy: score(run.samples, run.host, run.events, budget=budget)})))
    print(f"\nrun folder: {run.path}\nplot:       {run.path / 'plot-policy.png'}")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from balloonlab.analysis.policy_plot import plot_replay
    from balloonlab.experiments.replay import compare_decisions, replay
    run = open_run(args.run, "'balloonlab policy run' or 'balloonlab record'")
    budget: int | Literal["none"] | None = "none" if args.budget == 0 else args.budget  # 0: the real host
    result = replay(run, args.policy, budget=budget)  # ValueError for a run without samples: one line
    table = result.table()
    print(format_scores(table))
    print("(oom_kills and alloc_stalls of a replay are the recording's, plus the model's own OOMs)")
    if result.live_name is not None and result.live_name in result.policies:
        agreement = compare_decisions(run, result)
        print(f"\n{result.live_name}'s replayed decisions against its live ones:")
        print(agreement.summary.to_string())
    out = Path(args.out) if args.out else run.path / "replay"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "scores.csv")
    (out / "scores.json").write_text(json.dumps(json.loads(table.to_json(orient="index")), indent=1) + "\n")
    figure = plot_replay(result)
    figure.savefig(out / "replay.png", dpi=100)
    print(f"\nscores: {out / 'scores.csv'}\nplot:   {out / 'replay.png'}")
    return 0


def _policies(text: str) -> list[str]:
    named = [_policy(part.strip()) for part in text.split(",") if part.strip()]
    if not named:
        raise argparse.ArgumentTypeError("no policy given: name at least one, e.g. --policy mom")
    return named


def register(command: AddCommand) -> None:
    """Add ``policy run`` and ``replay`` to the parser."""
    policy = command("policy", "balloon policies: run one live over built-in guests under a budget")
    sub = policy.add_subparsers(dest="policy_command", required=True)
    run = command("run", "four built-in guests, a budget below their sum, out-of-phase workloads, the policy",
                  _cmd_policy_run, under=sub)
    run.add_argument("--policy", type=lambda t: t if t == "none" else _policy(t), default="mom",
                     help=POLICY_HELP + "; none: the baseline (default mom)")
    run.add_argument("--guests", type=int, default=4, help="built-in guests (default 4)")
    run.add_argument("--memory", default="512M", help="each guest's memory (default 512M)")
    run.add_argument("--budget", type=size, default=parse_size("1G"),
                     help="host memory budget for the guests' RAM (default 1G; 0: the real host)")
    run.add_argument("--duration", type=seconds, default=120.0, help="seconds (default 120)")
    run.add_argument("--cycle", type=seconds, default=60.0, help="one rise and fall of every workload (default 60)")
    run.add_argument("--low", default="32M", help="a workload's memory outside its slice (default 32M)")
    run.add_argument("--high", default="288M", help="a workload's memory in its slice (default 288M)")
    run.add_argument("--interval", type=seconds, default=2.0, help="seconds between decisions (default 2)")
    run.add_argument("--kernel-release", default=None, help="guest kernel, e.g. 6.12 (default: the default image)")
    run.add_argument("--qemu-binary", default=None, help="QEMU to run the guests (default qemu-system-x86_64)")
    run.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")
    replay_cmd = command("replay", "policies tried offline on a recorded run, scored side by side", _cmd_replay)
    replay_cmd.add_argument("run", help="a run folder (e.g. from `balloonlab policy run`)")
    replay_cmd.add_argument("--policy", type=_policies, default=["mom", "qmemman", "psi", "pi"],
                            help="comma-separated: " + POLICY_HELP + " (default: the four built-in ones)")
    replay_cmd.add_argument("--budget", type=size, default=None,
                            help="the budget (default: the run's; 0: none, the recorded real host)")
    replay_cmd.add_argument("--out", default=None, help="where scores.csv and replay.png go (default RUN/replay)")

