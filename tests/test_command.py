"""balloonlab.qemu.argv against libvirt's expected command lines, plus a real QEMU boot check."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from balloonlab.qemu.argv import (balloon_device, build_argv, kvm_usable, memory_option,
                                qemu_binary_for, resolve_accel)
from balloonlab.domain import (AddressSpec, DiskSpec, DomainSpec, MemballoonSpec, builtin_domain,
                               load_domain_xml, with_changes)

from .corpus_helpers import comparable_balloon, read_args
from .corpus_helpers import option as _option

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "libvirt-memballoon"
# <name>.<arch>-latest.args, and where SOURCES.md says there is no plain <name>.xml input,
# the <name>.<arch>-latest.xml output XML is the input.
ARGS_STEMS = [
    "aarch64-virt-headless-mmio.aarch64", "aarch64-virt-headless.aarch64", "balloon-ccw-deflate.s390x",
    "balloon-device-deflate-off.x86_64", "balloon-device-deflate.x86_64", "balloon-device-period.x86_64",
    "balloon-mmio-deflate.aarch64", "hostdev-pci-address.x86_64", "hostdev-vfio-zpci-ccw-memballoon.s390x",
    "launch-security-s390-pv.s390x", "ppc64-pseries-headless.ppc64", "riscv64-virt-headless.riscv64",
    "s390x-ccw-headless.s390x", "virtio-non-transitional.x86_64", "virtio-options-memballoon-ats.x86_64",
    "virtio-options-memballoon-freepage-reporting.x86_64", "virtio-options-memballoon-iommu.x86_64",
    "virtio-options-memballoon-packed.x86_64", "virtio-options.x86_64", "virtio-transitional.x86_64",
    "x86_64-pc-headless.x86_64", "x86_64-q35-headless.x86_64",
]


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.fail(f"libvirt corpus folder missing: {CORPUS}")
    return CORPUS


def _pair(corpus: Path, stem: str) -> tuple[DomainSpec, list[str]]:
    name = stem.rsplit(".", 1)[0]
    source = corpus / f"{name}.xml"
    spec = load_domain_xml(source if source.exists() else corpus / f"{stem}-latest.xml")
    return spec, read_args(corpus / f"{stem}-latest.args")


def _tcg_argv(spec: DomainSpec, **kwargs: object) -> list[str]:
    args = {"qmp_socket": "/run/q.sock", "console_log": "/run/console.log", "agent_socket": None,
            "accel": "tcg"} | kwargs
    return build_argv(spec, **args)  # type: ignore[arg-type]


def test_args_list_covers_every_args_file(corpus: Path) -> None:
    assert sorted(p.name for p in corpus.glob("*.args")) == sorted(f"{s}-latest.args" for s in ARGS_STEMS)


@pytest.mark.parametrize("stem", ARGS_STEMS)
def test_balloon_device_matches_libvirt(corpus: Path, stem: str) -> None:
    spec, argv = _pair(corpus, stem)
    ours, theirs = balloon_device(spec), comparable_balloon(spec, argv)
    if spec.memballoon is None:
        assert ours is None and theirs is None
        return
    assert theirs is not None and ours is not None
    assert list(ours.items()) == list(theirs.items())  # same keys, values and order


@pytest.mark.parametrize("stem", ARGS_STEMS)
def test_argv_agrees_with_libvirt(corpus: Path, stem: str) -> None:
    spec, theirs = _pair(corpus, stem)
    ours = _tcg_argv(spec, accel="kvm" if spec.domain_type == "kvm" else "tcg")
    # the whole -m: size, and slots/maxmem where the XML has <maxMemory> (virtio-options.xml)
    assert _option(ours, "-m") == memory_option(spec) == _option(theirs, "-m")
    assert _option(ours, "-name") == _option(theirs, "-name")
    assert _option(ours, "-smp") == _option(theirs, "-smp").split(",")[0]
    assert os.path.basename(qemu_binary_for(spec)) == os.path.basename(next(a for a in theirs if "/qemu-system-" in a))
    assert "-S" in ours and "-S" in theirs


def test_memory_alignment(corpus: Path) -> None:
    spec = load_domain_xml(corpus / "hostdev-pci-address.xml")  # 219100 KiB
    assert memory_option(spec) == "size=219136k"
    assert memory_option(with_changes(spec, arch="ppc64")) == f"size={256 * 1024}k"
    # <maxMemory> 1 PiB, no slots: libvirt writes maxmem (aligned like size), and no slots=
    assert memory_option(load_domain_xml(corpus / "virtio-options.xml")) == "size=2316288k,maxmem=1099511627776k"


def test_period_never_on_command_line(corpus: Path) -> None:
    spec = load_domain_xml(corpus / "balloon-device-period.xml")
    assert spec.period_s == 10
    argv = _tcg_argv(spec)
    assert not any("period" in arg or "guest-stats" in arg for arg in argv)
    assert json.loads(argv[-1]) == {"driver": "virtio-balloon-pci", "id": "balloon0", "bus": "pci.0", "addr": "0x12"}


def test_alias_function_and_ccw_format() -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", alias="ua-bal")
    pci = with_changes(spec, memballoon=MemballoonSpec("virtio", alias="ua-bal",
                                                       address=AddressSpec("pci", 0, 3, 4, 5)))
    assert balloon_device(pci) == {"driver": "virtio-balloon-pci", "id": "ua-bal", "bus": "pci.3", "addr": "0x4.0x5"}
    ccw = with_changes(spec, memballoon=MemballoonSpec("virtio-transitional",
                                                       address=AddressSpec("ccw", cssid=0xFE, ssid=1, devno=0xB)))
    assert balloon_device(ccw) == {"driver": "virtio-balloon-ccw", "id": "balloon0", "devno": "fe.1.000b"}
    # <address type='pci'/> and all-zero numbers: libvirt places the device (virPCIDeviceAddressIsEmpty);
    # addr 0x0 is the host bridge (libvirt 11.3's pci-autofill-addr.xml: the balloon at 0x4)
    for empty in (AddressSpec("pci", 0, 0, 0, 0), AddressSpec("pci")):
        assert balloon_device(with_changes(spec, memballoon=MemballoonSpec("virtio", address=empty))) == {
            "driver": "virtio-balloon-pci", "id": "balloon0"}
    s390 = with_changes(spec, arch="s390x")
    assert balloon_device(s390)["driver"] == "virtio-balloon-ccw"
    with pytest.raises(ValueError, match="xen"):
        balloon_device(with_changes(spec, memballoon=MemballoonSpec("xen")))


def test_build_argv_basics() -> None:
    spec = builtin_domain(name="g", kernel="/boot/k", initrd="/boot/i", cmdline="console=ttyS0",
                          memory="256M", vcpus=2)
    spec = with_changes(spec, name="a,b")  # libvirt allows commas in names; QEMU needs them doubled
    argv = _tcg_argv(spec, qmp_socket="/run/x,y/q.sock", agent_socket="/run/a.sock")
    joined = " ".join(argv)
    assert argv[0] == "qemu-system-x86_64" and argv[1:4] == ["-name", "guest=a,,b,debug-threads=on", "-S"]
    assert _option(argv, "-machine") == "pc" and _option(argv, "-accel") == "tcg" and "-cpu" not in argv
    assert (_option(argv, "-m"), _option(argv, "-smp")) == ("size=262144k", "2")
    assert "-chardev socket,id=qmp,path=/run/x,,y/q.sock,server=on,wait=off -mon chardev=qmp,mode=control" in joined
    assert "-chardev file,id=console,path=/run/console.log -serial chardev:console" in joined
    assert "-chardev socket,id=agent,path=/run/a.sock,server=on,wait=off -serial chardev:agent" in joined
    assert joined.index("chardev:console") < joined.index("chardev:agent")  # port 0, then port 1
    assert (_option(argv, "-kernel"), _option(argv, "-initrd"), _option(argv, "-append")) == \
        ("/boot/k", "/boot/i", "console=ttyS0")
    for flag in ("-nodefaults", "-no-user-config"):
        assert flag in argv
    assert _option(argv, "-display") == "none"
    no_agent = _tcg_argv(spec)
    assert "chardev:agent" not in no_agent and "/run/a.sock" not in " ".join(no_agent)
    kvm = _tcg_argv(spec, accel="kvm", qemu_binary="/opt/qemu")
    assert kvm[0] == "/opt/qemu" and _option(kvm, "-accel") == "kvm" and _option(kvm, "-cpu") == "host"
    with pytest.raises(ValueError):
        _tcg_argv(spec, accel="auto")


def test_accel_on_this_machine() -> None:
    assert kvm_usable() is False  # /dev/kvm here is a stand-in and the CPU has no vmx/svm
    assert resolve_accel("auto") == "tcg"
    assert (resolve_accel("kvm"), resolve_accel("tcg")) == ("kvm", "tcg")
    for bad in ("KVM", "hvf", ""):
        with pytest.raises(ValueError):
            resolve_accel(bad)


def test_kvm_usable_needs_device_and_flags(tmp_path: Path) -> None:
    dev, cpuinfo, plain = tmp_path / "kvm", tmp_path / "cpuinfo", tmp_path / "plain"
    dev.write_bytes(b"")
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu vme svm sse2\n")
    plain.write_text("processor\t: 0\nflags\t\t: fpu vme sse2 vmxx\n")
    assert kvm_usable(str(dev), str(cpuinfo)) is True
    assert kvm_usable(str(dev), str(plain)) is False
    assert kvm_usable(str(tmp_path / "missing"), str(cpuinfo)) is False


def test_pci_bus_mapping_per_machine(corpus: Path) -> None:
    spec = load_domain_xml(corpus / "virtio-options-memballoon-ats.xml")  # bus 0 slot 2
    pc, q35 = _tcg_argv(spec), _tcg_argv(with_changes(spec, machine="q35"))
    assert json.loads(pc[-1])["bus"] == "pci.0" and json.loads(q35[-1])["bus"] == "pcie.0"
    assert json.loads(q35[-1])["addr"] == "0x2" and json.loads(q35[-1])["ats"] is True
    other_bus = with_changes(spec, memballoon=MemballoonSpec("virtio", address=AddressSpec("pci", 0, 2, 1, 0)))
    assert json.loads(_tcg_argv(other_bus)[-1]) == {"driver": "virtio-balloon-pci", "id": "balloon0"}
    q35_auto = load_domain_xml(corpus / "virtio-transitional.xml")  # libvirt put it on bus pci.2
    assert json.loads(_tcg_argv(q35_auto)[-1]) == {"driver": "virtio-balloon-pci-transitional", "id": "balloon0"}


def test_no_balloon_device_for_model_none(corpus: Path) -> None:
    spec = load_domain_xml(corpus / "hostdev-pci-address.xml")
    assert balloon_device(spec) is None
    assert not any("virtio-balloon" in arg for arg in _tcg_argv(spec))


def test_disks(corpus: Path) -> None:
    argv = _tcg_argv(load_domain_xml(corpus / "x86_64-q35-headless.xml"))
    blockdevs = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    assert blockdevs == [
        {"driver": "file", "filename": "/var/lib/libvirt/images/guest.qcow2", "node-name": "disk0-storage",
         "read-only": False},
        {"node-name": "disk0-format", "read-only": False, "driver": "qcow2", "file": "disk0-storage"}]
    devices = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == {"driver": "virtio-blk-pci", "drive": "disk0-format", "id": "disk0", "bootindex": 1}
    ide = _tcg_argv(load_domain_xml(corpus / "balloon-device.xml"))  # <source dev='/dev/HostVG/...'> on ide
    assert json.loads(_option(ide, "-blockdev"))["driver"] == "host_device"
    assert json.loads(_option(ide, "-device"))["driver"] == "ide-hd"
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="")
    with pytest.raises(ValueError, match="read-only"):
        _tcg_argv(with_changes(spec, disks=(DiskSpec("/img/a", bus="ide", target="hda", readonly=True),)))


def test_qemu_binary_for(corpus: Path) -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="")
    assert qemu_binary_for(spec) == "qemu-system-x86_64"
    assert qemu_binary_for(with_changes(spec, arch=None)) == "qemu-system-x86_64"
    assert qemu_binary_for(with_changes(spec, arch="i686")) == "qemu-system-x86_64"
    assert qemu_binary_for(with_changes(spec, arch="aarch64")) == "qemu-system-aarch64"
    assert qemu_binary_for(load_domain_xml(corpus / "hostdev-pci-address.xml")) == "/usr/bin/qemu-system-x86_64"


# ---------------------------------------------------------------------------- real QEMU

def _qmp(stream, sock: socket.socket, command: str, **arguments: object) -> dict:
    message = {"execute": command} | ({"arguments": arguments} if arguments else {})
    sock.sendall(json.dumps(message).encode() + b"\n")
    while True:  # skip events until the answer
        reply = json.loads(stream.readline())
        if "return" in reply or "error" in reply:
            return reply


def _connect(path: str, proc: subprocess.Popen, deadline: float) -> socket.socket:
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU did not open QMP: {proc.communicate()[1]}") from None
            time.sleep(0.01)


@pytest.mark.qemu
@pytest.mark.parametrize("machine", ["pc", "q35"])
@pytest.mark.parametrize("model", ["virtio", "virtio-transitional", "virtio-non-transitional"])
def test_argv_boots_on_real_qemu(machine: str, model: str) -> None:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    tmp = tempfile.mkdtemp(dir="/tmp")  # unix socket paths must stay under 108 bytes
    proc = None
    try:
        disk, cd = Path(tmp, "disk.raw"), Path(tmp, "cd.iso")
        disk.write_bytes(bytes(1 << 20))
        cd.write_bytes(bytes(1 << 20))
        spec = builtin_domain(name="smoke", kernel="/k", initrd="/i", cmdline="", memory="128M",
                              model=model, autodeflate=True, machine=machine)
        balloon = dataclasses.replace(spec.memballoon, address=AddressSpec("pci", 0, 0, 5, 0))
        spec = with_changes(spec, kernel=None, initrd=None, cmdline=None, memballoon=balloon,
                            disks=(DiskSpec(str(disk), bus="virtio", target="vda"),
                                   DiskSpec(str(cd), device="cdrom", bus="sata", target="sda", readonly=True)))
        qmp = os.path.join(tmp, "qmp.sock")
        argv = build_argv(spec, qmp_socket=qmp, console_log=os.path.join(tmp, "console.log"),
                          agent_socket=os.path.join(tmp, "agent.sock"), accel=resolve_accel("auto"),
                          qemu_binary=binary)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        with _connect(qmp, proc, time.monotonic() + 5) as sock, sock.makefile("r") as stream:
            assert "QMP" in json.loads(stream.readline())
            assert _qmp(stream, sock, "qmp_capabilities") == {"return": {}}
            assert _qmp(stream, sock, "query-status")["return"]["status"] == "prelaunch"
            peripherals = _qmp(stream, sock, "qom-list", path="/machine/peripheral")["return"]
            assert {"name": "balloon0", "type": f"child<{balloon_device(spec)['driver']}>"} in peripherals
            _qmp(stream, sock, "quit")
        assert proc.wait(timeout=5) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()  # our own child, by its pid
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- memory: -m, -numa, memory devices

def _lines(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_virtio_mem_builtin_argv_as_libvirt_writes_it() -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", memory="384M", vcpus=2,
                          virtio_mem=("256M", "128M"))
    argv = _tcg_argv(spec)
    # boot memory = the NUMA cell; maxmem = memory + device rounded up to a GiB; 1 slot
    assert _option(argv, "-m") == memory_option(spec) == "size=393216k,slots=1,maxmem=1048576k"
    assert _lines(argv, "-numa") == ["node,nodeid=0,cpus=0-1,memdev=ram-node0"]
    objects = [json.loads(o) for o in _lines(argv, "-object")]
    assert objects == [{"qom-type": "memory-backend-ram", "id": "ram-node0", "size": 384 << 20},
                       {"qom-type": "memory-backend-ram", "id": "memvirtiomem0", "reserve": False, "size": 256 << 20}]
    devices = [json.loads(d) for d in _lines(argv, "-device")]
    assert devices[0] == {"driver": "virtio-mem-pci", "node": 0, "block-size": 2 << 20, "requested-size": 128 << 20,
                          "memdev": "memvirtiomem0", "id": "virtiomem0"}


def test_vcpus_no_cell_lists_go_to_the_first_cell_as_libvirt_fills_them() -> None:
    """libvirt 11.3's numavcpus-topology-mismatch.xml: 12 vCPUs, cells cpus='0' and '2-4,6'."""
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", memory="384M", vcpus=12,
                          virtio_mem="64M")
    cell = spec.numa_cells[0]
    two = with_changes(spec, numa_cells=(dataclasses.replace(cell, cpus=(0,), memory_bytes=192 << 20),
                                         dataclasses.replace(cell, id=1, cpus=(2, 3, 4, 6), memory_bytes=192 << 20)))
    assert _lines(_tcg_argv(two), "-numa") == ["node,nodeid=0,cpus=0-1,cpus=5,cpus=7-11,memdev=ram-node0",
                                               "node,nodeid=1,cpus=2-4,cpus=6,memdev=ram-node1"]


def test_requested_zero_and_sizes_rounded_like_libvirt() -> None:
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", memory="100M", virtio_mem="64M")
    device = json.loads(_lines(_tcg_argv(spec), "-device")[0])
    assert "requested-size" not in device  # libvirt leaves a size of 0 out
    odd = with_changes(spec, numa_cells=(dataclasses.replace(spec.numa_cells[0], memory_bytes=(100 << 20) + 1024),))
    assert memory_option(odd).startswith("size=103424k,")  # each cell rounded up to a MiB


def test_dimm_slots_and_aliases_follow_libvirt() -> None:
    from balloonlab.domain import MemoryDeviceSpec
    from balloonlab.qemu.memory_argv import memory_device, memory_device_aliases
    spec = builtin_domain(name="g", kernel="/k", initrd="/i", cmdline="", memory="256M", virtio_mem="64M")
    devices = (MemoryDeviceSpec("dimm", 64 << 20, node=0, address=AddressSpec("dimm", slot=0)),
               MemoryDeviceSpec("dimm", (64 << 20) + 1024, node=0), spec.memory_devices[0],
               MemoryDeviceSpec("virtio-mem", 64 << 20, node=0, block_bytes=2 << 20, alias="virtiomem4"),
               MemoryDeviceSpec("virtio-mem", 64 << 20, node=0, block_bytes=2 << 20))
    many = with_changes(spec, memory_devices=devices, memory_slots=2, max_memory_bytes=2 << 30,
                        memory_bytes=spec.memory_bytes + (256 << 20) + 1024)
    # libvirt numbers an alias-less virtio-mem one past the highest virtiomem<N> of the domain
    assert memory_device_aliases(many) == ("dimm0", "dimm1", "virtiomem5", "virtiomem4", "virtiomem6")
    assert memory_device(many, 1) == {"driver": "pc-dimm", "node": 0, "memdev": "memdimm1", "id": "dimm1", "slot": 1}
    sizes = [json.loads(o)["size"] for o in _lines(_tcg_argv(many), "-object")][1:]
    assert sizes[1] == 66 << 20  # a device size is rounded up to 2 MiB
