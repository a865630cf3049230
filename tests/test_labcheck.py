"""`qlab lab check` on the kernel lab: every preset passes against its spec and the `wan-20ms`
profile (three labs cover the six presets), through the CLI too, and the check turns red on labs
that do not do what they say (a bridge that breaks hairpinning, a ruleset of another preset, a
profile the links do not have)."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from qlab.backends.netns.lab import Lab, _run
from qlab.backends.netns.labcheck import RttBounds, check, format_table
from qlab.scenario.profiles import profile
from qlab.scenario.topology import build
from tests.procs import QLAB

# The lab's RTT target (p50 ±5 %, p95 +3 ms) is a benchmark's to show (benchmarks/wire.py): on a
# shared virtual machine host scheduling can add delay to every round for seconds (CI saw 24.0 ms p95
# for a 20 ms path in all three rounds; this machine once 31-36 ms p50). Delay is only ever added, so
# the lower bound stays tight: links without the profile, or with a longer one, still fail.
LOOSE = RttBounds(p50_ms=1.5, p50_above_ms=25.0, p95_slack_ms=40.0)
# (agent NAT, connector NAT): every preset once; two Agents so hairpinning between hosts is checked
LABS = [("full_cone", "restricted_cone"), ("port_restricted", "symmetric")]


def _failed(rows) -> list[str]:
    return [f"{r.subject} {r.check}: expected {r.expected}, measured {r.measured}" for r in rows if not r.ok]


@pytest.mark.parametrize("agent_nat,connector_nat", LABS)
def test_every_preset_does_what_its_spec_says(netns_ok, agent_nat, connector_nat):
    topo = build(agent_nat, connector_nat, scenario="multi_agent", agents=2, profile_name="wan-20ms")
    with Lab(topo) as lab:
        rows = check(lab, samples=100, bounds=LOOSE)
    print("\n" + format_table(rows))
    assert not _failed(rows), _failed(rows)
    checks = {(r.subject, r.check) for r in rows}
    for router in ("nat-a", "nat-c"):
        assert {(router, c) for c in ("mapping", "filtering", "port allocation", "refresh",
                                       "hairpin (same host)")} <= checks
    assert ("nat-a", "hairpin (two hosts)") in checks
    assert {r.subject for r in rows if r.check == "rtt p95"} == {
        "agent -> connector site (direct path)", "agent -> intermediate", "connector -> intermediate"}


def test_cli_check_on_a_lab_that_is_up(netns_ok):
    """symmetric_seq (and a public Connector) through `qlab lab up`, `check --json`, `down`."""
    up = subprocess.run([*QLAB, "lab", "up", "--agent-nat", "symmetric_seq", "--connector-nat", "public",
                         "--profile", "wan-20ms"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    run_id = json.loads(up.stdout)["run_id"]
    try:
        p = subprocess.run([*QLAB, "lab", "check", "--run", run_id, "--json", "--p50-tolerance", "1.5",
                            "--p50-above", "25", "--p95-slack", "40"],
                           capture_output=True, text=True,
                           timeout=120)
        rows = json.loads(p.stdout)
        assert p.returncode == 0 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
        seen = {r["check"]: r["measured"] for r in rows if r["subject"] == "nat-a"}
        assert seen["port allocation"] == "sequential" and seen["mapping"] == "APDM", seen
    finally:
        down = subprocess.run([*QLAB, "lab", "down", "--run", run_id], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    bad = subprocess.run([*QLAB, "lab", "check", "--run", run_id], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no lab with run id" in bad.stderr and "Traceback" not in bad.stderr


def test_the_check_fails_on_labs_that_lie(netns_ok):
    with Lab(build("port_restricted", "public", profile_name="wan-20ms")) as lab:
        ns = lab.netns("nat-a")
        # 1. the bridge does the NAT (br_netfilter on): a host cannot reach its own public mapping
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
        rows = check(lab, samples=20, refresh=False)
        assert any(r.check == "hairpin (same host)" and not r.ok for r in rows), format_table(rows)
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"])
        # 2. the router runs another preset's ruleset than its spec says
        real_spec = lab._specs["nat-a"]
        lab._specs["nat-a"] = dataclasses.replace(real_spec, filtering=type(real_spec.filtering)("EIF"))
        lab.flush_nat("nat-a")  # loads the full-cone-like ruleset
        lab._specs["nat-a"] = real_spec  # ... while the spec still says APDF
        rows = [r for r in check(lab, samples=20, refresh=False) if r.subject == "nat-a"]
        assert any(r.check == "filtering" and not r.ok and r.measured == "EIF" for r in rows), format_table(rows)
        # 3. links that do not have the profile the lab claims
        lab.topology = dataclasses.replace(lab.topology, profile=profile("intercontinental"))
        rows = check(lab, samples=20, refresh=False, bounds=LOOSE)  # the tests' loose bounds still see it
        assert any(r.check == "rtt p50" and not r.ok for r in rows), format_table(rows)


def test_a_failed_round_is_measured_again_and_named(monkeypatch):
    """No lab needed: a path whose first round has a load burst (6 of 100 samples 8 ms late) passes on
    its second round and says so; a path late in every round fails after three."""
    from qlab.backends.netns import labcheck
    from qlab.backends.netns.icmp import RttSamples
    from qlab.scenario.profiles import LinkProfile

    link = LinkProfile(delay_ms=5.0)
    paths = [labcheck.ProbePath("bursty", "agent", "x", link, link),
             labcheck.ProbePath("slow", "agent", "y", link, link)]
    burst = RttSamples([20.2] * 94 + [28.0] * 6, sent=100)
    calm = RttSamples([20.2] * 100, sent=100)
    rounds = {"bursty": [burst, calm], "slow": [burst, burst, burst, calm]}
    monkeypatch.setattr(labcheck, "probe_paths", lambda lab: paths)
    monkeypatch.setattr(labcheck, "measure", lambda lab, path, **kw: rounds[path.label].pop(0))
    rows = {(r.subject, r.check): r for r in labcheck.check_links(None, rounds=3)}  # type: ignore[arg-type]
    assert rows["bursty", "rtt p95"].ok and rows["bursty", "rtt p95"].measured == "20.20 ms (round 2 of 3)"
    assert not rows["slow", "rtt p95"].ok and rows["slow", "rtt p95"].measured.endswith("(round 3 of 3)")
    assert rounds == {"bursty": [], "slow": [calm]}  # no fourth round


def test_the_expected_rtt_is_what_the_profile_gives():
    """No lab needed: the bounds are centred on the round trip the link model itself draws (four
    link directions per probe), not on the base delays alone: exact without jitter, around the base
    for symmetric jitter, below it at the median and above in the tail for skewed jitter."""
    from qlab.backends.netns.labcheck import expected_rtt_ms
    from qlab.scenario.profiles import LinkProfile

    assert expected_rtt_ms(LinkProfile(5.0), LinkProfile(10.0)) == (30.0, 30.0)
    uniform = LinkProfile(5.0, 2.0)  # each leg within +-2 ms: the old bound allowed +8 at p95
    p50, p95 = expected_rtt_ms(uniform, uniform)
    assert abs(p50 - 20.0) < 0.2 and 22.5 < p95 < 24.5  # 1.645 x the sum's 2.31 ms standard deviation
    pareto = LinkProfile(20.0, 8.0, jitter_distribution="pareto")
    p50, p95 = expected_rtt_ms(pareto, LinkProfile(5.0))
    assert p50 < 50.0 - 3 and p95 > 50.0 + 10
    assert expected_rtt_ms(pareto, LinkProfile(5.0)) == (p50, p95)  # seeded: the same every time
