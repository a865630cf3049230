"""JupyterLab for real: the notebooks run where the README sends people. A temporary project (its
pyproject.toml marks it) gets a copy of notebooks/; JupyterLab serves it on 127.0.0.1; each notebook
is opened through the REST API (a session, so the kernel starts in notebooks/ as Lab starts it), its
cells run over the kernel's websocket, and the outputs are read: no error, figures, and the campaign
written to the project's results/, not notebooks/results/."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
CELL_TIMEOUT = 180.0
# run right after the parameters cell: one small campaign with a known id
SMALL_CAMPAIGN = 'trials = 1\nagent_nats = "port_restricted"\nconnector_nats = "full_cone,symmetric"\n' \
                 'new_campaign_id = "lab-check"\n'


class Lab:
    """A JupyterLab server of ours and its REST API."""

    def __init__(self, project: Path, port: int, token: str, proc: subprocess.Popen) -> None:
        self.project, self.port, self.token, self.proc = project, port, token, proc

    def api(self, method: str, path: str, body: dict | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (kernels start in their own session, so not in its group)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _stop(proc: subprocess.Popen) -> None:
    """The server and its kernels: asked to end, then killed if still there after 10 s."""
    kernels = _descendants(proc.pid)
    _signal([proc.pid, *kernels], signal.SIGTERM)
    deadline = time.monotonic() + 10

    def left() -> list[int]:
        return [pid for pid in kernels if Path(f"/proc/{pid}").exists()]

    while time.monotonic() < deadline and (proc.poll() is None or left()):
        time.sleep(0.1)
    _signal([*([proc.pid] if proc.poll() is None else []), *left()], signal.SIGKILL)
    proc.wait(10)


def _wait_ready(lab: Lab) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if lab.proc.poll() is not None:
            raise AssertionError(f"jupyter-lab exited with {lab.proc.returncode}")
        try:
            lab.api("GET", "/api/status")
            return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise TimeoutError(f"jupyter-lab did not answer /api/status within {START_TIMEOUT:.0f} s") from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    tmp_path = tmp_path_factory.mktemp("jupyterlab")
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # only the notebooks: not what kernels left there
        shutil.copy(notebook, project / "notebooks" / notebook.name)
    (project / "pyproject.toml").write_text('[project]\nname = "lab-check"\n')
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "QLAB_RESULTS"}  # the project decides, as for a user
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={project}",
         "--allow-root"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        server = Lab(project, port, token, proc)
        _wait_ready(server)
        yield server
    finally:
        _stop(proc)
        log.close()


def _message(session: str, msg_type: str, content: dict) -> dict:
    header = {"msg_id": uuid.uuid4().hex, "username": "test", "session": session, "msg_type": msg_type,
              "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell",
            "buffers": []}


async def _request(ws: Any, session: str, msg_type: str, content: dict, timeout: float) -> list[dict]:
    """Send one shell request; return its iopub messages once the kernel is idle again and the reply came."""
    msg = _message(session, msg_type, content)
    await ws.write_message(json.dumps(msg))
    mine, replied, idle = [], False, False
    deadline = asyncio.get_running_loop().time() + timeout
    while not (replied and idle):
        raw = await asyncio.wait_for(ws.read_message(), max(0.1, deadline - asyncio.get_running_loop().time()))
        if raw is None:
            raise AssertionError("the kernel's websocket closed")
        got = json.loads(raw)
        if got.get("parent_header", {}).get("msg_id") != msg["header"]["msg_id"]:
            continue
        if got["channel"] == "shell":
            replied = True
        elif got["channel"] == "iopub":
            idle = idle or (got["msg_type"] == "status" and got["content"]["execution_state"] == "idle")
            mine.append(got)
    return mine


async def _run_cells(lab: Lab, kernel_id: str, cells: list[str]) -> list[list[dict]]:
    """Each cell's output messages, in order; stops after a cell that raised."""
    from tornado.websocket import websocket_connect

    url = f"ws://127.0.0.1:{lab.port}/api/kernels/{kernel_id}/channels?token={lab.token}"
    ws = await asyncio.wait_for(websocket_connect(url), 30)
    session, outputs = uuid.uuid4().hex, []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the kernel answers once it has started
            try:
                await _request(ws, session, "kernel_info_request", {}, 5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise
        for code in cells:
            content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                       "allow_stdin": False, "stop_on_error": True}
            got = [m for m in await _request(ws, session, "execute_request", content, CELL_TIMEOUT)
                   if m["msg_type"] in ("stream", "display_data", "execute_result", "error")]
            outputs.append(got)
            if any(m["msg_type"] == "error" for m in got):
                break
    finally:
        ws.close()
    return outputs


def run_notebook(lab: Lab, name: str, inject: str = "") -> list[list[dict]]:
    """Open notebooks/<name> as Lab does (a session on its path), run its code cells with `inject`
    after the parameters cell, and return each cell's outputs."""
    path = f"notebooks/{name}"
    nb = lab.api("GET", f"/api/contents/{path}?content=1")["content"]
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cells.append(cell["source"])
            if inject and "parameters" in cell["metadata"].get("tags", []):
                cells.append(inject)
    cells.append("import os\nprint('cwd:', os.getcwd())")  # where the kernel runs: notebooks/, as in Lab
    session = lab.api("POST", "/api/sessions", {"path": path, "name": name, "type": "notebook",
                                                "kernel": {"name": "python3"}})
    try:
        return asyncio.run(_run_cells(lab, session["kernel"]["id"], cells))
    finally:
        lab.api("DELETE", f"/api/sessions/{session['id']}")


def _errors(outputs: list[list[dict]]) -> list[str]:
    return [f"{m['content']['ename']}: {m['content']['evalue']}" for cell in outputs for m in cell
            if m["msg_type"] == "error"]


def _texts(outputs: list[list[dict]]) -> str:
    parts = []
    for m in (m for cell in outputs for m in cell):
        if m["msg_type"] == "stream":
            parts.append(m["content"]["text"])
        elif m["msg_type"] in ("display_data", "execute_result"):
            data = m["content"]["data"]
            parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(parts)


def _pngs(outputs: list[list[dict]]) -> int:
    return sum("image/png" in m["content"].get("data", {}) for cell in outputs for m in cell)


def test_notebooks_in_jupyterlab_write_and_read_the_projects_results(lab):
    outputs = run_notebook(lab, "nat_campaign.ipynb", SMALL_CAMPAIGN)
    assert not _errors(outputs), _errors(outputs)
    assert f"cwd: {lab.project / 'notebooks'}" in _texts(outputs)
    assert _pngs(outputs) >= 1
    campaign = lab.project / "results" / "lab-check"
    assert (campaign / "trials.jsonl").is_file(), sorted(str(p) for p in lab.project.rglob("manifest.json"))
    assert len((campaign / "trials.jsonl").read_text().splitlines()) == 2  # 1 agent NAT x 2 connector NATs x 1
    assert not (lab.project / "notebooks" / "results").exists()

    outputs = run_notebook(lab, "matrix_report.ipynb")  # its defaults: every campaign of the project
    assert not _errors(outputs), _errors(outputs)
    assert _pngs(outputs) >= 1
    assert "2 trials in 1 campaign(s)" in _texts(outputs), _texts(outputs)


def test_explore_in_jupyterlab_shows_its_controls_once(lab):
    outputs = run_notebook(lab, "explore.ipynb", "trials = 1\nprogress = False\n")
    assert not _errors(outputs), _errors(outputs)
    views = [m for cell in outputs for m in cell
             if "application/vnd.jupyter.widget-view+json" in m["content"].get("data", {})]
    assert len(views) == 1, f"{len(views)} widget views displayed"
    assert _pngs(outputs) >= 1
    assert not (lab.project / "notebooks" / "results").exists()
