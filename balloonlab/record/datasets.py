"""Many run folders as one dataset: pyarrow, DuckDB and pandas over their Parquet as it is.

:func:`open_runs` lists the part files of one table (``samples``, ``events`` or ``host``) of
every run given and makes them one ``pyarrow.dataset.Dataset``, reading only the files' footers:
no row is loaded until a query asks for it. Each file gets the run folder's name (``run``) and
its host partition's value (``host``) as known values of its fragment, so filters on either skip
whole files. Of each nest of row ranges only the outermost readable part is listed, as
:mod:`balloonlab.record.store_read` reads it, so a crash between a merge and the deletion of its
inputs never doubles a row. DuckDB (the ``fleet`` extra) scans that dataset in place.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq

from balloonlab.model.files import read_json
from balloonlab.record.store_read import RUN_FORMAT, TABLES, outermost_parts

if TYPE_CHECKING:
    from duckdb import DuckDBPyConnection, DuckDBPyRelation

__all__ = ["RunDataset", "open_runs"]

#: Columns the dataset adds from the folder names (the files never hold them).
PARTITION_COLUMNS = ("run", "host")


class RunDataset:
    """One table of many runs (:func:`open_runs` builds it).

    :ivar dataset: a ``pyarrow.dataset.Dataset`` of every run's part files, with ``run`` (the
        run folder's name) and ``host`` columns, both strings.
    :ivar runs: the run folders, in the order of their names.
    :ivar metadata: each run's run.json, by run name.
    :ivar files: the part files the dataset reads.
    :ivar skipped: part files left out because their footer could not be read.
    """

    def __init__(self, table: str, runs: list[Path], metadata: dict[str, dict[str, Any]],
                 dataset: ds.Dataset, files: list[Path], skipped: list[Path]) -> None:
        self.table, self.runs, self.metadata, self.dataset = table, runs, metadata, dataset
        self.files, self.skipped = files, skipped
        self._connection: DuckDBPyConnection | None = None

    def __repr__(self) -> str:
        return f"<RunDataset {self.table}: {len(self.runs)} runs, {len(self.files)} files>"

    def to_pandas(self, columns: Iterable[str] | None = None, filter: ds.Expression | None = None) -> pd.DataFrame:
        """The rows as one frame, as :func:`~balloonlab.record.store_read.load_run` gives them
        (``time`` index in time order, nullable ints, categories), plus ``run`` and ``host``.

        :param columns: only these (``time`` stays the index); default all.
        :param filter: a pyarrow expression, e.g. ``ds.field("host") == "lab1"``.
        """
        names = self.dataset.schema.names
        wanted = None if columns is None else list(dict.fromkeys([*columns, *(["time"] if "time" in names else [])]))
        table = self.dataset.to_table(columns=wanted, filter=filter)
        for name in PARTITION_COLUMNS:  # categories, as load_run gives host: encoded by arrow, not hashed by pandas
            if name in table.column_names:
                table = table.set_column(table.schema.get_field_index(name), name, table[name].dictionary_encode())
        # The schema carries the runs' merged pandas metadata: the index and nullable dtypes come back.
        frame = table.to_pandas()
        for name in frame.columns:
            if isinstance(frame[name].dtype, pd.CategoricalDtype):
                frame[name] = frame[name].cat.reorder_categories(sorted(frame[name].cat.categories))
        return frame.sort_index(kind="stable") if isinstance(frame.index, pd.DatetimeIndex) else frame

    def duckdb(self, connection: DuckDBPyConnection | None = None) -> DuckDBPyConnection:
        """A DuckDB connection with a view named after the table over :attr:`dataset`
        (scanned in place, filters and column choices pushed down to pyarrow).

        :param connection: register the view there (default: a new in-memory database).
        :raises ImportError: DuckDB is not installed (``pip install 'balloonlab[fleet]'``).
        """
        con = connection if connection is not None else _duckdb().connect()
        con.register(self.table, self.dataset)
        return con

    def sql(self, query: str) -> DuckDBPyRelation:
        """Run ``query`` on this dataset's view (a connection kept for this dataset), e.g.
        ``sql("select host, guest, quantile_cont(age_s, 0.99) from samples group by all").df()``.

        :raises ImportError: DuckDB is not installed (``pip install 'balloonlab[fleet]'``).
        """
        if self._connection is None:
            self._connection = self.duckdb()
        return self._connection.sql(query)


def open_runs(paths_or_glob: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
              table: str = "samples") -> RunDataset:
    """One dataset over ``table`` of many run folders (format 4, see :mod:`balloonlab.record.store`):
    the files as listed now (a run still being written may merge one away: open it again then).

    :param paths_or_glob: a run folder, a folder of run folders, a glob (``"runs/*"``) or a
        list of any of these. Folders without run.json are skipped.
    :param table: ``samples``, ``events`` or ``host``.
    :raises FileNotFoundError: no run folder is left, or a path given does not exist.
    :raises ValueError: an unknown table, two runs of one name, or a run of an older format
        (format 1-3: read it with ``balloonlab.load_run``).
    """
    if table not in TABLES:
        raise ValueError(f"table must be one of {', '.join(TABLES)}, got {table!r}")
    runs = _find_runs(paths_or_glob)
    for before, run in zip(runs, runs[1:], strict=False):  # sorted by name: namesakes are neighbours
        if before.name == run.name:
            raise ValueError(f"two runs are named {run.name!r} ({before} and {run}): the run column could not "
                             "tell them apart; open them separately")
    metadata = {run.name: _metadata(run) for run in runs}
    parts: list[tuple[Path, pa.Schema, ds.Expression]] = []
    skipped: list[Path] = []
    for run in runs:
        for folder in sorted(f for f in (run / table).glob("host=*") if f.is_dir()):
            host = unquote(folder.name.removeprefix("host="))  # as pyarrow's hive partitioning decodes it
            # Known values of each file's fragment: the scanner fills run and host from them, and
            # filters on either skip whole files without opening them.
            known = (ds.field("run") == run.name) & (ds.field("host") == host)
            parts += [(path, schema, known) for path, schema in outermost_parts(folder, _footer, skipped)]
    dataset = ds.FileSystemDataset.from_paths(
        [str(p[0]) for p in parts], schema=_unify([p[1] for p in parts]), format=ds.ParquetFileFormat(),
        filesystem=pyarrow.fs.LocalFileSystem(), partitions=[p[2] for p in parts])
    return RunDataset(table, runs, metadata, dataset, [p[0] for p in parts], skipped)


def _find_runs(given: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """The run folders ``given`` names, sorted by name, each once."""
    entries = [given] if isinstance(given, (str, os.PathLike)) else list(given)
    found: dict[Path, None] = {}  # a set that keeps the order
    why: list[str] = []
    for entry in entries:
        if not isinstance(entry, (str, os.PathLike)):
            raise TypeError(f"expected a path, a glob or a list of paths, got {entry!r} ({type(entry).__name__})")
        path = Path(entry)
        if not path.exists() and any(c in str(entry) for c in "*?["):
            candidates = [Path(m) for m in glob.glob(os.fspath(entry))]
            empty = f"the glob {os.fspath(entry)!r} matched " + (
                f"{len(candidates)} paths, none a run folder" if candidates else "nothing")
        elif (path / "run.json").is_file():
            candidates, empty = [path], ""
        elif path.is_dir():
            candidates = list(path.iterdir())
            empty = f"{path} is a folder with no run folders in it" if candidates else f"{path} is an empty folder"
        elif path.exists():
            why.append(f"{path} is a file, not a folder")
            continue
        else:
            raise FileNotFoundError(f"{path} does not exist")
        runs = [c for c in candidates if (c / "run.json").is_file()]
        why += [] if runs else [empty]
        found.update(dict.fromkeys(r.resolve() for r in runs))
    if not found:
        what = "; ".join(why) if why else "no paths were given"
        raise FileNotFoundError(f"no run folder found: {what} (a run folder is a directory holding run.json, "
                                "as RunWriter and `balloonlab record` write it)")
    return sorted(found, key=lambda p: (p.name, str(p)))


def _metadata(run: Path) -> dict[str, Any]:
    """run.json, once its format is one this module reads."""
    meta: dict[str, Any] = read_json(run / "run.json", "the run folder is damaged")
    run_format = int(meta.get("format", 1))
    if not 4 <= run_format <= RUN_FORMAT:  # 1-3 have no host partitions; a newer one is unknown here
        hint = f"load it with balloonlab.load_run({str(run)!r})" if run_format < 4 else "upgrade balloonlab"
        raise ValueError(f"{run} is a format-{run_format} run folder and open_runs reads format 4; {hint}")
    return meta


def _footer(path: Path) -> tuple[Path, pa.Schema]:
    """A part and its schema, from its footer only: readable enough to be chosen."""
    return path, pq.read_schema(path)


def _unify(schemas: list[pa.Schema]) -> pa.Schema:
    """One schema for every part: a stat column only some runs have is null in the others.
    Dictionary columns (``guest``) get int32 indices: pandas writes the narrowest that fits
    (int8 up to 127 guests), so runs differ there; the scanner casts each file's to int32."""
    wide = [pa.schema([f.with_type(pa.dictionary(pa.int32(), f.type.value_type))
                       if pa.types.is_dictionary(f.type) else f for f in s if f.name not in PARTITION_COLUMNS])
            for s in schemas]
    fields = list(pa.unify_schemas(wide, promote_options="permissive")) if wide else []
    names = [f.name for f in fields]
    at = names.index("guest") + 1 if "guest" in names else 0  # where load_run puts host
    fields[at:at] = [pa.field("host", pa.string())]
    return pa.schema([pa.field("run", pa.string()), *fields], metadata=_pandas_metadata(schemas))


def _pandas_metadata(schemas: list[pa.Schema]) -> dict[bytes, bytes] | None:
    """The parts' pandas metadata merged (every column named once), so ``to_pandas`` restores
    the ``time`` index and nullable dtypes of columns only some runs have."""
    metas = [json.loads(s.metadata[b"pandas"]) for s in schemas if b"pandas" in (s.metadata or {})]
    # Reversed, so the first run's entry of a column wins (the dtype its frame had).
    columns = {column.get("field_name"): column for meta in reversed(metas) for column in meta.get("columns", [])}
    return {b"pandas": json.dumps({**metas[0], "columns": list(columns.values())}).encode()} if metas else None


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError as exc:  # an optional extra: say how to get it
        raise ImportError("RunDataset.duckdb() and .sql() need DuckDB: pip install 'balloonlab[fleet]' "
                          "(make test installs it)") from exc
    return duckdb
