"""The fault scenarios a trial can run once its session is up: the direct path blackholed, the
Agent's NAT rebinding, an idle session, the Intermediate or the Connector restarting.

Each scenario takes one `FaultContext` (the lab, the trial and the roles as they are when the fault
starts) and returns what it measured; a scenario that replaces a role returns the replacement, so
the runner tears down the live one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from qlab import wire
from qlab.backends.base import Environment
from qlab.certs import Credentials
from qlab.experiment.record import APP_PORT, Fault, TrialSpec
from qlab.experiment.replies import SendEcho, drain, recording
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoProbe
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import CONNECTOR_PORT
from qlab.traversal.agent_side import SessionTraversal
from qlab.traversal.connector_side import ConnectorTraversal
from qlab.traversal.path import TraversalConfig
from qlab.wire import Path


@dataclass(frozen=True)
class FaultContext:
    """Everything a fault scenario acts on or reads."""

    env: Environment
    spec: TrialSpec
    creds: Credentials
    listen: list[tuple[str, int]]  # the Intermediate's listeners; a restarted one takes the same
    connector_ip: str
    cfg: TraversalConfig
    intermediate: Intermediate
    connector: Connector
    ct: ConnectorTraversal
    agent: Agent
    st: SessionTraversal  # the Agent's session under test
    probe: EchoProbe
    send_echo: SendEcho

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def echo_until(self, end: float, done: Callable[[], bool] = lambda: False) -> None:
        """An echo on the active path every `echo_interval` until `end` or until `done()`."""
        while self.now() < end:
            self.send_echo()
            await asyncio.sleep(self.spec.echo_interval)
            if done():
                break


@dataclass
class FaultResult:
    """What a scenario measured (the record's `extra["fault"]`) and the roles it started anew."""

    record: dict[str, Any]
    intermediate: Intermediate | None = None
    connector: Connector | None = None
    ct: ConnectorTraversal | None = None


async def blackhole(ctx: FaultContext) -> dict[str, Any]:
    """Drop the direct path in the Agent's NAT router; traffic must move to the relay."""
    st = ctx.st
    router = ctx.env.topology.router_of("agent")
    peer = st.working
    if router is None or peer is None:
        return {"failover_ms": None, "echo_gap_ms": None}
    with recording(ctx.probe, ctx.now) as replies:
        t_block = ctx.now()
        ctx.env.block(router.name, peer[0], peer[1])
        try:
            await ctx.echo_until(t_block + st.owner.cfg.failover + 1.5)
            await drain(ctx.probe, 1.0)
        finally:
            ctx.env.unblock(router.name, peer[0], peer[1])
    lost = [e for e in st.path.events if e["event"] == "direct_lost"]
    failover = None
    if lost:
        failover = lost[-1]["t_ms"] - (t_block - st.path.t0) * 1000
    after = [r.at for r in replies if r.path == Path.RELAY]
    last_before = max((r.at for r in replies if r.path == Path.DIRECT), default=t_block)
    gap = (after[0] - min(last_before, t_block)) * 1000 if after else None
    return {"failover_ms": failover, "echo_gap_ms": gap}


async def rebind(ctx: FaultContext) -> FaultResult:
    """NAT rebinding: the Agent's NAT forgets every mapping. QUIC towards the Intermediate must
    survive (the server sees a new address and QAD says so); the session must keep carrying echoes,
    over the relay or a recovered direct path."""
    st, agent, cfg = ctx.st, ctx.agent, ctx.st.owner.cfg
    router = ctx.env.topology.router_of("agent")
    if router is None:
        return FaultResult({"fault": Fault.REBIND.value, "skipped": "the agent has no NAT"})
    before = agent.link.observed
    had_direct = st.session.active_path == Path.DIRECT
    t_fault = ctx.now()
    ctx.env.flush_nat(router.name)

    def recovered() -> bool:  # QAD saw the new mapping and the session carries echoes as before
        return (agent.link.observed != before and st.session.active_path == (Path.DIRECT if had_direct else Path.RELAY)
                and any(r.at > t_fault + 0.5 for r in replies) and ctx.now() > t_fault + 1.0)

    with recording(ctx.probe, ctx.now) as replies:
        await ctx.echo_until(t_fault + cfg.failover + cfg.retry_after + ctx.spec.punch_timeout + 3.0, recovered)
        await drain(ctx.probe, 1.0)
    after = [r.at for r in replies]
    gaps = [b - a for a, b in zip([t_fault, *after], after, strict=False)]
    return FaultResult({
        "fault": Fault.REBIND.value, "qad_before": list(before or ()), "qad_after": list(agent.link.observed or ()),
        "qad_reported_new_address": agent.link.observed != before, "direct_before": had_direct,
        "path_after": st.session.active_path, "echoes_after": len(after),
        "max_echo_gap_ms": round(max(gaps) * 1000, 3) if gaps else None,
    })


async def intermediate_restart(ctx: FaultContext) -> FaultResult:
    """The Intermediate vanishes (as with kill -9) for `outage_s`, then a fresh one starts on the
    same addresses. The direct path must keep carrying echoes meanwhile; Agent and Connector must
    reconnect with backoff and the session must work over the relay again (a sealed session's one
    connection moves to the relay once the session is re-opened, and back afterwards)."""
    st, probe, spec = ctx.st, ctx.probe, ctx.spec
    sealed = st.session.mode == wire.SessionMode.SEALED
    reopened_before = st.session.reopened
    with recording(probe, ctx.now) as replies:
        had_direct = st.session.active_path == Path.DIRECT
        t_kill = ctx.now()
        ctx.intermediate.crash()
        sent_before, first_seq = probe.paths[Path.DIRECT].sent, probe.seq + 1
        await ctx.echo_until(t_kill + spec.outage_s)
        outage_sent, last_seq = probe.paths[Path.DIRECT].sent - sent_before, probe.seq
        new = Intermediate(ctx.env.net("intermediate"), ctx.creds, birthday_ports=spec.birthday)
        await new.listen(ctx.listen)
        t_restart = ctx.now()
        recovered_at = None
        while ctx.now() < t_restart + 30:
            if sealed and st.session.reopened > reopened_before:
                st.session.use(Path.RELAY)
            ctx.send_echo()
            ctx.send_echo(Path.RELAY)
            await asyncio.sleep(spec.echo_interval * 5)
            relay_after = [r.at for r in replies if r.path == Path.RELAY and r.at > t_restart]
            if relay_after:
                recovered_at = relay_after[0]
                break
        if sealed and had_direct:
            st.session.use(Path.DIRECT)
        await drain(probe, 1.0)
    during = [r for r in replies if r.path == Path.DIRECT and t_kill <= r.at <= t_kill + spec.outage_s]
    # the outage's own echoes: sent on the direct path while the Intermediate was down, and those of
    # them answered over the direct path (whenever the reply came)
    answered = {r.seq for r in replies if r.path == Path.DIRECT and first_seq <= r.seq <= last_seq}
    return FaultResult({
        "fault": Fault.INTERMEDIATE_RESTART.value, "outage_s": spec.outage_s, "direct_before": had_direct,
        "direct_echoes_during_outage": len(during),
        "outage_direct_sent": outage_sent, "outage_direct_answered": len(answered),
        "relay_recovered": recovered_at is not None,
        "recovery_ms_after_restart": round((recovered_at - t_restart) * 1000, 3) if recovered_at else None,
        "agent_reconnects": ctx.agent.link.reconnects, "connector_reconnects": ctx.connector.link.reconnects,
        "session_reopened": st.session.reopened,
    }, intermediate=new)


async def connector_restart(ctx: FaultContext) -> FaultResult:
    """The Connector stops (as on SIGTERM) and a new one starts `outage_s` later on the same host and
    port. The Agent keeps its session, re-opens it when the Connector is back, punches again; the
    gap in echoes is what the user saw."""
    st = ctx.st
    with recording(ctx.probe, ctx.now) as replies:
        t_stop = ctx.now()
        ctx.ct.close()
        ctx.connector.close()
        await ctx.echo_until(t_stop + ctx.spec.outage_s)
        new = Connector(ctx.env.net("connector"), ctx.creds, ctx.listen[0], service="echo",
                        forward=(ctx.connector_ip, APP_PORT), name="connector", p2p_port=CONNECTOR_PORT,
                        host="::" if ctx.cfg.qad6 else "0.0.0.0")  # dual-stack labs: as the first one
        new_ct = ConnectorTraversal(new, ctx.cfg)
        await new.start()
        t_back = ctx.now()
        await ctx.echo_until(t_back + 20, lambda: st.session.active_path == Path.DIRECT
                             and any(r.at > t_back for r in replies))
        await drain(ctx.probe, 1.0)
    after = [r.at for r in replies if r.at > t_stop]
    before = [r.at for r in replies if r.at <= t_stop]
    return FaultResult({
        "fault": Fault.CONNECTOR_RESTART.value, "outage_s": ctx.spec.outage_s,
        "session_reopened": st.session.reopened >= 1,
        "echo_gap_ms": round((after[0] - (before[-1] if before else t_stop)) * 1000, 3) if after else None,
        "path_after": st.session.active_path,
        "events": [e["event"] for e in st.path.events if e["t_ms"] >= (t_stop - st.path.t0) * 1000],
    }, connector=new, ct=new_ct)


async def idle(ctx: FaultContext) -> FaultResult:
    """No application traffic for `idle_s` (keepalives only), then echoes again: does the direct
    path survive the NAT's binding timeout?"""
    st, probe, spec = ctx.st, ctx.probe, ctx.spec
    had_direct = st.session.active_path == Path.DIRECT
    await asyncio.sleep(spec.idle_s)
    lost = any(e["event"] == "direct_lost" for e in st.path.events)
    got = probe.paths[Path.DIRECT].received
    for _ in range(5):
        ctx.send_echo(Path.DIRECT if st.session.direct is not None else None)
        await asyncio.sleep(spec.echo_interval)
    await drain(probe, 1.0)
    return FaultResult({
        "fault": Fault.IDLE.value, "idle_s": spec.idle_s, "binding_timeout": spec.binding_timeout,
        "keepalive": spec.keepalive, "direct_before": had_direct, "direct_lost": lost,
        "direct_after": st.session.active_path == Path.DIRECT and probe.paths[Path.DIRECT].received > got,
    })


SCENARIOS: dict[Fault, Callable[[FaultContext], Awaitable[FaultResult]]] = {
    Fault.REBIND: rebind,
    Fault.IDLE: idle,
    Fault.CONNECTOR_RESTART: connector_restart,
    Fault.INTERMEDIATE_RESTART: intermediate_restart,
}
