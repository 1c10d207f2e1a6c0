"""The one table of balloon statistics, and the columns of the frames built from them.

Every other module takes stat names, QEMU keys, libvirt names, units and counter/gauge kinds
from :data:`STATS`: the stats parser (QEMU key -> column), the columnar buffer (which columns
exist before the first sample), the libvirt view and its inverse (libvirt name and KiB
divisor), rates (counters only). A stat QEMU adds later is kept under its own snake-case name
even before it is listed here; adding it here gives it a column from the first row, a unit
and (if libvirt maps it) a libvirt name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Unit = Literal["bytes", "count"]
Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class StatDef:
    """One balloon statistic.

    :param name: balloonlab's column name: QEMU's name without ``stat-``, snake case.
    :param qemu_key: the key in QEMU's ``guest-stats`` reply.
    :param unit: ``bytes`` or ``count``.
    :param kind: ``counter`` (cumulative since the guest booted) or ``gauge``.
    :param libvirt_name: ``virsh dommemstat``'s name, None where libvirt does not map it.
    :param since: the QEMU version that first reports it.
    """

    name: str
    qemu_key: str
    unit: Unit
    kind: Kind
    libvirt_name: str | None
    since: str = "2.5"

    @property
    def libvirt_divisor(self) -> int:
        """libvirt divides bytes by 1024 (KiB, truncated) and leaves counts alone."""
        return 1024 if self.unit == "bytes" else 1


def _stat(name: str, unit: Unit, kind: Kind, libvirt_name: str | None, since: str = "2.5") -> StatDef:
    return StatDef(name, "stat-" + name.replace("_", "-"), unit, kind, libvirt_name, since)


#: Every stat QEMU reports, in QEMU's order (docs/balloon-facts.md "Reading stats"): the kernel's
#: VIRTIO_BALLOON_S_* tags 0-15.
STATS: tuple[StatDef, ...] = (
    _stat("swap_in", "bytes", "counter", "swap_in"),
    _stat("swap_out", "bytes", "counter", "swap_out"),
    _stat("major_faults", "count", "counter", "major_fault"),
    _stat("minor_faults", "count", "counter", "minor_fault"),
    _stat("free_memory", "bytes", "gauge", "unused"),
    _stat("total_memory", "bytes", "gauge", "available"),   # libvirt's "available" is MemTotal
    _stat("available_memory", "bytes", "gauge", "usable", "4.1"),
    _stat("disk_caches", "bytes", "gauge", "disk_caches", "2.12"),
    _stat("htlb_pgalloc", "count", "counter", "hugetlb_pgalloc", "3.0"),
    _stat("htlb_pgfail", "count", "counter", "hugetlb_pgfail", "3.0"),
    # QEMU 9.2 + Linux 6.12 (the kernel's "virtio_balloon: introduce memory scan/reclaim info"):
    # OOM kills and allocation stalls (the sum of allocstall_* over zones) are counts; scans and
    # reclaims are the pgscan_/pgsteal_ kswapd ("async") and direct counters, sent in bytes
    # (pages_to_bytes). libvirt (11.3 included) maps none of them.
    _stat("oom_kills", "count", "counter", None, "9.2"),
    _stat("alloc_stalls", "count", "counter", None, "9.2"),
    _stat("async_scans", "bytes", "counter", None, "9.2"),
    _stat("direct_scans", "bytes", "counter", None, "9.2"),
    _stat("async_reclaims", "bytes", "counter", None, "9.2"),
    _stat("direct_reclaims", "bytes", "counter", None, "9.2"),
)
STATS_BY_NAME: dict[str, StatDef] = {s.name: s for s in STATS}
#: Column names of the stats, in table order.
STAT_NAMES: tuple[str, ...] = tuple(s.name for s in STATS)
#: Cumulative counters: they only grow until the guest resets.
COUNTERS: frozenset[str] = frozenset(s.name for s in STATS if s.kind == "counter")

def _libvirt_rows() -> tuple[tuple[str, str, int], ...]:
    rows = [("actual", "actual", 1024)]
    for stat in STATS:
        if stat.name == "disk_caches":  # libvirt's enum has last_update before disk_caches
            rows.append(("last_update", "last_update", 1))
        if stat.libvirt_name is not None:
            rows.append((stat.libvirt_name, stat.name, stat.libvirt_divisor))
    rows.append(("rss", "rss", 1024))
    return tuple(rows)


#: ``virsh dommemstat`` rows in the order virsh prints them: (libvirt name, source, divisor).
#: Source is a stat name or ``actual`` / ``last_update`` / ``rss`` (qemuMonitorJSON-
#: GetMemoryStats divides memory values by 1024 with truncation; counts stay as they are).
LIBVIRT_ROWS: tuple[tuple[str, str, int], ...] = _libvirt_rows()
#: libvirt dommemstat name -> (balloonlab source name, factor back to bytes or counts).
FROM_LIBVIRT: dict[str, tuple[str, int]] = {name: (source, divisor) for name, source, divisor in LIBVIRT_ROWS}

# -- The host's view of each QEMU (issue 13 item 3; model.procfs.HostMemory) -------------------
#: Sample columns read from ``/proc/PID/smaps_rollup`` of the guest's QEMU with each sample:
#: column -> the kernel's field. Bytes; NA where the host cannot see the process (a remote
#: libvirt guest, an attached QEMU whose pid is unknown). ``host_rss`` is the page-table walk's
#: exact count at the same read as the split below; ``rss`` stays libvirt's number (the
#: kernel's per-process counters, read from /proc/PID/stat).
#: Besides the four named in the issue: ``host_anon_huge`` (anonymous memory in transparent huge
#: pages: a huge page stays resident until all its 512 pages are free, which is why free page
#: reporting returns less with THP), the proportional split of ``host_pss`` (anonymous, file,
#: shmem), ``host_swap_pss`` and ``host_locked``. A kernel without a field leaves its column NA.
HOST_ROLLUP: dict[str, str] = {
    "host_rss": "Rss", "host_pss": "Pss", "host_anon": "Anonymous", "host_swap": "Swap",
    "host_anon_huge": "AnonHugePages", "host_pss_anon": "Pss_Anon", "host_pss_file": "Pss_File",
    "host_pss_shmem": "Pss_Shmem", "host_swap_pss": "SwapPss", "host_locked": "Locked",
}
#: Sample columns splitting ``host_rss`` by mapping (bytes; NA until the guest's RAM blocks are
#: found): ``host_ram_size`` guest RAM mapped (every memory backend's size, resident or not),
#: ``host_guest_ram`` resident inside it, ``host_tcg`` resident in the TCG translation buffer
#: (0 under KVM), ``host_other`` the rest of ``host_rss`` (heap, libraries, ROMs, device memory).
HOST_SPLIT: tuple[str, ...] = ("host_ram_size", "host_guest_ram", "host_tcg", "host_other")
#: Every host column, in frame order.
HOST_COLUMNS: tuple[str, ...] = (*HOST_ROLLUP, *HOST_SPLIT)
#: Sample columns of the guest's virtio-mem devices (bytes, as ``query-memory-devices`` reports
#: them; NA for a guest without virtio-mem): ``vmem_size`` plugged by the guest,
#: ``vmem_requested`` asked by the host (``requested-size``), ``vmem_max_size`` the backends'
#: size (the most the devices can give). With several devices these are sums over all of them,
#: and each device also gets ``vmem_size.<id>`` and ``vmem_requested.<id>`` (its QEMU id: the
#: frame's extra columns, present only in runs of such guests). They are read at the guest's
#: start, again on each MEMORY_DEVICE_SIZE_CHANGE and every few seconds (a requested size set
#: by another QMP client), never with the sample itself (model.guest.GuestBase.vmem_columns).
VMEM_COLUMNS: tuple[str, ...] = ("vmem_size", "vmem_requested", "vmem_max_size")
# -- end of the host's view ------------------------------------------------------------------

# -- The guest's own view (issue 16 item 2; model.guest_view) -----------------------------------
#: /proc/meminfo fields read into columns (bytes), of the host frame and, prefixed ``guest_``, of
#: the guest's own view; /proc/vmstat counters likewise.
HOST_MEMINFO: dict[str, str] = {
    "MemTotal": "mem_total", "MemFree": "mem_free", "MemAvailable": "mem_available", "Buffers": "buffers",
    "Cached": "cached", "SwapCached": "swap_cached", "SwapTotal": "swap_total", "SwapFree": "swap_free",
    "AnonPages": "anon_pages", "Shmem": "shmem", "Committed_AS": "committed_as",
}
HOST_VMSTAT: tuple[str, ...] = ("pswpin", "pswpout", "pgfault", "pgmajfault", "oom_kill")
#: Sample columns of the guest's own view, read through qemu-guest-agent (or balloonlab's agent)
#: after each new report when the sampler is asked to (``Sampler(guest_view=True)``): the
#: meminfo fields above (``guest_mem_free``, ``guest_cached``...) and vmstat counters
#: (``guest_pswpout``...) of the guest, NA when not read. ``guest_view_lag_s`` is how long after
#: the row's time (when the report most likely came, on this clock) the guest's meminfo was read:
#: the two agree only as far as the guest's memory stood still in between.
GUEST_VIEW_COLUMNS: tuple[str, ...] = (*(f"guest_{c}" for c in HOST_MEMINFO.values()),
                                       *(f"guest_{c}" for c in HOST_VMSTAT))
# -- end of the guest's own view ---------------------------------------------------------------

#: Columns every samples frame has before the stats, and after them (frame order).
SampleKind = Literal["int", "float", "bool", "category", "str", "epoch_s"]
#: ``host`` is the machine the guest's QEMU runs on (``GuestBase.host``: this machine's name, or
#: a remote libvirt URI's host); ``last_update`` is on that host's clock, and ``age_s`` is
#: corrected by ``clock_offset_s``, that host's clock minus this one's (0 for a local guest;
#: NA, and ``age_s`` with it, while a remote host's offset is not yet bounded: model.clock).
SAMPLE_HEAD: dict[str, SampleKind] = {"guest": "category", "host": "category", "last_update": "epoch_s"}
SAMPLE_TAIL: dict[str, SampleKind] = {
    "actual": "int", "target": "int", "period_s": "int", "rss": "int", "age_s": "float", "reset": "bool",
    "clock_offset_s": "float",
    **dict.fromkeys(HOST_COLUMNS, "int"),  # the host's view (HOST_COLUMNS above)
    **dict.fromkeys(VMEM_COLUMNS, "int"),  # virtio-mem (VMEM_COLUMNS above)
    **dict.fromkeys(GUEST_VIEW_COLUMNS, "int"), "guest_view_lag_s": "float",  # the guest's own view
}
# -- The host as an entity (issue 14 item 1; model.hostfs.HostReader) ---------------------------
#: The host frame: one row per host read (every ``host_interval_s``, on the samples' clock),
#: ``host`` the machine's name. Bytes and counts are ints (NA where the kernel lacks a file or
#: field); PSI averages are floats (percent of time, as the kernel prints them).
#: - ``/proc/meminfo`` (bytes): HOST_MEMINFO's keys -> columns;
#: - ``/proc/vmstat`` (counters since boot): ``pswpin``/``pswpout`` (pages swapped), ``pgfault``,
#:   ``pgmajfault``, ``oom_kill``;
#: - ``/proc/pressure/memory``: ``psi_some_avg10/60/300``, ``psi_some_total_us`` and the same for
#:   ``full`` (the total is microseconds stalled since boot);
#: - ``/sys/kernel/mm/ksm``: ``ksm_run``, ``ksm_pages_shared/sharing/unshared/volatile``,
#:   ``ksm_full_scans``, ``ksm_general_profit`` (bytes);
#: - the guests: ``guests`` sampled, ``guests_rss`` the sum of their QEMUs' RSS, ``guests_ram``
#:   the sum of their resident guest RAM (each guest's RSS where its RAM blocks are unknown), and
#:   per guest ``rss.<guest>`` and ``guest_ram.<guest>`` (present from the guest's first host row);
#: - a budget (policies): ``budget`` bytes and ``budget_available`` = budget - guests_ram, NA
#:   without one (model.hostfs says why guest RAM and not RSS).
HOST_KSM: tuple[str, ...] = ("run", "pages_shared", "pages_sharing", "pages_unshared", "pages_volatile",
                             "full_scans", "general_profit")
HOST_FRAME: dict[str, SampleKind] = {
    "host": "category",
    **dict.fromkeys(HOST_MEMINFO.values(), "int"),
    **dict.fromkeys(HOST_VMSTAT, "int"),
    **{f"psi_{kind}_{avg}": "float" for kind in ("some", "full") for avg in ("avg10", "avg60", "avg300")},
    "psi_some_total_us": "int", "psi_full_total_us": "int",
    **{f"ksm_{name}": "int" for name in HOST_KSM},
    "guests": "int", "guests_rss": "int", "guests_ram": "int", "budget": "int", "budget_available": "int",
}
# -- end of the host as an entity --------------------------------------------------------------

#: Columns of the events frame.
EVENT_COLUMNS: dict[str, SampleKind] = {
    "guest": "category", "host": "category", "kind": "category", "value": "int", "duration_s": "float", "detail": "str",
}
#: The kinds of event a run records.
EVENT_KINDS: tuple[str, ...] = ("balloon_change", "target", "period", "workload", "reset", "launch",
                                "shutdown", "error", "policy", "policy_tick", "policy_error", "clock", "warning")


def stat_name(qemu_key: str) -> str:
    """``"stat-free-memory"`` -> ``"free_memory"`` (also for keys not in :data:`STATS`)."""
    return qemu_key.removeprefix("stat-").replace("-", "_")
