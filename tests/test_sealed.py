"""Sealed mode (`wire.SessionMode.SEALED`): one end-to-end QUIC connection per session, relayed as
opaque frames, migrated to the punched path. In the simulator (deterministic, virtual time): the
trial record, the proof with the relay off, the upgrade's cost against terminated mode, the faults;
and what a hostile Agent can make a Connector hold through its session's tunnel.

The kernel lab's sealed trials are in tests/test_netns_trials.py; the Intermediate's memory is
searched for application bytes in tests/test_sealed_memory.py."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from qlab import wire
from qlab.certs import CONNECTOR_NAME, Credentials
from qlab.endpoint import SEALED_DATAGRAM_SIZE, Endpoint, Handler
from qlab.experiment.record import SEALED_MAX_PAYLOAD, TrialSpec
from qlab.experiment.trial import run_trial
from qlab.net import RealNet
from tests.hostile.test_quic_floods import Initials


def sealed(**kw) -> dict:
    return run_trial(TrialSpec(mode="sealed", **kw)).to_dict()


def test_a_sealed_session_migrates_to_the_punched_pair_and_proves_it_with_the_relay_off() -> None:
    r = sealed(agent_nat="port_restricted", connector_nat="port_restricted", seed=3)
    events = [e["event"] for e in r["path_events"]]
    assert r["outcome"] == "direct_wan" and r["direct_verified"] and r["mode"] == "sealed"
    assert r["verify_received"] == r["verify_sent"] == 10  # the relay switched off for the session
    assert events.index("sealed_connected") < events.index("direct_connected") < events.index("direct_verified")
    connected = next(e for e in r["path_events"] if e["event"] == "direct_connected")
    assert connected["detail"].startswith("migrated the end-to-end connection to")  # no second connection
    assert r["rtt_relay_n"] >= 20 and r["rtt_direct_n"] >= 20 and "in turn" in r["measured_with"]
    assert r["echo_direct_answered_on_relay"] == 0


def test_a_relay_cell_stays_on_the_sealed_connection_through_the_relay() -> None:
    r = sealed(agent_nat="symmetric", connector_nat="symmetric", seed=1)
    assert r["outcome"] == "relay" and r["as_expected"] and r["ttfb_ms"] is not None
    assert r["rtt_relay_received"] >= 20 and r["rtt_direct_sent"] == 0


@pytest.mark.parametrize("cell", [("full_cone", "full_cone"), ("port_restricted", "port_restricted"),
                                  ("symmetric", "full_cone")])
def test_the_upgrade_of_an_established_session_costs_a_direct_rtt_less(cell: tuple[str, str]) -> None:
    """The issue's target, where it holds: once the session runs on the relay (punch_delay), sealed
    mode's upgrade is a migration and one round trip; terminated mode's a handshake and one."""
    a, c = cell
    up: dict[str, list[float]] = {"terminated": [], "sealed": []}
    rtt: list[float] = []
    for seed in range(3):
        for mode in up:
            r = run_trial(TrialSpec(agent_nat=a, connector_nat=c, seed=seed, mode=mode, punch_delay=1.0,
                                    samples=5)).to_dict()
            assert r["direct_verified"], r["reason"]
            up[mode].append(r["upgrade_ms"])
            rtt.append(r["rtt_direct_p50_ms"])
    assert statistics.median(up["sealed"]) <= statistics.median(up["terminated"]) - statistics.median(rtt)


@pytest.mark.parametrize(("fault", "check"), [
    ("rebind", lambda f: f["path_after"] == "direct" and f["echoes_after"] > 0),
    ("intermediate_restart", lambda f: f["relay_recovered"] and f["outage_direct_answered"] == f["outage_direct_sent"]),
    ("connector_restart", lambda f: f["session_reopened"] and f["path_after"] == "direct"
     and "direct_verified" in f["events"]),
    ("idle", lambda f: f["direct_after"] and not f["direct_lost"]),
])
def test_faults_in_sealed_mode(fault: str, check) -> None:
    r = sealed(fault=fault, seed=2)
    assert r["outcome"] == "direct_wan" and check(r["extra"]["fault"]), r["extra"]["fault"]


def test_a_blackholed_direct_path_moves_the_connection_back_to_the_relay_within_the_bound() -> None:
    r = sealed(blackhole=True, seed=4)
    lost = [e for e in r["path_events"] if e["event"] == "direct_lost"]
    assert lost and r["failover_ms"] is not None and r["failover_ms"] <= 2000 + 250  # failover 2 s + a keepalive step
    assert r["echo_gap_ms"] is not None and r["echo_gap_ms"] < 2500


def test_sealed_mode_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError, match="at most 1155"):
        TrialSpec(mode="sealed", echo_size=1156)
    with pytest.raises(ValueError, match="birthday mode needs mode terminated"):
        TrialSpec(mode="sealed", birthday=16)
    with pytest.raises(ValueError, match="unknown mode"):
        TrialSpec(mode="open")
    from qlab.endpoint import DATAGRAM_OVERHEAD

    assert SEALED_MAX_PAYLOAD == SEALED_DATAGRAM_SIZE - DATAGRAM_OVERHEAD - wire.DGRAM_HEADER


def test_a_largest_payload_rides_a_sealed_session_both_ways() -> None:
    r = sealed(echo_size=SEALED_MAX_PAYLOAD, seed=5)
    assert r["direct_verified"] and r["rtt_relay_received"] >= 20 and r["rtt_direct_received"] >= 20


# -- hostile: what an Agent can make a Connector hold through its session's tunnel ------------------
def test_a_tunnel_admits_two_unproven_connections_and_junk_leaves_nothing(creds: Credentials) -> None:
    """A hostile Agent owns its session's tunnel: fresh Initials through it make at most
    MAX_UNPROVEN_PER_TUNNEL server connections (no Retry: the tunnel is authenticated by the
    Intermediate); junk makes none; sent packets go to the tunnel, not the socket."""
    async def main() -> None:
        ep = Endpoint(RealNet(), server_config=creds.server_config("connector"), server_handler=lambda c: Handler())
        await ep.bind("127.0.0.1", 0)
        out: list[bytes] = []
        tunnel = wire.relay_tunnel(42)
        ep.open_tunnel(tunnel, out.append)
        initials = Initials(creds, CONNECTOR_NAME)
        for _ in range(50):
            ep.tunnel_receive(initials.make(), tunnel)
        for junk in (b"", b"\x40" + bytes(30), b"\xc0" + bytes(1300)):
            ep.tunnel_receive(junk, tunnel)
        await asyncio.sleep(0.05)
        assert ep.unproven == 2 and ep.unproven_by_source == {"relay:42": 2}
        assert ep.stats["dropped_source_cap"] == 48 and ep.stats["retry_sent"] == 0
        assert out and all(len(p) <= SEALED_DATAGRAM_SIZE for p in out)  # answered through the tunnel, sized for it
        ep.tunnel_receive(initials.make(), wire.relay_tunnel(43))  # a tunnel that was never opened
        assert ep.unproven == 2
        ep.close_tunnel(tunnel)  # the session ended: its connections' last packets go nowhere, not to the socket
        sent = len(out)
        ep.close()
        assert len(out) == sent

    asyncio.run(main())


def test_a_sealed_session_quiet_on_the_relay_outlives_the_idle_timeout() -> None:
    """40 s without application traffic on a relay cell (QUIC's idle timeout is 30 s): the same
    connection carries the echoes after the pause (its pings kept it), as after a 1 s pause."""
    short, long = (sealed(agent_nat="symmetric", connector_nat="symmetric", fault="idle", idle_s=s, seed=6)
                   for s in (1.0, 40.0))
    events = [e["event"] for e in long["path_events"]]
    assert long["outcome"] == "relay" and events.count("sealed_connected") == 1 and "sealed_lost" not in events
    assert long["rtt_relay_sent"] == short["rtt_relay_sent"] == long["rtt_relay_received"]  # the 5 after it too
