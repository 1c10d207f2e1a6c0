"""Run folders: Parquet samples and events written as a run goes, ``run.json``, a plot.

Layout (a plain Parquet dataset, partitioned by guest, that pandas, DuckDB, Dask or Spark
read as it is)::

    RUN/run.json                                  metadata, updated at start and end
    RUN/samples/guest=NAME/p-000001-000001.parquet one file per flush
    RUN/events/guest=NAME/p-000001-000001.parquet
    RUN/plot.png

Each flush writes complete files (to a temporary name, then renamed), so a run whose process
is killed keeps everything up to its last flush. Small files are merged now and then into
one ``p-FIRST-LAST`` file; a reader skips files whose range another file covers, so a crash
between writing a merged file and deleting its parts never duplicates rows.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from balloonlab.model.files import atomic_write_json
from balloonlab.record.buffer import concat_frames

_PART_RE = re.compile(r"^p-(\d{6})-(\d{6})\.parquet$")
RUN_FORMAT = 1


class RunWriter:
    """Writes one run folder incrementally.

    :param path: the run folder (created; must not hold another run).
    :param compact_every: merge a guest's single-flush files after this many flushes.
    """

    def __init__(self, path: str | os.PathLike[str], *, compact_every: int = 120) -> None:
        self.path = Path(path)
        if (self.path / "run.json").exists():
            raise FileExistsError(f"{self.path} already holds a run: choose a new folder")
        self.path.mkdir(parents=True, exist_ok=True)
        self.metadata: dict[str, Any] = {}
        self.compact_every = compact_every
        self._seq = 0

    def write_metadata(self, **fields: Any) -> None:
        """Merge ``fields`` into run.json and rewrite it atomically."""
        self.metadata.update(fields)
        self.metadata.setdefault("format", RUN_FORMAT)
        atomic_write_json(self.path / "run.json", self.metadata)

    def flush(self, samples: pd.DataFrame, events: pd.DataFrame) -> None:
        """Write the rows recorded since the last flush (either frame may be empty)."""
        self._seq += 1
        for table, frame in (("samples", samples), ("events", events)):
            if len(frame):
                for guest, part in frame.groupby("guest", observed=True):
                    self._write_part(table, str(guest), part.drop(columns="guest"), self._seq, self._seq)
        if self._seq % self.compact_every == 0:
            self.compact()

    def _write_part(self, table: str, guest: str, frame: pd.DataFrame, first: int, last: int) -> None:
        folder = self.path / table / f"guest={guest}"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"p-{first:06d}-{last:06d}.parquet"
        tmp = folder / f".{final.name}.tmp"
        frame.to_parquet(tmp, engine="pyarrow")
        os.replace(tmp, final)

    def compact(self) -> None:
        """Merge each guest's files into one (crash-safe: see the module docstring)."""
        for table in ("samples", "events"):
            for folder in sorted((self.path / table).glob("guest=*")):
                parts = _live_parts(folder)
                if len(parts) < 2:
                    continue
                first, last = parts[0][0], parts[-1][1]
                merged = pd.concat([pd.read_parquet(p) for _, _, p in parts])
                self._write_part(table, folder.name.removeprefix("guest="), merged, first, last)
                for _, _, p in parts:
                    p.unlink()


def _live_parts(folder: Path) -> list[tuple[int, int, Path]]:
    """The folder's part files minus those another file's range covers, in order."""
    parts = []
    for p in folder.iterdir():
        if m := _PART_RE.match(p.name):
            parts.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(p for p in parts
                  if not any(o is not p and o[0] <= p[0] and p[1] <= o[1] and (o[0], o[1]) != (p[0], p[1])
                             for o in parts))


def read_table(path: str | os.PathLike[str], table: str) -> pd.DataFrame:
    """Read ``samples`` or ``events`` of a run folder into one frame (schema dtypes)."""
    frames: list[pd.DataFrame] = []
    for folder in sorted((Path(path) / table).glob("guest=*")):
        guest = folder.name.removeprefix("guest=")
        for _, _, part in _live_parts(folder):
            frame = pd.read_parquet(part)
            frame.insert(0, "guest", guest)
            frames.append(frame)
    return concat_frames(frames)


@dataclass
class Run:
    """A recorded run: its frames, metadata and folder."""

    path: Path
    samples: pd.DataFrame
    events: pd.DataFrame
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def plot_path(self) -> Path:
        """Where the run's PNG is (or will be) written."""
        return self.path / "plot.png"

    def plot(self, **kwargs: Any) -> Any:
        """Plot memory over time (:func:`balloonlab.plot_memory` through the ``df.balloon``
        accessor, which ``import balloonlab`` registers: this layer never imports plotting)."""
        return self.samples.balloon.plot(events=self.events, **kwargs)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Load a run folder, also one whose process was killed mid-run (up to its last flush).

    :raises FileNotFoundError: the folder has no run.json (not a run folder).
    """
    folder = Path(path)
    meta_path = folder / "run.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{folder} is not a balloonlab run folder (no run.json)")
    metadata = json.loads(meta_path.read_text())
    return Run(folder, read_table(folder, "samples"), read_table(folder, "events"), metadata)


def new_run_dir(root: str | os.PathLike[str] = "runs", name: str = "run") -> Path:
    """A fresh folder ``root/<UTC time>-<name>`` for a new run."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = Path(root) / f"{stamp}-{name}"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate

