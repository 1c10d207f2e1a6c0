"""The reaper: a tiny process that stops an owned guest when its owner dies.

It holds the read end of a pipe from the owner: when the owner dies in any way (SIGKILL
included) the pipe closes and the reaper stops QEMU, then removes its runtime dir. Unlike
PR_SET_PDEATHSIG this does not depend on which thread spawned QEMU, and it can be released
(one line, ``release``) to detach a running guest later. :func:`kill_and_reap` is the
owner's own kill path, bounded.

The pipe's write end must stay in the owner alone: a ``fork()``ed child (``multiprocessing``'s
default start method on Linux before 3.14) would inherit it and keep the guest alive after
the owner died, so forked children let go of it (:func:`os.register_at_fork`). The pid is checked
to still be that guest by an exact argv match (:func:`~balloonlab.qemu.registry.cmdline_marker`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import weakref
from pathlib import Path
from typing import IO

from balloonlab.model.deadline import wait_until
from balloonlab.qemu.registry import cmdline_marker

#: How long a SIGKILLed QEMU may take to exit before it is reported as stuck (a process in
#: the kernel's D state can take longer, and no wait for it may be unbounded).
KILL_WAIT_S = 10.0

# The reaper: reads one line. "release" -> exit and leave QEMU alone (detach, or a clean
# shutdown already done). EOF (the owner died, even by SIGKILL) -> stop QEMU if the pid is
# still that guest, then remove its runtime dir. "Still that guest": one argv entry holds the
# marker ($3, "=DIR/"); tr puts one entry per line and grep -F matches it literally, so
# .../g1 never matches .../g10. A pid that is no longer the guest (QEMU crashed and the pid
# was reused) is left alone, and so is the dir: it may already belong to a relaunched guest of
# that name; list_guests() sweeps it once it is really stale.
_REAPER = r"""
read -r cmd
[ "$cmd" = release ] && exit 0
is_guest() { tr '\0' '\n' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -e "$2"; }
is_guest "$1" "$3" || exit 0
kill -TERM "$1" 2>/dev/null
i=0
while [ $i -lt 30 ] && is_guest "$1" "$3"; do sleep 0.1; i=$((i+1)); done
kill -KILL "$1" 2>/dev/null
rm -rf "$2"
"""

#: Reapers whose pipe this process holds; a forked child lets go of them (see below).
_live: weakref.WeakSet[Reaper] = weakref.WeakSet()


class Reaper:
    """Stops an owned QEMU when its owner process dies (see the module docstring).

    :param pid: QEMU's pid.
    :param runtime_dir: the guest's runtime dir (named in QEMU's argv, removed after it).
    :raises OSError: the reaper could not be started.
    """

    def __init__(self, pid: int, runtime_dir: Path) -> None:
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["/bin/sh", "-c", _REAPER, "balloonlab-reaper", str(pid), str(runtime_dir),
             cmdline_marker(runtime_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the owner's terminal must not kill the reaper
            # before the owner has had its chance to shut the guest down cleanly.
            start_new_session=True, close_fds=True)
        _live.add(self)

    @property
    def pid(self) -> int | None:
        """The reaper's pid (None once released)."""
        return self._proc.pid if self._proc is not None else None

    def release(self) -> None:
        """Let the reaper go without touching QEMU (detach, or after a clean shutdown)."""
        proc, self._proc = self._proc, None
        _live.discard(self)
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
            proc.wait(5)

    def fire(self) -> None:
        """Make the reaper stop QEMU now, as if the owner had died, and wait for it (10 s at most).

        :raises subprocess.TimeoutExpired: the reaper did not finish within 10 s.
        """
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        proc.wait(10)

    def _forget_in_child(self) -> None:
        """In a forked child: let go of the inherited write end without a word to the reaper.

        /dev/null is put in place of the pipe under the same fd number, so the child's file
        object stays valid (closing it later closes /dev/null, never a reused number) and
        nothing the child does can release or stop the parent's guest.
        """
        proc, self._proc = self._proc, None
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.dup2(devnull, proc.stdin.fileno(), inheritable=False)
            finally:
                os.close(devnull)


async def kill_and_reap(process: subprocess.Popen[bytes], timeout_s: float = KILL_WAIT_S) -> bool:
    """SIGKILL a QEMU this process started and reap it, waiting at most ``timeout_s``.

    Polled, not ``Popen.wait`` in a worker thread: such a thread cannot be given up on.

    :returns: True once it is gone, False when it still runs after ``timeout_s``.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    return await wait_until(lambda: process.poll() is not None, timeout_s, poll_s=0.02)


def _after_fork_in_child() -> None:
    for reaper in list(_live):
        reaper._forget_in_child()
    _live.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
