"""The kernel NAT lab: every preset's behaviour at the packet level, hairpinning, binding timeouts,
link-profile RTTs, scenarios, and teardown that leaves nothing behind."""

from __future__ import annotations

import os
import re
import select
import socket
import struct
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from qlab.backends.netns.icmp import ping
from qlab.backends.netns.lab import Lab, _run, lab_namespaces, netem_args
from qlab.backends.netns.labcheck import expected_rtt_ms, measure, probe_paths
from qlab.nat.nftables import render
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
from qlab.scenario.profiles import JITTER_DISTRIBUTIONS, PROFILES, LinkProfile
from qlab.scenario.topology import Topology, build

NATTED = [p for p in PRESET_NAMES if p != "public"]
I1, I2 = "203.0.113.10", "203.0.113.11"


def recv(sock: socket.socket, timeout: float = 0.5) -> tuple[bytes, tuple] | None:
    r, _, _ = select.select([sock], [], [], timeout)
    return sock.recvfrom(2048) if r else None


def observed(lab: Lab, inside: socket.socket, servers: dict, target: tuple) -> tuple[str, int]:
    """Send from `inside` to the server socket at `target`; return the source it saw."""
    inside.sendto(b"map", target)
    got = recv(servers[target], 2.0)
    assert got is not None, f"nothing reached {target}"
    return got[1]


def servers_for(lab: Lab) -> dict:
    out = {}
    for ip in (I1, I2):
        for port in (3478, 3479):
            s = lab.socket("intermediate")
            s.bind((ip, port))
            out[(ip, port)] = s
    return out


# --- rendering ---------------------------------------------------------------------------------


def test_rendering_is_deterministic_and_expresses_each_preset():
    args = dict(wan_if="wan", lan_if="lan", wan_ip="203.0.113.101", lan_cidr="10.1.0.0/24")
    texts = {n: render(preset(n), **args) for n in NATTED}
    assert all(render(preset(n), **args) == t for n, t in texts.items())
    assert "@permit_a dnat" not in texts["full_cone"] and "@permit_ap" in texts["port_restricted"]
    assert "udp dport . ip saddr @permit_a dnat" in texts["restricted_cone"]
    assert "udp dport . ip saddr . udp sport @permit_ap dnat" in texts["port_restricted"]
    assert "masquerade random" in texts["symmetric"] and "@emap" not in texts["symmetric"]
    assert "numgen inc mod 1000 map @seq" in texts["symmetric_seq"] and "999 : 40999" in texts["symmetric_seq"]
    for t in texts.values():
        assert "chain input_f" in t and "policy drop" in t  # pitfall P1
        assert "flush ruleset" not in t  # replaces only its own table
    assert "timeout 120s" in texts["full_cone"]
    assert "timeout 7s" in render(preset("full_cone").with_timeout(7), **args)
    with pytest.raises(ValueError, match="ADM"):
        render(NatSpec("adm", mapping=Mapping.ADM), **args)
    for t in texts.values():  # refused inbound is dropped before conntrack; presets refresh outbound only
        assert "priority raw" in t and "chain track_in" not in t and "refreshed by outbound packets" in t
    both = render(replace(preset("port_restricted"), refresh=Refresh.BOTH), **args)
    assert "chain track_in" in both and "update @emap { ct reply proto-dst : ip daddr . udp dport }" in both
    assert "update @flows { udp dport . ip saddr . udp sport }" in render(
        replace(preset("symmetric"), refresh=Refresh.BOTH), **args)
    per_host = replace(preset("symmetric_seq"), sequential_scope=CounterScope.HOST)
    assert render(per_host, **args).count("numgen inc mod 1000 map @seq") == 254  # one counter per address
    assert texts["symmetric_seq"].count("numgen inc mod 1000 map @seq") == 1
    with pytest.raises(ValueError, match="per-host"):
        render(per_host, **{**args, "lan_cidr": "10.0.0.0/16"})
    with pytest.raises(ValueError, match="hairpinning"):
        render(replace(preset("symmetric"), hairpinning=True), **args)
    with pytest.raises(ValueError):
        render(preset("public"), **args)


# --- behaviour in the kernel ----------------------------------------------------------------------


# mapping per preset (docs/netns-lab.md), written out independently of the spec
MAPPING = {"full_cone": "EIM", "restricted_cone": "EIM", "port_restricted": "EIM", "symmetric": "APDM",
           "symmetric_seq": "APDM"}


@pytest.mark.parametrize("nat", NATTED)
def test_preset_mapping_and_filtering_in_the_kernel(netns_ok, nat):
    with Lab(build(nat, "public")) as lab:
        servers = servers_for(lab)
        inside = lab.socket("agent")
        inside.bind(("0.0.0.0", 5000))
        # mapping: one socket towards three destinations
        m = [observed(lab, inside, servers, t) for t in ((I1, 3478), (I2, 3478), (I1, 3479))]
        assert {a[0] for a in m} == {"203.0.113.101"}
        ports = [a[1] for a in m]
        if MAPPING[nat] == "EIM":
            assert ports == [5000, 5000, 5000], ports  # endpoint-independent, port preserved
        elif nat == "symmetric_seq":
            assert len(set(ports)) == 3 and ports[1] - ports[0] == 1 and ports[2] - ports[1] == 1, ports
        else:
            assert len(set(ports)) == 3, ports  # a new random port per destination
        # filtering: fresh state, the inside host has sent to (I1, 3478) only
        lab.reset_nat()
        mapped = observed(lab, inside, servers, (I1, 3478))
        admitted = {}
        for src in ((I1, 3478), (I1, 3479), (I2, 3478)):
            servers[src].sendto(b"in", mapped)
            admitted[src] = recv(inside, 0.4) is not None
        expect = {
            "full_cone": (True, True, True), "restricted_cone": (True, True, False),
            "port_restricted": (True, False, False), "symmetric": (True, False, False),
            "symmetric_seq": (True, False, False),
        }[nat]
        assert tuple(admitted.values()) == expect, admitted


# hairpinning per preset (docs/netns-lab.md), written out independently of the spec
HAIRPIN = {"full_cone": True, "restricted_cone": True, "port_restricted": True, "symmetric": False,
           "symmetric_seq": False}


def with_nat(topo: Topology, spec: NatSpec, router: str = "nat-a") -> Topology:
    """`topo` with `router` running `spec` instead of its preset."""
    return replace(topo, routers=tuple(replace(r, nat=spec) if r.name == router else r for r in topo.routers))


@pytest.mark.parametrize("nat", NATTED)
def test_hairpinning(netns_ok, nat):
    """Two hosts of one LAN, and two sockets of one host (what `qlab classify` tests), each reaching
    the other's public mapping, seen from the sender's public address."""
    with Lab(build(nat, "public", scenario="multi_agent", agents=2)) as lab:
        servers = servers_for(lab)
        a, b, a2 = lab.socket("agent"), lab.socket("agent2"), lab.socket("agent")
        a.bind(("0.0.0.0", 5000))
        b.bind(("0.0.0.0", 6000))
        a2.bind(("0.0.0.0", 7000))
        ma = observed(lab, a, servers, (I1, 3478))
        mb = observed(lab, b, servers, (I1, 3478))
        for _ in range(3):  # both sides send, as in a punch
            a.sendto(b"a", mb)
            b.sendto(b"b", ma)
        got = recv(b, 0.5)
        for _ in range(3):  # a second socket of the same host, with no mapping of its own yet
            a2.sendto(b"self", ma)
        own = None
        while (m := recv(a, 0.5)) is not None and own is None:
            own = m if m[0] == b"self" else None
        if HAIRPIN[nat]:
            assert got is not None and got[1] == ma, got  # the peer sees the public mapping
            assert own is not None and own[1][0] == ma[0], own  # the same host too
        else:
            assert got is None and own is None, (got, own)


# inbound-only traffic after one outbound packet, binding timeout 2 s: admitted well inside the
# timeout, and after 3 s? (outbound-only: the binding is gone; both: the inbound packets kept it)
REFRESH_EXPECT = {Refresh.OUTBOUND: (True, False), Refresh.BOTH: (True, True)}


@pytest.mark.parametrize("pair", [("port_restricted", "symmetric_seq"), ("full_cone", "restricted_cone")])
@pytest.mark.parametrize("refresh", list(Refresh))
def test_refresh_follows_the_spec(netns_ok, pair, refresh):
    topo = build(*pair)
    for router, nat in zip(("nat-a", "nat-c"), pair, strict=True):
        topo = with_nat(topo, replace(preset(nat), refresh=refresh, binding_timeout=2), router)
    with Lab(topo) as lab:
        servers = servers_for(lab)
        srv = servers[(I1, 3478)]
        inside = {h: lab.socket(h) for h in ("agent", "connector")}
        mapped = {}
        for h, s in inside.items():
            s.bind(("0.0.0.0", 5000))
            mapped[h] = observed(lab, s, servers, (I1, 3478))
        t_out = time.monotonic()  # both bindings were last refreshed before this instant
        early = {h: False for h in inside}
        while time.monotonic() < t_out + 3.0:  # inbound only, every 0.4 s
            for h, s in inside.items():
                srv.sendto(b"in", mapped[h])
                early[h] |= time.monotonic() < t_out + 1.0 and recv(s, 0.2) is not None
            time.sleep(0.2)
        for s in inside.values():  # forget what arrived in the loop
            while recv(s, 0) is not None:
                pass
        late = {}
        for h, s in inside.items():  # >= 3 s after the last outbound packet
            srv.sendto(b"late", mapped[h])
            got = recv(s, 0.5)
            late[h] = got is not None and got[0] == b"late"
        assert {h: (early[h], late[h]) for h in inside} == {h: REFRESH_EXPECT[refresh] for h in inside}


def test_sequential_counter_wraps(netns_ok):
    """sequential_count 8: the 9th new flow is back at the base, sharing the port with a flow to
    another remote; towards the remote that already holds the counter's port the first packet is
    dropped and the next one takes the next port. Same sequence as the simulator's engine test."""
    spec = NatSpec("tiny", mapping=Mapping.APDM, filtering=Filtering.APDF, ports=PortAllocation.SEQUENTIAL,
                   hairpinning=False, sequential_base=50000, sequential_count=8)
    with Lab(with_nat(build("symmetric_seq", "public", scenario="multi_agent", agents=2), spec)) as lab:
        remotes = {}
        for i in range(10):
            r = lab.socket("intermediate")
            r.bind((I1, 3000 + i))
            remotes[(I1, 3000 + i)] = r
        rs = list(remotes)
        a, b = lab.socket("agent"), lab.socket("agent2")
        a.bind(("0.0.0.0", 7000))
        b.bind(("0.0.0.0", 7000))
        ports = [observed(lab, a, remotes, r)[1] for r in rs[:8]]
        assert ports == [50000, 50001, 50002, 50003, 50004, 50005, 50006, 50007]
        assert observed(lab, b, remotes, rs[8])[1] == 50000  # wrapped; shared with a -> rs[0]
        for r, who in ((rs[0], a), (rs[8], b)):
            remotes[r].sendto(b"back", ("203.0.113.101", 50000))
            assert recv(who, 1.0) is not None, r
        b.sendto(b"clash", rs[1])  # the counter's 50001 is a -> rs[1]'s: this packet is dropped
        assert recv(remotes[rs[1]], 0.3) is None
        assert observed(lab, b, remotes, rs[1])[1] == 50002  # the counter moved on


# host a, host b, a, a, b: the port each new flow gets, per counter scope (written out here)
COUNTER_EXPECT = {CounterScope.NAT: [50000, 50001, 50002, 50003, 50004],
                  CounterScope.HOST: [50000, 50000, 50001, 50002, 50001]}


@pytest.mark.parametrize("scope", list(CounterScope))
def test_sequential_counter_scope(netns_ok, scope):
    spec = NatSpec("tiny", mapping=Mapping.APDM, filtering=Filtering.APDF, ports=PortAllocation.SEQUENTIAL,
                   hairpinning=False, sequential_base=50000, sequential_count=8, sequential_scope=scope)
    with Lab(with_nat(build("symmetric_seq", "public", scenario="multi_agent", agents=2), spec)) as lab:
        servers = servers_for(lab)
        a, b = lab.socket("agent"), lab.socket("agent2")
        a.bind(("0.0.0.0", 7000))
        b.bind(("0.0.0.0", 7000))
        # five different remotes: two hosts on one port towards one remote would clash (see above)
        order = [(a, (I1, 3478)), (b, (I1, 3479)), (a, (I2, 3478)), (a, (I2, 3479)), (b, (I1, 3478))]
        assert [observed(lab, s, servers, t)[1] for s, t in order] == COUNTER_EXPECT[scope]


def test_binding_timeout_is_honoured(netns_ok):
    with Lab(build("port_restricted", "public")) as lab:
        lab.set_binding_timeout("nat-a", 2)
        servers = servers_for(lab)
        idle, busy = lab.socket("agent"), lab.socket("agent")
        idle.bind(("0.0.0.0", 5000))
        busy.bind(("0.0.0.0", 5001))
        m_idle = observed(lab, idle, servers, (I1, 3478))
        m_busy = observed(lab, busy, servers, (I1, 3478))
        deadline = time.monotonic() + 3.5
        while time.monotonic() < deadline:  # only `busy` refreshes its mapping
            busy.sendto(b"keepalive", (I1, 3478))
            time.sleep(0.5)
        servers[(I1, 3478)].sendto(b"late", m_idle)
        servers[(I1, 3478)].sendto(b"late", m_busy)
        assert recv(idle, 0.5) is None, "an idle mapping outlived its 2 s binding timeout"
        got = recv(busy, 0.5)
        while got is not None and got[0] != b"late":
            got = recv(busy, 0.5)
        assert got is not None, "a refreshed mapping must keep admitting"


def _icmp(lab: Lab, host: str, dst: str, n: int = 100):
    """ICMP round trips stamped by the kernel at both ends: no userspace echo, no scheduling delay."""
    sock = lab.socket(host, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        return ping(sock, dst, count=n, interval=0.01)
    finally:
        sock.close()


def test_link_profile_rtt_within_tolerance(netns_ok):
    """The links have the profile: p50 at most 1.5 ms below it (a busy host only adds delay, so the
    upper bounds are loose: +25 ms p50, +40 ms p95), no loss. The target
    itself (p50 ±5 % or ±1 ms, p95 +3 ms, idle and loaded) is measured by benchmarks/wire.py: a
    timed test on a shared virtual machine cannot hold it without failing by chance. A round of 100
    that misses is measured again, up to 3 rounds, as `qlab lab check` does."""

    def within(r, configured: float) -> bool:  # the bounds of tests/test_labcheck.py (LOOSE)
        return (r.lost == 0 and r.p50 is not None and r.p95 is not None
                and configured - 1.5 <= r.p50 <= configured + 25.0 and r.p95 <= configured + 40.0)

    with Lab(build("full_cone", "public", profile_name="wan-20ms")) as lab:
        seen = {}
        for dst, configured in ((lab.topology.host("connector").ip, 20.0), (I1, 30.0)):  # 2 x (5 + 5), 2 x (5 + 10)
            rounds = [_icmp(lab, "agent", dst)]
            while not within(rounds[-1], configured) and len(rounds) < 3:
                rounds.append(_icmp(lab, "agent", dst))
            assert within(rounds[-1], configured), [(r.p50, r.p95, r.lost) for r in rounds]
            seen[configured] = (rounds[-1], len(rounds))
        (direct, nd), (to_intermediate, ni) = seen[20.0], seen[30.0]
        print(f"\nwan-20ms: direct RTT p50 {direct.p50:.2f} / p95 {direct.p95:.2f} ms (configured 20, round {nd}), "
              f"agent-intermediate {to_intermediate.p50:.2f} / {to_intermediate.p95:.2f} ms (configured 30, "
              f"round {ni}); lab up in {lab.up_seconds:.3f} s")


def test_normal_jitter_gives_the_rtt_spread_of_the_profile(netns_ok):
    """`intercontinental` jitters every access link (normal, 2 ms on each site's): the direct path's
    ICMP round trips spread as the link model says (p5 to p50 and p50 to p95 about 6.6 ms each;
    without the jitter well under 1 ms). A busy host only adds delay, so the spread below the median
    must be at least half the profile's, the one above at least half and at most 15 ms more; p50 as
    in the test above. Up to 3 rounds of 200, as `qlab lab check` does."""

    def spread(r) -> tuple[float, float]:
        return r.p50 - r.quantile(0.05), r.p95 - r.p50

    with Lab(build("full_cone", "public", profile_name="intercontinental")) as lab:
        path = next(p for p in probe_paths(lab) if "direct" in p.label)
        p5, p50, p95 = expected_rtt_ms(path.near, path.far, (0.05, 0.5, 0.95))
        below, above = p50 - p5, p95 - p50
        assert 5.5 < below < 7.5 and 5.5 < above < 7.5  # the profile's own: 1.645 x 4 ms

        def within(r) -> bool:
            return (r.lost == 0 and r.p50 is not None and p50 - 1.5 <= r.p50 <= p50 + 25
                    and spread(r)[0] >= below / 2 and above / 2 <= spread(r)[1] <= above + 15)

        rounds = [measure(lab, path, samples=200)]
        while not within(rounds[-1]) and len(rounds) < 3:
            rounds.append(measure(lab, path, samples=200))
        got = rounds[-1]
        assert within(got), [(r.p50, spread(r), r.lost) for r in rounds if r.p50 is not None]
        print(f"\nintercontinental direct path: p5/p50/p95 {got.quantile(0.05):.2f} / {got.p50:.2f} / {got.p95:.2f} ms, "
              f"the profile's {p5:.2f} / {p50:.2f} / {p95:.2f} ms (round {len(rounds)})")


@pytest.mark.parametrize("scenario", ["same_lan", "double_nat", "multi_agent"])
def test_scenarios_come_up_and_route(netns_ok, scenario):
    topo = build("port_restricted", "full_cone", scenario=scenario, agents=3 if scenario == "multi_agent" else 1)
    with Lab(topo) as lab:
        servers = servers_for(lab)
        for h in topo.agents:
            s = lab.socket(h)
            mapped = observed(lab, s, servers, (I1, 3478))
            expected_ip = "203.0.113.103" if scenario == "double_nat" else "203.0.113.101"
            assert mapped[0] == expected_ip
        if scenario == "same_lan":
            assert _icmp(lab, "agent", topo.host("connector").ip, n=10).p50 < 1.0  # one ideal LAN hop


def test_teardown_leaves_nothing_even_on_error(netns_ok):
    before = set(lab_namespaces())
    with pytest.raises(RuntimeError, match="boom"), Lab(build("symmetric", "full_cone", profile_name="wan-20ms")) as lab:
        wires = [w.proc for w in lab.wires]
        assert wires and all(p.poll() is None for p in wires)
        assert set(lab.namespaces.values()) <= set(lab_namespaces())
        raise RuntimeError("boom")
    assert set(lab_namespaces()) == before
    assert all(p.poll() is not None for p in wires)


def test_two_labs_at_once_do_not_clash(netns_ok):
    with Lab(build("full_cone", "public")) as a, Lab(build("symmetric", "public")) as b:
        assert not set(a.namespaces.values()) & set(b.namespaces.values())
        sa, sb = servers_for(a), servers_for(b)
        ia, ib = a.socket("agent"), b.socket("agent")
        assert observed(a, ia, sa, (I1, 3478))[0] == observed(b, ib, sb, (I1, 3478))[0] == "203.0.113.101"


# -- link rendering: netem's syntax, the wires' flags ------------------------------------------------
TC_TIME = re.compile(r"\d+(\.\d+)?(s|ms|us)")
TC_PERCENT = re.compile(r"\d+(\.\d+)?%")
NETEM_TABLES = {"normal", "pareto", "paretonormal"}  # iproute2 netem/Makefile installs these (and experimental)


def _take(words: list[str], pattern: re.Pattern[str], most: int) -> list[str]:
    taken = []
    while words and len(taken) < most and pattern.fullmatch(words[0]):
        taken.append(words.pop(0))
    return taken


def netem_syntax_problem(args: list[str]) -> str:
    """What tc-netem(8)'s grammar, and the checks iproute2's q_netem.c makes after parsing, refuse in
    `args`, or "": `delay TIME [JITTER [CORRELATION]]`, `distribution NAME` (a table iproute2
    installs, with a delay and a jitter), `loss PERCENT [CORRELATION]`, `reorder PERCENT
    [CORRELATION]` (with a delay), `rate RATE`."""
    if args[:1] != ["netem"]:
        return "not a netem qdisc"
    words, seen = list(args[1:]), {}
    while words:
        word = words.pop(0)
        if word in seen:
            return f"{word} twice"
        if word == "delay":
            times = _take(words, TC_TIME, 2)
            correlation = _take(words, TC_PERCENT, 1) if len(times) == 2 else []
            if not times:
                return "delay without a time"
            seen[word] = times + correlation
        elif word == "distribution":
            name = words.pop(0) if words else ""
            if name not in NETEM_TABLES:
                return f"no table for distribution {name!r}"
            seen[word] = [name]
        elif word in ("loss", "reorder"):
            seen[word] = _take(words, TC_PERCENT, 2)
            if not seen[word]:
                return f"{word} without a percentage"
        elif word == "rate":
            seen[word] = [words.pop(0)] if words and re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", words[0]) else []
            if not seen[word]:
                return "rate without a rate"
        else:
            return f"what is {word!r}?"
    delay = seen.get("delay", [])
    if "distribution" in seen and len(delay) < 2:
        return "distribution specified but no latency and jitter values"
    if "reorder" in seen and not delay:
        return "reordering not possible without specifying some delay"
    return ""


def test_the_syntax_check_refuses_what_tc_refuses():
    assert netem_syntax_problem(["netem", "delay", "5ms", "2ms", "25%", "distribution", "normal", "reorder", "1%"]) == ""
    assert "no latency and jitter" in netem_syntax_problem(["netem", "delay", "5ms", "distribution", "normal"])
    assert "no table" in netem_syntax_problem(["netem", "delay", "5ms", "2ms", "distribution", "uniform"])
    assert "without specifying some delay" in netem_syntax_problem(["netem", "reorder", "1%"])
    assert "what is" in netem_syntax_problem(["netem", "delay", "5ms", "25%"])  # a correlation needs a jitter
    # stricter than tc, whose strtod reads exponents: netem_args never writes one
    assert netem_syntax_problem(["netem", "delay", "1e-05ms"]) == "delay without a time"


RENDERED = [
    (LinkProfile(10, 2, 0.05, 100), ["netem", "delay", "10ms", "2ms", "loss", "5%", "rate", "100mbit"]),
    (LinkProfile(5), ["netem", "delay", "5ms"]),
    (LinkProfile(5, jitter_distribution="normal", jitter_correlation=0.5), ["netem", "delay", "5ms"]),
    (LinkProfile(5, 1, jitter_correlation=0.3), ["netem", "delay", "5ms", "1ms", "30%"]),
    (LinkProfile(40, 2, jitter_distribution="normal"), ["netem", "delay", "40ms", "2ms", "distribution", "normal"]),
    (LinkProfile(20, 8, 0.01, jitter_distribution="paretonormal", jitter_correlation=0.25, reorder=0.02),
     ["netem", "delay", "20ms", "8ms", "25%", "distribution", "paretonormal", "loss", "1%", "reorder", "2%"]),
    (LinkProfile(0.1 + 0.2, 1 / 3, 1e-7, jitter_distribution="pareto"),
     ["netem", "delay", "0.3ms", "0.333333ms", "distribution", "pareto", "loss", "0.00001%"]),
]


@pytest.mark.parametrize(("link", "args"), RENDERED)
def test_netem_args_render_every_field(link, args):
    """Correlation and distribution only after a jitter (netem has no place for them without one),
    `uniform` left unnamed (netem's default, and iproute2 has no table for it), no float noise."""
    assert netem_args(link) == args
    assert netem_syntax_problem(args) == ""


def test_every_profile_renders_in_netem_syntax():
    links = [LinkProfile(d, j, loss, rate, dist, c, r)
             for d in (0.0, 5.0) for j in (0.0, 2.5) for loss in (0.0, 0.01) for rate in (None, 10.0)
             for dist in JITTER_DISTRIBUTIONS for c in (0.0, 0.25) for r in ((0.0, 0.1) if d else (0.0,))]
    links += [link for p in PROFILES.values() for link in (p.agent, p.connector, p.intermediate)]
    assert {str(link): netem_syntax_problem(netem_args(link)) for link in links} == {str(link): "" for link in links}


def test_tc_itself_parses_the_rendered_arguments(netns_ok):
    """iproute2's own parser, in a throwaway namespace: where the kernel has no netem, tc gets as far
    as asking it (`Specified qdisc kind is unknown`) only when every word parsed; a word it does not
    know stops it before. With netem, the qdisc is simply added."""
    ns = f"qlab-tcparse-{os.getpid()}"
    _run(["ip", "netns", "add", ns])
    try:
        def verdict(args: list[str]) -> str:
            p = subprocess.run(["tc", "-n", ns, "qdisc", "replace", "dev", "lo", "root", *args],
                               capture_output=True, text=True, timeout=10)
            if p.returncode == 0 or "Specified qdisc kind is unknown" in p.stderr:
                return "parsed"
            return p.stderr.strip().splitlines()[0] if p.stderr.strip() else f"exit {p.returncode}"

        for link, args in RENDERED:
            result = verdict(netem_args(link))
            if result.startswith("No distribution data"):
                pytest.skip(f"iproute2's distribution tables are not installed here: {result}")
            assert result == "parsed", (args, result)
        assert verdict(["netem", "delay", "5ms", "2ms", "distribution", "uniform"]) != "parsed"  # the check discriminates
        assert verdict(["netem", "delay", "5ms", "distribution", "normal"]) != "parsed"
    finally:
        _run(["ip", "netns", "del", ns], check=False)



# --- port mapping: a real miniupnpd on the router ------------------------------------------------


def test_mapping_rulesets_mark_at_the_gate_and_need_a_stun_server():
    args = dict(wan_if="wan", lan_if="lan", wan_ip="203.0.113.101", lan_cidr="10.1.0.0/24")
    stun = ("203.0.113.10", "203.0.113.11")
    for n in NATTED:
        plain, mapped = render(preset(n), **args), render(preset(f"{n}+map"), **args, stun_servers=stun)
        assert plain == render(preset(n), **args, stun_servers=stun)  # a plain preset ignores the servers
        assert "meta mark" not in plain and "chain late" not in plain
        assert " drop" not in mapped.split("chain gate")[1].split("}")[0]  # the gate only marks
        assert "meta mark 0x00000071 ct status dnat accept" in mapped
        assert 'oifname "wan" ip saddr 203.0.113.101 accept' in mapped  # the daemon's STUN leaves unNATed
    with pytest.raises(ValueError, match="STUN"):
        render(preset("symmetric+map"), **args)


def _remote(lab: Lab, ip: str, port: int) -> socket.socket:
    s = lab.socket("intermediate")  # not 3478/3479: the lab's stund holds those
    s.bind((ip, port))
    return s


@pytest.mark.parametrize("nat", ["port_restricted", "symmetric"])
def test_the_daemon_maps_and_its_mapping_admits_anyone(netns_ok, nat):
    """NAT-PMP by hand (RFC 6886 bytes) to the lab's miniupnpd: before the mapping nothing gets in,
    after it anyone does, and the answer leaves from the mapped port; the filter still holds for
    every other port; the lab kills the daemons with itself."""
    with Lab(build(f"{nat}+map", "public")) as lab:
        assert {"stund", "miniupnpd on nat-a"} <= set(lab.status()["daemons"])
        pids = list(lab.status()["daemons"].values())
        r1, r2 = _remote(lab, I1, 7000), _remote(lab, I2, 7001)
        inside = lab.socket("agent")
        inside.bind(("0.0.0.0", 4434))
        r1.sendto(b"in", ("203.0.113.101", 4434))
        assert recv(inside, 0.4) is None
        client = lab.socket("agent")
        client.settimeout(2)
        client.sendto(struct.pack("!BBHHHI", 0, 1, 0, 4434, 4434, 120), ("10.1.0.1", 5351))
        data, _ = client.recvfrom(64)
        _v, op, result, _epoch, internal, external, lifetime = struct.unpack("!BBHIHHI", data)
        assert (op, result, internal) == (129, 0, 4434) and lifetime > 0
        r2.sendto(b"in", ("203.0.113.101", external))
        got = recv(inside, 1.0)
        assert got is not None and got[1] == (I2, 7001)
        inside.sendto(b"back", got[1])
        back = recv(r2, 1.0)
        assert back is not None and back[1] == ("203.0.113.101", external)
        other = lab.socket("agent")
        other.bind(("0.0.0.0", 5001))
        other.sendto(b"out", (I1, 7000))  # a flow of its own, then an unsolicited source
        assert recv(r1, 1.0) is not None
        r2.sendto(b"in", ("203.0.113.101", 5001))
        assert recv(other, 0.4) is None  # unmapped: the NAT's filter holds
    assert all(not Path(f"/proc/{p}").exists() for p in pids)
