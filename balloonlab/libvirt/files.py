"""Host-side files of libvirt domains: agent socket dirs, QEMU pids and logs.

These only apply to a libvirt daemon on this host (``qemu:///system`` or ``qemu:///session``);
for a remote URI nothing here is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from balloonlab.domain import DomainSpec, render_domain_xml, with_serial_socket_paths
from balloonlab.model.procfs import process_args

_SYSTEM_RUN = Path("/run/libvirt/qemu")
_SYSTEM_LOG = Path("/var/log/libvirt/qemu")


def agent_root() -> Path:
    """Where serial sockets libvirt must create for balloonlab live: ``$BALLOONLAB_LIBVIRT_DIR``,
    else ``/run/balloonlab-libvirt`` as root, else ``$XDG_RUNTIME_DIR/balloonlab-libvirt``
    (``/tmp/balloonlab-libvirt-<uid>``). Not balloonlab's own runtime root: that one is swept
    of directories without a guest record. Outside /tmp when root: a libvirtd with a private
    /tmp (systemd's PrivateTmp) would not see it."""
    if env := os.environ.get("BALLOONLAB_LIBVIRT_DIR"):
        return Path(env)
    if os.getuid() == 0:
        return Path("/run/balloonlab-libvirt")
    if env := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(env) / "balloonlab-libvirt"
    return Path("/tmp") / f"balloonlab-libvirt-{os.getuid()}"


def prepare_xml(spec: DomainSpec, *, remote: bool = False) -> tuple[str, Path | None]:
    """The XML to give libvirt, and the directory made for it (None when none was needed).

    libvirt refuses a ``<serial type='unix'>`` with no ``<source path>`` ("internal error:
    Missing source path attribute for char device"); balloonlab's own launcher picks the path
    itself, so the built-in guest's XML has none. Such ports get
    ``agent_root()/<name>/agent.sock`` (port 1 of a guest with the agent) or
    ``serial<port>.sock``; everything else in the XML is passed on untouched. On a ``remote``
    host no folder of ours exists (and a socket there is out of our reach): they become
    ``type='null'``.
    """
    xml = spec.xml or render_domain_xml(spec)
    if not any(s.type == "unix" and not s.path for s in spec.serials):
        return xml, None
    if remote:
        return with_serial_socket_paths(xml, lambda port: None), None
    directory = agent_root() / spec.name
    xml = with_serial_socket_paths(
        xml, lambda port: str(directory / ("agent.sock" if spec.agent and port == 1 else f"serial{port}.sock")))
    made = None
    if not directory.exists():
        directory.mkdir(mode=0o755, parents=True)  # libvirtd (root) binds the socket here
        made = directory
    return xml, made


def _run_dirs() -> list[Path]:
    dirs = [_SYSTEM_RUN]
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    dirs.append(Path(runtime) / "libvirt" / "qemu" / "run")  # qemu:///session
    return dirs


def pid_is_domain(pid: int, name: str) -> bool:
    """True when ``pid`` is a live QEMU started by libvirt for domain ``name``."""
    args = process_args(pid)
    if args is None:
        return False
    # libvirt writes -name guest=<name with ',' doubled>,debug-threads=on
    want = b"guest=" + name.replace(",", ",,").encode()
    return any(a == want or a.startswith(want + b",") and not a.startswith(want + b",,")
               for a in args)


def qemu_pid(name: str, uri: str | None = None) -> int | None:
    """The pid of the QEMU libvirt runs for domain ``name`` on this host, if it can be seen
    (libvirt's pid file, else a scan of /proc)."""
    for directory in _run_dirs():
        try:
            pid = int((directory / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_is_domain(pid, name):
            return pid
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and pid_is_domain(int(proc.name), name):
            return int(proc.name)
    return None


def _log_paths(name: str) -> tuple[Path, ...]:
    return (_SYSTEM_LOG / f"{name}.log", Path.home() / ".cache" / "libvirt" / "qemu" / "log" / f"{name}.log")


def qemu_log_size(name: str) -> int:
    """Bytes in libvirt's log of this domain's QEMU now (it is appended to on every start)."""
    for path in _log_paths(name):
        try:
            return path.stat().st_size
        except OSError:
            continue
    return 0


def qemu_log_tail(name: str, since: int = 0, limit: int = 3000) -> str:
    """The end of what libvirt logged for this domain's QEMU after byte ``since`` (root-readable
    on qemu:///system), or ''."""
    for path in _log_paths(name):
        try:
            with open(path, "rb") as handle:
                size = handle.seek(0, 2)
                handle.seek(max(since if since <= size else 0, size - limit))
                return handle.read().decode(errors="replace").strip()
        except OSError:
            continue
    return ""


def launch_log_tail(uri: str, name: str, since: int = 0) -> str:
    """The end of QEMU's log for a launch that failed on ``uri``; on a remote host, where to
    find it (this machine's log of that name is another domain's, or none)."""
    host = urlsplit(uri).hostname
    if not host:
        return qemu_log_tail(name, since)
    return f"(QEMU's log is on {host}: /var/log/libvirt/qemu/{name}.log there)"
