"""The statistics polling period: what QEMU and libvirt accept, checked before either sees it.

QEMU keeps ``guest-stats-polling-interval`` in a uint32; libvirt keeps ``<stats period>`` and
``virDomainSetMemoryStatsPeriod``'s argument in a C int, so a domain XML (and the libvirt
backend) allows less than QEMU itself. Both limits live here, once.
"""

from __future__ import annotations

#: QEMU's limit (uint32 seconds).
QEMU_MAX_PERIOD_S = 2**32 - 1
#: libvirt's limit (C int seconds): the domain XML and the libvirt backend use this one.
LIBVIRT_MAX_PERIOD_S = 2**31 - 1
#: The QMP property that holds the period.
POLLING_PROPERTY = "guest-stats-polling-interval"


def validate_period(seconds: object, limit: int = QEMU_MAX_PERIOD_S) -> int:
    """Check a polling period the way QEMU (or libvirt) will, before it does, with a clearer message.

    :param limit: the highest period allowed (:data:`QEMU_MAX_PERIOD_S` or
        :data:`LIBVIRT_MAX_PERIOD_S`).
    :raises TypeError: not an int (``True``, ``1.5`` and ``"5"`` are refused, as QEMU does).
    :raises ValueError: outside 0..limit.
    """
    if type(seconds) is not int:
        raise TypeError(f"stats period must be an int number of seconds (0 disables polling), "
                        f"got {seconds!r} ({type(seconds).__name__})")
    if not 0 <= seconds <= limit:
        why = " (libvirt keeps it in a C int)" if limit == LIBVIRT_MAX_PERIOD_S else ""
        raise ValueError(f"stats period must be between 0 (disable) and {limit} seconds{why}, got {seconds}")
    return seconds
