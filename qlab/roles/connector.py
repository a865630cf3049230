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
    app_socks: dict[Path, DatagramSocket] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=lambda: {"relay_in": 0, "relay_out": 0, "direct_in": 0, "direct_out": 0})
    agent_nat: wire.NatKind = wire.NatKind.UNKNOWN
    agent_candidates: tuple[wire.Candidate, ...] = ()


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
    ) -> None:
        self.net = net
        self.creds = creds
        self.service = service
        self.forward = forward
        self.name = name
        self.host = host
        self.p2p_port = p2p_port
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
        self.metrics.gauge("direct_sessions", lambda: sum(1 for s in self.sessions.values() if s.direct), "sessions with a direct path")
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

    def _end_session(self, s: ConnectorSession, reason: str) -> None:
        self._release(s)
        self.events.emit(SessionEnded(s, reason))

    def _release(self, s: ConnectorSession) -> None:
        for sock in s.app_socks.values():
            sock.close()
        s.app_socks.clear()
        if s.direct is not None:
            s.direct.close(reason="session closed")

    def _on_raw(self, data: bytes, addr: Addr) -> None:
        self.events.offer(RawReceived(data, addr))

    # -- application forwarding -----------------------------------------------------------------
    def link_reply(self, msg: wire.Message) -> None:
        pass  # the Connector makes no request whose reply matters before its waiter wakes

    def link_datagram(self, data: bytes) -> None:
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        s = self.sessions.get(sid)
        if s is None:
            self.held.hold(asyncio.get_running_loop().time(), sid, data)  # SessionNew may follow in this packet
            return
        s.counters["relay_in"] += 1
        self.metrics.inc("datagrams_in_total", path=Path.RELAY)
        self._spawn_or_send(s, Path.RELAY, payload)

    def to_app(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        self._spawn_or_send(s, path, payload)

    def _spawn_or_send(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        sock = s.app_socks.get(path)
        if sock is not None:
            sock.sendto(payload, self.forward)
        else:
            self.tasks.spawn(self._open_app_socket(s, path, payload))

    async def _open_app_socket(self, s: ConnectorSession, path: Path, first: bytes) -> None:
        if path not in s.app_socks:
            host = "::" if ":" in self.forward[0] else "0.0.0.0"
            s.app_socks[path] = await self.net.bind_udp(host, 0, lambda batch: self._from_app(s, path, batch))
        s.app_socks[path].sendto(first, self.forward)

    def _from_app(self, s: ConnectorSession, path: Path, batch: list[tuple[bytes, Addr]]) -> None:
        for payload, src in batch:
            if src != self.forward:
                continue  # only the application may answer on this socket
            self.send_to_agent(s, path, payload)

    def send_to_agent(self, s: ConnectorSession, path: Path, payload: bytes) -> None:
        """Reply on `path`; a dead direct path falls back to the relay."""
        data = wire.encode_app(s.id, payload)
        try:
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
        self.held = HeldDatagrams(limit=16)

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.DirectHello) and self.session is None:
            s = self.c.sessions.get(msg.session)
            if s is None or not hmac.compare_digest(msg.auth, wire.direct_auth(s.key, msg.session)):
                conn.send_control(wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "unknown session or bad proof"))
                conn.close_soon(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
                return
            if s.direct is not None and s.direct is not conn:
                s.direct.close(reason="replaced by a newer direct connection")
            s.direct = conn
            self.session = s
            conn.mark_proven()
            conn.send_control(wire.DirectAccept(s.id, self.c.name, wire.direct_accept_auth(s.key, s.id, self.c.name)))
            for data in self.held.take(asyncio.get_running_loop().time(), 0):
                self.on_datagram(conn, data)
            log.info("session %08x: direct connection from %s:%d", s.id, *(conn.peer_addr or ("?", 0)))
        elif isinstance(msg, wire.Ping):
            conn.send_control(wire.Pong(msg.nonce))
        elif self.session is None:
            conn.close(wire.CLOSE_UNAUTHENTICATED, "DirectHello first")

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        s = self.session
        if s is None:
            self.held.hold(asyncio.get_running_loop().time(), 0, data)  # the DirectHello is in this flight
            return
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        if sid != s.id:
            return
        s.counters["direct_in"] += 1
        self.c.metrics.inc("datagrams_in_total", path=Path.DIRECT)
        self.c.to_app(s, Path.DIRECT, payload)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if self.session is not None and self.session.direct is conn:
            self.session.direct = None
