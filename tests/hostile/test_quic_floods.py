"""Handshake floods against a real Intermediate process (issue 13, item 2).

1,000 valid client Initials per second, from one source (the honest client's own address, as a
spoofer would send them) or from rotating 127.x.y.z sources, while an honest client connects again
and again (QUIC handshake, HELLO, OBSERVED_ADDRESS). Before the fix 1,024 half-open slots shared by
all sources were held for the 30 s idle timeout: honest clients were locked out. Now a source past a
few unproven connections, and everyone past 64 half-open handshakes, must echo a Retry token first
(a spoofer cannot), and a half-open handshake is dropped after 3 s.

This module also holds the flood tools (`Initials`, `Flood`) that `tests/test_endpoint_limits.py`
and `benchmarks/attack_floods.py` use; it imports nothing from qlab that predates the fix, so the
benchmark can run it against an old checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import urllib.request

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header

from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import CID_LENGTH, Connection, Endpoint, Handler
from qlab.net import RealNet
from qlab.traversal.detect import QadSession
from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port, rss_kb

FLOOD_RATE = 1000  # Initials per second
FLOOD_SECONDS = 7.0
HONEST_TRIES = 20
HONEST_WITHIN = 2.0  # seconds from dialing to OBSERVED_ADDRESS


class Initials:
    """Valid client Initials, each opening a new connection (its own destination CID), made cheaply:
    one real ClientHello Initial, decrypted once and re-encrypted under each new CID's Initial keys
    (0.2 ms each; a QuicConnection per Initial costs 3 ms). Padded to 1,350 bytes like aioquic's."""

    def __init__(self, creds: Credentials, server_name: str = INTERMEDIATE_NAME) -> None:
        q = QuicConnection(configuration=creds.client_config(server_name))
        q.connect(("127.0.0.1", 9), now=0.0)
        datagram = q.datagrams_to_send(now=0.0)[0][0]
        buf = Buffer(data=datagram)
        header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
        assert header.version is not None and len(header.destination_cid) == 8
        crypto = CryptoPair()
        crypto.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
        self.version = header.version
        self.plain_header, self.payload, self.number = crypto.decrypt_packet(
            datagram[: header.packet_length], buf.tell(), 0)
        self.padding = bytes(len(datagram) - header.packet_length)

    def make(self) -> bytes:
        dcid = os.urandom(8)  # byte 5 is its length, 8: it sits at bytes 6..13 of the header
        crypto = CryptoPair()
        crypto.setup_initial(cid=dcid, is_client=True, version=self.version)
        header = self.plain_header[:6] + dcid + self.plain_header[14:]
        return crypto.encrypt_packet(header, self.payload, self.number) + self.padding

    def pool(self, n: int) -> list[bytes]:
        return [self.make() for _ in range(n)]


def source_sockets(hosts: list[str]) -> list[socket.socket]:
    """One UDP socket per source address (loopback accepts any 127/8 source one binds to); nothing
    reads them: what the server answers a spoofed source is lost, as it would be."""
    socks = []
    for host in hosts:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        socks.append(s)
    return socks


class Flood(threading.Thread):
    """Sends each datagram of `pool` once, at `rate` per second, cycling through `socks`."""

    def __init__(self, pool: list[bytes], to: tuple[str, int], rate: float, socks: list[socket.socket]) -> None:
        super().__init__(daemon=True)
        self.pool, self.to, self.rate, self.socks = pool, to, rate, socks
        self.sent = 0
        self.elapsed = 0.0
        self.stop = threading.Event()

    @property
    def rate_achieved(self) -> float:
        return self.sent / self.elapsed if self.elapsed else 0.0

    def run(self) -> None:
        t0 = time.monotonic()
        while self.sent < len(self.pool) and not self.stop.is_set():
            due = min(len(self.pool), int((time.monotonic() - t0) * self.rate))
            while self.sent < due:
                with contextlib.suppress(OSError):
                    self.socks[self.sent % len(self.socks)].sendto(self.pool[self.sent], self.to)
                self.sent += 1
            time.sleep(0.005)
            self.elapsed = time.monotonic() - t0


async def honest_connects(creds: Credentials, addr: tuple[str, int], tries: int, every: float,
                          within: float = HONEST_WITHIN) -> list[float | None]:
    """An honest client dials, says HELLO and waits for its observed address, `tries` times, one
    starting every `every` seconds; each figure is how long that took (None: not within `within` s)."""
    ep = Endpoint(RealNet())
    await ep.bind("127.0.0.1", 0)

    async def one(i: int) -> float | None:
        await asyncio.sleep(i * every)
        t0 = time.monotonic()
        try:
            async with QadSession(ep, addr, creds, f"honest{i}") as q:
                await q.observed(within)
        except (TimeoutError, ConnectionError):
            return None
        return time.monotonic() - t0

    try:
        return list(await asyncio.gather(*(one(i) for i in range(tries))))
    finally:
        ep.close()


def start_intermediate(certs: str) -> tuple[Proc, int, int]:
    port, mport = free_udp_port(), free_tcp_port()
    proc = Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", certs,
                 "--metrics", f"127.0.0.1:{mport}"], name="intermediate")
    proc.wait_for("metrics on")
    return proc, port, mport


def flood_while_connecting(creds: Credentials, port: int, sources: list[str], seconds: float = FLOOD_SECONDS,
                           tries: int = HONEST_TRIES) -> tuple[list[float | None], float]:
    """Flood for `seconds` and meanwhile connect honestly `tries` times, starting after the first
    second (when the half-open slots are full if nothing protects them)."""
    pool = Initials(creds).pool(int(FLOOD_RATE * seconds))
    socks = source_sockets(sources)
    flood = Flood(pool, ("127.0.0.1", port), FLOOD_RATE, socks)
    flood.start()
    try:
        time.sleep(1.0)
        every = (seconds - 1.0 - HONEST_WITHIN) / tries
        results = asyncio.run(honest_connects(creds, ("127.0.0.1", port), tries, every))
    finally:
        flood.stop.set()
        flood.join(5)
        for s in socks:
            s.close()
    return results, flood.rate_achieved


def _check(results: list[float | None], rate: float, proc: Proc) -> None:
    ok = [t for t in results if t is not None and t <= HONEST_WITHIN]
    assert proc.p.poll() is None, proc.log()
    assert rate >= 0.9 * FLOOD_RATE, f"the flood fell behind: {rate:.0f} Initials/s"
    # Nothing here is left to chance: a Retry costs the honest client one round trip, and measured
    # connects took 25 ms (p50) and 0.3 s at most (36/36, benchmarks/attack_floods.py), so 2 s is a
    # wide margin; 95 % of 20 still allows one miss to a 2-core VM starved by other work. The old
    # code failed 20/20.
    assert len(ok) >= 0.95 * len(results), f"{len(ok)}/{len(results)} honest connects within {HONEST_WITHIN}s: {results}"


def test_a_flood_from_the_honest_clients_own_address_locks_nobody_out(certs_dir, creds):
    proc, port, _ = start_intermediate(str(certs_dir))
    try:
        results, rate = flood_while_connecting(creds, port, ["127.0.0.1"])
        _check(results, rate, proc)
    finally:
        proc.terminate()


def test_a_flood_from_rotating_spoofed_sources_locks_nobody_out(certs_dir, creds):
    proc, port, _ = start_intermediate(str(certs_dir))
    try:
        sources = [f"127.{1 + i // 250}.{i % 250}.{2 + i % 7}" for i in range(500)]
        results, rate = flood_while_connecting(creds, port, sources)
        _check(results, rate, proc)
    finally:
        proc.terminate()


# -- connections that never prove themselves --------------------------------------------------------
PROOF_TIMEOUT = 5.0  # qlab.endpoint.PROOF_TIMEOUT (not imported: the old code has none)
UNPROVEN = 300
PER_SOURCE = 15  # connections per source address (a source may hold 32 unproven)



def metric(mport: int, name: str) -> float | None:
    """A gauge or the sum of a counter's series on the role's /metrics (None: not exported)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    found = [float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith((f"qlab_{name} ", f"qlab_{name}{{"))]
    return sum(found) if found else None


async def unproven_connections(creds: Credentials, addr: tuple[str, int], pid: int, mport: int,
                               n: int = UNPROVEN, wait: float = PROOF_TIMEOUT + 3.0) -> dict:
    """`n` clients complete the QUIC handshake and say nothing; figures: how long each stayed up
    after its handshake, the role's RSS (before, with them open, after they are gone) and its
    unproven-connections gauge while they were open."""
    eps = []
    for i in range(-(-n // PER_SOURCE)):
        ep = Endpoint(RealNet())
        await ep.bind(f"127.0.4.{10 + i}", 0)
        eps.append(ep)
    rss0 = rss_kb(pid)
    up_at: dict[Connection, float] = {}
    conns = [eps[i // PER_SOURCE].connect(addr, creds.client_config(INTERMEDIATE_NAME), Handler()) for i in range(n)]
    for c in conns:
        c.handshake_done.add_done_callback(
            lambda f, c=c: f.exception() is None and up_at.setdefault(c, time.monotonic()))
    await asyncio.wait([c.handshake_done for c in conns], timeout=10)
    rss_open = rss_kb(pid)
    gauge = await asyncio.to_thread(metric, mport, "unproven_connections")
    lasted: dict[Connection, float] = {}
    deadline = time.monotonic() + wait
    while len(lasted) < len(up_at) and time.monotonic() < deadline:
        for c, t in up_at.items():
            if c not in lasted and (c.closed or c.close_event is not None):
                lasted[c] = time.monotonic() - t
        await asyncio.sleep(0.05)
    for ep in eps:
        ep.close()
    await asyncio.sleep(0.5)
    return {"established": len(up_at), "closed_by_role": len(lasted),
            "longest_s": round(max(lasted.values(), default=0.0), 2), "unproven_gauge": gauge,
            "rss_before_kb": rss0, "rss_open_kb": rss_open, "rss_after_kb": rss_kb(pid),
            "closed_for_cause": await asyncio.to_thread(metric, mport, "connections_closed_total")}


def test_unproven_connections_are_closed_within_the_proof_timeout(certs_dir, creds):
    """Two waves of 300: each connection goes within the proof timeout of its handshake, the gauge
    shows them meanwhile, and the second wave reuses the first one's memory (CPython keeps freed
    memory for reuse rather than returning it: the figure is that RSS stops growing)."""
    proc, port, mport = start_intermediate(str(certs_dir))
    try:
        waves = [asyncio.run(unproven_connections(creds, ("127.0.0.1", port), proc.p.pid, mport)) for _ in range(2)]
    finally:
        proc.terminate()
    for fig in waves:
        assert fig["established"] >= 0.98 * UNPROVEN, fig
        assert fig["unproven_gauge"] is not None and fig["unproven_gauge"] >= fig["established"] - 5, fig
        assert fig["closed_by_role"] == fig["established"], fig
        assert fig["longest_s"] <= PROOF_TIMEOUT + 1.0, fig
    first = waves[0]["rss_after_kb"] - waves[0]["rss_before_kb"]
    second = waves[1]["rss_after_kb"] - waves[1]["rss_before_kb"]
    assert second <= max(4096, first // 2), waves  # measured: +26 MB, then +6 MB, then +2 MB
