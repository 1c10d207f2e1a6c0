"""The reference policies (balloonlab.policies) on hand-made windows: exact numbers, no QEMU."""

from __future__ import annotations

import sys
import types
from dataclasses import replace
from typing import Any

import pandas as pd
import pytest

from balloonlab.model.policy import Decision, GuestLimits, PolicyView, enforce_limits
from balloonlab.policies import POLICIES, MomPolicy, PiPolicy, PsiPolicy, QmemmanPolicy, load_policy

MiB = 2**20
GiB = 2**30
T0 = pd.Timestamp("2025-01-01T00:00:00Z")
HOST_FLOATS = ("psi_some_avg10", "psi_full_avg10")


def _at(seconds: float) -> pd.Timestamp:
    return T0 + pd.Timedelta(seconds=seconds)


def host_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """Host rows one second apart (``t`` overrides the time, in seconds)."""
    times = [_at(row.get("t", i)) for i, row in enumerate(rows)]
    frame = pd.DataFrame([{k: v for k, v in row.items() if k != "t"} for row in rows],
                         index=pd.DatetimeIndex(times, name="time"))
    for column in frame.columns:
        frame[column] = frame[column].astype("Float64" if column in HOST_FLOATS else "Int64")
    frame.insert(0, "host", pd.Categorical(["h"] * len(frame)))
    return frame


def guest_frame(*rows: dict[str, Any]) -> pd.DataFrame:
    """Sample rows (each with ``guest`` and ``t`` in seconds), stats as nullable Int64."""
    times = [_at(row["t"]) for row in rows]
    frame = pd.DataFrame([{k: v for k, v in row.items() if k not in ("t", "guest")} for row in rows],
                         index=pd.DatetimeIndex(times, name="time"))
    for column in frame.columns:
        frame[column] = frame[column].astype("Int64")
    frame.insert(0, "guest", pd.Categorical([row["guest"] for row in rows]))
    return frame


def make_view(host: pd.DataFrame, guests: pd.DataFrame, limits: dict[str, GuestLimits], *, now: float = 0.0,
              budget: int | None = None) -> PolicyView:
    return PolicyView(_at(now), host, guests, limits, budget)


def limits_of(*specs: tuple[str, int, int | None], target: int | None = None) -> dict[str, GuestLimits]:
    return {name: GuestLimits.for_guest(name, size, guarantee, target=target) for name, size, guarantee in specs}


# -- MOM ---------------------------------------------------------------------------------------
def mom_host(free_mib: float, total_mib: int = 16384) -> pd.DataFrame:
    """A host whose MemFree + Buffers + Cached is ``free_mib`` (split 2:1:1)."""
    free = int(free_mib * MiB)
    return host_frame({"mem_total": total_mib * MiB, "mem_free": free - 2 * (free // 4), "buffers": free // 4,
                       "cached": free // 4, "mem_available": free})


def mom_guest(actual_mib: float, *free_mib: float, name: str = "a") -> pd.DataFrame:
    return guest_frame(*({"guest": name, "t": i, "actual": int(actual_mib * MiB), "free_memory": int(f * MiB)}
                         for i, f in enumerate(free_mib)))


def test_mom_shrinks_by_the_max_change_under_pressure() -> None:
    # host free 2048/16384 = 0.125 < 0.20; used = 4096 - avg(1024, 3072) = 2048 MiB; the floor
    # 2048 + 0.2 x (0.125 / 0.2) x 4096 = 2560 MiB is below 0.95 x 4096 MiB: the move is 5 %.
    view = make_view(mom_host(2048), mom_guest(4096, 1024, 3072), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(view)
    assert decision.targets == {"a": 4080218112}  # int(0.95 x 4 GiB / 1024) KiB
    why = decision.why["a"]
    assert why["branch"] == "shrink" and why["host_free_percent"] == 0.125
    assert why["guest_used_avg"] == 2048 * MiB and why["guest_free_percent"] == 0.125
    assert why["balloon_floor"] == 2560 * MiB


def test_mom_shrink_stops_at_the_guests_used_plus_free_share() -> None:
    # used 4096 - 600 = 3496 MiB; floor 3496 + 0.125 x 4096 = 4008 MiB > 0.95 x 4096 = 3891.2 MiB
    view = make_view(mom_host(2048), mom_guest(4096, 600), limits_of(("a", 4 * GiB, None)))
    assert MomPolicy()(view).targets == {"a": 4008 * MiB}
    # used 3600: the floor 4112 MiB is above balloon_cur: shrink sets nothing
    view = make_view(mom_host(2048), mom_guest(4096, 496), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(view)
    assert decision.targets == {} and decision.why["a"]["set"] is False


def test_mom_critical_pressure_lets_the_floor_go_under_used() -> None:
    # host 400/10000 = 0.04 <= 0.05: guest free share 0.04 - 0.05 = -0.01; used 3800 MiB, floor
    # 3800 - 40.96 MiB; at 0.06 the floor would be 3800 + 0.06 x 4096 = 4045.76 MiB
    view = make_view(mom_host(400, 10000), mom_guest(4096, 296), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(view)
    assert decision.why["a"]["branch"] == "shrink_critical"
    assert decision.why["a"]["guest_free_percent"] == pytest.approx(-0.01)
    assert decision.targets == {"a": 4080218112}
    view = make_view(mom_host(600, 10000), mom_guest(4096, 296), limits_of(("a", 4 * GiB, None)))
    assert MomPolicy()(view).targets == {"a": int(4045.76 * MiB / 1024) * 1024}


@pytest.mark.parametrize(("actual", "free", "expected"), [
    (3072, 2000, 3382286336),      # 1.05 x 3072 MiB = 3225.6 MiB, in whole KiB
    (3072, 100, 3760612352),       # used 2972 + 0.2 x 3072 = 3586.4 MiB, in whole KiB
    (4000, 10, 4096 * MiB),        # used 3990 + 800 MiB is above balloon_max: capped
])
def test_mom_grows_when_the_host_has_plenty(actual: int, free: int, expected: int) -> None:
    view = make_view(mom_host(8192), mom_guest(actual, free), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(view)
    assert decision.targets == {"a": expected} and decision.why["a"]["branch"] == "grow"


def test_mom_has_no_dead_band_and_skips_small_moves() -> None:
    # exactly at the threshold (0.20) the grow rule runs, not shrink
    at_max = make_view(mom_host(2000, 10000), mom_guest(4096, 100), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(at_max)
    assert decision.targets == {} and decision.why["a"]["branch"] == "grow"
    # 4090 -> 4096 MiB is 6 MiB, not more than 0.25 % of 4090 MiB (10.2 MiB)
    near = make_view(mom_host(8192), mom_guest(4090, 3000), limits_of(("a", 4 * GiB, None)))
    decision = MomPolicy()(near)
    assert decision.targets == {} and decision.why["a"]["set"] is False


def test_mom_never_targets_under_min_guarantee() -> None:
    # critical pressure, a nearly idle guest: the floor is balloon_min (4000 MiB)
    view = make_view(mom_host(400, 10000), mom_guest(4096, 3996), limits_of(("a", 4 * GiB, 4000 * MiB)))
    assert MomPolicy()(view).targets == {"a": 4000 * MiB}
    # under the guarantee already: shrink sets nothing, balloon-qos.rules raises it to balloon_min
    below = make_view(mom_host(2048), mom_guest(1024, 512), limits_of(("a", 4 * GiB, 2 * GiB)))
    decision = MomPolicy()(below)
    assert decision.targets == {"a": 2 * GiB} and decision.why["a"]["qos"] == 2 * GiB
    assert MomPolicy(qos=False)(below).targets == {}


def test_mom_averages_the_last_ten_complete_rows() -> None:
    # 12 rows: the first two (free 0) are outside the history; one NA row is not part of it
    frees = [0, 0] + [2048] * 5 + [None] + [1024] * 4 + [3072]
    rows = [{"guest": "a", "t": i, "actual": 4 * GiB, "free_memory": None if f is None else f * MiB}
            for i, f in enumerate(frees)]
    decision = MomPolicy()(make_view(mom_host(2048), guest_frame(*rows), limits_of(("a", 4 * GiB, None))))
    # the last 10 complete rows: 2048 x 5, 1024 x 4, 3072 -> mean 1740.8 MiB free
    assert decision.why["a"]["history_rows"] == 10
    assert decision.why["a"]["guest_used_avg"] == pytest.approx((4096 - 1740.8) * MiB)
    # the newest row incomplete: MOM's monitor is not ready, the guest is left out
    rows.append({"guest": "a", "t": 20, "actual": 4 * GiB, "free_memory": None})
    assert MomPolicy()(make_view(mom_host(2048), guest_frame(*rows), limits_of(("a", 4 * GiB, None)))) \
        == Decision({}, {})


def test_mom_averages_host_free_and_works_under_a_budget() -> None:
    host = host_frame(*({"mem_total": 16 * GiB, "mem_free": f * MiB, "buffers": 0, "cached": 0} for f in (1024, 3072)))
    view = make_view(host, mom_guest(4096, 2048), limits_of(("a", 4 * GiB, None)))
    assert MomPolicy()(view).why["a"]["host_free_percent"] == 0.125
    budget = host_frame({"guests_ram": 7 * GiB, "budget": 8 * GiB, "budget_available": 1 * GiB})
    view = make_view(budget, mom_guest(4096, 2048), limits_of(("a", 4 * GiB, None)), budget=8 * GiB)
    decision = MomPolicy()(view)
    assert decision.why["a"]["host_free_percent"] == 0.125 and decision.targets == {"a": 4080218112}


def test_mom_skips_what_it_cannot_read() -> None:
    limits = limits_of(("a", 4 * GiB, None), ("b", 4 * GiB, None))
    assert MomPolicy()(make_view(mom_host(2048), mom_guest(4096, 2048), limits)).targets.keys() == {"a"}
    assert MomPolicy()(make_view(host_frame({"mem_total": 16 * GiB, "mem_free": None, "buffers": 0, "cached": 0}),
                                 mom_guest(4096, 2048), limits)) == Decision({}, {})
    empty = make_view(host_frame(), guest_frame(), limits)
    assert MomPolicy()(empty) == Decision({}, {})


# -- qmemman -----------------------------------------------------------------------------------
def qubes_view(budget_mib: int, used_mib: dict[str, int], *, actual: dict[str, int] | None = None,
               now: float = 0) -> PolicyView:
    """Guests of 4096 MiB at their target (2048 MiB unless ``actual`` says, in bytes), all of it
    resident (``host_guest_ram``), 500 MiB of caches each."""
    sizes = {name: (actual or {}).get(name, 2048 * MiB) for name in used_mib}
    rows = [{"guest": name, "t": now, "actual": sizes[name], "host_guest_ram": sizes[name],
             "disk_caches": 500 * MiB, "free_memory": sizes[name] - (used + 500) * MiB}
            for name, used in used_mib.items()]
    host = host_frame({"t": now, "guests_ram": sum(sizes.values()), "budget": budget_mib * MiB})
    limits = {name: GuestLimits.for_guest(name, 4096 * MiB, target=sizes[name]) for name in used_mib}
    return make_view(host, guest_frame(*rows), limits, now=now, budget=budget_mib * MiB)


def test_qmemman_shares_in_proportion_to_prefmem() -> None:
    policy = QmemmanPolicy()
    decision = policy(qubes_view(4096, {"a": 1000, "b": 500}))
    # pref 1300 and 650 MiB; Xen free 0, balance(-50 MiB): available -50 + 748 + 1398 = 2096 MiB;
    # target = int(0.999 x (pref + pref / 1950 x 2096)) MiB
    assert decision.why["a"]["pref_mem"] == 1363148800 and decision.why["b"]["pref_mem"] == 681574400
    assert decision.targets == {"a": 2825530638, "b": 1412765319}
    assert decision.targets["a"] == pytest.approx(2 * decision.targets["b"], abs=2)
    assert decision.why["a"]["branch"] == "enough"


def test_qmemman_balances_only_when_a_guest_reports() -> None:
    policy = QmemmanPolicy()
    assert policy(qubes_view(4096, {"a": 1000, "b": 500})).targets
    assert policy(qubes_view(4096, {"a": 1000, "b": 500}, now=2)).targets == {}
    # +20 MiB = 20480 KiB: under meminfo-writer's 30000 KiB, not reported
    quiet = policy(qubes_view(4096, {"a": 1020, "b": 500}, now=4))
    assert quiet.targets == {} and quiet.why["a"]["mem_used"] == 1000 * MiB
    moved = policy(qubes_view(4096, {"a": 1040, "b": 500}, now=6))
    assert moved.why["a"]["mem_used"] == 1040 * MiB and set(moved.targets) == {"a", "b"}
    assert QmemmanPolicy(event_driven=False)(qubes_view(4096, {"a": 1000, "b": 500})).targets


def test_qmemman_low_on_memory_squeezes_donors_to_prefmem() -> None:
    # Xen free = 3000 - 4096 MiB; available = -1146 + 98 + 748 < 0: both donors go to pref_mem
    decision = QmemmanPolicy()(qubes_view(3000, {"a": 1500, "b": 1000}))
    assert decision.targets == {"a": 2044723200, "b": 1363148800}
    assert decision.why["a"]["branch"] == "low" and decision.why["a"]["xen_free"] == -1096 * MiB


def test_qmemman_small_guest_gets_min_prefmem_and_insignificant_moves_wait() -> None:
    decision = QmemmanPolicy()(qubes_view(4096, {"a": 1000, "b": 100}))
    assert decision.why["b"]["pref_mem"] == 200 * MiB
    # once the guests are at the balance's targets, the same balance moves nothing and Xen free
    # is 4096 MiB - their sum = 54 MiB, 4 MiB from XEN_FREE_MEM_LEFT: not significant
    policy = QmemmanPolicy(event_driven=False)
    first = policy(qubes_view(4096, {"a": 1000, "b": 500}))
    again = policy(qubes_view(4096, {"a": 1000, "b": 500}, actual=dict(first.targets), now=2))
    assert again.why["a"]["xen_free"] == 4 * GiB - 2825530638 - 1412765319
    assert again.targets == {} and again.why["a"]["significant"] is False
    assert again.why["a"]["target"] == first.targets["a"]


def test_qmemman_skips_guests_without_stats() -> None:
    view = qubes_view(4096, {"a": 1000, "b": 500})
    extra = guest_frame({"guest": "c", "t": 0, "actual": None, "free_memory": None})
    limits = {**view.limits, "c": GuestLimits.for_guest("c", 4 * GiB)}
    decision = QmemmanPolicy()(replace(view, guests=pd.concat([view.guests, extra]), limits=limits))
    assert "c" not in decision.targets and "c" not in decision.why and set(decision.targets) == {"a", "b"}


# -- PSI ---------------------------------------------------------------------------------------
def psi_view(now: float, available_gib: float, psi: float | None, guests: dict[str, tuple[int, int, int]]
             ) -> PolicyView:
    """Host of 20 GiB; guests name -> (target, actual, available_memory) in bytes, 4 GiB each."""
    host = host_frame({"t": now, "mem_total": 20 * GiB, "mem_available": int(available_gib * GiB),
                       "psi_some_avg10": psi})
    rows = [{"guest": n, "t": now, "actual": a, "available_memory": m} for n, (_, a, m) in guests.items()]
    limits = {n: GuestLimits.for_guest(n, 4 * GiB, target=t) for n, (t, _, _) in guests.items()}
    return make_view(host, guest_frame(*rows), limits, now=now)


def test_psi_enters_and_leaves_pressure_with_hysteresis_and_cooldown() -> None:
    policy = PsiPolicy(reserve_fraction=0.25, max_step_bytes=2 * GiB)
    full = {"a": (4 * GiB, 4 * GiB, 2 * GiB), "b": (4 * GiB, 4 * GiB, 3 * GiB // 2)}
    assert policy(psi_view(0, 4, 0.0, full)).targets == {} and policy.pressure is False
    # 11.25 % available (above 10 %) but PSI some avg10 0.5 >= 0.1: pressure. Reclaim 15 % x 20 GiB
    # - 2.25 GiB = 0.75 GiB by headroom (available - 1 GiB reserve): 1 GiB and 0.5 GiB
    decision = policy(psi_view(2, 2.25, 0.5, full))
    assert policy.pressure is True
    assert decision.targets == {"a": 3584 * MiB, "b": 3840 * MiB}
    assert decision.why["a"]["headroom"] == GiB and decision.why["b"]["headroom"] == GiB // 2
    moved = {"a": (3584 * MiB, 3584 * MiB, 3 * GiB // 2), "b": (3840 * MiB, 3840 * MiB, 5 * GiB // 4)}
    # 13.75 %, no PSI: still pressure (leaves at 15 %); 256 MiB more is due, but both moved 2 s ago
    held = policy(psi_view(4, 2.75, 0.0, moved))
    assert policy.pressure is True and held.targets == {} and held.why["a"]["held"] == "cooldown"
    # after the 5 s cooldown: 256 MiB split 2:1 by headroom (0.5 and 0.25 GiB), remainder to a
    later = policy(psi_view(8, 2.75, 0.0, moved))
    assert later.targets == {"a": 3584 * MiB - 178956971, "b": 3840 * MiB - 89478485}
    # 16 % available, no PSI: healthy, memory goes back (here in one 2 GiB step)
    back = {n: (t, t, 2 * GiB) for n, t in later.targets.items()}
    assert policy(psi_view(14, 3.2, 0.0, back)).targets == {"a": 4 * GiB, "b": 4 * GiB}
    assert policy.pressure is False


def test_psi_hysteresis_from_healthy_and_psi_na() -> None:
    full = {"a": (4 * GiB, 4 * GiB, 2 * GiB)}
    policy = PsiPolicy()
    policy(psi_view(0, 2.4, None, full))  # 12 %: between the watermarks, healthy stays healthy
    assert policy.pressure is False
    policy(psi_view(2, 1.8, None, full))  # 9 % < 10 %
    assert policy.pressure is True
    policy(psi_view(4, 2.4, None, full))  # 12 % < 15 %: pressure stays
    assert policy.pressure is True


def test_psi_gives_back_gradually_and_skips_small_moves() -> None:
    policy = PsiPolicy()  # hypeman's defaults: 256 MiB steps, 5 s cooldown, 64 MiB minimum
    assert policy(psi_view(0, 8, 0.0, {"a": (3 * GiB, 3 * GiB, GiB)})).targets == {"a": 3 * GiB + 256 * MiB}
    assert policy(psi_view(2, 8, 0.0, {"a": (3 * GiB + 256 * MiB,) * 2 + (GiB,)})).targets == {}
    assert policy(psi_view(5, 8, 0.0, {"a": (3 * GiB + 256 * MiB,) * 2 + (GiB,)})).targets == {"a": 3584 * MiB}
    # the last few MiB back to the full size are given too
    assert PsiPolicy()(psi_view(0, 8, 0.0, {"a": (4 * GiB - 8 * MiB,) * 2 + (GiB,)})).targets == {"a": 4 * GiB}
    # pressure asking 32 MiB: under the 64 MiB minimum
    small = PsiPolicy()(psi_view(0, 2.97, 1.0, {"a": (4 * GiB, 4 * GiB, 3 * GiB)}))
    assert small.targets == {} and small.why["a"]["held"] == "min_adjustment"


def test_psi_skips_guests_without_samples() -> None:
    view = psi_view(0, 1.0, 1.0, {"a": (4 * GiB, 4 * GiB, 3 * GiB)})
    limits = {**view.limits, "b": GuestLimits.for_guest("b", 4 * GiB)}
    decision = PsiPolicy()(replace(view, limits=limits))
    assert set(decision.why) == {"a"} and set(decision.targets) == {"a"}


# -- PI ----------------------------------------------------------------------------------------
def pi_run(policy: PiPolicy, steps: int, *, budget: int = 10 * GiB, start: int = 4 * GiB,
           setpoints: dict[int, float] | None = None) -> list[tuple[int, dict[str, int]]]:
    """A toy plant: two 4 GiB guests that keep 1 GiB in use and fill the rest (rss = target), the
    host budget's used = the sum of the targets; each decision goes through enforce_limits."""
    limits = {n: GuestLimits.for_guest(n, 4 * GiB, target=start) for n in ("a", "b")}
    trace = []
    for k in range(steps):
        if setpoints and k in setpoints:
            policy.setpoint_fraction = setpoints[k]
        targets = {n: lim.target or lim.max_bytes for n, lim in limits.items()}
        used = sum(targets.values())
        host = host_frame({"t": 2 * k, "guests_ram": used, "budget": budget})
        guests = guest_frame(*({"guest": n, "t": 2 * k, "actual": t, "available_memory": t - GiB}
                               for n, t in targets.items()))
        decision = policy(make_view(host, guests, limits, now=2 * k, budget=budget))
        assert isinstance(decision, Decision)
        enforced = enforce_limits(decision.targets, limits)
        limits = {n: replace(lim, target=enforced.targets[n]) for n, lim in limits.items()}
        trace.append((used, dict(enforced.targets)))
    return trace


def test_pi_converges_on_the_setpoint() -> None:
    # setpoint 6 GiB of a 10 GiB budget; the guests start at 8 GiB used: 2 GiB to reclaim
    trace = pi_run(PiPolicy(setpoint_fraction=0.6), 12)
    used = [u for u, _ in trace]
    # the first step: R = 0.1 x 2 GiB + 0.25/s x 2 GiB x 2 s = 1.2 GiB, half from each guest
    assert used[0] == 8 * GiB and trace[0][1] == {"a": 4 * GiB - 644245094, "b": 4 * GiB - 644245094}
    assert all(u >= 6 * GiB - 64 * MiB for u in used)  # no undershoot past the deadband
    assert abs(used[8] - 6 * GiB) <= 32 * MiB
    assert all(abs(t - 3 * GiB) <= 16 * MiB for t in trace[-1][1].values())


def test_pi_does_not_wind_up_when_saturated() -> None:
    # setpoint 2 GiB cannot be reached: each guest gives at most 4 - 1 - 0.4 = 2.6 GiB
    policy = PiPolicy(setpoint_fraction=0.2)
    trace = pi_run(policy, 30, setpoints={20: 0.9})
    cap = 2 * (4 * GiB - GiB - int(0.1 * 4 * GiB))
    assert [used for used, _ in trace[3:20]] == [8 * GiB - cap] * 17
    # the setpoint goes to 9 GiB (above 8 GiB): the very next decision gives back as much as the
    # limits allow (1 GiB a guest), and the guests are full after three: no stored error to unwind
    assert trace[20][1] == {"a": trace[19][1]["a"] + GiB, "b": trace[19][1]["b"] + GiB}
    assert trace[22][1] == {"a": 4 * GiB, "b": 4 * GiB}
    assert policy.integral == 0.0


def test_pi_skips_guests_without_samples() -> None:
    host = host_frame({"guests_ram": 8 * GiB, "budget": 10 * GiB})
    guests = guest_frame({"guest": "a", "t": 0, "actual": 4 * GiB, "available_memory": None, "free_memory": None})
    limits = limits_of(("a", 4 * GiB, None), ("b", 4 * GiB, None))
    assert PiPolicy(setpoint_fraction=0.5)(make_view(host, guests, limits, budget=10 * GiB)).targets == {}


# -- every policy ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_survive_missing_values_and_replay_the_same(name: str) -> None:
    host = host_frame({"mem_total": 16 * GiB, "mem_free": GiB, "buffers": 0, "cached": 0, "mem_available": GiB,
                       "psi_some_avg10": None})
    guests = guest_frame({"guest": "a", "t": 0, "actual": 4 * GiB, "free_memory": None, "available_memory": None,
                          "disk_caches": None},
                         {"guest": "b", "t": 0, "actual": 4 * GiB, "free_memory": GiB, "available_memory": 2 * GiB,
                          "disk_caches": 256 * MiB, "rss": 4 * GiB})
    limits = limits_of(("a", 4 * GiB, None), ("b", 4 * GiB, None), ("c", 4 * GiB, None))
    view = make_view(host, guests, limits)
    first, second = POLICIES[name](), POLICIES[name]()
    assert first(view) == second(view)
    na_host = host_frame({"mem_total": 16 * GiB, "mem_free": None, "buffers": None, "cached": None,
                          "mem_available": None})
    na_budget = host_frame({"guests_ram": None, "budget": 8 * GiB})
    for empty in (make_view(host_frame(), guest_frame(), limits), make_view(host, guest_frame(), limits),
                  make_view(na_host, guests, limits), make_view(na_budget, guests, limits, budget=8 * GiB)):
        result = POLICIES[name]()(empty)
        assert isinstance(result, Decision) and result.targets == {}


# -- load_policy -------------------------------------------------------------------------------
def test_load_policy_builtins_and_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(load_policy("mom"), MomPolicy) and isinstance(load_policy("pi"), PiPolicy)
    assert isinstance(load_policy("psi"), PsiPolicy) and isinstance(load_policy("qmemman"), QmemmanPolicy)
    module = types.ModuleType("my_policies")

    def keep(view: PolicyView) -> dict[str, int]:
        return {}

    class Needs:
        def __init__(self, x: int) -> None:
            self.x = x

    module.keep, module.Mom, module.Needs, module.number = keep, MomPolicy, Needs, 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "my_policies", module)
    assert load_policy("my_policies:keep") is keep
    assert isinstance(load_policy("my_policies:Mom"), MomPolicy)
    for spec, words in [("nope", "mom, pi, psi, qmemman"), ("no_such_module_xyz:f", "cannot import"),
                        ("my_policies:missing", "no attribute 'missing'"), ("my_policies:Needs", "no arguments"),
                        ("my_policies:number", "not a callable"), (":keep", "both the module"), ("", "built-in")]:
        with pytest.raises(ValueError, match=words):
            load_policy(spec)
