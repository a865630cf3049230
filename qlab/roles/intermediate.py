"""The Intermediate Server: QUIC Address Discovery, registration, signaling and the DATAGRAM relay.

It listens on a primary address (UDP 4433) and, for NAT classification, optionally on an alternate
port and an alternate IP: every listener answers QAD, and a client may ask any of them to send a
test probe from another one (RFC 5780's CHANGE-REQUEST, on qlab's own QAD).

Security model: a client must prove the deployment secret in its HELLO before anything else; a
session belongs to exactly one Agent and one Connector, and only those two may relay on it or
signal on it. Relay replies go to the session's Agent only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field

from qlab import wire
from qlab.certs import Credentials, new_session_key
from qlab.endpoint import Connection, DatagramTooLarge, Endpoint, Handler, HeldDatagrams
from qlab.net import Addr, Net
from qlab.roles.metrics import Metrics
from qlab.roles.policy import AccessPolicy, ClientLimits

log = logging.getLogger("qlab.roles.intermediate")

PUNCH_MARGIN_MS = 2  # slack for RTT estimates when timing the common punch start


@dataclass
class Client:
    id: int
    conn: Connection
    role: wire.Role
    name: str
    listener: int
    limits: ClientLimits
    services: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    observed_seq: int = 0
    announced: wire.Announce | None = None


@dataclass
class Session:
    id: int
    service: str
    agent: int
    connector: int
    key: bytes
    created: float
    offer: wire.Offer | None = None
    answer: wire.Answer | None = None


class Intermediate:
    """All state of one Intermediate; `listeners` are its endpoints (primary first)."""

    def __init__(
        self, net: Net, creds: Credentials, *, relay_enabled: bool = True, birthday_ports: int = 0,
        birthday_probes: int = 1024,
        policy: AccessPolicy | None = None, rate_limits: dict[str, tuple[float, float]] | None = None,
        advertise: dict[str, str] | None = None,
    ) -> None:
        self.net = net
        # local IP -> the public IP clients reach it at (a cloud's 1:1 NAT, e.g. an Elastic IP): what
        # SERVER_INFO tells classifying clients, who must connect to the alternate listeners
        self.advertise = advertise or {}
        self.creds = creds
        self.policy = policy or AccessPolicy()
        self.rate_limits = rate_limits
        self.metrics = Metrics()
        self.listeners: list[Endpoint] = []
        self.listener_addrs: list[Addr] = []
        self.clients: dict[int, Client] = {}
        self.services: dict[str, list[int]] = {}  # service -> connector client ids, newest last
        self.sessions: dict[int, Session] = {}
        self.relay_enabled = relay_enabled
        self.relay_blocked: set[int] = set()  # sessions whose relay is switched off (direct proof)
        self.birthday_ports = birthday_ports
        self.birthday_probes = birthday_probes
        self.started = time.time()
        m = self.metrics
        m.gauge("clients", lambda: len(self.clients), "connected and authenticated clients")
        m.gauge("sessions", lambda: len(self.sessions), "open relay/signaling sessions")
        self.relayed = {"to_connector": 0, "to_agent": 0}
        self.relayed_bytes = {"to_connector": 0, "to_agent": 0}
        m.counter_source("relayed_datagrams_total", "direction", lambda: self.relayed)
        m.counter_source("relayed_bytes_total", "direction", lambda: self.relayed_bytes)
        m.counter_source("udp_datagrams_total", "what", self._socket_stats)
        m.gauge("services", lambda: sum(1 for v in self.services.values() if v), "services with a Connector")

    async def listen(self, addrs: list[Addr]) -> list[Addr]:
        """Bind one endpoint per address; the first is the primary, the rest serve classification."""
        cfg = self.creds.server_config("intermediate")
        for i, (host, port) in enumerate(addrs):
            ep = Endpoint(self.net, server_config=cfg, server_handler=lambda conn, i=i: _ServerConn(self, conn, i))
            bound = await ep.bind(host, port)
            self.listeners.append(ep)
            self.listener_addrs.append(bound)
            log.info("listening on udp %s:%d", *bound)
        return self.listener_addrs

    def close(self) -> None:
        for ep in self.listeners:
            ep.close()

    def crash(self) -> None:
        """Disappear as a killed process would: no goodbyes, all state gone (fault injection)."""
        for ep in self.listeners:
            ep.crash()
        self.clients.clear()
        self.sessions.clear()
        self.services.clear()

    def _socket_stats(self) -> dict[str, float]:
        """Datagrams seen by all listeners: received, sent, raw (non-QUIC), dropped malformed or
        for an unknown connection."""
        out: dict[str, float] = {}
        for ep in self.listeners:
            for k, v in ep.stats.items():
                out[k] = out.get(k, 0) + v
        return out

    # -- helpers --------------------------------------------------------------------------------
    def _new_id(self, taken: dict) -> int:
        while True:
            i = secrets.randbits(32)
            if i and i not in taken:
                return i

    def connector_for(self, service: str) -> Client | None:
        for cid in reversed(self.services.get(service, [])):
            c = self.clients.get(cid)
            if c is not None and not c.conn.closed:
                return c
        return None

    def alternate(self, listener: int, alt_ip: bool, alt_port: bool) -> Endpoint | None:
        """The listener that differs from `listener` in IP and/or port as asked (RFC 5780)."""
        base = self.listener_addrs[listener]
        for ep, addr in zip(self.listeners, self.listener_addrs, strict=True):
            if (addr[0] != base[0]) == alt_ip and (addr[1] != base[1]) == alt_port:
                return ep
        return None

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    def error(self, kind: str) -> None:
        self.metrics.inc("errors_total", kind=kind)

    # -- session lifecycle ----------------------------------------------------------------------
    def close_session(self, sid: int, code: wire.NackCode, reason: str, notify: Client | None = None) -> None:
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        self.relay_blocked.discard(sid)
        for cid in (s.agent, s.connector):
            c = self.clients.get(cid)
            if c is not None:
                c.sessions.discard(sid)
                if c is not notify:
                    c.conn.send_control(wire.SessionClosed(sid, code, reason))

    def drop_client(self, client: Client, reason: str) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        for svc in client.services:
            ids = self.services.get(svc, [])
            if client.id in ids:
                ids.remove(client.id)
        for sid in list(client.sessions):
            self.close_session(sid, wire.NackCode.PEER_GONE, f"{client.role.name.lower()} {client.name} left", notify=client)
        log.info("%s %s left (%s)", client.role.name.lower(), client.name, reason)


class _ServerConn(Handler):
    """One client connection as seen by the Intermediate."""

    def __init__(self, server: Intermediate, conn: Connection, listener: int) -> None:
        self.s = server
        self.conn = conn
        self.listener = listener
        self.client: Client | None = None
        self.held = HeldDatagrams()

    # -- QAD ------------------------------------------------------------------------------------
    def _send_observed(self) -> None:
        c = self.client
        if c is None or self.conn.peer_addr is None:
            return
        c.observed_seq += 1
        self.conn.send_control(wire.ObservedAddress(c.observed_seq, self.conn.peer_addr))

    def on_peer_address_changed(self, conn: Connection, addr: Addr) -> None:
        self.s.metrics.inc("address_changes_total")
        self._send_observed()

    # -- control --------------------------------------------------------------------------------
    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        s = self.s
        c = self.client
        if c is None:
            if not isinstance(msg, wire.Hello):
                s.error("before_hello")
                conn.send_control(wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "say HELLO first"))
                conn.close_soon(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
                return
            self._hello(msg)
            return
        name = type(msg).__name__
        s.metrics.inc("control_messages_total", type=name)
        now = s.loop_time()
        kind = _LIMIT_KIND.get(name)
        if not c.limits.allow("control", now) or (kind is not None and not c.limits.allow(kind, now)):
            s.metrics.inc("rate_limited_total", kind=kind or "control")
            what = kind or "control messages"
            if hasattr(msg, "req"):
                conn.send_control(wire.Nack(msg.req, wire.NackCode.RATE_LIMITED, f"too many {what}; slow down"))
            elif hasattr(msg, "session"):
                conn.send_control(wire.SessionError(msg.session, wire.NackCode.RATE_LIMITED, f"too many {what}"))
            return
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            s.error("unexpected_message")
            req = getattr(msg, "req", 0)
            conn.send_control(wire.Nack(req, wire.NackCode.BAD_STATE, f"{name} is not accepted here"))
            return
        handler(c, msg)

    def _hello(self, msg: wire.Hello) -> None:
        s, conn = self.s, self.conn
        if msg.version != wire.VERSION:
            s.error("bad_version")
            conn.send_control(wire.Nack(0, wire.NackCode.BAD_VERSION, f"server speaks qlab/{wire.VERSION}"))
            conn.close_soon(wire.CLOSE_BAD_VERSION, "bad version")
            return
        secret = s.policy.secret_for(msg, s.creds.secret)
        if not wire.check_hello(secret, msg):
            s.error("unauthenticated")
            s.metrics.inc("auth_failures_total")
            log.warning("refused %s %r from %s: bad secret", msg.role.name.lower(), msg.name, conn.peer_addr)
            conn.send_control(wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "bad deployment secret"))
            conn.close_soon(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
            return
        refused = s.policy.admits(msg)
        if refused is not None:
            s.error("not_allowed")
            conn.send_control(wire.Nack(0, wire.NackCode.NOT_ALLOWED, refused))
            conn.close_soon(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
            return
        cid = s._new_id(s.clients)
        self.client = Client(cid, conn, msg.role, msg.name, self.listener, ClientLimits(s.loop_time(), s.rate_limits))
        s.clients[cid] = self.client
        s.metrics.inc("hellos_total", role=msg.role.name.lower())
        conn.send_control(wire.Welcome(wire.VERSION, cid, conn.max_app_payload))
        self._send_observed()
        log.info("%s %s connected from %s:%d", msg.role.name.lower(), msg.name, *(conn.peer_addr or ("?", 0)))

    def _on_Register(self, c: Client, msg: wire.Register) -> None:
        s = self.s
        if not s.policy.may_use(c.name, c.role, msg.service):
            s.error("not_allowed")
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, f"{c.name} may not use {msg.service!r}"))
            return
        if c.role == wire.Role.CONNECTOR:
            ids = s.services.setdefault(msg.service, [])
            if c.id in ids:
                ids.remove(c.id)
            ids.append(c.id)
        elif c.role != wire.Role.AGENT:
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "probes do not register"))
            return
        c.services.add(msg.service)
        s.metrics.inc("registrations_total", role=c.role.name.lower())
        self.conn.send_control(wire.Ack(msg.req))
        log.info("%s %s registered for %s", c.role.name.lower(), c.name, msg.service)

    def _on_OpenSession(self, c: Client, msg: wire.OpenSession) -> None:
        s = self.s
        if c.role != wire.Role.AGENT:
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "only agents open sessions"))
            return
        if not s.policy.may_use(c.name, c.role, msg.service):
            s.error("not_allowed")
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, f"{c.name} may not reach {msg.service!r}"))
            return
        if msg.session == 0 or msg.session in s.sessions:
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.BAD_STATE, "session id taken; pick another"))
            return
        conn_c = s.connector_for(msg.service)
        if conn_c is None:
            s.error("no_connector")
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NO_CONNECTOR, f"no connector for {msg.service!r}"))
            return
        sid = msg.session
        key = new_session_key()
        limit = min(self.conn.max_app_payload, conn_c.conn.max_app_payload)
        sess = Session(sid, msg.service, c.id, conn_c.id, key, time.time())
        sess.offer = wire.Offer(sid, msg.nat, msg.candidates)
        s.sessions[sid] = sess
        c.sessions.add(sid)
        conn_c.sessions.add(sid)
        s.metrics.inc("sessions_total")
        conn_c.conn.send_control(wire.SessionNew(sid, key, c.name, msg.service, limit, msg.nat, msg.candidates))
        self.conn.send_control(wire.SessionOpened(msg.req, sid, key, conn_c.name, limit))
        for data in self.held.take(self.s.loop_time(), sid):
            self.on_datagram(self.conn, data)
        if conn_c.announced is not None:  # the Connector's side is known: punch now
            sess.answer = wire.Answer(sid, conn_c.announced.nat, conn_c.announced.candidates)
            self._start_punch(sess, c, conn_c)

    def _on_Announce(self, c: Client, msg: wire.Announce) -> None:
        if c.role != wire.Role.CONNECTOR:
            self.conn.send_control(wire.Nack(0, wire.NackCode.NOT_ALLOWED, "only connectors announce candidates"))
            return
        c.announced = msg

    def _session_for(self, c: Client, sid: int, req: int = 0) -> Session | None:
        sess = self.s.sessions.get(sid)
        if sess is None or c.id not in (sess.agent, sess.connector):
            # unknown and foreign sessions get the same answer: no oracle for session ids
            self.s.error("not_session_party")
            self.conn.send_control(wire.SessionError(sid, wire.NackCode.NO_SUCH_SESSION, "no such session"))
            return None
        return sess

    def _peer(self, sess: Session, c: Client) -> Client | None:
        return self.s.clients.get(sess.connector if c.id == sess.agent else sess.agent)

    def _on_Offer(self, c: Client, msg: wire.Offer) -> None:
        sess = self._session_for(c, msg.session)
        if sess is None:
            return
        if c.id != sess.agent:
            self.conn.send_control(wire.SessionError(msg.session, wire.NackCode.BAD_STATE, "only the agent offers"))
            return
        sess.offer = msg
        sess.answer = None
        peer = self._peer(sess, c)
        if peer is not None:
            peer.conn.send_control(msg)

    def _on_Answer(self, c: Client, msg: wire.Answer) -> None:
        s = self.s
        sess = self._session_for(c, msg.session)
        if sess is None:
            return
        if c.id != sess.connector or sess.offer is None:
            self.conn.send_control(wire.SessionError(msg.session, wire.NackCode.BAD_STATE, "answer without offer"))
            return
        sess.answer = msg
        agent = s.clients.get(sess.agent)
        if agent is None:
            return
        self._start_punch(sess, agent, c)

    def _start_punch(self, sess: Session, agent: Client, connector: Client) -> None:
        """Tell both sides to start so that their first probes cross: each StartPunch is delayed
        by the difference of the two one-way times plus a margin."""
        assert sess.offer is not None and sess.answer is not None
        half = {
            agent.id: (agent.conn.rtt or 0.1) / 2,
            connector.id: (connector.conn.rtt or 0.1) / 2,
        }
        latest = max(half.values())
        for me, own_msg, peer_msg in ((agent, sess.offer, sess.answer), (connector, sess.answer, sess.offer)):
            delay = int((latest - half[me.id]) * 1000) + PUNCH_MARGIN_MS
            birthday = _birthday(self.s, own_msg.nat, peer_msg.nat)
            me.conn.send_control(
                wire.StartPunch(sess.id, min(delay, 5000), peer_msg.nat, peer_msg.candidates, birthday)
            )
        self.s.metrics.inc("punches_started_total")

    def _on_PunchResult(self, c: Client, msg: wire.PunchResult) -> None:
        sess = self._session_for(c, msg.session)
        if sess is None:
            return
        self.s.metrics.inc("punch_results_total", success=str(bool(msg.success)).lower())
        peer = self._peer(sess, c)
        if peer is not None:
            peer.conn.send_control(msg)

    def _on_SessionError(self, c: Client, msg: wire.SessionError) -> None:
        sess = self._session_for(c, msg.session)
        if sess is not None:
            peer = self._peer(sess, c)
            if peer is not None:
                peer.conn.send_control(msg)

    def _on_SessionClosed(self, c: Client, msg: wire.SessionClosed) -> None:
        if self._session_for(c, msg.session) is not None:
            self.s.close_session(msg.session, msg.code, msg.reason, notify=c)

    def _on_ChangeRequest(self, c: Client, msg: wire.ChangeRequest) -> None:
        s = self.s
        ep = s.alternate(self.listener, bool(msg.alt_ip), bool(msg.alt_port))
        if ep is None or self.conn.peer_addr is None:
            self.conn.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "no such alternate listener"))
            return
        ep.send_raw(wire.encode_classify_test(msg.nonce, ep.local_address), self.conn.peer_addr)
        s.metrics.inc("change_requests_total")
        self.conn.send_control(wire.Ack(msg.req))

    def _on_ServerInfoRequest(self, c: Client, msg: wire.ServerInfoRequest) -> None:
        addrs = [(self.s.advertise.get(ip, ip), port) for ip, port in self.s.listener_addrs]
        primary = addrs[0]
        alternate = next((a for a in addrs if a[0] != primary[0] and a[1] != primary[1]), primary)
        self.conn.send_control(wire.ServerInfo(msg.req, primary, alternate))

    def _on_Ping(self, c: Client, msg: wire.Ping) -> None:
        self.conn.send_control(wire.Pong(msg.nonce))

    def _on_Pong(self, c: Client, msg: wire.Pong) -> None:
        pass

    # -- relay ----------------------------------------------------------------------------------
    def on_datagram(self, conn: Connection, data: bytes) -> None:
        s = self.s
        c = self.client
        m = s.metrics
        if c is None:
            s.error("datagram_unauthenticated")
            return
        try:
            sid, _ = wire.decode_app(data)
        except wire.WireError:
            s.error("datagram_malformed")
            return
        sess = s.sessions.get(sid)
        if sess is None and c.role == wire.Role.AGENT and self.held.hold(s.loop_time(), sid, data):
            return  # the OpenSession carrying this id is probably in the same packet
        if sess is None or c.id not in (sess.agent, sess.connector):
            s.error("datagram_foreign_session")
            return
        if not s.relay_enabled or sid in s.relay_blocked:
            m.inc("relay_blocked_total")
            return
        to_connector = c.id == sess.agent
        peer = s.clients.get(sess.connector if to_connector else sess.agent)
        if peer is None:
            s.error("relay_peer_gone")
            return
        try:
            ok = peer.conn.send_datagram(data)
        except DatagramTooLarge as exc:
            s.error("relay_oversized")
            conn.send_control(wire.SessionError(sid, wire.NackCode.TOO_LARGE, str(exc)))
            return
        direction = "to_connector" if to_connector else "to_agent"
        if ok:
            s.relayed[direction] += 1
            s.relayed_bytes[direction] += len(data) - wire.DGRAM_HEADER
        else:
            m.inc("relay_dropped_total", direction=direction)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if self.client is not None:
            self.s.drop_client(self.client, reason)


_LIMIT_KIND = {
    "Register": "register", "OpenSession": "session", "Offer": "session", "ChangeRequest": "change_request",
}


def _birthday(server: Intermediate, own: wire.NatKind, peer: wire.NatKind) -> int:
    """Birthday mode, when on and the pair needs it: the random-port symmetric side opens
    `birthday_ports` mappings, the endpoint-independent side sprays `birthday_probes` ports."""
    if not server.birthday_ports:
        return 0
    easy = (wire.NatKind.EIM, wire.NatKind.NONE)
    if own == wire.NatKind.EDM_RANDOM and peer in easy:
        return server.birthday_ports
    if peer == wire.NatKind.EDM_RANDOM and own in easy:
        return server.birthday_probes
    return 0


async def run(
    net: Net, creds: Credentials, listen: list[Addr], *, metrics_addr: Addr | None = None,
    stop: asyncio.Event | None = None, policy: AccessPolicy | None = None, advertise: dict[str, str] | None = None,
) -> None:
    """Run an Intermediate until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    server = Intermediate(net, creds, policy=policy, advertise=advertise)
    await server.listen(listen)
    http = None
    if metrics_addr is not None:
        from qlab.roles.metrics import serve_http

        http = await serve_http(metrics_addr[0], metrics_addr[1], server.metrics, lambda: bool(server.listeners))
        log.info("metrics on http://%s:%d/metrics", *metrics_addr)
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        server.close()
        if http is not None:
            http.close()
        await asyncio.sleep(0)
        log.info("stopped")
