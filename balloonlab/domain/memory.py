"""NUMA cells and memory devices of domain XML, both ways, as libvirt reads and writes them.

``<cpu><numa><cell>`` becomes :class:`NumaCellSpec` and ``<devices><memory model=...>``
:class:`MemoryDeviceSpec` (formatdomain's "NUMA Node Tuning" and "Memory devices"), with
libvirt's units and defaults; :func:`memory_fields` then works out ``<memory>``,
``<maxMemory>`` and slots as libvirt's post-parse does and hands everything to
:mod:`.memory_rules`, which refuses what libvirt (or QEMU, said so) would refuse. The writers
at the bottom put the same elements back for :mod:`.render`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypedDict

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints; lxml-stubs is not installed

from balloonlab.domain.memory_rules import check_memory
from balloonlab.domain.spec import _DECIMAL, CPUMASK_LEN, MEMORY_MODELS, MemoryDeviceSpec, NumaCellSpec
from balloonlab.domain.xmlio import (_address, _alias, _driver_options, _fail, _hex, _kib, _memory,
                                     _render_address, _scaled, _shown, _sub, _text, _yesno)

_ID_TOKEN = re.compile(r"\s*(\^)?\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?\Z")
_SLOTS = re.compile(r"[0-9]{1,10}\Z")
_ACCESS = ("shared", "private")
_VIRTIO_MODELS = ("virtio-mem", "virtio-pmem")


class _SourceFields(TypedDict, total=False):
    source_pagesize_bytes: int | None
    source_nodemask: tuple[int, ...]
    source_path: str | None


class _TargetFields(TypedDict, total=False):
    size_bytes: int
    node: int | None
    label_bytes: int | None
    readonly: bool
    block_bytes: int | None
    requested_bytes: int | None
    dynamic_memslots: bool | None
    address_base: int | None


class MemoryFields(TypedDict):
    """The memory fields of a :class:`~balloonlab.domain.spec.DomainSpec`."""

    memory_bytes: int
    current_memory_bytes: int
    max_memory_bytes: int | None
    memory_slots: int | None
    numa_cells: tuple[NumaCellSpec, ...]
    memory_devices: tuple[MemoryDeviceSpec, ...]
    min_guarantee_bytes: int | None


# ---------------------------------------------------------------------------- id sets

def parse_id_set(text: str, node: etree._Element, what: str) -> tuple[int, ...]:
    """A libvirt cpuset/nodeset (virBitmapParse): ``0-3,^2,8``, ids below 16384, ascending.

    :raises DomainXMLError: for anything else, naming ``what`` (e.g. ``cell cpus``).
    """
    ids: set[int] = set()
    for token in text.split(","):
        match = _ID_TOKEN.match(token)
        if match is None or (match.group(1) and match.group(3)) or (
                match.group(3) and int(match.group(3)) < int(match.group(2))):
            _fail(f"{what}={_shown(text)} is not a valid id list; expected ids and ranges like '0-3,6' "
                  "(a '^' before an id takes it out)", node)
        first, last = int(match.group(2)), int(match.group(3) or match.group(2))
        if last >= CPUMASK_LEN:
            _fail(f"{what}={_shown(text)} names id {last}; libvirt accepts ids below {CPUMASK_LEN}", node)
        if match.group(1):
            ids.discard(first)
        else:
            ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_id_set(ids: Iterable[int]) -> str:
    """Ids as libvirt writes a bitmap (virBitmapFormat): ``(0, 1, 2, 5)`` -> ``"0-2,5"``."""
    ordered, runs = sorted(set(ids)), []
    start = None
    for index, value in enumerate(ordered):
        start = value if start is None else start
        if index + 1 == len(ordered) or ordered[index + 1] != value + 1:
            runs.append(str(value) if start == value else f"{start}-{value}")
            start = None
    return ",".join(runs)


# ---------------------------------------------------------------------------- NUMA cells

def _cell(node: etree._Element, index: int, count: int, vcpus: int) -> NumaCellSpec:
    cell_id = node.get("id")
    if cell_id is not None and not _SLOTS.match(cell_id):
        _fail(f"cell id={_shown(cell_id)} is not valid; expected a number from 0 to {count - 1}", node)
    number = int(cell_id) if cell_id is not None else index
    if number >= count:  # libvirt: "Exactly one 'cell' element per guest NUMA cell allowed, ..."
        _fail(f"cell id={number} is out of order: with {count} <cell> elements the ids must be 0 to "
              f"{count - 1}, each once", node)
    cpus_text = node.get("cpus")
    cpus = parse_id_set(cpus_text, node, "cell cpus") if cpus_text is not None else ()
    if cpus and cpus[-1] >= vcpus:  # libvirt: "CPU IDs in <numa> exceed the <vcpu> count"
        _fail(f"cell cpus={_shown(cpus_text)} names vCPU {cpus[-1]}, but the domain has {vcpus} "
              f"(<vcpu>{vcpus}</vcpu>); use ids 0 to {vcpus - 1} or raise <vcpu>", node)
    if node.get("memory") is None:
        _fail(f"<cell id='{number}'> has no memory; expected e.g. memory='524288' unit='KiB'", node)
    memory = _scaled(node.get("memory"), node.get("unit"), node, "cell memory", allow_zero=True)
    return NumaCellSpec(id=number, cpus=cpus, memory_bytes=memory)


def _numa_cells(root: etree._Element, vcpus: int) -> tuple[NumaCellSpec, ...]:
    numa = root.find("cpu/numa")
    if numa is None:
        return ()
    nodes = numa.findall("cell")
    if not nodes:
        _fail("<numa> has no <cell>; expected e.g. <cell id='0' cpus='0' memory='524288' unit='KiB'/>", numa)
    cells: dict[int, NumaCellSpec] = {}
    for index, node in enumerate(nodes):
        cell = _cell(node, index, len(nodes), vcpus)
        if cell.id in cells:
            _fail(f"a second <cell> with id {cell.id}; each NUMA cell id must appear once", node)
        for other in cells.values():
            if set(cell.cpus) & set(other.cpus):
                _fail(f"NUMA cells {cell.id} and {other.id} share vCPUs "
                      f"{format_id_set(set(cell.cpus) & set(other.cpus))}; each vCPU belongs to one cell", node)
        cells[cell.id] = cell
    if not any(cell.cpus for cell in cells.values()):  # libvirt, when it builds QEMU's -numa
        _fail("no NUMA cell has vCPUs; give at least one cell cpus=..., e.g. cpus='0'", nodes[0])
    return tuple(cells[i] for i in sorted(cells))


# ---------------------------------------------------------------------------- memory devices

def _optional_size(parent: etree._Element, path: str, what: str) -> int | None:
    node = parent.find(path)
    if node is None or _text(node) is None:  # libvirt: an empty element is an absent one
        return None
    return _scaled(node.text, node.get("unit"), node, what, allow_zero=True)


def _target_node(target: etree._Element) -> int | None:
    node = target.find("node")
    if node is None or _text(node) is None:
        return None
    if not _DECIMAL.match(node.text) or int(node.text) > 2**31 - 1:
        _fail(f"<node> {_shown(node.text.strip())} is not a guest NUMA node; expected a cell id like 0", node)
    return int(node.text)


def _source_fields(node: etree._Element, model: str) -> _SourceFields:
    source = node.find("source")
    if source is None:
        return {}
    fields: _SourceFields = {}
    if model in ("dimm", "virtio-mem"):  # libvirt: a page size of 0 is none
        fields["source_pagesize_bytes"] = _optional_size(source, "pagesize", "<pagesize>") or None
    mask_node = source.find("nodemask")
    if model in ("dimm", "virtio-mem", "sgx-epc") and (mask := _text(mask_node)) is not None:
        nodes = parse_id_set(mask, mask_node, "<nodemask>")
        if not nodes:
            _fail(f"<nodemask> {_shown(mask)} names no host node; expected e.g. <nodemask>0</nodemask>", mask_node)
        fields["source_nodemask"] = nodes
    if model in ("nvdimm", "virtio-pmem"):
        fields["source_path"] = _text(source.find("path"))
    return fields


def _target_fields(node: etree._Element, model: str) -> _TargetFields:
    target = node.find("target")
    if target is None:
        _fail(f"<memory model='{model}'> has no <target>; expected e.g. <target><size unit='MiB'>256</size>"
              "<node>0</node></target>", node)
    size_node = target.find("size")
    if size_node is None or _text(size_node) is None:
        _fail(f"<memory model='{model}'> needs <target><size>; expected e.g. <size unit='MiB'>256</size>", target)
    size = _memory(size_node)  # QEMU refuses an empty backend: size 0 is refused here already
    fields: _TargetFields = {"size_bytes": size, "node": _target_node(target)}
    if model == "nvdimm":
        label_node = target.find("label/size")
        label = _optional_size(target, "label/size", "nvdimm label <size>") or None
        if label is not None and label < 128 * 1024:
            _fail("the nvdimm label must be at least 128 KiB; expected e.g. <label><size unit='KiB'>128</size>"
                  "</label>", label_node)
        if label is not None and label >= size:
            _fail(f"the nvdimm label ({label // 1024} KiB) must be smaller than its <size> ({size // 1024} KiB)",
                  label_node)
        fields["label_bytes"], fields["readonly"] = label, target.find("readonly") is not None
    if model == "virtio-mem":
        fields["block_bytes"] = _optional_size(target, "block", "<block>")
        fields["requested_bytes"] = _optional_size(target, "requested", "<requested>")
        fields["dynamic_memslots"] = _yesno(target, "dynamicMemslots")
    if model in _VIRTIO_MODELS and (address := target.find("address")) is not None:
        fields["address_base"] = _hex(address, "base") or None  # libvirt: base 0 is none
    return fields


def _memory_device(node: etree._Element) -> MemoryDeviceSpec:
    model = node.get("model")
    if model not in MEMORY_MODELS:
        _fail(f"unknown memory device model {_shown(model)}; expected one of {', '.join(MEMORY_MODELS)}", node)
    access = node.get("access")
    if access is not None and access not in _ACCESS:
        _fail(f"access={_shown(access)} is not valid; expected 'shared' or 'private'", node)
    return MemoryDeviceSpec(
        model=model, access=access, discard=_yesno(node, "discard"), alias=_alias(node),
        address=_address(node.find("address")),
        driver_options=_driver_options(node) if model in _VIRTIO_MODELS else (),
        **_source_fields(node, model), **_target_fields(node, model))


# ---------------------------------------------------------------------------- the domain's memory

def memory_fields(root: etree._Element, vcpus: int, arch: str | None) -> MemoryFields:
    """``<memory>``, ``<currentMemory>``, ``<maxMemory>``, NUMA cells and memory devices, checked.

    Without ``<memory>`` the total is the cells' memory plus the devices', as libvirt makes it;
    ``currentMemory`` of 0 or above the total becomes the total.

    :raises DomainXMLError: for what libvirt refuses (see :func:`.memory_rules.check_memory`).
    """
    cells = _numa_cells(root, vcpus)
    nodes = root.findall("devices/memory")
    devices = tuple(_memory_device(node) for node in nodes)
    memory_node, current_node, max_node = root.find("memory"), root.find("currentMemory"), root.find("maxMemory")
    if memory_node is not None:
        memory = _memory(memory_node)
    elif cells:
        memory = sum(c.memory_bytes for c in cells) + sum(d.size_bytes for d in devices)
    else:
        _fail("missing <memory>; expected e.g. <memory unit='MiB'>512</memory> in <domain> (or NUMA cells "
              "with memory in <cpu><numa>)", root)
    slots = None
    if max_node is not None and (text := max_node.get("slots")) is not None:
        if not _SLOTS.match(text) or int(text) > 0xFFFFFFFF:
            _fail(f"maxMemory slots={_shown(text)} is not valid; expected a whole number like slots='16'", max_node)
        slots = int(text)
    fields: MemoryFields = {
        "memory_bytes": memory, "current_memory_bytes": memory,
        "max_memory_bytes": _memory(max_node) if max_node is not None else None,
        "memory_slots": slots, "numa_cells": cells, "memory_devices": devices,
        "min_guarantee_bytes": _min_guarantee(root)}
    check_memory(root, fields, nodes, arch)
    current = _memory(current_node, allow_zero=True) if current_node is not None else memory
    fields["current_memory_bytes"] = current if 0 < current <= memory else memory  # as libvirt
    return fields


def _min_guarantee(root: etree._Element) -> int | None:
    """``<memtune><min_guarantee>`` in bytes (libvirt accepts it and QEMU ignores it: balloonlab's
    policies keep every target at or above it, as MOM's balloon-qos.rules do)."""
    node = root.find("memtune/min_guarantee")
    return _memory(node, allow_zero=True) if node is not None else None


# ---------------------------------------------------------------------------- writing

def render_numa(root: etree._Element, cells: tuple[NumaCellSpec, ...]) -> None:
    """Append ``<cpu><numa><cell .../></numa></cpu>`` for ``cells`` (nothing without cells)."""
    if not cells:
        return
    numa = _sub(_sub(root, "cpu"), "numa")
    for cell in cells:
        _sub(numa, "cell", id=str(cell.id), cpus=format_id_set(cell.cpus) if cell.cpus else None,
             memory=_kib(cell.memory_bytes), unit="KiB")


def render_memory_device(devices: etree._Element, device: MemoryDeviceSpec) -> None:
    """Append ``<memory model=...>`` for ``device``, children in libvirt's order."""
    yesno = {True: "yes", False: "no", None: None}
    node = _sub(devices, "memory", model=device.model, access=device.access, discard=yesno[device.discard])
    if device.driver_options:
        _sub(node, "driver", **{name: "on" if on else "off" for name, on in device.driver_options})
    if device.source_path or device.source_pagesize_bytes or device.source_nodemask:
        source = _sub(node, "source")
        if device.source_nodemask:
            _sub(source, "nodemask", format_id_set(device.source_nodemask))
        if device.source_pagesize_bytes:
            _sub(source, "pagesize", _kib(device.source_pagesize_bytes), unit="KiB")
        if device.source_path:
            _sub(source, "path", device.source_path)
    target = _sub(node, "target", dynamicMemslots=yesno[device.dynamic_memslots])
    _sub(target, "size", _kib(device.size_bytes), unit="KiB")
    if device.node is not None:
        _sub(target, "node", str(device.node))
    if device.label_bytes:
        _sub(_sub(target, "label"), "size", _kib(device.label_bytes), unit="KiB")
    for tag, value in (("block", device.block_bytes), ("requested", device.requested_bytes)):
        if value is not None:
            _sub(target, tag, _kib(value), unit="KiB")
    if device.address_base:
        _sub(target, "address", base=f"0x{device.address_base:x}")
    if device.readonly:
        _sub(target, "readonly")
    if device.alias is not None:
        _sub(node, "alias", name=device.alias)
    if device.address is not None:
        _render_address(node, device.address)
