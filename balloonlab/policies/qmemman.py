"""Qubes OS qmemman: every guest gets memory in proportion to its preferred size.

Source: https://github.com/QubesOS/qubes-core-admin ``qubes/qmemman/algo.py`` (173b4156, 2025-07,
"Annotate types") and ``qubes/qmemman/systemstate.py`` (``do_balance``,
``is_balance_req_significant``, ``XEN_FREE_MEM_LEFT``); the guest side from
https://github.com/QubesOS/qubes-linux-utils ``qmemman/meminfo-writer.c`` and
``qmemman/qubes-meminfo-writer.service`` (``meminfo-writer 30000 100000``).

The algorithm (sizes in bytes):

- ``used = MemTotal - MemFree - Buffers - Cached + SwapTotal - SwapFree`` in the guest, MemTotal
  being the domain's current size; the guest reports it only when it moved by more than 30000 KiB
  (or the first time, or by more than half that when growing above ~77 % of MemTotal);
- ``pref_mem = max(min(used x CACHE_FACTOR, mem_max), MIN_PREFMEM)`` (CACHE_FACTOR 1.3,
  MIN_PREFMEM 200 MiB; dom0: ``min(used x 1.3 + DOM0_MEM_BOOST 350 MiB, mem_max)``);
  ``need = pref_mem - mem_actual``, ``mem_actual = max(current size, last target)``;
- ``balance(xen_free - XEN_FREE_MEM_LEFT (50 MiB))``: ``total_available = free - sum(need)``. When
  positive, each guest gets ``int(0.999 x (pref + pref / sum(pref) x total_available))``, capped at
  ``mem_max``, what the caps leave being shared again among the guests below theirs. Otherwise every
  donor (``need < 0`` or at ``mem_max``) whose surplus is >= 10 MiB is set to its ``pref_mem``, and
  if ``free - sum(surplus)`` (upstream subtracts the donors' surplus) is still >= 0 the acceptors
  share it by ``pref_mem``;
- the result is applied only if significant: the host is more than 15 MiB under
  XEN_FREE_MEM_LEFT, or a guest below its ``pref_mem`` gains more than 15 MiB, or
  ``sum(|target - last target|) + |xen_free - XEN_FREE_MEM_LEFT| > 150 MiB``;
- balancing happens when a guest reports (or the guest list changes), not on a clock.

Mapping and deviations from Qubes on Xen:

- MemTotal = ``actual``; MemFree = ``free_memory``; Buffers + Cached = ``disk_caches`` (the
  balloon's NR_FILE_PAGES, which also holds SwapCached); the guest's swap is not in the balloon
  stats, so ``used`` leaves out swap in use. A guest without these numbers is skipped; with no
  readable host row (:func:`~balloonlab.policies.psi.host_now`) nothing is decided.
- ``mem_max`` = :attr:`GuestLimits.max_bytes`; last target = :attr:`GuestLimits.target` (0 when
  none, as a fresh ``DomainState``). The ``no_progress``/``slow_memset_react`` bookkeeping and
  ``MEM_OVERHEAD_FACTOR`` (Xen page structures) are not reproduced.
- Xen's free memory is memory no domain may use. Here it is ``view.host_memory().available`` (the
  budget minus the guests' resident guest RAM under a budget) minus what the guests may still
  touch: ``sum(max(0, mem_actual - resident))`` over the guests, resident being the sample's
  ``host_guest_ram``, else its QEMU ``rss``, else 0 (a guest without a sample counts its whole
  target or ``<memory>``).
- ``dom0``: the guest treated as Qubes' dom0 (none by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from balloonlab.model.policy import Decision, PolicyView
from balloonlab.policies.psi import host_now

MiB = 2**20
CACHE_FACTOR = 1.3
MIN_PREFMEM = 200 * MiB
DOM0_MEM_BOOST = 350 * MiB
XEN_FREE_MEM_LEFT = 50 * MiB
MIN_TOTAL_MEMORY_TRANSFER = 150 * MiB
MIN_MEM_CHANGE_WHEN_UNDER_PREF = 15 * MiB
#: ``balance_when_low_on_mem``: a donor with less surplus than this is left alone.
MIN_DONOR_SURPLUS = 10 * MiB
#: meminfo-writer's threshold (KiB), from ``qubes-meminfo-writer.service``.
USED_CHANGE_THRESHOLD_KIB = 30000


def _num(value: object) -> int | None:
    return None if value is None or value is pd.NA or value != value else int(value)  # type: ignore[call-overload]


def _resident(row: pd.Series) -> int:
    """The guest's resident guest RAM, else its QEMU's RSS, else 0 (as a budget counts it)."""
    for column in ("host_guest_ram", "rss"):
        value = _num(row.get(column))
        if value is not None:
            return value
    return 0


@dataclass(frozen=True)
class _Dom:
    mem_used: int
    mem_actual: int
    mem_max: int
    last_target: int
    dom0: bool


class QmemmanPolicy:
    """qmemman's balance (module docstring), with Qubes' defaults.

    :param event_driven: balance only when a guest reports (meminfo-writer's threshold) or the
        guest list changes, as qmemman does; False balances at every decision.
    """

    name = "qmemman"

    def __init__(self, *, cache_factor: float = CACHE_FACTOR, min_prefmem: int = MIN_PREFMEM,
                 dom0_mem_boost: int = DOM0_MEM_BOOST, dom0: str | None = None,
                 free_mem_left: int = XEN_FREE_MEM_LEFT, min_total_transfer: int = MIN_TOTAL_MEMORY_TRANSFER,
                 min_change_under_pref: int = MIN_MEM_CHANGE_WHEN_UNDER_PREF,
                 used_change_threshold_kib: int = USED_CHANGE_THRESHOLD_KIB, event_driven: bool = True) -> None:
        self.cache_factor, self.min_prefmem = cache_factor, min_prefmem
        self.dom0_mem_boost, self.dom0 = dom0_mem_boost, dom0
        self.free_mem_left, self.min_total_transfer = free_mem_left, min_total_transfer
        self.min_change_under_pref = min_change_under_pref
        self.used_change_threshold_kib, self.event_driven = used_change_threshold_kib, event_driven
        self._reported_kib: dict[str, int] = {}   # what each guest's meminfo-writer last reported
        self._guests: frozenset[str] = frozenset()

    def pref_mem(self, dom: _Dom) -> int:
        """``algo.pref_mem``."""
        used = dom.mem_used * self.cache_factor
        if dom.dom0:
            return int(min(used + self.dom0_mem_boost, dom.mem_max))
        return int(max(min(used, dom.mem_max), self.min_prefmem))

    def _report(self, name: str, used: int, total: int) -> bool:
        """meminfo-writer's ``parse``: does the guest write its used memory now? (KiB, C division)"""
        used_kib, total_kib = used // 1024, total // 1024
        if used_kib < 0:
            return False
        prev, threshold = self._reported_kib.get(name, 0), self.used_change_threshold_kib
        diff = abs(used_kib - prev)
        if (diff > threshold or prev == 0
                or (used_kib > prev and used_kib // 10 > (total_kib + 12) // 13 and diff > threshold // 2)):
            self._reported_kib[name] = used_kib
            return True
        return False

    def __call__(self, view: PolicyView) -> Decision:
        """Targets for every guest with a report when a balance is due and significant."""
        memory = host_now(view)
        if memory is None:
            return Decision({}, {})
        doms: dict[str, _Dom] = {}
        reported, claimable = False, 0
        for name in view.names:
            lim, last = view.limits[name], view.guest_last(name)
            last_target = lim.target or 0
            actual = _num(last.get("actual")) if last is not None else None
            resident = _resident(last) if last is not None else 0
            claimable += max(0, (max(actual or 0, last_target) or lim.max_bytes) - resident)
            if last is None or actual is None:
                continue
            free, caches = _num(last.get("free_memory")), _num(last.get("disk_caches"))
            if free is not None and caches is not None:
                reported = self._report(name, actual - free - caches, actual) or reported
            if name in self._reported_kib:
                doms[name] = _Dom(self._reported_kib[name] * 1024, max(actual, last_target), lim.max_bytes,
                                  last_target, name == self.dom0)
        changed = frozenset(doms) != self._guests
        self._guests = frozenset(doms)
        xen_free = memory.available - claimable
        why: dict[str, dict[str, Any]] = {
            name: {"mem_used": d.mem_used, "pref_mem": self.pref_mem(d), "mem_actual": d.mem_actual,
                   "need": self.pref_mem(d) - d.mem_actual, "xen_free": xen_free} for name, d in doms.items()}
        if not doms or (self.event_driven and not reported and not changed):
            return Decision({}, why)
        requests, branch = self.balance(xen_free - self.free_mem_left, doms)
        significant = self._significant(requests, xen_free, doms)
        for name, target in requests.items():
            why[name].update(branch=branch, target=target, significant=significant)
        return Decision(requests if significant else {}, why)

    def balance(self, xen_free_mem: int, doms: dict[str, _Dom]) -> tuple[dict[str, int], str]:
        """``algo.balance``: (targets, ``"enough"`` or ``"low"``)."""
        pref = {name: self.pref_mem(d) for name, d in doms.items()}
        need = {name: pref[name] - d.mem_actual for name, d in doms.items()}
        donors = [n for n, d in doms.items() if need[n] < 0 or d.mem_actual >= d.mem_max]
        acceptors = [n for n in doms if n not in donors]
        total_available = xen_free_mem - sum(need.values())
        if total_available > 0:
            if sum(pref.values()) <= 0:  # only with min_prefmem 0 and idle guests: nothing to share by
                return {}, "enough"
            return self._enough(doms, pref, sum(pref.values()), total_available), "enough"
        targets: dict[str, int] = {}
        squeezed = xen_free_mem
        for name in donors:
            if -need[name] < MIN_DONOR_SURPLUS:
                continue
            squeezed -= -need[name]  # upstream subtracts the donors' surplus (algo.py, since 2010)
            targets[name] = pref[name]
        pref_acceptors = sum(pref[n] for n in acceptors)
        if squeezed < 0 or pref_acceptors <= 0:
            return targets, "low"
        for name in acceptors:
            share = doms[name].mem_actual + pref[name] / pref_acceptors * squeezed
            targets[name] = min(int(0.999 * share), doms[name].mem_max)
        return targets, "low"

    @staticmethod
    def _enough(doms: dict[str, _Dom], pref: dict[str, int], total_pref: int, total_available: int) -> dict[str, int]:
        """``balance_when_enough_mem``."""
        targets: dict[str, int] = {}
        mem_left, acceptors = 0, 0
        for name, d in doms.items():
            target = int(0.999 * (pref[name] + pref[name] / total_pref * total_available))
            if target > d.mem_max:
                mem_left += target - d.mem_max
                target = d.mem_max
            else:
                acceptors += 1
            targets[name] = target
        while mem_left > 0 and acceptors > 0:
            new_left, new_acceptors = 0, acceptors
            for name, target in targets.items():
                d = doms[name]
                if target < d.mem_max:
                    bonus = int(0.999 * (mem_left / acceptors))
                    if target + bonus >= d.mem_max:
                        new_left += target + bonus - d.mem_max
                        target, new_acceptors = d.mem_max, new_acceptors - 1
                    else:
                        target += bonus
                targets[name] = target
            mem_left, acceptors = new_left, new_acceptors
        return targets

    def _significant(self, requests: dict[str, int], xen_free: int, doms: dict[str, _Dom]) -> bool:
        """``SystemState.is_balance_req_significant``."""
        if self.free_mem_left - xen_free > self.min_change_under_pref:
            return True
        transfer = 0
        for name, target in requests.items():
            d = doms[name]
            change = target - d.last_target
            transfer += abs(change)
            if 0 < d.last_target < self.pref_mem(d) and change > self.min_change_under_pref:
                return True
        return transfer + abs(xen_free - self.free_mem_left) > self.min_total_transfer
