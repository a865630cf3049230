"""Traversal for real sessions: NAT detection, offers and answers, punching, the direct
connection, and the path manager that keeps traffic on the best verified path.

`AgentTraversal` and `ConnectorTraversal` attach to the roles through their hooks (control
messages, raw datagrams, new sessions); the roles stay usable without them (relay only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import secrets
import statistics
from dataclasses import dataclass, field

from qlab import wire
from qlab.endpoint import Connection, Endpoint
from qlab.net import Addr
from qlab.roles.agent import Agent, AgentSession
from qlab.roles.connector import Connector, ConnectorSession
from qlab.roles.tasks import Tasks
from qlab.traversal.detect import Detection, detect_nat_kind
from qlab.traversal.punch import (
    PunchConfig,
    Puncher,
    PunchRunner,
    both_endpoint_dependent,
    gather,
    host_ips_for,
    lan_candidates,
)

log = logging.getLogger("qlab.traversal")


@dataclass
class TraversalConfig:
    punch: PunchConfig = field(default_factory=PunchConfig)
    direct_timeout: float = 3.0  # QUIC handshake + DirectHello on the punched pair
    keepalive: float = 0.5  # direct-path ping interval (below any NAT binding timeout in use)
    failover: float = 2.0  # a silent direct path is abandoned for the relay within this bound
    retry_after: float = 5.0  # a new upgrade attempt this long after a failed punch or a lost path
    max_attempts: int = 3  # upgrade attempts per session (the first included)
    slack_ratio: float = 0.10  # direct is "not worse" when p50 <= relay p50 * (1 + ratio) + slack_ms
    slack_ms: float = 2.0
    detect_timeout: float = 2.0
    # punch even when both sides are endpoint-dependent (policy skips it: the table says relay), so
    # those cells are measured rather than decided
    punch_anyway: bool = False


async def detect(link, endpoint, creds, name: str, host_ips: list[str], timeout: float) -> Detection:
    """Ask the Intermediate for its listeners and compare QAD answers from the shared socket."""
    observed = link.observed
    if observed is None:
        return Detection(wire.NatKind.UNKNOWN, [])
    try:
        info = await link.request(wire.ServerInfoRequest(link.next_req()), timeout)
        listeners = (info.primary, info.alternate) if isinstance(info, wire.ServerInfo) else None
    except (TimeoutError, ConnectionError):
        listeners = None
    return await detect_nat_kind(endpoint, creds, name, observed, listeners, host_ips, timeout=timeout)


# --- path manager ------------------------------------------------------------------------------


class PathManager:
    """Chooses the Agent's path per session: relay until the direct path is verified (an echo came
    back over it) and not worse than the relay; keeps the direct path alive; abandons it for the
    relay within `failover` seconds when it goes silent; asks for another upgrade later."""

    def __init__(self, session: AgentSession, config: TraversalConfig, on_lost=None) -> None:
        self.s = session
        self.cfg = config
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.events: list[dict] = []
        self.rtts: dict[str, list[float]] = {"relay": [], "direct": []}
        self.verified_at: float | None = None
        self.last_direct_rx = 0.0
        self.on_lost = on_lost
        self._watch: asyncio.Task | None = None
        self.closed = False
        session.path = self

    def event(self, kind: str, detail: str = "") -> None:
        t = round((self.loop.time() - self.t0) * 1000, 3)
        self.events.append({"t_ms": t, "event": kind, "detail": detail})
        log.info("session %08x: %s %s", self.s.id, kind, detail)

    def median(self, path: str) -> float | None:
        v = self.rtts[path]
        return statistics.median(v) if v else None

    def observe_rtt(self, path: str, rtt: float) -> None:
        self.rtts[path].append(rtt)
        if path == "direct":
            self.last_direct_rx = self.loop.time()
            if self.verified_at is None:
                self.verified_at = self.loop.time()
                self.event("direct_verified", f"first echo over the direct path, rtt {rtt * 1000:.2f} ms")
            self._decide()

    def on_rx(self, path: str) -> None:
        if path == "direct":
            self.last_direct_rx = self.loop.time()

    def not_worse(self) -> bool:
        d, r = self.median("direct"), self.median("relay")
        if d is None:
            return False
        if r is None:
            return True
        return d * 1000 <= r * 1000 * (1 + self.cfg.slack_ratio) + self.cfg.slack_ms

    def _decide(self) -> None:
        if self.s.direct is None or self.s.direct.closed or self.verified_at is None:
            return
        good = self.not_worse()
        if good and self.s.active_path != "direct":
            self.s.active_path = "direct"
            r = self.median("relay")
            self.event("switch_to_direct", f"direct p50 {self.median('direct') * 1000:.2f} ms vs relay "
                       + (f"{r * 1000:.2f} ms" if r is not None else "unmeasured"))
        elif not good and self.s.active_path == "direct":
            self.s.active_path = "relay"
            self.event("switch_to_relay", "direct path slower than the relay")

    def direct_up(self, conn: Connection) -> None:
        self.last_direct_rx = self.loop.time()
        self.event("direct_connected", f"QUIC to {conn.peer_addr[0]}:{conn.peer_addr[1]}" if conn.peer_addr else "")
        if self._watch is None or self._watch.done():
            self._watch = self.loop.create_task(self._keep_alive(conn))

    async def _keep_alive(self, conn: Connection) -> None:
        nonce = 0
        dead_after = self.cfg.failover - self.cfg.keepalive
        step = min(self.cfg.keepalive, dead_after) / 4  # detection within dead_after + step
        last_ping = 0.0
        while not conn.closed and self.s.direct is conn:
            await asyncio.sleep(step)
            now = self.loop.time()
            if now - self.last_direct_rx > dead_after:
                self.lost(f"no answer on the direct path for {now - self.last_direct_rx:.2f}s")
                self.s.agent.endpoint.abandon(conn, "direct path lost")
                return
            if now - last_ping >= self.cfg.keepalive:
                nonce = (nonce + 1) & 0xFFFFFFFF
                conn.send_control(wire.Ping(nonce))
                last_ping = now

    def lost(self, reason: str) -> None:
        if self.closed:
            return
        if self.s.active_path == "direct":
            self.s.active_path = "relay"
        self.s.direct = None
        self.verified_at = None
        self.event("direct_lost", f"{reason}; traffic continues over the relay")
        if self.on_lost is not None:
            self.on_lost(reason)

    def close(self) -> None:
        self.closed = True
        if self._watch is not None:
            self._watch.cancel()


# --- birthday mode: the endpoint-dependent side's many mappings ---------------------------------


class BirthdayPool:
    """The hard (random-port symmetric) side of a birthday punch: N extra sockets, each sending
    probes to the peer's reflexive address, so its NAT opens N mappings that admit the peer. The peer
    sprays random ports; when one hits, that socket is the pair. Endpoints come from `make_endpoint`
    (the Connector's accept QUIC too); all but the winner close."""

    def __init__(self, session_id: int, key: bytes, peer: Addr, n: int, make_endpoint, on_win) -> None:
        self.session_id = session_id
        self.key = key
        self.peer = peer
        self.n = n
        self.make_endpoint = make_endpoint
        self.on_win = on_win
        self.endpoints: list = []
        self.winner = None
        self.probes_sent = 0
        self._task: asyncio.Task | None = None

    async def start(self, duration: float) -> None:
        for _ in range(self.n):
            ep = await self.make_endpoint()
            ep.raw_handler = lambda data, addr, ep=ep: self._on_raw(ep, data, addr)
            self.endpoints.append(ep)
        self._task = asyncio.get_running_loop().create_task(self._keep_probing(duration))

    def _probe(self, ep) -> None:
        txn = secrets.randbits(64)
        ep.send_raw(wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, self.session_id, txn), self.key), self.peer)
        self.probes_sent += 1

    async def _keep_probing(self, duration: float) -> None:
        end = asyncio.get_running_loop().time() + duration
        while self.winner is None and asyncio.get_running_loop().time() < end:
            for ep in list(self.endpoints):
                self._probe(ep)  # (re)opens and refreshes this socket's mapping towards the peer
            await asyncio.sleep(0.5)
        if self.winner is None:
            self.close()

    def _on_raw(self, ep, data: bytes, addr: Addr) -> None:
        try:
            probe = wire.decode_probe(data, self.key)
        except wire.WireError:
            return
        if probe.session != self.session_id:
            return
        if probe.kind == wire.PROBE_REQUEST:
            resp = wire.Probe(wire.PROBE_RESPONSE, self.session_id, probe.txn, addr)
            ep.send_raw(wire.encode_probe(resp, self.key), addr)
        if self.winner is None:
            self.winner = (ep, addr)
            for other in self.endpoints:
                if other is not ep:
                    other.close()
            self.endpoints = [ep]
            self.on_win(ep, addr)

    def close(self, keep_winner: bool = False) -> None:
        if self._task is not None:
            self._task.cancel()
        for ep in self.endpoints:
            if keep_winner and self.winner is not None and ep is self.winner[0]:
                continue
            ep.close()


def _peer_reflexive(candidates: tuple[wire.Candidate, ...]) -> Addr | None:
    for c in candidates:
        if c.kind == wire.CandidateKind.SRFLX:
            return c.addr
    return None


def _birthday_role(own: wire.NatKind, peer: wire.NatKind) -> str | None:
    if own == wire.NatKind.EDM_RANDOM and peer in (wire.NatKind.EIM, wire.NatKind.NONE):
        return "hard"
    if peer == wire.NatKind.EDM_RANDOM and own in (wire.NatKind.EIM, wire.NatKind.NONE):
        return "easy"
    return None


# --- agent side --------------------------------------------------------------------------------


class SessionTraversal:
    """The Agent's traversal state of one session."""

    def __init__(self, owner: AgentTraversal, session: AgentSession) -> None:
        self.owner = owner
        self.session = session
        self.path = PathManager(session, owner.cfg, on_lost=self._lost)
        self.runner: PunchRunner | None = None
        self.puncher: Puncher | None = None
        self.attempts = 0
        self.reason: str | None = None
        self.peer_nat: wire.NatKind = wire.NatKind.UNKNOWN
        self.peer_candidates: tuple[wire.Candidate, ...] = ()
        self.peer_result: wire.PunchResult | None = None
        self.working: Addr | None = None
        self.working_kind: wire.CandidateKind | None = None
        self.probes_sent = 0
        self.punch_started_at: float | None = None
        self.punch_ms: float | None = None
        self.settled = asyncio.Event()  # direct verified, or given up on this attempt
        self.birthday: BirthdayPool | None = None
        self.tasks = Tasks()

    def new_puncher(self) -> Puncher:
        key = self.session.key or b""
        self.puncher = Puncher(self.session.id, key, self.owner.candidates, (), self.owner.cfg.punch)
        return self.puncher

    def on_start_punch(self, msg: wire.StartPunch) -> None:
        if self.session.direct is not None and not self.session.direct.closed and self.path.verified_at is not None:
            return  # a re-opened session (the Intermediate restarted): the direct path is fine
        self.attempts += 1
        self.working = self.working_kind = None  # a new attempt: nothing has worked yet
        if self.birthday is not None:
            self.birthday.close()
            self.birthday = None
        self.peer_nat = msg.peer_nat
        self.peer_candidates = msg.peer_candidates
        own = self.owner.detection.kind
        lan_only = both_endpoint_dependent(own, msg.peer_nat) and not self.owner.cfg.punch_anyway
        if lan_only and not lan_candidates(self.owner.candidates, msg.peer_candidates):
            self.reason = (f"both sides are behind endpoint-dependent NATs (agent {own.name}, connector "
                           f"{msg.peer_nat.name}): staying on the relay without punching")
            self.path.event("punch_skipped", self.reason)
            self.owner.agent.link.send(wire.PunchResult(self.session.id, 0, None, 0))
            self.settled.set()
            return
        p = self.puncher if self.puncher is not None and self.puncher.started_at is None else self.new_puncher()
        if not p.key and self.session.key:
            p.key = self.session.key
        p.set_peer(lan_candidates(self.owner.candidates, msg.peer_candidates) if lan_only else msg.peer_candidates)
        p.config = _with_prediction_delay(self.owner.cfg.punch, self.owner.agent.link.conn)
        loop = asyncio.get_running_loop()
        self.punch_started_at = loop.time() + msg.delay_ms / 1000
        self.path.event("punch_start", f"{len(p.targets)} targets, start in {msg.delay_ms} ms, peer NAT {msg.peer_nat.name}")
        role = _birthday_role(own, msg.peer_nat) if msg.birthday else None
        if role == "easy":
            p.birthday_spray(_peer_reflexive(msg.peer_candidates)[0], msg.birthday, random.Random(self.session.id))
            self.path.event("birthday", f"spraying {msg.birthday} random ports of the peer")
        elif role == "hard":
            self.tasks.spawn(self._birthday_hard(msg))
        self.runner = PunchRunner(p, self.owner.agent.endpoint.send_raw, self._punch_done)
        self.runner.start(msg.delay_ms / 1000)

    async def _birthday_hard(self, msg: wire.StartPunch) -> None:
        peer = _peer_reflexive(msg.peer_candidates)
        if peer is None or self.session.key is None:
            return
        agent = self.owner.agent

        async def make_endpoint():
            ep = Endpoint(agent.net)
            await ep.bind(agent.host, 0)
            return ep

        def won(ep, addr) -> None:
            if self.working is not None:
                return
            self.working, self.working_kind = addr, wire.CandidateKind.PREDICTED
            self.path.event("punch_ok", f"birthday socket {ep.local_address[1]} reached {addr[0]}:{addr[1]}")
            if self.runner is not None:
                self.runner.cancel()
            self.tasks.spawn(self._connect(addr, ep))

        self.birthday = BirthdayPool(self.session.id, self.session.key, peer, msg.birthday, make_endpoint, won)
        self.path.event("birthday", f"opening {msg.birthday} mappings towards {peer[0]}:{peer[1]}")
        await self.birthday.start(self.owner.cfg.punch.timeout + msg.birthday / 100)

    def on_probe(self, data: bytes, addr: Addr) -> bool:
        if self.puncher is None:
            if self.session.key is None:
                return False
            self.new_puncher()
        if self.runner is None:  # the peer started first: answer, it opens its NAT for us
            try:
                out = self.puncher.receive(data, addr, asyncio.get_running_loop().time())
            except wire.WireError:
                return False
            for d, a in out:
                self.owner.agent.endpoint.send_raw(d, a)
            return True
        return self.runner.receive(data, addr)

    def _punch_done(self, p: Puncher) -> None:
        self.probes_sent += p.probes_sent
        if self.working is not None:
            return  # a birthday socket already won
        link = self.owner.agent.link
        if p.success is None:
            self.reason = f"hole punch failed: {p.failed}" + _hint(self.owner.detection.kind, self.peer_nat)
            self.path.event("punch_failed", self.reason)
            link.send(wire.PunchResult(self.session.id, 0, None, min(p.probes_sent, 0xFFFF)))
            self.settled.set()
            self._retry_later()
            return
        self.working, self.working_kind = p.success.addr, p.success.kind
        self.punch_ms = (p.success.at - (self.punch_started_at or p.success.at)) * 1000
        self.path.event("punch_ok", f"{p.success.kind.name.lower()} {p.success.addr[0]}:{p.success.addr[1]} via "
                        f"{p.success.via} after {self.punch_ms:.1f} ms")
        link.send(wire.PunchResult(self.session.id, 1, p.success.addr, min(p.probes_sent, 0xFFFF)))
        self.tasks.spawn(self._connect(p.success.addr))

    async def _connect(self, addr: Addr, endpoint: Endpoint | None = None) -> None:
        agent = self.owner.agent
        try:
            conn = await agent.connect_direct(self.session, addr, self.owner.cfg.direct_timeout,
                                              on_handshake=self.owner.on_direct_handshake(self.session),
                                              endpoint=endpoint)
        except (TimeoutError, ConnectionError, OSError) as exc:
            self.reason = f"direct QUIC connection to {addr[0]}:{addr[1]} failed: {str(exc) or type(exc).__name__}"
            self.path.event("direct_failed", self.reason)
            self.settled.set()
            self._retry_later()
            return
        self.reason = None
        self.path.direct_up(conn)

    def _lost(self, reason: str) -> None:
        self.reason = f"direct path lost: {reason}"
        self._retry_later()

    def _retry_later(self) -> None:
        if self.attempts >= self.owner.cfg.max_attempts or self.session.closed:
            return

        async def retry() -> None:
            await asyncio.sleep(self.owner.cfg.retry_after)
            if self.session.direct is None and not self.session.closed:
                self.path.event("upgrade_retry", f"attempt {self.attempts + 1}")
                self.puncher = None
                self.runner = None
                self.owner.agent.link.send(
                    wire.Offer(self.session.id, self.owner.detection.kind, self.owner.candidates))

        self.tasks.spawn(retry())

    def close(self) -> None:
        self.tasks.cancel_all()
        if self.runner is not None:
            self.runner.cancel()
        if self.birthday is not None:
            self.birthday.close()
        self.path.close()


def _with_prediction_delay(cfg: PunchConfig, conn: Connection | None) -> PunchConfig:
    """Predicted ports wait until a peer-reflexive request would have arrived: about one RTT to
    the Intermediate (the direct path is rarely longer), and at least three probe rounds."""
    rtt = conn.rtt if conn is not None and conn.rtt is not None else 0.0
    return dataclasses.replace(cfg, predict_after=max(cfg.predict_after, 3 * cfg.interval, rtt))


def _hint(own: wire.NatKind, peer: wire.NatKind) -> str:
    hard = (wire.NatKind.EDM_RANDOM, wire.NatKind.EDM_SEQUENTIAL)
    if (own == wire.NatKind.EDM_RANDOM or peer == wire.NatKind.EDM_RANDOM) and (own in hard or peer in hard):
        return " (an endpoint-dependent NAT with random ports on one side and filtering on the other)"
    return ""


class AgentTraversal:
    """Attach to an Agent: detects its NAT once, offers candidates with every session, punches on
    StartPunch and upgrades sessions to a direct path."""

    def __init__(self, agent: Agent, config: TraversalConfig | None = None) -> None:
        self.agent = agent
        self.cfg = config or TraversalConfig()
        self.detection = Detection(wire.NatKind.UNKNOWN, [])
        self.candidates: tuple[wire.Candidate, ...] = ()
        self.sessions: dict[int, SessionTraversal] = {}
        self.direct_handshake_hooks: list = []
        agent.message_hooks.append(self._on_message)
        agent.raw_hooks.append(self._on_raw)

    async def prepare(self) -> Detection:
        """Run after `agent.start()`: classify the own NAT via QAD and gather candidates."""
        host_ips = host_ips_for(self.agent.endpoint.local_address, self.agent.net.host_addresses())
        self.detection = await detect(self.agent.link, self.agent.endpoint, self.agent.creds, self.agent.name,
                                      host_ips, self.cfg.detect_timeout)
        self.candidates = gather(host_ips, self.agent.endpoint.local_address[1], self.agent.link.observed,
                                 self.detection.kind, self.detection.last_port)
        self.agent.reopen_offer = (self.detection.kind, self.candidates)
        return self.detection

    def begin(self, service: str) -> SessionTraversal:
        session = self.agent.begin_session(service, self.detection.kind, self.candidates)
        st = SessionTraversal(self, session)
        self.sessions[session.id] = st
        return st

    def on_direct_handshake(self, session: AgentSession):
        def hook(conn: Connection) -> None:
            for h in self.direct_handshake_hooks:
                h(session, conn)

        return hook

    def _on_message(self, msg: wire.Message) -> bool:
        st = self.sessions.get(getattr(msg, "session", -1))
        if st is None:
            return False
        if isinstance(msg, wire.StartPunch):
            st.on_start_punch(msg)
            return True
        if isinstance(msg, wire.PunchResult):
            st.peer_result = msg
            return True
        return False

    def _on_raw(self, data: bytes, addr: Addr) -> bool:
        try:
            sid = wire.probe_session(data)
        except wire.WireError:
            return False
        st = self.sessions.get(sid)
        return st.on_probe(data, addr) if st is not None else False

    def close(self) -> None:
        for st in self.sessions.values():
            st.close()


# --- connector side ----------------------------------------------------------------------------


class ConnectorTraversal:
    """Attach to a Connector: detects its NAT after each (re)connection, answers offers, punches."""

    def __init__(self, connector: Connector, config: TraversalConfig | None = None) -> None:
        self.c = connector
        self.cfg = config or TraversalConfig()
        self.detection = Detection(wire.NatKind.UNKNOWN, [])
        self.candidates: tuple[wire.Candidate, ...] = ()
        self.ready = asyncio.Event()
        self.runners: dict[int, PunchRunner] = {}
        self.punchers: dict[int, Puncher] = {}
        self.results: dict[int, dict] = {}
        self.pools: dict[int, BirthdayPool] = {}
        self.announced = False
        self.tasks = Tasks()
        connector.message_hooks.append(self._on_message)
        connector.raw_hooks.append(self._on_raw)
        connector.session_hooks.append(self._on_session)
        prev_up = connector.link.on_up

        def on_up() -> None:
            if prev_up is not None:
                prev_up()
            self.ready.clear()
            self.announced = False
            self.tasks.spawn(self.prepare())

        connector.link.on_up = on_up

    async def prepare(self) -> None:
        host_ips = host_ips_for(self.c.endpoint.local_address, self.c.net.host_addresses())
        try:
            self.detection = await detect(self.c.link, self.c.endpoint, self.c.creds, self.c.name, host_ips,
                                          self.cfg.detect_timeout)
        finally:
            self.candidates = gather(host_ips, self.c.endpoint.local_address[1], self.c.link.observed,
                                     self.detection.kind, self.detection.last_port)
            self.c.link.send(wire.Announce(self.detection.kind, self.candidates))
            self.announced = True
            self.ready.set()

    def _answer(self, s: ConnectorSession) -> None:
        async def answer() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), self.cfg.detect_timeout * 3)
            self.punchers.setdefault(s.id, Puncher(s.id, s.key, self.candidates, (), self.cfg.punch))
            self.c.link.send(wire.Answer(s.id, self.detection.kind, self.candidates))

        self.tasks.spawn(answer())

    def _on_session(self, s: ConnectorSession) -> None:
        if self.announced:
            # the Intermediate already has our candidates and starts the punch itself
            self.punchers[s.id] = Puncher(s.id, s.key, self.candidates, (), self.cfg.punch)
        else:
            self._answer(s)

    def _on_message(self, msg: wire.Message) -> bool:
        sid = getattr(msg, "session", None)
        s = self.c.sessions.get(sid) if sid is not None else None
        if s is None:
            return False
        if isinstance(msg, wire.Offer):
            s.agent_nat, s.agent_candidates = msg.nat, msg.candidates
            old = self.runners.pop(s.id, None)
            if old is not None:
                old.cancel()
            self._answer(s)
            return True
        if isinstance(msg, wire.StartPunch):
            peer = msg.peer_candidates
            if both_endpoint_dependent(self.detection.kind, msg.peer_nat) and not self.cfg.punch_anyway:
                peer = lan_candidates(self.candidates, peer)  # only a shared LAN can work
                if not peer:
                    return True
            p = self.punchers.get(s.id)
            if p is None or p.started_at is not None:
                p = self.punchers[s.id] = Puncher(s.id, s.key, self.candidates, (), self.cfg.punch)
            p.set_peer(peer)
            p.config = _with_prediction_delay(self.cfg.punch, self.c.link.conn)
            role = _birthday_role(self.detection.kind, msg.peer_nat) if msg.birthday else None
            if role == "easy":
                p.birthday_spray(_peer_reflexive(msg.peer_candidates)[0], msg.birthday, random.Random(s.id))
            elif role == "hard":
                self.tasks.spawn(self._birthday_hard(s, msg))
            r = PunchRunner(p, self.c.endpoint.send_raw, lambda p, sid=s.id: self._done(sid, p))
            self.runners[s.id] = r
            r.start(msg.delay_ms / 1000)
            return True
        if isinstance(msg, wire.PunchResult):
            self.results.setdefault(s.id, {})["agent"] = msg
            return True
        return False

    async def _birthday_hard(self, s: ConnectorSession, msg: wire.StartPunch) -> None:
        peer = _peer_reflexive(msg.peer_candidates)
        if peer is None:
            return
        pool = BirthdayPool(s.id, s.key, peer, msg.birthday, self.c.new_endpoint,
                            lambda ep, addr: self.results.setdefault(s.id, {}).update(birthday=(ep, addr)))
        self.pools[s.id] = pool
        await pool.start(self.cfg.punch.timeout + msg.birthday / 100)

    def _done(self, sid: int, p: Puncher) -> None:
        self.results.setdefault(sid, {})["own"] = p
        ok = p.success is not None
        self.c.link.send(wire.PunchResult(sid, int(ok), p.success.addr if ok else None, min(p.probes_sent, 0xFFFF)))

    def _on_raw(self, data: bytes, addr: Addr) -> bool:
        try:
            sid = wire.probe_session(data)
        except wire.WireError:
            return False
        r = self.runners.get(sid)
        if r is not None:
            return r.receive(data, addr)
        p = self.punchers.get(sid)
        if p is None:
            return False
        try:
            out = p.receive(data, addr, asyncio.get_running_loop().time())
        except wire.WireError:
            return False
        for d, a in out:
            self.c.endpoint.send_raw(d, a)
        return True

    def close(self) -> None:
        self.tasks.cancel_all()
        for r in self.runners.values():
            r.cancel()
        for pool in self.pools.values():
            pool.close()
