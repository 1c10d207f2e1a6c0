"""QEMU's balloon device types, from the domain XML's model and address: one table.

The argv builder names the ``-device`` driver from it, and discovery looks for the same QOM
type in the object tree (a walk for ``virtio-balloon-pci`` never finds a
``-non-transitional`` device, so the type must come from the model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from balloonlab.domain import MemballoonSpec

#: ``<memballoon model=...>`` -> QEMU's PCI device type.
PCI_TYPES: dict[str, str] = {
    "virtio": "virtio-balloon-pci",
    "virtio-transitional": "virtio-balloon-pci-transitional",
    "virtio-non-transitional": "virtio-balloon-pci-non-transitional",
}
#: ``<address type=...>`` -> QEMU's device type, for the transports that are not PCI.
TRANSPORT_TYPES: dict[str, str] = {"ccw": "virtio-balloon-ccw", "virtio-mmio": "virtio-balloon-device"}
#: Every balloon QOM type QEMU has, for guests whose domain XML is unknown.
ALL_BALLOON_TYPES: tuple[str, ...] = (*PCI_TYPES.values(), *TRANSPORT_TYPES.values())


def balloon_device_type(model: str, address_type: str) -> str:
    """The ``-device`` driver for a balloon ``model`` on an ``address_type`` bus (pci, ccw, virtio-mmio).

    :raises ValueError: a model QEMU has no device for (``xen``).
    """
    if address_type in TRANSPORT_TYPES:
        return TRANSPORT_TYPES[address_type]
    if model not in PCI_TYPES:
        raise ValueError(f"memballoon model {model!r} has no QEMU device; expected one of {', '.join(PCI_TYPES)}")
    return PCI_TYPES[model]


def balloon_qom_types(spec: MemballoonSpec | None) -> tuple[str, ...]:
    """The QOM type names a balloon of this spec can have (all of them when unknown)."""
    if spec is None:
        return ALL_BALLOON_TYPES
    address = spec.address.type if spec.address is not None else None
    if address in TRANSPORT_TYPES:
        return (TRANSPORT_TYPES[address],)
    if spec.model in PCI_TYPES and address in (None, "pci"):
        # With no explicit address the machine decides (ccw on s390x, mmio on microvm).
        return (PCI_TYPES[spec.model],) if address == "pci" else (PCI_TYPES[spec.model], *TRANSPORT_TYPES.values())
    return ALL_BALLOON_TYPES
