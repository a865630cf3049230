"""Reflection through hole punching (issue 13, item 3b): a session's candidates name a victim.

A real Intermediate, echo application and Connector as processes on loopback; the attacker is an
authenticated Agent (or a rogue Connector) in this process; the victims are UDP sockets this test
owns, on the IP the Intermediate observes for the attacker (127.0.0.1), so its candidate screening
forwards them (a victim behind the attacker's NAT, or on its LAN). What the victims receive is
compared with what the attacker sent: at most 3x, and at most 10 kB per session.
docs/security.md lists the before/after figures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from qlab import wire
from qlab.net import Addr, DatagramSocket, RealNet
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector
from qlab.traversal.agent_side import AgentTraversal
from qlab.traversal.path import TraversalConfig
from tests.procs import QLAB, Proc, free_udp_port, stop_all

VICTIMS = 16  # what the Intermediate forwards at most (MAX_FORWARDED_CANDIDATES)
SESSION_CAP = 10_000
PUNCH_WINDOW = 4.0  # the punch times out after 3 s: nothing more is sent after that


class Victim:
    """UDP sockets that count what they receive and never answer."""

    def __init__(self) -> None:
        self.socks: list[DatagramSocket] = []
        self.bytes = 0
        self.datagrams = 0

    async def open(self, n: int) -> Victim:
        for _ in range(n):
            self.socks.append(await RealNet().bind_udp("127.0.0.1", 0, self._count))
        return self

    def _count(self, batch: list[tuple[bytes, Addr]]) -> None:
        self.datagrams += len(batch)
        self.bytes += sum(len(d) for d, _ in batch)

    def candidates(self, kind: wire.CandidateKind = wire.CandidateKind.HOST) -> tuple[wire.Candidate, ...]:
        return tuple(wire.Candidate(kind, s.local_address, 1000 + i) for i, s in enumerate(self.socks))

    def close(self) -> None:
        for s in self.socks:
            s.close()


class SentBytes:
    """Counts the UDP payload bytes a role's endpoint sends from now on."""

    def __init__(self, endpoint) -> None:
        sock = endpoint.sock
        send = sock.sendto
        self.bytes = 0

        def counting(data: bytes, addr: Addr) -> None:
            self.bytes += len(data)
            send(data, addr)

        sock.sendto = counting


@pytest.fixture
def deployment(certs_dir) -> Iterator[tuple[Addr, list[Proc]]]:
    port, eport = free_udp_port(), free_udp_port()
    procs = [Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs_dir)], name="intermediate"),
             Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo")]
    try:
        procs.append(Proc([*QLAB, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo",
                           "--forward", f"127.0.0.1:{eport}", "--p2p-port", "0", "--bind", "127.0.0.1",
                           "--certs", str(certs_dir)], name="connector"))
        procs[-1].wait_for("registered service echo")
        yield ("127.0.0.1", port), procs
    finally:
        stop_all(procs)


@pytest.fixture
async def victim() -> AsyncIterator[Victim]:
    v = await Victim().open(VICTIMS)
    yield v
    v.close()


async def test_open_session_with_candidates_at_a_victim_is_bounded(creds, deployment, victim) -> None:
    """Before: 32 candidates at a victim made the Connector send 4,544 probes (136 kB), 274x the
    bytes of the OPEN_SESSION. Re-offering (20 OFFERs) must not buy more than the session cap."""
    intermediate, _ = deployment
    agent = Agent(RealNet(), creds, intermediate, name="attacker", host="127.0.0.1")
    await agent.start()
    try:
        sent = SentBytes(agent.endpoint)
        s = await agent.open_session("echo", nat=wire.NatKind.EIM, candidates=victim.candidates())
        await asyncio.sleep(PUNCH_WINDOW)
        first = victim.bytes
        assert first <= 3 * sent.bytes, (first, sent.bytes)
        for _ in range(20):  # each OFFER starts another punch of the same session
            agent.link.send(wire.Offer(s.id, wire.NatKind.EIM, victim.candidates()))
            await asyncio.sleep(0.05)
        await asyncio.sleep(PUNCH_WINDOW)
        print(f"victim got {first} B in the first punch, {victim.bytes} B in all; the attacker sent {sent.bytes} B")
        assert victim.bytes <= 3 * sent.bytes and victim.bytes <= SESSION_CAP, (victim.bytes, sent.bytes)
    finally:
        agent.close()


async def test_announced_candidates_at_a_victim_are_bounded_per_agent_session(creds, deployment, victim) -> None:
    """A rogue Connector announces the victim's addresses for its service; every Agent session that
    punches toward them stays within 3x the announcement and the session cap. Before: 4,608 probes
    (138 kB) per session."""
    intermediate, _ = deployment
    echo = await RealNet().bind_udp("127.0.0.1", 0, lambda batch: None)
    rogue = Connector(RealNet(), creds, intermediate, service="rogue", forward=echo.local_address, name="rogue",
                      host="127.0.0.1", p2p_port=0)
    await rogue.start()
    agent = Agent(RealNet(), creds, intermediate, name="honest", host="127.0.0.1")
    at = AgentTraversal(agent, TraversalConfig(retry_after=60.0))
    try:
        await rogue.wait_registered()
        sent = SentBytes(rogue.endpoint)
        rogue.link.send(wire.Announce(wire.NatKind.EIM, victim.candidates()))
        await agent.start()
        await at.prepare()
        sessions = 3
        for _ in range(sessions):
            st = at.begin("rogue")
            await st.session.wait_open(5.0)
        await asyncio.sleep(PUNCH_WINDOW)
        per_session = victim.bytes / sessions
        print(f"victim got {per_session:.0f} B per session ({victim.datagrams} datagrams in all); the rogue sent {sent.bytes} B")
        assert per_session <= 3 * sent.bytes and per_session <= SESSION_CAP, (victim.bytes, sent.bytes)
    finally:
        at.close()
        agent.close()
        rogue.close()
        echo.close()
