"""Role processes on loopback for the attack rows, what they are measured by, and their teardown.

Roles run as `python -m qlab.cli.main ...` with the qlab that this script imported (its checkout is
put first on the children's PYTHONPATH and they start in a scratch directory), so the same script
measures an old checkout (`PYTHONPATH=/tmp/old`) and the current one. Every child gets its own
process group; `kill_all()` ends them all, also on errors and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qlab

QLAB_ROOT = Path(qlab.__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")
_LIVE: list[Proc] = []


class NotApplicable(Exception):
    """The row cannot run on this checkout (the reason is printed instead of a figure)."""


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    path = [str(QLAB_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "PYTHONUNBUFFERED": "1"}


class Proc:
    """A role process whose stderr is collected, so rows can wait for a log line."""

    def __init__(self, args: Sequence[str], name: str, cwd: Path, nofile: int | None = None) -> None:
        self.name = name
        limit = None if nofile is None else (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
        self.p = subprocess.Popen([sys.executable, "-m", "qlab.cli.main", *args], cwd=cwd, env=child_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True, preexec_fn=limit)
        _LIVE.append(self)
        self.err: list[str] = []
        self.out: list[str] = []
        self._cv = threading.Condition()
        for stream, sink in ((self.p.stderr, self.err), (self.p.stdout, self.out)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cv:
                sink.append(line.rstrip("\n"))
                self._cv.notify_all()

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not any(text in line for line in self.err):
                left = deadline - time.monotonic()
                if self.p.poll() is not None or left <= 0:
                    tail = " | ".join(self.err[-3:])
                    raise NotApplicable(f"{self.name} did not log {text!r} ({tail[-300:]})")
                self._cv.wait(min(left, 0.25))

    def count(self, text: str) -> int:
        with self._cv:
            return sum(1 for line in self.err if text in line)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        if self in _LIVE:
            _LIVE.remove(self)


def kill_all() -> None:
    """End every role process still running (their process groups)."""
    for p in list(_LIVE):
        with contextlib.suppress(Exception):
            p.stop()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def qlab_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlab.cli.main", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def scrape(port: int) -> dict[str, float]:
    """/metrics as {name{labels}: value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric over the series whose labels include `labels`."""
    total = 0.0
    for key, v in values.items():
        base, _, lab = key.partition("{")
        if base == f"qlab_{name}" and all(f'{k}="{x}"' in lab for k, x in labels.items()):
            total += v
    return total


class Stack:
    """An Intermediate (with /metrics), the echo app and, optionally, one Connector, on loopback."""

    def __init__(self, work: Path, certs: Path, *, connector: bool = True, alt: bool = False,
                 policy: Path | None = None, connector_nofile: int | None = None, service: str = "echo") -> None:
        self.work, self.certs, self.service = work, certs, service
        self.port = free_udp_port()
        self.metrics_port = free_tcp_port()
        self.procs: list[Proc] = []
        self.connector: Proc | None = None
        self.connector_port = 0
        self.connector_metrics = 0
        args = ["intermediate", "--listen", f"127.0.0.1:{self.port}", "--certs", str(certs),
                "--metrics", f"127.0.0.1:{self.metrics_port}"]
        if alt:
            args += ["--alt", f"127.0.0.1:{free_udp_port()}", "--alt", f"127.0.0.2:{free_udp_port('127.0.0.2')}"]
        if policy is not None:
            args += ["--policy", str(policy)]
        self.intermediate = self._start(args, "intermediate")
        self.echo_port = free_udp_port()
        self._start(["echo", "--listen", f"127.0.0.1:{self.echo_port}"], "echo")
        self.intermediate.wait_for("metrics on")
        if connector:
            self.connector = self.start_connector(nofile=connector_nofile)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def _start(self, args: list[str], name: str, nofile: int | None = None) -> Proc:
        p = Proc(args, name, self.work, nofile)
        self.procs.append(p)
        return p

    def start_connector(self, name: str = "connector", nofile: int | None = None) -> Proc:
        self.connector_port = free_udp_port()
        self.connector_metrics = free_tcp_port()
        p = self._start(["connector", "--intermediate", f"127.0.0.1:{self.port}", "--service", self.service,
                         "--forward", f"127.0.0.1:{self.echo_port}", "--p2p-port", str(self.connector_port),
                         "--bind", "127.0.0.1", "--name", name, "--certs", str(self.certs),
                         "--metrics", f"127.0.0.1:{self.connector_metrics}"], f"connector-{name}", nofile)
        p.wait_for(f"registered service {self.service}")
        return p

    def agent_cli(self, *args: str, name: str = "honest") -> Proc:
        """The checkout's own `qlab agent` as a process (an honest user)."""
        return self._start(["agent", "--intermediate", f"127.0.0.1:{self.port}", "--service", self.service,
                            "--bind", "127.0.0.1", "--certs", str(self.certs), "--name", name, *args], name)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def connector_metrics_now(self) -> dict[str, float]:
        return scrape(self.connector_metrics)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def settle(seconds: float) -> None:
    time.sleep(seconds)


def run_on_stack(ctx: Any, coro_fn: Any, stack_kw: dict[str, Any]) -> Any:
    """Run the row `coro_fn(ctx, stack)` on a fresh Stack (built with `stack_kw`), always torn down."""
    s = Stack(ctx.work, ctx.certs, **stack_kw)
    try:
        return asyncio.run(coro_fn(ctx, s))
    finally:
        s.close()
