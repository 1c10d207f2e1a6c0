"""Guests on several real hosts in one run: a local QMP guest, a local libvirt guest and a guest
on each of two remote hosts (network namespaces with their own libvirtd: tests/netns_hosts.py),
one reached over TCP with the true clock, one over SSH with its clock 90 s ahead.

The period rules hold on remote URIs; rows and events carry their ``host``; the remote clock's
offset is learnt from the reports and corrects ``age_s``; a host cut off mid-run marks its guest
while the others keep sampling, and the run keeps every row.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest

from .libvirtd_fixture import require_libvirt_python

require_libvirt_python()  # a collection error that says how to install it, never a skip

from balloonlab import Guest, Sampler, builtin_spec, load_run  # noqa: E402
from balloonlab.libvirt import LibvirtGuest  # noqa: E402
from balloonlab.model.guest import LOCAL_HOST  # noqa: E402
from balloonlab.model.period import POLLING_PROPERTY  # noqa: E402

pytestmark = pytest.mark.qemu

#: How long a remote call may hang on a cut-off host before the sampler gives up on it, and how
#: long a link whose libvirtd went away waits for it to come back (30 s each by default).
REMOTE_CALL_TIMEOUT_S = 8.0
REMOTE_RECONNECT_S = 5.0


async def until(predicate, timeout_s: float, what: str, *, step_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(step_s)


async def set_period_behind_libvirts_back(guest: LibvirtGuest, seconds: int) -> None:
    """Change the live period with raw QMP (libvirt-qemu's passthrough works on a remote
    connection too), so libvirt's live XML keeps the old value."""
    await guest.link.qmp("qom-set", {"path": await guest.balloon.path(), "property": POLLING_PROPERTY,
                                     "value": seconds})


async def test_period_rules_hold_on_a_remote_tcp_uri(remote_hosts, builtin_ready, libvirt_domains):
    uri = remote_hosts[0].tcp_uri
    spec = builtin_spec(libvirt_domains(), period_s=2)
    guest = await LibvirtGuest.launch(spec, uri=uri, stats_via="qmp")  # libvirt-qemu's passthrough, remotely
    try:
        assert guest.agent_socket is None  # the agent port is connected to nothing on a remote host
        assert guest.host == remote_hosts[0].address and not guest.on_this_host and guest.pid is None
        assert await guest.balloon.get_period() == 2  # launch: the XML's period, set at start
        await set_period_behind_libvirts_back(guest, 5)
        # reconnect: never (read through QMP: libvirt's own view, its live XML, still says 2)
        again = await LibvirtGuest.reconnect(spec.name, uri=uri, stats_via="qmp")
        assert again.period_at_connect == 5 and await again.balloon.get_period() == 5
        await again.close()
        await asyncio.to_thread(guest.link.dom.suspend)
        paused = await LibvirtGuest.attach(spec.name, uri=uri)  # attach: only if running
        assert await guest.balloon.get_period() == 5
        await paused.close()
        await asyncio.to_thread(guest.link.dom.resume)
        running = await LibvirtGuest.attach(spec.name, uri=uri)
        assert await guest.balloon.get_period() == 2 and running.balloon.period_s == 2
        await running.close()
    finally:
        await guest.shutdown()


async def test_one_run_over_four_guests_on_three_hosts_with_a_faked_clock_and_two_cut_off_hosts(
        remote_hosts, builtin_ready, libvirt_domains, guest_name, tmp_path):
    tcp_host, ssh_host = remote_hosts
    assert ssh_host.clock_offset_s == 90 and tcp_host.clock_offset_s == 0
    launched: list = []
    try:
        qmp = await Guest.launch(builtin_spec(guest_name, period_s=1))
        launched.append(qmp)
        local = await LibvirtGuest.launch(builtin_spec(libvirt_domains(), period_s=1), agent=False)
        launched.append(local)
        on_tcp, on_ssh = await asyncio.gather(
            LibvirtGuest.launch(builtin_spec(libvirt_domains(), period_s=1), uri=tcp_host.tcp_uri, agent=False),
            LibvirtGuest.launch(builtin_spec(libvirt_domains(), period_s=1), uri=ssh_host.ssh_uri, agent=False))
        launched += [on_tcp, on_ssh]
        for remote in (on_tcp, on_ssh):
            remote.link.call_timeout_s, remote.link.reconnect_s = REMOTE_CALL_TIMEOUT_S, REMOTE_RECONNECT_S
        hosts = {qmp.name: LOCAL_HOST, local.name: LOCAL_HOST, on_tcp.name: tcp_host.address,
                 on_ssh.name: ssh_host.address}
        async with Sampler(run_dir=tmp_path / "run", flush_interval_s=1) as sampler:
            for guest in launched:
                await sampler.add(guest)
            states = sampler.states()
            await until(lambda: min(s.samples for s in states.values()) >= 8, 90, "8 samples of every guest")
            clocks = sampler.host_clocks()
            assert clocks[LOCAL_HOST].method == "local" and clocks[LOCAL_HOST].offset_s == 0
            ahead, true = clocks[ssh_host.address], clocks[tcp_host.address]
            # The faked clock is found within its bounds, which are about a second wide.
            assert abs(ahead.offset_s - 90) <= ahead.uncertainty_s + 0.05 and ahead.uncertainty_s <= 1.0, ahead
            assert abs(true.offset_s) <= true.uncertainty_s + 0.05 and true.uncertainty_s <= 1.0, true

            # -- cut both remote hosts off: the TCP one's link goes down, the SSH one's libvirtd dies
            kept = {name: states[name].samples for name in states}
            tcp_host.link_down()
            ssh_host.kill_libvirtd()
            cut_at = time.time()
            await until(lambda: states[on_tcp.name].state == "dead" and states[on_ssh.name].state == "dead",
                        2 * (REMOTE_CALL_TIMEOUT_S + REMOTE_RECONNECT_S) + 10, "both cut-off guests marked dead")
            before = {name: states[name].samples for name in (qmp.name, local.name)}
            await until(lambda: all(states[n].samples >= before[n] + 3 for n in before), 30,
                        "the local guests sampling on")
        run = load_run(tmp_path / "run")
    finally:  # both hosts back as the session's other tests expect them, every domain gone
        tcp_host.link_up()
        if not Path(f"/proc/{ssh_host.pids().get('libvirtd', 0)}/exe").exists():  # killed above
            ssh_host.start_libvirtd()
        for guest in reversed(launched):
            if guest.host == ssh_host.address:  # its libvirtd was restarted: a new connection destroys it
                await guest.close()
                await asyncio.to_thread(subprocess.run, ["virsh", "-q", "-c", ssh_host.local_uri, "destroy",
                                                         guest.name], capture_output=True, timeout=60)
            else:
                await guest.shutdown()

    samples, events = run.samples, run.events
    # Every row and event names its host; on disk each host is a hive partition of its own.
    assert dict(samples.groupby("guest", observed=True)["host"].agg(lambda h: set(h))) == {
        name: {host} for name, host in hosts.items()}
    guest_events = events[events["guest"].isin(list(hosts))]
    assert (guest_events["host"].astype(str) == guest_events["guest"].astype(str).map(hosts)).all()
    partitions = {p.name for p in (tmp_path / "run/samples").iterdir()}
    assert {f"host={tcp_host.address}", f"host={ssh_host.address}"} <= partitions and len(partitions) == 3
    # The run keeps every row taken before the cut, and the local guests' rows after it.
    counts = samples.groupby("guest", observed=True).size()
    for name in (on_tcp.name, on_ssh.name):
        assert counts[name] >= kept[name] >= 8
        assert samples[samples["guest"] == name].index.max().timestamp() < cut_at + 1
    for name in (qmp.name, local.name):
        assert counts[name] >= before[name] + 3
    died = events[events["guest"].isin([on_tcp.name, on_ssh.name]) & events["kind"].isin(["error", "shutdown"])]
    assert sorted(died["guest"].astype(str)) == sorted([on_tcp.name, on_ssh.name])

    # Ages on one clock: the SSH host's reports are stamped 90 s ahead, yet their ages are a
    # period or so, as the local guests' are; without the correction they would be -89 s.
    remote = samples[(samples["guest"] == on_ssh.name) & samples["age_s"].notna()]
    assert len(remote) >= 6 and remote["age_s"].between(0, 2.5).all(), remote["age_s"].describe()
    raw_age = remote.index.map(lambda t: t.timestamp()) - remote["last_update"].map(lambda t: t.timestamp())
    assert (raw_age < -85).all() and remote["clock_offset_s"].sub(90).abs().max() <= 1.0
    locals_ = samples[samples["guest"].isin([qmp.name, local.name])]
    assert (locals_["clock_offset_s"] == 0).all() and locals_["age_s"].between(0, 2.5).all()
    # run.json: each host, how it was reached and its clock
    meta = run.metadata["hosts"]
    assert meta[ssh_host.address]["reached_by"] == [ssh_host.ssh_uri] and not meta[ssh_host.address]["on_this_host"]
    assert abs(meta[ssh_host.address]["clock"]["offset_s"] - 90) <= 1.0
    assert meta[ssh_host.address]["clock_history"][0]["method"] == "reports"
    assert meta[LOCAL_HOST]["clock"] == {**meta[LOCAL_HOST]["clock"], "offset_s": 0, "method": "local"}
