"""One hole-punch trial: the three roles in a fresh lab state, relay first, punching alongside,
direct once verified; measured the same way on both paths; one `TrialResult`.

Timeline (t0 = the Agent asks for a session, after registration and NAT detection):
- echo probes go out over the active path every `echo_interval` from t0 (relay first);
- `ttfb`: the first echo back over the relay; `ttd`: the first echo back over the direct path,
  sent right after the direct QUIC handshake (the path is then verified);
- measurement: `samples` echo probes on each path, interleaved, same size and rate;
- proof: the relay is switched off for this session at the Intermediate and `verify_echoes` more
  probes must come back over the direct path (`direct_verified`);
- optionally the direct path is blackholed in the Agent's NAT router: traffic must continue over
  the relay within the path manager's failover bound, and the gap in echoes is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from qlab import __version__, wire
from qlab.backends.base import Environment, get_backend
from qlab.certs import Credentials, init_dir
from qlab.nat.spec import expected_outcome
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoProbe, EchoServer
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import CONNECTOR_PORT, INTERMEDIATE_ALT_PORT, INTERMEDIATE_PORT, build
from qlab.traversal.punch import PunchConfig
from qlab.traversal.session import AgentTraversal, ConnectorTraversal, SessionTraversal, TraversalConfig

log = logging.getLogger("qlab.experiment.trial")

APP_PORT = 9999
# The Connector's registration and NAT detection share this window, and the Agent's connection to
# the Intermediate has one of its own: under loss each step retries (handshakes, requests) until its
# window ends, never on a shorter timer of its own.
SETUP_WINDOW = 20.0
RELAY_WINDOW = 10.0  # after the punch settled: until an echo came back over the relay
OUTCOMES = ("direct_lan", "direct_wan", "direct_predicted", "relay", "failed")
FAULTS = ("", "rebind", "idle", "intermediate_restart", "connector_restart")


class PunchState(StrEnum):
    """Whether the trial's session punched: a relay outcome after `SKIPPED` was decided by policy
    (both sides endpoint-dependent), not measured; `TrialSpec.punch_anyway` measures it."""

    ATTEMPTED = "attempted"  # probes went out (WAN, or only a shared LAN)
    SKIPPED = "skipped"  # the policy skipped the punch
    NONE = "none"  # the trial never reached a punch (it failed before)


@dataclass
class TrialSpec:
    """Everything that defines a trial (and nothing measured)."""

    backend: str = "sim"
    agent_nat: str = "port_restricted"
    connector_nat: str = "port_restricted"
    profile: str = "wan-20ms"
    scenario: str = "pair"
    seed: int = 0
    echo_interval: float = 0.02
    echo_size: int = 64
    samples: int = 20
    verify_echoes: int = 10
    punch_timeout: float = 3.0
    blackhole: bool = False
    fault: str = ""  # "", "rebind" (flush the Agent's NAT mid-session), "idle" (no traffic for idle_s) or
    # "intermediate_restart" (the Intermediate dies without a word for outage_s, then a new one starts)
    outage_s: float = 3.0
    idle_s: float = 3.0
    binding_timeout: float | None = None  # override every NAT's binding timeout (seconds)
    keepalive: float = 0.5  # direct-path keepalive interval
    birthday: int = 0  # birthday mode: mappings the random-port side opens (0 = off); Tailscale uses 256
    birthday_probes: int = 1024  # random ports the other side probes
    birthday_rate: float = 1000.0  # of those, per second
    punch_anyway: bool = False  # punch even when both sides are endpoint-dependent (policy would skip)
    relay_off_proof: bool = True  # False: prove the direct path as in the field, with the relay left on
    agents: int = 1
    carrier_nat: str = "port_restricted"
    trial_id: str = ""
    campaign_id: str = ""

    def __post_init__(self) -> None:
        if not self.trial_id:
            self.trial_id = secrets.token_hex(6)
        for name, lo, hi in (("samples", 1, 10000), ("verify_echoes", 1, 10000), ("echo_size", 16, 1200)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}")
        if not 0.001 <= self.echo_interval <= 5:
            raise ValueError("echo_interval must be between 1 ms and 5 s")
        if not 0.1 <= self.punch_timeout <= 60:
            raise ValueError("punch_timeout must be between 0.1 and 60 s")
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; choose one of: {', '.join(f for f in FAULTS if f)}")


@dataclass
class TrialResult:
    """One trial's record: the same fields on every backend (docs/results.md)."""

    trial_id: str
    campaign_id: str
    backend: str
    scenario: str
    agent_nat: str
    connector_nat: str
    profile: str
    seed: int
    qlab_version: str
    started_at: float
    duration_s: float
    expected: str
    outcome: str
    reason: str
    as_expected: bool
    direct_verified: bool
    agent_nat_detected: str
    connector_nat_detected: str
    agent_candidates: list[str]
    connector_candidates: list[str]
    agent_probes: int
    connector_probes: int
    predicted_ports: list[int]
    working_pair: str
    punch_ms: float | None
    ttfb_ms: float | None
    ttd_ms: float | None
    rtt_relay_p50_ms: float | None
    rtt_relay_p95_ms: float | None
    rtt_relay_loss: float | None
    rtt_relay_n: int
    rtt_direct_p50_ms: float | None
    rtt_direct_p95_ms: float | None
    rtt_direct_loss: float | None
    rtt_direct_n: int
    relay_bytes_out: int
    relay_bytes_in: int
    direct_bytes_out: int
    direct_bytes_in: int
    verify_sent: int
    verify_received: int
    failover_ms: float | None
    echo_gap_ms: float | None
    path_events: list[dict]
    measured_with: str
    error: str = ""
    extra: dict = field(default_factory=dict)
    # Added by issue 21; None in records written before. Echo counts by the path each reply came back
    # on: `_received` = sent on that path and answered over it; answered over the other path = crossed.
    rtt_relay_sent: int | None = None
    rtt_relay_received: int | None = None
    rtt_direct_sent: int | None = None
    rtt_direct_received: int | None = None
    echo_direct_answered_on_relay: int | None = None
    echo_relay_answered_on_direct: int | None = None
    punch: str | None = None  # a PunchState value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# columns older records may lack (loaded as None)
ADDED_FIELDS = ("rtt_relay_sent", "rtt_relay_received", "rtt_direct_sent", "rtt_direct_received",
                "echo_direct_answered_on_relay", "echo_relay_answered_on_direct", "punch")


def _fmt(c: wire.Candidate) -> str:
    return f"{c.kind.name.lower()}:{c.addr[0]}:{c.addr[1]}"


def is_direct(outcome: str) -> bool:
    return outcome.startswith("direct")


def judge(expected: str, outcome: str, scenario: str, birthday: bool, lan_nat: str = "") -> bool:
    """Does `outcome` match the cell's expected code? `lan_nat`: the NAT of a `same_lan` scenario."""
    if outcome == "failed" or expected == "?":  # "?": a NAT of unknown behaviour expects nothing
        return False
    if scenario == "same_lan":  # two public hosts' own addresses are not a LAN: their pair is WAN
        return outcome == ("direct_wan" if lan_nat == "public" else "direct_lan")
    if expected in ("D", "D>"):
        return outcome in ("direct_wan", "direct_lan")
    if expected == "P":
        return outcome == "direct_predicted"
    if expected == "B":
        return is_direct(outcome) if birthday else outcome == "relay"
    return outcome == "relay"


def _nothing_measured() -> dict:
    return {"verify_sent": 0, "verify_received": 0, "verify_crossed": 0, "failover_ms": None, "echo_gap_ms": None}


def punch_state(events: list[dict]) -> PunchState:
    """From the path events: did the session punch, or did policy skip it?"""
    kinds = {e["event"] for e in events}
    if "punch_start" in kinds:
        return PunchState.ATTEMPTED
    return PunchState.SKIPPED if "punch_skipped" in kinds else PunchState.NONE


class AgentSide:
    """The Agent's half of a trial, the same in a lab and in the field: register, detect the NAT,
    open the session (echoes over the relay from the first packet), punch, verify the direct path,
    measure both paths the same way. `relay_switch(session_id, on)` turns the relay off for the
    session at the Intermediate during the proof; it exists only where the Intermediate runs in
    this process (a lab). Without it, the proof is that echoes sent on the direct QUIC connection
    came back over it (replies are counted by the path they arrived on)."""

    def __init__(self, net, creds: Credentials, intermediate: tuple[str, int], spec: TrialSpec,
                 cfg: TraversalConfig, *, service: str = "echo",
                 relay_switch: Callable[[int, bool], None] | None = None, bind: str = "0.0.0.0",
                 connect_window: float = SETUP_WINDOW) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_window = connect_window
        self.spec, self.cfg, self.service = spec, cfg, service
        self.relay_switch = relay_switch
        self.probe = EchoProbe(self.loop.time, spec.echo_size)
        self.agent = Agent(net, creds, intermediate, name="agent", host=bind)
        self.at = AgentTraversal(self.agent, cfg)
        self.st: SessionTraversal | None = None
        self.t0: float | None = None
        self.measure = _nothing_measured()

    def send_echo(self, path: str | None = None) -> None:
        session = self.st.session
        p = path or session.active_path
        payload = self.probe.make(p)
        try:
            if session.send(payload, p) is None:
                self.probe.unsend(payload)
        except Exception:
            self.probe.unsend(payload)
            raise

    @property
    def direct_active(self) -> bool:
        s = self.st.session if self.st is not None else None
        return (s is not None and s.direct is not None and not s.direct.closed and s.active_path == "direct"
                and self.st.path.verified_at is not None)

    async def run(self) -> None:
        spec, loop, probe = self.spec, self.loop, self.probe
        await self.agent.start(self.connect_window)
        await self.at.prepare()
        # t0: the session opens; echoes go out over the active path from now on
        self.t0 = loop.time()
        st = self.st = self.at.begin(self.service)
        session = st.session
        session.on_payload = probe.receive
        probe.on_reply = lambda path, rtt, seq: st.path.observe_rtt(path, rtt)

        def first_direct_echo(s, conn) -> None:
            payload = probe.make("direct")
            if s.send(payload, "direct") is None:
                probe.unsend(payload)

        self.at.direct_handshake_hooks.append(first_direct_echo)
        settle_by = self.t0 + spec.punch_timeout + self.cfg.direct_timeout + 2.0
        if spec.birthday:
            settle_by += spec.birthday_probes / spec.birthday_rate + 1.0
        while loop.time() < settle_by:
            self.send_echo()
            if session.direct is not None and not session.direct.closed and st.path.verified_at is None:
                self.send_echo("direct")  # the first direct echo may be lost: keep probing until one returns
            if (st.path.verified_at is not None and session.active_path == "direct") or st.settled.is_set():
                break
            await asyncio.sleep(spec.echo_interval)
        # stragglers over the relay so ttfb exists even when the punch settled at once
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.opened, 5)
        # the relay is proven by an echo that came back over it: under loss (a relayed echo crosses
        # eight access-link hops) keep probing until one does, within the window
        relay_by = loop.time() + RELAY_WINDOW
        while probe.paths["relay"].first_reply_at is None and loop.time() < relay_by:
            self.send_echo("relay")
            await asyncio.sleep(spec.echo_interval)

        # measurement: same probe, interleaved on both paths
        direct_up = session.direct is not None and not session.direct.closed and st.path.verified_at is not None
        paths = ["relay", "direct"] if direct_up else ["relay"]
        for _ in range(spec.samples):
            for p in paths:
                self.send_echo(p)
                await asyncio.sleep(spec.echo_interval / len(paths))
        await _drain(probe, 1.0 + 4 * (st.path.median("relay") or 0.2))

        # proof: only the direct path may answer (relay switched off for the session, where we can)
        if direct_up and session.active_path == "direct":
            if self.relay_switch is not None:
                self.relay_switch(session.id, False)
            try:
                d = probe.paths["direct"]
                before_rx, before_tx, before_x = d.received, d.sent, d.crossed
                for _ in range(spec.verify_echoes):
                    self.send_echo("direct")
                    await asyncio.sleep(spec.echo_interval)
                await _drain(probe, 1.0 + 4 * (st.path.median("direct") or 0.2))
                self.measure["verify_sent"] = probe.paths["direct"].sent - before_tx
                self.measure["verify_received"] = probe.paths["direct"].received - before_rx
                self.measure["verify_crossed"] = probe.paths["direct"].crossed - before_x
            finally:
                if self.relay_switch is not None:
                    self.relay_switch(session.id, True)

    def close(self) -> None:
        self.at.close()
        self.agent.close()


async def run_in(env: Environment, spec: TrialSpec, creds: Credentials, *, qlog_dir: str | None = None) -> TrialResult:
    """Run one trial with the roles on `env`'s hosts (inside the backend's running loop)."""
    loop = asyncio.get_running_loop()
    started = time.time()
    w0 = loop.time()
    topo = env.topology
    inter_ips = env.addresses("intermediate")
    connector_ip = env.addresses("connector")[0]
    listen = [(inter_ips[0], INTERMEDIATE_PORT), (inter_ips[0], INTERMEDIATE_ALT_PORT)]
    if len(inter_ips) > 1:
        listen += [(inter_ips[1], INTERMEDIATE_PORT), (inter_ips[1], INTERMEDIATE_ALT_PORT)]
    cfg = trial_traversal_config(spec)
    if spec.binding_timeout is not None:
        for router in topo.routers:
            env.set_binding_timeout(router.name, spec.binding_timeout)
    srv = Intermediate(env.net("intermediate"), creds, birthday_ports=spec.birthday, birthday_probes=spec.birthday_probes)
    echo = EchoServer(env.net("connector"))
    connector = side = None
    ct = None
    error = ""
    setup_by = w0 + SETUP_WINDOW

    def relay_switch(session_id: int, on: bool) -> None:
        (srv.relay_blocked.discard if on else srv.relay_blocked.add)(session_id)

    try:
        await srv.listen(listen)
        await echo.start(connector_ip, APP_PORT)
        connector = Connector(env.net("connector"), creds, listen[0], service="echo", forward=(connector_ip, APP_PORT),
                              name="connector", p2p_port=CONNECTOR_PORT)
        ct = ConnectorTraversal(connector, cfg)
        await connector.start()
        await connector.wait_registered(_left(setup_by))
        await asyncio.wait_for(ct.ready.wait(), _left(setup_by))
        side = AgentSide(env.net("agent"), creds, listen[0], spec, cfg,
                         relay_switch=relay_switch if spec.relay_off_proof else None)
        await side.run()
        st, agent, probe, send_echo, measure = side.st, side.agent, side.probe, side.send_echo, side.measure
        if spec.blackhole and side.direct_active and measure["verify_sent"]:
            measure.update(await _blackhole(env, topo, st, st.session, probe, send_echo, spec, loop))
        if spec.fault == "rebind":
            measure["fault"] = await _rebind(env, topo, st, agent, probe, send_echo, spec, loop)
        elif spec.fault == "idle":
            measure["fault"] = await _idle(st, probe, send_echo, spec, loop)
        elif spec.fault == "connector_restart":
            connector, ct, measure["fault"] = await _connector_restart(env, connector, ct, creds, listen, connector_ip,
                                                                       cfg, st, probe, send_echo, spec, loop)
        elif spec.fault == "intermediate_restart":
            srv, measure["fault"] = await _intermediate_restart(env, srv, listen, creds, st, agent, connector,
                                                               probe, send_echo, spec, loop)
    except Exception as exc:  # recorded, never dropped: a failing trial is a result too
        log.exception("trial %s failed", spec.trial_id)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        if side is not None:
            side.close()
        if ct is not None:
            ct.close()
        if connector is not None:
            connector.close()
        srv.close()
        echo.close()
        await asyncio.sleep(0)
    return side_result(spec, side, started, loop.time() - w0, error, ct=ct)


def trial_traversal_config(spec: TrialSpec) -> TraversalConfig:
    return TraversalConfig(punch=PunchConfig(timeout=spec.punch_timeout, spray_rate=spec.birthday_rate),
                           keepalive=spec.keepalive, failover=max(2.0, 3 * spec.keepalive),
                           punch_anyway=spec.punch_anyway)


async def _drain(probe: EchoProbe, wait: float) -> None:
    await probe.wait_for_replies(wait)
    for seq in list(probe.outstanding):  # what did not come back by now is lost
        del probe.outstanding[seq]


async def _blackhole(env, topo, st, session, probe, send_echo, spec, loop) -> dict:
    """Drop the direct path in the Agent's NAT router; traffic must move to the relay."""
    router = topo.router_of("agent")
    peer = st.working
    if router is None or peer is None:
        return {"failover_ms": None, "echo_gap_ms": None}
    replies: list[tuple[float, str]] = []
    prev = probe.on_reply

    def on_reply(path, rtt, seq):
        replies.append((loop.time(), path))
        prev(path, rtt, seq)

    probe.on_reply = on_reply
    t_block = loop.time()
    env.block(router.name, peer[0], peer[1])
    try:
        end = t_block + st.owner.cfg.failover + 1.5
        while loop.time() < end:
            send_echo()
            await asyncio.sleep(spec.echo_interval)
        await _drain(probe, 1.0)
    finally:
        env.unblock(router.name, peer[0], peer[1])
        probe.on_reply = prev
    lost = [e for e in st.path.events if e["event"] == "direct_lost"]
    failover = None
    if lost:
        failover = lost[-1]["t_ms"] - (t_block - st.path.t0) * 1000
    after = [t for t, p in replies if p == "relay"]
    last_before = max((t for t, p in replies if p == "direct"), default=t_block)
    gap = (after[0] - min(last_before, t_block)) * 1000 if after else None
    return {"failover_ms": failover, "echo_gap_ms": gap}


async def _rebind(env, topo, st, agent, probe, send_echo, spec, loop) -> dict:
    """NAT rebinding: the Agent's NAT forgets every mapping. QUIC towards the Intermediate must
    survive (the server sees a new address and QAD says so); the session must keep carrying echoes,
    over the relay or a recovered direct path."""
    router = topo.router_of("agent")
    if router is None:
        return {"fault": "rebind", "skipped": "the agent has no NAT"}
    before = agent.link.observed
    had_direct = st.session.active_path == "direct"
    t_fault = loop.time()
    env.flush_nat(router.name)
    replies: list[tuple[float, str]] = []
    prev = probe.on_reply
    probe.on_reply = lambda path, rtt, seq: (replies.append((loop.time(), path)), prev(path, rtt, seq))
    end = t_fault + st.owner.cfg.failover + st.owner.cfg.retry_after + spec.punch_timeout + 3.0
    try:
        while loop.time() < end:
            send_echo()
            await asyncio.sleep(spec.echo_interval)
            if agent.link.observed != before and st.session.active_path == ("direct" if had_direct else "relay") and \
                    any(t > t_fault + 0.5 for t, _ in replies) and loop.time() > t_fault + 1.0:
                break
        await _drain(probe, 1.0)
    finally:
        probe.on_reply = prev
    after = [t for t, _ in replies]
    gaps = [b - a for a, b in zip([t_fault, *after], after, strict=False)]
    return {
        "fault": "rebind", "qad_before": list(before or ()), "qad_after": list(agent.link.observed or ()),
        "qad_reported_new_address": agent.link.observed != before, "direct_before": had_direct,
        "path_after": st.session.active_path, "echoes_after": len(after),
        "max_echo_gap_ms": round(max(gaps) * 1000, 3) if gaps else None,
    }


async def _intermediate_restart(env, srv, listen, creds, st, agent, connector, probe, send_echo, spec, loop):
    """The Intermediate vanishes (as with kill -9) for `outage_s`, then a fresh one starts on the
    same addresses. The direct path must keep carrying echoes meanwhile; Agent and Connector must
    reconnect with backoff and the session must work over the relay again."""
    replies: list[tuple[float, str, int]] = []
    prev = probe.on_reply
    probe.on_reply = lambda path, rtt, seq: (replies.append((loop.time(), path, seq)), prev(path, rtt, seq))
    had_direct = st.session.active_path == "direct"
    t_kill = loop.time()
    srv.crash()
    sent_before, first_seq = probe.paths["direct"].sent, probe.seq + 1
    try:
        while loop.time() < t_kill + spec.outage_s:
            send_echo()
            await asyncio.sleep(spec.echo_interval)
        outage_sent, last_seq = probe.paths["direct"].sent - sent_before, probe.seq
        new = Intermediate(env.net("intermediate"), creds, birthday_ports=spec.birthday)
        await new.listen(listen)
        t_restart = loop.time()
        recovered_at = None
        while loop.time() < t_restart + 30:
            send_echo()
            send_echo("relay")
            await asyncio.sleep(spec.echo_interval * 5)
            relay_after = [t for t, p, _ in replies if p == "relay" and t > t_restart]
            if relay_after:
                recovered_at = relay_after[0]
                break
        await _drain(probe, 1.0)
    finally:
        probe.on_reply = prev
    during = [t for t, p, _ in replies if p == "direct" and t_kill <= t <= t_kill + spec.outage_s]
    # the outage's own echoes: sent on the direct path while the Intermediate was down, and those of
    # them answered over the direct path (whenever the reply came)
    answered = {q for _, p, q in replies if p == "direct" and first_seq <= q <= last_seq}
    return new, {
        "fault": "intermediate_restart", "outage_s": spec.outage_s, "direct_before": had_direct,
        "direct_echoes_during_outage": len(during),
        "outage_direct_sent": outage_sent, "outage_direct_answered": len(answered),
        "relay_recovered": recovered_at is not None,
        "recovery_ms_after_restart": round((recovered_at - t_restart) * 1000, 3) if recovered_at else None,
        "agent_reconnects": agent.link.reconnects, "connector_reconnects": connector.link.reconnects,
        "session_reopened": st.session.reopened,
    }


async def _connector_restart(env, connector, ct, creds, listen, connector_ip, cfg, st, probe, send_echo, spec, loop):
    """The Connector stops (as on SIGTERM) and a new one starts `outage_s` later on the same host and
    port. The Agent keeps its session, re-opens it when the Connector is back, punches again; the
    gap in echoes is what the user saw."""
    replies: list[float] = []
    prev = probe.on_reply
    probe.on_reply = lambda path, rtt, seq: (replies.append(loop.time()), prev(path, rtt, seq))
    t_stop = loop.time()
    ct.close()
    connector.close()
    try:
        while loop.time() < t_stop + spec.outage_s:
            send_echo()
            await asyncio.sleep(spec.echo_interval)
        new = Connector(env.net("connector"), creds, listen[0], service="echo", forward=(connector_ip, APP_PORT),
                        name="connector", p2p_port=CONNECTOR_PORT)
        new_ct = ConnectorTraversal(new, cfg)
        await new.start()
        t_back = loop.time()
        end = t_back + 20
        while loop.time() < end:
            send_echo()
            await asyncio.sleep(spec.echo_interval)
            if st.session.active_path == "direct" and any(t > t_back for t in replies):
                break
        await _drain(probe, 1.0)
    finally:
        probe.on_reply = prev
    after = [t for t in replies if t > t_stop]
    before = [t for t in replies if t <= t_stop]
    return new, new_ct, {
        "fault": "connector_restart", "outage_s": spec.outage_s,
        "session_reopened": st.session.reopened >= 1,
        "echo_gap_ms": round((after[0] - (before[-1] if before else t_stop)) * 1000, 3) if after else None,
        "path_after": st.session.active_path,
        "events": [e["event"] for e in st.path.events if e["t_ms"] >= (t_stop - st.path.t0) * 1000],
    }


async def _idle(st, probe, send_echo, spec, loop) -> dict:
    """No application traffic for `idle_s` (keepalives only), then echoes again: does the direct
    path survive the NAT's binding timeout?"""
    had_direct = st.session.active_path == "direct"
    await asyncio.sleep(spec.idle_s)
    lost = any(e["event"] == "direct_lost" for e in st.path.events)
    got = probe.paths["direct"].received
    for _ in range(5):
        send_echo("direct") if st.session.direct is not None else send_echo()
        await asyncio.sleep(spec.echo_interval)
    await _drain(probe, 1.0)
    return {
        "fault": "idle", "idle_s": spec.idle_s, "binding_timeout": spec.binding_timeout,
        "keepalive": spec.keepalive, "direct_before": had_direct, "direct_lost": lost,
        "direct_after": st.session.active_path == "direct" and probe.paths["direct"].received > got,
    }


def side_result(spec: TrialSpec, side: AgentSide | None, started: float, duration: float, error: str, *,
                ct: ConnectorTraversal | None = None, expected: str | None = None,
                measured_where: str = "") -> TrialResult:
    """The trial's record from what the Agent side saw (and the Connector side, when it ran here)."""
    st = side.st if side is not None else None
    at = side.at if side is not None else None
    t0 = side.t0 if side is not None else None
    probe = side.probe if side is not None else EchoProbe(time.monotonic, spec.echo_size)
    measure = side.measure if side is not None else _nothing_measured()
    if expected is None:
        expected = expected_outcome(spec.agent_nat, spec.connector_nat)
    relay, direct = probe.paths["relay"], probe.paths["direct"]
    rs, ds = relay.summary(), direct.summary()
    # Only replies that came back over the direct path count (the probe counts each reply on the path
    # it arrived by). With the relay off for the session (labs) nothing else could answer; in the
    # field the relay stays on, and a reply over it is crossed, not a proof. At least half of what the
    # direct path delivered during the measurement must come back (the rest is the profile's loss),
    # so lossy links are not mislabelled; one echo at the very least.
    direct_delivery = direct.received / direct.sent if direct.sent else 0.0
    needed = max(1, int(0.5 * measure["verify_sent"] * direct_delivery))
    verified = measure["verify_sent"] > 0 and measure["verify_received"] >= needed
    reason = ""
    outcome = "failed"
    working = ""
    predicted: list[int] = []
    if at is not None:
        predicted = [c.addr[1] for c in at.candidates if c.kind == wire.CandidateKind.PREDICTED]
    if ct is not None:
        predicted += [c.addr[1] for c in ct.candidates if c.kind == wire.CandidateKind.PREDICTED]
    if st is not None and verified:
        working = f"{st.working[0]}:{st.working[1]}" if st.working else ""
        conn_res = ct.results.get(st.session.id, {}).get("own") if ct is not None else None
        conn_kind = conn_res.success.kind if conn_res is not None and conn_res.success is not None else None
        if st.working_kind == wire.CandidateKind.HOST and st.peer_nat != wire.NatKind.NONE:
            outcome = "direct_lan"  # a private host address of a peer behind a NAT: same LAN
        elif wire.CandidateKind.PREDICTED in (st.working_kind, conn_kind):
            outcome = "direct_predicted"
        else:
            outcome = "direct_wan"
    elif relay.received > 0:
        outcome = "relay"
        if st is not None and st.path.verified_at is not None and not verified:
            off = "with the relay switched off" if side is not None and side.relay_switch else "during the proof"
            reason = (f"the direct path did not carry echoes {off} "
                      f"({measure['verify_received']} of {measure['verify_sent']} came back)")
        else:
            reason = (st.reason if st is not None and st.reason else "") or "no direct path was verified"
        if direct.crossed:
            reason += f" ({direct.crossed} echoes sent on the direct path were answered over the relay)"
    else:
        reason = error or "no echo came back over any path"
    if error and outcome != "failed":
        reason = f"{reason}; error after connecting: {error}" if reason else f"error after connecting: {error}"
    ttfb = (relay.first_reply_at - t0) * 1000 if t0 is not None and relay.first_reply_at else None
    ttd = (direct.first_reply_at - t0) * 1000 if t0 is not None and direct.first_reply_at and is_direct(outcome) else None
    sess = st.session if st is not None else None
    agent_nat_detected = at.detection.kind.name if at is not None else "UNKNOWN"
    if ct is not None:
        conn_nat_detected, conn_candidates = ct.detection.kind.name, [_fmt(c) for c in ct.candidates]
    else:  # the Connector runs elsewhere: what its offer told the Agent
        conn_nat_detected = st.peer_nat.name if st is not None else "UNKNOWN"
        conn_candidates = [_fmt(c) for c in st.peer_candidates] if st is not None else []
    vs, vr, vx = measure["verify_sent"], measure["verify_received"], measure.get("verify_crossed", 0)
    if side is not None and side.relay_switch:
        proof = (f"proof: relay switched off for the session at the Intermediate, {vr} of {vs} echoes sent on "
                 f"the direct path came back over it")
    else:
        proof = (f"proof (the relay stayed on, as in the field): {vr} of {vs} echoes sent on the direct QUIC "
                 f"connection came back over it, {vx} over the relay instead")
    proof += (f"; replies counted by the path they arrived on ({direct.crossed} sent direct came back over the "
              f"relay, {relay.crossed} sent over the relay came back direct)")
    conn_probes = 0
    if ct is not None and sess is not None:
        own = ct.results.get(sess.id, {}).get("own")
        conn_probes = own.probes_sent if own is not None else 0
    return TrialResult(
        trial_id=spec.trial_id, campaign_id=spec.campaign_id, backend=spec.backend, scenario=spec.scenario,
        agent_nat=spec.agent_nat, connector_nat=spec.connector_nat, profile=spec.profile, seed=spec.seed,
        qlab_version=__version__, started_at=started, duration_s=round(duration, 4), expected=expected,
        outcome=outcome, reason=reason,
        as_expected=judge(expected, outcome, spec.scenario, spec.birthday > 0, lan_nat=spec.agent_nat),
        direct_verified=verified, agent_nat_detected=agent_nat_detected, connector_nat_detected=conn_nat_detected,
        agent_candidates=[_fmt(c) for c in at.candidates] if at is not None else [],
        connector_candidates=conn_candidates,
        agent_probes=st.probes_sent if st is not None else 0, connector_probes=conn_probes,
        predicted_ports=predicted, working_pair=working,
        punch_ms=round(st.punch_ms, 3) if st is not None and st.punch_ms is not None else None,
        ttfb_ms=_r(ttfb), ttd_ms=_r(ttd),
        rtt_relay_p50_ms=rs["p50_ms"], rtt_relay_p95_ms=rs["p95_ms"], rtt_relay_loss=rs["loss"], rtt_relay_n=rs["n"],
        rtt_direct_p50_ms=ds["p50_ms"], rtt_direct_p95_ms=ds["p95_ms"], rtt_direct_loss=ds["loss"], rtt_direct_n=ds["n"],
        relay_bytes_out=sess.bytes["relay_out"] if sess else 0, relay_bytes_in=sess.bytes["relay_in"] if sess else 0,
        direct_bytes_out=sess.bytes["direct_out"] if sess else 0, direct_bytes_in=sess.bytes["direct_in"] if sess else 0,
        verify_sent=measure["verify_sent"], verify_received=measure["verify_received"],
        failover_ms=_r(measure["failover_ms"]), echo_gap_ms=_r(measure["echo_gap_ms"]),
        path_events=st.path.events if st is not None else [],
        measured_with=(f"echo probe, {spec.echo_size} B payload through the Connector to a UDP echo app, "
                       f"{spec.samples} samples per path interleaved every {spec.echo_interval * 1000:g} ms, "
                       f"backend {spec.backend}, profile {spec.profile}{measured_where}; {proof}"),
        error=error,
        extra={"fault": measure["fault"]} if "fault" in measure else {},
        rtt_relay_sent=relay.sent, rtt_relay_received=relay.received,
        rtt_direct_sent=direct.sent, rtt_direct_received=direct.received,
        echo_direct_answered_on_relay=direct.crossed, echo_relay_answered_on_direct=relay.crossed,
        punch=punch_state(st.path.events if st is not None else []).value,
    )


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _off_loop(fn, *args, **kw):
    """Run `fn` here, or on a worker thread when this thread already runs an event loop (a Jupyter
    kernel does): every backend runs its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kw)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kw).result()


def run_trial(spec: TrialSpec, *, certs_dir: str | None = None) -> TrialResult:
    """Build the topology, bring the backend up, run one trial, tear everything down."""
    return _off_loop(_run_trial, spec, certs_dir=certs_dir)


def _run_trial(spec: TrialSpec, *, certs_dir: str | None = None) -> TrialResult:
    topo = build(spec.agent_nat, spec.connector_nat, scenario=spec.scenario, profile_name=spec.profile,
                 agents=spec.agents, carrier_nat=spec.carrier_nat)
    backend = get_backend(spec.backend)
    creds = Credentials.load(certs_dir or default_certs())
    with backend.environment(topo, spec.seed) as env:
        return backend.run(env, lambda: run_in(env, spec, creds))


def default_certs() -> str:
    """The lab's own CA for trials (created once under the user's cache directory)."""
    d = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "qlab", "lab-certs")
    if not os.path.exists(os.path.join(d, "secret")):
        with contextlib.suppress(FileExistsError):
            init_dir(d)
    return d


async def classify_in(env: Environment, creds: Credentials, host: str = "agent") -> dict:
    """Run an Intermediate with its four listeners and classify `host`'s NAT from its socket."""
    from qlab.endpoint import Endpoint
    from qlab.traversal.detect import classify
    from qlab.traversal.punch import host_ips_for

    inter_ips = env.addresses("intermediate")
    listen = [(ip, port) for ip in inter_ips[:2] for port in (INTERMEDIATE_PORT, INTERMEDIATE_ALT_PORT)]
    srv = Intermediate(env.net("intermediate"), creds)
    net = env.net(host)
    ep = Endpoint(net)
    try:
        await srv.listen(listen)
        await ep.bind("0.0.0.0", 0)
        host_ips = host_ips_for(ep.local_address, net.host_addresses())
        verdict = await classify(ep, creds, listen[0], host_ips)
        return verdict.to_dict()
    finally:
        ep.close()
        srv.close()
        await asyncio.sleep(0)


def run_classify(backend_name: str, nat: str, *, profile: str = "lan", seed: int = 0,
                 certs_dir: str | None = None) -> dict:
    """`qlab classify` in a lab: the Agent host behind `nat`, classified from inside."""
    return _off_loop(_run_classify, backend_name, nat, profile=profile, seed=seed, certs_dir=certs_dir)


def _run_classify(backend_name: str, nat: str, *, profile: str = "lan", seed: int = 0,
                  certs_dir: str | None = None) -> dict:
    topo = build(nat, "public", profile_name=profile)
    backend = get_backend(backend_name)
    creds = Credentials.load(certs_dir or default_certs())
    with backend.environment(topo, seed) as env:
        out = backend.run(env, lambda: classify_in(env, creds, "agent"))
    out.update(backend=backend_name, configured=nat, correct=out.get("preset") == nat)
    return out
