"""The reaper: a tiny process that stops an owned guest when its owner dies.

It holds the read end of a pipe from the owner: when the owner dies in any way (SIGKILL
included) the pipe closes and the reaper stops QEMU, then removes its runtime dir. Unlike
PR_SET_PDEATHSIG this does not depend on which thread spawned QEMU, and it can be released
(one line, ``release``) to detach a running guest later.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import IO

# The reaper: reads one line. "release" -> exit and leave QEMU alone (detach, or a clean
# shutdown already done). EOF (the owner died, even by SIGKILL) -> stop QEMU if the pid is
# still that guest, then remove its runtime dir.
_REAPER = r"""
read -r cmd
[ "$cmd" = release ] && exit 0
if grep -q "$2" "/proc/$1/cmdline" 2>/dev/null; then
  kill -TERM "$1" 2>/dev/null
  i=0
  while [ $i -lt 30 ] && grep -q "$2" "/proc/$1/cmdline" 2>/dev/null; do sleep 0.1; i=$((i+1)); done
  kill -KILL "$1" 2>/dev/null
fi
rm -rf "$2"
"""


class Reaper:
    """Stops an owned QEMU when its owner process dies (see the module docstring)."""

    def __init__(self, pid: int, runtime_dir: Path) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["/bin/sh", "-c", _REAPER, "balloonlab-reaper", str(pid), str(runtime_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the owner's terminal must not kill the reaper
            # before the owner has had its chance to shut the guest down cleanly.
            start_new_session=True, close_fds=True)

    @property
    def pid(self) -> int | None:
        """The reaper's pid (None once released)."""
        return self._proc.pid if self._proc is not None else None

    def release(self) -> None:
        """Let the reaper go without touching QEMU (detach, or after a clean shutdown)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stdin: IO[bytes] | None = proc.stdin
        with contextlib.suppress(OSError):
            assert stdin is not None
            stdin.write(b"release\n")
            stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def fire(self) -> None:
        """Make the reaper stop QEMU now, as if the owner had died, and wait for it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        proc.wait(10)
