"""A session's traversal state lives exactly as long as the session: after many sessions open,
punch and close, neither side holds anything of them. In memory: the signaling is fed to the
roles by hand (no Intermediate), the probes go to a loopback socket nobody answers."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
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
from qlab.wire import Path

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
        c.link_datagram(wire.encode_app(sid, b"x"))  # opens the session's app socket
        st = ct.sessions[sid]
        assert st.puncher is not None and st.runner is not None
        alive += [weakref.ref(st), weakref.ref(st.puncher), weakref.ref(st.runner)]
    await asyncio.sleep(0.3)  # every punch times out; the birthday pools are open
    assert c.app_sockets == N and all(Path.RELAY in s.app_socks for s in c.sessions.values())
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
    assert c.app_sockets == 0 and not c.tasks._tasks and not ct.tasks._tasks  # sockets, tasks
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


# -- the Connector's per-session resources: caps, refusals, expiry (issue 13, item 5b) -------------


class _NoSockets(RealNet):
    """A net whose every new UDP socket fails as at the open-file limit."""

    async def bind_udp(self, host, port, receiver):
        raise OSError(errno.EMFILE, "Too many open files")


def _connector(creds, net=None, **kw) -> tuple[Connector, list[wire.Message]]:
    c = Connector(net or RealNet(), creds, ("127.0.0.1", 9), service="echo", forward=("127.0.0.1", 9),
                  host="127.0.0.1", **kw)
    sent: list[wire.Message] = []
    setattr(c.link, "send", sent.append)  # noqa: B010  (what the Connector tells the Intermediate)
    return c, sent


def _open(c: Connector, sid: int) -> None:
    c.link_message(wire.SessionNew(sid, secrets.token_bytes(32), "agent", "echo", 1200, wire.NatKind.EIM, ()))


def _errors(sent: list[wire.Message]) -> list[int]:
    return [m.session for m in sent if isinstance(m, wire.SessionError) and m.code == wire.NackCode.RATE_LIMITED]


async def test_an_app_socket_that_cannot_open_is_a_session_error_not_an_exception(creds) -> None:
    c, sent = _connector(creds, _NoSockets())
    loop = asyncio.get_running_loop()
    failed: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: failed.append(ctx))
    _open(c, 1)
    for _ in range(5):
        c.link_datagram(wire.encode_app(1, b"hello"))
        await asyncio.sleep(0.01)
    assert _errors(sent) == [1]  # told once, not per datagram
    assert c.app_sockets == 0 and c.sessions[1].app_socks == {} and failed == []
    c.close()


async def test_app_sockets_over_the_cap_are_refused_and_open_ones_keep_working(creds) -> None:
    c, sent = _connector(creds, max_app_sockets=3)
    for sid in range(1, 6):
        _open(c, sid)
        c.link_datagram(wire.encode_app(sid, b"x"))
    await asyncio.sleep(0.05)
    assert c.app_sockets == 3 and sorted(_errors(sent)) == [4, 5]
    assert all(Path.RELAY in c.sessions[sid].app_socks for sid in (1, 2, 3))
    c.link_message(wire.SessionClosed(1, wire.NackCode.PEER_GONE, "agent left"))
    c.link_datagram(wire.encode_app(4, b"x"))  # a socket is free again
    await asyncio.sleep(0.05)
    assert c.app_sockets == 3 and Path.RELAY in c.sessions[4].app_socks
    c.close()
    assert c.app_sockets == 0


async def test_sessions_over_the_cap_are_refused_and_closed(creds) -> None:
    c, sent = _connector(creds, max_sessions=2)
    for sid in (1, 2, 3):
        _open(c, sid)
    assert sorted(c.sessions) == [1, 2] and _errors(sent) == [3]
    assert [m.session for m in sent if isinstance(m, wire.SessionClosed)] == [3]
    c.close()


async def test_idle_app_sockets_close_and_reopen_on_the_next_datagram(creds) -> None:
    c, _ = _connector(creds, app_idle=1.0)
    _open(c, 1)
    c.link_datagram(wire.encode_app(1, b"x"))
    await asyncio.sleep(0.05)
    fds = len(os.listdir("/proc/self/fd"))
    now = asyncio.get_running_loop().time()
    c.sweep(now + 0.5)
    assert c.app_sockets == 1
    c.sweep(now + 2.0)
    assert c.app_sockets == 0 and c.sessions[1].app_socks == {} and len(os.listdir("/proc/self/fd")) == fds - 1
    c.link_datagram(wire.encode_app(1, b"x"))
    await asyncio.sleep(0.05)
    assert c.app_sockets == 1
    c.close()


async def test_sessions_not_reopened_after_a_reconnection_are_released(creds) -> None:
    """The link dropped: the Intermediate closed our sessions while we were away (its SessionClosed
    never reached us). Those the Agent re-opens stay; the others go after the grace."""
    c, _ = _connector(creds, reopen_grace=10.0)
    _open(c, 1)
    _open(c, 2)
    c.link_up()  # reconnected
    c.link_message(wire.SessionNew(1, secrets.token_bytes(32), "agent", "echo", 1200, wire.NatKind.EIM, ()))
    now = asyncio.get_running_loop().time()
    c.sweep(now + 5.0)
    assert sorted(c.sessions) == [1, 2]
    c.sweep(now + 11.0)
    assert sorted(c.sessions) == [1]
    c.close()
