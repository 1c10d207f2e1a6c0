"""The Debian guest through libvirt: the domain XML ``balloonlab guest build --distro debian``
writes boots under libvirtd as it is (its ``<disk>`` and its qemu-guest-agent ``<channel>``
without a path, which libvirt places and connects to itself), and the guest's own view and
workloads go through libvirt's agent passthrough (``qemuAgentCommand``), as they would for a
domain on a remote host."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from .libvirtd_fixture import require_libvirt_python

require_libvirt_python()

from balloonlab.image import debian_domain, find_debian_image  # noqa: E402
from balloonlab.libvirt import LibvirtGuest  # noqa: E402
from balloonlab.model.errors import AgentUnavailable  # noqa: E402

pytestmark = pytest.mark.qemu
MiB = 1 << 20


@pytest.fixture
def libvirt_folder():
    """A folder libvirt's QEMU (user libvirt-qemu) can reach, unlike pytest's 0700 tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="blv-debian-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def test_the_debian_domain_boots_under_libvirt_and_its_agent_answers_through_libvirt(libvirt_domains,
                                                                                          libvirt_folder):
    image = find_debian_image()
    if image is None:
        pytest.fail("the Debian guest image is not built: run `make test` (or `balloonlab guest build --distro "
                    "debian`) first", pytrace=False)
    xml = debian_domain(image, libvirt_folder, name=libvirt_domains(), memory="768M", period_s=2)
    guest = await LibvirtGuest.launch(xml)
    try:
        assert guest.has_guest_agent and guest.has_agent
        stats = await guest.balloon.wait_for_stats(timeout_s=120)
        assert stats["total_memory"] is not None
        deadline = time.monotonic() + 120
        while True:  # the agent starts a few seconds after the balloon's first report
            try:
                view = await guest.read_guest_view()
                break
            except AgentUnavailable:
                assert time.monotonic() < deadline, "qemu-guest-agent never answered through libvirt"
                await asyncio.sleep(1)
        assert view is not None and view.source == "qga"
        report = await guest.balloon.read_stats()
        assert view.columns["guest_mem_total"] == report["total_memory"]  # the same totalram, both ways
        assert view.columns["guest_swap_total"] == 256 * MiB - 4096
        assert await guest.workload.alloc("64M") == 64 * MiB  # a perl holder, through guest-exec via libvirt
        anon = (await guest.read_guest_view()).columns["guest_anon_pages"]
        assert anon > 64 * MiB
        assert await guest.workload.free() == 0
        assert (await guest.read_guest_view()).columns["guest_anon_pages"] < anon - 60 * MiB
    finally:
        await guest.shutdown()
