"""NAT behaviour as data: one `NatSpec` in RFC 4787 terms, rendered by every backend.

The presets below are the vocabulary of the CLI, the notebooks and the results; their names are
fixed. Each backend renders the same spec: the netns lab as an nftables ruleset
(`qlab.nat.nftables`), the simulator as its own NAT engine (`qlab.backends.sim`), the cloud NAT
instances with the nftables renderer again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any


class Mapping(StrEnum):
    """How the NAT picks the public endpoint for an internal endpoint (RFC 4787 §4.1)."""

    EIM = "EIM"  # endpoint-independent: one mapping per internal ip:port
    ADM = "ADM"  # address-dependent: a new mapping per remote IP
    APDM = "APDM"  # address-and-port-dependent: a new mapping per remote ip:port ("symmetric")


class Filtering(StrEnum):
    """Which inbound packets a mapping admits (RFC 4787 §5)."""

    EIF = "EIF"  # anyone may send to a mapped port
    ADF = "ADF"  # only remote IPs the inside host has sent to
    APDF = "APDF"  # only remote ip:port pairs the inside host has sent to


class PortAllocation(StrEnum):
    """How the public port of a new mapping is chosen (RFC 4787 §4.2)."""

    PRESERVE = "preserve"  # the internal port when free
    SEQUENTIAL = "sequential"  # the next port of a counter (predictable)
    RANDOM = "random"  # a random free port


class Refresh(StrEnum):
    """Which packets keep a binding (and its filter permissions) alive (RFC 4787 REQ-6: outbound
    packets MUST refresh, inbound packets MAY)."""

    OUTBOUND = "outbound"  # only inside -> outside packets; inbound-only traffic lets it expire
    BOTH = "both"  # admitted inbound packets refresh too (what plain Linux conntrack does)


class CounterScope(StrEnum):
    """Whose new mappings advance the sequential port counter."""

    NAT = "nat"  # one counter for the whole NAT: other hosts' new flows take numbers in between
    HOST = "host"  # one counter per inside host address


class MappingProtocol(StrEnum):
    """A protocol by which an inside host asks the NAT for an explicit inbound mapping, in the order
    a client tries them (newest first)."""

    PCP = "pcp"  # Port Control Protocol (RFC 6887), MAP opcode, UDP 5351
    NATPMP = "natpmp"  # NAT Port Mapping Protocol (RFC 6886), UDP 5351
    UPNP = "upnp"  # UPnP Internet Gateway Device: SSDP discovery, SOAP AddPortMapping over HTTP


# what one daemon speaks: the lab's routers run miniupnpd, which answers all three
MAPPING_PROTOCOLS: tuple[MappingProtocol, ...] = (MappingProtocol.PCP, MappingProtocol.NATPMP, MappingProtocol.UPNP)


@dataclass(frozen=True)
class NatSpec:
    """One NAT's UDP behaviour.

    `binding_timeout` is the mapping lifetime in seconds, counted from the last packet that
    `refresh` says refreshes it. `hairpinning` says whether an inside host may reach an inside
    endpoint (another host, or another socket of its own) through its public mapping, seen from the
    public address (REQ-9). When `ports` is sequential, the k-th new mapping of a counter takes port
    `sequential_base + k mod sequential_count`, with one counter per `sequential_scope`. A spec with
    `nat=False` is no NAT at all (`public`). `port_mapping` names the protocols the router answers
    to create explicit mappings (empty: none, as most of the presets).
    """

    name: str
    nat: bool = True
    mapping: Mapping = Mapping.EIM
    filtering: Filtering = Filtering.EIF
    ports: PortAllocation = PortAllocation.PRESERVE
    binding_timeout: float = 120.0
    hairpinning: bool = True
    refresh: Refresh = Refresh.OUTBOUND
    sequential_base: int = 40000
    sequential_count: int = 1000
    sequential_scope: CounterScope = CounterScope.NAT
    port_mapping: tuple[MappingProtocol, ...] = ()

    def __post_init__(self) -> None:
        if self.binding_timeout <= 0:
            raise ValueError(f"NatSpec {self.name!r}: binding_timeout must be > 0, got {self.binding_timeout}")
        if self.sequential_count < 1 or not 1024 <= self.sequential_base <= 65535 - self.sequential_count:
            raise ValueError(f"NatSpec {self.name!r}: sequential port range out of bounds")

    def with_timeout(self, seconds: float) -> NatSpec:
        return replace(self, binding_timeout=seconds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("mapping", "filtering", "ports", "refresh", "sequential_scope"):
            d[k] = d[k].value
        d["port_mapping"] = [p.value for p in self.port_mapping]
        return d


# Every NAT preset refreshes on outbound packets only (the strict reading of REQ-6, which the
# simulator always did) and symmetric_seq counts its ports NAT-wide (one `numgen` counter, as the
# lab always had). The values are spelled out so a preset's whole behaviour reads from this table.
_OUT = Refresh.OUTBOUND
PRESETS: dict[str, NatSpec] = {
    "public": NatSpec("public", nat=False, hairpinning=False),
    "full_cone": NatSpec("full_cone", mapping=Mapping.EIM, filtering=Filtering.EIF, refresh=_OUT),
    "restricted_cone": NatSpec("restricted_cone", mapping=Mapping.EIM, filtering=Filtering.ADF, refresh=_OUT),
    "port_restricted": NatSpec("port_restricted", mapping=Mapping.EIM, filtering=Filtering.APDF, refresh=_OUT),
    "symmetric": NatSpec(
        "symmetric", mapping=Mapping.APDM, filtering=Filtering.APDF, ports=PortAllocation.RANDOM, hairpinning=False,
        refresh=_OUT,
    ),
    "symmetric_seq": NatSpec(
        "symmetric_seq",
        mapping=Mapping.APDM,
        filtering=Filtering.APDF,
        ports=PortAllocation.SEQUENTIAL,
        hairpinning=False,
        refresh=_OUT,
        sequential_scope=CounterScope.NAT,
    ),
}

PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


# a preset name may end in one of these: the same NAT, whose router also answers port mapping
# requests (miniupnpd answers PCP and NAT-PMP on one switch, UPnP IGD on another)
MAPPING_SUFFIXES: dict[str, tuple[MappingProtocol, ...]] = {
    "map": MAPPING_PROTOCOLS,
    "pcp": (MappingProtocol.PCP, MappingProtocol.NATPMP),
    "upnp": (MappingProtocol.UPNP,),
}


def preset(name: str) -> NatSpec:
    """The preset called `name` (`NAME+map`, `+pcp`, `+upnp`: with port mapping), or a ValueError
    that lists the valid names."""
    base, _, suffix = name.partition("+")
    spec = PRESETS.get(base)
    if spec is None or (suffix and suffix not in MAPPING_SUFFIXES):
        raise ValueError(f"unknown NAT preset {name!r}; choose one of: {', '.join(PRESET_NAMES)}, "
                         f"each optionally with +{', +'.join(MAPPING_SUFFIXES)} (port mapping)")
    if not suffix:
        return spec
    if not spec.nat:
        raise ValueError(f"NAT preset {name!r}: {base} is no NAT, there is nothing to map")
    return replace(spec, name=name, port_mapping=MAPPING_SUFFIXES[suffix])


def parse_presets(text: str) -> list[str]:
    """`all` or a comma-separated list of preset names, validated, in table order."""
    if text.strip() == "all":
        return list(PRESET_NAMES)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("no NAT preset given")
    for n in names:
        preset(n)
    return names


# Expected outcome per (Agent NAT, Connector NAT), from the project's first design sketch.
# D = direct by simultaneous open; D> = direct once the endpoint-dependent side sent first and the
# other answered the observed (peer-reflexive) source; P = direct only with port prediction
# (symmetric_seq <-> symmetric_seq: both sides predict, in lockstep; docs/traversal.md);
# B = relay unless birthday-paradox probing is switched on; R = relay; M = direct through a port
# mapping that one side's router granted (any cell where a side's NAT offers mapping, `NAME+map`).
_EXPECTED_ROWS = {
    "public": "D D D D D> D>",
    "full_cone": "D D D D D> D>",
    "restricted_cone": "D D D D D> D>",
    "port_restricted": "D D D D P B",
    "symmetric_seq": "D> D> D> P P R",
    "symmetric": "D> D> D> B R R",
}
_COLS = ("public", "full_cone", "restricted_cone", "port_restricted", "symmetric_seq", "symmetric")
EXPECTED: dict[tuple[str, str], str] = {
    (a, c): code for a, row in _EXPECTED_ROWS.items() for c, code in zip(_COLS, row.split(), strict=True)
}


def expected_outcome(agent_nat: str, connector_nat: str) -> str:
    """The expected-outcome code of a cell: D, D>, P, B, R or M (see EXPECTED). A cell that works
    without a mapping keeps its own code: the mapping is not what makes it direct."""
    a, c = preset(agent_nat), preset(connector_nat)
    code = EXPECTED[(agent_nat.partition("+")[0], connector_nat.partition("+")[0])]
    if (a.port_mapping or c.port_mapping) and code not in ("D", "D>"):
        return "M"
    return code


def expected_or_unknown(agent_nat: str, connector_nat: str) -> str:
    """The expected-outcome code, or "?" where a NAT is not a preset (a field NAT of unknown
    behaviour, an AWS NAT Gateway): nothing is expected of it."""
    try:
        return expected_outcome(agent_nat, connector_nat)
    except ValueError:
        return "?"


def cell_expected(agent_nat: str, connector_nat: str, *, ipv6_both: bool = False) -> str:
    """A trial's expected code: with IPv6 on both sides (any firewall preset) D, the stateful
    firewalls opened by simultaneous open as the IPv4 cones are; else the NAT pair's code."""
    return "D" if ipv6_both else expected_or_unknown(agent_nat, connector_nat)
