"""/proc readings: the kept-open /proc/PID/stat the sampler reads rss through."""

from __future__ import annotations

import os
import subprocess

from balloonlab.model.procfs import ProcessStat, process_rss_bytes


def test_a_kept_open_stat_reads_what_a_fresh_open_reads_and_none_once_the_process_is_gone():
    child = subprocess.Popen(["sleep", "30"])
    stat = ProcessStat()
    try:
        fd_count = len(os.listdir("/proc/self/fd"))
        first = stat.rss_bytes(child.pid)
        assert first is not None and first == process_rss_bytes(child.pid) and first > 0
        for _ in range(5):  # the same file, read again: no new descriptor per read
            assert stat.rss_bytes(child.pid) == first
        assert len(os.listdir("/proc/self/fd")) == fd_count + 1
    finally:
        child.kill()
        child.wait()
    assert stat.rss_bytes(child.pid) is None  # reaped: ESRCH through the open file, not a newcomer's numbers
    other = subprocess.Popen(["sleep", "30"])
    try:
        assert stat.rss_bytes(other.pid) == process_rss_bytes(other.pid)  # another pid: its own file
    finally:
        other.kill()
        other.wait()
        stat.close()
    assert stat.rss_bytes(None) is None
