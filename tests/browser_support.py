"""Harness for the browser tests and the UI latency benchmark.

Starts JupyterLab or Voila on 127.0.0.1 (a free port, no token) over a temporary copy of
notebooks/ (so executing notebooks never dirties the repository), launches Debian's Chromium
through playwright (no browser download: Debian's binary via executable_path), and drives a notebook: open, run all cells,
execute code in its kernel and read back what it printed.
"""
from __future__ import annotations

import atexit
import importlib.util
import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
import urllib.request

REPO = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
BIN = pathlib.Path(sys.executable).parent
CHROMIUM = os.environ.get("MVZ_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def missing_requirements() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not pathlib.Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (make chromium)"
    try:
        found = importlib.util.find_spec("playwright.sync_api") is not None
    except ImportError:
        found = False
    if not found:
        return "playwright (Python) is not installed"
    if not (REPO / "multiviz_widgets" / "static" / "input_view.js").is_file():
        return "the JavaScript bundle is not built (make js)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_notebooks(dest: pathlib.Path | None = None) -> pathlib.Path:
    """A temporary directory holding a copy of notebooks/ (as ``notebooks/``)."""
    root = pathlib.Path(dest or tempfile.mkdtemp(prefix="mvz-browser-"))
    shutil.copytree(NOTEBOOKS, root / "notebooks", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return root


def write_notebook(path: pathlib.Path, cells: list[str | tuple[str, str]]) -> pathlib.Path:
    """Write a notebook: each cell is code, or ("markdown", text)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for c in cells:
        if isinstance(c, tuple):
            nb.cells.append(nbformat.v4.new_markdown_cell(c[1]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(c))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


class Server:
    """A Jupyter server process (JupyterLab or Voila) on 127.0.0.1 at a free port."""

    def __init__(self, argv: list[str], port: int, root: pathlib.Path, ready_path: str,
                 log_name: str, timeout: float = 120.0):
        self.port, self.root = port, root
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = root / log_name
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.pop("JUPYTER_TOKEN", None)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        # The kernels import this checkout (also when the package is not pip-installed).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        # Keep the user's Jupyter state (workspaces, settings) out of the test.
        for var, sub in (("JUPYTER_CONFIG_DIR", "jupyter-config"),
                         ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
                         ("JUPYTERLAB_SETTINGS_DIR", "lab-settings")):
            env[var] = str(root / ".jupyter" / sub)
        self.proc = subprocess.Popen(argv, cwd=root, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        atexit.register(self.stop)  # the server runs in its own session: never leave it behind
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + ready_path, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[0]} did not answer on {self.url} within {timeout}s:\n"
                                   f"{self.log()}")
            time.sleep(0.5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


LAB_SETTINGS = {
    # Render every cell (JupyterLab 4 skips painting cells outside the viewport by default,
    # which hides widgets from the tests), and never fetch news or updates.
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false", "checkForUpdates": False},
}


def start_lab(root: pathlib.Path) -> Server:
    settings = root / ".jupyter" / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        path = settings / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port = free_port()
    argv = [str(BIN / "jupyter"), "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1",
            f"--port={port}", "--ServerApp.port_retries=0", "--IdentityProvider.token=",
            "--ServerApp.password=", "--LabApp.expose_app_in_browser=True",
            "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={root}",
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    return Server(argv, port, root, "/api/status", "jupyterlab.log")


def start_voila(root: pathlib.Path, notebook: str) -> Server:
    """Voila serving one notebook (path relative to root). Readiness is checked on a static
    asset, because GET / executes the notebook. The kernels' connection files go under root
    (``voila_*/kernel-ID.json``), so that a failing test can ask a page's kernel what it holds
    (``voila_kernel_json``)."""
    port = free_port()
    argv = [str(BIN / "voila"), notebook, "--no-browser", "--Voila.ip=127.0.0.1",
            f"--port={port}", "--Voila.port_retries=0", f"--Voila.connection_dir_root={root}"]
    return Server(argv, port, root, VOILA_READY_PATH, "voila.log")


def voila_kernel_json(server: Server, kernel_id: str, code: str, timeout: float = 30.0):
    """Run ``code`` (which prints one JSON document last) in the kernel of a Voila page, through
    a second client on its connection file; the parsed document. The code runs after the
    kernel's pending messages (a kernel that is stuck makes this raise a TimeoutError)."""
    from jupyter_client import BlockingKernelClient

    files = sorted(server.root.glob(f"voila_*/kernel-{kernel_id}.json"))
    if not files:
        raise FileNotFoundError(f"no connection file of kernel {kernel_id} under {server.root}")
    kc = BlockingKernelClient(connection_file=str(files[0]))
    kc.load_connection_file()
    kc.start_channels()
    out: list[str] = []
    errors: list[str] = []

    def hook(msg):
        kind = msg["header"]["msg_type"]
        if kind == "stream" and msg["content"].get("name") == "stdout":
            out.append(msg["content"]["text"])
        elif kind == "error":
            errors.append(f"{msg['content']['ename']}: {msg['content']['evalue']}")

    try:
        kc.execute_interactive(code, timeout=timeout, store_history=False, output_hook=hook)
    finally:
        kc.stop_channels()
    if errors:
        raise RuntimeError(f"kernel error running {code!r}: {errors}")
    return json.loads("".join(out).strip().splitlines()[-1])


#: The kernel-side state of the Explorer named ``explorer`` (``Explorer.diagnostics``), as JSON.
EXPLORER_DIAGNOSTICS = ("import json; print(json.dumps(explorer.diagnostics(), default=str))")

# The browser-side state of the widget models that have a trait ``attr`` (e.g. the InputView's
# "score_caption") in a Voila page: whether the model's comm is live, its sync messages still
# waiting for the kernel's idle reply (pending; later changes wait in msg_buffer meanwhile), the
# traits whose echo it waits for, and the kernel connection's status.
JS_VOILA_MODELS = """async (attr) => {
  const wm = window.jupyterapp && window.jupyterapp._widgetManager;
  if (!wm) return null;
  const models = [];
  for (const id of Object.keys(wm._models || {})) {
    let m; try { m = await wm._models[id]; } catch (e) { continue; }
    if (!m || m.get(attr) === undefined) continue;
    models.push({id, comm_live: m.comm_live, pending_msgs: m._pending_msgs,
                 msg_buffer: m._msg_buffer, awaiting_echo: Array.from((m._expectedEchoMsgIds
                 || new Map()).keys()), selected: m.get('selected'), [attr]: m.get(attr)});
  }
  const k = wm.kernel;
  return {kernel_id: k && k.id, connection: k && k.connectionStatus, status: k && k.status,
          models};
}"""


def decode_ws_message(payload) -> dict | None:
    """A Jupyter kernel message from a websocket frame: JSON text, or binary in the
    "v1.kernel.websocket.jupyter.org" protocol (offsets, channel, header, parent header,
    metadata, content, buffers) or the legacy one (offsets, message JSON, buffers)."""
    import struct

    if isinstance(payload, str):
        try:
            return json.loads(payload)
        except ValueError:
            return None
    b = bytes(payload)
    try:                                     # v1: uint64 little-endian offsets
        n = struct.unpack_from("<Q", b, 0)[0]
        offs = [struct.unpack_from("<Q", b, 8 * (i + 1))[0] for i in range(n)]
        parts = [b[offs[i]:(offs[i + 1] if i + 1 < n else len(b))] for i in range(n)]
        header, parent, _, content = (json.loads(p) for p in parts[1:5])
        return {"channel": parts[0].decode(), "header": header, "parent_header": parent,
                "content": content}
    except Exception:  # noqa: BLE001 - not v1: try the legacy framing
        pass
    try:                                     # legacy: uint32 big-endian count and offsets
        n = struct.unpack_from("!I", b, 0)[0]
        offs = [struct.unpack_from("!I", b, 4 * (i + 1))[0] for i in range(n)]
        return json.loads(b[offs[0]:(offs[1] if n > 1 else len(b))])
    except Exception:  # noqa: BLE001
        return None


class CommLog:
    """What went over a page's kernel websockets, one short line a message: for a browser test
    to say, when a click seems lost, whether the click left the page and what the kernel sent
    back (its echo, the updates, the idle status that lets the page send its next change)."""

    SHOWN = ("selected", "score_caption", "caption", "method")

    def __init__(self, page):
        self.entries: list[dict] = []
        self._t0 = time.monotonic()
        page.on("websocket", self._on_socket)

    def _on_socket(self, ws) -> None:
        ws.on("framesent", lambda payload: self._add("page->kernel", payload))
        ws.on("framereceived", lambda payload: self._add("kernel->page", payload))

    def mark(self) -> int:
        return len(self.entries)

    def _add(self, direction: str, payload) -> None:
        msg = decode_ws_message(payload)
        if not msg or "header" not in msg:
            return
        header, parent = msg["header"], msg.get("parent_header") or {}
        content = msg.get("content") or {}
        e = {"t": round(time.monotonic() - self._t0, 3), "dir": direction,
             "type": header.get("msg_type"), "id": str(header.get("msg_id", ""))[-12:],
             "parent": str(parent.get("msg_id", ""))[-12:], "parent_type": parent.get("msg_type")}
        if e["type"] in ("comm_msg", "comm_open", "comm_close"):
            data = content.get("data") or {}
            state = data.get("state") or {}
            e["comm"] = str(content.get("comm_id", ""))
            e["method"] = data.get("method")
            e["state"] = {k: (str(v)[:100] if k in self.SHOWN else "...") for k, v in state.items()}
        elif e["type"] == "status":
            e["state"] = content.get("execution_state")
        self.entries.append(e)

    def format(self, since: int = 0, comm: str | None = None, limit: int = 60) -> str:
        """The messages logged since ``since``: those of comm ``comm`` (all comms when None),
        and the status messages that answer a message the page sent meanwhile."""
        rows = self.entries[since:]
        sent = {e["id"] for e in rows if e["dir"] == "page->kernel"}
        keep = [e for e in rows
                if (e["type"] != "status" and (comm is None or e.get("comm") == comm))
                or (e["type"] == "status" and e["parent"] in sent)]
        lines = [f"{e['t']:9.3f} {e['dir']} {e['type']}"
                 + (f" {e.get('method')} comm={e['comm'][:8]} {e.get('state')}" if "comm" in e
                    else f" {e.get('state', '')}")
                 + f" id=..{e['id']} parent={e['parent_type']}:..{e['parent']}" for e in keep]
        if len(lines) > limit:
            half = limit // 2
            lines = lines[:half] + [f"... {len(lines) - 2 * half} more ..."] + lines[-half:]
        return "\n".join(lines) if lines else "(none)"


VOILA_READY_PATH = "/voila/static/favicon.ico"


@contextlib.contextmanager
def browser():
    """A headless Debian Chromium (playwright sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Notebook:
    """A notebook open in JupyterLab in one playwright page."""

    def __init__(self, page, server: Server, path: str):
        self.page, self.server, self.path = page, server, path
        self.dialogs: list[str] = []
        self.console_errors: list[str] = []
        page.on("dialog", self._on_dialog)
        page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))

    def _on_dialog(self, dialog):
        if dialog.type == "beforeunload":  # leaving a notebook with unsaved outputs
            dialog.accept()
            return
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    # The notebook panel of self.path (not just the current widget: a workspace may hold more).
    _PANEL = """(path) => {
        const app = window.jupyterapp;
        if (!app) return null;
        for (const w of Array.from(app.shell.widgets('main')))
            if (w.context && w.context.path === path) return w;
        return null;
    }"""

    def open(self, timeout: float = 120_000) -> "Notebook":
        # A fresh workspace per page, so no notebook of an earlier test is restored beside it.
        ws = f"mvz{uuid.uuid4().hex[:10]}"
        self.page.goto(f"{self.server.url}/lab/workspaces/{ws}/tree/{self.path}?reset",
                       timeout=timeout)
        self.page.wait_for_function(
            f"(path) => {{ const w = ({self._PANEL})(path); const k = w && w.sessionContext"
            " && w.sessionContext.session && w.sessionContext.session.kernel;"
            " return !!k && k.connectionStatus === 'connected'; }", arg=self.path, timeout=timeout)
        return self

    def run_all(self) -> None:
        self.page.evaluate(
            f"(path) => {{ const w = ({self._PANEL})(path); window.jupyterapp.shell.activateById(w.id);"
            " void window.jupyterapp.commands.execute('notebook:run-all-cells'); }", self.path)

    def kernel_exec(self, code: str, timeout: float = 120_000) -> str:
        """Run code in the notebook's kernel (after the cells queued before it); its stdout."""
        res = self.page.evaluate(
            "async ([code, path]) => { const w = (" + self._PANEL + """)(path);
                 const kernel = w.sessionContext.session.kernel;
                 const future = kernel.requestExecute({code, store_history: false, silent: false});
                 let out = "", err = null;
                 future.onIOPub = (msg) => {
                   const t = msg.header.msg_type;
                   // stdout only: a warning on stderr (e.g. from a kernel's worker thread)
                   // must not take the place of the printed result
                   if (t === "stream" && msg.content.name === "stdout") out += msg.content.text;
                   if (t === "error") err = msg.content.ename + ": " + msg.content.evalue + "\\n"
                                          + (msg.content.traceback || []).join("\\n");
                 };
                 await future.done;
                 return {out, err};
               }""", [code, self.path])
        if res["err"]:
            raise RuntimeError(f"kernel error running {code!r}:\n{res['err']}")
        return res["out"]

    def kernel_json(self, code: str, timeout: float = 120_000):
        """Run code that prints one JSON document last; return it parsed."""
        out = self.kernel_exec(code, timeout).strip().splitlines()
        return json.loads(out[-1])

    def cell_errors(self) -> list[str]:
        """Error outputs shown in the notebook's cells."""
        return self.page.evaluate(
            """() => Array.from(document.querySelectorAll(
                 '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
                 .map(e => e.textContent).filter(t => /Error|Traceback/.test(t))""")


# -- DOM helpers used by the tests and the benchmark -------------------------------------------

JS_UNIT_SCORES = """(sel) => Array.from(document.querySelectorAll(sel))
    .map(e => ({unit: Number(e.dataset.unit), score: e.dataset.score}))"""

# Click a unit element and resolve when the InputView has re-rendered (data-render-count
# changed) with its new content: when `captionIncludes` is given, once the score caption contains
# it (the Explorer sets scores and caption in one message, so the scores are painted by then);
# otherwise once the data-score values of the `watch` units differ from before. Resolves to
# {ms, ok}: ms from the click to that DOM update, measured in the page with performance.now().
JS_CLICK_AND_WAIT = """async ([clickSel, watchSel, timeout, captionIncludes]) => {
  const target = document.querySelector(clickSel);
  if (!target) throw new Error("no element " + clickSel);
  const root = target.closest('.mvz-input');
  const snap = () => Array.from(document.querySelectorAll(watchSel)).map(e => e.dataset.score).join(',');
  const caption = () => (root.querySelector('.mvz-score-caption') || {}).textContent || '';
  const before = snap();
  const count0 = root.dataset.renderCount;
  return await new Promise((resolve) => {
    let done = false, t0 = 0;
    const finish = (ok) => {
      if (done) return; done = true; obs.disconnect();
      resolve({ms: performance.now() - t0, ok});
    };
    const check = () => {
      if (root.dataset.renderCount === count0) return;
      if (captionIncludes) {
        const c = caption();
        if (c.includes(captionIncludes) && !c.startsWith('computing')) finish(true);
      } else if (snap() !== before) finish(true);
    };
    const obs = new MutationObserver(check);
    obs.observe(root, {subtree: true, attributes: true, childList: true, characterData: true});
    setTimeout(() => finish(false), timeout);
    t0 = performance.now();
    target.click();
  });
}"""


def kernel_link(page, selector: str = ".mvz-input", timeout_ms: int = 60_000) -> str:
    """Whether the kernel's messages reach the view at ``selector`` (its data-kernel-link, see
    js/lib/kernel_link.js): "ok" once the kernel answered its ping, else what it says after
    ``timeout_ms`` ("silent": anywidget gave up on the model's set-up, and only a reload mends
    it; "waiting")."""
    try:
        page.wait_for_function(
            "sel => { const e = document.querySelector(sel);"
            " return e !== null && e.dataset.kernelLink === 'ok'; }",
            arg=selector, timeout=timeout_ms)
    except Exception:  # noqa: BLE001 - playwright's timeout: say what the view says instead
        pass
    return page.evaluate("sel => { const e = document.querySelector(sel);"
                         " return e === null ? 'no view' : (e.dataset.kernelLink || 'none'); }",
                         selector)
