"""A replay's runs side by side: host footprint against the budget, each guest's allotment, scores.

:func:`plot_replay` takes a :class:`balloonlab.experiments.replay.ReplayResult` (any object with
its ``runs()``, ``table()`` and ``budget``: this layer does not import experiments) and returns a
matplotlib Figure built without pyplot, so it works under the Agg backend, in a notebook and in
a test alike.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from typing import Any, Protocol

import pandas as pd
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
from matplotlib.figure import Figure

from balloonlab.analysis.policy_score import footprint_series

GiB = float(1 << 30)
#: The scores drawn as bars, with their titles and the factor to their unit.
BARS: tuple[tuple[str, str, float], ...] = (
    ("footprint_gib_s", "footprint (GiB·s)", 1.0),
    ("pressure_s", "guest pressure (s)", 1.0),
    ("pressure_depth_mib_s", "pressure depth (MiB·s)", 1.0),
    ("swap_bytes", "swap traffic (MiB)", 1.0 / (1 << 20)),
    ("target_changes", "target changes", 1.0),
    ("budget_violation_s", "over budget (s)", 1.0),
)


class ReplayLike(Protocol):
    """What :func:`plot_replay` reads of a replay."""

    budget: int | None

    def runs(self) -> Mapping[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]]: ...

    def table(self, **kwargs: Any) -> pd.DataFrame: ...


def plot_replay(result: ReplayLike, *, figsize: tuple[float, float] | None = None) -> Figure:
    """One column per run (``live`` first): Σ footprint against the budget over time (top), each
    guest's allotment, ``actual`` (middle); a row of bar panels of the scores (bottom)."""
    runs = dict(result.runs())
    table = result.table()
    ncols = max(len(runs), 1)
    fig = Figure(figsize=figsize or (4.2 * max(ncols, 3), 9.5), layout="constrained")
    grid = fig.add_gridspec(3, 1, height_ratios=(1.0, 1.0, 0.9))
    top = grid[0:2].subgridspec(2, ncols)
    first_top = first_mid = None
    for col, (name, (samples, host, _events)) in enumerate(runs.items()):
        ax = fig.add_subplot(top[0, col], sharey=first_top)
        first_top = first_top or ax
        fp = footprint_series(samples, host)
        if len(fp):
            ax.step(fp.index, fp.to_numpy(dtype=float) / GiB, where="post", label="Σ guest RAM")
        if result.budget is not None:
            ax.axhline(result.budget / GiB, color="tab:red", linestyle="--", label="budget")
        ax.set_title(name)
        ax.set_ylabel("GiB" if col == 0 else "")
        ax.legend(loc="upper right", fontsize="small")
        mid = fig.add_subplot(top[1, col], sharey=first_mid, sharex=ax)
        first_mid = first_mid or mid
        if len(samples) and "actual" in samples.columns:
            for guest, rows in samples.groupby(samples["guest"].astype(str), observed=True):
                values = pd.to_numeric(rows["actual"], errors="coerce").to_numpy(dtype=float, na_value=float("nan"))
                mid.step(rows.index, values / GiB, where="post", label=str(guest))
            mid.legend(loc="upper right", fontsize="small")
        mid.set_ylabel("allotment (GiB)" if col == 0 else "")
        # Short UTC labels: six runs side by side leave little room (matplotlib.dates is unannotated).
        locator = AutoDateLocator(tz=_dt.UTC, minticks=3, maxticks=7)  # type: ignore[no-untyped-call]
        mid.xaxis.set_major_locator(locator)
        mid.xaxis.set_major_formatter(ConciseDateFormatter(locator, tz=_dt.UTC))  # type: ignore[no-untyped-call]
        ax.tick_params(axis="x", labelbottom=False)
    bars = grid[2].subgridspec(1, len(BARS))
    labels = [str(i) for i in table.index]
    for k, (measure, title, factor) in enumerate(BARS):
        ax = fig.add_subplot(bars[0, k])
        values = (pd.to_numeric(table[measure], errors="coerce").astype(float) * factor).fillna(0.0) \
            if measure in table.columns else pd.Series([0.0] * len(labels))
        ax.bar(range(len(labels)), values.to_numpy(), color=[f"C{i}" for i in range(len(labels))])
        ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize="small")
        ax.set_title(title, fontsize="small")
    return fig
