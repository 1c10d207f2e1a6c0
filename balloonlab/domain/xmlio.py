"""Reading values out of domain XML elements as libvirt reads them, and writing them back.

The shared helpers of :mod:`.parse` and :mod:`.render` (the domain) and :mod:`.memory` (NUMA
cells and memory devices): sizes with libvirt's units, on/off and yes/no switches, device
addresses, aliases and virtio ``<driver>`` options. Every refusal is a :class:`DomainXMLError`
naming the line, the element and what to write instead.
"""

from __future__ import annotations

import re
from typing import NoReturn

from lxml import etree  # type: ignore[import-untyped]  # lxml ships no type hints; lxml-stubs is not installed

from balloonlab.domain.spec import (_C_UINT, _CCW_LIMITS, _DECIMAL, _ONOFF, _PCI_LIMITS, _QEMU_ID,
                                    VIRTIO_DRIVER_OPTIONS, AddressSpec)
from balloonlab.model.errors import DomainXMLError
from balloonlab.model.units import unit_factor

#: libvirt's largest memory size in bytes: it refuses 2^53 KiB and more ("numerical overflow").
LIBVIRT_MAX_MEMORY_BYTES = (2**53 - 1) * 1024

_HEX = re.compile(r"(0[xX])?[0-9a-fA-F]{1,16}\Z")  # strtoull(base 16): an optional 0x prefix
_UINT32 = re.compile(r"[0-9]{1,10}\Z")
_YESNO = {"yes": True, "no": False}


def _tag(node: etree._Element) -> str:
    localname: str = etree.QName(node).localname
    return localname


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` cut short: values in messages come from the document, of any length."""
    return _short(repr(value), limit)


def _fail(message: str, node: etree._Element | None = None, element: str | None = None) -> NoReturn:
    element = element or (_tag(node) if node is not None else None)
    raise DomainXMLError(message, line=node.sourceline if node is not None else None,
                         element=_short(element) if element is not None else None)


def _text(node: etree._Element | None) -> str | None:
    if node is None or node.text is None or not node.text.strip():
        return None
    text: str = node.text.strip()
    return text


def _round_up_kib(nbytes: int) -> int:
    return -(-nbytes // 1024) * 1024


def _scaled(text: str | None, unit: str | None, node: etree._Element, what: str, *,
            allow_zero: bool = False) -> int:
    """Bytes of a libvirt size (``unit`` default KiB), rounded up to a whole KiB as libvirt does.

    :param what: how the message names the value, e.g. ``<memory>`` or ``cell memory``.
    """
    unit = unit if unit is not None else "KiB"
    try:
        factor = unit_factor(unit)
    except ValueError as exc:
        _fail(str(exc), node)
    text = text or ""
    if not _DECIMAL.match(text) or (int(text) == 0 and not allow_zero):
        _fail(f"{what} must be a positive integer number of {unit}, got {_shown(text.strip())}", node)
    nbytes = _round_up_kib(int(text) * factor)
    if nbytes > LIBVIRT_MAX_MEMORY_BYTES:
        _fail(f"{what} of {text.strip()} {unit} is too large; libvirt accepts at most "
              f"{LIBVIRT_MAX_MEMORY_BYTES // 1024} KiB (8 EiB less 1 KiB)", node)
    return nbytes


def _memory(node: etree._Element, *, allow_zero: bool = False) -> int:
    """Bytes of a ``<memory>``-like element (its text, its ``unit``), rounded up to a whole KiB."""
    return _scaled(node.text, node.get("unit"), node, f"<{_tag(node)}>", allow_zero=allow_zero)


def _switch(node: etree._Element, attr: str, words: dict[str, bool]) -> bool | None:
    """An attribute libvirt reads as a tristate switch (``words``: its true and false word)."""
    value = node.get(attr)
    if value is None:
        return None
    if value not in words:
        _fail(f"{attr}={_shown(value)} is not valid; expected {' or '.join(repr(w) for w in words)}", node)
    return words[value]


def _onoff(node: etree._Element, attr: str) -> bool | None:
    return _switch(node, attr, _ONOFF)


def _yesno(node: etree._Element, attr: str) -> bool | None:
    return _switch(node, attr, _YESNO)


def _address_number(node: etree._Element, attr: str, limit: int) -> int:
    text = node.get(attr, "0").strip()
    if not _C_UINT.match(text):
        _fail(f"address {attr}={_shown(text)} is not a number; expected decimal like '18' or hex like '0x12'", node)
    value = int(text, 16) if text[:2].lower() == "0x" else int(text, 8 if text.startswith("0") else 10)
    if value > limit:
        _fail(f"address {attr}={_shown(text)} is out of range; expected at most {limit:#x}", node)
    return value


def _hex(node: etree._Element, attr: str) -> int | None:
    """An attribute libvirt reads with strtoull(base 16), e.g. a memory address ``base``."""
    text = node.get(attr)
    if text is None:
        return None
    if not _HEX.match(text):
        _fail(f"{attr}={_shown(text)} is not a hexadecimal address; expected e.g. {attr}='0x100000000'", node)
    return int(text, 16)


def _dimm_address(node: etree._Element) -> AddressSpec:
    slot = node.get("slot")
    if slot is None or not _UINT32.match(slot) or int(slot) > 0xFFFFFFFF:
        _fail(f"dimm address slot={_shown(slot)} is not valid; expected a slot number like slot='0'", node)
    return AddressSpec("dimm", slot=int(slot), base=_hex(node, "base"))


def _address(node: etree._Element | None) -> AddressSpec | None:
    if node is None:
        return None
    kind = node.get("type")
    if not kind:
        _fail("<address> has no type; expected type='pci', 'ccw', 'dimm' or 'virtio-mmio'", node)
    if kind == "dimm":
        return _dimm_address(node)
    limits = {"pci": _PCI_LIMITS, "ccw": _CCW_LIMITS}.get(kind, {})
    return AddressSpec(kind, **{a: _address_number(node, a, lim) for a, lim in limits.items()})


def _alias(node: etree._Element) -> str | None:
    alias_node = node.find("alias")
    alias = alias_node.get("name") if alias_node is not None else None
    if alias_node is not None and (alias is None or not _QEMU_ID.match(alias)):
        _fail(f"alias name={_shown(alias)} is not a valid QEMU device id; expected a letter then "
              "letters, digits, '-', '.' or '_'", alias_node)
    return alias


def _driver_options(node: etree._Element) -> tuple[tuple[str, bool], ...]:
    driver = node.find("driver")
    return () if driver is None else tuple(
        (name, value) for name in VIRTIO_DRIVER_OPTIONS if (value := _onoff(driver, name)) is not None)


# ---------------------------------------------------------------------------- writing

def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrs: str | None) -> etree._Element:
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
    elif address.type == "dimm":
        attrs["slot"] = str(address.slot or 0)
        if address.base is not None:
            attrs["base"] = f"0x{address.base:x}"
    _sub(parent, "address", **attrs)
