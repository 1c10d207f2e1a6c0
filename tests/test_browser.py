"""The dashboard in a real browser: JupyterLab on 127.0.0.1, Debian's chromium via Playwright.

The page runs a one-guest dashboard notebook (tests/browser-dashboard.ipynb, a copy served
from a temp dir), clicks Launch, drags the balloon slider, and checks the outcome twice: on
the page (the panel's ``actual``, the plot's point count) and independently in QEMU, with
``query-balloon`` sent from a second client of the same kernel (as ``jupyter console
--existing`` would). The guest lives in the notebook's kernel, under the tests' runtime dir,
so the leak check sees it. Screenshot: test-artifacts/dashboard.png.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import RUNTIME_ROOT, qemu_pids_under
from .jupyter_server import CHROMIUM, chromium, jupyter_lab

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = Path(__file__).parent / "browser-dashboard.ipynb"
SCREENSHOT = ROOT / "test-artifacts" / "dashboard.png"
MiB = 1 << 20
TIMEOUT_MS = 90_000  # the machine is busy (TCG guests, a kernel, chromium on 2 cores)
pytestmark = pytest.mark.qemu


class KernelProbe:
    """A second client of the notebook's kernel: runs code there and evaluates an expression.

    The value comes back in the shell reply (``user_expressions``), not over IOPub, so it
    cannot be mixed up with the notebook's own output.
    """

    def __init__(self, connection_file: Path) -> None:
        from jupyter_client import BlockingKernelClient
        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def eval(self, expression: str, code: str = "") -> Any:
        """Run ``code``, then return ``expression`` evaluated in the kernel (a Python literal)."""
        reply = self.client.execute(code, silent=True, user_expressions={"value": expression},
                                    reply=True, timeout=60)
        content = reply["content"]
        assert content["status"] == "ok", f"{content.get('ename')}: {content.get('evalue')}"
        value = content["user_expressions"]["value"]
        assert value["status"] == "ok", f"{value.get('ename')}: {value.get('evalue')}"
        return ast.literal_eval(value["data"]["text/plain"])

    def close(self) -> None:
        self.client.stop_channels()


def data(page, css: str, attr: str) -> int:
    """An integer ``data-*`` attribute of the element a panel tags with ``css``."""
    value = page.locator(css).first.get_attribute(attr)
    assert value, f"{css} has no {attr}"
    return int(value)


def drag_slider(page, fraction: float) -> int:
    """Drag the balloon slider's handle to ``fraction`` of its track; returns the new value (MiB)."""
    track = page.locator(".widget-slider .noUi-target").first
    handle = page.locator(".widget-slider .noUi-handle").first
    box, knob = track.bounding_box(), handle.bounding_box()
    assert box and knob
    page.mouse.move(knob["x"] + knob["width"] / 2, knob["y"] + knob["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2, steps=8)
    page.mouse.up()
    return int(page.locator(".widget-slider .widget-readout").first.inner_text().strip())


def test_dashboard_in_jupyterlab_launch_and_slider_move_the_balloon_in_qemu(tmp_path, builtin_ready):
    from playwright.sync_api import expect
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    expect.set_options(timeout=TIMEOUT_MS)
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / "dashboard.ipynb")
    probe = None
    with jupyter_lab(root, tmp_path / "home") as lab:
        try:
            with chromium() as page:
                page.set_default_timeout(TIMEOUT_MS)
                page_errors: list[str] = []
                page.on("pageerror", lambda exc: page_errors.append(str(exc)))
                page.goto(lab.lab_url("dashboard.ipynb"))
                page.locator(".jp-Notebook").wait_for()
                # Run All only once the kernel is up ("No Kernel" would drop the request).
                page.locator(".jp-StatusBar-Widget", has_text="(ipykernel) | Idle").first.wait_for()
                page.locator("li.lm-TabBar-tab[data-id='filebrowser']").click()  # more room for the plot
                page.locator("li.lm-MenuBar-item", has_text="Run").click()
                page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
                launch = page.locator("button.jupyter-button", has_text="Launch")
                launch.wait_for()
                session = lab.api("GET", "/api/sessions")[0]
                lab.record_kernel_pids()
                probe = KernelProbe(lab.connection_file(session["kernel"]["id"]))

                launch.click()
                expect(page.locator(".bl-status")).to_have_attribute("data-status", "running")
                expect(page.locator(".bl-actual")).to_have_attribute("data-bytes", str(512 * MiB))
                assert len(qemu_pids_under(RUNTIME_ROOT)) == 1  # the kernel's guest, in our runtime dir
                expect(page.locator(".bl-points")).not_to_have_attribute("data-points", "0")
                points_before = data(page, ".bl-points", "data-points")

                target_mib = drag_slider(page, 0.4)
                assert 128 <= target_mib <= 384, target_mib
                # The page shows the new actual (from BALLOON_CHANGE), and QEMU agrees.
                expect(page.locator(".bl-target")).to_have_attribute("data-bytes", str(target_mib * MiB))
                deadline = time.monotonic() + 60
                while abs(data(page, ".bl-actual", "data-bytes") - target_mib * MiB) > MiB:
                    assert time.monotonic() < deadline, "the page never showed the new actual"
                    time.sleep(0.2)
                qemu_actual = probe.eval("dash.slots[0].guest.balloon.query_actual()")
                assert abs(qemu_actual - target_mib * MiB) <= MiB  # query-balloon, straight from QEMU
                assert abs(data(page, ".bl-actual", "data-bytes") - qemu_actual) <= MiB

                # Memory pressure from the workload panel.
                page.locator("button.jupyter-button", has_text="Allocate").click()
                expect(page.locator(".bl-held")).to_have_attribute("data-bytes", str(64 * MiB))

                # The live plot kept growing, on the page and in the kernel's figure (a dozen
                # points also make a readable screenshot).
                deadline = time.monotonic() + 40
                wanted = max(12, points_before + 3)
                while data(page, ".bl-points", "data-points") < wanted and time.monotonic() < deadline:
                    time.sleep(0.5)
                points_after = data(page, ".bl-points", "data-points")
                assert points_after >= points_before + 3
                lines = "dash.plot.figure._balloonlab_lines['browser-1']"
                n_points, lowest_mib = probe.eval(f"(len({lines}['total_memory'].get_xdata()), "
                                                  f"float(min({lines}['actual'].get_ydata())))")
                assert n_points >= points_after and lowest_mib == pytest.approx(target_mib, abs=1)
                assert page.locator(".jupyter-matplotlib-figure canvas").count() >= 1  # ipympl drew it

                page.locator(".bl-points").scroll_into_view_if_needed()
                page.locator(".jp-OutputArea").first.scroll_into_view_if_needed()
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(SCREENSHOT))
                assert not page_errors, page_errors

            # Closing the dashboard from the kernel shuts the guest down.
            left = probe.eval("[g.name for g in balloonlab.list_guests()]", "dash.close()\nimport balloonlab")
            assert left == []
            assert qemu_pids_under(RUNTIME_ROOT) == []
        finally:
            if probe is not None:
                probe.close()
    kernels = lab.kernel_pids
    assert kernels and not [p for p in kernels if Path(f"/proc/{p}").exists()
                            and re.search(rb"ipykernel", Path(f"/proc/{p}/cmdline").read_bytes())]
