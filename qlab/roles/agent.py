"""The Agent: the user's endpoint. Relay first, from the first moment; direct when proven.

ONE socket carries everything: the connection to the Intermediate (QAD, signaling, relay), the
punch probes, and the direct QUIC connection to the Connector. An `AgentSession` sends application
payloads over its active path; the traversal layer (`qlab.traversal`) upgrades it to direct.

A session runs in one of two modes (`wire.SessionMode`). `terminated`: relayed payloads ride the
Agent's connection to the Intermediate, which opens them; the direct path is a second QUIC
connection. `sealed`: one QUIC connection to the Connector from the start (`sealed`), its packets
relayed as opaque frames until it migrates to the punched path; its active path is the session's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import Credentials
from qlab.endpoint import SEALED_DATAGRAM_SIZE, Connection, DatagramTooLarge, Endpoint, Handler
from qlab.net import Addr, Net
from qlab.roles.echo import EchoProbe
from qlab.roles.events import ControlReceived, EventHandler, LinkUp, Observers, PayloadReceived, RawReceived
from qlab.roles.link import IntermediateLink, Refused
from qlab.roles.tasks import Tasks
from qlab.wire import Path

log = logging.getLogger("qlab.roles.agent")

EARLY_DATAGRAMS = 16  # direct datagrams held until the Connector's DirectAccept (same flight)
# a sealed connection's ping, whatever its path: a session quiet on the relay must outlive QUIC's
# idle timeout (30 s); on the direct path the traversal's keepalive pings far more often
SEALED_KEEPALIVE = 10.0


# -- events (see qlab.roles.events) --------------------------------------------------------------
@dataclass(frozen=True)
class DirectHandshake:
    """A connection of `session` to the Connector can carry datagrams on `path`: the direct
    connection finished its handshake and its DirectHello is queued (datagrams sent now ride the
    same flight; the Connector holds them until the hello is verified), or a sealed session's
    connection did so through the relay (`path` relay) or moved to the punched path (direct)."""

    session: AgentSession
    conn: Connection
    path: Path = Path.DIRECT


@dataclass(frozen=True)
class DirectLost:
    """The direct connection of `session` closed; its traffic is back on the relay."""

    session: AgentSession
    reason: str


@dataclass(frozen=True)
class SealedLost:
    """A sealed session's connection closed (an idle timeout, a Connector that restarted): the
    session has no path until a new one is dialled."""

    session: AgentSession
    reason: str


@dataclass(frozen=True)
class SessionReopened:
    """An interrupted session is open again: a Connector is back."""

    session: AgentSession


@dataclass(frozen=True)
class SessionEnded:
    """The session is closed for good; whatever was kept for it can go."""

    session: AgentSession
    reason: str


AgentEvent = (ControlReceived | RawReceived | LinkUp | DirectHandshake | DirectLost | SealedLost | SessionReopened
              | SessionEnded)


class AgentSession:
    """One session to a service. Usable on the relay at once: the Agent proposes the session id,
    so application datagrams may follow the OpenSession in the same flight."""

    def __init__(self, agent: Agent, session_id: int, service: str,
                 mode: wire.SessionMode = wire.SessionMode.TERMINATED) -> None:
        self.agent = agent
        self.id = session_id
        self.service = service
        self.mode = mode
        self.tunnel = wire.relay_tunnel(session_id)
        # sealed mode: the end-to-end connection (once its DirectHello is queued), and the punched
        # address it moves to; `direct` is that connection while a direct path is known
        self.sealed: Connection | None = None
        self.direct_addr: Addr | None = None
        # its relayed packets as raw frames once the key is known (False: always as DATAGRAM frames
        # of the control connection, whose outer layer the Intermediate still decrypts)
        self.sealed_raw = True
        self.key: bytes | None = None
        self.connector: str | None = None
        self.relay_max_payload = agent.link.max_relay_payload
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.direct: Connection | None = None
        self._active = Path.RELAY
        self.payloads: Observers[PayloadReceived] = Observers()
        self.counters = {"relay_out": 0, "relay_in": 0, "direct_out": 0, "direct_in": 0}
        self.bytes = {"relay_out": 0, "relay_in": 0, "direct_out": 0, "direct_in": 0}
        self.closed: str | None = None
        self.last_direct_rx = 0.0  # loop time anything last came back over the direct path
        self.reopened = 0
        self.interrupted: str | None = None  # the Connector left; being re-opened
        self.error: str | None = None  # the last SessionError about it (the Connector refused a resource)

    def _opened(self, msg: wire.SessionOpened) -> None:
        self.key = msg.key
        self.connector = msg.connector
        self.relay_max_payload = msg.max_payload

    @property
    def is_open(self) -> bool:
        """Whether the Intermediate answered SessionOpened (and the session was not refused)."""
        return self.opened.done() and not self.opened.cancelled() and self.opened.exception() is None

    async def wait_open(self, timeout: float = 5.0) -> AgentSession:
        await asyncio.wait_for(asyncio.shield(self.opened), timeout)
        return self

    @property
    def active_path(self) -> Path:
        """The path traffic takes now: chosen in terminated mode, the sealed connection's in sealed mode."""
        if self.mode == wire.SessionMode.SEALED:
            conn = self.sealed
            return Path.RELAY if conn is None or conn.quic.get_peer_address() == self.tunnel else Path.DIRECT
        return self._active

    def use(self, path: Path) -> None:
        """Carry traffic on `path` from now on. Sealed mode migrates the connection (RFC 9000
        section 9): to the relay, or to the punched address (`direct_addr`); no handshake."""
        if self.mode != wire.SessionMode.SEALED:
            self._active = path
            return
        conn = self.sealed
        addr = self.tunnel if path == Path.RELAY else self.direct_addr
        if conn is None or conn.closed or addr is None or path == self.active_path:
            return
        qi.migrate(conn.quic, addr)
        conn.endpoint.mark(conn)

    def _carrier(self, path: Path) -> Connection | None:
        if self.mode == wire.SessionMode.SEALED:
            return self.sealed if self.active_path == path else None
        return self.direct if path == Path.DIRECT else self.agent.link.conn

    def limit(self, path: Path) -> int | None:
        """Largest application payload `path` carries now, or None while that path is down."""
        if self.mode == wire.SessionMode.SEALED:
            c = self._carrier(path)
            return c.max_app_payload if c is not None and not c.closed and c.established else None
        if path == Path.DIRECT:
            d = self.direct
            return d.max_app_payload if d is not None and not d.closed and d.established else None
        conn = self.agent.link.conn
        if conn is None or conn.closed or not conn.established:
            return None
        return min(self.relay_max_payload, conn.max_app_payload)

    @property
    def max_payload(self) -> int:
        """Largest application payload every path that is up carries (0 when none is)."""
        limits = [x for x in (self.limit(Path.RELAY), self.limit(Path.DIRECT)) if x is not None]
        return min(limits) if limits else 0

    def send(self, payload: bytes, path: Path | None = None) -> Path | None:
        """Send one application payload over `path` (default: the active one). Returns the path
        used, or None when that path is down or its queue is full. Raises DatagramTooLarge for a
        payload larger than the path carries."""
        path = path or self.active_path
        limit = self.limit(path)
        if limit is None:
            return None
        if len(payload) > limit:
            raise DatagramTooLarge(f"payload of {len(payload)} bytes exceeds the session limit of {limit}")
        data = wire.encode_app(self.id, payload)
        conn = self._carrier(path)
        if conn is None or not conn.send_datagram(data):
            return None
        self.counters[f"{path}_out"] += 1
        self.bytes[f"{path}_out"] += len(payload)
        return path

    def on_direct_pong(self, nonce: int) -> None:
        self.last_direct_rx = asyncio.get_running_loop().time()

    def on_direct_lost(self, reason: str) -> None:
        """The direct connection is gone: traffic goes to the relay (observers are told)."""
        self.use(Path.RELAY)
        self.agent.events.emit(DirectLost(self, reason))

    def send_sealed(self, packet: bytes) -> None:
        """A packet of the sealed connection bound for the relay path: a raw frame to the
        Intermediate once the key is known (its tag proves the session), else a DATAGRAM frame of
        the control connection (the first flight rides with OpenSession)."""
        self.agent.link.send_sealed(self.id, packet, self.key if self.sealed_raw else None)

    def deliver(self, payload: bytes, path: Path) -> None:
        self.counters[f"{path}_in"] += 1
        self.bytes[f"{path}_in"] += len(payload)
        if path == Path.DIRECT:
            self.last_direct_rx = asyncio.get_running_loop().time()
        self.payloads.emit(PayloadReceived(payload, path))

    def subscribe(self, handler: Callable[[PayloadReceived], object]) -> Callable[[], None]:
        """Receive this session's application payloads; returns the call that unsubscribes."""
        return self.payloads.subscribe(handler)


class Agent:
    def __init__(
        self,
        net: Net,
        creds: Credentials,
        intermediate: Addr,
        *,
        name: str = "agent",
        host: str = "0.0.0.0",
        port: int = 0,
        expect_connector: str | None = None,
    ) -> None:
        self.net = net
        self.creds = creds
        self.name = name
        # pin: sessions served by any other Connector identity are refused and closed
        self.expect_connector = expect_connector
        self.host = host
        self.port = port
        self.sessions: dict[int, AgentSession] = {}
        self.events: Observers[AgentEvent] = Observers()
        self.endpoint = Endpoint(net, raw_handler=self._on_raw)
        self.link = IntermediateLink(
            self.endpoint, intermediate, creds, wire.Role.AGENT, name,
            owner=self,
        )
        self.tasks = Tasks()
        # the offer a re-opened session carries (the traversal layer sets it once it knows the NAT)
        self.reopen_offer: tuple[wire.NatKind, tuple[wire.Candidate, ...]] = (wire.NatKind.UNKNOWN, ())
        self.reopen_after_peer_loss = True

    def subscribe(self, handler: EventHandler[AgentEvent]) -> Callable[[], None]:
        """Observe this Agent's events (`AgentEvent`); returns the call that unsubscribes."""
        return self.events.subscribe(handler)

    def link_reply(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.SessionOpened) and msg.session in self.sessions and self._pinned_refusal(msg) is None:
            self.sessions[msg.session]._opened(msg)

    def _pinned_refusal(self, msg: wire.SessionOpened) -> Refused | None:
        """When the session is served by another Connector than the pinned one: close it at the
        Intermediate (its key is never used) and say why."""
        if self.expect_connector is None or msg.connector == self.expect_connector:
            return None
        reason = f"served by connector {msg.connector!r}, not the expected {self.expect_connector!r}"
        self.link.send(wire.SessionClosed(msg.session, wire.NackCode.NOT_ALLOWED, "unexpected connector"))
        log.error("session %08x refused: %s", msg.session, reason)
        return Refused(wire.NackCode.NOT_ALLOWED, reason)

    async def start(self, timeout: float = 5.0) -> Addr:
        """Bind the one socket and connect to the Intermediate (raises Refused on a bad secret)."""
        addr = await self.endpoint.bind(self.host, self.port)
        await self.link.connect(timeout)
        self.tasks.spawn(self._stay_connected())
        self.tasks.spawn(self._keep_sessions_alive())
        return addr

    async def _keep_sessions_alive(self) -> None:
        """Tell the Intermediate which sessions are in use, so its idle expiry spares a session
        whose traffic runs on the direct path."""
        while True:
            await asyncio.sleep(wire.SESSION_ALIVE_INTERVAL)
            for s in list(self.sessions.values()):
                if s.is_open:
                    self.link.send(wire.SessionAlive(s.id))

    async def _stay_connected(self) -> None:
        """After a loss of the Intermediate: reconnect with backoff, then re-open every session
        (same ids; a direct path carries on meanwhile)."""
        try:
            await self.link.run_forever(connected=True)
        except Refused as exc:
            log.error("the Intermediate refused this agent on reconnect: %s", exc)

    def link_up(self) -> None:
        for s in list(self.sessions.values()):
            if s.is_open:
                self.tasks.spawn(self._reopen(s))
        self.events.emit(LinkUp())

    async def _reopen_until_back(self, s: AgentSession, give_up_after: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + give_up_after
        delay = 0.25
        while s.interrupted and loop.time() < end:
            await asyncio.sleep(delay)
            if await self._reopen(s):
                s.interrupted = None
                self.events.emit(SessionReopened(s))
                return
            delay = min(delay * 2, 5.0)
        if s.interrupted:
            s.closed = s.interrupted
            self.sessions.pop(s.id, None)
            self.events.emit(SessionEnded(s, s.closed))

    async def _reopen(self, s: AgentSession) -> bool:
        msg = wire.OpenSession(self.link.next_req(), s.id, s.service, *self.reopen_offer)
        try:
            reply = await self.link.request(msg)
        except (Refused, ConnectionError, TimeoutError) as exc:
            log.info("session %08x could not be re-opened yet: %s", s.id, exc)
            return False
        if isinstance(reply, wire.SessionOpened):
            if self._pinned_refusal(reply) is not None:
                return False
            s._opened(reply)
            s.reopened += 1
            log.info("session %08x re-opened", s.id)
            return True
        return False

    def begin_session(
        self, service: str, nat: wire.NatKind = wire.NatKind.UNKNOWN, candidates: tuple[wire.Candidate, ...] = (),
        mode: wire.SessionMode = wire.SessionMode.TERMINATED,
    ) -> AgentSession:
        """Open a session without waiting: relay sends work immediately (sealed mode: once its
        connection is up, see `connect_sealed`); `session.opened` completes (or fails with
        Refused) when the Intermediate answers."""
        sid = 0
        while sid == 0 or sid in self.sessions:
            sid = secrets.randbits(32)
        s = AgentSession(self, sid, service, mode)
        self.sessions[sid] = s
        msg = wire.OpenSession(self.link.next_req(), sid, service, nat, candidates)

        async def wait_reply() -> None:
            try:
                # no timer of its own: under loss the reply can take seconds, and the id cannot be
                # asked for twice (the Intermediate refuses a taken one); a lost link fails it
                reply = await self.link.request(msg, timeout=None)
                assert isinstance(reply, wire.SessionOpened)
                refused = self._pinned_refusal(reply)
                if refused is not None:
                    raise refused
            except BaseException as exc:
                self.sessions.pop(sid, None)
                s.closed = str(exc)
                self.events.emit(SessionEnded(s, s.closed))
                if not s.opened.done():
                    s.opened.set_exception(exc)
                    s.opened.exception()
                return
            s._opened(reply)
            if not s.opened.done():
                s.opened.set_result(s)

        self.tasks.spawn(wait_reply())
        return s

    async def open_session(self, service: str, timeout: float = 5.0, **offer) -> AgentSession:
        s = self.begin_session(service, **offer)
        try:
            return await s.wait_open(timeout)
        except BaseException:
            self.sessions.pop(s.id, None)
            raise

    async def connect_direct(
        self, session: AgentSession, addr: Addr, timeout: float = 3.0, endpoint: Endpoint | None = None,
    ) -> Connection:
        """Open the direct QUIC connection to the Connector at `addr` from the shared socket and
        prove the session key; the session's `direct` path is set once the Connector accepts.
        `DirectHandshake` is emitted right after the DirectHello is queued."""
        return await self._dial(session, addr, timeout, endpoint or self.endpoint, sealed=False)

    async def connect_sealed(self, session: AgentSession, timeout: float = 5.0) -> Connection:
        """Open a sealed session's end-to-end connection to the Connector through the relay: the
        same TLS (the qlab CA, the Connector's certificate) and session-key proof as a direct
        connection, its packets relayed as sealed frames (the Intermediate holds none of its keys)."""
        self.endpoint.open_tunnel(session.tunnel, session.send_sealed)
        conn = await self._dial(session, session.tunnel, timeout, self.endpoint, sealed=True)
        self.tasks.spawn(self._keep_sealed_alive(session, conn))
        return conn

    async def _keep_sealed_alive(self, session: AgentSession, conn: Connection) -> None:
        nonce = 0
        while not conn.closed and session.sealed is conn:
            await asyncio.sleep(SEALED_KEEPALIVE)
            nonce = (nonce + 1) & 0xFFFFFFFF
            conn.send_control(wire.Ping(nonce))

    def migrate_sealed(self, session: AgentSession, addr: Addr) -> Connection | None:
        """Move a sealed session's connection to the punched `addr` (the punch's probes, which
        carry the session key, validated the pair). None while the connection is not up."""
        conn = session.sealed
        if conn is None or conn.closed:
            return None
        session.direct_addr = addr
        session.direct = conn
        session.use(Path.DIRECT)
        conn.send_datagram(wire.padding(conn.max_datagram_payload))
        self.events.emit(DirectHandshake(session, conn, Path.DIRECT))
        return conn

    async def _dial(self, session: AgentSession, addr: Addr, timeout: float, ep: Endpoint, *, sealed: bool) -> Connection:
        from qlab.certs import CONNECTOR_NAME

        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        handler = _DirectClient(session, accepted)
        config = self.creds.client_config(CONNECTOR_NAME)
        if sealed:
            config.max_datagram_size = SEALED_DATAGRAM_SIZE  # a packet rides in one relayed frame
        conn = ep.connect(addr, config, handler)
        try:
            async with asyncio.timeout(timeout):
                await conn.handshake_done
                if sealed:  # dialled in the OpenSession's flight: the key proves the session
                    await asyncio.shield(session.opened)
                assert session.key is not None, "the session is not open yet"
                conn.send_control(wire.DirectHello(session.id, wire.direct_auth(session.key, session.id)))
                if sealed:
                    session.sealed = conn
                else:
                    session.direct = conn
                self.events.emit(DirectHandshake(session, conn, Path.RELAY if sealed else Path.DIRECT))
                await accepted
        except BaseException:
            if session.direct is conn:
                session.direct = None
            if session.sealed is conn:
                session.sealed = None
            ep.abandon(conn, "direct connection attempt failed")
            raise
        return conn

    def close(self) -> None:
        self.tasks.cancel_all()
        for s in self.sessions.values():
            for conn in {s.direct, s.sealed} - {None}:
                assert conn is not None
                conn.close(reason="agent closing")
        self.endpoint.flush()  # their CONNECTION_CLOSE leaves before the link's (a sealed one through the relay)
        self.link.close()
        self.endpoint.close()

    def link_datagram(self, data: bytes) -> None:
        if data[:1] == bytes([wire.DGRAM_SEALED]):
            sid, packet = wire.decode_sealed(data)
            if sid in self.sessions:
                self.endpoint.tunnel_receive(packet, wire.relay_tunnel(sid))
            return
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        s = self.sessions.get(sid)
        if s is not None:
            s.deliver(payload, Path.RELAY)

    def link_message(self, msg: wire.Message) -> None:
        if self.events.offer(ControlReceived(msg)):
            return
        if isinstance(msg, wire.SessionClosed):
            s = self.sessions.get(msg.session)
            if s is None:
                return
            reason = f"{msg.code.name.lower()}: {msg.reason}"
            if msg.code == wire.NackCode.PEER_GONE and self.reopen_after_peer_loss:
                # the Connector went away (a restart, say): keep the session and re-open it when one is back
                s.interrupted = reason
                log.warning("session %08x interrupted (%s); re-opening when a connector is back", s.id, reason)
                self.tasks.spawn(self._reopen_until_back(s))
                return
            self.sessions.pop(msg.session, None)
            s.closed = reason
            log.warning("session %08x closed: %s", s.id, s.closed)
            self.events.emit(SessionEnded(s, reason))
        elif isinstance(msg, wire.SessionError):
            log.warning("session %08x error: %s %s", msg.session, msg.code.name, msg.message)
            if (s := self.sessions.get(msg.session)) is not None:
                s.error = f"{msg.code.name.lower()}: {msg.message}"

    def _on_raw(self, data: bytes, addr: Addr) -> None:
        sealed = self.link.sealed_from(data, addr)
        if sealed is None:
            self.events.offer(RawReceived(data, addr))
        elif sealed[0] in self.sessions:
            self.endpoint.tunnel_receive(sealed[1], wire.relay_tunnel(sealed[0]))


class _DirectClient(Handler):
    """The Agent's side of a direct connection: waits for the Connector's Ack, then carries the
    session's application datagrams."""

    def __init__(self, session: AgentSession, accepted: asyncio.Future) -> None:
        self.session = session
        self.accepted = accepted
        self.early: list[bytes] = []

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.DirectAccept) and not self.accepted.done():
            if self._proven(msg):
                self.accepted.set_result(True)
                early, self.early = self.early, []
                for data in early:  # DATAGRAM frames precede stream frames in a packet
                    self.on_datagram(conn, data)
            else:
                self.early.clear()
                self.accepted.set_exception(ConnectionRefusedError("the direct peer is not the session's connector"))
                conn.close(wire.CLOSE_UNAUTHENTICATED, "unauthenticated connector")
        elif isinstance(msg, wire.Nack) and not self.accepted.done():
            self.accepted.set_exception(ConnectionRefusedError(f"connector refused the direct path: {msg.reason}"))
        elif isinstance(msg, wire.Ping):
            conn.send_control(wire.Pong(msg.nonce))
        elif isinstance(msg, wire.Pong):
            self.session.on_direct_pong(msg.nonce)

    def _proven(self, msg: wire.DirectAccept) -> bool:
        """The peer holds the session key and is the Connector the Intermediate named (and the
        Agent pinned, if it did)."""
        s = self.session
        if s.key is None or msg.session != s.id or msg.connector != s.connector:
            return False
        return hmac.compare_digest(msg.auth, wire.direct_accept_auth(s.key, s.id, msg.connector))

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        if not self.accepted.done():
            if len(self.early) < EARLY_DATAGRAMS:  # held until the peer proves it is the session's connector
                self.early.append(data)
            return
        if self.accepted.exception() is not None:
            return
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        if sid == self.session.id:
            self.session.deliver(payload, Path.RELAY if conn.rx_addr == self.session.tunnel else Path.DIRECT)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(ConnectionError(f"direct connection closed: {reason}"))
            self.accepted.exception()
        sealed = self.session.sealed is conn
        if sealed:
            self.session.sealed = None
            conn.endpoint.close_tunnel(self.session.tunnel)
        if self.session.direct is conn:
            self.session.direct = None
            self.session.on_direct_lost(reason)
        if sealed:
            self.session.agent.events.emit(SealedLost(self.session, reason))


async def ping(
    session: AgentSession, count: int, *, interval: float = 0.02, size: int = 64, sizes: list[int] | None = None,
    wait: float = 2.0, probe: EchoProbe | None = None,
) -> dict:
    """Send `count` echo probes over the active path (or one per entry of `sizes`), wait up to
    `wait` seconds for stragglers, and summarise: RTT p50/p95, loss, bytes, integrity. Pass a
    `probe` to read its samples afterwards."""
    loop = asyncio.get_running_loop()
    probe = probe or EchoProbe(loop.time, size=max(size, 16))
    unsubscribe = session.subscribe(lambda e: probe.receive(e.payload, e.path))
    plan = sizes if sizes is not None else [size] * count
    errors: list[str] = []
    for sz in plan:
        payload = probe.make(session.active_path, sz)
        try:
            if session.send(payload) is None:
                probe.unsend(payload)
                errors.append(f"size {sz}: not sent")
        except DatagramTooLarge as exc:
            probe.unsend(payload)
            errors.append(str(exc))
        await asyncio.sleep(interval)
    await probe.wait_for_replies(wait)
    unsubscribe()
    out = probe.summary()
    out.update(session=f"{session.id:08x}", max_payload=session.max_payload, errors=errors[:10])
    return out
