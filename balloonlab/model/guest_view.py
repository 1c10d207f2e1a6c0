"""The guest's own view of its memory: its /proc/meminfo and /proc/vmstat, read from the host.

The balloon's statistics are what the guest's balloon driver chooses to report, once a period;
/proc/meminfo is everything the guest kernel knows, at the moment it is read. Holding one
against the other is how a researcher trusts (or distrusts) the reports. For any guest with
qemu-guest-agent (QGA), a user's own image included, the host reads those files through the
agent's ``guest-file-open`` / ``guest-file-read`` / ``guest-file-close``, as oVirt's MOM does in
its GuestQemuAgent collector. Both backends reach the agent their own way (a unix socket for the
QMP backend, ``qemuAgentCommand`` through libvirt); this module is what they share: the file
protocol over any ``execute``, and the mapping of the files onto the frame's ``guest_*`` columns
(:data:`~balloonlab.model.schema.GUEST_VIEW_COLUMNS`).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from balloonlab.model.errors import AgentUnavailable, GuestAgentError
from balloonlab.model.hostfs import parse_meminfo, parse_vmstat

__all__ = ["AgentExecute", "GuestView", "read_agent_file", "read_guest_view", "view_columns"]

#: One guest-agent command: ``await execute("guest-file-open", {"path": ...})`` -> its ``return``.
AgentExecute = Callable[[str, dict[str, Any] | None], Awaitable[Any]]
#: A guest-file-read asks for this much: /proc/meminfo and /proc/vmstat are a few KiB, so one
#: read each (QGA caps a read at 48 MiB; base64 grows it by a third on the wire).
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True)
class GuestView:
    """One read of the guest's memory files.

    :param read_time: host wall clock (epoch s) when the read was sent.
    :param elapsed_s: how long it took (the two files are not read at one instant).
    :param columns: the frame's ``guest_*`` columns (bytes; vmstat counters as the kernel counts).
    :param source: ``"qga"`` (qemu-guest-agent) or ``"agent"`` (balloonlab's built-in agent).
    """

    read_time: float
    elapsed_s: float
    columns: dict[str, int]
    source: str


def view_columns(meminfo: str, vmstat: str = "") -> dict[str, int]:
    """``/proc/meminfo`` and ``/proc/vmstat`` text -> ``guest_*`` columns (the host frame's
    fields, prefixed: ``guest_mem_free``, ``guest_cached``, ``guest_pswpout``...)."""
    return {f"guest_{name}": value for name, value in (parse_meminfo(meminfo) | parse_vmstat(vmstat)).items()}


async def read_agent_file(execute: AgentExecute, path: str) -> bytes:
    """A whole guest file through the agent (open, read until eof, close).

    :raises GuestAgentError: the agent refused (no such file, guest-file-* commands disabled by
        the guest's ``--block-rpcs``: the message says which).
    :raises AgentUnavailable: no agent answered.
    """
    handle = await execute("guest-file-open", {"path": path, "mode": "r"})
    try:
        parts = []
        while True:
            got = await execute("guest-file-read", {"handle": handle, "count": _READ_CHUNK})
            parts.append(base64.b64decode(got.get("buf-b64", "")))
            if got.get("eof") or not got.get("count"):
                return b"".join(parts)
    finally:
        with contextlib.suppress(GuestAgentError, AgentUnavailable):
            await execute("guest-file-close", {"handle": handle})


async def read_guest_view(execute: AgentExecute) -> GuestView:
    """The guest's /proc/meminfo and /proc/vmstat as ``guest_*`` columns (meminfo first: it is
    the one held against the balloon's report, so its read time is the one recorded)."""
    read_time, started = time.time(), time.monotonic()
    meminfo = (await read_agent_file(execute, "/proc/meminfo")).decode(errors="replace")
    vmstat = (await read_agent_file(execute, "/proc/vmstat")).decode(errors="replace")
    return GuestView(read_time, time.monotonic() - started, view_columns(meminfo, vmstat), "qga")
