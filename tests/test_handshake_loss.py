"""Handshakes that survive loss, sans-IO style: real aioquic peers on qlab Endpoints, joined by an
in-memory wire on the virtual clock that drops exactly the datagrams a test names.

How a client ends up sending an Initial without a CRYPTO frame: every Initial carrying its
ClientHello is lost, then the attempt is closed (qlab abandons a stalled handshake, ends a QAD
probe, gives up a direct dial). Before any server packet aioquic can only use Initial keys, so that
close is an Initial holding nothing but CONNECTION_CLOSE. If it is the first Initial to reach the
server, aioquic's server raises PROTOCOL_VIOLATION "Packet contains no CRYPTO frame" (RFC 9000
17.2.2) for it. A bare PING probe whose CRYPTO Initial was lost does the same, and that one would
come from a live client, which the server's CONNECTION_CLOSE then kills.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from qlab import wire
from qlab.backends.sim import run
from qlab.certs import CONNECTOR_NAME
from qlab.endpoint import Endpoint, Handler
from qlab.roles.intermediate import Intermediate
from qlab.roles.link import IntermediateLink

ONE_WAY = 0.015


class MemWire:
    """Hosts by IP; every datagram takes ONE_WAY seconds; `drop(n, src, dst, data)` decides, with n
    counting the datagrams sent so far on that (src ip, dst ip) direction."""

    def __init__(self, drop: Callable[[int, str, str, bytes], bool] = lambda *a: False) -> None:
        self.socks: dict[tuple[str, int], MemSock] = {}
        self.drop = drop
        self.sent: dict[tuple[str, str], int] = {}
        self.log: list[tuple[str, str, int, bool]] = []

    def net(self, ip: str) -> MemNet:
        return MemNet(self, ip)


class MemSock:
    def __init__(self, wire_: MemWire, addr: tuple[str, int], receiver) -> None:
        self.wire, self.local_address, self.receiver = wire_, addr, receiver

    def sendto(self, data: bytes, addr) -> None:
        w, src = self.wire, self.local_address[0]
        key = (src, addr[0])
        n = w.sent.get(key, 0)
        w.sent[key] = n + 1
        dropped = w.drop(n, src, addr[0], data)
        w.log.append((src, addr[0], n, dropped))
        if not dropped:
            asyncio.get_running_loop().call_later(ONE_WAY, self._deliver, data, tuple(addr))

    def _deliver(self, data: bytes, addr) -> None:
        dst = self.wire.socks.get(addr)
        if dst is not None:
            dst.receiver([(data, self.local_address)])

    def close(self) -> None:
        self.wire.socks.pop(self.local_address, None)


class MemNet:
    def __init__(self, wire_: MemWire, ip: str) -> None:
        self.wire, self.ip, self.next_port = wire_, ip, 40000

    async def bind_udp(self, host: str, port: int, receiver) -> MemSock:
        if not port:
            self.next_port += 1
            port = self.next_port
        s = MemSock(self.wire, (self.ip, port), receiver)
        self.wire.socks[(self.ip, port)] = s
        return s

    def host_addresses(self) -> list[str]:
        return [self.ip]


class Dialer(Handler):
    def __init__(self) -> None:
        self.closed: list[str] = []

    def on_closed(self, conn, reason: str) -> None:
        self.closed.append(reason)


async def _p2p_pair(creds, drop) -> tuple[MemWire, Endpoint, Endpoint]:
    w = MemWire(drop)
    server = Endpoint(w.net("10.0.0.2"), server_config=creds.server_config("connector"),
                      server_handler=lambda conn: Handler())
    await server.bind("10.0.0.2", 4434)
    client = Endpoint(w.net("10.0.0.1"))
    await client.bind("10.0.0.1", 0)
    return w, client, server


def test_a_first_initial_without_crypto_does_not_kill_the_handshake(creds):
    """The client's CRYPTO Initial is lost and the first Initial the server sees is a bare PING
    probe. Unfixed, the server answers PROTOCOL_VIOLATION and the client's connection dies; fixed,
    the server forgets that packet and the client's CRYPTO retransmission opens the connection."""

    async def main():
        w, client, server = await _p2p_pair(creds, lambda n, src, dst, data: src == "10.0.0.1" and n == 0)
        d = Dialer()
        conn = client.connect(("10.0.0.2", 4434), creds.client_config(CONNECTOR_NAME), d)
        await asyncio.sleep(0.001)  # the ClientHello Initial is sent (and dropped)
        # a PTO probe with no CRYPTO data outstanding: aioquic writes a bare PING in an Initial
        conn.quic._probe_pending = True
        client.mark(conn)
        await asyncio.sleep(0.001)
        assert [e[3] for e in w.log] == [True, False]  # CRYPTO Initial dropped, PING Initial sent
        with pytest.raises(Exception) as failed:  # noqa: PT011  (ok is the assertion below)
            await asyncio.wait_for(asyncio.shield(conn.handshake_done), 5)
            raise AssertionError("handshake completed")
        assert isinstance(failed.value, AssertionError), f"the connection died: {failed.value}"
        assert conn.established and not d.closed
        assert server.stats["dropped_first_initial"] == 1
        client.close()
        server.close()

    run(main())


def test_a_close_only_initial_is_forgotten_silently(creds):
    """A dial whose ClientHello Initials were all lost is closed: its CONNECTION_CLOSE-only Initial
    reaches the server first. The server sends nothing and keeps no connection; the next dial from
    the same socket opens normally (and a junk Initial still keeps no state)."""

    async def main():
        state = {"drop_client": True}
        w, client, server = await _p2p_pair(creds, lambda n, src, dst, data: src == "10.0.0.1" and state["drop_client"])
        first = client.connect(("10.0.0.2", 4434), creds.client_config(CONNECTOR_NAME), Dialer())
        await asyncio.sleep(1.0)  # two PTO retransmissions of the ClientHello, all lost
        state["drop_client"] = False
        client.abandon(first, "gave up")  # sends the CONNECTION_CLOSE-only Initial
        await asyncio.sleep(0.5)
        assert server.stats["dropped_first_initial"] == 1
        assert not server.connections and not server.by_cid
        assert server.stats["tx"] == 0  # nothing was sent back
        junk = bytearray(1200)
        junk[0] = 0xC0  # a long-header Initial that decrypts to nothing
        junk[1:5] = (1).to_bytes(4, "big")
        junk[5] = 8
        client.sock.sendto(bytes(junk), ("10.0.0.2", 4434))
        await asyncio.sleep(0.1)
        assert not server.connections and server.stats["tx"] == 0
        second = client.connect(("10.0.0.2", 4434), creds.client_config(CONNECTOR_NAME), Dialer())
        await asyncio.wait_for(second.handshake_done, 5)
        assert len(server.connections) == 1
        client.close()
        server.close()

    run(main())


def test_an_abandoned_attempt_never_takes_the_next_one_down(creds):
    """The link's first handshake stalls (every Initial lost) and is retried with a fresh connection.
    The abandoned attempt's end must not fail the retry nor drop the connection that replaced it."""

    async def main():
        loop = asyncio.get_running_loop()
        t_lossy_until = loop.time() + 2.05  # attempt 1 (2 s) and its CONNECTION_CLOSE are lost

        def drop(n, src, dst, data):
            return src == "10.0.0.1" and loop.time() < t_lossy_until

        w = MemWire(drop)
        srv = Intermediate(w.net("10.0.0.2"), creds)
        await srv.listen([("10.0.0.2", 4433)])
        ep = Endpoint(w.net("10.0.0.1"))
        await ep.bind("10.0.0.1", 0)
        link = IntermediateLink(ep, ("10.0.0.2", 4433), creds, wire.Role.AGENT, "agent")
        await link.connect(10.0)
        assert link.attempts == 2  # the retry went through at once
        up = link.conn
        await asyncio.sleep(5.0)  # well past the closing period of every abandoned attempt
        assert link.conn is up and not up.closed and link.up.is_set() and not link.lost.is_set()
        link.close()
        ep.close()
        srv.close()

    run(main())


def test_the_link_retries_a_stalled_handshake_promptly(creds):
    """All Initials lost for 3 s: the link abandons stalled attempts and starts fresh ones (no PTO
    backoff of seconds), so it is up within about a second of the path healing."""

    async def main():
        loop = asyncio.get_running_loop()
        heal = loop.time() + 3.0
        w = MemWire(lambda n, src, dst, data: loop.time() < heal)
        srv = Intermediate(w.net("10.0.0.2"), creds)
        await srv.listen([("10.0.0.2", 4433)])
        ep = Endpoint(w.net("10.0.0.1"))
        await ep.bind("10.0.0.1", 0)
        link = IntermediateLink(ep, ("10.0.0.2", 4433), creds, wire.Role.CONNECTOR, "c")
        await link.connect(20.0)
        assert loop.time() - heal < 1.5, loop.time() - heal
        link.close()
        ep.close()
        srv.close()

    run(main())


def test_a_tls_failure_is_not_retried(creds):
    """Loss is retried; a certificate the client does not trust is not (it would only repeat)."""
    import dataclasses

    from cryptography.hazmat.primitives import serialization

    from qlab.certs import make_ca

    other, _ = make_ca("another CA")
    pinned_elsewhere = dataclasses.replace(creds, ca_pem=other.public_bytes(serialization.Encoding.PEM))

    async def main():
        loop = asyncio.get_running_loop()
        w = MemWire()
        srv = Intermediate(w.net("10.0.0.2"), creds)
        await srv.listen([("10.0.0.2", 4433)])
        ep = Endpoint(w.net("10.0.0.1"))
        await ep.bind("10.0.0.1", 0)
        link = IntermediateLink(ep, ("10.0.0.2", 4433), pinned_elsewhere, wire.Role.AGENT, "agent")
        t0 = loop.time()
        with pytest.raises(ConnectionError, match="certificate"):
            await link.connect(10.0)
        assert link.attempts == 1 and loop.time() - t0 < 1.0
        ep.close()
        srv.close()

    run(main())
