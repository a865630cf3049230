"""One UDP socket, many aioquic connections in client and server role, plus raw probes.

Hole punching only works if the punch probes and the direct QUIC connection leave from the very
socket whose NAT mapping the Intermediate observed. So each role owns ONE `Endpoint`: it routes
incoming QUIC packets to `QuicConnection`s by destination connection ID (which survives CID rotation
and NAT rebinding), creates server-role connections for new Initials when it has a server
configuration, and hands every datagram whose QUIC fixed bit is clear to a raw handler (the probes).

Receiving and sending are batched: a burst of datagrams is fed to the connections first, then each
connection that has something to send transmits once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicPacketType, pull_quic_header

from qlab import quic_internals as qi
from qlab import wire
from qlab.net import Addr, DatagramSocket, Net, normalize_addr

log = logging.getLogger("qlab.endpoint")

CID_LENGTH = 8  # every connection on a socket shares it: short headers carry no CID length
MAX_DATAGRAM_SIZE = 1350  # UDP payload of QUIC packets; fits any path with a 1400+ MTU
DATAGRAM_OVERHEAD = 40  # short header, packet number, AEAD tag and DATAGRAM frame header, with margin
MAX_PENDING_DATAGRAMS = 1024  # per connection: aioquic's queue is unbounded, ours is not
MAX_HALF_OPEN = 1024  # server connections still in their handshake, per socket


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
    for a short time, and replays them when the session appears; the rest are dropped.
    """

    def __init__(self, limit: int = 32, max_age: float = 2.0) -> None:
        self.limit = limit
        self.max_age = max_age
        self.items: list[tuple[float, int, bytes]] = []

    def hold(self, now: float, key: int, data: bytes) -> bool:
        self.items = [i for i in self.items if now - i[0] <= self.max_age]
        if len(self.items) >= self.limit:
            return False
        self.items.append((now, key, data))
        return True

    def take(self, now: float, key: int) -> list[bytes]:
        out = [d for t, k, d in self.items if k == key and now - t <= self.max_age]
        self.items = [i for i in self.items if i[1] != key and now - i[0] <= self.max_age]
        return out


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
        self.handshake_done = asyncio.get_running_loop().create_future()

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
        return f"<Connection {role} peer={self.peer_addr} established={self.established}>"


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
                      "dropped_half_open_cap": 0, "dropped_first_initial": 0}
        self.max_half_open = MAX_HALF_OPEN

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
        quic = QuicConnection(configuration=config)
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
        fresh = False
        for data, addr in batch:
            self.stats["rx"] += 1
            first = data[0] if data else 0
            is_vn = len(data) >= 5 and first & 0x80 and data[1:5] == b"\0\0\0\0"
            if not data or (wire.is_raw(first) and not is_vn):
                self.stats["raw_rx"] += 1
                if data:
                    self._raw(data, addr)
                continue
            if not first & 0x80:  # short header: the DCID is the next CID_LENGTH bytes (hot path)
                conn = self.by_cid.get(data[1 : 1 + CID_LENGTH])
            else:
                try:
                    header = pull_quic_header(Buffer(data=data), host_cid_length=CID_LENGTH)
                except ValueError:
                    self.stats["dropped_malformed"] += 1
                    continue
                conn = self.by_cid.get(header.destination_cid)
                if (
                    conn is None
                    and self.server_config is not None
                    and header.packet_type == QuicPacketType.INITIAL
                    and len(data) >= 1200
                    and len(header.destination_cid) >= 8
                ):
                    if self._half_open() >= self.max_half_open:
                        self.stats["dropped_half_open_cap"] += 1
                        continue
                    conn = self._accept(header.destination_cid, addr)
                    fresh = True
            if conn is None:
                self.stats["dropped_unknown"] += 1
                continue
            try:
                conn.quic.receive_datagram(data, addr, now=now)
            except Exception:  # aioquic should not raise here; never let one peer break the rest
                log.exception("receive_datagram failed")
                self.stats["dropped_malformed"] += 1
                continue
            if fresh:
                fresh = False
                if _closing(conn.quic):
                    # The first Initial we see of this connection made aioquic close it: answering
                    # would kill a handshake that loss merely reordered. Forget it silently (see
                    # `_closing`); the client's CRYPTO retransmission opens the connection normally.
                    self._forget(conn)
                    self.stats["dropped_first_initial"] += 1
                    continue
                if not qi.decrypted_any(conn.quic):
                    # a junk Initial: keep no state for it (no memory for floods of them)
                    self._forget(conn)
                    self.stats["dropped_malformed"] += 1
                    continue
            self._dirty[conn] = None
        self._flush()

    def _accept(self, original_dcid: bytes, addr: Addr) -> Connection:
        assert self.server_config is not None and self.server_handler is not None
        quic = QuicConnection(configuration=self.server_config, original_destination_connection_id=original_dcid)
        conn = Connection(self, quic, False, Handler())
        conn.peer_addr = addr
        conn.handler = self.server_handler(conn)
        self._add_cid(conn, original_dcid)
        self._add_cid(conn, quic.host_cid)
        self.connections.add(conn)
        return conn

    def _half_open(self) -> int:
        return sum(1 for c in self.connections if not c.is_client and not c.established)

    def _forget(self, conn: Connection) -> None:
        for cid in conn.cids:
            if self.by_cid.get(cid) is conn:
                del self.by_cid[cid]
        conn.cids.clear()
        self.connections.discard(conn)
        conn.closed = True

    def mark(self, conn: Connection) -> None:
        """Note that `conn` has something to send; flush soon, once, for everything marked."""
        self._dirty[conn] = None
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

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
        conn.closed = True
        conn.close_reason = reason
        for cid in conn.cids:
            if self.by_cid.get(cid) is conn:
                del self.by_cid[cid]
        conn.cids.clear()
        self.connections.discard(conn)
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
        sendto = self.sock.sendto
        n = 0
        for data, addr in conn.quic.datagrams_to_send(now=loop.time()):
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

    def abandon(self, conn: Connection, reason: str) -> None:
        """Give a connection up now (peer unresponsive): send CONNECTION_CLOSE once and forget it,
        without waiting out the closing period."""
        conn.close(reason=reason)
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
            conn.closed = True
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
