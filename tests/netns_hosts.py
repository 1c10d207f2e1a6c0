"""Remote libvirt hosts for tests: each one a Linux network namespace with its own libvirtd
(TCP), sshd and, optionally, a faked wall clock (``scripts/netns-host``, root only).

``remote_hosts`` (session scope) starts two of them, side by side:

- ``real``: ``blh-<pid>-a``, the real clock;
- ``faked``: ``blh-<pid>-b``, its wall clock :data:`FAKED_OFFSET_S` (90 s) ahead, for
  libvirtd, every QEMU it starts and every command run over its ssh.

Each is a :class:`RemoteHost`: ``tcp_uri`` (``qemu+tcp://198.18.X.2/system``) and ``ssh_uri``
(``qemu+ssh://root@198.18.X.2/system?keyfile=...&no_verify=1``) answer from the root namespace
like any remote libvirt host; ``local_uri`` reaches the same libvirtd through its unix socket
(for checks and cleanup that must not depend on the network). ``link_down()`` /
``link_up()`` and ``kill_libvirtd()`` / ``start_libvirtd()`` make faults. Both hosts are stopped
at the end of the session, or as soon as starting either fails; hosts of an earlier session that
died before its teardown (its pid is gone) are removed first. The pid of this pytest process is
in every name, so two sessions (and pytest-xdist's workers, each its own session) never
collide; their addresses come from the script's lock (INDEX retried while taken).

What is missing (iproute2, openssh-server, faketime, libvirt's daemons, root) fails the test
with how to install it (``make test`` installs them all), never skips.
tests/conftest.py loads this module as a pytest plugin.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns-host"
#: Where the script keeps each host's state (``<STATE_ROOT>/<pid>-<letter>``).
STATE_ROOT = Path("/run/balloonlab-hosts")
#: Every network namespace (and root-side veth) of a test host is named ``blh-<pid>-<letter>``.
NETNS_PREFIX = "blh-"
#: The faked host's clock offset.
FAKED_OFFSET_S = 90
#: INDEX range of the script (one 198.18.0.0/15 /30 each).
INDEX_COUNT = 512
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 120
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
_NAME = re.compile(r"(\d+)-[a-z]")

INSTALL_HINT = ("`make test` installs them (make system-packages: iproute2 openssh-server faketime "
                "libvirt-daemon-system libvirt-clients), or as root: apt-get install -y iproute2 openssh-server "
                "faketime libvirt-daemon-system libvirt-clients")


def missing_for_remote_hosts() -> list[str]:
    """What ``scripts/netns-host`` needs and this machine lacks (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces and qemu:///system daemons): run the tests as root")
    checks = [
        ("iproute2 (ip)", shutil.which("ip") or Path("/usr/sbin/ip").exists() or Path("/usr/bin/ip").exists()),
        ("openssh-server (sshd)", Path("/usr/sbin/sshd").exists()),
        ("openssh-client (ssh, ssh-keygen)", shutil.which("ssh") and shutil.which("ssh-keygen")),
        ("faketime (libfaketime)", FAKETIME_LIB.exists()),
        ("libvirt-daemon-system (libvirtd, virtlogd)",
         Path("/usr/sbin/libvirtd").exists() and Path("/usr/sbin/virtlogd").exists()),
        ("libvirt-clients (virsh)", shutil.which("virsh")),
        ("util-linux (unshare, nsenter, flock)",
         shutil.which("unshare") and shutil.which("nsenter") and shutil.which("flock")),
    ]
    missing += [what for what, ok in checks if not ok]
    return missing


def require_remote_host_tools() -> None:
    """Fail (never skip) when something the remote hosts need is missing, saying how to get it."""
    missing = missing_for_remote_hosts()
    if missing:
        pytest.fail("remote libvirt hosts (network namespaces, scripts/netns-host) need: " + ", ".join(missing)
                    + ".\n" + INSTALL_HINT, pytrace=False)


def _script(*args: str, timeout: float = STOP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _checked(*args: str) -> None:
    done = _script(*args)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/netns-host {' '.join(args)} failed (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")


@dataclass(frozen=True)
class RemoteHost:
    """One running host of ``scripts/netns-host``."""

    #: The network namespace (and the root-side veth): ``blh-<pid>-<letter>``.
    name: str
    #: The host's address inside its namespace (198.18.X.2; the root side is 198.18.X.1).
    address: str
    tcp_uri: str
    ssh_uri: str
    #: The private key ``ssh_uri`` logs in with (root, this key only).
    ssh_key: str
    #: How far its wall clock is ahead of this machine's (0: the real clock).
    clock_offset_s: int
    #: The script's state directory (libvirt's run/lib/cache/log dirs, sshd's files, pids).
    state_dir: Path

    @property
    def script_name(self) -> str:
        """The NAME ``scripts/netns-host`` knows it by (``<pid>-<letter>``)."""
        return self.name[len(NETNS_PREFIX):]

    @property
    def local_uri(self) -> str:
        """The same libvirtd through its unix socket: works with the link down."""
        return f"qemu+unix:///system?socket={self.state_dir}/run/libvirt-sock"

    def link_down(self, *, far: bool = False) -> None:
        """Set the root-side veth down: connections fail at once, "No route to host" (the
        script's unreachable route keeps them off the default route). ``far``: set the
        namespace's side down instead: packets are lost silently (new connections fail after
        about 3 s of ARP, established ones stall)."""
        _checked("link-down", self.script_name, *(["--far"] if far else []))

    def link_up(self) -> None:
        """Both sides of the veth up again."""
        _checked("link-up", self.script_name)

    def kill_libvirtd(self) -> None:
        """SIGKILL the host's libvirtd (its QEMUs keep running)."""
        _checked("kill-libvirtd", self.script_name)

    def start_libvirtd(self) -> None:
        """Start the host's libvirtd again after :meth:`kill_libvirtd` (waits until it answers)."""
        _checked("start-libvirtd", self.script_name)

    def stop(self) -> None:
        """Stop the host and remove everything it made (idempotent)."""
        _checked("stop", self.script_name)

    def pids(self) -> dict[str, int]:
        """The daemons' pids as recorded at start (virtlogd, libvirtd, sshd)."""
        try:
            lines = (self.state_dir / "pids").read_text().split("\n")
        except OSError:
            return {}
        return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}

    def ssh(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command on the host over ssh (no one's known_hosts is read or written)."""
        return subprocess.run(
            ["ssh", "-q", "-i", self.ssh_key, "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "GlobalKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", f"root@{self.address}", *command],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


class RemoteHosts(NamedTuple):
    """The session's two hosts."""

    real: RemoteHost
    faked: RemoteHost


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _parse_start(output: str, name: str, offset: int) -> RemoteHost:
    fields = dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)
    try:
        return RemoteHost(name=NETNS_PREFIX + name, address=fields["address"], tcp_uri=fields["tcp-uri"],
                          ssh_uri=fields["ssh-uri"], ssh_key=fields["ssh-key"], clock_offset_s=offset,
                          state_dir=Path(fields["state"]))
    except KeyError as exc:
        raise RuntimeError(f"scripts/netns-host start {name} printed no {exc}:\n{output}") from None


def start_host(letter: str, *, clock_offset_s: int = 0) -> RemoteHost:
    """Start host ``blh-<pid>-<letter>`` (the next free INDEX from one derived from the pid,
    so sessions seldom even try the same one); stop what is left of it on failure."""
    name = f"{os.getpid()}-{letter}"
    first = (os.getpid() * 7 + (ord(letter) - ord("a")) * 2) % INDEX_COUNT
    args = ["--clock-offset", str(clock_offset_s)] if clock_offset_s else []
    try:
        for step in range(INDEX_COUNT):
            index = (first + step * 3) % INDEX_COUNT  # 3 and 512 are coprime: every INDEX once
            done = _script("start", name, str(index), *args, timeout=START_TIMEOUT_S)
            if done.returncode == 3:  # INDEX taken by another host or an interface
                continue
            if done.returncode != 0:
                raise RuntimeError(f"scripts/netns-host start {name} {index} failed (exit {done.returncode}):\n"
                                   f"{done.stdout}{done.stderr}")
            return _parse_start(done.stdout, name, clock_offset_s)
        raise RuntimeError(f"scripts/netns-host: no free INDEX for {name}")
    except BaseException:
        _script("stop", name)
        raise


def stale_host_names() -> list[str]:
    """Script NAMEs of hosts whose pytest process is gone (namespaces or state dirs left)."""
    names = set()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for line in listed.splitlines():
        netns = line.split(" ", 1)[0]
        if netns.startswith(NETNS_PREFIX):
            names.add(netns[len(NETNS_PREFIX):])
    if STATE_ROOT.is_dir():
        names.update(p.name for p in STATE_ROOT.iterdir() if p.is_dir())
    stale = []
    for name in sorted(names):
        match = _NAME.fullmatch(name)
        if match and not _pid_alive(int(match.group(1))):
            stale.append(name)
    return stale


def remove_stale_hosts() -> list[str]:
    """Stop the hosts of sessions that died before their teardown; the names removed."""
    removed = []
    for name in stale_host_names():
        _checked("stop", name)
        removed.append(name)
    return removed


def start_hosts(wanted: dict[str, int]) -> dict[str, RemoteHost]:
    """Start hosts {letter: clock offset} side by side; on any failure stop them all."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        futures = {letter: pool.submit(start_host, letter, clock_offset_s=offset)
                   for letter, offset in wanted.items()}
        concurrent.futures.wait(futures.values())
    errors = [f.exception() for f in futures.values() if f.exception() is not None]
    if errors:
        for future in futures.values():
            if future.exception() is None:
                future.result().stop()
        raise errors[0]  # type: ignore[misc]
    return {letter: future.result() for letter, future in futures.items()}


@pytest.fixture(scope="session")
def remote_hosts():
    """Two remote libvirt hosts (``real`` and ``faked``, +90 s), for the whole session."""
    require_remote_host_tools()
    remove_stale_hosts()
    try:
        started = start_hosts({"a": 0, "b": FAKED_OFFSET_S})
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"could not start the remote libvirt hosts: {exc}", pytrace=False)
    hosts = RemoteHosts(real=started["a"], faked=started["b"])
    try:
        yield hosts
    finally:
        errors = []
        for host in hosts:
            try:
                host.stop()
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                errors.append(str(exc))
        if errors:
            raise RuntimeError("stopping the remote libvirt hosts failed:\n" + "\n".join(errors))


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while not (ok := predicate()) and time.monotonic() < deadline:
        time.sleep(interval_s)
    return bool(ok)
