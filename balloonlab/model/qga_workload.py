"""Workloads in any guest with qemu-guest-agent: the same calls as in the built-in guest.

A user's own image has no balloonlab agent, but usually has qemu-guest-agent (QGA). Its
``guest-exec`` runs a program in the guest and ``guest-exec-status`` reports its exit and
output, which is all :class:`~balloonlab.model.workload.ChunkedWorkload` needs:

* a chunk is a ``perl`` process (perl-base is Essential in Debian and Ubuntu, so every such image
  has it) holding a string of the chunk's size, built in place (``x=``, so no temporary copy) and
  so every page written once. It then writes a marker file and sleeps; SIGUSR1 makes it write
  every page again and write a second marker, which is a working-set pass. Its pid and markers
  live in ``/run/balloonlab`` (a tmpfs: nothing survives a reboot, as no chunk does);
* :meth:`page_cache` writes and reads a file on the guest's root file system with ``dd``
  (buffered, so through the page cache; the write ends with an fsync);
* :meth:`stress` runs Debian's ``stress-ng`` with the arguments given, for a time.

Chunk files are named with a token of this client, so two clients (a restarted notebook) never
take each other's chunks for their own; :meth:`free` with no size ends every chunk in the guest.
Durations are taken on the host around each step, polling ``guest-exec-status`` every few
milliseconds: they include one or two agent round trips (about 5-20 ms under TCG).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from balloonlab.model.errors import AgentError, AgentUnavailable
from balloonlab.model.guest_view import AgentExecute, read_agent_file
from balloonlab.model.hostfs import parse_meminfo
from balloonlab.model.schema import HOST_MEMINFO
from balloonlab.model.units import format_size
from balloonlab.model.workload import ChunkedWorkload

__all__ = ["ExecResult", "QgaWorkload"]

#: Where chunk processes keep their pid and markers in the guest (a tmpfs under systemd).
RUN_DIR = "/run/balloonlab"
#: The page-cache workload's file (on the root file system: /var/tmp survives, unlike /tmp on
#: distributions that mount a tmpfs there, which would be shmem, not page cache).
PAGE_CACHE_FILE = "/var/tmp/balloonlab-pagecache"
#: A chunk: hold $ARGV[0] bytes (every page written), mark $ARGV[1] when held, and write every
#: page again on SIGUSR1, marking "$ARGV[1].t" when done.
_HOLDER = (r'my ($n, $m) = @ARGV; my $x = "\x01"; $x x= $n;'
           r'$SIG{USR1} = sub { for (my $i = 0; $i < $n; $i += 4096) { substr($x, $i, 1, "\x02") }'
           r' open(my $t, ">", "$m.t"); close($t) };'
           r'open(my $f, ">", $m); close($f); sleep while 1;')
_ALLOC = f"""d={RUN_DIR}; mkdir -p $d; rm -f $d/$1.*
perl -e "$3" "$2" $d/$1.ready </dev/null >/dev/null 2>&1 &
p=$!; echo $p > $d/$1.pid
while [ ! -e $d/$1.ready ]; do kill -0 $p 2>/dev/null || {{ rm -f $d/$1.*; exit 3; }}; sleep 0.01; done"""
_FREE = f"""d={RUN_DIR}; for id; do
  p=$(cat $d/$id.pid 2>/dev/null) && kill $p 2>/dev/null
  while [ -n "$p" ] && kill -0 $p 2>/dev/null; do sleep 0.01; done; rm -f $d/$id.*; done"""
_LIST = f"""cd {RUN_DIR} 2>/dev/null || exit 0
for f in *.pid; do [ -e "$f" ] || continue; id=${{f%.pid}}
  if [ -e $id.ready ] && kill -0 $(cat $f) 2>/dev/null; then echo $id; else rm -f $id.*; fi; done"""
_TOUCH = f"""d={RUN_DIR}; for id; do rm -f $d/$id.ready.t; kill -USR1 $(cat $d/$id.pid) || exit 3; done
for id; do while [ ! -e $d/$id.ready.t ]; do kill -0 $(cat $d/$id.pid) 2>/dev/null || exit 3; sleep 0.005; done; done"""
_DISK = {
    "write": f"dd if=/dev/zero of={PAGE_CACHE_FILE} bs=1M count=$1 iflag=count_bytes conv=fsync status=none",
    "read": f"""[ $(stat -c %s {PAGE_CACHE_FILE} 2>/dev/null || echo 0) -ge $1 ] ||
  {{ echo "the file is smaller: write it first" >&2; exit 4; }}
dd if={PAGE_CACHE_FILE} of=/dev/null bs=1M count=$1 iflag=count_bytes status=none""",
}


@dataclass(frozen=True)
class ExecResult:
    """A program's end in the guest: exit code (None: killed by a signal), output, seconds."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float


class QgaWorkload(ChunkedWorkload):
    """Workloads through qemu-guest-agent (an :class:`~balloonlab.model.protocols.AgentProtocol`).

    :param execute: the guest's agent channel (``GuestBase._agent_execute``: a socket for the
        QMP backend, ``qemuAgentCommand`` for libvirt).
    :param guest: the guest's name, for messages.
    """

    def __init__(self, execute: AgentExecute, guest: str) -> None:
        super().__init__()
        self._execute = execute
        self.guest = guest
        self._token = secrets.token_hex(3)  # this client's chunk names: q<token>c<N>

    # -- running programs ---------------------------------------------------------------
    async def exec(self, argv: Sequence[str], *, timeout_s: float = 120.0) -> ExecResult:
        """Run ``argv`` in the guest (``guest-exec``, output captured) and wait for its end.

        :raises AgentError: it did not end within ``timeout_s`` (it is killed), or the agent
            refused (``guest-exec`` disabled by the guest's ``--block-rpcs``, no such program).
        """
        started = time.monotonic()
        pid = (await self._call("guest-exec", {"path": argv[0], "arg": list(argv[1:]),
                                               "capture-output": True}))["pid"]
        poll_s = 0.005
        while True:
            status = await self._call("guest-exec-status", {"pid": pid})
            if status.get("exited"):
                return ExecResult(status.get("exitcode"), _text(status.get("out-data")),
                                  _text(status.get("err-data")), time.monotonic() - started)
            if time.monotonic() - started > timeout_s:
                await self._call("guest-exec", {"path": "/bin/sh", "arg": ["-c", f"kill -KILL {pid}"]})
                raise AgentError(f"{self.guest}: `{shlex.join(argv)}` did not end within {timeout_s:.0f} s (killed)")
            await asyncio.sleep(poll_s)
            poll_s = min(0.05, poll_s * 1.5)  # quick steps stay quick; long ones cost few calls

    async def _sh(self, script: str, *args: object, what: str, timeout_s: float = 120.0,
                  meaning: dict[int, str] | None = None) -> str:
        """Run ``script`` with ``args`` as $1...; its stdout.

        :param meaning: what an exit code means, for the error message (else the script's stderr).
        :raises AgentError: it exited with anything but 0.
        """
        result = await self.exec(["/bin/sh", "-c", script, "sh", *map(str, args)], timeout_s=timeout_s)
        if result.exit_code != 0:
            why = (meaning or {}).get(result.exit_code or 0) or result.stderr.strip() or result.stdout.strip()
            raise AgentError(f"{self.guest}: {what} failed in the guest (exit {result.exit_code}): "
                             f"{why or 'no output'}")
        return result.stdout

    async def _call(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return await self._execute(command, arguments)

    # -- the transport's primitives (ChunkedWorkload) ------------------------------------
    def _name(self, chunk_id: str) -> str:
        return f"q{self._token}{chunk_id}"

    async def _alloc_chunk(self, chunk_id: str, nbytes: int) -> None:
        await self._sh(_ALLOC, self._name(chunk_id), nbytes, _HOLDER, what=f"holding {format_size(nbytes)}",
                       meaning={3: "the holder died before it held it all: out of memory (its OOM killer took it)"})

    async def _free_chunk(self, chunk_id: str) -> None:
        await self._sh(_FREE, self._name(chunk_id), what="freeing a chunk")

    async def _free_all(self) -> None:
        await self._sh(f"cd {RUN_DIR} 2>/dev/null || exit 0; set -- $(ls | sed -n 's/[.]pid$//p'); " + _FREE,
                       what="freeing every chunk")

    async def _alive_chunks(self) -> set[str]:
        prefix = self._name("")
        lines = (await self._sh(_LIST, what="listing chunks")).split()
        return {line.removeprefix(prefix) for line in lines if line.startswith(prefix)}

    async def _touch(self, chunk_ids: Sequence[str], timeout_s: float) -> None:
        await self._sh(_TOUCH, *map(self._name, chunk_ids), what="a working-set pass", timeout_s=timeout_s,
                       meaning={3: "a chunk's holder is gone (its OOM killer took it)"})

    async def _disk(self, op: str, nbytes: int, timeout_s: float) -> None:
        await self._sh(_DISK[op], nbytes, what=f"{op} {format_size(nbytes)} of {PAGE_CACHE_FILE}", timeout_s=timeout_s)

    # -- the rest of the agent protocol --------------------------------------------------
    async def connect(self, timeout_s: float = 60.0) -> None:
        """Wait until the agent answers ``guest-ping`` (it starts late in a boot).

        :raises AgentUnavailable: no answer within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await self._call("guest-ping")
                return
            except AgentUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        """Nothing to close: the channel belongs to the guest handle (held memory stays held)."""

    async def ping(self) -> None:
        """Round trip to the agent."""
        await self._call("guest-ping")

    async def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo highlights, bytes, by the kernel's names (MemFree...)."""
        text = (await read_agent_file(self._execute, "/proc/meminfo")).decode(errors="replace")
        by_column = parse_meminfo(text)
        return {name: by_column[column] for name, column in HOST_MEMINFO.items() if column in by_column}

    async def churn(self, on: bool = True) -> None:
        """Not through qemu-guest-agent: the steady page-fault stream is the built-in agent's.

        :raises AgentError: always.
        """
        raise AgentError(f"{self.guest}: churn needs balloonlab's built-in guest; here, run a steady load with "
                         "stress() (e.g. stress-ng --fault 1)")

    async def reboot(self) -> None:
        """Reboot the guest from inside (``guest-shutdown`` mode reboot: the agent asks systemd).
        Memory held before is gone afterwards."""
        started = time.monotonic()
        try:
            await self._call("guest-shutdown", {"mode": "reboot"})
        except AgentUnavailable:
            pass  # the agent does not answer a shutdown it carries out: its channel just closes
        self._chunks.clear()
        self._notify("reboot", started)

    async def stress(self, args: str | Sequence[str], *, seconds: float) -> ExecResult:
        """Run Debian's ``stress-ng`` in the guest for ``seconds`` and wait for its end, e.g.
        ``stress("--vm 1 --vm-bytes 300M --vm-keep", seconds=20)``, ``"--page-in --vm 1"`` or
        ``"--bigheap 1"`` (grows until the guest's OOM killer ends it: stress-ng restarts it).

        A ``workload`` event ``"stress-ng ARGS"`` carries its duration; :attr:`held` does not
        change (stress-ng's memory is its own). ``--timeout`` and ``--metrics-brief`` are
        added; the result's ``stderr`` has stress-ng's metrics.

        :raises ValueError: ``seconds`` not positive, or ``--timeout`` among the arguments.
        :raises AgentError: stress-ng is not installed, or it failed (its output says why).
        """
        argv = shlex.split(args) if isinstance(args, str) else list(args)
        if not seconds > 0:
            raise ValueError(f"seconds must be above 0, got {seconds!r}")
        if any(a.startswith(("--timeout", "-t")) for a in argv):
            raise ValueError("leave --timeout out of the arguments: pass seconds= (balloonlab adds it)")
        started = time.monotonic()
        result = await self.exec(["stress-ng", *argv, "--timeout", f"{seconds:g}s", "--metrics-brief"],
                                 timeout_s=seconds + 60)
        self._notify(f"stress-ng {shlex.join(argv)}", started)
        if result.exit_code not in (0, 3):  # 3: a stressor lacked resources (OOM-killed), stress-ng's code
            raise AgentError(f"{self.guest}: stress-ng {shlex.join(argv)} failed (exit {result.exit_code}): "
                             f"{result.stderr.strip()[-500:]}")
        return result


def _text(data: str | None) -> str:
    return base64.b64decode(data or "").decode(errors="replace")
