"""The notebooks, run top to bottom on real kernels against real guests (nbclient).

Each runs from a temporary copy (its cwd is a temp dir, so runs/ never lands in the repo),
with BALLOONLAB_NOTEBOOK_SECONDS shortening the recordings. A test checks the values the
notebook printed, not only that it ran: nbclient reports success even when a widget callback
failed. The kernels inherit the tests' BALLOONLAB_RUNTIME_DIR, so the leak check sees their
guests. Executed copies are kept under test-artifacts/notebooks/ for a look afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from .conftest import RUNTIME_ROOT, qemu_pids_under

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "test-artifacts" / "notebooks"
#: Seconds each notebook records (03 needs about 20 for all its phases to have samples).
SECONDS = "20"
pytestmark = pytest.mark.qemu


@pytest.fixture
def kernel_env(monkeypatch, tmp_path, builtin_ready):
    """Kernel settings: short recordings, and IPython/Jupyter/matplotlib files in a temp dir."""
    monkeypatch.setenv("BALLOONLAB_NOTEBOOK_SECONDS", SECONDS)
    for var, sub in (("IPYTHONDIR", "ipython"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                     ("MPLCONFIGDIR", "mpl")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    return tmp_path


def execute(nb: nbformat.NotebookNode, workdir: Path, name: str, cell_timeout_s: int = 240) -> nbformat.NotebookNode:
    """Run ``nb`` in a fresh kernel with cwd ``workdir``; keep the executed copy as an artifact."""
    client = NotebookClient(nb, timeout=cell_timeout_s, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, ARTIFACTS / name)
    return nb


def run_notebook(name: str, tmp_path: Path, cell_timeout_s: int = 240) -> tuple[nbformat.NotebookNode, Path]:
    """Copy ``notebooks/name`` to a temp dir, run it there, return it and its work dir."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    shutil.copy(NOTEBOOKS / name, workdir / name)
    nb = execute(nbformat.read(workdir / name, as_version=4), workdir, name, cell_timeout_s)
    assert_no_exception_output(nb)
    return nb, workdir


def outputs(nb: nbformat.NotebookNode, kind: str = "stdout") -> str:
    """All text of one kind: ``stdout``, ``stderr`` or a MIME type such as ``text/markdown``."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == kind:
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data") and kind in out.data:
                data = out.data[kind]
                parts.append(data if isinstance(data, str) else json.dumps(data))
    return "\n".join(parts)


def assert_no_exception_output(nb: nbformat.NotebookNode) -> None:
    errors = [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    stderr = outputs(nb, "stderr")
    assert "Traceback" not in stderr and "Error" not in stderr, f"exception output on stderr:\n{stderr}"


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not found in output:\n{text}"
    return float(match.group(1))


def test_committed_notebooks_are_stripped_of_outputs():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "strip-notebook-outputs"), "--check"],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"run scripts/strip-notebook-outputs:\n{result.stdout}"
    assert len(list(NOTEBOOKS.glob("*.ipynb"))) == 10


def test_quickstart_records_samples_plots_and_saves_the_run(kernel_env, tmp_path):
    nb, workdir = run_notebook("01-quickstart.ipynb", tmp_path)
    text = outputs(nb)
    recorded = number(r"recorded (\d+) samples of guest quickstart", text)
    assert recorded >= 5  # about one per second for 20 s
    assert number(r"runs/\S+: (\d+) samples", text) == recorded  # the run folder holds them all
    runs = list((workdir / "runs").glob("*-quickstart"))
    assert len(runs) == 1 and (runs[0] / "run.json").exists() and (runs[0] / "plot.png").stat().st_size > 10_000
    assert outputs(nb, "image/png")  # the plot is in the notebook
    assert not (NOTEBOOKS / "runs").exists()


def test_step_response_notebook_reaches_every_target(kernel_env, tmp_path):
    nb, _ = run_notebook("02-balloon-step-response.ipynb", tmp_path)
    assert "reached 3 of 3 targets" in outputs(nb)
    summary = outputs(nb, "text/markdown")
    moved = re.findall(r"\*\*(\w+)\*\* to (\d+) MiB: actual moved (\d+) MiB in", summary)
    assert [(d, int(t)) for d, t, _ in moved] == [("inflate", 256), ("deflate", 384), ("deflate", 512)]
    assert [int(m) for _, _, m in moved] == pytest.approx([256, 128, 128], abs=2)  # within the 1 MiB tolerance
    assert outputs(nb, "image/png").count("iVBOR") >= 2  # two figures (PNG data)


def test_workload_notebook_explains_used_memory_with_numbers(kernel_env, tmp_path):
    nb, _ = run_notebook("03-workload-and-pressure.ipynb", tmp_path)
    rose = number(r"virt_manager rose by (-?\d+) MiB at the 192 MiB peak", outputs(nb))
    assert 160 <= rose <= 230
    text = outputs(nb, "text/markdown")
    assert "**Holding 192 MiB**" in text
    took = number(r"\*\*Inflating the balloon to 320 MiB\*\* took `actual` (-?\d+) MiB", text)
    assert took == pytest.approx(-192, abs=2)
    assert "nan" not in text.lower()  # every phase had samples


def test_attach_notebook_sets_period_only_when_running_and_reconnect_keeps_it(kernel_env, tmp_path):
    nb, _ = run_notebook("04-attach-and-reconnect.ipynb", tmp_path)
    text = outputs(nb)
    assert "prelaunch: period: 0\nrunning: period: 0\n" in text  # paused: left alone, also after cont
    assert "running: period: 2" in text  # attached while running: set from the XML
    assert "period found 3 s, live period 3 s" in text  # a new process reconnected, period untouched
    assert "shutdown: quit" in text
    assert text.rstrip().endswith("running guests: []")


def test_dashboard_notebook_drives_two_guests_and_closes_them(kernel_env, tmp_path):
    nb, _ = run_notebook("05-dashboard.ipynb", tmp_path)
    text = outputs(nb)
    assert re.search(r"dash-1: running \(dash-1 running: pid \d+", text)
    assert re.search(r"dash-2: running \(dash-2 running: pid \d+", text)
    assert number(r"dash-1: actual (\d+) MiB \(reached: True\)", text) == pytest.approx(256, abs=1)
    assert "dash-2: holding 128 MiB" in text
    assert "dash-1: balloon target 2 GiB is above the guest's memory 512 MiB" in text
    assert "dash-2: stats period must be between 0 (disable) and 4294967295 seconds, got -1" in text
    assert number(r"(\d+) samples so far", text) > 0
    assert text.rstrip().endswith("running guests: []")
    assert outputs(nb, "application/vnd.jupyter.widget-view+json")  # the dashboard was displayed


def test_a_failing_cell_after_launch_leaves_no_qemu_once_the_kernel_is_gone(kernel_env, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(NOTEBOOKS / "01-quickstart.ipynb", as_version=4)
    launch = next(i for i, c in enumerate(nb.cells) if "SyncGuest.launch" in c.source)
    nb.cells.insert(launch + 1, nbformat.v4.new_code_cell(
        'print("guest pid", guest.pid)\nraise RuntimeError("injected failure")'))
    with pytest.raises(CellExecutionError, match="injected failure"):
        execute(nb, workdir, "01-quickstart-failing.ipynb")
    pid = int(number(r"guest pid (\d+)", outputs(nb)))
    assert "recorded" not in outputs(nb)  # nothing ran after the failing cell
    # nbclient has shut the kernel down; the guest dies with its owner.
    deadline = time.monotonic() + 15
    while qemu_pids_under(RUNTIME_ROOT) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_under(RUNTIME_ROOT) == []
    assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_libvirt_notebook_attaches_to_a_domain_and_records_it_beside_a_qmp_guest(
        kernel_env, tmp_path, libvirt_domains, monkeypatch):
    name = libvirt_domains()  # a blv-<pid>-<n> name: the fixture removes it whatever happens
    monkeypatch.setenv("BALLOONLAB_NOTEBOOK_DOMAIN", name)
    nb, _ = run_notebook("06-libvirt.ipynb", tmp_path)
    text = outputs(nb)
    assert f"{name}: running, period 2 s, stats via libvirt" in text  # set by libvirt's start, untouched
    assert number(rf"{name}: backend libvirt, (\d+) samples", text) >= 3
    assert number(r"nb06-qmp: backend qmp, (\d+) samples", text) >= 3
    assert re.search(rf"{name}: backend libvirt, \d+ samples, lowest actual 320 MiB", text)
    assert re.search(r"^actual 524288$", text, re.M)  # virsh dommemstat, after the deflate


def test_stats_period_notebook_measures_every_period_against_the_guests_truth(kernel_env, tmp_path):
    nb, workdir = run_notebook("07-stats-period.ipynb", tmp_path)
    text = outputs(nb)
    assert "5 guests, 40 s of bursts held 2, 4 s" in text  # the short version (2 x 20 s)
    for period in (1, 2, 5, 10, 30):
        assert number(rf"nb07-p{period}: \d+ truth samples, median interval ([\d.]+) s", text) == \
            pytest.approx(0.1, abs=0.005)
        assert number(rf"nb07-p{period}: .* clock offset to ±(\d+) ms", text) < 50
    bursts = number(r"period 1 s: \d+ of (\d+) bursts missed", text)
    assert bursts >= 3 and number(r"period 1 s: (\d+) of", text) == 0
    # The timers restart together: the 30 s guest reports at 0 and 30 s, so the bursts that
    # end before 30 s (all but the last) fall between two of its reports.
    assert number(r"period 30 s: (\d+) of", text) >= bursts - 1
    cpu = {p: number(rf"period {p} s: .* sampler ([\d.]+) CPU s per guest-hour", text) for p in (1, 30)}
    assert cpu[1] > 3 * cpu[30]
    assert outputs(nb, "image/png").count("iVBOR") >= 2  # the truth against the reports, and the study's figure
    runs = list((workdir / "runs").glob("*-stats-period"))
    assert len(runs) == 1 and (runs[0] / "table.csv").exists() and (runs[0] / "truth.parquet").exists()
    assert "'period-study.png'" in text


# Five guests one after another, each through touch, free, shrink, grow and two re-touches on
# the current stack: 76 s alone, more on a loaded host; the suite's 180 s is too short.
@pytest.mark.timeout(600)
def test_mechanisms_notebook_compares_all_five_on_real_guests(kernel_env, tmp_path):
    nb, workdir = run_notebook("08-mechanisms.ipynb", tmp_path, cell_timeout_s=480)
    text = outputs(nb)
    assert re.search(r"QEMU (9\.[2-9]|\d\d+)\.", text) and "1 run(s) each" in text
    for name in ("balloon", "balloon+deflate-on-oom", "virtio-mem"):  # the shrink returns most of its 128 MiB
        assert number(rf"(?m)^{re.escape(name)}: shrink [\d.]+ s returned \d+ MiB \((\d+) % of 128\)", text) >= 80
        assert number(rf"(?m)^{re.escape(name)}: .*; (\d+) MiB back after the free", text) <= 16
    for name in ("balloon+fpr", "virtio-mem+fpr"):
        # Reporting gives freed memory back by itself (Linux 6.12 gave 70 and 96 of the 128 MiB
        # within the quick watch's 3.5 s); the shrink then finds less resident to return.
        back = number(rf"(?m)^{re.escape(name)}: .*; (\d+) MiB back after the free", text)
        returned = number(rf"(?m)^{re.escape(name)}: shrink [\d.]+ s returned (\d+) MiB", text)
        assert back >= 32 and back + returned >= 100, (name, back, returned)
    assert number(r"virtio-mem shrank ([\d.]+)x faster than the balloon", text) > 0
    assert outputs(nb, "image/png").count("iVBOR") >= 2  # the comparison and the footprint
    runs = list((workdir / "runs").glob("*-compare"))
    assert len(runs) == 1 and (runs[0] / "compare.json").exists()


def test_memory_pressure_notebook_reaches_none_global_and_critical_on_a_real_guest(kernel_env, tmp_path):
    nb, _ = run_notebook("09-memory-pressure.ipynb", tmp_path)
    text = outputs(nb)
    assert re.search(r"QEMU (9\.[2-9]|\d\d+)\.", text)  # a QEMU that sends the six counters
    assert "nb08: MemTotal" in text and "6 of 6 reclaim counters reported" in text
    assert re.search(r"^idle: none$", text, re.M)
    assert re.search(r"^pressure: global$", text, re.M)
    assert number(r"(?m)^oom: critical \((\d+) OOM kills", text) >= 1
    assert number(r"the agent lost (\d+) MiB of 460 MiB", text) >= 32  # at least one 32 MiB holder
    assert outputs(nb, "image/png").count("iVBOR") >= 1  # the pressure plot


#: One line a run in notebook 10's table (live, then each replayed policy).
POLICY_LINE = (r"(?m)^{}: ([\d.]+) s over budget, peak (\d+) MiB, (\d+) s of guest pressure, swap (\d+) MiB, "
               r"(\d+) target changes, footprint ([\d.]+) GiB·s$")


# Four guests launched one by one, 60 s of MOM live, then seven policies replayed on the model:
# about 2 min alone, more on a loaded host; the suite's 180 s is too short.
@pytest.mark.timeout(600)
def test_policies_notebook_runs_mom_live_and_replays_every_policy_on_its_run(kernel_env, tmp_path):
    nb, workdir = run_notebook("10-policies.ipynb", tmp_path, cell_timeout_s=400)
    text = outputs(nb)
    assert "4 guests of 512 MiB under a 1 GiB budget, 60 s, workloads cycling every 40 s" in text
    # -- MOM live: over the budget only while the first cycle's workloads rise
    live = re.search(r"(?m)^live mom: ([\d.]+) s over budget in ([\d.]+) s, peak (\d+) MiB, (\d+) s of guest "
                     r"pressure, (\d+) target changes$", text)
    assert live, text
    over, span, peak, _, changes = map(float, live.groups())
    assert 50 <= span <= 65 and over < 0.35 * span, live.group(0)
    assert peak < 1.25 * 1024 and changes >= 8, live.group(0)
    # -- every policy replayed: a line each; the table's live row is the live score
    rows = {}
    for name in ("live", "none", "mom", "qmemman", "psi", "psi-128", "pi", "mine"):
        found = re.search(POLICY_LINE.format(re.escape(name)), text)
        assert found, f"no line for {name}:\n{text}"
        rows[name] = [float(v) for v in found.groups()]
    assert rows["live"][0] == pytest.approx(over, abs=0.05) and rows["live"][4] == changes
    assert rows["none"][0] > over and rows["none"][4] == 0  # without a policy: longer over the budget
    assert rows["none"][1] > rows["mom"][1]  # and higher
    # -- MOM on the recorded frames takes its live decisions
    agree = number(r"(?m)^MOM replayed open-loop: ([\d.]+) % of \d+ live decisions agree", text)
    assert agree >= 95
    assert number(r"(?m)^MOM replayed open-loop: [\d.]+ % of (\d+) live decisions", text) >= 4 * 20
    assert re.search(r"(?m)^MOM replayed closed-loop: [\d.]+ % of \d+ live decisions agree", text)
    assert re.search(r"(?m)^oc\d: proposed \d+ MiB \(used \d+ MiB \+ headroom 96 MiB\), set \d+ MiB", text)  # why
    assert outputs(nb, "image/png").count("iVBOR") >= 2  # the live run and the replay
    runs = list((workdir / "runs").glob("*-overcommit"))
    assert len(runs) == 1 and (runs[0] / "plot-policy.png").exists() and (runs[0] / "host").is_dir()
