"""NatSpec -> an nftables ruleset: what the netns lab's routers and the AWS NAT instances load.

The ruleset replaces only its own table (`table ip qlab_nat`), so other tables (the lab's fault
injection) survive a reload. Rendering is deterministic: the same spec and interfaces give the same
bytes on every backend. Pitfalls the rules avoid (docs/netns-lab.md):
- the router drops unsolicited input, or conntrack confirms it and steals the port;
- endpoint-independent mapping needs explicit maps (conntrack alone maps per 5-tuple); a port already
  owned by another inside endpoint is re-picked at random, never overloaded;
- sequential ports use a typed map (`numgen ... offset` is byte-swapped in nft 1.0.6);
- `ct original proto-src` needs `meta l4proto udp` first; hairpin SNAT matches the LAN prefix
  because `iifname` never matches in postrouting.

Port mapping (`spec.port_mapping`): the router runs miniupnpd, which adds its DNAT rules to its
own table (`daemon_table`). An unsolicited packet to a port the daemon mapped must get past the gate,
which runs before any DNAT, so on these routers the gate marks what it would drop instead; the
qlab DNAT skips marked packets, and a `late` chain after DNAT lets through the marked packets the
daemon redirected and drops the rest. Such a packet reaches conntrack before it is dropped, so on a
mapping router a dropped inbound packet can refresh a conntrack entry (docs/netns-lab.md). The
daemon learns its public address by STUN from the lab's server (it refuses a TEST-NET address
otherwise), so the STUN server's answers reach the router itself.

Refresh: conntrack refreshes its entries on packets in both directions, so the binding lives in
dynamic sets/maps that only the packets `spec.refresh` names update, and a `gate` chain at raw
priority (before conntrack) drops inbound packets, established flows included, whose binding or
permission is gone. A dropped packet refreshes nothing; an admitted inbound packet still refreshes
its conntrack entry, which can therefore outlive the binding by up to one timeout (docs/netns-lab.md).
"""

from __future__ import annotations

import ipaddress

from qlab.nat.spec import CounterScope, Filtering, Mapping, NatSpec, PortAllocation, Refresh

TABLE = "qlab_nat"
DAEMON_TABLE = "qlab_pmap"  # miniupnpd's own table (inet): it adds rules, it does not create chains
DAEMON_CHAINS = {"forward": "miniupnpd", "prerouting": "prerouting_miniupnpd", "postrouting": "postrouting_miniupnpd"}
GATE_MARK = "0x00000071"  # "the gate would drop this" on a router whose daemon may redirect it
STUN_PORTS = (3478, 3479)
MAX_HOST_COUNTERS = 1024  # per-host sequential counters are one rule per LAN address


def _timeout(spec: NatSpec) -> str:
    return f"{max(1, round(spec.binding_timeout))}s"


def conntrack_sysctls(spec: NatSpec) -> dict[str, str]:
    """Per-namespace conntrack UDP timeouts: for conntrack-only mappings (symmetric) they are the
    binding lifetime; for the cone types the map timeouts are, and conntrack must not outlive them."""
    t = str(max(1, round(spec.binding_timeout)))
    return {"net.netfilter.nf_conntrack_udp_timeout": t, "net.netfilter.nf_conntrack_udp_timeout_stream": t}


def render(spec: NatSpec, *, wan_if: str, lan_if: str, wan_ip: str, lan_cidr: str,
           stun_servers: tuple[str, ...] = ()) -> str:
    """The full ruleset for one router. ValueError for behaviour this renderer cannot express.
    `stun_servers`: where a port-mapping router's daemon asks for its public address."""
    if not spec.nat:
        raise ValueError(f"NatSpec {spec.name!r} is not a NAT: nothing to render")
    ipaddress.IPv4Address(wan_ip)
    lan = ipaddress.IPv4Network(lan_cidr, strict=False)
    if spec.mapping == Mapping.ADM:
        raise ValueError("the nftables renderer does not implement address-dependent mapping (ADM)")
    if spec.mapping == Mapping.APDM and spec.filtering != Filtering.APDF:
        raise ValueError("an endpoint-dependent (APDM) mapping can only filter APDF with conntrack")
    if spec.mapping == Mapping.APDM and spec.hairpinning:
        raise ValueError("hairpinning is only rendered for endpoint-independent (EIM) mapping")
    if spec.mapping == Mapping.EIM and spec.ports == PortAllocation.SEQUENTIAL:
        raise ValueError("sequential port allocation is only rendered for APDM mapping")
    per_host = spec.ports == PortAllocation.SEQUENTIAL and spec.sequential_scope == CounterScope.HOST
    if per_host and lan.num_addresses > MAX_HOST_COUNTERS:
        raise ValueError(f"per-host sequential counters take one rule per LAN address; {lan} has "
                         f"{lan.num_addresses} (at most {MAX_HOST_COUNTERS})")
    ports = spec.ports.value
    if spec.ports == PortAllocation.SEQUENTIAL:
        ports += f" (counter per {spec.sequential_scope.value})"
    head = [
        f"# qlab NAT {spec.name}: mapping {spec.mapping.value}, filtering {spec.filtering.value}, ports "
        f"{ports}, binding timeout {_timeout(spec)} refreshed by {spec.refresh.value} packets, "
        f"hairpinning {'on' if spec.hairpinning else 'off'}",
        f"table ip {TABLE}",
        f"delete table ip {TABLE}",
        f"table ip {TABLE} {{",
    ]
    if spec.port_mapping and not stun_servers:
        raise ValueError(f"NatSpec {spec.name!r} offers port mapping: its daemon needs a STUN server")
    if spec.mapping == Mapping.EIM:
        body = _eim(spec, wan_if, lan_if, wan_ip, str(lan))
    else:
        body = _apdm(spec, wan_if, lan_if, wan_ip, str(lan))
    if spec.port_mapping:
        body += _late(stun_servers, wan_if, wan_ip)
    body += _filter(wan_if, lan_if, stun_servers if spec.port_mapping else ())
    return "\n".join(head + body + ["}", ""])


def daemon_table() -> str:
    """miniupnpd's table, empty: the daemon fills its chains. Loaded once when the daemon starts
    (reloading the NAT's own table leaves it alone) and deleted with the lab."""
    c = DAEMON_CHAINS
    return "\n".join([
        "# miniupnpd's table: its DNAT and filter rules for the mappings it grants",
        f"table inet {DAEMON_TABLE}",
        f"delete table inet {DAEMON_TABLE}",
        f"table inet {DAEMON_TABLE} {{",
        f"  chain forward {{ type filter hook forward priority filter; policy accept; jump {c['forward']}; }}",
        f"  chain {c['forward']} {{ }}",
        f"  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; jump {c['prerouting']}; }}",
        f"  chain {c['prerouting']} {{ }}",
        f"  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; jump {c['postrouting']}; }}",
        f"  chain {c['postrouting']} {{ }}",
        "}",
        "",
    ])


def _own_traffic(spec: NatSpec, wan: str, wan_ip: str) -> list[str]:
    """A mapping router's own packets (its daemon's STUN test) leave unNATed: the daemon must see
    its ports unchanged to call the router's address public."""
    return [f'    oifname "{wan}" ip saddr {wan_ip} accept'] if spec.port_mapping else []


def _late(stun_servers: tuple[str, ...], wan: str, wan_ip: str) -> list[str]:
    """After DNAT: what the gate marked passes only if the daemon redirected it, or if it is a STUN
    server answering the daemon (from another address and port than it asked: RFC 3489 tests)."""
    stun = ", ".join(stun_servers)
    ports = ", ".join(map(str, STUN_PORTS))
    return [
        "  # after DNAT: a packet the gate marked passes only if the mapping daemon redirected it",
        "  chain late {",
        "    type filter hook prerouting priority dstnat + 10; policy accept;",
        f"    meta mark {GATE_MARK} ct status dnat accept",
        f'    meta mark {GATE_MARK} iifname "{wan}" ip daddr {wan_ip} ip saddr {{ {stun} }} udp sport {{ {ports} }} accept',
        f"    meta mark {GATE_MARK} drop",
        "  }",
    ]


def _eim(spec: NatSpec, wan: str, lan: str, wan_ip: str, lan_cidr: str) -> list[str]:
    t = _timeout(spec)
    admit = {
        Filtering.EIF: "",
        Filtering.ADF: "udp dport . ip saddr @permit_a ",
        Filtering.APDF: "udp dport . ip saddr . udp sport @permit_ap ",
    }[spec.filtering]
    first_pick = "masquerade random" if spec.ports == PortAllocation.RANDOM else "masquerade"
    unmarked = f"meta mark != {GATE_MARK} " if spec.port_mapping else ""
    lines = [
        "  # mapped port -> internal ip.port, and back: the endpoint-independent binding",
        f"  map emap {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}; }}",
        f"  map imap {{ type ipv4_addr . inet_service : inet_service; flags dynamic,timeout; timeout {t}; }}",
        "  # who the inside endpoint has sent to: the filter state (address, address and port)",
        f"  set permit_a {{ type inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}; }}",
        f"  set permit_ap {{ type inet_service . ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}; }}",
    ]
    refused = ["udp dport != @emap", *{
        Filtering.EIF: [],
        Filtering.ADF: ["udp dport . ip saddr != @permit_a"],
        Filtering.APDF: ["udp dport . ip saddr . udp sport != @permit_ap"],
    }[spec.filtering]]
    lines += _gate(spec, wan, wan_ip, refused)
    lines += [
        "  chain pre {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        f'    iifname "{wan}" ip daddr {wan_ip} {unmarked}{admit}dnat ip to udp dport map @emap',
    ]
    if spec.hairpinning:
        lines.append(f'    iifname "{lan}" ip daddr {wan_ip} dnat ip to udp dport map @emap')
    lines += [
        "  }",
        "  chain post {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *_own_traffic(spec, wan, wan_ip),
        f'    oifname "{wan}" ip saddr . udp sport @imap snat ip to {wan_ip} : ip saddr . udp sport map @imap',
        f'    oifname "{wan}" udp sport @emap masquerade random',
        f'    oifname "{wan}" {first_pick}',
    ]
    if spec.hairpinning:
        lines += [
            f'    oifname "{lan}" ip saddr {lan_cidr} ct status dnat ip saddr . udp sport @imap '
            f"snat ip to {wan_ip} : ip saddr . udp sport map @imap",
            f'    oifname "{lan}" ip saddr {lan_cidr} ct status dnat snat ip to {wan_ip}',
        ]
    lines.append("  }")
    return lines + _eim_track(spec, wan)


def _eim_track(spec: NatSpec, wan: str) -> list[str]:
    """The chains that create and refresh the binding and the filter state from live flows."""
    lines = [
        "  chain track {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        f'    oifname "{wan}" ct direction original update @emap {{ udp sport : ct original ip saddr . ct original proto-src }}',
        f'    oifname "{wan}" meta l4proto udp ct direction original update @imap '
        "{ ct original ip saddr . ct original proto-src : udp sport }",
        f'    oifname "{wan}" ct direction reply update @emap {{ udp sport : ct reply ip saddr . ct reply proto-src }}',
        f'    oifname "{wan}" meta l4proto udp ct direction reply update @imap '
        "{ ct reply ip saddr . ct reply proto-src : udp sport }",
        f'    oifname "{wan}" update @permit_a {{ udp sport . ip daddr }}',
        f'    oifname "{wan}" update @permit_ap {{ udp sport . ip daddr . udp dport }}',
        "  }",
    ]
    if spec.refresh == Refresh.BOTH:
        # after DNAT: the inside endpoint is the destination, the public port is in the conntrack
        # tuple that came in from outside (original for flows opened from outside, else reply)
        lines += [
            "  chain track_in {",
            "    type filter hook forward priority filter + 10; policy accept;",
        ]
        for d in ("original", "reply"):
            pub = f"ct {d} proto-dst"
            match = f'iifname "{wan}" meta l4proto udp ct direction {d}'
            lines += [
                f"    {match} update @emap {{ {pub} : ip daddr . udp dport }}",
                f"    {match} update @imap {{ ip daddr . udp dport : {pub} }}",
                f"    {match} update @permit_a {{ {pub} . ip saddr }}",
                f"    {match} update @permit_ap {{ {pub} . ip saddr . udp sport }}",
            ]
        lines.append("  }")
    return lines


def _gate(spec: NatSpec, wan: str, wan_ip: str, refused: list[str],
          refresh: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Inbound to the public address: drop what no live binding or permission admits, before
    conntrack can refresh anything (mark it, on a port-mapping router: see `_late`); then run the
    inbound refresh `update`s, if any."""
    verdict = f"meta mark set {GATE_MARK}" if spec.port_mapping else "drop"
    return [
        "  # inbound: only to a live binding, from a remote its filter admits (established flows too)",
        "  chain gate {",
        "    type filter hook prerouting priority raw; policy accept;",
        *(f'    iifname "{wan}" ip daddr {wan_ip} {cond} {verdict}' for cond in refused),
        *(f'    iifname "{wan}" ip daddr {wan_ip} {upd}' for upd in refresh),
        "  }",
    ]


def _apdm(spec: NatSpec, wan: str, lan: str, wan_ip: str, lan_cidr: str) -> list[str]:
    t = _timeout(spec)
    lines = [
        "  # conntrack is the mapping; this set is its lifetime: public port . remote ip . remote port",
        f"  set flows {{ type inet_service . ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}; }}",
    ]
    if spec.ports == PortAllocation.SEQUENTIAL:
        base, n = spec.sequential_base, spec.sequential_count
        elements = ", ".join(f"{i} : {base + i}" for i in range(n))
        lines += [
            "  # a new public port per new flow, counting up: predictable",
            f"  map seq {{ typeof numgen inc mod {n} : udp sport; elements = {{ {elements} }} }}",
        ]
    flow = "udp dport . ip saddr . udp sport"
    refresh = [f"update @flows {{ {flow} }}"] if spec.refresh == Refresh.BOTH else []
    lines += _gate(spec, wan, wan_ip, [f"{flow} != @flows"], refresh)
    lines += [
        "  chain pre {",
        "    type nat hook prerouting priority dstnat; policy accept;",
        "  }",
        "  chain post {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        *_own_traffic(spec, wan, wan_ip),
    ]
    if spec.ports == PortAllocation.SEQUENTIAL:
        snat = f"meta l4proto udp snat ip to {wan_ip} : numgen inc mod {spec.sequential_count} map @seq"
        if spec.sequential_scope == CounterScope.HOST:
            # every numgen expression has its own counter: one rule per inside address
            hosts = ipaddress.IPv4Network(lan_cidr).hosts()
            lines += [f'    oifname "{wan}" ip saddr {h} {snat}' for h in hosts]
        else:
            lines.append(f'    oifname "{wan}" {snat}')
        lines.append(f'    oifname "{wan}" masquerade')
    elif spec.ports == PortAllocation.RANDOM:
        lines.append(f'    oifname "{wan}" masquerade random')
    else:
        lines.append(f'    oifname "{wan}" masquerade')
    lines += [
        "  }",
        "  chain track {",
        "    type filter hook postrouting priority srcnat + 10; policy accept;",
        f'    oifname "{wan}" update @flows {{ udp sport . ip daddr . udp dport }}',
        "  }",
    ]
    return lines


def _filter(wan: str, lan: str, stun_servers: tuple[str, ...]) -> list[str]:
    stun = ", ".join(stun_servers)
    ports = ", ".join(map(str, STUN_PORTS))
    own_stun = [f'    iifname "{wan}" ip saddr {{ {stun} }} udp sport {{ {ports} }} accept'] if stun_servers else []
    return [
        "  chain forward_f {",
        "    type filter hook forward priority filter; policy drop;",
        "    ct state established,related accept",
        f'    iifname "{lan}" oifname "{wan}" accept',
        f'    iifname "{lan}" oifname "{lan}" accept',
        "    ct status dnat accept",
        "  }",
        "  chain input_f {",
        "    type filter hook input priority filter; policy drop;",
        '    iifname "lo" accept',
        "    ct state established,related accept",
        f'    iifname "{lan}" accept',
        *own_stun,
        "    icmp type echo-request accept",
        "  }",
    ]
