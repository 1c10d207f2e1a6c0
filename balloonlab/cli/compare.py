"""``balloonlab compare``: the memory-reclaim mechanisms side by side on the built-in guest
(virtio-balloon, + free page reporting, + deflate-on-oom, virtio-mem, + free page reporting)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balloonlab.cli.common import AddCommand, UsageError, runs_root
from balloonlab.model.units import format_size

if TYPE_CHECKING:
    import pandas as pd

#: (column, heading, scale, format) of the printed table.
COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("shrink_s", "shrink_s", 1, "{:.2f}"), ("grow_s", "grow_s", 1, "{:.2f}"),
    ("host_returned_bytes", "returned_MiB", 1 / 2**20, "{:.0f}"), ("host_returned_pct", "returned_%", 1, "{:.0f}"),
    ("rss_shrunk_bytes", "rss_shrunk_MiB", 1 / 2**20, "{:.0f}"), ("free_return_s", "freed_back_s", 1, "{:.1f}"),
    ("free_returned_bytes", "freed_back_MiB", 1 / 2**20, "{:.0f}"), ("shrink_minor_faults", "faults", 1, "{:.0f}"),
    ("retouch_s", "touch_s", 1, "{:.2f}"), ("retouch2_s", "touch2_s", 1, "{:.2f}"),
)


def _type(name: str) -> Any:
    """An argparse type calling ``balloonlab.experiments.compare.<name>`` (imported when used:
    the experiment loads the QEMU backend, which ``balloonlab --help`` need not)."""
    def parse(text: str) -> Any:
        from balloonlab.experiments import compare
        try:
            return getattr(compare, name)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def format_table(table: pd.DataFrame) -> str:
    """The comparison's table as aligned text: medians, with the runs' range beside times."""
    rows = [["mechanism", "runs", *(heading for _, heading, _, _ in COLUMNS)]]
    for _, row in table.iterrows():
        cells = [str(row["mechanism"]), f"{row['runs']:.0f}"]
        for column, _, scale, fmt in COLUMNS:
            value = row[column]
            cells.append("-" if value != value else fmt.format(value * scale))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows)


def _cmd_compare(args: argparse.Namespace) -> int:
    from balloonlab.experiments.compare import (CompareSettings, builtin_mechanism_spec, compare_mechanisms,
                                                table_records)
    base = CompareSettings.quick() if args.quick else CompareSettings()
    # replace(), not a new CompareSettings: --quick's shorter watches and windows must stay.
    settings = dataclasses.replace(base, memory=args.memory or base.memory, touch=args.touch or base.touch,
                                   shrink=args.shrink or base.shrink, repeat=args.repeat or base.repeat)
    if args.json is not None and Path(args.json).is_dir():
        raise UsageError(f"--json {args.json} is a folder; pass the path of the JSON file to write")
    try:
        spec = functools.partial(builtin_mechanism_spec, kernel_release=args.kernel_release,
                                 qemu_binary=args.qemu_binary)
        result = asyncio.run(compare_mechanisms(args.mechanisms, settings, spec=spec, run_root=runs_root(args.runs),
                                                progress=lambda line: print(line, flush=True)))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"\n{settings.repeat} run(s) per mechanism; guest {format_size(settings.memory)}, touch "
          f"{format_size(settings.touch)}, shrink {format_size(settings.shrink)} (medians)\n")
    print(format_table(result.table))
    if args.json is not None:
        Path(args.json).write_text(json.dumps(table_records(result.table), indent=1) + "\n")
        print(f"\ntable: {args.json}")
    print(f"run folder: {result.path}")
    return 0


def register(command: AddCommand) -> None:
    """Add ``compare`` to the parser."""
    cmd = command("compare", "virtio-balloon, free page reporting, deflate-on-oom and virtio-mem side by side",
                  _cmd_compare)
    cmd.add_argument("--quick", action="store_true", help="a one-minute version: one 512 MiB guest per mechanism, "
                                                          "128 MiB moves")
    cmd.add_argument("--mechanisms", type=_type("parse_mechanisms"), default="all",
                     help="comma-separated, or all (default): balloon, balloon+fpr, balloon+deflate-on-oom, "
                          "virtio-mem, virtio-mem+fpr")
    cmd.add_argument("--repeat", type=_type("positive_int"), help="fresh guests per mechanism (default 3; --quick 1)")
    cmd.add_argument("--memory", type=_type("size_setting"), help="the guest's memory (default 768M; --quick 512M)")
    cmd.add_argument("--touch", type=_type("size_setting"), help="what the guest touches (default 256M; --quick 128M)")
    cmd.add_argument("--shrink", type=_type("size_setting"), help="how much the guest is shrunk by (default 256M)")
    cmd.add_argument("--kernel-release", default=None, help="guest kernel, e.g. 6.12 (default: the default image)")
    cmd.add_argument("--qemu-binary", default=None, help="QEMU to run the guests (default qemu-system-x86_64)")
    cmd.add_argument("--json", help="also write the table here, a JSON list of rows")
    cmd.add_argument("--runs", default="runs", help="folder for run folders (default ./runs)")

