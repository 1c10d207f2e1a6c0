"""Many QEMU guests at once: attaching thousands, bounded, and the ones this host runs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

from balloonlab.domain import DomainSpec
from balloonlab.qemu import registry as runtime
from balloonlab.qemu.guest import Guest


async def attach_many(qmp_sockets: Sequence[str | os.PathLike[str]],
                      domain: DomainSpec | str | os.PathLike[str] | None = None, *,
                      names: Sequence[str] | None = None, set_period: bool = True,
                      concurrency: int = 64) -> list[Guest]:
    """:meth:`Guest.attach` to many QEMUs at once, at most ``concurrency`` connecting at a
    time (each connect is a socket, a QMP greeting and a few commands: unbounded, thousands
    would exhaust file descriptors and time out together).

    All or nothing: if one attach fails, the guests already attached are let go (their
    connections closed, their QEMUs left running) and the first error is raised.

    :param domain: one domain XML for all (its ``<stats period>`` is applied as attach does).
    :param names: one name per socket (default: attach's own choice per socket).
    :raises ValueError: ``names`` does not match ``qmp_sockets``, or ``concurrency`` < 1.
    """
    if names is not None and len(names) != len(qmp_sockets):
        raise ValueError(f"{len(names)} names for {len(qmp_sockets)} sockets: give one name per socket")
    if concurrency < 1:
        raise ValueError(f"concurrency must be 1 or more, got {concurrency}")
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Guest:
        async with gate:
            return await Guest.attach(qmp_sockets[i], domain, name=None if names is None else names[i],
                                      set_period=set_period)
    results = await asyncio.gather(*(one(i) for i in range(len(qmp_sockets))), return_exceptions=True)
    guests = [r for r in results if isinstance(r, Guest)]
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(g.close() for g in guests), return_exceptions=True)
        raise errors[0]
    return guests


def list_guests() -> list[runtime.RegistryEntry]:
    """Guests balloonlab launched that are running on this host (stale entries swept)."""
    return runtime.list_guests()
