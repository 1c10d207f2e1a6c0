"""Reading run folders back: every format balloonlab has written (see :mod:`balloonlab.record.store`).

A table's parts are read folder by folder (format 4: one folder per host, ``host=NAME``; formats
1 and 2: one per guest; format 3: none), keeping the outermost readable part of each nest of row
ranges, so a crash between a merge and the deletion of its inputs neither loses nor doubles a row.
The partition's value comes back as a column, as pyarrow's hive partitioning gives it.
"""

from __future__ import annotations

import json
import re
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, unquote

import pandas as pd
import pyarrow as pa

from balloonlab.model.files import read_json
from balloonlab.record.buffer import concat_frames

PART_RE = re.compile(r"^p-(\d+)-(\d+)\.parquet$")
#: Tables of a run folder, each its own hive-partitioned Parquet dataset.
TABLES = ("samples", "events", "host")
#: The newest format: ``TABLE/host=NAME/p-FIRST-END.parquet``.
RUN_FORMAT = 4
READ_ERRORS = (OSError, ValueError, pa.ArrowException)
T = TypeVar("T")


class SkippedPartWarning(RuntimeWarning):
    """A part file of a run could not be read (or overlaps another) and was left out."""


def partition_name(key: str, value: str) -> str:
    """``key=value`` with the value percent-escaped as pyarrow's hive partitioning decodes it
    (``/``, ``=`` and the rest never make folders of their own)."""
    return f"{key}={quote(value, safe='')}"


def outermost_parts(folder: Path, read: Callable[[Path], T], skipped: list[Path], *, stacklevel: int = 2) -> list[T]:
    """Each nest of row ranges in ``folder``, read once: its outermost part that ``read`` can
    read (a crash between a merge and the deletion of its inputs leaves nested ranges; an
    unreadable merge leaves its inputs). Parts left out are warned about (at ``stacklevel``
    above the caller) and appended to ``skipped``; a part vanishing while read (merged away by
    a live writer) means the folder is listed again."""
    for attempt in range(5):
        try:
            chosen, bad = _choose_parts(folder, read)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    for path, why in bad:
        warnings.warn(f"skipped {path}: {why}", SkippedPartWarning, stacklevel=stacklevel + 1)
        skipped.append(path)
    return chosen


def _choose_parts(folder: Path, read: Callable[[Path], T]) -> tuple[list[T], list[tuple[Path, str]]]:
    parts = sorted(((int(m[1]), int(m[2]), p) for p in folder.iterdir() if (m := PART_RE.match(p.name))),
                   key=lambda part: (part[0], -part[1]))  # each nest's outermost part first
    chosen: list[T] = []
    bad: list[tuple[Path, str]] = []
    covered = -1
    for first, end, path in parts:
        if end <= covered:
            continue  # nested in a part already read
        if first < covered:
            bad.append((path, f"its range {first}-{end} overlaps one already read"))
            continue
        try:
            chosen.append(read(path))
        except FileNotFoundError:
            raise
        except READ_ERRORS as exc:
            bad.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        covered = end
    return chosen, bad


def read_table(path: str | os.PathLike[str], table: str, *, skipped: list[Path] | None = None,
               run_format: int | None = None) -> pd.DataFrame:
    """Read ``samples``, ``events`` or ``host`` of a run folder into one frame (schema dtypes).

    :param skipped: unreadable part files are appended here (and warned about).
    :param run_format: the run's format (default: run.json's; 1 without one).
    """
    root = Path(path)
    if run_format is None:
        meta = root / "run.json"
        run_format = int(json.loads(meta.read_text()).get("format", 1)) if meta.exists() else 1
    skipped = skipped if skipped is not None else []
    folder = root / table
    if run_format == 3:
        return concat_frames(outermost_parts(folder, pd.read_parquet, skipped, stacklevel=3) if folder.is_dir() else [])
    key = "host" if run_format >= 4 else "guest"  # format 4: a folder per host; 1 and 2: per guest
    at = 0 if table == "host" or key == "guest" else 1  # where the frames have that column
    frames: list[pd.DataFrame] = []
    for sub in sorted(folder.glob(f"{key}=*")):
        if not sub.is_dir():
            continue
        raw = sub.name.removeprefix(f"{key}=")
        value = unquote(raw) if run_format >= 2 else raw
        for frame in outermost_parts(sub, pd.read_parquet, skipped, stacklevel=3):
            frame.insert(min(at, len(frame.columns)), key, value)
            frames.append(frame)
    return concat_frames(frames)


@dataclass
class Run:
    """A recorded run: frames, metadata, folder (``skipped``: unreadable parts; ``host``: empty without one)."""

    path: Path
    samples: pd.DataFrame
    events: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)
    host: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def plot_path(self) -> Path:
        """Where the run's PNG is (or will be) written."""
        return self.path / "plot.png"

    def plot(self, **kwargs: Any) -> Any:
        """Plot memory over time (``df.balloon.plot``: this layer never imports plotting)."""
        return self.samples.balloon.plot(events=self.events, **kwargs)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load a run folder, also one whose process was killed mid-run (up to its last flush).

    A part file that cannot be read (truncated by a crash on a filesystem without ordered
    writes) is left out with a :class:`SkippedPartWarning` and listed in ``Run.skipped``.

    :raises FileNotFoundError: the folder has no run.json (not a run folder).
    """
    folder = Path(path)
    meta_path = folder / "run.json"
    if not meta_path.exists():
        why = "does not exist" if not folder.exists() else "is not a balloonlab run folder (no run.json)"
        raise FileNotFoundError(f"{folder} {why}")
    metadata = read_json(meta_path, "the run folder is damaged")
    run_format = int(metadata.get("format", 1))
    skipped: list[Path] = []
    samples, events = (read_table(folder, table, skipped=skipped, run_format=run_format) for table in TABLES[:2])
    return Run(folder, samples, events, metadata, skipped,  # the host frame from format 3 on
               read_table(folder, "host", skipped=skipped, run_format=run_format) if run_format >= 3
               else pd.DataFrame())


