"""The Agent's traversal: detects its NAT once, offers candidates with every session, punches on
StartPunch, connects directly and keeps each session on its best verified path.

A sealed session (`wire.SessionMode.SEALED`) dials its end-to-end connection through the relay at
once; on a punched pair that connection migrates instead of a new one being opened, and a lost
direct path migrates it back to the relay.

`AgentTraversal` observes the Agent's events (`qlab.roles.agent.AgentEvent`); the Agent stays
usable without it (relay only).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from qlab import quic_internals as qi
from qlab import wire
from qlab.endpoint import Connection, Endpoint
from qlab.net import Addr
from qlab.roles.agent import (
    Agent,
    AgentEvent,
    AgentSession,
    DirectLost,
    SealedLost,
    SessionEnded,
    SessionReopened,
)
from qlab.roles.control import Backoff
from qlab.roles.events import ControlReceived, RawReceived
from qlab.traversal.detect import Detection
from qlab.traversal.mapped import MappedAddress
from qlab.traversal.path import PathManager, TraversalConfig
from qlab.traversal.punch import Puncher, gather, host_ips_for
from qlab.traversal.session import PunchSession, deliver_probe, deliver_signal, detect
from qlab.wire import Path


class SessionTraversal(PunchSession):
    """The Agent's traversal state of one session."""

    owner: AgentTraversal

    def __init__(self, owner: AgentTraversal, session: AgentSession) -> None:
        agent = owner.agent
        super().__init__(owner, session, agent.link, agent.endpoint.send_raw, self._birthday_endpoint)
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.path = PathManager(session.id, owner.cfg, self.loop.time())
        self.attempts = 0
        self.reason: str | None = None
        self.working: Addr | None = None
        self.working_kind: wire.CandidateKind | None = None
        self.probes_sent = 0
        self.punch_ms: float | None = None
        self.punch_ok_at: float | None = None  # loop time the punch proved the working pair
        self.settled = asyncio.Event()  # direct verified, or given up on this attempt
        self._direct_since = 0.0
        self._watch: asyncio.Task[None] | None = None
        self.sealed_ready = asyncio.Event()  # sealed mode: the end-to-end connection is up
        self._dialing: asyncio.Task[None] | None = None
        if session.mode == wire.SessionMode.SEALED:
            self._dialing = self.tasks.spawn(self._open_sealed())

    async def _birthday_endpoint(self, raw_handler: Callable[[bytes, Addr], None]) -> Endpoint:
        agent = self.owner.agent
        ep = Endpoint(agent.net, raw_handler=raw_handler)
        await ep.bind(agent.host, 0)
        return ep

    # -- the path --------------------------------------------------------------------------------
    def observe_rtt(self, path: Path, rtt: float) -> None:
        """An echo came back over `path` (the application's measurement feeds the path choice)."""
        now = self.loop.time()
        direct = self.session.direct
        switch = self.path.observe_rtt(path, rtt, now, direct is not None and not direct.closed)
        if switch is not None:
            self.session.use(switch)

    def _direct_up(self, conn: Connection) -> None:
        self._direct_since = self.loop.time()
        sealed = self.session.mode == wire.SessionMode.SEALED
        self.path.direct_connected(self._direct_since, self.session.direct_addr if sealed else conn.peer_addr,
                                   "migrated the end-to-end connection to" if sealed else "QUIC to")
        if self._watch is None or self._watch.done():
            self._watch = self.tasks.spawn(self._keep_alive(conn))

    async def _keep_alive(self, conn: Connection) -> None:
        nonce = 0
        dead_after = self.path.dead_after
        step = min(self.cfg.keepalive, dead_after) / 4  # detection within dead_after + step
        last_ping = 0.0
        sealed = self.session.mode == wire.SessionMode.SEALED
        while not conn.closed and self.session.direct is conn:
            await asyncio.sleep(step)
            now = self.loop.time()
            if sealed and self.session.active_path != Path.DIRECT:
                self._direct_since = now  # moved to the relay for now: the direct path is not being heard
                continue
            last_rx = max(self._direct_since, self.session.last_direct_rx)
            if now - last_rx > dead_after:
                self.lose(f"no answer on the direct path for {now - last_rx:.2f}s")
                if not sealed:  # a sealed connection lives on, on the relay
                    self.owner.agent.endpoint.abandon(conn, "direct path lost")
                return
            if now - last_ping >= self.cfg.keepalive:
                nonce = (nonce + 1) & 0xFFFFFFFF
                conn.send_control(wire.Ping(nonce))
                last_ping = now

    def lose(self, reason: str) -> None:
        """The direct path is gone: back to the relay, and another upgrade later."""
        self.session.use(Path.RELAY)
        if self.path.closed:
            return
        self.session.direct = None
        self.session.direct_addr = None
        self.path.lost(self.loop.time(), reason)
        self.reason = f"direct path lost: {reason}"
        self._retry_later()

    # -- punching --------------------------------------------------------------------------------
    def start_punch(self, msg: wire.StartPunch) -> None:
        if self.session.direct is not None and not self.session.direct.closed and self.path.verified_at is not None:
            return  # a re-opened session (the Intermediate restarted): the direct path is fine
        self.attempts += 1
        self.working = self.working_kind = None  # a new attempt: nothing has worked yet
        super().start_punch(msg)

    def answers_before_start(self) -> Puncher | None:
        if self.puncher is None and self.key is not None:
            self.new_puncher()
        return self.puncher

    def note(self, kind: str, detail: str) -> None:
        self.path.event(self.loop.time(), kind, detail)

    def skip(self) -> None:
        self.reason = (f"both sides are behind endpoint-dependent NATs (agent {self.own_nat.name}, connector "
                       f"{self.peer_nat.name}): staying on the relay without punching")
        self.note("punch_skipped", self.reason)
        self.link.send(wire.PunchResult(self.id, 0, None, 0))
        self.settled.set()

    def birthday_won(self, ep: Endpoint, addr: Addr) -> None:
        if self.working is not None:
            return
        self.working, self.working_kind = addr, wire.CandidateKind.PREDICTED
        self.punch_ok_at = self.loop.time()
        self.note("punch_ok", f"birthday socket {ep.local_address[1]} reached {addr[0]}:{addr[1]}")
        if self.runner is not None:
            self.runner.cancel()
        self.tasks.spawn(self._connect(addr, ep))

    def punch_done(self, p: Puncher) -> None:
        self.probes_sent += p.probes_sent
        if self.working is not None:
            return  # a birthday socket already won
        if p.success is None:
            self.reason = f"hole punch failed: {p.failed}" + _hint(self.own_nat, self.peer_nat)
            self.note("punch_failed", self.reason)
            self.link.send(wire.PunchResult(self.id, 0, None, min(p.probes_sent, 0xFFFF)))
            self.settled.set()
            self._retry_later()
            return
        self.working, self.working_kind = p.success.addr, p.success.kind
        self.punch_ok_at = p.success.at
        self.punch_ms = (p.success.at - (self.punch_started_at or p.success.at)) * 1000
        self.note("punch_ok", f"{p.success.kind.name.lower()} {p.success.addr[0]}:{p.success.addr[1]} via "
                  f"{p.success.via} after {self.punch_ms:.1f} ms")
        self.link.send(wire.PunchResult(self.id, 1, p.success.addr, min(p.probes_sent, 0xFFFF)))
        self.tasks.spawn(self._connect(p.success.addr))

    async def _connect(self, addr: Addr, endpoint: Endpoint | None = None) -> None:
        if self.session.mode == wire.SessionMode.SEALED:
            await self._migrate(addr, endpoint)
            return
        try:
            conn = await self.owner.agent.connect_direct(self.session, addr, self.cfg.direct_timeout,
                                                         endpoint=endpoint)
        except (TimeoutError, ConnectionError, OSError) as exc:
            self.reason = f"direct QUIC connection to {addr[0]}:{addr[1]} failed: {str(exc) or type(exc).__name__}"
            self.note("direct_failed", self.reason)
            self.settled.set()
            self._retry_later()
            return
        self.reason = None
        self._direct_up(conn)

    # -- sealed mode -------------------------------------------------------------------------------
    async def _open_sealed(self) -> None:
        """Dial the end-to-end connection through the relay; again after it is lost, with backoff."""
        backoff = Backoff(0.2, 5.0)
        while not self.session.closed and not self.path.closed:
            try:
                conn = await self.owner.agent.connect_sealed(self.session, self.cfg.direct_timeout + 2.0)
            except (TimeoutError, ConnectionError, OSError) as exc:
                self.note("sealed_failed", f"end-to-end connection through the relay: {str(exc) or type(exc).__name__}")
                await asyncio.sleep(backoff.next())
                continue
            await self._until_confirmed(conn)
            self.note("sealed_connected", "end-to-end QUIC connection through the relay, the Connector proven")
            self.sealed_ready.set()
            if self.working is not None and self.session.direct is None:
                await self._migrate(self.working)  # the punch won while the connection was coming up
            return

    async def _until_confirmed(self, conn: Connection) -> None:
        """RFC 9000 section 9: no migration before the handshake is confirmed (HANDSHAKE_DONE
        comes in the flight of the DirectAccept, so this rarely waits)."""
        end = self.loop.time() + self.cfg.direct_timeout
        while not qi.handshake_confirmed(conn.quic) and not conn.closed and self.loop.time() < end:
            await asyncio.sleep(0.005)

    def redial_sealed(self, reason: str) -> None:
        """The sealed connection is gone (the Connector restarted, say): a new one, through the relay."""
        old = self.session.sealed
        if old is not None:
            self.owner.agent.endpoint.abandon(old, reason)
        self.sealed_ready.clear()
        if self._dialing is None or self._dialing.done():  # one dial at a time
            self._dialing = self.tasks.spawn(self._open_sealed())

    async def _migrate(self, addr: Addr, endpoint: Endpoint | None = None) -> None:
        agent = self.owner.agent
        if endpoint is not None and endpoint is not agent.endpoint:
            self.reason = "a birthday socket won, but a sealed connection lives on the shared socket"
            self.note("direct_failed", self.reason)
            self.settled.set()
            return
        if not self.sealed_ready.is_set():
            return  # `_open_sealed` migrates once the connection is up (`working` is kept)
        conn = agent.migrate_sealed(self.session, addr)
        if conn is None:
            return
        self.reason = None
        self._direct_up(conn)

    def _retry_later(self) -> None:
        if self.attempts >= self.cfg.max_attempts or self.session.closed:
            return

        async def retry() -> None:
            await asyncio.sleep(self.cfg.retry_after)
            if self.session.direct is None and not self.session.closed:
                self.note("upgrade_retry", f"attempt {self.attempts + 1}")
                self.puncher = None
                self.runner = None
                self.link.send(wire.Offer(self.id, self.own_nat, self.candidates))

        self.tasks.spawn(retry())

    def close(self) -> None:
        super().close()
        self.path.close()


def _hint(own: wire.NatKind, peer: wire.NatKind) -> str:
    if wire.NatKind.EDM_RANDOM in (own, peer):  # random ports: neither prediction nor reflexive works
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
        self.host_ips: list[str] = []
        self.mapped: MappedAddress | None = None
        self._unsubscribe = agent.subscribe(self._on_event)

    async def prepare(self) -> Detection:
        """Run after `agent.start()`: ask for a port mapping (in the background), classify the own
        NAT via QAD and gather candidates."""
        agent = self.agent
        self.host_ips = host_ips_for(agent.endpoint.local_address, agent.net.host_addresses())
        if self.cfg.port_mapping and self.mapped is None:
            self.mapped = MappedAddress(agent.net, agent.endpoint.local_address, self.host_ips,
                                        lambda _m: self._gather())
            self.mapped.start()
        self.detection = await detect(agent.link, agent.endpoint, agent.creds, agent.name, self.host_ips,
                                      self.cfg.detect_timeout,
                                      self.cfg.qad6)
        if self.mapped is not None:
            await self.mapped.settled()
        self._gather()
        return self.detection

    def _gather(self) -> None:
        """The candidates the next offer carries (a mapping that arrives later joins them)."""
        agent = self.agent
        mapped = self.mapped.address if self.mapped is not None else None
        self.candidates = gather(self.host_ips, agent.endpoint.local_address[1], agent.link.observed,
                                 self.detection.kind, self.detection.last_port, mapped)
        agent.reopen_offer = (self.detection.kind, self.candidates)

    def begin(self, service: str, mode: wire.SessionMode = wire.SessionMode.TERMINATED) -> SessionTraversal:
        session = self.agent.begin_session(service, self.detection.kind, self.candidates, mode)
        st = SessionTraversal(self, session)
        self.sessions[session.id] = st
        return st

    def _on_event(self, event: AgentEvent) -> bool:
        if isinstance(event, ControlReceived):
            return self._on_message(event.msg)
        if isinstance(event, RawReceived):
            return self._on_raw(event.data, event.addr)
        if isinstance(event, DirectLost):
            st = self.sessions.get(event.session.id)
            if st is not None:
                st.lose(event.reason)
        elif isinstance(event, SealedLost):
            st = self.sessions.get(event.session.id)
            if st is not None and not event.session.closed:
                st.note("sealed_lost", event.reason)
                st.redial_sealed(event.reason)
        elif isinstance(event, SessionReopened):
            st = self.sessions.get(event.session.id)
            if st is not None:
                st.note("session_reopened", "the Connector is back")
                if event.session.mode == wire.SessionMode.SEALED:  # a new Connector knows no connection
                    st.redial_sealed("the Connector restarted")
        elif isinstance(event, SessionEnded):
            st = self.sessions.pop(event.session.id, None)
            if st is not None:
                st.close()
        return False

    def _on_message(self, msg: wire.Message) -> bool:
        return deliver_signal(self.sessions, msg)

    def _on_raw(self, data: bytes, addr: Addr) -> bool:
        return deliver_probe(self.sessions, data, addr)

    def close(self) -> None:
        self._unsubscribe()
        if self.mapped is not None:
            self.mapped.close()
        for st in self.sessions.values():
            st.close()
