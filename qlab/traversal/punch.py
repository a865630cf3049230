"""Candidates and simultaneous-open hole punching, sans-IO, with thin drivers for both roles.

Both sides probe, from the one socket each uses for the Intermediate, starting together (the
Intermediate times the start from their RTTs). Probes are raw UDP with the QUIC fixed bit clear,
authenticated with the session key, paced and retransmitted. A side answers every valid request at
the address it actually came from and learns that address as a peer-reflexive candidate (this is
what makes cone <-> symmetric pairs work). A pair works as soon as a valid request or response has
arrived from an address we have sent to: our NAT is open towards it, and the peer's is open
towards us.

Priorities follow RFC 8445 §5.1.2 type preferences, with a port mapping the router granted above
server-reflexive (it admits anyone) and predicted ports below it: Direct LAN (host) before Direct
WAN (peer-reflexive, mapped, server-reflexive, predicted) before Relay.

IPv6 (dual-stack labs): a global IPv6 host address is a host candidate reachable from anywhere (no
NAT; a stateful firewall opens to the remote ip:port its host sent to, so simultaneous open
works). Both families are probed. IPv6 is preferred, as RFC 8421 recommends for dual-stack ICE:
IPv6 host candidates come first (higher local preference) and an IPv4 pair that works first is
nominated only if no IPv6 pair works within `family_wait` (50 ms, RFC 8305's Resolution Delay),
so IPv6 wins unless it is measurably slower.
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
    wire.CandidateKind.MAPPED: 105,
    wire.CandidateKind.SRFLX: 100,
    wire.CandidateKind.PREDICTED: 90,
    wire.CandidateKind.RELAY: 0,
}
PREDICTED_PORTS = 8


def priority(kind: wire.CandidateKind, local_pref: int = 65535) -> int:
    return (TYPE_PREFERENCE[kind] << 24) | (local_pref << 8) | 255


def host_ips_for(bound: Addr, interface_ips: list[str]) -> list[str]:
    """A socket bound to one address can only be reached there; one bound to the wildcard on
    every interface address of its family (`::`, dual-stack: of both)."""
    if bound[0] == "::":
        return list(interface_ips)
    if bound[0] == "0.0.0.0":
        return [ip for ip in interface_ips if ":" not in ip]
    return [bound[0]]


def gather(
    host_ips: list[str], local_port: int, observed: Addr | None, nat: wire.NatKind, last_port: int | None = None,
    mapped: Addr | None = None,
) -> tuple[wire.Candidate, ...]:
    """A side's candidates: host addresses (never unspecified, loopback or link-local), the
    address its router mapped for it (a port mapping protocol), the server-reflexive address from
    QAD, and for a sequential-port symmetric NAT the ports its next mappings will most likely get."""
    out: list[wire.Candidate] = []
    hosts = sorted((h for h in host_ips if usable_host_address(h)), key=lambda h: ":" not in h)  # IPv6 first
    for i, ip in enumerate(hosts):
        out.append(wire.Candidate(wire.CandidateKind.HOST, (ip, local_port), priority(wire.CandidateKind.HOST, 65535 - i)))
    if mapped is not None and not any(c.addr == mapped for c in out):
        out.append(wire.Candidate(wire.CandidateKind.MAPPED, mapped, priority(wire.CandidateKind.MAPPED)))
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


def ipv6_candidates(own: tuple[wire.Candidate, ...], peer: tuple[wire.Candidate, ...]) -> tuple[wire.Candidate, ...]:
    """The peer's IPv6 host candidates, when we have an IPv6 host address too: IPv6 takes no
    mapping of an IPv4 NAT, so these are worth probing whatever the NATs are."""
    if not any(_ipv6_host(c) for c in own):
        return ()
    return tuple(c for c in peer if _ipv6_host(c))


def _ipv6_host(c: wire.Candidate) -> bool:
    return c.kind == wire.CandidateKind.HOST and ":" in c.addr[0]


def without_nat(own: tuple[wire.Candidate, ...], peer: tuple[wire.Candidate, ...]) -> tuple[wire.Candidate, ...]:
    """The peer's candidates that no IPv4 NAT stands in front of: a shared LAN, and IPv6."""
    lan = lan_candidates(own, peer)
    return lan + tuple(c for c in ipv6_candidates(own, peer) if c not in lan)


def lockstep_candidates(own: tuple[wire.Candidate, ...], peer: tuple[wire.Candidate, ...]) -> tuple[wire.Candidate, ...]:
    """What a lockstep punch (`Puncher.lockstep`) probes: the peer's host candidates on a shared
    LAN and its IPv6 ones (they take no mapping of our NAT), then its predicted ports in the order
    it signalled them. Any other address would take one of our NAT's mappings out of turn."""
    return without_nat(own, peer) + tuple(c for c in peer if c.kind == wire.CandidateKind.PREDICTED)


@dataclass
class PunchConfig:
    interval: float = 0.02  # Ta: a round of due requests this often; a target's first retransmission gap
    timeout: float = 3.0  # give up after this long without a working pair
    nominate_wait: float = 0.01  # after a WAN success, how long a same-LAN host pair may still win
    family_wait: float = 0.05  # after an IPv4 success, how long an IPv6 pair may still win (RFC 8305)
    predict_after: float = 0.06  # predicted ports are a fallback: probed only if nothing worked by then
    spray_rate: float = 1000.0  # birthday mode: random-port probes per second (each sent once)
    # birthday mode: seed of the random ports sprayed; None draws fresh ones each session. The
    # simulator sets it from the trial's seed so that a trial repeats exactly
    spray_seed: int | None = None
    # RFC 8445 §14 / RFC 5389 §7.2.1: a target that does not answer gets a bounded number of
    # requests: the first `steady_sends` every `interval`, then the gap doubles up to `max_gap`
    # (doubling from the first keeps more of the session's budget for later rounds and new targets)
    max_sends: int = 7
    steady_sends: int = 1
    max_gap: float = 0.5
    max_targets: int = 2 * wire.MAX_CANDIDATES  # signalled plus learned (peer-reflexive) addresses


# the least a requester spends to signal candidates: a QUIC short header with an 8-byte connection
# id and a packet number (10), a STREAM frame header (3), the message header (11) and the AEAD tag (16)
SIGNAL_OVERHEAD = 40


@dataclass
class ProbeBudget:
    """What one session may send toward addresses that have not answered yet (RFC 9000 §8.1's 3x
    anti-amplification rule applied to punching): at most `ratio` x the bytes the peer is known to
    have spent (its signalled candidates, its authentic probes), and never more than `cap`. Bytes
    toward an address are given back when it answers: only silent addresses use the budget."""

    cap: int = 8000
    ratio: int = 3
    earned: int = 0
    spent: int = 0
    by_addr: dict[Addr, int] = field(default_factory=dict)

    def earn(self, nbytes: int) -> None:
        self.earned += nbytes

    def spend(self, addr: Addr, nbytes: int) -> bool:
        """Charge `nbytes` toward the unproven `addr`; False (and nothing charged) when over budget."""
        if self.spent + nbytes > min(self.cap, self.ratio * self.earned):
            return False
        self.spent += nbytes
        self.by_addr[addr] = self.by_addr.get(addr, 0) + nbytes
        return True

    def answered(self, addr: Addr) -> None:
        self.spent -= self.by_addr.pop(addr, 0)

    def affordable(self, nbytes: int) -> bool:
        return self.spent + nbytes <= min(self.cap, self.ratio * self.earned)


def signal_bytes(candidates: tuple[wire.Candidate, ...]) -> int:
    """The bytes a peer spent at least to signal `candidates` (what it earns the budget)."""
    out = bytearray()
    wire.CANDIDATES.put(out, candidates)
    return SIGNAL_OVERHEAD + len(out)


# a loop timer may fire this much before the time it was set for (float rounding, clock resolution)
TIMER_SLACK = 1e-6
REQUEST_BYTES = len(wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 0, 0), bytes(wire.KEY_LEN)))


@dataclass
class Success:
    addr: Addr
    kind: wire.CandidateKind  # the kind of the peer candidate that worked (PRFLX when learned)
    at: float
    via: str  # "request" or "response"


@dataclass
class Puncher:
    """The probing state of one side of one session. Feed it time and datagrams; it returns the
    datagrams to send. No I/O.

    Every target gets its first request in the first round it is due, then retransmissions with a
    doubling gap, `max_sends` in all; every datagram toward an address that has not answered is
    paid from `budget` (shared by the session's punchers). The birthday spray is not: it goes only
    to the IP the Intermediate observed for the peer (its server-reflexive candidate).

    `lockstep` (both NATs sequential, `wire.lockstep_prediction`): the peer's predicted ports are
    probed from the start, and their first requests leave strictly in the order the peer predicted
    them, none skipped: our k-th new mapping then goes to the peer's k-th predicted port while its
    k-th goes to ours, so the two mappings admit each other (APDF on both NATs). Reflexive
    candidates are not probed: a request to one would take a mapping out of turn, and the peer's
    NAT admits nothing from it. Retransmissions go to the same address, so they reuse the mapping."""

    session: int
    key: bytes
    own: tuple[wire.Candidate, ...]
    peer: tuple[wire.Candidate, ...]
    config: PunchConfig = field(default_factory=PunchConfig)
    budget: ProbeBudget = field(default_factory=ProbeBudget)
    targets: dict[Addr, wire.CandidateKind] = field(default_factory=dict)
    sent_to: set[Addr] = field(default_factory=set)
    sends: dict[Addr, int] = field(default_factory=dict)  # requests sent per target
    due: dict[Addr, float] = field(default_factory=dict)  # when a target's next request is due
    proven: set[Addr] = field(default_factory=set)  # addresses that answered
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
    lockstep: bool = False
    _spray_credit: float = 0.0
    _next_round: float = 0.0

    def __post_init__(self) -> None:
        self.set_peer(self.peer)

    def set_peer(self, peer: tuple[wire.Candidate, ...]) -> None:
        """The peer's candidates (known at StartPunch; before that a Puncher only answers). Their
        signalling earns the budget its first requests."""
        self.peer = peer
        if peer:
            self.budget.earn(signal_bytes(peer))
        own_addrs = {c.addr for c in self.own}
        for c in sorted(peer, key=lambda c: -c.priority):
            if c.kind == wire.CandidateKind.RELAY or c.addr in own_addrs or c.addr in self.targets:
                continue
            if self.lockstep and c.kind in (wire.CandidateKind.SRFLX, wire.CandidateKind.PRFLX):
                continue  # it would take one of our mappings out of turn
            if len(self.targets) + len(self.deferred) >= self.config.max_targets:
                break
            if c.kind == wire.CandidateKind.PREDICTED and not self.lockstep:
                self.deferred.setdefault(c.addr, c.kind)
            else:
                self.targets[c.addr] = c.kind

    # -- time -----------------------------------------------------------------------------------
    def start(self, now: float) -> list[tuple[bytes, Addr]]:
        self.started_at = now
        self._next_round = now
        return self.poll(now)

    def next_timer(self) -> float | None:
        """When `poll` has something to do next: a due request the budget can pay, the spray's next
        share, the predicted ports, or the timeout."""
        if self.started_at is None or self.failed is not None or self.success is not None:
            return None
        at = [self.started_at + self.config.timeout]
        if self.spray:
            at.append(self._next_round)
        if self.deferred:
            at.append(self.started_at + self.config.predict_after)
        affordable = self.budget.affordable(REQUEST_BYTES)
        at += [self.due.get(a, self._next_round) for a in self.targets
               if self.sends.get(a, 0) < self.config.max_sends and (affordable or a in self.proven)]
        return min(at)

    def poll(self, now: float) -> list[tuple[bytes, Addr]]:
        """Requests due now, until success or timeout."""
        if self.started_at is None or self.failed is not None or self.success is not None:
            return []
        if self.best is not None and now + TIMER_SLACK >= self.nominate_at():
            self.success = self.best
            return []
        if now + TIMER_SLACK - self.started_at >= self.config.timeout:
            self.failed = f"no working pair after {self.config.timeout:.1f}s and {self.probes_sent} probes"
            return []
        out = self._spray_share(now)
        if self.deferred and now + TIMER_SLACK - self.started_at >= self.config.predict_after:
            self.targets.update(self.deferred)  # nothing worked yet: try the predicted ports too
            self.deferred.clear()
        in_turn = True  # lockstep: no first request may overtake one the budget held back
        for addr in self.targets:
            n = self.sends.get(addr, 0)
            if n >= self.config.max_sends or now + TIMER_SLACK < self.due.get(addr, now):
                continue
            if n == 0 and not in_turn:
                continue
            req = self._request(addr)
            if req is None:
                in_turn = not self.lockstep
                continue  # the budget is spent: the peer's next probe earns more
            out.append(req)
            self.sends[addr] = n + 1
            self.due[addr] = now + self._gap(n + 1)
        return out

    def _gap(self, sent: int) -> float:
        """The wait after a target's `sent`-th request."""
        cfg = self.config
        doublings: int = max(0, sent - cfg.steady_sends)
        return min(cfg.max_gap, cfg.interval * float(2**doublings))

    def _spray_share(self, now: float) -> list[tuple[bytes, Addr]]:
        """Birthday mode: a paced share of the random ports, once each."""
        if not self.spray or now + TIMER_SLACK < self._next_round:
            return []
        self._next_round = now + self.config.interval
        out = []
        self._spray_credit += self.config.spray_rate * self.config.interval
        while self.spray and self._spray_credit >= 1:
            self._spray_credit -= 1
            addr = self.spray.pop()
            out.append(self._encode_request(addr))
            self.sprayed.add(addr)
        return out

    def _request(self, addr: Addr) -> tuple[bytes, Addr] | None:
        """A request to `addr`, paid from the budget unless `addr` answered; None when unaffordable."""
        if addr not in self.proven and not self.budget.spend(addr, REQUEST_BYTES):
            return None
        return self._encode_request(addr)

    def _encode_request(self, addr: Addr) -> tuple[bytes, Addr]:
        txn = secrets.randbits(64)
        self.txns[txn] = addr
        self.sent_to.add(addr)
        self.probes_sent += 1
        return wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, self.session, txn), self.key), addr

    def birthday_spray(self, ip: str, count: int, rng: random.Random) -> None:
        """Birthday mode against a random-port symmetric peer: probe `count` random ports of its
        public IP (RFC 6056 range 1024-65535), paced at `spray_rate`, each once; the budget extends
        the timeout by the time the spray takes. `ip` must be the one the Intermediate observed for
        the peer: the spray is outside the budget."""
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
        self.budget.earn(len(data))
        out: list[tuple[bytes, Addr]] = []
        if probe.kind == wire.PROBE_REQUEST:
            resp = wire.encode_probe(wire.Probe(wire.PROBE_RESPONSE, self.session, probe.txn, addr), self.key)
            if addr in self.proven or self.budget.spend(addr, len(resp)):
                out.append((resp, addr))
                self.responses_sent += 1
            if addr not in self.targets and len(self.targets) < self.config.max_targets:
                self._learn(addr, now, out)
            if addr in self.sent_to:
                self._works(addr, now, "request")
        elif probe.kind == wire.PROBE_RESPONSE:
            if self.txns.get(probe.txn) is None:
                raise wire.WireError("response to no request of ours")
            self._works(addr, now, "response")
        return out

    def _learn(self, addr: Addr, now: float, out: list[tuple[bytes, Addr]]) -> None:
        """Peer-reflexive: the peer's NAT gave it a mapping we were not told about (or one we
        predicted but had not probed yet: the peer found us, prediction did not)."""
        self.deferred.pop(addr, None)
        self.targets[addr] = wire.CandidateKind.PRFLX
        self.learned.append(addr)
        if self.success is None and self.failed is None and self.started_at is not None:
            req = self._request(addr)
            if req is not None:
                out.append(req)
                self.sends[addr] = 1
                self.due[addr] = now + self._gap(1)

    def nominate_at(self) -> float:
        """When `best` is nominated unless something better works first."""
        assert self.best is not None
        return self.best.at + (self.config.family_wait if self._ipv6_possible() else self.config.nominate_wait)

    def _ipv6_possible(self) -> bool:
        """Whether `best` is IPv4 and an IPv6 pair is still being tried."""
        if self.best is None or ":" in self.best.addr[0] or not any(_ipv6_host(c) for c in self.own):
            return False
        return any(k == wire.CandidateKind.HOST and ":" in a[0] for a, k in self.targets.items())

    def _lan_possible(self) -> bool:
        """Whether a peer host candidate shares a LAN prefix with one of ours: only then is a LAN
        pair worth waiting for after a WAN pair worked."""
        hosts = tuple(wire.Candidate(k, a) for a, k in self.targets.items() if k == wire.CandidateKind.HOST)
        return bool(lan_candidates(self.own, hosts))

    def _works(self, addr: Addr, now: float, via: str) -> None:
        self.proven.add(addr)
        self.budget.answered(addr)
        if self.success is not None or self.failed is not None:
            return
        kind = wire.CandidateKind.PREDICTED if addr in self.sprayed else self.targets.get(addr, wire.CandidateKind.PRFLX)
        cand = Success(addr, kind, now, via)
        if self.best is None or TYPE_PREFERENCE[kind] > TYPE_PREFERENCE[self.best.kind]:
            self.best = cand
        if kind == wire.CandidateKind.HOST or not (self._lan_possible() or self._ipv6_possible()):
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
            nxt = min(at, self.p.nominate_at() if self.p.best else at)
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
