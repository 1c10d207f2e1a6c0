"""A QMP-speaking stand-in for many QEMU guests with a virtio balloon, for sampler scale tests.

One asyncio process serves ``--count`` unix sockets (``DIR/g00000.sock`` ...), each a fake
QEMU 7.2 whose only device is a virtio balloon with id ``balloon0``. It answers what
balloonlab's monitor, discovery, balloon and sampler send:

* the QMP greeting (no ``oob``), ``qmp_capabilities`` (anything else before it is refused,
  as QEMU does);
* ``qom-list`` of ``/machine/peripheral`` (``balloon0``, ``child<virtio-balloon-pci>``), of
  ``/machine/peripheral-anon`` (empty) and of the device (``guest-stats``,
  ``guest-stats-polling-interval``...); other paths give ``DeviceNotFound``;
* ``qom-get``/``qom-set`` of ``guest-stats-polling-interval`` (0 by default, as QEMU);
  setting it restarts the report clock (the first enable reports at once);
* ``qom-get guest-stats``: ``last-update`` advances once per period (whole seconds, as QEMU),
  each guest at its own phase; values are plausible for a 512 MiB guest and change with every
  report (minor faults grow, free memory wanders), unset (2^64-1) until the first report;
* ``query-balloon``, ``balloon`` (actual follows the target and a ``BALLOON_CHANGE`` event is
  sent), ``query-status`` (running), ``query-version`` (7.2.0), ``quit`` (closes).

Reports are computed when asked for, not by timers, so an idle simulated guest costs nothing
and thousands fit in one process. qemu.qmp sends bare JSON objects without newlines: input is
parsed as a JSON stream with ``json.JSONDecoder.raw_decode``; replies end with CRLF, as QEMU's.

Run it as its own process (so its CPU is not the sampler's)::

    .venv/bin/python benchmarks/qmp_simulator.py --dir /tmp/sim --count 1000

It prints ``READY <count> <dir>`` once every socket listens and serves until SIGTERM/SIGINT,
then one JSON line of counters. One process serves up to about :data:`GUESTS_PER_PROCESS`
guests at a 1 s period before it is the bottleneck, so larger counts are spread over several
(``--procs``, default ``ceil(count / 1500)``): each serves a contiguous range of the sockets
(``--first``), all in one folder, and the parent of ``--procs`` > 1 relays READY and the summed
counters. :func:`start` does that from another script and returns the processes (one
:class:`Simulators`, Popen-like) and the socket paths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

UNSET = 2**64 - 1
MEMORY = 512 * 1024 * 1024
TOTAL = 492_847_104  # what the built-in 512 MiB guest reports as stat-total-memory
DEVICE = "/machine/peripheral/balloon0"
POLLING = "guest-stats-polling-interval"
GREETING = (json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                            "package": "Debian 1:7.2+dfsg-7 (balloonlab simulator)"},
                                "capabilities": []}}) + "\r\n").encode()
DEVICE_PROPS = [{"name": "type", "type": "string"}, {"name": "parent_bus", "type": "link<bus>"},
                {"name": "realized", "type": "bool"}, {"name": "deflate-on-oom", "type": "bool"},
                {"name": "free-page-reporting", "type": "bool"}, {"name": "guest-stats", "type": "guest statistics"},
                {"name": POLLING, "type": "int"}, {"name": "virtio-backend", "type": "child<virtio-balloon-device>"}]
_DECODER = json.JSONDecoder()
#: Guests one simulator process serves by default (a 1 s period costs it about a third of a
#: core at this count; more processes are started for more guests).
GUESTS_PER_PROCESS = 1500


class FakeBalloon:
    """The state of one simulated guest; reports are derived from the clock when read."""

    __slots__ = ("actual", "index", "period", "phase", "rng_seed", "start", "target")

    def __init__(self, index: int) -> None:
        self.index = index
        self.period = 0
        self.start = 0.0
        self.phase = random.Random(index).random()  # spread reports over the second, as real guests are
        self.actual = MEMORY
        self.target = MEMORY
        self.rng_seed = index * 7919

    def set_period(self, seconds: int) -> None:
        self.period = seconds
        # QEMU polls at once when polling is enabled, then every period; keep the guest's phase.
        now = time.time()
        self.start = now - ((now - self.phase) % 1.0) if seconds else 0.0

    def guest_stats(self) -> dict[str, Any]:
        if not self.period:
            return {"stats": _unset_stats(), "last-update": 0}
        k = int((time.time() - self.start) // self.period)
        report_time = self.start + k * self.period
        x = (k * 2654435761 + self.rng_seed) % 1_000_003  # cheap, deterministic "noise" per report
        total = TOTAL - (MEMORY - self.actual)  # a balloon takes its pages out of the total
        caches = 2_281_472 + (x % 512) * 4096
        free = max(0, total - 40 * 2**20 - x % (24 * 2**20) - caches)
        stats = {"stat-swap-in": 0, "stat-swap-out": 0, "stat-major-faults": 150 + k // 60,
                 "stat-minor-faults": 30_000 + 37 * k + x % 37, "stat-free-memory": free,
                 "stat-total-memory": total, "stat-available-memory": max(0, free + caches - 3 * 2**20),
                 "stat-disk-caches": caches, "stat-htlb-pgalloc": 0, "stat-htlb-pgfail": 0}
        return {"stats": stats, "last-update": int(report_time)}


def _unset_stats() -> dict[str, int]:
    return {f"stat-{n}": UNSET for n in ("swap-in", "swap-out", "major-faults", "minor-faults", "free-memory",
                                          "total-memory", "available-memory", "disk-caches",
                                          "htlb-pgalloc", "htlb-pgfail")}


class QMPServerProtocol(asyncio.Protocol):
    """One QMP connection to one fake guest (QEMU serves one client per socket at a time)."""

    def __init__(self, balloon: FakeBalloon, counters: dict[str, int]) -> None:
        self.balloon = balloon
        self.counters = counters
        self.buffer = ""
        self.negotiated = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.counters["connections"] += 1
        transport.write(GREETING)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data.decode()
        buf, pos, end = self.buffer, 0, len(self.buffer)
        while True:
            while pos < end and buf[pos] in " \t\r\n":
                pos += 1
            if pos >= end:
                break
            try:
                msg, pos = _DECODER.raw_decode(buf, pos)
            except json.JSONDecodeError:
                break  # incomplete object: wait for more bytes
            self.handle(msg)
        self.buffer = buf[pos:]

    def send(self, obj: dict[str, Any]) -> None:
        if self.transport is not None:
            self.transport.write((json.dumps(obj) + "\r\n").encode())

    def handle(self, msg: Any) -> None:
        self.counters["commands"] += 1
        ident = msg.get("id") if isinstance(msg, dict) else None
        try:
            command = msg["execute"]
            args = msg.get("arguments") or {}
        except (KeyError, TypeError, AttributeError):
            self.error(ident, "GenericError", "QMP input member 'execute' is missing")
            return
        if command == "qmp_capabilities":
            if self.negotiated:
                self.error(ident, "CommandNotFound", "Capabilities negotiation is already complete, command ignored")
            else:
                self.negotiated = True
                self.reply(ident, {})
            return
        if not self.negotiated:
            self.error(ident, "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
            return
        handler = getattr(self, "cmd_" + command.replace("-", "_"), None)
        if handler is None:
            self.error(ident, "CommandNotFound", f"The command {command} has not been found")
            return
        try:
            handler(ident, args)
        except (KeyError, TypeError, ValueError) as exc:
            self.error(ident, "GenericError", f"{command}: bad arguments ({exc})")

    def reply(self, ident: Any, value: Any) -> None:
        self.send({"return": value, "id": ident} if ident is not None else {"return": value})

    def error(self, ident: Any, cls: str, desc: str) -> None:
        body: dict[str, Any] = {"error": {"class": cls, "desc": desc}}
        if ident is not None:
            body["id"] = ident
        self.send(body)

    # -- commands ------------------------------------------------------------------------
    def cmd_qom_list(self, ident: Any, args: dict[str, Any]) -> None:
        path = args["path"]
        if path == "/machine/peripheral":
            self.reply(ident, [{"name": "type", "type": "string"},
                               {"name": "balloon0", "type": "child<virtio-balloon-pci>"}])
        elif path == "/machine/peripheral-anon":
            self.reply(ident, [{"name": "type", "type": "string"}])
        elif path == DEVICE:
            self.reply(ident, DEVICE_PROPS)
        else:
            self.error(ident, "DeviceNotFound", f"Device '{path}' not found")

    def cmd_qom_get(self, ident: Any, args: dict[str, Any]) -> None:
        path, prop = args["path"], args["property"]
        if path != DEVICE:
            self.error(ident, "DeviceNotFound", f"Device '{path}' not found")
        elif prop == "guest-stats":
            self.counters["guest_stats"] += 1
            self.reply(ident, self.balloon.guest_stats())
        elif prop == POLLING:
            self.reply(ident, self.balloon.period)
        else:
            self.error(ident, "GenericError", f"Property '{prop}' not found")

    def cmd_qom_set(self, ident: Any, args: dict[str, Any]) -> None:
        path, prop, value = args["path"], args["property"], args["value"]
        if path != DEVICE:
            self.error(ident, "DeviceNotFound", f"Device '{path}' not found")
        elif prop != POLLING:
            self.error(ident, "GenericError", f"Property '{prop}' not found")
        elif type(value) is not int or not 0 <= value < 2**32:
            self.error(ident, "GenericError", "Parameter 'value' expects uint32")
        else:
            self.balloon.set_period(value)
            self.reply(ident, {})

    def cmd_query_balloon(self, ident: Any, args: dict[str, Any]) -> None:
        self.reply(ident, {"actual": self.balloon.actual})

    def cmd_balloon(self, ident: Any, args: dict[str, Any]) -> None:
        value = int(args["value"])
        if value <= 0:
            self.error(ident, "GenericError", "Parameter 'value' expects a size")
            return
        self.balloon.target = min(value, MEMORY)
        self.reply(ident, {})
        asyncio.get_running_loop().call_later(0.05, self._balloon_moved)

    def _balloon_moved(self) -> None:
        self.balloon.actual = self.balloon.target
        now = time.time()
        self.send({"event": "BALLOON_CHANGE", "data": {"actual": self.balloon.actual},
                   "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}})

    def cmd_query_status(self, ident: Any, args: dict[str, Any]) -> None:
        self.reply(ident, {"status": "running", "singlestep": False, "running": True})

    def cmd_query_version(self, ident: Any, args: dict[str, Any]) -> None:
        self.reply(ident, {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "balloonlab simulator"})

    def cmd_quit(self, ident: Any, args: dict[str, Any]) -> None:
        self.reply(ident, {})
        if self.transport is not None:
            self.transport.close()


def socket_paths(directory: str | os.PathLike[str], count: int, first: int = 0) -> list[Path]:
    """The socket of each simulated guest, in order (guests ``first`` .. ``first + count - 1``)."""
    return [Path(directory) / f"g{i:05d}.sock" for i in range(first, first + count)]


def default_processes(count: int) -> int:
    """How many processes :func:`start` spreads ``count`` guests over by default."""
    return max(1, math.ceil(count / GUESTS_PER_PROCESS))


def shards(count: int, processes: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each process's contiguous range of guests, as even as can be."""
    processes = max(1, min(processes, count)) if count else 1
    base, extra = divmod(count, processes)
    out, first = [], 0
    for k in range(processes):
        n = base + (1 if k < extra else 0)
        out.append((first, n))
        first += n
    return out


def raise_nofile() -> int:
    """Raise the open-files soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def serve(directory: Path, count: int, period: int, first: int = 0) -> None:
    limit = raise_nofile()
    if limit < 2 * count + 64:
        raise SystemExit(f"open-files limit {limit} is too low for {count} guests (need ~{2 * count + 64})")
    directory.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    counters = {"connections": 0, "commands": 0, "guest_stats": 0}
    servers = []
    for i, path in enumerate(socket_paths(directory, count, first), first):
        with_period = FakeBalloon(i)
        if period:
            with_period.set_period(period)
        path.unlink(missing_ok=True)
        servers.append(await loop.create_unix_server(
            lambda b=with_period: QMPServerProtocol(b, counters), str(path)))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {count} {directory}", flush=True)
    parent = os.getppid()

    async def watch_parent() -> None:  # a simulator whose starter died must not linger
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        stop.set()

    watcher = asyncio.create_task(watch_parent())
    await stop.wait()
    watcher.cancel()
    for server in servers:
        server.close()
    for path in socket_paths(directory, count, first):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the starter may be gone
        print(json.dumps(counters), flush=True)


class Simulators:
    """The simulator processes of one :func:`start`, used like one ``subprocess.Popen``.

    ``pid`` is the first process's (``pids``: all of them); :meth:`terminate`, :meth:`kill`,
    :meth:`poll` and :meth:`wait` act on all; :meth:`communicate` waits for all and returns
    their counters summed, as one JSON line (as a single process prints them).
    """

    def __init__(self, procs: Sequence[subprocess.Popen[str]]) -> None:
        self.procs = list(procs)

    def __len__(self) -> int:
        return len(self.procs)

    def __iter__(self) -> Iterator[subprocess.Popen[str]]:
        return iter(self.procs)

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        """None while any process runs, else the first non-zero exit code (or 0)."""
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)

    def terminate(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.procs:
            p.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.poll()

    def communicate(self, timeout: float | None = None) -> tuple[str, None]:
        """Wait for every process (after :meth:`terminate`); their counters, summed.

        :raises subprocess.TimeoutExpired: one did not exit in time (then :meth:`kill`).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        totals: dict[str, int] = {}
        for p in self.procs:
            out, _ = p.communicate(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            lines = (out or "").strip().splitlines()
            with contextlib.suppress(ValueError, IndexError, AttributeError):
                for key, value in json.loads(lines[-1]).items():
                    totals[key] = totals.get(key, 0) + int(value)
        out = json.dumps({"processes": len(self.procs), **totals}) + "\n" if totals else ""
        return out, None


def start(directory: str | os.PathLike[str], count: int, *, period: int = 0, cpus: Sequence[int] | None = None,
          timeout_s: float = 60.0, processes: int | None = None, niceness: int = 0,
          ) -> tuple[Simulators, list[Path]]:
    """Run the simulator as ``processes`` child processes (default :func:`default_processes`:
    at most :data:`GUESTS_PER_PROCESS` guests each), all sockets in ``directory``, each pinned to
    ``cpus`` (when given) and reniced by ``niceness``; wait until every one is READY.

    Returns the processes (a :class:`Simulators`, used like one Popen) and every socket path,
    in order. The caller stops them with ``procs.terminate()`` + ``procs.communicate()`` (or
    ``wait()``), in a finally; on a failed start they are killed here.
    """
    processes = default_processes(count) if processes is None else max(1, processes)
    procs: list[subprocess.Popen[str]] = []
    try:
        for first, n in shards(count, processes):
            argv = [sys.executable, str(Path(__file__).resolve()), "--dir", str(directory), "--count", str(n),
                    "--first", str(first), "--period", str(period), "--procs", "1"]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            if cpus:
                os.sched_setaffinity(proc.pid, set(cpus))  # one thread yet: later ones inherit
            if niceness:
                os.setpriority(os.PRIO_PROCESS, proc.pid, os.getpriority(os.PRIO_PROCESS, proc.pid) + niceness)
        deadline = time.monotonic() + timeout_s
        waiting = {p.stdout: p for p in procs}
        while waiting:
            ready, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                late = next(iter(waiting.values()))
                raise RuntimeError(f"{len(waiting)} of {len(procs)} simulator process(es) did not start within "
                                   f"{timeout_s} s (exit {late.poll()})")
            for stream in ready:
                assert stream is not None
                line = stream.readline()
                if not line.startswith("READY"):
                    raise RuntimeError(f"a simulator process failed to start (exit {waiting[stream].wait()}): "
                                       f"{line!r}")
                del waiting[stream]
    except BaseException:
        for proc in procs:
            proc.kill()
            proc.wait()
        raise
    return Simulators(procs), socket_paths(directory, count)


def _relay(directory: Path, count: int, period: int, processes: int) -> None:
    """``--procs`` > 1: start the shards, say READY for all, stop them on SIGTERM/SIGINT."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    directory.mkdir(parents=True, exist_ok=True)
    group, _ = start(directory, count, period=period, processes=processes,
                     cpus=sorted(os.sched_getaffinity(0)))
    try:
        print(f"READY {count} {directory}", flush=True)
        parent = os.getppid()
        while not stop.wait(1.0) and os.getppid() == parent and group.poll() is None:
            pass
    finally:
        group.terminate()
        try:
            out, _ = group.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            group.kill()
            group.wait()
            out = ""
        with contextlib.suppress(OSError):
            print(out.strip() or "{}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="folder for the sockets (short: unix paths max 107 bytes)")
    parser.add_argument("--count", type=int, default=100, help="simulated guests (default 100)")
    parser.add_argument("--period", type=int, default=0,
                        help="initial stats polling period in s (default 0, as QEMU: the client sets it)")
    parser.add_argument("--first", type=int, default=0, help="number of the first guest (default 0)")
    parser.add_argument("--procs", type=int, default=None,
                        help=f"processes to spread the guests over (default: one per {GUESTS_PER_PROCESS})")
    args = parser.parse_args()
    processes = default_processes(args.count) if args.procs is None else max(1, args.procs)
    if processes > 1:
        if args.first:
            parser.error("--first is for one process (--procs 1)")
        _relay(Path(args.dir), args.count, args.period, processes)
    else:
        asyncio.run(serve(Path(args.dir), args.count, args.period, args.first))


if __name__ == "__main__":
    main()
