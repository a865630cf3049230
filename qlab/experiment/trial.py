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
import logging
import time
from collections.abc import Callable

from qlab import __version__, wire
from qlab.backends.base import Environment, get_backend
from qlab.certs import Credentials, default_certs
from qlab.experiment import faults
from qlab.experiment.record import APP_PORT, TrialResult, TrialSpec, is_direct, judge, punch_state
from qlab.experiment.replies import drain as _drain
from qlab.nat.spec import expected_outcome
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoProbe, EchoServer
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import CONNECTOR_PORT, INTERMEDIATE_ALT_PORT, INTERMEDIATE_PORT, build
from qlab.traversal.punch import PunchConfig
from qlab.traversal.session import AgentTraversal, ConnectorTraversal, SessionTraversal, TraversalConfig

log = logging.getLogger("qlab.experiment.trial")

# The Connector's registration and NAT detection share this window, and the Agent's connection to
# the Intermediate has one of its own: under loss each step retries (handshakes, requests) until its
# window ends, never on a shorter timer of its own.
SETUP_WINDOW = 20.0
RELAY_WINDOW = 10.0  # after the punch settled: until an echo came back over the relay


def _fmt(c: wire.Candidate) -> str:
    return f"{c.kind.name.lower()}:{c.addr[0]}:{c.addr[1]}"


def _nothing_measured() -> dict:
    return {"verify_sent": 0, "verify_received": 0, "verify_crossed": 0, "failover_ms": None, "echo_gap_ms": None}


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
            measure.update(await faults.blackhole(env, topo, st, st.session, probe, send_echo, spec, loop))
        if spec.fault == "rebind":
            measure["fault"] = await faults.rebind(env, topo, st, agent, probe, send_echo, spec, loop)
        elif spec.fault == "idle":
            measure["fault"] = await faults.idle(st, probe, send_echo, spec, loop)
        elif spec.fault == "connector_restart":
            connector, ct, measure["fault"] = await faults.connector_restart(env, connector, ct, creds, listen, connector_ip,
                                                                       cfg, st, probe, send_echo, spec, loop)
        elif spec.fault == "intermediate_restart":
            srv, measure["fault"] = await faults.intermediate_restart(env, srv, listen, creds, st, agent, connector,
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


def off_loop(fn, *args, **kw):
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
    return off_loop(_run_trial, spec, certs_dir=certs_dir)


def _run_trial(spec: TrialSpec, *, certs_dir: str | None = None) -> TrialResult:
    topo = build(spec.agent_nat, spec.connector_nat, scenario=spec.scenario, profile_name=spec.profile,
                 agents=spec.agents, carrier_nat=spec.carrier_nat)
    backend = get_backend(spec.backend)
    creds = Credentials.load(certs_dir or default_certs())
    with backend.environment(topo, spec.seed) as env:
        return backend.run(env, lambda: run_in(env, spec, creds))
