"""The QEMU backend: balloonlab's own QEMU processes and QMP connections.

``monitor`` is the one QMP connection (qemu.qmp's ``QMPClient``) and ``transport`` the
protocol it shares with libvirt's passthrough; ``discovery`` finds the balloon in QOM
(cached per connection, a failed search too); ``balloon`` drives it over QMP; ``devices``
maps a ``<memballoon>`` to QEMU's device types; ``argv`` builds the command line from a
DomainSpec; ``guest`` is the lifecycle (launch paused, set the period, ``cont``; attach;
reconnect); ``fleet`` attaches many at once, bounded, and lists this host's guests;
``registry`` keeps each guest's runtime dir and record, ``reaper`` stops an owned guest when
its owner dies.
"""

from balloonlab.qemu.balloon import Balloon
from balloonlab.qemu.fleet import attach_many, list_guests
from balloonlab.qemu.guest import Guest
from balloonlab.qemu.monitor import Monitor
from balloonlab.qemu.transport import QMPEvent, QMPTransport

__all__ = ["Balloon", "Guest", "Monitor", "QMPEvent", "QMPTransport", "attach_many", "list_guests"]
