"""The ``df.balloon`` pandas accessor: views of a samples frame under other tools' names.

Importing this module registers ``DataFrame.balloon`` on any samples frame (index ``time``,
``guest``, stats in bytes/counts, ``actual``, ``rss``...). The views never change the frame:
:meth:`BalloonAccessor.libvirt` renames and rescales like ``virsh dommemstat``,
:meth:`BalloonAccessor.used` puts the four peers' "used memory" formulas side by side so
their disagreement is visible rather than guessed away, :meth:`BalloonAccessor.rates`
turns cumulative counters into per-second rates that never go negative across a reset,
:meth:`BalloonAccessor.pressure` classifies memory pressure per window from Linux 6.12's
reclaim counters (:func:`balloonlab.analysis.pressure.classify_pressure`),
:meth:`BalloonAccessor.attribution` says where every byte is, host side and guest side
(:func:`balloonlab.analysis.attribution.attribution`), and :meth:`BalloonAccessor.plot`,
:meth:`BalloonAccessor.plot_pressure` and :meth:`BalloonAccessor.plot_attribution` draw them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from balloonlab.analysis.attribution import attribution
from balloonlab.analysis.measures import EPOCH, column, conform, guest_names, seconds
from balloonlab.analysis.pressure import PressureThresholds, Window, classify_pressure
from balloonlab.model.schema import LIBVIRT_ROWS, STATS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Counter column -> rate column made by :meth:`BalloonAccessor.rates`.
#: Every counter of the schema: ``major_faults_per_s``, ``swap_in_bytes_per_s``...
RATE_COLUMNS: dict[str, str] = {
    s.name: f"{s.name}_bytes_per_s" if s.unit == "bytes" else f"{s.name}_per_s"
    for s in STATS if s.kind == "counter"}


@pd.api.extensions.register_dataframe_accessor("balloon")
class BalloonAccessor:
    """``samples.balloon``: libvirt's view, the "used memory" definitions, rates, pressure, plots.

    :param frame: a samples frame as the sampler builds it.
    """

    def __init__(self, frame: pd.DataFrame) -> None:
        if len(frame) and "guest" not in frame.columns:
            raise AttributeError("df.balloon needs a samples frame with a 'guest' column")
        self._frame = conform(frame, "samples")

    def libvirt(self) -> pd.DataFrame:
        """The frame as ``virsh dommemstat`` would print it, one row per sample.

        Columns in virsh's order with libvirt's names (``balloonlab.model.stats``' table):
        memory stats, ``actual`` and ``rss`` in KiB truncated (``// 1024``: 1023 bytes is 0
        KiB), counts unchanged, ``last_update`` in epoch seconds (0 when the guest never
        reported, as QEMU and libvirt say). Mind the renames: libvirt's ``available`` is
        MemTotal and ``usable`` is MemAvailable. Where libvirt would leave a stat out (unset,
        or not in this frame), the column is NA; stats libvirt does not map (``oom_kills``...)
        are dropped. The index and ``guest`` are kept.
        """
        f = self._frame
        out = pd.DataFrame({"guest": f["guest"]}, index=f.index)
        for name, source, divisor in LIBVIRT_ROWS:
            if source == "last_update":
                since = pd.Series(column(f, source, "datetime64[ns, UTC]").array) - EPOCH
                whole = (since // pd.Timedelta(seconds=1)).to_numpy(dtype=float, na_value=np.nan)
                out[name] = pd.array(np.nan_to_num(whole, nan=0.0).astype("int64"), dtype="Int64")
            else:
                out[name] = column(f, source).astype("Int64") // divisor
        return out

    def used(self, mom_window: int = 10) -> pd.DataFrame:
        """"Used memory" as four peers define it, side by side, in bytes (NA where unknown).

        - ``virt_manager`` (Int64): ``actual - free_memory`` of each sample (virt-manager:
          current balloon minus libvirt's ``unused``, i.e. guest MemFree).
        - ``exporter`` (Int64): ``total_memory - available_memory`` (Prometheus libvirt
          exporters and KubeVirt: libvirt's ``available`` minus ``usable``, i.e. MemTotal -
          MemAvailable).
        - ``host_rss`` (Int64): ``rss`` (older cockpit: host RSS of the QEMU process).
        - ``mom`` (Float64): oVirt MOM's ``guest_used_mem``, ``(- (guest.StatAvg
          "balloon_cur") (guest.StatAvg "mem_unused"))`` (oVirt/mom ``doc/balloon.rules``,
          ``shrink_guest`` and ``grow_guest``): a moving average. ``balloon_cur`` is
          virDomainGetInfo's current memory, i.e. ``actual``, and ``mem_unused`` libvirt's
          ``unused``, i.e. ``free_memory`` (``mom/HypervisorInterfaces/libvirtInterface.py``).
          MOM keeps a guest's last ``sample-history-length`` (default 10) samples and keeps a
          sample only when every field came in (``doc/mom-balloon.conf``'s GuestMemory and
          GuestBalloon collectors make both fields mandatory); ``Entity.StatAvg`` is the mean
          over the samples it holds, fewer while its history fills. So here, per guest in
          time order: the rows with both ``actual`` and ``free_memory`` are MOM's samples;
          on each of them ``mom`` is the mean of ``actual`` over the guest's last
          ``mom_window`` such rows (this one included) minus the mean of ``free_memory`` over
          the same rows; a row missing either value is NA and takes no place in the window.
          MOM samples every ``guest-monitor-interval`` (default 5 s), so its window spans
          about 50 s; here a window is ``mom_window`` rows of this frame, one per new stats
          report (about 10 s at a 1 s period). The means are not rounded. While memory
          moves, ``mom`` lags ``virt_manager``; with ``mom_window=1`` the two agree.

        :param mom_window: how many of a guest's complete rows ``mom`` averages (MOM's
            ``sample-history-length``).
        :returns: index and ``guest`` kept; columns ``virt_manager``, ``exporter``,
            ``host_rss``, ``mom``.
        :raises ValueError: when ``mom_window`` is not a whole number of rows >= 1.
        """
        if isinstance(mom_window, bool) or not isinstance(mom_window, int) or mom_window < 1:
            raise ValueError(f"mom_window must be a whole number of rows >= 1, not {mom_window!r}")
        f = self._frame
        actual, free = column(f, "actual").astype("Int64"), column(f, "free_memory").astype("Int64")
        total = column(f, "total_memory").astype("Int64")
        avail = column(f, "available_memory").astype("Int64")
        # MOM's history: each guest's complete samples in time order; results go back in place.
        order = np.argsort(seconds(f.index), kind="stable")
        keys = f["guest"].astype(str).to_numpy()[order]
        cur = actual.to_numpy(dtype=float, na_value=np.nan)[order]
        unused = free.to_numpy(dtype=float, na_value=np.nan)[order]
        complete = ~(np.isnan(cur) | np.isnan(unused))

        def stat_avg(values: np.ndarray) -> np.ndarray:
            history = pd.Series(values[complete]).groupby(keys[complete])
            means: np.ndarray = history.transform(
                lambda s: s.rolling(mom_window, min_periods=1).mean()).to_numpy(dtype=float)
            return means

        in_time_order = np.full(len(order), np.nan)
        in_time_order[complete] = stat_avg(cur) - stat_avg(unused)
        mom = np.empty(len(order))
        mom[order] = in_time_order
        return pd.DataFrame({
            "guest": f["guest"],
            "virt_manager": actual - free,
            "exporter": total - avail,
            "host_rss": column(f, "rss").astype("Int64"),
            "mom": pd.array(mom, dtype="Float64"),
        }, index=f.index)

    def rates(self) -> pd.DataFrame:
        """Per-guest rates of the cumulative counters, per second (Float64).

        One column per counter of the schema (:data:`RATE_COLUMNS`: ``major_faults_per_s``,
        ``swap_in_bytes_per_s``...): the counter's rise since the guest's previous row over the
        seconds between the two reads (the index). QEMU's ``last_update`` has whole-second
        resolution, so at a 1 s period its differences are 0 or 2 whenever the report phase
        crosses a second boundary; the sampler reads each report a few ms after it lands (its
        reads are phase-locked to the reports), so read-time differences are the report
        intervals to within that jitter. NA on each guest's first row, on a
        row flagged ``reset``, where the counter went down (a reset that was not flagged),
        where a counter is missing, and where no time passed: a rate is never negative and
        never spikes across a reset. Rows keep the frame's order, index and ``guest``.
        """
        f = self._frame
        order = np.argsort(seconds(f.index), kind="stable")
        s = f.iloc[order]
        keys = s["guest"].astype(str).to_numpy()
        # Previous row of the same guest: a groupby shift keeps guests apart.
        read = pd.Series(seconds(s.index))
        dt = (read - read.groupby(keys).shift(1)).to_numpy()
        reset = column(s, "reset", "boolean").fillna(False).to_numpy(dtype=bool)
        out = pd.DataFrame({"guest": s["guest"].array}, index=s.index)
        for counter, name in RATE_COLUMNS.items():
            values = pd.Series(column(s, counter).to_numpy(dtype=float, na_value=np.nan))
            rise = (values - values.groupby(keys).shift(1)).to_numpy(dtype=float, na_value=np.nan)
            bad = reset | ~(rise >= 0) | ~(dt > 0)
            rate = np.where(bad, np.nan, rise / np.where(dt > 0, dt, 1.0))
            out[name] = pd.array(rate, dtype="Float64")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return out.iloc[inverse]

    def pressure(self, window: Window | None = None,
                 thresholds: PressureThresholds | None = None) -> pd.DataFrame:
        """Memory-pressure regime per guest and window from Linux 6.12's reclaim counters.

        :func:`balloonlab.analysis.pressure.classify_pressure` of this frame: ``critical``
        (OOM kills), ``thrashing``, ``global``, ``cgroup`` (stalls, told apart by direct
        scanning and its reclaim/scan ratio), ``struggling``, ``background``, ``none``, or
        ``unknown`` where the counters are NA (QEMU < 9.2 or Linux < 6.12), beside the rates
        and ratios that decided it.

        :param window: ``"10s"``, a Timedelta, or a number of report intervals (default:
            ``thresholds.window``).
        :param thresholds: :class:`~balloonlab.analysis.pressure.PressureThresholds` (default
            thresholds when None).
        """
        return classify_pressure(self._frame, window=window, thresholds=thresholds)

    def plot_pressure(self, window: Window | None = None, thresholds: PressureThresholds | None = None,
                      **kw: Any) -> Figure:
        """:meth:`pressure` drawn by :func:`balloonlab.analysis.pressure_plot.plot_pressure`.

        :param window: as for :meth:`pressure`.
        :param thresholds: as for :meth:`pressure`.
        :param kw: passed on to ``plot_pressure`` (``guests=``, ``yscale=``, ``fig=``).
        """
        from balloonlab.analysis.pressure_plot import plot_pressure
        return plot_pressure(self.pressure(window, thresholds), **kw)

    def attribution(self, ram_size: int | Mapping[str, int] | None = None) -> pd.DataFrame:
        """Each sample's memory by where it is: VMM (TCG buffer, other), guest used, page cache,
        reserved, free but still resident on the host, free and not resident, ballooned out,
        virtio-mem unplugged (:func:`balloonlab.analysis.attribution.attribution`, bytes).

        :param ram_size: the guest's RAM size where the host columns do not give it.
        """
        return attribution(self._frame, ram_size=ram_size)

    def plot_attribution(self, events: pd.DataFrame | None = None, **kw: Any) -> Figure:
        """:meth:`attribution` stacked over time by
        :func:`balloonlab.analysis.attribution_plot.plot_attribution`.

        :param events: the events frame, for the markers.
        :param kw: passed on (``guests=``, ``window=``, ``ram_size=``, ``fig=``).
        """
        from balloonlab.analysis.attribution_plot import plot_attribution
        return plot_attribution(self._frame, events, **kw)

    def per_guest(self) -> dict[str, pd.DataFrame]:
        """The frame split by guest, each part in time order: ``{name: frame}``."""
        f = self._frame
        return {g: f[(f["guest"].astype(str) == g).to_numpy()].sort_index(kind="stable")
                for g in guest_names(f)}

    def plot(self, **kw: Any) -> Figure:
        """Plot the samples with :func:`balloonlab.analysis.plotting.plot_memory` (``events=``, ...).

        :param kw: passed on to ``plot_memory``.
        """
        from balloonlab.analysis.plotting import plot_memory
        return plot_memory(self._frame, **kw)
