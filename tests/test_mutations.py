"""Mutation check: deliberate faults, injected by monkeypatching, each of which must turn a check of
this suite red. A check that stays green under a mutation could not see that fault. Simulator only,
so it is fast and deterministic (seeded trials, virtual time).

| mutation | caught by |
|---|---|
| `full_cone` filters like `port_restricted` (APDF) | the NAT table (`test_sim_nat::test_mapping_and_filtering_per_preset`) and the matrix cell full_cone x symmetric (`as_expected` false: relay where D is expected) |
| `symmetric` filters endpoint-independently (EIF) | the NAT table only: trials cannot see it (the symmetric x symmetric cells are not punched by policy, their record says `punch: skipped`, and even punched the pair stays on the relay) |
| the Connector answers over the relay | the record: with the relay left on for the proof (as in the field) `direct_verified` false, outcome `relay`, `echo_direct_answered_on_relay` > 0; the lab proof (relay switched off) too |
| the echo probe's reply handler drops every third reply | the record's `rtt_relay_loss` / `rtt_direct_loss` > 0 on a lossless profile (`assert_received_on_its_path`) |

Each test runs the check once as it is (it must pass) and once under the mutation (it must fail).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest

from qlab.experiment.record import TrialSpec
from qlab.experiment.trial import run_trial
from qlab.nat import spec as nat_spec
from qlab.nat.spec import Filtering
from qlab.roles import connector as connector_mod
from qlab.roles import echo
from tests.test_sim_nat import test_mapping_and_filtering_per_preset as nat_table
from tests.test_traversal import assert_received_on_its_path, skipped_by_policy


def trial(agent_nat: str, connector_nat: str, **kw):
    return run_trial(TrialSpec(backend="sim", agent_nat=agent_nat, connector_nat=connector_nat, profile="wan-20ms",
                               seed=1, samples=5, verify_echoes=5, **kw))


def matrix_cell(agent_nat: str, connector_nat: str, **kw) -> Callable[[], None]:
    """The matrix test's assertions on one cell (tests/test_traversal.py)."""

    def check() -> None:
        r = trial(agent_nat, connector_nat, **kw)
        assert r.outcome != "failed" and r.as_expected, (r.outcome, r.reason, r.expected)
        assert_received_on_its_path(r)
        skipped = skipped_by_policy(agent_nat, connector_nat, bool(kw.get("punch_anyway")))
        assert r.punch == ("skipped" if skipped else "attempted")

    return check


def field_proof() -> None:
    """A direct cell proved as in the field: the relay stays on, so only where replies arrived counts."""
    r = trial("full_cone", "port_restricted", relay_off_proof=False)
    assert r.outcome == "direct_wan" and r.direct_verified, (r.outcome, r.reason)
    assert r.echo_direct_answered_on_relay == 0 and r.direct_bytes_in > 0
    assert_received_on_its_path(r)


def filtering(nat: str, how: Filtering) -> Callable[[pytest.MonkeyPatch], None]:
    def apply(mp: pytest.MonkeyPatch) -> None:
        mp.setitem(nat_spec.PRESETS, nat, replace(nat_spec.PRESETS[nat], filtering=how))
    return apply


def connector_replies_over_relay(mp: pytest.MonkeyPatch) -> None:
    orig = connector_mod.Connector.send_to_agent
    mp.setattr(connector_mod.Connector, "send_to_agent", lambda self, s, path, payload: orig(self, s, "relay", payload))


def probe_drops_every_third_reply(mp: pytest.MonkeyPatch) -> None:
    orig = echo.EchoProbe.receive
    seen = [0]

    def receive(self, payload: bytes, via: str) -> None:
        seen[0] += 1
        if seen[0] % 3:
            orig(self, payload, via)

    mp.setattr(echo.EchoProbe, "receive", receive)


@dataclass(frozen=True)
class Case:
    """A mutation and a check that must catch it."""

    name: str
    mutate: Callable[[pytest.MonkeyPatch], None]
    check: Callable[[], None]


CASES = [
    Case("full_cone APDF / NAT table", filtering("full_cone", Filtering.APDF), lambda: nat_table("full_cone")),
    Case("full_cone APDF / matrix cell", filtering("full_cone", Filtering.APDF), matrix_cell("full_cone", "symmetric")),
    Case("symmetric EIF / NAT table", filtering("symmetric", Filtering.EIF), lambda: nat_table("symmetric")),
    Case("connector answers over the relay / field proof", connector_replies_over_relay, field_proof),
    Case("connector answers over the relay / lab matrix cell", connector_replies_over_relay,
         matrix_cell("full_cone", "port_restricted")),
    Case("probe drops replies / matrix cell", probe_drops_every_third_reply, matrix_cell("full_cone", "port_restricted")),
    Case("probe drops replies / relay cell", probe_drops_every_third_reply, matrix_cell("symmetric", "symmetric_seq")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_mutation_is_caught(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    case.check()  # as the code is: the check passes
    with monkeypatch.context() as mp:
        case.mutate(mp)
        with pytest.raises(AssertionError):
            case.check()


def test_a_decided_cell_does_not_see_a_filtering_mutation_but_says_it_was_decided(monkeypatch) -> None:
    """symmetric with endpoint-independent filtering: the symmetric x symmetric cell still reads "as
    expected", but its record says the punch was skipped by policy, so a summary does not count it
    as measured (analysis.cell_summary `decided`)."""
    filtering("symmetric", Filtering.EIF)(monkeypatch)
    r = trial("symmetric", "symmetric")
    assert r.as_expected and r.outcome == "relay" and r.punch == "skipped"
