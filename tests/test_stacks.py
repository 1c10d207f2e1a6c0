"""Both tested stacks, for real: every QEMU x guest kernel this Debian release should have.

On Debian 12 that is the distro's QEMU 7.2 and the current stack's QEMU 10 (unpacked from
bookworm-backports by ``balloonlab stacks install``), each with the 6.1 and the 6.12 guest
kernel; on Debian 13, QEMU 10 with 6.12. Per combination: QMP (discovery, the period from
the domain XML, which stats are set), the sampler (every report once) and both kinds of
reset (QMP ``system_reset`` and a reboot from inside the guest), with each QEMU's own reset
semantics. And libvirt 11 (its own daemon in a mount namespace beside the system's libvirt 9)
against its own ``virsh dommemstat``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from balloonlab import Guest, Sampler, builtin_spec, format_dommemstat, libvirt_view
from balloonlab.image.stacks import Stack, find_stacks, host_codename
from balloonlab.model.schema import STATS

from .libvirtd_fixture import PREFIX, _cleanup, domain_name, require_libvirt_python

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "libvirtd"
OLDER = tuple(s.name for s in STATS if s.since != "9.2")
NEWER = tuple(s.name for s in STATS if s.since == "9.2")

#: What each Debian release must offer once `make test` has set it up: QEMU and guest kernel
#: series (their first two version numbers).
EXPECTED = {
    "bookworm": {"qemu": ("7.2", "10.0"), "kernels": ("6.1", "6.12")},
    "trixie": {"qemu": ("10.0",), "kernels": ("6.12",)},
}
_WANTED = EXPECTED.get(host_codename() or "", {"qemu": ("any",), "kernels": ("any",)})
COMBOS = [(q, k) for q in _WANTED["qemu"] for k in _WANTED["kernels"]]


def _vt(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:2])


def _series(version: str) -> str:
    return ".".join(version.split(".")[:2])


@pytest.fixture(scope="session")
def stacks() -> list[Stack]:
    found = find_stacks()
    if not found:
        pytest.fail("no QEMU found: run `make test` (it installs qemu-system-x86 and runs `balloonlab stacks install`)")
    return found


def _stack(stacks: list[Stack], series: str) -> Stack:
    if series == "any":
        return stacks[-1]
    for stack in stacks:
        if _series(stack.qemu_version) == series:
            return stack
    pytest.fail(f"no QEMU {series}.x here (found {[s.qemu_version for s in stacks]}): run `make stacks` "
                "(balloonlab stacks install)", pytrace=False)


def _kernel(stacks: list[Stack], series: str) -> str:
    kernels = stacks[0].kernels
    if series == "any":
        return _series(kernels[0])
    if not any(_series(k) == series for k in kernels):
        pytest.fail(f"no {series} guest kernel built (built: {list(kernels)}): run `make stacks`", pytrace=False)
    return series


def test_stacks_json_lists_every_qemu_and_kernel_this_release_needs(stacks):
    done = subprocess.run([str(REPO / ".venv" / "bin" / "balloonlab"), "stacks", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert [s["qemu_version"] for s in listed] == [s.qemu_version for s in stacks]
    for entry in listed:
        assert {"qemu", "qemu_version", "kernels"} <= set(entry)
        # The path runs as it is (a wrapper for an unpacked stack) and is the version it says.
        version = subprocess.run([entry["qemu"], "--version"], capture_output=True, text=True, timeout=60).stdout
        assert f"QEMU emulator version {entry['qemu_version']}" in version, (entry, version)
        assert all(isinstance(k, str) and k[0].isdigit() for k in entry["kernels"])
    series = {_series(s["qemu_version"]) for s in listed}
    kernels = {_series(k) for k in listed[0]["kernels"]}
    if _WANTED["qemu"] != ("any",):
        assert set(_WANTED["qemu"]) <= series, f"QEMU {_WANTED['qemu']} wanted, found {sorted(series)}"
        assert set(_WANTED["kernels"]) <= kernels, f"kernels {_WANTED['kernels']} wanted, found {sorted(kernels)}"


@pytest.mark.parametrize(("qemu", "kernel"), COMBOS, ids=[f"qemu{q}-linux{k}" for q, k in COMBOS])
async def test_qmp_stats_sampler_and_resets_on_each_stack(stacks, qemu, kernel, guest_name, tmp_path):
    stack, release = _stack(stacks, qemu), _kernel(stacks, kernel)
    spec = builtin_spec(guest_name, period_s=1, kernel_release=release, qemu_binary=str(stack.qemu))
    guest = await Guest.launch(spec)
    try:
        meta = await guest.metadata()
        assert meta["qemu_version"] == stack.qemu_version
        # QMP: discovery by alias, the period from the domain XML set at launch, stats read.
        assert await guest.balloon.path() == "/machine/peripheral/balloon0"
        assert await guest.balloon.get_period() == 1
        first = await guest.balloon.wait_for_stats()
        set_now = {k for k, v in first.stats.items() if v is not None}
        both_new = _vt(stack.qemu_version) >= (9, 2) and _vt(release) >= (6, 12)
        assert set_now == set(OLDER) | (set(NEWER) if both_new else set()), sorted(set_now)
        if _vt(stack.qemu_version) >= (9, 2):
            assert set(NEWER) <= set(first.stats)  # QEMU 9.2+ always sends them, unset or not
        else:
            assert not set(NEWER) & set(first.stats)  # QEMU 7.2 does not know them

        async with Sampler(run_dir=tmp_path / "run", flush_interval_s=2) as sampler:
            await sampler.add(guest)
            await _wait(lambda: _rows(sampler) >= 5, 30, "5 samples")
            # A QMP reset: QEMU >= 9.2 drops the stats (last-update 0, every value unset) until
            # the guest reports again; 7.2 keeps the last report as it was.
            before = await guest.balloon.read_report()
            await guest.monitor.execute("system_reset")
            after = await guest.balloon.read_report()
            if _vt(stack.qemu_version) >= (9, 2):
                assert after.last_update is None and all(v is None for v in after.stats.values())
            else:
                assert after.last_update == before.last_update and after.stats == before.stats
            await _wait(lambda: _resets(sampler) >= 1, 60, "the sample after system_reset")
            rows_at_reboot = _rows(sampler)
            await _wait(lambda: _rows(sampler) >= rows_at_reboot + 3, 30, "3 samples after the reset")
            await guest.workload.connect(timeout_s=60)  # the agent restarted with the guest
            await guest.workload.reboot()  # from inside: `reboot -f`, not QMP
            await _wait(lambda: _resets(sampler) >= 2, 60, "the sample after the guest's reboot")
            await _wait(lambda: _rows(sampler) >= _rows_at_last_reset(sampler) + 3, 30, "3 samples after the reboot")
        frame = sampler.frame()
    finally:
        await guest.shutdown()
    # Every row is a real report: read once, never an unset one, never one from before a reset
    # counted as new; exactly two resets, each on the first report after it.
    assert frame["last_update"].notna().all()
    assert not frame.duplicated(subset=["last_update", "minor_faults", "free_memory"]).any()
    assert int(frame["reset"].sum()) == 2
    if both_new:
        assert frame[list(NEWER)].notna().all().all()
    rates = frame.balloon.rates()
    counters = [c for c in rates.columns if c in {s.name for s in STATS if s.kind == "counter"}]
    assert (rates[counters].fillna(0) >= 0).all().all(), "a negative rate across a reset"
    assert rates.loc[frame["reset"].to_numpy(), counters].isna().all().all()  # NA at a reset, not a spike
    # Reports at 1 s: consecutive rows about a second apart (none lost), but across the resets.
    gaps = frame.index.to_series().diff().dt.total_seconds()[~frame["reset"]].dropna()
    assert gaps.median() == pytest.approx(1.0, abs=0.25) and gaps.max() < 2.6, gaps.describe()


def _rows(sampler: Sampler) -> int:
    return len(sampler.frame())


def _resets(sampler: Sampler) -> int:
    frame = sampler.frame()
    return int(frame["reset"].sum()) if len(frame) else 0


def _rows_at_last_reset(sampler: Sampler) -> int:
    frame = sampler.frame()
    return int(frame["reset"].to_numpy().nonzero()[0][-1]) + 1


async def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        await asyncio.sleep(0.2)


# --- libvirt 11 ---------------------------------------------------------------------------

def _newest_libvirt(stacks: list[Stack]) -> Stack:
    with_libvirt = [s for s in stacks if s.libvirt_version and _vt(s.libvirt_version) >= (11, 0)]
    if not with_libvirt:
        pytest.fail(f"no libvirt 11 stack (found {[(s.name, s.libvirt_version) for s in stacks]}): run `make stacks`",
                    pytrace=False)
    return with_libvirt[-1]


@pytest.fixture(scope="session")
def libvirt11(stacks, request):
    """(stack, URI, virsh argv prefix) of a running libvirt 11: the stack's own daemon in its
    mount namespace (started and stopped here), or the system's when the system is libvirt 11."""
    require_libvirt_python()
    stack = _newest_libvirt(stacks)
    if stack.root is None:
        uri = request.getfixturevalue("libvirtd")
        yield stack, uri, ["virsh", "-c", uri]
        return
    done = subprocess.run([str(SCRIPT), "--stack", stack.name, "start"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.fail(f"scripts/libvirtd --stack {stack.name} start failed:\n{done.stdout}{done.stderr}")
    pid = (Path("/run/balloonlab-stacks") / stack.name / "run" / "libvirtd.pid").read_text().strip()
    assert stack.libvirt_uri is not None
    try:
        # The stack's own virsh, inside the daemon's mount namespace (the stack's /usr).
        yield stack, stack.libvirt_uri, ["nsenter", "-t", pid, "-m", "virsh", "-c", "qemu:///system"]
    finally:
        _cleanup(uri=stack.libvirt_uri)
        subprocess.run([str(SCRIPT), "--stack", stack.name, "stop"], capture_output=True, text=True, timeout=60)


async def test_libvirt_11_view_equals_its_own_virsh_dommemstat_and_lacks_the_newer_stats(libvirt11):
    from balloonlab.libvirt import LibvirtGuest
    stack, uri, virsh = libvirt11
    name = domain_name()
    assert name.startswith(PREFIX)
    spec = builtin_spec(name, period_s=2, kernel_release="6.12")
    guest = await LibvirtGuest.launch(spec, uri=uri, agent=False, stats_via="qmp")
    plain = await LibvirtGuest.attach(name, uri=uri, stats_via="libvirt")
    try:
        meta = await guest.metadata()
        assert (meta["libvirt_version"], meta["qemu_version"]) == (stack.libvirt_version, stack.qemu_version)
        await guest.balloon.wait_for_stats()
        for _attempt in range(20):
            stats = await guest.balloon.read_stats()
            ours = format_dommemstat(libvirt_view(stats, guest.rss_bytes())).splitlines()
            out = await asyncio.to_thread(subprocess.run, [*virsh, "dommemstat", name], capture_output=True,
                                          text=True, timeout=60)
            theirs = out.stdout.strip().splitlines()
            rss_now = guest.rss_bytes() // 1024
            if dict(line.split() for line in ours)["last_update"] == dict(line.split() for line in theirs)["last_update"]:
                break
            await asyncio.sleep(0.3)
        else:
            pytest.fail(f"balloonlab and libvirt {stack.libvirt_version}'s virsh never read the same last_update")
        assert [line.split()[0] for line in ours] == [line.split()[0] for line in theirs]  # same lines, same order
        assert len(ours) == 13
        for mine, virsh_line in zip(ours, theirs, strict=True):
            key, value = virsh_line.split()
            if key == "rss":  # QEMU's RSS moves between the two reads
                assert abs(int(value) - rss_now) < 8192, (mine, virsh_line)
            else:
                assert mine == virsh_line
        # All 16 stats through QMP passthrough; libvirt's own API maps only the older ten.
        assert all(stats[n] is not None for n in NEWER)
        via_libvirt = await plain.balloon.read_stats(query_actual=False)
        assert set(via_libvirt.stats) == set(OLDER)
    finally:
        await plain.close()
        await guest.shutdown()
    left = _cleanup(uri=uri)
    assert not left, left

