"""Candidates and simultaneous-open hole punching, sans-IO, with thin drivers for both roles.

Both sides probe, from the one socket each uses for the Intermediate, starting together (the
Intermediate times the start from their RTTs). Probes are raw UDP with the QUIC fixed bit clear,
authenticated with the session key, paced and retransmitted. A side answers every valid request at
the address it actually came from and learns that address as a peer-reflexive candidate (this is
what makes cone <-> symmetric pairs work). A pair works as soon as a valid request or response has
arrived from an address we have sent to: our NAT is open towards it, and the peer's is open
towards us.

Priorities follow RFC 8445 §5.1.2 type preferences, with predicted ports below server-reflexive:
Direct LAN (host) before Direct WAN (server/peer-reflexive, predicted) before Relay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from qlab import wire
from qlab.net import Addr, usable_host_address

log = logging.getLogger("qlab.punch")

TYPE_PREFERENCE = {
    wire.CandidateKind.HOST: 126,
    wire.CandidateKind.PRFLX: 110,
    wire.CandidateKind.SRFLX: 100,
    wire.CandidateKind.PREDICTED: 90,
    wire.CandidateKind.RELAY: 0,
}
PREDICTED_PORTS = 8


def priority(kind: wire.CandidateKind, local_pref: int = 65535) -> int:
    return (TYPE_PREFERENCE[kind] << 24) | (local_pref << 8) | 255


def host_ips_for(bound: Addr, interface_ips: list[str]) -> list[str]:
    """A socket bound to one address can only be reached there; one bound to the wildcard on
    every interface address."""
    return list(interface_ips) if bound[0] in ("0.0.0.0", "::") else [bound[0]]


def gather(
    host_ips: list[str], local_port: int, observed: Addr | None, nat: wire.NatKind, last_port: int | None = None,
) -> tuple[wire.Candidate, ...]:
    """A side's candidates: host addresses (never unspecified, loopback or link-local), the
    server-reflexive address from QAD, and for a sequential-port symmetric NAT the ports its next
    mappings will most likely get."""
    out: list[wire.Candidate] = []
    for i, ip in enumerate(h for h in host_ips if usable_host_address(h)):
        out.append(wire.Candidate(wire.CandidateKind.HOST, (ip, local_port), priority(wire.CandidateKind.HOST, 65535 - i)))
    if observed is not None and not any(c.addr == observed for c in out):
        out.append(wire.Candidate(wire.CandidateKind.SRFLX, observed, priority(wire.CandidateKind.SRFLX)))
    if nat == wire.NatKind.EDM_SEQUENTIAL and observed is not None:
        base = last_port if last_port is not None else observed[1]
        for k in range(1, PREDICTED_PORTS + 1):
            if base + k <= 0xFFFF:
                out.append(wire.Candidate(wire.CandidateKind.PREDICTED, (observed[0], base + k),
                                          priority(wire.CandidateKind.PREDICTED, 65535 - k)))
    return tuple(out[: wire.MAX_CANDIDATES])


def lan_candidates(own: tuple[wire.Candidate, ...], peer: tuple[wire.Candidate, ...]) -> tuple[wire.Candidate, ...]:
    """The peer's host candidates that may share a LAN with one of ours (same /24 or /64)."""
    mine = {_prefix(c.addr[0]) for c in own if c.kind == wire.CandidateKind.HOST}
    return tuple(c for c in peer if c.kind == wire.CandidateKind.HOST and _prefix(c.addr[0]) in mine)


@dataclass
class PunchConfig:
    interval: float = 0.02  # one round of requests to every target this often
    timeout: float = 3.0  # give up after this long without a working pair
    nominate_wait: float = 0.01  # after a WAN success, how long a same-LAN host pair may still win
    predict_after: float = 0.06  # predicted ports are a fallback: probed only if nothing worked by then
    spray_rate: float = 1000.0  # birthday mode: random-port probes per second (each sent once)


@dataclass
class Success:
    addr: Addr
    kind: wire.CandidateKind  # the kind of the peer candidate that worked (PRFLX when learned)
    at: float
    via: str  # "request" or "response"


@dataclass
class Puncher:
    """The probing state of one side of one session. Feed it time and datagrams; it returns the
    datagrams to send. No I/O."""

    session: int
    key: bytes
    own: tuple[wire.Candidate, ...]
    peer: tuple[wire.Candidate, ...]
    config: PunchConfig = field(default_factory=PunchConfig)
    targets: dict[Addr, wire.CandidateKind] = field(default_factory=dict)
    sent_to: set[Addr] = field(default_factory=set)
    txns: dict[int, Addr] = field(default_factory=dict)
    probes_sent: int = 0
    responses_sent: int = 0
    started_at: float | None = None
    success: Success | None = None
    best: Success | None = None
    failed: str | None = None
    learned: list[Addr] = field(default_factory=list)
    deferred: dict[Addr, wire.CandidateKind] = field(default_factory=dict)  # predicted, not yet probed
    spray: list[Addr] = field(default_factory=list)  # birthday mode: random ports, each probed once
    sprayed: set[Addr] = field(default_factory=set)
    _spray_credit: float = 0.0
    _next_round: float = 0.0

    def __post_init__(self) -> None:
        self.set_peer(self.peer)

    def set_peer(self, peer: tuple[wire.Candidate, ...]) -> None:
        """The peer's candidates (known at StartPunch; before that a Puncher only answers)."""
        self.peer = peer
        own_addrs = {c.addr for c in self.own}
        for c in sorted(peer, key=lambda c: -c.priority):
            if c.kind == wire.CandidateKind.RELAY or c.addr in own_addrs or c.addr in self.targets:
                continue
            if c.kind == wire.CandidateKind.PREDICTED:
                self.deferred.setdefault(c.addr, c.kind)
            else:
                self.targets[c.addr] = c.kind

    # -- time -----------------------------------------------------------------------------------
    def start(self, now: float) -> list[tuple[bytes, Addr]]:
        self.started_at = now
        self._next_round = now
        return self.poll(now)

    def next_timer(self) -> float | None:
        if self.started_at is None or self.failed is not None:
            return None
        if self.success is not None:
            return None
        return self._next_round

    def poll(self, now: float) -> list[tuple[bytes, Addr]]:
        """Requests due now: one round to every target, every `interval`, until success or timeout."""
        if self.started_at is None or self.failed is not None or self.success is not None:
            return []
        if self.best is not None and now >= self.best.at + self.config.nominate_wait:
            self.success = self.best
            return []
        if now - self.started_at >= self.config.timeout:
            self.failed = f"no working pair after {self.config.timeout:.1f}s and {self.probes_sent} probes"
            return []
        if now < self._next_round:
            return []
        self._next_round = now + self.config.interval
        out = []
        if self.spray:  # birthday mode: a paced share of the random ports, once each
            self._spray_credit += self.config.spray_rate * self.config.interval
            while self.spray and self._spray_credit >= 1:
                self._spray_credit -= 1
                addr = self.spray.pop()
                out.append(self._request(addr))
                self.sprayed.add(addr)
        if self.deferred and now - self.started_at >= self.config.predict_after:
            self.targets.update(self.deferred)  # nothing worked yet: try the predicted ports too
            self.deferred.clear()
        for addr in self.targets:
            out.append(self._request(addr))
        return out

    def _request(self, addr: Addr) -> tuple[bytes, Addr]:
        txn = secrets.randbits(64)
        self.txns[txn] = addr
        self.sent_to.add(addr)
        self.probes_sent += 1
        return wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, self.session, txn), self.key), addr

    def birthday_spray(self, ip: str, count: int, rng: random.Random) -> None:
        """Birthday mode against a random-port symmetric peer: probe `count` random ports of its
        public IP (RFC 6056 range 1024-65535), paced at `spray_rate`, each once; the budget extends
        the timeout by the time the spray takes."""
        ports = rng.sample(range(1024, 65536), min(count, 64512))
        self.spray = [(ip, p) for p in ports]
        extra = count / max(1.0, self.config.spray_rate) + 1.0
        self.config = dataclasses.replace(self.config, timeout=self.config.timeout + extra)

    # -- datagrams ------------------------------------------------------------------------------
    def receive(self, data: bytes, addr: Addr, now: float) -> list[tuple[bytes, Addr]]:
        """A probe for this session arrived from `addr`. Raises WireError if it is not authentic."""
        probe = wire.decode_probe(data, self.key)
        if probe.session != self.session:
            raise wire.WireError("probe for another session")
        out: list[tuple[bytes, Addr]] = []
        if probe.kind == wire.PROBE_REQUEST:
            resp = wire.Probe(wire.PROBE_RESPONSE, self.session, probe.txn, addr)
            out.append((wire.encode_probe(resp, self.key), addr))
            self.responses_sent += 1
            if addr not in self.targets:
                # peer-reflexive: the peer's NAT gave it a mapping we were not told about (or one
                # we predicted but had not probed yet: the peer found us, prediction did not)
                self.deferred.pop(addr, None)
                self.targets[addr] = wire.CandidateKind.PRFLX
                self.learned.append(addr)
                if self.success is None and self.failed is None and self.started_at is not None:
                    txn = secrets.randbits(64)
                    self.txns[txn] = addr
                    out.append((wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, self.session, txn), self.key), addr))
                    self.sent_to.add(addr)
                    self.probes_sent += 1
            if addr in self.sent_to:
                self._works(addr, now, "request")
        elif probe.kind == wire.PROBE_RESPONSE:
            if self.txns.get(probe.txn) is None:
                raise wire.WireError("response to no request of ours")
            self._works(addr, now, "response")
        return out

    def _lan_possible(self) -> bool:
        """Whether a peer host candidate shares a LAN prefix with one of ours: only then is a LAN
        pair worth waiting for after a WAN pair worked."""
        hosts = tuple(wire.Candidate(k, a) for a, k in self.targets.items() if k == wire.CandidateKind.HOST)
        return bool(lan_candidates(self.own, hosts))

    def _works(self, addr: Addr, now: float, via: str) -> None:
        if self.success is not None or self.failed is not None:
            return
        kind = wire.CandidateKind.PREDICTED if addr in self.sprayed else self.targets.get(addr, wire.CandidateKind.PRFLX)
        cand = Success(addr, kind, now, via)
        if self.best is None or TYPE_PREFERENCE[kind] > TYPE_PREFERENCE[self.best.kind]:
            self.best = cand
        if kind == wire.CandidateKind.HOST or not self._lan_possible():
            self.success = self.best  # nothing better can come
        # otherwise poll() nominates `best` after nominate_wait, unless a LAN pair wins first


def _prefix(ip: str) -> str:
    return ip.rsplit(".", 1)[0] if "." in ip else ":".join(ip.split(":")[:4])


class PunchRunner:
    """Drives a Puncher on an endpoint's socket with loop timers."""

    def __init__(
        self, puncher: Puncher, send_raw: Callable[[bytes, Addr], None], on_done: Callable[[Puncher], None],
    ) -> None:
        self.p = puncher
        self.send_raw = send_raw
        self.on_done = on_done
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self._reported = False
        self.finished = self._loop.create_future()

    def start(self, delay: float = 0.0) -> None:
        self._timer = self._loop.call_later(max(0.0, delay), self._begin)

    def _begin(self) -> None:
        self._send(self.p.start(self._loop.time()))
        self._arm()

    def _send(self, out: list[tuple[bytes, Addr]]) -> None:
        for data, addr in out:
            self.send_raw(data, addr)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.p.success is not None or self.p.failed is not None:
            if not self._reported:
                self._reported = True
                if not self.finished.done():
                    self.finished.set_result(self.p)
                self.on_done(self.p)
            return
        at = self.p.next_timer()
        if at is not None:
            nxt = min(at, (self.p.best.at + self.p.config.nominate_wait) if self.p.best else at)
            self._timer = self._loop.call_at(nxt, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._send(self.p.poll(self._loop.time()))
        self._arm()

    def receive(self, data: bytes, addr: Addr) -> bool:
        try:
            out = self.p.receive(data, addr, self._loop.time())
        except wire.WireError as exc:
            log.debug("dropped probe from %s:%d: %s", *addr, exc)
            return False
        self._send(out)
        if not self._reported and self.p.started_at is not None:  # before the start only answer: the
            self._arm()  # start timer is still pending and must not be cancelled
        return True

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
