"""What the dashboard's panels read: parameters, messages and one guest's observable state.

As in mpl-interactions, parameters and live state live in small plain classes, apart from
the widgets: :class:`LaunchParams` (what to launch), :class:`PatternParams` (a workload
pattern), :class:`Message` (a panel's status line; :func:`describe_error` turns a library
error into one, never a traceback) and :class:`GuestPanelState` (one guest's handle, status,
last message per panel and observers). The numbers a panel shows (actual, target, period,
held) are read from the library's own objects, not copied. The actions that change this
state live in :mod:`balloonlab.widgets.controller`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from balloonlab.blocking import SyncGuest, SyncSampler
from balloonlab.domain import DiskSpec, DomainSpec, load_domain_xml, with_changes
from balloonlab.experiments.schedule import Schedule
from balloonlab.image.builtin import builtin_spec
from balloonlab.model.errors import BalloonLabError, DomainXMLError, LaunchError
from balloonlab.model.units import parse_size
from balloonlab.qemu.guest import Guest

log = logging.getLogger(__name__)
Level = Literal["info", "ok", "warning", "error"]
#: Panels of a guest; each shows its own last message.
CHANNELS = ("launcher", "balloon", "workload")


@dataclass(frozen=True)
class Message:
    """One line for a panel's status, plus optional details (e.g. QEMU's output tail)."""

    text: str
    level: Level = "info"
    details: str = ""


def describe_error(exc: BaseException) -> Message:
    """A one-line message for an error from the library (no traceback).

    :param exc: the error an action raised.
    :returns: an ``error`` message; a multi-line error keeps its first line as the text and
        the rest (QEMU's output for a :class:`LaunchError`) as the details.
    """
    if isinstance(exc, LaunchError):
        text = exc.message + (f" (QEMU exit code {exc.exitcode})" if exc.exitcode is not None else "")
        return Message(text, "error", exc.output.strip())
    if isinstance(exc, DomainXMLError):
        return Message(f"invalid domain XML: {exc}", "error")
    if isinstance(exc, (BalloonLabError, ValueError, TypeError, OSError)):
        text = str(exc).strip() or type(exc).__name__
        first, _, rest = text.partition("\n")
        return Message(first, "error", rest.strip())
    log.debug("unexpected error in a dashboard action", exc_info=exc)
    return Message(f"{type(exc).__name__}: {exc}", "error")


@dataclass
class LaunchParams:
    """What the launcher panel would launch.

    :param source: ``"builtin"`` (balloonlab's test guest, built from the fields below) or
        ``"xml"`` (a libvirt domain XML file; its memory, vCPUs and balloon options apply).
    :param image_path: with ``"xml"``: a disk image replacing the XML's first disk.
    """

    name: str = "guest-1"
    source: Literal["builtin", "xml"] = "builtin"
    xml_path: str = ""
    image_path: str = ""
    memory: str = "512M"
    vcpus: int = 1
    period_s: int = 1
    autodeflate: bool = False
    free_page_reporting: bool = False

    def to_spec(self) -> DomainSpec:
        """The domain to launch.

        :raises ValueError, TypeError: a bad field (the message says which).
        :raises DomainXMLError: the XML file is not a valid domain.
        :raises GuestImageError: the built-in image is not built yet.
        """
        if self.source == "builtin":
            return builtin_spec(self.name, memory=self.memory, vcpus=self.vcpus, period_s=self.period_s,
                                autodeflate=self.autodeflate or None,
                                free_page_reporting=self.free_page_reporting or None)
        if self.source != "xml":
            raise ValueError(f"source must be 'builtin' or 'xml', got {self.source!r}")
        if not self.xml_path.strip():
            raise ValueError("give the path of a libvirt domain XML file")
        path = Path(self.xml_path.strip()).expanduser()
        if not path.is_file():
            raise ValueError(f"domain XML file {path} does not exist")
        spec = load_domain_xml(path)
        image = self.image_path.strip()
        if image:
            if not Path(image).expanduser().is_file():
                raise ValueError(f"disk image {image} does not exist")
            fmt = "qcow2" if image.endswith(".qcow2") else "raw"
            first = (dataclasses.replace(spec.disks[0], source=image, format=fmt) if spec.disks
                     else DiskSpec(source=image, format=fmt, bus="virtio", target="vda"))
            spec = with_changes(spec, disks=(first, *spec.disks[1:]))
        return spec


@dataclass
class PatternParams:
    """A workload pattern for the workload panel (see :meth:`to_schedule`)."""

    kind: Literal["steps", "ramp", "sawtooth"] = "steps"
    low: str = "0"
    high: str = "192M"
    step_s: float = 3.0
    n_steps: int = 3
    cycles: int = 2

    def to_schedule(self) -> Schedule:
        """The workload :class:`~balloonlab.experiments.schedule.Schedule`.

        ``steps``: ``low`` up to ``high`` and back down in ``n_steps``, one every ``step_s``;
        ``ramp``: ``low`` to ``high`` in ``n_steps`` over ``n_steps * step_s``;
        ``sawtooth``: ``cycles`` ramps of ``n_steps`` steps, each ``(n_steps + 1) * step_s``.

        :raises ValueError: a bad size, count or duration.
        """
        low, high = parse_size(self.low), parse_size(self.high)
        if type(self.n_steps) is not int or self.n_steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {self.n_steps!r}")
        if self.kind == "steps":
            up = [low + (high - low) * i // self.n_steps for i in range(self.n_steps + 1)]
            return Schedule.steps(up + up[-2::-1], self.step_s, kind="workload")
        if self.kind == "ramp":
            return Schedule.ramp(low, high, self.step_s * self.n_steps, n_steps=self.n_steps, kind="workload")
        if self.kind == "sawtooth":
            if type(self.cycles) is not int or self.cycles < 1:
                raise ValueError(f"cycles must be an int >= 1, got {self.cycles!r}")
            return Schedule.sawtooth(low, high, self.step_s * (self.n_steps + 1), self.cycles,
                                     n_steps=self.n_steps, kind="workload")
        raise ValueError(f"pattern must be steps, ramp or sawtooth, got {self.kind!r}")


class GuestPanelState:
    """One guest as its panels see it: launch parameters, the guest once up, status, messages.

    Panels read this state and :meth:`observe` it; only
    :class:`~balloonlab.widgets.controller.GuestController`'s actions change it.

    :param params: what to launch (the launcher panel edits it).
    :param sampler: a sampler shared by the dashboard: a launched guest is added to it.

    Status: ``not launched``, ``launching``, ``running``, ``stopping``, ``stopped``,
    ``failed`` (launch failed), ``exited`` (QEMU went away by itself).
    """

    def __init__(self, params: LaunchParams | None = None, sampler: SyncSampler | None = None) -> None:
        self.params = params or LaunchParams()
        self.sampler = sampler
        self.status = "not launched"
        self.messages: dict[str, Message] = {}
        self._guest: Guest | None = None
        self._lock = threading.RLock()
        self._observers: list[Callable[[Self], None]] = []
        self._pattern: Future[Message] | None = None

    @property
    def name(self) -> str:
        """The guest's name (its runtime dir and its row in the frames)."""
        return self.params.name

    @property
    def guest(self) -> SyncGuest | None:
        """The running guest as a blocking handle, None before launch / after shutdown."""
        guest = self._guest
        return SyncGuest(guest) if guest is not None and self.status == "running" else None

    @property
    def memory_bytes(self) -> int | None:
        """The guest's memory (``<memory>``), the highest balloon target."""
        guest = self._guest
        return guest.spec.memory_bytes if guest is not None and guest.spec is not None else None

    @property
    def actual(self) -> int | None:
        """The balloon's ``actual`` as the library last saw it (query or BALLOON_CHANGE)."""
        return self._guest.balloon.actual if self._guest is not None else None

    @property
    def target(self) -> int | None:
        """The last balloon target set (None until one was)."""
        return self._guest.balloon.target if self._guest is not None else None

    @property
    def period_s(self) -> int | None:
        """The stats polling period as last read or set."""
        return self._guest.balloon.period_s if self._guest is not None else None

    @property
    def held(self) -> int | None:
        """Bytes the in-guest workload agent holds (None without an agent)."""
        guest = self._guest
        return guest.workload.held if guest is not None and guest.has_agent else None

    @property
    def pattern_running(self) -> bool:
        """True while a workload pattern plays."""
        return self._pattern is not None and not self._pattern.done()

    def message(self, channel: str) -> Message | None:
        """The last message for one panel (``launcher``, ``balloon``, ``workload``)."""
        return self.messages.get(channel)

    def observe(self, callback: Callable[[Self], None]) -> None:
        """Call ``callback(state)`` after any change (from whichever thread made it)."""
        self._observers.append(callback)

    def _say(self, channel: str, message: Message) -> None:
        self.messages[channel] = message
        self._changed()

    def _changed(self: Self) -> None:
        for callback in list(self._observers):
            try:
                callback(self)
            except Exception:  # a broken view must not break the guest's actions
                log.exception("dashboard view update failed")
