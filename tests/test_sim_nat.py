"""The NAT engine, packet by packet through the virtual network, for every preset: the mapped
addresses a socket gets, who may send back in, hairpinning, binding lifetime, port allocation.

The expectations are what the kernel lab's nftables rulesets measurably do (docs/netns-lab.md).
The Intermediate host plays an RFC 5780-style reflector on 203.0.113.10/.11 x 3478/3479: it answers
every datagram with the source address it saw.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace

import pytest

from qlab.backends import sim
from qlab.backends.sim.nat import NatEngine, Verdict
from qlab.nat.spec import (
    PRESET_NAMES,
    CounterScope,
    Filtering,
    Mapping,
    NatSpec,
    PortAllocation,
    Refresh,
    preset,
)
from qlab.scenario import topology

Addr = tuple[str, int]
A, B = topology.INTERMEDIATE_IPS  # 203.0.113.10, 203.0.113.11
P1, P2 = 3478, 3479


class Lab:
    """A reflector on the Intermediate and UDP clients on inside hosts, with received datagrams logged."""

    def __init__(self, network: sim.SimNetwork) -> None:
        self.network = network
        self.refl: dict[Addr, sim.SimSocket] = {}
        self.seen_by_refl: list[tuple[Addr, Addr]] = []  # (reflector address, observed source)
        self.inbox: dict[str, list[tuple[bytes, Addr]]] = {}

    async def start(self) -> None:
        inter = self.network.net("intermediate")
        for ip in (A, B):
            for port in (P1, P2):
                self.refl[(ip, port)] = await inter.bind_udp(ip, port, self._reflector((ip, port)))

    def _reflector(self, me: Addr):
        def on(batch: list[tuple[bytes, Addr]]) -> None:
            for data, src in batch:
                self.seen_by_refl.append((me, src))
                if data == b"stun":
                    self.refl[me].sendto(f"{src[0]}:{src[1]}".encode(), src)
        return on

    async def client(self, host: str, port: int = 5000, name: str | None = None) -> sim.SimSocket:
        name = name or host
        box = self.inbox.setdefault(name, [])
        return await self.network.net(host).bind_udp("0.0.0.0", port, box.extend)

    async def mapped(self, sock: sim.SimSocket, server: Addr, name: str) -> Addr:
        """Ask the reflector at `server` which address `sock` is seen from."""
        box = self.inbox[name]
        n = len(box)
        sock.sendto(b"stun", server)
        await asyncio.sleep(0.05)
        answers = [d for d, src in box[n:] if src == server]
        assert answers, f"no reflector answer from {server}"
        ip, port = answers[-1].decode().rsplit(":", 1)
        return ip, int(port)

    def received_from(self, name: str, src: Addr) -> int:
        return sum(1 for _, s in self.inbox[name] if s == src)


def pair(agent_nat: str, connector_nat: str = "public", **kw) -> sim.SimNetwork:
    return sim.SimNetwork(topology.build(agent_nat, connector_nat, **kw), seed=kw.pop("seed", 1))


# mapping seen from one socket towards (A,P1), (B,P1), (B,P2); and which outside sources reach it after
# it sent only to (A,P1): same ip:port, same IP other port, other IP.
EXPECT = {
    #                  mapping    same-ip:port other-port other-ip
    "public":          ("none",   True,        True,      True),
    "full_cone":       ("EIM",    True,        True,      True),
    "restricted_cone": ("EIM",    True,        True,      False),
    "port_restricted": ("EIM",    True,        False,     False),
    "symmetric":       ("APDM",   True,        False,     False),
    "symmetric_seq":   ("APDM",   True,        False,     False),
}


def test_expectations_cover_every_preset() -> None:
    assert set(EXPECT) == set(PRESET_NAMES)


@pytest.mark.parametrize("nat", PRESET_NAMES)
def test_mapping_and_filtering_per_preset(nat: str) -> None:
    network = pair(nat)
    lab = Lab(network)
    agent_ip = network.topology.host("agent").ip

    async def main() -> tuple[list[Addr], dict[str, bool]]:
        await lab.start()
        s = await lab.client("agent", 5000)
        maps = [await lab.mapped(s, srv, "agent") for srv in ((A, P1), (B, P1), (B, P2))]
        # a fresh socket that has sent only to (A, P1); then three outside sources try to reach it
        s2 = await lab.client("agent", 6000, name="probe")
        m = await lab.mapped(s2, (A, P1), "probe")
        reach = {}
        for label, src in (("same", (A, P1)), ("other_port", (A, P2)), ("other_ip", (B, P1))):
            lab.refl[src].sendto(label.encode(), m)
            await asyncio.sleep(0.05)
            reach[label] = any(d == label.encode() for d, _ in lab.inbox["probe"])
        return maps, reach

    maps, reach = sim.run(main())
    mapping, same, other_port, other_ip = EXPECT[nat]
    assert reach == {"same": same, "other_port": other_port, "other_ip": other_ip}
    public_ip = agent_ip if nat == "public" else network.topology.router("nat-a").wan_ip
    assert {ip for ip, _ in maps} == {public_ip}
    ports = [p for _, p in maps]
    if mapping in ("none", "EIM"):
        assert ports == [5000, 5000, 5000]  # EIM with the port preserved, as nftables does
    else:
        assert len(set(ports)) == 3  # a new public port per destination
    if nat == "symmetric_seq":
        assert ports == [40000, 40001, 40002]
    if nat == "symmetric":
        assert 5000 not in ports and all(1024 <= p <= 65535 for p in ports)
    if nat != "public":
        expected_drop = {"nat_filtered"} if not (same and other_port and other_ip) else set()
        assert set(network.dropped) == expected_drop


@pytest.mark.parametrize("nat", [n for n in PRESET_NAMES if n != "public"])
def test_no_port_overloading_for_two_inside_hosts_on_one_port(nat: str) -> None:
    """RFC 4787 REQ-3: hostA and hostA2 both on :5000 never share a public port (unlike plain
    MASQUERADE, nat-lab P6); an EIM NAT keeps each one's mapping for every destination."""
    network = sim.SimNetwork(topology.build(nat, "public", scenario="multi_agent", agents=2), seed=3)
    lab = Lab(network)

    async def main() -> tuple[list[Addr], list[Addr]]:
        await lab.start()
        s1 = await lab.client("agent", 5000)
        s2 = await lab.client("agent2", 5000)
        m1 = [await lab.mapped(s1, srv, "agent") for srv in ((A, P1), (B, P2))]
        m2 = [await lab.mapped(s2, srv, "agent2") for srv in ((A, P1), (B, P2))]
        return m1, m2

    m1, m2 = sim.run(main())
    assert not {p for _, p in m1} & {p for _, p in m2}
    if EXPECT[nat][0] == "EIM":
        assert m1 == [("203.0.113.101", 5000)] * 2  # the first one keeps its port
        assert m2[0] == m2[1] and m2[0][1] != 5000  # the second gets one other port, for all destinations


# hairpinning per preset (docs/netns-lab.md, NAT rulesets), written out independently of the spec
HAIRPIN = {"full_cone": True, "restricted_cone": True, "port_restricted": True, "symmetric": False,
           "symmetric_seq": False}
# refresh and sequential counter scope per preset (docs/netns-lab.md, docs/sim.md)
PRESET_REFRESH = {n: Refresh.OUTBOUND for n in HAIRPIN}
PRESET_COUNTER = {"symmetric_seq": CounterScope.NAT}


def test_preset_refresh_hairpin_and_counter_values() -> None:
    assert {n: preset(n).hairpinning for n in HAIRPIN} == HAIRPIN
    assert {n: preset(n).refresh for n in HAIRPIN} == PRESET_REFRESH
    assert {n: preset(n).sequential_scope for n in HAIRPIN if preset(n).ports is PortAllocation.SEQUENTIAL} \
        == PRESET_COUNTER


@pytest.mark.parametrize("nat", [n for n in PRESET_NAMES if n != "public"])
def test_hairpinning_shows_the_public_source(nat: str) -> None:
    """Two hosts behind one NAT send to each other's public mapping (the kernel lab's hairpin table, docs/netns-lab.md), and
    a second socket of one host sends to the first one's mapping (what `qlab classify` tests)."""
    network = sim.SimNetwork(topology.build(nat, "public", scenario="multi_agent", agents=2), seed=2)
    lab = Lab(network)

    async def main() -> tuple[Addr, Addr, list[tuple[bytes, Addr]], list[tuple[bytes, Addr]], list]:
        await lab.start()
        s1 = await lab.client("agent", 5000)
        s2 = await lab.client("agent2", 6000)
        s1b = await lab.client("agent", 7000, name="agent-b")
        m1 = await lab.mapped(s1, (A, P1), "agent")
        m2 = await lab.mapped(s2, (A, P1), "agent2")
        n1, n2 = len(lab.inbox["agent"]), len(lab.inbox["agent2"])
        s1.sendto(b"to-2", m2)
        s2.sendto(b"to-1", m1)
        await asyncio.sleep(0.05)
        got1, got2 = lab.inbox["agent"][n1:], lab.inbox["agent2"][n2:]
        n1 = len(lab.inbox["agent"])
        s1b.sendto(b"self", m1)  # same host, second socket, no mapping of its own yet
        await asyncio.sleep(0.05)
        return m1, m2, got1, got2, lab.inbox["agent"][n1:]

    m1, m2, got1, got2, own = sim.run(main())
    if HAIRPIN[nat]:
        assert got2 == [(b"to-2", m1)]  # seen from the sender's public mapping, not 10.1.0.2
        assert got1 == [(b"to-1", m2)]
        assert [d for d, _ in own] == [b"self"] and own[0][1][0] == m1[0]  # from the public address
        assert network.counters["hairpinned"] == 3
    else:
        assert got1 == got2 == own == []
        assert network.dropped["nat_no_hairpin"] == 3


@pytest.mark.parametrize("nat", ["full_cone", "restricted_cone", "port_restricted", "symmetric", "symmetric_seq"])
def test_binding_expires_after_idle_and_only_outbound_refreshes(nat: str) -> None:
    network = pair(nat)
    network.set_binding_timeout("nat-a", 3.0)
    lab = Lab(network)

    async def main() -> dict[str, bool | Addr]:
        loop = asyncio.get_running_loop()
        await lab.start()
        s = await lab.client("agent", 5000)
        out: dict[str, bool | Addr] = {}
        m = await lab.mapped(s, (A, P1), "agent")  # last outbound at ~t0
        t_out = loop.time() - 0.05

        async def probe(label: str, at: float, to: Addr = m) -> bool:
            await asyncio.sleep(max(0.0, at - loop.time()))
            lab.refl[(A, P1)].sendto(label.encode(), to)
            await asyncio.sleep(0.001)
            return any(d == label.encode() for d, _ in lab.inbox["agent"])

        # inbound every second does not keep the binding alive (RFC 4787 REQ-6, nft set `update`)
        out["t+1"] = await probe("t+1", t_out + 1.0)
        out["t+2"] = await probe("t+2", t_out + 2.0)
        out["t+2.9"] = await probe("t+2.9", t_out + 2.9)
        out["t+3.1"] = await probe("t+3.1", t_out + 3.1)
        # outbound keepalives every 2 s for 10 s do keep it
        s.sendto(b"ka", (A, P1))
        m_after = await lab.mapped(s, (A, P1), "agent")
        out["new_mapping"] = m_after
        out["old_mapping"] = m
        for _ in range(5):
            await asyncio.sleep(2.0)
            s.sendto(b"ka", (A, P1))
        out["after_keepalives"] = await probe("late", loop.time() + 2.5, m_after)
        return out

    out = sim.run(main())
    assert out["t+1"] and out["t+2"] and out["t+2.9"]
    assert not out["t+3.1"]
    assert network.dropped["nat_no_mapping"] == 1
    assert out["after_keepalives"]
    if nat == "symmetric_seq":
        assert out["new_mapping"][1] == out["old_mapping"][1] + 1  # a new binding takes the next port
    elif nat in ("full_cone", "restricted_cone", "port_restricted"):  # port-preserving (EXPECT: EIM)
        assert out["new_mapping"] == out["old_mapping"]  # the preserved port is free again


def test_sequential_ports_count_up_across_sockets_and_hosts() -> None:
    network = sim.SimNetwork(topology.build("symmetric_seq", "public", scenario="multi_agent", agents=2), seed=9)
    lab = Lab(network)

    async def main() -> list[int]:
        await lab.start()
        s1 = await lab.client("agent", 5000)
        s1b = await lab.client("agent", 5001, name="agent-b")
        s2 = await lab.client("agent2", 5000)
        ports = [(await lab.mapped(s1, (A, P1), "agent"))[1], (await lab.mapped(s1, (B, P1), "agent"))[1]]
        ports.append((await lab.mapped(s1, (A, P1), "agent"))[1])  # existing binding: same port
        ports.append((await lab.mapped(s1b, (A, P1), "agent-b"))[1])
        ports.append((await lab.mapped(s2, (A, P2), "agent2"))[1])
        return ports

    assert sim.run(main()) == [40000, 40001, 40000, 40002, 40003]


def test_double_nat_is_seen_from_the_carrier_nat() -> None:
    network = sim.SimNetwork(topology.build("full_cone", "public", scenario="double_nat"), seed=1)
    lab = Lab(network)

    async def main() -> Addr:
        await lab.start()
        s = await lab.client("agent", 5000)
        return await lab.mapped(s, (A, P1), "agent")

    assert sim.run(main()) == ("203.0.113.103", 5000)
    (home,) = network.nat("nat-a").bindings()
    assert home.internal == ("10.1.0.2", 5000) and home.public_port == 5000
    (cgn,) = network.nat("cgnat").bindings()
    assert cgn.internal == ("100.64.0.2", 5000)


# -- the engine alone, with explicit instants -------------------------------------------------


def test_engine_address_dependent_mapping_and_filtering() -> None:
    spec = NatSpec("adm", mapping=Mapping.ADM, filtering=Filtering.ADF, ports=PortAllocation.RANDOM)
    eng = NatEngine(spec, "198.51.100.1", random.Random(1))
    inside = ("10.0.0.2", 7000)
    a = eng.outbound(inside, ("203.0.113.10", 1), 0.0)
    a2 = eng.outbound(inside, ("203.0.113.10", 2), 0.0)
    b = eng.outbound(inside, ("203.0.113.11", 1), 0.0)
    assert a == a2 != b  # same remote IP shares a mapping, another IP gets its own
    assert eng.inbound(("203.0.113.10", 99), a[1], 1.0) == inside  # ADF: any port of a sent-to IP
    assert eng.inbound(("203.0.113.11", 1), a[1], 1.0) is Verdict.FILTERED  # that IP has its own mapping
    assert eng.inbound(("203.0.113.12", 1), 4242, 1.0) is Verdict.NO_MAPPING


def test_engine_permissions_expire_per_remote() -> None:
    eng = NatEngine(preset("restricted_cone").with_timeout(10.0), "198.51.100.1")
    inside = ("10.0.0.2", 7000)
    eng.outbound(inside, ("203.0.113.10", 1), 0.0)
    eng.outbound(inside, ("203.0.113.11", 1), 8.0)  # refreshes the binding, and permits .11 only from t=8
    assert eng.inbound(("203.0.113.11", 5), 7000, 17.0) == inside
    assert eng.inbound(("203.0.113.10", 5), 7000, 12.0) is Verdict.FILTERED  # .10's permission is 12 s old
    assert eng.inbound(("203.0.113.11", 5), 7000, 18.0) is Verdict.NO_MAPPING  # binding gone at t=18


def _tiny_seq(scope: CounterScope = CounterScope.NAT) -> NatSpec:
    return NatSpec("tiny", mapping=Mapping.APDM, filtering=Filtering.APDF, ports=PortAllocation.SEQUENTIAL,
                   sequential_base=50000, sequential_count=8, sequential_scope=scope, binding_timeout=5.0)


def test_engine_sequential_counter_wraps_like_the_kernel() -> None:
    """k-th new binding -> base + k mod 8. After the wrap a port still bound to another remote is
    shared (the kernel's conntrack only needs the 5-tuple unique); towards the same remote the packet
    is dropped and the counter moves on (a failed conntrack insert). Same sequence as the kernel test."""
    eng = NatEngine(_tiny_seq(), "198.51.100.1")
    a, b = ("10.0.0.2", 7000), ("10.0.0.3", 7000)
    remotes = [("203.0.113.10", 3000 + i) for i in range(10)]
    got = [eng.outbound(a, r, 0.0) for r in remotes[:8]]
    assert [p for _, p in got] == [50000, 50001, 50002, 50003, 50004, 50005, 50006, 50007]
    assert eng.outbound(b, remotes[8], 0.0) == ("198.51.100.1", 50000)  # wrapped: 50000 shared with a->r0
    assert eng.inbound(remotes[0], 50000, 1.0) == a
    assert eng.inbound(remotes[8], 50000, 1.0) == b
    assert eng.inbound(remotes[9], 50000, 1.0) is Verdict.FILTERED
    assert eng.outbound(b, remotes[1], 1.0) is Verdict.PORT_CLASH  # 50001 is a->r1's
    assert eng.outbound(b, remotes[1], 1.0) == ("198.51.100.1", 50002)  # the counter moved on
    assert eng.outbound(b, remotes[9], 7.0) == ("198.51.100.1", 50003)  # the counter just counts on
    eng.flush()
    assert eng.bindings() == []
    assert eng.outbound(a, remotes[0], 8.0) == ("198.51.100.1", 50000)  # a reload restarts the counter (P10)


@pytest.mark.parametrize("scope", list(CounterScope))
def test_engine_sequential_counter_scope(scope: CounterScope) -> None:
    # host a, host b, a, a, b: the ports each new binding gets, per counter scope (written out here)
    expected = {
        CounterScope.NAT: [50000, 50001, 50002, 50003, 50004],
        CounterScope.HOST: [50000, 50000, 50001, 50002, 50001],
    }[scope]
    eng = NatEngine(_tiny_seq(scope), "198.51.100.1")
    a, b = ("10.0.0.2", 7000), ("10.0.0.3", 7000)
    order = [(a, 1), (b, 2), (a, 3), (a, 4), (b, 5)]
    got = [eng.outbound(src, ("203.0.113.10", 3000 + i), 0.0) for src, i in order]
    assert [p for _, p in got] == expected


# inbound-only traffic after one outbound packet at t=0, binding timeout 3 s: is the packet at
# t = 1, 2, 2.9, 3.5, 5.5 admitted? (outbound-only: the binding dies at t=3; both: inbound keeps it)
REFRESH_EXPECT = {
    Refresh.OUTBOUND: [True, True, True, False, False],
    Refresh.BOTH: [True, True, True, True, True],
}


@pytest.mark.parametrize("nat", ["full_cone", "port_restricted", "symmetric_seq"])
@pytest.mark.parametrize("refresh", list(Refresh))
def test_engine_refresh_follows_the_spec(nat: str, refresh: Refresh) -> None:
    spec = replace(preset(nat), refresh=refresh, binding_timeout=3.0)
    eng = NatEngine(spec, "198.51.100.1")
    inside, remote = ("10.0.0.2", 7000), ("203.0.113.10", 3478)
    _, port = eng.outbound(inside, remote, 0.0)
    got = [eng.inbound(remote, port, t) == inside for t in (1.0, 2.0, 2.9, 3.5, 5.5)]
    assert got == REFRESH_EXPECT[refresh]


def test_engine_preserved_port_taken_falls_back_to_random_and_public_is_rejected() -> None:
    eng = NatEngine(preset("full_cone"), "198.51.100.1", random.Random(4))
    assert eng.outbound(("10.0.0.2", 7000), ("203.0.113.10", 1), 0.0) == ("198.51.100.1", 7000)
    other = eng.outbound(("10.0.0.3", 7000), ("203.0.113.10", 1), 0.0)
    assert isinstance(other, tuple) and other[1] != 7000
    assert eng.inbound(("203.0.113.99", 1), other[1], 0.5) == ("10.0.0.3", 7000)  # EIF
    with pytest.raises(ValueError, match="not a NAT"):
        NatEngine(preset("public"), "198.51.100.1")


# -- explicit mappings (what a port mapping protocol asks for; the lab's miniupnpd DNAT) ------------


def test_engine_explicit_mapping_admits_anyone_and_answers_from_the_mapped_port() -> None:
    eng = NatEngine(preset("symmetric"), "203.0.113.101", random.Random(1))
    inside, peer, other = ("10.1.0.2", 4434), ("203.0.113.50", 7000), ("203.0.113.51", 7001)
    assert eng.inbound(peer, 4434, 0.0) == Verdict.NO_MAPPING
    assert eng.add_explicit(inside, 4434, 60.0, 0.0) == 4434
    assert eng.add_explicit(("10.1.0.3", 4434), 4434, 60.0, 0.0) is None  # another host's port
    assert eng.inbound(peer, 4434, 1.0) == inside
    assert eng.outbound(inside, peer, 1.5) == ("203.0.113.101", 4434)  # the flow answers from it
    out = eng.outbound(inside, other, 1.5)  # a remote that never came in: the NAT's own mapping
    assert isinstance(out, tuple) and out[1] != 4434
    assert eng.inbound(peer, 4434, 70.0) == Verdict.NO_MAPPING  # the mapping's lifetime ran out
    eng.add_explicit(inside, 4434, 60.0, 80.0)
    eng.remove_explicit(inside, 4434)
    assert eng.inbound(peer, 4434, 81.0) == Verdict.NO_MAPPING
    assert eng.explicit(81.0) == []


def test_engine_explicit_port_is_not_handed_out_and_flows_are_bounded() -> None:
    from qlab.backends.sim import nat as simnat

    eng = NatEngine(preset("full_cone"), "203.0.113.101", random.Random(1))
    eng.add_explicit(("10.1.0.2", 4434), 5000, 600.0, 0.0)
    out = eng.outbound(("10.1.0.3", 5000), ("203.0.113.50", 1), 0.0)  # port preservation must skip it
    assert isinstance(out, tuple) and out[1] != 5000
    for i in range(simnat.MAX_FLOWS + 10):  # a flood of remotes opens at most MAX_FLOWS flows
        eng.inbound((f"198.51.100.{1 + i // 60000}", 1024 + i % 60000), 5000, 1.0)
    assert len(eng._flows) <= simnat.MAX_FLOWS


def test_engine_explicit_flow_to_a_remote_already_reached_gets_an_alias_like_the_kernel() -> None:
    """The inside endpoint sent to the remote first (its own flow, port P); the remote then reaches
    the explicit port: the kernel's DNAT flow would clash with the first, so the remote is seen
    inside under another port and both flows keep their public ports (measured in the lab)."""
    eng = NatEngine(preset("symmetric"), "203.0.113.101", random.Random(3))
    inside, peer = ("10.1.0.2", 4434), ("203.0.113.50", 7000)
    eng.add_explicit(inside, 4434, 60.0, 0.0)
    own = eng.outbound_to(inside, peer, 0.0)
    assert isinstance(own, tuple) and own[0][1] != 4434 and own[1] == peer
    res = eng.inbound_from(peer, 4434, 0.1)
    assert isinstance(res, tuple) and res[0] == inside and res[1][0] == peer[0] and res[1] != peer
    alias = res[1]
    assert eng.outbound_to(inside, alias, 0.2) == (("203.0.113.101", 4434), peer)  # the DNAT flow
    assert eng.outbound_to(inside, peer, 0.2) == own  # the older flow keeps its port
    assert eng.inbound_from(peer, 4434, 0.3) == (inside, alias)  # the same alias while the flow lives
    assert eng.inbound_from(peer, own[0][1], 0.3) == (inside, peer)  # through its own flow: the real one
