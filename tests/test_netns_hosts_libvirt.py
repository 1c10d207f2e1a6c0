"""The remote libvirt hosts themselves (tests/netns_hosts.py, scripts/netns-host): both URIs
answer from the root namespace, the faked clock is faked for ssh and for QEMU, faults work, and
``stop`` leaves nothing behind."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import re
import socket
import subprocess
import time
import xml.etree.ElementTree as ET

import pytest

from .libvirtd_fixture import domain_name, require_libvirt_python
from .netns_hosts import (FAKED_OFFSET_S, NETNS_PREFIX, RemoteHost, _pid_alive, remove_stale_hosts,
                          require_remote_host_tools, start_host, wait_for)

require_libvirt_python()  # a collection error that says how to install it, never a skip

import libvirt  # noqa: E402

CLOCK_TOLERANCE_S = 2.0


def virsh(uri: str, *args: str, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh -c {uri} {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=True).stdout
    return {line.split(" ", 1)[0] for line in out.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True, timeout=30).returncode == 0


def builtin_xml_without_agent(name: str) -> str:
    """The built-in guest's domain XML (stats every second) without its agent port, which
    needs a socket path on the host that runs QEMU."""
    from balloonlab import builtin_spec
    from balloonlab.domain import render_domain_xml
    root = ET.fromstring(render_domain_xml(builtin_spec(name, period_s=1)))
    devices = root.find("devices")
    assert devices is not None
    for serial in devices.findall("serial"):
        if serial.get("type") == "unix":
            devices.remove(serial)
    return ET.tostring(root, encoding="unicode")


def remote_clock_offset(host: RemoteHost) -> float:
    """The host's ``date`` over ssh minus this machine's clock at the middle of the call."""
    before = time.time()
    done = host.ssh("date", "+%s.%N")
    after = time.time()
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip()) - (before + after) / 2


def test_both_uris_answer(remote_hosts):
    for host in remote_hosts:
        for uri in (host.tcp_uri, host.ssh_uri):
            conn = libvirt.open(uri)
            try:
                assert conn.getVersion() >= 7_000_000, uri  # QEMU's version, 7.2 here
                assert conn.getLibVersion() >= 9_000_000, uri
                assert conn.getType() == "QEMU"
            finally:
                conn.close()
        assert "Running hypervisor: QEMU" in virsh(host.ssh_uri, "version")
    assert remote_hosts.real.address != remote_hosts.faked.address
    assert {h.name for h in remote_hosts} <= netns_names()


def test_tcp_host_is_reached_from_the_root_namespace_over_its_veth(remote_hosts):
    for host in remote_hosts:
        assert re.fullmatch(r"198\.1[89]\.\d+\.2", host.address)
        assert host.name.startswith(NETNS_PREFIX) and host.name.endswith(("-a", "-b"))
        route = subprocess.run(["ip", "route", "get", host.address], capture_output=True, text=True,
                               timeout=30, check=True).stdout
        assert f"dev {host.name} " in route, route  # the host's own veth, not the default route
        with socket.create_connection((host.address, 16509), timeout=10) as sock:
            assert sock.getsockname()[0] == host.address.rsplit(".", 1)[0] + ".1"  # the root side
        assert host.tcp_uri == f"qemu+tcp://{host.address}/system"
        assert host.ssh_uri == f"qemu+ssh://root@{host.address}/system?keyfile={host.ssh_key}&no_verify=1"


def test_clock_is_faked_over_ssh(remote_hosts):
    assert remote_hosts.faked.clock_offset_s == FAKED_OFFSET_S
    faked = remote_clock_offset(remote_hosts.faked)
    real = remote_clock_offset(remote_hosts.real)
    assert abs(faked - FAKED_OFFSET_S) <= CLOCK_TOLERANCE_S, faked
    assert abs(real) <= CLOCK_TOLERANCE_S, real


def qemu_clock_offset(host: RemoteHost) -> float:
    """Boot the built-in guest on ``host`` (its libvirtd over TCP, stats every second) and
    return its balloon report's last_update minus this machine's clock, read the moment a new
    report is there."""
    conn = libvirt.open(host.tcp_uri)
    try:
        dom = conn.createXML(builtin_xml_without_agent(domain_name()), 0)
        try:
            dom.setMemoryStatsPeriod(1, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            first = [0]

            def reported() -> bool:
                first[0] = dom.memoryStats().get("last_update", 0)
                return first[0] != 0
            assert wait_for(reported, 60, 0.2), f"{host.name}: no balloon stats within 60 s"
            assert wait_for(lambda: dom.memoryStats().get("last_update", 0) != first[0], 10, 0.05)
            return dom.memoryStats()["last_update"] - time.time()
        finally:
            dom.destroy()
    finally:
        conn.close()


@pytest.mark.qemu
def test_clock_is_faked_for_qemu(remote_hosts, builtin_ready):
    """A QEMU the faked host's libvirtd starts stamps its balloon stats with the faked clock
    (last_update is whole seconds: a report read within 0.05 s of its making is 0..1 s old)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        offsets = dict(zip(remote_hosts, pool.map(qemu_clock_offset, remote_hosts), strict=True))
    for host, offset in offsets.items():
        assert abs(offset - host.clock_offset_s) <= CLOCK_TOLERANCE_S, (host.name, offset)


@pytest.mark.qemu
def test_faults_and_stop_leave_nothing(builtin_ready):
    """A third host: link down/up, libvirtd killed under a running QEMU, then ``stop``: no
    namespace, veth, route, state dir or process of it is left."""
    require_remote_host_tools()
    remove_stale_hosts()
    host = start_host("c")
    try:
        assert host.name in netns_names() and link_exists(host.name)
        host.link_down()
        started = time.monotonic()
        with pytest.raises(OSError) as down:  # at once, and not out by the default route
            socket.create_connection((host.address, 16509), timeout=5).close()
        assert down.value.errno == errno.EHOSTUNREACH and time.monotonic() - started < 1, down.value
        host.link_up()
        host.link_down(far=True)  # packets lost: a new connection gives up when ARP does
        with pytest.raises(OSError) as far:
            socket.create_connection((host.address, 16509), timeout=10).close()
        assert far.value.errno == errno.EHOSTUNREACH, far.value
        host.link_up()
        assert wait_for(lambda: subprocess.run(["virsh", "-c", host.tcp_uri, "version"], capture_output=True,
                                               timeout=30).returncode == 0, 10, 0.2)
        xml = builtin_xml_without_agent(domain_name())
        conn = libvirt.open(host.tcp_uri)
        try:
            conn.createXML(xml, 0)
        finally:
            conn.close()
        host.kill_libvirtd()
        pids = list(host.pids().values())
        in_netns = [int(p) for p in subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                                   text=True, timeout=30).stdout.split()]
        qemus = [p for p in in_netns if "qemu-system" in _exe(p)]
        assert qemus, f"the domain's QEMU should outlive its libvirtd: {in_netns}"
    finally:
        host.stop()
        host.stop()  # idempotent
    assert host.name not in netns_names()
    assert not link_exists(host.name)
    assert not host.state_dir.exists()
    net = host.address.rsplit(".", 1)[0] + ".0/30"
    routes = subprocess.run(["ip", "route", "show", "exact", net], capture_output=True, text=True,
                            timeout=30, check=True).stdout
    assert routes.strip() == "", routes
    left = [p for p in pids + in_netns if _pid_alive(p)]
    assert not left, f"processes of the stopped host still run: {left}"


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""
