"""A deterministic writer for "newc" (SVR4, magic ``070701``) cpio archives.

This is the format the Linux kernel unpacks as an initramfs. The writer keeps entries in the
order they were added, numbers inodes from 1 upwards, and stores every timestamp, uid and gid
as 0, so the same entries always give the same bytes: the guest image's cache key and its
contents stay reproducible. Only what an initramfs needs is supported: directories, regular
files, symlinks and device nodes (no hard links).
"""

from __future__ import annotations

import gzip
import stat

__all__ = ["CpioWriter", "gzip_bytes"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


def _pad4(length: int) -> bytes:
    """Zero bytes that bring ``length`` up to the next multiple of 4 (newc aligns to 4)."""
    return b"\0" * (-length % 4)


def _normalize(path: str) -> str:
    """Archive names are relative ("bin/sh"), with no "." or ".." parts and no trailing "/".

    :raises ValueError: for an empty path or one that tries to leave the archive root.
    """
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise ValueError(f"bad archive path {path!r}")
    return "/".join(parts)


class CpioWriter:
    """Collect entries, then :meth:`getvalue` returns the whole archive (trailer included).

    Parent directories must exist before their children: :meth:`add_file` and friends create
    missing parents (mode 0755) themselves, so callers only add directories whose mode matters.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._names: set[str] = set()
        self._next_ino = 1

    def __contains__(self, path: str) -> bool:
        return _normalize(path) in self._names

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        if name in self._names:
            raise ValueError(f"duplicate archive entry {name!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._names:
            self.add_dir(parent)
        self._names.add(name)
        ino = self._next_ino
        self._next_ino += 1
        self._write_header(name, ino, mode, nlink, len(data), rdev)
        self._chunks.append(data + _pad4(len(data)))

    def _write_header(self, name: str, ino: int, mode: int, nlink: int, size: int,
                      rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            ino, mode, 0, 0, nlink,  # ino, mode, uid, gid, nlink
            0, size,                  # mtime 0: reproducible bytes
            0, 0,                     # devmajor, devminor of the archive's own filesystem
            rdev[0], rdev[1],         # rdevmajor, rdevminor (device nodes only)
            len(encoded), 0,          # namesize includes the NUL; check is 0 for newc
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        # The name is padded so that header + name end on a 4-byte boundary (header is 110).
        self._chunks.append(header + encoded + _pad4(len(header) + len(encoded)))

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (its parents are created if missing).

        :param path: path inside the archive, e.g. ``"lib/modules"``.
        :param mode: permission bits.
        :raises ValueError: for a bad or duplicate path.
        """
        name = _normalize(path)
        self._entry(name, stat.S_IFDIR | (mode & 0o7777), nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file.

        :param path: path inside the archive.
        :param data: the file's contents.
        :param mode: permission bits, e.g. ``0o755`` for scripts and binaries.
        :raises ValueError: for a bad or duplicate path.
        """
        self._entry(_normalize(path), stat.S_IFREG | (mode & 0o7777), bytes(data))

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link; newc stores the target as the entry's data.

        :param path: path of the link inside the archive.
        :param target: what the link points to (absolute or relative), kept verbatim.
        :raises ValueError: for a bad or duplicate path or an empty target.
        """
        if not target:
            raise ValueError("symlink target must not be empty")
        self._entry(_normalize(path), stat.S_IFLNK | 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a device node, e.g. ``add_device("dev/console", "c", 5, 1)``.

        :param kind: ``"c"`` for a character device, ``"b"`` for a block device.
        :raises ValueError: for an unknown kind or a bad or duplicate path.
        """
        kinds = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}
        if kind not in kinds:
            raise ValueError(f"device kind must be 'c' or 'b', got {kind!r}")
        self._entry(_normalize(path), kinds[kind] | (mode & 0o7777), rdev=(major, minor))

    def getvalue(self) -> bytes:
        """The archive so far, followed by the ``TRAILER!!!`` entry (the writer stays usable)."""
        trailer = CpioWriter()
        trailer._write_header(_TRAILER, 0, 0, 1, 0, (0, 0))
        return b"".join(self._chunks + trailer._chunks)


def gzip_bytes(data: bytes, level: int = 9) -> bytes:
    """Gzip ``data`` reproducibly: no file name and mtime 0 in the gzip header.

    :param level: compression level 1-9.
    """
    import io

    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()
