"""A libvirt daemon for the libvirt backend's tests, and cleanup of their domains.

libvirt-python and libvirtd are required components: without either, these tests fail with
how to install it (``make test`` installs both), never skip.
``libvirtd`` (session scope) starts libvirtd through ``scripts/libvirtd start`` when nothing
answers on qemu:///system, and stops it at the end of the session only if it started it.
``libvirt_domains`` (per test) yields a name factory and, after the test, destroys and
undefines every domain of this session (``blv-<pid>-*``; other sessions' domains are left
alone) and fails the test if one was left behind.
tests/conftest.py loads this module as a pytest plugin, so every test module can use them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

URI = "qemu:///system"
#: Every test domain's name starts with this, so cleanup never touches anyone else's.
PREFIX = "blv-"
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "libvirtd"
_names = itertools.count(1)


def _answers() -> bool:
    if shutil.which("virsh") is None:
        return False
    done = subprocess.run(["virsh", "-q", "-c", URI, "version"], capture_output=True, timeout=30)
    return done.returncode == 0


#: What a missing libvirt-python says: ``make test`` installs it with the rest of ``.venv``.
INSTALL_LIBVIRT_PYTHON = ("libvirt-python is not installed, and the libvirt backend's tests need it: run `make test` "
                          "(it installs it), or .venv/bin/pip install -e '.[libvirt]' (builds against libvirt-dev "
                          "and pkg-config: make system-packages)")


def require_libvirt_python() -> None:
    """Fail (never skip) when libvirt-python cannot be imported, saying how to install it."""
    try:
        import libvirt  # noqa: F401
    except ImportError as exc:
        missing = f"{INSTALL_LIBVIRT_PYTHON}\n(import libvirt: {exc})"
    else:
        return
    pytest.fail(missing, pytrace=False)


def domain_name() -> str:
    """A fresh test domain name (``blv-<pid>-<n>``)."""
    return f"{PREFIX}{os.getpid()}-{next(_names)}"


@pytest.fixture(scope="session")
def libvirtd():
    """qemu:///system answering; started by this session (and stopped after it) if needed."""
    require_libvirt_python()
    if shutil.which("libvirtd") is None and not Path("/usr/sbin/libvirtd").exists():
        pytest.fail("libvirtd is not installed: make system-packages (libvirt-daemon-system libvirt-clients)")
    started = False
    if not _answers():
        done = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=90)
        if done.returncode != 0:
            pytest.fail(f"scripts/libvirtd start failed:\n{done.stdout}{done.stderr}")
        started = True
    _cleanup(stale=True)  # domains of an earlier session that died before its cleanup ran
    yield URI
    if started:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, text=True, timeout=60)


def _ours(name: str, *, stale: bool) -> bool:
    """This session's test domain, or (``stale``) one of a test session that no longer runs."""
    if stale:
        pid = name[len(PREFIX):].split("-", 1)[0]
        return name.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists()
    return name.startswith(f"{PREFIX}{os.getpid()}-")


def _cleanup(*, stale: bool = False, uri: str = URI) -> list[str]:
    import libvirt

    from balloonlab.libvirt.files import agent_root
    left = []
    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if not _ours(name, stale=stale):
                continue
            left.append(name)
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError:
                pass  # a transient domain vanishes once destroyed
    finally:
        conn.close()
    root = agent_root()
    if root.is_dir():
        for directory in root.glob(f"{PREFIX}*"):
            if _ours(directory.name, stale=stale):
                shutil.rmtree(directory, ignore_errors=True)
    return left


@pytest.fixture
def libvirt_domains(libvirtd):
    """After the test: destroy/undefine every ``blv-`` domain; fail if the test left one."""
    yield domain_name
    left = _cleanup()
    assert not left, f"test left libvirt domains behind (now destroyed): {left}"
