"""One UDP socket, many aioquic connections in client and server role, plus raw probes.

Hole punching only works if the punch probes and the direct QUIC connection leave from the very
socket whose NAT mapping the Intermediate observed. So each role owns ONE `Endpoint`: it routes
incoming QUIC packets to `QuicConnection`s by destination connection ID (which survives CID rotation
and NAT rebinding), creates server-role connections for new Initials when it has a server
configuration, and hands every datagram whose QUIC fixed bit is clear to a raw handler (the probes).

Receiving and sending are batched: a burst of datagrams is fed to the connections first, then each
connection that has something to send transmits once.

A server-role connection is unproven until its role calls `mark_proven` (the Intermediate on an
accepted HELLO, the Connector on a verified DirectHello). Whatever an unauthenticated peer can make
the endpoint hold is bounded: a handshake must finish within `handshake_timeout` and the peer must
prove itself within `proof_timeout`, or the connection goes. Past `retry_threshold` half-open
handshakes, or `source_retry_threshold` unproven connections from one source IP, a new handshake
must first echo a Retry token (RFC 9000 8.1.2), which a spoofed source cannot: a flood from spoofed
addresses, or from the very address of an honest peer, costs the endpoint a stateless Retry per
Initial and the honest peer one round trip. A source that does answer Retries may hold at most
`max_unproven_per_source` unproven connections, all sources `max_unproven`. Receive windows slide
with consumed data (`quic_internals.BoundedQuicConnection`) and a peer may open one stream, the
control stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode, QuicHeader, QuicPacketType, encode_quic_retry, pull_quic_header
from aioquic.quic.retry import QuicRetryTokenHandler

from qlab import quic_internals as qi
from qlab import wire
from qlab.net import Addr, DatagramSocket, Net, normalize_addr

log = logging.getLogger("qlab.endpoint")

CID_LENGTH = 8  # every connection on a socket shares it: short headers carry no CID length
MAX_DATAGRAM_SIZE = 1350  # UDP payload of QUIC packets; fits any path with a 1400+ MTU
DATAGRAM_OVERHEAD = 40  # short header, packet number, AEAD tag and DATAGRAM frame header, with margin
# a sealed session's end-to-end packets: the smallest QUIC allows, so that one also fits a relayed
# DATAGRAM frame of the control connections (MAX_DATAGRAM_SIZE less DATAGRAM_OVERHEAD and the header)
SEALED_DATAGRAM_SIZE = 1200
MAX_PENDING_DATAGRAMS = 1024  # per connection: aioquic's queue is unbounded, ours is not
# Receive windows. A connection carries one stream, the control stream, whose framer holds at most
# 4 x 16 KiB (wire.ControlFramer), so one window of that size per stream and per connection: at most
# 64 KiB reassembly + 64 KiB framed per connection, and 64 KiB per RTT is far above control traffic.
# DATAGRAM frames (the relayed traffic) are not flow-controlled; their size is capped instead.
STREAM_WINDOW = 64 * 1024
CONNECTION_WINDOW = STREAM_WINDOW
# Unauthenticated peers (issue 13). An honest handshake takes a few RTTs and a HELLO one more;
# aioquic alone would hold a half-open connection for the 30 s idle timeout, an unproven one forever.
HANDSHAKE_TIMEOUT = 3.0  # seconds from a server connection's first Initial to handshake completion,
# or to the client's first Handshake packet (which proves its address; it then has PROOF_TIMEOUT)
PROOF_TIMEOUT = 5.0  # seconds from its first Initial until the role marks it proven
RETRY_THRESHOLD = 64  # half-open handshakes beyond which a new one must answer a Retry first
SOURCE_RETRY_THRESHOLD = 8  # ... and unproven connections from its source IP beyond which it must too
MAX_UNPROVEN_PER_SOURCE = 32  # unproven server connections per source IP, validated ones included
MAX_UNPROVEN = 1024  # unproven server connections per socket
MAX_UNPROVEN_PER_TUNNEL = 2  # a sealed session has one connection; a redial may overlap it
# closes for cause, by the transport error aioquic raised on a peer's violation
VIOLATIONS: dict[int, str] = {
    QuicErrorCode.FLOW_CONTROL_ERROR: "flow_control",
    QuicErrorCode.FINAL_SIZE_ERROR: "flow_control",
    QuicErrorCode.STREAM_LIMIT_ERROR: "stream_violation",
    QuicErrorCode.STREAM_STATE_ERROR: "stream_violation",
}


class DatagramTooLarge(ValueError):
    """A payload larger than the connection can carry in one QUIC DATAGRAM frame."""


def _closing(quic: QuicConnection) -> bool:
    """Whether aioquic has decided to close this connection (an error queued, or a CONNECTION_CLOSE
    received). For a fresh server connection this happens when the first Initial that got through
    carries no CRYPTO frame: aioquic then raises PROTOCOL_VIOLATION ("Packet contains no CRYPTO
    frame", RFC 9000 17.2.2) and would answer with CONNECTION_CLOSE. Under loss the client sends
    such an Initial when every Initial carrying its ClientHello was lost and it then closes the
    attempt: before any server packet, aioquic's close() can only use Initial keys, so it sends an
    Initial holding nothing but CONNECTION_CLOSE (qlab does this when a handshake attempt stalls,
    a QAD probe ends, or a direct dial times out). Any other CRYPTO-less first Initial (a bare PING
    probe, an ACK) whose CRYPTO Initial was lost or overtaken is handled the same way."""
    return qi.close_event(quic) is not None or qi.is_ending(quic)


class HeldDatagrams:
    """Datagrams that arrived just before the control message that makes them valid.

    aioquic writes DATAGRAM frames before STREAM frames in a packet, so a session's first relayed
    datagram can be processed before the message that opens the session. A receiver holds a few,
    for a short time, and replays them when the session appears; the rest are dropped. Under a
    running loop a timer drops them once `max_age` has passed, so nothing waits for the next call.
    """

    def __init__(self, limit: int = 32, max_age: float = 2.0) -> None:
        self.limit = limit
        self.max_age = max_age
        self.items: list[tuple[float, int, bytes]] = []
        self._expiry: asyncio.TimerHandle | None = None
        self._clock_offset = 0.0  # the callers' clock minus the loop's (sans-IO callers pass their own)

    def hold(self, now: float, key: int, data: bytes) -> bool:
        self._expire(now)
        if len(self.items) >= self.limit:
            return False
        self.items.append((now, key, data))
        self._arm(now)
        return True

    def take(self, now: float, key: int) -> list[bytes]:
        out = [d for t, k, d in self.items if k == key and now - t <= self.max_age]
        self.items = [i for i in self.items if i[1] != key]
        self._expire(now)
        return out

    def _expire(self, now: float) -> None:
        self.items = [i for i in self.items if now - i[0] <= self.max_age]
        if not self.items and self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _arm(self, now: float) -> None:
        if self._expiry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a sans-IO test): expiry happens on the next hold or take
        self._clock_offset = now - loop.time()
        self._expiry = loop.call_later(self.items[0][0] + self.max_age - now + 1e-3, self._on_expiry, loop)

    def _on_expiry(self, loop: asyncio.AbstractEventLoop) -> None:
        self._expiry = None
        now = loop.time() + self._clock_offset
        self._expire(now)
        if self.items:
            self._arm(now)


class Handler:
    """What a role does with a connection's events. Methods run inside the endpoint's batch."""

    def on_handshake(self, conn: Connection) -> None: ...

    def on_control(self, conn: Connection, msg: wire.Message) -> None: ...

    def on_datagram(self, conn: Connection, data: bytes) -> None: ...

    def on_peer_address_changed(self, conn: Connection, addr: Addr) -> None: ...

    def on_closed(self, conn: Connection, reason: str) -> None: ...


class Connection:
    """A QuicConnection on an Endpoint, with the qlab/1 control stream and datagram helpers."""

    def __init__(self, endpoint: Endpoint, quic: QuicConnection, is_client: bool, handler: Handler) -> None:
        self.endpoint = endpoint
        self.quic = quic
        self.is_client = is_client
        self.handler = handler
        self.control_stream: int | None = None
        self.framer = wire.ControlFramer()
        self.cids: set[bytes] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.established = False
        self.closed = False
        self.close_reason = ""
        self.peer_addr: Addr | None = None
        self.rx_addr: Addr | None = None  # where the packets whose events are being dispatched came from
        self.handshake_done = asyncio.get_running_loop().create_future()
        # server role: unproven until the role says otherwise; `source` is the IP it is counted under
        self.proven = is_client
        self.half_open = False
        self.source: str | None = None
        self.accepted_at = 0.0
        self.deadline: asyncio.TimerHandle | None = None
        self.close_noted = False  # its close was classified (and counted if for cause)

    def mark_proven(self) -> None:
        """The peer proved itself (an accepted HELLO, a verified DirectHello): it may stay."""
        if not self.proven:
            self.proven = True
            self.endpoint.note_proven(self)

    # -- sending --------------------------------------------------------------------------------
    @property
    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM frame payload this connection can send now (0 if the peer takes none)."""
        return qi.max_datagram_payload(self.quic, DATAGRAM_OVERHEAD)

    @property
    def max_app_payload(self) -> int:
        return max(0, self.max_datagram_payload - wire.DGRAM_HEADER)

    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM frame. Raises DatagramTooLarge; returns False when dropped (queue full
        or connection not up), as an unreliable datagram may be."""
        limit = self.max_datagram_payload
        if len(data) > limit:
            raise DatagramTooLarge(f"datagram of {len(data)} bytes exceeds this connection's limit of {limit}")
        if self.closed or not self.established or qi.pending_datagrams(self.quic) >= MAX_PENDING_DATAGRAMS:
            return False
        self.quic.send_datagram_frame(data)
        self.endpoint.mark(self)
        return True

    def send_control(self, msg: wire.Message) -> None:
        if self.closed:
            return
        if self.control_stream is None:
            if not self.is_client:
                raise RuntimeError("the server side answers on the client's control stream")
            self.control_stream = self.quic.get_next_available_stream_id(is_unidirectional=False)
        self.quic.send_stream_data(self.control_stream, msg.encode())
        self.endpoint.mark(self)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if not self.closed and not qi.is_ending(self.quic):
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.endpoint.mark(self)

    def close_soon(self, error_code: int, reason: str, delay: float = 0.2) -> None:
        """Close after `delay`, so that control messages just queued (a NACK) reach the peer
        first: aioquic drops unsent stream data once a connection is closing."""
        asyncio.get_running_loop().call_later(delay, self.close, error_code, reason)

    @property
    def rtt(self) -> float | None:
        """QUIC's smoothed RTT in seconds, once measured."""
        return qi.rtt_estimate(self.quic)

    @property
    def close_event(self) -> ConnectionTerminated | None:
        """Why aioquic closes or closed this connection (error code, frame type, reason); None while open."""
        return qi.close_event(self.quic)

    def __repr__(self) -> str:
        role = "client" if self.is_client else "server"
        return f"<Connection {role} peer={self.peer_addr} established={self.established} proven={self.proven}>"


class Endpoint:
    """One UDP socket of a role: QUIC connections in both roles plus a raw-probe handler."""

    def __init__(
        self,
        net: Net,
        *,
        server_config: QuicConfiguration | None = None,
        server_handler: Callable[[Connection], Handler] | None = None,
        raw_handler: Callable[[bytes, Addr], None] | None = None,
    ) -> None:
        self.net = net
        self.server_config = server_config
        self.server_handler = server_handler
        self.raw_handler = raw_handler  # the owner's, for the endpoint's life
        self._raw_claims: list[Callable[[bytes, Addr], bool]] = []
        self.sock: DatagramSocket | None = None
        self.by_cid: dict[bytes, Connection] = {}
        self.connections: set[Connection] = set()
        self._dirty: dict[Connection, None] = {}
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"rx": 0, "tx": 0, "raw_rx": 0, "dropped_unknown": 0, "dropped_malformed": 0,
                      "dropped_first_initial": 0, "dropped_source_cap": 0, "dropped_unproven_cap": 0,
                      "dropped_bad_token": 0, "retry_sent": 0}
        # knobs for unauthenticated peers (module constants explain the defaults)
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.proof_timeout = PROOF_TIMEOUT
        self.retry_threshold = RETRY_THRESHOLD
        self.source_retry_threshold = SOURCE_RETRY_THRESHOLD
        self.max_unproven_per_source = MAX_UNPROVEN_PER_SOURCE
        self.max_unproven_per_tunnel = MAX_UNPROVEN_PER_TUNNEL
        self.max_unproven = MAX_UNPROVEN
        self.half_open = 0  # server connections in their handshake
        self.unproven = 0  # server connections not yet proven (the half-open included)
        self.unproven_by_source: dict[str, int] = {}
        self.closed_for_cause: dict[str, int] = defaultdict(int, dict.fromkeys(
            ("handshake_timeout", "unproven_timeout", *VIOLATIONS.values()), 0))
        self._retry_tokens = QuicRetryTokenHandler()
        # addresses that are not the socket's: packets to one go to its sender (a sealed session's
        # relay path); packets from one come in through `tunnel_receive`
        self.tunnels: dict[Addr, Callable[[bytes], object]] = {}

    def claim_raw(self, handler: Callable[[bytes, Addr], bool]) -> Callable[[], None]:
        """Offer non-QUIC datagrams to `handler` before the owner's `raw_handler` (the latest claim
        first); one that returns True is taken. Returns the call that withdraws the claim."""
        self._raw_claims.append(handler)

        def withdraw() -> None:
            if handler in self._raw_claims:
                self._raw_claims.remove(handler)

        return withdraw

    def _raw(self, data: bytes, addr: Addr) -> None:
        try:
            if any(claim(data, addr) for claim in reversed(self._raw_claims)):
                return
            if self.raw_handler is not None:
                self.raw_handler(data, addr)
        except Exception:  # a role bug must not take the socket down
            log.exception("raw handler failed")

    async def bind(self, host: str, port: int) -> Addr:
        self._loop = asyncio.get_running_loop()
        self.sock = await self.net.bind_udp(host, port, self._on_batch)
        return self.sock.local_address

    @property
    def local_address(self) -> Addr:
        assert self.sock is not None
        return self.sock.local_address

    # -- raw datagrams --------------------------------------------------------------------------
    def send_raw(self, data: bytes, addr: Addr) -> None:
        """Send a non-QUIC datagram (first byte 0x00..0x3f) from this socket."""
        assert self.sock is not None and data and wire.is_raw(data[0])
        self.sock.sendto(data, addr)
        self.stats["tx"] += 1

    # -- connections ----------------------------------------------------------------------------
    def connect(self, addr: Addr, config: QuicConfiguration, handler: Handler) -> Connection:
        """Open a client-role connection from this socket."""
        assert self._loop is not None
        config.connection_id_length = CID_LENGTH
        quic = qi.BoundedQuicConnection(configuration=config, peer_bidi_streams=0)
        conn = Connection(self, quic, True, handler)
        conn.peer_addr = addr
        self._add_cid(conn, quic.host_cid)
        self.connections.add(conn)
        quic.connect(addr, now=self._loop.time())
        self.mark(conn)
        return conn

    def _add_cid(self, conn: Connection, cid: bytes) -> None:
        self.by_cid[cid] = conn
        conn.cids.add(cid)

    def _on_batch(self, batch: list[tuple[bytes, Addr]]) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for data, addr in batch:
            self.stats["rx"] += 1
            conn = self._receive(data, addr, now)
            if conn is not None:
                self._dirty[conn] = None
        self._flush()

    def _receive(self, data: bytes, addr: Addr, now: float) -> Connection | None:
        """Route one datagram: raw probes to their handler, QUIC to its connection (a new server
        connection for an admitted Initial). Returns the connection that took it."""
        first = data[0] if data else 0
        is_vn = len(data) >= 5 and first & 0x80 and data[1:5] == b"\0\0\0\0"
        if not data or (wire.is_raw(first) and not is_vn):
            self.stats["raw_rx"] += 1
            if data:
                self._raw(data, addr)
            return None
        fresh = False
        if not first & 0x80:  # short header: the DCID is the next CID_LENGTH bytes (hot path)
            conn = self.by_cid.get(data[1 : 1 + CID_LENGTH])
        else:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
            except ValueError:
                self.stats["dropped_malformed"] += 1
                return None
            conn = self.by_cid.get(header.destination_cid)
            if (
                conn is None
                and self.server_config is not None
                and header.packet_type == QuicPacketType.INITIAL
                and len(data) >= 1200
                and len(header.destination_cid) >= 8
                and header.version in self.server_config.supported_versions
            ):
                conn = self._admit(header, addr, now)
                fresh = conn is not None
        if conn is None:
            self.stats["dropped_unknown"] += 1
            return None
        conn.rx_addr = addr
        try:
            conn.quic.receive_datagram(data, addr, now=now)
        except Exception:  # aioquic should not raise here; never let one peer break the rest
            log.exception("receive_datagram failed")
            self.stats["dropped_malformed"] += 1
            return None
        if fresh and not self._keep_fresh(conn):
            return None
        return conn

    # -- tunnels (a sealed session's relay path) --------------------------------------------------
    def open_tunnel(self, addr: Addr, send: Callable[[bytes], object]) -> None:
        """Packets a connection sends to `addr` go to `send` instead of the socket."""
        self.tunnels[addr] = send

    def close_tunnel(self, addr: Addr) -> None:
        self.tunnels.pop(addr, None)

    def tunnel_receive(self, data: bytes, addr: Addr) -> None:
        """A packet that came through the tunnel `addr`, handled as one from the socket. Its events
        are dispatched at once, so that handlers read `conn.rx_addr` right; events still pending
        from socket packets go first, under their own address."""
        if addr not in self.tunnels or self._loop is None:
            self.stats["dropped_unknown"] += 1
            return
        self.stats["rx"] += 1
        conn = self.by_cid.get(data[1 : 1 + CID_LENGTH]) if data and not data[0] & 0x80 else None
        if conn is not None and conn in self._dirty:
            self._process(conn)
        conn = self._receive(data, addr, self._loop.time())
        if conn is not None:
            self._process(conn)
            self.mark(conn)

    def _keep_fresh(self, conn: Connection) -> bool:
        """Whether a server connection made by the Initial it just received is worth keeping."""
        if _closing(conn.quic):
            # The first Initial we see of this connection made aioquic close it: answering
            # would kill a handshake that loss merely reordered. Forget it silently (see
            # `_closing`); the client's CRYPTO retransmission opens the connection normally.
            self._forget(conn)
            self.stats["dropped_first_initial"] += 1
            return False
        if not qi.decrypted_any(conn.quic):
            # a junk Initial: keep no state for it (no memory for floods of them)
            self._forget(conn)
            self.stats["dropped_malformed"] += 1
            return False
        return True

    def _admit(self, header: QuicHeader, addr: Addr, now: float) -> Connection | None:
        """A server connection for the first Initial of a handshake, or None: answered with a
        Retry (stateless) while many handshakes are open, or dropped by a cap or an invalid token."""
        from_source = self.unproven_by_source.get(self._source(addr), 0)
        original_dcid, retry_scid = header.destination_cid, None
        if header.token:  # qlab issues no NEW_TOKEN: any token is one of our Retry tokens
            try:
                original_dcid = self._retry_tokens.validate_token(
                    address=addr, destination_cid=header.destination_cid, token=header.token, now=now)
            except ValueError:
                self.stats["dropped_bad_token"] += 1
                return None
            retry_scid = header.destination_cid
        elif addr not in self.tunnels and (self.half_open >= self.retry_threshold
                                           or from_source >= self.source_retry_threshold):
            self._send_retry(header, addr, now)
            return None
        if from_source >= (self.max_unproven_per_tunnel if addr in self.tunnels else self.max_unproven_per_source):
            self.stats["dropped_source_cap"] += 1
            return None
        if self.unproven >= self.max_unproven:
            self.stats["dropped_unproven_cap"] += 1
            return None
        return self._accept(header.destination_cid, original_dcid, retry_scid, addr)

    def _source(self, addr: Addr) -> str:
        """Who an unproven connection is counted against: its IP, or its tunnel (each sealed
        session's relay path is a source of its own)."""
        return f"{addr[0]}:{addr[1]}" if addr in self.tunnels else addr[0]

    def _send_retry(self, header: QuicHeader, addr: Addr, now: float) -> None:
        assert self.sock is not None and header.version is not None
        scid = os.urandom(CID_LENGTH)
        token = self._retry_tokens.create_token(
            address=addr, original_destination_connection_id=header.destination_cid,
            retry_source_connection_id=scid, now=now)
        self.sock.sendto(encode_quic_retry(version=header.version, source_cid=scid, destination_cid=header.source_cid,
                                           original_destination_cid=header.destination_cid, retry_token=token), addr)
        self.stats["retry_sent"] += 1
        self.stats["tx"] += 1

    def _accept(self, dcid: bytes, original_dcid: bytes, retry_scid: bytes | None, addr: Addr) -> Connection:
        assert self.server_config is not None and self.server_handler is not None and self._loop is not None
        config = self.server_config
        if addr in self.tunnels:  # its packets must fit the relay's frames
            config = dataclasses.replace(config, max_datagram_size=SEALED_DATAGRAM_SIZE)
        quic = qi.BoundedQuicConnection(configuration=config, peer_bidi_streams=1,
                                        original_destination_connection_id=original_dcid,
                                        retry_source_connection_id=retry_scid)
        conn = Connection(self, quic, False, Handler())
        conn.peer_addr = addr
        conn.handler = self.server_handler(conn)
        self._add_cid(conn, dcid)
        self._add_cid(conn, quic.host_cid)
        self.connections.add(conn)
        conn.half_open = True
        self.half_open += 1
        conn.source = self._source(addr)
        self.unproven_by_source[conn.source] = self.unproven_by_source.get(conn.source, 0) + 1
        self.unproven += 1
        conn.accepted_at = self._loop.time()
        conn.deadline = self._loop.call_later(self.handshake_timeout, self._on_deadline, conn)
        return conn

    def _on_deadline(self, conn: Connection) -> None:
        conn.deadline = None
        if conn.closed or conn.proven or _closing(conn.quic):
            return  # a closing connection ends within its closing period anyway
        if conn.half_open:
            assert self._loop is not None
            at = conn.accepted_at + self.proof_timeout
            if qi.validated_peer_address(conn.quic) is not None and self._loop.time() < at:
                # A Handshake packet came back: the address is real (no spoofer gets this far), the
                # handshake merely slow (loss); it gets until the proof deadline.
                conn.deadline = self._loop.call_at(at, self._on_deadline, conn)
                return
            # no CONNECTION_CLOSE: the source may be spoofed, and nothing was agreed
            self.closed_for_cause["handshake_timeout"] += 1
            log.info("dropping %s: no handshake within %.1fs", conn, self.handshake_timeout)
            self._terminated(conn, "handshake timeout")
        else:
            self.closed_for_cause["unproven_timeout"] += 1
            conn.close_noted = True
            log.info("closing %s: not proven within %.1fs", conn, self.proof_timeout)
            self.abandon(conn, "not proven in time", error_code=wire.CLOSE_UNAUTHENTICATED)

    def _handshake_done(self, conn: Connection) -> None:
        """A server connection finished its handshake: it now has until `proof_timeout`."""
        assert self._loop is not None
        conn.half_open = False
        self.half_open -= 1
        if conn.deadline is not None:
            conn.deadline.cancel()
            at = max(conn.accepted_at + self.proof_timeout, self._loop.time())
            conn.deadline = self._loop.call_at(at, self._on_deadline, conn)

    def note_proven(self, conn: Connection) -> None:
        """`conn.mark_proven()` was called: release its unproven slot and its deadline."""
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None
        self._leave_unproven(conn)

    def _leave_unproven(self, conn: Connection) -> None:
        if conn.half_open:
            conn.half_open = False
            self.half_open -= 1
        source, conn.source = conn.source, None
        if source is not None:
            self.unproven -= 1
            left = self.unproven_by_source[source] - 1
            if left:
                self.unproven_by_source[source] = left
            else:
                del self.unproven_by_source[source]

    def _forget(self, conn: Connection) -> None:
        for cid in conn.cids:
            if self.by_cid.get(cid) is conn:
                del self.by_cid[cid]
        conn.cids.clear()
        self.connections.discard(conn)
        conn.closed = True
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None
        self._leave_unproven(conn)

    def mark(self, conn: Connection) -> None:
        """Note that `conn` has something to send; flush soon, once, for everything marked."""
        self._dirty[conn] = None
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def flush(self) -> None:
        """Send now what the marked connections have to send (a role closing)."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        # handlers may mark other connections (a relay forwards): loop until nothing is left
        for _ in range(64):
            if not self._dirty:
                break
            dirty = list(self._dirty)
            self._dirty.clear()
            for conn in dirty:
                self._process(conn)
            for conn in dirty:
                if conn in self._dirty:
                    continue  # processing another connection marked it again; the next round sends
                self._transmit(conn)
        for conn in list(self._dirty):  # bounded rounds: transmit what is left
            self._dirty.pop(conn, None)
            self._transmit(conn)

    def _process(self, conn: Connection) -> None:
        quic = conn.quic
        handler = conn.handler
        while (ev := quic.next_event()) is not None:
            try:
                self._dispatch(conn, handler, ev)
            except Exception:
                log.exception("handler failed on %s", type(ev).__name__)
        if conn.established and not conn.closed:
            peer = quic.get_peer_address()
            if peer is not None:
                addr = normalize_addr(peer)
                if addr != conn.peer_addr:
                    conn.peer_addr = addr
                    with contextlib.suppress(Exception):
                        handler.on_peer_address_changed(conn, addr)

    def _dispatch(self, conn: Connection, handler: Handler, ev: events.QuicEvent) -> None:
        if isinstance(ev, events.DatagramFrameReceived):
            handler.on_datagram(conn, ev.data)
        elif isinstance(ev, events.StreamDataReceived):
            if conn.control_stream is None and not conn.is_client and ev.stream_id % 4 == 0:
                conn.control_stream = ev.stream_id
            if ev.stream_id != conn.control_stream:
                return  # qlab/1 uses one control stream; ignore others
            try:
                msgs = conn.framer.feed(ev.data)
            except wire.WireError as exc:
                log.info("closing %s: malformed control stream: %s", conn, exc)
                conn.close(error_code=wire.CLOSE_MALFORMED, reason=f"malformed control message: {exc}")
                return
            for msg in msgs:
                handler.on_control(conn, msg)
        elif isinstance(ev, events.ConnectionIdIssued):
            self._add_cid(conn, ev.connection_id)
        elif isinstance(ev, events.ConnectionIdRetired):
            self.by_cid.pop(ev.connection_id, None)
            conn.cids.discard(ev.connection_id)
        elif isinstance(ev, events.HandshakeCompleted):
            conn.established = True
            if conn.half_open:
                self._handshake_done(conn)
            peer = conn.quic.get_peer_address()
            if peer is not None:
                conn.peer_addr = normalize_addr(peer)
            if not conn.handshake_done.done():
                conn.handshake_done.set_result(True)
            handler.on_handshake(conn)
        elif isinstance(ev, events.ConnectionTerminated):
            self._terminated(conn, ev.reason_phrase or f"error 0x{ev.error_code:x}")

    def _terminated(self, conn: Connection, reason: str) -> None:
        if conn.closed:
            return
        conn.close_reason = reason
        self._forget(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if not conn.handshake_done.done():
            conn.handshake_done.set_exception(ConnectionError(f"handshake failed: {reason}"))
            conn.handshake_done.exception()  # mark retrieved: a failed dial is reported by the caller
        with contextlib.suppress(Exception):
            conn.handler.on_closed(conn, reason)

    def _transmit(self, conn: Connection) -> None:
        if conn.closed or self.sock is None:
            return
        loop = self._loop
        assert loop is not None
        if not conn.close_noted:
            self._note_close(conn)
        sendto = self.sock.sendto
        tunnels, tunnel_host = self.tunnels, wire.TUNNEL_HOST
        n = 0
        for data, addr in conn.quic.datagrams_to_send(now=loop.time()):
            if addr[0] == tunnel_host:  # never to the socket, also once the tunnel is closed
                send = tunnels.get(addr)
                if send is None:
                    continue
                send(data)
            else:
                sendto(data, addr)
            n += 1
        self.stats["tx"] += n
        at = conn.quic.get_timer()
        if at is not None and at <= loop.time():
            # aioquic can leave a loss timer at exactly `now` (float rounding in its loss check): a
            # real clock creeps past it, a virtual one would spin. Re-arm a microsecond later.
            at = loop.time() + 1e-6
        if at != conn.timer_at:
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None
            conn.timer_at = at
            if at is not None:
                conn.timer = loop.call_at(at, self._on_timer, conn)
        if qi.is_terminated(conn.quic):
            self._process(conn)  # deliver ConnectionTerminated
            self._terminated(conn, conn.close_reason or "terminated")

    def _note_close(self, conn: Connection) -> None:
        """Count a connection aioquic is closing for a peer's flow-control or stream violation."""
        code = qi.local_close_code(conn.quic)
        if code is None:
            return
        conn.close_noted = True
        cause = VIOLATIONS.get(code)
        if cause is not None:
            self.closed_for_cause[cause] += 1
            log.info("closing %s: %s (transport error 0x%x)", conn, cause, code)

    def abandon(self, conn: Connection, reason: str, error_code: int = 0) -> None:
        """Give a connection up now (peer unresponsive): send CONNECTION_CLOSE once and forget it,
        without waiting out the closing period."""
        conn.close(error_code=error_code, reason=reason)
        self._process(conn)
        self._transmit(conn)
        self._terminated(conn, reason)

    def _on_timer(self, conn: Connection) -> None:
        conn.timer = None
        conn.timer_at = None
        assert self._loop is not None
        conn.quic.handle_timer(now=self._loop.time())
        self._process(conn)
        self._transmit(conn)

    def crash(self) -> None:
        """Vanish like a killed process: no CONNECTION_CLOSE, timers stopped, socket closed."""
        for conn in list(self.connections):
            if conn.timer is not None:
                conn.timer.cancel()
            self._forget(conn)
        self.connections.clear()
        self.by_cid.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        """Close every connection (CONNECTION_CLOSE is sent) and the socket."""
        for conn in list(self.connections):
            conn.close(reason="endpoint closing")
            self._process(conn)
            self._transmit(conn)
            self._terminated(conn, "endpoint closed")
        if self.sock is not None:
            self.sock.close()
            self.sock = None
