"""virtio-mem devices over QMP: what each holds, resizes, and waiting for the guest to follow.

A virtio-mem device (``-device virtio-mem-pci,memdev=...,requested-size=...``) offers the
guest up to its memory backend's size in blocks; the host asks for a size by setting the
device's ``requested-size`` property (``qom-set``), and the guest's driver plugs or unplugs
blocks until its ``size`` (plugged) equals it. ``query-memory-devices`` reports both per device
(with ``block-size``, ``max-size``, ``node``), and QEMU sends ``MEMORY_DEVICE_SIZE_CHANGE``
(``id``, ``size``) as the plugged size moves. QEMU refuses a requested size that is not a
multiple of the block size or above the backend's; balloonlab refuses them first, with what to
ask for instead, and refuses a new resize while the guest is still following the last one
(``wait=False`` then ``resize`` again) unless told to. A resize the guest does not follow
within its timeout ends in :class:`VirtioMemNotFollowed`, which says whether the guest has a
driver for the device at all (QEMU's ``x-query-virtio-status``: no ``DRIVER_OK`` means the
guest's virtio_mem driver never took the device).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from balloonlab.model.errors import BalloonLabError, CommandError
from balloonlab.model.units import format_size, parse_size
from balloonlab.qemu.transport import QMPEvent, QMPTransport

__all__ = ["VirtioMem", "VirtioMemDevice", "VirtioMemError", "VirtioMemNotFollowed", "ResizeResult"]

#: The QMP event QEMU sends as a memory device's plugged size changes.
SIZE_CHANGE_EVENT = "MEMORY_DEVICE_SIZE_CHANGE"
#: How QEMU names the virtio status bit a guest driver sets once it runs the device.
_DRIVER_OK = "VIRTIO_CONFIG_S_DRIVER_OK"


class VirtioMemError(BalloonLabError):
    """A virtio-mem request that cannot be right (the message says what to ask instead)."""


class VirtioMemNotFollowed(VirtioMemError):
    """The guest did not plug what was asked within the timeout.

    :param result: the resize as far as it went (``result.reached`` is False).
    """

    def __init__(self, message: str, result: ResizeResult) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class VirtioMemDevice:
    """One virtio-mem device as ``query-memory-devices`` reports it. Sizes in bytes.

    :param id: the device's id (its QOM path is ``/machine/peripheral/<id>``).
    :param size: what the guest has plugged now.
    :param requested: what the host asked for.
    :param max_size: the memory backend's size: the most the device can give.
    :param block_size: the granularity of plugging.
    :param node: the guest NUMA node it adds memory to.
    :param memdev: the QOM path of its memory backend.
    """

    id: str
    size: int
    requested: int
    max_size: int
    block_size: int
    node: int
    memdev: str

    @property
    def settled(self) -> bool:
        """True when the guest plugged what was asked."""
        return self.size == self.requested


@dataclass(frozen=True)
class ResizeResult:
    """How a resize went: the device before and after, and how long the guest took."""

    before: VirtioMemDevice
    after: VirtioMemDevice
    elapsed_s: float

    @property
    def reached(self) -> bool:
        """True when the guest plugged exactly what was asked."""
        return self.after.settled


class VirtioMem:
    """The virtio-mem devices of one guest, over one QMP connection.

    :param monitor: the guest's QMP connection.
    """

    def __init__(self, monitor: QMPTransport) -> None:
        self.monitor = monitor
        #: (host time, device id, plugged bytes) of every size change QEMU reported.
        self.changes: list[tuple[float, str, int]] = []
        self._waiters: list[asyncio.Event] = []
        monitor.add_event_handler(self._on_event)

    async def devices(self) -> list[VirtioMemDevice]:
        """Every virtio-mem device of the guest, as QEMU reports it now."""
        reply = await self.monitor.execute("query-memory-devices")
        return [_device(entry["data"]) for entry in reply if entry.get("type") == "virtio-mem"]

    async def device(self, device_id: str | None = None) -> VirtioMemDevice:
        """One device: ``device_id``, or the only one.

        :raises VirtioMemError: no such device, none at all, or several and no id given.
        """
        found = await self.devices()
        if not found:
            raise VirtioMemError("the guest has no virtio-mem device: give its domain XML a <memory "
                                 "model='virtio-mem'> (and <maxMemory>), e.g. builtin_spec(..., virtio_mem='256M')")
        if device_id is None:
            if len(found) > 1:
                raise VirtioMemError(f"the guest has {len(found)} virtio-mem devices "
                                     f"({', '.join(d.id for d in found)}): say which, device=...")
            return found[0]
        for dev in found:
            if dev.id == device_id:
                return dev
        raise VirtioMemError(f"no virtio-mem device {device_id!r} (the guest has {', '.join(d.id for d in found)})")

    async def resize(self, requested: int | str, *, device: str | None = None, wait: bool = True,
                     timeout_s: float = 60.0, force: bool = False) -> ResizeResult:
        """Ask the guest to plug (or unplug down to) ``requested`` bytes of a device.

        :param requested: bytes or a size like ``"256M"``: a multiple of the device's block
            size, at most its backend's size.
        :param device: the device id (needed when the guest has several).
        :param wait: wait until the guest plugged that much (``timeout_s`` at most).
        :param force: resize even while the guest is still following an earlier resize.
        :raises VirtioMemError: a size that is not a multiple of the block, above the device's
            size, or a resize while one is in progress (without ``force``).
        :raises VirtioMemNotFollowed: (with ``wait``) the guest had not plugged that much after
            ``timeout_s``; the message says whether it has a driver for the device.
        """
        goal = parse_size(requested)
        before = await self.device(device)
        if goal % before.block_size:
            below, above = goal - goal % before.block_size, goal - goal % before.block_size + before.block_size
            raise VirtioMemError(f"virtio-mem device {before.id}: {format_size(goal)} is not a multiple of its block "
                                 f"size {format_size(before.block_size)}; ask for {format_size(below)} or "
                                 f"{format_size(above)}")
        if goal > before.max_size:
            raise VirtioMemError(f"virtio-mem device {before.id}: {format_size(goal)} is above its size "
                                 f"{format_size(before.max_size)} (its memory backend); ask for at most that, or give "
                                 "the device a larger <size> in the domain XML")
        if not before.settled and not force:
            if await self.driver_ready(before.id) is False:  # waiting would not help
                raise VirtioMemError(f"virtio-mem device {before.id} has {format_size(before.requested)} asked and "
                                     f"{format_size(before.size)} plugged, and the guest has no driver for it "
                                     f"({self._no_driver_hint()}); pass force=True to change the request anyway")
            raise VirtioMemError(f"virtio-mem device {before.id} is still resizing (plugged {format_size(before.size)} "
                                 f"of the {format_size(before.requested)} asked): wait for it "
                                 "(virtio_mem.wait()) or pass force=True")
        started = time.monotonic()
        await self.monitor.execute("qom-set", {"path": f"/machine/peripheral/{before.id}",
                                               "property": "requested-size", "value": goal})
        after = await self.wait(before.id, timeout_s=timeout_s) if wait else await self.device(before.id)
        result = ResizeResult(before, after, time.monotonic() - started)
        if wait and not result.reached:
            raise VirtioMemNotFollowed(await self._not_followed(result), result)
        return result

    async def driver_ready(self, device_id: str) -> bool | None:
        """True when the guest's driver runs the device (virtio ``DRIVER_OK``), False when it
        does not, None when this QEMU cannot say (``x-query-virtio-status``, QEMU >= 7.2)."""
        try:
            reply = await self.monitor.execute("x-query-virtio-status",
                                               {"path": f"/machine/peripheral/{device_id}/virtio-backend"})
        except CommandError:  # an older QEMU, or a device it does not list: unknown
            return None
        statuses = reply.get("status", {}).get("statuses", []) if isinstance(reply, dict) else []
        return any(str(status).startswith(_DRIVER_OK) for status in statuses)

    @staticmethod
    def _no_driver_hint() -> str:
        return ("its virtio status lacks DRIVER_OK: load the virtio_mem module in the guest, or boot a kernel "
                "with CONFIG_VIRTIO_MEM")

    async def _not_followed(self, result: ResizeResult) -> str:
        after = result.after
        said = (f"virtio-mem device {after.id}: the guest did not follow the resize to {format_size(after.requested)}: "
                f"it plugged {format_size(after.size)} (from {format_size(result.before.size)}) in "
                f"{result.elapsed_s:.1f} s")
        ready = await self.driver_ready(after.id)
        if ready is False:
            return f"{said}; the guest has no driver for the device ({self._no_driver_hint()})"
        if ready and after.size > after.requested:
            return (f"{said}; its driver could not unplug more: the guest uses that memory, or it is not "
                    "movable (boot with memhp_default_state=online_movable)")
        return f"{said}; give it longer (timeout_s) or see the guest's kernel log"

    async def wait(self, device: str | None = None, *, timeout_s: float = 60.0) -> VirtioMemDevice:
        """Wait until the guest plugged what was asked of ``device`` (or ``timeout_s``
        passed); the device as it is then. Follows MEMORY_DEVICE_SIZE_CHANGE and confirms
        with ``query-memory-devices``."""
        deadline = time.monotonic() + timeout_s
        wake = asyncio.Event()
        self._waiters.append(wake)
        try:
            while True:
                wake.clear()
                now = await self.device(device)
                left = deadline - time.monotonic()
                if now.settled or left <= 0:
                    return now
                # A size change event, or a look every half second (a guest that plugs
                # nothing sends none).
                try:
                    await asyncio.wait_for(wake.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
        finally:
            self._waiters.remove(wake)

    def _on_event(self, event: QMPEvent) -> None:
        if event.name != SIZE_CHANGE_EVENT:
            return
        self.changes.append((event.time, str(event.data.get("id")), int(event.data.get("size", 0))))
        for waiter in self._waiters:
            waiter.set()


def _device(data: dict[str, Any]) -> VirtioMemDevice:
    return VirtioMemDevice(id=str(data["id"]), size=int(data["size"]), requested=int(data["requested-size"]),
                           max_size=int(data["max-size"]), block_size=int(data["block-size"]),
                           node=int(data["node"]), memdev=str(data["memdev"]))
