"""IPv6 (issue 17, part 2): the dual-stack address plan, the IPv6 firewall presets as data (the
nftables renderer and the simulator's engine), one dual-stack socket per role in the simulator,
the Intermediate's screening of IPv6 candidates, the family preference of the puncher, and whole
dual-stack trials in the simulator (deterministic: one seed, one outcome)."""

from __future__ import annotations

import asyncio
import json

import pytest

from qlab import wire
from qlab.backends import sim
from qlab.backends.sim.firewall6 import FirewallEngine
from qlab.experiment.record import IPV6_FIREWALLS, TrialSpec
from qlab.experiment.trial import intermediate_listeners, run_trial
from qlab.nat.firewall6 import PRESET6_NAMES, Firewall6Spec, firewall6, render
from qlab.roles.intermediate_core import screen_candidates
from qlab.scenario.topology import build
from qlab.traversal.punch import Puncher, gather, host_ips_for, lockstep_candidates, without_nat

Addr = tuple[str, int]
K = wire.CandidateKind
KEY = b"k" * 32


# -- the address plan -------------------------------------------------------------------------------
def test_dual_stack_is_opt_in_and_follows_the_documentation_plan() -> None:
    v4 = build("symmetric", "port_restricted")
    assert not v4.ipv6 and all(not h.ips6 for h in v4.hosts) and all(r.fw6 is None for r in v4.routers)
    t = build("symmetric", "port_restricted", agent_ipv6="stateful", connector_ipv6="open")
    assert t.ipv6 and t.intermediate.ips6 == ("2001:db8::10", "2001:db8::11")
    assert t.host("agent").ips6 == ("2001:db8:1::2",) and t.host("agent").gateway6 == "2001:db8:1::1"
    assert t.host("connector").addresses == ("10.2.0.2", "2001:db8:2::2")
    assert (t.router("nat-a").fw6, t.router("nat-c").fw6) == (firewall6("stateful"), firewall6("open"))
    assert t.routes6() == [("2001:db8:1::/64", "2001:db8::101"), ("2001:db8:2::/64", "2001:db8::102")]
    one = build("full_cone", "full_cone", agent_ipv6="stateful")  # only the Agent's site has IPv6
    assert one.host("agent").ips6 and not one.host("connector").ips6 and one.intermediate.ips6
    with pytest.raises(ValueError, match="IPv6 firewall"):
        build(agent_ipv6="closed")
    with pytest.raises(ValueError, match="carrier"):
        build("full_cone", scenario="double_nat", agent_ipv6="open")


def test_the_intermediate_listens_on_both_families_ipv4_first() -> None:
    assert intermediate_listeners(["203.0.113.10", "203.0.113.11"]) == [
        ("203.0.113.10", 4433), ("203.0.113.10", 4434), ("203.0.113.11", 4433), ("203.0.113.11", 4434)]
    both = intermediate_listeners(["203.0.113.10", "203.0.113.11", "2001:db8::10", "2001:db8::11"])
    assert both[:4] == intermediate_listeners(["203.0.113.10", "203.0.113.11"])
    assert both[4:] == [("2001:db8::10", 4433), ("2001:db8::10", 4434), ("2001:db8::11", 4433), ("2001:db8::11", 4434)]


# -- the firewall as data ---------------------------------------------------------------------------
STATEFUL_RULESET = """\
# qlab IPv6 firewall stateful: filtering stateful (RFC 6092), no NAT
table ip6 qlab_fw6
delete table ip6 qlab_fw6
table ip6 qlab_fw6 {
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    ct state invalid drop
    iifname "lan" oifname "wan" accept
    icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem } accept
  }
}
"""


def test_renderer_bytes_are_fixed_and_deterministic() -> None:
    assert render(firewall6("stateful"), wan_if="wan", lan_if="lan") == STATEFUL_RULESET
    open_ = render(firewall6("open"), wan_if="wan", lan_if="lan")
    assert "policy accept;" in open_ and "ct state" not in open_ and open_.startswith("# qlab IPv6 firewall open")
    assert render(firewall6("open"), wan_if="wan", lan_if="lan") == open_
    assert PRESET6_NAMES == IPV6_FIREWALLS  # the record's copy (it imports no networking)
    with pytest.raises(ValueError, match="choose one of: open, stateful"):
        firewall6("nat66")
    with pytest.raises(ValueError, match="timeout"):
        Firewall6Spec("x", timeout=0)


def test_stateful_engine_admits_only_the_remote_endpoint_the_inside_sent_to() -> None:
    fw = FirewallEngine(Firewall6Spec("t", timeout=10))
    inside, remote = ("2001:db8:1::2", 5000), ("2001:db8:2::2", 4434)
    assert not fw.inbound(remote, inside, 0.0)  # unsolicited: dropped, and it creates nothing
    assert not fw.inbound(remote, inside, 0.1)
    assert fw.outbound(inside, remote, 1.0)
    assert fw.inbound(remote, inside, 2.0)
    assert not fw.inbound(("2001:db8:2::2", 4435), inside, 2.0)  # another port of the same host
    assert not fw.inbound(("2001:db8:3::2", 4434), inside, 2.0)  # another host
    assert not fw.inbound(remote, ("2001:db8:1::2", 5001), 2.0)  # another inside socket
    assert fw.inbound(remote, inside, 11.9)  # the admitted packet at 2.0 refreshed the flow
    assert not fw.inbound(remote, inside, 22.0) and fw.flows(22.0) == []  # expired
    opened = FirewallEngine(firewall6("open"))
    assert opened.inbound(remote, inside, 0.0)


# -- the simulator's routers and one dual-stack socket ----------------------------------------------
def test_sim_routes_ipv6_through_the_firewall_and_one_socket_serves_both_families() -> None:
    network = sim.SimNetwork(build("symmetric", "port_restricted", agent_ipv6="stateful", connector_ipv6="stateful"))

    async def main() -> dict[str, list[Addr]]:
        got: dict[str, list[Addr]] = {"agent": [], "inter": []}
        inter = await network.net("intermediate").bind_udp("::", 4433, lambda b: got["inter"].extend(s for _, s in b))
        agent = await network.net("agent").bind_udp("::", 5000, lambda b: got["agent"].extend(s for _, s in b))
        assert agent.local_address == ("::", 5000)
        inter.sendto(b"unsolicited", ("2001:db8:1::2", 5000))
        await asyncio.sleep(0.5)
        agent.sendto(b"v6", ("2001:db8::10", 4433))
        agent.sendto(b"v4", ("203.0.113.10", 4433))
        await asyncio.sleep(0.5)
        inter.sendto(b"reply", ("2001:db8:1::2", 5000))
        inter.sendto(b"wrong port", ("2001:db8:1::2", 5001))
        await asyncio.sleep(0.5)
        return got

    got = sim.run(main())
    assert got["inter"][0] == ("2001:db8:1::2", 5000)  # IPv6: the host's own address, no NAT
    assert got["inter"][1][0] == "203.0.113.101"  # IPv4: through the symmetric NAT
    assert got["agent"] == [("2001:db8::10", 4433)]  # only the reply got in
    assert network.dropped["fw6_filtered"] == 2


# -- screening: an IPv6 candidate is forwarded only when it is provably the sender's -----------------
OBSERVED = ("198.51.100.1", 40001)
PROVEN = (OBSERVED, ("2001:db8:1::2", 40001))


def cand(kind: wire.CandidateKind, ip: str, port: int) -> wire.Candidate:
    return wire.Candidate(kind, (ip, port), 7)


@pytest.mark.parametrize(("given", "proven", "kept"), [
    (cand(K.HOST, "2001:db8:1::2", 40001), PROVEN, True),  # its IPv6 QAD came from there
    (cand(K.HOST, "2001:db8:1::2", 40001), (OBSERVED,), False),  # not proven: anyone's address
    (cand(K.HOST, "2001:db8:1::2", 40002), PROVEN, False),  # another port of that host
    (cand(K.HOST, "2001:db8:9::7", 40001), PROVEN, False),  # a third party (a victim to probe)
    (cand(K.HOST, "2606:4700::1111", 443), PROVEN, False),
    (cand(K.HOST, "fd00::2", 40001), (OBSERVED,), True),  # unique local: the IPv6 LAN
    (cand(K.HOST, "fe80::1", 40001), PROVEN, False),
    (cand(K.HOST, "::1", 40001), PROVEN, False),
    (cand(K.SRFLX, "2001:db8:1::2", 40001), PROVEN, True),  # not rewritten to the IPv4 observation
    (cand(K.SRFLX, "2001:db8:9::7", 40001), PROVEN, False),
    (cand(K.PRFLX, "2001:db8:9::7", 40001), PROVEN, False),
    (cand(K.PREDICTED, "2001:db8:1::2", 40002), PROVEN, False),
])
def test_screening_of_ipv6_candidates(given: wire.Candidate, proven: tuple[Addr, ...], kept: bool) -> None:
    assert screen_candidates((given,), OBSERVED, proven) == ((given,) if kept else ())


def test_screening_over_an_ipv6_link_treats_other_global_ipv6_as_unproven() -> None:
    seen6 = ("2001:db8:1::2", 40001)
    assert screen_candidates((cand(K.HOST, *seen6),), seen6) == (cand(K.HOST, *seen6),)
    assert screen_candidates((cand(K.HOST, "2001:db8:1::3", 1),), seen6) == ()
    assert screen_candidates((cand(K.HOST, "10.1.0.2", 40001),), seen6) == (cand(K.HOST, "10.1.0.2", 40001),)


# -- gathering and the family preference ------------------------------------------------------------
def test_gather_offers_both_families_ipv6_first() -> None:
    cands = gather(["10.1.0.2", "2001:db8:1::2", "fe80::1"], 5000, ("203.0.113.101", 6000), wire.NatKind.EDM_RANDOM)
    assert [c.addr for c in cands] == [("2001:db8:1::2", 5000), ("10.1.0.2", 5000), ("203.0.113.101", 6000)]
    assert cands[0].priority > cands[1].priority > cands[2].priority


def test_a_socket_offers_the_addresses_of_the_families_it_serves() -> None:
    ips = ["10.1.0.2", "2001:db8:1::2"]
    assert host_ips_for(("::", 5000), ips) == ips  # dual-stack
    assert host_ips_for(("0.0.0.0", 5000), ips) == ["10.1.0.2"]
    assert host_ips_for(("2001:db8:1::2", 5000), ips) == ["2001:db8:1::2"]


def test_endpoint_dependent_pairs_still_probe_ipv6() -> None:
    own = (cand(K.HOST, "2001:db8:1::2", 1), cand(K.HOST, "10.1.0.2", 1), cand(K.SRFLX, "203.0.113.101", 2))
    peer = (cand(K.HOST, "2001:db8:2::2", 3), cand(K.HOST, "10.2.0.2", 3), cand(K.SRFLX, "203.0.113.102", 4),
            cand(K.PREDICTED, "203.0.113.102", 5))
    assert without_nat(own, peer) == (peer[0],)
    assert without_nat(own[1:], peer) == ()  # no IPv6 of our own: nothing
    assert lockstep_candidates(own, peer) == (peer[0], peer[3])


def _answer(p: Puncher, dst: Addr, now: float, requests: list[tuple[bytes, Addr]]) -> None:
    data = next(d for d, a in requests if a == dst)
    txn = wire.decode_probe(data, KEY).txn
    p.receive(wire.encode_probe(wire.Probe(wire.PROBE_RESPONSE, 7, txn, dst), KEY), dst, now)


V6, V4 = ("2001:db8:2::2", 4434), ("203.0.113.102", 4434)
OWN = (cand(K.HOST, "2001:db8:1::2", 5000), cand(K.SRFLX, "203.0.113.101", 5000))
PEER = (cand(K.HOST, *V6), cand(K.SRFLX, *V4))


def test_ipv6_wins_when_it_works_within_the_family_wait() -> None:
    p = Puncher(7, KEY, OWN, PEER)
    out = p.start(0.0)
    assert [a for _, a in out] == [V6, V4]  # IPv6 first
    _answer(p, V4, 0.010, out)
    assert p.success is None and p.nominate_at() == pytest.approx(0.060)
    p.poll(0.040)
    assert p.success is None
    _answer(p, V6, 0.045, out)
    assert p.success is not None and p.success.addr == V6


def test_ipv4_is_nominated_when_ipv6_stays_silent() -> None:
    p = Puncher(7, KEY, OWN, PEER)
    out = p.start(0.0)
    _answer(p, V4, 0.010, out)
    p.poll(0.061)
    assert p.success is not None and p.success.addr == V4
    q = Puncher(7, KEY, OWN[1:], PEER)  # no IPv6 of our own: the usual 10 ms
    out = q.start(0.0)
    _answer(q, V4, 0.010, out)
    assert q.success is not None and q.success.addr == V4


# -- whole trials in the simulator ------------------------------------------------------------------
def _trial(a: str, c: str, fw_a: str, fw_c: str, seed: int = 3) -> dict:
    return run_trial(TrialSpec(agent_nat=a, connector_nat=c, agent_ipv6=fw_a, connector_ipv6=fw_c, seed=seed,
                               samples=5, verify_echoes=5)).to_dict()


@pytest.mark.parametrize("fw", ["stateful", "open"])
def test_symmetric_nats_with_ipv6_go_direct_over_ipv6(fw: str) -> None:
    rec = _trial("symmetric", "symmetric", fw, fw)
    assert rec["outcome"] == "direct_wan" and rec["direct_verified"] and rec["as_expected"]
    assert rec["path_family"] == "ipv6" and rec["mechanism"] == "ipv6"
    assert rec["working_pair"] == "2001:db8:2::2:4434" and rec["expected"] == "D"
    assert rec["extra"] == {"ipv6": {"agent": fw, "connector": fw}}
    assert "host:2001:db8:1::2" in " ".join(rec["agent_candidates"])


def test_the_same_cell_without_ipv6_stays_on_the_relay_and_records_no_family() -> None:
    rec = _trial("symmetric", "symmetric", "", "")
    assert rec["outcome"] == "relay" and rec["path_family"] is None and rec["extra"] == {}
    assert not any("2001:db8" in c for c in rec["agent_candidates"] + rec["connector_candidates"])


def test_ipv6_on_one_side_only_leaves_the_ipv4_outcome() -> None:
    rec = _trial("port_restricted", "port_restricted", "stateful", "")
    assert rec["outcome"] == "direct_wan" and rec["path_family"] == "ipv4" and rec["expected"] == "D"
    assert rec["extra"] == {"ipv6": {"agent": "stateful", "connector": None}}


def test_an_ipv4_direct_cell_prefers_ipv6_when_both_work() -> None:
    rec = _trial("full_cone", "full_cone", "stateful", "stateful")
    assert rec["path_family"] == "ipv6" and rec["outcome"] == "direct_wan"


def test_faults_keep_working_over_ipv6() -> None:
    """A blackholed IPv6 path falls back to the relay; a restarted Connector (bound dual-stack like
    the first) gets the session direct over IPv6 again."""
    rec = run_trial(TrialSpec(agent_nat="symmetric", connector_nat="symmetric", agent_ipv6="stateful",
                              connector_ipv6="stateful", seed=2, samples=5, verify_echoes=5, blackhole=True)).to_dict()
    assert rec["path_family"] == "ipv6" and rec["failover_ms"] is not None and rec["failover_ms"] <= 2000
    rec = run_trial(TrialSpec(agent_nat="symmetric", connector_nat="symmetric", agent_ipv6="stateful",
                              connector_ipv6="stateful", seed=2, samples=5, verify_echoes=5,
                              fault="connector_restart")).to_dict()
    fault = rec["extra"]["fault"]
    assert fault["session_reopened"] and fault["path_after"] == "direct" and "punch_ok" in fault["events"]


def test_dual_stack_trials_repeat_exactly_with_one_seed() -> None:
    keep = ("outcome", "working_pair", "ttd_ms", "rtt_direct_p50_ms", "agent_candidates", "path_events")
    a, b = (_trial("symmetric", "symmetric", "stateful", "stateful", seed=9) for _ in range(2))
    assert {k: a[k] for k in keep} == {k: b[k] for k in keep}


# -- the command line -------------------------------------------------------------------------------
def test_cli_ipv6_for_both_sides_or_one(capsys: pytest.CaptureFixture[str]) -> None:
    from qlab.cli import main as cli

    argv = ["trial", "--agent-nat", "symmetric", "--connector-nat", "symmetric", "--samples", "5"]
    assert cli.main([*argv, "--ipv6", "stateful", "--connector-ipv6", "open"]) == 0
    out = capsys.readouterr().out
    assert "outcome          direct_wan (by ipv6)" in out, out
    assert "IPv6 firewalls   agent stateful, connector open; direct path over ipv6" in out, out
    assert cli.main([*argv, "--agent-ipv6", "stateful", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["extra"] == {"ipv6": {"agent": "stateful", "connector": None}} and rec["outcome"] == "relay"
    with pytest.raises(SystemExit):
        cli.main([*argv, "--ipv6", "nat66"])
    loopback = ["--backend", "loopback", "--profile", "lan", "--agent-nat", "public", "--connector-nat", "public"]
    with pytest.raises(SystemExit, match="IPv6 .* needs --backend sim or netns"):  # one line, before any work
        cli.main([*argv, "--ipv6", "open", *loopback])


def test_a_dual_stack_campaign_expects_and_summarises_direct(tmp_path):
    """`qlab campaign run --ipv6 stateful`: every trial dual-stack, the manifest's, the records' and
    the summary's expected code D (not the IPv4 pair's R), and direct over IPv6."""
    from qlab.study import analysis, campaign, results

    spec = campaign.CampaignSpec(backend="sim", agent_nats=["symmetric"], connector_nats=["symmetric"], trials=2,
                                 samples=5, ipv6="stateful", campaign_id="dual-stack")
    campaign.run(spec, root=tmp_path, progress=False)
    store = results.CampaignStore(results.campaign_dir("dual-stack", tmp_path))
    assert store.manifest()["expected"] == {"symmetric|symmetric": "D"}
    df = results.load("dual-stack", root=tmp_path)
    assert set(df["path_family"]) == {"ipv6"} and set(df["expected"]) == {"D"} and df["as_expected"].all()
    s = analysis.cell_summary(df)
    assert list(s["expected"]) == ["D"] and list(s["top_mechanism"]) == ["ipv6"]
    with pytest.raises(ValueError, match="ipv6 must be one of"):
        campaign.CampaignSpec(backend="sim", ipv6="nope")
