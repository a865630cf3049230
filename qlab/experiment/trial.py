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
import time
from collections.abc import Callable
from typing import Any, TypeVar

from qlab import __version__, wire
from qlab.backends.base import Backend, Environment, get_backend
from qlab.certs import Credentials, default_certs
from qlab.experiment import faults
from qlab.experiment.record import (
    APP_PORT,
    Fault,
    Mechanism,
    Outcome,
    TrialResult,
    TrialSpec,
    error_text,
    is_direct,
    judge,
    punch_state,
)
from qlab.experiment.replies import drain
from qlab.nat.spec import cell_expected
from qlab.net import Net
from qlab.roles.agent import Agent, AgentEvent, DirectHandshake
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoEvent, EchoProbe, EchoReplied, EchoServer, PathStats
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import CONNECTOR_PORT, INTERMEDIATE_ALT_PORT, INTERMEDIATE_PORT, build
from qlab.traversal.agent_side import AgentTraversal, SessionTraversal
from qlab.traversal.connector_side import ConnectorTraversal
from qlab.traversal.mapped import MappedAddress
from qlab.traversal.path import TraversalConfig
from qlab.traversal.punch import PunchConfig, lan_candidates
from qlab.wire import Path

log = logging.getLogger("qlab.experiment.trial")
T = TypeVar("T")

# The Connector's registration and NAT detection share this window, and the Agent's connection to
# the Intermediate has one of its own: under loss each step retries (handshakes, requests) until its
# window ends, never on a shorter timer of its own.
SETUP_WINDOW = 20.0
RELAY_WINDOW = 10.0  # after the punch settled: until an echo came back over the relay


def _fmt(c: wire.Candidate) -> str:
    return f"{c.kind.name.lower()}:{c.addr[0]}:{c.addr[1]}"


def _nothing_measured() -> dict[str, Any]:
    return {"verify_sent": 0, "verify_received": 0, "verify_crossed": 0, "failover_ms": None, "echo_gap_ms": None}


class AgentSide:
    """The Agent's half of a trial, the same in a lab and in the field: register, detect the NAT,
    open the session (echoes over the relay from the first packet), punch, verify the direct path,
    measure both paths the same way. `relay_switch(session_id, on)` turns the relay off for the
    session at the Intermediate during the proof; it exists only where the Intermediate runs in
    this process (a lab). Without it, the proof is that echoes sent on the direct QUIC connection
    came back over it (replies are counted by the path they arrived on)."""

    def __init__(self, net: Net, creds: Credentials, intermediate: tuple[str, int], spec: TrialSpec,
                 cfg: TraversalConfig, *, service: str = "echo",
                 relay_switch: Callable[[int, bool], None] | None = None, bind: str = "0.0.0.0",
                 connect_window: float = SETUP_WINDOW) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect_window = connect_window
        self.spec, self.cfg, self.service = spec, cfg, service
        self.relay_switch = relay_switch
        self.probe = EchoProbe(self.loop.time, spec.echo_size)
        self.mode = wire.SessionMode(spec.mode)
        self.agent = Agent(net, creds, intermediate, name="agent", host=bind)
        self.at = AgentTraversal(self.agent, cfg)
        self.st: SessionTraversal | None = None
        self.t0: float | None = None
        self.measure = _nothing_measured()

    def send_echo(self, path: Path | None = None) -> None:
        session = self.session_traversal.session
        p = path or session.active_path
        payload = self.probe.make(p)
        try:
            if session.send(payload, p) is None:
                self.probe.unsend(payload)
        except Exception:
            self.probe.unsend(payload)
            raise

    @property
    def session_traversal(self) -> SessionTraversal:
        if self.st is None:
            raise RuntimeError("the session is not open yet")
        return self.st

    @property
    def direct_active(self) -> bool:
        s = self.st.session if self.st is not None else None
        return (s is not None and s.direct is not None and not s.direct.closed and s.active_path == Path.DIRECT
                and self.session_traversal.path.verified_at is not None)

    def _direct_up(self) -> bool:
        st = self.session_traversal
        return st.session.direct is not None and not st.session.direct.closed and st.path.verified_at is not None

    async def run(self) -> None:
        await self.agent.start(self.connect_window)
        await self.at.prepare()
        self._open()
        await self._settle()
        # stragglers over the relay so ttfb exists even when the punch settled at once
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.session_traversal.session.opened, 5)
        direct_up = self._direct_up()
        if self.mode == wire.SessionMode.SEALED:  # one connection, one path at a time
            await self._move_to(Path.RELAY)
        await self._prove_relay()
        await self._measure([Path.RELAY, Path.DIRECT] if direct_up else [Path.RELAY])
        if direct_up and self.session_traversal.session.active_path == Path.DIRECT:
            await self._prove_direct()

    def _open(self) -> None:
        """t0: the session opens; echoes go out over the active path from now on."""
        probe = self.probe
        self.t0 = self.loop.time()
        st = self.st = self.at.begin(self.service, self.mode)
        st.session.subscribe(lambda e: probe.receive(e.payload, e.path))

        def rtt_sample(e: EchoEvent) -> None:
            if isinstance(e, EchoReplied):
                st.observe_rtt(e.path, e.rtt)

        def first_echo(e: AgentEvent) -> None:  # a path opened: an echo on it in the same flight
            if isinstance(e, DirectHandshake):
                payload = probe.make(e.path)
                if e.session.send(payload, e.path) is None:
                    probe.unsend(payload)

        probe.subscribe(rtt_sample)
        self.agent.subscribe(first_echo)

    async def _settle(self) -> None:
        """Echoes on the active path until the direct path is verified or the punch settled."""
        spec, st = self.spec, self.session_traversal
        assert self.t0 is not None
        settle_by = self.t0 + spec.punch_timeout + self.cfg.direct_timeout + 2.0
        if spec.birthday:
            settle_by += spec.birthday_probes / spec.birthday_rate + 1.0
        while self.loop.time() < settle_by:
            self.send_echo()
            if st.session.direct is not None and not st.session.direct.closed and st.path.verified_at is None:
                self.send_echo(Path.DIRECT)  # the first direct echo may be lost: keep probing until one returns
            if (st.path.verified_at is not None and st.session.active_path == Path.DIRECT) or st.settled.is_set():
                break
            await asyncio.sleep(spec.echo_interval)

    async def _move_to(self, path: Path) -> None:
        """Move a sealed session's connection to `path`, once the replies in flight came back (or
        three relay RTTs passed): a migration loses what is in flight on the old path (aioquic
        forgets a retired connection ID at once)."""
        await self.probe.wait_for_replies(max(0.1, 3 * (self.session_traversal.path.median(Path.RELAY) or 0.2)))
        self.session_traversal.session.use(path)

    async def _prove_relay(self) -> None:
        """The relay is proven by an echo that came back over it: under loss (a relayed echo crosses
        eight access-link hops) keep probing until one does, within the window."""
        relay_by = self.loop.time() + RELAY_WINDOW
        while self.probe.paths[Path.RELAY].first_reply_at is None and self.loop.time() < relay_by:
            self.send_echo(Path.RELAY)
            await asyncio.sleep(self.spec.echo_interval)

    async def _measure(self, paths: list[Path]) -> None:
        """The same probe, interleaved on the paths that are up. A sealed session's one connection
        has one active path: the paths in turn (relay, then direct), each at the same rate."""
        if self.mode == wire.SessionMode.SEALED:
            for p in paths:
                await self._move_to(p)
                for _ in range(self.spec.samples):
                    self.send_echo(p)
                    await asyncio.sleep(self.spec.echo_interval)
        else:
            for _ in range(self.spec.samples):
                for p in paths:
                    self.send_echo(p)
                    await asyncio.sleep(self.spec.echo_interval / len(paths))
        await drain(self.probe, 1.0 + 4 * (self.session_traversal.path.median(Path.RELAY) or 0.2))

    async def _prove_direct(self) -> None:
        """Only the direct path may answer (the relay switched off for the session, where we can)."""
        probe, session = self.probe, self.session_traversal.session
        if self.relay_switch is not None:
            self.relay_switch(session.id, False)
        try:
            d = probe.paths[Path.DIRECT]
            before_rx, before_tx, before_x = d.received, d.sent, d.crossed
            for _ in range(self.spec.verify_echoes):
                self.send_echo(Path.DIRECT)
                await asyncio.sleep(self.spec.echo_interval)
            await drain(probe, 1.0 + 4 * (self.session_traversal.path.median(Path.DIRECT) or 0.2))
            self.measure["verify_sent"] = probe.paths[Path.DIRECT].sent - before_tx
            self.measure["verify_received"] = probe.paths[Path.DIRECT].received - before_rx
            self.measure["verify_crossed"] = probe.paths[Path.DIRECT].crossed - before_x
        finally:
            if self.relay_switch is not None:
                self.relay_switch(session.id, True)

    def close(self) -> None:
        self.at.close()
        self.agent.close()


def intermediate_listeners(inter_ips: list[str]) -> list[tuple[str, int]]:
    """The Intermediate's listeners: both ports on its first address, and on its second if it has
    one; IPv4 first (the primary and the classification listeners), then the same for IPv6."""
    v4 = [ip for ip in inter_ips if ":" not in ip][:2]
    v6 = [ip for ip in inter_ips if ":" in ip][:2]
    return [(ip, port) for ip in v4 + v6 for port in (INTERMEDIATE_PORT, INTERMEDIATE_ALT_PORT)]


def _dual_stack(env: Environment, cfg: TraversalConfig, listen: list[tuple[str, int]]) -> tuple[str, TraversalConfig]:
    """A dual-stack lab: the roles bind `::` (one socket for both families) and QAD over IPv6 too."""
    qad6 = next((a for a in listen if ":" in a[0]), None)
    if qad6 is None:
        return "0.0.0.0", cfg
    return "::", dataclasses.replace(cfg, qad6=qad6)


async def run_in(env: Environment, spec: TrialSpec, creds: Credentials) -> TrialResult:
    """Run one trial with the roles on `env`'s hosts (inside the backend's running loop)."""
    loop = asyncio.get_running_loop()
    started = time.time()
    w0 = loop.time()
    listen = intermediate_listeners(env.addresses("intermediate"))
    connector_ip = env.addresses("connector")[0]
    bind, cfg = _dual_stack(env, trial_traversal_config(spec), listen)
    if spec.binding_timeout is not None:
        for router in env.topology.routers:
            env.set_binding_timeout(router.name, spec.binding_timeout)
    srv = Intermediate(env.net("intermediate"), creds, birthday_ports=spec.birthday, birthday_probes=spec.birthday_probes)
    echo = EchoServer(env.net("connector"))
    connector: Connector | None = None
    ct: ConnectorTraversal | None = None
    side: AgentSide | None = None
    error = ""
    setup_by = w0 + SETUP_WINDOW

    def relay_switch(session_id: int, on: bool) -> None:
        (srv.relay_blocked.discard if on else srv.relay_blocked.add)(session_id)

    try:
        await srv.listen(listen)
        await echo.start(connector_ip, APP_PORT)
        connector = Connector(env.net("connector"), creds, listen[0], service="echo", forward=(connector_ip, APP_PORT),
                              name="connector", p2p_port=CONNECTOR_PORT, host=bind)
        ct = ConnectorTraversal(connector, cfg)
        await connector.start()
        await connector.wait_registered(_left(setup_by))
        await asyncio.wait_for(ct.ready.wait(), _left(setup_by))
        side = AgentSide(env.net("agent"), creds, listen[0], spec, cfg,
                         relay_switch=relay_switch if spec.relay_off_proof else None, bind=bind)
        await side.run()
        ctx = faults.FaultContext(env, spec, creds, listen, connector_ip, cfg, srv, connector, ct, side.agent,
                                  side.session_traversal, side.probe, side.send_echo)
        if spec.blackhole and side.direct_active and side.measure["verify_sent"]:
            side.measure.update(await faults.blackhole(ctx))
        scenario = faults.SCENARIOS.get(Fault(spec.fault))
        if scenario is not None:
            res = await scenario(ctx)
            side.measure["fault"] = res.record
            srv, connector, ct = res.intermediate or srv, res.connector or connector, res.ct or ct
    except Exception as exc:  # recorded, never dropped: a failing trial is a result too
        log.exception("trial %s failed", spec.trial_id)
        error = error_text(exc)
    finally:
        for role in (side, ct, connector, srv, echo):
            if role is not None:
                role.close()
        await asyncio.sleep(0)
    return side_result(spec, side, started, loop.time() - w0, error, ct=ct)


def trial_traversal_config(spec: TrialSpec) -> TraversalConfig:
    """The roles' traversal settings for a trial. Port mapping is asked for in the labs, whose
    gateways are the lab's own routers; elsewhere the gateway is someone's real router."""
    spray_seed = spec.seed if spec.backend == "sim" else None
    return TraversalConfig(punch=PunchConfig(timeout=spec.punch_timeout, spray_rate=spec.birthday_rate,
                                             spray_seed=spray_seed),
                           keepalive=spec.keepalive, failover=max(2.0, 3 * spec.keepalive),
                           punch_anyway=spec.punch_anyway, punch_delay=spec.punch_delay,
                           port_mapping=spec.port_mapping and spec.backend in ("sim", "netns"))


def _verified(measure: dict[str, Any], direct: PathStats) -> bool:
    """Only replies that came back over the direct path count (the probe counts each reply on the path
    it arrived by). With the relay off for the session (labs) nothing else could answer; in the
    field the relay stays on, and a reply over it is crossed, not a proof. At least half of what the
    direct path delivered during the measurement must come back (the rest is the profile's loss),
    so lossy links are not mislabelled; one echo at the very least."""
    direct_delivery = direct.received / direct.sent if direct.sent else 0.0
    needed = max(1, int(0.5 * measure["verify_sent"] * direct_delivery))
    return bool(measure["verify_sent"] > 0 and measure["verify_received"] >= needed)


def _working_kinds(st: SessionTraversal, ct: ConnectorTraversal | None) -> set[wire.CandidateKind | None]:
    """The kinds of the peer candidates that worked, on the Agent's side and (when it ran here) the
    Connector's: a mapping on the Agent's side shows as the Connector's working kind."""
    conn_res = ct.result(st.session.id) if ct is not None else None
    conn_kind = conn_res.success.kind if conn_res is not None and conn_res.success is not None else None
    return {st.working_kind, conn_kind}


def _direct_kind(st: SessionTraversal, ct: ConnectorTraversal | None) -> Outcome:
    """Which direct outcome a verified session's working pair makes."""
    kinds = _working_kinds(st, ct)
    if _family(st.working) == "ipv6" and st.working_kind == wire.CandidateKind.HOST and not _lan_pair(st):
        return Outcome.DIRECT_WAN  # a global IPv6 address: reachable through the firewalls, not a LAN
    if st.working_kind == wire.CandidateKind.HOST and st.peer_nat != wire.NatKind.NONE:
        return Outcome.DIRECT_LAN  # a private host address of a peer behind a NAT: same LAN
    if wire.CandidateKind.MAPPED in kinds:
        return Outcome.DIRECT_MAPPED
    if wire.CandidateKind.PREDICTED in kinds:
        return Outcome.DIRECT_PREDICTED
    return Outcome.DIRECT_WAN


def _family(addr: tuple[str, int] | None) -> str | None:
    return None if addr is None else ("ipv6" if ":" in addr[0] else "ipv4")


def _lan_pair(st: SessionTraversal) -> bool:
    """Whether the working IPv6 host address is on one of our own LAN prefixes (same_lan)."""
    own = tuple(c for c in st.candidates if c.kind == wire.CandidateKind.HOST)
    return st.working is not None and bool(lan_candidates(own, (wire.Candidate(wire.CandidateKind.HOST, st.working),)))


def mechanism(outcome: Outcome, st: SessionTraversal | None, ct: ConnectorTraversal | None,
              birthday: bool) -> Mechanism | None:
    """What found the direct path (None when the trial ended on the relay)."""
    if st is None or not is_direct(outcome):
        return None
    if outcome == Outcome.DIRECT_LAN:
        return Mechanism.LAN
    if outcome == Outcome.DIRECT_MAPPED:
        return Mechanism.MAPPING
    if _family(st.working) == "ipv6" and st.working_kind == wire.CandidateKind.HOST:
        return Mechanism.IPV6
    if outcome == Outcome.DIRECT_PREDICTED:
        return Mechanism.BIRTHDAY if birthday and wire.NatKind.EDM_RANDOM in (st.own_nat, st.peer_nat) \
            else Mechanism.PREDICTION
    if wire.CandidateKind.PRFLX in _working_kinds(st, ct):
        return Mechanism.PEER_REFLEXIVE
    return Mechanism.SERVER_REFLEXIVE


def _mapping(mapped: MappedAddress | None) -> str:
    m = mapped.current if mapped is not None else None
    return f"{m.protocol.value} {m.external[0]}:{m.external[1]}" if m is not None else ""


def _outcome(side: AgentSide | None, ct: ConnectorTraversal | None, probe: EchoProbe, measure: dict[str, Any],
             verified: bool, error: str) -> tuple[Outcome, str]:
    """The trial's outcome and, for anything short of a verified direct path, why."""
    st = side.st if side is not None else None
    relay, direct = probe.paths[Path.RELAY], probe.paths[Path.DIRECT]
    reason = ""
    if st is not None and verified:
        outcome = _direct_kind(st, ct)
    elif relay.received > 0:
        outcome = Outcome.RELAY
        if st is not None and st.path.verified_at is not None and not verified:
            off = "with the relay switched off" if side is not None and side.relay_switch else "during the proof"
            reason = (f"the direct path did not carry echoes {off} "
                      f"({measure['verify_received']} of {measure['verify_sent']} came back)")
        else:
            reason = (st.reason if st is not None and st.reason else "") or "no direct path was verified"
        if direct.crossed:
            reason += f" ({direct.crossed} echoes sent on the direct path were answered over the relay)"
    else:
        outcome = Outcome.FAILED
        reason = error or "no echo came back over any path"
    if error and outcome != Outcome.FAILED:
        reason = f"{reason}; error after connecting: {error}" if reason else f"error after connecting: {error}"
    return outcome, reason


def _proof(side: AgentSide | None, measure: dict[str, Any], probe: EchoProbe) -> str:
    """How the direct path was proven, for `measured_with`."""
    relay, direct = probe.paths[Path.RELAY], probe.paths[Path.DIRECT]
    vs, vr, vx = measure["verify_sent"], measure["verify_received"], measure.get("verify_crossed", 0)
    if side is not None and side.relay_switch:
        proof = (f"proof: relay switched off for the session at the Intermediate, {vr} of {vs} echoes sent on "
                 f"the direct path came back over it")
    else:
        proof = (f"proof (the relay stayed on, as in the field): {vr} of {vs} echoes sent on the direct QUIC "
                 f"connection came back over it, {vx} over the relay instead")
    return proof + (f"; replies counted by the path they arrived on ({direct.crossed} sent direct came back over "
                    f"the relay, {relay.crossed} sent over the relay came back direct)")


def _candidates(side: AgentSide | None, ct: ConnectorTraversal | None) -> dict[str, Any]:
    """Both sides' detected NATs, candidates, predicted ports and probe counts. Without `ct` the
    Connector runs elsewhere: its side is what its offer told the Agent."""
    st = side.st if side is not None else None
    at = side.at if side is not None else None
    predicted: list[int] = []
    if at is not None:
        predicted = [c.addr[1] for c in at.candidates if c.kind == wire.CandidateKind.PREDICTED]
    if ct is not None:
        predicted += [c.addr[1] for c in ct.candidates if c.kind == wire.CandidateKind.PREDICTED]
    if ct is not None:
        conn_nat_detected, conn_candidates = ct.detection.kind.name, [_fmt(c) for c in ct.candidates]
    else:
        conn_nat_detected = st.peer_nat.name if st is not None else "UNKNOWN"
        conn_candidates = [_fmt(c) for c in st.peer_candidates] if st is not None else []
    conn_probes = 0
    if ct is not None and st is not None:
        own = ct.result(st.session.id)
        conn_probes = own.probes_sent if own is not None else 0
    return dict(
        agent_nat_detected=at.detection.kind.name if at is not None else "UNKNOWN",
        connector_nat_detected=conn_nat_detected,
        agent_candidates=[_fmt(c) for c in at.candidates] if at is not None else [],
        connector_candidates=conn_candidates,
        agent_probes=st.probes_sent if st is not None else 0, connector_probes=conn_probes,
        predicted_ports=predicted,
    )


def _path_fields(probe: EchoProbe, st: SessionTraversal | None, t0: float | None, outcome: Outcome) -> dict[str, Any]:
    """Per-path timings, RTTs, byte and echo counts."""
    relay, direct = probe.paths[Path.RELAY], probe.paths[Path.DIRECT]
    rs, ds = relay.summary(), direct.summary()
    ttfb = (relay.first_reply_at - t0) * 1000 if t0 is not None and relay.first_reply_at else None
    ttd = (direct.first_reply_at - t0) * 1000 if t0 is not None and direct.first_reply_at and is_direct(outcome) else None
    sess = st.session if st is not None else None
    return dict(
        ttfb_ms=_r(ttfb), ttd_ms=_r(ttd),
        rtt_relay_p50_ms=rs["p50_ms"], rtt_relay_p95_ms=rs["p95_ms"], rtt_relay_loss=rs["loss"], rtt_relay_n=rs["n"],
        rtt_direct_p50_ms=ds["p50_ms"], rtt_direct_p95_ms=ds["p95_ms"], rtt_direct_loss=ds["loss"], rtt_direct_n=ds["n"],
        relay_bytes_out=sess.bytes["relay_out"] if sess else 0, relay_bytes_in=sess.bytes["relay_in"] if sess else 0,
        direct_bytes_out=sess.bytes["direct_out"] if sess else 0, direct_bytes_in=sess.bytes["direct_in"] if sess else 0,
        rtt_relay_sent=relay.sent, rtt_relay_received=relay.received,
        rtt_direct_sent=direct.sent, rtt_direct_received=direct.received,
        echo_direct_answered_on_relay=direct.crossed, echo_relay_answered_on_direct=relay.crossed,
    )


def side_result(spec: TrialSpec, side: AgentSide | None, started: float, duration: float, error: str, *,
                ct: ConnectorTraversal | None = None, expected: str | None = None,
                measured_where: str = "") -> TrialResult:
    """The trial's record from what the Agent side saw (and the Connector side, when it ran here)."""
    st = side.st if side is not None else None
    probe = side.probe if side is not None else EchoProbe(time.monotonic, spec.echo_size)
    measure = side.measure if side is not None else _nothing_measured()
    if expected is None:
        expected = cell_expected(spec.agent_nat, spec.connector_nat, ipv6_both=bool(spec.agent_ipv6 and spec.connector_ipv6))
    verified = _verified(measure, probe.paths[Path.DIRECT])
    outcome, reason = _outcome(side, ct, probe, measure, verified, error)
    working = f"{st.working[0]}:{st.working[1]}" if st is not None and verified and st.working else ""
    return TrialResult(
        trial_id=spec.trial_id, campaign_id=spec.campaign_id, backend=spec.backend, scenario=spec.scenario,
        agent_nat=spec.agent_nat, connector_nat=spec.connector_nat, profile=spec.profile, seed=spec.seed,
        qlab_version=__version__, started_at=started, duration_s=round(duration, 4), expected=expected,
        outcome=outcome.value, reason=reason,
        as_expected=judge(expected, outcome, spec.scenario, spec.birthday > 0, lan_nat=spec.agent_nat),
        direct_verified=verified, working_pair=working,
        punch_ms=round(st.punch_ms, 3) if st is not None and st.punch_ms is not None else None,
        verify_sent=measure["verify_sent"], verify_received=measure["verify_received"],
        failover_ms=_r(measure["failover_ms"]), echo_gap_ms=_r(measure["echo_gap_ms"]),
        path_events=st.path.events if st is not None else [],
        measured_with=(f"echo probe, {spec.echo_size} B payload through the Connector to a UDP echo app, "
                       f"{spec.samples} measurement echoes per path "
                       + ("interleaved" if spec.mode == "terminated" else "in turn, relay then direct (sealed mode: "
                          "one connection, one active path),")
                       + f" every "
                       f"{spec.echo_interval * 1000:g} ms (RTT percentiles over every echo the path answered), "
                       f"backend {spec.backend}, profile {spec.profile}{measured_where}; "
                       f"{_proof(side, measure, probe)}"),
        error=error,
        extra={**({"fault": measure["fault"]} if "fault" in measure else {}),
               **({"ipv6": spec.ipv6} if spec.ipv6 else {})},
        punch=punch_state(st.path.events if st is not None else []).value,
        mechanism=_value(mechanism(outcome, st, ct, spec.birthday > 0)),
        agent_mapping=_mapping(side.at.mapped) if side is not None else None,
        connector_mapping=_mapping(ct.mapped) if ct is not None else None,
        path_family=_family(st.working) if st is not None and verified and st.working else None,
        mode=spec.mode, upgrade_ms=_upgrade_ms(probe, st, outcome), punch_delay=spec.punch_delay,
        **_candidates(side, ct), **_path_fields(probe, st, side.t0 if side is not None else None, outcome),
    )


def _upgrade_ms(probe: EchoProbe, st: SessionTraversal | None, outcome: Outcome) -> float | None:
    first = probe.paths[Path.DIRECT].first_reply_at
    if st is None or st.punch_ok_at is None or first is None or not is_direct(outcome):
        return None
    return _r((first - st.punch_ok_at) * 1000)


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _value(m: Mechanism | None) -> str | None:
    return m.value if m is not None else None


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def off_loop(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    """Run `fn` here, or on a worker thread when this thread already runs an event loop (a Jupyter
    kernel does): every backend runs its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return fn(*args, **kw)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args, **kw).result()


def run_trial(spec: TrialSpec, *, certs_dir: str | None = None, backend: Backend[Any] | None = None) -> TrialResult:
    """Build the topology, bring the backend up, run one trial, tear everything down. `backend`: an
    instance to use instead of `spec.backend`'s default one (a `SimBackend` with its own calibration)."""
    return off_loop(_run_trial, spec, certs_dir=certs_dir, backend=backend)


def _run_trial(spec: TrialSpec, *, certs_dir: str | None = None, backend: Backend[Any] | None = None) -> TrialResult:
    topo = build(spec.agent_nat, spec.connector_nat, scenario=spec.scenario, profile_name=spec.profile,
                 agents=spec.agents, carrier_nat=spec.carrier_nat, agent_ipv6=spec.agent_ipv6,
                 connector_ipv6=spec.connector_ipv6)
    backend = backend or get_backend(spec.backend)
    creds = Credentials.load(certs_dir or default_certs())
    with backend.environment(topo, spec.seed) as env:
        result = backend.run(env, lambda: run_in(env, spec, creds))
        result.sim_calibration = env.processing_cost
        return result
