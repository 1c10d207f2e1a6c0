"""balloonlab.domain against libvirt's own test domain XMLs (../shared/data/libvirt-memballoon)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import pytest

from balloonlab.domain import (BALLOONLAB_NS, AddressSpec, DiskSpec, DomainSpec, MemballoonSpec,
                               MemoryDeviceSpec, NumaCellSpec, SerialSpec, builtin_domain, load_domain_xml,
                               parse_domain_xml, render_domain_xml, with_changes)
from balloonlab.model.errors import DomainXMLError
from balloonlab.model.units import UNITS

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "libvirt-memballoon"


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The libvirt memballoon corpus, beside the project root; fail (not skip) when absent."""
    if not CORPUS.is_dir():
        pytest.fail(f"libvirt corpus folder missing: {CORPUS} (tests expect ../shared/data/"
                    "libvirt-memballoon beside the project root)")
    return CORPUS


class Expect(NamedTuple):
    """What each corpus file says about its balloon; model None means model='none'."""

    model: str | None
    memory_kib: int
    address: tuple | None = None  # ('pci', slot) / ('ccw', cssid, devno) / ('virtio-mmio',)
    period: int | None = None
    autodeflate: bool | None = None
    fpr: bool | None = None
    options: tuple = ()
    implicit: bool = False


ALL_ON = (("iommu", True), ("ats", True), ("packed", True), ("page_per_vq", True))
EXPECTED = {
    "aarch64-virt-headless-mmio.xml": Expect("virtio", 4194304, ("virtio-mmio",)),
    "aarch64-virt-headless.xml": Expect("virtio", 4194304),
    "balloon-ccw-deflate.xml": Expect("virtio", 219136, ("ccw", 0xFE, 0x0A), autodeflate=True),
    "balloon-device-auto.x86_64-latest.xml": Expect("virtio", 219100, ("pci", 2)),
    "balloon-device-auto.xml": Expect("virtio", 219100, implicit=True),
    "balloon-device-deflate-off.x86_64-latest.xml": Expect("virtio", 219136, ("pci", 18), autodeflate=False),
    "balloon-device-deflate.xml": Expect("virtio", 219136, ("pci", 18), autodeflate=True),
    "balloon-device-period.x86_64-latest.xml": Expect("virtio", 219136, ("pci", 18), period=10),
    "balloon-device-period.xml": Expect("virtio", 219136, ("pci", 18), period=10),
    "balloon-device.xml": Expect("virtio", 219136, ("pci", 18)),
    "balloon-mmio-deflate.aarch64-latest.xml": Expect("virtio", 1048576, ("virtio-mmio",), autodeflate=True),
    "balloon-mmio-deflate.xml": Expect("virtio", 1048576, ("virtio-mmio",), autodeflate=True),
    "hostdev-pci-address.xml": Expect(None, 219100),
    "hostdev-vfio-zpci-ccw-memballoon.xml": Expect("virtio", 219100, implicit=True),
    "launch-security-s390-pv.xml": Expect("virtio", 219100, ("ccw", 0xFE, 0x0001)),
    "memtune-unlimited.xml": Expect("virtio", 214 * 1024),
    "memtune.x86_64-latest.xml": Expect("virtio", 219136, ("pci", 2)),
    "memtune.xml": Expect("virtio", 214 * 1024),
    "ppc64-pseries-headless.xml": Expect("virtio", 4194304),
    "riscv64-virt-headless.xml": Expect("virtio", 4194304),
    "s390x-ccw-headless.xml": Expect("virtio", 4194304),
    "virtio-non-transitional.xml": Expect("virtio-non-transitional", 219136),
    "virtio-options-memballoon-ats.xml": Expect("virtio", 219136, ("pci", 2), options=(("ats", True),)),
    "virtio-options-memballoon-freepage-reporting.xml": Expect("virtio", 219136, ("pci", 2), fpr=True),
    "virtio-options-memballoon-iommu.xml": Expect("virtio", 219136, ("pci", 2), options=(("iommu", True),)),
    "virtio-options-memballoon-packed.xml": Expect("virtio", 219136, ("pci", 2), options=(("packed", True),)),
    "virtio-options.xml": Expect("virtio", 2316288, ("pci", 0x0C), options=ALL_ON),
    "virtio-transitional.xml": Expect("virtio-transitional", 219136),
    "x86_64-pc-headless.xml": Expect("virtio", 4194304),
    "x86_64-q35-headless.xml": Expect("virtio", 4194304),
}

MINIMAL = """<domain type='qemu'>
  <name>g</name>
  <memory unit='MiB'>64</memory>
{extra}</domain>
"""


def _minimal(extra: str = "") -> str:
    return MINIMAL.format(extra=extra)


def _error(text: str | bytes) -> DomainXMLError:
    with pytest.raises(DomainXMLError) as info:
        parse_domain_xml(text)
    return info.value


# ---------------------------------------------------------------------------- the corpus

def test_table_covers_every_corpus_xml(corpus_dir: Path) -> None:
    assert sorted(p.name for p in corpus_dir.glob("*.xml")) == sorted(EXPECTED)


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_corpus_balloon(corpus_dir: Path, filename: str) -> None:
    spec = load_domain_xml(corpus_dir / filename)
    expect = EXPECTED[filename]
    assert spec.memory_bytes == expect.memory_kib * 1024
    assert spec.xml == (corpus_dir / filename).read_text()
    if expect.model is None:
        assert spec.memballoon is None and not spec.has_balloon and spec.period_s is None
        return
    balloon = spec.memballoon
    assert balloon is not None and spec.has_balloon
    assert (balloon.model, balloon.period_s, spec.period_s) == (expect.model, expect.period, expect.period)
    assert (balloon.autodeflate, balloon.free_page_reporting) == (expect.autodeflate, expect.fpr)
    assert balloon.driver_options == expect.options
    assert balloon.implicit is expect.implicit
    assert balloon.alias is None
    address = balloon.address
    if expect.address is None:
        assert address is None
    elif expect.address[0] == "pci":
        assert address == AddressSpec("pci", domain=0, bus=0, slot=expect.address[1], function=0)
    elif expect.address[0] == "ccw":
        assert address == AddressSpec("ccw", cssid=expect.address[1], ssid=0, devno=expect.address[2])
    else:
        assert address == AddressSpec("virtio-mmio")


def test_corpus_period_file_details(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "balloon-device-period.xml")
    assert (spec.name, spec.uuid, spec.domain_type) == ("QEMUGuest1", "c7a5fdbd-edaf-9455-926a-d65c16db1809", "qemu")
    assert (spec.vcpus, spec.arch, spec.machine) == (1, "x86_64", "pc")
    assert spec.emulator == "/usr/bin/qemu-system-x86_64"
    assert spec.disks == (DiskSpec("/dev/HostVG/QEMUGuest1", "raw", "disk", "ide", "hda", False),)
    assert spec.agent is False and spec.serials == ()


def test_corpus_memory_without_unit_is_kib(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "balloon-mmio-deflate.xml")  # no unit, no currentMemory
    assert spec.memory_bytes == 1048576 * 1024 == spec.current_memory_bytes
    assert (spec.arch, spec.machine) == ("aarch64", "virt")


def test_corpus_memtune_units(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "memtune.xml")  # memory 214 MiB, currentMemory 219136 KiB
    assert spec.memory_bytes == 214 * 2**20 == spec.current_memory_bytes


def test_corpus_virtio_options_max_memory_and_nested_elements(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "virtio-options.xml")
    assert spec.max_memory_bytes == 1099511627776 * 1024
    # <memory model='virtio-mem'> inside <devices> must not be taken for the domain's <memory>
    assert spec.memory_bytes == 2316288 * 1024
    assert spec.disks == (DiskSpec("/var/lib/libvirt/images/img1", "raw", "disk", "virtio", "vda"),)


def test_corpus_qcow2_disk_and_vcpus(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "x86_64-q35-headless.xml")
    assert spec.disks == (DiskSpec("/var/lib/libvirt/images/guest.qcow2", "qcow2", "disk", "virtio", "vda"),)
    assert (spec.vcpus, spec.machine, spec.memballoon.address) == (4, "q35", None)


def test_corpus_defaults_when_elements_absent(corpus_dir: Path) -> None:
    spec = load_domain_xml(corpus_dir / "hostdev-vfio-zpci-ccw-memballoon.xml")
    assert (spec.vcpus, spec.domain_type, spec.current_memory_bytes) == (1, "kvm", 219100 * 1024)
    assert spec.memballoon == MemballoonSpec("virtio", implicit=True)


@pytest.mark.parametrize("filename", sorted(EXPECTED))
def test_corpus_round_trip(corpus_dir: Path, filename: str) -> None:
    spec = load_domain_xml(corpus_dir / filename)
    again = parse_domain_xml(render_domain_xml(spec))
    assert dataclasses.replace(again, xml=spec.xml) == spec


# ---------------------------------------------------------------------------- units

UNIT_CASES = [  # (unit, value, bytes after libvirt's round-up to whole KiB)
    ("b", 2048, 2048), ("b", 1, 1024), ("bytes", 1000, 1024), ("bytes", 1025, 2048),
    ("KB", 1, 1024), ("KB", 1024, 1_024_000), ("k", 1, 1024), ("K", 3, 3072), ("KiB", 219100, 224358400),
    ("MB", 1, 1_000_448), ("M", 1, 1_048_576), ("MiB", 214, 224_395_264),
    ("GB", 1, 1_000_000_512), ("G", 2, 2_147_483_648), ("GiB", 1, 1_073_741_824),
    ("TB", 1, 1_000_000_000_000), ("T", 1, 1_099_511_627_776), ("TiB", 2, 2_199_023_255_552),
]


def test_unit_cases_cover_every_libvirt_unit() -> None:
    assert {unit for unit, _, _ in UNIT_CASES} == set(UNITS)


@pytest.mark.parametrize(("unit", "value", "expected"), UNIT_CASES)
def test_memory_units(unit: str, value: int, expected: int) -> None:
    # <maxMemory> (memory hotplug) needs a NUMA cell in libvirt: the cell's memory is in the same unit
    text = f"<domain type='qemu'><name>g</name><memory unit='{unit}'>{value}</memory>" \
           f"<currentMemory unit='{unit}'>{value}</currentMemory><maxMemory unit='{unit}'>{value}</maxMemory>" \
           f"<cpu><numa><cell id='0' cpus='0' memory='{value}' unit='{unit}'/></numa></cpu></domain>"
    spec = parse_domain_xml(text)
    assert spec.memory_bytes == spec.current_memory_bytes == spec.max_memory_bytes == expected
    assert spec.numa_cells == (NumaCellSpec(0, (0,), expected),) and spec.initial_memory_bytes == expected


def test_memory_default_unit_is_kib() -> None:
    assert parse_domain_xml("<domain type='qemu'><name>g</name><memory>3</memory></domain>").memory_bytes == 3072


def test_current_memory_like_libvirt() -> None:
    zero = parse_domain_xml(_minimal("  <currentMemory>0</currentMemory>\n"))
    above = parse_domain_xml(_minimal("  <currentMemory unit='GiB'>1</currentMemory>\n"))
    below = parse_domain_xml(_minimal("  <currentMemory unit='MiB'>48</currentMemory>\n"))
    assert zero.current_memory_bytes == above.current_memory_bytes == 64 * 2**20
    assert below.current_memory_bytes == 48 * 2**20


# ---------------------------------------------------------------------------- errors

def test_malformed_xml_reports_line() -> None:
    error = _error("<domain type='qemu'>\n  <name>g</nam>\n  <memory>1</memory>\n</domain>")
    assert error.line == 2
    assert "not well-formed" in error.message


def test_empty_document() -> None:
    assert _error("").line == 1


def test_unknown_unit_reports_line_and_element() -> None:
    error = _error("<domain type='qemu'>\n  <name>g</name>\n  <memory unit='Mbit'>64</memory>\n</domain>")
    assert (error.line, error.element) == (3, "memory")
    assert "'Mbit'" in error.message and "MiB" in error.message


@pytest.mark.parametrize("value", ["0", "-5", "12.5", "abc", "", "1" * 25])
def test_memory_not_a_positive_integer(value: str) -> None:
    error = _error(f"<domain type='qemu'>\n  <name>g</name>\n  <memory>{value}</memory>\n</domain>")
    assert (error.line, error.element) == (3, "memory")
    assert "positive integer" in error.message


def test_missing_memory_and_name_and_bad_root() -> None:
    assert "<memory>" in _error("<domain type='qemu'><name>g</name></domain>").message
    no_name = _error("<domain type='qemu'>\n<memory>1</memory></domain>")
    assert "<name>" in no_name.message and (no_name.line, no_name.element) == (1, "domain")
    root = _error("<?xml version='1.0'?>\n<network><name>g</name></network>")
    assert (root.line, root.element) == (2, "network") and "<domain>" in root.message
    assert "type" in _error("<domain><name>g</name><memory>1</memory></domain>").message


@pytest.mark.parametrize("period", ["-1", "ten", "1.5", "", "2147483648"])
def test_bad_stats_period(period: str) -> None:
    error = _error(_minimal(f"  <devices>\n    <memballoon model='virtio'>\n"
                            f"      <stats period='{period}'/>\n    </memballoon>\n  </devices>\n"))
    assert (error.line, error.element) == (6, "stats")
    assert "period" in error.message


def test_period_zero_and_missing_stats() -> None:
    zero = parse_domain_xml(_minimal("<devices><memballoon model='virtio'><stats period='0'/></memballoon></devices>"))
    none = parse_domain_xml(_minimal("<devices><memballoon model='virtio'/></devices>"))
    assert (zero.period_s, none.period_s) == (0, None)


def test_two_memballoons() -> None:
    error = _error(_minimal("  <devices>\n    <memballoon model='virtio'/>\n    <memballoon model='virtio'/>\n"
                            "  </devices>\n"))
    assert (error.line, error.element) == (6, "memballoon")


def test_unknown_model_and_onoff() -> None:
    error = _error(_minimal("  <devices>\n    <memballoon model='virtio-foo'/>\n  </devices>\n"))
    assert (error.line, error.element) == (5, "memballoon") and "virtio-transitional" in error.message
    bad = _error(_minimal("<devices><memballoon model='virtio' autodeflate='yes'/></devices>"))
    assert "'on' or 'off'" in bad.message


@pytest.mark.parametrize(("attrs", "slot"), [("slot='18'", 18), ("slot='0x12'", 18), ("slot='022'", 18),
                                             ("slot='0'", 0), ("bus='0x00' slot='0x1f' function='0x7'", 31)])
def test_pci_address_numbers(attrs: str, slot: int) -> None:
    spec = parse_domain_xml(_minimal(f"<devices><memballoon model='virtio'><address type='pci' {attrs}/>"
                                     "</memballoon></devices>"))
    assert spec.memballoon.address.slot == slot and spec.memballoon.address.bus == 0


@pytest.mark.parametrize("attrs", ["type='pci' slot='0x20'", "type='pci' slot='zz'", "type='pci' function='8'",
                                   "type='pci' slot='-1'", "type='pci' slot='08'", "type='ccw' devno='0x10000'",
                                   "type='ccw' cssid='0xff'", "slot='2'"])
def test_bad_address_numbers(attrs: str) -> None:
    error = _error(_minimal(f"  <devices>\n    <memballoon model='virtio'>\n      <address {attrs}/>\n"
                            "    </memballoon>\n  </devices>\n"))
    assert (error.line, error.element) == (6, "address")


def test_bad_alias() -> None:
    error = _error(_minimal("<devices><memballoon model='virtio'><alias name='1 bad'/></memballoon></devices>"))
    assert error.element == "alias"


def test_entities_are_never_expanded(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    external = (f"<?xml version='1.0'?>\n<!DOCTYPE domain [<!ENTITY x SYSTEM 'file://{secret}'>]>\n"
                "<domain type='qemu'><name>&x;</name><memory>1</memory></domain>")
    internal = ("<!DOCTYPE domain [<!ENTITY x 'expanded'>]>\n"
                "<domain type='qemu'><name>g</name><memory unit='&x;'>1</memory></domain>")
    laughs = ("<!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;'>"
              "<!ENTITY c '&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;'>]>\n"
              "<domain type='qemu'><name>&c;</name><memory>1</memory></domain>")
    for text in (external, internal, laughs):
        error = _error(text)
        assert "DOCTYPE" in error.message
        assert "TOP-SECRET" not in str(error) and "expanded" not in str(error)
    assert _error(external).line == 2


def test_encodings_and_types(tmp_path: Path) -> None:
    latin = "<?xml version='1.0' encoding='ISO-8859-1'?>\n<domain type='qemu'><name>gäst</name>" \
            "<memory>1</memory></domain>"
    assert parse_domain_xml(latin.encode("latin-1")).name == "gäst"
    assert parse_domain_xml(latin).name == "gäst"  # a str is decoded already: the declaration is moot
    path = tmp_path / "d.xml"
    path.write_bytes(latin.encode("latin-1"))
    assert load_domain_xml(path).xml == latin
    with pytest.raises(TypeError):
        parse_domain_xml(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- metadata, render

def test_agent_metadata() -> None:
    agent = _minimal(f"<metadata><x:guest xmlns:x='{BALLOONLAB_NS}' agent='serial1'/></metadata>")
    other_ns = _minimal("<metadata><x:guest xmlns:x='https://example.org/' agent='serial1'/></metadata>")
    assert parse_domain_xml(agent).agent is True
    assert parse_domain_xml(other_ns).agent is False
    wrong = _error(_minimal(f"<metadata><x:guest xmlns:x='{BALLOONLAB_NS}' agent='serial3'/></metadata>"))
    assert wrong.element == "guest" and "serial1" in wrong.message


def _custom_spec() -> DomainSpec:
    balloon = MemballoonSpec("virtio-transitional", alias="ua-balloon", autodeflate=False,
                             free_page_reporting=True, period_s=0,
                             address=AddressSpec("pci", domain=0, bus=1, slot=3, function=2),
                             driver_options=(("iommu", False), ("page_per_vq", True)))
    return DomainSpec(name="custom", uuid="c7a5fdbd-edaf-9455-926a-d65c16db1809", domain_type="kvm",
                      memory_bytes=2**30, current_memory_bytes=2**29, max_memory_bytes=2**31, vcpus=2,
                      arch="x86_64", machine="q35", emulator="/usr/bin/qemu-system-x86_64",
                      kernel="/boot/vmlinuz", initrd="/boot/initrd", cmdline="console=ttyS0 quiet",
                      disks=(DiskSpec("/img/a.qcow2", "qcow2", "disk", "virtio", "vda"),
                             DiskSpec("/dev/sr0", "raw", "cdrom", "sata", "sda", True)),
                      serials=(SerialSpec("file", 0, "/tmp/console.log"), SerialSpec("unix", 1, "/tmp/a.sock")),
                      memballoon=balloon, agent=True,
                      # <maxMemory> on x86_64 needs a NUMA cell: libvirt refuses it without one
                      # ("At least one numa node has to be configured when enabling memory hotplug")
                      numa_cells=(NumaCellSpec(0, (0, 1), 2**30),))


_MIB = 2**20
_DEVICES = (
    MemoryDeviceSpec("virtio-mem", 256 * _MIB, node=0, block_bytes=2 * _MIB, requested_bytes=128 * _MIB,
                     alias="virtiomem0", address=AddressSpec("pci", 0, 0, 5, 0),
                     driver_options=(("iommu", True),), source_nodemask=(0,), source_pagesize_bytes=2 * _MIB),
    MemoryDeviceSpec("dimm", 128 * _MIB, node=1, address=AddressSpec("dimm", slot=1, base=0x140000000),
                     access="shared", discard=True),
    MemoryDeviceSpec("nvdimm", 512 * _MIB, node=0, label_bytes=128 * 1024, readonly=True,
                     source_path="/tmp/nvdimm0"),
)


def _devices_spec() -> DomainSpec:
    """_custom_spec with two NUMA cells and one memory device of each launchable kind and nvdimm."""
    cells = (NumaCellSpec(0, (0,), 2**29), NumaCellSpec(1, (1,), 2**29))
    total = 2**30 + sum(d.size_bytes for d in _DEVICES)
    return dataclasses.replace(_custom_spec(), memory_bytes=total, max_memory_bytes=4 * 2**30, memory_slots=2,
                               numa_cells=cells, memory_devices=_DEVICES)


@pytest.mark.parametrize("balloon", [
    "custom", "devices", None, MemballoonSpec("virtio", implicit=True),
    MemballoonSpec("virtio", address=AddressSpec("ccw", cssid=0xFE, ssid=0, devno=0x0A)),
    MemballoonSpec("virtio", address=AddressSpec("virtio-mmio"), autodeflate=True),
])
def test_render_round_trip(balloon: object) -> None:
    if balloon == "devices":
        spec = _devices_spec()
    else:
        spec = _custom_spec() if balloon == "custom" else dataclasses.replace(_custom_spec(), memballoon=balloon)
    text = render_domain_xml(spec)
    assert dataclasses.replace(parse_domain_xml(text), xml="") == dataclasses.replace(spec, xml="")


def test_render_shape() -> None:
    text = render_domain_xml(_custom_spec())
    assert '<memory unit="KiB">1048576</memory>' in text
    assert '<currentMemory unit="KiB">524288</currentMemory>' in text
    assert '<address type="pci" domain="0x0000" bus="0x01" slot="0x03" function="0x2"/>' in text
    assert '<source dev="/dev/sr0"/>' in text and "<readonly/>" in text
    assert f'xmlns:balloonlab="{BALLOONLAB_NS}" agent="serial1"' in text
    assert "<memballoon" not in render_domain_xml(dataclasses.replace(_custom_spec(),
                                                  memballoon=MemballoonSpec("virtio", implicit=True)))
    with pytest.raises(ValueError, match="target"):
        render_domain_xml(dataclasses.replace(_custom_spec(), disks=(DiskSpec("/img/a"),)))


def test_with_changes_rerenders_xml() -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="quiet")
    changed = with_changes(spec, kernel=None, vcpus=2)
    assert (changed.kernel, changed.vcpus) == (None, 2)
    assert "<kernel>" not in changed.xml and parse_domain_xml(changed.xml) == changed
    with pytest.raises(TypeError):
        with_changes(spec, xml="<domain/>")


# ---------------------------------------------------------------------------- builtin_domain

def test_builtin_domain() -> None:
    spec = builtin_domain(name="bl-test", kernel="/k", initrd="/i", cmdline="console=ttyS0",
                          memory="256M", current_memory=200 * 2**20, period_s=5, model="virtio-non-transitional",
                          alias="ua-b", autodeflate=True, free_page_reporting=False, machine="q35")
    parsed = parse_domain_xml(spec.xml)
    assert parsed == spec
    assert parsed.agent is True and parsed.period_s == 5
    assert (parsed.memory_bytes, parsed.current_memory_bytes) == (256 * 2**20, 200 * 2**20)
    assert parsed.serials == (SerialSpec("pty", 0), SerialSpec("unix", 1))
    assert parsed.memballoon == MemballoonSpec("virtio-non-transitional", alias="ua-b", autodeflate=True,
                                               free_page_reporting=False, period_s=5)
    assert (parsed.arch, parsed.machine, parsed.kernel, parsed.cmdline) == ("x86_64", "q35", "/k", "console=ttyS0")


def test_builtin_domain_defaults_and_no_balloon() -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="")
    assert (spec.memory_bytes, spec.current_memory_bytes, spec.vcpus, spec.period_s) == (2**29, 2**29, 1, 1)
    assert spec.cmdline is None and parse_domain_xml(spec.xml) == spec
    off = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", model="none")
    assert off.memballoon is None and "model=\"none\"" in off.xml


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"vcpus": 0}, ValueError), ({"vcpus": True}, ValueError), ({"period_s": -1}, ValueError),
    ({"period_s": True}, ValueError), ({"period_s": 1.5}, ValueError), ({"model": "xen"}, ValueError),
    ({"memory": "64M", "current_memory": "65M"}, ValueError), ({"memory": "1.5Q"}, ValueError),
    ({"memory": 0}, ValueError), ({"memory": 1.5}, TypeError), ({"name": "a/b"}, ValueError),
    ({"name": ""}, ValueError), ({"kernel": None}, TypeError), ({"alias": "9x"}, ValueError),
    ({"autodeflate": "on"}, TypeError), ({"domain_type": "xen"}, ValueError),
])
def test_builtin_domain_validation(kwargs: dict, error: type) -> None:
    args = {"name": "g", "kernel": "/k", "initrd": "/i", "cmdline": ""} | kwargs
    with pytest.raises(error):
        builtin_domain(**args)
