"""Browser-test harness: a throwaway JupyterLab server driven by Playwright + Debian's chromium.

Every test gets a ``lab`` fixture (see :class:`Lab`) that writes notebooks into the server's
temporary root, opens them in a real JupyterLab page, runs all cells and saves screenshots
under ``tests/browser/artifacts/``. Tests skip (with the reason) when chromium, JupyterLab or
Playwright is missing, so the fast suite stays green on a bare machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("UWS_CHROMIUM", "/usr/bin/chromium")
# Browsers cannot be downloaded here: Playwright drives Debian's chromium with these flags.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_TIMEOUT_S = 90
CURRENT = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the active tab
CELL_TIMEOUT_MS = 120_000


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives a real browser against JupyterLab")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def _missing_requirement() -> str | None:
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).exists()):
        return f"chromium not found at {CHROMIUM} (apt-get install chromium)"
    for module, hint in [
        ("playwright", "pip install playwright"),
        ("jupyterlab", "pip install jupyterlab"),
        ("anywidget", "pip install anywidget"),
        ("ipykernel", "pip install ipykernel"),
    ]:
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed ({hint})"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {SERVER_START_TIMEOUT_S}s:\n"
                       f"{log.read_text()[-4000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM lets the server shut its kernels down; SIGKILL the group if it hangs."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def labextension_dir(tmp: Path) -> Path:
    """A labextensions folder holding this checkout's prebuilt extension (as pip installs it)."""
    built = REPO_ROOT / "jupyter_ext" / "labextension"
    if not (built / "package.json").exists():
        raise RuntimeError(f"{built} is missing: build it with `jlpm install && jlpm build` in labextension/")
    folder = tmp / "labextensions"
    (folder / "uwsfmt-jupyterlab").mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "static"):
        (folder / "uwsfmt-jupyterlab" / name).symlink_to(built / name)
    (folder / "uwsfmt-jupyterlab" / "install.json").symlink_to(REPO_ROOT / "labextension" / "install.json")
    return folder


class LabServer:
    """A JupyterLab server on 127.0.0.1 with a random port, a temporary root and no token."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="uws-lab-"))
        self.root = self.tmp / "root"
        self.root.mkdir()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.tmp / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        settings = self.tmp / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        # No news / update checks: nothing outside this machine can be reached anyway.
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        # Start the notebook's kernel without the "Select Kernel" dialog.
        tracker = self.tmp / "settings" / "@jupyterlab" / "notebook-extension"
        tracker.mkdir(parents=True)
        (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"autoStartDefaultKernel": True}))
        env = dict(os.environ)
        env.update({
            "JUPYTERLAB_SETTINGS_DIR": str(self.tmp / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(self.tmp / "workspaces"),
            "JUPYTER_RUNTIME_DIR": str(self.tmp / "runtime"),
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "MPLBACKEND": "Agg",
        })
        cmd = [
            sys.executable, "-m", "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--ServerApp.root_dir={self.root}",
            "--IdentityProvider.token=",
            "--ServerApp.password=",
            "--ServerApp.disable_check_xsrf=True",
            "--LabApp.news_url=",
            f"--LabApp.workspaces_dir={self.tmp / 'workspaces'}",
            # The extension manager would query PyPI from the browser's requests: not wanted.
            "--LabApp.extension_manager=readonly",
            # uwsfmt's own extensions from this checkout, installed or not: the server extension
            # and the prebuilt labextension (jupyter_ext/labextension, see labextension_dir())
            "--ServerApp.jpserver_extensions=jupyter_ext=True",
            # test-only: jobs writing to *slow* outputs wait at each step, so that a test can
            # cancel one or reload the page while it runs (tests/browser/slow_jobs.py)
            "--ServerApp.jpserver_extensions=tests.browser.slow_jobs=True",
            f"--LabApp.extra_labextensions_path={labextension_dir(self.tmp)}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # CI and dev machines run as root
            cmd.append("--allow-root")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=fh,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until_up(f"{self.url}/api/status", self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)
        shutil.rmtree(self.tmp, ignore_errors=True)


def notebook_json(cells: list[str]) -> dict:
    """A minimal nbformat-4 notebook with the python3 kernel, one code cell per source."""
    return {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
             "outputs": [], "source": src}
            for i, src in enumerate(cells)
        ],
    }


class Lab:
    """What a browser test works with: the server, a Playwright page, helpers."""

    def __init__(self, server: LabServer, browser) -> None:
        self.server = server
        self.browser = browser
        self.root = server.root
        self.pages = []
        self.js_errors: list[str] = []

    def write_notebook(self, name: str, cells: list[str]) -> Path:
        path = self.root / name
        path.write_text(json.dumps(notebook_json(cells), indent=1))
        return path

    def open(self, name: str):
        """Open a notebook in JupyterLab and wait until its kernel is idle."""
        context = self.browser.new_context(viewport={"width": 1500, "height": 1000})
        page = context.new_page()
        self.pages.append(page)
        # JS errors from widget code would otherwise only show as a blank output.
        page.on("pageerror", lambda exc: self.js_errors.append(str(exc)))
        page.on("console", lambda msg: msg.type == "error" and self.js_errors.append(msg.text))
        page.set_default_timeout(60_000)
        # ?reset: start from an empty workspace, not the tabs an earlier test left open
        page.goto(f"{self.server.url}/lab/tree/{name}?reset")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        self._wait_session(name)
        self.wait_kernel_idle(page)
        return page

    def _wait_session(self, name: str, timeout_s: float = 90) -> None:
        """Wait until the server runs a kernel for the notebook (the DOM says 'idle' before that).

        Accepts JupyterLab's "Select Kernel" dialog should it appear anyway.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{self.server.url}/api/sessions", timeout=5) as r:
                sessions = json.load(r)
            for s in sessions:
                if s.get("path") == name and (s.get("kernel") or {}).get("execution_state") == "idle":
                    return
            page = self.pages[-1]
            dialog = page.locator(".jp-Dialog .jp-mod-accept")
            if dialog.count():
                dialog.first.click()
            time.sleep(0.3)
        raise TimeoutError(f"no idle kernel for {name} after {timeout_s}s")

    def wait_kernel_idle(self, page, timeout_ms: int = 90_000) -> None:
        # The notebook toolbar's execution indicator carries the kernel status.
        page.wait_for_function(
            """() => {
                const el = document.querySelector(
                    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
                return !!el && el.getAttribute('data-status') === 'idle';
            }""",
            timeout=timeout_ms,
        )

    def run_all(self, page, timeout_ms: int = CELL_TIMEOUT_MS) -> None:
        """Run > Run All Cells through the menu bar, then wait until every cell has run."""
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator('#jp-mainmenu-run .lm-Menu-item[data-command="runmenu:run-all"]').click()
        n_cells = page.locator(f"{CURRENT} .jp-CodeCell").count()
        page.wait_for_function(
            """(n) => {
                const prompts = [...document.querySelectorAll(
                    '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
                return prompts.length === n && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
            }""",
            arg=n_cells,
            timeout=timeout_ms,
        )
        self.wait_kernel_idle(page, timeout_ms)

    def errors(self, page) -> list[str]:
        """Texts of error outputs (tracebacks) in the notebook."""
        return page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'], "
                            ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"
                            ).all_inner_texts()

    def screenshot(self, page, name: str, selector: str | None = None) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        if selector:
            page.locator(selector).first.screenshot(path=str(path))
        else:
            page.screenshot(path=str(path), full_page=False)
        return path


@pytest.fixture(scope="package")
def lab_server():
    reason = _missing_requirement()
    if reason:
        pytest.skip(reason)
    for old in ARTIFACTS.glob("FAILED-*.png"):  # failure shots of an earlier run would mislead
        old.unlink()
    server = LabServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def chromium_browser(lab_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def lab(request, lab_server, chromium_browser):
    lab = Lab(lab_server, chromium_browser)
    try:
        yield lab
    finally:
        if request.node.stash.get(_CALL_FAILED, False):
            for i, page in enumerate(lab.pages):  # what the page showed when the test failed
                with contextlib.suppress(Exception):
                    lab.screenshot(page, f"FAILED-{request.node.name}-{i}")
        for page in lab.pages:
            with contextlib.suppress(Exception):
                page.context.close()
