"""Reading host processes from /proc: command lines, run state, RSS.

The QEMU registry, libvirt's pid lookup and the sampler's ``rss`` column all ask the same
questions of /proc; the answers (and their edge cases: a command name with spaces or ``)``,
a zombie that is gone but not reaped) are written here once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the command name, which may hold spaces and ')')."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def process_args(pid: int) -> list[bytes] | None:
    """The argv of a live (not zombie) process; None when it is gone or unreadable."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    fields = _stat_fields(pid)
    if fields is None or fields[0] == "Z":  # exited, waiting to be reaped by its parent
        return None
    return args[:-1] if args and args[-1] == b"" else args


def process_rss_bytes(pid: int) -> int | None:
    """RSS of a host process as libvirt computes it (``/proc/PID/stat`` field 24 x page size)."""
    fields = _stat_fields(pid)
    return int(fields[21]) * _PAGE_SIZE if fields is not None else None


class ProcessStat:
    """``/proc/PID/stat`` of one process through a file kept open: a read is one ``pread``,
    with no path lookup or open per sample. Once the process is gone (reaped) the open file
    reads as ESRCH, so a pid the kernel hands to a newcomer is never read as this process.
    Asked about another pid, it opens that one's file instead."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self._fd: int | None = None

    def rss_bytes(self, pid: int | None) -> int | None:
        """RSS of ``pid`` as :func:`process_rss_bytes` gives it; None once it is gone."""
        if pid != self.pid:
            self.close()
            self.pid = pid
            with contextlib.suppress(OSError):
                self._fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC) if pid is not None else None
        if self._fd is None:
            return None
        try:
            data = os.pread(self._fd, 4096, 0)
        except OSError:
            return None
        return int(data[data.rindex(b")") + 2:].split()[21]) * _PAGE_SIZE

    def close(self) -> None:
        """Close the file (idempotent; the next read opens it again)."""
        fd, self._fd, self.pid = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()
