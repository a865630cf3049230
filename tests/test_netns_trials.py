"""Hole punching on the kernel NAT lab (the acceptance of the traversal issue), the classifier on
every preset, and cross-validation of the simulator against the kernel."""

from __future__ import annotations

import statistics

import pytest

from qlab.experiment.classify import run_classify
from qlab.experiment.record import TrialSpec, is_direct
from qlab.experiment.trial import run_trial
from qlab.nat.spec import PRESET_NAMES
from tests.test_traversal import CELL_OUTCOME, skipped_by_policy

CELLS = [(a, c) for a in PRESET_NAMES for c in PRESET_NAMES]
EIM = {"public", "full_cone", "restricted_cone", "port_restricted"}
# kernel trials per cell: a cell's outcome does not depend on the seed (the simulator's matrix test
# runs three per cell, the parallel-labs test six more in the kernel)
SEEDS = (1, 2)
RESULTS: dict[str, dict[tuple[str, str], list]] = {"netns": {}, "sim": {}}


def trial(backend: str, a: str, c: str, seed: int, **kw):
    return run_trial(TrialSpec(backend=backend, agent_nat=a, connector_nat=c, profile="wan-20ms", seed=seed,
                               samples=8, verify_echoes=5, **kw))


@pytest.mark.parametrize("agent_nat,connector_nat", CELLS, ids=[f"{a}-{c}" for a, c in CELLS])
def test_matrix_cell_on_netns(netns_ok, agent_nat, connector_nat):
    runs = []
    for seed in SEEDS:
        r = trial("netns", agent_nat, connector_nat, seed)
        assert r.error == "", r.error
        assert r.outcome != "failed", f"every trial must end connected: {r.reason}"
        assert r.as_expected, (f"{agent_nat} x {connector_nat}: {r.outcome} ({r.reason}), expected {r.expected}; "
                               f"events {r.path_events}")
        assert r.outcome == CELL_OUTCOME[(agent_nat, connector_nat)], (r.outcome, r.reason)
        assert r.punch == ("skipped" if skipped_by_policy(agent_nat, connector_nat) else "attempted"), r.path_events
        assert r.rtt_relay_received > 0 and r.relay_bytes_in > 0, "echoes came back over the relay"
        if is_direct(r.outcome):  # replies that came back over the direct path, not just echoes sent
            assert r.direct_verified and r.verify_received >= 1 and r.rtt_direct_received > 0
            assert r.direct_bytes_in >= 64 * r.rtt_direct_received and r.echo_direct_answered_on_relay == 0
        runs.append(r)
    RESULTS["netns"][(agent_nat, connector_nat)] = runs


def test_same_lan_is_direct_lan_on_netns(netns_ok):
    for nat in ("port_restricted", "symmetric"):
        r = run_trial(TrialSpec(backend="netns", agent_nat=nat, connector_nat=nat, scenario="same_lan",
                                profile="wan-20ms", samples=5, verify_echoes=5))
        assert r.outcome == "direct_lan", (nat, r.reason)


@pytest.mark.parametrize("mode", ["terminated", "sealed"])
def test_blackhole_falls_back_to_relay_within_two_seconds_on_netns(netns_ok, mode):
    """Sealed mode: the one connection migrates back to the relay within the same bound."""
    r = run_trial(TrialSpec(backend="netns", agent_nat="port_restricted", connector_nat="full_cone",
                            profile="wan-20ms", blackhole=True, samples=5, verify_echoes=5, mode=mode))
    assert r.direct_verified and r.mode == mode
    assert r.failover_ms is not None and r.failover_ms <= 2000, r.path_events
    assert r.echo_gap_ms is not None and r.echo_gap_ms <= 2500


# what `qlab classify` reports for hairpinning (a second socket of the same host), per preset
CLASSIFIED_HAIRPIN = {"public": None, "full_cone": True, "restricted_cone": True, "port_restricted": True,
                      "symmetric": False, "symmetric_seq": False}


@pytest.mark.parametrize("nat", PRESET_NAMES)
def test_classifier_names_every_preset_in_the_kernel(netns_ok, nat):
    out = run_classify("netns", nat)
    assert out["preset"] == nat, out
    assert out["hairpinning"] == CLASSIFIED_HAIRPIN[nat], out


def test_simulator_agrees_with_the_kernel(netns_ok):
    """Cross-validation: the same outcome in every cell, and over the endpoint-independent cells the
    simulator's medians (the shipped calibration, docs/sim.md) within 10 % of the kernel's for the
    direct and relay RTT and within 25 % for ttd and ttfb. benchmarks/crossval.py measures them within
    10 % on this machine, idle; the looser bound here holds on a loaded machine (the kernel lab's
    processing slows with load, the calibration does not), while a missing or extra round trip
    (20-60 ms at wan-20ms) or a lost punch round (hundreds of ms) still lands outside."""
    for a, c in CELLS:  # the matrix test's results when it ran in this session, else measured here
        if (a, c) not in RESULTS["netns"]:
            RESULTS["netns"][(a, c)] = [trial("netns", a, c, seed) for seed in SEEDS]
    mismatch = []
    figures: dict[str, dict[str, list[float]]] = {"sim": {}, "netns": {}}
    for a, c in CELLS:
        runs = {"sim": [trial("sim", a, c, seed) for seed in SEEDS], "netns": RESULTS["netns"][(a, c)]}
        if {r.outcome for r in runs["sim"]} != {r.outcome for r in runs["netns"]}:
            mismatch.append((a, c, sorted({r.outcome for r in runs["sim"]}), sorted({r.outcome for r in runs["netns"]})))
        if a in EIM and c in EIM:
            for backend, rs in runs.items():
                for f in ("ttd_ms", "ttfb_ms", "rtt_direct_p50_ms", "rtt_relay_p50_ms"):
                    figures[backend].setdefault(f, []).append(statistics.median(getattr(r, f) for r in rs))
    assert not mismatch, mismatch
    ratios = {f: statistics.median(figures["sim"][f]) / statistics.median(figures["netns"][f]) for f in figures["sim"]}
    print(f"\nsim / netns medians over the EIM cells: {ratios}")
    for f, bound in (("rtt_direct_p50_ms", 0.10), ("rtt_relay_p50_ms", 0.10), ("ttd_ms", 0.25), ("ttfb_ms", 0.25)):
        assert abs(ratios[f] - 1) <= bound, (f, ratios)


def test_simulator_agrees_with_the_kernel_on_a_real_path(netns_ok):
    """The same on `home-broadband` (jittered, in-order links of the same link model on both
    backends): outcomes equal per cell; over three cells the medians of the direct and relay RTT
    within 10 %, ttd within 25 % (benchmarks/crossval.py: within 12 % per cell on 5 trials)."""
    cells = [("full_cone", "full_cone"), ("port_restricted", "port_restricted"), ("port_restricted", "symmetric_seq")]
    figures: dict[str, dict[str, list[float]]] = {"sim": {}, "netns": {}}
    for a, c in cells:
        runs = {b: [run_trial(TrialSpec(backend=b, agent_nat=a, connector_nat=c, profile="home-broadband", seed=s,
                                        samples=8, verify_echoes=5)) for s in (1, 2, 3)] for b in ("sim", "netns")}
        assert {r.outcome for r in runs["sim"]} == {r.outcome for r in runs["netns"]}, (a, c, runs)
        for backend, rs in runs.items():
            for f in ("ttd_ms", "rtt_direct_p50_ms", "rtt_relay_p50_ms"):
                figures[backend].setdefault(f, []).append(statistics.median(getattr(r, f) for r in rs))
    ratios = {f: statistics.median(figures["sim"][f]) / statistics.median(figures["netns"][f]) for f in figures["sim"]}
    print(f"\nsim / netns medians, home-broadband: {ratios}")
    for f, bound in (("rtt_direct_p50_ms", 0.10), ("rtt_relay_p50_ms", 0.10), ("ttd_ms", 0.25)):
        assert abs(ratios[f] - 1) <= bound, (f, ratios)


def test_two_sequential_nats_go_direct_by_lockstep_prediction_in_the_kernel(netns_ok):
    """symmetric_seq x symmetric_seq on the kernel's NATs (nftables `numgen inc` ports), 20 trials
    (~30 s): at least 16 direct by prediction, each proven by echoes back over the direct path. The
    rate is measured at N = 30 in docs/traversal.md (30/30 and 28/30); at a true rate of 95 % this
    bound fails by chance in 0.3 % of runs (binomial), 30 trials with >= 27 would in 6 %."""
    runs = [trial("netns", "symmetric_seq", "symmetric_seq", seed) for seed in range(1, 21)]
    direct = [r for r in runs if r.outcome == "direct_predicted" and r.direct_verified and r.as_expected]
    assert len(direct) >= 16, [(r.seed, r.outcome, r.reason) for r in runs if r not in direct]
    assert all(r.punch == "attempted" and r.error == "" for r in runs)
    assert all(r.rtt_direct_received > 0 and r.echo_direct_answered_on_relay == 0 for r in direct)


@pytest.mark.parametrize("agent_nat,connector_nat", [("port_restricted", "symmetric"), ("symmetric", "port_restricted")])
def test_birthday_mode_in_the_kernel(netns_ok, agent_nat, connector_nat):
    """256 mappings on the random-port side, 1,024 probes to random ports of it: a trial misses only
    if no probe hits a mapping, q = (1 - 256/64512)^1024 = 0.017 (the kernel draws from 1024-65535).
    Asking for 2 of 4 fails by chance with P = q^4 + 4(1-q)q^3 = 2.0e-5."""
    runs = [trial("netns", agent_nat, connector_nat, seed, birthday=256) for seed in (1, 2, 3, 4)]
    assert sum(r.outcome == "direct_predicted" and r.direct_verified for r in runs) >= 2, [(r.outcome, r.reason) for r in runs]


# --- port mapping: the lab's routers run miniupnpd ------------------------------------------------

# the hard cells (relay or birthday without a mapping) with the mapping on either side, each protocol
# once; the full matrix of both backends is measured in docs/traversal.md
MAPPING_CELLS = [("symmetric+map", "symmetric"), ("symmetric", "symmetric+map"), ("port_restricted+upnp", "symmetric"),
                 ("symmetric_seq", "symmetric+pcp"), ("symmetric+map", "symmetric_seq"), ("full_cone+map", "port_restricted")]


@pytest.mark.parametrize("agent_nat,connector_nat", MAPPING_CELLS, ids=[f"{a}-{c}" for a, c in MAPPING_CELLS])
def test_a_mapping_side_makes_the_cell_direct_in_the_kernel_as_on_sim(netns_ok, agent_nat, connector_nat):
    for seed in (1, 2):
        r, s = trial("netns", agent_nat, connector_nat, seed), trial("sim", agent_nat, connector_nat, seed)
        assert r.error == "" and r.as_expected, (r.outcome, r.reason, r.expected, r.path_events)
        assert r.direct_verified and r.outcome == s.outcome, (r.outcome, s.outcome)
        side = "agent" if "+" in agent_nat else "connector"
        protocol = {"map": "pcp", "pcp": "pcp", "upnp": "upnp"}[_suffix(agent_nat, connector_nat)]
        assert getattr(r, f"{side}_mapping").startswith(f"{protocol} 203.0.113.10"), r
        assert getattr(s, f"{side}_mapping").split(":")[0] == getattr(r, f"{side}_mapping").split(":")[0]


def _suffix(*nats: str) -> str:
    return next(n.partition("+")[2] for n in nats if "+" in n)


@pytest.mark.parametrize("nat,offered", [("symmetric+map", ["pcp", "natpmp", "upnp"]),
                                         ("port_restricted+upnp", ["upnp"]), ("full_cone+pcp", ["pcp", "natpmp"])])
def test_classify_reports_the_mapping_protocols_in_the_kernel(netns_ok, nat, offered):
    out = run_classify("netns", nat)
    assert out["port_mapping"] == offered and out["preset"] == nat, out


# sealed mode in the kernel: an endpoint-independent cell, a peer-reflexive (D>) one, a relay one
SEALED_CELLS = [("port_restricted", "port_restricted"), ("symmetric", "full_cone"), ("symmetric", "port_restricted")]


@pytest.mark.parametrize("agent_nat,connector_nat", SEALED_CELLS, ids=[f"{a}-{c}" for a, c in SEALED_CELLS])
def test_sealed_sessions_in_the_kernel(netns_ok, agent_nat, connector_nat):
    """One end-to-end connection through the kernel's NATs: relayed sealed, then migrated to the
    punched pair (no second handshake) and proven with the relay switched off for the session."""
    r = trial("netns", agent_nat, connector_nat, 1, mode="sealed")
    assert r.error == "" and r.mode == "sealed" and r.as_expected, (r.outcome, r.reason, r.path_events)
    assert r.outcome == CELL_OUTCOME[(agent_nat, connector_nat)], (r.outcome, r.reason)
    assert r.rtt_relay_received > 0 and any(e["event"] == "sealed_connected" for e in r.path_events)
    if is_direct(r.outcome):
        assert r.direct_verified and r.verify_received >= 1 and r.echo_direct_answered_on_relay == 0
        connected = next(e for e in r.path_events if e["event"] == "direct_connected")
        assert connected["detail"].startswith("migrated the end-to-end connection to"), connected


def test_the_upgrade_of_an_established_session_is_cheaper_sealed_in_the_kernel(netns_ok):
    """Same cell, same run, interleaved: sealed mode's upgrade (a migration) beats terminated
    mode's (a handshake) by a direct RTT or more, over 3 trials each (medians)."""
    up: dict[str, list[float]] = {"terminated": [], "sealed": []}
    rtt = []
    for seed in (1, 2, 3):
        for mode in up:
            r = trial("netns", "full_cone", "port_restricted", seed, mode=mode, punch_delay=0.5)
            assert r.direct_verified and r.upgrade_ms is not None, (mode, r.reason)
            up[mode].append(r.upgrade_ms)
            rtt.append(r.rtt_direct_p50_ms)
    assert statistics.median(up["sealed"]) <= statistics.median(up["terminated"]) - statistics.median(rtt), (up, rtt)


def test_kernel_labs_run_in_parallel_with_the_expected_matrix(netns_ok, tmp_path):
    """`--workers 2` on netns: two labs at once (their trials overlap in time), every cell as expected,
    each trial's lab gone afterwards."""
    import json
    import subprocess

    from qlab.study import campaign

    spec = campaign.CampaignSpec(backend="netns", agent_nats=["full_cone", "symmetric"],
                                 connector_nats=["public", "port_restricted", "symmetric"], trials=1, samples=5,
                                 campaign_id="netns-par")
    def labs() -> set[str]:
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        return {line.split()[0] for line in listing.splitlines() if line.startswith("qlab-")}

    before = labs()
    folder = campaign.run(spec, root=tmp_path, progress=False, workers=2)
    recs = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(r["as_expected"] for r in recs), [(r["trial_id"], r["outcome"]) for r in recs]
    spans = sorted((r["started_at"], r["started_at"] + r["duration_s"]) for r in recs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), "no two labs ran at once"
    assert labs() <= before
