"""A domain's memory on the QEMU command line, as libvirt writes it: ``-m``, NUMA nodes, memory devices.

libvirt's rules (qemu_command.c and qemuDomainAlignMemorySizes, the same in 9.0 and 11.3):

- ``-m size=`` is the boot memory: the NUMA cells' memory, each rounded up to 1 MiB (256 MiB on
  ppc64), when there are cells; else ``<memory>`` less the memory devices, rounded up. With
  ``<maxMemory>`` it carries ``slots=`` (when given) and ``maxmem=`` (rounded up likewise).
- each NUMA cell gets ``-object memory-backend-ram`` ``ram-node<N>`` of its rounded size and
  ``-numa node,nodeid=N,cpus=...,memdev=ram-node<N>`` (QEMU >= 5.1 refuses ``-numa node,mem=``).
- each memory device gets a backend ``mem<alias>`` and a ``-device``; sizes are rounded up to
  2 MiB (256 MiB on ppc64); aliases are libvirt's (``virtiomem<N>`` in order, ``dimm<slot>``).

Where libvirt would back memory with files (hugepages ``<source><pagesize>``,
``<memoryBacking>``, memAccess) balloonlab uses ``memory-backend-ram`` all the same, and it
writes no ``-numa dist`` or HMAT lines. Pure functions; :mod:`.argv` puts them into the argv.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from balloonlab.domain import AddressSpec, DomainSpec, MemoryDeviceSpec

#: libvirt's names for the ``<driver>`` virtio options on the QEMU command line.
VIRTIO_OPTION_PROPERTIES = {"iommu": "iommu_platform", "ats": "ats", "packed": "packed",
                            "page_per_vq": "page-per-vq"}
#: QEMU device per memory device model (sgx-epc goes into -machine: balloonlab does not launch it).
MEMORY_DEVICE_TYPES = {"dimm": "pc-dimm", "nvdimm": "nvdimm", "virtio-pmem": "virtio-pmem-pci",
                       "virtio-mem": "virtio-mem-pci"}
#: The memory devices :func:`memory_device_args` launches; the others need files balloonlab does not make.
LAUNCHED_MODELS = ("dimm", "virtio-mem")
_ALIAS_PREFIX = {"dimm": "dimm", "nvdimm": "nvdimm", "virtio-pmem": "virtiopmem", "virtio-mem": "virtiomem",
                 "sgx-epc": "epc"}
_MIB = 1024  # KiB


def _json(value: Mapping[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _ppc64(spec: DomainSpec) -> bool:
    return (spec.arch or "").startswith("ppc64")


def _round_kib(nbytes: int, align_kib: int) -> int:
    kib = -(-nbytes // 1024)
    return -(-kib // align_kib) * align_kib


def _align_kib(spec: DomainSpec) -> int:
    return 256 * _MIB if _ppc64(spec) else _MIB


def initial_memory_kib(spec: DomainSpec) -> int:
    """``-m size`` in KiB: libvirt's boot memory, aligned (see the module's rules)."""
    align = _align_kib(spec)
    if spec.numa_cells:
        return sum(_round_kib(cell.memory_bytes, align) for cell in spec.numa_cells)
    return _round_kib(spec.memory_bytes - sum(d.size_bytes for d in spec.memory_devices), align)


def memory_option(spec: DomainSpec) -> str:
    """The ``-m`` value: ``size=<KiB>k``, plus ``,slots=N,maxmem=<KiB>k`` with ``<maxMemory>``.

    libvirt rounds the boot memory up to 1 MiB, so 219100 KiB becomes ``size=219136k``
    (libvirt's hostdev-pci-address test); on ppc64 to 256 MiB, the block size QEMU's pseries
    machine needs. A large maxMemory does not boot under TCG: QEMU's default 40 physical
    address bits take a maxmem below about 1000 GiB ("phys-bits too low (40)" for libvirt's
    1 TiB examples).
    """
    value = f"size={initial_memory_kib(spec)}k"
    if spec.max_memory_bytes is not None:
        if spec.memory_slots:
            value += f",slots={spec.memory_slots}"
        value += f",maxmem={_round_kib(spec.max_memory_bytes, _align_kib(spec))}k"
    return value


def numa_args(spec: DomainSpec) -> list[str]:
    """``-object memory-backend-ram`` + ``-numa node`` per NUMA cell, libvirt's ids and syntax."""
    argv: list[str] = []
    # vCPUs no cell lists go to the first cell, as libvirt >= 10 fills them in
    # (virDomainNumaFillCPUsInNode); QEMU would otherwise guess, or refuse on newer machines.
    listed = {cpu for cell in spec.numa_cells for cpu in cell.cpus}
    unlisted = tuple(cpu for cpu in range(spec.vcpus) if cpu not in listed)
    for index, cell in enumerate(spec.numa_cells):
        backend = {"qom-type": "memory-backend-ram", "id": f"ram-node{cell.id}",
                   "size": _round_kib(cell.memory_bytes, _align_kib(spec)) * 1024}
        cpus = tuple(sorted(cell.cpus + unlisted)) if index == 0 else cell.cpus
        node = f"node,nodeid={cell.id}" + "".join(f",cpus={run}" for run in _runs(cpus))
        argv += ["-object", _json(backend), "-numa", f"{node},memdev=ram-node{cell.id}"]
    return argv


def _runs(ids: tuple[int, ...]) -> list[str]:
    """``(0, 1, 2, 5)`` -> ``["0-2", "5"]``: libvirt writes one ``cpus=`` per run."""
    runs: list[str] = []
    for value in ids:
        if runs and re.fullmatch(rf"(\d+-)?{value - 1}", runs[-1]):
            runs[-1] = f"{runs[-1].split('-')[0]}-{value}"
        else:
            runs.append(str(value))
    return runs


def dimm_slots(spec: DomainSpec) -> dict[int, int]:
    """The slot of each dimm/nvdimm (by device index): its dimm address's, else the first slot
    free, in document order, as libvirt assigns them (qemuDomainAssignMemorySlots)."""
    devices = spec.memory_devices
    fixed = {i: d.address.slot or 0 for i, d in enumerate(devices)
             if d.model in ("dimm", "nvdimm") and d.address is not None and d.address.type == "dimm"}
    slots, used = dict(fixed), set(fixed.values())
    for index, device in enumerate(devices):
        if device.model in ("dimm", "nvdimm") and index not in slots:
            slots[index] = next(n for n in range(len(used) + 1) if n not in used)
            used.add(slots[index])
    return slots


def memory_device_aliases(spec: DomainSpec) -> tuple[str, ...]:
    """The QEMU ids libvirt gives the memory devices: the XML's alias, else ``dimm<slot>`` /
    ``nvdimm<slot>``, or ``virtiomem<N>`` (``virtiopmem<N>``) with N one past the highest such
    id so far (qemuAssignDeviceMemoryAlias)."""
    slots = dimm_slots(spec)
    aliases: list[str | None] = [d.alias for d in spec.memory_devices]
    for index, device in enumerate(spec.memory_devices):
        if aliases[index] is not None:
            continue
        prefix = _ALIAS_PREFIX[device.model]
        if index in slots:
            aliases[index] = f"{prefix}{slots[index]}"
        else:
            taken = [int(a[len(prefix):]) for a in aliases if a and re.fullmatch(rf"{prefix}\d+", a)]
            aliases[index] = f"{prefix}{max(taken) + 1 if taken else 0}"
    return tuple(a or "" for a in aliases)


def device_size_bytes(spec: DomainSpec, device: MemoryDeviceSpec) -> int:
    """A memory device's size as libvirt gives it to QEMU: rounded up to 2 MiB (256 MiB on ppc64)."""
    return _round_kib(device.size_bytes, 256 * _MIB if _ppc64(spec) else 2 * _MIB) * 1024


def memory_backend(spec: DomainSpec, index: int) -> dict[str, object]:
    """The ``-object`` of memory device ``index``: ``memory-backend-ram`` ``mem<alias>``, in libvirt's key order."""
    device, alias = spec.memory_devices[index], memory_device_aliases(spec)[index]
    props: dict[str, object] = {"qom-type": "memory-backend-ram", "id": f"mem{alias}"}
    if device.model == "virtio-mem":  # libvirt: virtio-mem memory is never reserved up front
        props["reserve"] = False
    props["size"] = device_size_bytes(spec, device)
    if device.source_nodemask:
        props.update({"host-nodes": list(device.source_nodemask), "policy": "bind"})
    return props


def memory_device(spec: DomainSpec, index: int) -> dict[str, object]:
    """The ``-device`` of memory device ``index`` as libvirt writes it (keys, values, order).

    A PCI address is written as libvirt writes it (``bus`` ``pci.<N>``, ``addr``); the launcher
    keeps it only on the machine's root bus, as it does for the balloon.
    """
    device, alias = spec.memory_devices[index], memory_device_aliases(spec)[index]
    props: dict[str, object] = {"driver": MEMORY_DEVICE_TYPES[device.model]}
    props.update((VIRTIO_OPTION_PROPERTIES[name], on) for name, on in device.driver_options)
    if device.node is not None:
        props["node"] = device.node
    for key, value in (("label-size", device.label_bytes), ("block-size", device.block_bytes),
                       ("requested-size", device.requested_bytes)):
        if value:  # libvirt leaves sizes of 0 out
            props[key] = value
    if device.readonly:
        props["unarmed"] = True
    props["memdev"] = f"mem{alias}"
    if device.address_base:
        props["memaddr"] = device.address_base
    if device.dynamic_memslots is not None:
        props["dynamic-memslots"] = device.dynamic_memslots
    props["id"] = alias
    address = device.address
    if device.model in ("dimm", "nvdimm"):
        props["slot"] = dimm_slots(spec)[index]
        if address is not None and address.base:
            props["addr"] = address.base
    else:
        props.update(pci_placement(address))
    return props


def pci_placement(address: AddressSpec | None) -> dict[str, object]:
    """``bus`` and ``addr`` of a device at the PCI address its XML fixes; nothing for another
    address type, or for ``<address type='pci'/>`` with its numbers all 0 or absent, which asks
    libvirt to pick a slot (QEMU picks it here)."""
    if address is None or address.type != "pci" or not address.placed:
        return {}
    function = f".0x{address.function:x}" if address.function else ""
    return {"bus": f"pci.{address.bus or 0}", "addr": f"0x{address.slot or 0:x}{function}"}
