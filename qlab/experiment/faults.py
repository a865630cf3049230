"""The fault scenarios a trial can run once its session is up: the direct path blackholed, the
Agent's NAT rebinding, an idle session, the Intermediate or the Connector restarting."""

from __future__ import annotations

import asyncio

from qlab.experiment.record import APP_PORT
from qlab.experiment.replies import drain as _drain
from qlab.roles.connector import Connector
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import CONNECTOR_PORT
from qlab.traversal.session import ConnectorTraversal


async def blackhole(env, topo, st, session, probe, send_echo, spec, loop) -> dict:
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


async def rebind(env, topo, st, agent, probe, send_echo, spec, loop) -> dict:
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


async def intermediate_restart(env, srv, listen, creds, st, agent, connector, probe, send_echo, spec, loop):
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


async def connector_restart(env, connector, ct, creds, listen, connector_ip, cfg, st, probe, send_echo, spec, loop):
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


async def idle(st, probe, send_echo, spec, loop) -> dict:
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
