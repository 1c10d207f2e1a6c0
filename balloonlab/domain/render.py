"""DomainSpec -> libvirt domain XML, small edits of XML, and the built-in guest's domain."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints; lxml-stubs is not installed

from balloonlab.domain.memory import render_memory_device, render_numa
from balloonlab.domain.parse import _parse_root, parse_domain_xml
from balloonlab.domain.spec import (
    _GUEST_NAME,
    _QEMU_ID,
    BALLOON_MODELS,
    BALLOONLAB_NS,
    VIRTIO_MEM_MIN_BLOCK_BYTES,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    MemballoonSpec,
    MemoryDeviceSpec,
    NumaCellSpec,
    SerialSpec,
)
from balloonlab.domain.xmlio import _kib, _render_address, _round_up_kib, _sub
from balloonlab.model.errors import DomainXMLError
from balloonlab.model.period import LIBVIRT_MAX_PERIOD_S
from balloonlab.model.units import parse_size


def _render_memballoon(devices: etree._Element, balloon: MemballoonSpec | None) -> None:
    if balloon is None:
        _sub(devices, "memballoon", model="none")
        return
    if balloon == MemballoonSpec(model=balloon.model, implicit=True):
        return  # libvirt adds this very default itself; leaving it out keeps it implicit
    onoff = {True: "on", False: "off", None: None}
    node = _sub(devices, "memballoon", model=balloon.model, autodeflate=onoff[balloon.autodeflate],
                freePageReporting=onoff[balloon.free_page_reporting])
    if balloon.period_s is not None:  # libvirt drops period 0 when it formats; we keep it
        _sub(node, "stats", period=str(balloon.period_s))
    if balloon.alias is not None:
        _sub(node, "alias", name=balloon.alias)
    if balloon.address is not None:
        _render_address(node, balloon.address)
    if balloon.driver_options:
        _sub(node, "driver", **{name: onoff[value] for name, value in balloon.driver_options})


def _render_disk(devices: etree._Element, disk: DiskSpec) -> None:
    if disk.target is None:
        raise ValueError(f"disk {disk.source!r} has no target; libvirt requires <target dev=...>")
    block = disk.source.startswith("/dev/")
    node = _sub(devices, "disk", type="block" if block else "file", device=disk.device)
    _sub(node, "driver", name="qemu", type=disk.format)
    _sub(node, "source", **{"dev" if block else "file": disk.source})
    _sub(node, "target", dev=disk.target, bus=disk.bus)
    if disk.readonly:
        _sub(node, "readonly")


def _render_serial(devices: etree._Element, serial: SerialSpec) -> None:
    node = _sub(devices, "serial", type=serial.type)
    if serial.type == "unix":
        _sub(node, "source", mode="bind", path=serial.path)
    elif serial.path is not None:
        _sub(node, "source", path=serial.path)
    _sub(node, "target", port=str(serial.port))


def _render_channel(devices: etree._Element, channel: ChannelSpec) -> None:
    node = _sub(devices, "channel", type=channel.type)
    if channel.type == "unix":  # no path: libvirt picks one (and balloonlab's launcher too)
        _sub(node, "source", mode=channel.mode, path=channel.path)
    elif channel.path is not None:
        _sub(node, "source", path=channel.path)
    _sub(node, "target", type=channel.target_type, name=channel.target_name)


def render_domain_xml(spec: DomainSpec) -> str:
    """Write ``spec`` as libvirt domain XML (memory in KiB, rounded up).

    ``parse_domain_xml(render_domain_xml(s))`` equals ``s`` except for ``xml``. An implicit
    balloon with default settings is left out (libvirt adds it again).

    :raises ValueError: for a disk without a target (libvirt needs ``<target dev=...>``).
    """
    root = etree.Element("domain", type=spec.domain_type)
    _sub(root, "name", spec.name)
    if spec.uuid is not None:
        _sub(root, "uuid", spec.uuid)
    if spec.agent:
        guest = etree.SubElement(_sub(root, "metadata"), f"{{{BALLOONLAB_NS}}}guest",
                                 nsmap={"balloonlab": BALLOONLAB_NS})
        guest.set("agent", "serial1")
    if spec.max_memory_bytes is not None:
        slots = str(spec.memory_slots) if spec.memory_slots is not None else None
        _sub(root, "maxMemory", _kib(spec.max_memory_bytes), slots=slots, unit="KiB")
    _sub(root, "memory", _kib(spec.memory_bytes), unit="KiB")
    _sub(root, "currentMemory", _kib(spec.current_memory_bytes), unit="KiB")
    if spec.min_guarantee_bytes is not None:
        _sub(_sub(root, "memtune"), "min_guarantee", _kib(spec.min_guarantee_bytes), unit="KiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    os_node = _sub(root, "os")
    _sub(os_node, "type", "hvm", arch=spec.arch, machine=spec.machine)
    for tag in ("kernel", "initrd", "cmdline"):
        if getattr(spec, tag) is not None:
            _sub(os_node, tag, getattr(spec, tag))
    render_numa(root, spec.numa_cells)
    devices = _sub(root, "devices")
    if spec.emulator is not None:
        _sub(devices, "emulator", spec.emulator)
    for disk in spec.disks:
        _render_disk(devices, disk)
    for serial in spec.serials:
        _render_serial(devices, serial)
    for channel in spec.channels:
        _render_channel(devices, channel)
    _render_memballoon(devices, spec.memballoon)
    for device in spec.memory_devices:
        render_memory_device(devices, device)
    xml: str = etree.tostring(root, pretty_print=True, encoding="unicode")
    return xml


def with_serial_socket_paths(xml: str, path_for_port: Callable[[int], str | None]) -> str:
    """Give every ``<serial type='unix'>`` without a ``<source path>`` one, editing nothing else.

    balloonlab's launcher picks serial socket paths itself, so its XML leaves them out;
    libvirt refuses that ("Missing source path attribute for char device"). ``<channel>``
    elements are left as they are: libvirt picks the path of a unix channel without one itself
    (on a remote host too).

    :param path_for_port: the socket path for a serial port number; None makes the port
        ``type='null'`` (connected to nothing: a remote host, where no path of ours exists).
    """
    root, _ = _parse_root(xml)
    for index, serial in enumerate(root.findall("devices/serial")):
        source = serial.find("source")
        if serial.get("type") != "unix" or (source is not None and source.get("path")):
            continue
        if source is None:
            source = etree.Element("source", mode="bind")
            serial.insert(0, source)
        target = serial.find("target")
        port = int(target.get("port", index)) if target is not None else index
        path = path_for_port(port)
        if path is None:
            serial.set("type", "null")
            serial.remove(source)
            continue
        source.set("path", path)
    edited: str = etree.tostring(root, encoding="unicode")
    return edited


def with_changes(spec: DomainSpec, **fields: Any) -> DomainSpec:
    """:func:`dataclasses.replace` that also re-renders ``xml`` so it matches the new fields.

    :raises TypeError: when ``xml`` is passed (it is derived) or a field name is unknown.
    """
    if "xml" in fields:
        raise TypeError("xml is derived from the other fields; change those instead")
    changed = dataclasses.replace(spec, **fields)
    return dataclasses.replace(changed, xml=render_domain_xml(changed))


# ---------------------------------------------------------------------------- built-in guest

def _size_arg(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be bytes (int) or a size like '512M', got {type(value).__name__}")
    nbytes = _round_up_kib(parse_size(value))
    if nbytes <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return nbytes


#: What ``virtio_mem=`` of :func:`builtin_domain` takes: a size, (size, requested) or (size, requested, block).
VirtioMemArg = int | str | tuple[int | str, int | str] | tuple[int | str, int | str, int | str]
_GIB = 1 << 30


def _virtio_mem_device(value: VirtioMemArg) -> MemoryDeviceSpec:
    parts = value if isinstance(value, tuple) else (value,)
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"virtio_mem must be a size, (size, requested) or (size, requested, block), got {value!r}")
    size = _size_arg("virtio_mem size", parts[0])
    requested = 0 if len(parts) < 2 or parts[1] in (0, "0") else _size_arg("virtio_mem requested", parts[1])
    block = VIRTIO_MEM_MIN_BLOCK_BYTES if len(parts) < 3 else _size_arg("virtio_mem block", parts[2])
    return MemoryDeviceSpec("virtio-mem", size, node=0, block_bytes=block, requested_bytes=requested)


def _with_virtio_mem(spec: DomainSpec, device: MemoryDeviceSpec, value: VirtioMemArg) -> DomainSpec:
    """``spec`` with one virtio-mem device, as libvirt wants it: NUMA cell 0 holding the boot
    memory and every vCPU, ``<memory>`` = boot memory + device, and a ``<maxMemory>`` of that
    rounded up to a GiB (1 slot, which libvirt 9 requires): a maxmem that boots under TCG, where
    QEMU's default 40 physical address bits refuse a maxmem of 1 TiB ("phys-bits too low")."""
    total = spec.memory_bytes + device.size_bytes
    spec = dataclasses.replace(
        spec, memory_bytes=total, max_memory_bytes=-(-total // _GIB) * _GIB, memory_slots=1,
        numa_cells=(NumaCellSpec(0, tuple(range(spec.vcpus)), spec.memory_bytes),), memory_devices=(device,))
    try:
        parse_domain_xml(render_domain_xml(spec))
    except DomainXMLError as error:  # the same rules as any domain XML, said about the argument
        raise ValueError(f"virtio_mem={value!r}: {error.message}") from None
    return spec


def _check_builtin_args(args: dict[str, object]) -> None:
    for key in ("name", "kernel", "initrd", "cmdline", "machine", "model", "domain_type"):
        if not isinstance(args[key], str):
            raise TypeError(f"{key} must be a str, got {type(args[key]).__name__}")
        if not args[key] and key != "cmdline":
            raise ValueError(f"{key} must not be empty")
    for key in ("autodeflate", "free_page_reporting"):
        if args[key] is not None and not isinstance(args[key], bool):
            raise TypeError(f"{key} must be True, False or None, got {args[key]!r}")
    vcpus, period, alias = args["vcpus"], args["period_s"], args["alias"]
    if not _GUEST_NAME.match(str(args["name"])):
        raise ValueError(f"name {args['name']!r} is not usable; expected letters, digits, '_', '.', '+', '-'")
    if type(vcpus) is not int or vcpus < 1:
        raise ValueError(f"vcpus must be an int >= 1, got {vcpus!r}")
    if period is not None and (type(period) is not int or not 0 <= period <= LIBVIRT_MAX_PERIOD_S):
        raise ValueError(f"period_s must be None or an int from 0 to {LIBVIRT_MAX_PERIOD_S}, got {period!r}")
    if args["model"] not in BALLOON_MODELS[:3] + ("none",):
        raise ValueError(f"model {args['model']!r} is not a QEMU balloon; expected virtio, "
                         "virtio-transitional, virtio-non-transitional or none")
    if alias is not None and (not isinstance(alias, str) or not _QEMU_ID.match(alias)):
        raise ValueError(f"alias {alias!r} is not a valid QEMU device id")
    if args["domain_type"] not in ("qemu", "kvm"):
        raise ValueError(f"domain_type must be 'qemu' or 'kvm', got {args['domain_type']!r}")


def builtin_domain(*, name: str, kernel: str, initrd: str, cmdline: str, memory: int | str = "512M",
                   current_memory: int | str | None = None, vcpus: int = 1, period_s: int | None = 1,
                   model: str = "virtio", alias: str | None = None, autodeflate: bool | None = None,
                   free_page_reporting: bool | None = None, machine: str = "pc",
                   domain_type: str = "qemu", emulator: str | None = None,
                   virtio_mem: VirtioMemArg | None = None, min_guarantee: int | str | None = None) -> DomainSpec:
    """The domain of balloonlab's built-in test guest: x86_64, direct kernel boot, no disks.

    It carries the workload agent (``agent=True``): serial port 0 is the console, port 1 the
    agent (the launcher decides where both go). ``xml`` is filled by :func:`render_domain_xml`.

    :param memory: bytes (int) or a size like ``"512M"`` (:func:`balloonlab.model.units.parse_size`),
        rounded up to a whole KiB: the memory the guest boots with. ``current_memory`` likewise
        (the balloon's initial target); None means all of it (virtio-mem's size included).
    :param virtio_mem: one virtio-mem device (QEMU id ``virtiomem0``, guest node 0): its size
        (``"256M"``), or ``(size, requested)``, or ``(size, requested, block)``; requested 0 and
        a 2 MiB block by default. The domain then has NUMA cell 0 (the boot memory, every vCPU),
        ``<memory>`` = memory + size, and ``<maxMemory slots='1'>`` of that rounded up to a GiB.
    :param period_s: the balloon stats period in seconds (None: no ``<stats>``, 0: disabled).
    :param model: virtio, virtio-transitional, virtio-non-transitional, or none (no balloon).
    :param alias: the balloon's device id (QEMU rules; libvirt keeps only ``ua-`` aliases).
    :param emulator: the QEMU binary (``<emulator>``); None: ``qemu-system-x86_64`` from PATH.
    :param min_guarantee: ``<memtune><min_guarantee>`` (bytes or a size): the least memory a
        policy leaves this guest.
    :raises TypeError: for an argument of the wrong type.
    :raises ValueError: for an out-of-range value, e.g. current_memory above memory.
    """
    _check_builtin_args(dict(locals()))
    memory_bytes = _size_arg("memory", memory)
    device = _virtio_mem_device(virtio_mem) if virtio_mem is not None else None
    total = memory_bytes + (device.size_bytes if device is not None else 0)
    current = total if current_memory is None else _size_arg("current_memory", current_memory)
    if current > total:
        raise ValueError(f"current_memory ({current} bytes) must not exceed memory ({total} bytes"
                         + (", virtio-mem included)" if device is not None else ")"))
    balloon = None if model == "none" else MemballoonSpec(
        model=model, alias=alias, autodeflate=autodeflate, free_page_reporting=free_page_reporting,
        period_s=period_s)
    spec = DomainSpec(name=name, uuid=None, domain_type=domain_type, memory_bytes=memory_bytes,
                      current_memory_bytes=current, max_memory_bytes=None, vcpus=vcpus, arch="x86_64",
                      machine=machine, emulator=emulator, kernel=kernel, initrd=initrd,
                      cmdline=cmdline or None, disks=(),
                      serials=(SerialSpec("pty", 0), SerialSpec("unix", 1)),
                      memballoon=balloon, agent=True,
                      min_guarantee_bytes=None if min_guarantee is None else _size_arg("min_guarantee", min_guarantee))
    if spec.min_guarantee_bytes is not None and spec.min_guarantee_bytes > total:
        raise ValueError(f"min_guarantee ({spec.min_guarantee_bytes} bytes) must not exceed memory ({total} bytes)")
    if device is not None and virtio_mem is not None:
        spec = _with_virtio_mem(spec, device, virtio_mem)
    return dataclasses.replace(spec, xml=render_domain_xml(spec))
