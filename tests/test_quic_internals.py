"""`qlab.quic_internals` against real `QuicConnection`s of the pinned aioquic: a client and a server
in memory, driven by hand (no sockets, no event loop), so an aioquic upgrade that renames or retypes
a private attribute fails here."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, pull_quic_header

from qlab import quic_internals as qi
from qlab.certs import CONNECTOR_NAME, Credentials
from qlab.endpoint import CID_LENGTH, DATAGRAM_OVERHEAD, MAX_DATAGRAM_SIZE, STREAM_WINDOW
from tests.hostile.test_flow_control import send_at

CLIENT, SERVER = ("10.0.0.1", 4433), ("10.0.0.2", 4434)
ONE_WAY = 0.010


class Pair:
    """A client and a server QuicConnection; `step` carries every datagram each has to send."""

    def __init__(self, creds: Credentials, bounded: bool = False) -> None:
        self.now = 0.0
        self.client = QuicConnection(configuration=creds.client_config(CONNECTOR_NAME))
        self.client.connect(SERVER, now=self.now)
        self.server_config = creds.server_config("connector")
        self.server: QuicConnection | None = None
        self.bounded = bounded

    def _accept(self, data: bytes) -> QuicConnection:
        header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
        if self.bounded:
            return qi.BoundedQuicConnection(configuration=self.server_config, peer_bidi_streams=1,
                                            original_destination_connection_id=header.destination_cid)
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


def _private_names(owner: str, source: ModuleType | type = qi) -> set[str]:
    """Every `<owner>._name` the adapter reads (qlab's own `_qlab_*` attributes aside)."""
    tree = ast.parse(inspect.getsource(source))
    return {n.attr for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == owner
            and n.attr.startswith("_") and not n.attr.startswith(("_qlab_", "__"))}


def test_every_private_attribute_the_adapter_reads_exists(creds: Credentials) -> None:
    names = _private_names("quic")
    assert names >= {"_close_event", "_state", "_spaces", "_remote_max_datagram_frame_size", "_network_paths",
                     "_peer_cid_available", "_handshake_confirmed",
                     "_max_datagram_size", "_datagrams_pending", "_loss"}
    overridden = _private_names("self", qi.BoundedQuicConnection)
    assert overridden == {"_local_max_streams_bidi", "_local_max_streams_uni", "_local_max_data", "_streams"}
    server = Pair(creds).handshake()
    for name in names | overridden:
        assert hasattr(server, name), name
    for method in ("_write_connection_limits", "_write_stream_limits"):  # what the subclass overrides
        assert callable(getattr(QuicConnection, method)), method
        assert list(inspect.signature(getattr(QuicConnection, method)).parameters) == \
            list(inspect.signature(getattr(qi.BoundedQuicConnection, method)).parameters)
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
        # qlab accepts DATAGRAM frames as large as its packets, so our packet size less overhead is the limit
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


# -- BoundedQuicConnection: receive credit and stream limits -------------------------------------
def _received(quic: QuicConnection) -> bytes:
    out = bytearray()
    while (ev := quic.next_event()) is not None:
        if isinstance(ev, events.StreamDataReceived):
            out += ev.data
    return bytes(out)


def test_credit_slides_with_the_data_consumed(creds: Credentials) -> None:
    pair = Pair(creds, bounded=True)
    server = pair.handshake()
    _received(server)
    sent = bytes(range(256)) * (5 * STREAM_WINDOW // 256)
    pair.client.send_stream_data(0, sent)
    got = b""
    for _ in range(400):
        pair.step()
        got += _received(server)
        stream = server._streams[0]
        consumed = stream.receiver.starting_offset()
        assert stream.max_stream_data_local <= consumed + STREAM_WINDOW
        assert server._local_max_data.value <= consumed + STREAM_WINDOW
        if len(got) == len(sent):
            break
    assert got == sent  # nothing stalls: the credit keeps moving
    assert stream.max_stream_data_local >= len(sent) + STREAM_WINDOW // 2


def _edge_attack(pair: Pair, rounds: int) -> list[int]:
    """One byte at the far edge of the granted window, `rounds` times; the server's grants."""
    server = pair.handshake()
    grants = []
    for _ in range(rounds):
        edge = min(pair.client._streams[0].max_stream_data_remote if 0 in pair.client._streams
                   else pair.client._remote_max_stream_data_bidi_remote, pair.client._remote_max_data)
        send_at(pair.client, 0, edge - 1, b"x")
        for _ in range(3):
            pair.step()
        grants.append(server._streams[0].max_stream_data_local)
    return grants


def test_a_byte_at_the_window_edge_grows_nothing(creds: Credentials) -> None:
    pair = Pair(creds, bounded=True)
    grants = _edge_attack(pair, 6)
    assert grants == [STREAM_WINDOW] * 6
    assert pair.server is not None and not qi.is_ending(pair.server)
    assert len(pair.server._streams[0].receiver._buffer) <= STREAM_WINDOW
    # plain aioquic, for contrast: each byte doubles the window (and what it will allocate)
    assert _edge_attack(Pair(creds), 6) == [STREAM_WINDOW * 2 ** k for k in range(1, 7)]


def test_data_beyond_the_credit_closes_with_flow_control_error(creds: Credentials) -> None:
    pair = Pair(creds, bounded=True)
    server = pair.handshake()
    send_at(pair.client, 0, STREAM_WINDOW, b"x")
    pair.step()
    assert qi.local_close_code(server) == QuicErrorCode.FLOW_CONTROL_ERROR


def test_a_peer_may_open_the_control_stream_only(creds: Credentials) -> None:
    for stream_id in (4, 2):  # a second bidirectional stream; any unidirectional one
        pair = Pair(creds, bounded=True)
        server = pair.handshake()
        pair.client.send_stream_data(0, b"hello")
        pair.step()
        assert qi.local_close_code(server) is None
        pair.client._remote_max_streams_bidi = pair.client._remote_max_streams_uni = 8  # ignore the limit
        pair.client.send_stream_data(stream_id, b"more")
        pair.step()
        assert qi.local_close_code(server) == QuicErrorCode.STREAM_LIMIT_ERROR, stream_id


def test_local_close_code_is_none_when_the_peer_closed(creds: Credentials) -> None:
    pair = Pair(creds, bounded=True)
    server = pair.handshake()
    pair.client.close(error_code=0x102, reason_phrase="bye")
    assert qi.local_close_code(pair.client) == 0x102
    pair.step()
    assert qi.close_event(server) is not None and qi.local_close_code(server) is None


def test_peer_cid_is_the_servers_own_cid_and_the_validated_address_follows_validation(creds: Credentials) -> None:
    """What a HELLO is bound to: the client's peer CID after the handshake is the CID the server chose
    when it accepted the connection (`host_cid` then); the server's validated address is the client's."""
    pair = Pair(creds)
    pair.step()
    assert pair.server is not None
    chosen = pair.server.host_cid  # what the Intermediate records when it accepts
    pair.handshake()
    assert qi.peer_cid(pair.client) == chosen and len(chosen) == CID_LENGTH
    assert qi.validated_peer_address(pair.server) == CLIENT
    # a packet from a new address moves aioquic's peer address at once; the validated one stays
    pair.client.send_ping(1)
    for data, _ in pair.client.datagrams_to_send(now=pair.now):
        pair.server.receive_datagram(data, ("10.0.0.66", 9), now=pair.now)
    assert pair.server.get_peer_address() == ("10.0.0.66", 9)
    assert qi.validated_peer_address(pair.server) == CLIENT


class Routed:
    """A client and a server whose datagrams go where each sends them: the server sees the client
    from the address its path maps to (`paths`: where the client sends -> where the server sees it
    from), as a relay tunnel and a punched pair look to a sealed connection."""

    def __init__(self, creds: Credentials, first: tuple[str, int], paths: dict) -> None:
        self.now, self.paths = 0.0, paths
        config = creds.client_config(CONNECTOR_NAME)
        self.client = QuicConnection(configuration=config)
        self.client.connect(first, now=self.now)
        self.server_config = creds.server_config("connector")
        self.server: QuicConnection | None = None
        self.sent: list[tuple[str, int, object]] = []  # (who, size, to)

    def step(self) -> list[bytes]:
        """Carry one round; returns the DATAGRAM frames the client received."""
        self.now += ONE_WAY
        for data, to in self.client.datagrams_to_send(now=self.now):
            self.sent.append(("client", len(data), to))
            if self.server is None:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
                self.server = QuicConnection(configuration=self.server_config,
                                             original_destination_connection_id=header.destination_cid)
            self.server.receive_datagram(data, self.paths[to][0], now=self.now)
        assert self.server is not None
        self.now += ONE_WAY
        for data, to in self.server.datagrams_to_send(now=self.now):
            self.sent.append(("server", len(data), to))
            self.client.receive_datagram(data, next(k for k, v in self.paths.items() if v[0] == to), now=self.now)
        got = []
        while (ev := self.client.next_event()) is not None:
            if isinstance(ev, events.DatagramFrameReceived):
                got.append(ev.data)
        return got

    def server_datagrams(self) -> list[bytes]:
        assert self.server is not None
        return [ev.data for ev in iter(self.server.next_event, None) if isinstance(ev, events.DatagramFrameReceived)]


def test_migrate_moves_a_confirmed_client_at_once_and_back(creds: Credentials) -> None:
    """A sealed connection: handshake through a tunnel address, then `migrate` to the punched pair.
    The first packet on the new path is the client's (no PATH_CHALLENGE round trip first); the server
    follows it, validates the path with its own PATH_CHALLENGE, and a fresh CID is used."""
    tunnel, punched, client_seen = ("relay", 7), ("10.0.0.2", 4434), ("10.0.0.1", 5555)
    r = Routed(creds, tunnel, {tunnel: (tunnel,), punched: (client_seen,)})
    for _ in range(6):
        r.step()
    assert qi.handshake_confirmed(r.client) and r.server is not None and r.server.get_peer_address() == tunnel
    cid_before = qi.peer_cid(r.client)
    qi.migrate(r.client, punched)
    assert r.client.get_peer_address() == punched and qi.peer_cid(r.client) != cid_before
    r.client.send_datagram_frame(b"x" * 1100)  # the padding a sealed migration sends: room for the server's challenge
    r.client.send_datagram_frame(b"echo")
    r.sent.clear()
    r.step()
    assert {to for who, _, to in r.sent if who == "client"} == {punched}
    assert r.server.get_peer_address() == client_seen and r.server_datagrams() == [b"x" * 1100, b"echo"]
    r.server.send_datagram_frame(b"reply")
    assert r.step() == [b"reply"]  # within the amplification budget: no wait for the path's validation
    r.step()
    assert qi.validated_peer_address(r.server) == client_seen  # the server's challenge was answered
    qi.migrate(r.client, tunnel)  # back to the relay: a path the server validated at the handshake
    r.client.send_datagram_frame(b"again")
    r.step()
    assert r.server.get_peer_address() == tunnel and r.server_datagrams() == [b"again"]


def test_handshake_confirmed_only_after_handshake_done(creds: Credentials) -> None:
    pair = Pair(creds)
    pair.step()
    assert not qi.handshake_confirmed(pair.client)
    pair.handshake()
    assert qi.handshake_confirmed(pair.client)
