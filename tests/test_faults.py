"""Faults inside trials, on the simulator and on the kernel lab: NAT rebinding, binding timeouts
shorter and longer than the keepalive, lossy links. Each asserts a recorded outcome."""

from __future__ import annotations

import pytest

from qlab.trial import TrialSpec, run_trial

BACKENDS = ["sim", "netns"]


def _needs(backend: str, request) -> None:
    if backend == "netns":
        request.getfixturevalue("netns_ok")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nat_rebinding_keeps_the_session_and_qad_reports_it(backend, request):
    _needs(backend, request)
    r = run_trial(TrialSpec(backend=backend, agent_nat="symmetric", connector_nat="full_cone", fault="rebind",
                            samples=5, verify_echoes=5))
    f = r.extra["fault"]
    assert f["qad_reported_new_address"], f  # the Intermediate saw the new mapping and said so
    assert f["echoes_after"] > 10, f  # the session kept carrying traffic
    assert f["max_echo_gap_ms"] is not None and f["max_echo_gap_ms"] < 2500, f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("timeout,keepalive,kept", [(1.0, 2.0, False), (3.0, 0.5, True)])
def test_binding_timeout_versus_keepalive(backend, timeout, keepalive, kept, request):
    """A binding timeout below the keepalive interval loses the direct path (traffic falls back to
    the relay); one above it keeps the path through idle time. (The kernel's binding timeouts have
    whole-second granularity, so the short case is 1 s against a 2 s keepalive.)"""
    _needs(backend, request)
    r = run_trial(TrialSpec(backend=backend, agent_nat="port_restricted", connector_nat="port_restricted",
                            fault="idle", idle_s=7.0, binding_timeout=timeout, keepalive=keepalive, samples=5,
                            verify_echoes=5))
    f = r.extra["fault"]
    assert f["direct_before"], (r.outcome, r.reason)
    assert f["direct_lost"] is (not kept), f
    assert f["direct_after"] is kept, f


@pytest.mark.parametrize("profile", ["lossy-1pct", "lossy-5pct", "lossy-20pct"])
def test_loss_degrades_gracefully_and_nothing_hangs(profile):
    outcomes = []
    for seed in range(4):
        r = run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat="full_cone",
                                profile=profile, seed=seed, samples=8))
        assert r.outcome != "failed" or r.reason, "a failed trial says why"
        assert r.duration_s < 30, "every wait is bounded"
        outcomes.append(r.outcome)
    direct = sum(o.startswith("direct") for o in outcomes)
    assert direct >= {"lossy-1pct": 4, "lossy-5pct": 3, "lossy-20pct": 1}[profile], outcomes


@pytest.mark.parametrize("profile", ["lossy-1pct", "lossy-5pct", "lossy-20pct"])
def test_loss_on_the_kernel_lab_degrades_gracefully(netns_ok, profile):
    r = run_trial(TrialSpec(backend="netns", agent_nat="port_restricted", connector_nat="full_cone",
                            profile=profile, samples=8, verify_echoes=5))
    assert r.outcome in ("direct_wan", "relay"), (r.outcome, r.reason)  # connected, one way or the other
    assert r.rtt_relay_n > 0 and r.duration_s < 40
    if profile != "lossy-20pct":
        assert r.outcome == "direct_wan", r.reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_intermediate_killed_and_restarted(backend, request):
    """The Intermediate vanishes (no CONNECTION_CLOSE, all state gone) for 3 s, then a new one starts:
    the direct path keeps carrying traffic meanwhile; Agent and Connector reconnect with backoff, the
    session is re-opened and works over the relay again within the liveness bound."""
    _needs(backend, request)
    r = run_trial(TrialSpec(backend=backend, agent_nat="port_restricted", connector_nat="full_cone",
                            fault="intermediate_restart", outage_s=3.0, samples=5, verify_echoes=5))
    f = r.extra["fault"]
    assert f["direct_before"] and f["direct_echoes_during_outage"] >= 100, f  # ~150 sent at 20 ms
    assert f["relay_recovered"] and f["recovery_ms_after_restart"] < 12000, f
    assert f["agent_reconnects"] >= 1 and f["connector_reconnects"] >= 1 and f["session_reopened"] == 1, f


@pytest.mark.parametrize("backend", BACKENDS)
def test_connector_restart_recovers_the_session(backend, request):
    """The Connector stops and a new one starts 1 s later: the Agent keeps its session, re-opens it,
    punches again and is back on a direct path; the gap in echoes is recorded."""
    _needs(backend, request)
    r = run_trial(TrialSpec(backend=backend, agent_nat="port_restricted", connector_nat="full_cone",
                            fault="connector_restart", outage_s=1.0, samples=5, verify_echoes=5))
    f = r.extra["fault"]
    assert f["session_reopened"] and f["path_after"] == "direct", f
    assert f["echo_gap_ms"] is not None and 1000 <= f["echo_gap_ms"] < 8000, f
    assert "session_reopened" in f["events"] and "switch_to_direct" in f["events"], f
