"""Faults inside a running Sampler, with real processes: a QEMU SIGKILLed mid-run, a guest
paused for 30 s, a reboot from inside the guest, a bug in one guest's task; and, against a
fake QMP server (what QEMU cannot be made to do), a connection dropped mid-command and a
garbled reply. Each time the other guests keep sampling and no recorded row is lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import numpy as np

from balloonlab import Guest, Sampler
from tests.test_monitor_faults import fake_qmp


def rows_of(frame, name):
    return frame[frame["guest"] == name]


async def test_a_qemu_killed_mid_run_is_marked_and_the_others_keep_sampling(spec):
    async with await Guest.launch(spec()) as keep:
        victim = await Guest.launch(spec(name=f"{keep.name}-v"))
        try:
            await asyncio.gather(keep.balloon.wait_for_stats(30), victim.balloon.wait_for_stats(30))
            async with Sampler() as sampler:
                await sampler.add(keep)
                await sampler.add(victim)
                await asyncio.sleep(4)
                before = sampler.states()[victim.name].samples
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = time.time()
                await asyncio.sleep(5)
                states = sampler.states()
            assert before >= 3
            assert states[victim.name].state == "dead" and states[keep.name].state == "removed"
            events = sampler.events()
            gone = events[(events["guest"] == victim.name) & (events["kind"] == "shutdown")]
            assert len(gone) == 1 and gone.index[0].timestamp() - killed_at < 3
            frame = sampler.frame()
            assert len(rows_of(frame, victim.name)) == states[victim.name].samples >= before
            after = rows_of(frame, keep.name).index.asi8 / 1e9
            assert (after > killed_at + 1).sum() >= 3  # the survivor kept its once-a-second pace
        finally:
            await victim.shutdown()


async def test_a_guest_paused_for_30_s_adds_no_rows_and_no_reset(guest):
    await guest.balloon.wait_for_stats(30)
    async with Sampler() as sampler:
        await sampler.add(guest)
        await asyncio.sleep(4)
        await guest.monitor.execute("stop")
        stopped = time.time()
        await asyncio.sleep(30)
        await guest.monitor.execute("cont")
        resumed = time.time()
        await asyncio.sleep(5)
        assert sampler.states()[guest.name].state == "sampling"
    frame = sampler.frame()
    at = frame.index.asi8 / 1e9
    assert not ((at > stopped + 1.2) & (at < resumed)).any()  # no rows while paused
    assert not frame["reset"].any()
    after = frame[at > resumed]
    # Fresh from the first row on: age is the read's lag behind last-update's whole second
    # (under 1 s) plus the read's own lag, a quarter period at most after a stall, and slack.
    assert len(after) >= 3 and (after["age_s"] < 1 + 0.25 + 0.25).all(), after["age_s"]
    rates = frame.balloon.rates()
    assert (rates.drop(columns="guest").fillna(0) >= 0).all().all()
    gaps = np.diff(at)
    assert gaps.max() > 29  # the pause is one long interval, not a burst of stale rows


async def test_a_reboot_from_inside_is_seen_by_balloon_and_sampler(guest):
    await guest.balloon.wait_for_stats(30)
    await guest.workload.alloc("64M")
    assert (await guest.read_stats()).new  # the interactive reader has seen the guest
    async with Sampler() as sampler:
        await sampler.add(guest)
        await asyncio.sleep(3)
        before = await guest.balloon.read_report()
        await guest.workload.reboot()
        rebooted = time.time()
        deadline = time.monotonic() + 60
        while not (record := await guest.read_stats()).new or record.read_time < rebooted + 1:
            assert time.monotonic() < deadline, "no report after the reboot"
            await asyncio.sleep(0.3)
        assert record.reset  # the interactive reader sees the reset too
        await guest.workload.connect(60)  # the agent is back once the guest booted again
        await asyncio.sleep(3)
    frame = sampler.frame()
    resets = frame[frame["reset"]]
    assert len(resets) == 1 and resets.index[0].timestamp() > rebooted
    assert resets.iloc[0]["minor_faults"] < before["minor_faults"]  # the counters started again
    assert (sampler.events()["kind"] == "reset").sum() == 1
    assert guest.workload.held == 0


async def test_a_bug_in_one_guests_task_marks_it_failed_and_spares_the_others(spec):
    async with await Guest.launch(spec()) as good, await Guest.launch(spec(name=f"{good.name}-b")) as bad:
        await asyncio.gather(good.balloon.wait_for_stats(30), bad.balloon.wait_for_stats(30))
        real = bad.balloon.read_stats
        calls = 0

        async def buggy(**kwargs):
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("a bug in a backend")
            return await real(**kwargs)
        bad.balloon.read_stats = buggy  # type: ignore[method-assign]
        async with Sampler() as sampler:
            await sampler.add(good)
            await sampler.add(bad)
            await asyncio.sleep(6)
            states = sampler.states()
        assert states[bad.name].state == "failed" and "RuntimeError: a bug in a backend" in states[bad.name].error
        events = sampler.events()
        assert ((events["guest"] == bad.name) & (events["kind"] == "error")).sum() == 1
        assert states[good.name].samples >= 5
        assert len(rows_of(sampler.frame(), bad.name)) >= 1  # what it recorded before stays


async def test_a_guest_whose_metadata_cannot_be_read_is_still_named_in_the_run(guest, tmp_path):
    """libvirtd restarting as a libvirt guest is added (seen in the libvirt notebook when another
    run restarted the daemon): its rows were recorded, but run.json left the guest out."""
    from balloonlab import load_run
    from balloonlab.model.errors import BalloonLabError
    await guest.balloon.wait_for_stats(30)

    async def unreachable() -> dict[str, object]:
        raise BalloonLabError("libvirt: cannot connect to the daemon")
    guest.metadata = unreachable  # type: ignore[method-assign]
    async with Sampler(run_dir=tmp_path / "run", flush_interval_s=1) as sampler:
        await sampler.add(guest)
        await asyncio.sleep(3)
    run = load_run(tmp_path / "run")
    assert run.metadata["guests"][guest.name] == {"name": guest.name, "backend": "qmp",
                                                  "metadata_error": "libvirt: cannot connect to the daemon"}
    assert (run.samples["guest"] == guest.name).sum() >= 2


def balloon_server(fault_after: int, fault: str):
    """A fake QEMU with a balloon that reports every second; the ``fault_after``-th guest-stats
    read is answered with ``fault``: ``"drop"`` (connection closed, no reply) or ``"garble"``."""
    reads = 0

    async def behave(msg, writer):
        nonlocal reads
        cmd, args = msg["execute"], msg.get("arguments") or {}
        reply: object = {}
        if cmd == "qom-list":
            reply = ([{"name": "balloon0", "type": "child<virtio-balloon-pci>"}] if args["path"] == "/machine/peripheral"
                     else [{"name": "guest-stats-polling-interval", "type": "int"}])
        elif cmd == "qom-get" and args["property"] == "guest-stats":
            reads += 1
            if reads == fault_after and fault == "drop":
                writer.close()
                return
            if reads == fault_after and fault == "garble":
                writer.write(b'{"return": {"last-update": 17, "stats": {\xff\xfe garbage\r\n')
                return
            reply = {"last-update": int(time.time()), "stats": {"stat-free-memory": 1000 + reads}}
        elif cmd == "qom-get":
            reply = 1
        elif cmd == "query-balloon":
            reply = {"actual": 1 << 29}
        elif cmd == "query-status":
            reply = {"status": "running", "running": True}
        writer.write(json.dumps({"return": reply, "id": msg.get("id")}).encode() + b"\r\n")
    return behave


async def wire_fault_leaves_the_rest_sampling(guest, fault: str) -> None:
    server, sock = await fake_qmp(balloon_server(fault_after=4, fault=fault))
    async with server:
        fake = await Guest.attach(sock, name=f"{guest.name}-fake")
        try:
            await guest.balloon.wait_for_stats(30)
            async with Sampler() as sampler:
                await sampler.add(fake)
                await sampler.add(guest)
                await asyncio.sleep(8)
                states = sampler.states()
            assert states[fake.name].state == "dead"
            assert states[guest.name].samples >= 6
            events = sampler.events()
            marked = events[events["guest"] == fake.name]
            assert len(marked) == 1 and marked["kind"].iloc[0] in ("error", "shutdown")
            kept = rows_of(sampler.frame(), fake.name)
            assert kept["free_memory"].tolist() == list(range(1001, 1001 + len(kept)))  # nothing lost
            assert len(kept) >= 2
        finally:
            await fake.close()


async def test_a_connection_dropped_mid_command_marks_only_that_guest(guest):
    await wire_fault_leaves_the_rest_sampling(guest, "drop")


async def test_a_garbled_reply_marks_only_that_guest(guest):
    await wire_fault_leaves_the_rest_sampling(guest, "garble")


def libvirtd_pid() -> int | None:
    from pathlib import Path
    try:
        return int(Path("/run/libvirtd.pid").read_text().strip())
    except (OSError, ValueError):
        return None


async def test_a_libvirtd_restart_mid_run_is_survived(libvirt_domains, builtin_ready):
    """libvirtd goes away for a moment (a package upgrade, an admin's restart): the domain keeps
    running, the link reopens its connection and the sampler keeps its guest."""
    import subprocess

    from balloonlab import builtin_spec
    from balloonlab.libvirt import LibvirtGuest
    from tests.libvirtd_fixture import SCRIPT

    guest = await LibvirtGuest.launch(builtin_spec(libvirt_domains(), period_s=1), agent=False)
    try:
        await guest.balloon.wait_for_stats(60)
        async with Sampler() as sampler:
            await sampler.add(guest)
            await asyncio.sleep(4)
            before = libvirtd_pid()

            def restart() -> None:
                for verb in ("stop", "start"):
                    done = subprocess.run([str(SCRIPT), verb], capture_output=True, text=True, timeout=90)
                    assert done.returncode == 0, done.stdout + done.stderr
            await asyncio.to_thread(restart)
            restarted = time.time()
            after = libvirtd_pid()
            assert before is not None and after is not None and after != before, (
                "this test restarts libvirtd through scripts/libvirtd, which stops only the daemon it "
                "started: run the suite on a machine where the tests start libvirtd (make test does)")
            await asyncio.sleep(5)
            await guest.balloon.set_target("384M")  # events come over the new connection too
            await guest.balloon.wait_for_actual(timeout_s=30)
            await asyncio.sleep(2)
            state = sampler.states()[guest.name]
        assert state.state == "removed" and state.error is None  # it never stopped sampling
        assert guest.link.reconnects == 1
        rows = rows_of(sampler.frame(), guest.name)
        assert (rows.index.asi8 / 1e9 > restarted).sum() >= 4
        changes = sampler.events()
        assert ((changes["kind"] == "balloon_change") & (changes.index.asi8 / 1e9 > restarted)).any()
    finally:
        await guest.shutdown()
