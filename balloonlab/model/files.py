"""Files that readers must never see half-written, and that survive a crash once written.

Run folders (Parquet parts, run.json) and the QEMU registry (guest.json) are written through
here: to a temporary name, fsynced when asked, renamed over the final name, the folder
fsynced; a failure leaves neither the temporary file nor (for a new file) a renamed one
whose folder fsync failed.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def fsync_dir(path: Path) -> None:
    """fsync a folder, so a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, write: Callable[[IO[bytes]], object], *, new: bool = True,
                  fsync: bool = True) -> None:
    """``write(file)`` to a temporary name beside ``path``, fsync, rename over ``path``, fsync
    the folder. A reader sees the old file or the new one, never a part.

    :param new: ``path`` is a new file whose existence means "written" (a Parquet part): if
        the folder fsync fails, the renamed file is removed again, so it does not count.
    :param fsync: without it, only atomic (a crash may lose the write, never half of it).
    """
    # A temporary name of this process and thread: two writers of one path (two builds marking
    # the default guest image at once) must not rename each other's half-written file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    renamed = False
    try:
        with open(tmp, "wb") as file:
            write(file)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(tmp, path)
        renamed = True
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if renamed and new:
            path.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any, *, fsync: bool = False) -> None:
    """Write ``payload`` as JSON atomically (see :func:`write_durably`); values JSON does not
    know (paths, timestamps) are written as their ``str``.

    :param fsync: also survive a crash of the machine, not only of the process.
    """
    data = json.dumps(payload, indent=1, default=str).encode()
    write_durably(path, lambda file: file.write(data), new=False, fsync=fsync)


def read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path``.

    :raises ValueError: it is not valid JSON; the message names the file, where, and ends with
        ``what`` (e.g. "the run folder is damaged").
    """
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); {what}") from None
