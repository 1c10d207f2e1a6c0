"""The guest's own view of its memory, read through qemu-guest-agent (QGA).

The balloon's statistics are what the guest's virtio_balloon driver chooses to report, every
period; ``/proc/meminfo`` and ``/proc/vmstat`` are everything the guest kernel knows, at the
moment they are read. QGA gives the host that second view without a network: the agent reads
files in the guest on request (``guest-file-open`` / ``guest-file-read`` / ``guest-file-close``)
over a virtio-serial port named ``org.qemu.guest_agent.0``, whose host end is a QEMU chardev,
here a unix socket.

The protocol is QMP's JSON-lines command/reply format without QMP's greeting and capability
negotiation, and with one addition that makes a tiny client of its own worth having: the
channel has no session. Bytes the host wrote before the agent started, or replies to a client
that went away, can still be in the pipe. ``guest-sync-delimited`` resynchronises: the client
sends a 0xFF byte (it makes the agent's JSON parser drop any partial input), then the command
with a random id; the agent answers with a 0xFF byte and ``{"return": id}``, and everything
before that marker is stale. qemu.qmp's ``QMPClient`` can talk to QGA (``await_greeting`` and
``negotiate`` set to False) but reads every line as JSON, so that 0xFF marker breaks its reader:
it cannot do the sync, and without it a stale reply can be taken for the answer.

The socket is the ``<channel>`` balloonlab's launcher made from the domain XML
(``Guest.guest_agent_socket``); what is read through it, and how, is
:mod:`balloonlab.model.guest_view`'s, shared with the libvirt backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from pathlib import Path
from typing import Any

from balloonlab.domain import AGENT_CHANNEL
from balloonlab.model.errors import AgentUnavailable, GuestAgentError

__all__ = ["GuestAgent"]

_DELIMITER = b"\xff"


class GuestAgent:
    """A client of one guest's qemu-guest-agent socket (one command at a time).

    :param socket_path: the host end of the agent's virtio-serial port (a unix socket).
    :param connect_s: how long a command waits for the agent when it is not connected yet (it
        connects by itself): short, so a reader polling a booting guest is not held up.
    """

    def __init__(self, socket_path: str | Path, *, connect_s: float = 2.0) -> None:
        self.socket_path = str(socket_path)
        self.connect_s = connect_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def connect(self, timeout_s: float = 120.0, *, attempt_s: float = 2.0) -> float:
        """Connect and synchronise, retrying until the agent answers (it starts late in boot).

        The connection is used for commands only once a sync came back: until then the channel
        may still hold replies (or the agent's complaint about the 0xFF byte) meant for nobody.
        A connect that is cancelled or fails leaves no connection behind.

        :param attempt_s: how long each ``guest-sync-delimited`` waits before it is sent again.
        :returns: seconds until the agent answered.
        :raises AgentUnavailable: no answer within ``timeout_s``.
        """
        self._drop()
        started = time.monotonic()
        deadline = started + timeout_s
        last_error: BaseException | None = None
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while time.monotonic() < deadline:
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_unix_connection(self.socket_path)
                    assert reader is not None
                    await _sync(reader, writer, min(attempt_s, max(0.1, deadline - time.monotonic())))
                    self._reader, self._writer, writer = reader, writer, None  # published: kept open
                    return time.monotonic() - started
                except TimeoutError as exc:
                    last_error = exc  # the agent is not up yet: the next sync has a new id
                except (OSError, EOFError, ValueError) as exc:
                    last_error = exc  # QEMU's socket not there yet, or it hung up: connect again
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    await asyncio.sleep(0.2)
        finally:
            if writer is not None:  # not published: failed, timed out or cancelled
                writer.close()
        raise AgentUnavailable(f"no guest agent answered on {self.socket_path} within {timeout_s} s "
                               f"(last: {last_error!r}); is qemu-guest-agent installed and its "
                               f"{AGENT_CHANNEL} port present?")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None,
                      timeout_s: float = 10.0) -> Any:
        """Send one command and return its ``return`` value.

        Connects first when not connected (waiting up to ``connect_s`` for the agent).

        :raises GuestAgentError: the agent answered with an error.
        :raises AgentUnavailable: no agent within ``connect_s``, or no reply within ``timeout_s``
            (the connection is dropped then, as when the caller cancels: a late reply would
            otherwise answer the next command).
        """
        async with self._lock:
            if self._reader is None or self._writer is None:
                await self.connect(self.connect_s, attempt_s=min(2.0, self.connect_s))
            assert self._reader is not None and self._writer is not None  # connect() made them
            message: dict[str, Any] = {"execute": command}
            if arguments:
                message["arguments"] = arguments
            try:
                self._writer.write(json.dumps(message).encode() + b"\n")
                await self._writer.drain()
                while True:
                    line = await asyncio.wait_for(self._reader.readline(), timeout_s)
                    if not line:
                        raise EOFError
                    text = line.strip().lstrip(_DELIMITER)
                    if not text:
                        continue
                    reply = json.loads(text)
                    if "error" in reply:
                        error = reply["error"]
                        raise GuestAgentError(command, str(error.get("class")), str(error.get("desc")))
                    if "return" in reply:
                        return reply["return"]
                    # Anything else (the agent sends no events) is skipped.
            except GuestAgentError:
                raise  # an answer: the channel is in step
            except (TimeoutError, EOFError, OSError, ValueError) as exc:
                self._drop()
                raise AgentUnavailable(f"guest agent: {command} got no usable reply: {exc!r}") from exc
            except BaseException:
                self._drop()  # cancelled while a reply may still come
                raise

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def close(self) -> None:
        """Close the connection (the agent keeps running in the guest)."""
        self._drop()


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """``guest-sync-delimited`` with a new id; everything the agent sent before its answer is stale.

    :raises TimeoutError: no answer with this id within ``timeout_s``.
    :raises EOFError: the channel closed.
    """
    token = random.randrange(1, 2**31)
    # 0xFF first: the agent's JSON parser discards whatever partial input it holds (and answers
    # the byte itself with a parse error, which the wait below skips as stale).
    writer.write(_DELIMITER + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode()
                 + b"\n")
    await writer.drain()

    async def answer() -> None:
        while True:
            await reader.readuntil(_DELIMITER)  # everything before it is stale
            line = (await reader.readline()).lstrip(_DELIMITER)
            with contextlib.suppress(ValueError):
                if json.loads(line).get("return") == token:
                    return
    try:
        await asyncio.wait_for(answer(), timeout_s)
    except asyncio.IncompleteReadError as exc:
        raise EOFError("the agent channel closed") from exc
