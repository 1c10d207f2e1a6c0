"""QEMU guests: launch from domain XML, attach to a running QEMU, reconnect, shut down.

This is the lifecycle layer. :meth:`Guest.launch` keeps libvirt's order: QEMU starts paused
(``-S``), the monitor connects, the balloon is found, the statistics period from
``<stats period>`` is set (a failure is a recorded warning, not a failed launch), the initial
target from ``<currentMemory>`` is sent, and only then do the vCPUs run (``cont``).
:meth:`Guest.attach` (someone else's QEMU) sets the period only if the VM is running;
:meth:`Guest.reconnect` (a detached guest balloonlab launched earlier, from a new process)
never sets it and reads the live value instead. A launched guest is owned by its process and
dies with it (:mod:`balloonlab.qemu.registry`'s reaper) unless launched or marked detached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import signal
import subprocess
import time
from pathlib import Path

from balloonlab.domain import DomainSpec, as_spec, parse_domain_xml
from balloonlab.image.agent import Workload
from balloonlab.image.kernel import kernel_release
from balloonlab.model.deadline import Deadline, wait_until
from balloonlab.model.errors import BalloonLabError, BalloonNotFound, CommandError, LaunchError, MonitorError
from balloonlab.model.guest import GuestBase, VmemDevice, rollback
from balloonlab.model.procfs import HostLayout
from balloonlab.model.protocols import Origin
from balloonlab.qemu import registry as runtime
from balloonlab.qemu.guest_agent import GuestAgent
from balloonlab.qemu.argv import build_argv, check_launch_inputs, guest_agent_socket, qemu_binary_for, resolve_accel
from balloonlab.qemu.balloon import Balloon
from balloonlab.qemu.host_memory import host_layout, vmem_devices
from balloonlab.qemu.virtio_mem import VirtioMem
from balloonlab.qemu.monitor import Monitor
from balloonlab.qemu.reaper import KILL_WAIT_S, Reaper, kill_and_reap
from balloonlab.qemu.startup import wait_for_console, wait_for_socket

log = logging.getLogger(__name__)
#: What the built-in guest's init prints on its console once the agent listens.
READY_LINE = b"BALLOONLAB-READY"


class Guest(GuestBase):
    """One QEMU guest and its balloon (async core; see :class:`balloonlab.SyncGuest`).

    Build one with :meth:`launch`, :meth:`attach` or :meth:`reconnect`, not directly.
    """

    balloon: Balloon

    def __init__(self, *, name: str, spec: DomainSpec | None, monitor: Monitor, origin: Origin,
                 pid: int | None = None, process: subprocess.Popen[bytes] | None = None,
                 paths: runtime.RuntimePaths | None = None, reaper: Reaper | None = None,
                 record: runtime.RegistryEntry | None = None) -> None:
        super().__init__(name)
        self.spec = spec
        self.monitor = monitor
        self.origin: Origin = origin
        self.pid = pid
        self.paths = paths
        self.record = record
        self.balloon = Balloon(monitor, spec.memballoon if spec else None,
                               max_bytes=spec.memory_bytes if spec else None)
        self.virtio_mem = VirtioMem(monitor)  # its virtio-mem devices, if any
        self._vmem_version = lambda: len(self.virtio_mem.changes)  # one per MEMORY_DEVICE_SIZE_CHANGE
        self._process = process
        self._reaper = reaper
        self._closed = False
        # qemu-guest-agent, when the domain has its channel on a socket QEMU listens on: the
        # guest's own meminfo and workloads go through it (one client at a time: QEMU's socket
        # chardev takes a single connection, so this handle keeps one).
        channel = spec.agent_channel if spec is not None else None
        socket = self.guest_agent_socket
        self._qga = GuestAgent(socket) if socket is not None and (channel is None or channel.mode == "bind") else None
        self._agent_execute = self._qga.execute if self._qga is not None else None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    async def launch(cls, domain: DomainSpec | str | os.PathLike[str], *, name: str | None = None,
                     accel: str = "auto", detached: bool = False, qemu_binary: str | None = None,
                     boot_timeout_s: float = 90.0) -> Guest:
        """Start QEMU from a libvirt domain XML (spec, text or file) and bring the guest up.

        :param name: overrides the XML's ``<name>`` (it names the runtime dir).
        :param accel: ``auto`` (KVM only where it really works), ``kvm`` or ``tcg``.
        :param detached: the guest outlives this process (see :meth:`reconnect`).
        :param boot_timeout_s: how long a guest with balloonlab's agent may take to answer.
        :raises LaunchError: QEMU missing or failed; command, exit code and output attached.
            No process and no runtime dir are left behind.
        :raises GuestNameInUse: a live guest already has this name.
        :raises DomainXMLError: the XML is invalid.
        """
        spec = as_spec(domain)
        if name is not None:
            spec = dataclasses.replace(spec, name=runtime.validate_name(name))
        binary = qemu_binary or qemu_binary_for(spec)
        check_launch_inputs(spec, binary)
        chosen = resolve_accel(accel)
        paths = runtime.claim_runtime_dir(spec.name)
        argv = build_argv(spec, qmp_socket=str(paths.qmp_socket), console_log=str(paths.console_log),
                          agent_socket=str(paths.agent_socket) if spec.agent else None, accel=chosen,
                          qemu_binary=shutil.which(binary) or binary, channel_dir=str(paths.dir))
        async def remove_dir() -> None:
            runtime.remove_runtime_dir(paths.dir)
        async with rollback(remove_dir):
            guest = await cls._spawn(spec, paths, argv, chosen, detached)
        output = ""

        def failed(exc: BaseException) -> LaunchError:
            code = guest._exitcode()
            # When QEMU died, its own words (in `output`) explain more than the symptom.
            reason = f"QEMU exited with code {code}" if code is not None else str(exc)
            return LaunchError(f"guest {spec.name} did not come up: {reason}", argv, code, output)

        async def kill() -> None:
            nonlocal output
            output = guest._output_tail()
            await guest._kill()
        async with rollback(kill, failed):
            if accel == "auto" and spec.domain_type == "kvm" and chosen != "kvm":
                guest._warn("domain type is kvm but KVM is not usable here: running under TCG")
            await guest._post_launch(boot_timeout_s)
        return guest

    @classmethod
    async def _spawn(cls, spec: DomainSpec, paths: runtime.RuntimePaths, argv: list[str],
                     accel: str, detached: bool) -> Guest:
        # 0600 like everything in the runtime dir (see the umask below).
        fd = os.open(paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as log_file:
            try:
                # Its own session: a Ctrl-C aimed at the notebook or script must not reach QEMU;
                # ownership is the reaper's job. umask 0177: QEMU creates its QMP and agent
                # sockets (bind() applies the umask) and the console log 0600, not 0755/0644.
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           close_fds=True, umask=0o177)
            except OSError as exc:
                raise LaunchError(f"cannot run QEMU: {exc}", argv) from exc
        reaper: Reaper | None = None
        try:
            reaper = None if detached else Reaper(process.pid, paths.dir)
            record = runtime.RegistryEntry(name=spec.name, pid=process.pid, argv=argv, domain_xml=spec.xml,
                                           owner_pid=os.getpid(), detached=detached, created=time.time(),
                                           accel=accel, guest_agent_socket=guest_agent_socket(spec, paths.dir))
            runtime.write_record(paths, record)
        except BaseException as exc:
            # A QEMU nothing knows of (no reaper, no guest.json) must not outlive the launch:
            # exiting later, it would unlink the qmp.sock of the next guest of this name.
            if not await kill_and_reap(process, KILL_WAIT_S):
                log.error("QEMU of %s (pid %s) survived SIGKILL for %s s", spec.name, process.pid, KILL_WAIT_S)
            if reaper is not None:
                reaper.release()
            if isinstance(exc, OSError):
                raise LaunchError(f"cannot register guest {spec.name} in {paths.dir}: {exc}", argv) from exc
            raise
        monitor = Monitor(str(paths.qmp_socket), name=spec.name)
        return cls(name=spec.name, spec=spec, monitor=monitor, origin="launched", pid=process.pid,
                   process=process, paths=paths, reaper=reaper, record=record)

    async def _post_launch(self, boot_timeout_s: float) -> None:
        assert self.spec is not None and self.paths is not None
        await wait_for_socket(self.paths.qmp_socket, 15.0, failed=lambda: self._exited("during start-up"))
        await self._connect_monitor(timeout_s=15.0)
        spec = self.spec
        if spec.memballoon is not None:
            if spec.period_s is not None:
                await self._apply_period(spec.period_s)
            if spec.current_memory_bytes < spec.memory_bytes:
                # Before the vCPUs run: the driver picks the target up as it binds.
                await self.balloon.set_target(spec.current_memory_bytes)
        await self.monitor.execute("cont")
        if spec.agent:
            # Bytes sent to the agent's serial port before the guest configured it are lost
            # or echoed back: wait for init's READY line on the console first.
            await wait_for_console(self.paths.console_log, READY_LINE, boot_timeout_s,
                                   failed=lambda: self._exited("while the guest booted"))
            self._workload = Workload(str(self.paths.agent_socket))
            await self._workload.connect(timeout_s=10.0)

    @classmethod
    async def attach(cls, qmp_socket: str | os.PathLike[str], domain: DomainSpec | str | os.PathLike[str] | None = None,
                     *, name: str | None = None, set_period: bool = True) -> Guest:
        """Attach to a QEMU someone else started, through its QMP unix socket.

        The period from the XML's ``<stats period>`` is set only if the VM is running (as
        libvirt does); a paused VM keeps whatever it has. The guest is never stopped by
        balloonlab unless :meth:`shutdown` is called.

        :param name: the guest's name in runs and frames; else the XML's ``<name>``, else the
            socket's file name without its suffix. Checked as launch names are
            (:func:`~balloonlab.qemu.registry.validate_name`).
        :raises ValueError: the name (given or derived) is not a valid guest name.
        :raises MonitorError: the socket does not answer QMP.
        """
        spec = as_spec(domain) if domain is not None else None
        label = (runtime.validate_name(name) if name is not None
                 else runtime.validate_name(spec.name, derived_from="the domain XML's <name>") if spec is not None
                 else runtime.validate_name(Path(qmp_socket).stem, derived_from="the socket's file name"))
        monitor = Monitor(str(qmp_socket), name=label)
        await monitor.connect()
        guest = cls(name=label, spec=spec, monitor=monitor, origin="attached")
        if set_period and spec is not None and spec.period_s is not None:
            await guest._apply_period_at_attach(spec.period_s)
        return guest

    @classmethod
    async def reconnect(cls, name: str) -> Guest:
        """Reconnect to a detached guest balloonlab launched (e.g. after a kernel restart).

        Never sets the polling period: a period changed on the live guest stays as it is
        (:attr:`period_at_connect` holds the live value).

        :raises BalloonLabError: no live guest by that name (see :func:`list_guests`).
        """
        paths = runtime.RuntimePaths(runtime.runtime_root() / runtime.validate_name(name))
        record = runtime.read_record(paths.dir)
        if record is None or not runtime.qemu_alive(record):
            names = ", ".join(r.name for r in runtime.list_guests()) or "none"
            raise BalloonLabError(f"no running guest named {name!r} to reconnect to (running: {names})")
        spec = parse_domain_xml(record.domain_xml)
        monitor = Monitor(str(paths.qmp_socket), name=name)
        await monitor.connect()
        guest = cls(name=name, spec=spec, monitor=monitor, origin="reconnected", pid=record.pid,
                    paths=paths, record=record)
        if spec.memballoon is not None:
            with contextlib.suppress(BalloonNotFound):
                guest.period_at_connect = await guest.balloon.get_period()
        if spec.agent:
            guest._workload = Workload(str(paths.agent_socket))
            await guest._workload.connect(timeout_s=10.0)
        return guest

    # -- state ----------------------------------------------------------------------------
    async def metadata(self) -> dict[str, object]:
        """What a run records about this guest: domain XML, command line, QEMU and kernel versions."""
        version = (await self.monitor.execute("query-version"))["qemu"]
        kernel = self.spec.kernel if self.spec else None
        return {"name": self.name, "backend": self.backend, "origin": self.origin, "pid": self.pid,
                "qemu_version": f"{version['major']}.{version['minor']}.{version['micro']}",
                # The guest kernel's release, read from its bzImage header (direct kernel boot).
                "guest_kernel": kernel_release(Path(kernel)) if kernel and Path(kernel).is_file() else None,
                "host_kernel": platform.release(), "argv": self.record.argv if self.record else None,
                "accel": self.record.accel if self.record else None, "qmp_socket": self.monitor.socket_path,
                "domain_xml": self.spec.xml if self.spec else None, "warnings": list(self.warnings)}

    @property
    def guest_agent_socket(self) -> Path | None:
        """The host end of the guest agent's channel (``org.qemu.guest_agent.0``): the unix socket
        QEMU listens on (connects to, for mode 'connect'). None without that channel, or when
        attached to a QEMU whose domain XML leaves the path out (its owner chose it)."""
        path = self.record.guest_agent_socket if self.record is not None else (
            guest_agent_socket(self.spec, None) if self.spec is not None else None)
        return Path(path) if path is not None else None

    @property
    def detached(self) -> bool:
        """True when the guest is meant to outlive this process."""
        return self.record is not None and self.record.detached

    @property
    def alive(self) -> bool:
        """True while the QEMU process runs (for attached guests: while QMP is connected)."""
        if self._process is not None:
            return self._process.poll() is None
        if self.pid is not None and self.paths is not None:
            return runtime.pid_is_guest(self.pid, str(self.paths.dir))
        return self.monitor.connected

    async def _host_layout(self, previous: HostLayout | None) -> HostLayout | None:
        """Guest RAM blocks and the TCG buffer, asked of QEMU (:func:`~balloonlab.qemu.host_memory.host_layout`)."""
        return await host_layout(self.monitor, self.pid, previous) if self.pid is not None else None

    async def _vmem_devices(self) -> list[VmemDevice]:  # re-read after each size change (_vmem_version)
        return await vmem_devices(self.monitor)

    # -- ownership and shutdown -----------------------------------------------------------
    async def detach(self) -> None:
        """Let the guest outlive this process; a new process can :meth:`reconnect` to it."""
        if self.record is None or self.paths is None:
            raise BalloonLabError(f"guest {self.name} was not launched by balloonlab: nothing to detach")
        if self._reaper is not None:
            self._reaper.release()
            self._reaper = None
        self.record.detached = True
        runtime.write_record(self.paths, self.record)

    async def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Stop the guest: QMP ``quit``, wait, then SIGKILL. Cleans its runtime dir.

        :param timeout_s: how long ``quit`` and QEMU's exit may take together (a QEMU that does
            not answer, e.g. stopped, is killed after it; the kill is bounded too).
        :returns: True when QEMU quit by itself, False when it had to be killed.
        """
        if self._closed:
            return True
        deadline = Deadline(timeout_s)
        with contextlib.suppress(MonitorError, CommandError):
            await self.monitor.execute("quit", timeout_s=deadline.left_s)
        graceful = await self._wait_gone(deadline.left_s)
        if not graceful:
            log.warning("%s did not quit within %s s: killing it", self.name, timeout_s)
        await self._kill()
        return graceful

    async def close(self) -> None:
        """Release this handle: an owned guest is shut down; detached/attached ones keep running."""
        if self._closed:
            return
        if self.origin == "launched" and not self.detached:
            await self.shutdown()
        else:
            await self._disconnect()
            self._closed = True

    # -- internals ------------------------------------------------------------------------
    def _exited(self, during: str) -> str | None:
        if self._process is not None and self._process.poll() is not None:
            return f"QEMU exited {during} with code {self._process.returncode}"
        return None

    async def _connect_monitor(self, timeout_s: float) -> None:
        # QEMU creates the socket file before it listens on it: under load a connect can be
        # refused for a moment. Retry that (only that) while QEMU lives.
        deadline = Deadline(timeout_s)
        while True:
            try:
                await self.monitor.connect(timeout_s=max(1.0, deadline.left_s))
                return
            except MonitorError as exc:
                if "Connection refused" not in str(exc) or deadline.expired:
                    raise
                if (why := self._exited("before its monitor answered")) is not None:
                    raise LaunchError(why) from exc
            await asyncio.sleep(0.05)

    async def _wait_gone(self, timeout_s: float) -> bool:
        if self._process or self.pid:
            return await wait_until(lambda: not self.alive, timeout_s)
        return await wait_until(lambda: not self.monitor.connected, timeout_s)

    async def _disconnect(self) -> None:
        self._close_host_view()
        if self._workload is not None:
            await self._workload.close()
        if self._qga is not None:
            await self._qga.close()
        await self.monitor.close()

    async def _kill(self) -> None:
        """Make sure QEMU is gone and nothing of it is left: process, reaper, runtime dir.

        Waits at most :data:`~balloonlab.qemu.reaper.KILL_WAIT_S` for QEMU to exit; one that
        survives SIGKILL (in D state) keeps its runtime dir, so its name stays taken.
        """
        await self._disconnect()
        gone = True
        if self._process is not None:
            gone = await kill_and_reap(self._process, KILL_WAIT_S)
        elif self.pid is not None and self.paths is not None and runtime.pid_is_guest(self.pid, str(self.paths.dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            directory = str(self.paths.dir)
            gone = await wait_until(lambda: not runtime.pid_is_guest(self.pid or 0, directory), KILL_WAIT_S,
                                    poll_s=0.02)
        if not gone:
            log.error("%s (pid %s) survived SIGKILL for %s s: its runtime dir %s is kept", self.name,
                      self.pid, KILL_WAIT_S, self.paths.dir if self.paths else None)
        if self._reaper is not None:
            self._reaper.release()
            self._reaper = None
        if self.paths is not None and gone:
            runtime.remove_runtime_dir(self.paths.dir)
        self._closed = True

    def _exitcode(self) -> int | None:
        return self._process.poll() if self._process is not None else None

    def _output_tail(self) -> str:
        return self.paths.output_tail() if self.paths is not None else ""

    def __repr__(self) -> str:
        return f"<Guest {self.name} {self.origin} pid={self.pid}{' detached' if self.detached else ''}>"
