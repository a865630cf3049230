"""Open a page in Debian's headless Chromium over the DevTools pipe (fds 3 and 4): record every
network request the page makes, count its rendered images, take a screenshot. No extra packages."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.requests: list[str] = []
        self.images = 0
        self.png = b""
        self.title = ""

    def load(self) -> Page:
        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        profile = tempfile.mkdtemp(prefix="qlab-chromium-")

        def fds() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={profile}", "--window-size=1280,2400", "about:blank"],
                                preexec_fn=fds, pass_fds=(3, 4, to_child_r, from_child_w),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._w, self._r, self._buf, self._id = to_child_w, from_child_r, b"", 0
        try:
            self._drive()
        finally:
            proc.kill()
            proc.wait(10)
            os.close(self._w)
            os.close(self._r)
            shutil.rmtree(profile, ignore_errors=True)
        return self

    def _send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _next(self, deadline: float) -> dict | None:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self._r], [], [], left)
            if not r:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        want = self._send(method, params, session)
        deadline = time.monotonic() + self.timeout
        while True:
            msg = self._next(deadline)
            if msg is None:
                raise TimeoutError(f"chromium did not answer {method}")
            self._event(msg)
            if msg.get("id") == want:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _event(self, msg: dict) -> None:
        if msg.get("method") == "Network.requestWillBeSent":
            self.requests.append(msg["params"]["request"]["url"])
        elif msg.get("method") == "Page.loadEventFired":
            self._loaded = True

    def _drive(self) -> None:
        self._loaded = False
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._call("Network.enable", session=session)
        self._call("Page.enable", session=session)
        self._call("Page.navigate", {"url": self.url}, session=session)
        deadline = time.monotonic() + self.timeout
        while not self._loaded:
            msg = self._next(deadline)
            if msg is None:
                raise TimeoutError(f"{self.url} did not finish loading")
            self._event(msg)
        quiet = time.monotonic() + 1.0  # requests made by scripts after load
        while (msg := self._next(quiet)) is not None:
            self._event(msg)
        js = "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length"
        self.images = self._call("Runtime.evaluate", {"expression": js, "returnByValue": True},
                                 session=session)["result"]["value"]
        self.title = self._call("Runtime.evaluate", {"expression": "document.title", "returnByValue": True},
                                session=session)["result"]["value"]
        shot = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                          session=session)
        self.png = base64.b64decode(shot["data"])

    def outside_requests(self) -> list[str]:
        """Requests to anything but the file itself and inline data."""
        return [u for u in self.requests if not (u.startswith("file://") or u.startswith("data:"))]
