"""Debian packages without installing them: ``apt-get download``, reading a ``.deb``, unpacking.

The built-in guest's kernel and the second QEMU/libvirt stack come from Debian's archive
through apt, at set-up time only, into balloonlab's cache; nothing here ever installs into
the system (no dpkg database is touched). A ``.deb`` is an ``ar`` archive whose ``data.tar.*``
member holds the files; the guest image reads the few files it needs straight from it, the
stacks unpack whole packages with ``dpkg-deb -x``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from balloonlab.model.errors import GuestImageError

__all__ = ["APT_HINT", "apt_download", "apt_download_closure", "apt_mirror", "deb_members", "read_deb_data",
           "unpack_debs"]

#: What to do when apt cannot help.
APT_HINT = ("run `apt-get update` as root first (the project's Makefile does this), "
            "or pass kernel=PATH (--kernel) and modules_dir=PATH (--modules-dir)")


def read_deb_data(deb: Path) -> tuple[str, bytes]:
    """(name, bytes) of the ``data.tar.*`` member of a .deb (an ``ar`` archive).

    :raises GuestImageError: when ``deb`` is not an ar archive or has no data member.
    """
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise GuestImageError(f"{deb} is not a .deb (ar) archive")
        while header := f.read(60):
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                return name, f.read(size)
            f.seek(size + size % 2, os.SEEK_CUR)  # members are padded to even offsets
    raise GuestImageError(f"{deb} has no data.tar member")


def deb_members(deb: Path, want: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the regular files in a .deb whose path (without "./") ``want`` accepts.

    :raises GuestImageError: for a malformed .deb, or a zstd one without the zstd program.
    """
    name, data = read_deb_data(deb)
    if name.endswith(".zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise GuestImageError(f"{deb} is zstd-compressed; install zstd (apt-get install zstd)")
        data = subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=True).stdout
    found: dict[str, bytes] = {}
    # Stream mode ("r|*") reads the xz/gz archive once, front to back.
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and want(path):
                handle = tar.extractfile(member)  # None only for members that are not regular files
                if handle is None:
                    raise GuestImageError(f"{deb}: cannot read {member.name} from its data.tar")
                found[path] = handle.read()
    return found


def _run_apt(argv: list[str], cwd: Path, what: str) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1800, check=False)
    except FileNotFoundError:
        raise GuestImageError(f"{what}: apt-get is not installed (not a Debian-based system?)") from None
    if proc.returncode != 0:
        raise GuestImageError(f"{what}: `{' '.join(argv)}` failed: "
                              f"{(proc.stderr or proc.stdout).strip()[-500:] or 'no output'}; {APT_HINT}")
    return proc.stdout


def apt_mirror(suite: str) -> str:
    """The URI apt fetches ``suite``'s binary packages from, as apt itself reports it
    (``apt-get indextargets``, whatever form its sources take): debootstrap must use the mirror
    apt uses, as the machines balloonlab runs on reach Debian's archive only through it.

    :raises GuestImageError: apt has no ``deb`` source for ``suite`` (the message says to add one).
    """
    listed = _run_apt(["apt-get", "indextargets", "--format", "$(TARGET_OF) $(RELEASE) $(REPO_URI)"], Path("/"),
                      "cannot list apt's sources")
    for line in listed.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[:2] == ["deb", suite]:
            return fields[2]
    raise GuestImageError(f"apt has no `deb` source for {suite}: debootstrap needs the mirror apt uses; add one "
                          f"(a `Types: deb` entry with `Suites: {suite}` in /etc/apt/sources.list.d/) and run "
                          "`apt-get update`")


def apt_download(pkg: str, dest: Path) -> Path:
    """``apt-get download pkg`` into ``dest``; the .deb's path.

    :raises GuestImageError: when apt is missing or cannot fetch the package.
    """
    # Download into a private directory so a killed download never looks complete.
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        _run_apt(["apt-get", "download", pkg], tmp, f"cannot download {pkg}")
        got = sorted(tmp.glob("*.deb"))
        if not got:
            raise GuestImageError(f"`apt-get download {pkg}` gave no .deb; {APT_HINT}")
        os.rename(got[0], dest / got[0].name)
        return dest / got[0].name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def apt_download_closure(packages: Iterable[str], release: str | None, dest: Path) -> list[Path]:
    """Download ``packages`` and whatever they need beyond what this system has installed.

    apt resolves the dependencies against the installed system, exactly as ``apt-get install
    -t RELEASE`` would, but only downloads (``--download-only``, into a private archive dir):
    the result is the set of .debs that, unpacked over this system's files, make the packages
    of ``release`` run here.

    :param release: an apt target release such as ``bookworm-backports`` (None: the default).
    :raises GuestImageError: when apt cannot resolve or fetch them.
    """
    names = list(packages)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=dest))
    try:
        (tmp / "partial").mkdir()
        argv = ["apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends",
                "-o", f"Dir::Cache::Archives={tmp}", *(["-t", release] if release else []), *names]
        _run_apt(argv, tmp, f"cannot download {', '.join(names)}")
        debs = sorted(tmp.glob("*.deb"))
        for deb in debs:
            os.rename(deb, dest / deb.name)
        return [dest / deb.name for deb in debs]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def unpack_debs(debs: Iterable[Path], root: Path) -> None:
    """Unpack each .deb's files under ``root`` (``dpkg-deb -x``: files only, no scripts run).

    :raises GuestImageError: when dpkg-deb is missing or a package does not unpack.
    """
    for deb in debs:
        try:
            proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True,
                                  timeout=600, check=False)
        except FileNotFoundError:
            raise GuestImageError("dpkg-deb is not installed (not a Debian-based system?)") from None
        if proc.returncode != 0:
            raise GuestImageError(f"cannot unpack {deb}: {proc.stderr.strip()[-300:]}")
