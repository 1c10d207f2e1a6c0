"""The libvirt backend against a real libvirtd and real QEMU (TCG, domain type 'qemu').

Every domain is named ``blv-<pid>-<n>`` and removed after its test (``libvirt_domains``).
"""

from __future__ import annotations

import asyncio
import subprocess
import time

import pytest

from .libvirtd_fixture import URI, require_libvirt_python

require_libvirt_python()  # a collection error that says how to install it, never a skip

from balloonlab import builtin_spec, format_dommemstat, libvirt_view  # noqa: E402
from balloonlab.model.period import POLLING_PROPERTY  # noqa: E402
from balloonlab.domain import with_changes  # noqa: E402
from balloonlab.model.errors import (BalloonNotFound, CommandError, LaunchError,  # noqa: E402
                               MonitorError)
from balloonlab.libvirt import LibvirtGuest, agent_root  # noqa: E402

pytestmark = pytest.mark.qemu

#: rss is read from /proc by balloonlab and by libvirt at different moments, and a booting
#: guest's QEMU keeps touching pages: libvirt's rss must lie between balloonlab's reads just
#: before and just after virsh ran, give or take this much. Every other line matches exactly.
RSS_TOLERANCE_KIB = 256


@pytest.fixture
def lv_spec(builtin_ready, libvirt_domains):
    """Built-in guest specs with this session's test names: ``lv_spec(period_s=2)``."""
    def make(**kwargs):
        return builtin_spec(libvirt_domains(), **kwargs)
    return make


def virsh(*args: str, check: bool = True) -> str:
    done = subprocess.run(["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {done.stderr}")
    return done.stdout


async def avirsh(*args: str, check: bool = True) -> str:
    return await asyncio.to_thread(virsh, *args, check=check)


def domain_names() -> set[str]:
    return set(virsh("list", "--all", "--name").split())


async def set_period_behind_libvirts_back(guest: LibvirtGuest, seconds: int) -> None:
    """Change the live period with raw QMP, so libvirt's live XML keeps the old value."""
    await guest.link.qmp("qom-set", {"path": await guest.balloon.path(), "property": POLLING_PROPERTY,
                                     "value": seconds})


async def wait_stats(guest: LibvirtGuest) -> None:
    await guest.balloon.wait_for_stats(timeout_s=60)


# ----------------------------------------------------------------------------- period rules

async def test_launch_applies_period_at_start(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        settings = []
        guest.balloon.add_setting_listener(lambda kind, value: settings.append((kind, value)))
        # The sampler's contract.
        assert guest.backend == "libvirt" and guest.name == spec.name and guest.alive
        assert guest.balloon.period_s is None and guest.balloon.target is None
        assert guest.rss_bytes() > 10 << 20
        # libvirt's start set the period before balloonlab did anything: QEMU says 2 ...
        assert await guest.balloon.get_period() == 2
        assert guest.balloon.period_s == 2
        # ... and so does libvirt's own record (a libvirt-only handle reads the live XML).
        other = await LibvirtGuest.attach(spec.name, stats_via="libvirt")
        assert await other.balloon.get_period() == 2
        await other.close()
        assert settings == [] and guest.alive  # attach by default sets nothing, closes nothing
        meta = await guest.metadata()
        assert meta["backend"] == "libvirt" and meta["stats_via"] == "qmp" and meta["origin"] == "launched"
        assert meta["persistent"] is False and meta["pid"] == guest.pid and meta["qemu_version"].startswith("7.")
        assert "<stats period='2'/>" in meta["domain_xml"]
        assert spec.name in domain_names()
    finally:
        assert await guest.shutdown()  # QEMU stopped on SIGTERM
    assert not guest.alive
    assert spec.name not in domain_names()  # transient: gone with its QEMU
    assert not (agent_root() / spec.name).exists()


async def test_attach_sets_period_only_when_running(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        await set_period_behind_libvirts_back(guest, 5)
        left = await LibvirtGuest.attach(spec.name, set_period=False)  # asked to leave it
        assert await left.balloon.get_period() == 5
        await left.close()

        await asyncio.to_thread(guest.link.dom.suspend)
        paused = await LibvirtGuest.attach(spec.name)  # the default, as Guest.attach: set_period=True
        assert await paused.status() == "paused"
        assert await guest.balloon.get_period() == 5  # paused: unchanged
        await paused.close()
        await asyncio.to_thread(guest.link.dom.resume)

        running = await LibvirtGuest.attach(spec.name)
        assert await guest.balloon.get_period() == 2  # running: the XML's period
        assert running.balloon.period_s == 2 and running.warnings == []
        await running.close()
        assert guest.alive
    finally:
        await guest.shutdown()


async def test_reconnect_keeps_a_live_change(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        await guest.balloon.set_period(7)  # through libvirt's API
        again = await LibvirtGuest.reconnect(spec.name)
        assert again.period_at_connect == 7 and await again.balloon.get_period() == 7
        assert again.origin == "reconnected"
        await again.close()
        # Even a change libvirt does not know about (its live XML still says 7) survives.
        await set_period_behind_libvirts_back(guest, 9)
        again = await LibvirtGuest.reconnect(spec.name)
        assert again.period_at_connect == 9
        await again.close()
        assert await guest.balloon.get_period() == 9
    finally:
        await guest.shutdown()


# ----------------------------------------------------------------------------- statistics

def _parse_dommemstat(text: str) -> list[tuple[str, int]]:
    rows = []
    for line in text.strip().splitlines():
        name, value = line.split()
        rows.append((name, int(value)))
    return rows


async def test_libvirt_view_equals_virsh_dommemstat(lv_spec):
    # period 2: one report per last_update value, so equal last_update means the same report.
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False, stats_via="qmp")
    try:
        await wait_stats(guest)
        for _attempt in range(20):
            stats = await guest.balloon.read_stats()
            ours = _parse_dommemstat(format_dommemstat(libvirt_view(stats, guest.rss_bytes())))
            theirs = _parse_dommemstat(await avirsh("dommemstat", spec.name))
            rss_after = guest.rss_bytes() // 1024
            if dict(ours)["last_update"] == dict(theirs)["last_update"]:
                break
            await asyncio.sleep(0.3)
        else:
            pytest.fail("balloonlab and virsh never read the same last_update in 20 tries")
        assert [name for name, _ in ours] == [name for name, _ in theirs]  # same lines, same order
        assert len(ours) == 13
        for (name, mine), (_, virsh_value) in zip(ours, theirs, strict=True):
            if name == "rss":
                low, high = sorted((mine, rss_after))
                assert low - RSS_TOLERANCE_KIB <= virsh_value <= high + RSS_TOLERANCE_KIB, (
                    mine, virsh_value, rss_after)
            else:
                assert mine == virsh_value, (name, mine, virsh_value)
    finally:
        await guest.shutdown()


async def test_stats_via_libvirt_are_qmp_stats_in_whole_kib(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False, stats_via="qmp")
    plain = await LibvirtGuest.attach(spec.name, stats_via="libvirt")
    try:
        assert (await plain.metadata())["stats_via"] == "libvirt"
        await wait_stats(guest)
        for _attempt in range(20):
            exact = await guest.balloon.read_stats()
            kib = await plain.balloon.read_stats(query_actual=False)  # actual comes anyway
            if exact.last_update == kib.last_update:
                break
            await asyncio.sleep(0.3)
        else:
            pytest.fail("the two reads never saw the same last_update")
        assert kib.new and kib.actual == exact.actual
        assert set(kib.stats) == {k for k, v in exact.stats.items() if v is not None}
        for name, value in kib.stats.items():
            counts = name in ("major_faults", "minor_faults", "htlb_pgalloc", "htlb_pgfail")
            assert value == (exact[name] if counts else exact[name] // 1024 * 1024), name
        assert plain.balloon.last_rss > 10 << 20
        again = await plain.balloon.read_stats()
        assert again.new == (again.last_update != kib.last_update)  # Balloon's classification
    finally:
        await plain.close()
        await guest.shutdown()


# ----------------------------------------------------------------------------- target, events

async def test_set_target_moves_actual_and_libvirt_sends_balloon_change(lv_spec):
    spec = lv_spec(period_s=1)
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        await wait_stats(guest)
        events, settings, tracked = [], [], []
        guest.balloon.add_listener(events.append)
        guest.balloon.add_listener(lambda change: tracked.append(guest.balloon.actual))
        guest.balloon.add_setting_listener(lambda kind, value: settings.append((kind, value)))
        assert await guest.balloon.query_actual() == 512 << 20
        with pytest.raises(ValueError, match="above the guest's memory"):
            await guest.balloon.set_target("1G")
        assert await guest.balloon.set_target("256M") == 256 << 20
        assert settings == [("target", 256 << 20)] and guest.balloon.target == 256 << 20
        result = await guest.balloon.wait_for_actual(timeout_s=60)
        assert result.reached, result
        for _ in range(50):  # QEMU rate-limits BALLOON_CHANGE; the last one may trail a little
            if events and abs(events[-1].actual - (256 << 20)) <= 1 << 20:
                break
            await asyncio.sleep(0.1)
        assert events, "no BALLOON_CHANGE came through libvirt's callback"
        assert abs(events[-1].actual - (256 << 20)) <= 1 << 20
        assert all(e.actual % 1024 == 0 for e in events)  # libvirt reports KiB
        assert tracked == [e.actual for e in events]  # each event had updated balloon.actual already
        stats = await guest.read_stats()
        assert abs(stats.actual - (256 << 20)) <= 1 << 20
        assert "actual 262144" in await avirsh("dommemstat", spec.name)
    finally:
        await guest.shutdown()


async def test_builtin_guest_agent_works_under_libvirt(lv_spec):
    spec = lv_spec(period_s=1)
    guest = await LibvirtGuest.launch(spec)  # connects the agent (port 1 got a socket path)
    try:
        assert guest.has_agent and guest.agent_socket == str(agent_root() / spec.name / "agent.sock")
        before = (await guest.read_stats())["free_memory"]
        await guest.workload.hold("64M")
        for _ in range(50):
            stats = await guest.read_stats()
            if stats["free_memory"] < before - (48 << 20):
                break
            await asyncio.sleep(0.2)
        else:
            pytest.fail("holding 64 MiB in the guest never showed in its stats")
    finally:
        await guest.shutdown()
    assert not (agent_root() / spec.name).exists()


# ----------------------------------------------------------------------------- failures

async def test_domain_destroyed_mid_use(lv_spec):
    spec = lv_spec(period_s=1)
    guest = await LibvirtGuest.launch(spec, agent=False, stats_via="qmp")
    plain = await LibvirtGuest.attach(spec.name, stats_via="libvirt")
    try:
        await guest.read_stats()
        await plain.read_stats()
        await avirsh("destroy", spec.name)
        assert not guest.alive and not plain.alive  # QEMU's process is gone at once
        deadline = time.monotonic() + 10  # libvirt's lifecycle event follows asynchronously
        while (guest.link.stopped is None or plain.link.stopped is None) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert guest.link.stopped is not None and plain.link.stopped is not None
        for handle in (guest, plain):
            with pytest.raises(MonitorError) as info:
                await handle.read_stats()
            text = str(info.value)
            assert "Domain not found" in text or "domain is not running" in text, text
    finally:
        await plain.close()
        await guest.close()
    assert spec.name not in domain_names()


async def test_libvirt_errors_keep_libvirts_message(lv_spec):
    missing = lv_spec().name
    with pytest.raises(MonitorError, match=f"Domain not found: no domain with matching name '{missing}'"):
        await LibvirtGuest.attach(missing)

    spec = lv_spec(model="none")
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        with pytest.raises(BalloonNotFound, match="No memory balloon device configured"):
            await guest.balloon.set_period(3)  # libvirt's own refusal
        with pytest.raises(BalloonNotFound, match="No memory balloon device configured"):
            await guest.read_stats()
        with pytest.raises(BalloonNotFound):
            await guest.balloon.set_target("256M")
    finally:
        await guest.shutdown()

    guest = await LibvirtGuest.launch(lv_spec(period_s=2), agent=False)
    try:
        with pytest.raises(ValueError, match="C int"):
            await guest.balloon.set_period(2**31)
        with pytest.raises(CommandError, match="cannot set memory higher than max memory") as info:
            await guest.link.set_memory(4 << 30)
        assert info.value.command == "virDomainSetMemoryFlags" and info.value.error_class == "INVALID_ARG"
        with pytest.raises(CommandError) as info:  # QEMU's own error, through the passthrough
            await guest.link.qmp("qom-get", {"path": "/machine/peripheral/nope", "property": "x"})
        assert info.value.error_class == "DeviceNotFound"
    finally:
        await guest.shutdown()
    with pytest.raises(ValueError, match="stats_via"):
        await LibvirtGuest.attach("whatever", stats_via="bogus")


@pytest.mark.parametrize("persistent", [False, True])
async def test_failed_launch_leaves_nothing(lv_spec, persistent):
    spec = with_changes(lv_spec(), kernel="/nonexistent/balloonlab/vmlinuz")
    with pytest.raises(LaunchError, match="/nonexistent/balloonlab/vmlinuz"):
        await LibvirtGuest.launch(spec, persistent=persistent)
    assert spec.name not in domain_names()
    assert not (agent_root() / spec.name).exists()


async def test_name_clash_refused_without_harming_the_running_domain(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, agent=False)
    try:
        for persistent in (False, True):
            with pytest.raises(LaunchError, match="already exists"):
                await LibvirtGuest.launch(spec, persistent=persistent)
        assert guest.alive and (agent_root() / spec.name / "agent.sock").exists()
        assert await guest.balloon.get_period() == 2
    finally:
        await guest.shutdown()


async def test_persistent_launch(lv_spec):
    spec = lv_spec(period_s=2)
    guest = await LibvirtGuest.launch(spec, persistent=True, agent=False)
    assert guest.persistent and await guest.balloon.get_period() == 2
    await guest.close()  # stops it; the definition stays
    assert spec.name in domain_names() and "shut off" in await avirsh("domstate", spec.name)
    again = await LibvirtGuest.launch(lv_spec(period_s=2), persistent=True, agent=False)
    assert await again.shutdown(undefine=True)
    assert again.name not in domain_names()
    await avirsh("undefine", spec.name)


# ----------------------------------------------------------------------------- with the sampler
async def test_sampler_records_libvirt_and_qmp_guests_in_one_run_and_marks_a_destroyed_domain(
        lv_spec, spec, tmp_path):
    from balloonlab import Guest, Sampler, load_run
    lv = await LibvirtGuest.launch(lv_spec(period_s=1), agent=False, stats_via="libvirt")
    qmp = await Guest.launch(spec(period_s=1))
    try:
        async with Sampler(run_dir=tmp_path / "run", flush_interval_s=1) as sampler:
            await sampler.add(lv)
            await sampler.add(qmp)
            deadline = time.monotonic() + 30
            while min(s.samples for s in sampler.states().values()) < 3:
                assert time.monotonic() < deadline, sampler.states()
                await asyncio.sleep(0.2)
            await avirsh("destroy", lv.name)
            while sampler.states()[lv.name].state != "dead":
                assert time.monotonic() < deadline + 15, "the destroyed domain was not marked dead"
                await asyncio.sleep(0.2)
            kept = int((sampler.frame()["guest"] == lv.name).sum())
            before = sampler.states()[qmp.name].samples
            while sampler.states()[qmp.name].samples < before + 2:  # the other guest goes on
                assert time.monotonic() < deadline + 30
                await asyncio.sleep(0.2)
        run = load_run(tmp_path / "run")
        assert int((run.samples["guest"] == lv.name).sum()) == kept >= 3
        assert run.metadata["guests"][lv.name]["backend"] == "libvirt"
        assert run.metadata["guests"][lv.name]["stats_via"] == "libvirt"
        assert run.metadata["guests"][qmp.name]["backend"] == "qmp"
        lv_rows = run.samples[run.samples["guest"] == lv.name]
        assert (lv_rows["total_memory"] % 1024 == 0).all()  # memoryStats() speaks whole KiB
        died = run.events[(run.events["guest"] == lv.name) & run.events["kind"].isin(["error", "shutdown"])]
        assert len(died) == 1
    finally:
        await qmp.shutdown()
        await lv.close()
