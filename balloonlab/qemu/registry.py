"""Where guests live on the host, who owns them, and the registry of detached guests.

Every guest gets its own runtime directory (QEMU unlinks its QMP socket path when it exits,
even if another QEMU created a socket there since, so sharing one would break a neighbour).
The directory holds ``guest.json`` (pid, argv, domain XML, owner, detached flag): listing the
directories is the registry a restarted notebook kernel reads to reconnect, so the root must
be private (:func:`runtime_root` refuses one that is not). Owned guests are tied to their
owner by a tiny reaper process (:mod:`balloonlab.qemu.reaper`) that holds a pipe from the
owner: when the owner dies in any way (SIGKILL included) the pipe closes and the reaper stops
QEMU. Unlike PR_SET_PDEATHSIG this does not depend on which thread spawned QEMU, and it can
be released to detach a running guest later.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from balloonlab.model.errors import BalloonLabError, GuestNameInUse
from balloonlab.model.files import atomic_write_json
from balloonlab.model.procfs import process_args

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_SUN_PATH_MAX = 107


def runtime_root() -> Path:
    """The folder of all guests' runtime dirs: ``$BALLOONLAB_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/balloonlab``, else ``/tmp/balloonlab-<uid>``.

    Created 0700 when missing. An existing one is trusted only when it is a directory owned
    by this user that nobody else may write (as ssh-agent and tmux check theirs): another user
    who made ``/tmp/balloonlab-<uid>`` first could otherwise read the sockets' paths, swap
    them, or plant a ``guest.json`` for :meth:`Guest.reconnect` to follow.

    :raises BalloonLabError: the folder is someone else's or group/world writable; the
        message says how to fix it.
    """
    if env := os.environ.get("BALLOONLAB_RUNTIME_DIR"):
        root = Path(env)
    elif env := os.environ.get("XDG_RUNTIME_DIR"):
        root = Path(env) / "balloonlab"
    else:
        root = Path("/tmp") / f"balloonlab-{os.getuid()}"
    with contextlib.suppress(FileExistsError):  # a non-directory is refused just below
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private_dir(root)
    return root


def check_private_dir(path: Path) -> None:
    """Refuse a runtime folder that is not a directory owned by us with no group/world write.

    :raises BalloonLabError: what is wrong with it, and what to do.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise BalloonLabError(f"cannot use runtime dir {path}: {exc.strerror}") from exc
    uid = os.geteuid()
    fix = ("set BALLOONLAB_RUNTIME_DIR to a directory of your own (mode 0700), or remove "
           f"{path} if nothing of yours is in it")
    if not stat.S_ISDIR(st.st_mode):
        raise BalloonLabError(f"runtime dir {path} is not a directory: {fix}")
    if st.st_uid != uid:
        raise BalloonLabError(f"runtime dir {path} belongs to uid {st.st_uid}, not to you (uid {uid}): "
                              f"refusing to keep guest sockets there; {fix}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BalloonLabError(f"runtime dir {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                              f"refusing to keep guest sockets there; chmod 700 {path}, or {fix}")


def validate_name(name: str, *, derived_from: str | None = None) -> str:
    """Guest names become directory names, socket paths and run partitions: keep them short
    and plain.

    :param derived_from: where a name the caller did not give came from (for the message).
    :raises ValueError: empty, too long, or with characters other than ``A-Za-z0-9_.-``.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"guest name {name!r} must be 1-48 characters of A-Z a-z 0-9 _ . - "
                         "and start with a letter or digit"
                         + (f"; it was taken from {derived_from}: pass name=... instead" if derived_from else ""))
    return name


@dataclass
class RegistryEntry:
    """What ``guest.json`` says about a guest balloonlab launched."""

    name: str
    pid: int
    argv: list[str]
    domain_xml: str
    owner_pid: int
    detached: bool
    created: float
    accel: str
    #: The host socket of the guest agent's channel (``org.qemu.guest_agent.0``), None without
    #: one: kept here so a reconnect finds it whatever the stored XML says (and absent from
    #: the ``guest.json`` of older versions, hence the default).
    guest_agent_socket: str | None = None

    @property
    def runtime_dir(self) -> Path:
        """The guest's runtime directory."""
        return runtime_root() / self.name


@dataclass(frozen=True)
class RuntimePaths:
    """The files of one guest's runtime directory."""

    dir: Path

    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def record(self) -> Path:
        return self.dir / "guest.json"

    def output_tail(self, limit: int = 3000) -> str:
        """The end of QEMU's own output and of the guest's console, for a LaunchError."""
        parts = []
        for label, path in (("qemu", self.qemu_log), ("console", self.console_log)):
            with contextlib.suppress(OSError):
                text = path.read_bytes()[-limit:].decode(errors="replace").strip()
                if text:
                    parts.append(f"[{label}] {text}")
        return "\n".join(parts)


def claim_runtime_dir(name: str) -> RuntimePaths:
    """Create the runtime dir of a new guest called ``name``, atomically.

    A leftover dir of a guest that is gone is swept first.

    :raises GuestNameInUse: a live guest already has this name.
    :raises ValueError: a bad name, or a root so deep the socket paths would not fit.
    """
    validate_name(name)
    paths = RuntimePaths(runtime_root() / name)
    if len(str(paths.agent_socket)) > _SUN_PATH_MAX:
        raise ValueError(f"runtime dir {paths.dir} is too deep for unix sockets "
                         f"({_SUN_PATH_MAX} bytes max): set BALLOONLAB_RUNTIME_DIR to a shorter path")
    for _ in range(2):
        try:
            paths.dir.mkdir(mode=0o700)
            return paths
        except FileExistsError:
            record = read_record(paths.dir)
            if record is not None and qemu_alive(record):
                raise GuestNameInUse(
                    f"a guest named {name!r} is already running (pid {record.pid}, "
                    f"{'detached' if record.detached else f'owned by pid {record.owner_pid}'}); "
                    "choose another name, or reconnect to it / stop it") from None
            if record is None and _young(paths.dir):
                # Another process is launching this name right now (no guest.json yet).
                raise GuestNameInUse(f"a guest named {name!r} is being launched by another process") from None
            remove_runtime_dir(paths.dir)
    raise GuestNameInUse(f"could not claim runtime dir {paths.dir}")


def _young(path: Path, seconds: float = 60.0) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


def write_record(paths: RuntimePaths, record: RegistryEntry) -> None:
    """Write ``guest.json`` atomically (a reader never sees half a file)."""
    atomic_write_json(paths.record, asdict(record))


def read_record(directory: Path) -> RegistryEntry | None:
    """Read a runtime dir's ``guest.json``; None when missing or unreadable."""
    try:
        data: dict[str, Any] = json.loads((directory / "guest.json").read_text())
        return RegistryEntry(**data)
    except (OSError, ValueError, TypeError):
        return None


def qemu_alive(record: RegistryEntry) -> bool:
    """True when the record's pid is still that QEMU (not a recycled pid)."""
    return pid_is_guest(record.pid, str(runtime_root() / record.name))


def pid_is_guest(pid: int, runtime_dir: str) -> bool:
    """True when ``pid`` is a live QEMU whose command line names ``runtime_dir``."""
    args = process_args(pid)
    if args is None:
        return False
    needle = cmdline_marker(runtime_dir).encode()
    return any(needle in arg for arg in args)


def cmdline_marker(runtime_dir: str | os.PathLike[str]) -> str:
    """What identifies a guest's QEMU in its argv: ``=<runtime dir>/``, as in
    ``path=DIR/qmp.sock``.

    Every path balloonlab gives QEMU is an option value after ``=`` (commas doubled, QEMU's
    escape), so requiring the ``=`` before and the ``/`` after makes this a whole-path match:
    guest ``g1`` is never mistaken for ``g10``, nor ``/tmp/x`` for ``/a/tmp/x``. The reaper
    matches the same string (:mod:`balloonlab.qemu.reaper`).
    """
    return "=" + str(runtime_dir).rstrip("/").replace(",", ",,") + "/"


def remove_runtime_dir(directory: Path) -> None:
    """Delete a guest's runtime dir (sockets, logs, record)."""
    shutil.rmtree(directory, ignore_errors=True)


def list_guests(*, sweep: bool = True) -> list[RegistryEntry]:
    """Every live guest balloonlab launched on this host (owned and detached).

    :param sweep: delete the runtime dirs of guests that are gone (stale entries).
    """
    live: list[RegistryEntry] = []
    for directory in sorted(runtime_root().iterdir()):
        if not directory.is_dir():
            continue
        record = read_record(directory)
        if record is not None and qemu_alive(record):
            live.append(record)
        elif sweep and (record is not None or not _young(directory)):
            remove_runtime_dir(directory)
    return live
