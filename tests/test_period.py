"""The statistics polling period with libvirt's semantics, on real QEMU:
launch sets it before the vCPUs run, attach only when running, reconnect never."""

from __future__ import annotations

import dataclasses

import pytest

from balloonlab import BalloonLabWarning, CommandError, Guest

from .qemu_helpers import foreign_qemu
from .test_discovery import domain_xml


def xml_with_period(period: int) -> str:
    return domain_xml("virtio", "balloon0").replace("</memballoon>", f"<stats period='{period}'/></memballoon>")


@pytest.mark.parametrize("bad, error", [(True, TypeError), (1.5, TypeError), ("5", TypeError),
                                        (-1, ValueError), (2**32, ValueError)])
async def test_bad_period_is_refused_before_qemu_sees_it(bad, error):
    with foreign_qemu("virtio-balloon-pci,id=balloon0") as sock:
        guest = await Guest.attach(sock, domain_xml("virtio", "balloon0"))
        try:
            await guest.balloon.path()
            before = guest.monitor.round_trips
            with pytest.raises(error, match="period"):
                await guest.balloon.set_period(bad)
            assert guest.monitor.round_trips == before
        finally:
            await guest.close()


async def test_qemu_own_period_errors_surface_as_command_error():
    with foreign_qemu("virtio-balloon-pci,id=balloon0") as sock:
        guest = await Guest.attach(sock)
        try:
            path = await guest.balloon.path()
            with pytest.raises(CommandError) as err:
                await guest.monitor.execute("qom-set", {"path": path, "property": "guest-stats-polling-interval",
                                                        "value": -1})
            assert err.value.error_class == "GenericError"
            assert "greater than zero" in err.value.desc
            await guest.balloon.set_period(2**32 - 1)  # the largest value QEMU takes
            assert await guest.balloon.get_period() == 2**32 - 1
            await guest.balloon.set_period(0)  # 0 disables polling
            assert await guest.balloon.get_period() == 0
        finally:
            await guest.close()


async def test_attach_to_paused_vm_leaves_period_alone():
    with foreign_qemu("virtio-balloon-pci,id=balloon0", paused=True) as sock:
        guest = await Guest.attach(sock, xml_with_period(7))
        try:
            assert await guest.status() == "prelaunch"
            assert await guest.balloon.get_period() == 0
        finally:
            await guest.close()


async def test_attach_to_running_vm_sets_period_from_xml():
    with foreign_qemu("virtio-balloon-pci,id=balloon0", paused=False) as sock:
        guest = await Guest.attach(sock, xml_with_period(7))
        try:
            assert await guest.status() == "running"
            assert await guest.balloon.get_period() == 7
        finally:
            await guest.close()


async def test_launch_sets_period_from_xml(spec):
    async with await Guest.launch(spec(period_s=3)) as guest:
        assert await guest.balloon.get_period() == 3
        assert guest.warnings == []


async def test_period_failure_at_launch_is_a_recorded_warning_not_a_failed_launch(spec):
    bad = spec(period_s=3)
    bad = dataclasses.replace(bad, memballoon=dataclasses.replace(bad.memballoon, period_s=2**32))
    with pytest.warns(BalloonLabWarning, match="could not set the balloon stats period"):
        guest = await Guest.launch(bad)
    async with guest:
        assert await guest.status() == "running"
        assert len(guest.warnings) == 1 and "4294967296" in guest.warnings[0]
        assert await guest.balloon.get_period() == 0


async def test_period_sequence_start_live_change_reconnect_unchanged(spec):
    guest = await Guest.launch(spec(period_s=2), detached=True)
    assert await guest.balloon.get_period() == 2  # from the XML at launch
    await guest.balloon.set_period(9)  # a live change
    await guest.close()  # detached: keeps running, as after a notebook kernel restart
    again = await Guest.reconnect(guest.name)
    try:
        assert again.spec.period_s == 2  # the XML still says 2...
        assert again.period_at_connect == 9  # ...but reconnect did not reset the live value
        assert await again.balloon.get_period() == 9
    finally:
        await again.shutdown()
