"""A live sampler's latest data per guest as Prometheus metrics, on an HTTP endpoint of its own.

:func:`serve_metrics` serves prometheus_client's WSGI app (OpenMetrics to a scraper that asks for it,
else the text format) over a private registry holding one :class:`SamplerCollector`. A scrape runs on
the server's thread while the sampler appends rows on its loop, and a row buffer is not thread-safe:
the collector asks the loop for a snapshot of the rows since its last scrape (a cursor: O(chunks) on
the loop, only new rows built into a frame here) and keeps each guest's latest row. Kinds and units
come from :data:`~balloonlab.model.schema.STATS`; a stat that is NA is left out, never 0."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pandas as pd
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from balloonlab.model.errors import BalloonLabError
from balloonlab.model.guest import LOCAL_HOST
from balloonlab.model.schema import STATS, STATS_BY_NAME

if TYPE_CHECKING:
    from balloonlab.record.buffer import BufferSnapshot
    from balloonlab.record.sampler import Sampler

log = logging.getLogger(__name__)
PREFIX = "balloonlab_guest_"
#: The longest a scrape waits for the sampler's loop (well under Prometheus's 10 s scrape timeout).
LOOP_TIMEOUT_S = 2.0
#: A guest's latest sample is stale when it is older than this many stats periods.
STALE_PERIODS = 2
STATES = ("starting", "sampling", "dead", "failed", "removed")
_LABELS = ("guest", "host")
_Taken = tuple["BufferSnapshot", dict[str, tuple[str, int, str]]]
#: Sample columns beyond the stats, exposed as gauges: column -> (name, unit, help).
_EXTRA: dict[str, tuple[str, str, str]] = {
    "actual": (PREFIX + "actual_bytes", "bytes", "The guest's memory with the balloon (QEMU's actual)."),
    "target": (PREFIX + "target_bytes", "bytes", "The balloon target balloonlab last set."),
    "rss": (PREFIX + "rss_bytes", "bytes", "Resident memory of the guest's QEMU process (libvirt's rss)."),
    "period_s": (PREFIX + "stats_period_seconds", "seconds", "The guest's stats polling period."),
    "last_update": (PREFIX + "stats_last_update_timestamp_seconds", "seconds", "QEMU's last-update, its host's clock."),
}


def metric_name(source: str) -> str:
    """The sample name a stat or exposed column goes by (``free_memory`` -> ``balloonlab_guest_free_memory_bytes``;
    counters end in ``_total``). :raises KeyError: neither a stat of STATS nor an exposed column."""
    if source in _EXTRA:
        return _EXTRA[source][0]
    stat = STATS_BY_NAME[source]
    return f"{PREFIX}{stat.name}{'_bytes' * (stat.unit == 'bytes')}{'_total' * (stat.kind == 'counter')}"


@dataclass(frozen=True)
class NameMap:
    """A balloonlab metric and its name in two libvirt exporters and KubeVirt (None: not there); all bytes."""

    source: str  #: a stat of STATS or an exposed sample column (actual, rss, last_update)
    libvirt_exporter: str | None  #: Tinkoff/libvirt-exporter
    prometheus_libvirt_exporter: str | None  #: inovex/prometheus-libvirt-exporter
    kubevirt: str | None
    note: str = ""

    @property
    def balloonlab(self) -> str:
        """balloonlab's own name for it."""
        return metric_name(self.source)


# Names as read in (never guessed): Tinkoff/libvirt-exporter libvirt_exporter.go @9a7c69f9 (memoryStatCollect:
# libvirt tag -> metric; it sends 0 for a stat the guest did not); inovex/prometheus-libvirt-exporter
# pkg/exporter/prometheus-libvirt-exporter.go @8dbcadd5 (CollectDomainMemoryStatInfo: balloon.* -> metric);
# kubevirt/kubevirt pkg/monitoring/metrics/virt-handler/domainstats/memory_metrics.go @06d24091 with
# pkg/virt-launcher/virtwrap/statsconv/converter.go @f9e39e8c, as listed in docs/observability/metrics.md.
_L, _K = "libvirt_domain_memory_stats_", "kubevirt_vmi_memory_"
NAME_MAP: tuple[NameMap, ...] = (
    NameMap("free_memory", _L + "unused_bytes", _L + "unused_bytes", _K + "unused_bytes", "MemFree"),
    NameMap("total_memory", _L + "available_bytes", _L + "available_bytes", _K + "available_bytes", "MemTotal"),
    NameMap("available_memory", _L + "usable_bytes", _L + "usable_bytes", _K + "usable_bytes", "MemAvailable"),
    NameMap("disk_caches", _L + "disk_cache_bytes", _L + "disk_caches_bytes", None,
            f"KubeVirt's {_K}cached_bytes is documented as Buffers + Cached + SwapCached"),
    NameMap("swap_in", None, _L + "swap_in_bytes", _K + "swap_in_traffic_bytes", "a gauge in both"),
    NameMap("swap_out", None, _L + "swap_out_bytes", _K + "swap_out_traffic_bytes", "a gauge in both"),
    NameMap("major_faults", _L + "major_fault_total", _L + "major_fault_total", _K + "pgmajfault_total"),
    NameMap("minor_faults", _L + "minor_fault_total", _L + "minor_fault_total", _K + "pgminfault_total"),
    NameMap("htlb_pgalloc", None, _L + "hugetlb_pgalloc_total", None, "a gauge there"),
    NameMap("htlb_pgfail", None, _L + "hugetlb_pgfail_total", None, "a gauge there"),
    NameMap("actual", _L + "actual_balloon_bytes", _L + "current_balloon_bytes", _K + "actual_balloon_bytes",
            f"the guest's size, not the balloon's; {_K}domain_bytes is virDomainGetInfo's memory"),
    NameMap("rss", _L + "rss_bytes", _L + "rss_bytes", _K + "resident_bytes"),
    NameMap("last_update", None, _L + "last_update_timestamp_seconds", None),
)


def name_map_markdown() -> str:
    """:data:`NAME_MAP` as a markdown table (the README's)."""
    rows = ["| balloonlab | libvirt-exporter | prometheus-libvirt-exporter | KubeVirt | note |", "|---" * 5 + "|"]
    for m in NAME_MAP:
        names = (m.balloonlab, m.libvirt_exporter, m.prometheus_libvirt_exporter, m.kubevirt)
        rows.append("| " + " | ".join(f"`{n}`" if n else "-" for n in names) + f" | {m.note} |")
    return "\n".join(rows)


class SamplerCollector(Collector):
    """A collector of one sampler's latest row per guest; ``sampler`` is read only on ``loop``, its own."""

    def __init__(self, sampler: Sampler, loop: asyncio.AbstractEventLoop) -> None:
        self._sampler, self._loop, self._cursor = sampler, loop, 0  # the cursor: the next row number to read
        self._lock = threading.Lock()  # two scrapes at once (a thread per request) share the cursor
        self._latest: dict[str, dict[str, Any]] = {}  # guest -> its latest row's values (None: NA)
        self._resets: dict[str, tuple[int, float]] = {}  # guest -> (resets seen, time of the last)
        self._states: dict[str, tuple[str, int, str]] = {}  # guest -> (state, samples, host), as of the last answer

    def collect(self) -> Iterable[Metric]:
        """The metric families of this scrape (called by the registry, on the HTTP thread)."""
        with self._lock:
            responsive = self._refresh()
            return self._families(time.time(), responsive)

    def _take(self) -> _Taken:
        """On the loop: the rows since the cursor, frozen, and every guest's state."""
        states = {name: (s.state, s.samples, s.host) for name, s in self._sampler.states().items()}
        return self._sampler.samples_snapshot(since_row=self._cursor), states

    def _refresh(self) -> bool:
        """Read what is new from the loop (waiting for it: never call this there); False if it did not answer."""
        future: Future[_Taken] = Future()  # a plain callback: no task appears on the sampler's loop

        def take() -> None:
            if future.set_running_or_notify_cancel():  # False: the scrape gave up already
                try:
                    future.set_result(self._take())
                except BaseException as exc:  # handed to the waiting thread
                    future.set_exception(exc)
        try:
            self._loop.call_soon_threadsafe(take)
            snapshot, self._states = future.result(LOOP_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:  # busy for seconds, or closed
            future.cancel()
            log.warning("metrics: no answer from the sampler's loop (%r): last values served", exc)
            return False
        if len(snapshot):
            self._cursor = snapshot.start + len(snapshot)
            self._absorb(snapshot.frame())
        return True

    def _absorb(self, frame: pd.DataFrame) -> None:
        """Keep each guest's latest row and count resets, column by column (a row at a time: 1 ms a guest)."""
        latest = frame.groupby("guest", observed=True, sort=False).tail(1)  # in time order: the latest is last
        columns = {c: _values(latest[c]) for c in (*STATS_BY_NAME, *_EXTRA, "host", "clock_offset_s")
                   if c in latest.columns}
        for i, (guest, at) in enumerate(zip(latest["guest"].astype(str), latest.index.asi8 / 1e9, strict=True)):
            self._latest[guest] = {c: values[i] for c, values in columns.items()} | {"time": at}
        resets = frame[frame["reset"].to_numpy(dtype=bool)]
        for guest, rows in resets.groupby("guest", observed=True, sort=False):
            seen = self._resets.get(str(guest), (0, 0.0))[0]
            self._resets[str(guest)] = (seen + len(rows), rows.index[-1].timestamp())

    def _families(self, now: float, responsive: bool) -> list[Metric]:
        def family(name: str, doc: str, unit: str = "", counter: bool = False) -> Metric:
            kind = CounterMetricFamily if counter else GaugeMetricFamily
            return kind(name.removesuffix("_total"), doc, labels=_LABELS, unit=unit)

        up = family(PREFIX + "up", "1 while balloonlab samples the guest; 0 once it is dead, failed or removed.")
        state = StateSetMetricFamily(PREFIX + "sampling_state", "How sampling the guest goes.", labels=_LABELS)
        samples = family(PREFIX + "samples", "Samples recorded since the guest was added.", counter=True)
        resets = family(PREFIX + "resets", "Guest resets seen in the samples (its counters restart).", counter=True)
        stale = family(PREFIX + "stale", f"1 when the latest sample is older than {STALE_PERIODS} stats periods.")
        age = family(PREFIX + "stats_age_seconds", "Now minus the latest sample's last-update.", "seconds")
        columns = {c: family(name, doc, unit) for c, (name, unit, doc) in _EXTRA.items()}
        columns |= {s.name: family(metric_name(s.name), f"QEMU's {s.qemu_key} ({s.unit}, {s.kind}).",
                                   "bytes" if s.unit == "bytes" else "", s.kind == "counter") for s in STATS}
        for guest in sorted(self._states.keys() | self._latest.keys()):
            row = self._latest.get(guest, {})
            sampling, count, host = self._states.get(guest, ("removed", 0, str(row.get("host") or LOCAL_HOST)))
            labels = [guest, host]
            seen, reset_at = self._resets.get(guest, (0, None))
            for metric, value in ((up, float(sampling == "sampling")), (samples, count), (resets, seen)):
                _add(metric, labels, value)
            state.add_metric(labels, {name: name == sampling for name in STATES})
            if not row:
                continue
            period = row.get("period_s") or 0  # 0: polling is off, so every sample is stale
            _add(stale, labels, float(not period or now - row["time"] > STALE_PERIODS * period))
            if row.get("last_update") is not None and row.get("clock_offset_s") is not None:
                _add(age, labels, now - (row["last_update"] - row["clock_offset_s"]))  # on this clock, like age_s
            for column, metric in columns.items():
                if row.get(column) is not None:  # NA (unset, the 2^64-1 sentinel, no column yet): left out
                    _add(metric, labels, float(row[column]), reset_at)
        loop_ok = GaugeMetricFamily("balloonlab_sampler_loop_responsive", "1 when the sampler's loop answered this "
                                    "scrape; 0: these are the values of the last one it answered.", float(responsive))
        return [up, state, samples, resets, stale, age, *columns.values(), loop_ok]


def _values(column: pd.Series) -> list[Any]:
    """A frame column as Python values, None for NA (left out), epoch seconds for a time."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        column = (column - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return list(column.to_numpy(dtype=object, na_value=None))


def _add(metric: Metric, labels: list[str], value: float, reset_at: float | None = None) -> None:
    if isinstance(metric, CounterMetricFamily):  # _created: the last reset, when the guest's counters restarted
        metric.add_metric(labels, value, created=reset_at)
    else:
        cast(GaugeMetricFamily, metric).add_metric(labels, value)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # a scrape every few seconds would flood stderr
        pass


class MetricsEndpoint:
    """A running ``/metrics`` endpoint (:func:`serve_metrics`); a context manager that closes it."""

    def __init__(self, server: ThreadingWSGIServer, thread: threading.Thread, addr: str) -> None:
        self._server, self._thread, self._closing, self._closed = server, thread, threading.Lock(), False
        self.port: int = server.server_port
        self.url = f"http://{f'[{addr}]' if ':' in addr else addr}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and join the server's thread (idempotent; blocks up to a tenth of a second)."""
        with self._closing:
            if not self._closed:
                self._closed = True
                self._server.shutdown()
                self._server.server_close()
                self._thread.join()

    async def aclose(self) -> None:
        """:meth:`close` off the loop, so a scrape waiting for the loop is answered meanwhile."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(sampler: Sampler, port: int = 0, addr: str = "127.0.0.1") -> MetricsEndpoint:
    """Serve ``sampler``'s latest data per guest at ``http://addr:port/metrics`` until closed. Call it on
    the sampler's loop (``SyncSampler.serve_metrics`` is the blocking twin); a sampler with
    :class:`MetricsSide` closes the endpoint when it stops.

    :param port: TCP port; 0 takes any free one (see ``.port`` / ``.url``).
    :param addr: address to listen on (default: this host only).
    :raises BalloonLabError: the port is in use or the address cannot be bound (the message says which).
    :raises RuntimeError: called outside a running event loop.
    """
    registry = CollectorRegistry(auto_describe=False)  # private: never the process-wide REGISTRY
    registry.register(SamplerCollector(sampler, asyncio.get_running_loop()))

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    try:
        server = make_server(addr, port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise BalloonLabError(f"cannot serve metrics on {addr}:{port}: the port is in use (another exporter, "
                                  "or a second recording?); pass another port, or 0 for any free one") from None
        raise BalloonLabError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; pass another "
                              "address or port") from None
    # A short poll: close() waits for serve_forever to notice, and may run on the sampler's loop.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"balloonlab-metrics-{server.server_port}", daemon=True)
    thread.start()
    endpoint = MetricsEndpoint(server, thread, addr)
    if isinstance(sampler, MetricsSide):
        sampler._metrics_endpoints = (*sampler._metrics_endpoints, endpoint)
    return endpoint


class MetricsSide:
    """The Sampler's metrics half (a mixin): endpoints it serves, closed by its ``stop()`` (:meth:`_close_metrics`)."""

    _metrics_endpoints: tuple[MetricsEndpoint, ...] = ()

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve this sampler's latest data per guest as Prometheus metrics (see :func:`serve_metrics`)."""
        return serve_metrics(cast("Sampler", self), port, addr)

    async def _close_metrics(self) -> None:
        endpoints, self._metrics_endpoints = self._metrics_endpoints, ()
        for endpoint in endpoints:
            await endpoint.aclose()
