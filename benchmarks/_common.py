"""Shared helpers for balloonlab's benchmark scripts: statistics, tables, JSON, environment.

Kept dependency-free (stdlib only) and generic: a benchmark script measures, then calls
:func:`median`/:func:`quantile`/:func:`ratio` on its samples, :func:`print_table` for the
human-readable summary and :func:`write_json` (with :func:`environment`) for the raw data.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time as time_module
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Where :func:`write_json` puts ``<name>.json`` (gitignored).
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def quantile(samples: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) with linear interpolation between order statistics
    (numpy's default, R's type 7).

    :raises ValueError: no samples, or ``q`` outside [0, 1].
    """
    if not samples:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    ordered = sorted(samples)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(samples: Sequence[float]) -> float:
    """The median (the 0.5 quantile)."""
    return quantile(samples, 0.5)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _cell(value: Any, fmt: str | None) -> str:
    if value is None:
        return "-"
    if fmt is not None:
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str],
                formats: Mapping[str, str] | None = None, file: Any = None) -> None:
    """Print ``rows`` as an aligned text table of ``columns`` (keys of each row).

    Missing and None values print as ``-``; floats use ``formats[column]`` (default ``.3f``).
    Numbers are right-aligned, everything else left-aligned.
    """
    formats = formats or {}
    cells = [[_cell(row.get(col), formats.get(col)) for col in columns] for row in rows]
    numeric = [all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows)
               for col in columns]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w)
                         for v, w, num in zip(values, widths, numeric, strict=True)).rstrip()

    out = file or sys.stdout
    print(line(list(columns)), file=out)
    for r in cells:
        print(line(r), file=out)


def write_json(name: str, payload: Any, path: str | os.PathLike[str] | None = None) -> Path:
    """Write ``payload`` as JSON to ``path`` (default ``benchmarks/results/<name>.json``).

    The folder is created as needed. Returns the path written.
    """
    target = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(target)
    return target


def _run(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=PROJECT_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def environment(qemu_binary: str = "qemu-system-x86_64") -> dict[str, Any]:
    """What the numbers depend on: date, host, CPU, QEMU and Python versions, git commit."""
    qemu = _run([qemu_binary, "--version"])
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    commit = _run(["git", "rev-parse", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    try:
        from importlib.metadata import version
        balloonlab_version: str | None = version("balloonlab")
    except Exception:  # not installed: still report the rest
        balloonlab_version = None
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "nproc": os.cpu_count(),
        "nproc_usable": usable,
        "kvm_device": os.access("/dev/kvm", os.R_OK | os.W_OK),
        "qemu_binary": qemu_binary,
        "qemu_version": qemu.splitlines()[0] if qemu else None,
        "python": sys.version.split()[0],
        "balloonlab": balloonlab_version,
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "argv": sys.argv,
    }


# -- processes: CPU time, affinity, limits (Linux) ---------------------------------------------

def process_cpu_seconds(pid: int | None = None) -> float:
    """CPU time (user + system, all threads, exited ones included) of a process, in seconds.

    Read from the kernel's per-process CPU clock (nanosecond resolution); falls back to
    utime + stime of ``/proc/<pid>/stat`` (clock-tick resolution). ``None``: this process.

    :raises OSError: no such process.
    """
    if pid is None or pid == os.getpid():
        return time_module.process_time()
    try:
        return time_module.clock_gettime(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_process(pid: int, cpus: set[int]) -> bool:
    """Pin every thread of ``pid`` to ``cpus`` (threads created later inherit from their creator).

    Returns False when it could not (no such CPU, not permitted); never raises.
    """
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), cpus)
        return True
    except OSError:
        return False


def raise_open_files_limit() -> int:
    """Raise the RLIMIT_NOFILE soft limit to the hard limit; return the soft limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def missed_reports(last_updates: Sequence[float], period_s: float, tolerance: float = 1.5) -> int:
    """Reports a reader missed, from the ``last_update`` stamps it recorded (one guest, in order).

    A gap above ``tolerance`` periods counts ``round(gap / period) - 1`` missed reports.
    """
    missed = 0
    for a, b in itertools.pairwise(last_updates):
        gap = b - a
        if gap > tolerance * period_s:
            missed += max(1, round(gap / period_s) - 1)
    return missed


def process_start_time(pid: int) -> float:
    """When process ``pid`` started (its fork), as host wall-clock epoch seconds.

    From ``starttime`` in ``/proc/<pid>/stat`` (clock ticks since boot, so 10 ms resolution at
    the usual 100 Hz), placed on the wall clock through CLOCK_BOOTTIME. A process that
    ``exec``\\ s (QEMU behind a shell wrapper) keeps its pid and this time.

    :raises OSError: no such process.
    """
    text = Path(f"/proc/{pid}/stat").read_text()
    ticks = int(text[text.rindex(")") + 2:].split()[19])
    booted_at = time_module.time() - time_module.clock_gettime(time_module.CLOCK_BOOTTIME)
    return booted_at + ticks / os.sysconf("SC_CLK_TCK")


def markdown_table(rows: list[dict[str, Any]], columns: Sequence[str],
                   formats: Mapping[str, str] | None = None, align: Mapping[str, str] | None = None) -> str:
    """``rows`` as a GitHub Markdown table of ``columns`` (keys of each row), padded to line up.

    Cells are formatted as :func:`print_table` does (None: ``-``; floats by ``formats``); a
    ``|`` inside a cell is escaped. Numeric columns are right-aligned, others left-aligned;
    ``align[column]`` (``"left"`` or ``"right"``) overrides that.
    """
    formats, align = formats or {}, align or {}
    cells = [[_cell(row.get(col), formats.get(col)).replace("|", "\\|") for col in columns] for row in rows]
    right = [align.get(col) == "right" if col in align else
             all(isinstance(row.get(col), (int, float)) or row.get(col) is None for row in rows)
             for col in columns]
    widths = [max([len(col), 3] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1))
                          for w, r in zip(widths, right, strict=True)) + "|"
    return "\n".join([line(list(columns)), rule] + [line(r) for r in cells])


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU time (user + system, ns resolution) of each live thread of ``pid``, summed by thread name.

    From ``/proc/<pid>/task/<tid>/schedstat`` (time on CPU) and ``comm``: QEMU started with
    ``-name ...,debug-threads=on`` names its threads (``CPU 0/TCG``, ``IO mon_iothread``...);
    its main thread carries the process's name. Threads that exited are not counted.

    :raises OSError: no such process.
    """
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
            name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue  # the thread exited meanwhile
        out[name] = out.get(name, 0.0) + ns / 1e9
    return out
