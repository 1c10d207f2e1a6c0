"""What every ``balloonlab`` subcommand shares: exit codes, one-line errors, argparse types."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NoReturn, Protocol

from balloonlab.model.errors import BalloonLabError

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class UsageError(Exception):
    """The command line is wrong in a way argparse cannot see (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse with balloonlab's one-line errors: no usage block, a pointer to ``--help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"balloonlab: error: {message}; see '{self.prog} --help'\n")


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def size(text: str) -> int:
    """An argparse type: a size in bytes or with a unit ("128M"), at least 0."""
    from balloonlab.model.units import parse_size
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a size of at least 0, got {text!r}")
    return value


def guest_name(text: str) -> str:
    """An argparse type: a name balloonlab could have given a guest."""
    from balloonlab.qemu.registry import validate_name
    try:
        return validate_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def runs_root(path: str) -> Path:
    """The folder run folders go into (made by the run when missing), refused when it is a file."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise BalloonLabError(f"--runs {root} is not a folder; pass the folder run folders should go into")
    return root




def open_run(path: str, made_by: str = "'balloonlab demo' or 'balloonlab record'") -> Any:
    """``load_run(path)`` with one-line errors that say what to pass instead.

    :raises BalloonLabError: the folder is missing, not a folder, or not a run folder.
    :raises ValueError: its run.json is damaged (the message names it).
    """
    from balloonlab.record.store import load_run
    folder, hint = Path(path), f"pass a folder made by {made_by}"
    if not folder.exists():
        raise BalloonLabError(f"run folder {folder} does not exist; {hint}")
    if not folder.is_dir():
        raise BalloonLabError(f"{folder} is not a folder; pass a run folder (the one holding run.json)")
    if not (folder / "run.json").is_file():
        raise BalloonLabError(f"{folder} is not a balloonlab run folder (no run.json); {hint}")
    return load_run(folder)


class AddCommand(Protocol):
    """``command(name, summary, func, under=None)``: a subparser wired to ``func(args) -> int``."""

    def __call__(self, name: str, summary: str, func: Any = None, under: Any = None) -> argparse.ArgumentParser: ...
