"""The libvirt backend: the guest protocol over libvirt-python, local or remote URIs.

:class:`LibvirtGuest` drives a domain on any libvirt URI (default ``qemu:///system``) with the
API of :class:`balloonlab.Guest` (the same method names, async choices and defaults), and
its balloon, :class:`LibvirtBalloon`, implements the same
:class:`~balloonlab.model.balloon.BalloonBase` primitives with libvirt's API. libvirt's
rules for the stats period are kept: :meth:`LibvirtGuest.launch` lets libvirt start the
domain (libvirt sets ``<stats period>`` itself before the vCPUs run); :meth:`~LibvirtGuest.attach`
sets it again only if the domain is running; :meth:`~LibvirtGuest.reconnect` never does.

Statistics come two ways (``stats_via``): ``"qmp"`` sends QEMU's own commands through
libvirt's QMP passthrough (``qemuMonitorCommand``: exact bytes, newer stats, unset values,
last-update 0; libvirt marks the domain tainted ``custom-monitor``), reusing the QEMU
backend's public :class:`~balloonlab.qemu.balloon.Balloon` over the link; ``"libvirt"`` uses
``virDomainMemoryStats`` only (libvirt's KiB back to bytes: the sub-KiB part is lost, unmapped
and unset stats are absent). ``"auto"`` picks ``"qmp"`` on a local ``qemu://`` URI. This is the
one place the two backends meet outside :mod:`balloonlab.model`: the libvirt backend may use
the QEMU backend's public QMP pieces; the QEMU backend never imports this one.

Modules: ``guest`` (lifecycle), ``balloon``, ``link`` (one domain: API calls, events,
passthrough), ``api`` (libvirt-python's event loop, errors, states), ``files`` (agent socket
dirs, QEMU pids and logs of a local daemon). Importing this package needs libvirt-python.
"""

try:
    import libvirt as _libvirt  # noqa: F401  (fail here, with the fix, not deep inside)
except ImportError as _exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "balloonlab.libvirt needs libvirt-python: pip install 'balloonlab[libvirt]' (it builds "
        "against libvirt's C library: apt-get install libvirt-dev pkg-config)") from _exc

from balloonlab.libvirt.balloon import LibvirtBalloon
from balloonlab.libvirt.files import agent_root
from balloonlab.libvirt.guest import DEFAULT_URI, LibvirtGuest
from balloonlab.model.stats import stats_from_libvirt

__all__ = ["DEFAULT_URI", "LibvirtBalloon", "LibvirtGuest", "agent_root", "stats_from_libvirt"]
