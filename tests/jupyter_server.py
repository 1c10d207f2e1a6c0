"""A private JupyterLab server and a headless chromium for browser tests.

:class:`JupyterLab` serves a folder on 127.0.0.1 (a free port, a random token) with every
Jupyter, IPython and matplotlib file in a temporary dir (HOME included), news, update check
and extension manager off, and a fresh workspace, as docs/machine.md advises. It records the
pids of the kernels it starts (by their connection files), so :meth:`JupyterLab.stop` can
shut sessions down through the REST API, stop the server with one SIGTERM and kill any
kernel left over by pid. :func:`chromium` launches Debian's /usr/bin/chromium through
Playwright (never ``playwright install``) with a page that aborts every non-loopback request.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
#: JupyterLab plugins that talk to the internet or pop up notices.
DISABLED_PLUGINS = {"@jupyterlab/apputils-extension:announcements": True,
                    "@jupyterlab/extensionmanager-extension": True}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 serving ``root``, with its state under ``home``."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root, self.home = root, home
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.runtime_dir = home / "jupyter-runtime"
        self.kernel_pids: set[int] = set()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home / "jupyter.log"

    def env(self) -> dict[str, str]:
        """The server's (and so its kernels') environment: everything in temp dirs."""
        env = dict(os.environ)
        if "BALLOONLAB_CACHE_DIR" not in env:
            # The kernels get a temp HOME and XDG_CACHE_HOME: point them at the guest image
            # this process uses (its cache root is three levels above the kernel file).
            from balloonlab import builtin_spec
            env["BALLOONLAB_CACHE_DIR"] = str(Path(str(builtin_spec().kernel)).parents[2])
        dirs = {"HOME": "home", "JUPYTER_CONFIG_DIR": "jupyter-config", "JUPYTER_DATA_DIR": "jupyter-data",
                "JUPYTER_RUNTIME_DIR": "jupyter-runtime", "IPYTHONDIR": "ipython", "MPLCONFIGDIR": "mpl",
                "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config", "XDG_DATA_HOME": "data"}
        for var, sub in dirs.items():
            path = self.home / sub
            path.mkdir(parents=True, exist_ok=True)
            env[var] = str(path)
        env.pop("MPLBACKEND", None)
        return env

    def start(self, timeout_s: float = 60.0) -> JupyterLab:
        """Start the server and wait until its REST API answers."""
        env = self.env()
        config = Path(env["JUPYTER_CONFIG_DIR"])
        (config / "labconfig").mkdir(exist_ok=True)
        (config / "labconfig" / "page_config.json").write_text(json.dumps({"disabledExtensions": DISABLED_PLUGINS}))
        settings = json.dumps({
            "ServerApp": {"ip": "127.0.0.1", "port": self.port, "port_retries": 0, "open_browser": False,
                          "token": self.token, "root_dir": str(self.root), "allow_root": True,
                          "terminals_enabled": False},
            "LabApp": {"news_url": None,
                       "check_for_updates_class": "jupyterlab.handlers.announcements.NeverCheckForUpdate",
                       "extension_manager": "readonly", "workspaces_dir": str(self.home / "workspaces"),
                       "user_settings_dir": str(self.home / "user-settings")},
        })
        for name in ("jupyter_server_config.json", "jupyter_lab_config.json"):
            (config / name).write_text(settings)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root"],
                                         cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError, ValueError):
                if self.api("GET", "/api/status") is not None:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within {timeout_s} s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        """The server's output so far (last 4000 characters)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def api(self, method: str, path: str, timeout_s: float = 10.0) -> Any:
        """Call the REST API; returns the decoded JSON (None for an empty body)."""
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
        return json.loads(body) if body else None

    def lab_url(self, notebook: str) -> str:
        """The URL that opens ``notebook`` in a reset workspace."""
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def record_kernel_pids(self) -> set[int]:
        """Note the pids of kernels started with a connection file in this server's runtime dir."""
        marker = str(self.runtime_dir).encode()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if marker in (proc / "cmdline").read_bytes():
                        self.kernel_pids.add(int(proc.name))
        return self.kernel_pids

    def connection_file(self, kernel_id: str) -> Path:
        """A running kernel's connection file (for a second client, as ``jupyter console --existing``)."""
        return self.runtime_dir / f"kernel-{kernel_id}.json"

    def stop(self) -> None:
        """Shut down sessions (kernels), then the server by one SIGTERM; kill leftover kernels."""
        if self.proc is None:
            return
        self.record_kernel_pids()
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            for session in self.api("GET", "/api/sessions") or []:
                self.api("DELETE", f"/api/sessions/{session['id']}", timeout_s=30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.kernel_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc = None


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path) -> Iterator[JupyterLab]:
    """A running :class:`JupyterLab`, stopped (with its kernels) on exit."""
    lab = JupyterLab(root, home)
    try:
        yield lab.start()
    finally:
        lab.stop()


def loopback_only(route: Any) -> None:
    """Playwright route handler: let 127.0.0.1/localhost through, abort everything else."""
    host = urlparse(route.request.url).hostname
    if host in ("127.0.0.1", "localhost", "::1"):
        route.continue_()
    else:
        route.abort()


@contextlib.contextmanager
def chromium(viewport: tuple[int, int] = (1400, 1100)) -> Iterator[Any]:
    """A Playwright page in Debian's headless chromium, with non-loopback requests aborted."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
            context.route("**/*", loopback_only)
            yield context.new_page()
        finally:
            browser.close()
