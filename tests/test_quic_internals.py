"""`qlab.quic_internals` against real `QuicConnection`s of the pinned aioquic: a client and a server
in memory, driven by hand (no sockets, no event loop), so an aioquic upgrade that renames or retypes
a private attribute fails here."""

from __future__ import annotations

import ast
import inspect

from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from qlab import quic_internals as qi
from qlab.certs import CONNECTOR_NAME, Credentials
from qlab.endpoint import CID_LENGTH, DATAGRAM_OVERHEAD, MAX_DATAGRAM_SIZE

CLIENT, SERVER = ("10.0.0.1", 4433), ("10.0.0.2", 4434)
ONE_WAY = 0.010


class Pair:
    """A client and a server QuicConnection; `step` carries every datagram each has to send."""

    def __init__(self, creds: Credentials) -> None:
        self.now = 0.0
        self.client = QuicConnection(configuration=creds.client_config(CONNECTOR_NAME))
        self.client.connect(SERVER, now=self.now)
        self.server_config = creds.server_config("connector")
        self.server: QuicConnection | None = None

    def _accept(self, data: bytes) -> QuicConnection:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        return QuicConnection(configuration=self.server_config,
                              original_destination_connection_id=header.destination_cid)

    def step(self, drop_client: bool = False) -> int:
        moved = 0
        self.now += ONE_WAY
        for data, _ in self.client.datagrams_to_send(now=self.now):
            moved += 1
            if drop_client:
                continue
            if self.server is None:
                self.server = self._accept(data)
            self.server.receive_datagram(data, CLIENT, now=self.now)
        if self.server is not None:
            self.now += ONE_WAY
            for data, _ in self.server.datagrams_to_send(now=self.now):
                moved += 1
                self.client.receive_datagram(data, SERVER, now=self.now)
        return moved

    def handshake(self) -> QuicConnection:
        for _ in range(10):
            self.step()
        assert self.server is not None
        return self.server


def _private_names() -> set[str]:
    """Every `quic._name` the adapter reads."""
    tree = ast.parse(inspect.getsource(qi))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "quic"
            and n.attr.startswith("_")}


def test_every_private_attribute_the_adapter_reads_exists(creds: Credentials) -> None:
    names = _private_names()
    assert names == {"_close_event", "_state", "_spaces", "_remote_max_datagram_frame_size",
                     "_max_datagram_size", "_datagrams_pending", "_loss"}
    server = Pair(creds).handshake()
    for name in names:
        assert hasattr(server, name), name
    assert hasattr(server._loss, "_rtt_smoothed") and hasattr(server._loss, "_rtt_initialized")
    assert all(hasattr(space, "largest_received_packet") for space in server._spaces.values())


def test_a_fresh_client_is_open_and_knows_nothing_yet(creds: Credentials) -> None:
    client = Pair(creds).client
    assert qi.close_event(client) is None
    assert not qi.is_ending(client) and not qi.is_terminated(client)
    assert not qi.decrypted_any(client)
    assert qi.max_datagram_payload(client, DATAGRAM_OVERHEAD) == 0  # the peer has not offered DATAGRAM
    assert qi.pending_datagrams(client) == 0
    assert qi.rtt_estimate(client) is None


def test_after_the_handshake_each_accessor_reads_the_connection(creds: Credentials) -> None:
    pair = Pair(creds)
    server = pair.handshake()
    for quic in (pair.client, server):
        assert qi.decrypted_any(quic)
        assert qi.close_event(quic) is None and not qi.is_ending(quic)
        # qlab offers 65536-byte DATAGRAM frames, so our packet size is the limit
        assert qi.max_datagram_payload(quic, DATAGRAM_OVERHEAD) == MAX_DATAGRAM_SIZE - DATAGRAM_OVERHEAD
        assert qi.max_datagram_payload(quic, MAX_DATAGRAM_SIZE) == 0
    rtt = qi.rtt_estimate(pair.client)
    assert rtt is not None and 0.5 * 2 * ONE_WAY <= rtt <= 3 * 2 * ONE_WAY

    for _ in range(3):
        pair.client.send_datagram_frame(b"x" * 100)
    assert qi.pending_datagrams(pair.client) == 3
    pair.step()
    assert qi.pending_datagrams(pair.client) == 0


def test_close_is_seen_as_ending_then_terminated(creds: Credentials) -> None:
    pair = Pair(creds)
    pair.handshake()
    pair.client.close(error_code=0x128, reason_phrase="tls alert")
    event = qi.close_event(pair.client)
    assert event is not None and event.error_code == 0x128 and event.reason_phrase == "tls alert"
    assert not qi.is_ending(pair.client)  # closing starts when CONNECTION_CLOSE is sent
    pair.step()
    assert qi.is_ending(pair.client) and not qi.is_terminated(pair.client)
    for _ in range(20):  # the closing period (three PTOs) runs out
        at = pair.client.get_timer()
        if at is None:
            break
        pair.client.handle_timer(now=at)
    assert qi.is_terminated(pair.client) and qi.is_ending(pair.client)


def test_a_first_initial_without_crypto_is_seen_as_closing(creds: Credentials) -> None:
    """The case Endpoint forgets silently: the ClientHello Initial is lost, the client gives up, and
    its CONNECTION_CLOSE-only Initial is the first the server sees."""
    pair = Pair(creds)
    pair.step(drop_client=True)
    pair.client.close(reason_phrase="stalled")
    pair.step()
    assert pair.server is not None
    assert qi.close_event(pair.server) is not None  # aioquic raised PROTOCOL_VIOLATION and will close
