"""The Debian guest beside the built-in one: boot, agent, and the balloon's step response.

Both guests get 1 GiB, a 1 s stats period and the same QEMU under TCG, launched by balloonlab from
domain XML (the built-in: ``builtin_spec``; Debian: a fresh qcow2 overlay from
``balloonlab.image.debian_domain``). Per guest and round:

- ``first stats``: seconds from ``Guest.launch`` to the first balloon report (``wait_for_stats``);
- ``agent``: seconds to the workload agent answering (the built-in agent: when launch returns;
  Debian: qemu-guest-agent's ``guest-ping``, through ``guest-exec``-able ``QgaWorkload.connect``);
- the step response, from a ``Sampler`` with ``track_actual="poll"``: targets 1G -> 768M ->
  512M -> 1G, each held until the balloon reached it (``wait_for_actual``) and 2 s more, read by
  ``balloonlab.analysis.step_response``: time to target and MiB/s per step.

Rounds interleave the two guests (built-in first, then Debian first, ...) so load drift hits
both. The table gives medians over rounds and the Debian/built-in ratio of each.
Run from the project root after ``make test`` (which builds both images):
``nice -n 5 .venv/bin/python benchmarks/real_guests.py [--rounds 3]``.
Results: benchmarks/results/real_guests.json.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment, median, print_table, ratio, write_json

from balloonlab import Guest, Sampler, builtin_spec
from balloonlab.analysis import step_response
from balloonlab.image import debian_domain, find_debian_image

MiB = 1 << 20
STEPS = ("768M", "512M", "1G")


async def one(kind: str, folder: Path, round_no: int) -> dict[str, Any]:
    """Launch one guest, time it, step its balloon, shut it down."""
    if kind == "builtin":
        domain: Any = builtin_spec(f"rg-b{round_no}", memory="1G", period_s=1)
    else:
        image = find_debian_image()
        assert image is not None, "build the Debian image first: balloonlab guest build --distro debian"
        domain = debian_domain(image, folder, name=f"rg-d{round_no}", memory="1G", period_s=1)
    started = time.monotonic()
    guest = await Guest.launch(domain)
    try:
        launched = time.monotonic() - started
        await guest.balloon.wait_for_stats(180, poll_s=0.05)
        first_stats = time.monotonic() - started
        await guest.workload.connect(180)
        agent = launched if kind == "builtin" else time.monotonic() - started
        async with Sampler(track_actual="poll", host_interval_s=None) as sampler:
            await sampler.add(guest)
            await asyncio.sleep(2)
            for target in STEPS:
                await guest.balloon.set_target(target)
                await guest.balloon.wait_for_actual(timeout_s=60)
                await asyncio.sleep(2)
            steps = step_response(sampler.frame(), sampler.events())
        return {"kind": kind, "round": round_no, "first_stats_s": first_stats, "agent_s": agent,
                "steps": [{"target_mib": int(r.target) // MiB, "direction": r.direction, "reached": bool(r.reached),
                           "time_to_target_s": None if r.time_to_target_s is None else float(r.time_to_target_s),
                           "rate_mib_per_s": None if r.rate_mib_per_s is None else float(r.rate_mib_per_s)}
                          for r in steps.itertuples()]}
    finally:
        await guest.shutdown()


def _med(rows: list[dict[str, Any]], kind: str, key: str, target: int | None = None) -> float | None:
    values = []
    for row in rows:
        if row["kind"] != kind:
            continue
        if target is None:
            values.append(row[key])
        else:
            values += [s[key] for s in row["steps"] if s["target_mib"] == target and s[key] is not None]
    return median(values) if values else None


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="real-guests-"))
    rows: list[dict[str, Any]] = []
    try:
        for round_no in range(args.rounds):
            order = ("builtin", "debian") if round_no % 2 == 0 else ("debian", "builtin")
            for kind in order:
                rows.append(await one(kind, folder, round_no))
                print(f"round {round_no}: {kind} done", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    table = []
    for label, key, target in (("first stats (s)", "first_stats_s", None), ("agent answers (s)", "agent_s", None),
                               ("inflate 1G->768M: time (s)", "time_to_target_s", 768),
                               ("inflate 1G->768M: MiB/s", "rate_mib_per_s", 768),
                               ("inflate 768M->512M: time (s)", "time_to_target_s", 512),
                               ("deflate 512M->1G: time (s)", "time_to_target_s", 1024),
                               ("deflate 512M->1G: MiB/s", "rate_mib_per_s", 1024)):
        b, d = _med(rows, "builtin", key, target), _med(rows, "debian", key, target)
        table.append({"measure": label, "built-in": b, "debian": d, "debian/built-in": ratio(d, b)})
    print_table(table, ["measure", "built-in", "debian", "debian/built-in"],
                {"built-in": ".2f", "debian": ".2f", "debian/built-in": ".2f"})
    path = write_json("real_guests", {"environment": environment(), "rounds": rows, "summary": table})
    print(f"wrote {path}")


if __name__ == "__main__":
    asyncio.run(main())
