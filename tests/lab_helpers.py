"""JupyterLab in a real browser, for tests/test_ui.py: a server of the test's own (free port on 127.0.0.1,
a token, temporary settings, workspaces, config and runtime folders so no state leaks in or out), Debian's
chromium driven by Playwright (the system browser: never `playwright install`), and the few UI actions
the tests need: open a notebook, Run > Run All Cells, wait for the kernel, read what the page shows.

Selectors are JupyterLab 4 / ipywidgets 8 class names (`.jp-CodeCell`, `.jp-InputPrompt`,
`.jp-OutputArea-output`, `.widget-interact`, `.noUi-handle`); a major upgrade of either may rename them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# User settings written into the temporary settings folder: every cell in the DOM (the default
# windowing skips rendering cells out of view, which would hide their outputs from the checks), no news
# or update checks (no network, no toasts over the screenshots), no autosave racing the explicit save.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}
# What a widget shows instead of itself when its model or view failed, or has not arrived yet.
WIDGET_FAILED = "Error displaying widget"
WIDGET_PENDING = ("Loading widget", "Loading…")


@dataclass
class Lab:
    url: str
    token: str
    root: Path

    def api(self, method: str, path: str, body: dict | None = None) -> dict | None:
        """A call to the server's REST API (``path`` after ``/api/``)."""
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            text = r.read()
        return json.loads(text) if text else None

    def page_url(self, notebook: str, workspace: str) -> str:
        return f"{self.url}/lab/workspaces/{workspace}/tree/{notebook}?token={self.token}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def lab_server(root: Path, state: Path, log: Path, timeout: float = 60):
    """``jupyter lab`` from this venv serving ``root``, with its settings and workspaces under ``state``;
    stopped (kernels included) on exit through the server's shutdown API, then by its PID if need be."""
    root.mkdir(parents=True, exist_ok=True)
    for name, values in SETTINGS.items():
        f = state / "settings" / f"{name}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(state / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(state / "workspaces"), JUPYTER_CONFIG_DIR=str(state / "config"),
               JUPYTER_RUNTIME_DIR=str(state / "runtime"), JUPYTER_DATA_DIR=str(state / "data"))
    lab = Lab(f"http://127.0.0.1:{free_port()}", secrets.token_hex(16), root)
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1",
           f"--port={lab.url.rsplit(':', 1)[1]}", f"--IdentityProvider.token={lab.token}",
           "--ServerApp.open_browser=False", f"--ServerApp.root_dir={root}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                lab.api("GET", "status")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start within {timeout:.0f} s; see {log}") from None
                time.sleep(0.2)
        yield lab
    finally:
        _stop(proc, lab)


def _stop(proc: subprocess.Popen, lab: Lab) -> None:
    try:
        lab.api("POST", "shutdown")  # shuts the kernels down too
        proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else of ours
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@contextmanager
def chromium():
    """Debian's chromium, headless, through Playwright's sync API."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_notebook(browser, lab: Lab, notebook: str, timeout_s: float = 60):
    """A new page with ``notebook`` open in a workspace of its own, once its kernel is idle."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(lab.page_url(notebook, workspace=re.sub(r"\W", "-", notebook)))
    page.wait_for_selector(".jp-NotebookPanel .jp-CodeCell", timeout=timeout_s * 1e3)
    wait_for_kernel_idle(page, timeout_s)
    return page


def wait_for_kernel_idle(page, timeout_s: float) -> None:
    page.wait_for_function("() => document.querySelector('#jp-main-statusbar')?.textContent.includes('| Idle')",
                           timeout=timeout_s * 1e3)


_PROMPTS = "[...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')]"


def run_all_cells(page, timeout_s: float) -> None:
    """Run > Run All Cells from the menu bar; return when no cell is queued or running ("[*]") and the
    kernel is idle. A cell that fails stops the run: the cells after it keep their empty prompt."""
    page.click("#jp-MainMenu .lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    page.wait_for_function(f"() => /\\[\\d+\\]/.test({_PROMPTS}[0]?.textContent)", timeout=timeout_s * 1e3)
    page.wait_for_function(f"() => !{_PROMPTS}.some(p => p.textContent.includes('*')) && "
                           "document.querySelector('#jp-main-statusbar').textContent.includes('| Idle')",
                           timeout=timeout_s * 1e3)


def output_texts(page) -> list[dict]:
    """Each output in the notebook: its mime type and text."""
    return page.evaluate("""() => [...document.querySelectorAll('.jp-NotebookPanel .jp-OutputArea-output')]
        .map(e => ({mime: e.getAttribute('data-mime-type'), text: e.innerText}))""")


def wait_for_widgets(page, timeout_s: float = 20) -> None:
    """Until no widget placeholder is left, or ``timeout_s`` (then :func:`problems` names what still loads)."""
    from playwright.sync_api import TimeoutError

    pending = " || ".join(f"t.includes({json.dumps(p)})" for p in WIDGET_PENDING)
    try:
        page.wait_for_function(f"""() => {{ const t = [...document.querySelectorAll(
            '.jp-NotebookPanel .jp-OutputArea-output')].map(e => e.innerText).join('\\n'); return !({pending}); }}""",
                               timeout=timeout_s * 1e3)
    except TimeoutError:
        pass


def problems(page) -> list[str]:
    """What the page shows that a clean run would not: error outputs, tracebacks, widgets that failed or
    are still loading, no widget at all."""
    found = []
    for o in output_texts(page):
        if o["mime"] == "application/vnd.jupyter.error" or "Traceback" in o["text"]:
            found.append(f"error output: {o['text'][:300]}")
        if WIDGET_FAILED in o["text"]:
            found.append(f"widget failed: {o['text'][:300]}")
        found += [f"widget still loading: {o['text'][:100]}" for p in WIDGET_PENDING if p in o["text"]]
    if page.locator(".jp-NotebookPanel .jp-OutputArea-output .jupyter-widgets").count() == 0:
        found.append("no widget rendered (.jupyter-widgets)")
    return found


def save_and_read(page, lab: Lab, notebook: str) -> dict:
    """File > Save Notebook (so the outputs JupyterLab holds reach the disk), then the notebook as the
    server returns it."""
    page.click("#jp-MainMenu .lm-MenuBar-itemLabel:text-is('File')")
    page.click(".lm-Menu-itemLabel:text-is('Save Notebook')")
    page.wait_for_function("() => !document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty')")
    return lab.api("GET", f"contents/{notebook}?content=1")["content"]


def error_outputs(nb: dict) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb["cells"])
            for o in c.get("outputs", []) if o["output_type"] == "error"]


def echoed_functions(nb: dict) -> list[str]:
    """Stray outputs: a cell's last expression echoing a function (e.g. ``interact``'s return value)."""
    return [f"cell {i}: {o['data']['text/plain']}" for i, c in enumerate(nb["cells"]) for o in c.get("outputs", [])
            if o["output_type"] == "execute_result" and "".join(o["data"].get("text/plain", "")).startswith("<function")]


def widget(page, kind: str, label: str):
    """The control of the notebook's interact widget with this description (``kind``: "dropdown",
    "hslider")."""
    return page.locator(f".widget-interact .widget-{kind}", has=page.locator(f"label:text-is('{label}')"))


def interact_text(page) -> str:
    """The text the notebook's interact widget shows below its controls."""
    return page.locator(".widget-interact .widget-output").inner_text()


def wait_for_text(page, contains: str, timeout_s: float = 30) -> str:
    page.wait_for_function(f"() => document.querySelector('.widget-interact .widget-output')"
                           f"?.innerText.includes({json.dumps(contains)})", timeout=timeout_s * 1e3)
    return interact_text(page)


def press_slider(page, label: str, *keys: str) -> str:
    """Move a slider from the keyboard, as a user can (its handle focused, then arrow/Home/End keys);
    returns the value it shows afterwards."""
    w = widget(page, "hslider", label)
    handle = w.locator(".noUi-handle")
    handle.focus()
    for key in keys:
        handle.press(key)
    return w.locator(".widget-readout").inner_text()
