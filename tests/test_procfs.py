"""/proc readings: the kept-open /proc/PID/stat the sampler reads rss through."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from balloonlab.model.procfs import ProcessStat, process_rss_bytes


def settled(pid: int) -> None:
    """Wait until a just-started ``sleep`` sleeps: its loader is done, its RSS stops moving."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
        assert time.monotonic() < deadline, "the child never went to sleep"
        time.sleep(0.01)


def test_a_kept_open_stat_reads_what_a_fresh_open_reads_and_none_once_the_process_is_gone():
    child = subprocess.Popen(["sleep", "30"])
    stat = ProcessStat()
    try:
        settled(child.pid)
        first = stat.rss_bytes(child.pid)
        fd = stat._fd
        assert first is not None and first == process_rss_bytes(child.pid) and first > 0
        for _ in range(5):  # the same open file, read again: no open per read
            assert stat.rss_bytes(child.pid) == first and stat._fd == fd
        assert os.readlink(f"/proc/self/fd/{fd}") == f"/proc/{child.pid}/stat"
    finally:
        child.kill()
        child.wait()
    assert stat.rss_bytes(child.pid) is None  # reaped: ESRCH through the open file, not a newcomer's numbers
    other = subprocess.Popen(["sleep", "30"])
    try:
        settled(other.pid)
        assert stat.rss_bytes(other.pid) == process_rss_bytes(other.pid)  # another pid: its own file
    finally:
        other.kill()
        other.wait()
        stat.close()
    assert stat.rss_bytes(None) is None
