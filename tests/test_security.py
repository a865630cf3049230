"""Access control and abuse: policies, session ownership, routing isolation, rate limits, forged
probes. Roles in-process on real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest

from qlab import wire
from qlab.net import RealNet
from qlab.roles.agent import Agent, ping
from qlab.roles.connector import Connector
from qlab.roles.echo import EchoServer
from qlab.roles.events import ControlReceived
from qlab.roles.intermediate import Intermediate
from qlab.roles.link import Refused
from qlab.roles.policy import AccessPolicy


class Lab:
    def __init__(self, creds, policy=None, rate_limits=None):
        self.creds = creds
        self.srv = Intermediate(RealNet(), creds, policy=policy, rate_limits=rate_limits)
        self.closers = [self.srv]

    async def start(self):
        await self.srv.listen([("127.0.0.1", 0)])
        self.addr = self.srv.listener_addrs[0]
        return self

    async def connector(self, service="echo", name="connector", creds=None):
        echo = EchoServer(RealNet())
        eaddr = await echo.start("127.0.0.1", 0)
        c = Connector(RealNet(), creds or self.creds, self.addr, service=service, forward=eaddr, name=name,
                      host="127.0.0.1", p2p_port=0)
        self.closers += [echo, c]
        await c.start()
        return c

    async def agent(self, name="agent", creds=None):
        a = Agent(RealNet(), creds or self.creds, self.addr, name=name, host="127.0.0.1")
        self.closers.append(a)
        await a.start()
        return a

    def close(self):
        for c in reversed(self.closers):
            c.close()


@pytest.fixture
async def lab(creds):
    labs = []

    async def make(**kw):
        lab = await Lab(creds, **kw).start()
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.close()
    await asyncio.sleep(0.01)


def collect(agent, kind):
    got = []
    agent.subscribe(lambda e: isinstance(e, ControlReceived) and isinstance(e.msg, kind) and (got.append(e.msg) or True))
    return got


async def wait_until(cond, timeout=3.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_policy_limits_agents_to_their_services(lab, creds, tmp_path):
    alice_secret = secrets.token_bytes(32)
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps({
        "default": "deny",
        "clients": {
            "alice": {"role": "agent", "secret": alice_secret.hex(), "services": ["echo"]},
            "connector": {"role": "connector", "services": ["echo", "admin"]},
        },
    }))
    L = await lab(policy=AccessPolicy.load(policy_file))
    c = await L.connector("echo")
    await c.wait_registered()
    await L.connector("admin", name="connector")

    from dataclasses import replace

    alice_creds = replace(creds, secret=b"", role_secrets={wire.Role.AGENT: alice_secret})
    alice = await L.agent("alice", creds=alice_creds)
    s = await alice.open_session("echo")
    assert (await ping(s, 5, interval=0.005))["paths"]["relay"]["received"] == 5
    with pytest.raises(Refused, match="not_allowed"):
        await alice.open_session("admin")

    # alice's name with the deployment secret: refused (a name cannot be borrowed)
    with pytest.raises(Refused, match="unauthenticated"):
        await L.agent("alice")
    # an agent the policy does not name: default deny
    bob = await L.agent("bob")
    with pytest.raises(Refused, match="not_allowed"):
        await bob.open_session("echo")
    # a connector may not register a service it is not given
    rogue = await L.connector("payroll", name="connector")
    with pytest.raises(Refused, match="not_allowed"):
        await rogue.wait_registered()


async def test_a_third_party_cannot_act_on_someone_elses_session(lab):
    L = await lab()
    c = await L.connector()
    await c.wait_registered()
    alice, mallory = await L.agent("alice"), await L.agent("mallory")
    s = await alice.open_session("echo")
    errors = collect(mallory, wire.SessionError)
    sid = s.id
    mallory.link.send(wire.Offer(sid, wire.NatKind.EIM, ()))
    mallory.link.send(wire.PunchResult(sid, 1, ("127.0.0.9", 9), 1))
    mallory.link.send(wire.SessionClosed(sid, wire.NackCode.PEER_GONE, "bye"))
    mallory.link.conn.send_datagram(wire.encode_app(sid, b"injected"))
    await wait_until(lambda: len(errors) >= 3)
    assert {e.code for e in errors} == {wire.NackCode.NO_SUCH_SESSION}
    assert sid in L.srv.sessions, "the session survived"
    # mallory cannot take the id either
    with pytest.raises(Refused, match="bad_state"):
        await mallory.link.request(wire.OpenSession(mallory.link.next_req(), sid, "echo", wire.NatKind.EIM, ()))
    r = await ping(s, 10, interval=0.005)
    assert r["paths"]["relay"]["received"] == 10 and r["foreign"] == 0
    assert L.srv.metrics.get("errors_total", kind="not_session_party") >= 3


async def test_traffic_reaches_only_the_connector_of_its_service(lab):
    L = await lab()
    c1 = await L.connector("one", name="c1")
    c2 = await L.connector("two", name="c2")
    await c1.wait_registered()
    await c2.wait_registered()
    a = await L.agent()
    s = await a.open_session("one")
    assert (await ping(s, 20, interval=0.002))["paths"]["relay"]["received"] == 20
    assert sum(x.counters["relay_in"] for x in c1.sessions.values()) == 20
    assert not c2.sessions and c2.metrics.get("datagrams_in_total", path="relay") == 0


async def test_rate_limits_answer_with_a_clear_error_and_recover(lab):
    L = await lab(rate_limits={"control": (1000, 1000), "session": (10, 5)})
    c = await L.connector()
    await c.wait_registered()
    a = await L.agent()
    results = await asyncio.gather(*(a.open_session("echo") for _ in range(12)), return_exceptions=True)
    limited = [r for r in results if isinstance(r, Refused)]
    assert limited and all(r.code == wire.NackCode.RATE_LIMITED and "slow down" in r.reason for r in limited)
    assert sum(1 for r in results if not isinstance(r, Exception)) >= 5
    assert L.srv.metrics.get("rate_limited_total", kind="session") == len(limited)
    await asyncio.sleep(0.3)  # the bucket refills at 10/s
    assert (await a.open_session("echo")).id


async def test_forged_probes_do_not_make_a_pair(creds):
    """Probes signed with another key, or for another session, never count."""
    from qlab.traversal.punch import Puncher

    key = secrets.token_bytes(32)
    p = Puncher(5, key, (), (wire.Candidate(wire.CandidateKind.SRFLX, ("198.51.100.2", 4434)),))
    p.start(0.0)
    for k in (secrets.token_bytes(32) for _ in range(50)):
        for kind in (wire.PROBE_REQUEST, wire.PROBE_RESPONSE):
            data = wire.encode_probe(wire.Probe(kind, 5, 1, ("1.1.1.1", 1) if kind == wire.PROBE_RESPONSE else None), k)
            with pytest.raises(wire.WireError):
                p.receive(data, ("198.51.100.2", 4434), 0.01)
    assert p.success is None and p.responses_sent == 0
