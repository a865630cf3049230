"""IPv6 firewall behaviour as data: what a home router does to IPv6 it routes without NAT.

IPv6 sites get global addresses, so the router translates nothing; what remains is filtering.
RFC 6092 (simple security for IPv6 CPE) asks for stateful filtering by default: inbound UDP is
forwarded only as part of a flow an inside host started, and that state lives at least two
minutes. Two presets name what the lab models:

- `open`: the router forwards everything (no filter at all);
- `stateful`: outbound is always forwarded and creates state for (inside ip:port, remote ip:port);
  inbound is forwarded only when such state is live (address-and-port-dependent filtering, RFC
  4787 §5 terms), refreshed by packets either way, as Linux conntrack does on home routers.
  ICMPv6 errors and `related` packets pass (RFC 4890).

The netns lab loads `render(spec)` as `table ip6 qlab_fw6` in the router's namespace; the
simulator's routers run `qlab.backends.sim.firewall6.FirewallEngine` on the same spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

TABLE = "qlab_fw6"


class Filter6(StrEnum):
    """Which inbound IPv6 packets the router forwards to its LAN."""

    OPEN = "open"  # all of them
    STATEFUL = "stateful"  # only those of a flow an inside host started (remote ip:port it sent to)


@dataclass(frozen=True)
class Firewall6Spec:
    """One router's IPv6 behaviour. `timeout`: seconds a flow's state lives after its last packet
    (in the kernel lab it is the namespace's conntrack UDP timeout, which the router's NatSpec sets:
    120 s for every preset)."""

    name: str
    filtering: Filter6 = Filter6.STATEFUL
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"Firewall6Spec {self.name!r}: timeout must be > 0, got {self.timeout}")


PRESETS6: dict[str, Firewall6Spec] = {
    "open": Firewall6Spec("open", Filter6.OPEN),
    "stateful": Firewall6Spec("stateful", Filter6.STATEFUL),
}
PRESET6_NAMES: tuple[str, ...] = tuple(PRESETS6)


def firewall6(name: str) -> Firewall6Spec:
    """The IPv6 firewall preset `name`, or a ValueError that lists the valid names."""
    try:
        return PRESETS6[name]
    except KeyError:
        raise ValueError(f"unknown IPv6 firewall {name!r}; choose one of: {', '.join(PRESET6_NAMES)}") from None


_ICMP_ERRORS = "destination-unreachable, packet-too-big, time-exceeded, parameter-problem"


def render(spec: Firewall6Spec, *, wan_if: str, lan_if: str) -> str:
    """The router's `ip6` table for `spec`: replaces only its own table, same bytes for the same spec."""
    head = [
        f"# qlab IPv6 firewall {spec.name}: filtering {spec.filtering.value} (RFC 6092), no NAT",
        f"table ip6 {TABLE}",
        f"delete table ip6 {TABLE}",
        f"table ip6 {TABLE} {{",
        "  chain forward {",
    ]
    if spec.filtering is Filter6.OPEN:
        body = ["    type filter hook forward priority filter; policy accept;"]
    else:
        body = [
            "    type filter hook forward priority filter; policy drop;",
            "    ct state established,related accept",
            "    ct state invalid drop",
            f'    iifname "{lan_if}" oifname "{wan_if}" accept',
            f"    icmpv6 type {{ {_ICMP_ERRORS} }} accept",
        ]
    return "\n".join([*head, *body, "  }", "}", ""])
