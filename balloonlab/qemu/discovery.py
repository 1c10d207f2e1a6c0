"""Finding the virtio balloon device in QEMU's object tree (QOM).

The fast paths come first: the device's id (``/machine/peripheral/<alias>``, one
``qom-list``), then the devices added without an id (``/machine/peripheral-anon``), and only
then libvirt's original recursive walk of the whole tree, which costs about 200 round trips
on a minimal machine. The QOM type to look for comes from the domain XML's model and address
type: a walk for ``virtio-balloon-pci`` never finds a ``-non-transitional`` device. The result,
found or not, is cached on the monitor connection: a failed search is not repeated, and a new
connection (a new QEMU, a reconnect) searches afresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from balloonlab.model.balloon import Method
from balloonlab.model.errors import BalloonNotFound, CommandError
from balloonlab.model.period import POLLING_PROPERTY
from balloonlab.qemu.devices import balloon_qom_types
from balloonlab.qemu.transport import QMPTransport

if TYPE_CHECKING:
    from balloonlab.domain import MemballoonSpec

async def find_balloon(monitor: QMPTransport, spec: MemballoonSpec | None = None, *,
                       alias: str | None = None, method: Method = "auto") -> str:
    """Return the QOM path of the guest's balloon, using the connection's cache.

    :param spec: the domain's ``<memballoon>`` (model/address pick the QOM type; its alias,
        else ``alias``, else ``balloon0`` is tried first).
    :param method: ``auto`` (alias, then peripheral-anon, then the walk) or one strategy
        alone, uncached (benchmarks compare them).
    :raises BalloonNotFound: nothing found (also on a later call: the failure is cached).
    """
    cache = monitor.cache
    if method == "auto" and cache.balloon_searched:  # every read comes here: answer from the cache first
        if cache.balloon_path is None:
            raise BalloonNotFound("Cannot determine balloon device path (cached failure of this "
                                  "connection)", cache.balloon_search_log)
        return cache.balloon_path
    types = balloon_qom_types(spec)
    alias = (spec.alias if spec is not None and spec.alias else None) or alias or "balloon0"
    if method != "auto":
        searched: list[str] = []
        path = await _STRATEGIES[method](monitor, types, alias, searched)
        if path is None or not await _has_polling_property(monitor, path, searched):
            raise BalloonNotFound(f"no balloon found by {method}", searched)
        return path

    searched = []
    try:
        for strategy in ("alias", "anon", "walk"):
            path = await _STRATEGIES[strategy](monitor, types, alias, searched)
            if path is not None:
                if await _has_polling_property(monitor, path, searched):
                    cache.balloon_path = path
                break
    finally:
        # Cached even when a QMP error cut the search short: libvirt's "already tried" flag.
        cache.balloon_searched = True
        cache.balloon_search_log = searched
    if cache.balloon_path is None:
        raise BalloonNotFound("Cannot determine balloon device path: no "
                              f"{' / '.join(types)} device with {POLLING_PROPERTY}", searched)
    return cache.balloon_path


async def _qom_list(monitor: QMPTransport, path: str) -> list[dict[str, str]]:
    try:
        return list(await monitor.execute("qom-list", {"path": path}))
    except CommandError as exc:
        if exc.error_class == "DeviceNotFound":
            return []
        raise


def _matches(prop_type: str, types: tuple[str, ...], kinds: tuple[str, ...] = ("child",)) -> bool:
    return any(prop_type == f"{kind}<{t}>" for kind in kinds for t in types)


async def _by_alias(monitor: QMPTransport, types: tuple[str, ...], alias: str,
                    searched: list[str]) -> str | None:
    searched.append(f"/machine/peripheral/{alias}")
    entries = await _qom_list(monitor, "/machine/peripheral")
    for entry in entries:
        if entry["name"] == alias and _matches(entry["type"], types):
            return f"/machine/peripheral/{alias}"
    # The same listing shows a balloon added with another id: take it for free.
    for entry in entries:
        if _matches(entry["type"], types):
            return f"/machine/peripheral/{entry['name']}"
    return None


async def _by_anon(monitor: QMPTransport, types: tuple[str, ...], alias: str,
                   searched: list[str]) -> str | None:
    searched.append("/machine/peripheral-anon")
    for entry in await _qom_list(monitor, "/machine/peripheral-anon"):
        if _matches(entry["type"], types):
            return f"/machine/peripheral-anon/{entry['name']}"
    return None


async def _by_walk(monitor: QMPTransport, types: tuple[str, ...], alias: str,
                   searched: list[str]) -> str | None:
    """libvirt's 2013 search: recurse through child<> properties for link<TYPE>/child<TYPE>."""
    searched.append("recursive walk of / for " + ", ".join(f"link<{t}>" for t in types))

    async def walk(path: str) -> str | None:
        entries = await _qom_list(monitor, path)
        for entry in entries:
            if _matches(entry["type"], types, ("link", "child")):
                return (path.rstrip("/") + "/" + entry["name"])
        for entry in entries:
            if entry["type"].startswith("child<"):
                found = await walk(path.rstrip("/") + "/" + entry["name"])
                if found is not None:
                    return found
        return None

    return await walk("/")


async def _has_polling_property(monitor: QMPTransport, path: str, searched: list[str]) -> bool:
    names = {entry["name"] for entry in await _qom_list(monitor, path)}
    if POLLING_PROPERTY in names:
        return True
    searched.append(f"{path} (has no {POLLING_PROPERTY})")
    return False


_STRATEGIES = {"alias": _by_alias, "anon": _by_anon, "walk": _by_walk}
