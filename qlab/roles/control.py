"""The client side of the qlab/1 control stream to the Intermediate, without I/O.

Every connection a side opens to the Intermediate speaks the same few rules: HELLO first, the
Intermediate's OBSERVED_ADDRESS (QAD) recorded, replies matched to requests by their `req` id, a
Ping answered with a Pong. `ControlClient` keeps that state: feed it each received message with
`receive()`, act on the event it returns, and send what `messages_to_send()` drains. The asyncio
shells (`qlab.roles.link.IntermediateLink`, `qlab.traversal.detect.QadSession`) only move messages
and resolve futures. `Liveness` and `Backoff` are the two timing rules those shells share; both are
told the time, never read a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from qlab import wire
from qlab.net import Addr

REQ_MAX = 0xFFFF  # `req` is a U16 on the wire; 0 is reserved for "the hello itself"

# The messages the Intermediate sends in answer to a request: each echoes the request's `req`.
REPLIES = (wire.Ack, wire.Nack, wire.SessionOpened, wire.ServerInfo)
Reply = wire.Ack | wire.Nack | wire.SessionOpened | wire.ServerInfo
# The messages a client sends that expect one of those.
Request = wire.Register | wire.OpenSession | wire.ChangeRequest | wire.ServerInfoRequest


# -- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Welcomed:
    """The Intermediate accepted the hello."""

    client_id: int
    max_relay_payload: int


@dataclass(frozen=True)
class HelloRefused:
    """A NACK with `req` 0: the hello itself was refused (the reason is final)."""

    code: wire.NackCode
    reason: str


@dataclass(frozen=True)
class AddressObserved:
    """QAD: the Intermediate sees this side at a new public address."""

    addr: Addr


@dataclass(frozen=True)
class Replied:
    """The reply to a request that is still awaited."""

    req: int
    reply: Reply


@dataclass(frozen=True)
class RoleMessage:
    """Anything else: for the role (offers, punch orders, session notices...)."""

    msg: wire.Message


ControlEvent = Welcomed | HelloRefused | AddressObserved | Replied | RoleMessage


# -- the client ----------------------------------------------------------------------------------
@dataclass
class ControlClient:
    """One side's control-stream state towards the Intermediate."""

    role: wire.Role
    name: str
    secret: bytes = field(repr=False)
    client_id: int | None = None
    max_relay_payload: int = 0
    observed: Addr | None = None
    _next_req: int = field(default=1, init=False, repr=False)
    _pending: set[int] = field(default_factory=set, init=False, repr=False)
    _outbox: list[wire.Message] = field(default_factory=list, init=False, repr=False)

    def hello(self, binding: bytes) -> wire.Hello:
        """The first message on a new connection: version, role, name and the secret's tag, bound
        to the connection ID the server chose for this connection (`wire.hello_auth`)."""
        auth = wire.hello_auth(self.secret, self.role, self.name, binding)
        return wire.Hello(wire.VERSION, self.role, self.name, auth)

    def next_req(self) -> int:
        """A fresh request id, 1..REQ_MAX and round again (ids in flight are few and short-lived)."""
        req = self._next_req
        self._next_req = req % REQ_MAX + 1
        return req

    def expect(self, req: int) -> None:
        """A request with this id was sent: its reply becomes a `Replied` event."""
        self._pending.add(req)

    def forget(self, req: int) -> None:
        """The request is no longer awaited (answered, timed out or abandoned)."""
        self._pending.discard(req)

    def receive(self, msg: wire.Message) -> ControlEvent | None:
        """One message from the Intermediate, as an event for the shell. None: nothing to do there
        (a Ping, answered through `messages_to_send`; a Pong; an address QAD already reported)."""
        if isinstance(msg, wire.Welcome):
            self.client_id, self.max_relay_payload = msg.client_id, msg.max_relay_payload
            return Welcomed(msg.client_id, msg.max_relay_payload)
        if isinstance(msg, wire.ObservedAddress):
            return self._observed((msg.addr[0], msg.addr[1]))
        if isinstance(msg, wire.Nack) and msg.req == 0:
            return HelloRefused(msg.code, msg.reason)
        if isinstance(msg, REPLIES) and msg.req in self._pending:
            return Replied(msg.req, msg)
        if isinstance(msg, wire.Ping):
            self._outbox.append(wire.Pong(msg.nonce))
            return None
        if isinstance(msg, wire.Pong):
            return None  # liveness only: the shell has noted that something arrived
        return RoleMessage(msg)

    def _observed(self, addr: Addr) -> AddressObserved | None:
        if addr == self.observed:
            return None
        self.observed = addr
        return AddressObserved(addr)

    def messages_to_send(self) -> list[wire.Message]:
        out, self._outbox = self._outbox, []
        return out


# -- timing --------------------------------------------------------------------------------------
@dataclass
class Liveness:
    """Keepalive and idle detection for one connection: Ping every `interval`, give the peer up
    once it has said nothing for more than `dead_after` seconds. The shell calls `heard(now)` on
    every packet and, on its own timer, `dead(now)` then `ping_due(now)` / `ping(now)`."""

    interval: float
    dead_after: float
    last_rx: float = 0.0
    last_ping: float | None = None
    _nonce: int = field(default=0, init=False, repr=False)

    def heard(self, now: float) -> None:
        self.last_rx = now

    def silent_for(self, now: float) -> float:
        return now - self.last_rx

    def dead(self, now: float) -> bool:
        return now - self.last_rx > self.dead_after

    def ping_due(self, now: float) -> bool:
        return self.last_ping is None or now - self.last_ping >= self.interval

    def ping(self, now: float) -> wire.Ping:
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        self.last_ping = now
        return wire.Ping(self._nonce)


class Backoff:
    """Capped exponential delays: `first`, then times `factor` up to `cap` (a `first` above `cap`
    is used once), each one jittered by +-`jitter` (a fraction) so that many clients losing the
    same server do not return in step.
    `rng` makes the jitter reproducible; without it the process-wide `random` is used."""

    def __init__(self, first: float, cap: float, *, factor: float = 2.0, jitter: float = 0.2,
                 rng: random.Random | None = None) -> None:
        if first <= 0 or cap <= 0 or factor < 1 or not 0 <= jitter < 1:
            raise ValueError(f"bad backoff: first={first} cap={cap} factor={factor} jitter={jitter}")
        self.first, self.cap, self.factor, self.jitter = first, cap, factor, jitter
        self._uniform = rng.uniform if rng is not None else random.uniform
        self.current = first  # the next delay before jitter

    def next(self) -> float:
        """The delay to wait now; the following one grows."""
        delay = self.current
        if self.jitter:
            delay *= self._uniform(1 - self.jitter, 1 + self.jitter)
        self.current = min(self.current * self.factor, self.cap)
        return delay

    def reset(self) -> None:
        """Back to `first` (after a success)."""
        self.current = self.first
