"""The virtio balloon over QMP: QOM discovery, the polling period, guest-stats, targets, events.

:class:`Balloon` implements :class:`~balloonlab.model.balloon.BalloonBase`'s primitives with
QMP commands over any :class:`~balloonlab.qemu.transport.QMPTransport` (balloonlab's own
:class:`~balloonlab.qemu.monitor.Monitor`, or libvirt's QMP passthrough). It finds the device
once per connection (:mod:`balloonlab.qemu.discovery`) and follows ``BALLOON_CHANGE`` and
``RESET`` events. The launch / attach / reconnect rules for the period live in
:mod:`balloonlab.qemu.guest`.
"""

from __future__ import annotations

import time

from typing import TYPE_CHECKING

from balloonlab.model.balloon import BalloonBase, Method
from balloonlab.model.period import POLLING_PROPERTY
from balloonlab.model.stats import BalloonStats, parse_guest_stats
from balloonlab.qemu.discovery import find_balloon
from balloonlab.qemu.transport import QMPEvent, QMPTransport

if TYPE_CHECKING:
    from balloonlab.domain import MemballoonSpec


class Balloon(BalloonBase):
    """The balloon device of one guest, over one QMP connection.

    :param monitor: the guest's QMP connection (discovery is cached on it).
    :param spec: the domain XML's ``<memballoon>``, when known (picks the QOM type).
    :param max_bytes: the guest's memory size (``<memory>``), the highest target.
    """

    def __init__(self, monitor: QMPTransport, spec: MemballoonSpec | None = None, *,
                 max_bytes: int | None = None) -> None:
        super().__init__(max_bytes=max_bytes)
        self.monitor = monitor
        self.spec = spec
        monitor.add_event_handler(self._on_event)

    async def path(self, method: Method = "auto") -> str:
        """The device's QOM path (cached per connection; see :mod:`balloonlab.qemu.discovery`).

        :raises BalloonNotFound: no balloon device (the failure is cached too).
        """
        return await find_balloon(self.monitor, self.spec, method=method)

    async def get_period(self) -> int:
        """The live statistics polling period in seconds (0: polling off)."""
        self.period_s = int(await self.monitor.execute(
            "qom-get", {"path": await self.path(), "property": POLLING_PROPERTY}))
        return self.period_s

    async def query_actual(self) -> int:
        """``query-balloon``: the guest's memory after ballooning, in bytes."""
        reply = await self.monitor.execute("query-balloon")
        self.actual = int(reply["actual"])
        return self.actual

    async def read_report(self, *, query_actual: bool = True) -> BalloonStats:
        """``qom-get guest-stats`` (+ ``query-balloon``): the guest's last report, unclassified."""
        resets, reset_time = self.resets, self.last_reset_time
        path = await self.path()
        # The read's time is when the request left, not when the reply came: the report was
        # made before it, and under TCG QEMU may answer tens of ms late (its main loop waits for
        # the lock the vCPU holds), which would skew rates computed over read times.
        sent = time.time()
        reply = await self.monitor.execute("qom-get", {"path": path, "property": "guest-stats"})
        actual = await self.query_actual() if query_actual else self.actual
        return parse_guest_stats(reply, actual=actual, read_time=sent, resets=resets, reset_time=reset_time)

    async def status(self) -> str:
        """``query-status``: QEMU's run state."""
        return str((await self.monitor.execute("query-status"))["status"])

    async def _write_period(self, seconds: int) -> None:
        await self.monitor.execute("qom-set", {"path": await self.path(),
                                               "property": POLLING_PROPERTY, "value": seconds})

    async def _write_target(self, target: int) -> None:
        await self.path()  # a guest without a balloon says so here, not as DeviceNotActive
        await self.monitor.execute("balloon", {"value": target})

    def _on_event(self, event: QMPEvent) -> None:
        if event.name == "BALLOON_CHANGE":
            self._balloon_changed(int(event.data["actual"]), event.time)
        elif event.name == "RESET":
            self._guest_reset(event.time)
