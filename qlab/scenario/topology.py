"""Backend-neutral lab topologies: who sits where, behind which NAT, over which links.

A `Topology` is data. The netns backend renders it as namespaces, veths, bridges and nftables; the
simulator as virtual hosts and NAT routers. Both use the same address plan, so a trial record reads
the same on every backend. "The internet" is TEST-NET-3 (203.0.113.0/24), which exists only inside
the lab. A dual-stack lab (`build(..., agent_ipv6=..., connector_ipv6=...)`) adds IPv6 from the
documentation prefix: the internet is 2001:db8::/64 (the Intermediate at 2001:db8::10 and ::11),
site n's LAN is 2001:db8:n::/64, routed without NAT by its router (WAN 2001:db8::10n, LAN
2001:db8:n::1) under an IPv6 firewall preset (`qlab.nat.firewall6`); hosts get 2001:db8:n::2, ...
and a default IPv6 route. Internet nodes route each site's /64 via that site's router.

Scenarios:
- `pair`: the Agent behind one NAT, the Connector behind another (the 6 x 6 matrix);
- `same_lan`: Agent and Connector on one LAN behind one NAT (LAN candidates must win);
- `double_nat`: the Agent's home NAT sits behind a carrier NAT (CGN) on a 100.64.0.0/24 segment;
- `multi_agent`: several Agents behind the Agent-side NAT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlab.nat.firewall6 import Firewall6Spec, firewall6
from qlab.nat.spec import NatSpec, preset
from qlab.scenario.profiles import IDEAL, LinkProfile, NetProfile, profile

INTERNET = "internet"
INTERNET_CIDR = "203.0.113.0/24"
INTERMEDIATE_IPS = ("203.0.113.10", "203.0.113.11")
INTERNET6_CIDR = "2001:db8::/64"
INTERMEDIATE_IPS6 = ("2001:db8::10", "2001:db8::11")
INTERMEDIATE_PORT = 4433
INTERMEDIATE_ALT_PORT = 4434
CONNECTOR_PORT = 4434
SCENARIOS = ("pair", "same_lan", "double_nat", "multi_agent")


@dataclass(frozen=True)
class Segment:
    """A broadcast domain (a bridge): the internet, a site LAN or a carrier network."""

    name: str
    cidr: str
    gateway: str | None = None  # the router's address on this segment; None for the internet
    cidr6: str | None = None  # its IPv6 prefix in a dual-stack lab
    gateway6: str | None = None


@dataclass(frozen=True)
class Router:
    """A NAT router between an upstream segment (its WAN) and one downstream segment (its LAN)."""

    name: str
    nat: NatSpec
    wan_segment: str
    wan_ip: str
    lan_segment: str
    lan_ip: str
    uplink: LinkProfile = IDEAL
    upstream_gateway: str | None = None  # default route when the WAN is not the internet
    wan_ip6: str | None = None  # IPv6 (routed, no NAT) in a dual-stack lab, with its firewall
    lan_ip6: str | None = None
    fw6: Firewall6Spec | None = None


@dataclass(frozen=True)
class Host:
    """An end host with one interface on one segment (it may carry several addresses)."""

    name: str
    segment: str
    ips: tuple[str, ...]
    link: LinkProfile = IDEAL
    gateway: str | None = None
    ips6: tuple[str, ...] = ()  # global IPv6 addresses in a dual-stack lab
    gateway6: str | None = None

    @property
    def ip(self) -> str:
        return self.ips[0]

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every address, IPv4 first (what the host's `Net.host_addresses()` returns)."""
        return self.ips + self.ips6


@dataclass(frozen=True)
class Topology:
    scenario: str
    agent_nat: str
    connector_nat: str
    profile: NetProfile
    segments: tuple[Segment, ...]
    routers: tuple[Router, ...]
    hosts: tuple[Host, ...]
    agents: tuple[str, ...] = ("agent",)
    meta: dict = field(default_factory=dict, compare=False)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(f"no host {name!r} in this topology (hosts: {', '.join(h.name for h in self.hosts)})")

    def router(self, name: str) -> Router:
        for r in self.routers:
            if r.name == name:
                return r
        raise KeyError(f"no router {name!r} in this topology")

    def router_of(self, host: str) -> Router | None:
        seg = self.host(host).segment
        return next((r for r in self.routers if r.lan_segment == seg), None)

    @property
    def intermediate(self) -> Host:
        return self.host("intermediate")

    @property
    def node_names(self) -> list[str]:
        return [r.name for r in self.routers] + [h.name for h in self.hosts]

    @property
    def ipv6(self) -> bool:
        return any(h.ips6 for h in self.hosts)

    def routes6(self) -> list[tuple[str, str]]:
        """(site prefix, router WAN address): how internet nodes reach each IPv6 site."""
        lans = {s.name: s.cidr6 for s in self.segments}
        return [(cidr, r.wan_ip6) for r in self.routers if r.wan_ip6 and (cidr := lans.get(r.lan_segment))]


_Site = tuple[list[Segment], list[Router], list[Host]]  # what one site adds to a topology


def _site(
    side: str, nat_name: str, index: int, uplink: LinkProfile, hosts: list[str], wan_segment: str = INTERNET,
    wan_ip: str | None = None, upstream_gateway: str | None = None, fw6: str = "",
) -> _Site:
    """One site: hosts on a LAN behind a NAT router, or hosts directly on the internet (`public`).
    `fw6`: the IPv6 firewall preset of a dual-stack site ("": IPv4 only)."""
    spec = preset(nat_name)
    fw = firewall6(fw6) if fw6 else None
    if not spec.nat:
        ips = [f"203.0.113.{20 + 10 * index + k}" for k in range(len(hosts))]
        ips6 = [(f"2001:db8::{20 + 10 * index + k}",) if fw else () for k in range(len(hosts))]
        return [], [], [Host(h, INTERNET, (ip,), link=uplink, ips6=v6)
                        for h, ip, v6 in zip(hosts, ips, ips6, strict=True)]
    lan = Segment(f"lan-{side}", f"10.{index}.0.0/24", gateway=f"10.{index}.0.1",
                  cidr6=f"2001:db8:{index}::/64" if fw else None, gateway6=f"2001:db8:{index}::1" if fw else None)
    router = Router(
        f"nat-{side}", spec, wan_segment, wan_ip or f"203.0.113.{100 + index}", lan.name, lan.gateway or "",
        uplink=uplink, upstream_gateway=upstream_gateway,
        wan_ip6=f"2001:db8::{100 + index}" if fw else None, lan_ip6=lan.gateway6, fw6=fw,
    )
    lan_hosts = [Host(h, lan.name, (f"10.{index}.0.{2 + k}",), gateway=lan.gateway,
                      ips6=(f"2001:db8:{index}::{2 + k:x}",) if fw else (), gateway6=lan.gateway6)
                 for k, h in enumerate(hosts)]
    return [lan], [router], lan_hosts


def build(
    agent_nat: str = "public",
    connector_nat: str = "public",
    *,
    scenario: str = "pair",
    profile_name: str = "lan",
    agents: int = 1,
    carrier_nat: str = "port_restricted",
    agent_ipv6: str = "",
    connector_ipv6: str = "",
) -> Topology:
    """The topology for a scenario. Names are validated here, with errors that list the choices.
    `agent_ipv6` / `connector_ipv6`: a side's IPv6 firewall preset (`qlab.nat.firewall6`; "": that
    side has no IPv6); with either, the lab is dual-stack and the Intermediate has IPv6 too."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of: {', '.join(SCENARIOS)}")
    if not 1 <= agents <= 50:
        raise ValueError("agents must be between 1 and 50")
    prof = profile(profile_name)
    preset(agent_nat)
    preset(connector_nat)
    agent_names = ["agent"] + [f"agent{i}" for i in range(2, agents + 1)]
    if scenario != "multi_agent" and agents != 1:
        raise ValueError("several agents need scenario 'multi_agent'")

    dual = _dual_stack(scenario, agent_ipv6, connector_ipv6)
    segments: list[Segment] = [Segment(INTERNET, INTERNET_CIDR, cidr6=INTERNET6_CIDR if dual else None)]
    routers: list[Router] = []
    hosts: list[Host] = [Host("intermediate", INTERNET, INTERMEDIATE_IPS, link=prof.intermediate,
                              ips6=INTERMEDIATE_IPS6 if dual else ())]
    if scenario == "same_lan":
        sites = [_site("a", agent_nat, 1, prof.agent, ["agent", "connector"], fw6=agent_ipv6)]
        connector_nat, connector_ipv6 = agent_nat, agent_ipv6
    elif scenario == "double_nat":
        sites = _double_nat(agent_nat, connector_nat, carrier_nat, prof)
    else:
        sites = [_site("a", agent_nat, 1, prof.agent, agent_names, fw6=agent_ipv6),
                 _site("c", connector_nat, 2, prof.connector, ["connector"], fw6=connector_ipv6)]
    for s, r, h in sites:
        segments += s
        routers += r
        hosts += h

    return Topology(
        scenario=scenario,
        agent_nat=agent_nat,
        connector_nat=connector_nat,
        profile=prof,
        segments=tuple(segments),
        routers=tuple(routers),
        hosts=tuple(hosts),
        agents=tuple(agent_names),
        meta={"carrier_nat": carrier_nat if scenario == "double_nat" else None,
              **({"ipv6": {"agent": agent_ipv6 or None, "connector": connector_ipv6 or None}} if dual else {})},
    )


def _dual_stack(scenario: str, agent_ipv6: str, connector_ipv6: str) -> bool:
    """Whether the lab is dual-stack; the firewall names are checked here."""
    for fw in (agent_ipv6, connector_ipv6):
        if fw:
            firewall6(fw)
    dual = bool(agent_ipv6 or connector_ipv6)
    if dual and scenario == "double_nat":
        raise ValueError("IPv6 is not modelled behind a carrier NAT (scenario double_nat)")
    return dual


def _double_nat(agent_nat: str, connector_nat: str, carrier_nat: str, prof: NetProfile) -> list[_Site]:
    """The Agent's home NAT behind a carrier NAT (100.64.0.0/24 between them); the Connector's site as usual."""
    cgn = preset(carrier_nat)
    if not cgn.nat:
        raise ValueError("the carrier NAT of a double NAT cannot be 'public'")
    carrier = Segment("carrier", "100.64.0.0/24", gateway="100.64.0.1")
    cgnat = Router("cgnat", cgn, INTERNET, "203.0.113.103", carrier.name, "100.64.0.1", uplink=prof.agent)
    home = _site("a", agent_nat, 1, IDEAL, ["agent"], wan_segment=carrier.name, wan_ip="100.64.0.2",
                 upstream_gateway="100.64.0.1")
    if not home[1]:
        raise ValueError("double_nat needs a home NAT on the agent side (agent NAT cannot be 'public')")
    return [([carrier], [cgnat], []), home, _site("c", connector_nat, 2, prof.connector, ["connector"])]
