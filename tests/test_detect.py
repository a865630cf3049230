"""The NAT classifier's rules as tables: observed mappings and probe outcomes in, the spec's
enums (qlab.nat.spec) out. No sockets, no event loop; the end-to-end runs are in
tests/test_traversal.py (sim) and tests/test_netns_lab.py (kernel)."""

from __future__ import annotations

import json

import pytest

from qlab import wire
from qlab.nat.spec import PRESETS, Filtering, Mapping, PortAllocation
from qlab.traversal.detect import (
    PRESET_BY_BEHAVIOUR,
    Classification,
    Unclassified,
    filtering_from,
    mapping_from,
    nat_kind_from,
    preset_for,
)

LOCAL = ("10.0.1.2", 5000)
P = ("203.0.113.1", 40001)  # the mapping the primary listener saw


@pytest.mark.parametrize(
    ("observed", "mapping", "ports"),
    [
        ({"primary": P}, Unclassified.UNKNOWN, Unclassified.UNKNOWN),  # no alternate listener
        ({"primary": P, "alt_ip_port": P, "alt_port": P}, Mapping.EIM, Unclassified.UNKNOWN),
        ({"primary": P, "alt_ip_port": P}, Mapping.EIM, Unclassified.UNKNOWN),
        ({"primary": ("203.0.113.1", 5000), "alt_ip_port": ("203.0.113.1", 5000)}, Mapping.EIM,
         PortAllocation.PRESERVE),
        ({"primary": P, "alt_ip_port": ("203.0.113.1", 40007), "alt_port": P}, Mapping.ADM, PortAllocation.RANDOM),
        ({"primary": P, "alt_ip_port": ("203.0.113.1", 40002), "alt_port": ("203.0.113.1", 40003)}, Mapping.APDM,
         PortAllocation.SEQUENTIAL),
        ({"primary": P, "alt_ip_port": ("203.0.113.1", 51234), "alt_port": ("203.0.113.1", 8812)}, Mapping.APDM,
         PortAllocation.RANDOM),
        ({"primary": P, "alt_ip_port": ("203.0.113.1", 40002)}, Mapping.APDM, PortAllocation.SEQUENTIAL),
    ],
)
def test_mapping_and_ports_from_observed_mappings(observed, mapping, ports):
    assert mapping_from(LOCAL, observed) == (mapping, ports)


@pytest.mark.parametrize(
    ("other_ip_port", "other_port", "filtering"),
    [(True, False, Filtering.EIF), (True, True, Filtering.EIF), (False, True, Filtering.ADF),
     (False, False, Filtering.APDF)],
)
def test_filtering_from_admitted_probes(other_ip_port, other_port, filtering):
    assert filtering_from(other_ip_port, other_port) is filtering


@pytest.mark.parametrize(
    ("mapping", "filtering", "ports", "preset"),
    [
        (Unclassified.NO_NAT, Unclassified.NO_NAT, PortAllocation.PRESERVE, "public"),
        (Mapping.EIM, Filtering.EIF, Unclassified.UNKNOWN, "full_cone"),
        (Mapping.EIM, Filtering.ADF, PortAllocation.PRESERVE, "restricted_cone"),
        (Mapping.EIM, Filtering.APDF, Unclassified.UNKNOWN, "port_restricted"),
        (Mapping.APDM, Filtering.APDF, PortAllocation.SEQUENTIAL, "symmetric_seq"),
        (Mapping.APDM, Filtering.APDF, PortAllocation.RANDOM, "symmetric"),
        (Mapping.ADM, Filtering.APDF, PortAllocation.RANDOM, None),
        (Mapping.APDM, Filtering.EIF, PortAllocation.RANDOM, None),
        (Unclassified.UNKNOWN, Filtering.APDF, Unclassified.UNKNOWN, None),
    ],
)
def test_preset_for_a_behaviour(mapping, filtering, ports, preset):
    assert preset_for(mapping, filtering, ports) == preset


def test_preset_table_is_the_specs_and_matches_the_old_strings():
    assert set(PRESET_BY_BEHAVIOUR.values()) == set(PRESETS)
    # the literal table it replaced: keys compare equal as plain strings
    assert PRESET_BY_BEHAVIOUR == {
        ("none", "none"): "public",
        ("EIM", "EIF"): "full_cone",
        ("EIM", "ADF"): "restricted_cone",
        ("EIM", "APDF"): "port_restricted",
        ("APDM", "APDF", "sequential"): "symmetric_seq",
        ("APDM", "APDF", "random"): "symmetric",
    }


def test_classification_json_keeps_the_plain_strings():
    c = Classification(Mapping.APDM, Filtering.APDF, PortAllocation.SEQUENTIAL, False, "symmetric_seq", LOCAL,
                       {"primary": P}, ["a note"])
    d = c.to_dict()
    assert d == {"mapping": "APDM", "filtering": "APDF", "ports": "sequential", "hairpinning": False,
                 "preset": "symmetric_seq", "local": LOCAL, "observed": {"primary": P}, "notes": ["a note"]}
    assert all(type(d[k]) is str for k in ("mapping", "filtering", "ports"))
    assert json.loads(json.dumps(Classification(Unclassified.NO_NAT, Unclassified.NO_NAT, PortAllocation.PRESERVE,
                                                None, "public", LOCAL).to_dict()))["mapping"] == "none"


@pytest.mark.parametrize(
    ("host_ips", "observed", "kind"),
    [
        (["10.0.1.2"], [], wire.NatKind.UNKNOWN),
        (["10.0.1.2"], [("10.0.1.2", 5000)], wire.NatKind.NONE),
        ([], [P], wire.NatKind.UNKNOWN),  # one mapping tells nothing
        ([], [P, P], wire.NatKind.EIM),
        ([], [P, ("203.0.113.1", 40017)], wire.NatKind.EDM_SEQUENTIAL),
        ([], [P, ("203.0.113.1", 40018)], wire.NatKind.EDM_RANDOM),  # a step above SEQUENTIAL_MAX_STEP
        ([], [P, ("203.0.113.1", 39000), ("203.0.113.1", 39001)], wire.NatKind.EDM_SEQUENTIAL),
        ([], [P, ("203.0.113.1", 40002), ("203.0.113.1", 40001)], wire.NatKind.EDM_RANDOM),
    ],
)
def test_nat_kind_from_mappings(host_ips, observed, kind):
    assert nat_kind_from(LOCAL, host_ips, observed) is kind
