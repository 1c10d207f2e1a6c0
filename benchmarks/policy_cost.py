"""What the policy side costs: a host row, one decision of each reference policy, and a replay.

No guest is started: the decisions and the replay run on a recorded overcommit run (pass one with
``--run RUN``, e.g. from ``balloonlab policy run``; without it a synthetic four-guest run of
``--seconds`` (300) at 1 s is made with the same columns). Operations, timed call by call
(``time.perf_counter_ns``, wall; this thread's CPU alike), ``--calls`` (200) each in ``--rounds``
(5) rotating chunks:

* ``/proc/meminfo read``      the baseline: one read of the file a host row reads first;
* ``HostReader.read()``       a whole host row: meminfo, vmstat, memory PSI, seven KSM files;
* ``view (30 s window)``      the window a live decision builds: the host and samples rows of
                              the last 30 s, cut from the run's frames;
* ``<policy> decision``       one call of mom, qmemman, psi, pi on that view, after the limits;
* ``replay <policy>``         (once per policy) the whole closed-loop replay of the run, reported
                              as simulated seconds per wall second.

``x_baseline`` is an operation's median over the meminfo read's median. Run from the project
root: ``.venv/bin/python benchmarks/policy_cost.py [--run RUN] [--json PATH]``; 10-30 s.
Results: benchmarks/results/policy_cost.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median, print_table, quantile, ratio, write_json  # noqa: E402

from balloonlab.model.hostfs import HostReader  # noqa: E402
from balloonlab.model.policy import GuestLimits, PolicyView, enforce_limits, split_decision  # noqa: E402
from balloonlab.policies import load_policy  # noqa: E402
from balloonlab.record.store import Run, load_run  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
POLICIES = ("mom", "qmemman", "psi", "pi")


def synthetic_run(seconds: int, guests: int = 4) -> Run:
    """Four 512 MiB guests, workloads rising out of phase, a 1 GiB budget: the overcommit run's shape."""
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    rows, host_rows = [], []
    for s in range(seconds):
        ram_total = 0
        for g in range(guests):
            high = (s // 15) % guests == g
            used = (288 if high else 32) * MiB + 100 * MiB
            rows.append({"time": t0 + pd.Timedelta(seconds=s + 0.1 * g), "guest": f"oc{g}", "actual": 512 * MiB,
                         "total_memory": 500 * MiB, "free_memory": 500 * MiB - used - 20 * MiB,
                         "available_memory": 500 * MiB - used, "disk_caches": 20 * MiB, "swap_in": 0,
                         "swap_out": 0, "host_rss": used + 150 * MiB, "host_guest_ram": used + 40 * MiB})
            ram_total += used + 40 * MiB
        host_rows.append({"time": t0 + pd.Timedelta(seconds=s + 0.5), "host": "h", "mem_total": 24 * GiB,
                          "mem_free": 20 * GiB, "mem_available": 22 * GiB, "buffers": 0, "cached": GiB,
                          "guests_ram": ram_total, "guests_rss": ram_total + 440 * MiB, "budget": GiB,
                          "budget_available": GiB - ram_total, "psi_some_avg10": 0.0})
    samples = pd.DataFrame(rows).set_index("time")
    samples["guest"] = samples["guest"].astype("category")
    host = pd.DataFrame(host_rows).set_index("time")
    limits = {f"oc{g}": {"max_bytes": 512 * MiB, "min_guarantee": None, "floor_bytes": 128 * MiB,
                         "initial_target": 512 * MiB} for g in range(guests)}
    meta = {"policy": {"name": "none", "interval_s": 2.0, "window_s": 30.0, "budget": GiB,
                       "max_step_fraction": 0.25, "limits": limits}}
    events = pd.DataFrame({"guest": pd.Categorical([]), "kind": pd.Categorical([]),
                           "value": pd.array([], dtype="Int64"), "duration_s": pd.array([], dtype="Float64"),
                           "detail": pd.array([], dtype="string")},
                          index=pd.DatetimeIndex([], tz="UTC", name="time"))
    return Run(Path("synthetic"), samples, events, meta, [], host)


def timed(fn: Callable[[], Any], calls: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(calls):
        w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        fn()
        cpus.append((time.thread_time_ns() - c0) / 1e3)
        walls.append((time.perf_counter_ns() - w0) / 1e3)
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a recorded policy run folder (default: a synthetic one)")
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    run = load_run(args.run) if args.run else synthetic_run(args.seconds)
    meta = run.metadata["policy"]
    limits = {name: GuestLimits(name, lim["max_bytes"], lim["min_guarantee"], lim["floor_bytes"],
                                lim["initial_target"]) for name, lim in meta["limits"].items()}
    now = run.samples.index[len(run.samples) // 2]
    window = pd.Timedelta(seconds=meta["window_s"])

    def view() -> PolicyView:
        samples = run.samples[(run.samples.index > now - window) & (run.samples.index <= now)]
        host = run.host[(run.host.index > now - window) & (run.host.index <= now)]
        return PolicyView(now, host, samples, limits, meta["budget"])

    the_view = view()
    reader = HostReader()
    ops: dict[str, Callable[[], Any]] = {
        "/proc/meminfo read": lambda: Path("/proc/meminfo").read_text(),
        "HostReader.read()": reader.read,
        "view (30 s window)": view,
    }
    for name in POLICIES:
        policy = load_policy(name)
        ops[f"{name} decision"] = lambda p=policy: enforce_limits(split_decision(p(the_view))[0], limits)
    samples: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in ops}
    per_round = max(1, args.calls // args.rounds)
    names = list(ops)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            walls, cpus = timed(ops[name], per_round)
            samples[name][0].extend(walls)
            samples[name][1].extend(cpus)
    base = median(samples["/proc/meminfo read"][0])
    rows = [{"operation": name, "median_us": median(w), "p90_us": quantile(w, 0.9), "cpu_us": median(c),
             "x_baseline": ratio(median(w), base)} for name, (w, c) in samples.items()]
    from balloonlab.experiments.replay import replay
    span = (run.samples.index.max() - run.samples.index.min()).total_seconds()
    for name in POLICIES:
        t0 = time.perf_counter()
        replay(run, [name])
        wall = time.perf_counter() - t0
        rows.append({"operation": f"replay {name}", "median_us": wall * 1e6, "p90_us": None, "cpu_us": None,
                     "x_baseline": None, "sim_s_per_s": span / wall})
    print(f"run: {args.run or f'synthetic, {args.seconds} s, 4 guests'}; {args.calls} calls per operation\n")
    print_table(rows, ["operation", "median_us", "p90_us", "cpu_us", "x_baseline", "sim_s_per_s"],
                {"median_us": ".1f", "p90_us": ".1f", "cpu_us": ".1f", "x_baseline": ".1f", "sim_s_per_s": ".0f"})
    path = write_json("policy_cost", {"environment": environment(), "run": args.run, "rows": rows}, args.json)
    print(f"\njson: {path}")


if __name__ == "__main__":
    main()
