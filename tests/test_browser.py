"""The published report in a real browser (headless Chromium): index.html and every page it links
load with no console error, no image that failed to load and no request leaving the machine; the
data files and notebooks it links exist and parse. And the checker itself catches each of the three
on hand-made pages, refusing the outside request before it is sent."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.browser import Browser, Page, chromium

pytestmark = pytest.mark.skipif(chromium() is None and os.environ.get("QLAB_REQUIRE_NETNS") != "1",
                                reason="chromium is not installed")


NBCONVERT_DEFAULT_ALT = "No description has been provided for this image"


def _local_path(url: str) -> Path:
    return Path(unquote(urlsplit(url).path))


def _check_data_file(path: Path) -> None:
    """A linked file that is not a page: it exists and reads as what its name says."""
    assert path.is_file() and path.stat().st_size > 0, f"linked file missing or empty: {path}"
    if path.suffix == ".ipynb":  # an executed notebook: outputs, and no error among them
        outputs = [o for c in json.loads(path.read_text())["cells"] for o in c.get("outputs", [])]
        assert outputs, f"{path}: not executed"
        assert not [o for o in outputs if o["output_type"] == "error"], f"{path}: an error output"
    elif path.suffix == ".json":
        assert json.loads(path.read_text()), path
    elif path.suffix in (".csv", ".parquet"):
        import pandas as pd

        table = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
        assert len(table) > 0, path


def crawl(browser: Browser, index: Path) -> dict[str, Page]:
    """Open index.html and every page reachable by its links (other linked files are checked, not
    opened); a link that is not a local file fails."""
    pages: dict[str, Page] = {}
    todo = [index.resolve().as_uri()]
    while todo:
        url = todo.pop()
        if url in pages:
            continue
        page = pages[url] = browser.open(url)
        for link in page.links:
            target = link.split("#", 1)[0]
            assert target.startswith("file://"), f"{url} links outside the report: {link}"
            path = _local_path(target)
            if path.suffix == ".html":
                todo.append(target)
            elif target not in pages:
                _check_data_file(path)
    return pages


def test_published_pages_have_no_console_error_broken_image_or_outside_request(published_report):
    with Browser() as browser:
        pages = crawl(browser, published_report)
    problems = [f"{_local_path(url).name}: {p}" for url, page in pages.items() for p in page.problems()]
    assert not problems, "\n".join(problems)
    names = {_local_path(url).name for url in pages}
    assert {"index.html", "matrix_report.html", "nat_full_cone.html", "nat_symmetric.html"} <= names, names
    for url, page in pages.items():
        if not url.endswith("index.html"):
            assert page.images >= 1, f"{url}: no rendered image"
        unsaid = [alt for alt in page.alts if not alt.strip() or alt == NBCONVERT_DEFAULT_ALT]
        assert not unsaid, f"{url}: {len(unsaid)} of {len(page.alts)} images do not say what they show"


def _write(folder: Path, name: str, body: str) -> str:
    path = folder / name
    path.write_text(f"<!doctype html><html><head><title>{name}</title></head><body>{body}</body></html>")
    return path.as_uri()


def test_the_checker_catches_each_problem_and_sends_nothing_outside(tmp_path):
    """Hand-made pages, one fault each: the checker names it, and a clean page has none. The
    outside request is refused before it leaves: a listener on loopback, linked the same way as
    the TEST-NET-3 address, sees no connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    try:
        with Browser() as browser:
            clean = browser.open(_write(tmp_path, "clean.html", f'<p>fine</p><img src="{png}" alt="one pixel">'))
            broken = browser.open(_write(tmp_path, "broken.html", '<img src="missing.png" alt="missing">'))
            noisy = browser.open(_write(tmp_path, "noisy.html",
                                        '<script>console.error("said an error"); throw new Error("thrown")</script>'))
            outside = browser.open(_write(tmp_path, "outside.html",
                                          f'<img src="http://203.0.113.1/x.png" alt="x">'
                                          f'<img src="http://127.0.0.1:{port}/y.png" alt="y">'))
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert clean.problems() == [] and clean.images == 1
    assert [Path(urlsplit(s).path).name for s in broken.broken_images] == ["missing.png"]
    assert any("said an error" in e for e in noisy.console_errors), noisy.console_errors
    assert any("thrown" in e for e in noisy.console_errors), noisy.console_errors
    assert noisy.broken_images == [] and noisy.outside_requests() == []
    wanted = ["http://203.0.113.1/x.png", f"http://127.0.0.1:{port}/y.png"]
    assert sorted(outside.outside_requests()) == sorted(wanted)
    assert sorted(outside.blocked) == sorted(wanted)
