"""Read Linux kernel modules without a kernel: ELF sections, ``.modinfo``, load order.

The guest image needs the virtio modules in dependency order. Every ``.ko`` names its own
dependencies in the ``depends=`` string of its ``.modinfo`` ELF section, so this module parses
the ELF section headers (32- or 64-bit, either byte order) instead of trusting a hard-coded
list or a ``modules.dep`` that may be missing. Compressed modules (``.ko.xz``, ``.ko.gz``) are
decompressed with the standard library; ``.ko.zst`` needs the ``zstd`` program. It also holds
the small ELF check used for busybox (a static binary has no ``PT_INTERP`` program header).
"""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from balloonlab.model.errors import GuestImageError

__all__ = [
    "ElfFile", "ModuleInfo", "MODULE_SUFFIXES", "builtin_modules", "load_module_bytes",
    "module_index", "module_name_from_path", "parse_modinfo", "read_module", "resolve_load_order",
]

#: File name endings of kernel modules, longest first so ".ko.xz" wins over ".ko".
MODULE_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")

_PT_INTERP = 3
_SHN_XINDEX = 0xFFFF


class ElfFile:
    """The headers of an ELF file held in memory: section names/contents and program headers.

    :param data: the whole file.
    :param what: how to name the file in error messages.
    :raises GuestImageError: when ``data`` is not a well-formed ELF file.
    """

    def __init__(self, data: bytes, what: str = "file") -> None:
        self.data = data
        self.what = what
        if len(data) < 52 or data[:4] != b"\x7fELF":
            raise GuestImageError(f"{what} is not an ELF file")
        cls, order = data[4], data[5]
        if cls not in (1, 2) or order not in (1, 2):
            raise GuestImageError(f"{what}: unknown ELF class {cls} or byte order {order}")
        self.is64 = cls == 2
        self._e = "<" if order == 1 else ">"
        if self.is64:
            fmt = self._e + "HHIQQQIHHHHHH"
        else:
            fmt = self._e + "HHIIIIIHHHHHH"
        (self.type, self.machine, _version, _entry, self.phoff, self.shoff, _flags, _ehsize,
         self.phentsize, self.phnum, self.shentsize, shnum, shstrndx) = self._unpack(fmt, 16)
        # Extended numbering: with many sections the real count/index live in section 0.
        if self.shoff and (shnum == 0 or shstrndx == _SHN_XINDEX):
            _n, _t, _o, sh0_size, sh0_link = self._section_header(0)
            shnum = shnum or sh0_size
            if shstrndx == _SHN_XINDEX:
                shstrndx = sh0_link
        self.shnum, self.shstrndx = shnum, shstrndx

    def _unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        try:
            return struct.unpack_from(fmt, self.data, offset)
        except struct.error:
            raise GuestImageError(f"{self.what}: truncated ELF headers") from None

    def _section_header(self, index: int) -> tuple[int, int, int, int, int]:
        """(name offset, type, file offset, size, link) of section ``index``."""
        fmt = self._e + ("IIQQQQIIQQ" if self.is64 else "IIIIIIIIII")
        name, typ, _flags, _addr, off, size, link, _info, _align, _ent = self._unpack(
            fmt, self.shoff + index * self.shentsize)
        return name, typ, off, size, link

    def sections(self) -> dict[str, bytes]:
        """Every section's contents by name (``SHT_NOBITS`` sections map to ``b""``).

        :raises GuestImageError: when a header points outside the file.
        """
        if not self.shoff or not self.shnum:
            return {}
        headers = [self._section_header(i) for i in range(self.shnum)]
        if self.shstrndx >= len(headers):
            raise GuestImageError(f"{self.what}: section name table index out of range")
        _n, _t, str_off, str_size, _l = headers[self.shstrndx]
        names = self.data[str_off:str_off + str_size]
        result: dict[str, bytes] = {}
        for name_off, typ, off, size, _link in headers[1:]:
            end = names.find(b"\0", name_off)
            name = names[name_off:end if end >= 0 else None].decode("utf-8", "replace")
            if typ == 8:  # SHT_NOBITS (.bss) occupies no bytes in the file
                result[name] = b""
                continue
            if off + size > len(self.data):
                raise GuestImageError(f"{self.what}: section {name!r} extends past the end of the file")
            result[name] = self.data[off:off + size]
        return result

    def section(self, name: str) -> bytes | None:
        """The contents of section ``name``, or None when there is no such section."""
        return self.sections().get(name)

    def has_interp(self) -> bool:
        """True when a ``PT_INTERP`` program header names a dynamic loader (not a static binary)."""
        # p_type is the first 32-bit word of a program header in both ELF classes.
        for i in range(self.phnum):
            (p_type,) = self._unpack(self._e + "I", self.phoff + i * self.phentsize)
            if p_type == _PT_INTERP:
                return True
        return False


def parse_modinfo(section: bytes) -> dict[str, list[str]]:
    """Split a ``.modinfo`` section (NUL-separated ``key=value`` strings) into a multimap.

    Keys such as ``alias`` repeat, so every key maps to a list, in section order.
    """
    info: dict[str, list[str]] = {}
    for raw in section.split(b"\0"):
        if b"=" not in raw:
            continue  # alignment padding between strings
        key, _, value = raw.decode("utf-8", "replace").partition("=")
        info.setdefault(key, []).append(value)
    return info


def module_name_from_path(path: Path) -> str:
    """The module name the kernel uses for a file: stem without suffix, "-" read as "_"."""
    name = path.name
    for suffix in MODULE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def load_module_bytes(path: Path) -> bytes:
    """The uncompressed ELF bytes of a module file (``.ko``, ``.ko.xz``, ``.ko.gz``, ``.ko.zst``).

    :param path: the module file.
    :raises GuestImageError: when the file cannot be read or decompressed, or for ``.ko.zst``
        when no ``zstd`` program is installed.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GuestImageError(f"cannot read kernel module {path}: {exc.strerror or exc}") from exc
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise GuestImageError(f"cannot decompress kernel module {path}: {exc}") from exc
    if path.name.endswith(".zst"):
        # The standard library has no zstd (before 3.14): use the command-line tool.
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestImageError(
                f"kernel module {path} is zstd-compressed and the 'zstd' program is not installed; "
                "install it (apt-get install zstd) or decompress the modules yourself")
        proc = subprocess.run([zstd, "-dc", "--", str(path)], capture_output=True, check=False)
        if proc.returncode != 0:
            raise GuestImageError(f"zstd could not decompress {path}: "
                                  f"{proc.stderr.decode(errors='replace').strip()}")
        return proc.stdout
    return raw


@dataclass(frozen=True)
class ModuleInfo:
    """What the guest image needs to know about one module file.

    :param name: the module's name (``name=`` in ``.modinfo``, else from the file name).
    :param depends: names of the modules it needs loaded first (``depends=``), in file order.
    :param vermagic: the kernel release and options it was built for (``vermagic=``).
    :param path: the file it was read from.
    """

    name: str
    depends: tuple[str, ...]
    vermagic: str
    path: Path


def read_module(path: Path, data: bytes | None = None) -> ModuleInfo:
    """Read a module file's ``.modinfo``.

    :param path: the module file (compressed or not).
    :param data: its uncompressed bytes, when already loaded.
    :raises GuestImageError: for a file that is not an ELF module or has no ``.modinfo``.
    """
    if data is None:
        data = load_module_bytes(path)
    section = ElfFile(data, f"kernel module {path}").section(".modinfo")
    if section is None:
        raise GuestImageError(f"kernel module {path} has no .modinfo section")
    info = parse_modinfo(section)
    name = (info.get("name") or [module_name_from_path(path)])[0]
    depends = tuple(d for v in info.get("depends", []) for d in v.split(",") if d)
    return ModuleInfo(name=name.replace("-", "_"), depends=tuple(d.replace("-", "_") for d in depends),
                      vermagic=(info.get("vermagic") or [""])[0], path=path)


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Map module name -> file for every module under a ``lib/modules/<version>`` directory.

    When one name exists twice (``updates/`` overriding ``kernel/``), the path that sorts first
    wins, which is stable but arbitrary; distributions do not ship such duplicates.
    """
    index: dict[str, Path] = {}
    for root, dirs, files in os.walk(modules_dir):
        dirs.sort()  # deterministic traversal
        for file in sorted(files):
            if file.endswith(MODULE_SUFFIXES):
                index.setdefault(module_name_from_path(Path(file)), Path(root) / file)
    return index


def builtin_modules(modules_dir: Path) -> set[str] | None:
    """Names listed in ``modules.builtin`` (built into the kernel), or None when it is absent."""
    try:
        text = (modules_dir / "modules.builtin").read_text()
    except OSError:
        return None
    return {module_name_from_path(Path(line.strip())) for line in text.splitlines() if line.strip()}


def resolve_load_order(roots: Iterable[str], index: dict[str, Path], builtin: set[str] | None,
                       log: Callable[[str], None] | None = None,
                       read: Callable[[Path], ModuleInfo] = read_module) -> list[ModuleInfo]:
    """Modules to ``insmod`` for ``roots``, dependencies first (a depth-first topological sort).

    A module built into the kernel is skipped. A dependency with no file is skipped too (the
    kernel may have it built in without a ``modules.builtin``), with a log line.

    :param roots: the modules wanted, e.g. ``["virtio_pci", "virtio_balloon"]``.
    :param index: name -> file, from :func:`module_index`.
    :param builtin: names from :func:`builtin_modules`, or None when unknown.
    :param log: receives a line for each module skipped because it has no file.
    :param read: reads one module (tests substitute it).
    :raises GuestImageError: for a dependency cycle, or a root that is neither a file nor
        (when ``modules.builtin`` is known) built in.
    """
    order: list[ModuleInfo] = []
    done: set[str] = set()
    visiting: list[str] = []
    known_builtin = builtin is not None
    builtin = builtin or set()

    def visit(name: str, needed_by: str | None) -> None:
        if name in done or name in builtin:
            return
        if name in visiting:
            cycle = " -> ".join(visiting[visiting.index(name):] + [name])
            raise GuestImageError(f"kernel module dependency cycle: {cycle}")
        path = index.get(name)
        if path is None:
            if needed_by is None and known_builtin:
                raise GuestImageError(f"the kernel has no module {name!r} (no file and not in modules.builtin)")
            if log:
                log(f"modules: {name} has no file (needed by {needed_by or 'request'}); assuming it is built in")
            done.add(name)
            return
        visiting.append(name)
        info = read(path)
        for dep in info.depends:
            visit(dep, name)
        visiting.pop()
        done.add(name)
        order.append(info)

    for root in roots:
        visit(root, None)
    return order
