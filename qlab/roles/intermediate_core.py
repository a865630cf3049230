"""The Intermediate's protocol logic, sans I/O: registration, sessions, signaling and relay bookkeeping.

`IntermediateCore` is fed one input at a time, with the time passed in: a control message
(`control(peer, msg, now)`), a relayed DATAGRAM (`datagram(peer, data, now)`), a peer's new
address, a closed connection. It answers through the `Peer` it was given and does nothing else by
itself; what is not a send to a peer leaves by two documented ways: counters on the injected
`Metrics`, and events (`SendClassifyTest`) that the shell drains with `next_event()`.

Security model (docs/security.md): a client proves its role's secret (derived from the
deployment's root, or its own from the policy) in a HELLO bound to this connection, before anything
else. A service belongs to the Connector identity that registered it first (or the one the policy
names). A session belongs to exactly one Agent and one Connector, and only those two may relay on
it or signal on it. Candidates are screened before they are forwarded (no reflection through a
peer); rate limits and session caps are per identity (role and name), not per connection.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from qlab import wire
from qlab.certs import new_session_key
from qlab.endpoint import DatagramTooLarge, HeldDatagrams
from qlab.net import Addr
from qlab.roles.metrics import Metrics
from qlab.roles.policy import AccessPolicy, ClientLimits

log = logging.getLogger("qlab.roles.intermediate")

PUNCH_MARGIN_MS = 2  # slack for RTT estimates when timing the common punch start
MAX_PUNCH_DELAY_MS = 5000
DEFAULT_RTT = 0.1  # seconds, for a peer whose RTT QUIC has not measured yet
SESSION_ID_REFUSED = "session id refused; pick another"
SEEN_ADDRESSES = 4  # per identity: its link and its QAD connections of both families
MAX_FORWARDED_CANDIDATES = 16  # host(s) + server-reflexive + 8 predicted ports fit


@dataclass(frozen=True)
class Caps:
    """Bounds on what authenticated clients make the Intermediate hold (knobs, with defaults)."""

    sessions_per_identity: int = 64  # open sessions one Agent identity (role, name) may have
    sessions: int = 10_000  # open sessions in total
    session_idle: float = 1800.0  # s without relay or control traffic before a session is closed
    owner_hold: float = 300.0  # s a service stays its Connector's after its last registration left


class Peer(Protocol):
    """One client connection, as the core needs it. Implemented over `qlab.endpoint.Connection` by
    the shell, and by plain fakes in tests."""

    @property
    def address(self) -> Addr | None:
        """The client's address as this Intermediate sees it (QAD), once known."""

    @property
    def validated_address(self) -> Addr | None:
        """The client's most recent address whose path QUIC has validated (classification tests
        go there only: a client cannot point them at an address it has not proven)."""

    @property
    def binding(self) -> bytes:
        """What a HELLO on this connection is bound to: the source connection ID this server chose
        for the connection when it accepted it."""

    @property
    def listener(self) -> int:
        """Index of the listener the connection arrived on (0 is the primary)."""

    @property
    def max_app_payload(self) -> int:
        """Largest application payload one relayed DATAGRAM to this client can carry."""

    @property
    def rtt(self) -> float | None:
        """Smoothed RTT in seconds, once measured."""

    @property
    def closed(self) -> bool: ...

    def send_control(self, msg: wire.Message) -> None: ...

    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM; False when dropped. Raises DatagramTooLarge."""

    def send_raw(self, data: bytes) -> None:
        """Send a raw (non-QUIC) datagram to the client's validated address, from its listener."""

    def close(self, code: int, reason: str) -> None:
        """Close once the control messages already sent have had time to leave (a NACK first)."""


@dataclass(frozen=True, slots=True)
class SendClassifyTest:
    """Send a NAT-classification test (`wire.encode_classify_test`) from listener `listener` to
    `to`: the answer to a CHANGE-REQUEST (RFC 5780) on qlab's own QAD."""

    listener: int
    to: Addr
    nonce: int


Event = SendClassifyTest


class Limit(StrEnum):
    """Rate-limit buckets (the keys of `qlab.roles.policy.RATE_LIMITS`) and the metric label."""

    CONTROL = "control"  # every control message
    REGISTER = "register"
    SESSION = "session"
    CHANGE_REQUEST = "change_request"


# the messages that also count against a bucket of their own
LIMITED: dict[type[wire.Message], Limit] = {
    wire.Register: Limit.REGISTER,
    wire.OpenSession: Limit.SESSION,
    wire.Offer: Limit.SESSION,
    wire.ChangeRequest: Limit.CHANGE_REQUEST,
}


class Direction(StrEnum):
    """Which way a relayed datagram went (the metric label)."""

    TO_CONNECTOR = "to_connector"
    TO_AGENT = "to_agent"


@dataclass(frozen=True)
class Birthday:
    """Birthday mode: off when `ports` is 0. The random-port endpoint-dependent side opens `ports`
    mappings, the endpoint-independent side sprays `probes` ports."""

    ports: int = 0
    probes: int = 1024

    def count(self, own: wire.NatKind, peer: wire.NatKind) -> int:
        """The StartPunch `birthday` field for the side whose NAT is `own`."""
        if not self.ports:
            return 0
        role = wire.birthday_role(own, peer)
        if role == wire.BirthdayRole.HARD:
            return self.ports
        if role == wire.BirthdayRole.EASY:
            return self.probes
        return 0


@dataclass(eq=False)
class Identity:
    """What every connection of one client identity (role, name) shares: rate limits and the
    session budget."""

    limits: ClientLimits
    connections: int = 0
    sessions: int = 0  # open sessions this identity opened (as an Agent)
    # where its authenticated connections came from, newest last: the addresses it proved its own
    seen_at: deque[Addr] = field(default_factory=lambda: deque(maxlen=SEEN_ADDRESSES))

    def saw(self, addr: Addr | None) -> None:
        if addr is not None and addr not in self.seen_at:
            self.seen_at.append(addr)


@dataclass(eq=False)
class Client:
    id: int
    peer: Peer
    role: wire.Role
    name: str
    identity: Identity
    services: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    observed_seq: int = 0
    announced: wire.Announce | None = None
    held: HeldDatagrams = field(default_factory=HeldDatagrams)  # relayed before their OpenSession


@dataclass
class Session:
    id: int
    service: str
    agent: int
    connector: int
    key: bytes
    opener: Identity
    last_active: float
    offer: wire.Offer | None = None
    answer: wire.Answer | None = None
    # the parties' relay tags (raw sealed frames), derived from the key when the session opens
    tags: tuple[bytes, bytes] = (b"", b"")

    def __post_init__(self) -> None:
        self.tags = (wire.relay_tag(self.key, self.id, wire.Role.AGENT),
                     wire.relay_tag(self.key, self.id, wire.Role.CONNECTOR))

    def other(self, client_id: int) -> int:
        """The other party's client id."""
        return self.connector if client_id == self.agent else self.agent


# messages that carry a request id (answered with Ack/Nack) and those that name a session
_REQUESTS = (wire.Register, wire.OpenSession, wire.ChangeRequest, wire.ServerInfoRequest, wire.Ack, wire.Nack,
             wire.SessionOpened, wire.ServerInfo)
_SESSION_MESSAGES = (wire.Offer, wire.Answer, wire.PunchResult, wire.SessionError, wire.SessionClosed,
                     wire.SessionNew, wire.StartPunch, wire.DirectHello)


def _request_id(msg: wire.Message) -> int | None:
    return msg.req if isinstance(msg, _REQUESTS) else None


def _session_id(msg: wire.Message) -> int | None:
    return msg.session if isinstance(msg, _SESSION_MESSAGES) else None


def _implausible(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> bool:
    """No peer is reachable there: port 0, multicast, broadcast/reserved, unspecified."""
    return port == 0 or ip.is_multicast or ip.is_unspecified or ip.is_reserved


def _screened(c: wire.Candidate, observed: Addr | None, proven: tuple[Addr, ...] = ()) -> wire.Candidate | None:
    """`c` as it may be forwarded, or None. Only what the sender can prove is its own survives:
    its server-reflexive address is the one we observe (rewritten to it), mapped, predicted and
    peer-reflexive ports are on the IP we observe, host addresses are private or link-local, or
    that IP. `proven`: addresses other authenticated connections of the sender's identity came
    from (its IPv6 QAD): a global IPv6 address is reachable by anyone, so an IPv6 candidate is
    forwarded only when it is exactly one of those (or ULA), else a peer could make the other side
    probe any host. A RELAY candidate is never forwarded (the Intermediate is the relay)."""
    ip = ipaddress.ip_address(c.addr[0])
    if _implausible(ip, c.addr[1]) or observed is None:
        return None
    seen = ipaddress.ip_address(observed[0])
    if ip.version != seen.version:
        return _screened_other_family(c, ip, proven)
    if c.kind == wire.CandidateKind.SRFLX:
        return c if c.addr == observed else dataclasses.replace(c, addr=observed)
    if c.kind in (wire.CandidateKind.PREDICTED, wire.CandidateKind.PRFLX, wire.CandidateKind.MAPPED):
        return c if ip == seen else None
    if c.kind == wire.CandidateKind.HOST:  # loopback is another host's own: never offered by a peer
        if ip.version == 6 and ip != seen:
            return c if c.addr in proven or _ula(ip) else None
        return c if ip == seen or not (ip.is_global or ip.is_loopback) else None
    return None


def _ula(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """IPv6 unique local (fc00::/7), the IPv6 counterpart of a private IPv4 LAN."""
    return ip in _ULA


_ULA = ipaddress.ip_network("fc00::/7")


def _screened_other_family(c: wire.Candidate, ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                           proven: tuple[Addr, ...]) -> wire.Candidate | None:
    """A candidate of the family the sender's link does not use: only an address it proved, or a
    private one (ULA, RFC 1918) offered as a host candidate."""
    if c.addr in proven:
        return c
    if c.kind != wire.CandidateKind.HOST or ip.is_loopback or ip.is_link_local:
        return None
    return c if (_ula(ip) if ip.version == 6 else not ip.is_global) else None


def screen_candidates(candidates: tuple[wire.Candidate, ...], observed: Addr | None,
                      proven: tuple[Addr, ...] = ()) -> tuple[wire.Candidate, ...]:
    """The candidates of an offer, answer or announcement that the Intermediate forwards: screened
    (`_screened`), without duplicates, at most MAX_FORWARDED_CANDIDATES, in the sender's order."""
    out: list[wire.Candidate] = []
    for c in candidates:
        kept = _screened(c, observed, proven)
        if kept is not None and all(k.addr != kept.addr for k in out):
            out.append(kept)
            if len(out) == MAX_FORWARDED_CANDIDATES:
                break
    return tuple(out)


class IntermediateCore:
    """All protocol state of one Intermediate. `listeners` are the bound addresses, primary first;
    the shell appends to it as it binds. `root` is the deployment's root secret: the role secrets
    clients prove are derived from it (`wire.role_secret`)."""

    def __init__(
        self, root: bytes, metrics: Metrics, *, policy: AccessPolicy | None = None,
        rate_limits: dict[str, tuple[float, float]] | None = None, relay_enabled: bool = True,
        birthday: Birthday = Birthday(), advertise: dict[str, str] | None = None, caps: Caps = Caps(),
    ) -> None:
        if not root:
            raise ValueError("the Intermediate needs the deployment's root secret")
        self.role_secrets = {r: wire.role_secret(root, r) for r in (wire.Role.AGENT, wire.Role.CONNECTOR)}
        self.caps = caps
        self.metrics = metrics
        self.policy = policy or AccessPolicy()
        self.rate_limits = rate_limits
        self.relay_enabled = relay_enabled
        self.birthday = birthday
        # local IP -> the public IP clients reach it at (a cloud's 1:1 NAT, e.g. an Elastic IP): what
        # SERVER_INFO tells classifying clients, who must connect to the alternate listeners
        self.advertise = advertise or {}
        self.listeners: list[Addr] = []
        self.clients: dict[int, Client] = {}
        self.by_peer: dict[Peer, Client] = {}
        self.services: dict[str, list[int]] = {}  # service -> its owner's connections (client ids), newest last
        self.owners: dict[str, str] = {}  # service -> the name of the Connector it belongs to
        self.vacated: dict[str, float] = {}  # service -> when its owner's last registration left
        self.identities: dict[tuple[wire.Role, str], Identity] = {}
        self.sessions: dict[int, Session] = {}
        self.relay_blocked: set[int] = set()  # sessions whose relay is switched off (direct proof)
        # plain ints on the hot path, read by the metrics at scrape time
        self.relayed: dict[str, float] = dict.fromkeys(Direction, 0)
        self.relayed_bytes: dict[str, float] = dict.fromkeys(Direction, 0)
        self.events: deque[Event] = deque()
        # each handler takes the message type it is filed under (Any: a dict cannot say so per key)
        self.handlers: dict[type[wire.Message], Callable[[Client, Any, float], None]] = {
            wire.Register: self._register, wire.OpenSession: self._open_session, wire.Announce: self._announce,
            wire.Offer: self._offer, wire.Answer: self._answer, wire.PunchResult: self._punch_result,
            wire.SessionError: self._session_error, wire.SessionClosed: self._session_closed,
            wire.ChangeRequest: self._change_request, wire.ServerInfoRequest: self._server_info,
            wire.Ping: self._ping, wire.Pong: self._pong, wire.SessionAlive: self._session_alive,
        }
        self._gauges()

    def _gauges(self) -> None:
        m = self.metrics
        m.gauge("clients", lambda: len(self.clients), "connected and authenticated clients")
        m.gauge("sessions", lambda: len(self.sessions), "open relay/signaling sessions")
        m.counter_source("relayed_datagrams_total", "direction", lambda: self.relayed)
        m.counter_source("relayed_bytes_total", "direction", lambda: self.relayed_bytes)
        m.gauge("services", lambda: sum(1 for v in self.services.values() if v), "services with a Connector")
        m.gauge("identities", lambda: len(self.identities), "client identities (role, name) connected")

    # -- outputs --------------------------------------------------------------------------------
    def next_event(self) -> Event | None:
        return self.events.popleft() if self.events else None

    def error(self, kind: str) -> None:
        self.metrics.inc("errors_total", kind=kind)

    # -- inputs ---------------------------------------------------------------------------------
    def control(self, peer: Peer, msg: wire.Message, now: float) -> None:
        """A control message from `peer`."""
        c = self.by_peer.get(peer)
        if c is None:
            if isinstance(msg, wire.Hello):
                self._hello(peer, msg, now)
                return
            self.error("before_hello")
            peer.send_control(wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "say HELLO first"))
            peer.close(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")
            return
        kind = type(msg)
        self.metrics.inc("control_messages_total", type=kind.__name__)
        if not self._within_limits(c, msg, now):
            return
        handler = self.handlers.get(kind)
        if handler is None:
            self.error("unexpected_message")
            req = _request_id(msg)
            peer.send_control(wire.Nack(req or 0, wire.NackCode.BAD_STATE, f"{kind.__name__} is not accepted here"))
            return
        handler(c, msg, now)

    def _within_limits(self, c: Client, msg: wire.Message, now: float) -> bool:
        """Charge the message to its buckets; when one is empty, say so and drop the message."""
        limit = LIMITED.get(type(msg))
        limits = c.identity.limits
        if limits.allow(Limit.CONTROL, now) and (limit is None or limits.allow(limit, now)):
            return True
        self.metrics.inc("rate_limited_total", kind=limit or Limit.CONTROL)
        what = limit or "control messages"
        req, sid = _request_id(msg), _session_id(msg)
        if req is not None:
            c.peer.send_control(wire.Nack(req, wire.NackCode.RATE_LIMITED, f"too many {what}; slow down"))
        elif sid is not None:
            c.peer.send_control(wire.SessionError(sid, wire.NackCode.RATE_LIMITED, f"too many {what}"))
        return False

    def address_changed(self, peer: Peer) -> None:
        """`peer`'s address changed (NAT rebinding, migration): tell it what we see now."""
        self.metrics.inc("address_changes_total")
        c = self.by_peer.get(peer)
        if c is not None:
            self._send_observed(c)

    def closed(self, peer: Peer, reason: str, now: float) -> None:
        """`peer`'s connection is gone: its registrations and sessions go with it."""
        c = self.by_peer.pop(peer, None)
        if c is not None:
            self.drop_client(c, reason, now)

    def expire(self, now: float) -> None:
        """Close sessions idle for longer than `caps.session_idle` and forget owners of services
        vacated for longer than `caps.owner_hold`. The shell calls this on a timer."""
        idle = [s.id for s in self.sessions.values() if now - s.last_active > self.caps.session_idle]
        for sid in idle:
            self.metrics.inc("sessions_expired_total")
            self.close_session(sid, wire.NackCode.BAD_STATE, f"idle for more than {self.caps.session_idle:.0f}s")
        for svc in [s for s, t in self.vacated.items() if now - t > self.caps.owner_hold]:
            del self.vacated[svc]
            self.owners.pop(svc, None)
            self.services.pop(svc, None)

    def reset(self) -> None:
        """Forget every client, service and session at once, as a killed process does."""
        self.clients.clear()
        self.by_peer.clear()
        self.sessions.clear()
        self.services.clear()
        self.owners.clear()
        self.vacated.clear()
        self.identities.clear()

    # -- hello ----------------------------------------------------------------------------------
    @staticmethod
    def _refuse(peer: Peer, code: wire.NackCode, reason: str) -> None:
        """NACK a HELLO and close the connection."""
        peer.send_control(wire.Nack(0, code, reason))
        if code == wire.NackCode.BAD_VERSION:
            peer.close(wire.CLOSE_BAD_VERSION, "bad version")
        else:
            peer.close(wire.CLOSE_UNAUTHENTICATED, "unauthenticated")

    def _hello(self, peer: Peer, msg: wire.Hello, now: float) -> None:
        if msg.version != wire.VERSION:
            self.error("bad_version")
            self._refuse(peer, wire.NackCode.BAD_VERSION, f"server speaks qlab/{wire.VERSION}")
            return
        if not any(wire.check_hello(s, msg, peer.binding) for s in self._secrets_for(msg)):
            self.error("unauthenticated")
            self.metrics.inc("auth_failures_total")
            log.warning("refused %s %r from %s: bad secret", msg.role.name.lower(), msg.name, peer.address)
            self._refuse(peer, wire.NackCode.UNAUTHENTICATED, "bad secret for this role")
            return
        refused = self.policy.admits(msg)
        if refused is not None:
            self.error("not_allowed")
            self._refuse(peer, wire.NackCode.NOT_ALLOWED, refused)
            return
        identity = self.identities.get((msg.role, msg.name))
        if identity is None:
            identity = self.identities[msg.role, msg.name] = Identity(ClientLimits(now, self.rate_limits))
        identity.connections += 1
        c = Client(self._new_id(self.clients), peer, msg.role, msg.name, identity)
        self._note_address(c)
        self.clients[c.id] = c
        self.by_peer[peer] = c
        self.metrics.inc("hellos_total", role=msg.role.name.lower())
        peer.send_control(wire.Welcome(wire.VERSION, c.id, peer.max_app_payload))
        self._send_observed(c)
        log.info("%s %s connected from %s:%d", msg.role.name.lower(), msg.name, *(peer.address or ("?", 0)))

    def _secrets_for(self, hello: wire.Hello) -> list[bytes]:
        """What this HELLO's tag may be made with: a policy-named client's own secret, else its
        role's secret (a probe: either client role's)."""
        own = self.policy.own_secret(hello.name)
        if own:
            return [own]
        if hello.role == wire.Role.PROBE:
            return list(self.role_secrets.values())
        return [self.role_secrets[hello.role]]

    def _note_address(self, c: Client) -> None:
        """Remember where an authenticated connection came from (the handshake validated it). A
        probe connection (QAD) counts for the Agent and Connector identities of the same name:
        that is how a side proves its IPv6 address while its link runs over IPv4."""
        c.identity.saw(c.peer.address)
        if c.role == wire.Role.PROBE:
            for role in (wire.Role.AGENT, wire.Role.CONNECTOR):
                ident = self.identities.get((role, c.name))
                if ident is not None:
                    ident.saw(c.peer.address)

    @staticmethod
    def _new_id(taken: dict[int, Any]) -> int:
        while True:
            i = secrets.randbits(32)
            if i and i not in taken:
                return i

    def _send_observed(self, c: Client) -> None:
        """QAD: the address this client's packets come from."""
        addr = c.peer.address
        if addr is None:
            return
        c.observed_seq += 1
        c.peer.send_control(wire.ObservedAddress(c.observed_seq, addr))

    # -- registration and sessions --------------------------------------------------------------
    def _register(self, c: Client, msg: wire.Register, now: float) -> None:
        if not self.policy.may_use(c.name, c.role, msg.service):
            self.error("not_allowed")
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, f"{c.name} may not use {msg.service!r}"))
            return
        if c.role == wire.Role.CONNECTOR:
            if not self._take_service(c, msg.service, now):
                self.error("service_owned")
                c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, f"{msg.service!r} belongs to another connector"))
                return
        elif c.role != wire.Role.AGENT:
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "probes do not register"))
            return
        c.services.add(msg.service)
        self.metrics.inc("registrations_total", role=c.role.name.lower())
        c.peer.send_control(wire.Ack(msg.req))
        log.info("%s %s registered for %s", c.role.name.lower(), c.name, msg.service)

    def _take_service(self, c: Client, service: str, now: float) -> bool:
        """Register `c` for `service` unless another identity owns it. The owner's newest
        connection takes the service's new sessions (a restarted Connector replaces its old one);
        ownership passes only after the owner has been gone for `caps.owner_hold`."""
        owner = self.owners.get(service)
        vacated = self.vacated.get(service)
        if owner is not None and owner != c.name and (vacated is None or now - vacated <= self.caps.owner_hold):
            return False
        if owner != c.name:
            self.services[service] = []
        self.owners[service] = c.name
        self.vacated.pop(service, None)
        ids = self.services.setdefault(service, [])
        if c.id in ids:
            ids.remove(c.id)
        ids.append(c.id)
        return True

    def connector_for(self, service: str) -> Client | None:
        """The owner's newest registered connection to `service` that is still up."""
        for cid in reversed(self.services.get(service, [])):
            c = self.clients.get(cid)
            if c is not None and not c.peer.closed:
                return c
        return None

    def _open_session(self, c: Client, msg: wire.OpenSession, now: float) -> None:
        connector = self._session_refused(c, msg, now)
        if connector is None:
            return
        sid = msg.session
        key = new_session_key()
        limit = min(c.peer.max_app_payload, connector.peer.max_app_payload)
        candidates = self._screen(c, msg.candidates)
        sess = Session(sid, msg.service, c.id, connector.id, key, c.identity, now,
                       offer=wire.Offer(sid, msg.nat, candidates))
        self.sessions[sid] = sess
        c.sessions.add(sid)
        connector.sessions.add(sid)
        c.identity.sessions += 1
        self.metrics.inc("sessions_total")
        connector.peer.send_control(wire.SessionNew(sid, key, c.name, msg.service, limit, msg.nat, candidates))
        c.peer.send_control(wire.SessionOpened(msg.req, sid, key, connector.name, limit))
        for data in c.held.take(now, sid):
            self.datagram(c.peer, data, now)
        if connector.announced is not None:  # the Connector's side is known: punch now
            sess.answer = wire.Answer(sid, connector.announced.nat, connector.announced.candidates)
            self._start_punch(sess, c, connector)

    def _session_refused(self, c: Client, msg: wire.OpenSession, now: float) -> Client | None:
        """The Connector a new session would go to, or None after refusing it."""
        if c.role != wire.Role.AGENT:
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "only agents open sessions"))
            return None
        if not self.policy.may_use(c.name, c.role, msg.service):
            self.error("not_allowed")
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, f"{c.name} may not reach {msg.service!r}"))
            return None
        if c.identity.sessions >= self.caps.sessions_per_identity or len(self.sessions) >= self.caps.sessions:
            self.metrics.inc("rate_limited_total", kind="open_sessions")
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.RATE_LIMITED, "too many open sessions"))
            return None
        connector = self.connector_for(msg.service)
        if connector is None:
            self.error("no_connector")
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NO_CONNECTOR, f"no connector for {msg.service!r}"))
            return None
        if msg.session == 0 or msg.session in self.sessions:
            # Checked last, and one answer whatever the reason: a taken id (another agent's) is told
            # apart only from a session that opens, which costs the prober a session of its budget.
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.BAD_STATE, SESSION_ID_REFUSED))
            return None
        return connector

    def close_session(self, sid: int, code: wire.NackCode, reason: str, notify: Client | None = None) -> None:
        """End a session; both parties hear of it except `notify`, who ended it."""
        s = self.sessions.pop(sid, None)
        if s is None:
            return
        self.relay_blocked.discard(sid)
        s.opener.sessions -= 1
        for cid in (s.agent, s.connector):
            c = self.clients.get(cid)
            if c is not None:
                c.sessions.discard(sid)
                if c is not notify:
                    c.peer.send_control(wire.SessionClosed(sid, code, reason))

    def drop_client(self, client: Client, reason: str, now: float) -> None:
        if self.clients.pop(client.id, None) is None:
            return
        self.by_peer.pop(client.peer, None)
        for svc in client.services:
            ids = self.services.get(svc, [])
            if client.id in ids:
                ids.remove(client.id)
                if not ids:
                    self.vacated[svc] = now  # the owner's hold starts
        gone = f"{client.role.name.lower()} {client.name} left"
        for sid in list(client.sessions):
            self.close_session(sid, wire.NackCode.PEER_GONE, gone, notify=client)
        client.identity.connections -= 1
        if client.identity.connections <= 0 and client.identity.sessions <= 0:
            self.identities.pop((client.role, client.name), None)
        log.info("%s %s left (%s)", client.role.name.lower(), client.name, reason)

    # -- signaling ------------------------------------------------------------------------------
    def _announce(self, c: Client, msg: wire.Announce, now: float) -> None:
        if c.role != wire.Role.CONNECTOR:
            c.peer.send_control(wire.Nack(0, wire.NackCode.NOT_ALLOWED, "only connectors announce candidates"))
            return
        c.announced = wire.Announce(msg.nat, self._screen(c, msg.candidates))

    def _screen(self, c: Client, candidates: tuple[wire.Candidate, ...]) -> tuple[wire.Candidate, ...]:
        """`screen_candidates` against the address we observe `c` at, counting what it removed."""
        kept = screen_candidates(candidates, c.peer.address, tuple(c.identity.seen_at))
        changed = len(candidates) - sum(1 for k in kept if k in candidates)
        if changed:
            self.metrics.inc("candidates_screened_total", changed)
        return kept

    def _session_for(self, c: Client, sid: int, now: float) -> Session | None:
        sess = self.sessions.get(sid)
        if sess is None or c.id not in (sess.agent, sess.connector):
            # unknown and foreign sessions get the same answer: no oracle for session ids
            self.error("not_session_party")
            c.peer.send_control(wire.SessionError(sid, wire.NackCode.NO_SUCH_SESSION, "no such session"))
            return None
        sess.last_active = now
        return sess

    def _forward(self, c: Client, sess: Session, msg: wire.Message) -> None:
        """Pass a signaling message on to the session's other party, if still connected."""
        other = self.clients.get(sess.other(c.id))
        if other is not None:
            other.peer.send_control(msg)

    def _offer(self, c: Client, msg: wire.Offer, now: float) -> None:
        sess = self._session_for(c, msg.session, now)
        if sess is None:
            return
        if c.id != sess.agent:
            c.peer.send_control(wire.SessionError(msg.session, wire.NackCode.BAD_STATE, "only the agent offers"))
            return
        sess.offer = wire.Offer(msg.session, msg.nat, self._screen(c, msg.candidates))
        sess.answer = None
        self._forward(c, sess, sess.offer)

    def _answer(self, c: Client, msg: wire.Answer, now: float) -> None:
        sess = self._session_for(c, msg.session, now)
        if sess is None:
            return
        if c.id != sess.connector or sess.offer is None:
            c.peer.send_control(wire.SessionError(msg.session, wire.NackCode.BAD_STATE, "answer without offer"))
            return
        sess.answer = wire.Answer(msg.session, msg.nat, self._screen(c, msg.candidates))
        agent = self.clients.get(sess.agent)
        if agent is not None:
            self._start_punch(sess, agent, c)

    def _start_punch(self, sess: Session, agent: Client, connector: Client) -> None:
        """Tell both sides to start so that their first probes cross: each StartPunch is delayed
        by the difference of the two one-way times plus a margin."""
        assert sess.offer is not None and sess.answer is not None
        half = {c.id: (c.peer.rtt or DEFAULT_RTT) / 2 for c in (agent, connector)}
        latest = max(half.values())
        sides: tuple[tuple[Client, wire.Offer | wire.Answer, wire.Offer | wire.Answer], ...] = (
            (agent, sess.offer, sess.answer), (connector, sess.answer, sess.offer))
        for me, own, peer in sides:
            delay = int((latest - half[me.id]) * 1000) + PUNCH_MARGIN_MS
            birthday = self.birthday.count(own.nat, peer.nat)
            me.peer.send_control(wire.StartPunch(sess.id, min(delay, MAX_PUNCH_DELAY_MS), peer.nat, peer.candidates, birthday))
        self.metrics.inc("punches_started_total")

    def _punch_result(self, c: Client, msg: wire.PunchResult, now: float) -> None:
        sess = self._session_for(c, msg.session, now)
        if sess is None:
            return
        self.metrics.inc("punch_results_total", success=str(bool(msg.success)).lower())
        self._forward(c, sess, msg)

    def _session_error(self, c: Client, msg: wire.SessionError, now: float) -> None:
        sess = self._session_for(c, msg.session, now)
        if sess is not None:
            self._forward(c, sess, msg)

    def _session_closed(self, c: Client, msg: wire.SessionClosed, now: float) -> None:
        if self._session_for(c, msg.session, now) is not None:
            self.close_session(msg.session, msg.code, msg.reason, notify=c)

    # -- classification and liveness ------------------------------------------------------------
    def alternate(self, listener: int, alt_ip: bool, alt_port: bool) -> int | None:
        """The listener that differs from `listener` in IP and/or port as asked (RFC 5780)."""
        base = self.listeners[listener]
        for i, addr in enumerate(self.listeners):
            if (addr[0] != base[0]) == alt_ip and (addr[1] != base[1]) == alt_port:
                return i
        return None

    def _change_request(self, c: Client, msg: wire.ChangeRequest, now: float) -> None:
        alt = self.alternate(c.peer.listener, bool(msg.alt_ip), bool(msg.alt_port))
        addr = c.peer.validated_address  # never an address the client migrated to without proving it
        if alt is None or addr is None:
            c.peer.send_control(wire.Nack(msg.req, wire.NackCode.NOT_ALLOWED, "no such alternate listener"))
            return
        self.events.append(SendClassifyTest(alt, addr, msg.nonce))
        self.metrics.inc("change_requests_total")
        c.peer.send_control(wire.Ack(msg.req))

    def _server_info(self, c: Client, msg: wire.ServerInfoRequest, now: float) -> None:
        addrs = [(self.advertise.get(ip, ip), port) for ip, port in self.listeners]
        primary = addrs[0]
        alternate = next((a for a in addrs if a[0] != primary[0] and a[1] != primary[1]), primary)
        c.peer.send_control(wire.ServerInfo(msg.req, primary, alternate))

    def _session_alive(self, c: Client, msg: wire.SessionAlive, now: float) -> None:
        """A party says its session is in use (on the direct path the Intermediate sees nothing)."""
        self._session_for(c, msg.session, now)  # refreshes last_active; a non-party gets the usual answer

    def _ping(self, c: Client, msg: wire.Ping, now: float) -> None:
        c.peer.send_control(wire.Pong(msg.nonce))

    def _pong(self, c: Client, msg: wire.Pong, now: float) -> None:
        pass

    # -- relay ----------------------------------------------------------------------------------
    def datagram(self, peer: Peer, data: bytes, now: float) -> None:
        """A DATAGRAM from `peer`: relay it to the other party of its session, or drop it."""
        c = self.by_peer.get(peer)
        if c is None:
            self.error("datagram_unauthenticated")
            return
        try:
            sid = wire.relayed_session(data)  # sealed or not, the relay reads no further
        except wire.WireError:
            self.error("datagram_malformed")
            return
        sess = self.sessions.get(sid)
        if sess is None and c.role == wire.Role.AGENT and c.held.hold(now, sid, data):
            return  # the OpenSession carrying this id is probably in the same packet
        if sess is None or c.id not in (sess.agent, sess.connector):
            self.error("datagram_foreign_session")
            return
        sess.last_active = now
        if not self.relay_enabled or sid in self.relay_blocked:
            self.metrics.inc("relay_blocked_total")
            return
        self._relay(c, sess, data)

    def raw_datagram(self, data: bytes, src: Addr, now: float) -> None:
        """A sealed packet as a raw frame (`wire.RAW_SEALED`) from `src`: forwarded to the session's
        other party when it carries a party's relay tag and comes from that party's validated
        address; otherwise dropped, with no state kept and nothing sent."""
        try:
            sid, tag, packet = wire.decode_raw_sealed(data)
        except wire.WireError:
            self.metrics.inc("relay_raw_dropped_total", why="malformed")
            return
        sess = self.sessions.get(sid)
        if sess is None:
            self.metrics.inc("relay_raw_dropped_total", why="unknown_session")
            return
        if hmac.compare_digest(tag, sess.tags[0]):
            sender = self.clients.get(sess.agent)
        elif hmac.compare_digest(tag, sess.tags[1]):
            sender = self.clients.get(sess.connector)
        else:
            self.metrics.inc("relay_raw_dropped_total", why="bad_tag")
            return
        if sender is None or sender.peer.validated_address != src:  # a copied tag from elsewhere
            self.metrics.inc("relay_raw_dropped_total", why="address")
            return
        sess.last_active = now
        if not self.relay_enabled or sid in self.relay_blocked:
            self.metrics.inc("relay_blocked_total")
            return
        to_connector = sender.id == sess.agent
        other = self.clients.get(sess.other(sender.id))
        if other is None:
            self.error("relay_peer_gone")
            return
        other.peer.send_raw(wire.encode_raw_relayed(sid, packet))
        self._count(Direction.TO_CONNECTOR if to_connector else Direction.TO_AGENT, len(packet))

    def _count(self, direction: Direction, nbytes: int) -> None:
        self.relayed[direction] += 1
        self.relayed_bytes[direction] += nbytes

    def _relay(self, c: Client, sess: Session, data: bytes) -> None:
        to_connector = c.id == sess.agent
        other = self.clients.get(sess.connector if to_connector else sess.agent)
        if other is None:
            self.error("relay_peer_gone")
            return
        try:
            ok = other.peer.send_datagram(data)
        except DatagramTooLarge as exc:
            self.error("relay_oversized")
            c.peer.send_control(wire.SessionError(sess.id, wire.NackCode.TOO_LARGE, str(exc)))
            return
        direction = Direction.TO_CONNECTOR if to_connector else Direction.TO_AGENT
        if ok:
            self._count(direction, len(data) - wire.DGRAM_HEADER)
        else:
            self.metrics.inc("relay_dropped_total", direction=direction)
