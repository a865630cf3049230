"""What an unauthenticated peer can make an `Endpoint` hold, in-process on loopback with short knobs:
Retry (and the client side of a one-socket endpoint following one), the handshake and proof
deadlines, the per-source and total caps, invalid tokens, violations counted as closes for cause,
the /metrics export, and `HeldDatagrams` expiring on a timer."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aioquic.quic.packet import QuicErrorCode

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import STREAM_WINDOW, Connection, Endpoint, Handler, HeldDatagrams
from qlab.net import RealNet
from qlab.roles.metrics import Metrics, watch_endpoints
from tests.hostile.test_flow_control import send_at
from tests.hostile.test_quic_floods import Initials


class Recorder(Handler):
    """Records closes; proves the connection on its first control message when `proves`."""

    def __init__(self, proves: bool = False) -> None:
        self.proves = proves
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if self.proves:
            conn.mark_proven()

    def on_closed(self, conn: Connection, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)


async def _server(creds: Credentials, proves: bool = False, **knobs: float) -> tuple[Endpoint, tuple[str, int]]:
    ep = Endpoint(RealNet(), server_config=creds.server_config("intermediate"),
                  server_handler=lambda conn: Recorder(proves))
    for name, value in knobs.items():
        setattr(ep, name, value)
    return ep, await ep.bind("127.0.0.1", 0)


async def _client(host: str = "127.0.0.1", server: Credentials | None = None) -> Endpoint:
    """A client endpoint; with `server`, it also accepts connections on the same socket (one-socket)."""
    ep = Endpoint(RealNet(), server_config=server.server_config("connector") if server else None,
                  server_handler=(lambda conn: Handler()) if server else None)
    await ep.bind(host, 0)
    return ep


def _raw_initials(creds: Credentials, n: int, addr: tuple[str, int], host: str = "127.0.0.1") -> None:
    """`n` handshakes opened and abandoned: one valid Initial each, from `host`."""
    initials = Initials(creds)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        for _ in range(n):
            s.sendto(initials.make(), addr)


async def _settle(seconds: float = 0.2) -> None:
    await asyncio.sleep(seconds)


def test_retry_and_the_one_socket_client_follows_it(creds):
    async def main() -> None:
        server, addr = await _server(creds, retry_threshold=0)  # every handshake must echo a Retry token
        client = await _client(server=creds)  # this socket serves connections too
        conn = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), Handler())
        await asyncio.wait_for(conn.handshake_done, 5)
        assert server.stats["retry_sent"] == 1 and server.half_open == 0 and server.unproven == 1
        assert client.stats["dropped_unknown"] == 0  # the Retry reached its connection
        client.close()
        server.close()

    asyncio.run(main())


def test_a_source_past_its_threshold_must_echo_a_retry(creds):
    async def main() -> None:
        server, addr = await _server(creds, source_retry_threshold=1)
        client = await _client()
        first = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), Handler())
        await asyncio.wait_for(first.handshake_done, 5)
        assert server.stats["retry_sent"] == 0
        second = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), Handler())
        await asyncio.wait_for(second.handshake_done, 5)
        assert server.stats["retry_sent"] == 1 and server.unproven_by_source == {"127.0.0.1": 2}
        client.close()
        server.close()

    asyncio.run(main())


def test_an_invalid_token_is_dropped(creds):
    async def main() -> None:
        server, addr = await _server(creds)
        client = await _client()
        cfg = creds.client_config(INTERMEDIATE_NAME)
        cfg.token = b"not a token of ours" * 3
        conn = client.connect(addr, cfg, Handler())
        await _settle(0.5)
        assert not conn.established and server.stats["dropped_bad_token"] >= 1
        assert not server.connections and server.unproven == 0
        client.close()
        server.close()

    asyncio.run(main())


def test_half_open_handshakes_are_dropped_at_the_handshake_timeout(creds):
    async def main() -> None:
        server, addr = await _server(creds, handshake_timeout=0.3)
        metrics = Metrics()
        watch_endpoints(metrics, lambda: [server])
        await asyncio.to_thread(_raw_initials, creds, 5, addr)
        await _settle()
        assert server.half_open == 5 and server.unproven == 5
        assert "qlab_half_open_connections 5" in metrics.render()
        await _settle(0.4)
        assert server.half_open == 0 and server.unproven == 0 and not server.connections and not server.by_cid
        assert server.closed_for_cause["handshake_timeout"] == 5
        assert 'qlab_connections_closed_total{reason="handshake_timeout"} 5' in metrics.render()
        server.close()

    asyncio.run(main())


def test_a_half_open_handshake_with_a_validated_address_gets_the_proof_deadline(creds, monkeypatch):
    """A slow handshake whose client sent a Handshake packet (address proven: no spoofer) is kept
    until the proof deadline; one without is dropped at the handshake timeout."""
    async def main() -> None:
        server, addr = await _server(creds, handshake_timeout=0.2, proof_timeout=0.6)
        await asyncio.to_thread(_raw_initials, creds, 2, addr)
        await _settle(0.1)
        slow = next(iter(server.connections))
        real = qi.validated_peer_address
        monkeypatch.setattr(qi, "validated_peer_address", lambda quic: ("127.0.0.1", 1) if quic is slow.quic else real(quic))
        await _settle(0.25)
        assert server.connections == {slow} and server.closed_for_cause["handshake_timeout"] == 1
        await _settle(0.4)
        assert not server.connections and server.closed_for_cause["handshake_timeout"] == 2
        server.close()

    asyncio.run(main())


def test_unproven_connections_are_closed_proven_ones_stay(creds):
    async def main() -> None:
        server, addr = await _server(creds, proves=True, proof_timeout=0.6)
        metrics = Metrics()
        watch_endpoints(metrics, lambda: [server])
        client = await _client()
        silent_handler, talking_handler = Recorder(), Recorder()
        silent = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), silent_handler)
        talking = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), talking_handler)
        await asyncio.wait_for(asyncio.gather(silent.handshake_done, talking.handshake_done), 5)
        assert "qlab_unproven_connections 2" in metrics.render()
        talking.send_control(wire.Ping(1))  # the test server proves a connection on any message
        reason = await asyncio.wait_for(silent_handler.closed, 3)
        assert "not proven" in reason and silent.close_event is not None
        assert silent.close_event.error_code == wire.CLOSE_UNAUTHENTICATED
        await _settle(0.3)
        assert not talking.closed and server.unproven == 0 and len(server.connections) == 1
        assert server.closed_for_cause["unproven_timeout"] == 1
        client.close()
        server.close()

    asyncio.run(main())


def test_per_source_and_total_caps(creds):
    async def main() -> None:
        server, addr = await _server(creds, max_unproven_per_source=2, source_retry_threshold=100, max_unproven=3)
        await asyncio.to_thread(_raw_initials, creds, 3, addr, "127.0.0.1")
        await _settle()
        assert server.unproven_by_source == {"127.0.0.1": 2} and server.stats["dropped_source_cap"] == 1
        await asyncio.to_thread(_raw_initials, creds, 2, addr, "127.0.0.2")
        await _settle()
        assert server.unproven == 3 and server.stats["dropped_unproven_cap"] == 1
        server.close()
        assert server.unproven == 0 and not server.unproven_by_source

    asyncio.run(main())


@pytest.mark.parametrize(("attack", "cause"), [("beyond_the_window", "flow_control"), ("second_stream", "stream_violation")])
def test_violations_close_and_are_counted(creds, attack, cause):
    async def main() -> None:
        server, addr = await _server(creds)
        client = await _client()
        handler = Recorder()
        conn = client.connect(addr, creds.client_config(INTERMEDIATE_NAME), handler)
        await asyncio.wait_for(conn.handshake_done, 5)
        if attack == "beyond_the_window":
            send_at(conn.quic, 0, STREAM_WINDOW, b"x")
        else:
            conn.quic.send_stream_data(0, b"\0")
            conn.quic._remote_max_streams_bidi = 8  # the attacker ignores the limit it was given
            conn.quic.send_stream_data(4, b"\0")
        client.mark(conn)
        await _settle(0.3)
        assert conn.close_event is not None
        expected = QuicErrorCode.FLOW_CONTROL_ERROR if cause == "flow_control" else QuicErrorCode.STREAM_LIMIT_ERROR
        assert conn.close_event.error_code == expected
        assert server.closed_for_cause[cause] == 1
        client.close()
        server.close()

    asyncio.run(main())


def test_held_datagrams_expire_on_a_timer():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        held = HeldDatagrams(limit=4, max_age=0.1)
        assert held.hold(loop.time(), 1, b"a") and held.hold(loop.time(), 2, b"b")
        await asyncio.sleep(0.05)
        assert held.hold(loop.time(), 1, b"c")
        await asyncio.sleep(0.08)  # the first two are past max_age: gone without another call
        assert [i[2] for i in held.items] == [b"c"]
        await asyncio.sleep(0.1)
        assert held.items == [] and held._expiry is None
        assert held.take(loop.time(), 1) == []

    asyncio.run(main())


def test_held_datagrams_without_a_loop_expire_on_use():
    held = HeldDatagrams(limit=2, max_age=1.0)
    assert held.hold(0.0, 1, b"a") and held.hold(0.5, 2, b"b")
    assert not held.hold(0.9, 3, b"c")  # full
    assert held.hold(1.2, 3, b"c")  # the first expired
    assert held.take(1.3, 2) == [b"b"] and held.take(1.3, 1) == []
    assert [i[2] for i in held.items] == [b"c"]
