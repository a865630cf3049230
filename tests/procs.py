"""Run qlab roles as real processes in tests, wait on what they log (with a bound), and make sure
none is left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

QLAB = [sys.executable, "-m", "qlab.cli.main"]


def rss_kb(pid: int) -> int:
    """A process's resident memory in kB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def stop_all(procs: Sequence[Proc]) -> None:
    """Terminate `procs` (last started first), then fail if any of them logged a traceback."""
    for p in reversed(procs):
        p.terminate()
    for p in procs:
        assert "Traceback" not in "\n".join(p.err), p.log()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stderr is collected so tests can wait for a log line."""

    def __init__(self, argv: Sequence[str], name: str = "", env: dict | None = None) -> None:
        self.name = name or (argv[3] if len(argv) > 3 else "proc")
        self.p = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
        )
        self.err: list[str] = []
        self.out: list[str] = []
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
            for stream, sink in ((self.p.stderr, self.err), (self.p.stdout, self.out))
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cv:
                sink.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, text: str, timeout: float = 15.0, start: int = 0) -> str:
        """Wait until a stderr line containing `text` appears (after line `start`)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.err[start:]:
                    if text in line:
                        return line
                if self.p.poll() is not None and not any(text in x for x in self.err[start:]):
                    raise AssertionError(f"{self.name} exited ({self.p.returncode}) before logging {text!r}:\n" + self.log())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name} did not log {text!r} within {timeout}s:\n" + self.log())
                self._cv.wait(min(left, 0.5))

    def log(self) -> str:
        return "\n".join(self.err[-40:])

    def terminate(self, timeout: float = 10.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(5)

    def communicate(self, timeout: float = 60.0) -> tuple[int, str, str]:
        """Wait for the process to end (killing it after `timeout`) and return (rc, stdout, stderr)."""
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not finish within {timeout}s:\n" + self.log()) from None
        for t in self._threads:
            t.join(5)  # the pumps end at EOF, right after the process
        return self.p.returncode, "\n".join(self.out), "\n".join(self.err)


class LoopbackDeployment:
    """An Intermediate (with the listeners classification needs), the echo app and one Connector
    per service, as processes on loopback: a deployment for field trials without privileges."""

    def __init__(self, certs: str, services: Sequence[str] = ("echo",)) -> None:
        self.port = free_udp_port()
        eport = free_udp_port()
        self.procs: list[Proc] = []
        try:
            self.procs.append(Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{self.port}",
                                    "--alt", f"127.0.0.1:{self.port + 1}", "--alt", f"127.0.0.2:{self.port}",
                                    "--alt", f"127.0.0.2:{self.port + 1}", "--certs", certs], name="intermediate"))
            self.procs.append(Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo"))
            self.procs[-1].wait_for("UDP echo on")
            for service in services:
                self.procs.append(Proc([*QLAB, "connector", "--intermediate", f"127.0.0.1:{self.port}",
                                        "--service", service, "--forward", f"127.0.0.1:{eport}",
                                        "--p2p-port", str(free_udp_port()), "--bind", "127.0.0.1", "--certs", certs],
                                       name=f"connector-{service}"))
                self.procs[-1].wait_for(f"registered service {service}")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
