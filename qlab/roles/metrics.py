"""Counters and gauges in Prometheus text format, served with /healthz on a local HTTP port.

A deliberately small HTTP/1.0 responder on asyncio streams: two GET paths, bounded request size and
read time, so a scraper or a health check cannot hold the role up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable

from qlab.endpoint import Endpoint


class Metrics:
    def __init__(self, prefix: str = "qlab") -> None:
        self.prefix = prefix
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[str, Callable[[], float]] = {}
        self.help: dict[str, str] = {}
        self.sources: dict[str, Callable[[], dict[tuple[str, str], float]]] = {}  # {(label, value): count}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += value

    def get(self, name: str, **labels: str) -> float:
        return self.counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def counter_source(self, name: str, label: str, fn: Callable[[], dict[str, float]]) -> None:
        """A counter kept by the caller in plain ints (hot paths), read at scrape time as
        {label value: count}."""
        self.sources[name] = lambda: {(label, k): v for k, v in fn().items()}

    def gauge(self, name: str, fn: Callable[[], float], help_text: str = "") -> None:
        self.gauges[name] = fn
        if help_text:
            self.help[name] = help_text

    def render(self) -> str:
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in sorted(self.counters.items()):
            full = f"{self.prefix}_{name}"
            if full not in seen:
                seen.add(full)
                lines.append(f"# TYPE {full} counter")
            lab = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{full}{{{lab}}} {value:g}" if lab else f"{full} {value:g}")
        for name, fn in sorted(self.sources.items()):
            full = f"{self.prefix}_{name}"
            lines.append(f"# TYPE {full} counter")
            for (label, key), value in sorted(fn().items()):
                lines.append(f'{full}{{{label}="{key}"}} {value:g}')
        for name, gauge in sorted(self.gauges.items()):
            full = f"{self.prefix}_{name}"
            if name in self.help:
                lines.append(f"# HELP {full} {self.help[name]}")
            lines.append(f"# TYPE {full} gauge")
            lines.append(f"{full} {gauge():g}")
        return "\n".join(lines) + "\n"


def watch_endpoints(metrics: Metrics, endpoints: Callable[[], Iterable[Endpoint]]) -> None:
    """Export what unauthenticated peers hold on a role's endpoints: half-open handshakes and
    unproven connections (gauges), and connections closed for cause (a counter by reason). Retries
    sent and Initials dropped by the caps are datagram counts, in udp_datagrams_total."""
    metrics.gauge("half_open_connections", lambda: sum(ep.half_open for ep in endpoints()),
                  "server connections still in their QUIC handshake")
    metrics.gauge("unproven_connections", lambda: sum(ep.unproven for ep in endpoints()),
                  "server connections that have not proven themselves yet (HELLO, DirectHello)")

    def closed() -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for ep in endpoints():
            for reason, n in ep.closed_for_cause.items():
                out[reason] += n
        return out

    metrics.counter_source("connections_closed_total", "reason", closed)


async def serve_http(host: str, port: int, metrics: Metrics, healthy: Callable[[], bool]) -> asyncio.Server:
    """Serve GET /metrics and GET /healthz (200 when `healthy()`, else 503)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        line = request.split(b"\r\n", 1)[0].decode("latin-1", "replace").split()
        path = line[1] if len(line) >= 2 else ""
        if len(line) < 2 or line[0] != "GET":
            status, body, ctype = "405 Method Not Allowed", "only GET\n", "text/plain"
        elif path == "/metrics":
            status, body, ctype = "200 OK", metrics.render(), "text/plain; version=0.0.4"
        elif path == "/healthz":
            ok = healthy()
            status, body, ctype = ("200 OK", "ok\n", "text/plain") if ok else ("503 Service Unavailable", "unhealthy\n", "text/plain")
        else:
            status, body, ctype = "404 Not Found", "not found\n", "text/plain"
        data = body.encode()
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, port, limit=8192)
