"""The Intermediate's sans-IO core, driven with fake peers: no TLS, no sockets, no event loop.

Each row is a list of steps (a control message or a DATAGRAM from a named client, a client leaving,
time passing) and what every fake peer received, in order: peers a row does not name received
nothing. The cast: agents alice and bob, connectors edge1 and edge2, a probe; all said a valid HELLO
first unless a row says otherwise (what the HELLO itself brought is cleared before the steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from qlab import wire
from qlab.endpoint import DatagramTooLarge
from qlab.net import Addr
from qlab.roles.intermediate_core import Birthday, Caps, IntermediateCore, SendClassifyTest, screen_candidates
from qlab.roles.metrics import Metrics
from qlab.roles.policy import AccessPolicy, ClientRule

SECRET = b"deployment-secret-0123456789"
ALICE_SECRET = b"alice's-own-secret-0123"
A, C, P = wire.Role.AGENT, wire.Role.CONNECTOR, wire.Role.PROBE
CAST = {"alice": A, "bob": A, "edge1": C, "edge2": C, "probe": P, "edge1b": C, "alice2": A}
HELLO_AS = {"edge1b": "edge1", "alice2": "alice"}  # second connections of the same identity
LISTENERS = [("192.0.2.1", 4433), ("192.0.2.1", 4434), ("192.0.2.2", 4433), ("192.0.2.2", 4434)]
N = wire.NackCode
SID = 7  # alice's session with the service "echo"


@dataclass(eq=False)
class FakePeer:
    """A `Peer` that writes down everything the core did to it, as short tuples (see `summary`)."""

    name: str
    address: Addr | None
    validated: Addr | None = None  # None: the address is validated (no migration pending)
    binding: bytes = b"scid-0001"
    listener: int = 0
    max_app_payload: int = 1200
    rtt: float | None = 0.02
    closed: bool = False
    accepts: bool = True  # False: every datagram is dropped (a full queue)
    got: list[tuple[Any, ...]] = field(default_factory=list)
    messages: list[wire.Message] = field(default_factory=list)  # the control messages themselves

    @property
    def validated_address(self) -> Addr | None:
        return self.validated or self.address

    def send_control(self, msg: wire.Message) -> None:
        self.got.append(summary(msg))
        self.messages.append(msg)

    def send_datagram(self, data: bytes) -> bool:
        if len(data) > self.max_app_payload + wire.DGRAM_HEADER:
            raise DatagramTooLarge(f"datagram of {len(data)} bytes exceeds this connection's limit")
        if self.accepts:
            if data[0] == wire.DGRAM_SEALED:
                self.got.append(("sealed", *wire.decode_sealed(data)))
            else:
                self.got.append(("dgram", *wire.decode_app(data)))
        return self.accepts

    def send_raw(self, data: bytes) -> None:
        self.got.append(("raw", *wire.decode_raw_relayed(data), self.validated_address))

    def close(self, code: int, reason: str) -> None:
        self.got.append(("close", code))


_SUMMARY: dict[type[wire.Message], Callable[[Any], tuple[Any, ...]]] = {
    wire.Ack: lambda m: ("Ack", m.req),
    wire.Nack: lambda m: ("Nack", m.req, m.code),
    wire.Welcome: lambda m: ("Welcome", m.max_relay_payload),
    wire.ObservedAddress: lambda m: ("Observed", m.seq, m.addr),
    wire.SessionNew: lambda m: ("SessionNew", m.session, m.agent, m.max_payload),
    wire.SessionOpened: lambda m: ("SessionOpened", m.req, m.session, m.connector, m.max_payload),
    wire.SessionError: lambda m: ("SessionError", m.session, m.code),
    wire.SessionClosed: lambda m: ("SessionClosed", m.session, m.code),
    wire.Offer: lambda m: ("Offer", m.session, m.nat),
    wire.Answer: lambda m: ("Answer", m.session, m.nat),
    wire.StartPunch: lambda m: ("StartPunch", m.session, m.peer_nat, m.birthday),
    wire.PunchResult: lambda m: ("PunchResult", m.session, m.success),
    wire.ServerInfo: lambda m: ("ServerInfo", m.req, m.primary, m.alternate),
    wire.Pong: lambda m: ("Pong", m.nonce),
}


def summary(msg: wire.Message) -> tuple[Any, ...]:
    return _SUMMARY[type(msg)](msg)


def role_secret(role: wire.Role) -> bytes:
    """What a client of `role` holds: its role's secret (a probe: the Agent's)."""
    return wire.role_secret(SECRET, wire.Role.AGENT if role == wire.Role.PROBE else role)


def hello(name: str, role: wire.Role | None = None, secret: bytes | None = None, version: int = wire.VERSION,
          binding: bytes = b"scid-0001") -> wire.Hello:
    role = role or CAST[name]
    secret = role_secret(role) if secret is None else secret
    return wire.Hello(version, role, name, wire.hello_auth(secret, role, name, binding))


def open_session(req: int = 1, sid: int = SID, service: str = "echo", nat: wire.NatKind = wire.NatKind.EIM) -> wire.OpenSession:
    return wire.OpenSession(req, sid, service, nat, ())


# -- steps ----------------------------------------------------------------------------------------
@dataclass
class World:
    core: IntermediateCore
    peers: dict[str, FakePeer]
    now: float = 100.0


@dataclass
class Send:
    """A control message from `who`."""

    who: str
    msg: wire.Message

    def apply(self, w: World) -> None:
        w.core.control(w.peers[self.who], self.msg, w.now)


@dataclass
class Relay:
    """A DATAGRAM from `who` for session `sid` (or `raw` bytes as they came)."""

    who: str
    sid: int = SID
    payload: bytes = b"hi"
    raw: bytes | None = None

    def apply(self, w: World) -> None:
        data = self.raw if self.raw is not None else wire.encode_app(self.sid, self.payload)
        w.core.datagram(w.peers[self.who], data, w.now)


@dataclass
class RawRelay:
    """A raw sealed frame from `who`'s address (or `src`) for session `sid`, with the relay tag of
    the party `tag_of` (default: `who`'s role in the session), or `raw` bytes as they came."""

    who: str
    tag_of: wire.Role | None = None
    src: Addr | None = None
    sid: int = SID
    packet: bytes = b"\x40sealed"
    raw: bytes | None = None

    def apply(self, w: World) -> None:
        sess = w.core.sessions.get(SID)
        role = self.tag_of or (wire.Role.AGENT if self.who == "alice" else wire.Role.CONNECTOR)
        tag = wire.relay_tag(sess.key, SID, role) if sess is not None else bytes(8)
        data = self.raw if self.raw is not None else wire.encode_raw_sealed(self.sid, tag, self.packet)
        w.core.raw_datagram(data, self.src or w.peers[self.who].address, w.now)


@dataclass
class Leave:
    who: str

    def apply(self, w: World) -> None:
        w.peers[self.who].closed = True
        w.core.closed(w.peers[self.who], "gone", w.now)


@dataclass
class Wait:
    seconds: float

    def apply(self, w: World) -> None:
        w.now += self.seconds


@dataclass
class BlockRelay:
    """Switch the relay off for one session (a trial's direct-path proof)."""

    sid: int = SID

    def apply(self, w: World) -> None:
        w.core.relay_blocked.add(self.sid)


@dataclass
class Tweak:
    """Change a fake peer's property (its RTT, payload limit, queue)."""

    who: str
    attr: str
    value: Any

    def apply(self, w: World) -> None:
        setattr(w.peers[self.who], self.attr, self.value)


@dataclass
class Expire:
    """The shell's expiry timer fires."""

    def apply(self, w: World) -> None:
        w.core.expire(w.now)


Step = Send | Relay | Leave | Wait | BlockRelay | Tweak | Expire


@dataclass
class Row:
    steps: list[Step]
    expect: dict[str, list[tuple[Any, ...]]]  # peer -> all it received, in order
    core: dict[str, Any] = field(default_factory=dict)  # IntermediateCore options
    connected: tuple[str, ...] = tuple(CAST)
    counters: dict[tuple[str, str, str], float] = field(default_factory=dict)  # (name, label, value) -> count
    events: list[SendClassifyTest] = field(default_factory=list)


def run(row: Row) -> World:
    core = IntermediateCore(SECRET, Metrics(), **row.core)
    core.listeners.extend(LISTENERS)
    peers = {name: FakePeer(name, (f"198.51.100.{i}", 40000 + i)) for i, name in enumerate(CAST, 1)}
    w = World(core, peers)
    for name in row.connected:
        peers[name].binding = f"scid-{name}".encode()
        core.control(peers[name], hello(HELLO_AS.get(name, name), CAST[name], binding=peers[name].binding), w.now)
    for p in peers.values():
        p.got.clear()
    for step in row.steps:
        step.apply(w)
    assert {n: p.got for n, p in peers.items() if p.got} == row.expect
    for (name, label, value), count in row.counters.items():
        labels = {label: value} if label else {}
        assert core.metrics.get(name, **labels) == count, (name, label, value)
    assert list(core.events) == row.events
    return w


# a session alice <-> edge1 for "echo", and what it brings each side
ECHO = [Send("edge1", wire.Register(1, "echo")), Send("alice", open_session())]
ECHO_GOT = {"edge1": [("Ack", 1), ("SessionNew", SID, "alice", 1200)], "alice": [("SessionOpened", 1, SID, "edge1", 1200)]}


def echo_then(extra: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """ECHO_GOT followed by `extra`."""
    out = {k: list(v) for k, v in ECHO_GOT.items()}
    for k, v in extra.items():
        out.setdefault(k, []).extend(v)
    return out


ONLY_ECHO = AccessPolicy(default_allow=False, clients={
    "alice": ClientRule(A, b"", frozenset({"echo"})),
    "edge1": ClientRule(C, b"", frozenset({"echo"})),
})


# -- ownership: who may register a service, re-register, take it over ------------------------------
OWNERSHIP = [
    pytest.param(Row([Send("edge1", wire.Register(1, "echo"))], {"edge1": [("Ack", 1)]}), id="connector registers"),
    pytest.param(Row([Send("alice", wire.Register(1, "echo"))], {"alice": [("Ack", 1)]}), id="agent registers"),
    pytest.param(Row([Send("probe", wire.Register(1, "echo"))], {"probe": [("Nack", 1, N.NOT_ALLOWED)]}),
                 id="probe may not register"),
    pytest.param(Row([Send("edge1", wire.Register(1, "ssh")), Send("edge1", wire.Register(2, "echo"))],
                     {"edge1": [("Nack", 1, N.NOT_ALLOWED), ("Ack", 2)]}, core={"policy": ONLY_ECHO}),
                 id="policy limits a connector to its services"),
    pytest.param(Row([Send("edge2", wire.Register(1, "echo"))], {"edge2": [("Nack", 1, N.NOT_ALLOWED)]},
                     core={"policy": ONLY_ECHO}), id="default deny: unnamed connector"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("edge1", wire.Register(2, "echo")),
                      Send("alice", open_session())],
                     {"edge1": [("Ack", 1), ("Ack", 2), ("SessionNew", SID, "alice", 1200)],
                      "alice": [("SessionOpened", 1, SID, "edge1", 1200)]}), id="re-register is idempotent"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("edge2", wire.Register(1, "echo")),
                      Send("alice", open_session())],
                     {"edge1": [("Ack", 1), ("SessionNew", SID, "alice", 1200)], "edge2": [("Nack", 1, N.NOT_ALLOWED)],
                      "alice": [("SessionOpened", 1, SID, "edge1", 1200)]},
                     counters={("errors_total", "kind", "service_owned"): 1}), id="a second identity cannot take a service"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("edge1b", wire.Register(1, "echo")),
                      Send("alice", open_session())],
                     {"edge1": [("Ack", 1)], "edge1b": [("Ack", 1), ("SessionNew", SID, "alice", 1200)],
                      "alice": [("SessionOpened", 1, SID, "edge1", 1200)]}), id="the owner's newest connection serves"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Leave("edge1"), Send("edge1b", wire.Register(1, "echo")),
                      Send("alice", open_session())],
                     {"edge1": [("Ack", 1)], "edge1b": [("Ack", 1), ("SessionNew", SID, "alice", 1200)],
                      "alice": [("SessionOpened", 1, SID, "edge1", 1200)]}), id="a restarted owner takes its service back"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("edge1b", wire.Register(1, "echo")),
                      Leave("edge1b"), Send("alice", open_session())],
                     {"edge1": [("Ack", 1), ("SessionNew", SID, "alice", 1200)], "edge1b": [("Ack", 1)],
                      "alice": [("SessionOpened", 1, SID, "edge1", 1200)]}), id="the owner's older connection serves when newest leaves"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Leave("edge1"), Send("edge2", wire.Register(1, "echo")),
                      Wait(301.0), Send("edge2", wire.Register(2, "echo")), Send("alice", open_session())],
                     {"edge1": [("Ack", 1)], "edge2": [("Nack", 1, N.NOT_ALLOWED), ("Ack", 2), ("SessionNew", SID, "alice", 1200)],
                      "alice": [("SessionOpened", 1, SID, "edge2", 1200)]}),
                 id="a vacated service passes to another identity only after the owner hold"),
    pytest.param(Row([Send("edge2", wire.Register(1, "echo")), Send("edge2", wire.Register(2, "ssh"))],
                     {"edge2": [("Nack", 1, N.NOT_ALLOWED), ("Ack", 2)]},
                     core={"policy": AccessPolicy(clients={"edge1": ClientRule(C, b"", frozenset({"echo"}))})}),
                 id="a service the policy gives a named connector: no unnamed one, even with default allow"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Tweak("edge1", "closed", True),
                      Send("alice", open_session())],
                     {"edge1": [("Ack", 1)], "alice": [("Nack", 1, N.NO_CONNECTOR)]},
                     counters={("errors_total", "kind", "no_connector"): 1}), id="a closing connector serves nobody"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("alice", open_session(service="ssh"))],
                     {"edge1": [("Ack", 1)], "alice": [("Nack", 1, N.NO_CONNECTOR)]}), id="unregistered service"),
]


@pytest.mark.parametrize("row", OWNERSHIP)
def test_ownership(row: Row) -> None:
    run(row)


# -- policy: HELLO and what a client may reach -------------------------------------------------------
OWN_SECRET = AccessPolicy(clients={"alice": ClientRule(A, ALICE_SECRET, frozenset({"echo"}))})
POLICY = [
    pytest.param(Row([Send("alice", hello("alice"))],
                     {"alice": [("Welcome", 1200), ("Observed", 1, ("198.51.100.1", 40001))]}, connected=()),
                 id="valid hello: welcome and QAD"),
    pytest.param(Row([Send("alice", hello("alice", secret=b"wrong-secret-0123456789"))],
                     {"alice": [("Nack", 0, N.UNAUTHENTICATED), ("close", wire.CLOSE_UNAUTHENTICATED)]}, connected=(),
                     counters={("auth_failures_total", "", ""): 1}), id="wrong secret"),
    pytest.param(Row([Send("alice", hello("alice", version=9))],
                     {"alice": [("Nack", 0, N.BAD_VERSION), ("close", wire.CLOSE_BAD_VERSION)]}, connected=()),
                 id="wrong version"),
    pytest.param(Row([Send("alice", wire.Register(1, "echo")), Send("alice", hello("alice"))],
                     {"alice": [("Nack", 0, N.UNAUTHENTICATED), ("close", wire.CLOSE_UNAUTHENTICATED),
                                ("Welcome", 1200), ("Observed", 1, ("198.51.100.1", 40001))]}, connected=(),
                     counters={("errors_total", "kind", "before_hello"): 1}), id="nothing before hello"),
    pytest.param(Row([Send("alice", hello("alice", role=C))],
                     {"alice": [("Nack", 0, N.NOT_ALLOWED), ("close", wire.CLOSE_UNAUTHENTICATED)]}, connected=(),
                     core={"policy": ONLY_ECHO}), id="a named client in another role"),
    pytest.param(Row([Send("alice", hello("alice")), Send("bob", hello("alice", secret=ALICE_SECRET))],
                     {"alice": [("Nack", 0, N.UNAUTHENTICATED), ("close", wire.CLOSE_UNAUTHENTICATED)],
                      "bob": [("Welcome", 1200), ("Observed", 1, ("198.51.100.2", 40002))]},
                     connected=(), core={"policy": OWN_SECRET}), id="a named client proves its own secret"),
    pytest.param(Row([*ECHO], ECHO_GOT, core={"policy": ONLY_ECHO}), id="allowed agent opens a session"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("bob", open_session())],
                     {"edge1": [("Ack", 1)], "bob": [("Nack", 1, N.NOT_ALLOWED)]}, core={"policy": ONLY_ECHO},
                     counters={("errors_total", "kind", "not_allowed"): 1}), id="unnamed agent denied by default"),
    pytest.param(Row([Send("edge1", open_session())], {"edge1": [("Nack", 1, N.NOT_ALLOWED)]}),
                 id="only agents open sessions"),
    pytest.param(Row([Send("alice", hello("alice")), Send("alice", wire.Welcome(1, 1, 1))],
                     {"alice": [("Nack", 0, N.BAD_STATE), ("Nack", 0, N.BAD_STATE)]},
                     counters={("errors_total", "kind", "unexpected_message"): 2}), id="messages not for a server"),
]


@pytest.mark.parametrize("row", POLICY)
def test_policy(row: Row) -> None:
    run(row)


# -- limits: rate limits per client and kind; session ids ------------------------------------------
CONTROL_ONLY = {"control": (0.0, 2.0)}
SESSIONS_2 = {"control": (1000.0, 1000.0), "session": (1.0, 2.0)}
LIMITS = [
    pytest.param(Row([Send("edge1", wire.Register(1, "echo"))] + [Send("alice", open_session(i, SID + i)) for i in (1, 2, 3)],
                     {"edge1": [("Ack", 1), ("SessionNew", SID + 1, "alice", 1200), ("SessionNew", SID + 2, "alice", 1200)],
                      "alice": [("SessionOpened", 1, SID + 1, "edge1", 1200), ("SessionOpened", 2, SID + 2, "edge1", 1200),
                                ("Nack", 3, N.RATE_LIMITED)]},
                     core={"rate_limits": SESSIONS_2}, counters={("rate_limited_total", "kind", "session"): 1}),
                 id="session rate: a burst, then refused"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("alice", open_session(1, 1)), Send("alice", open_session(2, 2)),
                      Send("alice", open_session(3, 3)), Wait(1.0), Send("alice", open_session(4, 4))],
                     {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200), ("SessionNew", 2, "alice", 1200),
                                ("SessionNew", 4, "alice", 1200)],
                      "alice": [("SessionOpened", 1, 1, "edge1", 1200), ("SessionOpened", 2, 2, "edge1", 1200),
                                ("Nack", 3, N.RATE_LIMITED), ("SessionOpened", 4, 4, "edge1", 1200)]},
                     core={"rate_limits": SESSIONS_2}), id="session rate recovers with time"),
    pytest.param(Row([*ECHO, Send("alice", wire.Offer(SID, wire.NatKind.EIM, ())), Send("alice", wire.Offer(SID, wire.NatKind.EIM, ()))],
                     echo_then({"edge1": [("Offer", SID, wire.NatKind.EIM)], "alice": [("SessionError", SID, N.RATE_LIMITED)]}),
                     core={"rate_limits": {"control": (1000.0, 1000.0), "session": (0.0, 2.0)}}),
                 id="offers share the session bucket"),
    pytest.param(Row([Send("alice", wire.Ping(1)), Send("alice", wire.Ping(2)), Send("alice", wire.Ping(3)),
                      Send("bob", wire.Ping(4))],
                     {"alice": [("Pong", 1), ("Pong", 2)], "bob": [("Pong", 4)]}, core={"rate_limits": CONTROL_ONLY},
                     counters={("rate_limited_total", "kind", "control"): 1}), id="control rate is per client"),
    pytest.param(Row([Send("alice", wire.Ping(1)), Send("alice", wire.Ping(2)), Send("alice", wire.Register(3, "echo"))],
                     {"alice": [("Pong", 1), ("Pong", 2), ("Nack", 3, N.RATE_LIMITED)]}, core={"rate_limits": CONTROL_ONLY}),
                 id="control rate refuses a request with a NACK"),
    pytest.param(Row([Send("edge1", wire.Register(i, "echo")) for i in range(1, 12)],
                     {"edge1": [("Ack", i) for i in range(1, 11)] + [("Nack", 11, N.RATE_LIMITED)]},
                     counters={("rate_limited_total", "kind", "register"): 1}), id="default register burst is 10"),
    pytest.param(Row([*ECHO, Send("alice", open_session(2, SID))],
                     echo_then({"alice": [("Nack", 2, N.BAD_STATE)]})), id="a session id is taken once"),
    pytest.param(Row([Send("edge1", wire.Register(1, "echo")), Send("alice", open_session(1, 0))],
                     {"edge1": [("Ack", 1)], "alice": [("Nack", 1, N.BAD_STATE)]}), id="session id 0 is refused"),
]


@pytest.mark.parametrize("row", LIMITS)
def test_limits(row: Row) -> None:
    run(row)


# -- signaling: only a session's two parties -------------------------------------------------------
def offer(nat: wire.NatKind = wire.NatKind.EIM) -> wire.Offer:
    return wire.Offer(SID, nat, ())


def answer(nat: wire.NatKind = wire.NatKind.EIM) -> wire.Answer:
    return wire.Answer(SID, nat, ())


EIM, EDM_RANDOM = wire.NatKind.EIM, wire.NatKind.EDM_RANDOM
NO_SUCH = [("SessionError", SID, N.NO_SUCH_SESSION)]
SIGNALING = [
    pytest.param(Row([*ECHO, Send("alice", offer()), Send("edge1", answer())],
                     echo_then({"edge1": [("Offer", SID, EIM), ("StartPunch", SID, EIM, 0)],
                                "alice": [("StartPunch", SID, EIM, 0)]})), id="offer, answer, punch"),
    pytest.param(Row([*ECHO, Send("bob", offer())], echo_then({"bob": NO_SUCH}),
                     counters={("errors_total", "kind", "not_session_party"): 1}), id="another agent may not offer"),
    pytest.param(Row([*ECHO, Send("edge2", answer())], echo_then({"edge2": NO_SUCH})), id="another connector may not answer"),
    pytest.param(Row([*ECHO, Send("alice", wire.Offer(SID + 1, EIM, ()))],
                     echo_then({"alice": [("SessionError", SID + 1, N.NO_SUCH_SESSION)]})),
                 id="unknown session: the same answer"),
    pytest.param(Row([*ECHO, Send("edge1", offer())], echo_then({"edge1": [("SessionError", SID, N.BAD_STATE)]})),
                 id="the connector does not offer"),
    pytest.param(Row([*ECHO, Send("alice", answer())], echo_then({"alice": [("SessionError", SID, N.BAD_STATE)]})),
                 id="the agent does not answer"),
    pytest.param(Row([*ECHO, Send("edge1", wire.PunchResult(SID, 1, None, 3)), Send("bob", wire.PunchResult(SID, 1, None, 3))],
                     echo_then({"alice": [("PunchResult", SID, 1)], "bob": NO_SUCH}),
                     counters={("punch_results_total", "success", "true"): 1}), id="punch results go to the other party"),
    pytest.param(Row([*ECHO, Send("alice", wire.SessionError(SID, N.TOO_LARGE, "x")), Send("edge2", wire.SessionError(SID, N.TOO_LARGE, "x"))],
                     echo_then({"edge1": [("SessionError", SID, N.TOO_LARGE)], "edge2": NO_SUCH})),
                 id="session errors go to the other party"),
    pytest.param(Row([*ECHO, Send("bob", wire.SessionClosed(SID, N.PEER_GONE, "x")), Send("alice", wire.SessionClosed(SID, N.PEER_GONE, "x")),
                      Send("alice", offer())],
                     echo_then({"bob": NO_SUCH, "edge1": [("SessionClosed", SID, N.PEER_GONE)], "alice": NO_SUCH})),
                 id="only a party closes a session"),
    pytest.param(Row([*ECHO, Leave("edge1"), Relay("alice")], echo_then({"alice": [("SessionClosed", SID, N.PEER_GONE)]})),
                 id="a party leaving closes its sessions"),
    pytest.param(Row([Send("edge1", wire.Announce(EIM, ())), *ECHO],
                     echo_then({"edge1": [("StartPunch", SID, EIM, 0)], "alice": [("StartPunch", SID, EIM, 0)]})),
                 id="announced connector: punch at once"),
    pytest.param(Row([Send("alice", wire.Announce(EIM, ()))], {"alice": [("Nack", 0, N.NOT_ALLOWED)]}),
                 id="only connectors announce"),
    pytest.param(Row([*ECHO, Send("alice", offer(EDM_RANDOM)), Send("edge1", answer(EIM))],
                     echo_then({"edge1": [("Offer", SID, EDM_RANDOM), ("StartPunch", SID, EDM_RANDOM, 1024)],
                                "alice": [("StartPunch", SID, EIM, 256)]}),
                     core={"birthday": Birthday(256, 1024)}), id="birthday: hard side opens ports, easy side probes"),
    pytest.param(Row([*ECHO, Send("alice", offer(EDM_RANDOM)), Send("edge1", answer(EIM))],
                     echo_then({"edge1": [("Offer", SID, EDM_RANDOM), ("StartPunch", SID, EDM_RANDOM, 0)],
                                "alice": [("StartPunch", SID, EIM, 0)]})), id="birthday off by default"),
]


@pytest.mark.parametrize("row", SIGNALING)
def test_signaling(row: Row) -> None:
    run(row)


# -- relay: to the session's other party only -----------------------------------------------------
RELAY = [
    pytest.param(Row([*ECHO, Relay("alice", payload=b"up"), Relay("edge1", payload=b"down")],
                     echo_then({"edge1": [("dgram", SID, b"up")], "alice": [("dgram", SID, b"down")]})),
                 id="both ways, to the other party only"),
    pytest.param(Row([*ECHO, Relay("alice", raw=wire.encode_sealed(SID, b"\xc3opaque")),
                      Relay("edge1", raw=wire.encode_sealed(SID, b"\x43back"))],
                     echo_then({"edge1": [("sealed", SID, b"\xc3opaque")], "alice": [("sealed", SID, b"\x43back")]})),
                 id="a sealed session's packets both ways, as they are"),
    pytest.param(Row([*ECHO, RawRelay("alice"), RawRelay("edge1", packet=b"\x40back")],
                     echo_then({"edge1": [("raw", SID, b"\x40sealed", ("198.51.100.3", 40003))],
                                "alice": [("raw", SID, b"\x40back", ("198.51.100.1", 40001))]})),
                 id="raw sealed frames both ways, to the other party's validated address, without the tag"),
    pytest.param(Row([*ECHO, RawRelay("alice", src=("203.0.113.66", 40001)),
                      RawRelay("alice", tag_of=wire.Role.PROBE), RawRelay("alice", sid=SID + 1),
                      RawRelay("alice", raw=b"\x33\x00"), RawRelay("bob", tag_of=wire.Role.AGENT)], ECHO_GOT,
                     counters={("relay_raw_dropped_total", "why", "address"): 2,
                               ("relay_raw_dropped_total", "why", "bad_tag"): 1,
                               ("relay_raw_dropped_total", "why", "unknown_session"): 1,
                               ("relay_raw_dropped_total", "why", "malformed"): 1}),
                 id="raw frames: a copied tag from another address, a wrong tag, an unknown session, junk: nothing sent"),
    pytest.param(Row([*ECHO, BlockRelay(), RawRelay("alice")], ECHO_GOT, counters={("relay_blocked_total", "", ""): 1}),
                 id="raw frames obey the relay switch"),
    pytest.param(Row([*ECHO, Relay("bob", raw=wire.encode_sealed(SID, b"x"))], ECHO_GOT,
                     counters={("errors_total", "kind", "datagram_foreign_session"): 1}),
                 id="sealed packets only from the session's parties"),
    pytest.param(Row([*ECHO, Relay("bob"), Relay("edge2")], ECHO_GOT,
                     counters={("errors_total", "kind", "datagram_foreign_session"): 2}), id="foreign clients relay nothing"),
    pytest.param(Row([Relay("alice"), *ECHO], echo_then({"edge1": [("dgram", SID, b"hi")]})),
                 id="a datagram just before its OpenSession is held and replayed"),
    pytest.param(Row([Relay("alice"), Wait(3.0), *ECHO], ECHO_GOT), id="held datagrams expire"),
    pytest.param(Row([Relay("edge1"), *ECHO], ECHO_GOT), id="only agents' datagrams are held"),
    pytest.param(Row([Relay("alice")], {}, connected=(), counters={("errors_total", "kind", "datagram_unauthenticated"): 1}),
                 id="nothing before hello"),
    pytest.param(Row([*ECHO, Relay("alice", raw=b"\x3fjunk")], ECHO_GOT,
                     counters={("errors_total", "kind", "datagram_malformed"): 1}), id="malformed"),
    pytest.param(Row([*ECHO, BlockRelay(), Relay("alice"), Relay("edge1")], ECHO_GOT,
                     counters={("relay_blocked_total", "", ""): 2}), id="relay switched off for a session"),
    pytest.param(Row([*ECHO, Relay("alice")], ECHO_GOT, core={"relay_enabled": False}), id="relay disabled"),
    pytest.param(Row([*ECHO, Tweak("edge1", "max_app_payload", 10), Relay("alice", payload=b"x" * 11)],
                     echo_then({"alice": [("SessionError", SID, N.TOO_LARGE)]}),
                     counters={("errors_total", "kind", "relay_oversized"): 1}), id="too large for the other side"),
    pytest.param(Row([*ECHO, Tweak("alice", "accepts", False), Relay("edge1")], ECHO_GOT,
                     counters={("relay_dropped_total", "direction", "to_agent"): 1}), id="dropped by a full queue"),
]


@pytest.mark.parametrize("row", RELAY)
def test_relay(row: Row) -> None:
    run(row)


def test_relay_counts_datagrams_and_payload_bytes() -> None:
    w = run(Row([*ECHO, Relay("alice", payload=b"abc"), Relay("alice", payload=b"de"), Relay("edge1", payload=b"f")],
                echo_then({"edge1": [("dgram", SID, b"abc"), ("dgram", SID, b"de")], "alice": [("dgram", SID, b"f")]})))
    text = w.core.metrics.render()
    assert 'qlab_relayed_datagrams_total{direction="to_connector"} 2' in text
    assert 'qlab_relayed_datagrams_total{direction="to_agent"} 1' in text
    assert 'qlab_relayed_bytes_total{direction="to_connector"} 5' in text


def test_session_key_is_the_same_for_both_parties() -> None:
    w = run(Row(list(ECHO), ECHO_GOT))
    sess = w.core.sessions[SID]
    assert len(sess.key) == wire.KEY_LEN and (sess.agent, sess.connector) == (
        w.core.by_peer[w.peers["alice"]].id, w.core.by_peer[w.peers["edge1"]].id)


# -- classification, QAD, liveness ------------------------------------------------------------------
MISC = [
    pytest.param(Row([Send("probe", wire.ChangeRequest(1, 0, 1, 99))], {"probe": [("Ack", 1)]},
                     events=[SendClassifyTest(1, ("198.51.100.5", 40005), 99)]), id="change port"),
    pytest.param(Row([Send("probe", wire.ChangeRequest(1, 1, 1, 99))], {"probe": [("Ack", 1)]},
                     events=[SendClassifyTest(3, ("198.51.100.5", 40005), 99)]), id="change IP and port"),
    pytest.param(Row([Tweak("probe", "listener", 3), Send("probe", wire.ChangeRequest(1, 1, 0, 5))], {"probe": [("Ack", 1)]},
                     events=[SendClassifyTest(1, ("198.51.100.5", 40005), 5)]), id="change IP from an alternate"),
    pytest.param(Row([Send("probe", wire.ServerInfoRequest(4))],
                     {"probe": [("ServerInfo", 4, ("203.0.113.1", 4433), ("192.0.2.2", 4434))]},
                     core={"advertise": {"192.0.2.1": "203.0.113.1"}}), id="server info, advertised"),
    pytest.param(Row([Send("bob", wire.Ping(5)), Send("bob", wire.Pong(6))], {"bob": [("Pong", 5)]}), id="ping"),
]


@pytest.mark.parametrize("row", MISC)
def test_misc(row: Row) -> None:
    run(row)


def test_change_request_without_alternate() -> None:
    core = IntermediateCore(SECRET, Metrics())
    core.listeners.append(LISTENERS[0])
    probe = FakePeer("probe", ("198.51.100.5", 40005))
    core.control(probe, hello("probe"), 0.0)
    probe.got.clear()
    core.control(probe, wire.ChangeRequest(1, 0, 1, 99), 0.0)
    assert probe.got == [("Nack", 1, N.NOT_ALLOWED)] and core.next_event() is None


def test_qad_follows_address_changes() -> None:
    w = run(Row([], {}))
    alice = w.peers["alice"]
    alice.address = ("198.51.100.99", 5555)
    w.core.address_changed(alice)
    assert alice.got == [("Observed", 2, ("198.51.100.99", 5555))]


def delays(w: World) -> dict[str, int]:
    return {n: m.delay_ms for n, p in w.peers.items() for m in p.messages if isinstance(m, wire.StartPunch)}


@pytest.mark.parametrize(("alice_rtt", "edge1_rtt", "expect"), [
    (0.125, 0.0625, {"alice": 2, "edge1": 33}),  # edge1 waits (62.5 - 31.25) ms plus the margin
    (None, 0.0625, {"alice": 2, "edge1": 20}),  # unmeasured RTT counts as 100 ms
    (20.0, 0.0, {"alice": 2, "edge1": 5000}),  # never more than 5 s
])
def test_punch_start_is_timed_by_rtt(alice_rtt: float | None, edge1_rtt: float, expect: dict[str, int]) -> None:
    """The farther side starts at once, the nearer one waits for the difference of one-way times."""
    w = run(Row([Tweak("alice", "rtt", alice_rtt), Tweak("edge1", "rtt", edge1_rtt), *ECHO, Send("alice", offer()),
                 Send("edge1", answer())],
                echo_then({"edge1": [("Offer", SID, EIM), ("StartPunch", SID, EIM, 0)], "alice": [("StartPunch", SID, EIM, 0)]})))
    assert delays(w) == expect


def test_reset_forgets_everything() -> None:
    w = run(Row(list(ECHO), ECHO_GOT))
    w.core.reset()
    assert not (w.core.clients or w.core.sessions or w.core.services or w.core.by_peer)
    w.core.control(w.peers["alice"], wire.Ping(1), w.now)
    assert w.peers["alice"].got[-2:] == [("Nack", 0, N.UNAUTHENTICATED), ("close", wire.CLOSE_UNAUTHENTICATED)]


# -- credentials: each role proves its own secret, on this connection ---------------------------------
WELCOME_ALICE = [("Welcome", 1200), ("Observed", 1, ("198.51.100.1", 40001))]
REFUSED = [("Nack", 0, N.UNAUTHENTICATED), ("close", wire.CLOSE_UNAUTHENTICATED)]
CREDENTIALS = [
    pytest.param(Row([Send("edge1", hello("edge1", secret=role_secret(A), binding=b"scid-0001"))],
                     {"edge1": REFUSED}, connected=()), id="an agent's secret cannot say hello as a connector"),
    pytest.param(Row([Send("alice", hello("alice", secret=role_secret(C), binding=b"scid-0001"))],
                     {"alice": REFUSED}, connected=()), id="a connector's secret cannot say hello as an agent"),
    pytest.param(Row([Send("alice", hello("alice", secret=SECRET, binding=b"scid-0001"))],
                     {"alice": REFUSED}, connected=()), id="the root secret itself is no client credential"),
    pytest.param(Row([Send("probe", hello("probe", secret=role_secret(C), binding=b"scid-0001"))],
                     {"probe": [("Welcome", 1200), ("Observed", 1, ("198.51.100.5", 40005))]}, connected=()),
                 id="a probe proves either role's secret"),
    pytest.param(Row([Send("alice", hello("alice", binding=b"scid-0002"))], {"alice": REFUSED}, connected=(),
                     counters={("auth_failures_total", "", ""): 1}),
                 id="a HELLO made for another connection is refused (replay)"),
]


@pytest.mark.parametrize("row", CREDENTIALS)
def test_credentials(row: Row) -> None:
    run(row)


def test_the_core_refuses_to_run_without_the_root() -> None:
    with pytest.raises(ValueError, match="root"):
        IntermediateCore(b"", Metrics())


# -- uniform answers, caps per identity, idle expiry ---------------------------------------------------
REG = Send("edge1", wire.Register(1, "echo"))
CAPS = [
    pytest.param(Row([*ECHO, Send("bob", open_session(2, SID)), Send("bob", open_session(3, 0))],
                     echo_then({"bob": [("Nack", 2, N.BAD_STATE), ("Nack", 3, N.BAD_STATE)]})),
                 id="a taken id is refused as id 0 is"),
    pytest.param(Row([*ECHO, Send("bob", open_session(2, SID, "other")), Send("bob", open_session(3, SID + 1, "other"))],
                     echo_then({"bob": [("Nack", 2, N.NO_CONNECTOR), ("Nack", 3, N.NO_CONNECTOR)]})),
                 id="a taken id and a free one get the same refusal where no session could open"),
    pytest.param(Row([REG, Send("alice", open_session(1, 1)), Send("alice2", open_session(1, 2)),
                      Send("alice2", open_session(2, 3)), Send("bob", open_session(1, 4))],
                     {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200), ("SessionNew", 2, "alice", 1200),
                                ("SessionNew", 4, "bob", 1200)],
                      "alice": [("SessionOpened", 1, 1, "edge1", 1200)],
                      "alice2": [("SessionOpened", 1, 2, "edge1", 1200), ("Nack", 2, N.RATE_LIMITED)],
                      "bob": [("SessionOpened", 1, 4, "edge1", 1200)]},
                     core={"caps": Caps(sessions_per_identity=2)}, counters={("rate_limited_total", "kind", "open_sessions"): 1}),
                 id="open sessions per identity: two connections under one name share the budget"),
    pytest.param(Row([REG, Send("alice", open_session(1, 1)), Send("alice", wire.SessionClosed(1, N.PEER_GONE, "done")),
                      Send("alice", open_session(2, 2))],
                     {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200), ("SessionClosed", 1, N.PEER_GONE),
                                ("SessionNew", 2, "alice", 1200)],
                      "alice": [("SessionOpened", 1, 1, "edge1", 1200), ("SessionOpened", 2, 2, "edge1", 1200)]},
                     core={"caps": Caps(sessions_per_identity=1)}), id="a closed session frees its place"),
    pytest.param(Row([REG, Send("alice", open_session(1, 1)), Send("bob", open_session(1, 2))],
                     {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200)],
                      "alice": [("SessionOpened", 1, 1, "edge1", 1200)], "bob": [("Nack", 1, N.RATE_LIMITED)]},
                     core={"caps": Caps(sessions=1)}), id="open sessions in total"),
    pytest.param(Row([REG] + [Send(who, open_session(i, i)) for i, who in ((1, "alice"), (2, "alice2"), (3, "alice"))],
                     {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200), ("SessionNew", 2, "alice", 1200)],
                      "alice": [("SessionOpened", 1, 1, "edge1", 1200), ("Nack", 3, N.RATE_LIMITED)],
                      "alice2": [("SessionOpened", 2, 2, "edge1", 1200)]},
                     core={"rate_limits": SESSIONS_2}), id="the session rate is per identity, not per connection"),
    pytest.param(Row([*ECHO, Wait(50.0), Relay("alice"), Wait(50.0), Send("edge1", wire.PunchResult(SID, 0, None, 1)),
                      Wait(50.0), Expire(), Wait(61.0), Expire(), Relay("alice")],
                     echo_then({"edge1": [("dgram", SID, b"hi"), ("SessionClosed", SID, N.BAD_STATE)],
                                "alice": [("PunchResult", SID, 0), ("SessionClosed", SID, N.BAD_STATE)]}),
                     core={"caps": Caps(session_idle=60.0)}, counters={("sessions_expired_total", "", ""): 1}),
                 id="a session idle past the bound is closed; relay and control traffic keep it"),
    pytest.param(Row([*ECHO, Wait(50.0), Send("alice", wire.SessionAlive(SID)), Wait(50.0), Expire(),
                      Send("bob", wire.SessionAlive(SID)), Wait(61.0), Expire()],
                     echo_then({"bob": [("SessionError", SID, N.NO_SUCH_SESSION)],
                                "edge1": [("SessionClosed", SID, N.BAD_STATE)],
                                "alice": [("SessionClosed", SID, N.BAD_STATE)]}),
                     core={"caps": Caps(session_idle=60.0)}, counters={("sessions_expired_total", "", ""): 1}),
                 id="SessionAlive from a party keeps a direct-only session; a non-party's is refused and keeps nothing"),
]


@pytest.mark.parametrize("row", CAPS)
def test_caps(row: Row) -> None:
    run(row)


def test_identity_state_goes_with_its_last_connection() -> None:
    w = run(Row([REG, Send("alice", open_session(1, 1)), Leave("alice"), Leave("alice2")],
                {"edge1": [("Ack", 1), ("SessionNew", 1, "alice", 1200), ("SessionClosed", 1, N.PEER_GONE)],
                 "alice": [("SessionOpened", 1, 1, "edge1", 1200)]}))
    assert (A, "alice") not in w.core.identities and (C, "edge1") in w.core.identities


# -- candidates: nothing forwarded that the sender cannot prove is its own --------------------------
K = wire.CandidateKind
OBSERVED = ("198.51.100.1", 40001)  # alice, as the core sees her


def cand(kind: wire.CandidateKind, ip: str, port: int) -> wire.Candidate:
    return wire.Candidate(kind, (ip, port), 7)


@pytest.mark.parametrize(("given", "kept"), [
    (cand(K.SRFLX, *OBSERVED), cand(K.SRFLX, *OBSERVED)),
    (cand(K.SRFLX, "203.0.113.66", 9), cand(K.SRFLX, *OBSERVED)),  # rewritten to what we observe
    (cand(K.PREDICTED, "198.51.100.1", 40002), cand(K.PREDICTED, "198.51.100.1", 40002)),
    (cand(K.PREDICTED, "198.51.100.66", 40002), None),  # not the observed IP
    (cand(K.PRFLX, "198.51.100.66", 40002), None),
    (cand(K.MAPPED, "198.51.100.1", 4434), cand(K.MAPPED, "198.51.100.1", 4434)),  # its router's mapping
    (cand(K.MAPPED, "203.0.113.66", 4434), None),  # a "mapping" on someone else's address
    (cand(K.HOST, "10.1.2.3", 5000), cand(K.HOST, "10.1.2.3", 5000)),  # private: a LAN peer may reach it
    (cand(K.HOST, "198.51.100.1", 5000), cand(K.HOST, "198.51.100.1", 5000)),  # no NAT: its own public IP
    (cand(K.HOST, "8.8.8.8", 53), None),  # someone else's public address
    (cand(K.HOST, "127.0.0.1", 53), None),  # the receiver's own loopback
    (cand(K.HOST, "10.1.2.3", 0), None),
    (cand(K.HOST, "224.0.0.1", 5000), None),
    (cand(K.HOST, "255.255.255.255", 5000), None),
    (cand(K.HOST, "0.0.0.0", 5000), None),
    (cand(K.HOST, "ff02::1", 5000), None),
    (cand(K.RELAY, "198.51.100.1", 40001), None),
])
def test_screen_one_candidate(given: wire.Candidate, kept: wire.Candidate | None) -> None:
    assert screen_candidates((given,), OBSERVED) == ((kept,) if kept else ())


def test_screen_caps_and_deduplicates() -> None:
    many = tuple(cand(K.PREDICTED, "198.51.100.1", 41000 + i) for i in range(32))
    assert len(screen_candidates(many, OBSERVED)) == 16
    twice = (cand(K.SRFLX, *OBSERVED), cand(K.SRFLX, "203.0.113.66", 9))
    assert screen_candidates(twice, OBSERVED) == (cand(K.SRFLX, *OBSERVED),)
    assert screen_candidates(twice, None) == ()  # nothing observed yet: nothing to vouch for


VICTIM = [cand(K.SRFLX, "203.0.113.66", 9), cand(K.PREDICTED, "203.0.113.66", 10), cand(K.HOST, "8.8.4.4", 11)]


def forwarded(w: World, who: str) -> list[tuple[wire.Candidate, ...]]:
    return [m.candidates if hasattr(m, "candidates") else m.peer_candidates for m in w.peers[who].messages
            if isinstance(m, (wire.SessionNew, wire.Offer, wire.StartPunch))]


def test_screened_in_open_session_offer_answer_and_announce() -> None:
    alice_srflx = (cand(K.SRFLX, *OBSERVED),)
    edge1_srflx = (cand(K.SRFLX, "198.51.100.3", 40003),)
    w = run(Row([Send("edge1", wire.Announce(EIM, tuple(VICTIM))), REG,
                 Send("alice", wire.OpenSession(1, SID, "echo", EIM, tuple(VICTIM))),
                 Send("alice", wire.Offer(SID, EIM, tuple(VICTIM))), Send("edge1", wire.Answer(SID, EIM, tuple(VICTIM)))],
                echo_then({"edge1": [("StartPunch", SID, EIM, 0), ("Offer", SID, EIM), ("StartPunch", SID, EIM, 0)],
                           "alice": [("StartPunch", SID, EIM, 0), ("StartPunch", SID, EIM, 0)]})))
    assert forwarded(w, "edge1") == [alice_srflx] * 4  # SessionNew, StartPunch, Offer, StartPunch
    assert forwarded(w, "alice") == [edge1_srflx] * 2
    assert w.core.metrics.get("candidates_screened_total") == 12  # 3 per message


def test_classification_tests_go_to_the_validated_address_only() -> None:
    w = run(Row([Tweak("probe", "address", ("203.0.113.66", 9)), Tweak("probe", "validated", ("198.51.100.5", 40005)),
                 Send("probe", wire.ChangeRequest(1, 0, 1, 99))], {"probe": [("Ack", 1)]},
                events=[SendClassifyTest(1, ("198.51.100.5", 40005), 99)]))
    assert w.peers["probe"].address == ("203.0.113.66", 9)  # migrated, not yet proven
