"""The plot of a policy run: the guests' summed footprint against the budget, and each guest's
balloon (target, actual) beside what its workload held, with the policy's errors marked.

A pure function over a :class:`~balloonlab.record.store.Run` (or its three frames); it returns a
:class:`matplotlib.figure.Figure` and never touches pyplot's global state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from balloonlab.analysis.plotting import utc_time_axis

MiB = 1 << 20


def plot_policy_run(run: Any, *, fig: Figure | None = None, title: str | None = None) -> Figure:
    """Top: the guests' resident guest RAM stacked (what a budget counts; QEMU RSS where a guest's
    RAM is unknown), with the budget (host frame); below, one axes per guest: target, actual and
    the workload's holding (events), with ``policy_error`` marks.

    :param run: a Run (``samples``, ``events``, ``host`` frames and ``metadata``).
    """
    samples: pd.DataFrame = run.samples
    events: pd.DataFrame = run.events
    host: pd.DataFrame = getattr(run, "host", pd.DataFrame())
    guests = sorted(map(str, samples["guest"].unique())) if len(samples) else []
    fig = fig or Figure(figsize=(10, 2.2 * (len(guests) + 1.3)), layout="constrained")
    axes = fig.subplots(len(guests) + 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    if len(host):
        names = sorted({c.split(".", 1)[1] for c in host.columns if c.startswith(("rss.", "guest_ram."))})
        x = host.index

        def footprint(name: str) -> np.ndarray:
            ram = host.get(f"guest_ram.{name}", pd.Series(pd.NA, index=host.index, dtype="Float64"))
            rss = host.get(f"rss.{name}", pd.Series(pd.NA, index=host.index, dtype="Float64"))
            return np.asarray(ram.astype("Float64").fillna(rss.astype("Float64")).fillna(0).to_numpy(float)) / MiB
        if names:
            top.stackplot(x, np.vstack([footprint(n) for n in names]), labels=names, alpha=0.75)
        rss_columns = names
        if "budget" in host and host["budget"].notna().any():
            top.plot(x, host["budget"].astype("Float64").to_numpy(float) / MiB, color="crimson", lw=1.6,
                     ls="--", label="budget")
        top.legend(loc="upper left", fontsize=7, ncol=min(6, len(rss_columns) + 1))
    top.set_ylabel("guest RAM (MiB)")
    policy = (getattr(run, "metadata", {}) or {}).get("policy") or {}
    top.set_title(title or f"policy: {policy.get('name', 'none')}")
    for ax, name in zip(axes[1:], guests, strict=True):
        rows = samples[samples["guest"] == name]
        for column, style in (("actual", {"color": "tab:orange", "lw": 1.8}),
                              ("target", {"color": "tab:red", "lw": 1.2, "ls": "--"}),
                              ("available_memory", {"color": "tab:blue", "lw": 1.0})):
            if column in rows:
                ax.plot(rows.index, rows[column].astype("Float64").to_numpy(float) / MiB, drawstyle="steps-post",
                        label=column, **style)
        mine = events[events["guest"] == name] if len(events) else events
        held = mine[mine["kind"] == "workload"] if len(mine) else mine
        if len(held):
            ax.plot(held.index, held["value"].astype("Float64").to_numpy(float) / MiB, drawstyle="steps-post",
                    color="tab:purple", lw=1.2, label="workload held")
        errors = mine[mine["kind"] == "policy_error"] if len(mine) else mine
        for at in errors.index:
            ax.axvline(at, color="crimson", lw=0.8, alpha=0.6)
        ax.set_ylabel(f"{name} (MiB)")
        ax.legend(loc="upper left", fontsize=7, ncol=4)
    utc_time_axis(axes, empty=None if len(samples) else "no samples")
    return fig
