"""Finding the balloon in QEMU's object tree, on real QEMU: every x86 model, pc and q35,
with and without an id, no balloon at all; round trips counted to prove the cache."""

from __future__ import annotations

import pytest

from balloonlab import BalloonNotFound, Guest

from .qemu_helpers import foreign_qemu

MODELS = {
    "virtio": "virtio-balloon-pci",
    "virtio-transitional": "virtio-balloon-pci-transitional",
    "virtio-non-transitional": "virtio-balloon-pci-non-transitional",
}


def domain_xml(model: str | None, alias: str | None = None, address: str = "") -> str:
    balloon = "<memballoon model='none'/>" if model is None else (
        f"<memballoon model='{model}'>{f'<alias name={alias!r}/>' if alias else ''}{address}</memballoon>")
    return (f"<domain type='qemu'><name>ext</name><memory unit='MiB'>128</memory>"
            f"<devices>{balloon}</devices></domain>")


@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("with_id", [True, False], ids=["id", "anon"])
async def test_discovery_finds_each_model_by_the_fastest_path(machine, model, with_id):
    driver = MODELS[model] + (",id=balloon0" if with_id else "")
    with foreign_qemu(driver, machine=machine) as sock:
        guest = await Guest.attach(sock, domain_xml(model, "balloon0" if with_id else None))
        try:
            before = guest.monitor.round_trips
            path = await guest.balloon.path()
            cost = guest.monitor.round_trips - before
            if with_id:
                assert path == "/machine/peripheral/balloon0"
                assert cost <= 2  # one qom-list of /machine/peripheral + the property check
            else:
                assert path.startswith("/machine/peripheral-anon/device[")
                assert cost == 3  # peripheral, peripheral-anon, property check
            assert await guest.monitor.execute("qom-get", {"path": path, "property": "type"}) == MODELS[model]
            # Cached for the life of the connection: no more round trips.
            spent = guest.monitor.round_trips
            assert await guest.balloon.path() == path
            assert guest.monitor.round_trips == spent
        finally:
            await guest.close()


async def test_recursive_walk_finds_the_same_device_with_many_more_round_trips():
    with foreign_qemu("virtio-balloon-pci,id=balloon0") as sock:
        guest = await Guest.attach(sock, domain_xml("virtio", "balloon0"))
        try:
            before = guest.monitor.round_trips
            walked = await guest.balloon.path(method="walk")
            walk_cost = guest.monitor.round_trips - before
            assert await guest.monitor.execute("qom-get", {"path": walked, "property": "type"}) == "virtio-balloon-pci"
            assert walk_cost > 20  # the whole tree, not one listing
        finally:
            await guest.close()


async def test_virtio_mmio_balloon_on_microvm_is_found_by_its_device_type():
    with foreign_qemu("virtio-balloon-device", machine="microvm") as sock:
        xml = domain_xml("virtio", address="<address type='virtio-mmio'/>")
        guest = await Guest.attach(sock, xml)
        try:
            path = await guest.balloon.path()
            assert await guest.monitor.execute("qom-get", {"path": path, "property": "type"}) == "virtio-balloon-device"
        finally:
            await guest.close()


async def test_no_balloon_fails_once_then_from_cache_and_afresh_on_a_new_connection():
    with foreign_qemu() as sock:
        guest = await Guest.attach(sock, domain_xml("virtio"))
        try:
            with pytest.raises(BalloonNotFound) as first:
                await guest.balloon.path()
            assert "/machine/peripheral/balloon0" in first.value.searched
            assert "/machine/peripheral-anon" in first.value.searched
            assert any("recursive walk" in s for s in first.value.searched)
            spent = guest.monitor.round_trips
            assert spent > 3
            with pytest.raises(BalloonNotFound, match="cached"):
                await guest.balloon.path()
            assert guest.monitor.round_trips == spent  # the failed search is not repeated
        finally:
            await guest.close()
        again = await Guest.attach(sock, domain_xml("virtio"))
        try:
            with pytest.raises(BalloonNotFound):
                await again.balloon.path()
            assert again.monitor.round_trips > 3  # a new connection searches afresh
        finally:
            await again.close()


async def test_target_on_a_guest_without_balloon_says_so():
    with foreign_qemu() as sock:
        guest = await Guest.attach(sock)
        try:
            with pytest.raises(BalloonNotFound):
                await guest.balloon.set_target("64M")
        finally:
            await guest.close()
