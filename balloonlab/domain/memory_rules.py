"""What libvirt refuses about a domain's memory devices, NUMA cells and ``<maxMemory>``.

Each rule names where libvirt (9.0 and 11.3 alike unless said) has it, and each refusal says
what to change. libvirt checks these when it defines or starts a domain; balloonlab checks them
when it parses, so nothing is launched for an XML that cannot run. Two rules are QEMU's, not
libvirt's (QEMU refuses them when the device is created): a virtio-mem size that is not a
multiple of its block size, and a block size below the page size of its ``<source>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints; lxml-stubs is not installed

from balloonlab.domain.spec import VIRTIO_MEM_MIN_BLOCK_BYTES, MemoryDeviceSpec, NumaCellSpec
from balloonlab.domain.xmlio import _fail

if TYPE_CHECKING:
    from balloonlab.domain.memory import MemoryFields

#: Address types libvirt allows per memory device model (qemuDomainDefValidateMemoryHotplugDevice).
_ADDRESS_TYPES = {"dimm": "dimm", "nvdimm": "dimm", "virtio-pmem": "pci", "virtio-mem": "pci"}
_GIB = 1 << 30


def _kib(nbytes: int) -> str:
    return f"{nbytes // 1024} KiB"


def _suggested_max(fields: MemoryFields) -> int:
    needed = max(fields["memory_bytes"], _initial(fields) + sum(d.size_bytes for d in fields["memory_devices"]))
    return -(-needed // _GIB) * _GIB


def _initial(fields: MemoryFields) -> int:
    if fields["numa_cells"]:
        return sum(c.memory_bytes for c in fields["numa_cells"])
    return fields["memory_bytes"] - sum(d.size_bytes for d in fields["memory_devices"])


def _check_node(device: MemoryDeviceSpec, node: etree._Element, cells: tuple[NumaCellSpec, ...]) -> None:
    # virDomainMemoryDefValidate and qemuDomainDefValidateMemoryHotplugDevice
    where = f"<memory model='{device.model}'>"
    if device.node is not None and not cells:
        _fail(f"{where} names guest NUMA node {device.node}, but the domain has no NUMA cells; add "
              "<cpu><numa><cell id='0' cpus='0' memory='...' unit='KiB'/></numa></cpu> or remove <node>", node)
    if device.node is not None and device.node >= len(cells):
        _fail(f"{where} names guest NUMA node {device.node}, which is not a cell of this domain "
              f"(cells 0 to {len(cells) - 1}); use one of those in <node>", node)
    if device.model == "virtio-pmem" and device.node is not None:
        _fail("<memory model='virtio-pmem'> takes no <node> (virtio-pmem has no NUMA node); remove it", node)
    if device.node is None and cells and device.model in ("dimm", "nvdimm", "virtio-mem"):
        _fail(f"{where} needs <target><node> when the domain has NUMA cells; add e.g. <node>0</node>", node)


def _check_virtio_mem(device: MemoryDeviceSpec, node: etree._Element) -> None:
    # libvirt: virDomainMemoryDefValidate (the THP floor, power of two, requested <= size and a
    # block multiple, base aligned); QEMU: virtio_mem_device_realize (size and page size).
    block, requested, size = device.block_bytes or 0, device.requested_bytes or 0, device.size_bytes
    example = f"e.g. <block unit='KiB'>{VIRTIO_MEM_MIN_BLOCK_BYTES // 1024}</block>"
    if requested > size:
        _fail(f"virtio-mem <requested> ({_kib(requested)}) is above its <size> ({_kib(size)}); request at most "
              "the size, or raise <size>", node)
    if block & (block - 1) or not block:
        what = "missing" if device.block_bytes is None else f"{_kib(block)}, not a power of two"
        _fail(f"virtio-mem <block> is {what}; libvirt needs a power of two of at least "
              f"{_kib(VIRTIO_MEM_MIN_BLOCK_BYTES)}, {example}", node)
    if block < VIRTIO_MEM_MIN_BLOCK_BYTES:
        _fail(f"virtio-mem <block> of {_kib(block)} is below the host's huge page size; libvirt needs at least "
              f"{_kib(VIRTIO_MEM_MIN_BLOCK_BYTES)}, {example}", node)
    if device.source_pagesize_bytes is not None and block < device.source_pagesize_bytes:
        _fail(f"virtio-mem <block> of {_kib(block)} is below its <source><pagesize> of "
              f"{_kib(device.source_pagesize_bytes)} (QEMU refuses it); use a block of at least the page size", node)
    if requested % block:
        _fail(f"virtio-mem <requested> ({_kib(requested)}) is not a multiple of its <block> ({_kib(block)}); "
              f"use {_kib(requested // block * block)} or {_kib(-(-requested // block) * block)}", node)
    if size % block:
        _fail(f"virtio-mem <size> ({_kib(size)}) is not a multiple of its <block> ({_kib(block)}), which QEMU "
              f"refuses; use {_kib(size // block * block) if size >= block else _kib(block)} or "
              f"{_kib(-(-size // block) * block)}", node)
    if device.address_base is not None and device.address_base % block:
        _fail(f"virtio-mem <target><address base='0x{device.address_base:x}'> is not aligned to its <block> "
              f"({_kib(block)}); use a multiple of 0x{block:x}", node)


def _check_model(device: MemoryDeviceSpec, node: etree._Element) -> None:
    where = f"<memory model='{device.model}'>"
    if device.model in ("nvdimm", "virtio-pmem"):
        if not device.source_path:
            _fail(f"{where} needs <source><path> (its backing file); add e.g. <path>/var/lib/nvdimm0</path>", node)
        if device.discard:
            _fail(f"{where} does not support discard='yes'; remove it", node)
    if device.model == "virtio-pmem" and device.access != "shared":
        _fail("<memory model='virtio-pmem'> needs access='shared'", node)
    if device.model == "virtio-mem":
        _check_virtio_mem(device, node)
    if device.model == "sgx-epc" and device.address is not None:
        _fail("<memory model='sgx-epc'> takes no <address>; remove it", node)
    wanted = _ADDRESS_TYPES.get(device.model)
    if device.address is not None and wanted is not None and device.address.type != wanted:
        _fail(f"{where} takes only a '{wanted}' address, not type '{device.address.type}'", node)


def _check_dimm_slots(fields: MemoryFields, nodes: Sequence[etree._Element]) -> None:
    # qemuDomainDefValidateMemoryHotplug (libvirt 11 counts only dimm and nvdimm against the
    # slots; libvirt 9 counts every memory device and wants slots with any <maxMemory>).
    slots = fields["memory_slots"] or 0
    dimms = [(d, n) for d, n in zip(fields["memory_devices"], nodes, strict=True) if d.model in ("dimm", "nvdimm")]
    if len(dimms) > slots:
        _fail(f"{len(dimms)} dimm/nvdimm devices need as many memory slots, but <maxMemory> gives {slots}; "
              f"set <maxMemory slots='{len(dimms)}' ...>", dimms[slots][1])
    seen: dict[tuple[str, int], int] = {}
    for index, (device, node) in enumerate(dimms):
        address = device.address
        if address is None or address.type != "dimm":
            continue
        if (address.slot or 0) >= slots:
            _fail(f"dimm address slot {address.slot} is beyond the {slots} slots of <maxMemory>; use a slot "
                  f"from 0 to {slots - 1}", node)
        keys = [("slot", address.slot or 0)] + ([("base", address.base)] if address.base else [])
        for key in keys:
            if key in seen:
                _fail(f"dimm address {key[0]} {key[1]:#x} is already used by memory device {seen[key]}; "
                      "give each device its own", node)
            seen[key] = index


def check_memory(root: etree._Element, fields: MemoryFields, nodes: Sequence[etree._Element],
                 arch: str | None) -> None:
    """Refuse memory settings libvirt refuses, each with the line and what to change.

    :param fields: the parsed memory fields (``memory_devices`` in the order of ``nodes``).
    :param nodes: the ``<memory model=...>`` elements, for line numbers.
    :param arch: the guest arch (None: the host's, x86_64 here).
    :raises DomainXMLError: the first rule broken.
    """
    devices, cells, memory = fields["memory_devices"], fields["numa_cells"], fields["memory_bytes"]
    max_memory, max_node = fields["max_memory_bytes"], root.find("maxMemory")
    total_devices = sum(d.size_bytes for d in devices)
    for device, node in zip(devices, nodes, strict=True):
        _check_node(device, node, cells)
        _check_model(device, node)
    # virDomainDefPostParseMemory
    if not cells and total_devices >= memory:
        _fail(f"the memory devices add up to {_kib(total_devices)}, leaving nothing of <memory> "
              f"({_kib(memory)}), which counts them in; raise <memory> to the boot memory plus the devices",
              root.find("memory"))
    if max_memory is not None and max_memory < memory:
        _fail(f"<maxMemory> ({_kib(max_memory)}) is below <memory> ({_kib(memory)}); libvirt wants it at "
              "least as large", max_node)
    # qemuDomainDefValidateMemoryHotplug
    if devices and max_memory is None:
        _fail(f"<memory model='{devices[0].model}'> needs <maxMemory> in <domain>: libvirt refuses memory devices "
              f"without it; add e.g. <maxMemory slots='{max(1, len(devices))}' unit='KiB'>"
              f"{_suggested_max(fields) // 1024}</maxMemory>", nodes[0])
    if max_memory is None:
        return
    if not cells and not (arch or "").startswith(("ppc64", "s390")):
        _fail("<maxMemory> (memory hotplug) needs guest NUMA cells: libvirt wants at least one; add "
              f"<cpu><numa><cell id='0' cpus='0' memory='{_initial(fields) // 1024}' unit='KiB'/></numa></cpu>",
              max_node)
    _check_dimm_slots(fields, nodes)
    space = max_memory - _initial(fields)
    if total_devices > space:
        _fail(f"the memory devices add up to {_kib(total_devices)}, more than the {_kib(space)} <maxMemory> "
              f"leaves above the boot memory ({_kib(_initial(fields))}); raise <maxMemory> to at least "
              f"{_kib(_suggested_max(fields))} or shrink the devices", max_node)
