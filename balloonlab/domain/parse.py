"""libvirt domain XML -> :class:`DomainSpec`, with libvirt's defaults and line-numbered errors."""

from __future__ import annotations

import os
from typing import TypedDict

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints; lxml-stubs is not installed

from balloonlab.domain.memory import memory_fields
from balloonlab.domain.spec import (
    _DECIMAL,
    BALLOON_MODELS,
    BALLOONLAB_NS,
    CHANNEL_MODES,
    ChannelSpec,
    DiskSpec,
    DomainSpec,
    MemballoonSpec,
    SerialSpec,
)
from balloonlab.domain.xmlio import (
    _address,
    _alias,
    _driver_options,
    _fail,
    _onoff,
    _short,
    _shown,
    _text,
)
from balloonlab.model.errors import DomainXMLError
from balloonlab.model.period import LIBVIRT_MAX_PERIOD_S


def _period(node: etree._Element | None) -> int | None:
    if node is None:
        return None
    text = node.get("period")
    if text is None or not _DECIMAL.match(text) or int(text) > LIBVIRT_MAX_PERIOD_S:
        _fail(f"stats period={_shown(text)} is not valid; expected a whole number of seconds "
              f"from 0 (disabled) to {LIBVIRT_MAX_PERIOD_S}", node)
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
        _fail(f"unknown memballoon model {_shown(model)}; expected one of {', '.join(BALLOON_MODELS)} or none", node)
    return MemballoonSpec(model=model, alias=_alias(node), address=_address(node.find("address")),
                          autodeflate=_onoff(node, "autodeflate"),
                          free_page_reporting=_onoff(node, "freePageReporting"),
                          period_s=_period(node.find("stats")), driver_options=_driver_options(node))


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
        _fail(f"serial target port={_shown(port)} is not valid; expected a whole number", target)
    return SerialSpec(type=node.get("type", "pty"), port=int(port) if port is not None else index,
                      path=source.get("path") if source is not None else None)


def _channel(node: etree._Element) -> ChannelSpec:
    source, target = node.find("source"), node.find("target")
    kind = node.get("type", "pty")  # libvirt's default chardev type, as for <serial>
    path = (source.get("path") if source is not None else None) or None
    target_type, target_name = (None, None) if target is None else (target.get("type"), target.get("name"))
    if kind != "unix":  # every other kind is kept as given: the libvirt backend passes it on
        return ChannelSpec(type=kind, path=path, target_type=target_type, target_name=target_name)
    mode = source.get("mode") if source is not None else None
    if mode is not None and mode not in CHANNEL_MODES:
        _fail(f"channel source mode={_shown(mode)} is not valid; expected 'bind' or 'connect'", source)
    # libvirt's rules: a unix socket without a path gets one libvirt makes, and QEMU listens on
    # it whatever the mode (qemuDomainChrDefPostParse); with a path, a missing mode means connect.
    mode = "bind" if path is None else mode or "connect"
    return ChannelSpec(type=kind, path=path, target_type=target_type, target_name=target_name, mode=mode)


def _agent(root: etree._Element) -> bool:
    metadata = root.find("metadata")
    guest = None if metadata is None else metadata.find(f"{{{BALLOONLAB_NS}}}guest")
    if guest is None:
        return False
    if guest.get("agent") != "serial1":
        _fail(f"balloonlab:guest agent={_shown(guest.get('agent'))} is not supported; expected 'serial1'", guest)
    return True


def _vcpus(root: etree._Element) -> int:
    node = root.find("vcpu")
    if node is None:
        return 1
    if not _DECIMAL.match(node.text or "") or int(node.text) == 0:
        _fail(f"<vcpu> must be a positive integer, got {_shown((node.text or '').strip())}", node)
    return int(node.text)


class _OsFields(TypedDict):
    """The ``<os>`` fields of a :class:`DomainSpec`."""

    arch: str | None
    machine: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None


class _DeviceFields(TypedDict):
    """The ``<devices>`` fields of a :class:`DomainSpec`."""

    emulator: str | None
    disks: tuple[DiskSpec, ...]
    serials: tuple[SerialSpec, ...]
    channels: tuple[ChannelSpec, ...]
    memballoon: MemballoonSpec | None


def _os_fields(os_node: etree._Element | None) -> _OsFields:
    if os_node is None:
        return {"arch": None, "machine": None, "kernel": None, "initrd": None, "cmdline": None}
    os_type, cmdline = os_node.find("type"), os_node.find("cmdline")
    return {"arch": os_type.get("arch") if os_type is not None else None,
            "machine": os_type.get("machine") if os_type is not None else None,
            "kernel": _text(os_node.find("kernel")), "initrd": _text(os_node.find("initrd")),
            "cmdline": cmdline.text if cmdline is not None and cmdline.text else None}


def _device_fields(devices: etree._Element | None, domain_type: str) -> _DeviceFields:
    dev = devices if devices is not None else etree.Element("devices")
    return {"emulator": _text(dev.find("emulator")),
            "disks": tuple(d for d in map(_disk, dev.findall("disk")) if d is not None),
            "serials": tuple(_serial(n, i) for i, n in enumerate(dev.findall("serial"))),
            "channels": tuple(map(_channel, dev.findall("channel"))),
            "memballoon": _memballoon(dev.findall("memballoon"), domain_type)}


# ---------------------------------------------------------------------------- parsing

def _parse_root(text: str | bytes) -> tuple[etree._Element, str]:
    if isinstance(text, str):  # the str is already decoded: ignore any encoding= declaration
        try:
            data, parser_encoding = text.encode("utf-8"), "utf-8"
        except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from os.fsdecode of bad bytes
            raise DomainXMLError(f"not valid Unicode text (a lone surrogate {text[exc.start]!r}); expected a "
                                 "libvirt <domain> document", line=text.count("\n", 0, exc.start) + 1) from None
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
        # libxml2's messages may end in a newline or quote a whole line: keep them one short line.
        reason = _short(" ".join(str(exc.msg).split()), 200)
        raise DomainXMLError(f"not well-formed XML ({reason}); expected a libvirt <domain> document",
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
    ``memory`` becomes ``memory``, and sizes of 2^53 KiB or more are refused, as libvirt does.
    NUMA cells and memory devices are checked as libvirt checks them (:mod:`.memory_rules`).

    :param text: the XML document (str, or bytes honouring its encoding declaration).
    :raises DomainXMLError: for XML that is not well formed or that libvirt would refuse
        (see the message, ``line`` and ``element``).
    :raises TypeError: for anything but str or bytes.
    """
    root, source = _parse_root(text)
    if root.tag != "domain":
        _fail(f"the root element is <{_short(root.tag)}>; expected <domain>", root)
    domain_type = root.get("type")
    if not domain_type:
        _fail("<domain> has no type attribute; expected e.g. type='qemu' or type='kvm'", root)
    name = _text(root.find("name"))
    if name is None:
        _fail("missing <name>; expected <name>guest-name</name> in <domain>", root)
    vcpus, os_fields = _vcpus(root), _os_fields(root.find("os"))
    return DomainSpec(name=name, uuid=_text(root.find("uuid")), domain_type=domain_type,
                      vcpus=vcpus, agent=_agent(root), xml=source, **memory_fields(root, vcpus, os_fields["arch"]),
                      **os_fields, **_device_fields(root.find("devices"), domain_type))


def load_domain_xml(path: str | os.PathLike[str]) -> DomainSpec:
    """Read and parse a domain XML file.

    :raises OSError: when the file cannot be read.
    :raises DomainXMLError: as :func:`parse_domain_xml`.
    """
    with open(path, "rb") as handle:
        return parse_domain_xml(handle.read())




def as_spec(domain: DomainSpec | str | os.PathLike[str]) -> DomainSpec:
    """A DomainSpec from a spec, XML text (starts with ``<``) or the path of an XML file.

    :raises DomainXMLError: the XML is invalid.
    :raises OSError: the file cannot be read.
    """
    if isinstance(domain, DomainSpec):
        return domain
    if isinstance(domain, str) and domain.lstrip().startswith("<"):
        return parse_domain_xml(domain)
    return load_domain_xml(domain)
