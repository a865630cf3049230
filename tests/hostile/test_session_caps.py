"""The Connector's per-session resources under many sessions (issue 13, item 5b).

A real Intermediate, echo application and Connector as processes on loopback; the sessions are
opened by authenticated Agents in this process, under several names (the Intermediate limits
sessions per identity). What the Connector holds is read from /proc/<pid> (open fds, RSS).
docs/security.md lists the before/after figures.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qlab import wire
from qlab.certs import CONNECTOR_NAME
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.net import RealNet
from qlab.roles.agent import Agent, AgentSession, ping
from qlab.roles.events import ControlReceived
from tests.procs import QLAB, Proc, free_udp_port, rss_kb, stop_all

FD_LIMIT = 128  # the Connector's open-file limit in the exhaustion test: its app-socket cap is half
RSS_SLACK_KB = 3 * 1024  # what a second round of 1,000 sessions may add to the Connector's RSS (measured: 0.2-0.8 MB)


@dataclass
class Deployment:
    intermediate: tuple[str, int]
    connector: Proc
    p2p: tuple[str, int]

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.connector.p.pid}/fd"))

    def rss_kb(self) -> int:
        return rss_kb(self.connector.p.pid)


def _connector_argv(port: int, eport: int, p2p: int, certs: Path, fd_limit: int | None) -> list[str]:
    args = ["connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo", "--forward",
            f"127.0.0.1:{eport}", "--p2p-port", str(p2p), "--bind", "127.0.0.1", "--certs", str(certs)]
    if fd_limit is None:
        return [*QLAB, *args]
    # the same CLI, under a lower open-file limit
    code = ("import resource, sys; from qlab.cli.main import main; "
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({fd_limit}, {fd_limit})); sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *args]


def _deploy(certs_dir: Path, fd_limit: int | None) -> Iterator[Deployment]:
    port, eport, p2p = free_udp_port(), free_udp_port(), free_udp_port()
    procs = [Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs_dir),
                   "--sessions-per-client", "1000"], name="intermediate"),
             Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo")]
    try:
        procs.append(Proc(_connector_argv(port, eport, p2p, certs_dir, fd_limit), name="connector"))
        procs[-1].wait_for("registered service echo")
        yield Deployment(("127.0.0.1", port), procs[-1], ("127.0.0.1", p2p))
    finally:
        stop_all(procs)


@pytest.fixture
def deployment(certs_dir) -> Iterator[Deployment]:
    yield from _deploy(certs_dir, None)


@pytest.fixture
def small_deployment(certs_dir) -> Iterator[Deployment]:
    yield from _deploy(certs_dir, FD_LIMIT)


async def _agents(creds, d: Deployment, n: int, prefix: str) -> list[Agent]:
    agents = [Agent(RealNet(), creds, d.intermediate, name=f"{prefix}{i}", host="127.0.0.1") for i in range(n)]
    await asyncio.gather(*(a.start() for a in agents))
    return agents


async def _open(agents: list[Agent], per_agent: int, silent: tuple[wire.Candidate, ...] = ()) -> list[AgentSession]:
    """`per_agent` sessions on each Agent (within the Intermediate's burst of 40 per identity)."""
    opening = [a.open_session("echo", 10.0, nat=wire.NatKind.EIM, candidates=silent)
               for a in agents for _ in range(per_agent)]
    return list(await asyncio.gather(*opening))


def _came_back(back: set[int], sid: int, event: object) -> None:
    back.add(sid)


def _keep_session_errors(errors: list[wire.SessionError], event: object) -> bool:
    if isinstance(event, ControlReceived) and isinstance(event.msg, wire.SessionError):
        errors.append(event.msg)
        return True
    return False


async def _echo_once(sessions: list[AgentSession], timeout: float, resend: bool = True) -> int:
    """An echo on each session over the relay, sent again each second (a burst of a thousand
    datagrams overflows socket buffers) until it comes back; how many did within `timeout`."""
    back: set[int] = set()
    for s in sessions:
        s.subscribe(functools.partial(_came_back, back, s.id))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(back) < len(sessions) and loop.time() < deadline:
        for s in sessions:
            if s.id not in back:
                s.send(b"x" * 32)
        if not resend:
            break
        end = min(deadline, loop.time() + 1.0)
        while len(back) < len(sessions) and loop.time() < end:
            await asyncio.sleep(0.05)
    return len(back)


async def test_app_socket_exhaustion_refuses_with_session_error_and_open_sessions_keep_working(
        creds, small_deployment, certs_dir) -> None:
    """Before: one socket per session without a cap; past the fd limit every new socket failed
    with EMFILE in an unretrieved task (tracebacks), the Agent heard nothing."""
    d = small_deployment
    honest = (await _agents(creds, d, 1, "honest"))[0]
    attackers = await _agents(creds, d, 4, "flood")
    errors: list[wire.SessionError] = []
    for a in attackers:
        a.subscribe(functools.partial(_keep_session_errors, errors))
    try:
        mine = (await _open([honest], 1))[0]
        assert (await ping(mine, 5, wait=2.0))["paths"]["relay"]["received"] == 5
        flood = await _open(attackers, 40)  # 160 sessions: more than the fd limit allows
        answered = await _echo_once(flood, 3.0)
        refused = {e.session for e in errors if e.code == wire.NackCode.RATE_LIMITED}
        assert answered + len(refused) == len(flood), (answered, len(refused))
        assert answered <= FD_LIMIT // 2 and len(refused) >= len(flood) - FD_LIMIT // 2
        assert d.fds() < FD_LIMIT
        assert (await ping(mine, 10, wait=2.0))["paths"]["relay"]["received"] == 10  # the open session goes on
        # a new Agent while the sockets are held: told why, and a failing exit code (it used to exit 0)
        late = Proc([*QLAB, "agent", "--intermediate", "{}:{}".format(*d.intermediate), "--service", "echo",
                     "--ping", "5", "--bind", "127.0.0.1", "--name", "late", "--certs", str(certs_dir)], name="late")
        rc, _, err = await asyncio.to_thread(late.communicate, 30.0)
        assert rc == 4 and "no echo came back of 5 sent" in err and "rate_limited" in err, (rc, err)
        assert "Traceback" not in "\n".join(d.connector.err)
    finally:
        for a in [honest, *attackers]:
            a.close()


async def test_a_thousand_sessions_open_and_close_and_the_connector_returns_to_its_baseline(
        creds, deployment) -> None:
    """Two rounds of 1,000 sessions, each opening an app socket and punching toward a silent
    candidate, then all closed: the Connector's fds are back to the baseline after each round, and
    the second round adds nothing to the RSS the first one left (a leak would grow again; memory
    the allocator merely kept does not)."""
    d = deployment
    silent = await RealNet().bind_udp("127.0.0.1", 0, lambda batch: None)
    cand = (wire.Candidate(wire.CandidateKind.HOST, silent.local_address, 1),)
    try:
        await asyncio.sleep(1.0)  # the Connector has announced: every session punches
        fds0, rss0 = d.fds(), d.rss_kb()
        after: list[tuple[int, int, int]] = []
        for round_ in range(2):
            agents = await _agents(creds, d, 25, f"round{round_}-")
            sessions = await _open(agents, 40, cand)
            assert await _echo_once(sessions, 8.0) == 1000
            peak = d.fds()
            for a in agents:
                a.close()
            await _settle(d, fds0)
            after.append((peak, d.fds(), d.rss_kb()))
        print(f"connector fds {fds0} -> peak/after {[(p, f) for p, f, _ in after]}, RSS {rss0} -> {[r for *_, r in after]} kB")
        assert all(peak >= fds0 + 1000 and fds == fds0 for peak, fds, _ in after), (fds0, after)
        assert after[1][2] - after[0][2] <= RSS_SLACK_KB, (rss0, after)
    finally:
        silent.close()


async def _settle(d: Deployment, fds: int | None = None, timeout: float = 5.0) -> None:
    """Wait until the Connector has heard of every close (its fds back to `fds`), at most `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await asyncio.sleep(0.5)
    while fds is not None and d.fds() != fds and loop.time() < deadline:
        await asyncio.sleep(0.1)


class _DirectRecorder(Handler):
    def __init__(self) -> None:
        self.control: list[wire.Message] = []
        self.datagrams: list[bytes] = []

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        self.control.append(msg)

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        self.datagrams.append(data)


async def test_datagrams_before_the_direct_hello_are_dropped_not_held(creds, deployment) -> None:
    """A direct connection to the Connector's P2P port sends datagrams, then (0.3 s later, in
    other packets) its DirectHello: what came before the proof never reaches the application.
    Before: up to 16 datagrams (of up to 64 KB) were held per unproven connection and replayed."""
    d = deployment
    agent = (await _agents(creds, d, 1, "direct"))[0]
    ep = Endpoint(RealNet())
    await ep.bind("127.0.0.1", 0)
    try:
        s = (await _open([agent], 1))[0]
        assert s.key is not None
        rec = _DirectRecorder()
        conn = ep.connect(d.p2p, creds.client_config(CONNECTOR_NAME), rec)
        await asyncio.wait_for(conn.handshake_done, 5.0)
        for i in range(3):
            conn.send_datagram(wire.encode_app(s.id, b"before-%d" % i))
        await asyncio.sleep(0.3)
        conn.send_control(wire.DirectHello(s.id, wire.direct_auth(s.key, s.id)))
        async with asyncio.timeout(5.0):
            while not rec.control:
                await asyncio.sleep(0.01)
        assert not isinstance(rec.control[0], wire.Nack), rec.control
        await asyncio.sleep(0.5)
        assert rec.datagrams == []  # nothing held was replayed to the application
        conn.send_datagram(wire.encode_app(s.id, b"after"))
        async with asyncio.timeout(5.0):
            while not rec.datagrams:
                await asyncio.sleep(0.01)
        assert rec.datagrams == [wire.encode_app(s.id, b"after")]  # the proven path carries traffic
    finally:
        ep.close()
        agent.close()
