"""The kernel NAT lab: a `Topology` rendered as Linux network namespaces, veths, bridges and one
nftables ruleset per NAT router (from the same NatSpec the simulator implements).

Layout: a hub namespace holds the "internet" bridge (203.0.113.0/24, which exists only inside the
lab); every router and public host has an uplink into it; each router holds its LAN bridge and its
LAN hosts hang off it; a carrier NAT's LAN is the home router's uplink segment. Links with a delay
or loss profile use netem where the kernel has it, else TAP pairs bridged by a `tapwire` process (this
machine's kernel has no netem; each frame's fate comes from the same link model as in the
simulator, `qlab/scenario/linkmodel.py`); the others are veths.

Names are `qlab-<run id>-<node>`, so several labs coexist and `down_all()` finds what a crash left
behind. Wire processes die with the process that made the lab; a lab made by `qlab lab up` records
its wires in /run/qlab/<run id>.json so `qlab lab down` can stop them later. A router whose NAT offers
port mapping runs miniupnpd, with a STUN server on the Intermediate (`daemons.py`); whatever runs in a
lab's namespaces is killed before they are deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from qlab.backends.netns import daemons
from qlab.backends.netns.tapwire import link_args
from qlab.nat.firewall6 import render as render6
from qlab.nat.nftables import conntrack_sysctls, daemon_table, render
from qlab.nat.spec import NatSpec
from qlab.scenario.profiles import LinkProfile
from qlab.scenario.topology import INTERMEDIATE_IPS, INTERNET, Topology

PREFIX = "qlab-"
STATE_DIR = Path(os.environ.get("QLAB_STATE_DIR", "/run/qlab"))
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LabUnavailable(RuntimeError):
    """The lab cannot run on this machine; the message says exactly what is missing."""


def check_requirements(need_tun: bool = True, port_mapping: bool = False, ipv6: bool = False) -> None:
    missing = [tool for tool in ("ip", "nft", "conntrack") if shutil.which(tool) is None]
    if missing:
        raise LabUnavailable(
            f"the netns lab needs {', '.join(missing)} (Debian: apt-get install nftables conntrack iproute2)")
    if port_mapping and not (os.access(daemons.MINIUPNPD, os.X_OK) and os.access(daemons.STUND, os.X_OK)):
        raise LabUnavailable("a NAT that offers port mapping needs miniupnpd and stund "
                             "(Debian: apt-get install miniupnpd-nftables stun-server)")
    if os.geteuid() != 0:
        hint = ("the qlab command re-runs itself in an unprivileged user namespace for this"
                if userns_available() else "unprivileged user namespaces are not allowed here either")
        raise LabUnavailable(
            "the netns lab needs root, or an unprivileged user namespace (CAP_NET_ADMIN there); "
            f"{hint}; or use --backend sim, which needs no privilege")
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        raise LabUnavailable("this kernel has no network namespaces (/proc/self/ns/net is missing)")
    if ipv6 and not os.path.isdir("/proc/sys/net/ipv6"):
        raise LabUnavailable("a dual-stack lab needs IPv6 in the kernel (/proc/sys/net/ipv6 is missing)")
    if need_tun and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        raise LabUnavailable("link profiles with delay or loss need /dev/net/tun (read/write) for the TAP wires")


_USERNS: bool | None = None
_NETEM: bool | None = None
IN_USERNS_ENV = "QLAB_IN_USERNS"


def userns_available() -> bool:
    """Whether this user may create a user namespace with its own network (cached)."""
    global _USERNS
    if _USERNS is None:
        try:
            _USERNS = shutil.which("unshare") is not None and subprocess.run(
                ["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True, timeout=10,
            ).returncode == 0
        except (OSError, subprocess.SubprocessError):
            _USERNS = False
    return _USERNS


def userns_command(argv: list[str]) -> list[str]:
    """`argv` wrapped to run as root of a fresh user namespace, with a private /run for `ip netns`."""
    script = 'mount -t tmpfs qlab /run && mkdir -p /run/netns /run/qlab && exec "$@"'
    return ["unshare", "--user", "--map-root-user", "--net", "--mount", "--fork", "sh", "-c", script, "sh", *argv]


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (cached; tried once in a throwaway namespace)."""
    global _NETEM
    if _NETEM is None:
        ns = f"{PREFIX}probe-{secrets.token_hex(3)}"
        try:
            _run(["ip", "netns", "add", ns])
            _NETEM = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                     "delay", "1ms"], capture_output=True, timeout=10).returncode == 0
        except (OSError, RuntimeError, subprocess.SubprocessError):
            _NETEM = False
        finally:
            _run(["ip", "netns", "del", ns], check=False)
    return _NETEM


def netem_args(link: LinkProfile) -> list[str]:
    """tc arguments for one direction of a link (each end shapes what it sends), in tc-netem(8)'s
    syntax: `delay TIME [JITTER [CORRELATION]] [distribution NAME]`, `loss P`, `reorder P`,
    `rate R`. A correlation or a distribution has no place without a jitter, and `uniform`, netem's
    default, is not named: iproute2 installs tables for normal, pareto and paretonormal only."""
    args = ["netem", "delay", f"{_number(link.delay_ms)}ms"]
    if link.jitter_ms:
        args.append(f"{_number(link.jitter_ms)}ms")
        if link.jitter_correlation:
            args.append(f"{_number(link.jitter_correlation * 100)}%")
        if link.jitter_distribution != "uniform":
            args += ["distribution", link.jitter_distribution]
    if link.loss:
        args += ["loss", f"{_number(link.loss * 100)}%"]
    if link.reorder:
        args += ["reorder", f"{_number(link.reorder * 100)}%"]
    if link.rate_mbit:
        args += ["rate", f"{_number(link.rate_mbit)}mbit"]
    return args


def _number(x: float) -> str:
    """A decimal tc reads: no exponent, no float noise (5.000000000000001 is 5), ns resolution in ms."""
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _run(argv: list[str], *, input: str | None = None, check: bool = True, timeout: float = 20) -> str:
    p = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])}{' ...' if len(argv) > 6 else ''} failed: {p.stderr.strip()}")
    return p.stdout


def _batch(ns: str, commands: list[str]) -> None:
    if commands:
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def _sysctl(ns: str, values: dict[str, str]) -> None:
    args = [f"{k}={v}" for k, v in values.items()]
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", *args])


# The LAN bridge is a plain switch and NAT happens where the router routes, as on a home router.
# With br_netfilter's default (call-iptables=1, whenever the module is loaded on the host) the
# bridge would DNAT a hairpinned frame itself and then refuse to send it back out the port it came
# in on: a host could not reach its own public mapping.
_BRIDGE_NF = "net.bridge.bridge-nf-call-iptables"


def _routed_lan() -> dict[str, str]:
    return {_BRIDGE_NF: "0"} if Path("/proc/sys", *_BRIDGE_NF.split(".")).exists() else {}


@dataclass
class Wire:
    proc: subprocess.Popen
    ns_a: str
    ns_b: str


@dataclass
class Lab:
    topology: Topology
    run_id: str = ""
    persistent: bool = False  # wires outlive this process (the CLI's `lab up`)
    namespaces: dict[str, str] = field(default_factory=dict)
    wires: list[Wire] = field(default_factory=list)
    up_seconds: float | None = None
    link_mechanism: str = "tapwire"
    wire_options: tuple[str, ...] = ()  # extra tapwire arguments (benchmarks compare wire modes)
    services: list[daemons.Daemon] = field(default_factory=list)  # miniupnpd, stund
    seed: int = 0  # the wires' random streams: a trial's seed, so trials draw different jitter and loss
    _specs: dict[str, NatSpec] = field(default_factory=dict)
    _blocking: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.run_id:
            self.run_id = secrets.token_hex(3)
        if not self.run_id.isalnum() or len(self.run_id) > 8:
            raise ValueError("run id: 1-8 letters or digits")
        self.hub = f"{PREFIX}{self.run_id}-hub"
        for name in self.topology.node_names:
            self.namespaces[name] = f"{PREFIX}{self.run_id}-{name}"[:60]
        self._specs = {r.name: r.nat for r in self.topology.routers}

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def netns(self, host: str) -> str:
        try:
            return self.namespaces[host]
        except KeyError:
            raise KeyError(f"no node {host!r} in this lab (nodes: {', '.join(self.namespaces)})") from None

    def up(self) -> Lab:
        t0 = time.monotonic()
        topo = self.topology
        shaped = any(not link.ideal for link in self._links().values())
        self.link_mechanism = "netem" if shaped and shutil.which("tc") and netem_available() else "tapwire"
        mapping = any(r.nat.port_mapping for r in topo.routers)
        check_requirements(need_tun=shaped and self.link_mechanism == "tapwire", port_mapping=mapping,
                           ipv6=topo.ipv6)
        for ns in [self.hub, *self.namespaces.values()]:
            _run(["ip", "netns", "add", ns])
        cmds: dict[str, list[str]] = {ns: ["link set lo up"] for ns in [self.hub, *self.namespaces.values()]}
        cmds[self.hub] += ["link add br0 type bridge", "link set br0 up"]
        # router LAN bridges
        for r in topo.routers:
            ns = self.netns(r.name)
            plen = self._plen(r.lan_segment)
            cmds[ns] += ["link add lan type bridge", "link set lan up", f"addr add {r.lan_ip}/{plen} dev lan"]
        wires: list[tuple[str, str, str, str, LinkProfile]] = []
        shaping: list[tuple[str, str, LinkProfile]] = []
        # uplinks: routers' WAN, and hosts' single interface
        for idx, (node, (segment, ifname, ips, plen, link)) in enumerate(self._attachments().items()):
            ns = self.netns(node)
            up_ns, up_dev = self._segment_owner(segment)
            port = f"u{idx}"
            if link.ideal or self.link_mechanism == "netem":
                _run(["ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", up_ns])
                cmds[up_ns].append(f"link set {port} master {up_dev} up")
                if not link.ideal:
                    shaping.append((ns, ifname, link))
                    shaping.append((up_ns, port, link))
            else:
                wires.append((ns, ifname, up_ns, port, link))
            for ip in ips:
                cmds[ns].append(f"addr add {ip}/{plen} dev {ifname}")
        self._start_wires(wires)
        for _ns, _if, up_ns, port, _link in wires:
            cmds[up_ns].append(f"link set {port} master {self._segment_owner_dev(up_ns)} up")
        for node, attachment in self._attachments().items():
            ns = self.netns(node)
            cmds[ns].append(f"link set {attachment[1]} up")
            gw = self._gateway(node)
            if gw:
                cmds[ns].append(f"route add default via {gw}")
        for ns, c in cmds.items():
            _batch(ns, c)
        for ns, dev, link in shaping:  # netem where the kernel has it: each end delays what it sends
            _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *netem_args(link)])
            if link.in_order:  # a pfifo child replaces netem's time-sorted queue: no overtaking
                _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "pfifo", "limit", "1000"])
        self._configure()
        self._pin_neighbours()
        if mapping:
            self._start_port_mapping()
        self.up_seconds = time.monotonic() - t0
        self._save_state()
        return self

    def _configure(self) -> None:
        """Routers forward and NAT; a dual-stack lab gets its IPv6 addresses, routes and firewalls."""
        v6 = self.topology.ipv6
        for r in self.topology.routers:
            ns = self.netns(r.name)
            _sysctl(ns, {"net.ipv4.ip_forward": "1", "net.ipv4.conf.all.send_redirects": "0",
                         "net.ipv4.conf.lan.send_redirects": "0", **_routed_lan(),
                         **({"net.ipv6.conf.all.forwarding": "1"} if v6 else {})})
            self._load_nat(r.name)
        if v6:
            self._setup_ipv6()

    def _setup_ipv6(self) -> None:
        """IPv6 addresses (no duplicate address detection: the lab plans them), each host's default
        route, the internet's routes to each site's /64, and each router's `ip6` firewall."""
        topo = self.topology
        plen6 = {s.name: int(s.cidr6.split("/")[1]) for s in topo.segments if s.cidr6}
        cmds: dict[str, list[str]] = {}
        for r in topo.routers:
            if r.wan_ip6 and r.lan_ip6:
                cmds.setdefault(self.netns(r.name), []).extend([
                    f"addr add {r.wan_ip6}/{plen6[r.wan_segment]} dev wan nodad",
                    f"addr add {r.lan_ip6}/{plen6[r.lan_segment]} dev lan nodad"])
        for h in topo.hosts:
            c = cmds.setdefault(self.netns(h.name), [])
            c += [f"addr add {ip}/{plen6[h.segment]} dev eth0 nodad" for ip in h.ips6]
            if h.gateway6:
                c.append(f"route add ::/0 via {h.gateway6}")
        on_internet = [r.name for r in topo.routers if r.wan_segment == INTERNET and r.wan_ip6] + \
                      [h.name for h in topo.hosts if h.segment == INTERNET and h.ips6]
        own = self._addresses6()
        for node in on_internet:
            cmds[self.netns(node)] += [f"route add {cidr} via {via}" for cidr, via in topo.routes6()
                                       if via not in own[node]]
        for ns, c in cmds.items():
            _batch(ns, c)
        for r in topo.routers:
            if r.fw6 is not None:
                _run(self._exec(r.name, ["nft", "-f", "-"]), input=render6(r.fw6, wan_if="wan", lan_if="lan"))

    def _start_port_mapping(self) -> None:
        """stund on the Intermediate, then miniupnpd on every router that offers mapping."""
        run_dir = STATE_DIR / self.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        primary, alternate = INTERMEDIATE_IPS
        self.services.append(daemons.start(
            "stund", self._exec("intermediate", daemons.stund_argv(primary, alternate)), run_dir / "stund.log",
            ready=("Opened port 3478", "Opened port 3479")))
        for r in self.topology.routers:
            if not r.nat.port_mapping:
                continue
            _run(["ip", "netns", "exec", self.netns(r.name), "nft", "-f", "-"], input=daemon_table())
            lan = next(s for s in self.topology.segments if s.name == r.lan_segment)
            conf = run_dir / f"{r.name}.conf"
            conf.write_text(daemons.miniupnpd_config(r.nat, wan_if="wan", lan_if="lan", lan_cidr=lan.cidr,
                                                     stun_server=primary, uuid=_uuid(self.run_id, r.name)))
            self.services.append(daemons.start(
                f"miniupnpd on {r.name}", self._exec(r.name, daemons.miniupnpd_argv(conf, run_dir / f"{r.name}.pid")),
                run_dir / f"{r.name}.log", ready=daemons.miniupnpd_ready(r.nat), failed=daemons.MINIUPNPD_FAILED))
        self._save_state()

    def _exec(self, node: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def down(self) -> None:
        for d in self.services:
            d.stop()
        self.services.clear()
        for w in self.wires:
            if w.proc.poll() is None:
                w.proc.terminate()
        for w in self.wires:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(5)
            if w.proc.poll() is None:
                w.proc.kill()
        self.wires.clear()
        for ns in [*self.namespaces.values(), self.hub]:
            _kill_inside(ns)
            _run(["ip", "netns", "del", ns], check=False)
        with contextlib.suppress(FileNotFoundError):
            (STATE_DIR / f"{self.run_id}.json").unlink()
        shutil.rmtree(STATE_DIR / self.run_id, ignore_errors=True)

    # -- topology helpers -----------------------------------------------------------------------
    def _plen(self, segment: str) -> int:
        seg = next(s for s in self.topology.segments if s.name == segment)
        return int(seg.cidr.split("/")[1])

    def _attachments(self) -> dict[str, tuple[str, str, tuple[str, ...], int, LinkProfile]]:
        """node -> (segment, interface name, addresses, prefix length, link profile)."""
        out: dict[str, tuple[str, str, tuple[str, ...], int, LinkProfile]] = {}
        for r in self.topology.routers:
            out[r.name] = (r.wan_segment, "wan", (r.wan_ip,), self._plen(r.wan_segment), r.uplink)
        for h in self.topology.hosts:
            out[h.name] = (h.segment, "eth0", h.ips, self._plen(h.segment), h.link)
        return out

    def _pin_neighbours(self) -> None:
        """Permanent ARP entries between the addresses of each segment. On the internet two NATs are
        many hops apart and never ARP for each other; on the lab's flat bridge the first packet
        between them would wait for an ARP exchange across both delayed links (measured: +10 ms to
        the first punch at `wan-20ms`), which no real path pays."""
        members: dict[str, list[tuple[str, str, str]]] = {}  # segment -> (namespace, device, address)
        v6 = self._addresses6()
        for node, (segment, ifname, ips, _plen, _link) in self._attachments().items():
            members.setdefault(segment, []).extend((self.netns(node), ifname, ip) for ip in ips + v6.get(node, ()))
        for r in self.topology.routers:
            lan = (r.lan_ip, *filter(None, [r.lan_ip6]))
            members.setdefault(r.lan_segment, []).extend((self.netns(r.name), "lan", ip) for ip in lan)
        mac = {(ns, dev): json.loads(_run(["ip", "-n", ns, "-j", "link", "show", "dev", dev]))[0]["address"]
               for group in members.values() for ns, dev, _ip in group}
        cmds: dict[str, list[str]] = {}
        for group in members.values():
            for ns, dev, _ip in group:
                cmds.setdefault(ns, []).extend(
                    f"neigh replace {ip} lladdr {mac[(other, odev)]} dev {dev} nud permanent"
                    for other, odev, ip in group if other != ns)
        for ns, c in cmds.items():
            _batch(ns, c)

    def _addresses6(self) -> dict[str, tuple[str, ...]]:
        """node -> its IPv6 addresses on its uplink (routers' WAN, hosts' interface)."""
        out: dict[str, tuple[str, ...]] = {r.name: (r.wan_ip6,) for r in self.topology.routers if r.wan_ip6}
        out.update({h.name: h.ips6 for h in self.topology.hosts if h.ips6})
        return out

    def _links(self) -> dict[str, LinkProfile]:
        return {node: a[4] for node, a in self._attachments().items()}

    def _segment_owner(self, segment: str) -> tuple[str, str]:
        """(namespace, bridge) of a segment: the hub's br0 for the internet, else the router whose LAN it is."""
        if segment == INTERNET:
            return self.hub, "br0"
        r = next(r for r in self.topology.routers if r.lan_segment == segment)
        return self.netns(r.name), "lan"

    def _segment_owner_dev(self, ns: str) -> str:
        return "br0" if ns == self.hub else "lan"

    def _gateway(self, node: str) -> str | None:
        for r in self.topology.routers:
            if r.name == node:
                return r.upstream_gateway
        h = self.topology.host(node)
        return h.gateway

    def _start_wires(self, wires: list[tuple[str, str, str, str, LinkProfile]]) -> None:
        procs = []
        for i, (ns, ifname, up_ns, port, link) in enumerate(wires):
            argv = [sys.executable, "-m", "qlab.backends.netns.tapwire", "--ns-a", ns, "--if-a", ifname, "--ns-b", up_ns,
                    "--if-b", port, *link_args(link), "--seed", f"{self.seed}{i:02d}", *self.wire_options]
            if not self.persistent:
                argv.append("--die-with-parent")
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 start_new_session=self.persistent)
            self.wires.append(Wire(p, ns, up_ns))
            procs.append(p)
        deadline = time.monotonic() + 15
        for p in procs:
            assert p.stdout is not None and p.stderr is not None  # both are PIPEs
            line = ""
            while time.monotonic() < deadline and not line:
                if p.poll() is not None:
                    raise RuntimeError(f"a link wire failed to start: {p.stderr.read().strip()}")
                ready, _, _ = select.select([p.stdout], [], [], 0.2)
                if ready:
                    line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError("a link wire did not become ready within 15 s")

    # -- NAT ------------------------------------------------------------------------------------
    def spec(self, router: str) -> NatSpec:
        """The NatSpec a router is meant to run (binding timeout as last set)."""
        return self._specs[router]

    def ruleset(self, router: str) -> str:
        r = self.topology.router(router)
        lan = next(s for s in self.topology.segments if s.name == r.lan_segment)
        stun = INTERMEDIATE_IPS if self._specs[router].port_mapping else ()
        return render(self._specs[router], wan_if="wan", lan_if="lan", wan_ip=r.wan_ip, lan_cidr=lan.cidr,
                      stun_servers=stun)

    def _load_nat(self, router: str) -> None:
        ns = self.netns(router)
        _sysctl(ns, conntrack_sysctls(self._specs[router]))
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=self.ruleset(router))

    def flush_nat(self, router: str) -> None:
        """Forget every mapping of one router: reload its ruleset (sets and counters start empty)
        and flush its conntrack table."""
        ns = self.netns(router)
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=self.ruleset(router))
        _run(["ip", "netns", "exec", ns, "conntrack", "-F"], check=False)

    def reset_nat(self) -> None:
        """Fresh NAT state on every router (between trials), without rebuilding the lab."""
        for r in self.topology.routers:
            self.flush_nat(r.name)

    def set_binding_timeout(self, router: str, seconds: float) -> None:
        self._specs[router] = self._specs[router].with_timeout(seconds)
        self._load_nat(router)

    def block(self, router: str, ip: str, port: int | None = None) -> None:
        """Blackhole forwarded traffic to or from ip[:port] in a router."""
        ns = self.netns(router)
        if router not in self._blocking:  # once: re-adding the table would duplicate its rules
            _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=_block_table("ip") + _block_table("ip6"))
            self._blocking.add(router)
        _run(["ip", "netns", "exec", ns, "nft", _block_element("add", ip, port)])

    def unblock(self, router: str, ip: str | None = None, port: int | None = None) -> None:
        ns = self.netns(router)
        if ip is None:
            for family in ("ip", "ip6"):
                _run(["ip", "netns", "exec", ns, "nft", "delete", "table", family, "qlab_block"], check=False)
            self._blocking.discard(router)
            return
        _run(["ip", "netns", "exec", ns, "nft", _block_element("delete", ip, port)], check=False)

    # -- using the lab --------------------------------------------------------------------------
    def socket(self, host: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A socket created inside `host`'s namespace (the socket keeps it; this thread comes back)."""
        here = os.open("/proc/self/ns/net", os.O_RDONLY)
        there = os.open(f"/run/netns/{self.netns(host)}", os.O_RDONLY)
        try:
            if _libc.setns(there, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                return socket.socket(family, type, proto)
            finally:
                _libc.setns(here, CLONE_NEWNET)
        finally:
            os.close(here)
            os.close(there)

    def popen(self, host: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns(host), *argv], **kw)

    def run(self, host: str, argv: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns(host), *argv], timeout=timeout, **kw)

    def status(self) -> dict:
        t = self.topology
        return {
            "run_id": self.run_id, "scenario": t.scenario, "agent_nat": t.agent_nat, "connector_nat": t.connector_nat,
            "profile": t.profile.name, "up_seconds": self.up_seconds, "links": self.link_mechanism,
            "rootless": os.environ.get(IN_USERNS_ENV) == "1",
            "namespaces": dict(self.namespaces), "wires": [w.proc.pid for w in self.wires],
            "daemons": {d.name: d.proc.pid for d in self.services},
            "hosts": {h.name: list(h.addresses) for h in t.hosts},
            "routers": {r.name: {"nat": r.nat.name, "wan": r.wan_ip, "lan": r.lan_ip} for r in t.routers},
        }

    def _save_state(self) -> None:
        with contextlib.suppress(OSError):
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            state = {**self.status(), "hub": self.hub, "persistent": self.persistent,
                     "topology_args": {"agent_nat": self.topology.agent_nat,
                                       "connector_nat": self.topology.connector_nat,
                                       "scenario": self.topology.scenario, "profile": self.topology.profile.name,
                                       "agents": len(self.topology.agents)}}
            tmp = STATE_DIR / f".{self.run_id}.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, STATE_DIR / f"{self.run_id}.json")


def _block_table(family: str) -> str:
    """The fault-injection table of one address family (`ip` or `ip6`)."""
    addr = "ipv4_addr" if family == "ip" else "ipv6_addr"
    return f"""table {family} qlab_block {{
  set hosts {{ type {addr}; }}
  set endpoints {{ type {addr} . inet_service; }}
  chain block_f {{
    type filter hook forward priority -10; policy accept;
    {family} daddr @hosts drop
    {family} saddr @hosts drop
    {family} daddr . udp dport @endpoints drop
    {family} saddr . udp sport @endpoints drop
  }}
}}
"""


def _block_element(verb: str, ip: str, port: int | None) -> str:
    family = "ip6" if ":" in ip else "ip"
    if port is None:
        return f"{verb} element {family} qlab_block hosts {{ {ip} }}"
    return f"{verb} element {family} qlab_block endpoints {{ {ip} . {port} }}"


def lab_namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def down_all() -> list[str]:
    """Remove every qlab namespace and wire process left behind (after a crash, say)."""
    removed: list[str] = []
    if STATE_DIR.is_dir():
        for f in STATE_DIR.glob("*.json"):
            with contextlib.suppress(Exception):
                for pid in json.loads(f.read_text()).get("wires", []):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        if "tapwire" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                            os.kill(pid, signal.SIGTERM)
            f.unlink(missing_ok=True)
    for ns in lab_namespaces():
        _kill_inside(ns)
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    if STATE_DIR.is_dir():
        for d in STATE_DIR.iterdir():
            if d.is_dir() and d.name.isalnum():
                shutil.rmtree(d, ignore_errors=True)
    # wires whose state file was lost
    for pid_dir in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if "qlab.backends.netns.tapwire" in (pid_dir / "cmdline").read_text(errors="replace"):
                os.kill(int(pid_dir.name), signal.SIGTERM)
    return removed


def _kill_inside(ns: str) -> None:
    """Kill every process in namespace `ns` (a daemon outlives `ip netns del` otherwise)."""
    for pid in _run(["ip", "netns", "pids", ns], check=False).split():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def _uuid(run_id: str, router: str) -> str:
    """A stable UPnP device UUID per lab router (the daemon wants one)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qlab:{run_id}:{router}"))


def saved_labs() -> list[dict]:
    if not STATE_DIR.is_dir():
        return []
    out = []
    for f in sorted(STATE_DIR.glob("*.json")):
        with contextlib.suppress(Exception):
            out.append(json.loads(f.read_text()))
    return out
