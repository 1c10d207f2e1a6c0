"""Shared fixtures: an isolated runtime dir, the built-in guest, and leak checks.

Every test runs against real QEMU. The autouse leak check fails any test that leaves a QEMU
process of this test session running, so a code path that strands a guest cannot pass.
"""

from __future__ import annotations

import itertools
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

# Short and private: unix socket paths must stay under 108 bytes, and tests must never see
# (or sweep) a user's real guests.
RUNTIME_ROOT = Path(tempfile.mkdtemp(prefix="blt-", dir="/tmp"))
os.environ["BALLOONLAB_RUNTIME_DIR"] = str(RUNTIME_ROOT)

_names = itertools.count(1)

#: Fixture modules shared by several test files (libvirtd, libvirt_domains).
pytest_plugins = ["tests.libvirtd_fixture"]


def qemu_pids_under(root: Path) -> list[int]:
    """Live qemu-system processes whose command line mentions ``root``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"qemu-system" in cmdline.split(b"\0")[0] and str(root).encode() in cmdline and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture(autouse=True)
def no_stray_qemu():
    """Fail the test if it leaves a QEMU of this session running (then kill it)."""
    yield
    deadline = time.monotonic() + 5
    while (left := qemu_pids_under(RUNTIME_ROOT)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"test left QEMU processes running: {left}"


@pytest.fixture
def guest_name() -> str:
    """A fresh guest name per test."""
    return f"t{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def builtin_ready():
    """The built-in guest image must have been built by the setup step (make test does it)."""
    from balloonlab.image.build import find_guest_image
    image = find_guest_image()
    if image is None:
        pytest.fail("built-in guest image missing: run `make test` (or `balloonlab guest build`) first")
    return image


@pytest.fixture
def spec(builtin_ready, guest_name):
    """Factory of built-in guest specs with a unique name: ``spec(memory="512M", period_s=1)``."""
    from balloonlab import builtin_spec

    def make(**kwargs):
        kwargs.setdefault("period_s", 1)
        return builtin_spec(kwargs.pop("name", guest_name), **kwargs)
    return make


@pytest.fixture
async def guest(spec):
    """A running built-in guest (512 MiB, stats every 1 s), shut down after the test."""
    from balloonlab import Guest
    g = await Guest.launch(spec())
    try:
        yield g
    finally:
        await g.shutdown()


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's runtime root (empty unless a test failed to clean up)."""
    import shutil
    shutil.rmtree(RUNTIME_ROOT, ignore_errors=True)
