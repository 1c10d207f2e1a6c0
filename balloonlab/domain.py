"""libvirt domain XML <-> :class:`DomainSpec`, balloonlab's frozen description of one guest.

This is the only module in balloonlab that reads or writes domain XML (and the only one that
uses lxml). :func:`parse_domain_xml` turns what libvirt accepts into immutable dataclasses, with
libvirt's own defaults applied (memory in KiB unless ``unit=`` says otherwise, rounded up to a
whole KiB and stored in bytes; ``currentMemory`` = ``memory`` when absent; an implicit virtio
balloon when there is no ``<memballoon>``), and reports bad input as
:class:`~balloonlab.errors.DomainXMLError` with the line and element. :func:`render_domain_xml`
writes a spec back as XML libvirt accepts and :func:`builtin_domain` builds balloonlab's own test
guest. ``balloonlab.command`` turns a spec into a QEMU command line; nothing here starts anything.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import NoReturn

from lxml import etree

from balloonlab.errors import DomainXMLError
from balloonlab.units import parse_size, unit_factor

#: Namespace of balloonlab's ``<metadata>`` element marking a guest that runs the workload agent.
BALLOONLAB_NS = "https://balloonlab.dev/xmlns/guest/1"
#: ``<memballoon model=...>`` values that mean a balloon ('none' means no balloon).
BALLOON_MODELS = ("virtio", "virtio-transitional", "virtio-non-transitional", "xen")
#: ``<driver>`` virtio options of a memballoon, in libvirt's order (XML names).
VIRTIO_DRIVER_OPTIONS = ("iommu", "ats", "packed", "page_per_vq")

_PERIOD_MAX = 2**31 - 1  # libvirt keeps the period in a C int
_DECIMAL = re.compile(r"\s*[0-9]{1,20}\s*\Z")  # 20 digits: a C unsigned long long
# libvirt reads address numbers with strtoul(base 0): '18' decimal, '0x12' hex, '022' octal.
_C_UINT = re.compile(r"(0[xX][0-9a-fA-F]{1,8}|0[0-7]{0,11}|[1-9][0-9]{0,9})\Z")
_PCI_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}
_CCW_LIMITS = {"cssid": 0xFE, "ssid": 0x3, "devno": 0xFFFF}
_QEMU_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # QEMU rejects other device ids
_GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*\Z")  # safe as a runtime dir name
_ONOFF = {"on": True, "off": False}


@dataclass(frozen=True)
class AddressSpec:
    """A device address: ``type`` plus the numbers that type uses (the others are None).

    :param type: 'pci', 'ccw', 'virtio-mmio', ... as in ``<address type=...>``.
    :param domain: PCI domain; with ``bus``, ``slot``, ``function`` (type 'pci' only).
    :param cssid: CCW channel subsystem id; with ``ssid`` and ``devno`` (type 'ccw' only).
    """

    type: str
    domain: int | None = None
    bus: int | None = None
    slot: int | None = None
    function: int | None = None
    cssid: int | None = None
    ssid: int | None = None
    devno: int | None = None


@dataclass(frozen=True)
class MemballoonSpec:
    """The ``<memballoon>`` element.

    :param model: one of :data:`BALLOON_MODELS`.
    :param alias: ``<alias name=...>``: the QEMU device id (libvirt uses ``balloon0`` without it).
    :param autodeflate: ``autodeflate`` on/off, None when not given (QEMU ``deflate-on-oom``).
    :param free_page_reporting: ``freePageReporting`` on/off, None when not given.
    :param period_s: ``<stats period=...>`` in seconds, None without ``<stats>``; 0 disables.
    :param driver_options: ``<driver>`` virtio options as (XML name, on) pairs, libvirt's order.
    :param implicit: True when the XML had no ``<memballoon>`` and the default was added.
    """

    model: str
    alias: str | None = None
    address: AddressSpec | None = None
    autodeflate: bool | None = None
    free_page_reporting: bool | None = None
    period_s: int | None = None
    driver_options: tuple[tuple[str, bool], ...] = ()
    implicit: bool = False


@dataclass(frozen=True)
class DiskSpec:
    """A ``<disk>`` with a local source.

    :param source: ``<source file=...>`` or ``<source dev=...>``.
    :param format: ``<driver type=...>`` ('raw' by default, 'qcow2', ...).
    :param device: 'disk' or 'cdrom'.
    :param bus: ``<target bus=...>`` ('virtio', 'ide', 'sata', 'scsi') or None.
    :param target: ``<target dev=...>`` ('vda', 'hda', ...) or None.
    :param readonly: ``<readonly/>`` present.
    """

    source: str
    format: str = "raw"
    device: str = "disk"
    bus: str | None = None
    target: str | None = None
    readonly: bool = False


@dataclass(frozen=True)
class SerialSpec:
    """A ``<serial>`` port: chardev ``type``, ``<target port=...>``, ``<source path=...>``."""

    type: str
    port: int
    path: str | None = None


@dataclass(frozen=True)
class DomainSpec:
    """What balloonlab needs to know about a libvirt domain. Sizes are bytes (whole KiB).

    ``xml`` is the source text as given (for a spec built in Python: as rendered). Use
    :func:`with_changes` rather than :func:`dataclasses.replace` to get a spec whose ``xml``
    matches its fields.
    """

    name: str
    uuid: str | None
    domain_type: str
    memory_bytes: int
    current_memory_bytes: int
    max_memory_bytes: int | None
    vcpus: int
    arch: str | None
    machine: str | None
    emulator: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    disks: tuple[DiskSpec, ...]
    serials: tuple[SerialSpec, ...]
    memballoon: MemballoonSpec | None
    agent: bool
    xml: str = dataclasses.field(default="", repr=False)

    @property
    def has_balloon(self) -> bool:
        """True unless the domain says ``<memballoon model='none'/>``."""
        return self.memballoon is not None

    @property
    def period_s(self) -> int | None:
        """The balloon's stats period in seconds, None without a balloon or ``<stats>``."""
        return self.memballoon.period_s if self.memballoon is not None else None


# ---------------------------------------------------------------------------- parsing helpers

def _tag(node: etree._Element) -> str:
    return etree.QName(node).localname


def _fail(message: str, node: etree._Element | None = None, element: str | None = None) -> NoReturn:
    raise DomainXMLError(message, line=node.sourceline if node is not None else None,
                         element=element or (_tag(node) if node is not None else None))


def _text(node: etree._Element | None) -> str | None:
    if node is None or node.text is None or not node.text.strip():
        return None
    return node.text.strip()


def _round_up_kib(nbytes: int) -> int:
    return -(-nbytes // 1024) * 1024


def _memory(node: etree._Element, *, allow_zero: bool = False) -> int:
    """Bytes of a ``<memory>``-like element, rounded up to a whole KiB as libvirt does."""
    unit = node.get("unit", "KiB")
    try:
        factor = unit_factor(unit)
    except ValueError as exc:
        _fail(str(exc), node)
    text = node.text or ""
    if not _DECIMAL.match(text) or (int(text) == 0 and not allow_zero):
        _fail(f"<{_tag(node)}> must be a positive integer number of {unit}, got {text.strip()!r}", node)
    return _round_up_kib(int(text) * factor)


def _onoff(node: etree._Element, attr: str) -> bool | None:
    value = node.get(attr)
    if value is None:
        return None
    if value not in _ONOFF:
        _fail(f"{attr}={value!r} is not valid; expected 'on' or 'off'", node)
    return _ONOFF[value]


def _address_number(node: etree._Element, attr: str, limit: int) -> int:
    text = node.get(attr, "0").strip()
    if not _C_UINT.match(text):
        _fail(f"address {attr}={text!r} is not a number; expected decimal like '18' or hex like '0x12'", node)
    value = int(text, 16) if text[:2].lower() == "0x" else int(text, 8 if text.startswith("0") else 10)
    if value > limit:
        _fail(f"address {attr}={text!r} is out of range; expected at most {limit:#x}", node)
    return value


def _address(node: etree._Element | None) -> AddressSpec | None:
    if node is None:
        return None
    kind = node.get("type")
    if not kind:
        _fail("<address> has no type; expected type='pci', 'ccw' or 'virtio-mmio'", node)
    limits = {"pci": _PCI_LIMITS, "ccw": _CCW_LIMITS}.get(kind, {})
    return AddressSpec(kind, **{a: _address_number(node, a, lim) for a, lim in limits.items()})


def _period(node: etree._Element | None) -> int | None:
    if node is None:
        return None
    text = node.get("period")
    if text is None or not _DECIMAL.match(text) or int(text) > _PERIOD_MAX:
        _fail(f"stats period={text!r} is not valid; expected a whole number of seconds "
              f"from 0 (disabled) to {_PERIOD_MAX}", node)
    return int(text)


def _memballoon(nodes: list[etree._Element], domain_type: str) -> MemballoonSpec | None:
    if not nodes:  # libvirt adds the hypervisor's default balloon; so do we
        return MemballoonSpec(model="xen" if domain_type == "xen" else "virtio", implicit=True)
    if len(nodes) > 1:
        _fail("a domain can have only one <memballoon>; found a second one", nodes[1])
    node = nodes[0]
    model = node.get("model")
    if model == "none":
        return None
    if model not in BALLOON_MODELS:
        _fail(f"unknown memballoon model {model!r}; expected one of {', '.join(BALLOON_MODELS)} or none", node)
    alias_node = node.find("alias")
    alias = alias_node.get("name") if alias_node is not None else None
    if alias_node is not None and (alias is None or not _QEMU_ID.match(alias)):
        _fail(f"alias name={alias!r} is not a valid QEMU device id; expected a letter then "
              "letters, digits, '-', '.' or '_'", alias_node)
    driver = node.find("driver")
    options = () if driver is None else tuple(
        (name, value) for name in VIRTIO_DRIVER_OPTIONS if (value := _onoff(driver, name)) is not None)
    return MemballoonSpec(model=model, alias=alias, address=_address(node.find("address")),
                          autodeflate=_onoff(node, "autodeflate"),
                          free_page_reporting=_onoff(node, "freePageReporting"),
                          period_s=_period(node.find("stats")), driver_options=options)


def _disk(node: etree._Element) -> DiskSpec | None:
    source = node.find("source")
    path = None if source is None else (source.get("file") or source.get("dev"))
    if not path:  # network disks and empty CD-ROM drives: nothing a local launcher can open
        return None
    driver, target = node.find("driver"), node.find("target")
    return DiskSpec(source=path, format=(driver.get("type") if driver is not None else None) or "raw",
                    device=node.get("device", "disk"),
                    bus=target.get("bus") if target is not None else None,
                    target=target.get("dev") if target is not None else None,
                    readonly=node.find("readonly") is not None)


def _serial(node: etree._Element, index: int) -> SerialSpec:
    target, source = node.find("target"), node.find("source")
    port = target.get("port") if target is not None else None
    if port is not None and not _DECIMAL.match(port):
        _fail(f"serial target port={port!r} is not valid; expected a whole number", target)
    return SerialSpec(type=node.get("type", "pty"), port=int(port) if port is not None else index,
                      path=source.get("path") if source is not None else None)


def _agent(root: etree._Element) -> bool:
    metadata = root.find("metadata")
    guest = None if metadata is None else metadata.find(f"{{{BALLOONLAB_NS}}}guest")
    if guest is None:
        return False
    if guest.get("agent") != "serial1":
        _fail(f"balloonlab:guest agent={guest.get('agent')!r} is not supported; expected 'serial1'", guest)
    return True


def _vcpus(root: etree._Element) -> int:
    node = root.find("vcpu")
    if node is None:
        return 1
    if not _DECIMAL.match(node.text or "") or int(node.text) == 0:
        _fail(f"<vcpu> must be a positive integer, got {(node.text or '').strip()!r}", node)
    return int(node.text)


def _memory_fields(root: etree._Element) -> dict[str, int | None]:
    node = root.find("memory")
    if node is None:
        _fail("missing <memory>; expected e.g. <memory unit='MiB'>512</memory> in <domain>", root)
    memory = _memory(node)
    current_node, max_node = root.find("currentMemory"), root.find("maxMemory")
    current = _memory(current_node, allow_zero=True) if current_node is not None else memory
    return {"memory_bytes": memory,
            "current_memory_bytes": current if 0 < current <= memory else memory,  # as libvirt
            "max_memory_bytes": _memory(max_node) if max_node is not None else None}


def _os_fields(os_node: etree._Element | None) -> dict[str, str | None]:
    fields: dict[str, str | None] = dict.fromkeys(("arch", "machine", "kernel", "initrd", "cmdline"))
    if os_node is None:
        return fields
    os_type, cmdline = os_node.find("type"), os_node.find("cmdline")
    if os_type is not None:
        fields.update(arch=os_type.get("arch"), machine=os_type.get("machine"))
    fields.update(kernel=_text(os_node.find("kernel")), initrd=_text(os_node.find("initrd")),
                  cmdline=cmdline.text if cmdline is not None and cmdline.text else None)
    return fields


def _device_fields(devices: etree._Element | None, domain_type: str) -> dict[str, object]:
    dev = devices if devices is not None else etree.Element("devices")
    return {"emulator": _text(dev.find("emulator")),
            "disks": tuple(d for d in map(_disk, dev.findall("disk")) if d is not None),
            "serials": tuple(_serial(n, i) for i, n in enumerate(dev.findall("serial"))),
            "memballoon": _memballoon(dev.findall("memballoon"), domain_type)}


# ---------------------------------------------------------------------------- parsing

def _parse_root(text: str | bytes) -> tuple[etree._Element, str]:
    if isinstance(text, str):  # the str is already decoded: ignore any encoding= declaration
        data, parser_encoding = text.encode("utf-8"), "utf-8"
    elif isinstance(text, (bytes, bytearray)):
        data, parser_encoding = bytes(text), None
    else:
        raise TypeError(f"domain XML must be str or bytes, got {type(text).__name__}")
    # Domain XML comes from users: never fetch anything and never expand entities.
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, encoding=parser_encoding)
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise DomainXMLError(f"not well-formed XML ({exc.msg}); expected a libvirt <domain> document",
                             line=exc.lineno) from None
    docinfo = root.getroottree().docinfo
    source = text if isinstance(text, str) else data.decode(docinfo.encoding or "utf-8", "replace")
    if docinfo.doctype:  # libxml2 expands entities in attribute values even so: refuse DTDs
        line = source[:source.find("<!DOCTYPE")].count("\n") + 1 if "<!DOCTYPE" in source else None
        raise DomainXMLError("DOCTYPE and entity declarations are not accepted in domain XML; "
                             "expected a plain <domain> document", line=line, element="!DOCTYPE")
    return root, source


def parse_domain_xml(text: str | bytes) -> DomainSpec:
    """Parse libvirt domain XML.

    Only local disks (``<source file=|dev=>``) are kept; ``currentMemory`` of 0 or above
    ``memory`` becomes ``memory``, as libvirt does.

    :param text: the XML document (str, or bytes honouring its encoding declaration).
    :raises DomainXMLError: for XML that is not well formed or that libvirt would refuse
        (see the message, ``line`` and ``element``).
    :raises TypeError: for anything but str or bytes.
    """
    root, source = _parse_root(text)
    if root.tag != "domain":
        _fail(f"the root element is <{root.tag}>; expected <domain>", root)
    domain_type = root.get("type")
    if not domain_type:
        _fail("<domain> has no type attribute; expected e.g. type='qemu' or type='kvm'", root)
    name = _text(root.find("name"))
    if name is None:
        _fail("missing <name>; expected <name>guest-name</name> in <domain>", root)
    return DomainSpec(name=name, uuid=_text(root.find("uuid")), domain_type=domain_type,
                      vcpus=_vcpus(root), agent=_agent(root), xml=source, **_memory_fields(root),
                      **_os_fields(root.find("os")), **_device_fields(root.find("devices"), domain_type))


def load_domain_xml(path: str | os.PathLike[str]) -> DomainSpec:
    """Read and parse a domain XML file.

    :raises OSError: when the file cannot be read.
    :raises DomainXMLError: as :func:`parse_domain_xml`.
    """
    with open(path, "rb") as handle:
        return parse_domain_xml(handle.read())


# ---------------------------------------------------------------------------- rendering

def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str) -> etree._Element:
    node = etree.SubElement(parent, tag, {k: v for k, v in attrs.items() if v is not None})
    node.text = text
    return node


def _kib(nbytes: int) -> str:
    return str(-(-nbytes // 1024))


def _render_address(parent: etree._Element, address: AddressSpec) -> None:
    attrs = {"type": address.type}
    if address.type == "pci":
        attrs.update(domain=f"0x{address.domain or 0:04x}", bus=f"0x{address.bus or 0:02x}",
                     slot=f"0x{address.slot or 0:02x}", function=f"0x{address.function or 0:x}")
    elif address.type == "ccw":
        attrs.update(cssid=f"0x{address.cssid or 0:x}", ssid=f"0x{address.ssid or 0:x}",
                     devno=f"0x{address.devno or 0:04x}")
    _sub(parent, "address", **attrs)


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
        _sub(root, "maxMemory", _kib(spec.max_memory_bytes), unit="KiB")
    _sub(root, "memory", _kib(spec.memory_bytes), unit="KiB")
    _sub(root, "currentMemory", _kib(spec.current_memory_bytes), unit="KiB")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    os_node = _sub(root, "os")
    _sub(os_node, "type", "hvm", arch=spec.arch, machine=spec.machine)
    for tag in ("kernel", "initrd", "cmdline"):
        if getattr(spec, tag) is not None:
            _sub(os_node, tag, getattr(spec, tag))
    devices = _sub(root, "devices")
    if spec.emulator is not None:
        _sub(devices, "emulator", spec.emulator)
    for disk in spec.disks:
        _render_disk(devices, disk)
    for serial in spec.serials:
        _render_serial(devices, serial)
    _render_memballoon(devices, spec.memballoon)
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def with_changes(spec: DomainSpec, **fields: object) -> DomainSpec:
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
    if period is not None and (type(period) is not int or not 0 <= period <= _PERIOD_MAX):
        raise ValueError(f"period_s must be None or an int from 0 to {_PERIOD_MAX}, got {period!r}")
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
                   domain_type: str = "qemu") -> DomainSpec:
    """The domain of balloonlab's built-in test guest: x86_64, direct kernel boot, no disks.

    It carries the workload agent (``agent=True``): serial port 0 is the console, port 1 the
    agent (the launcher decides where both go). ``xml`` is filled by :func:`render_domain_xml`.

    :param memory: bytes (int) or a size like ``"512M"`` (:func:`balloonlab.units.parse_size`),
        rounded up to a whole KiB. ``current_memory`` likewise; None means ``memory``.
    :param period_s: the balloon stats period in seconds (None: no ``<stats>``, 0: disabled).
    :param model: virtio, virtio-transitional, virtio-non-transitional, or none (no balloon).
    :param alias: the balloon's device id (QEMU rules; libvirt keeps only ``ua-`` aliases).
    :raises TypeError: for an argument of the wrong type.
    :raises ValueError: for an out-of-range value, e.g. current_memory above memory.
    """
    _check_builtin_args(dict(locals()))
    memory_bytes = _size_arg("memory", memory)
    current = memory_bytes if current_memory is None else _size_arg("current_memory", current_memory)
    if current > memory_bytes:
        raise ValueError(f"current_memory ({current} bytes) must not exceed memory ({memory_bytes} bytes)")
    balloon = None if model == "none" else MemballoonSpec(
        model=model, alias=alias, autodeflate=autodeflate, free_page_reporting=free_page_reporting,
        period_s=period_s)
    spec = DomainSpec(name=name, uuid=None, domain_type=domain_type, memory_bytes=memory_bytes,
                      current_memory_bytes=current, max_memory_bytes=None, vcpus=vcpus, arch="x86_64",
                      machine=machine, emulator=None, kernel=kernel, initrd=initrd,
                      cmdline=cmdline or None, disks=(),
                      serials=(SerialSpec("pty", 0), SerialSpec("unix", 1)),
                      memballoon=balloon, agent=True)
    return dataclasses.replace(spec, xml=render_domain_xml(spec))
