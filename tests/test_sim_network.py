"""The virtual network: links deliver exactly the profile's delay, loss and rate; every scenario
routes; sockets behave like kernel UDP sockets; fault hooks work; one seed fixes a run; aioquic
completes a handshake over it in virtual time; nothing needs a namespace, a privilege or a socket."""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import socket
import statistics
import subprocess
import time

import pytest

from qlab.backends import sim
from qlab.scenario import topology
from qlab.scenario.linkmodel import LinkModel
from qlab.scenario.profiles import LinkProfile, profile

Addr = tuple[str, int]
A, B = topology.INTERMEDIATE_IPS
RELAY = (A, 4433)


async def echo_server(net: sim.SimNet, host: str, port: int) -> sim.SimSocket:
    sock: sim.SimSocket | None = None

    def on(batch: list[tuple[bytes, Addr]]) -> None:
        for data, src in batch:
            assert sock is not None
            sock.sendto(data, src)

    sock = await net.bind_udp(host, port, on)
    return sock


class Pinger:
    """Sends numbered probes and records each echo's round-trip time (virtual seconds)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.sent: dict[bytes, float] = {}
        self.rtts: list[float] = []
        self.sources: list[Addr] = []
        self.sock: sim.SimSocket | None = None

    async def open(self, net: sim.SimNet, port: int = 0) -> Pinger:
        self.sock = await net.bind_udp("0.0.0.0", port, self._on)
        return self

    def _on(self, batch: list[tuple[bytes, Addr]]) -> None:
        for data, src in batch:
            if data in self.sent:
                self.rtts.append(self.loop.time() - self.sent.pop(data))
                self.sources.append(src)

    async def ping(self, dst: Addr, n: int, interval: float = 0.002, wait: float = 1.0) -> list[float]:
        assert self.sock is not None
        for i in range(n):
            data = f"ping {i} {self.loop.time()}".encode()
            self.sent[data] = self.loop.time()
            self.sock.sendto(data, dst)
            await asyncio.sleep(interval)
        await asyncio.sleep(wait)
        return self.rtts


async def start_relay(network: sim.SimNetwork) -> None:
    """A toy relay on the Intermediate: the first two sources to register are paired."""
    peers: list[Addr] = []
    sock: sim.SimSocket | None = None

    def on(batch: list[tuple[bytes, Addr]]) -> None:
        for data, src in batch:
            if data == b"register":
                if src not in peers:
                    peers.append(src)
            elif src in peers and len(peers) == 2:
                assert sock is not None
                sock.sendto(data, peers[1 - peers.index(src)])

    sock = await network.net("intermediate").bind_udp(A, 4433, on)


def _relay_and_direct_rtts(network: sim.SimNetwork, n: int, interval: float = 0.002) -> tuple[list[float], list[float]]:
    """n echoes Agent -> Intermediate's toy relay -> Connector, then n straight to the Connector's site,
    one every `interval` s."""
    connector_nat = network.topology.connector_nat

    async def main() -> tuple[list[float], list[float]]:
        await start_relay(network)
        conn = await echo_server(network.net("connector"), "0.0.0.0", 4434)
        conn.sendto(b"register", RELAY)
        agent = await Pinger().open(network.net("agent"), 5000)
        agent.sock.sendto(b"register", RELAY)  # type: ignore[union-attr]
        await asyncio.sleep(1)
        relay = await agent.ping(RELAY, n, interval)
        agent.rtts = []
        connector_public = (network.topology.router("nat-c").wan_ip if connector_nat != "public"
                            else network.topology.host("connector").ip, 4434)
        direct = await agent.ping(connector_public, n, interval)
        return relay, direct

    return sim.run(main())


@pytest.mark.parametrize("prof", ["wan-20ms", "lan"])
@pytest.mark.parametrize("nats", [("public", "public"), ("full_cone", "full_cone")])
def test_direct_and_relay_rtt_match_the_profile_exactly(prof: str, nats: tuple[str, str]) -> None:
    """Without jitter every round trip is the configured one, to 1e-9 s."""
    p = profile(prof)
    relay, direct = _relay_and_direct_rtts(sim.SimNetwork(topology.build(*nats, profile_name=prof), seed=1), 20)
    assert len(relay) == len(direct) == 20
    assert relay == pytest.approx([p.relay_rtt_ms / 1000] * 20, abs=1e-9)
    assert direct == pytest.approx([p.direct_rtt_ms / 1000] * 20, abs=1e-9)


@pytest.mark.parametrize("prof", ["home-broadband", "mobile-lte", "intercontinental"])
def test_real_path_profiles_spread_rtt_around_their_base(prof: str) -> None:
    """The named real-path profiles jitter: their RTT CDFs are no vertical lines (p50 to p95 at
    least 3 ms), and `direct_rtt_ms` / `relay_rtt_ms`, the base delays, stay their mean within 3 %
    (pareto jitter is skewed, its mean a little below 0). One echo every 20 ms, as trials send them:
    packets of an in-order link wait for the one ahead, which lifts the mean of a denser stream."""
    p = profile(prof)
    network = sim.SimNetwork(topology.build("full_cone", "full_cone", profile_name=prof), seed=2)
    relay, direct = _relay_and_direct_rtts(network, 400, interval=0.02)
    assert len(relay) == len(direct) == 400  # no loss in these profiles
    for rtts, base in ((relay, p.relay_rtt_ms), (direct, p.direct_rtt_ms)):
        ms = sorted(r * 1000 for r in rtts)
        assert statistics.mean(ms) == pytest.approx(base, rel=0.03)
        assert ms[int(0.95 * 399)] - ms[200] >= 3.0, (ms[200], ms[int(0.95 * 399)])


def test_loss_rate_is_statistically_right() -> None:
    network = sim.SimNetwork(topology.build("public", "public", profile_name="lossy-2pct"), seed=7)
    n = 4000

    async def main() -> tuple[int, int]:
        server = await echo_server(network.net("intermediate"), A, 7)
        pinger = await Pinger().open(network.net("agent"))
        got = len(await pinger.ping((A, 7), n, interval=0.0005))
        return server.received, got

    at_server, got = sim.run(main())
    for count, expected in ((at_server, 0.98 ** 2), (got, 0.98 ** 4)):  # each link crossed once / twice each way
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(count / n - expected) < 4 * sigma
    assert network.counters["sent"] == n + at_server  # every request, and an echo for each that arrived
    assert network.counters["sent"] - network.counters["delivered"] == network.dropped["loss"]
    assert network.dropped.keys() == {"loss"}


def test_jitter_spreads_rtt_around_the_configured_delay() -> None:
    network = sim.SimNetwork(topology.build("public", "public", profile_name="jittery"), seed=3)

    async def main() -> list[float]:
        await echo_server(network.net("connector"), "0.0.0.0", 7)
        pinger = await Pinger().open(network.net("agent"))
        return await pinger.ping((network.topology.host("connector").ip, 7), 1000, interval=0.001)

    rtts = [r * 1000 for r in sim.run(main())]
    assert len(rtts) == 1000
    assert all(12.0 - 1e-9 <= r <= 28.0 + 1e-9 for r in rtts)  # 20 ms +- 4 wires x 2 ms
    assert statistics.mean(rtts) == pytest.approx(20.0, abs=0.3)
    assert statistics.pstdev(rtts) > 1.0


async def _one_way(network: sim.SimNetwork, n: int, interval: float = 0.001) -> list[tuple[int, float]]:
    """(index, one-way delay in s) of n datagrams the Agent sends the Intermediate, in arrival order."""
    loop = asyncio.get_running_loop()
    sent: dict[bytes, float] = {}
    got: list[tuple[int, float]] = []
    await network.net("intermediate").bind_udp(A, 9, lambda b: got.extend(
        (int(d), loop.time() - sent[d]) for d, _ in b))
    s = await network.net("agent").bind_udp("0.0.0.0", 0, lambda b: None)
    for i in range(n):
        sent[b"%d" % i] = loop.time()
        s.sendto(b"%d" % i, (A, 9))
        await asyncio.sleep(interval)
    await asyncio.sleep(1)
    return got


def test_each_packet_is_delayed_as_the_link_model_says() -> None:
    """A normal jitter on the Agent's link: every datagram's one-way delay is exactly what a model of
    the same profile on the wire's own random stream draws, so the arrivals spread around the base
    delay, past +-1 jitter about a third of the time (a uniform jitter never goes past it)."""
    link = LinkProfile(delay_ms=20, jitter_ms=4, jitter_distribution="normal")
    network = sim.SimNetwork(topology.build("public", "public"), seed=5)
    network.set_link("agent", link)
    wire = network.hosts["agent"].iface.up
    twin = LinkModel(link, network._rng("wire", wire.name))
    got = sorted(sim.run(_one_way(network, 2000)))
    assert [d for _, d in got] == pytest.approx([twin.delay() for _ in range(2000)], abs=1e-9)
    ms = [d * 1000 for _, d in got]
    assert statistics.mean(ms) == pytest.approx(20.0, abs=5 * 4 / 2000 ** 0.5)
    assert statistics.pstdev(ms) == pytest.approx(4.0, rel=0.1)
    assert 0.25 < sum(abs(x - 20) > 4 for x in ms) / len(ms) < 0.4


def test_reordered_packets_skip_the_delay_and_the_rest_keep_their_order() -> None:
    network = sim.SimNetwork(topology.build("public", "public"), seed=4)
    network.set_link("agent", LinkProfile(delay_ms=10, reorder=0.2))
    got = sim.run(_one_way(network, 500))
    assert len(got) == 500
    skipped = [i for i, d in got if d == pytest.approx(0.0, abs=1e-9)]
    delayed = [i for i, d in got if d == pytest.approx(0.010, abs=1e-9)]
    assert len(skipped) + len(delayed) == 500  # the whole delay or none of it, as netem's reorder
    assert abs(len(skipped) / 500 - 0.2) < 5 * (0.2 * 0.8 / 500) ** 0.5
    assert delayed == sorted(delayed)  # no jitter: the delayed ones stay in FIFO order ...
    assert [i for i, _ in got] != sorted(i for i, _ in got)  # ... and the skipped ones overtake them


def test_rate_limit_serializes_and_tail_drops() -> None:
    network = sim.SimNetwork(topology.build("public", "public"), seed=1, queue_limit=4)
    network.set_link("agent", LinkProfile(rate_mbit=1.0))

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        await network.net("intermediate").bind_udp(A, 9, lambda b: arrivals.extend(loop.time() for _ in b))
        s = await network.net("agent").bind_udp("0.0.0.0", 0, lambda b: None)
        for _ in range(6):
            s.sendto(b"x" * (1250 - 28), (A, 9))  # 1250 bytes on the wire = 10 ms at 1 Mbit/s
        await asyncio.sleep(1)
        return arrivals

    assert sim.run(main()) == pytest.approx([0.010, 0.020, 0.030, 0.040], abs=1e-9)
    assert network.dropped == {"queue": 2}



def _rated_trace() -> tuple[list[tuple[float, str, int]], dict[str, int]]:
    """Four bursts of 7 packets, 25 ms apart, over a lossy, jittery, reordering 2 Mbit/s link with a
    queue of 4: (time, event, payload size) of every drop and delivery, and the drops per reason."""
    network = sim.SimNetwork(topology.build("public", "public"), seed=7, queue_limit=4)
    network.set_link("agent", LinkProfile(4.0, 1.5, 0.1, 2.0, "normal", 0.25, 0.05))
    got: list[tuple[float, str, int]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        network.trace = lambda ev, node, pkt: None if ev == "send" else got.append((loop.time(), ev, len(pkt.data)))
        await network.net("intermediate").bind_udp(A, 9, lambda b: None)
        s = await network.net("agent").bind_udp("0.0.0.0", 5000, lambda b: None)
        for _ in range(4):
            for i in range(7):
                s.sendto(bytes(200 + 150 * i), (A, 9))
            await asyncio.sleep(0.025)
        await asyncio.sleep(1)

    sim.run(main())
    return got, network.dropped


def test_a_rate_limited_links_seeded_trace_is_pinned() -> None:
    """Every float as the wire's inline rate queue gave it before the queue moved into
    `qlab.scenario.linkmodel.RateQueue` (captured at commit 579ea1c): loss first (a lost packet takes
    no place in the queue), then the queue of 4 (the rest of each burst dropped), then the jitter."""
    got, dropped = _rated_trace()
    drops = {0.0: ["loss", "queue", "queue"], 0.025: ["queue", "loss", "loss"],
             0.05: ["loss", "queue", "queue"], 0.07500000000000001: ["queue", "queue", "queue"]}
    assert [(t, ev) for t, ev, _ in got if ev != "deliver"] == [
        (t, f"drop:{why}") for t, whys in drops.items() for why in whys]
    assert [(t, size) for t, ev, size in got if ev == "deliver"] == [
        (0.004613658107804433, 200), (0.006553663113609216, 350), (0.008661276176921568, 650),
        (0.013111815126618217, 800), (0.030817247706557575, 200), (0.031245666811098194, 350),
        (0.032040511349644744, 500), (0.035311452580452235, 650), (0.05342450764851359, 200),
        (0.05625851774269408, 350), (0.05904431242170843, 500), (0.060883827937947214, 650),
        (0.07975448651280745, 200), (0.08164616791349315, 350), (0.08384634435734999, 500),
        (0.08627844520062629, 650)]
    assert dropped == {"loss": 4, "queue": 8}


@pytest.mark.parametrize(
    "scenario,nats,kw",
    [
        ("pair", ("port_restricted", "symmetric"), {}),
        ("pair", ("public", "symmetric_seq"), {}),
        ("same_lan", ("restricted_cone", "restricted_cone"), {}),
        ("double_nat", ("symmetric", "full_cone"), {"carrier_nat": "port_restricted"}),
        ("multi_agent", ("full_cone", "public"), {"agents": 3}),
    ],
)
def test_every_scenario_routes_to_both_intermediate_addresses(scenario: str, nats: tuple[str, str], kw: dict) -> None:
    topo = topology.build(*nats, scenario=scenario, profile_name="wan-20ms", **kw)
    network = sim.SimNetwork(topo, seed=1)
    clients = [h.name for h in topo.hosts if h.name != "intermediate"]

    async def main() -> dict[str, int]:
        for ip in (A, B):
            await echo_server(network.net("intermediate"), ip, 4433)
        got = {}
        for name in clients:
            pinger = await Pinger().open(network.net(name))
            await pinger.ping((A, 4433), 2, wait=0.2)
            got[name] = len(await pinger.ping((B, 4433), 2, wait=0.2))
            assert {src for src in pinger.sources} == {(A, 4433), (B, 4433)}
        return got

    assert sim.run(main()) == dict.fromkeys(clients, 4)
    assert network.dropped == {}


def test_same_lan_hosts_talk_directly_with_lan_addresses() -> None:
    network = sim.SimNetwork(topology.build("symmetric", "symmetric", scenario="same_lan", profile_name="wan-20ms"))
    conn_ip = network.topology.host("connector").ip

    async def main() -> tuple[list[float], list[Addr]]:
        await echo_server(network.net("connector"), "0.0.0.0", 4434)
        pinger = await Pinger().open(network.net("agent"), 5000)
        return await pinger.ping((conn_ip, 4434), 3), pinger.sources

    rtts, sources = sim.run(main())
    assert rtts == [0.0, 0.0, 0.0]  # the LAN is ideal; the WAN profile only applies to the NAT's uplink
    assert sources == [(conn_ip, 4434)] * 3
    assert network.nat("nat-a").bindings() == []  # never crossed the NAT


def test_blackhole_and_unblock() -> None:
    network = sim.SimNetwork(topology.build("full_cone", "public", profile_name="wan-20ms"))

    async def main() -> list[int]:
        for ip in (A, B):
            for port in (4433, 4434):
                await echo_server(network.net("intermediate"), ip, port)
        pinger = await Pinger().open(network.net("agent"))
        counts = []
        network.block("nat-a", A)
        counts += [len(await pinger.ping((A, 4433), 3, wait=0.2)), len(await pinger.ping((B, 4433), 3, wait=0.2))]
        network.unblock("nat-a", A)
        network.block("nat-a", A, 4434)
        pinger.rtts = []
        counts += [len(await pinger.ping((A, 4433), 3, wait=0.2)), len(await pinger.ping((A, 4434), 3, wait=0.2))]
        network.unblock("nat-a")
        pinger.rtts = []
        counts.append(len(await pinger.ping((A, 4434), 3, wait=0.2)))
        return counts

    assert sim.run(main()) == [0, 3, 3, 3, 3]  # cumulative per phase: A blocked; A:4434 blocked; none
    assert network.dropped == {"blocked": 6}


def test_blackhole_on_a_host_without_nat() -> None:
    network = sim.SimNetwork(topology.build("public", "public"))

    async def main() -> int:
        await echo_server(network.net("intermediate"), A, 4433)
        pinger = await Pinger().open(network.net("agent"))
        network.block("intermediate", network.topology.host("agent").ip)
        return len(await pinger.ping((A, 4433), 3))

    assert sim.run(main()) == 0
    assert network.dropped == {"blocked": 3}


def test_flush_nat_forces_a_new_mapping() -> None:
    network = sim.SimNetwork(topology.build("symmetric", "public"), seed=11)

    async def main() -> tuple[list[Addr], int]:
        await echo_server(network.net("intermediate"), A, 4433)
        pinger = await Pinger().open(network.net("agent"), 5000)
        await pinger.ping((A, 4433), 1, wait=0.1)
        before = network.nat("nat-a").bindings()[0].public_port
        network.flush_nat("nat-a")
        replies = []
        await network.net("intermediate").bind_udp(B, 1, lambda b: None)
        # the server's next packet to the old mapping is dropped: the NAT forgot it
        probe = await network.net("intermediate").bind_udp(A, 4434, replies.extend)
        probe.sendto(b"late", ("203.0.113.101", before))
        await pinger.ping((A, 4433), 1, wait=0.1)
        return pinger.sources, before

    sources, before = sim.run(main())
    assert len(sources) == 2
    assert network.dropped == {"nat_no_mapping": 1}
    (after,) = network.nat("nat-a").bindings()
    assert after.public_port != before


def test_sockets_behave_like_kernel_udp_sockets() -> None:
    network = sim.SimNetwork(topology.build("full_cone", "public"), seed=5)

    async def main() -> None:
        inter, agent = network.net("intermediate"), network.net("agent")
        assert inter.host_addresses() == ["203.0.113.10", "203.0.113.11"]
        assert agent.host_addresses() == ["10.1.0.2"]
        assert network.addresses("agent") == ["10.1.0.2"]
        s = await inter.bind_udp(A, 4433, lambda b: None)
        assert s.local_address == (A, 4433)
        await inter.bind_udp(B, 4433, lambda b: None)  # same port, other address: fine
        with pytest.raises(OSError) as e:
            await inter.bind_udp(A, 4433, lambda b: None)
        assert e.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as e:
            await inter.bind_udp("0.0.0.0", 4433, lambda b: None)  # wildcard clashes with a specific bind
        assert e.value.errno == errno.EADDRINUSE
        with pytest.raises(OSError) as e:
            await agent.bind_udp("10.9.9.9", 1, lambda b: None)
        assert e.value.errno == errno.EADDRNOTAVAIL
        eph = await agent.bind_udp("0.0.0.0", 0, lambda b: None)
        assert eph.local_address[0] == "0.0.0.0" and 32768 <= eph.local_address[1] <= 60999
        eph.close()
        again = await agent.bind_udp("0.0.0.0", eph.local_address[1], lambda b: None)  # close frees the port
        again.close()

        # the second address sends from itself; a burst arriving at one instant is one batch
        batches: list[list[tuple[bytes, Addr]]] = []
        rx = await agent.bind_udp("0.0.0.0", 6000, batches.append)
        s11 = await inter.bind_udp(B, 5555, lambda b: None)
        rx.sendto(b"open", (B, 5555))
        await asyncio.sleep(0.01)
        for i in range(10):
            s11.sendto(b"%d" % i, ("203.0.113.101", 6000))
        await asyncio.sleep(0.01)
        assert [len(b) for b in batches] == [10]
        assert [d for d, _ in batches[0]] == [b"%d" % i for i in range(10)]  # FIFO
        assert {src for _, src in batches[0]} == {(B, 5555)}

        # loopback to the host's own address; closed sockets neither send nor receive
        self_rx: list = []
        me = await agent.bind_udp("10.1.0.2", 7000, self_rx.extend)
        me.sendto(b"self", ("10.1.0.2", 7000))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert self_rx == [(b"self", ("10.1.0.2", 7000))]
        rx.close()
        rx.sendto(b"nothing", (B, 5555))
        s11.sendto(b"late", ("203.0.113.101", 6000))
        await asyncio.sleep(0.01)
        assert sum(len(b) for b in batches) == 10

    sim.run(main())
    assert network.dropped == {"no_socket": 1}


def test_simnet_implements_the_net_interface() -> None:
    from qlab import net as qnet

    for name in ("bind_udp", "host_addresses"):
        ours, theirs = inspect.signature(getattr(sim.SimNet, name)), inspect.signature(getattr(qnet.Net, name))
        assert list(ours.parameters) == list(theirs.parameters)
    assert inspect.iscoroutinefunction(sim.SimNet.bind_udp)
    for name in ("sendto", "close"):
        assert list(inspect.signature(getattr(sim.SimSocket, name)).parameters) == \
            list(inspect.signature(getattr(qnet.DatagramSocket, name)).parameters)
    assert isinstance(sim.SimSocket.local_address, property)


def _trace_run(seed: int) -> tuple[list[tuple], list[int]]:
    network = sim.SimNetwork(topology.build("symmetric", "symmetric_seq", profile_name="lossy-2pct"), seed=seed)
    network.set_link("agent", LinkProfile(delay_ms=5, jitter_ms=3, loss=0.05))
    events: list[tuple] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        network.trace = lambda ev, node, pkt: events.append((round(loop.time(), 9), ev, node, pkt.src, pkt.dst))
        for ip in (A, B):
            await echo_server(network.net("intermediate"), ip, 4433)
        a = await Pinger().open(network.net("agent"))
        c = await Pinger().open(network.net("connector"), 4434)
        await asyncio.gather(a.ping((A, 4433), 50), a.ping((B, 4433), 50), c.ping((A, 4433), 50))

    sim.run(main())
    return events, sorted(b.public_port for b in network.nat("nat-a").bindings())


def test_same_seed_same_run_other_seed_other_ports() -> None:
    ev1, ports1 = _trace_run(1)
    ev2, ports2 = _trace_run(1)
    ev3, ports3 = _trace_run(2)
    assert len(ev1) > 300
    assert ev1 == ev2 and ports1 == ports2
    assert ports1 != ports3 and ev1 != ev3


def test_runs_without_namespace_privilege_or_real_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything a trial needs happens in this process, in memory: make every way out fail."""

    def forbidden(*a, **k):
        raise AssertionError("the simulator must not touch real sockets, processes or namespaces")

    network = sim.SimNetwork(topology.build("port_restricted", "full_cone", profile_name="wan-20ms"), seed=1)

    async def main() -> list[float]:
        monkeypatch.setattr(socket, "socket", forbidden)
        monkeypatch.setattr(socket, "socketpair", forbidden)
        monkeypatch.setattr(subprocess, "Popen", forbidden)
        for name in ("setns", "unshare"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, forbidden)
        await start_relay(network)
        conn = await echo_server(network.net("connector"), "0.0.0.0", 4434)
        conn.sendto(b"register", RELAY)
        agent = await Pinger().open(network.net("agent"), 5000)
        agent.sock.sendto(b"register", RELAY)  # type: ignore[union-attr]
        await asyncio.sleep(0.5)
        return await agent.ping(RELAY, 5)

    assert sim.run(main()) == pytest.approx([0.060] * 5, abs=1e-9)


# -- aioquic on the virtual loop --------------------------------------------------------------


def _self_signed(tmp_path) -> tuple[str, str]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sim.qlab")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("sim.qlab")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class QuicPeer:
    """A minimal sans-IO driver: feed datagrams with now=loop.time(), transmit, re-arm the timer."""

    def __init__(self, sock_net: sim.SimNet, make_conn) -> None:
        self.net = sock_net
        self.make_conn = make_conn
        self.conn = None
        self.sock: sim.SimSocket | None = None
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.events: list[tuple[float, object]] = []
        self.changed = asyncio.Event()

    async def open(self, host: str, port: int) -> QuicPeer:
        self.sock = await self.net.bind_udp(host, port, self._on)
        return self

    def _on(self, batch: list[tuple[bytes, Addr]]) -> None:
        for data, src in batch:
            if self.conn is None:
                self.conn = self.make_conn(data)
            self.conn.receive_datagram(data, src, now=self.loop.time())
        self.transmit()

    def transmit(self) -> None:
        assert self.conn is not None and self.sock is not None
        now = self.loop.time()
        for data, addr in self.conn.datagrams_to_send(now=now):
            self.sock.sendto(data, addr)
        while (ev := self.conn.next_event()) is not None:
            self.events.append((now, ev))
            self.changed.set()
        if self.timer is not None:
            self.timer.cancel()
        at = self.conn.get_timer()
        self.timer = self.loop.call_at(at, self._on_timer) if at is not None else None

    def _on_timer(self) -> None:
        self.timer = None
        self.conn.handle_timer(now=self.loop.time())
        self.transmit()

    async def wait_for(self, kind: type) -> tuple[float, object]:
        while True:
            for t, ev in self.events:
                if isinstance(ev, kind):
                    return t, ev
            self.changed.clear()
            await self.changed.wait()


def test_aioquic_handshake_and_stream_in_virtual_time(tmp_path) -> None:
    from aioquic.buffer import Buffer
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.events import HandshakeCompleted, StreamDataReceived
    from aioquic.quic.packet import pull_quic_header

    cert, key = _self_signed(tmp_path)
    network = sim.SimNetwork(topology.build("public", "public", profile_name="wan-20ms"), seed=1)
    server_ip = network.topology.host("connector").ip

    def server_conn(first: bytes) -> QuicConnection:
        cfg = QuicConfiguration(is_client=False, alpn_protocols=["qlab/1"])
        cfg.load_cert_chain(cert, key)
        header = pull_quic_header(Buffer(data=first), host_cid_length=8)
        return QuicConnection(configuration=cfg, original_destination_connection_id=header.destination_cid)

    async def main() -> dict[str, float | str | bytes]:
        loop = asyncio.get_running_loop()
        server = await QuicPeer(network.net("connector"), server_conn).open("0.0.0.0", 4434)
        cfg = QuicConfiguration(is_client=True, alpn_protocols=["qlab/1"], server_name="sim.qlab")
        cfg.load_verify_locations(cert)
        client = await QuicPeer(network.net("agent"), None).open("0.0.0.0", 0)
        client.conn = QuicConnection(configuration=cfg)
        t0 = loop.time()
        client.conn.connect((server_ip, 4434), now=t0)
        client.transmit()
        t_client, hs = await asyncio.wait_for(client.wait_for(HandshakeCompleted), 5)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_stream_data(sid, b"hello over sim", end_stream=True)
        client.transmit()
        t_server, _ = await asyncio.wait_for(server.wait_for(HandshakeCompleted), 5)
        t_data, data_ev = await asyncio.wait_for(server.wait_for(StreamDataReceived), 5)
        return {"client": t_client - t0, "server": t_server - t0, "data": t_data - t_client,
                "alpn": hs.alpn_protocol, "payload": data_ev.data}

    wall = time.perf_counter()
    out = sim.run(main())
    assert time.perf_counter() - wall < 5.0
    rtt = profile("wan-20ms").direct_rtt_ms / 1000
    assert out["alpn"] == "qlab/1"
    assert out["client"] == pytest.approx(rtt, abs=1e-9)  # 1-RTT handshake: exactly one round trip
    assert out["server"] == pytest.approx(1.5 * rtt, abs=1e-9)  # the client's Finished arrives half an RTT later
    assert out["data"] == pytest.approx(rtt / 2, abs=1e-9)
    assert out["payload"] == b"hello over sim"
