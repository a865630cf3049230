"""The traversal of one session, the part both sides share: StartPunch handling, probe intake and
the start of birthday mode are written once here; `qlab.traversal.agent_side` and
`qlab.traversal.connector_side` add what only one side does (the Agent connects and manages the
path; the Connector answers offers).

A side's `PunchSession` subclass is told what happened through the methods it overrides
(`punch_done`, `birthday_won`, `skip`, `note`; `answers_before_start` says whether probes are
answered before StartPunch); the session owns everything it starts (puncher, runner, birthday
pool, tasks) and `close()` releases all of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping
from typing import Protocol

from qlab import wire
from qlab.certs import Credentials
from qlab.endpoint import Connection, Endpoint
from qlab.net import Addr
from qlab.roles.link import IntermediateLink
from qlab.roles.tasks import Tasks
from qlab.traversal.birthday import BirthdayPool, MakeEndpoint
from qlab.traversal.detect import Detection, detect_nat_kind, observe_ipv6
from qlab.traversal.path import TraversalConfig
from qlab.traversal.punch import (
    ProbeBudget,
    PunchConfig,
    Puncher,
    PunchRunner,
    lockstep_candidates,
    without_nat,
)

log = logging.getLogger("qlab.traversal")


async def detect(link: IntermediateLink, endpoint: Endpoint, creds: Credentials, name: str, host_ips: list[str],
                 timeout: float, qad6: Addr | None = None) -> Detection:
    """Ask the Intermediate for its listeners and compare QAD answers from the shared socket; with
    an IPv6 address of our own and the Intermediate's IPv6 listener `qad6`, QAD over IPv6 too."""
    det = await _detect4(link, endpoint, creds, name, host_ips, timeout)
    if qad6 is not None and any(":" in ip for ip in host_ips):
        det.observed6 = await observe_ipv6(endpoint, creds, name, qad6, timeout)
    return det


async def _detect4(link: IntermediateLink, endpoint: Endpoint, creds: Credentials, name: str, host_ips: list[str],
                   timeout: float) -> Detection:
    observed = link.observed
    if observed is None:
        return Detection(wire.NatKind.UNKNOWN, [])
    try:
        info = await link.request(wire.ServerInfoRequest(link.next_req()), timeout)
        listeners = (info.primary, info.alternate) if isinstance(info, wire.ServerInfo) else None
    except (TimeoutError, ConnectionError):
        listeners = None
    return await detect_nat_kind(endpoint, creds, name, observed, listeners, host_ips, timeout=timeout)


def peer_reflexive(candidates: tuple[wire.Candidate, ...]) -> Addr | None:
    for c in candidates:
        if c.kind == wire.CandidateKind.SRFLX:
            return c.addr
    return None


def with_prediction_delay(cfg: PunchConfig, conn: Connection | None) -> PunchConfig:
    """Predicted ports wait until a peer-reflexive request would have arrived: about one RTT to
    the Intermediate (the direct path is rarely longer), and at least three probe rounds."""
    rtt = conn.rtt if conn is not None and conn.rtt is not None else 0.0
    return dataclasses.replace(cfg, predict_after=max(cfg.predict_after, 3 * cfg.interval, rtt))


class Side(Protocol):
    """What a session reads from its side: the configuration, and the NAT and candidates that the
    side's last detection found (the Connector detects again after every reconnection)."""

    cfg: TraversalConfig
    detection: Detection
    candidates: tuple[wire.Candidate, ...]


class RoleSession(Protocol):
    """The role's session that a `PunchSession` punches for (its key arrives with SessionOpened on
    the Agent, and changes when the Intermediate restarts and the session is re-opened)."""

    @property
    def id(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...


class PunchSession:
    """One session's punching, on either side. `send_raw` sends from the side's shared socket;
    `make_endpoint` opens the birthday pool's extra sockets."""

    def __init__(self, owner: Side, session: RoleSession, link: IntermediateLink,
                 send_raw: Callable[[bytes, Addr], None], make_endpoint: MakeEndpoint) -> None:
        self.owner = owner
        self.role_session = session
        self.id = session.id
        self.link = link
        self.send_raw = send_raw
        self.make_endpoint = make_endpoint
        self.puncher: Puncher | None = None
        self.runner: PunchRunner | None = None
        self.birthday: BirthdayPool | None = None
        self.peer_nat = wire.NatKind.UNKNOWN
        self.peer_candidates: tuple[wire.Candidate, ...] = ()
        self.peer_result: wire.PunchResult | None = None  # what the other side reported
        self.punch_started_at: float | None = None
        self.budget = ProbeBudget()  # every attempt of this session pays from it
        self.tasks = Tasks()
        self.closed = False

    @property
    def key(self) -> bytes | None:
        return self.role_session.key

    @property
    def cfg(self) -> TraversalConfig:
        return self.owner.cfg

    @property
    def own_nat(self) -> wire.NatKind:
        return self.owner.detection.kind

    @property
    def candidates(self) -> tuple[wire.Candidate, ...]:
        return self.owner.candidates

    # -- told to the side ------------------------------------------------------------------------
    def punch_done(self, p: Puncher) -> None:
        """The runner finished: `p.success` or `p.failed` is set."""

    def birthday_won(self, ep: Endpoint, addr: Addr) -> None:
        """A birthday socket reached the peer at `addr`."""

    def note(self, kind: str, detail: str) -> None:
        """A step worth recording (the Agent keeps them as path events)."""

    def skip(self) -> None:
        """StartPunch came for a pair that cannot punch (both endpoint-dependent, no shared LAN)."""

    # -- shared ----------------------------------------------------------------------------------
    def new_puncher(self) -> Puncher:
        self.puncher = Puncher(self.id, self.key or b"", self.candidates, (), self.cfg.punch, self.budget)
        return self.puncher

    def stop_punching(self) -> None:
        """Forget this attempt's runner and pool (a new offer or StartPunch starts over)."""
        if self.runner is not None:
            self.runner.cancel()
            self.runner = None
        if self.birthday is not None:
            self.birthday.close()
            self.birthday = None

    def start_punch(self, msg: wire.StartPunch) -> None:
        """The Intermediate says both sides punch now (after `msg.delay_ms`)."""
        if self.birthday is not None:
            self.birthday.close()
            self.birthday = None
        self.peer_nat, self.peer_candidates = msg.peer_nat, msg.peer_candidates
        peer = msg.peer_candidates
        # a router's port mapping admits anyone: with one on either side the plain punch works
        mapped = any(c.kind == wire.CandidateKind.MAPPED for c in (*self.candidates, *peer))
        lockstep = not mapped and wire.lockstep_prediction(self.own_nat, msg.peer_nat)
        if lockstep:
            peer = lockstep_candidates(self.candidates, peer)
        elif wire.both_endpoint_dependent(self.own_nat, msg.peer_nat) and not self.cfg.punch_anyway and not mapped:
            peer = without_nat(self.candidates, peer)  # only a shared LAN or IPv6 can work
            if not peer:
                self.skip()
                return
        p = self.puncher if self.puncher is not None and self.puncher.started_at is None else self.new_puncher()
        if not p.key and self.key:
            p.key = self.key
        p.lockstep = lockstep
        p.set_peer(peer)
        p.config = with_prediction_delay(self.cfg.punch, self.link.conn)
        delay = msg.delay_ms / 1000 + self.cfg.punch_delay
        self.punch_started_at = asyncio.get_running_loop().time() + delay
        self.note("punch_start", f"{len(p.targets)} targets, start in {msg.delay_ms} ms, peer NAT {msg.peer_nat.name}")
        role = wire.birthday_role(self.own_nat, msg.peer_nat) if msg.birthday else None
        reflexive = peer_reflexive(msg.peer_candidates)
        if role == wire.BirthdayRole.EASY and reflexive is not None:
            p.birthday_spray(reflexive[0], msg.birthday, random.Random(self.cfg.punch.spray_seed))
            self.note("birthday", f"spraying {msg.birthday} random ports of the peer")
        elif role == wire.BirthdayRole.HARD and reflexive is not None and self.key:
            self.tasks.spawn(self._birthday_hard(reflexive, msg.birthday, delay + p.config.predict_after))
        if self.runner is not None:
            self.runner.cancel()
        self.runner = PunchRunner(p, self.send_raw, self.punch_done)
        self.runner.start(delay)

    async def _birthday_hard(self, peer: Addr, n: int, after: float) -> None:
        """The hard side's pool, as a fallback: only if the plain punch found nothing within `after`
        (as predicted ports wait). Opened at once, its mappings raced the main socket's to the peer,
        which could adopt a pool socket's address as peer-reflexive and lose the direct connection
        when the pool closed (measured: 1 trial in 10 of full_cone -> symmetric on sim)."""
        await asyncio.sleep(after)
        p = self.puncher
        if self.key is None or (p is not None and (p.best is not None or p.success is not None)):
            return
        self.birthday = BirthdayPool(self.id, self.key, peer, n, self.make_endpoint, self.birthday_won)
        self.note("birthday", f"opening {n} mappings towards {peer[0]}:{peer[1]}")
        await self.birthday.start(self.cfg.punch.timeout + n / 100)

    def answers_before_start(self) -> Puncher | None:
        """The puncher that answers probes before StartPunch (None: drop them)."""
        return self.puncher

    def on_probe(self, data: bytes, addr: Addr) -> bool:
        """A probe for this session arrived on the shared socket. False when it is not ours."""
        if self.runner is not None:
            return self.runner.receive(data, addr)
        p = self.answers_before_start()
        if p is None:
            return False
        try:  # the peer started first: answer, it opens its NAT for us
            out = p.receive(data, addr, asyncio.get_running_loop().time())
        except wire.WireError:
            return False
        for d, a in out:
            self.send_raw(d, a)
        return True

    def close(self) -> None:
        """Release everything this session started."""
        self.closed = True
        self.tasks.cancel_all()
        self.stop_punching()


def deliver_signal(sessions: Mapping[int, PunchSession], msg: wire.Message) -> bool:
    """Hand a StartPunch or PunchResult to its session; True when one of ours took it."""
    if not isinstance(msg, (wire.StartPunch, wire.PunchResult)):
        return False
    st = sessions.get(msg.session)
    if st is None:
        return False
    if isinstance(msg, wire.StartPunch):
        st.start_punch(msg)
    else:
        st.peer_result = msg
    return True


def deliver_probe(sessions: Mapping[int, PunchSession], data: bytes, addr: Addr) -> bool:
    """Hand a punch probe to the session it names; True when one of ours took it."""
    try:
        sid = wire.probe_session(data)
    except wire.WireError:
        return False
    st = sessions.get(sid)
    return st.on_probe(data, addr) if st is not None else False
