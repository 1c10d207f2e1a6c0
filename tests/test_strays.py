"""No stray QEMU, no hang: failed launches, forked owners, exact process identity, private
runtime dirs, and bounded libvirt calls and shutdowns, all against real processes.

Each test names what it proves. The libvirt ones use the real libvirtd of the ``libvirtd``
fixture; a hung libvirtd is made with a relay in front of its socket that stops passing bytes
(:class:`FreezingRelay`), so to this client libvirtd looks SIGSTOPped while the daemon, which
other test sessions may share, keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from balloonlab import Guest, LaunchError
from balloonlab.model.deadline import wait_until
from balloonlab.model.errors import BalloonLabError, MonitorError
from balloonlab.model.procfs import process_args
from balloonlab.qemu import guest as qemu_guest
from balloonlab.qemu import registry as runtime
from balloonlab.qemu.reaper import Reaper

from .conftest import RUNTIME_ROOT, qemu_pids_under

pytestmark = pytest.mark.qemu


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for its parent counts as gone)."""
    return process_args(pid) is None


# ------------------------------------------------------------------ launches that fail late

@pytest.mark.parametrize("failure", ["reaper", "enospc"])
async def test_launch_failing_after_qemu_started_kills_qemu_and_removes_its_dir(spec, monkeypatch, failure):
    started: list[int] = []
    if failure == "reaper":
        def no_reaper(pid: int, runtime_dir: Path) -> Reaper:
            started.append(pid)
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (fork)")
        monkeypatch.setattr(qemu_guest, "Reaper", no_reaper)
    else:
        def disk_full(paths: runtime.RuntimePaths, record: runtime.RegistryEntry) -> None:
            started.append(record.pid)
            raise OSError(errno.ENOSPC, "No space left on device", str(paths.record))
        monkeypatch.setattr(runtime, "write_record", disk_full)
    s = spec()
    with pytest.raises(LaunchError, match="cannot register guest") as err:
        await Guest.launch(s)
    [pid] = started
    assert err.value.command and err.value.command[0].endswith("qemu-system-x86_64")
    assert gone(pid) and not runtime.pid_is_guest(pid, str(RUNTIME_ROOT / s.name))
    assert qemu_pids_under(RUNTIME_ROOT / s.name) == []
    assert not (RUNTIME_ROOT / s.name).exists()


# ------------------------------------------------------------------ forked children of the owner

FORKING_OWNER = textwrap.dedent("""
    import multiprocessing, os, signal, sys, time
    from balloonlab import SyncGuest, builtin_spec
    guest = SyncGuest.launch(builtin_spec(sys.argv[1], period_s=None))
    # "fork" named outright: 3.11's default on Linux, and what this test is about.
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(600,), daemon=False)
    child.start()
    print(guest.pid, child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_forked_child_does_not_keep_guest_alive_after_its_owner_dies(builtin_ready, guest_name):
    owner = subprocess.Popen([sys.executable, "-c", FORKING_OWNER, guest_name], stdout=subprocess.PIPE,
                             text=True, env=os.environ.copy())
    child_pid = None
    try:
        qemu_pid, child_pid = map(int, owner.stdout.readline().split())
        assert owner.wait(30) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while runtime.pid_is_guest(qemu_pid, str(RUNTIME_ROOT / guest_name)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not runtime.pid_is_guest(qemu_pid, str(RUNTIME_ROOT / guest_name)), \
            "QEMU outlived its owner: a forked child kept the reaper's pipe open"
        assert not gone(child_pid), "the forked child should still run: it is what held the pipe before"
        deadline = time.monotonic() + 5
        while (RUNTIME_ROOT / guest_name).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (RUNTIME_ROOT / guest_name).exists()
    finally:
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        owner.stdout.close()


# ------------------------------------------------------------------ exact process identity

async def test_reaper_of_g1_never_stops_g10(spec, guest_name):
    g1, g10 = await asyncio.gather(Guest.launch(spec(name=guest_name + "g1", memory="256M")),
                                   Guest.launch(spec(name=guest_name + "g10", memory="256M")))
    try:
        assert str(g10.paths.dir).startswith(str(g1.paths.dir))  # g1's dir is a prefix of g10's
        assert not runtime.pid_is_guest(g10.pid, str(g1.paths.dir))
        # A reaper of g1 whose pid now belongs to g10 (a reused pid): it fires, finds that
        # pid is not g1, and stops nothing, removes nothing.
        Reaper(g10.pid, g1.paths.dir).fire()  # blocks until that reaper is done
        assert g10.alive and await g10.status() == "running"
        assert g1.alive and g1.paths.dir.exists()
        # g1's own reaper fires: g1 stops, g10 runs on.
        g1._reaper.fire()
        assert await wait_until(lambda: not g1.alive, 10)
        assert await wait_until(lambda: not g1.paths.dir.exists(), 5)
        assert g10.alive and await g10.status() == "running" and g10.paths.dir.exists()
    finally:
        await asyncio.gather(g1.shutdown(), g10.shutdown())


async def test_shutdown_of_a_stopped_qemu_kills_it_within_its_timeout(spec):
    guest = await Guest.launch(spec())
    os.kill(guest.pid, signal.SIGSTOP)  # answers no QMP, ignores nothing but SIGKILL
    t0 = time.monotonic()
    graceful = await guest.shutdown(timeout_s=2.0)
    elapsed = time.monotonic() - t0
    print(f"Guest.shutdown(timeout_s=2) of a SIGSTOPped QEMU: {elapsed:.2f} s")
    assert graceful is False
    assert elapsed < 2.0 + 3.0, elapsed  # quit's own 5 s no longer comes on top
    assert gone(guest.pid) and not guest.paths.dir.exists()


# ------------------------------------------------------------------ private runtime dirs

async def test_sockets_and_logs_are_0600_in_a_0700_dir(guest):
    modes = {p.name: os.stat(p).st_mode for p in guest.paths.dir.iterdir() if not p.name.startswith(".")}
    assert oct(os.stat(guest.paths.dir).st_mode & 0o777) == oct(0o700)
    for name in ("qmp.sock", "agent.sock"):
        assert (modes[name] & 0o170000) == 0o140000, f"{name} is not a socket"
        assert oct(modes[name] & 0o777) == oct(0o600), name
    for name in ("console.log", "qemu.log"):
        assert oct(modes[name] & 0o777) == oct(0o600), name
    assert os.stat(guest.paths.dir).st_uid == os.geteuid()


@pytest.mark.parametrize("flaw", ["world-writable", "group-writable", "someone-elses"])
async def test_runtime_root_that_is_not_private_is_refused(spec, tmp_path, monkeypatch, flaw):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    if flaw == "world-writable":
        root.chmod(0o1777)  # as /tmp itself: sticky does not make it private
        expected = r"writable by others \(mode 1777\).*chmod 700"
    elif flaw == "group-writable":
        root.chmod(0o770)
        expected = r"writable by others \(mode 0770\).*chmod 700"
    else:
        os.chown(root, 65534, 65534)
        expected = f"belongs to uid 65534, not to you \\(uid {os.geteuid()}\\)"
    monkeypatch.setenv("BALLOONLAB_RUNTIME_DIR", str(root))
    s = spec()
    with pytest.raises(BalloonLabError, match=expected) as err:
        await Guest.launch(s)
    assert "BALLOONLAB_RUNTIME_DIR" in str(err.value)
    assert list(root.iterdir()) == [] and qemu_pids_under(root) == []
    root.chmod(0o700)
    os.chown(root, os.geteuid(), os.getegid())
    assert runtime.runtime_root() == root  # the same dir, made private, is accepted


# ------------------------------------------------------------------ libvirt: bounded calls

class FreezingRelay:
    """A unix-socket relay to ``target`` that can stop passing bytes (``frozen``)."""

    def __init__(self, target: str, path: Path) -> None:
        self.target, self.path = target, path
        self.flowing = threading.Event()
        self.flowing.set()
        self.sockets: list[socket.socket] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    @contextlib.contextmanager
    def frozen(self):
        self.flowing.clear()
        try:
            yield
        finally:
            self.flowing.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(self.target)
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.flowing.wait()  # frozen: hold what came in, pass nothing on
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.flowing.set()
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        for s in self.sockets:
            s.close()


LIBVIRTD_SOCKET = "/run/libvirt/libvirt-sock"


@pytest.fixture
def lv_spec(builtin_ready, libvirt_domains):
    from balloonlab import builtin_spec
    return lambda **kw: builtin_spec(libvirt_domains(), **kw)


@pytest.fixture
def relay(libvirtd):
    path = RUNTIME_ROOT / f"relay-{os.getpid()}.sock"
    r = FreezingRelay(LIBVIRTD_SOCKET, path)
    try:
        yield r, f"qemu+unix:///system?socket={path}"
    finally:
        r.close()
        path.unlink(missing_ok=True)


def domain_listed(name: str) -> bool:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", "list", "--all", "--name"],
                          capture_output=True, text=True, timeout=60)
    return name in done.stdout.split()


async def test_libvirt_call_to_hung_libvirtd_raises_monitor_error_within_its_limit(lv_spec, relay):
    from balloonlab.libvirt import LibvirtGuest, api
    from balloonlab.libvirt.link import open_link
    r, uri = relay
    guest = await LibvirtGuest.launch(lv_spec(), uri=uri, agent=False)
    try:
        guest.link.call_timeout_s = 1.5
        assert await guest.link.state() == "running"
        with r.frozen():
            # The open's first RPC goes out and nothing comes back: one call thread hangs.
            t0 = time.monotonic()
            with pytest.raises(MonitorError, match="virConnectOpen: no answer from libvirt within 1.5 s"):
                await open_link(uri, guest.name, "libvirt", call_timeout_s=1.5)
            opened = time.monotonic() - t0
            assert opened < 1.5 + 2.0, opened
            calls = api.CALL_THREADS + 1  # the rest of the threads hang, two calls never start
            t0 = time.monotonic()
            results = await asyncio.gather(*(guest.link.state() for _ in range(calls)), return_exceptions=True)
            elapsed = time.monotonic() - t0
            assert len(results) == calls and all(isinstance(x, MonitorError) for x in results), results
            assert "virDomainGetState: no answer from libvirt within 1.5 s" in str(results[0])
            print(f"hung libvirtd, limit 1.5 s: open raised after {opened:.2f} s, "
                  f"{calls} concurrent calls after {elapsed:.2f} s")
            assert elapsed < 1.5 + 2.0, elapsed
            assert api._pool.busy == api.CALL_THREADS  # bounded: no thread beyond the pool
            # Hung calls hold daemon threads of their own (asyncio's executor is untouched, and
            # a hung call cannot keep the interpreter from exiting), never more than the pool.
            callers = [t for t in threading.enumerate() if t.name.startswith("balloonlab-libvirt-call-")]
            assert len(callers) == api.CALL_THREADS and all(t.daemon for t in callers)
        # Thawed: the hung calls return, their threads come back, the link works again.
        assert await wait_until(lambda: api._pool.busy == 0, 10)
        assert await guest.link.state() == "running"
    finally:
        guest.link.call_timeout_s = 30.0
        assert await guest.shutdown(timeout_s=5)
    assert not domain_listed(guest.name)


# libvirt's graceful destroy of a running built-in guest takes 1.2-1.7 s here (idle machine).
@pytest.mark.parametrize(("qemu", "timeout_s"), [("running", 8.0), ("sigstopped", 2.0)])
async def test_libvirt_shutdown_returns_within_its_timeout(lv_spec, qemu, timeout_s):
    from balloonlab.libvirt import LibvirtGuest
    guest = await LibvirtGuest.launch(lv_spec(), agent=False)
    pid = guest.pid
    assert pid is not None
    if qemu == "sigstopped":
        os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending: libvirt alone would wait 10 s
    try:
        t0 = time.monotonic()
        graceful = await guest.shutdown(timeout_s=timeout_s)
        elapsed = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    print(f"shutdown(timeout_s={timeout_s}) of a {qemu} QEMU: {elapsed:.2f} s, graceful={graceful}")
    assert graceful is (qemu == "running")
    assert elapsed < timeout_s + 4.0, elapsed  # the SIGKILL after the limit is quick
    assert await wait_until(lambda: gone(pid), 10)
    assert not domain_listed(guest.name)
