"""Where every byte of a guest's memory is, seen from the guest and the host: attribution.

A pure function of the samples frame (the balloon statistics and the host columns,
:data:`~balloonlab.model.schema.HOST_COLUMNS`), after crosvm's memstats chart adapted to QEMU.
Per sample, in bytes, bottom to top as :mod:`balloonlab.analysis.attribution_plot` stacks them
(the columns of :data:`BANDS`):

- ``vmm_tcg``: QEMU's resident TCG translation buffer (``host_tcg``; 0 under KVM);
- ``vmm_other``: the rest of QEMU outside guest RAM (``host_other``: heap, libraries, stacks,
  ROMs and firmware copies, device memory);
- ``guest_used`` = min(MemTotal, memory) - MemFree - disk_caches: memory the guest uses, where
  ``memory`` = ``actual + vmem_size`` is what the guest has (the balloon's ``actual`` counts
  boot memory only; a virtio-mem device's plugged memory comes on top of it);
- ``guest_cache`` = disk_caches (file pages, including tmpfs/shmem and swap cache);
- ``guest_reserved`` = max(0, memory - MemTotal): memory the guest has but its MemTotal does not
  count (kernel image, memmap, firmware-reserved areas, memory never onlined); without this
  band those resident pages would pass for free ones;
- ``guest_free_resident`` = host_guest_ram - used - cache - reserved, kept within [0, MemFree]:
  free in the guest yet still resident on the host: pages the guest touched and freed that the
  host never took back. Free page reporting (``free-page-reporting=on``) returns exactly these
  (the guest reports free pages, QEMU discards them), and a balloon inflating takes them first;
- ``guest_free_unbacked`` = MemFree - guest_free_resident: free and not resident (never
  touched, or already reported back);
- ``ballooned`` = max(0, ram_size - vmem_max_size - actual): boot memory taken by the balloon;
- ``vmem_unplugged`` = vmem_max_size - vmem_size: virtio-mem memory the guest has not plugged
  (0 without virtio-mem).

So ``guest_used + guest_cache + guest_reserved + guest_free_resident + guest_free_unbacked ==
memory`` (when MemFree + disk_caches <= min(MemTotal, memory), as the kernel's counters are),
adding ``ballooned + vmem_unplugged`` gives ``ram_size`` (``host_ram_size``: every memory
backend's size, boot RAM and virtio-mem backends), and ``vmm_tcg + vmm_other + guest_used +
guest_cache + guest_reserved + guest_free_resident + resident_gap == host_rss`` always.
``resident_gap`` (not a band) is what the guest's numbers cannot place: positive when more guest
RAM is resident than the guest accounts for (its report predates a move: a balloon deflating,
memory freed), negative when the guest counts as used or reserved pages that are not resident on
the host (host swap, or reserved memory never touched).

Caveats: the stats are the guest's view when it made its report (the sample's time), the host
columns the host's when the sampler read them (up to ``age_s`` later); MemTotal and MemFree are
the guest's page counters, so memory the guest's kernel allocated for itself (slab, page tables)
is in ``guest_used``; with ``deflate-on-oom`` Linux counts ballooned pages as used instead of
shrinking MemTotal, which ``min(MemTotal, actual)`` corrects. ``host_rss`` counts a page mapped
twice twice (TCG's ``split-wx`` buffer). Rows without host columns (a remote libvirt guest, a
QEMU attached without its pid) have NA host-side bands.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from balloonlab.analysis.measures import column, conform

#: The bands, bottom to top: column -> legend label. The first six are resident on the host.
BANDS: dict[str, str] = {
    "vmm_tcg": "VMM: TCG translation buffer",
    "vmm_other": "VMM: other (heap, libraries, ROMs, devices)",
    "guest_used": "guest used",
    "guest_cache": "guest page cache",
    "guest_reserved": "guest kernel & firmware (memory - MemTotal)",
    "guest_free_resident": "guest free, still resident on the host",
    "guest_free_unbacked": "guest free, not resident",
    "ballooned": "ballooned out",
    "vmem_unplugged": "virtio-mem unplugged",
}
#: The bands that are host memory: their sum is ``host_rss`` less ``resident_gap``.
RESIDENT: tuple[str, ...] = tuple(BANDS)[:6]
#: The virtio-mem columns (:data:`~balloonlab.model.schema.VMEM_COLUMNS`, sums over a guest's
#: devices): plugged bytes, the backends' size and the requested size (for the plot's line).
VMEM_SIZE, VMEM_MAX, VMEM_REQUESTED = "vmem_size", "vmem_max_size", "vmem_requested"


def _vmem(samples: pd.DataFrame, name: str) -> pd.Series:
    """A virtio-mem column as Int64 bytes, 0 where NA (a guest without virtio-mem has none)."""
    if name not in samples.columns:
        return pd.Series(pd.array([0] * len(samples), dtype="Int64"), index=samples.index)
    return column(samples, name).astype("Int64").fillna(0)


def vmem_unplugged(samples: pd.DataFrame) -> pd.Series:
    """Virtio-mem memory the guest has not plugged, per sample (Int64 bytes):
    ``vmem_max_size - vmem_size``, 0 for a guest without virtio-mem.

    :param samples: a samples frame.
    """
    return (_vmem(samples, VMEM_MAX) - _vmem(samples, VMEM_SIZE)).clip(lower=0)


def _least(a: pd.Series, b: pd.Series) -> pd.Series:
    """Element-wise min of two Int64 series, NA where either is."""
    out = a.where((a <= b).fillna(False), b)
    out[(a.isna() | b.isna()).to_numpy()] = pd.NA
    return out


def attribution(samples: pd.DataFrame, *, ram_size: int | Mapping[str, int] | None = None) -> pd.DataFrame:
    """Each sample's memory split into the bands of :data:`BANDS` (see the module docstring).

    :param samples: a samples frame as the sampler builds it (the host columns NA where the
        host could not see the guest's QEMU).
    :param ram_size: the guest's RAM size in bytes, boot memory plus any virtio-mem backends
        (one for all guests, or per guest name), used where ``host_ram_size`` is NA (a remote
        guest); the host's number wins otherwise.
    :returns: index and ``guest`` kept; the :data:`BANDS` columns, then ``actual``,
        ``memory`` (``actual + vmem_size``), ``vmem_requested`` (0 without virtio-mem),
        ``target``, ``ram_size``, ``host_rss`` and ``resident_gap`` (Int64 bytes, NA where an
        input is).
    """
    f = conform(samples, "samples")
    ints = {name: column(f, name).astype("Int64") for name in (
        "total_memory", "free_memory", "disk_caches", "actual", "target", "host_rss", "host_ram_size",
        "host_guest_ram", "host_tcg", "host_other")}
    total, free, cache, actual = ints["total_memory"], ints["free_memory"], ints["disk_caches"], ints["actual"]
    size = ints["host_ram_size"].copy()
    if ram_size is not None:
        guests = f["guest"].astype(str)
        given = (guests.map(dict(ram_size)) if isinstance(ram_size, Mapping)
                 else pd.Series(ram_size, index=f.index)).astype("Int64")
        size = size.fillna(given)
    plugged = _vmem(f, VMEM_SIZE)
    memory = actual + plugged  # what the guest has: boot memory left by the balloon + virtio-mem
    used = (_least(total, memory) - free - cache).clip(lower=0)
    reserved = (memory - total).clip(lower=0)
    known = used + cache + reserved
    free_resident = _least((ints["host_guest_ram"] - known).clip(lower=0), free)
    unplugged = vmem_unplugged(f)
    out = pd.DataFrame({
        "guest": f["guest"],
        "vmm_tcg": ints["host_tcg"],
        "vmm_other": ints["host_other"],
        "guest_used": used,
        "guest_cache": cache,
        "guest_reserved": reserved,
        "guest_free_resident": free_resident,
        "guest_free_unbacked": free - free_resident,
        "ballooned": (size - _vmem(f, VMEM_MAX) - actual).clip(lower=0),
        "vmem_unplugged": unplugged,
        "actual": actual,
        "memory": memory,
        "vmem_requested": _vmem(f, VMEM_REQUESTED),
        "target": ints["target"],
        "ram_size": size,
        "host_rss": ints["host_rss"],
        "resident_gap": ints["host_guest_ram"] - known - free_resident,
    }, index=f.index)
    return out
