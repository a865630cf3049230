"""Whole trials: every NAT pair on the simulator, same LAN, fallback, birthday mode, and real loopback
sockets. The sans-IO puncher itself is tests/test_punch.py."""

from __future__ import annotations

import pytest

from qlab.experiment.classify import run_classify
from qlab.experiment.record import TrialSpec, judge
from qlab.experiment.trial import run_trial
from qlab.nat.spec import EXPECTED, PRESET_NAMES

# --- whole trials on the simulator ---------------------------------------------------------------

CELLS = [(a, c) for a in PRESET_NAMES for c in PRESET_NAMES]
# presets whose NAT maps endpoint-dependently (docs/traversal.md), written out here: a pair of two is
# the cell where policy skips the punch
ENDPOINT_DEPENDENT = {"symmetric", "symmetric_seq"}
# ... except the one such pair that punches: both sides sequential, each predicting the other in lockstep
LOCKSTEP = ("symmetric_seq", "symmetric_seq")


def skipped_by_policy(agent_nat: str, connector_nat: str, punch_anyway: bool = False) -> bool:
    """Whether policy skips the punch of a cell (its record says `punch: skipped`)."""
    both = agent_nat in ENDPOINT_DEPENDENT and connector_nat in ENDPOINT_DEPENDENT
    return both and (agent_nat, connector_nat) != LOCKSTEP and not punch_anyway

# the outcome of every cell on wan-20ms (the design's table, docs/traversal.md), written out here
# rather than read from qlab.nat.spec.EXPECTED or the judge: rows Agent NAT, columns Connector NAT in
# PRESET_NAMES order (public, full_cone, restricted_cone, port_restricted, symmetric, symmetric_seq)
_ROWS = {
    "public":          "wan wan wan wan wan wan",
    "full_cone":       "wan wan wan wan wan wan",
    "restricted_cone": "wan wan wan wan wan wan",
    "port_restricted": "wan wan wan wan relay predicted",
    "symmetric":       "wan wan wan relay relay relay",
    "symmetric_seq":   "wan wan wan predicted relay predicted",
}
CELL_OUTCOME = {(a, c): f"direct_{o}" if o != "relay" else o
                for a, row in _ROWS.items() for c, o in zip(PRESET_NAMES, row.split(), strict=True)}


def assert_received_on_its_path(r, lossless: bool = True) -> None:
    """What a record claims, checked against what came back (nothing here holds by construction).
    `lossless`: the profile drops nothing (wan-20ms) and the simulator is deterministic, so every
    echo must come back."""
    assert r.rtt_relay_received > 0 and r.relay_bytes_in > 0, "echoes came back over the relay"
    if lossless:
        assert r.rtt_relay_loss == 0 and r.rtt_direct_loss in (0, None), (r.rtt_relay_loss, r.rtt_direct_loss)
    if r.outcome.startswith("direct"):
        assert r.direct_verified and r.verify_received >= 1
        assert r.rtt_direct_received > 0 and r.direct_bytes_in >= 64 * r.rtt_direct_received
        assert r.rtt_direct_loss is not None and r.rtt_direct_loss < 0.5
        assert r.ttd_ms is not None and r.rtt_direct_p50_ms is not None
    else:
        assert r.ttd_ms is None and r.rtt_direct_received == 0 and r.direct_bytes_in == 0
    assert r.echo_direct_answered_on_relay == 0 and r.echo_relay_answered_on_direct == 0


@pytest.mark.parametrize("agent_nat,connector_nat", CELLS, ids=[f"{a}-{c}" for a, c in CELLS])
def test_matrix_cell_on_sim_gives_expected_outcome(agent_nat, connector_nat):
    for seed in (1, 2, 3):
        r = run_trial(TrialSpec(backend="sim", agent_nat=agent_nat, connector_nat=connector_nat,
                                profile="wan-20ms", seed=seed, samples=5, verify_echoes=5))
        assert r.error == "", r.error
        assert r.outcome != "failed", "every trial must end connected"
        assert r.outcome == CELL_OUTCOME[(agent_nat, connector_nat)], (r.outcome, r.reason)
        assert r.as_expected, f"{agent_nat} x {connector_nat} seed {seed}: {r.outcome} ({r.reason}), expected {r.expected}"
        assert r.ttfb_ms is not None
        assert_received_on_its_path(r)
        assert r.punch == ("skipped" if skipped_by_policy(agent_nat, connector_nat) else "attempted"), r.path_events
        if r.outcome == "relay":
            assert r.reason, "every non-direct outcome has a reason"


def test_sim_trials_are_deterministic():
    spec = dict(backend="sim", agent_nat="port_restricted", connector_nat="symmetric_seq", profile="jittery",
                seed=42, samples=5, verify_echoes=5)
    a, b = run_trial(TrialSpec(**spec)).to_dict(), run_trial(TrialSpec(**spec)).to_dict()
    for k in ("outcome", "ttfb_ms", "ttd_ms", "rtt_direct_p50_ms", "rtt_relay_p95_ms", "working_pair",
              "agent_candidates", "connector_candidates"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("nat", PRESET_NAMES)
def test_same_lan_ends_direct_lan(nat):
    r = run_trial(TrialSpec(backend="sim", agent_nat=nat, connector_nat=nat, scenario="same_lan", samples=5,
                            verify_echoes=5))
    assert r.as_expected, (r.outcome, r.reason)
    if nat == "public":
        assert r.outcome == "direct_wan"  # two public hosts: their own addresses are not a LAN
    else:
        assert r.outcome == "direct_lan", r.reason
        assert r.working_pair.startswith("10.1.0.")


def test_time_to_first_byte_and_to_direct_on_easy_nats():
    """Targets from the issue: ttfb <= 1.25 x relay RTT; ttd <= 1.25 x (relay RTT + 2 x direct RTT)."""
    for a, c in (("full_cone", "port_restricted"), ("port_restricted", "port_restricted"), ("public", "full_cone")):
        r = run_trial(TrialSpec(backend="sim", agent_nat=a, connector_nat=c, profile="wan-20ms", samples=10))
        assert r.ttfb_ms <= 1.25 * r.rtt_relay_p50_ms, r.ttfb_ms
        assert r.ttd_ms <= 1.25 * (r.rtt_relay_p50_ms + 2 * r.rtt_direct_p50_ms), (r.ttd_ms, r.path_events)


def test_blackholed_direct_path_falls_back_to_relay_within_the_bound():
    r = run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat="full_cone",
                            profile="wan-20ms", blackhole=True, samples=5))
    assert r.outcome == "direct_wan"
    assert r.failover_ms is not None and 0 < r.failover_ms <= 2000
    assert r.echo_gap_ms is not None and r.echo_gap_ms <= 2000 + 2 * r.rtt_relay_p50_ms
    events = [e["event"] for e in r.path_events]
    assert events.index("direct_lost") > events.index("switch_to_direct")


def test_both_endpoint_dependent_stays_on_relay_without_burning_time():
    r = run_trial(TrialSpec(backend="sim", agent_nat="symmetric", connector_nat="symmetric_seq", samples=5))
    assert r.outcome == "relay" and "endpoint-dependent" in r.reason
    assert r.agent_probes == 0 and r.connector_probes == 0
    assert r.punch == "skipped"  # decided by policy, and the record says so


def test_two_sequential_nats_go_direct_by_lockstep_prediction():
    """symmetric_seq x symmetric_seq over 30 seeds: each side's k-th new mapping goes to the peer's
    k-th predicted port (docs/traversal.md, "Lockstep prediction"). The simulator is deterministic
    per seed, so the bound is no matter of chance; 30/30 measured."""
    runs = [run_trial(TrialSpec(backend="sim", agent_nat="symmetric_seq", connector_nat="symmetric_seq",
                                profile="wan-20ms", seed=seed, samples=5, verify_echoes=5)) for seed in range(1, 31)]
    direct = [r for r in runs if r.outcome == "direct_predicted" and r.direct_verified and r.as_expected]
    assert len(direct) >= 27, [(r.seed, r.outcome, r.reason) for r in runs if r not in direct]
    assert all(r.punch == "attempted" and r.expected == "P" for r in runs)
    for r in direct:  # the pair is a predicted port of the Connector, and the probes stayed in the budget
        assert r.working_pair in [c.split(":", 1)[1] for c in r.connector_candidates if c.startswith("predicted:")]
        assert 8 <= r.agent_probes <= 13 and 8 <= r.connector_probes <= 13
        assert_received_on_its_path(r)


@pytest.mark.parametrize("agent_nat,connector_nat", [("symmetric", "symmetric_seq"), ("symmetric_seq", "symmetric")])
def test_punch_anyway_measures_the_endpoint_dependent_cells(agent_nat, connector_nat):
    """The cells policy decides, measured: both sides probe, and the NATs (not the policy) keep
    the pair on the relay."""
    r = run_trial(TrialSpec(backend="sim", agent_nat=agent_nat, connector_nat=connector_nat, samples=5,
                            punch_anyway=True))
    assert r.punch == "attempted" and r.agent_probes > 0 and r.connector_probes > 0
    assert r.outcome == "relay" and "hole punch failed" in r.reason and r.as_expected, r.reason
    assert_received_on_its_path(r)


# (scenario, lan NAT, outcome) -> as expected? Two public hosts share no LAN: their pair is WAN.
JUDGED = [("same_lan", "public", "direct_wan", True), ("same_lan", "public", "direct_lan", False),
          ("same_lan", "port_restricted", "direct_lan", True), ("same_lan", "port_restricted", "direct_wan", False),
          ("same_lan", "symmetric", "relay", False)]


@pytest.mark.parametrize("scenario,nat,outcome,ok", JUDGED)
def test_judge_same_lan(scenario, nat, outcome, ok):
    assert judge("D", outcome, scenario, False, lan_nat=nat) is ok


@pytest.mark.parametrize("nat", PRESET_NAMES)
def test_classifier_names_every_preset_on_sim(nat):
    out = run_classify("sim", nat)
    assert out["preset"] == nat, out


def test_expected_table_is_complete():
    assert len(EXPECTED) == 36


# --- real sockets ---------------------------------------------------------------------------------


def test_loopback_trial_goes_direct_on_real_sockets():
    r = run_trial(TrialSpec(backend="loopback", agent_nat="public", connector_nat="public", profile="lan", samples=10))
    assert r.outcome == "direct_wan" and r.direct_verified, r.reason
    assert r.verify_received == r.verify_sent == 10
    # 10 samples per path plus the settle and proof echoes came back, each over its own path
    assert r.rtt_direct_received >= 10 and r.rtt_relay_received >= 10, (r.rtt_direct_received, r.rtt_relay_received)
    assert r.direct_bytes_in >= 64 * 10 and r.echo_direct_answered_on_relay == 0


def test_loopback_backend_refuses_nat_presets_with_a_clear_error():
    from qlab.backends.base import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="no NAT"):
        run_trial(TrialSpec(backend="loopback", agent_nat="full_cone", connector_nat="public", profile="lan"))


def _birthday_trial(agent_nat: str, connector_nat: str, seed: int):
    return run_trial(TrialSpec(backend="sim", agent_nat=agent_nat, connector_nat=connector_nat, seed=seed,
                               birthday=256, birthday_probes=1024, samples=5, verify_echoes=5))


@pytest.mark.parametrize("agent_nat,connector_nat", [("port_restricted", "symmetric"), ("symmetric", "port_restricted")])
def test_birthday_mode_on_sim_reaches_at_least_90_percent(agent_nat, connector_nat):
    """256 mappings x 1,024 random probes hit with p = 1 - (1 - 256/64512)^1024 = 98.3% (Tailscale's
    arithmetic; 1,968/2,000 measured). At least 54 of 60: a correct build misses that with
    p < 1e-4 (binomial tail), and since the sim seeds the spray from the trial's seed, not at all
    for a given build."""
    runs = [_birthday_trial(agent_nat, connector_nat, s) for s in range(60)]
    direct = [r for r in runs if r.outcome == "direct_predicted" and r.direct_verified]
    assert len(direct) >= 54, [(r.outcome, r.reason) for r in runs]
    assert all(r.as_expected for r in direct)
    assert all(r.outcome != "failed" for r in runs)


def test_a_birthday_trial_on_sim_repeats_exactly():
    """The spray's random ports come from the trial's seed on the sim: one seed, one story (a miss
    included: seed 710 misses with these NATs)."""
    for seed in (3, 710):
        a, b = (_birthday_trial("port_restricted", "symmetric", seed) for _ in range(2))
        assert (a.outcome, a.agent_probes, a.path_events) == (b.outcome, b.agent_probes, b.path_events)
    assert _birthday_trial("port_restricted", "symmetric", 710).outcome == "relay"


def test_birthday_mode_is_off_by_default():
    r = run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat="symmetric", samples=5))
    assert r.outcome == "relay" and not any(e["event"] == "birthday" for e in r.path_events)


def test_trial_command_punches_anyway_and_proves_with_the_relay_on(capsys):
    """`qlab trial --punch-anyway --relay-stays-on` reaches the record: a punched relay cell, and a
    proof that says it ran with the relay left on."""
    import json

    from qlab.cli.main import main

    assert main(["trial", "--agent-nat", "symmetric", "--connector-nat", "symmetric", "--punch-anyway",
                 "--relay-stays-on", "--samples", "5", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["punch"] == "attempted" and rec["agent_probes"] > 0 and rec["outcome"] == "relay"
    assert "the relay stayed on" in rec["measured_with"]


# --- port mapping: a side whose router grants a mapping (PCP, NAT-PMP, UPnP IGD) -------------------

NATTED = [p for p in PRESET_NAMES if p != "public"]
MAPPING_CELLS = sorted({(f"{m}+map", o) for m in NATTED for o in PRESET_NAMES}
                       | {(o, f"{m}+map") for m in NATTED for o in PRESET_NAMES})


def mapped_cell_outcome(agent_nat: str, connector_nat: str) -> str:
    """Written out: with a mapping on either side every cell is direct; the cells that were direct
    without it may use the mapping or not, the others are direct through it."""
    plain = CELL_OUTCOME[(agent_nat.partition("+")[0], connector_nat.partition("+")[0])]
    return "direct" if plain == "direct_wan" else "direct_mapped"


@pytest.mark.parametrize("agent_nat,connector_nat", MAPPING_CELLS, ids=[f"{a}-{c}" for a, c in MAPPING_CELLS])
def test_a_mapping_side_makes_every_cell_direct_on_sim(agent_nat, connector_nat):
    r = run_trial(TrialSpec(backend="sim", agent_nat=agent_nat, connector_nat=connector_nat, profile="wan-20ms",
                            seed=1, samples=5, verify_echoes=5))
    assert r.error == "" and r.as_expected, (r.outcome, r.reason, r.expected)
    want = mapped_cell_outcome(agent_nat, connector_nat)
    assert r.outcome.startswith(want), (r.outcome, want, r.path_events)
    assert_received_on_its_path(r)
    mapped_side = "agent" if "+" in agent_nat else "connector"
    assert getattr(r, f"{mapped_side}_mapping").startswith("pcp 203.0.113.")  # PCP is asked first
    assert getattr(r, f"{'connector' if mapped_side == 'agent' else 'agent'}_mapping") == ""
    if r.outcome == "direct_mapped":
        assert r.mechanism == "mapping" and r.expected in ("M", "D", "D>")


@pytest.mark.parametrize("suffix,protocol", [("pcp", "pcp"), ("upnp", "upnp")])
def test_each_protocol_alone_gives_the_mapping(suffix, protocol):
    r = run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat=f"symmetric+{suffix}",
                            profile="wan-20ms", seed=2, samples=5, verify_echoes=5))
    assert r.outcome == "direct_mapped" and r.connector_mapping.startswith(f"{protocol} 203.0.113.102:"), r
    assert any(c.startswith("mapped:203.0.113.102:") for c in r.connector_candidates), r.connector_candidates


def test_no_mapping_is_asked_for_where_none_is_offered_and_cells_keep_their_outcome():
    r = run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat="symmetric", seed=1,
                            samples=5, verify_echoes=5))
    assert r.outcome == "relay" and r.agent_mapping == "" and r.connector_mapping == "" and r.mechanism is None


@pytest.mark.parametrize("nat,offered", [("symmetric+map", ["pcp", "natpmp", "upnp"]),
                                         ("full_cone+pcp", ["pcp", "natpmp"]), ("port_restricted+upnp", ["upnp"]),
                                         ("symmetric", [])])
def test_classify_reports_the_mapping_protocols_on_sim(nat, offered):
    out = run_classify("sim", nat)
    assert out["port_mapping"] == offered and out["preset"] == nat and out["correct"], out


def test_birthday_mode_costs_nothing_where_the_plain_punch_works():
    """With birthday mode on, a D> cell (a cone Agent, a symmetric Connector) still goes direct by
    the peer-reflexive pair, as fast as without it: the hard side's pool opens only if the plain
    punch found nothing (measured before: 29/30 direct, median ttd 290 ms; after: 30/30, 103 ms)."""
    import statistics

    runs = [run_trial(TrialSpec(backend="sim", agent_nat="full_cone", connector_nat="symmetric", profile="wan-20ms",
                                seed=s, samples=5, verify_echoes=5, birthday=256)) for s in range(1, 11)]
    assert all(r.outcome == "direct_wan" and r.as_expected for r in runs), [(r.seed, r.outcome) for r in runs]
    assert statistics.median(r.ttd_ms for r in runs) < 150
