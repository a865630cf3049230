"""The trial record without any networking: the schema, the judging rules, the spec's validation,
and that loading results imports no aioquic."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from qlab.experiment.record import (
    FAULTS,
    OUTCOMES,
    Fault,
    Outcome,
    PunchState,
    TrialResult,
    TrialSpec,
    is_direct,
    judge,
    punch_state,
)

# The record's columns, in order, as written before the experiment layer was split: changing
# one breaks every stored campaign and notebook.
FIELDS = [
    "trial_id", "campaign_id", "backend", "scenario", "agent_nat", "connector_nat", "profile", "seed",
    "qlab_version", "started_at", "duration_s", "expected", "outcome", "reason", "as_expected", "direct_verified",
    "agent_nat_detected", "connector_nat_detected", "agent_candidates", "connector_candidates", "agent_probes",
    "connector_probes", "predicted_ports", "working_pair", "punch_ms", "ttfb_ms", "ttd_ms", "rtt_relay_p50_ms",
    "rtt_relay_p95_ms", "rtt_relay_loss", "rtt_relay_n", "rtt_direct_p50_ms", "rtt_direct_p95_ms",
    "rtt_direct_loss", "rtt_direct_n", "relay_bytes_out", "relay_bytes_in", "direct_bytes_out", "direct_bytes_in",
    "verify_sent", "verify_received", "failover_ms", "echo_gap_ms", "path_events", "measured_with", "error",
    "extra", "rtt_relay_sent", "rtt_relay_received", "rtt_direct_sent", "rtt_direct_received",
    "echo_direct_answered_on_relay", "echo_relay_answered_on_direct", "punch", "sim_calibration",
    "mechanism", "agent_mapping", "connector_mapping", "path_family", "mode", "upgrade_ms", "punch_delay",
]


def test_loading_results_imports_no_networking():
    code = "import qlab.study.results, sys; assert not any(m.startswith('aioquic') for m in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_record_imports_nothing_but_the_standard_library():
    code = ("import sys; before = set(sys.modules); import qlab.experiment.record; "
            "new = {m for m in set(sys.modules) - before if m.startswith('qlab.')}; "
            "assert new <= {'qlab.experiment', 'qlab.experiment.record'}, new")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _result(**kw: object) -> TrialResult:
    values: dict[str, object] = {f.name: None for f in dataclasses.fields(TrialResult)
                                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values.update(kw)
    return TrialResult(**values)  # type: ignore[arg-type]


def test_to_dict_field_names_are_the_schema():
    assert list(_result().to_dict()) == FIELDS


def test_to_dict_defaults_of_added_fields():
    d = _result(outcome="relay").to_dict()
    assert d["error"] == "" and d["extra"] == {}
    assert all(d[k] is None for k in FIELDS[FIELDS.index("rtt_relay_sent"):])


def test_enums_keep_the_stored_strings():
    assert OUTCOMES == ("direct_lan", "direct_wan", "direct_predicted", "direct_mapped", "relay", "failed")
    assert FAULTS == ("", "rebind", "idle", "intermediate_restart", "connector_restart")
    assert all(type(o) is str for o in OUTCOMES + FAULTS)
    assert Outcome.RELAY == "relay" and Fault.NONE == ""
    assert [p.value for p in PunchState] == ["attempted", "skipped", "none"]


@pytest.mark.parametrize("outcome,direct", [
    ("direct_lan", True), ("direct_wan", True), ("direct_predicted", True), ("relay", False), ("failed", False),
    (Outcome.DIRECT_WAN, True), (Outcome.RELAY, False),
])
def test_is_direct(outcome, direct):
    assert is_direct(outcome) is direct


@pytest.mark.parametrize("expected,outcome,scenario,birthday,lan_nat,ok", [
    # D and D>: any direct path but a predicted one
    ("D", "direct_wan", "pair", False, "", True),
    ("D", "direct_lan", "pair", False, "", True),
    ("D>", "direct_wan", "pair", False, "", True),
    ("D", "direct_predicted", "pair", False, "", False),
    ("D", "relay", "pair", False, "", False),
    # P: only a predicted port
    ("P", "direct_predicted", "pair", False, "", True),
    ("P", "direct_wan", "pair", False, "", False),
    ("P", "relay", "pair", False, "", False),
    # B: direct with birthday mode on, relay without
    ("B", "direct_wan", "pair", True, "", True),
    ("B", "direct_predicted", "pair", True, "", True),
    ("B", "relay", "pair", True, "", False),
    ("B", "relay", "pair", False, "", True),
    ("B", "direct_wan", "pair", False, "", False),
    # D and D> with birthday mode on: its spray may win the race, any direct path is as expected
    ("D>", "direct_predicted", "pair", True, "", True),
    ("D>", "direct_predicted", "pair", False, "", False),
    ("D>", "relay", "pair", True, "", False),
    # M: only through a mapping
    ("M", "direct_mapped", "pair", False, "", True),
    ("M", "direct_wan", "pair", False, "", False),
    ("M", "relay", "pair", False, "", False),
    ("D", "direct_mapped", "pair", False, "", True),
    # R: the relay
    ("R", "relay", "pair", False, "", True),
    ("R", "direct_wan", "pair", False, "", False),
    # a failed trial never matches; "?" (unknown NAT) expects nothing
    ("D", "failed", "pair", False, "", False),
    ("R", "failed", "pair", False, "", False),
    ("?", "relay", "pair", False, "", False),
    ("?", "direct_wan", "pair", False, "", False),
    # same_lan: a LAN pair, except two public hosts (a WAN pair)
    ("R", "direct_lan", "same_lan", False, "symmetric", True),
    ("R", "direct_wan", "same_lan", False, "symmetric", False),
    ("D", "direct_wan", "same_lan", False, "public", True),
    ("D", "direct_lan", "same_lan", False, "public", False),
    ("D", "failed", "same_lan", False, "public", False),
])
def test_judge(expected, outcome, scenario, birthday, lan_nat, ok):
    assert judge(expected, outcome, scenario, birthday, lan_nat=lan_nat) is ok


@pytest.mark.parametrize("events,state", [
    ([], PunchState.NONE),
    ([{"event": "relay_up"}], PunchState.NONE),
    ([{"event": "punch_skipped"}], PunchState.SKIPPED),
    ([{"event": "punch_start"}], PunchState.ATTEMPTED),
    ([{"event": "punch_skipped"}, {"event": "punch_start"}], PunchState.ATTEMPTED),
])
def test_punch_state(events, state):
    assert punch_state(events) is state


@pytest.mark.parametrize("kw,message", [
    ({"samples": 0}, "samples"),
    ({"samples": 10001}, "samples"),
    ({"verify_echoes": 0}, "verify_echoes"),
    ({"echo_size": 15}, "echo_size"),
    ({"echo_size": 1201}, "echo_size"),
    ({"echo_interval": 0.0005}, "echo_interval"),
    ({"echo_interval": 6}, "echo_interval"),
    ({"punch_timeout": 0.05}, "punch_timeout"),
    ({"punch_timeout": 61}, "punch_timeout"),
    ({"fault": "meteor"}, "unknown fault"),
])
def test_spec_rejects(kw, message):
    with pytest.raises(ValueError, match=message):
        TrialSpec(**kw)


@pytest.mark.parametrize("kw", [
    {}, {"samples": 1}, {"samples": 10000}, {"echo_size": 16}, {"echo_size": 1200}, {"echo_interval": 0.001},
    {"echo_interval": 5}, {"punch_timeout": 0.1}, {"punch_timeout": 60}, *({"fault": f} for f in FAULTS),
])
def test_spec_accepts(kw):
    spec = TrialSpec(**kw)
    assert len(spec.trial_id) == 12  # a fresh id when none is given


def test_spec_keeps_a_given_trial_id():
    assert TrialSpec(trial_id="abc").trial_id == "abc"


def test_notebooks_of_the_flat_layout_still_import_for_one_release():
    """`from qlab import results` (the old flat layout) resolves to qlab.study.results, with a warning."""
    code = ("import warnings, qlab.study.results as new\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    from qlab import results, analysis\n"
            "assert results is new and analysis.__name__ == 'qlab.study.analysis'\n"
            "assert any('qlab.study.results' in str(x.message) for x in w), [str(x.message) for x in w]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    with pytest.raises(AttributeError):
        import qlab

        qlab.nothing_here  # noqa: B018


def test_an_exception_without_a_message_still_says_what_happened():
    from qlab.experiment.record import error_text

    assert error_text(TimeoutError()) == "TimeoutError: timed out"
    assert error_text(RuntimeError()) == "RuntimeError: no message"
    assert error_text(OSError("port in use")) == "OSError: port in use"
