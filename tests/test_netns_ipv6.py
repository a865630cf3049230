"""IPv6 on the kernel lab (issue 17, part 2): dual-stack namespaces, the stateful firewall that
`table ip6 qlab_fw6` gives a router (conntrack: only the remote ip:port an inside host sent to gets
in), IPv4 NAT beside it, one dual-stack socket, and a symmetric x symmetric trial that goes direct
over IPv6. Short: one lab, one trial."""

from __future__ import annotations

import socket
import subprocess

import pytest

from qlab.experiment.record import TrialSpec
from qlab.experiment.trial import run_trial
from qlab.nat.firewall6 import firewall6, render
from qlab.scenario.topology import build

Addr = tuple[str, int]


def _recv(sock: socket.socket, timeout: float = 0.5) -> tuple[bytes, Addr] | None:
    sock.settimeout(timeout)
    try:
        data, addr = sock.recvfrom(2048)
    except TimeoutError:
        return None
    return data, (addr[0], addr[1])


def test_stateful_firewall_and_nat_side_by_side_on_netns(netns_ok: None) -> None:
    from qlab.backends.netns.lab import Lab

    lab = Lab(build("symmetric", "port_restricted", agent_ipv6="stateful", connector_ipv6="open"))
    with lab:
        loaded = lab.run("nat-a", ["nft", "list", "table", "ip6", "qlab_fw6"], capture_output=True, text=True)
        assert "ct state established,related accept" in loaded.stdout
        assert render(firewall6("stateful"), wan_if="wan", lan_if="lan").count("\n") > 5
        inter = lab.socket("intermediate", socket.AF_INET6)
        inter.bind(("2001:db8::10", 4433))
        agent = lab.socket("agent", socket.AF_INET6)
        agent.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        agent.bind(("::", 5000))
        conn = lab.socket("connector", socket.AF_INET6)
        conn.bind(("2001:db8:2::2", 6000))
        inter4 = lab.socket("intermediate", socket.AF_INET)
        inter4.bind(("203.0.113.10", 4433))
        try:
            inter.sendto(b"unsolicited", ("2001:db8:1::2", 5000))
            assert _recv(agent) is None  # the stateful side drops it
            inter.sendto(b"to the open side", ("2001:db8:2::2", 6000))
            assert _recv(conn) == (b"to the open side", ("2001:db8::10", 4433))
            agent.sendto(b"out v6", ("2001:db8::10", 4433))
            assert _recv(inter) == (b"out v6", ("2001:db8:1::2", 5000))  # routed, not translated
            agent.sendto(b"out v4", ("::ffff:203.0.113.10", 4433))  # the same socket, IPv4-mapped
            got = _recv(inter4)
            assert got is not None and got[0] == b"out v4" and got[1][0] == "203.0.113.101"  # through the NAT
            inter.sendto(b"reply", ("2001:db8:1::2", 5000))
            assert _recv(agent) == (b"reply", ("2001:db8::10", 4433))
            other = lab.socket("intermediate", socket.AF_INET6)
            other.bind(("2001:db8::10", 4434))
            other.sendto(b"another port", ("2001:db8:1::2", 5000))
            assert _recv(agent) is None  # address-and-port-dependent
            other.close()
        finally:
            for s in (inter, inter4, agent, conn):
                s.close()
        names = list(lab.namespaces.values())
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(n in listed for n in names)  # every namespace removed on exit


def test_symmetric_nats_go_direct_over_ipv6_on_netns(netns_ok: None) -> None:
    """...and when the IPv6 path is blackholed in the Agent's router (the `ip6` block table), traffic
    is back on the relay within the failover bound."""
    r = run_trial(TrialSpec(backend="netns", agent_nat="symmetric", connector_nat="symmetric", profile="wan-20ms",
                            agent_ipv6="stateful", connector_ipv6="stateful", seed=1, samples=5, verify_echoes=5,
                            blackhole=True))
    assert r.error == "", r.error
    assert r.outcome == "direct_wan" and r.direct_verified and r.as_expected, (r.reason, r.path_events)
    assert r.path_family == "ipv6" and r.mechanism == "ipv6" and r.working_pair == "2001:db8:2::2:4434"
    assert r.failover_ms is not None and r.failover_ms <= 2000, r.path_events


@pytest.mark.parametrize("fws", [("stateful", "")])
def test_ipv6_on_one_side_only_stays_ipv4_on_netns(netns_ok: None, fws: tuple[str, str]) -> None:
    r = run_trial(TrialSpec(backend="netns", agent_nat="port_restricted", connector_nat="port_restricted",
                            profile="wan-20ms", agent_ipv6=fws[0], connector_ipv6=fws[1], seed=1, samples=5,
                            verify_echoes=5))
    assert r.outcome == "direct_wan" and r.path_family == "ipv4", (r.reason, r.path_events)
