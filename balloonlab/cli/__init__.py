"""The ``balloonlab`` command: build the test guest, run the demo, record, plot, list and stop guests,
compare the ways of taking memory back, run balloon policies live and replay them on recorded runs.

A thin layer over the library. Every error is one line on stderr, ``balloonlab: error: <what
was wrong and what to do>``, never a traceback (``--debug`` or ``BALLOONLAB_DEBUG=1`` shows it).
Exit status 2: the command line itself is wrong (unknown option, missing argument, a value that
cannot be right such as a negative duration), as argparse does; 1: what it names did not work
(missing file or socket, not a run folder, bad domain XML, no such guest, QEMU failing); 130: interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from balloonlab.cli import compare, guests, period, policy, runs, stacks
from balloonlab.cli.common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, UsageError, _Parser
from balloonlab.cli.runs import demo_experiment, print_summary
from balloonlab.model.errors import BalloonLabError, LaunchError

__all__ = ["build_parser", "demo_experiment", "main", "print_summary"]

#: The modules that add subcommands, in ``--help`` order; each has ``register(command)``.
COMMAND_MODULES = (guests, stacks, runs, period, compare, policy)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``balloonlab`` command."""
    debug_help = "show the traceback of an error (also: BALLOONLAB_DEBUG=1)"
    debug = _Parser(add_help=False)  # --debug after the subcommand too; SUPPRESS keeps the main one's value
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    parser = _Parser(prog="balloonlab", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--debug", action="store_true", default=False, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, func: Any = None, under: Any = None) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = (under or sub).add_parser(name, help=summary, parents=[debug])
        made.set_defaults(func=func, prog=made.prog)
        return made

    for module in COMMAND_MODULES:
        module.register(command)
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

