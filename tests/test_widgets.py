"""The dashboard's panels wired to real guests, driven by ``button.click()`` without a kernel.

ipywidgets work in plain Python: clicking a button runs its handlers, which submit work to
balloonlab's loop. These tests prove the wiring (a click boots a guest, a slider moves the
balloon in QEMU, bad input becomes a message in the panel) and the clean-up (closing the
dashboard leaves no QEMU and no timer thread).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from balloonlab import LaunchError, builtin_spec
from balloonlab.widgets import GuestController, LaunchParams, PatternParams, dashboard

from .conftest import RUNTIME_ROOT, qemu_pids_under

MiB = 1 << 20


@pytest.fixture
def make_dashboard(builtin_ready, guest_name):
    """``make_dashboard(n)``: a dashboard with unique guest names, closed after the test."""
    made = []

    def make(n: int = 1, **kwargs):
        kwargs.setdefault("names", [f"{guest_name}-{i}" for i in range(n)])
        kwargs.setdefault("refresh_s", 0.5)
        d = dashboard(n, **kwargs)
        made.append(d)
        return d
    yield make
    for d in made:
        d.close()


def until(predicate, timeout_s: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def shown_bytes(html: str, css_class: str) -> int | None:
    """The ``data-bytes`` a panel shows for ``css_class`` (None when it shows NA)."""
    match = re.search(rf'class="{css_class}" data-bytes="(\d*)"', html)
    assert match, f"{css_class} not in {html!r}"
    return int(match.group(1)) if match.group(1) else None


def test_launch_click_boots_one_guest_and_a_second_click_only_says_so(make_dashboard):
    d = make_dashboard(1)
    launcher, slot = d.launchers[0], d.slots[0]
    launcher.launch_button.click()
    assert slot.status == "launching"  # the click returned at once; the boot runs on the loop
    launcher.launch_button.click()
    assert "is launching" in slot.message("launcher").text
    d.wait()
    assert slot.status == "running", slot.message("launcher")
    assert 'data-status="running"' in launcher.status.value
    pids = qemu_pids_under(RUNTIME_ROOT)
    assert pids == [slot.guest.pid]
    launcher.launch_button.click()
    assert "already running" in slot.message("launcher").text
    assert qemu_pids_under(RUNTIME_ROOT) == pids  # no second QEMU
    assert shown_bytes(d.balloons[0].actual.value, "bl-actual") == 512 * MiB
    # The shared sampler records the guest: samples and a launch event.
    until(lambda: len(d.frame()) > 0, what="a sample of the launched guest")
    events = d.events()
    assert list(events[events["kind"] == "launch"]["guest"].astype(str)) == [slot.name]


def test_slider_moves_actual_in_qemu_and_panel_follows_balloon_change(make_dashboard):
    d = make_dashboard(1)
    d.launchers[0].launch_button.click()
    d.wait()
    panel, guest = d.balloons[0], d.slots[0].guest
    assert panel.slider.max == 512 and not panel.slider.disabled
    panel.slider.value = 256
    d.wait()
    result = guest.balloon.wait_for_actual(256 * MiB, timeout_s=30)
    assert result.reached
    assert abs(guest.balloon.query_actual() - 256 * MiB) <= MiB  # QEMU itself says so
    until(lambda: abs((shown_bytes(panel.actual.value, "bl-actual") or 0) - 256 * MiB) <= MiB,
          what="the panel to show actual 256 MiB")
    assert shown_bytes(panel.actual.value, "bl-target") == 256 * MiB
    events = d.events()
    assert 256 * MiB in set(events[events["kind"] == "target"]["value"])


def test_bad_inputs_become_panel_messages_and_other_guest_keeps_working(make_dashboard, tmp_path):
    d = make_dashboard(2)
    good, bad = d.slots
    d.launchers[0].launch_button.click()
    # Bad XML: the message names the line.
    xml = tmp_path / "bad.xml"
    xml.write_text("<domain type='qemu'>\n  <name>x</name>\n  <memory>lots</memory>\n</domain>\n")
    d.launchers[1].source.value = "xml"
    d.launchers[1].xml_path.value = str(xml)
    d.launchers[1].launch_button.click()
    assert bad.status == "not launched"
    assert "invalid domain XML" in bad.message("launcher").text and "line" in bad.message("launcher").text
    # A good XML with a missing disk image.
    ok_xml = tmp_path / "ok.xml"
    ok_xml.write_text(builtin_spec("from-xml").xml)
    d.launchers[1].xml_path.value = str(ok_xml)
    d.launchers[1].image_path.value = str(tmp_path / "missing.qcow2")
    d.launchers[1].launch_button.click()
    assert "missing.qcow2 does not exist" in bad.message("launcher").text
    # Shutdown and balloon actions on a guest that never ran.
    d.launchers[1].shutdown_button.click()
    assert "nothing to shut down" in bad.message("launcher").text
    d.balloons[1].set_button.click()
    assert "launch it first" in bad.message("balloon").text
    d.wait()
    assert good.status == "running"
    # A target above the guest's memory, and a period of -1, on the running guest.
    d.balloons[0].size.value = "1G"
    d.balloons[0].set_button.click()
    d.wait()
    assert "above the guest's memory" in good.message("balloon").text
    assert good.message("balloon").level == "error"
    d.balloons[0].period.value = -1
    d.balloons[0].period_button.click()
    d.wait()
    assert "between 0 (disable)" in good.message("balloon").text
    assert good.guest.balloon.get_period() == 1  # QEMU never saw -1
    d.balloons[0].size.value = "384M"
    d.balloons[0].set_button.click()
    d.wait()
    assert good.guest.balloon.wait_for_actual(timeout_s=30).reached
    assert good.message("balloon").text == "target 384 MiB sent"
    assert bad.status == "not launched" and qemu_pids_under(RUNTIME_ROOT) == [good.guest.pid]


def test_launch_error_shows_qemu_message_without_traceback(builtin_ready, guest_name):
    slot = GuestController(LaunchParams(name=guest_name, vcpus=1000))  # QEMU's pc machine takes 255 at most
    future = slot.launch()
    assert future is not None
    with pytest.raises(LaunchError):
        future.result(60)
    message = slot.message("launcher")
    assert slot.status == "failed" and message.level == "error"
    assert message.text.startswith(f"guest {guest_name} did not come up") and "exit code 1" in message.text
    assert "Traceback" not in message.text and "\n" not in message.text
    assert "Invalid SMP CPUs 1000" in message.details  # QEMU's own words, folded under the line


def test_shutdown_of_a_guest_that_died_cleans_up_and_says_so(make_dashboard):
    d = make_dashboard(1)
    slot = d.slots[0]
    d.launchers[0].launch_button.click()
    d.wait()
    pid, rundir = slot.guest.pid, RUNTIME_ROOT / slot.name
    os.kill(pid, signal.SIGKILL)
    until(lambda: slot.status == "exited", what="the dashboard to notice QEMU died")
    assert 'data-status="exited"' in d.launchers[0].status.value
    d.launchers[0].shutdown_button.click()
    d.wait()
    assert slot.status == "stopped"
    assert "had already exited" in slot.message("launcher").text
    assert not rundir.exists()
    d.launchers[0].shutdown_button.click()
    assert "nothing to shut down" in slot.message("launcher").text
    d.launchers[0].launch_button.click()  # and it can be launched again
    d.wait()
    assert slot.status == "running" and slot.guest.pid != pid


def test_workload_panel_allocates_and_plays_a_pattern_recorded_as_events(make_dashboard):
    d = make_dashboard(1)
    d.launchers[0].launch_button.click()
    d.wait()
    panel, slot = d.workloads[0], d.slots[0]
    panel.size.value = "64M"
    panel.alloc_button.click()
    d.wait()
    assert slot.held == 64 * MiB
    assert shown_bytes(panel.held.value, "bl-held") == 64 * MiB
    panel.kind.value, panel.low.value, panel.high.value = "ramp", "0", "96M"
    panel.step_s.value, panel.n_steps.value = 0.3, 3
    panel.run_button.click()
    assert slot.pattern_running
    panel.run_button.click()
    assert "already running" in slot.message("workload").text
    d.wait()
    assert slot.held == 96 * MiB and "ramp pattern done" in slot.message("workload").text
    events = d.events()
    held = list(events[events["kind"] == "workload"]["value"])
    assert held[0] == 64 * MiB and held[-1] == 96 * MiB and len(held) >= 3
    # A long pattern stops on Stop, keeping what it held.
    panel.kind.value, panel.step_s.value = "sawtooth", 5.0
    panel.run_button.click()
    time.sleep(0.5)
    panel.stop_button.click()
    d.wait()
    assert not slot.pattern_running and slot.message("workload").text == "cancelled"
    panel.free_all_button.click()
    d.wait()
    assert slot.held == 0
    # Bad pattern input is a message, not an exception.
    panel.high.value = "lots"
    panel.run_button.click()
    assert "cannot read size 'lots'" in slot.message("workload").text


def test_old_name_guestslot_still_imports_as_guestcontroller():
    import balloonlab.widgets
    assert balloonlab.widgets.GuestSlot is GuestController
    assert "GuestSlot" in balloonlab.widgets.__all__


def test_pattern_params_build_workload_schedules():
    steps = PatternParams("steps", "0", "96M", step_s=2, n_steps=3).to_schedule()
    assert steps.kind == "workload"
    assert [v // MiB for _, v in steps.points] == [0, 32, 64, 96, 64, 32, 0]
    assert [t for t, _ in steps.points] == [0, 2, 4, 6, 8, 10, 12]
    saw = PatternParams("sawtooth", "0", "64M", step_s=1, n_steps=2, cycles=2).to_schedule()
    assert saw.points[-1] == (6.0, 0) and max(v for _, v in saw.points) == 64 * MiB
    with pytest.raises(ValueError, match="cycles"):
        PatternParams("sawtooth", cycles=0).to_schedule()


def test_live_plot_data_grows_and_window_choice_redraws(make_dashboard):
    d = make_dashboard(1)
    d.launchers[0].launch_button.click()
    d.wait()
    first = until(lambda: d.plot.refresh() and d.plot.points, what="points in the plot")
    until(lambda: d.plot.refresh() and d.plot.points > first + 1, what="the plot's data to grow")
    lines = d.plot.figure._balloonlab_lines[d.slots[0].name]
    assert len(lines["free_memory"].get_xdata()) == d.plot.points
    assert re.search(rf'data-samples="{d.plot.samples}"', d.plot.info.value)
    assert d.plot.running  # its own timer thread, outside a kernel
    assert d.plot.figure._balloonlab_window == 300
    d.plot.window.value = 0  # "all": the timer rebuilds the axes with no window
    until(lambda: d.plot.figure._balloonlab_window is None, what="the plot to show the whole run")


def test_close_shuts_down_every_guest_even_mid_launch_and_stops_the_timer(make_dashboard):
    d = make_dashboard(2)
    d.launchers[0].launch_button.click()
    d.wait()
    d.launchers[1].launch_button.click()  # still booting when the dashboard closes
    assert d.slots[1].status == "launching"
    d.close()
    assert qemu_pids_under(RUNTIME_ROOT) == []
    assert [s.status for s in d.slots] == ["stopped", "not launched"]
    assert not d.plot.running
    assert not [t for t in threading.enumerate() if t.name == "balloonlab-live-plot"]
    assert not any((RUNTIME_ROOT / s.name).exists() for s in d.slots)


def test_import_balloonlab_does_not_import_widget_machinery():
    code = ("import sys, balloonlab\n"
            "heavy = ('ipywidgets', 'balloonlab.widgets', 'matplotlib.pyplot', 'ipympl')\n"
            "heavy = [m for m in heavy if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "d = getattr(balloonlab, 'dashboard', None)\n"
            "print('reexported' if d is not None else 'missing')\n"
            "if d is not None:\n"
            "    import balloonlab.widgets\n"
            "    assert d is balloonlab.widgets.dashboard\n")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "missing":
        pytest.skip("balloonlab/__init__.py has no lazy `dashboard` re-export yet")


def test_live_plot_toggles_to_the_attribution_view_of_a_real_guest_and_back(make_dashboard):
    d = make_dashboard(1, plot_view="attribution")
    assert d.plot.view.value == "attribution"
    d.launchers[0].launch_button.click()
    d.wait()
    name = d.slots[0].name

    def stacked() -> int:
        d.plot.refresh()
        kept = getattr(d.plot.figure, "_balloonlab_attribution", None)
        return kept.points.get(name, 0) if kept is not None else 0
    first = until(stacked, what="samples stacked in the attribution view")
    until(lambda: stacked() > first + 1, what="the attribution view to grow")
    ax = d.plot.figure._balloonlab_attribution.axes[name]
    assert {c.get_gid() for c in ax.collections if c.get_gid()} >= {"attribution:vmm_tcg", "attribution:guest_used"}
    assert not any("no host view" in t.get_text() for t in ax.texts)  # a local QEMU: the host's side is there
    d.plot.view.value = "memory"  # the toggle: the same rows drawn as the memory plot
    until(lambda: d.plot.refresh() and hasattr(d.plot.figure, "_balloonlab_lines")
          and name in d.plot.figure._balloonlab_lines, what="the memory view")
    with pytest.raises(ValueError, match="plot_view must be one of"):
        dashboard(1, plot_view="bands")
