"""A session's traversal state lives exactly as long as the session: after many sessions open,
punch and close, neither side holds anything of them. In memory: the signaling is fed to the
roles by hand (no Intermediate), the probes go to a loopback socket nobody answers."""

from __future__ import annotations

import asyncio
import gc
import secrets
import weakref

from qlab import wire
from qlab.net import RealNet
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector
from qlab.traversal.agent_side import AgentTraversal
from qlab.traversal.connector_side import ConnectorTraversal
from qlab.traversal.detect import Detection
from qlab.traversal.path import TraversalConfig
from qlab.traversal.punch import PunchConfig

N = 200
FAST = TraversalConfig(punch=PunchConfig(interval=0.005, timeout=0.03))
C = wire.CandidateKind


async def silent_peer(net: RealNet) -> wire.Candidate:
    sock = await net.bind_udp("127.0.0.1", 0, lambda batch: None)
    return wire.Candidate(C.SRFLX, sock.local_address, 1)


async def test_connector_holds_nothing_after_its_sessions_close(creds) -> None:
    net = RealNet()
    c = Connector(net, creds, ("127.0.0.1", 9), service="echo", forward=("127.0.0.1", 9), host="127.0.0.1")
    await c.endpoint.bind("127.0.0.1", 0)
    ct = ConnectorTraversal(c, FAST)
    ct.detection = Detection(wire.NatKind.EDM_RANDOM, [])  # the hard side: birthday sessions open a pool
    ct.announced = True
    ct.ready.set()
    peer = (await silent_peer(net),)
    alive: list[weakref.ref[object]] = []
    for sid in range(1, N + 1):
        key = secrets.token_bytes(32)
        c.link_message(wire.SessionNew(sid, key, "agent", "echo", 1200, wire.NatKind.EIM, peer))
        c.link_message(wire.StartPunch(sid, 0, wire.NatKind.EIM, peer, 2 if sid % 10 == 0 else 0))
        probe = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, sid, 99), key)
        c._on_raw(probe, ("127.0.0.1", 40000 + sid))  # the peer's probe: answered, recorded
        st = ct.sessions[sid]
        assert st.puncher is not None and st.runner is not None
        alive += [weakref.ref(st), weakref.ref(st.puncher), weakref.ref(st.runner)]
    await asyncio.sleep(0.3)  # every punch times out; the birthday pools are open
    pools = [st.birthday for st in ct.sessions.values() if st.birthday is not None]
    assert len(pools) == N // 10 and all(len(p.endpoints) == 2 for p in pools)
    assert all(st.result is not None and st.puncher is not None and st.puncher.txns for st in ct.sessions.values())
    alive += [weakref.ref(p) for p in pools]
    pool_sockets = [ep.sock._sock for p in pools for ep in p.endpoints]  # type: ignore[union-attr]
    del st, pools

    for sid in range(1, N + 1):
        c.link_message(wire.SessionClosed(sid, wire.NackCode.PEER_GONE, "agent left"))
    await asyncio.sleep(0.05)
    gc.collect()

    assert c.sessions == {} and ct.sessions == {}
    assert [r for r in alive if r() is not None] == []  # no session, puncher, runner, pool is left
    assert all(s.fileno() == -1 for s in pool_sockets)  # the pools' sockets are closed
    ct.close()
    c.close()


async def test_agent_releases_a_session_that_ends(creds) -> None:
    net = RealNet()
    agent = Agent(net, creds, ("127.0.0.1", 9), host="127.0.0.1")
    await agent.endpoint.bind("127.0.0.1", 0)
    at = AgentTraversal(agent, FAST)
    peer = (await silent_peer(net),)
    st = at.begin("echo")  # never opens: there is no Intermediate, so the open fails at once
    st.session.key = secrets.token_bytes(32)
    agent.link_message(wire.StartPunch(st.id, 0, wire.NatKind.EIM, peer, 0))
    assert st.runner is not None and st.puncher is not None
    refs = [weakref.ref(st), weakref.ref(st.runner), weakref.ref(st.puncher)]
    session = st.session
    del st
    await asyncio.sleep(0.1)
    gc.collect()
    assert session.closed and session.id not in agent.sessions
    assert at.sessions == {}
    assert [r for r in refs if r() is not None] == []
    at.close()
    agent.close()
