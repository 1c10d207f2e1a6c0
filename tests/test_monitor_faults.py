"""Faults a real QEMU cannot be made to show, against a small fake QMP server:
the socket closed mid-command, a garbled reply, a command that never gets an answer."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import pytest

from balloonlab import CommandError, Monitor, MonitorError

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}


async def fake_qmp(behaviour):
    """Serve QMP on a temp unix socket; ``behaviour(msg, writer)`` answers each command."""
    sock = Path(tempfile.mkdtemp(dir="/tmp")) / "qmp.sock"

    async def serve(reader, writer):
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        # qemu.qmp sends bare JSON objects with no newline (QEMU's parser reads a JSON stream).
        decoder, buffer = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    msg, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break  # an incomplete object: wait for more bytes
                buffer = buffer.lstrip()[end:]
                if msg["execute"] == "qmp_capabilities":
                    writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
                else:
                    await behaviour(msg, writer)
                if writer.is_closing():
                    return
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(sock))
    return server, sock


async def test_socket_closed_mid_command_raises_monitor_error():
    async def hang_up(msg, writer):
        writer.close()
    server, sock = await fake_qmp(hang_up)
    async with server:
        mon = Monitor(str(sock), name="fake")
        await mon.connect()
        with pytest.raises(MonitorError, match="query-balloon"):
            await mon.execute("query-balloon")
        with pytest.raises(MonitorError):
            await mon.execute("query-status")  # the connection stays down, clearly
        await mon.close()


async def test_garbled_reply_raises_monitor_error():
    async def garble(msg, writer):
        writer.write(b"{this is not json\r\n")
    server, sock = await fake_qmp(garble)
    async with server:
        mon = Monitor(str(sock), name="fake")
        await mon.connect()
        with pytest.raises(MonitorError):
            await mon.execute("query-balloon")
        await mon.close()


async def test_qemu_error_reply_keeps_class_and_description():
    async def refuse(msg, writer):
        writer.write(json.dumps({"error": {"class": "DeviceNotActive", "desc": "No balloon device has been activated"},
                                 "id": msg.get("id")}).encode() + b"\r\n")
    server, sock = await fake_qmp(refuse)
    async with server:
        mon = Monitor(str(sock), name="fake")
        await mon.connect()
        with pytest.raises(CommandError) as err:
            await mon.execute("query-balloon")
        assert (err.value.command, err.value.error_class) == ("query-balloon", "DeviceNotActive")
        assert err.value.desc == "No balloon device has been activated"
        assert mon.round_trips == 1
        await mon.close()


async def test_silent_server_times_out_with_monitor_error():
    async def ignore(msg, writer):
        pass
    server, sock = await fake_qmp(ignore)
    async with server:
        mon = Monitor(str(sock), name="fake", command_timeout_s=0.5)
        await mon.connect()
        with pytest.raises(MonitorError, match="no reply"):
            await mon.execute("query-balloon")
        await mon.close()


async def test_connecting_to_a_missing_socket_names_it():
    mon = Monitor("/tmp/does-not-exist/qmp.sock", name="nobody")
    with pytest.raises(MonitorError, match="/tmp/does-not-exist/qmp.sock"):
        await mon.connect(timeout_s=1)


async def test_events_are_bounded_and_delivered_to_handlers():
    async def emit(msg, writer):
        for i in range(400):
            writer.write(json.dumps({"event": "BALLOON_CHANGE", "data": {"actual": i},
                                     "timestamp": {"seconds": 1700000000, "microseconds": i}}).encode() + b"\r\n")
        writer.write(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\r\n")
    server, sock = await fake_qmp(emit)
    async with server:
        mon = Monitor(str(sock), name="fake")
        seen = []
        mon.add_event_handler(seen.append)
        await mon.connect()
        await mon.execute("trigger")
        for _ in range(50):
            if len(seen) == 400:
                break
            await asyncio.sleep(0.02)
        assert [e.data["actual"] for e in seen] == list(range(400))
        assert seen[5].time == pytest.approx(1700000000.000005)
        assert len(mon.recent_events) == 256  # bounded
        assert len(mon._client.events._queue._queue) == 0  # qemu.qmp's default listener holds nothing
        await mon.close()
