"""Property-based fuzzing (hypothesis) of the three parsers that read outside input.

Each parser either parses an input, and then its result keeps the parser's invariants, or
refuses it with its documented error and a one-line message, never with another exception:

- ``parse_domain_xml``: :class:`DomainXMLError` (``TypeError`` for what is not str/bytes);
  generated libvirt-like documents, mutated ones, arbitrary text and bytes.
- ``parse_size``: ``ValueError`` for a bad size, ``TypeError`` for what is not int/str.
- ``parse_guest_stats``: ``ValueError`` for a reply without QEMU's shape.

Every parser call is counted (inputs, parsed, refused by error type) and the counts are
printed at the end of the module and written to ``test-artifacts/fuzz-counts.json``;
``--hypothesis-show-statistics`` shows the same split as hypothesis events.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from lxml import etree

from balloonlab.domain import (BALLOON_MODELS, BALLOONLAB_NS, VIRTIO_DRIVER_OPTIONS, DomainSpec,
                               parse_domain_xml, render_domain_xml)
from balloonlab.model.errors import DomainXMLError
from balloonlab.model.period import LIBVIRT_MAX_PERIOD_S
from balloonlab.model.schema import STATS, stat_name
from balloonlab.model.stats import UNSET, BalloonStats, parse_guest_stats
from balloonlab.model.units import UNITS, parse_size

#: libvirt's largest memory size: under 2^53 KiB (it refuses 9007199254740992 KiB and
#: 9223372036854774785 b with "numerical overflow", as `virsh -c test:///default define` shows).
LIBVIRT_MAX_MEMORY = (2**53 - 1) * 1024

FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.data_too_large])
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
set_hypothesis_home_dir(ARTIFACTS / "hypothesis")  # its caches, not a .hypothesis/ in the checkout

# ---------------------------------------------------------------------------- counting

#: parser -> outcome ("parsed", "refused DomainXMLError", ...) -> calls; per input family too.
COUNTS: dict[str, Counter[str]] = {}


def _count(parser: str, family: str, outcome: str) -> None:
    COUNTS.setdefault(parser, Counter())[outcome] += 1
    COUNTS.setdefault(f"{parser} [{family}]", Counter())[outcome] += 1
    if currently_in_test_context():
        event(f"{parser}: {outcome}")


def _attempt(parser: str, family: str, call: Callable[[], Any],
             allowed: tuple[type[BaseException], ...]) -> tuple[Any, BaseException | None]:
    """Run one parse: (result, None) or (None, the allowed error); any other error fails the test."""
    try:
        result = call()
    except allowed as exc:
        _count(parser, family, f"refused {type(exc).__name__}")
        message = str(exc)
        assert message and "\n" not in message and len(message) <= 400, f"not a one-line message: {message!r}"
        return None, exc
    _count(parser, family, "parsed")
    return result, None


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print and save the per-parser counts once the module's tests ran."""
    yield
    totals = {name: {"inputs": sum(c.values()), **dict(sorted(c.items()))} for name, c in sorted(COUNTS.items())}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz-counts.json").write_text(json.dumps(totals, indent=2) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # the counts are the point: show them uncaptured
            reporter.write_line("")
            for name, row in totals.items():
                reporter.write_line(f"fuzz {name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))


# ---------------------------------------------------------------------------- shared strategies

_XML_CHAR = st.characters(exclude_categories=("Cs", "Cc", "Cn")) | st.sampled_from(" \t\n\r")
xml_text = st.text(_XML_CHAR, max_size=12)
_WS = st.sampled_from(["", "", "", " ", "\t", "\n  ", "  "])


def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any], bad_percent: int = 5) -> st.SearchStrategy[Any]:
    """``good`` most of the time, ``bad`` about ``bad_percent`` % of the time (shrinks to ``good``)."""
    return st.integers(0, 99).flatmap(lambda i: bad if i >= 100 - bad_percent else good)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def _padded(numbers: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(_WS, numbers, _WS).map("".join)


_JUNK_NUMBERS = st.sampled_from(["", " ", "-1", "-0", "+5", "1.5", "0x10", "1e3", "abc", "1" * 21, "0" * 25,
                                 "\u0663", "\uff11\uff12", "12 KiB", "0", "18446744073709551616"]) | xml_text
_JUNK_UNITS = st.sampled_from(["mib", "Mb", "KIB", "", " MiB", "bytes ", "EiB", "PiB", "B", "kib", "Mbit", "mibs",
                                "\u212aiB", "xB", "BYTE"]) | xml_text


# ---------------------------------------------------------------------------- domain XML
# Strategies are built once, here: a strategy made inside a draw is validated again at
# every draw, which made generation several times slower.


@dataclasses.dataclass
class Expect:
    """What the generator put in a document, for the fields whose parse is easy to predict."""

    memory: tuple[str, str | None] | None = None    # (text, unit) of <memory>, None when absent
    current: tuple[str, str | None] | None = None
    max_memory: tuple[str, str | None] | None = None
    balloons: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _unit_bytes(unit: str) -> int | None:
    """libvirt's virScaleInteger rules, written out here apart from balloonlab's: any case,
    b/byte/bytes, a k/m/g/t/p/e prefix alone or + iB (binary) or + B (decimal); None: refused."""
    found = re.fullmatch(r"(b|byte|bytes)|([kmgtpe])(ib)?|([kmgtpe])b", unit, re.ASCII | re.IGNORECASE)
    if found is None:
        return None
    if found.group(1):
        return 1
    if found.group(2):
        return 1024 ** ("kmgtpe".index(found.group(2).lower()) + 1)
    return 1000 ** ("kmgtpe".index(found.group(4).lower()) + 1)


def _expected_bytes(text: str, unit: str | None) -> int | None:
    """What libvirt makes of <memory unit=...>text</memory> in bytes (None: it refuses it)."""
    factor = _unit_bytes(unit or "KiB")
    if not re.fullmatch(r"\s*[0-9]{1,20}\s*", text) or factor is None:
        return None
    nbytes = -(-int(text) * factor // 1024) * 1024
    return nbytes if nbytes <= LIBVIRT_MAX_MEMORY else None


_MEMORY_COUNTS = mostly(st.integers(1, 2**22).map(str),
                        st.integers(0, 2**64 + 2).map(str)
                        | st.sampled_from([str(2**53 - 1), str(2**53), str(2**63 - 1024), str(2**63 - 1023),
                                           str(2**63), str(2**64 - 1), "99999999999999999999", "0"]), bad_percent=15)
_MEMORY_UNIT = mostly(maybe(st.sampled_from(sorted(UNITS))), _JUNK_UNITS)
_MEMORY_TEXT = mostly(_padded(_MEMORY_COUNTS), _JUNK_NUMBERS)
_ONOFF = mostly(st.sampled_from([None, "on", "off"]), st.sampled_from(["yes", "ON", "", "true"]) | xml_text, 2)
_PCI = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}
_CCW = {"cssid": 0xFE, "ssid": 0x3, "devno": 0xFFFF}
_NUMBER_FORMS = st.sampled_from(["{:d}", "0x{:x}", "0x{:04X}", "0{:o}", " {:d} "])
_ADDRESS_VALUES = {limit: mostly(st.integers(0, limit), st.sampled_from([limit + 1, 2**32]), 3)
                   for limit in {*_PCI.values(), *_CCW.values()}}
_ADDRESS_KIND = mostly(st.sampled_from(["good"] * 6 + ["absent"]), st.just("bad"), 3)
_ADDRESS_JUNK = st.sampled_from(["zz", "-1", "08", "0x", ""]) | xml_text
_MODEL = mostly(st.sampled_from([*BALLOON_MODELS, "virtio", "virtio", "none"]),
                maybe(st.sampled_from(["virtio-foo", "VIRTIO", ""]) | xml_text))
_PERIOD = maybe(mostly(st.integers(0, 3600).map(str) | st.just(str(LIBVIRT_MAX_PERIOD_S)),
                       st.sampled_from(["-1", "1.5", "", str(LIBVIRT_MAX_PERIOD_S + 1), "ten"]) | xml_text))
_ALIAS = maybe(mostly(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,15}", fullmatch=True),
                      st.sampled_from(["1 bad", "", "9x"]) | xml_text))
_ADDRESS_TYPE = maybe(mostly(st.sampled_from(["pci", "pci", "ccw", "virtio-mmio", "isa"]), st.just("") | xml_text))
_DISK_DEVICE = maybe(st.sampled_from(["disk", "cdrom", "floppy"]) | xml_text)
_DISK_FORMAT = maybe(st.sampled_from(["raw", "qcow2", ""]))
_DISK_SOURCE = st.sampled_from(["file", "dev", "none", "empty"])
_PATH_PREFIX = st.sampled_from(["/img/", "/dev/", "rel/"])
_DISK_TARGET = st.sampled_from(["vda", "hdc", "sda"])
_DISK_BUS = maybe(st.sampled_from(["virtio", "ide", "sata"]))
_SERIAL_TYPE = mostly(st.sampled_from(["pty", "unix", "file"]), xml_text)
_SERIAL_PATH = maybe(st.just("/tmp/s.sock") | xml_text)
_SERIAL_PORT = maybe(mostly(_padded(st.integers(0, 9).map(str)), _JUNK_NUMBERS))
_ROOT_TAG = mostly(st.just("domain"), st.sampled_from(["network", "{urn:x}domain", "Domain"]))
_DOMAIN_TYPE = mostly(st.sampled_from(["qemu", "kvm", "xen"]), st.sampled_from(["", " "]))
_NAME = mostly(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True) | xml_text, st.sampled_from([None, "", " "]))
_UUID = st.uuids().map(str) | xml_text
_VCPU = mostly(_padded(st.integers(1, 64).map(str)), _JUNK_NUMBERS)
_AGENT = mostly(st.sampled_from([None, None, None, "serial1", "other-ns"]), st.just("serial3"))
_OS_ATTR = maybe(st.sampled_from(["x86_64", "pc", "q35", "aarch64"]) | xml_text)
_OS_TEXT = maybe(st.sampled_from(["/boot/vmlinuz", "console=ttyS0 quiet"]) | xml_text)
_EMULATOR = st.just("/usr/bin/qemu-system-x86_64") | xml_text
_BALLOON_COUNT = st.sampled_from([0, 1, 1, 1, 1, 1, 1, 2])
_FORM = st.sampled_from(["str", "str-pretty", "utf-8", "UTF-16", "ISO-8859-1", "utf-8-nodecl"])
_PERCENT = st.integers(0, 99)


def _memory_element(draw: st.DrawFn, parent: etree._Element, tag: str) -> tuple[str, str | None]:
    unit, text = draw(_MEMORY_UNIT), draw(_MEMORY_TEXT)
    etree.SubElement(parent, tag, {"unit": unit} if unit is not None else {}).text = text
    return text, unit


def _address_element(draw: st.DrawFn, balloon: etree._Element) -> None:
    kind = draw(_ADDRESS_TYPE)
    if kind is None:
        return
    attrs = {"type": kind}
    for attr, limit in {"pci": _PCI, "ccw": _CCW}.get(kind, {}).items():
        how = draw(_ADDRESS_KIND)
        if how == "good":
            attrs[attr] = draw(_NUMBER_FORMS).format(draw(_ADDRESS_VALUES[limit]))
        elif how == "bad":
            attrs[attr] = draw(_ADDRESS_JUNK)
    etree.SubElement(balloon, "address", attrs)


def _memballoon_element(draw: st.DrawFn, devices: etree._Element) -> dict[str, Any]:
    model = draw(_MODEL)
    attrs = {k: v for k, v in (("model", model), ("autodeflate", draw(_ONOFF)),
                               ("freePageReporting", draw(_ONOFF))) if v is not None}
    node = etree.SubElement(devices, "memballoon", attrs)
    if (period := draw(_PERIOD)) is not None:
        etree.SubElement(node, "stats", period=period)
    if (alias := draw(_ALIAS)) is not None:
        etree.SubElement(node, "alias", name=alias)
    _address_element(draw, node)
    if draw(st.booleans()):
        options = {name: draw(_ONOFF) for name in VIRTIO_DRIVER_OPTIONS}
        etree.SubElement(node, "driver", {k: v for k, v in options.items() if v is not None})
    return {"model": model, "period": period}


def _disk_element(draw: st.DrawFn, devices: etree._Element) -> None:
    device = draw(_DISK_DEVICE)
    node = etree.SubElement(devices, "disk", {"type": "file"} | ({"device": device} if device is not None else {}))
    if (driver_type := draw(_DISK_FORMAT)) is not None:
        etree.SubElement(node, "driver", name="qemu", type=driver_type)
    source = draw(_DISK_SOURCE)
    if source != "none":
        path = "" if source == "empty" else draw(_PATH_PREFIX) + draw(xml_text)
        etree.SubElement(node, "source", {"dev" if source == "dev" else "file": path})
    if draw(_PERCENT) < 90:  # a disk without <target dev> cannot be rendered (render refuses it)
        bus = draw(_DISK_BUS)
        etree.SubElement(node, "target", {"dev": draw(_DISK_TARGET)} | ({"bus": bus} if bus is not None else {}))
    if draw(st.booleans()):
        etree.SubElement(node, "readonly")


def _serial_element(draw: st.DrawFn, devices: etree._Element) -> None:
    node = etree.SubElement(devices, "serial", type=draw(_SERIAL_TYPE))
    if (path := draw(_SERIAL_PATH)) is not None:
        etree.SubElement(node, "source", mode="bind", path=path)
    if (port := draw(_SERIAL_PORT)) is not None:
        etree.SubElement(node, "target", port=port)


def _os_element(draw: st.DrawFn, root: etree._Element) -> None:
    os_node = etree.SubElement(root, "os")
    os_type = etree.SubElement(os_node, "type")
    os_type.text = "hvm"
    for attr in ("arch", "machine"):
        if (value := draw(_OS_ATTR)) is not None:
            os_type.set(attr, value)
    for tag in ("kernel", "initrd", "cmdline"):
        if (value := draw(_OS_TEXT)) is not None:
            etree.SubElement(os_node, tag).text = value


def _devices_element(draw: st.DrawFn, root: etree._Element, expect: Expect) -> None:
    devices = etree.SubElement(root, "devices")
    if draw(st.booleans()):
        etree.SubElement(devices, "emulator").text = draw(_EMULATOR)
    for _ in range(draw(st.integers(0, 2))):
        _disk_element(draw, devices)
    for _ in range(draw(st.integers(0, 2))):
        _serial_element(draw, devices)
    for _ in range(draw(_BALLOON_COUNT)):
        expect.balloons.append(_memballoon_element(draw, devices))
    if draw(st.booleans()):
        etree.SubElement(devices, "interface", type="network")


@st.composite
def domain_documents(draw: st.DrawFn) -> tuple[str | bytes, Expect]:
    """A libvirt-like domain document: mostly valid, with a few wrong values or elements."""
    expect = Expect()
    root = etree.Element(draw(_ROOT_TAG))
    if domain_type := draw(_DOMAIN_TYPE):
        root.set("type", domain_type)
    if (name := draw(_NAME)) is not None:
        etree.SubElement(root, "name").text = name
    if draw(st.booleans()):
        etree.SubElement(root, "uuid").text = draw(_UUID)
    if draw(_PERCENT) < 97:  # hypothesis favours small draws: keep those for the usual case
        expect.memory = _memory_element(draw, root, "memory")
    if draw(_PERCENT) < 70:
        expect.current = _memory_element(draw, root, "currentMemory")
    if draw(_PERCENT) < 20:
        expect.max_memory = _memory_element(draw, root, "maxMemory")
    if draw(st.booleans()):
        etree.SubElement(root, "vcpu", placement="static").text = draw(_VCPU)
    if (agent := draw(_AGENT)) is not None:
        ns = "https://example.org/x" if agent == "other-ns" else BALLOONLAB_NS
        etree.SubElement(etree.SubElement(root, "metadata"), f"{{{ns}}}guest",
                         agent="serial1" if agent == "other-ns" else agent)
    if draw(st.booleans()):
        _os_element(draw, root)
    if draw(_PERCENT) < 80:
        _devices_element(draw, root, expect)
    if draw(st.booleans()):
        etree.SubElement(root, "features").append(etree.Element("acpi"))
    if draw(st.booleans()):  # libvirt does not care about element order
        kids = list(root)
        for kid in kids:
            root.remove(kid)
        for kid in draw(st.permutations(kids)):
            root.append(kid)
    form = draw(_FORM)
    if form.startswith("str"):
        return etree.tostring(root, encoding="unicode", pretty_print=form == "str-pretty"), expect
    if form == "utf-8-nodecl":
        return etree.tostring(root, encoding="utf-8"), expect
    return etree.tostring(root, encoding=form, xml_declaration=True), expect  # lxml escapes what latin-1 lacks


def _check_spec(spec: DomainSpec) -> None:
    """Invariants of every parsed spec."""
    assert isinstance(spec, DomainSpec)
    assert spec.name and spec.name == spec.name.strip() and spec.domain_type
    for size in (spec.memory_bytes, spec.current_memory_bytes, spec.max_memory_bytes or 1024):
        assert type(size) is int and size > 0 and size % 1024 == 0 and size <= LIBVIRT_MAX_MEMORY
    assert 0 < spec.current_memory_bytes <= spec.memory_bytes  # libvirt clamps currentMemory to memory
    assert type(spec.vcpus) is int and spec.vcpus >= 1
    balloon = spec.memballoon
    if balloon is not None:
        assert balloon.model in BALLOON_MODELS
        assert balloon.period_s is None or 0 <= balloon.period_s <= LIBVIRT_MAX_PERIOD_S
        assert balloon.alias is None or re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", balloon.alias)
        assert all(name in VIRTIO_DRIVER_OPTIONS for name, _ in balloon.driver_options)
        if balloon.address is not None and balloon.address.type == "pci":
            a = balloon.address
            assert a.domain <= 0xFFFF and a.bus <= 0xFF and a.slot <= 0x1F and a.function <= 7  # type: ignore[operator]
    assert all(d.source for d in spec.disks)
    assert all(type(s.port) is int and s.port >= 0 for s in spec.serials)


def _check_round_trip(spec: DomainSpec, family: str) -> None:
    try:
        text = render_domain_xml(spec)
    except ValueError as exc:  # documented: a disk without <target dev> cannot be written
        assert "target" in str(exc) and any(d.target is None for d in spec.disks)
        event("render refused: disk without target")
        return
    again = parse_domain_xml(text)
    assert dataclasses.replace(again, xml="") == dataclasses.replace(spec, xml=""), text
    event("round trip equal")


@settings(FUZZ, max_examples=1000)
@given(domain_documents())
@example(("<domain type='qemu'><name>g</name><memory unit='TiB'>99999999999999999999</memory></domain>",
          Expect(memory=("99999999999999999999", "TiB"))))  # rendered as 29 KiB digits: unparseable
@example((f"<domain type='qemu'><name>g</name><memory unit='b'>{2**63 - 1023}</memory></domain>",
          Expect(memory=(str(2**63 - 1023), "b"))))  # rounds up to 2^53 KiB: libvirt says overflow
@example((f"<domain type='qemu'><name>g</name><memory unit='KiB'>{2**53 - 1}</memory></domain>",
          Expect(memory=(str(2**53 - 1), "KiB"))))  # libvirt's largest memory still parses
def test_generated_domain_xml_parses_within_libvirt_rules_or_is_refused(doc: tuple[str | bytes, Expect]) -> None:
    text, expect = doc
    spec, error = _attempt("parse_domain_xml", "generated", lambda: parse_domain_xml(text), (DomainXMLError,))
    if spec is None:
        assert isinstance(error, DomainXMLError)
        assert error.line is None or error.line >= 1
        return
    _check_spec(spec)
    assert expect.memory is not None
    memory = _expected_bytes(*expect.memory)
    assert spec.memory_bytes == memory
    current = _expected_bytes(*expect.current) if expect.current is not None else memory
    assert current is not None
    assert spec.current_memory_bytes == (current if 0 < current <= memory else memory)
    if expect.max_memory is not None:
        assert spec.max_memory_bytes == _expected_bytes(*expect.max_memory)
    if not expect.balloons:
        assert spec.memballoon is not None and spec.memballoon.implicit
    else:
        (balloon,) = expect.balloons
        assert (spec.memballoon is None) == (balloon["model"] == "none")
        if spec.memballoon is not None:
            assert spec.memballoon.model == balloon["model"] and not spec.memballoon.implicit
            assert spec.memballoon.period_s == (None if balloon["period"] is None else int(balloon["period"]))
    _check_round_trip(spec, "generated")


@st.composite
def mutated_documents(draw: st.DrawFn) -> str | bytes:
    """A generated document with a slice cut out, duplicated or replaced: mostly broken XML."""
    text, _ = draw(domain_documents())
    start = draw(st.integers(0, len(text)))
    end = draw(st.integers(start, min(len(text), start + 40)))
    how = draw(st.sampled_from(["cut", "dup", "replace", "truncate"]))
    if how == "truncate":
        return text[:start]
    junk: str | bytes = (draw(st.binary(max_size=8)) if isinstance(text, bytes)
                         else draw(st.text(max_size=8) | st.sampled_from(["<", "&", "]]>", "<!DOCTYPE d>", "&x;"])))
    if how == "cut":
        return text[:start] + text[end:]
    if how == "dup":
        return text[:end] + text[start:]
    return text[:start] + junk + text[end:]  # type: ignore[operator]


@settings(FUZZ, max_examples=400)
@given(mutated_documents())
@example("\ud800")  # a lone surrogate: not encodable as UTF-8
@example("<domain type='qemu'><name>g\udfff</name><memory>1</memory></domain>")
def test_mutated_domain_xml_is_parsed_or_refused_with_domain_xml_error(text: str | bytes) -> None:
    spec, _ = _attempt("parse_domain_xml", "mutated", lambda: parse_domain_xml(text), (DomainXMLError,))
    if spec is not None:
        _check_spec(spec)
        _check_round_trip(spec, "mutated")


@settings(FUZZ, max_examples=600)
@given(st.text() | st.binary() | st.text(alphabet=st.sampled_from("<>/='\" domainemoryxl&;!?-\n"), max_size=60))
@example("")
@example(b"\xff\xfe<\x00d\x00")
@example("<?xml version='1.0' encoding='ISO-8859-1'?><domain/>")
@example(b"<?xml version='1.0' encoding='nonsense'?><domain/>")
@example(b"<?xml version='1.0' encoding='UTF-16'?><domain type='qemu'/>")
def test_arbitrary_text_and_bytes_are_refused_with_domain_xml_error(text: str | bytes) -> None:
    spec, _ = _attempt("parse_domain_xml", "arbitrary", lambda: parse_domain_xml(text), (DomainXMLError,))
    if spec is not None:
        _check_spec(spec)


@settings(FUZZ, max_examples=100)
@given(st.none() | st.integers() | st.floats() | st.lists(st.integers(), max_size=3) | st.just(memoryview(b"<a/>")))
def test_domain_xml_that_is_not_str_or_bytes_is_a_type_error(value: object) -> None:
    _, error = _attempt("parse_domain_xml", "not str/bytes", lambda: parse_domain_xml(value),  # type: ignore[arg-type]
                        (TypeError,))
    assert isinstance(error, TypeError)


# ---------------------------------------------------------------------------- sizes

_ASCII_DIGITS = st.text(alphabet=string.digits, min_size=1, max_size=22)
_OTHER_DIGITS = st.text(alphabet=st.characters(categories=("Nd",), exclude_characters=string.digits),
                        min_size=1, max_size=3)
#: parse_size's documented grammar, written out again: ASCII digits, an optional fraction.
_SIZE_GRAMMAR = re.compile(r"\s*(-?)([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*\Z")
MAX_SIZE_DIGITS = 60


def _reference_size(text: str, default_unit: str) -> int | None:
    """What parse_size should give for ``text`` (None: it must refuse it), computed exactly."""
    match = _SIZE_GRAMMAR.fullmatch(text)
    if not match:
        return None
    sign, number, unit = match.groups()
    factor = _unit_bytes(unit or default_unit)
    if factor is None or len(number.replace(".", "")) > MAX_SIZE_DIGITS:
        return None
    value = Fraction(number) * factor
    if (sign and value) or value.denominator != 1:
        return None
    return int(value)


_SIGN = st.sampled_from(["", "", "", "-", "+"])
_WHOLE = mostly(_ASCII_DIGITS, _OTHER_DIGITS | st.just(""))
_FRACTION = st.sampled_from([None, None]) | _ASCII_DIGITS | st.just("")
_SIZE_UNIT = mostly(st.sampled_from(["", *UNITS]), _JUNK_UNITS, bad_percent=15)
_SIZE_JUNK = mostly(st.just(""), st.sampled_from(["x", "!", "1", ".", "e3", "\x00"]) | st.text(max_size=3))


@st.composite
def size_strings(draw: st.DrawFn) -> str:
    """Numbers (some with a sign, a fraction, non-ASCII digits) with every unit, and junk."""
    sign, whole, frac, unit = draw(_SIGN), draw(_WHOLE), draw(_FRACTION), draw(_SIZE_UNIT)
    pads = [draw(_WS) for _ in range(3)]
    number = whole + ("" if frac is None else "." + frac)
    return pads[0] + sign + number + pads[1] + unit + pads[2] + draw(_SIZE_JUNK)


def _check_size(text: str, default_unit: str, family: str) -> None:
    result, error = _attempt("parse_size", family, lambda: parse_size(text, default_unit), (ValueError,))
    expected = _reference_size(text, default_unit)
    assert result == expected, f"parse_size({text!r}, {default_unit!r}): {result!r} ({error!r}), not {expected}"
    assert result is None or (type(result) is int and result >= 0)


@settings(FUZZ, max_examples=1500)
@given(size_strings(), st.sampled_from(sorted(UNITS)))
@example("\u0663M", "b")  # an Arabic-Indic digit was read as 3 MiB
@example("1" * 5000, "b")  # Python's own "Exceeds the limit (4300 digits)" message, 5000 digits long
@example("-0M", "b")
@example("1.5b", "b")
@example("0.0009765625KiB", "b")
def test_size_strings_parse_exactly_or_are_refused_with_value_error(text: str, default_unit: str) -> None:
    _check_size(text, default_unit, "strings")


@settings(FUZZ, max_examples=400)
@given(st.text(max_size=30) | st.from_regex(r"\s*-?\d+(\.\d*)?\s*[A-Za-z]{0,4}\s*", fullmatch=True),
       st.sampled_from(sorted(UNITS)) | st.text(max_size=4))
@example("12", "mib")
def test_arbitrary_size_strings_are_parsed_to_bytes_or_refused(text: str, default_unit: str) -> None:
    _check_size(text, default_unit, "arbitrary strings")


@settings(FUZZ, max_examples=1000)
@given(st.integers(min_value=-(2**70), max_value=2**70) | st.integers(), st.sampled_from(sorted(UNITS)))
@example(2**64 - 1, "b")
@example(-1, "b")
def test_integer_sizes_round_trip_through_every_unit(n: int, unit: str) -> None:
    result, error = _attempt("parse_size", "ints", lambda: parse_size(n, unit), (ValueError,))
    if n < 0:
        assert isinstance(error, ValueError) and "negative" in str(error)
        return
    assert result == n * UNITS[unit]
    if len(str(n)) > MAX_SIZE_DIGITS:
        return
    assert parse_size(f"{n}b") == n and parse_size(f"{n}") == n and parse_size(f" {n} bytes ") == n
    assert parse_size(f"{n}{unit}") == parse_size(f"{n} {unit}") == n * UNITS[unit]


@settings(FUZZ, max_examples=300)
@given(st.booleans() | st.none() | st.floats() | st.binary(max_size=4) | st.lists(st.integers(), max_size=2)
       | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2) | st.complex_numbers()
       | st.decimals(allow_nan=False) | st.fractions())
@example(True)
@example(1.0)
@example(float("nan"))
def test_sizes_that_are_not_int_or_str_are_a_type_error(value: object) -> None:
    _, error = _attempt("parse_size", "other types", lambda: parse_size(value), (TypeError,))  # type: ignore[arg-type]
    assert isinstance(error, TypeError)


# ---------------------------------------------------------------------------- guest-stats replies

_QEMU_KEYS = [s.qemu_key for s in STATS]
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5)
stat_values = mostly(st.integers(min_value=0, max_value=2**40) | st.integers(min_value=-(2**70), max_value=2**70)
                     | st.sampled_from([UNSET, -1, 0, 2**63, 2**64 - 2, 2**64, 2**64 + 1, -(2**64)]),
                     st.booleans() | st.floats() | st.text(max_size=4) | st.none() | json_like, 20)
stat_keys = mostly(st.sampled_from([*_QEMU_KEYS, "stat-oom-kills", "stat-new-thing"]) | st.text(max_size=10),
                   st.integers() | st.none() | st.booleans() | st.tuples(st.integers()) | st.floats(allow_nan=False), 2)


_SHAPE = mostly(st.just("qemu"), st.sampled_from(["no stats", "no last-update", "stats not a dict", "junk", "empty"]),
                bad_percent=25)
_STATS_OBJECT = st.dictionaries(stat_keys, stat_values, max_size=10)
_NOT_AN_OBJECT = json_like.filter(lambda v: not isinstance(v, dict))
_EXTRA_KEYS = st.dictionaries(st.text(max_size=8), json_like, max_size=2)
_JUNK_REPLY = json_like | st.tuples(json_like) | st.sets(st.integers(), max_size=2)


@st.composite
def guest_stats_replies(draw: st.DrawFn) -> object:
    """QEMU-shaped replies (all kinds of values, huge, negative, the sentinel) and junk."""
    shape = draw(_SHAPE)
    if shape == "junk":
        return draw(_JUNK_REPLY)
    reply: dict[Any, Any] = {}
    if shape in ("qemu", "no last-update"):
        reply["stats"] = draw(_STATS_OBJECT)
    elif shape == "stats not a dict":
        reply["stats"] = draw(_NOT_AN_OBJECT)
    if shape in ("qemu", "no stats", "stats not a dict"):
        reply["last-update"] = draw(stat_values)
    if draw(st.booleans()):
        reply.update(draw(_EXTRA_KEYS))
    return reply


def _clean(value: object) -> int | None:
    return value if type(value) is int and 0 <= value < UNSET else None


def _deep(depth: int) -> list[Any]:
    outer: list[Any] = []
    inner = outer
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


@settings(FUZZ, max_examples=1500)
@given(guest_stats_replies(), maybe(st.integers(0, 2**40)))
@example({"stats": {"stat-free-memory": 2**64}, "last-update": 2**70}, None)  # above QEMU's uint64
@example({"stats": {1: 2}, "last-update": 0}, None)  # not a stat name
@example({"stats": {"stat-swap-in": UNSET, "stat-swap-out": -1}, "last-update": UNSET}, 4096)
def test_guest_stats_replies_are_parsed_to_clean_values_or_refused(reply: object, actual: int | None) -> None:
    stats, error = _attempt("parse_guest_stats", "replies",
                            lambda: parse_guest_stats(reply, actual=actual, read_time=1.5),  # type: ignore[arg-type]
                            (ValueError,))
    qemu_shaped = (isinstance(reply, dict) and "stats" in reply and "last-update" in reply
                   and isinstance(reply["stats"], dict) and all(isinstance(k, str) for k in reply["stats"]))
    assert (stats is not None) == qemu_shaped, (reply, error)
    if stats is None:
        return
    assert isinstance(stats, BalloonStats) and stats.actual == actual and stats.read_time == 1.5 and not stats.new
    assert stats.last_update is None or (type(stats.last_update) is int and 0 < stats.last_update < UNSET)
    assert stats.last_update == (_clean(reply["last-update"]) or None)
    expected = {stat_name(k): _clean(v) for k, v in reply["stats"].items()}
    assert stats.stats == expected
    for value in stats.stats.values():
        assert value is None or (type(value) is int and 0 <= value < UNSET)
    if stats.last_update is not None:
        assert math.isfinite(stats.age_s or 0.0) and (stats.age_s or 0.0) >= 0


@pytest.mark.parametrize("reply", [_deep(5_000), {"stats": _deep(5_000), "last-update": 1}],
                         ids=["deep reply", "deep stats"])
def test_deeply_nested_reply_is_a_value_error_not_a_recursion_error(reply: object) -> None:
    # Not an @example: hypothesis pretty-prints explicit examples, and overflows the stack on these.
    _, error = _attempt("parse_guest_stats", "deeply nested", lambda: parse_guest_stats(reply),  # type: ignore[arg-type]
                        (ValueError,))
    assert isinstance(error, ValueError) and "[[[" in str(error)


# ---------------------------------------------------------------------------- virtio-mem targets (issue 13)

_KIB_SIZES = st.sampled_from([0, 1, 1024, 2048, 3072, 4096, 65536, 131072, 262144, 262145, 524288])


@settings(FUZZ, max_examples=300)
@given(size=_KIB_SIZES.filter(bool), block=st.none() | _KIB_SIZES, requested=st.none() | _KIB_SIZES,
       max_memory=st.booleans())
def test_virtio_mem_target_is_refused_exactly_when_libvirt_would(size: int, block: int | None,
                                                                 requested: int | None, max_memory: bool) -> None:
    target = f"<size unit='KiB'>{size}</size><node>0</node>"
    target += f"<block unit='KiB'>{block}</block>" if block is not None else ""
    target += f"<requested unit='KiB'>{requested}</requested>" if requested is not None else ""
    text = ("<domain type='qemu'><name>g</name>"
            + ("<maxMemory slots='1' unit='GiB'>4</maxMemory>" if max_memory else "")
            + f"<memory unit='KiB'>{262144 + size}</memory><vcpu>1</vcpu><cpu><numa>"
            "<cell id='0' cpus='0' memory='262144' unit='KiB'/></numa></cpu>"
            f"<devices><memory model='virtio-mem'><target>{target}</target></memory></devices></domain>")
    b, r = block or 0, requested or 0
    valid = (max_memory and b >= 2048 and b & (b - 1) == 0 and r <= size and r % b == 0 and size % b == 0)
    try:
        spec = parse_domain_xml(text)
    except DomainXMLError as error:
        assert not valid, error
        return
    assert valid
    assert (spec.memory_devices[0].block_bytes, spec.memory_devices[0].requested_bytes) == (
        b * 1024, None if requested is None else r * 1024)
    again = parse_domain_xml(render_domain_xml(spec))
    assert dataclasses.replace(again, xml="") == dataclasses.replace(spec, xml="")
