"""The blocking facade: the async core, callable from a notebook cell or a plain script.

Every twin runs its async original on one private asyncio loop on a daemon thread
(``loop``), as bluesky and ophyd-async do, so it works inside Jupyter, whose own loop is
already running. Each public async method of ``Guest``, ``Balloon``, ``Workload``,
``Sampler`` and ``LibvirtGuest`` has a twin with the same parameters and defaults
(``balloon`` / ``guest`` / ``sampler`` / ``libvirt``); ``SyncLibvirtGuest`` is imported
only when asked for, so ``import balloonlab`` never needs libvirt-python.
"""

from balloonlab.blocking.balloon import SyncBalloon, SyncWorkload
from balloonlab.blocking.guest import SyncGuest, SyncGuestBase
from balloonlab.blocking.sampler import SyncSampler, run_experiment

__all__ = ["SyncBalloon", "SyncGuest", "SyncGuestBase", "SyncSampler", "SyncWorkload", "run_experiment"]
