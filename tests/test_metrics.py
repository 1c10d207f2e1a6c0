"""The live sampler's Prometheus endpoint: exact values and names over rows put in a sampler's
buffer, NA left out, resets and staleness visible, OpenMetrics to a scraper that asks for it, a
clear error for a port in use; then a real guest scraped by a real Prometheus server, queried in
PromQL against the sampler's own frame, and ``balloonlab record --metrics-port``."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pandas as pd
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from balloonlab import Guest, Sampler, SyncSampler
from balloonlab.model.errors import BalloonLabError
from balloonlab.model.schema import STATS
from balloonlab.record import metrics
from balloonlab.record.metrics import NAME_MAP, MetricsSide, metric_name, name_map_markdown, serve_metrics
from balloonlab.record.sampler import SamplingState

from .qemu_helpers import foreign_qemu

MiB = 1 << 20
HOST = socket.gethostname()
BALLOONLAB = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "balloonlab"
#: What Prometheus 2.42 sends (scrape.go's scrapeAcceptHeader; seen on the wire from /usr/bin/prometheus).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
PROMETHEUS_HINT = ("the Prometheus server is not installed: `make test` installs it (the Debian package "
                   "'prometheus'), or run `sudo apt-get install prometheus`")


# ---------------------------------------------------------------------------- helpers

def fill(sampler: Sampler, rows: list[tuple[float, dict[str, object]]], states: dict[str, tuple[str, int]]) -> None:
    """Put rows straight into the sampler's buffer and guests in the states the sampler would give
    (each on its rows' host, this machine without a row, as Sampler.add takes it from the guest)."""
    hosts = {row["guest"]: str(row["host"]) for _, row in rows if row.get("host")}
    for name, (state, samples) in states.items():
        sampler._guests[name] = (None, SamplingState(name, state=state, samples=samples,  # no guest object: not read
                                                     host=hosts.get(name, HOST)))
    for at, row in rows:
        sampler._samples.append(int(at * 1e9), {"reset": False, **row})


def get(url: str, accept: str | None = None) -> tuple[str, str]:
    """(Content-Type, body) of a GET."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


async def scrape(url: str, accept: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """One scrape, off the loop (the collector waits for the loop), parsed by prometheus_client's own
    parser of the format served: {(sample name, labels): value}."""
    content_type, body = await asyncio.to_thread(get, url, accept)
    parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_text
    return {(s.name, frozenset(s.labels.items())): s.value for family in parse(body) for s in family.samples}


def guest_samples(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], guest: str) -> dict[str, float]:
    """{sample name: value} of one guest (statesets keyed name[state])."""
    out = {}
    for (name, labels), value in scraped.items():
        labels_ = dict(labels)
        if labels_.get("guest") == guest:
            state = labels_.get("balloonlab_guest_sampling_state")
            out[f"{name}[{state}]" if state else name] = value
    return out


# ---------------------------------------------------------------------------- the collector

async def test_the_latest_row_of_each_guest_with_the_schemas_names_kinds_and_labels() -> None:
    sampler = Sampler(host_interval_s=None)
    now = time.time()
    fill(sampler, [
        (now - 2.0, {"guest": "a", "free_memory": 100 * MiB, "major_faults": 7, "swap_in": 4096, "period_s": 1,
                     "last_update": int(now - 2), "actual": 512 * MiB, "target": 512 * MiB, "rss": 90 * MiB,
                     "clock_offset_s": 0.0}),
        (now - 1.0, {"guest": "a", "free_memory": 101 * MiB, "major_faults": 9, "swap_in": 8192, "period_s": 1,
                     "last_update": int(now - 1), "actual": 384 * MiB, "target": 384 * MiB, "rss": 91 * MiB,
                     "clock_offset_s": 0.0}),
        (now - 0.5, {"guest": "b", "free_memory": 300 * MiB, "total_memory": 480 * MiB, "period_s": 5,
                     "last_update": int(now - 1)}),
    ], {"a": ("sampling", 2), "b": ("sampling", 1)})
    with serve_metrics(sampler) as endpoint:
        a = guest_samples(await scrape(endpoint.url), "a")
        b = guest_samples(await scrape(endpoint.url), "b")
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics" and endpoint.port > 0
    assert {k: v for k, v in a.items() if not k.endswith("_created")} == {
        "balloonlab_guest_up": 1.0, "balloonlab_guest_samples_total": 2.0, "balloonlab_guest_resets_total": 0.0,
        **{f"balloonlab_guest_sampling_state[{s}]": float(s == "sampling") for s in metrics.STATES},
        "balloonlab_guest_stale": 0.0,
        "balloonlab_guest_stats_age_seconds": pytest.approx(time.time() - int(now - 1), abs=1.0),
        "balloonlab_guest_free_memory_bytes": 101.0 * MiB, "balloonlab_guest_major_faults_total": 9.0,
        "balloonlab_guest_swap_in_bytes_total": 8192.0, "balloonlab_guest_actual_bytes": 384.0 * MiB,
        "balloonlab_guest_target_bytes": 384.0 * MiB, "balloonlab_guest_rss_bytes": 91.0 * MiB,
        "balloonlab_guest_stats_period_seconds": 1.0,
        "balloonlab_guest_stats_last_update_timestamp_seconds": float(int(now - 1)),
    }
    assert not any(k.endswith("_created") for k in a)  # no reset seen: no _created
    assert b["balloonlab_guest_free_memory_bytes"] == 300 * MiB
    assert b["balloonlab_guest_total_memory_bytes"] == 480 * MiB
    assert b["balloonlab_guest_stats_period_seconds"] == 5.0
    # Names, kinds and units come from the schema's one table.
    assert metric_name("free_memory") == "balloonlab_guest_free_memory_bytes"
    assert metric_name("swap_in") == "balloonlab_guest_swap_in_bytes_total"
    assert metric_name("major_faults") == "balloonlab_guest_major_faults_total"
    assert {metric_name(s.name).endswith("_total") for s in STATS if s.kind == "counter"} == {True}
    assert {metric_name(s.name).endswith("_bytes") for s in STATS if s.kind == "gauge" and s.unit == "bytes"} == {True}


async def test_labels_are_guest_and_host_and_a_remote_hosts_age_is_on_this_clock() -> None:
    sampler = Sampler(host_interval_s=None)
    now = time.time()
    # node7's clock is 5 s ahead of this one (clock_offset_s, learnt by the sampler): its
    # last-update says now + 4, which is 1 s ago here. A host whose offset is not yet bounded
    # (NA) has no age at all, as the frame's age_s.
    fill(sampler, [(now, {"guest": "far", "host": "node7", "free_memory": 1, "period_s": 1,
                          "last_update": int(now) + 4, "clock_offset_s": 5.0}),
                   (now, {"guest": "near", "host": HOST, "free_memory": 2, "period_s": 1}),
                   (now, {"guest": "unbounded", "host": "node8", "free_memory": 3, "period_s": 1,
                          "last_update": int(now) + 60})],
         {"far": ("sampling", 1), "near": ("sampling", 1), "new": ("starting", 0), "unbounded": ("sampling", 1)})
    with serve_metrics(sampler) as endpoint:
        scraped = await scrape(endpoint.url)
    assert guest_samples(scraped, "far")["balloonlab_guest_stats_age_seconds"] == pytest.approx(
        time.time() - (int(now) + 4 - 5.0), abs=0.5)
    assert guest_samples(scraped, "far")["balloonlab_guest_stats_last_update_timestamp_seconds"] == int(now) + 4
    assert "balloonlab_guest_stats_age_seconds" not in guest_samples(scraped, "unbounded")
    for name in ("balloonlab_guest_up", "balloonlab_guest_free_memory_bytes"):
        assert {labels for sample, labels in scraped if sample == name} >= {
            frozenset({("guest", "far"), ("host", "node7")}), frozenset({("guest", "near"), ("host", HOST)})}
    assert {labels for sample, labels in scraped if sample == "balloonlab_guest_up"} == {
        frozenset({("guest", "far"), ("host", "node7")}), frozenset({("guest", "near"), ("host", HOST)}),
        frozenset({("guest", "unbounded"), ("host", "node8")}),
        frozenset({("guest", "new"), ("host", HOST)})}  # no row yet: its guest's host


async def test_a_stat_that_is_na_or_the_sentinel_is_left_out_never_zero() -> None:
    sampler = Sampler(host_interval_s=None)
    now = time.time()
    fill(sampler, [(now, {"guest": "g", "free_memory": 5 * MiB, "swap_in": None, "swap_out": 2**64 - 1,
                          "available_memory": None, "period_s": 1, "target": None})],
         {"g": ("sampling", 1)})
    with serve_metrics(sampler) as endpoint:
        got = guest_samples(await scrape(endpoint.url), "g")
    assert got["balloonlab_guest_free_memory_bytes"] == 5 * MiB
    for missing in ("balloonlab_guest_swap_in_bytes_total", "balloonlab_guest_swap_out_bytes_total",
                    "balloonlab_guest_available_memory_bytes", "balloonlab_guest_target_bytes",
                    "balloonlab_guest_major_faults_total", "balloonlab_guest_stats_last_update_timestamp_seconds",
                    "balloonlab_guest_stats_age_seconds"):
        assert missing not in got


async def test_a_reset_is_counted_and_sets_the_counters_created_to_its_time() -> None:
    sampler = Sampler(host_interval_s=None)
    t0 = time.time() - 3
    fill(sampler, [(t0, {"guest": "g", "minor_faults": 5000, "major_faults": 40, "period_s": 1}),
                   (t0 + 1, {"guest": "g", "reset": True, "period_s": 1}),  # stats unset right after a reset
                   ], {"g": ("sampling", 2)})
    with serve_metrics(sampler) as endpoint:
        first = guest_samples(await scrape(endpoint.url), "g")
        fill(sampler, [(t0 + 2, {"guest": "g", "minor_faults": 300, "major_faults": 2, "period_s": 1})],
             {"g": ("sampling", 3)})
        second = guest_samples(await scrape(endpoint.url, PROMETHEUS_ACCEPT), "g")
    assert first["balloonlab_guest_resets_total"] == 1
    assert "balloonlab_guest_minor_faults_total" not in first  # the reset row has no stats: none, not the old ones
    assert second["balloonlab_guest_resets_total"] == 1  # counted once, though read again
    assert second["balloonlab_guest_minor_faults_total"] == 300 and second["balloonlab_guest_major_faults_total"] == 2
    reset_at = int((t0 + 1) * 1e9) / 1e9
    assert second["balloonlab_guest_minor_faults_created"] == pytest.approx(reset_at, abs=1e-6)
    assert second["balloonlab_guest_major_faults_created"] == pytest.approx(reset_at, abs=1e-6)


async def test_staleness_and_the_sampling_state_are_visible() -> None:
    sampler = Sampler(host_interval_s=None)
    now = time.time()
    fill(sampler, [(now - 10, {"guest": "old", "free_memory": 1, "period_s": 2, "last_update": int(now - 10),
                               "clock_offset_s": 0.0}),
                   (now - 1, {"guest": "fresh", "free_memory": 1, "period_s": 2, "last_update": int(now - 1)}),
                   (now - 1, {"guest": "died", "free_memory": 1, "period_s": 2}),
                   (now - 1, {"guest": "off", "free_memory": 1, "period_s": 0})],
         {"old": ("sampling", 1), "fresh": ("sampling", 1), "died": ("dead", 1), "off": ("sampling", 1),
          "failing": ("failed", 0)})
    with serve_metrics(sampler) as endpoint:
        scraped = await scrape(endpoint.url)
    g = {name: guest_samples(scraped, name) for name in ("old", "fresh", "died", "off", "failing")}
    assert g["old"]["balloonlab_guest_stale"] == 1 and g["old"]["balloonlab_guest_up"] == 1
    assert 10 <= g["old"]["balloonlab_guest_stats_age_seconds"] < 15
    assert g["fresh"]["balloonlab_guest_stale"] == 0
    assert g["off"]["balloonlab_guest_stale"] == 1  # period 0: polling is off
    assert g["died"]["balloonlab_guest_up"] == 0 and g["died"]["balloonlab_guest_sampling_state[dead]"] == 1
    assert g["died"]["balloonlab_guest_free_memory_bytes"] == 1  # its last values stay, marked by up and state
    assert g["failing"] == {"balloonlab_guest_up": 0, "balloonlab_guest_samples_total": 0,
                            "balloonlab_guest_resets_total": 0,
                            **{f"balloonlab_guest_sampling_state[{s}]": float(s == "failed") for s in metrics.STATES}}


async def test_each_scrape_reads_only_the_rows_since_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = Sampler(host_interval_s=None)
    asked: list[int] = []
    snapshot = sampler.samples_snapshot
    monkeypatch.setattr(sampler, "samples_snapshot", lambda since_row=0: asked.append(since_row) or snapshot(since_row))
    now = time.time()
    fill(sampler, [(now, {"guest": "g", "free_memory": i, "period_s": 1}) for i in range(3)], {"g": ("sampling", 3)})
    with serve_metrics(sampler) as endpoint:
        first = guest_samples(await scrape(endpoint.url), "g")
        second = guest_samples(await scrape(endpoint.url), "g")
        fill(sampler, [(now + 0.1, {"guest": "g", "free_memory": 7, "period_s": 1})], {"g": ("sampling", 4)})
        third = guest_samples(await scrape(endpoint.url), "g")
    assert asked == [0, 3, 3]
    assert (first["balloonlab_guest_free_memory_bytes"], second["balloonlab_guest_free_memory_bytes"],
            third["balloonlab_guest_free_memory_bytes"]) == (2, 2, 7)


async def test_a_busy_loop_serves_the_last_values_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "LOOP_TIMEOUT_S", 0.2)
    sampler = Sampler(host_interval_s=None)
    fill(sampler, [(time.time(), {"guest": "g", "free_memory": 42, "period_s": 1})], {"g": ("sampling", 1)})
    with serve_metrics(sampler) as endpoint:
        assert (await scrape(endpoint.url))[("balloonlab_sampler_loop_responsive", frozenset())] == 1
        result: list[str] = []
        scraper = threading.Thread(target=lambda: result.append(get(endpoint.url)[1]))
        scraper.start()
        time.sleep(1.0)  # the loop is blocked: the scrape cannot get its snapshot
        scraper.join()
        after = await scrape(endpoint.url)
    busy = {(s.name, frozenset(s.labels.items())): s.value for f in parse_text(result[0]) for s in f.samples}
    assert busy[("balloonlab_sampler_loop_responsive", frozenset())] == 0
    assert guest_samples(busy, "g")["balloonlab_guest_free_memory_bytes"] == 42
    assert after[("balloonlab_sampler_loop_responsive", frozenset())] == 1


async def test_openmetrics_is_served_to_a_scraper_that_asks_for_it() -> None:
    sampler = Sampler(host_interval_s=None)
    fill(sampler, [(time.time(), {"guest": "g", "free_memory": 3 * MiB, "minor_faults": 10, "period_s": 1})],
         {"g": ("sampling", 1)})
    with serve_metrics(sampler) as endpoint:
        content_type, body = await asyncio.to_thread(get, endpoint.url, PROMETHEUS_ACCEPT)
        plain_type, plain = await asyncio.to_thread(get, endpoint.url)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    assert "# UNIT balloonlab_guest_free_memory_bytes bytes\n" in body
    assert "# TYPE balloonlab_guest_minor_faults counter\n" in body
    assert "# TYPE balloonlab_guest_sampling_state stateset\n" in body
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["balloonlab_guest_free_memory_bytes"].unit == "bytes"
    assert families["balloonlab_guest_minor_faults"].type == "counter"
    assert plain_type.startswith("text/plain; version=0.0.4") and "# EOF" not in plain


# ---------------------------------------------------------------------------- the endpoint

async def test_a_port_in_use_names_the_port_and_what_to_do() -> None:
    sampler = Sampler(host_interval_s=None)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(BalloonLabError) as caught:
            serve_metrics(sampler, port)
    assert str(caught.value) == (f"cannot serve metrics on 127.0.0.1:{port}: the port is in use (another exporter, "
                                 "or a second recording?); pass another port, or 0 for any free one")


def test_serve_metrics_needs_the_samplers_running_loop() -> None:
    with pytest.raises(RuntimeError, match="no running event loop"):
        serve_metrics(Sampler(host_interval_s=None))


class IntegratedSampler(Sampler, MetricsSide):
    """The Sampler with MetricsSide among its bases and ``await self._close_metrics()`` first in its
    stop() (what record/sampler.py gets; closing twice is harmless once it has them)."""

    async def stop(self) -> None:
        await self._close_metrics()
        await super().stop()


async def test_the_sampler_closes_its_endpoints_on_stop_and_close_is_idempotent() -> None:
    sampler = IntegratedSampler(host_interval_s=None)
    async with sampler:
        one = sampler.serve_metrics()
        two = sampler.serve_metrics(addr="::1")
        assert two.url == f"http://[::1]:{two.port}/metrics"
        assert (await scrape(one.url))[("balloonlab_sampler_loop_responsive", frozenset())] == 1
        assert (await scrape(two.url))[("balloonlab_sampler_loop_responsive", frozenset())] == 1
    for endpoint in (one, two):
        assert not endpoint._thread.is_alive()
        with pytest.raises(OSError):
            await asyncio.to_thread(get, endpoint.url)
        endpoint.close()  # again: nothing happens
    assert sampler._metrics_endpoints == ()


def test_the_blocking_twin_serves_from_balloonlabs_loop() -> None:
    sampler = SyncSampler(host_interval_s=None)
    with sampler, sampler.serve_metrics() as endpoint:
        _, body = get(endpoint.url)
    assert "balloonlab_sampler_loop_responsive 1.0" in body
    assert not endpoint._thread.is_alive()


def test_the_name_map_uses_exposed_names_and_renders_the_readme_table() -> None:
    exposed = {metric_name(s.name) for s in STATS} | {spec[0] for spec in metrics._EXTRA.values()}
    assert {m.balloonlab for m in NAME_MAP} <= exposed
    table = name_map_markdown().splitlines()
    assert len(table) == 2 + len(NAME_MAP)
    assert table[2] == ("| `balloonlab_guest_free_memory_bytes` | `libvirt_domain_memory_stats_unused_bytes` | "
                        "`libvirt_domain_memory_stats_unused_bytes` | `kubevirt_vmi_memory_unused_bytes` | MemFree |")


# ---------------------------------------------------------------------------- a real Prometheus

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def promql(base: str, query: str, at: float | None = None) -> list[dict]:
    params = {"query": query} | ({} if at is None else {"time": f"{at:.3f}"})
    with urllib.request.urlopen(f"{base}/api/v1/query?{urlencode(params)}", timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


def one_value(base: str, query: str, at: float) -> float:
    result = promql(base, query, at)
    assert len(result) == 1, (query, at, result)
    return float(result[0]["value"][1])


async def wait_for(what: str, check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not (got := await asyncio.to_thread(check)):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        await asyncio.sleep(0.25)
    return got


def check_each_scrape(base: str, guest: str, rows: pd.DataFrame, scrapes: list[tuple[float, float]]) -> set[int]:
    """Every scrape's free memory, queried at the scrape's own timestamp, is the free memory of the
    guest's row that was the latest when it was scraped; returns those rows' numbers (from 1).

    A row's time is its report's (estimated) time, stamped before the row is appended: comparing by
    time alone ("the latest row at or before the scrape's timestamp") would race with a row appended
    during the scrape. The scrape itself says which row it saw: ``samples_total`` is read from the
    same callback on the sampler's loop as the rows, so it is the number of that guest's rows then.
    """
    seen = set()
    for at, value in scrapes:
        # The instant query at the scrape's timestamp answers with that scrape's sample.
        assert one_value(base, f'balloonlab_guest_free_memory_bytes{{guest="{guest}"}}', at) == value
        assert one_value(base, f'timestamp(balloonlab_guest_free_memory_bytes{{guest="{guest}"}})',
                         at) == pytest.approx(at, abs=1e-3)
        n = int(one_value(base, f'balloonlab_guest_samples_total{{guest="{guest}"}}', at))
        row = rows.iloc[n - 1]
        assert value == row["free_memory"], (at, n, rows["free_memory"].tolist())
        last_update = one_value(base, f'balloonlab_guest_stats_last_update_timestamp_seconds{{guest="{guest}"}}', at)
        assert last_update == row["last_update"].timestamp()
        # And it was there when scraped: stamped before the scrape ended (Prometheus aligns its
        # timestamps to the scrape interval by up to 2 ms, and keeps milliseconds).
        took = one_value(base, 'scrape_duration_seconds{job="balloonlab"}', at)
        assert rows.index[n - 1].timestamp() <= at + took + 0.003, (at, took, rows.index[n - 1])
        seen.add(n)
    return seen


async def test_prometheus_scrapes_exactly_the_frames_latest_row_of_a_real_guest(spec, tmp_path: Path) -> None:
    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.fail(PROMETHEUS_HINT)
    async with Sampler(host_interval_s=None) as sampler:
        with serve_metrics(sampler) as endpoint:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            target = f"127.0.0.1:{endpoint.port}"
            (tmp_path / "prometheus.yml").write_text(
                "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
                f"scrape_configs: [{{job_name: balloonlab, static_configs: [{{targets: ['{target}']}}]}}]\n")
            log = (tmp_path / "prometheus.log").open("w")
            # Started before the guest boots: Prometheus applies its targets about 5 s after it starts.
            proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                guest = await Guest.launch(spec())
                try:
                    await sampler.add(guest)

                    def scrapes() -> list[tuple[float, float]]:
                        """(timestamp, free memory) of every scrape so far."""
                        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                        try:
                            result = promql(base, f'balloonlab_guest_free_memory_bytes{{guest="{guest.name}"}}[5m]')
                        except OSError:  # not listening yet
                            return []
                        return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []

                    before = await wait_for("two scrapes of the guest's stats", lambda: (s := scrapes())[1:] and s)
                    await guest.workload.alloc("64M")  # the values must change, or any row would match
                    low = max(v for _, v in before) - 48 * MiB
                    got = await wait_for("three scrapes after 64 MiB were allocated in the guest",
                                         lambda: (s := scrapes()) and sum(v < low for _, v in s) >= 3 and s)
                finally:
                    await sampler.remove(guest.name)
                    await guest.shutdown()
                frame = sampler.frame()
                rows = frame[frame["guest"] == guest.name]
                # Off the loop: the endpoint still answers Prometheus meanwhile.
                seen = await asyncio.to_thread(check_each_scrape, base, guest.name, rows, got)
                assert len(got) >= 5 and len(seen) >= 2  # several rows, before and after the allocation
                assert max(v for _, v in got) - min(v for _, v in got) >= 48 * MiB
                # OpenMetrics was negotiated: Prometheus keeps the stateset type and the unit.
                with urllib.request.urlopen(f"{base}/api/v1/metadata", timeout=10) as response:
                    metadata = json.load(response)["data"]
                assert metadata["balloonlab_guest_sampling_state"][0]["type"] == "stateset"
                assert metadata["balloonlab_guest_free_memory_bytes"][0]["unit"] == "bytes"
                assert one_value(base, 'up{job="balloonlab"}', got[-1][0]) == 1
                labels = promql(base, f'balloonlab_guest_up{{guest="{guest.name}"}}', got[-1][0])[0]["metric"]
                assert (labels["host"], labels["job"]) == (HOST, "balloonlab")  # a local guest: this machine
            finally:
                proc.terminate()  # by its pid (never by name): this test started it
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.close()


# ---------------------------------------------------------------------------- balloonlab record

def test_record_serves_metrics_and_prints_their_url(tmp_path: Path) -> None:
    with foreign_qemu("virtio-balloon-pci,id=balloon0", paused=False) as sock:
        proc = subprocess.Popen([str(BALLOONLAB), "record", "--qmp", str(sock), "--out", "r", "--duration", "4",
                                 "--metrics-port", "0"], cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("recording qmp into r ")
            url = re.fullmatch(r"metrics: (http://127\.0\.0\.1:\d+/metrics)\n", proc.stdout.readline())
            assert url, "no metrics line"
            deadline = time.monotonic() + 10
            while True:  # "starting" until the sampler has read the period
                _, body = get(url.group(1))
                if 'balloonlab_guest_up{guest="qmp",host="' + HOST + '"} 1.0' in body or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert 'balloonlab_guest_up{guest="qmp",host="' + HOST + '"} 1.0' in body
    assert "balloonlab_guest_free_memory_bytes{" not in body  # no guest OS: no stats, and no zeros
    assert (proc.returncode, err) == (0, "")
    assert out.splitlines()[-1] == "run folder: r (0 samples)"
    with pytest.raises(OSError):
        get(url.group(1))  # closed with the recording


def test_record_on_a_port_in_use_fails_in_one_line_and_leaves_no_run_folder(tmp_path: Path) -> None:
    with socket.socket() as busy, foreign_qemu("virtio-balloon-pci,id=balloon0", paused=False) as sock:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([str(BALLOONLAB), "record", "--qmp", str(sock), "--out", "r", "--metrics-port",
                                 str(port)], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert result.stderr == (f"balloonlab: error: cannot serve metrics on 127.0.0.1:{port}: the port is in use "
                             "(another exporter, or a second recording?); pass another port, or 0 for any free one\n")
    assert not (tmp_path / "r").exists()
