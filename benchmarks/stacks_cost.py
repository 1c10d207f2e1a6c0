"""Sampler cost per sample and time to first report on each stack, side by side.

Each stack of :func:`balloonlab.image.stacks.find_stacks` runs with its own guest kernel
(``stack.kernel_release``: QEMU 7.2 with Linux 6.1, QEMU 10.0 with Linux 6.12 on Debian 12):
the 6.12 guest on QEMU 10 sends 16 stats, the 6.1 guest on QEMU 7.2 ten.

**Cost.** Three identical built-in guests per stack (``builtin_spec(..., period_s=1,
kernel_release=..., qemu_binary=stack.qemu)``, ``--memory`` 512M, TCG, the workload agent
idle), all of them up for the whole run. Per stack, three phases of ``--window`` / 3 s each
(the stacks take turns, phase by phase). In a phase the stack's three guests play three roles
at the same time, rotating so that each guest plays each role once:

* ``off``      stats period 0 (QEMU asks the guest for nothing), no reader: the baseline;
* ``report``   period 1 s, no reader: what the guest's reports alone cost QEMU;
* ``sampler``  period 1 s and one ``Sampler()`` (the default, ``track_actual="events"``),
               from before ``add()`` to after ``stop()`` (its start-up commands count).

The other stack's guests sit at period 0 meanwhile. The baseline runs in the same seconds as
the sampler, on an identical guest of the same QEMU: a QEMU's idle CPU drifts by more than
a sample costs on this shared machine (QEMU 10's main loop wakes about 500 times a second in
an idle TCG guest, 1-1.7 % of a core, moving with the machine's load), so a baseline taken
in other minutes does not subtract; the rotation cancels what differs between the three
guests. Periods are set ``--settle`` s (2) before a phase's clock starts.

CPU is read from the kernel's per-process CPU clocks (user + system, all threads, ns
resolution; the same quantity as utime + stime in ``/proc/PID/stat``) of this process
(``client``) and of each QEMU, and per QEMU thread from ``/proc/PID/task/*/schedstat``. Per
stack, summed over its three phases:

* ``client us/sample`` = (client CPU in the phases - the client's idle rate x their wall
  time) / samples; the idle rate is measured for ``--idle`` s (10) before each phase with
  every guest at period 0 and no sampler;
* ``QEMU us/sample`` = (CPU of the sampled guest's QEMU - CPU of the ``off`` guest's QEMU) /
  samples: everything a sampled report costs QEMU, the guest's side (under TCG the guest
  kernel runs in QEMU's vCPU thread, ``CPU 0/TCG``) and QEMU's (its main loop: the stats
  timer, the virtqueue, QMP dispatch; the monitor's I/O thread) alike, split by thread;
  ``reports alone`` = (the ``report`` guest's QEMU CPU - the ``off`` guest's) / samples;
* ``QMP commands per sample`` (``Monitor.round_trips``), samples, ``missed`` (gaps in the
  recorded last-update above 1.5 periods: benchmarks/_common.missed_reports);
* ``spread over phases``: the lowest and highest QEMU us/sample of the three phases;
* ``QEMU idle``: the ``off`` guests' CPU rate.

**Time to first report.** Before the cost guests, ``--boots`` (3) boots per stack, stacks
alternating: the same guest without the workload agent (``Guest.launch`` then returns right
after ``cont``), ``qom-get guest-stats`` every 20 ms until last-update is set, then shut
down (benchmarks/version_matrix.py's ``launch_timed``: from QEMU's process start, and from
QEMU's RESUME event, to the first read that saw the report; medians).

The last column is each stack's value over the first (oldest) stack's in this run. Run from
the project root, under nice on a shared machine:
``nice -n 5 .venv/bin/python benchmarks/stacks_cost.py [--window 120]``; about
window + 1 min per stack, plus 40 s of boots. Results: benchmarks/results/stacks_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    environment,
    markdown_table,
    median,
    process_cpu_seconds,
    ratio,
    thread_cpu_seconds,
    write_json,
)
from sampler_cost import run_sampler
from version_matrix import launch_timed, without_agent

from balloonlab import Guest, builtin_spec
from balloonlab.image.stacks import Stack, find_stacks

ROLES = ("off", "report", "sampler")


async def time_first_reports(stacks: list[Stack], boots: int, memory: str) -> dict[str, list[dict[str, Any]]]:
    """``boots`` agent-less launches per stack (stacks alternating), each timed to its first report."""
    out: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
    for i in range(boots):
        for stack in stacks:
            spec = without_agent(builtin_spec(f"ttfr{os.getpid()}-{stack.name}-{i}", memory=memory, period_s=1,
                                              kernel_release=stack.kernel_release, qemu_binary=str(stack.qemu)))
            guest, timing = await launch_timed(spec)
            await guest.shutdown()
            out[stack.name].append(timing)
            print(f"QEMU {stack.qemu_version} boot {i + 1}/{boots}: first report "
                  f"{timing['start_to_report_s']:.2f} s after start", flush=True)
    return out


def _vcpu(threads: dict[str, float]) -> float:
    return sum(v for k, v in threads.items() if k.startswith("CPU "))


async def run_phase(guests: list[Guest], phase: int, seconds: float, settle_s: float,
                    idle_s: float) -> dict[str, Any]:
    """One phase of one stack: guest ``(i + phase) % 3`` plays ``ROLES[i]``; all are left at period 0."""
    client0, wall0 = process_cpu_seconds(), time.monotonic()
    await asyncio.sleep(idle_s)  # every guest at period 0, no sampler
    idle_client = (process_cpu_seconds() - client0) / (time.monotonic() - wall0)
    cast = {role: guests[(i + phase) % len(guests)] for i, role in enumerate(ROLES)}
    for role, guest in cast.items():
        await guest.balloon.set_period(0 if role == "off" else 1)
    await asyncio.sleep(settle_s)
    sampled = cast["sampler"]

    pids = {role: g.pid for role, g in cast.items() if g.pid is not None}

    def snap() -> dict[str, Any]:
        return {"wall": time.monotonic(), "client": process_cpu_seconds(), "rt": sampled.monitor.round_trips,
                **{role: {"cpu": process_cpu_seconds(pid), "threads": thread_cpu_seconds(pid)}
                   for role, pid in pids.items()}}
    before = snap()
    tally = await run_sampler([sampled], seconds, "events")
    after = snap()
    counts = tally()
    for guest in cast.values():
        await guest.balloon.set_period(0)
    out: dict[str, Any] = {"phase": phase, "wall_s": after["wall"] - before["wall"],
                           "client_cpu_s": after["client"] - before["client"], "idle_client_rate": idle_client,
                           "commands": after["rt"] - before["rt"],
                           "guests": {role: g.name for role, g in cast.items()}, **counts}
    for role in ROLES:
        a, b = after[role], before[role]
        threads = {k: v - b["threads"].get(k, 0.0) for k, v in a["threads"].items()}
        out[role] = {"qemu_cpu_s": a["cpu"] - b["cpu"], "vcpu_s": _vcpu(threads),
                     "other_threads_s": sum(threads.values()) - _vcpu(threads), "threads_s": threads}
    return out


def summarize(stack: Stack, phases: list[dict[str, Any]], ttfr: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-sample costs of one stack (its phases summed), and its first-report times."""
    def total(key: str, role: str | None = None) -> float:
        return float(sum((p[role][key] if role else p[key]) for p in phases))
    wall, samples = total("wall_s"), int(total("samples"))
    n = samples or None
    client = total("client_cpu_s") - sum(p["idle_client_rate"] * p["wall_s"] for p in phases)
    qemu = total("qemu_cpu_s", "sampler") - total("qemu_cpu_s", "off")
    vcpu = total("vcpu_s", "sampler") - total("vcpu_s", "off")
    other = total("other_threads_s", "sampler") - total("other_threads_s", "off")
    reports = total("qemu_cpu_s", "report") - total("qemu_cpu_s", "off")
    per_phase = [(p["sampler"]["qemu_cpu_s"] - p["off"]["qemu_cpu_s"]) * 1e6 / p["samples"]
                 for p in phases if p["samples"]]
    starts = [t["start_to_report_s"] for t in ttfr]
    conts = [t["cont_to_report_s"] for t in ttfr if t["cont_to_report_s"] is not None]
    return {"stack": stack.name, "qemu_version": stack.qemu_version, "kernel_release": stack.kernel_release,
            "samples": samples, "missed": int(total("missed")), "wall_s": wall,
            "cmds/sample": ratio(total("commands"), n),
            "client_us/sample": ratio(client * 1e6, n),
            "qemu_us/sample": ratio(qemu * 1e6, n),
            "qemu_vcpu_us/sample": ratio(vcpu * 1e6, n),
            "qemu_other_us/sample": ratio(other * 1e6, n),
            "qemu_reports_alone_us/sample": ratio(reports * 1e6, n),
            "total_us/sample": ratio((client + qemu) * 1e6, n),
            "qemu_us/sample_per_phase": per_phase,
            "spread": f"{min(per_phase):.0f} .. {max(per_phase):.0f}" if per_phase else None,
            "qemu_off_%core": 100 * total("qemu_cpu_s", "off") / wall,
            "client_idle_%core": 100 * sum(p["idle_client_rate"] for p in phases) / len(phases),
            "start_to_report_s": median(starts) if starts else None,
            "cont_to_report_s": median(conts) if conts else None,
            "ttfr_boots": len(ttfr), "errors": [e for p in phases for e in p["errors"]]}


#: (label, summary key, format) of the table's rows; None: no ratio for that row.
MEASURES: tuple[tuple[str, str, str | None], ...] = (
    ("samples recorded", "samples", None),
    ("missed reports", "missed", None),
    ("QMP commands per sample", "cmds/sample", ".3f"),
    ("client CPU per sample, us", "client_us/sample", ".0f"),
    ("QEMU CPU per sample, us (vs a guest at polling off)", "qemu_us/sample", ".0f"),
    ("- in the vCPU thread (the guest's side), us", "qemu_vcpu_us/sample", ".0f"),
    ("- in QEMU's other threads (main loop, monitor), us", "qemu_other_us/sample", ".0f"),
    ("- reports alone (period 1 s, nobody reading), us", "qemu_reports_alone_us/sample", ".0f"),
    ("QEMU us/sample, lowest .. highest phase", "spread", None),
    ("client + QEMU per sample, us", "total_us/sample", ".0f"),
    ("QEMU idle with polling off, % of a core", "qemu_off_%core", ".2f"),
    ("first report after QEMU start, s (median)", "start_to_report_s", ".2f"),
    ("first report after cont, s (median)", "cont_to_report_s", ".2f"),
)


def table(summaries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Measures as rows, stacks as columns, then each later stack over the first."""
    base = summaries[0]
    heads = [f"QEMU {s['qemu_version']}, Linux {s['kernel_release']}" for s in summaries]
    ratio_heads = [f"{s['qemu_version'].rsplit('.', 1)[0]} / {base['qemu_version'].rsplit('.', 1)[0]}"
                   for s in summaries[1:]]
    rows = []
    for label, key, fmt in MEASURES:
        row: dict[str, Any] = {"measure": label}
        for head, s in zip(heads, summaries, strict=True):
            row[head] = None if s[key] is None else format(s[key], fmt or "")
        for head, s in zip(ratio_heads, summaries[1:], strict=True):
            r = ratio(s[key], base[key]) if fmt is not None else None
            row[head] = None if r is None else f"{r:.2f}"
        rows.append(row)
    return rows, ["measure", *heads, *ratio_heads]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stacks = [s for s in find_stacks() if s.kernel_release is not None]
    if not stacks:
        raise SystemExit("no stack with a guest kernel found: run `make stacks` (balloonlab stacks install)")
    workdir = Path(tempfile.mkdtemp(prefix="blb-stacks-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir / "runtime")
    (workdir / "runtime").mkdir(mode=0o700)
    guests: dict[str, list[Guest]] = {s.name: [] for s in stacks}
    try:
        ttfr = await time_first_reports(stacks, args.boots, args.memory)
        for stack in stacks:
            for i in range(len(ROLES)):
                guests[stack.name].append(await Guest.launch(builtin_spec(
                    f"cost{os.getpid()}-{stack.name}-{i}", memory=args.memory, period_s=1,
                    kernel_release=stack.kernel_release, qemu_binary=str(stack.qemu))))
        for guest in (g for gs in guests.values() for g in gs):
            await guest.balloon.wait_for_stats(30)
            (await run_sampler([guest], 1.5, "events"))()  # warm-up, untimed: lazy imports, first frame
            await guest.balloon.set_period(0)
        await asyncio.sleep(args.settle)
        phases: dict[str, list[dict[str, Any]]] = {s.name: [] for s in stacks}
        seconds = args.window / len(ROLES)
        for phase in range(len(ROLES)):
            for stack in stacks if phase % 2 == 0 else stacks[::-1]:
                p = await run_phase(guests[stack.name], phase, seconds, args.settle, args.idle)
                phases[stack.name].append(p)
                print(f"phase {phase + 1}/{len(ROLES)} QEMU {stack.qemu_version}: {p['samples']} samples; QEMU % of "
                      "a core " + ", ".join(f"{role} {100 * p[role]['qemu_cpu_s'] / p['wall_s']:.2f}"
                                            for role in ROLES), flush=True)
        info = {s.name: [{"name": g.name, "pid": g.pid, "argv": g.record.argv if g.record else None}
                         for g in guests[s.name]] for s in stacks}
        return {"stacks": [s.as_json() for s in stacks], "guests": info, "first_reports": ttfr, "phases": phases,
                "summary": [summarize(s, phases[s.name], ttfr[s.name]) for s in stacks]}
    finally:
        every = [g for gs in guests.values() for g in gs]
        await asyncio.gather(*(g.shutdown() for g in every), return_exceptions=True)
        for g in every:  # belt and braces: our own QEMUs only, by their Popen
            if g._process is not None and g._process.poll() is None:
                g._process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=120.0,
                        help="the sampler's window per stack, s, in three phases (default 120)")
    parser.add_argument("--boots", type=int, default=3, help="boots per stack timed to the first report (3)")
    parser.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after a period change (2)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of client idle before each phase (10)")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/stacks_cost.json")
    args = parser.parse_args()
    if args.window <= 0 or args.boots < 1 or args.settle < 0 or args.idle <= 0:
        parser.error("--window, --boots and --idle must be positive, --settle not negative")
    env = environment()
    began = time.monotonic()
    out = asyncio.run(run(args))
    wall = time.monotonic() - began
    rows, columns = table(out["summary"])
    print()
    print(markdown_table(rows, columns, align={c: "right" for c in columns[1:]}))
    errors = [e for s in out["summary"] for e in s["errors"]]
    print(f"\nsampler window {args.window:g} s per stack in {len(ROLES)} phases, 1 s period, baseline: an identical "
          f"guest at polling off in the same seconds; {args.boots} boots per stack for the first report; "
          f"{env['cpu_model']}, nproc {env['nproc']}, TCG; {wall:.0f} s in all"
          + (f"; sampler errors: {errors}" if errors else ""))
    path = write_json("stacks_cost", {"benchmark": "stacks_cost", "environment": env, "args": vars(args),
                                      "wall_s": wall, "table": rows, **out}, args.json)
    print(f"raw data: {path}")


if __name__ == "__main__":
    main()
