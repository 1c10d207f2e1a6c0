"""The launcher against real QEMU: boot, balloon, workload, shutdown, ownership, bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from balloonlab import (AgentError, DomainXMLError, Guest, GuestNameInUse, LaunchError, SyncGuest, list_guests,
                        parse_domain_xml)
from balloonlab.qemu import registry as runtime

from .conftest import RUNTIME_ROOT, qemu_pids_under

MiB = 1 << 20


async def test_builtin_guest_boots_under_tcg_and_reports_real_stats(guest):
    assert guest.record.accel == "tcg"  # no usable KVM on these machines
    stats = await guest.balloon.wait_for_stats(30)
    total = stats["total_memory"]
    assert 400 * MiB < total <= 512 * MiB  # MemTotal of a 512 MiB guest, minus the kernel
    assert 0 < stats["free_memory"] < total
    assert 0 < stats["available_memory"] <= total
    assert stats.actual == 512 * MiB
    assert stats.last_update is not None and 0 <= stats.age_s < 5
    assert await guest.balloon.get_period() == 1


async def test_balloon_target_moves_actual_and_guest_total(guest):
    before = await guest.balloon.wait_for_stats(30)
    await guest.balloon.set_target("256M")
    result = await guest.balloon.wait_for_actual(timeout_s=30)
    assert result.reached and abs(result.final_actual - 256 * MiB) <= MiB
    assert result.moved_bytes < -200 * MiB
    deadline = time.monotonic() + 10
    while True:
        after = await guest.read_stats()
        if after["total_memory"] < before["total_memory"] - 200 * MiB or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    # The balloon's pages leave the guest's MemTotal: 256 MiB less, give or take a MiB.
    assert abs((before["total_memory"] - after["total_memory"]) - 256 * MiB) < 4 * MiB


async def test_workload_alloc_shows_in_guest_stats_and_comes_back_after_free(guest):
    base = await guest.balloon.wait_for_stats(30)

    async def free_reported_after(moment: float) -> int:
        # last-update has whole-second resolution: a sample stamped after `moment` was
        # taken once the workload call had returned.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            stats = await guest.read_stats()
            if stats.last_update > moment:
                return stats["free_memory"]
            await asyncio.sleep(0.3)
        raise AssertionError("no guest-stats sample within 15 s")

    assert await guest.workload.alloc("200M") == 200 * MiB
    low = await free_reported_after(time.time())
    assert base["free_memory"] - low == pytest.approx(200 * MiB, abs=30 * MiB)
    assert await guest.workload.free() == 0
    high = await free_reported_after(time.time())
    assert high == pytest.approx(base["free_memory"], abs=30 * MiB)


async def test_shutdown_leaves_no_process_and_no_socket(spec):
    guest = await Guest.launch(spec())
    pid, rundir = guest.pid, guest.paths.dir
    assert (rundir / "qmp.sock").exists()
    assert await guest.shutdown() is True  # QMP quit was enough
    assert not Path(f"/proc/{pid}").exists() or not runtime.pid_is_guest(pid, str(rundir))
    assert not rundir.exists()
    assert guest.name not in [r.name for r in list_guests()]


OWNER_SCRIPT = textwrap.dedent("""
    import sys, time
    from balloonlab import SyncGuest, builtin_spec
    owned = SyncGuest.launch(builtin_spec(sys.argv[1], period_s=None))
    detached = SyncGuest.launch(builtin_spec(sys.argv[2], period_s=None), detached=True)
    print(owned.pid, detached.pid, flush=True)
    time.sleep(600)
""")


def test_sigkill_of_owner_kills_owned_guest_but_detached_one_survives(builtin_ready, guest_name):
    owned_name, detached_name = guest_name + "o", guest_name + "d"
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT, owned_name, detached_name],
                             stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        owned_pid, detached_pid = map(int, owner.stdout.readline().split())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 10
    while ((runtime.pid_is_guest(owned_pid, str(RUNTIME_ROOT / owned_name)) or (RUNTIME_ROOT / owned_name).exists())
           and time.monotonic() < deadline):
        time.sleep(0.1)  # the reaper stops QEMU, then removes its runtime dir
    assert not runtime.pid_is_guest(owned_pid, str(RUNTIME_ROOT / owned_name)), "owned guest outlived its owner"
    assert not (RUNTIME_ROOT / owned_name).exists()
    listed = {r.name: r for r in list_guests()}
    assert owned_name not in listed
    assert listed[detached_name].pid == detached_pid and listed[detached_name].detached
    guest = SyncGuest.reconnect(detached_name)
    assert guest.status() == "running"
    assert guest.shutdown() is True
    assert detached_name not in {r.name for r in list_guests()}


def test_sync_facade_works_inside_a_running_event_loop(spec):
    """As in a Jupyter cell: the caller's thread already runs an asyncio loop."""
    async def cell():
        with SyncGuest.launch(spec(period_s=2)) as guest:
            return guest.balloon.get_period(), guest.status()
    assert asyncio.run(cell()) == (2, "running")


async def test_detach_later_then_reconnect_from_registry(spec):
    guest = await Guest.launch(spec())
    await guest.detach()
    await guest.close()  # a detached guest keeps running when its handle closes
    again = await Guest.reconnect(guest.name)
    try:
        assert again.pid == guest.pid and again.detached
        assert await again.status() == "running"
    finally:
        await again.shutdown()


async def test_bad_xml_is_reported_with_its_line(builtin_ready):
    with pytest.raises(DomainXMLError) as err:
        await Guest.launch("<domain type='qemu'>\n  <name>x</name>\n  <memory unit='MiB'>64</memory\n</domain>")
    assert err.value.line is not None and err.value.line >= 3


async def test_missing_kernel_fails_before_any_process(spec):
    bad = dataclasses.replace(spec(), kernel="/nonexistent/vmlinuz")
    with pytest.raises(LaunchError, match="kernel /nonexistent/vmlinuz .*does not exist"):
        await Guest.launch(bad)
    assert not (RUNTIME_ROOT / bad.name).exists()


async def test_missing_qemu_binary_gives_install_hint(spec):
    with pytest.raises(LaunchError, match="not found: install it"):
        await Guest.launch(spec(), qemu_binary="qemu-system-nonesuch")


async def test_qemu_that_exits_at_start_raises_with_command_exitcode_and_output(spec):
    bad = dataclasses.replace(spec(), machine="no-such-machine")
    with pytest.raises(LaunchError) as err:
        await Guest.launch(bad)
    assert err.value.exitcode not in (None, 0)
    assert "unsupported machine type" in err.value.output  # QEMU's own words reach the user
    assert err.value.command[0].endswith("qemu-system-x86_64")
    assert qemu_pids_under(RUNTIME_ROOT) == []
    assert not (RUNTIME_ROOT / bad.name).exists()


async def test_occupied_name_is_refused_and_leaves_the_first_guest_alone(guest, spec):
    with pytest.raises(GuestNameInUse, match="already running"):
        await Guest.launch(spec(name=guest.name))
    assert await guest.status() == "running"


def test_domain_xml_of_builtin_guest_round_trips(builtin_ready, spec):
    s = spec(memory="384M", period_s=5)
    again = parse_domain_xml(s.xml)
    assert again.memory_bytes == 384 * MiB and again.period_s == 5 and again.agent


async def test_workload_forgets_memory_the_oom_killer_took(spec):
    async with await Guest.launch(spec(memory="256M")) as guest:
        await guest.workload.alloc("96M")
        # Far more than the guest has: the OOM killer takes holders (dd children, never the agent).
        with pytest.raises(AgentError, match="OOM killer took memory"):
            await guest.workload.alloc("400M")
        listed = await guest.workload._request("list")
        in_guest = sum(int(item.split(":")[1]) for item in listed.split(",") if item)
        assert guest.workload.held == in_guest < 400 * MiB  # what the host believes = the truth
        await guest.workload.ping()  # the agent itself survived


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
async def test_disk_images_from_the_domain_xml_are_attached_in_their_format(spec, tmp_path, fmt):
    from balloonlab.domain import DiskSpec, with_changes
    image = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "64M"], check=True)
    with_disk = with_changes(spec(), disks=(DiskSpec(source=str(image), format=fmt, bus="virtio", target="vda"),))
    assert f"type='{fmt}'" in with_disk.xml or f'type="{fmt}"' in with_disk.xml
    async with await Guest.launch(with_disk) as guest:
        blocks = await guest.monitor.execute("query-block")
        files = {b["inserted"]["file"]: b["inserted"]["drv"] for b in blocks if b.get("inserted")}
        assert files == {str(image): fmt}
        assert (await guest.balloon.wait_for_stats(30)).reported  # and the guest still boots


async def test_attach_names_are_validated_as_launch_names_given_or_derived(spec, tmp_path):
    from .qemu_helpers import foreign_qemu
    with foreign_qemu("virtio-balloon-pci,id=balloon0") as sock:
        with pytest.raises(ValueError, match=r"guest name 'a/b' must be 1-48 characters"):
            await Guest.attach(sock, name="a/b")
        with pytest.raises(ValueError, match=r"'has space'.*taken from the domain XML's <name>: pass name="):
            await Guest.attach(sock, dataclasses.replace(spec(period_s=None), name="has space"))
        odd = tmp_path / "my guest.sock"
        odd.symlink_to(sock)  # the same QEMU, through a path whose stem is no guest name
        with pytest.raises(ValueError, match=r"'my guest'.*taken from the socket's file name: pass name="):
            await Guest.attach(odd)
        named = await Guest.attach(odd, name="ext_1.a")  # the same socket with a valid name attaches
        assert named.name == "ext_1.a" and await named.status() == "prelaunch"
        await named.close()
        derived = await Guest.attach(sock)
        assert derived.name == "qmp" and await derived.status() == "prelaunch"
        await derived.close()
