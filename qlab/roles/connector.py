"""The App Connector: fronts a private application and accepts direct P2P QUIC on the same socket.

ONE socket carries the client connection to the Intermediate (whose NAT mapping QAD reports), the
punch probes, and the server-role P2P connections from Agents. Per session and per path it keeps one
UDP socket towards the application, so a reply from the app goes back over the path its request
came on: the relay or the direct connection (the seed system sent every reply through the relay).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass, field

from qlab import wire
from qlab.certs import Credentials
from qlab.endpoint import Connection, DatagramTooLarge, Endpoint, Handler, HeldDatagrams
from qlab.net import Addr, DatagramSocket, Net
from qlab.roles.events import ControlReceived, EventHandler, LinkUp, Observers, RawReceived
from qlab.roles.link import IntermediateLink, Refused
from qlab.roles.metrics import Metrics, watch_endpoints
from qlab.roles.tasks import Tasks
from qlab.wire import Path

log = logging.getLogger("qlab.roles.connector")


@dataclass
class ConnectorSession:
    id: int
    key: bytes
    agent: str
    service: str
    max_payload: int
    direct: Connection | None = None
    sealed: Connection | None = None  # sealed mode: the Agent's end-to-end connection (relay, then direct)
    sealed_raw: bool = False  # its relayed packets come as raw frames: answer the same way

    @property
    def sealed_path(self) -> Path | None:
        """Where the sealed connection sends now (None without one)."""
        if self.sealed is None:
            return None
        return Path.RELAY if self.sealed.quic.get_peer_address() == wire.relay_tunnel(self.id) else Path.DIRECT
    app_socks: dict[Path, DatagramSocket] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {"relay_in": 0, "relay_out": 0, "direct_in": 0, "direct_out": 0})
    agent_nat: wire.NatKind = wire.NatKind.UNKNOWN
    agent_candidates: tuple[wire.Candidate, ...] = ()
    app_used: dict[Path, float] = field(default_factory=dict)  # when each app socket last carried a datagram
    app_opening: dict[Path, list[bytes]] = field(default_factory=dict)  # payloads waiting for their socket
    refused: bool = False  # the Agent was told this session has no app socket (told once until one opens)
    closed: bool = False
    orphaned_at: float | None = None  # the link to the Intermediate was lost since SessionNew


APP_PENDING = 64  # payloads kept per path while its app socket opens (a loop iteration on real sockets)
SAME_PASS_DATAGRAMS = 2  # datagrams of an unproven direct connection kept until its packets are processed


def app_socket_limit() -> int:
    """Half the process's open-file limit: the other half stays for the QUIC socket, the direct
    connections' birthday pools and whatever else the process opens."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 65536:
        soft = 65536
    return max(8, soft // 2)


# -- events (see qlab.roles.events) --------------------------------------------------------------
@dataclass(frozen=True)
class SessionStarted:
    """The Intermediate announced a new session (a re-opened one keeps its `ConnectorSession`)."""

    session: ConnectorSession


@dataclass(frozen=True)
class SessionEnded:
    """The session is closed; whatever was kept for it can go."""

    session: ConnectorSession
    reason: str


ConnectorEvent = ControlReceived | RawReceived | LinkUp | SessionStarted | SessionEnded


class Connector:
    def __init__(
        self,
        net: Net,
        creds: Credentials,
        intermediate: Addr,
        *,
        service: str,
        forward: Addr,
        name: str = "connector",
        host: str = "0.0.0.0",
        p2p_port: int = 4434,
        max_sessions: int = 4096,
        max_app_sockets: int | None = None,
        app_idle: float = 60.0,
        reopen_grace: float = 90.0,
    ) -> None:
        self.net = net
        self.creds = creds
        self.service = service
        self.forward = forward
        self.name = name
        self.host = host
        self.p2p_port = p2p_port
        self.max_sessions = max_sessions  # more are refused (SessionError, then SessionClosed)
        # one app socket per session and path: more are refused with a SessionError (default: half the fd limit)
        self.max_app_sockets = app_socket_limit() if max_app_sockets is None else max_app_sockets
        self.app_idle = app_idle  # an app socket that carried nothing this long is closed
        # after a reconnection, a session its Agent has not re-opened this long is released (the
        # Agent gives up re-opening after 60 s; a SessionClosed sent while we were away never came)
        self.reopen_grace = reopen_grace
        self.app_sockets = 0  # open or opening
        self.sessions: dict[int, ConnectorSession] = {}
        self.events: Observers[ConnectorEvent] = Observers()
        self.endpoint = Endpoint(
            net,
            server_config=creds.server_config("connector"),
            server_handler=lambda conn: _DirectConn(self, conn),
            raw_handler=self._on_raw,
        )
        self.link = IntermediateLink(
            self.endpoint, intermediate, creds, wire.Role.CONNECTOR, name,
            owner=self,
        )
        self.registered = asyncio.Event()
        self.held = HeldDatagrams()
        self.tasks = Tasks()
        self.fatal: BaseException | None = None
        self.metrics = Metrics()
        self.metrics.gauge("sessions", lambda: len(self.sessions), "open sessions")
        self.metrics.counter_source("udp_datagrams_total", "what", lambda: dict(self.endpoint.stats))
        watch_endpoints(self.metrics, lambda: [self.endpoint])
        self.metrics.gauge("direct_sessions", lambda: sum(1 for s in self.sessions.values()
                                                          if s.direct or s.sealed_path == Path.DIRECT),
                           "sessions with a direct path")
        self.metrics.gauge("app_sockets", lambda: self.app_sockets, "per-session sockets towards the application")
        self.failed = asyncio.Event()  # set with `fatal` when the Intermediate refuses us for good

    def subscribe(self, handler: EventHandler[ConnectorEvent]) -> Callable[[], None]:
        """Observe this Connector's events (`ConnectorEvent`); returns the call that unsubscribes."""
        return self.events.subscribe(handler)

    async def new_endpoint(self, raw_handler: Callable[[bytes, Addr], None] | None = None) -> Endpoint:
        """Another socket that accepts direct connections like the main one (birthday mode); its
        non-QUIC datagrams go to `raw_handler` (default: this Connector's events, like the main one's)."""
        ep = Endpoint(self.net, server_config=self.endpoint.server_config,
                      server_handler=lambda conn: _DirectConn(self, conn), raw_handler=raw_handler or self._on_raw)
        await ep.bind(self.host, 0)
        return ep  # the caller's to close (the birthday pool closes its sockets with its session)

    async def start(self) -> Addr:
        addr = await self.endpoint.bind(self.host, self.p2p_port)
        self.tasks.spawn(self._stay_connected())
        self.tasks.spawn(self._sweep())
        return addr

    async def _stay_connected(self) -> None:
        try:
            await self.link.run_forever()
        except Refused as exc:
            log.error("the Intermediate refused this connector: %s", exc)
            self.fatal = exc
            self.failed.set()
            self.registered.set()  # wake waiters; they check `fatal`

    def link_up(self) -> None:
        now = asyncio.get_running_loop().time()
        for s in self.sessions.values():
            if s.orphaned_at is None:
                s.orphaned_at = now
        self.registered.clear()
        self.tasks.spawn(self._register())
        self.events.emit(LinkUp())

    async def _register(self) -> None:
        """Register the service on this connection. The reply may be slow under loss (QUIC backs off
        its retransmissions), so a timeout while the connection is still up sends the request
        again (registration is idempotent); a lost connection registers again once it is back."""
        conn = self.link.conn
        while True:
            try:
                await self.link.request(wire.Register(self.link.next_req(), self.service))
            except Refused as exc:
                log.error("registration of %s refused: %s", self.service, exc)
                self.fatal = exc
                self.failed.set()
            except TimeoutError:
                if self.link.conn is conn and conn is not None and not conn.closed:
                    log.info("registration of %s not answered yet; asking again", self.service)
                    continue
                return
            except ConnectionError as exc:
                log.warning("registration of %s failed: %s", self.service, exc)
                return
            else:
                log.info("registered service %s", self.service)
            break
        self.registered.set()

    async def wait_registered(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self.registered.wait()
        if self.fatal is not None:
            raise self.fatal

    def close(self) -> None:
        self.link.close()
        self.tasks.cancel_all()
        for s in list(self.sessions.values()):
            self._release(s)  # no SessionEnded: what the sessions did stays readable after the close
        self.endpoint.close()

    # -- signaling ------------------------------------------------------------------------------
    def link_message(self, msg: wire.Message) -> None:
        if self.events.offer(ControlReceived(msg)):
            return
        if isinstance(msg, wire.SessionNew):
            old = self.sessions.get(msg.session)
            if old is not None and old.agent == msg.agent:
                # the Intermediate restarted and the Agent re-opened: keep the direct path and app sockets
                old.key, old.max_payload = msg.key, msg.max_payload
                old.agent_nat, old.agent_candidates = msg.nat, msg.candidates
                old.orphaned_at = None
                return
            if old is None and len(self.sessions) >= self.max_sessions:
                self._refuse_session(msg.session, f"the connector has {len(self.sessions)} sessions, its limit")
                return
            s = ConnectorSession(msg.session, msg.key, msg.agent, msg.service, msg.max_payload,
                                 agent_nat=msg.nat, agent_candidates=msg.candidates)
            self.sessions[msg.session] = s
            log.info("session %08x from agent %s", msg.session, msg.agent)
            for data in self.held.take(asyncio.get_running_loop().time(), msg.session):
                self.link_datagram(data)
            if old is not None:
                self._end_session(old, "replaced by a new session with the same id")
            self.events.emit(SessionStarted(s))
        elif isinstance(msg, wire.SessionClosed):
            gone = self.sessions.pop(msg.session, None)
            if gone is not None:
                self._end_session(gone, f"{msg.code.name.lower()}: {msg.reason}")
        else:
            log.debug("unhandled %s", type(msg).__name__)

    def _refuse_session(self, sid: int, reason: str) -> None:
        log.warning("session %08x refused: %s", sid, reason)
        self.metrics.inc("sessions_refused_total")
        self.link.send(wire.SessionError(sid, wire.NackCode.RATE_LIMITED, reason))
        self.link.send(wire.SessionClosed(sid, wire.NackCode.RATE_LIMITED, reason))

    def _end_session(self, s: ConnectorSession, reason: str) -> None:
        self._release(s)
        self.events.emit(SessionEnded(s, reason))

    def _release(self, s: ConnectorSession) -> None:
        s.closed = True
        for path in list(s.app_socks):
            self._close_app_socket(s, path)
        self.app_sockets -= len(s.app_opening)  # their tasks see `closed` and close what they open
        s.app_opening.clear()
        for conn in {s.direct, s.sealed} - {None}:
            assert conn is not None
            conn.close(reason="session closed")
        self.endpoint.close_tunnel(wire.relay_tunnel(s.id))

    def _on_raw(self, data: bytes, addr: Addr) -> None:
        sealed = self.link.sealed_from(data, addr)
        if sealed is None:
            self.events.offer(RawReceived(data, addr))
        elif (s := self.sessions.get(sealed[0])) is not None:
            self._sealed_in(s, sealed[1], raw=True)

    # -- application forwarding -----------------------------------------------------------------
    def link_reply(self, msg: wire.Message) -> None:
        pass  # the Connector makes no request whose reply matters before its waiter wakes

    def link_datagram(self, data: bytes) -> None:
        try:
            sid = wire.relayed_session(data)
        except wire.WireError:
            return
        s = self.sessions.get(sid)
        if s is None:
            self.held.hold(asyncio.get_running_loop().time(), sid, data)  # SessionNew may follow in this packet
            return
        if data[0] == wire.DGRAM_SEALED:
            self._sealed_in(s, data[wire.DGRAM_HEADER:], raw=False)
            return
        payload = data[wire.DGRAM_HEADER:]
        s.counters["relay_in"] += 1
        self.metrics.inc("datagrams_in_total", path=Path.RELAY)
        self._spawn_or_send(s, Path.RELAY, payload)

    def _sealed_in(self, s: ConnectorSession, packet: bytes, raw: bool) -> None:
        """A packet of the session's sealed connection, relayed: into the endpoint through the
        session's tunnel (opened by the first one). Answered the way the last one came."""
        s.sealed_raw = raw
        tunnel = wire.relay_tunnel(s.id)
        if tunnel not in self.endpoint.tunnels:
            self.endpoint.open_tunnel(tunnel, lambda packet: self._send_sealed(s, packet))
        self.endpoint.tunnel_receive(packet, tunnel)

    def _send_sealed(self, s: ConnectorSession, packet: bytes) -> None:
        self.link.send_sealed(s.id, packet, s.key if s.sealed_raw else None)

    def to_app(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        self._spawn_or_send(s, path, payload)

    def _spawn_or_send(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        sock = s.app_socks.get(path)
        if sock is not None:
            s.app_used[path] = asyncio.get_running_loop().time()
            sock.sendto(payload, self.forward)
            return
        pending = s.app_opening.get(path)
        if pending is not None:
            if len(pending) < APP_PENDING:
                pending.append(payload)
            return
        if self.app_sockets >= self.max_app_sockets:
            self._refuse_app_socket(s, f"the connector has {self.app_sockets} app sockets, its limit")
            return
        self.app_sockets += 1
        s.app_opening[path] = [payload]
        self.tasks.spawn(self._open_app_socket(s, path))

    async def _open_app_socket(self, s: ConnectorSession, path: Path) -> None:
        host = "::" if ":" in self.forward[0] else "0.0.0.0"
        try:
            sock = await self.net.bind_udp(host, 0, lambda batch: self._from_app(s, path, batch))
        except OSError as exc:  # EMFILE, ENFILE, ENOBUFS: this session waits, the others go on
            if s.app_opening.pop(path, None) is not None:
                self.app_sockets -= 1
            self._refuse_app_socket(s, f"the connector cannot open an app socket: {exc.strerror or exc}")
            return
        if s.closed:
            sock.close()  # the session ended while the socket opened (its count went with it)
            return
        s.app_socks[path] = sock
        s.app_used[path] = asyncio.get_running_loop().time()
        s.refused = False
        for payload in s.app_opening.pop(path, []):
            sock.sendto(payload, self.forward)

    def _refuse_app_socket(self, s: ConnectorSession, reason: str) -> None:
        """Drop the datagram; tell the Agent once (a SessionError) rather than on every datagram."""
        self.metrics.inc("app_socket_refusals_total")
        if not s.refused:
            s.refused = True
            log.warning("session %08x: %s", s.id, reason)
            self.link.send(wire.SessionError(s.id, wire.NackCode.RATE_LIMITED, reason))

    def _close_app_socket(self, s: ConnectorSession, path: Path) -> None:
        sock = s.app_socks.pop(path, None)
        s.app_used.pop(path, None)
        if sock is not None:
            sock.close()
            self.app_sockets -= 1

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.05, min(self.app_idle, self.reopen_grace) / 4))
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        """Close idle app sockets; release sessions not re-opened after a reconnection."""
        for s in list(self.sessions.values()):
            if s.orphaned_at is not None and now - s.orphaned_at > self.reopen_grace:
                del self.sessions[s.id]
                self._end_session(s, "not re-opened after the link to the Intermediate was lost")
                continue
            for path, used in list(s.app_used.items()):
                if now - used > self.app_idle:
                    self._close_app_socket(s, path)

    def _from_app(self, s: ConnectorSession, path: Path, batch: list[tuple[bytes, Addr]]) -> None:
        if path in s.app_used:
            s.app_used[path] = asyncio.get_running_loop().time()
        for payload, src in batch:
            if src != self.forward:
                continue  # only the application may answer on this socket
            self.send_to_agent(s, path, payload)

    def send_to_agent(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        """Reply on `path`; a dead direct path falls back to the relay."""
        data = wire.encode_app(s.id, payload)
        try:
            if s.sealed is not None and not s.sealed.closed:  # sealed: its connection's active path
                if s.sealed.send_datagram(data):
                    on = s.sealed_path
                    assert on is not None
                    s.counters[f"{on}_out"] += 1
                    self.metrics.inc("datagrams_out_total", path=on)
                return
            if path == Path.DIRECT and s.direct is not None and not s.direct.closed:
                s.direct.send_datagram(data)
                s.counters["direct_out"] += 1
                self.metrics.inc("datagrams_out_total", path=Path.DIRECT)
                return
            if self.link.conn is not None:
                self.link.conn.send_datagram(data)
                s.counters["relay_out"] += 1
                self.metrics.inc("datagrams_out_total", path=Path.RELAY)
        except DatagramTooLarge as exc:
            log.warning("reply from the application dropped: %s", exc)


class _DirectConn(Handler):
    """A direct P2P connection from an Agent: it must name its session and prove the session key."""

    def __init__(self, connector: Connector, conn: Connection) -> None:
        self.c = connector
        self.conn = conn
        self.session: ConnectorSession | None = None
        # datagrams of the packets being processed right now, before the DirectHello they came with
        self.same_pass: list[bytes] = []

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.DirectHello) and self.session is None:
            s = self.c.sessions.get(msg.session)
            if s is None or not hmac.compare_digest(msg.auth, wire.direct_auth(s.key, msg.session)):
                conn.send_control(wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "unknown session or bad proof"))
                conn.close_soon(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
                return
            sealed = conn.peer_addr == wire.relay_tunnel(s.id)
            old = s.sealed if sealed else s.direct
            if old is not None and old is not conn:
                old.close(reason="replaced by a newer direct connection")
            if sealed:
                s.sealed = conn
            else:
                s.direct = conn
            self.session = s
            conn.mark_proven()
            conn.send_control(wire.DirectAccept(s.id, self.c.name, wire.direct_accept_auth(s.key, s.id, self.c.name)))

            log.info("session %08x: direct connection from %s:%d", s.id, *(conn.peer_addr or ("?", 0)))
        elif isinstance(msg, wire.Ping):
            conn.send_control(wire.Pong(msg.nonce))
        elif self.session is None:
            conn.close(wire.CLOSE_UNAUTHENTICATED, "DirectHello first")

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        s = self.session
        if s is None:
            self._until_end_of_pass(data)
            return
        self._deliver(s, data, conn.rx_addr)

    def _deliver(self, s: ConnectorSession, data: bytes, rx_addr: Addr | None) -> None:
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        if sid != s.id:
            return
        path = Path.RELAY if rx_addr == wire.relay_tunnel(s.id) else Path.DIRECT
        s.counters[f"{path}_in"] += 1
        self.c.metrics.inc("datagrams_in_total", path=path)
        self.c.to_app(s, path, payload)

    def _until_end_of_pass(self, data: bytes) -> None:
        """aioquic puts DATAGRAM frames before STREAM frames in a packet, so the Agent's first
        datagram is read just before the DirectHello it came with. Kept only until the endpoint has
        processed the packets at hand (the next loop iteration), SAME_PASS_DATAGRAMS at most: then
        delivered if the hello proved the session, dropped otherwise. Nothing waits for a later packet."""
        if len(self.same_pass) >= SAME_PASS_DATAGRAMS:
            return
        if not self.same_pass:
            asyncio.get_running_loop().call_soon(self._end_of_pass)
        self.same_pass.append(data)

    def _end_of_pass(self) -> None:
        held, self.same_pass = self.same_pass, []
        if self.session is not None:
            for data in held:
                self.on_datagram(self.conn, data)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if self.session is not None and self.session.direct is conn:
            self.session.direct = None
        if self.session is not None and self.session.sealed is conn:
            self.session.sealed = None
