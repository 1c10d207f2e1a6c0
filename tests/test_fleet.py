"""Attaching many guests at once: bounded, all or nothing, against real (bare) QEMUs."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from balloonlab import Guest, MonitorError, attach_many

from .qemu_helpers import foreign_qemu

XML = ("<domain type='qemu'><name>ext</name><memory unit='MiB'>128</memory><devices>"
       "<memballoon model='virtio'><alias name='balloon0'/><stats period='2'/></memballoon></devices></domain>")


async def test_attach_many_connects_all_at_most_n_at_a_time_and_applies_the_period(monkeypatch):
    real, running, peak = Guest.attach, [0], [0]

    async def counting(*args, **kwargs):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        try:
            await asyncio.sleep(0.05)  # hold the slot, so overlapping attaches are seen
            return await real(*args, **kwargs)
        finally:
            running[0] -= 1
    monkeypatch.setattr(Guest, "attach", counting)
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(foreign_qemu("virtio-balloon-pci,id=balloon0", paused=False))
                   for _ in range(5)]
        guests = await attach_many(sockets, XML, names=[f"g{i}" for i in range(5)], concurrency=2)
        try:
            assert [g.name for g in guests] == ["g0", "g1", "g2", "g3", "g4"] and peak[0] == 2
            assert [await g.balloon.get_period() for g in guests] == [2] * 5  # running: attach set it
        finally:
            await asyncio.gather(*(g.close() for g in guests))


async def test_attach_many_is_all_or_nothing(tmp_path):
    with foreign_qemu("virtio-balloon-pci,id=balloon0") as good:
        dead = tmp_path / "nobody.sock"
        with pytest.raises(MonitorError):
            await attach_many([good, dead], XML, names=["ok", "dead"])
        # The one that attached was let go: its QMP socket takes a new client at once.
        again = await Guest.attach(good, XML, name="again")
        await again.close()
    with pytest.raises(ValueError, match="2 names for 1 sockets"):
        await attach_many([dead], XML, names=["a", "b"])
