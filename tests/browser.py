"""Open pages in Debian's headless Chromium over the DevTools pipe (fds 3 and 4). For each page:
every request it made (any that is not file:// or data: is refused before it leaves, through the
Fetch domain, and recorded), console errors (uncaught exceptions, console.error, error log entries),
images that failed to load, its links, its title and a screenshot. No extra packages."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-domain-reliability", "--dns-prefetch-disable", "--remote-debugging-pipe"]
LOCAL = ("file://", "data:")
# the images once every one has finished (or the deadline passed): [src (cut), loaded?, alt] each
IMAGES_JS = "[...document.images].map(i => [(i.currentSrc || i.src).slice(0, 200), i.complete && i.naturalWidth > 0, i.alt])"
IMAGES_DONE_JS = "[...document.images].every(i => i.complete)"
LINKS_JS = "[...document.querySelectorAll('a[href]')].map(a => a.href)"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """What one page load showed. `Page(url).load()` runs its own browser; `Browser.open` shares one."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.requests: list[str] = []  # every URL the page asked for
        self.blocked: list[str] = []  # of those, the ones refused before they left (not file:/data:)
        self.console_errors: list[str] = []
        self.broken_images: list[str] = []
        self.alts: list[str] = []  # each image's alt text
        self.links: list[str] = []
        self.images = 0  # rendered images
        self.png = b""
        self.title = ""

    def load(self) -> Page:
        with Browser(self.timeout) as browser:
            browser.visit(self)
        return self

    def outside_requests(self) -> list[str]:
        """Requests to anything but local files and inline data."""
        return [u for u in self.requests if not u.startswith(LOCAL)]

    def problems(self) -> list[str]:
        """Console errors, images that did not load and requests that would have left the machine."""
        return ([f"console: {e}" for e in self.console_errors] + [f"image not loaded: {s}" for s in self.broken_images]
                + [f"outside request: {u}" for u in self.outside_requests()])


class Browser:
    """One headless Chromium; each `visit` opens the page in a new tab and closes it after."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._buf, self._id = b"", 0
        self._page: Page | None = None
        self._session = ""
        self._loaded = False

    def __enter__(self) -> Browser:
        exe = chromium()
        if exe is None:
            raise RuntimeError("chromium is not installed (Debian: apt-get install chromium)")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        self._profile = tempfile.mkdtemp(prefix="qlab-chromium-")

        def fds() -> None:
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self._proc = subprocess.Popen(
            [exe, *FLAGS, f"--user-data-dir={self._profile}", "--window-size=1280,2400", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4, to_child_r, from_child_w),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.kill()
        self._proc.wait(10)
        os.close(self._w)
        os.close(self._r)
        shutil.rmtree(self._profile, ignore_errors=True)

    def open(self, url: str) -> Page:
        page = Page(url, self.timeout)
        self.visit(page)
        return page

    def visit(self, page: Page) -> None:
        self._page, self._loaded, self._session = page, False, ""
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        try:
            for domain in ("Network", "Page", "Runtime", "Log"):
                self._call(f"{domain}.enable")
            self._call("Fetch.enable", {"patterns": [{"urlPattern": "*", "requestStage": "Request"}]})
            self._call("Page.navigate", {"url": page.url})
            self._wait_for_load(page)
            self._inspect(page)
        finally:
            self._call("Target.closeTarget", {"targetId": target}, session=False)
            self._page = None

    def _wait_for_load(self, page: Page) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._loaded:
            msg = self._next(deadline)
            if msg is None:
                raise TimeoutError(f"{page.url} did not finish loading")
            self._event(msg)
        quiet = time.monotonic() + 1.0  # requests and errors of scripts that run after load
        while (msg := self._next(quiet)) is not None:
            self._event(msg)
        deadline = time.monotonic() + self.timeout
        while not self._eval(IMAGES_DONE_JS) and time.monotonic() < deadline:
            time.sleep(0.1)

    def _inspect(self, page: Page) -> None:
        images = self._eval(IMAGES_JS)
        page.images = sum(1 for _, ok, _ in images if ok)
        page.broken_images = [src for src, ok, _ in images if not ok]
        page.alts = [alt for _, _, alt in images]
        page.links = self._eval(LINKS_JS)
        page.title = self._eval("document.title")
        shot = self._call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        page.png = base64.b64decode(shot["data"])

    def _eval(self, expression: str) -> Any:
        return self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"]["value"]

    def _send(self, method: str, params: dict | None = None, session: bool = True) -> int:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session and self._session:
            msg["sessionId"] = self._session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        return self._id

    def _next(self, deadline: float) -> dict | None:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                return None
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def _call(self, method: str, params: dict | None = None, session: bool = True) -> dict:
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
        page, method, params = self._page, msg.get("method"), msg.get("params", {})
        if page is None or method is None or msg.get("sessionId") != self._session:
            return
        if method == "Fetch.requestPaused":
            self._decide(page, params)
        elif method == "Network.requestWillBeSent":
            page.requests.append(params["request"]["url"])
        elif method == "Page.loadEventFired":
            self._loaded = True
        elif error := console_error(method, params):
            page.console_errors.append(error)

    def _decide(self, page: Page, paused: dict) -> None:
        """Let local loads through; refuse anything else before it is sent (traffic stays on this
        machine). The answer is not awaited: its reply is read like any other message."""
        url = paused["request"]["url"]
        if url.startswith(LOCAL):
            self._send("Fetch.continueRequest", {"requestId": paused["requestId"]})
        else:
            page.blocked.append(url)
            self._send("Fetch.failRequest", {"requestId": paused["requestId"], "errorReason": "BlockedByClient"})


def console_error(method: str, params: dict) -> str:
    """The text of a console error event ("" for any other event)."""
    if method == "Runtime.exceptionThrown":
        details = params["exceptionDetails"]
        return str(details.get("exception", {}).get("description") or details.get("text", "exception"))
    if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
        return " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
    if method == "Log.entryAdded" and params["entry"].get("level") == "error":
        entry = params["entry"]
        return f"{entry.get('text', '')} {entry.get('url', '')}".strip()
    return ""
