"""PathManager's decisions, told the time and the samples: no loop, no sockets."""

from __future__ import annotations

import pytest

from qlab.traversal.path import PathManager, TraversalConfig
from qlab.wire import Path

R, D = Path.RELAY, Path.DIRECT


def manager(**cfg: float) -> PathManager:
    return PathManager(0x1234, TraversalConfig(**cfg), t0=100.0)  # type: ignore[arg-type]


# (relay RTTs, direct RTTs, direct connection up, the path chosen after the last direct sample)
CASES = [
    pytest.param([0.050], [0.020], True, D, id="faster-direct-wins"),
    pytest.param([0.020], [0.021], True, D, id="within-slack-counts-as-not-worse"),
    pytest.param([0.020], [0.030], True, R, id="slower-direct-stays-on-relay"),
    pytest.param([], [0.080], True, D, id="unmeasured-relay-direct-wins"),
    pytest.param([0.050], [0.020], False, R, id="no-connection-no-switch"),
    pytest.param([0.020], [0.010, 0.040, 0.040], True, R, id="median-turns-back-to-relay"),
]


@pytest.mark.parametrize("relay, direct, up, chosen", CASES)
def test_decision_table(relay: list[float], direct: list[float], up: bool, chosen: Path) -> None:
    pm = manager()
    now = 100.0
    for rtt in relay:
        now += 0.1
        assert pm.observe_rtt(R, rtt, now, up) is None  # relay samples alone never switch
    for rtt in direct:
        now += 0.1
        pm.observe_rtt(D, rtt, now, up)
    assert pm.active == chosen


def test_switches_are_returned_once_and_recorded_with_time() -> None:
    pm = manager()
    assert pm.observe_rtt(R, 0.050, 100.5, True) is None
    assert pm.observe_rtt(D, 0.010, 101.0, True) == D
    assert pm.observe_rtt(D, 0.010, 101.1, True) is None  # already direct: no new decision
    assert pm.verified_at == 101.0
    assert [e["event"] for e in pm.events] == ["direct_verified", "switch_to_direct"]
    assert pm.events[0]["t_ms"] == 1000.0
    assert pm.observe_rtt(D, 0.200, 101.2, True) is None  # median 10 ms still
    assert pm.observe_rtt(D, 0.200, 101.3, True) == R  # median now 105 ms: back to the relay
    assert pm.events[-1]["event"] == "switch_to_relay"


@pytest.mark.parametrize("ratio, slack_ms, relay, direct, ok", [
    (0.10, 2.0, 0.100, 0.112, True),  # 112 <= 100 * 1.1 + 2
    (0.10, 2.0, 0.100, 0.1125, False),
    (0.0, 0.0, 0.100, 0.100, True),
    (0.0, 0.0, 0.100, 0.1001, False),
])
def test_not_worse_threshold(ratio: float, slack_ms: float, relay: float, direct: float, ok: bool) -> None:
    pm = manager(slack_ratio=ratio, slack_ms=slack_ms)
    pm.rtts[R].append(relay)
    pm.rtts[D].append(direct)
    assert pm.not_worse() is ok


def test_lost_returns_to_relay_and_forgets_verification() -> None:
    pm = manager()
    pm.observe_rtt(D, 0.010, 100.2, True)
    assert pm.active == D
    assert pm.lost(100.5, "no answer") is True
    assert pm.active == R and pm.verified_at is None
    assert pm.events[-1] == {"t_ms": 500.0, "event": "direct_lost",
                             "detail": "no answer; traffic continues over the relay"}
    assert pm.decide(100.6, True) is None  # unverified again: the next direct echo decides


def test_closed_manager_records_nothing_more() -> None:
    pm = manager()
    pm.close()
    assert pm.lost(100.1, "gone") is False
    assert pm.active == R and pm.events == []


@pytest.mark.parametrize("failover, keepalive, dead_after", [(2.0, 0.5, 1.5), (1.5, 0.5, 1.0)])
def test_dead_after_leaves_room_for_one_keepalive(failover: float, keepalive: float, dead_after: float) -> None:
    assert manager(failover=failover, keepalive=keepalive).dead_after == dead_after
