"""Which way of taking memory back from a guest is best: the mechanisms side by side.

:func:`compare_mechanisms` runs the same built-in guest and the same workload under each
:class:`Mechanism` (virtio-balloon; with free page reporting; with deflate-on-oom; virtio-mem;
virtio-mem with free page reporting), ``repeat`` times each, a fresh guest every time, all of
the same total size. One run, as HyperAlloc (EuroSys'25) measures it on KVM:

1. **touch**: the guest's agent allocates and touches ``touch`` bytes, then frees them; QEMU's
   RSS is followed for ``free_watch_s``: with free page reporting the guest hands the freed pages
   back (what fell, and how long until 90 % of it had), without it they stay resident on the host;
2. **shrink** the guest by ``shrink`` bytes (a balloon target that much lower, or the virtio-mem
   device's requested size that much lower) until the guest and the host agree: the balloon's
   ``actual`` (or the device's plugged size) reached and QEMU's RSS stopped moving. What the
   host got back is QEMU's RSS before minus after;
3. **grow** it back the same way;
4. **re-touch**: allocate ``touch`` bytes again (first pass, "touch"), free, and again (second
   pass, "touch2"): what giving memory back costs when it is needed again.

RSS is read from /proc/PID/stat (a kept-open file) every ``rss_poll_s``; it "stopped moving"
once it stayed within ``stable_bytes`` for ``stable_s``. The guest side of a move is polled every
``guest_poll_s`` (QEMU's own events come at most once a second: they would round every balloon
move up to a second). With free page reporting, freed memory may already be back on the host
before the shrink, which then returns less: ``rss_shrunk_bytes`` (QEMU's RSS once shrunk) is the
footprint to compare. The guest's own cost of a move (faults,
allocation stalls where the kernel reports them) is the change of its balloon stats over it.
The run's samples and events go to a run folder like any experiment's; the per-run rows and the
table (:func:`balloonlab.analysis.mechanisms.compare_table`) beside them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from balloonlab.analysis.mechanisms import compare_table, plot_compare, plot_footprint
from balloonlab.domain import DomainSpec
from balloonlab.image.builtin import builtin_spec
from balloonlab.model.units import format_size, parse_size
from balloonlab.qemu.guest import Guest
from balloonlab.experiments.compare_run import Progress, run_once
from balloonlab.record.sampler import Sampler
from balloonlab.record.store import new_run_dir

__all__ = ["MECHANISMS", "CompareResult", "CompareSettings", "Mechanism", "compare_mechanisms"]



@dataclass(frozen=True)
class Mechanism:
    """One way of taking memory back.

    :param name: short name, as tables show it.
    :param free_page_reporting: the balloon device reports freed pages (guest 5.7+).
    :param deflate_on_oom: the balloon gives pages back to a guest about to OOM.
    :param virtio_mem: the guest is shrunk and grown by a virtio-mem device, not the balloon.
    """

    name: str
    free_page_reporting: bool = False
    deflate_on_oom: bool = False
    virtio_mem: bool = False


#: The mechanisms compared by default, in table order.
MECHANISMS: tuple[Mechanism, ...] = (
    Mechanism("balloon"),
    Mechanism("balloon+fpr", free_page_reporting=True),
    Mechanism("balloon+deflate-on-oom", deflate_on_oom=True),
    Mechanism("virtio-mem", virtio_mem=True),
    Mechanism("virtio-mem+fpr", virtio_mem=True, free_page_reporting=True),
)


@dataclass(frozen=True)
class CompareSettings:
    """What every mechanism is put through. Sizes in bytes.

    :param memory: the guest's total memory (for virtio-mem: boot memory plus the device).
    :param touch: bytes the agent touches, frees, and touches again after the grow.
    :param shrink: bytes the guest is shrunk by (a multiple of virtio-mem's 2 MiB blocks).
    :param repeat: fresh guests per mechanism.
    :param period_s: the balloon stats period of the guests.
    :param rss_poll_s: how often QEMU's RSS is read while waiting for it to settle.
    :param guest_poll_s: how often the balloon's ``actual`` or the device's plugged size is
        read during a move.
    :param free_watch_s: how long RSS is followed after the guest frees: free page reporting
        waits 2 s before it reports (the kernel's ``PAGE_REPORTING_DELAY``), then works in chunks.
    :param stable_s: how long RSS must stay within ``stable_bytes`` to have stopped moving.
    :param timeout_s: the longest a step waits for the guest or the host.
    """

    memory: int = 768 << 20
    touch: int = 256 << 20
    shrink: int = 256 << 20
    repeat: int = 3
    period_s: int = 1
    rss_poll_s: float = 0.05
    guest_poll_s: float = 0.01
    free_watch_s: float = 6.0
    stable_s: float = 1.0
    stable_bytes: int = 2 << 20
    timeout_s: float = 60.0

    @classmethod
    def quick(cls) -> CompareSettings:
        """About a minute for the five mechanisms: one 512 MiB guest each, 128 MiB moves."""
        return cls(memory=512 << 20, touch=128 << 20, shrink=128 << 20, repeat=1, free_watch_s=3.5, stable_s=0.5)


@dataclass(frozen=True)
class CompareResult:
    """A comparison's outcome: one row per mechanism and repetition, the table, QEMU's RSS as
    the runs read it (every ``rss_poll_s``: ``mechanism``, ``repetition``, ``t_s`` from the first
    touch, ``rss``, ``step``), the run folder."""

    rows: pd.DataFrame
    table: pd.DataFrame
    trace: pd.DataFrame
    path: Path | None


async def compare_mechanisms(mechanisms: Sequence[Mechanism] = MECHANISMS,
                             settings: CompareSettings | None = None, *,
                             spec: Callable[[str, Mechanism, CompareSettings], DomainSpec] | None = None,
                             run_root: str | Path | None = "runs", progress: Progress | None = None) -> CompareResult:
    """Run every mechanism ``settings.repeat`` times on a fresh guest; see the module docstring.

    :param spec: builds each guest's domain (default :func:`builtin_mechanism_spec`).
    :param run_root: where the run folder is made (None: nothing written).
    :param progress: receives a line per step.
    :raises ValueError: a shrink that leaves the guest too little, or sizes virtio-mem cannot do.
    """
    s = settings or CompareSettings()
    if s.shrink % (2 << 20) or s.shrink <= 0 or s.touch <= 0:
        raise ValueError(f"shrink must be a positive multiple of 2 MiB (virtio-mem's block), and touch positive: "
                         f"got shrink {format_size(s.shrink)}, touch {format_size(s.touch)}")
    if s.memory - s.shrink < 128 << 20 or s.touch > s.memory - (128 << 20):
        raise ValueError(f"a {format_size(s.memory)} guest cannot shrink by {format_size(s.shrink)} or touch "
                         f"{format_size(s.touch)}: keep at least 128 MiB for its kernel")
    make_spec = spec or builtin_mechanism_spec
    say = progress or (lambda line: None)
    path = new_run_dir(Path(run_root), "compare") if run_root is not None else None
    rows: list[dict[str, Any]] = []
    traces: list[pd.DataFrame] = []
    async with Sampler(run_dir=path, metadata={"experiment": "compare", "settings": asdict(s),
                                                "mechanisms": [asdict(m) for m in mechanisms]}) as sampler:
        for i in range(s.repeat):
            for mech in mechanisms:
                name = f"cmp-{mech.name.replace('+', '-')}-{i + 1}"
                say(f"{mech.name} #{i + 1}: launching {name}")
                guest = await Guest.launch(make_spec(name, mech, s))
                try:
                    await sampler.add(guest)
                    trace, row = await run_once(guest, mech, s, sampler, say)
                finally:
                    await sampler.remove(guest.name)
                    await guest.shutdown()
                rows.append({"mechanism": mech.name, "repetition": i + 1, **row})
                traces.append(trace.assign(mechanism=mech.name, repetition=i + 1))
                say(f"{mech.name} #{i + 1}: shrink {row['shrink_s']:.2f} s, returned "
                    f"{format_size(row['host_returned_bytes'])}, grow {row['grow_s']:.2f} s, "
                    f"re-touch {row['retouch_s']:.2f} s")
    frame = pd.DataFrame(rows)
    table = compare_table(frame, shrink_bytes=s.shrink)
    if path is not None:
        frame.to_csv(path / "compare-runs.csv", index=False)
        table.to_csv(path / "compare.csv", index=False)
        (path / "compare.json").write_text(json.dumps(table_records(table), indent=1) + "\n")
        plot_compare(table).savefig(path / "compare.png", dpi=100)
    trace = pd.concat(traces, ignore_index=True)[["mechanism", "repetition", "t_s", "rss", "step"]]
    if path is not None:
        trace.to_parquet(path / "compare-rss.parquet", index=False)
        plot_footprint(trace).savefig(path / "compare-rss.png", dpi=100)
    return CompareResult(frame, table, trace, path)


def table_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The table as a JSON-ready list of rows (NaN as null)."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in table.to_dict(orient="records")]


def builtin_mechanism_spec(name: str, mech: Mechanism, s: CompareSettings, **builtin: Any) -> DomainSpec:
    """The built-in guest for ``mech``: ``s.memory`` in all; for virtio-mem ``s.shrink`` of it on
    the device (plugged at boot), the rest boot memory.

    :param builtin: passed on to :func:`~balloonlab.image.builtin.builtin_spec` (e.g.
        ``kernel_release``, ``qemu_binary``).
    """
    common: dict[str, Any] = {"period_s": s.period_s, "free_page_reporting": mech.free_page_reporting or None,
                              **builtin}
    if mech.virtio_mem:
        return builtin_spec(name, memory=s.memory - s.shrink, virtio_mem=(s.shrink, s.shrink), **common)
    return builtin_spec(name, memory=s.memory, autodeflate=mech.deflate_on_oom or None, **common)


def parse_mechanisms(text: str) -> list[Mechanism]:
    """``"balloon,virtio-mem"`` -> those mechanisms (``all``: every one).

    :raises ValueError: an unknown name (the message lists the known ones).
    """
    known = {m.name: m for m in MECHANISMS}
    if text.strip() == "all":
        return list(MECHANISMS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown mechanism {', '.join(unknown) or '(none given)'}; expected 'all' or a comma-"
                         f"separated list of: {', '.join(known)}")
    return [known[n] for n in names]


def size_setting(text: str) -> int:
    """A size for a setting, refused when not positive."""
    value = parse_size(text)
    if value <= 0:
        raise ValueError(f"expected a positive size like 256M, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (repetitions)."""
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {text!r}")
    return value
