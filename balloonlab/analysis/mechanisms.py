"""The mechanisms comparison's table and figure, from its per-run rows (pure functions).

Rows come from :func:`balloonlab.experiments.compare.compare_mechanisms`: one per mechanism and
repetition, with the measured times (s) and bytes. :func:`compare_table` reduces them to one
row per mechanism: the median of each measure and its spread (the lowest and highest run),
what the host got back as a share of the shrink, and the run counts; :func:`plot_compare`
draws the four measures that differ most between mechanisms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["MEASURES", "STEPS", "compare_table", "plot_compare", "plot_footprint"]

#: Per-run measures the table summarises (median, min, max), in table order.
MEASURES: tuple[str, ...] = (
    "shrink_s", "grow_s", "host_returned_bytes", "rss_shrunk_bytes", "free_returned_bytes", "free_return_s",
    "shrink_minor_faults", "shrink_major_faults", "shrink_alloc_stalls", "touch_s", "retouch_s", "retouch2_s",
)


#: The steps of a run, in order, as the RSS trace names them.
STEPS: tuple[str, ...] = ("touch", "free", "shrink", "grow", "re-touch", "done")


def compare_table(rows: pd.DataFrame, *, shrink_bytes: int) -> pd.DataFrame:
    """One row per mechanism (in the rows' order): ``runs``, ``reached`` (runs where the guest
    reached both targets), for each of :data:`MEASURES` its median and ``_min``/``_max``, and
    ``host_returned_pct``: the median host memory returned as a percentage of ``shrink_bytes``.

    :param rows: the per-run rows (``mechanism`` and the measures).
    :param shrink_bytes: what every run shrank the guest by.
    :raises ValueError: rows without a ``mechanism`` column.
    """
    if "mechanism" not in rows.columns:
        raise ValueError("compare_table takes compare_mechanisms()'s per-run rows (a 'mechanism' column)")
    out = []
    for name in dict.fromkeys(rows["mechanism"]):
        runs = rows[rows["mechanism"] == name]
        row: dict[str, object] = {"mechanism": name, "runs": len(runs),
                                  "reached": int((runs["shrink_reached"] & runs["grow_reached"]).sum())}
        for measure in MEASURES:
            values = pd.to_numeric(runs[measure], errors="coerce").dropna()
            row[measure] = values.median() if len(values) else float("nan")
            row[f"{measure}_min"] = values.min() if len(values) else float("nan")
            row[f"{measure}_max"] = values.max() if len(values) else float("nan")
        row["host_returned_pct"] = 100.0 * float(row["host_returned_bytes"]) / shrink_bytes  # type: ignore[arg-type]
        out.append(row)
    return pd.DataFrame(out)


def plot_compare(table: pd.DataFrame) -> Figure:
    """Four panels, one bar per mechanism with its spread as an error bar: time to shrink and
    to grow (s), host memory returned by the shrink and by freeing (MiB), re-touch time after
    the grow (touch and touch2, s)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 6.5), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    names = list(table["mechanism"])
    x = range(len(names))
    panels = [
        ("time to take memory back and give it again (s)", [("shrink_s", "shrink"), ("grow_s", "grow")], 1.0),
        ("host memory returned (MiB)", [("host_returned_bytes", "by the shrink"),
                                        ("free_returned_bytes", "by freeing in the guest")], 1 / 2**20),
        ("re-touch after the grow (s)", [("retouch_s", "touch"), ("retouch2_s", "touch2")], 1.0),
        ("guest faults during the shrink", [("shrink_minor_faults", "minor"), ("shrink_major_faults", "major")], 1.0),
    ]
    for ax, (title, series, scale) in zip(axes, panels, strict=True):
        width = 0.8 / len(series)
        for k, (col, label) in enumerate(series):
            mid = table[col].astype(float) * scale
            low = (table[col] - table[f"{col}_min"]).astype(float) * scale
            high = (table[f"{col}_max"] - table[col]).astype(float) * scale
            ax.bar([i + (k - (len(series) - 1) / 2) * width for i in x], mid, width, label=label,
                   yerr=[low.fillna(0), high.fillna(0)], capsize=3)
        ax.set_title(title, loc="left", fontsize=10)
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=8)
        ax.grid(True, axis="y", lw=0.4, alpha=0.5)
        ax.legend(fontsize=8, frameon=False)
    return fig


def plot_footprint(trace: pd.DataFrame) -> Figure:
    """QEMU's RSS through each run, one line per mechanism (its first repetition), on a time
    axis from the first touch; the steps of the first mechanism's run shaded and named.

    :param trace: :attr:`balloonlab.experiments.compare.CompareResult.trace`.
    :raises ValueError: an empty trace or one without its columns.
    """
    from matplotlib.figure import Figure

    if trace.empty or not {"mechanism", "repetition", "t_s", "rss", "step"} <= set(trace.columns):
        raise ValueError("plot_footprint takes CompareResult.trace (mechanism, repetition, t_s, rss, step rows)")
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax = fig.subplots()
    first = trace[trace["repetition"] == trace["repetition"].min()]
    for name in dict.fromkeys(first["mechanism"]):
        run = first[first["mechanism"] == name]
        ax.plot(run["t_s"], run["rss"] / 2**20, lw=1.2, label=name)
    lead = first[first["mechanism"] == first["mechanism"].iloc[0]]
    for k, step in enumerate(s for s in STEPS if s in set(lead["step"]) and s != "done"):
        times = lead.loc[lead["step"] == step, "t_s"]
        ax.axvspan(times.min(), times.max(), color="0.5", alpha=0.06 * (1 + k % 2), lw=0)
        ax.text(times.min(), 1.0, f" {step}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    ax.set_xlabel("seconds from the first touch (steps shaded as the first mechanism took them)")
    ax.set_ylabel("QEMU RSS (MiB)")
    ax.grid(True, lw=0.4, alpha=0.5)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    return fig
