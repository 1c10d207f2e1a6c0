"""Tests of the built-in test guest: cpio writer, .modinfo reader, kernel + image cache, and
real boots under QEMU (TCG) talking to the in-guest agent over the second serial port.

The Debian cloud kernel is downloaded once into the default cache (``$BALLOONLAB_CACHE_DIR``
or ``~/.cache/balloonlab``) and shared by every run; everything else goes to temporary dirs.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from balloonlab.image import kmod as _kmod

from balloonlab.image import build as guestimage

from balloonlab.image import kernel
from balloonlab.image.cpio import CpioWriter, gzip_bytes
from balloonlab.model.errors import GuestImageError
from balloonlab.image.build import GuestImage, build_guest_image, find_guest_image
from balloonlab.image.kernel import KernelInfo, acquire_kernel

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
QEMU = shutil.which("qemu-system-x86_64")
MiB = 1 << 20


@pytest.fixture(scope="module")
def image() -> GuestImage:
    """The real image in the default cache (downloads the kernel the first time)."""
    return build_guest_image(log=print)


@pytest.fixture(scope="module")
def kernel_info(image: GuestImage) -> KernelInfo:
    return acquire_kernel()


# --- cpio -----------------------------------------------------------------------------------

def _sample_archive() -> CpioWriter:
    cpio = CpioWriter()
    cpio.add_dir("etc", 0o750)
    cpio.add_file("etc/hello", b"hi\n", 0o640)
    cpio.add_file("empty", b"", 0o600)
    # Names and sizes of every length modulo 4, so every padding case is written.
    for n in range(1, 9):
        cpio.add_file("f" * n, bytes(range(256))[: n * 7 + 1], 0o755 if n % 2 else 0o644)
    cpio.add_file("a/b/c/deep", b"x" * 5000)  # parents a, a/b, a/b/c created implicitly
    cpio.add_symlink("bin/sh", "busybox")
    cpio.add_symlink("abs", "/etc/hello")
    cpio.add_device("dev/console", "c", 5, 1, 0o600)
    cpio.add_device("dev/sda", "b", 8, 0, 0o660)
    return cpio


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (kind, permission bits, contents/target/rdev) for everything under root."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", None, os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), None)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", stat.S_IMODE(st.st_mode), p.read_bytes())
            else:
                kind = "c" if stat.S_ISCHR(st.st_mode) else "b"
                out[rel] = (kind, stat.S_IMODE(st.st_mode), (os.major(st.st_rdev), os.minor(st.st_rdev)))
    return out


def test_cpio_round_trip_through_busybox(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "extracting device nodes needs root: run the tests as root (make test does on CI)"
    data = _sample_archive().getvalue()
    listing = subprocess.run([BUSYBOX, "cpio", "-t"], input=data, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names[:3] == ["etc", "etc/hello", "empty"]
    assert names.index("a") < names.index("a/b") < names.index("a/b/c") < names.index("a/b/c/deep")
    subprocess.run([BUSYBOX, "cpio", "-i", "-d", "-m"], input=data, cwd=tmp_path, check=True,
                   capture_output=True)
    tree = _tree(tmp_path)
    expected = {
        "etc": ("d", 0o750, None), "etc/hello": ("f", 0o640, b"hi\n"), "empty": ("f", 0o600, b""),
        "a": ("d", 0o755, None), "a/b": ("d", 0o755, None), "a/b/c": ("d", 0o755, None),
        "a/b/c/deep": ("f", 0o644, b"x" * 5000), "bin": ("d", 0o755, None),
        "bin/sh": ("l", None, "busybox"), "abs": ("l", None, "/etc/hello"), "dev": ("d", 0o755, None),
        "dev/console": ("c", 0o600, (5, 1)), "dev/sda": ("b", 0o660, (8, 0)),
    }
    for n in range(1, 9):
        expected["f" * n] = ("f", 0o755 if n % 2 else 0o644, bytes(range(256))[: n * 7 + 1])
    assert tree == expected


def test_cpio_bytes_are_reproducible_and_well_formed() -> None:
    one, two = _sample_archive().getvalue(), _sample_archive().getvalue()
    assert one == two
    assert gzip_bytes(one) == gzip_bytes(two)
    assert gzip.decompress(gzip_bytes(one)) == one
    assert one.startswith(b"070701") and len(one) % 4 == 0
    assert b"TRAILER!!!\0" in one[-128:]
    with pytest.raises(ValueError, match="duplicate"):
        cpio = CpioWriter()
        cpio.add_file("x", b"")
        cpio.add_file("/x/", b"")
    with pytest.raises(ValueError):
        CpioWriter().add_file("../escape", b"")


# --- modules ----------------------------------------------------------------------------------

def _raw_modinfo_field(data: bytes, key: str) -> str:
    """An independent reading: the string after b"key=" anywhere in the file."""
    start = data.index(b"\0" + key.encode() + b"=") + len(key) + 2
    return data[start:data.index(b"\0", start)].decode()


def test_kmod_reads_real_virtio_balloon(kernel_info: KernelInfo) -> None:
    assert kernel_info.modules_dir is not None
    path = kernel_info.modules_dir / "kernel/drivers/virtio/virtio_balloon.ko"
    info = _kmod.read_module(path)
    assert info.name == "virtio_balloon"
    assert set(info.depends) == {"virtio", "virtio_ring"}
    assert info.depends == tuple(_raw_modinfo_field(path.read_bytes(), "depends").split(","))
    assert info.vermagic.split()[0] == kernel_info.version
    pci = _kmod.read_module(path.with_name("virtio_pci.ko"))
    assert {"virtio", "virtio_ring", "virtio_pci_modern_dev"} <= set(pci.depends)


def test_kmod_reads_compressed_modules(kernel_info: KernelInfo, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_info.modules_dir is not None
    src = kernel_info.modules_dir / "kernel/drivers/virtio/virtio_balloon.ko"
    plain = _kmod.read_module(src)
    (tmp_path / "virtio_balloon.ko.xz").write_bytes(lzma.compress(src.read_bytes(), format=lzma.FORMAT_XZ))
    (tmp_path / "virtio_balloon.ko.gz").write_bytes(gzip.compress(src.read_bytes()))
    for name in ("virtio_balloon.ko.xz", "virtio_balloon.ko.gz"):
        got = _kmod.read_module(tmp_path / name)
        assert (got.name, got.depends, got.vermagic) == (plain.name, plain.depends, plain.vermagic)
    if shutil.which("zstd"):
        subprocess.run(["zstd", "-q", "-o", str(tmp_path / "virtio_balloon.ko.zst"), str(src)], check=True)
        assert _kmod.read_module(tmp_path / "virtio_balloon.ko.zst").depends == plain.depends
        monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
        with pytest.raises(GuestImageError, match="zstd"):
            _kmod.read_module(tmp_path / "virtio_balloon.ko.zst")


def test_load_order_puts_dependencies_first(image: GuestImage, kernel_info: KernelInfo) -> None:
    print("module order:", ", ".join(image.modules))
    assert {"virtio_pci", "virtio_balloon"} <= set(image.modules)
    assert "virtio_mmio" not in image.modules
    assert len(set(image.modules)) == len(image.modules)
    assert kernel_info.modules_dir is not None
    index = _kmod.module_index(kernel_info.modules_dir)
    builtin = _kmod.builtin_modules(kernel_info.modules_dir) or set()
    for i, name in enumerate(image.modules):
        for dep in _kmod.read_module(index[name]).depends:
            assert dep in image.modules[:i] or dep in builtin, f"{name} needs {dep} loaded first"


def _fake_module(path: Path, **modinfo: str) -> Path:
    """A minimal ELF64 relocatable with a .modinfo section, enough for the reader."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in modinfo.items())
    shstr = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    shoff = body_off + len(info) + len(shstr)
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = bytes(64) + struct.pack("<IIQQQQIIQQ", 1, 1, 2, 0, body_off, len(info), 0, 0, 1, 0) \
        + struct.pack("<IIQQQQIIQQ", 10, 3, 0, 0, body_off + len(info), len(shstr), 0, 0, 1, 0)
    path.write_bytes(header + info + shstr + sections)
    return path


def test_resolve_order_synthetic(tmp_path: Path) -> None:
    index = {
        "top": _fake_module(tmp_path / "top.ko", name="top", depends="mid,core", vermagic="1.0 SMP"),
        "mid": _fake_module(tmp_path / "mid.ko", name="mid", depends="core,inkernel"),
        "core": _fake_module(tmp_path / "core.ko", name="core", depends=""),
        "other": _fake_module(tmp_path / "other.ko", name="other", depends="top,ghost"),
    }
    logged: list[str] = []
    order = [m.name for m in _kmod.resolve_load_order(["other"], index, {"inkernel"}, logged.append)]
    assert order == ["core", "mid", "top", "other"]
    assert len(logged) == 1 and "ghost" in logged[0]
    assert _kmod.read_module(index["top"]).vermagic == "1.0 SMP"
    with pytest.raises(GuestImageError, match="no module 'absent'"):
        _kmod.resolve_load_order(["absent"], index, set())
    cyc = {"x": _fake_module(tmp_path / "x.ko", name="x", depends="y"),
           "y": _fake_module(tmp_path / "y.ko", name="y", depends="x")}
    with pytest.raises(GuestImageError, match="cycle: x -> y -> x"):
        _kmod.resolve_load_order(["x"], cyc, None)
    (tmp_path / "bad.ko").write_bytes(b"not an elf")
    with pytest.raises(GuestImageError, match="not an ELF"):
        _kmod.read_module(tmp_path / "bad.ko")


# --- the image and its cache ---------------------------------------------------------------

def test_image_from_debian_package(image: GuestImage) -> None:
    assert image.kernel_source.startswith("debian-package:linux-image-")
    assert image.kernel_source.endswith("-cloud-amd64")
    assert image.cmdline == "console=ttyS0 quiet panic=1 memhp_default_state=online_movable"
    assert image.kernel_version == kernel.kernel_release(image.kernel)
    assert image.kernel.stat().st_size > 5 * MiB and image.initrd.stat().st_size > 500_000
    assert image.initrd.parent.name == image.key and len(image.key) == 64
    manifest = json.loads((image.initrd.parent / "manifest.json").read_text())
    assert manifest["key"] == image.key and tuple(manifest["modules"]) == image.modules
    names = subprocess.run([BUSYBOX, "cpio", "-t"], input=gzip.decompress(image.initrd.read_bytes()),
                           capture_output=True, check=True).stdout.decode().split()
    assert {"init", "agent", "bin/busybox", "bin/sh", "dev/console", "lib/modules/load-order"} <= set(names)
    assert [n for n in names if n.endswith(".ko")] == [f"lib/modules/{m}.ko" for m in image.modules]
    assert find_guest_image() is not None


def test_cache_hit_and_key_changes(image: GuestImage, kernel_info: KernelInfo,
                                   tmp_path: Path) -> None:
    files = [image.kernel, image.initrd, image.initrd.parent / "manifest.json"]
    before = [f.stat().st_mtime_ns for f in files]
    lines: list[str] = []
    t0 = time.monotonic()
    again = build_guest_image(log=lines.append)
    print(f"warm build_guest_image: {time.monotonic() - t0:.2f} s")
    assert again == image
    assert [f.stat().st_mtime_ns for f in files] == before
    assert any("(cached)" in line for line in lines) and any("image: cached" in line for line in lines)

    # Same inputs through another route give the same key: the key is over contents.
    cache = tmp_path / "cache"
    explicit = build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir, cache_dir=cache)
    assert explicit.key == image.key and explicit.kernel_source == "explicit"
    assert explicit.initrd.read_bytes() == image.initrd.read_bytes()  # reproducible, byte for byte

    bigger = tmp_path / "busybox"
    bigger.write_bytes(Path(BUSYBOX).read_bytes() + b"\0")  # still a static ELF, one byte more
    bigger.chmod(0o755)
    changed = build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir,
                                busybox=bigger, cache_dir=cache)
    assert changed.key != image.key
    found = find_guest_image(cache)
    assert found is not None and found.key == changed.key  # the newest one

    rebuilt = build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir,
                                cache_dir=cache, rebuild=True)
    assert rebuilt.key == image.key and rebuilt.initrd.read_bytes() == image.initrd.read_bytes()
    assert not [p for p in (cache / "guest").iterdir() if p.name.startswith(".")]  # no leftovers
    assert guestimage.guest_image(cache_dir=cache).key == rebuilt.key


def test_busybox_must_be_static(kernel_info: KernelInfo, tmp_path: Path) -> None:
    dynamic = Path("/bin/ls").resolve()
    with pytest.raises(GuestImageError, match="dynamically linked.*busybox-static"):
        build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir,
                          busybox=dynamic, cache_dir=tmp_path)
    text = tmp_path / "busybox.sh"
    text.write_text("#!/bin/sh\n")
    with pytest.raises(GuestImageError, match="not an ELF"):
        build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir,
                          busybox=text, cache_dir=tmp_path)
    with pytest.raises(GuestImageError, match="cannot read busybox"):
        build_guest_image(kernel=kernel_info.kernel, modules_dir=kernel_info.modules_dir,
                          busybox=tmp_path / "missing", cache_dir=tmp_path)


def test_kernel_errors(kernel_info: KernelInfo, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-vmlinuz"
    with pytest.raises(GuestImageError, match=f"kernel {missing} does not exist"):
        build_guest_image(kernel=missing, cache_dir=tmp_path)
    # A kernel alone in a directory, with no modules anywhere near it.
    monkeypatch.setattr(kernel, "HOST_MODULES_ROOT", tmp_path / "empty")
    lonely = tmp_path / "alone" / "vmlinuz"
    lonely.parent.mkdir()
    shutil.copy(kernel_info.kernel, lonely)
    with pytest.raises(GuestImageError, match="no modules found.*modules_dir="):
        build_guest_image(kernel=lonely, cache_dir=tmp_path)
    # Found next to it: <root>/boot/vmlinuz + <root>/lib/modules/<version>.
    found = acquire_kernel(kernel=kernel_info.kernel)
    assert found.modules_dir == kernel_info.modules_dir and found.source == "explicit"


def test_no_apt_gives_instructions(kernel_info: KernelInfo, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel, "HOST_BOOT_DIR", tmp_path / "boot")
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no apt-cache, no apt-get
    with pytest.raises(GuestImageError, match="apt-cache is not installed.*--kernel"):
        acquire_kernel(cache_dir=tmp_path / "cache")
    # apt present but without package lists: what `apt-get update` would fix.
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-cache").write_text("#!/bin/sh\necho 'E: No packages found' >&2\nexit 100\n")
    (fake / "apt-cache").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    with pytest.raises(GuestImageError, match=r"No packages found.*apt-get update.*--kernel"):
        acquire_kernel(cache_dir=tmp_path / "cache")
    # ...unless an earlier download is in the cache: then that kernel is used.
    assert kernel_info.modules_dir is not None
    (tmp_path / "cache2").mkdir()
    (tmp_path / "cache2" / "kernels").symlink_to(kernel_info.kernel.parents[2].parent)
    lines: list[str] = []
    cached = acquire_kernel(cache_dir=tmp_path / "cache2", log=lines.append)
    assert cached.kernel.resolve() == kernel_info.kernel.resolve() and cached.source == kernel_info.source
    assert "cached; apt-cache failed" in lines[0]


# --- real boots ------------------------------------------------------------------------------

class Guest:
    """One QEMU running the image, with the console in a file and the agent on a socket."""

    def __init__(self, image: GuestImage, extra_cmdline: str = "") -> None:
        self.dir = Path(tempfile.mkdtemp(dir="/tmp"))
        self.console = self.dir / "console.log"
        self.argv = [
            QEMU or "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-nodefaults",
            "-display", "none", "-no-user-config",
            "-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con",
            "-chardev", f"socket,id=agent,path={self.dir}/agent.sock,server=on,wait=off",
            "-serial", "chardev:agent",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", f"{image.cmdline} {extra_cmdline}".strip(),
            "-device", "virtio-balloon-pci,id=balloon0",
            "-qmp", f"unix:{self.dir}/qmp.sock,server=on,wait=off",
        ]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        self.sock: socket.socket | None = None
        self.buf = b""
        self.seq = 0

    def wait_ready(self, count: int = 1, timeout: float = 60) -> list[str]:
        """The READY lines once ``count`` of them are on the console."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            ready = [ln for ln in text.splitlines() if ln.startswith("BALLOONLAB-READY ")]
            if len(ready) >= count:
                return ready
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no READY line (qemu exit {self.proc.poll()}); console:\n{text}")
            time.sleep(0.02)

    def request(self, line: str, timeout: float = 60) -> str:
        """Send ``<seq> line``; the reply without seq (e.g. ``"ok pong"``)."""
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(self.dir / "agent.sock"))
        self.seq += 1
        self.sock.settimeout(timeout)
        self.sock.sendall(f"{self.seq} {line}\n".encode())
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(4096)
                assert chunk, "agent socket closed"
                self.buf += chunk
            reply, _, self.buf = self.buf.partition(b"\n")
            seq, _, rest = reply.decode().partition(" ")
            assert not reply.endswith(b"\r"), "replies end with a bare \\n"
            if seq == str(self.seq):
                return rest

    def meminfo(self) -> dict[str, int]:
        reply = self.request("meminfo")
        assert reply.startswith("ok ")
        return {k: int(v) for k, v in (item.split("=") for item in reply[3:].split())}

    def quit(self) -> None:
        """Ask QEMU to quit over QMP (plain JSON over the socket)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
            qmp.settimeout(10)
            qmp.connect(str(self.dir / "qmp.sock"))
            stream = qmp.makefile("rwb")
            assert b"QMP" in stream.readline()
            for command in ("qmp_capabilities", "quit"):
                stream.write(json.dumps({"execute": command}).encode() + b"\n")
                stream.flush()
                while b'"return"' not in (line := stream.readline()):
                    assert line, "QMP closed"
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.proc.poll() is None:
            self.proc.kill()  # our own QEMU, by its pid
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


@pytest.mark.qemu
@needs_qemu
def test_boot_with_balloon_driver_and_agent(image: GuestImage) -> None:
    guest = Guest(image)
    try:
        ready = guest.wait_ready()
        print(f"\ntime to READY: {time.monotonic() - guest.started:.2f} s")
        assert ready == [f"BALLOONLAB-READY balloon=yes swap=no kernel={image.kernel_version}"]
        assert guest.request("ping") == "ok pong"
        base = guest.meminfo()
        assert 400 * MiB < base["MemTotal"] <= 512 * MiB
        assert set(base) == {"MemTotal", "MemFree", "MemAvailable", "AnonPages", "Shmem"}

        assert guest.request(f"alloc a1 {100 * MiB}") == f"ok a1 {100 * MiB}"
        held = guest.meminfo()
        assert base["MemAvailable"] - held["MemAvailable"] >= 90 * MiB
        assert held["AnonPages"] - base["AnonPages"] >= 90 * MiB
        assert guest.request(f"alloc a1 {MiB}").startswith("err ")  # duplicate id
        assert guest.request("alloc a2 12x").startswith("err bad size")
        assert guest.request("alloc a2 4096") == "ok a2 4096"  # smaller than a pipe: still held
        assert guest.request("list") == f"ok a1:{100 * MiB},a2:4096"

        assert guest.request("free a1") == "ok a1"
        back = guest.meminfo()
        assert abs(back["MemAvailable"] - base["MemAvailable"]) < 10 * MiB
        assert back["AnonPages"] - base["AnonPages"] < 10 * MiB
        assert guest.request("free a1").startswith("err unknown id")

        assert guest.request(f"alloc big {2 << 30}") == f"err allocation of {2 << 30} bytes failed (out of memory?)"
        assert guest.request("ping") == "ok pong"
        assert guest.request("list") == "ok a2:4096"
        assert guest.request("freeall") == "ok 1"
        assert guest.request("list") == "ok"
        assert guest.request("frobnicate").startswith("err unknown verb")
        guest.quit()
        assert guest.proc.returncode == 0
    finally:
        guest.close()


@pytest.mark.qemu
@needs_qemu
def test_boot_without_balloon_driver_and_reboot(image: GuestImage) -> None:
    guest = Guest(image, "balloonlab.nodriver=1")
    try:
        assert guest.wait_ready() == [f"BALLOONLAB-READY balloon=no swap=no kernel={image.kernel_version}"]
        assert guest.request("ping") == "ok pong"
        assert guest.request("reboot") == "ok"
        # A guest-initiated reset: the kernel boots again and init prints READY once more.
        assert len(guest.wait_ready(count=2)) == 2
        assert guest.request("ping") == "ok pong"
    finally:
        guest.close()


def test_deb_unpacked_in_python_matches_dpkg(kernel_info: KernelInfo, tmp_path: Path) -> None:
    assert shutil.which("dpkg-deb"), "dpkg-deb (Debian's dpkg) is needed to compare with"
    pkg = kernel_info.source.split(":", 1)[1]
    deb = next((kernel_info.kernel.parents[2]).glob(f"{pkg}_*.deb"))
    # A cache holding only the .deb: the kernel is unpacked again without any download.
    (tmp_path / "cache" / "kernels" / pkg).mkdir(parents=True)
    shutil.copy(deb, tmp_path / "cache" / "kernels" / pkg / deb.name)
    lines: list[str] = []
    t0 = time.monotonic()
    info = acquire_kernel(cache_dir=tmp_path / "cache", log=lines.append)
    print(f"unpack from cached .deb: {time.monotonic() - t0:.2f} s")
    assert any("(cached .deb)" in line for line in lines)
    assert (info.source, info.version) == (kernel_info.source, kernel_info.version)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path / "dpkg")], check=True)
    ours = info.kernel.parents[1]
    files = [info.kernel.relative_to(ours), *(p.relative_to(ours) for p in info.modules_dir.rglob("*.ko"))]
    assert len(files) >= 7 and list(ours.rglob("virtio_mmio.ko"))  # the whole virtio dir
    for rel in files:
        assert (ours / rel).read_bytes() == (tmp_path / "dpkg" / rel).read_bytes(), rel


def test_host_kernel_is_preferred_when_readable(kernel_info: KernelInfo, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernel_info.modules_dir is not None
    release = os.uname().release
    (tmp_path / "boot").mkdir()
    (tmp_path / "modules").mkdir()
    (tmp_path / "boot" / f"vmlinuz-{release}").symlink_to(kernel_info.kernel)
    monkeypatch.setattr(kernel, "HOST_BOOT_DIR", tmp_path / "boot")
    monkeypatch.setattr(kernel, "HOST_MODULES_ROOT", tmp_path / "modules")
    # Modules dir without a balloon driver: not usable, so the Debian kernel is taken.
    (tmp_path / "modules" / release).mkdir()
    lines: list[str] = []
    assert acquire_kernel(log=lines.append).source == kernel_info.source
    assert "has no virtio_balloon driver" in lines[0]
    (tmp_path / "modules" / release).rmdir()
    (tmp_path / "modules" / release).symlink_to(kernel_info.modules_dir)
    host = acquire_kernel()
    assert (host.source, host.version) == ("host", release)
    # Its modules are for another release: refused before the guest would fail to insmod them.
    with pytest.raises(GuestImageError, match="built for kernel"):
        build_guest_image(cache_dir=tmp_path / "cache")


# --- kernels of several releases -------------------------------------------------------------

def test_release_matching_and_trixies_merged_usr_module_paths() -> None:
    assert kernel.release_matches("6.12.118+deb12-cloud-amd64", "6.12")
    assert kernel.release_matches("6.1.0-57-cloud-amd64", "6.1")
    assert not kernel.release_matches("6.12.118+deb12-cloud-amd64", "6.1")
    assert not kernel.release_matches("6.1.0-57-cloud-amd64", "6.12")
    assert kernel.release_matches("6.1.0-57-cloud-amd64", "6.1.0-57-cloud-amd64")
    # bookworm ships lib/modules, trixie (merged /usr) usr/lib/modules: both unpack to lib/modules.
    assert kernel._modules_root("usr/lib/modules/6.12.1/kernel/drivers/virtio/virtio_balloon.ko.xz") == \
        "lib/modules/6.12.1/kernel/drivers/virtio/virtio_balloon.ko.xz".split("/")
    assert kernel._modules_root("lib/modules/6.1.0/modules.builtin") == ["lib", "modules", "6.1.0", "modules.builtin"]
    assert kernel._modules_root("usr/share/doc/x") is None and kernel._modules_root("boot/vmlinuz-6.1") is None


@pytest.mark.qemu
@pytest.mark.timeout(240)
def test_each_kernel_series_has_its_image_and_zram_swap_comes_up(image: GuestImage) -> None:
    from balloonlab.image.stacks import EXTRA_STACKS, host_codename
    series = {"6.1", "6.12"} if host_codename() == "bookworm" else {image.kernel_version.rsplit(".", 1)[0]}
    assert find_guest_image() == image  # the default image: the one built without a kernel choice
    for release in sorted(series | {s.kernel_release for s in EXTRA_STACKS.get(host_codename() or "", ())}):
        found = find_guest_image(kernel_release=release)
        assert found is not None, f"no {release} image: run `make stacks`"
        assert kernel.release_matches(found.kernel_version, release)
        assert {"virtio_balloon", "virtio_mem", "zram"} <= set(found.modules), found.modules
        guest = Guest(found, extra_cmdline="balloonlab.swap=67108864")
        try:
            # init prints the swap size only once swapon on /dev/zram0 succeeded.
            assert guest.wait_ready() == [f"BALLOONLAB-READY balloon=yes swap=67108864 kernel={found.kernel_version}"]
        finally:
            guest.close()
