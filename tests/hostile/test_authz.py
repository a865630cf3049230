"""Attacks on the Intermediate's authentication and authorization (issue 13, items 3a, 4, 5a, 6).

A real Intermediate process on loopback; the attackers are raw qlab/1 clients written here (an
Endpoint and hand-made messages), the honest parties the project's own roles. docs/security.md
lists the before/after figures.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.net import Addr, RealNet
from qlab.roles.agent import Agent, ping
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoServer
from tests.procs import QLAB, Proc, free_udp_port

SESSIONS_PER_CLIENT = 16
VICTIM_IP = "127.0.0.66"  # a loopback address no role uses: only the attacker names it


class Recorder(Handler):
    """A raw client connection that keeps every control message it receives."""

    def __init__(self) -> None:
        self.got: list[wire.Message] = []
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        self.got.append(msg)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)

    async def until(self, cond, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not cond(self.got) and not self.closed.done():
                await asyncio.sleep(0.01)


class Raw:
    """Hand-made qlab/1 clients from one socket."""

    def __init__(self, creds: Credentials, intermediate: Addr) -> None:
        self.creds, self.intermediate = creds, intermediate
        self.ep = Endpoint(RealNet())

    async def start(self) -> Raw:
        await self.ep.bind("127.0.0.1", 0)
        return self

    async def connect(self) -> tuple[Connection, Recorder]:
        rec = Recorder()
        conn = self.ep.connect(self.intermediate, self.creds.client_config(INTERMEDIATE_NAME), rec)
        await asyncio.wait_for(conn.handshake_done, 5)
        return conn, rec

    async def hello(self, role: wire.Role, name: str, secret: bytes) -> tuple[Connection, Recorder, wire.Hello]:
        conn, rec = await self.connect()
        hello = wire.Hello(wire.VERSION, role, name, wire.hello_auth(secret, role, name, qi.peer_cid(conn.quic)))
        conn.send_control(hello)
        await rec.until(lambda got: any(isinstance(m, (wire.Welcome, wire.Nack)) for m in got))
        return conn, rec, hello

    def close(self) -> None:
        self.ep.close()


def welcomed(rec: Recorder) -> bool:
    return any(isinstance(m, wire.Welcome) for m in rec.got)


def nacks(rec: Recorder) -> list[wire.Nack]:
    return [m for m in rec.got if isinstance(m, wire.Nack)]


@pytest.fixture
async def deployment(certs_dir: Path) -> AsyncIterator[tuple[Addr, Proc]]:
    port = free_udp_port()
    proc = Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs_dir),
                 "--sessions-per-client", str(SESSIONS_PER_CLIENT)], name="intermediate")
    try:
        await asyncio.to_thread(proc.wait_for, "listening on udp")
        yield ("127.0.0.1", port), proc
    finally:
        proc.terminate()


async def honest_connector(creds: Credentials, intermediate: Addr, service: str = "echo",
                           name: str = "edge") -> tuple[Connector, EchoServer]:
    echo = EchoServer(RealNet())
    eaddr = await echo.start("127.0.0.1", 0)
    c = Connector(RealNet(), creds, intermediate, service=service, forward=eaddr, name=name, host="127.0.0.1", p2p_port=0)
    await c.start()
    await c.wait_registered()
    return c, echo


async def test_a_recorded_hello_is_refused_on_another_connection(deployment, creds) -> None:
    """Before: the same HELLO bytes were accepted 3/3 (a bearer token). After: 0/3."""
    intermediate, _ = deployment
    raw = await Raw(creds, intermediate).start()
    try:
        _, first, recorded = await raw.hello(wire.Role.AGENT, "alice", creds.secret_for(wire.Role.AGENT))
        assert welcomed(first)
        accepted = 0
        for _ in range(3):
            conn, rec = await raw.connect()
            conn.send_control(recorded)  # replayed as recorded, on a new connection
            await rec.until(lambda got: bool(got))
            accepted += welcomed(rec)
            assert [n.code for n in nacks(rec)] == [wire.NackCode.UNAUTHENTICATED]
        assert accepted == 0
    finally:
        raw.close()


async def test_agent_credentials_cannot_register_a_service(deployment, certs_dir, tmp_path) -> None:
    """A host holding only agent.secret (what an Agent host receives) claims the Connector role."""
    intermediate, _ = deployment
    agent_dir = tmp_path / "agent-host"
    agent_dir.mkdir()
    for name in ("ca.pem", "agent.secret"):
        shutil.copy(certs_dir / name, agent_dir / name)
    agent_creds = Credentials.load(agent_dir)
    with pytest.raises(PermissionError):
        agent_creds.secret_for(wire.Role.CONNECTOR)
    raw = await Raw(agent_creds, intermediate).start()
    try:
        _, rec, _ = await raw.hello(wire.Role.CONNECTOR, "rogue", agent_creds.secret_for(wire.Role.AGENT))
        assert not welcomed(rec) and [n.code for n in nacks(rec)] == [wire.NackCode.UNAUTHENTICATED]
    finally:
        raw.close()


async def test_a_second_identity_cannot_take_a_service(deployment, creds) -> None:
    """Before: "newest wins" — the rogue's registration took the honest Agent's traffic. After: the
    rogue is refused and the pinned Agent's echoes all come back through the honest Connector."""
    intermediate, _ = deployment
    edge, echo = await honest_connector(creds, intermediate)
    raw = await Raw(creds, intermediate).start()
    agent = Agent(RealNet(), creds, intermediate, name="alice", host="127.0.0.1", expect_connector="edge")
    try:
        conn, rogue, _ = await raw.hello(wire.Role.CONNECTOR, "rogue", creds.secret_for(wire.Role.CONNECTOR))
        conn.send_control(wire.Register(1, "echo"))
        await rogue.until(lambda got: bool(nacks(rogue)))
        assert [n.code for n in nacks(rogue)] == [wire.NackCode.NOT_ALLOWED]
        await agent.start()
        s = await agent.open_session("echo")
        assert s.connector == "edge"
        result = await ping(s, 10, interval=0.005)
        assert result["paths"]["relay"]["received"] == 10
        assert not any(isinstance(m, wire.SessionNew) for m in rogue.got)
    finally:
        agent.close()
        raw.close()
        edge.close()
        echo.close()


async def test_ten_connections_under_one_name_share_the_session_cap(deployment, creds) -> None:
    """Before: rate limits per connection, 10 connections x one name opened 400 sessions in a burst.
    After: at most SESSIONS_PER_CLIENT open sessions for the name, however many connections."""
    intermediate, _ = deployment
    edge, echo = await honest_connector(creds, intermediate)
    raw = await Raw(creds, intermediate).start()
    try:
        clients = [await raw.hello(wire.Role.AGENT, "burst", creds.secret_for(wire.Role.AGENT)) for _ in range(10)]
        for i, (conn, _, _) in enumerate(clients):
            for j in range(1, 41):
                conn.send_control(wire.OpenSession(j, (i << 8) | j, "echo", wire.NatKind.UNKNOWN, ()))
        answered = lambda rec: sum(isinstance(m, (wire.SessionOpened, wire.Nack)) for m in rec.got)  # noqa: E731
        for _, rec, _ in clients:
            await rec.until(lambda got, rec=rec: answered(rec) >= 40, timeout=10)
        opened = sum(isinstance(m, wire.SessionOpened) for _, rec, _ in clients for m in rec.got)
        assert opened <= SESSIONS_PER_CLIENT
        assert opened >= 1  # the cap, not a broken service
    finally:
        raw.close()
        edge.close()
        echo.close()


async def test_rogue_candidates_never_reach_the_other_side(deployment, creds) -> None:
    """A rogue Connector ANNOUNCEs, and a rogue Agent OPENs a session with, candidates pointing at a
    victim loopback socket. Before: forwarded as given (an Agent that punched sent 4,608 probes /
    138 kB per session to the victim). After: the Intermediate forwards none of them (server-reflexive
    ones are rewritten to the sender's observed address), and the victim receives nothing."""
    intermediate, _ = deployment
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind((VICTIM_IP, 0))
    victim.setblocking(False)
    vport = victim.getsockname()[1]
    bad = tuple(wire.Candidate(kind, (VICTIM_IP, vport + k), 1) for k, kind in enumerate(
        (wire.CandidateKind.SRFLX, wire.CandidateKind.PREDICTED, wire.CandidateKind.PRFLX, wire.CandidateKind.RELAY,
         wire.CandidateKind.HOST)))
    raw = await Raw(creds, intermediate).start()
    try:
        cconn, rogue_c, _ = await raw.hello(wire.Role.CONNECTOR, "rogue-edge", creds.secret_for(wire.Role.CONNECTOR))
        cconn.send_control(wire.Announce(wire.NatKind.EIM, bad))
        cconn.send_control(wire.Register(1, "victimsvc"))
        await rogue_c.until(lambda got: any(isinstance(m, wire.Ack) for m in got))
        aconn, rogue_a, _ = await raw.hello(wire.Role.AGENT, "rogue-agent", creds.secret_for(wire.Role.AGENT))
        aconn.send_control(wire.OpenSession(1, 99, "victimsvc", wire.NatKind.EIM, bad))
        await rogue_a.until(lambda got: any(isinstance(m, wire.StartPunch) for m in got))
        await rogue_c.until(lambda got: any(isinstance(m, wire.StartPunch) for m in got))
        forwarded = [c for m in rogue_a.got + rogue_c.got if isinstance(m, (wire.SessionNew, wire.StartPunch))
                     for c in (m.candidates if isinstance(m, wire.SessionNew) else m.peer_candidates)]
        assert forwarded and all(c.addr[0] != VICTIM_IP for c in forwarded)
        await asyncio.sleep(0.3)
        with pytest.raises(BlockingIOError):
            victim.recv(2048)
    finally:
        raw.close()
        victim.close()
