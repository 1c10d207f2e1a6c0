"""The version matrix, measured: every QEMU stack x every built guest kernel, booted for real.

For each stack of :func:`balloonlab.image.stacks.find_stacks` (the system's QEMU and every
unpacked one) and each guest kernel built here (the stack's ``kernels``), ``--boots`` guests
(default 3; ``--quick``: 1) are launched one after another with ``Guest.launch`` from
``builtin_spec(name, kernel_release=..., qemu_binary=stack.qemu, period_s=1,
free_page_reporting=True)`` (512 MiB, TCG), each shut down before the next; plus, per
combination, one bare QEMU for virtio-mem. Nothing in the table is typed in by hand: every
cell comes from what QEMU and the guest answered in this run. Per boot:

* **time to first report**: the guest is launched without balloonlab's workload agent (the
  same spec with ``agent=False``, so ``Guest.launch`` returns right after ``cont`` instead of
  waiting for init's READY line, which comes after the driver's first report); then
  ``qom-get guest-stats`` is polled every ``--poll-ms`` (20) ms until last-update is not 0.
  "first report" is when the first read that saw it returned (as benchmarks/launch.py counts
  it), so it is late by up to one poll interval plus a QMP round trip. ``start->report`` counts
  from the QEMU process's start (``/proc/PID/stat`` starttime, 10 ms ticks; for an unpacked
  stack this includes its shell wrapper's ``exec``), ``cont->report`` from QEMU's own timestamp
  on the RESUME event that ``cont`` causes. The driver sends its first report when it probes
  (Linux primes the stats queue with one buffer), so this is the guest's boot up to
  ``virtio_balloon``'s probe, whatever the period.
* **stats set**: the raw ``qom-get guest-stats`` reply once the guest has reported twice more
  after the first report: how many of the 16 stats Linux defines (``VIRTIO_BALLOON_S_*``,
  balloonlab.model.schema.STATS) hold a value; each missing one is *unset* (QEMU sent the key
  with 2^64-1) or *not sent* (QEMU's reply has no such key).
* **events while reporting**: every QMP event QEMU sends over ``--event-periods`` (5) stats
  periods while the guest reports (the reports counted by polling last-update every 0.25 s,
  summed over the boots).
* **QEMU**, **guest kernel**: ``query-version`` and the release in the kernel image's header.
* **balloon events in the QAPI schema**: event names in ``query-qmp-schema`` that contain
  ``BALLOON``; "(seen)" marks the ones this run received: ``balloon`` to 64 MiB below the
  guest's memory, then up to 10 s for a BALLOON_CHANGE.
* **after system_reset**: the raw guest-stats right after QEMU's RESET event for a QMP
  ``system_reset``, against the report read just before it: "unset (last-update 0)" when
  last-update is 0 and every value unset, "stale (last report kept)" when last-update and
  values are as before; ``reset->report`` is from the RESET event's QEMU timestamp to the
  first read that shows a report other than the pre-reset one (the rebooted driver's first).
* **free-page-reporting**: "offered" when ``device-list-properties virtio-balloon-pci`` has
  the ``free-page-reporting`` property and ``x-query-virtio-status`` of the balloon's virtio
  backend (found with ``x-query-virtio``) lists ``VIRTIO_BALLOON_F_REPORTING`` among its
  host features; "accepted by the guest" when it is among the *guest* features (the driver
  negotiated it).
* **virtio-mem**: "device" when ``qom-list-types`` (implements ``virtio-mem-pci``) has it,
  "module" when the guest image carries ``virtio_mem`` (``GuestImage.modules``); then, once per
  combination (``--no-virtio-mem`` skips it), a bare QEMU started here with
  ``-m 512M,maxmem=1G``, a 256M ``memory-backend-ram`` and ``virtio-mem-pci ... node=0
  requested-size=0``, the image's kernel, initrd and command line and the workload agent on
  serial port 1: ``qom-set vm0 requested-size 128M``, then ``query-memory-devices`` polled until
  the device's size is 128 MiB and the guest's MemTotal (from the agent) grew by 128 MiB, then
  back to 0. "+128 MiB in X s" is the time until both had happened (polled every 0.1 s, each
  poll two round trips); that QEMU is sent ``quit``, and killed by its pid if still there.

Cells that differ between boots show each value with its count. Times are medians over the
boots. Run from the project root, as root, under nice on a shared machine:
``nice -n 5 .venv/bin/python benchmarks/version_matrix.py [--boots 3] [--quick]``; 15-20 s
per boot and 5 s per combination for virtio-mem (3.5 min for 2 QEMUs x 2 kernels x 3 boots).
Results: benchmarks/results/version_matrix.json (every boot's raw answers, the environment).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import environment, markdown_table, median, process_start_time, write_json

from balloonlab import Guest, builtin_spec
from balloonlab.domain import DomainSpec, with_changes
from balloonlab.image.agent import Workload
from balloonlab.image.build import GuestImage, find_guest_image
from balloonlab.image.stacks import Stack, find_stacks
from balloonlab.model.errors import BalloonLabError, CommandError
from balloonlab.model.schema import STATS
from balloonlab.model.stats import UNSET
from balloonlab.qemu import Monitor, QMPEvent
from balloonlab.qemu.guest import READY_LINE

MIB = 1 << 20
COLUMNS = ("QEMU", "guest kernel", "stats set", "stats not set", "after system_reset", "reset->report s",
           "start->report s", "cont->report s", "free-page-reporting", "virtio-mem", "events while reporting",
           "balloon events in QAPI schema")
FORMATS = {"reset->report s": ".2f", "start->report s": ".2f", "cont->report s": ".2f"}


# -- small QMP helpers -------------------------------------------------------------------------
class EventLog:
    """Every QMP event of one monitor from now on, until :meth:`close` (a context manager)."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.events: list[QMPEvent] = []
        monitor.add_event_handler(self.events.append)

    def close(self) -> None:
        self.monitor.remove_event_handler(self.events.append)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def named(self, name: str) -> list[QMPEvent]:
        return [e for e in self.events if e.name == name]

    async def wait(self, name: str, timeout_s: float, after: int = 0) -> QMPEvent | None:
        """The first ``name`` event among those from index ``after`` on, waiting up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [e for e in self.events[after:] if e.name == name]
            if found:
                return found[0]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.01)


async def wait_for(condition: Callable[[], Awaitable[Any]], timeout_s: float, poll_s: float) -> Any:
    """Await ``condition()`` every ``poll_s`` until it returns something true; None on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(poll_s)


async def raw_stats(guest: Guest) -> dict[str, Any]:
    """QEMU's guest-stats reply as it is (last-update, stats with 2^64-1 for unset)."""
    return dict(await guest.monitor.execute("qom-get", {"path": await guest.balloon.path(),
                                                        "property": "guest-stats"}))


def stats_breakdown(reply: dict[str, Any]) -> dict[str, Any]:
    """Which of the 16 stats a raw guest-stats reply sets, leaves unset, or does not send."""
    values = reply.get("stats") or {}
    known = {s.qemu_key for s in STATS}
    return {"set": [s.name for s in STATS if s.qemu_key in values and values[s.qemu_key] != UNSET],
            "unset": [s.name for s in STATS if s.qemu_key in values and values[s.qemu_key] == UNSET],
            "not_sent": [s.name for s in STATS if s.qemu_key not in values],
            "other_keys": sorted(k for k in values if k not in known),
            "last_update": reply.get("last-update")}


# -- time to first report ----------------------------------------------------------------------
def without_agent(spec: DomainSpec) -> DomainSpec:
    """The same guest without the workload agent: ``Guest.launch`` returns right after ``cont``."""
    return with_changes(spec, agent=False)


async def launch_timed(spec: DomainSpec, poll_s: float = 0.02, timeout_s: float = 90.0) -> tuple[Guest, dict[str, Any]]:
    """Launch ``spec`` (best without the agent) and time its first stats report.

    :returns: the running guest (the caller shuts it down) and the times (host epoch seconds
        and the intervals): ``started`` (QEMU's fork), ``resumed`` (QEMU's RESUME event),
        ``first_report`` (the first read that saw last-update set returned), ``polls``.
    :raises TimeoutError: no report within ``timeout_s`` (the guest is shut down).
    """
    called = time.time()
    guest = await Guest.launch(spec)
    try:
        assert guest.pid is not None
        started = process_start_time(guest.pid)
        returned = time.time()
        args = {"path": await guest.balloon.path(), "property": "guest-stats"}
        deadline = time.monotonic() + timeout_s
        polls = 0
        previous = returned
        while True:
            reply = await guest.monitor.execute("qom-get", args)
            seen = time.time()
            polls += 1
            if reply.get("last-update"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{spec.name}: no stats report within {timeout_s} s of launch")
            previous = seen
            await asyncio.sleep(poll_s)
        resume = next((e for e in guest.monitor.recent_events if e.name == "RESUME"), None)
        if resume is None:  # the event may still be on its way through the listener
            await asyncio.sleep(0.5)
            resume = next((e for e in guest.monitor.recent_events if e.name == "RESUME"), None)
    except BaseException:
        await guest.shutdown()
        raise
    resumed = resume.time if resume is not None else None
    return guest, {"called": called, "started": started, "launch_returned": returned, "resumed": resumed,
                   "first_report": seen, "previous_poll": previous, "polls": polls,
                   "first_last_update": reply["last-update"],
                   "start_to_report_s": seen - started,
                   "cont_to_report_s": None if resumed is None else seen - resumed,
                   "launch_call_to_report_s": seen - called}


# -- one boot ----------------------------------------------------------------------------------
async def qemu_features(guest: Guest) -> dict[str, Any]:
    """Device properties, the balloon's negotiated virtio features, device types, event names."""
    monitor = guest.monitor
    out: dict[str, Any] = {}
    props = await monitor.execute("device-list-properties", {"typename": "virtio-balloon-pci"})
    out["balloon_properties"] = sorted(p["name"] for p in props)
    out["fpr_property"] = "free-page-reporting" in out["balloon_properties"]
    try:
        devices = await monitor.execute("x-query-virtio")
        out["virtio_devices"] = devices
        backend = next((d["path"] for d in devices if d.get("name") == "virtio-balloon"), None)
        out["balloon_backend"] = backend
        if backend is not None:
            status = await monitor.execute("x-query-virtio-status", {"path": backend})
            guest_features = list(status.get("guest-features", {}).get("dev-features", []))
            host_features = list(status.get("host-features", {}).get("dev-features", []))
            out["guest_features"], out["host_features"] = guest_features, host_features
            out["fpr_offered"] = any(f.startswith("VIRTIO_BALLOON_F_REPORTING") for f in host_features)
            out["fpr_accepted"] = any(f.startswith("VIRTIO_BALLOON_F_REPORTING") for f in guest_features)
    except CommandError as exc:  # a QEMU without the x-query-virtio commands
        out["x_query_virtio_error"] = str(exc)
    types = await monitor.execute("qom-list-types", {"implements": "virtio-mem-pci", "abstract": False})
    out["virtio_mem_types"] = sorted(t["name"] for t in types)
    out["virtio_mem_device"] = "virtio-mem-pci" in out["virtio_mem_types"]
    schema = await monitor.execute("query-qmp-schema")
    events = sorted(e["name"] for e in schema if e.get("meta-type") == "event")
    out["schema_events"] = events
    out["schema_balloon_events"] = [e for e in events if "BALLOON" in e]
    return out


async def events_while_reporting(guest: Guest, periods: int, period_s: float = 1.0) -> dict[str, Any]:
    """Every QMP event during ``periods`` stats periods, and how many reports came meanwhile."""
    lus: set[int] = set()
    with EventLog(guest.monitor) as log:
        end = time.monotonic() + periods * period_s
        while time.monotonic() < end:
            lu = (await raw_stats(guest)).get("last-update")
            if lu:
                lus.add(int(lu))
            await asyncio.sleep(0.25)
    return {"seconds": periods * period_s, "reports": max(0, len(lus) - 1),
            "events": [{"event": e.name, "data": e.data, "time": e.time} for e in log.events]}


async def balloon_change(guest: Guest, memory_bytes: int, timeout_s: float = 10.0) -> dict[str, Any]:
    """Set a target 64 MiB below the guest's memory; the BALLOON_CHANGE events that follow."""
    target = memory_bytes - 64 * MIB
    with EventLog(guest.monitor) as log:
        sent = time.time()
        await guest.monitor.execute("balloon", {"value": target})
        first = await log.wait("BALLOON_CHANGE", timeout_s)
        await asyncio.sleep(1.0)  # QEMU sends at most one a second: see whether more follow
        seen = log.named("BALLOON_CHANGE")
    return {"target": target, "events": len(seen), "first_after_s": None if first is None else first.time - sent,
            "actuals": [int(e.data.get("actual", 0)) for e in seen], "other": [e.name for e in log.events
                                                                               if e.name != "BALLOON_CHANGE"]}


async def reset_behaviour(guest: Guest, timeout_s: float = 60.0) -> dict[str, Any]:
    """What guest-stats shows right after a QMP ``system_reset``, and when the guest reports again."""
    with EventLog(guest.monitor) as log:
        before = await raw_stats(guest)
        sent = time.time()
        await guest.monitor.execute("system_reset")
        event = await log.wait("RESET", 10.0)
        after = await raw_stats(guest)
        read_at = time.time()
        b_stats, a_stats = before.get("stats") or {}, after.get("stats") or {}
        all_unset = bool(a_stats) and all(v == UNSET for v in a_stats.values())
        if not after.get("last-update") and (all_unset or not a_stats):
            kind = "unset (last-update 0)"
        elif after.get("last-update") == before.get("last-update") and a_stats == b_stats:
            kind = "stale (last report kept)"
        else:
            kind = (f"other: last-update {before.get('last-update')} -> {after.get('last-update')}, "
                    f"{sum(a_stats.get(k) != v for k, v in b_stats.items())} values changed")

        async def new_report() -> dict[str, Any] | None:
            reply = await raw_stats(guest)
            fresh = reply.get("last-update") and (reply.get("last-update"), reply.get("stats")) != \
                (before.get("last-update"), before.get("stats"))
            return reply if fresh else None

        again = await wait_for(new_report, timeout_s, 0.05)
        again_at = time.time()
    reset_at = event.time if event is not None else sent
    return {"kind": kind, "before_last_update": before.get("last-update"),
            "after_last_update": after.get("last-update"),
            "after_set": stats_breakdown(after)["set"], "reset_event": event is not None,
            "reset_event_data": event.data if event is not None else None, "read_after_event_s": read_at - reset_at,
            "reported_again": again is not None,
            "reset_to_report_s": (again_at - reset_at) if again is not None else None}


async def boot_once(stack: Stack, release: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One guest of this combination: launch, first report, stats, events, features, reset, shutdown."""
    spec = without_agent(builtin_spec(name, memory=args.memory, period_s=1, kernel_release=release,
                                      qemu_binary=str(stack.qemu), free_page_reporting=True))
    guest, timing = await launch_timed(spec, poll_s=args.poll_ms / 1000)
    try:
        meta = await guest.metadata()
        out: dict[str, Any] = {"timing": timing, "qemu_version": meta["qemu_version"],
                               "guest_kernel": meta["guest_kernel"], "warnings": meta["warnings"]}
        first = int(timing["first_last_update"])

        async def two_more() -> dict[str, Any] | None:
            reply = await raw_stats(guest)
            return reply if (reply.get("last-update") or 0) >= first + 2 else None

        reply = await wait_for(two_more, 30.0, 0.2)
        if reply is None:
            raise TimeoutError(f"{name}: the guest did not report again within 30 s of its first report")
        out["stats"] = stats_breakdown(reply)
        out["features"] = await qemu_features(guest)
        out["events_while_reporting"] = await events_while_reporting(guest, args.event_periods)
        out["balloon_change"] = await balloon_change(guest, spec.memory_bytes)
        out["reset"] = await reset_behaviour(guest)
        return out
    finally:
        await guest.shutdown()


# -- virtio-mem on a bare QEMU -----------------------------------------------------------------
async def virtio_mem_resize(stack: Stack, image: GuestImage, workdir: Path, plug: int = 128 * MIB,
                            timeout_s: float = 60.0) -> dict[str, Any]:
    """A bare QEMU with a virtio-mem device: plug ``plug`` bytes, then unplug them; sizes and MemTotal."""
    workdir.mkdir(parents=True, exist_ok=True)
    qmp, console, agent = workdir / "qmp.sock", workdir / "console.log", workdir / "agent.sock"
    argv = [str(stack.qemu), "-machine", "pc", "-accel", "tcg", "-m", "512M,maxmem=1G", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-chardev", f"file,id=console,path={console}", "-serial", "chardev:console",
            "-chardev", f"socket,id=agent,path={agent},server=on,wait=off", "-serial", "chardev:agent",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", image.cmdline,
            "-object", "memory-backend-ram,id=vmem0,size=256M",
            "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size=0"]
    out: dict[str, Any] = {"argv": argv}
    with open(workdir / "qemu.log", "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    monitor = Monitor(str(qmp), name=workdir.name)
    workload = Workload(str(agent))
    try:
        async def socket_up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode}: "
                                   f"{(workdir / 'qemu.log').read_text(errors='replace')[-400:]}")
            return qmp.exists()
        if not await wait_for(socket_up, 15.0, 0.02):
            raise TimeoutError("no QMP socket within 15 s")
        await monitor.connect()

        async def ready() -> bool:
            return console.exists() and READY_LINE in console.read_bytes()
        if not await wait_for(ready, timeout_s, 0.1):
            raise TimeoutError(f"no READY line on the console within {timeout_s} s")
        await workload.connect(timeout_s=30.0)
        total0 = (await workload.meminfo())["MemTotal"]

        async def device_size() -> int:
            devices = await monitor.execute("query-memory-devices")
            return int(next(d["data"]["size"] for d in devices if d["data"].get("id") == "vm0"))

        async def resize(size: int) -> dict[str, Any]:
            with EventLog(monitor) as log:
                sent = time.monotonic()
                await monitor.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": size})

                async def reached() -> bool:
                    total = (await workload.meminfo())["MemTotal"]
                    return await device_size() == size and total - total0 == size
                done = await wait_for(reached, timeout_s, 0.1)
                elapsed = time.monotonic() - sent
                await asyncio.sleep(0.2)
                return {"requested": size, "reached": bool(done), "seconds": elapsed if done else None,
                        "device_size": await device_size(),
                        "mem_total_delta": (await workload.meminfo())["MemTotal"] - total0,
                        "size_change_events": [int(e.data.get("size", -1)) for e in
                                               log.named("MEMORY_DEVICE_SIZE_CHANGE")]}

        out["mem_total_before"] = total0
        out["device_size_before"] = await device_size()
        out["plug"] = await resize(plug)
        out["unplug"] = await resize(0)
        out["ok"] = out["plug"]["reached"] and out["unplug"]["reached"]
        return out
    finally:
        await workload.close()
        with contextlib.suppress(BalloonLabError):
            if monitor.connected:
                await monitor.execute("quit", timeout_s=5.0)
        await monitor.close()
        try:
            await asyncio.to_thread(proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own QEMU, by its Popen (pid)
            await asyncio.to_thread(proc.wait, 10.0)


# -- the table ---------------------------------------------------------------------------------
def agree(values: list[str]) -> str:
    """One value when every boot agrees, else each value with its count."""
    counts = collections.Counter(values)
    if len(counts) == 1:
        return values[0]
    return "; ".join(f"{v} ({n}/{len(values)})" for v, n in counts.most_common())


def _not_set_text(stats: dict[str, Any]) -> str:
    parts = []
    if stats["unset"]:
        parts.append(f"{len(stats['unset'])} unset: {', '.join(stats['unset'])}")
    if stats["not_sent"]:
        parts.append(f"{len(stats['not_sent'])} not sent: {', '.join(stats['not_sent'])}")
    return "; ".join(parts) or "-"


def _fpr_text(features: dict[str, Any]) -> str:
    if not features["fpr_property"]:
        return "no property"
    if "fpr_offered" not in features:
        return "property; x-query-virtio-status unavailable"
    if not features["fpr_offered"]:
        return "property, not offered"
    return "offered, accepted by the guest" if features["fpr_accepted"] else "offered, not accepted by the guest"


def _events_text(windows: list[dict[str, Any]]) -> str:
    """The events seen while the guest reported (agreed over boots), and the reports meanwhile."""
    def names(ev: dict[str, Any]) -> str:
        counts = collections.Counter(e["event"] for e in ev["events"])
        return ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())) or "none"
    reports = sum(ev["reports"] for ev in windows)
    return f"{agree([names(ev) for ev in windows])} ({reports} reports in {len(windows)} x {windows[0]['seconds']:g} s)"


def _schema_text(boot: dict[str, Any]) -> str:
    seen = {"BALLOON_CHANGE"} if boot["balloon_change"]["events"] else set()
    return ", ".join(e + (" (seen)" if e in seen else "") for e in boot["features"]["schema_balloon_events"]) or "none"


def _virtio_mem_text(boots: list[dict[str, Any]], resize: dict[str, Any] | None, image: GuestImage | None) -> str:
    device = agree(["device" if b["features"]["virtio_mem_device"] else "no device" for b in boots])
    module = "module" if image is not None and "virtio_mem" in image.modules else "no module"
    text = f"{device}, {module}"
    if resize is None:
        return text + ", resize not tried"
    if "error" in resize:
        return text + f", resize failed: {resize['error']}"
    plug, unplug = resize["plug"], resize["unplug"]
    if plug["reached"]:
        text += f", +{plug['requested'] // MIB} MiB in {plug['seconds']:.1f} s"
    else:
        text += (f", +{plug['requested'] // MIB} MiB not reached (device {plug['device_size'] // MIB} MiB, "
                 f"MemTotal {plug['mem_total_delta'] / MIB:+.0f} MiB)")
    text += f", back to 0 in {unplug['seconds']:.1f} s" if unplug["reached"] else ", back to 0 not reached"
    return text


def combination_row(stack: Stack, release: str, boots: list[dict[str, Any]], resize: dict[str, Any] | None,
                    image: GuestImage | None) -> dict[str, Any]:
    ok = [b for b in boots if "error" not in b]
    errors = [b["error"] for b in boots if "error" in b]
    row: dict[str, Any] = {"QEMU": agree([b["qemu_version"] for b in ok]) if ok else stack.qemu_version,
                           "guest kernel": agree([b["guest_kernel"] or release for b in ok]) if ok else release}
    if not ok:
        row["stats set"] = f"all {len(boots)} boots failed: {errors[0]}"
        return row
    row["stats set"] = agree([f"{len(b['stats']['set'])}/{len(STATS)}" for b in ok])
    row["stats not set"] = agree([_not_set_text(b["stats"]) for b in ok])
    row["after system_reset"] = agree([b["reset"]["kind"] for b in ok])
    again = [b["reset"]["reset_to_report_s"] for b in ok if b["reset"]["reset_to_report_s"] is not None]
    row["reset->report s"] = median(again) if again else None
    row["start->report s"] = median([b["timing"]["start_to_report_s"] for b in ok])
    cont = [b["timing"]["cont_to_report_s"] for b in ok if b["timing"]["cont_to_report_s"] is not None]
    row["cont->report s"] = median(cont) if cont else None
    row["free-page-reporting"] = agree([_fpr_text(b["features"]) for b in ok])
    row["virtio-mem"] = _virtio_mem_text(ok, resize, image)
    row["events while reporting"] = _events_text([b["events_while_reporting"] for b in ok])
    row["balloon events in QAPI schema"] = agree([_schema_text(b) for b in ok])
    if errors:
        row["stats set"] += f" ({len(errors)} of {len(boots)} boots failed)"
    return row


# -- the run -----------------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> dict[str, Any]:
    stacks = find_stacks()
    if not stacks:
        raise SystemExit("no QEMU found: run `make stacks` (balloonlab stacks install)")
    workdir = Path(tempfile.mkdtemp(prefix="blb-matrix-", dir="/tmp"))
    os.environ["BALLOONLAB_RUNTIME_DIR"] = str(workdir / "runtime")
    (workdir / "runtime").mkdir(mode=0o700)
    combos: list[dict[str, Any]] = []
    n = 0
    try:
        for stack in stacks:
            for release in stack.kernels:
                image = find_guest_image(kernel_release=release)
                boots: list[dict[str, Any]] = []
                for i in range(args.boots):
                    n += 1
                    name = f"vm{os.getpid()}-{n}"
                    began = time.monotonic()
                    try:
                        boot = await boot_once(stack, release, name, args)
                    except Exception as exc:  # recorded and shown: one bad boot must not hide the rest
                        boot = {"error": f"{type(exc).__name__}: {exc}"}
                    boot["wall_s"] = time.monotonic() - began
                    boots.append(boot)
                    status = boot.get("error") or (f"first report {boot['timing']['start_to_report_s']:.2f} s after "
                                                   f"start, {len(boot['stats']['set'])} stats, "
                                                   f"reset: {boot['reset']['kind']}")
                    print(f"QEMU {stack.qemu_version} x {release} boot {i + 1}/{args.boots}: {status} "
                          f"({boot['wall_s']:.0f} s)", flush=True)
                resize: dict[str, Any] | None = None
                if args.virtio_mem and image is not None:
                    began = time.monotonic()
                    try:
                        resize = await virtio_mem_resize(stack, image, workdir / f"vmem-{n}")
                    except Exception as exc:
                        resize = {"error": f"{type(exc).__name__}: {exc}"}
                    resize["wall_s"] = time.monotonic() - began
                    print(f"QEMU {stack.qemu_version} x {release} virtio-mem: "
                          f"{resize.get('error') or ('resized' if resize['ok'] else 'not resized')} "
                          f"({resize['wall_s']:.0f} s)", flush=True)
                combos.append({"stack": stack.as_json(), "kernel_release": release,
                               "image": None if image is None else {"key": image.key, "modules": list(image.modules),
                                                                    "cmdline": image.cmdline},
                               "boots": boots, "virtio_mem_resize": resize,
                               "row": combination_row(stack, release, boots, resize, image)})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"combinations": combos}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boots", type=int, default=3, help="boots per QEMU x kernel (default 3)")
    parser.add_argument("--quick", action="store_true", help="one boot per combination")
    parser.add_argument("--memory", default="512M", help="guest memory (default 512M)")
    parser.add_argument("--poll-ms", type=float, default=20.0, help="guest-stats poll interval until the first "
                                                                    "report, ms (default 20)")
    parser.add_argument("--event-periods", type=int, default=5, help="stats periods to listen for events (5)")
    parser.add_argument("--no-virtio-mem", dest="virtio_mem", action="store_false",
                        help="skip the virtio-mem resize on a bare QEMU")
    parser.add_argument("--json", metavar="PATH", help="default benchmarks/results/version_matrix.json")
    args = parser.parse_args()
    if args.quick:
        args.boots = 1
    if args.boots < 1 or args.poll_ms <= 0 or args.event_periods < 1:
        parser.error("--boots, --poll-ms and --event-periods must be positive")
    env = environment()
    began = time.monotonic()
    out = asyncio.run(run(args))
    rows = [c["row"] for c in out["combinations"]]
    print()
    print(markdown_table(rows, COLUMNS, FORMATS))
    wall = time.monotonic() - began
    print(f"\n{args.boots} boot(s) per combination, times are medians; {env['cpu_model']}, "
          f"nproc {env['nproc']}, TCG; {wall:.0f} s in all")
    path = write_json("version_matrix", {"benchmark": "version_matrix", "environment": env, "args": vars(args),
                                         "wall_s": wall, "columns": COLUMNS, "rows": rows, **out}, args.json)
    print(f"raw data: {path}")


if __name__ == "__main__":
    main()
