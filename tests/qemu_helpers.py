"""Start QEMU the way someone else would (not through balloonlab), for attach tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .conftest import RUNTIME_ROOT


def listening(sock: Path) -> bool:
    """True once something accepts connections on the unix socket ``sock``.

    The probe connection is closed at once; QEMU (wait=off) then serves the next client.
    """
    import socket
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def foreign_qemu(*device_args: str, machine: str = "pc", paused: bool = True,
                 extra: tuple[str, ...] = ()) -> Iterator[Path]:
    """Run a bare QEMU (no kernel needed) with the given ``-device`` args; yield its QMP path.

    It lives under the test runtime root so the leak check sees it, and is killed after.
    """
    workdir = Path(tempfile.mkdtemp(prefix="ext-", dir=RUNTIME_ROOT))
    sock = workdir / "qmp.sock"
    argv = ["qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-m", "128", "-nodefaults",
            "-display", "none", "-no-user-config", "-qmp", f"unix:{sock},server=on,wait=off",
            *(["-S"] if paused else []), *extra]
    for dev in device_args:
        argv += ["-device", dev]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not listening(sock):  # QEMU creates the file before it listens on it
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU failed: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not listen on its QMP socket")
            time.sleep(0.02)
        yield sock
    finally:
        proc.kill()
        proc.wait()
        for f in workdir.iterdir():
            f.unlink()
        os.rmdir(workdir)
