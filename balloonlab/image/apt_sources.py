"""The host's apt configuration, as a Debian image build needs it: which release the host runs
and which mirror its apt uses for it.

On the machines balloonlab runs on, Debian's archive is reachable only through the mirror apt is
configured with, so debootstrap must use the same one: it is read from apt's sources (deb822
``*.sources`` first, then one-line ``*.list``), never hard-coded.
"""

from __future__ import annotations

import re
from pathlib import Path

from balloonlab.model.errors import GuestImageError

__all__ = ["apt_mirror", "host_codename"]


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, None
        elif line.startswith("#"):
            continue
        elif line[0] in " \t" and last is not None:  # a folded continuation line
            current[last] += " " + line.strip()
        elif ":" in line:
            last, _, value = line.partition(":")
            last = last.strip().lower()
            current[last] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def apt_mirror(codename: str, sources_dir: Path = Path("/etc/apt")) -> tuple[str, str | None]:
    """The URI and keyring of the host's apt entry for ``codename`` (binary packages).

    Reads ``sources.list.d/*.sources`` (deb822), then ``sources.list`` and ``sources.list.d/*.list``
    (one-line style). The machines this runs on reach Debian's archive only through the mirror
    apt is configured with, so debootstrap must use the same one.

    :returns: (URI, Signed-By keyring path or None).
    :raises GuestImageError: when no enabled ``deb`` entry names the suite.
    """
    for path in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        try:
            stanzas = _deb822_stanzas(path.read_text())
        except OSError:
            continue
        for stanza in stanzas:
            if (stanza.get("enabled", "yes").lower() != "no" and "deb" in stanza.get("types", "").split()
                    and codename in stanza.get("suites", "").split() and stanza.get("uris")):
                keyring = stanza.get("signed-by")
                # Signed-By may hold the key itself (an inline block): then debootstrap uses its
                # default keyring, which for Debian's archive is the same one.
                return stanza["uris"].split()[0], keyring if keyring and keyring.startswith("/") else None
    one_line = [sources_dir / "sources.list", *sorted((sources_dir / "sources.list.d").glob("*.list"))]
    for path in one_line:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            # deb [signed-by=/k.gpg arch=amd64] http://mirror/debian bookworm main
            found = re.match(r"\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
            if found and found.group(3) == codename:
                options = dict(o.split("=", 1) for o in (found.group(1) or "").split() if "=" in o)
                return found.group(2), options.get("signed-by")
    raise GuestImageError(f"no apt source for {codename} in {sources_dir}/sources.list(.d): debootstrap needs the "
                          "mirror apt uses; add a `Types: deb` entry for that suite")


def host_codename() -> str:
    """VERSION_CODENAME of the host (``bookworm``, ``trixie``).

    :raises GuestImageError: when /etc/os-release does not name one (not Debian?).
    """
    try:
        text = Path("/etc/os-release").read_text()
    except OSError as exc:
        raise GuestImageError(f"cannot read /etc/os-release: {exc.strerror}; pass release=CODENAME") from None
    found = re.search(r'^VERSION_CODENAME="?([a-z]+)"?$', text, re.M)
    if found is None:
        raise GuestImageError("/etc/os-release has no VERSION_CODENAME; pass release=CODENAME")
    return found.group(1)
