"""The virtual network: hosts, NAT routers and links built from a `qlab.scenario.topology.Topology`.

Every host and router of the topology exists here with the same addresses. A host reaches hosts on
its own segment directly and everything else through its gateway; a router NATs between its LAN and
its WAN (a double NAT is a router whose WAN is another router's LAN). Each attachment of a node to a
segment has a link with the topology's profile, one `Wire` per direction: one-way delay, jitter,
loss and an optional rate (serialization delay behind a drop-tail queue). Delays are `loop.call_at`
timers, so on a `VirtualTimeLoop` they cost no wall time.

Roles get a `SimNet` per host (`SimNetwork.net(name)`), which implements `qlab.net.Net`: the same
Intermediate, Connector and Agent code runs here and on kernel sockets.

Every random choice (ephemeral ports, NAT ports, jitter, loss) comes from a `random.Random` derived
from the network's seed and the name of the thing choosing, so one seed fixes a whole run and
changing one link does not reshuffle the NAT's ports.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import ipaddress
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from qlab.backends.sim.clock import CLOCK_RESOLUTION
from qlab.backends.sim.cost import Classifier, ProcessingCost
from qlab.backends.sim.firewall6 import FirewallEngine
from qlab.backends.sim.nat import NatEngine, Verdict
from qlab.nat.gateway import HTTP_PORT, PCP_PORT, SSDP_PORT, MappingGateway
from qlab.scenario.linkmodel import QUEUE_LIMIT, LinkModel, RateQueue
from qlab.scenario.profiles import IDEAL, LinkProfile
from qlab.scenario.topology import Host, Router, Topology

Addr = tuple[str, int]
Receiver = Callable[[list[tuple[bytes, Addr]]], None]
Tracer = Callable[[str, str, "Packet"], None]

RECV_BATCH = 256  # datagrams handed to a receiver per call, as qlab.net.RealSocket does
UDP_IP_OVERHEAD = 28  # IPv4 + UDP header bytes, counted in serialization delay
UDP_IP6_OVERHEAD = 48  # IPv6 + UDP
MAX_UDP_PAYLOAD = 65507
EPHEMERAL_PORTS = (32768, 60999)  # Linux ip_local_port_range
DEFAULT_TTL = 16
WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(slots=True, eq=False)
class Packet:
    """A UDP datagram in flight. NAT rewrites src/dst in place; `next_hop` is set by routing."""

    src: Addr
    dst: Addr
    data: bytes
    ttl: int = DEFAULT_TTL
    next_hop: str = ""
    sent_at: float = 0.0


class Wire:
    """One direction of a link: loss, then the rate queue, then the delay, then `sink`. Whether a
    packet is lost, when it has been serialized and how long it is delayed (jitter, correlation,
    reordering) is the call of its `model` and its `RateQueue` (`qlab.scenario.linkmodel`, which the
    kernel lab's wires ask too).

    Without jitter, in-flight packets sit in a heap keyed by (arrival, sequence) with one loop timer
    for the earliest, so packets arriving at the same instant keep FIFO order and share a timer (a
    packet that skips the delay to be reordered goes in the same heap); so does an `in_order` link's
    jittered traffic. Other jitter gives every packet its own timer, and packets may overtake each
    other, as netem reorders.
    """

    __slots__ = ("name", "rng", "model", "sink", "network", "_profile", "_heap", "_seq", "_timer", "_timer_at",
                 "_rate")

    def __init__(self, network: SimNetwork, name: str, profile: LinkProfile, sink: Callable[[Packet], None]) -> None:
        self.network = network
        self.name = name
        self.rng = network._rng("wire", name)
        self._rate: RateQueue | None = None  # made by the first profile with a rate, kept after
        self.profile = profile
        self.sink = sink
        self._heap: list[tuple[float, int, Packet]] = []
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    @property
    def profile(self) -> LinkProfile:
        return self._profile

    @profile.setter
    def profile(self, profile: LinkProfile) -> None:
        """A new profile (`SimNetwork.set_link`) gets a new model drawing from the same stream; the
        rate queue stays, with the new rate for packets from now on."""
        self._profile = profile
        self.model = LinkModel(profile, self.rng)
        if profile.rate_mbit is None:
            return
        if self._rate is None:
            self._rate = RateQueue(profile.rate_mbit, self.network.queue_limit)
        else:
            self._rate.rate_mbit = profile.rate_mbit

    def send(self, pkt: Packet) -> None:
        p = self._profile
        if self.model.lost():
            self.network._drop(self.name, "loss", pkt)
            return
        if p.delay_ms == 0 and p.jitter_ms == 0 and p.rate_mbit is None:
            self.sink(pkt)
            return
        loop = self.network._loop  # set: a packet exists only once a socket was bound
        assert loop is not None
        t = loop.time()
        if p.rate_mbit is not None:
            assert self._rate is not None  # the profile setter made it
            overhead = UDP_IP6_OVERHEAD if ":" in pkt.dst[0] else UDP_IP_OVERHEAD
            serialized = self._rate.admit(t, len(pkt.data) + overhead)
            if serialized is None:
                self.network._drop(self.name, "queue", pkt)
                return
            t = serialized
        arrival = self.model.arrival(t)
        if p.jitter_ms and not p.in_order:
            loop.call_at(arrival, self._arrive, pkt)
            return
        # the heap keeps the order of equal arrivals (an in-order link gives many); the loop's
        # timers do not: asyncio's heap breaks ties between equal times arbitrarily
        heapq.heappush(self._heap, (arrival, self._seq, pkt))
        self._seq += 1
        if arrival < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(arrival, self._fire)
            self._timer_at = arrival

    def _fire(self) -> None:
        loop = self.network._loop
        assert loop is not None
        due_by = loop.time() + CLOCK_RESOLUTION
        heap = self._heap
        due: list[Packet] = []
        while heap and heap[0][0] <= due_by:
            due.append(heapq.heappop(heap)[2])
        if heap:
            self._timer_at = heap[0][0]
            self._timer = loop.call_at(self._timer_at, self._fire)
        else:
            self._timer, self._timer_at = None, math.inf
        for pkt in due:
            self.sink(pkt)

    def _arrive(self, pkt: Packet) -> None:
        self.sink(pkt)


class Attachment:
    """A node's interface on a segment: its addresses there and a wire each way."""

    def __init__(self, network: SimNetwork, node: Node, segment: Segment, ips: tuple[str, ...],
                 profile: LinkProfile) -> None:
        self.node = node
        self.segment = segment
        self.ips = ips
        self.up = Wire(network, f"{node.name}>{segment.name}", profile, segment.forward)
        self.down = Wire(network, f"{segment.name}>{node.name}", profile, lambda p: node.receive(p, self))
        segment.attach(self)


class Segment:
    """A broadcast domain: delivers a packet to the attachment that owns its next hop."""

    def __init__(self, network: SimNetwork, name: str, cidr: str, cidr6: str | None = None) -> None:
        self.network = network
        self.name = name
        self.net = ipaddress.ip_network(cidr)
        self.nets = [self.net] + ([ipaddress.ip_network(cidr6)] if cidr6 else [])
        self.owners: dict[str, Attachment] = {}
        self._on_link: dict[str, bool] = {}

    def attach(self, att: Attachment) -> None:
        for ip in att.ips:
            if ip in self.owners:
                raise ValueError(f"address {ip} on segment {self.name} is used twice")
            self.owners[ip] = att

    def on_link(self, ip: str) -> bool:
        """Whether `ip` is inside this segment's prefix (ValueError if it is not an IP address)."""
        try:
            return self._on_link[ip]
        except KeyError:
            addr = ipaddress.ip_address(ip)
            on = self._on_link[ip] = any(addr in net for net in self.nets)
            return on

    def forward(self, pkt: Packet) -> None:
        att = self.owners.get(pkt.next_hop)
        if att is None:
            self.network._drop(self.name, "no_route", pkt)
            return
        att.down.send(pkt)


class Node:
    """Something attached to segments that can take a packet in."""

    name: str

    def __init__(self, network: SimNetwork, name: str) -> None:
        self.network = network
        self.name = name
        self.blocked: set[tuple[str, int | None]] = set()
        self._routes: dict[str, tuple[Attachment, str] | None] = {}

    def receive(self, pkt: Packet, att: Attachment) -> None:
        raise NotImplementedError

    def is_blocked(self, *addrs: Addr) -> bool:
        if not self.blocked:
            return False
        return any((a[0], None) in self.blocked or a in self.blocked for a in addrs)

    def route(self, dst_ip: str) -> tuple[Attachment, str] | None:
        """(attachment, next hop) towards `dst_ip`: on-link directly, else via the gateway."""
        try:
            return self._routes[dst_ip]
        except KeyError:
            pass
        result = None
        try:
            for att in self._attachments():
                if att.segment.on_link(dst_ip):
                    result = (att, dst_ip)
                    break
            else:
                gw = self._gateway(dst_ip)
                if gw is not None:
                    result = gw
        except ValueError:  # not an IP address: nothing routes it
            result = None
        self._routes[dst_ip] = result
        return result

    def _attachments(self) -> list[Attachment]:
        raise NotImplementedError

    def _gateway(self, dst_ip: str) -> tuple[Attachment, str] | None:
        raise NotImplementedError

    def _route6(self, att: Attachment, dst_ip: str) -> tuple[Attachment, str] | None:
        """An internet node's route to an IPv6 site: via that site's router."""
        addr = ipaddress.ip_address(dst_ip)
        for net, via in self.network.routes6:
            if addr in net:
                return att, via
        return None

    def _send(self, pkt: Packet) -> None:
        r = self.route(pkt.dst[0])
        if r is None:
            self.network._drop(self.name, "no_route", pkt)
            return
        att, pkt.next_hop = r
        att.up.send(pkt)


class SimHost(Node):
    """An end host: one interface (possibly several addresses) and its UDP sockets."""

    def __init__(self, network: SimNetwork, spec: Host, segment: Segment) -> None:
        super().__init__(network, spec.name)
        self.spec = spec
        self.ips = tuple(spec.addresses)
        self.iface = Attachment(network, self, segment, self.ips, spec.link)
        self.gateway = spec.gateway
        self.gateway6 = spec.gateway6
        self.sockets: dict[tuple[str, int], SimSocket] = {}  # (ip or "0.0.0.0", port) -> socket
        self.port_rng = network._rng("ephemeral", spec.name)
        # a wildcard socket's source address per destination family (IPv6 or not): the first of that
        # family, else the first address (every datagram asks)
        self._source = {v6: next((ip for ip in self.ips if (":" in ip) == v6), self.ips[0]) for v6 in (False, True)}

    def _attachments(self) -> list[Attachment]:
        return [self.iface]

    def source_for(self, dst_ip: str) -> str:
        """A wildcard socket's source address towards `dst_ip`: the first of the same family."""
        return self._source[":" in dst_ip]

    def _gateway(self, dst_ip: str) -> tuple[Attachment, str] | None:
        if ":" in dst_ip:
            return (self.iface, self.gateway6) if self.gateway6 else self._route6(self.iface, dst_ip)
        return (self.iface, self.gateway) if self.gateway else None

    # -- sockets ------------------------------------------------------------------------------
    def bind(self, host: str, port: int, receiver: Receiver) -> SimSocket:
        ip = "0.0.0.0" if host in WILDCARDS else host
        if ip != "0.0.0.0" and ip not in self.ips:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot bind UDP {host}:{port}: address not on host {self.name}")
        if not 0 <= port <= 65535:
            raise OverflowError(f"bind(): port must be 0-65535, got {port}")
        if port == 0:
            port = self._ephemeral(ip)
        elif not self._port_free(ip, port):
            raise OSError(errno.EADDRINUSE, f"cannot bind UDP {host}:{port}: Address already in use")
        sock = SimSocket(self, ip, port, host, receiver)
        self.sockets[(ip, port)] = sock
        return sock

    def _port_free(self, ip: str, port: int) -> bool:
        if ip == "0.0.0.0":
            return not any(p == port for _, p in self.sockets)
        return (ip, port) not in self.sockets and ("0.0.0.0", port) not in self.sockets

    def _ephemeral(self, ip: str) -> int:
        lo, hi = EPHEMERAL_PORTS
        for _ in range(64):
            port = self.port_rng.randint(lo, hi)
            if self._port_free(ip, port):
                return port
        for port in range(lo, hi + 1):
            if self._port_free(ip, port):
                return port
        raise OSError(errno.EADDRINUSE, f"no free ephemeral UDP port on host {self.name}")

    # -- packets ------------------------------------------------------------------------------
    def output(self, pkt: Packet) -> None:
        self.network._count_send(self.name, pkt)
        if self.blocked and self.is_blocked(pkt.dst):
            self.network._drop(self.name, "blocked", pkt)
            return
        dst_ip = pkt.dst[0]
        if dst_ip in self.ips or dst_ip.startswith("127."):
            self.network.loop.call_soon(self.input, pkt)  # loopback: no link, never synchronous
            return
        self._send(pkt)

    def receive(self, pkt: Packet, att: Attachment) -> None:
        self.input(pkt)

    def input(self, pkt: Packet) -> None:
        ip, port = pkt.dst
        if ip.startswith("127."):
            ip = self.ips[0]
        if ip not in self.ips:
            self.network._drop(self.name, "not_for_host", pkt)
            return
        if self.blocked and self.is_blocked(pkt.src):
            self.network._drop(self.name, "blocked", pkt)
            return
        sock = self.sockets.get((ip, port)) or self.sockets.get(("0.0.0.0", port))
        if sock is None:
            self.network._drop(self.name, "no_socket", pkt)
            return
        sock._receive(pkt)


class SimRouter(Node):
    """A NAT router between its WAN segment and its LAN segment, running a `NatEngine`."""

    def __init__(self, network: SimNetwork, spec: Router, wan: Segment, lan: Segment) -> None:
        super().__init__(network, spec.name)
        self.spec = spec
        self.wan_ip = spec.wan_ip
        self.lan_ip = spec.lan_ip
        self.wan_ip6, self.lan_ip6 = spec.wan_ip6, spec.lan_ip6
        self.wan = Attachment(network, self, wan, (spec.wan_ip, *filter(None, [spec.wan_ip6])), spec.uplink)
        self.lan = Attachment(network, self, lan, (spec.lan_ip, *filter(None, [spec.lan_ip6])), IDEAL)
        self.upstream = spec.upstream_gateway
        self.engine = NatEngine(spec.nat, spec.wan_ip, network._rng("nat", spec.name)) if spec.nat.nat else None
        self.fw6 = FirewallEngine(spec.fw6) if spec.fw6 is not None else None
        # a router that offers port mapping answers its protocols on the LAN, as miniupnpd does
        self.gateway = (MappingGateway(spec.nat.port_mapping, spec.lan_ip, spec.wan_ip, ExplicitRedirects(self.engine))
                        if spec.nat.port_mapping and self.engine is not None else None)

    def _attachments(self) -> list[Attachment]:
        return [self.lan, self.wan]

    def _gateway(self, dst_ip: str) -> tuple[Attachment, str] | None:
        if ":" in dst_ip:
            return self._route6(self.wan, dst_ip)
        return (self.wan, self.upstream) if self.upstream else None

    def receive(self, pkt: Packet, att: Attachment) -> None:
        pkt.ttl -= 1
        if pkt.ttl <= 0:
            self.network._drop(self.name, "ttl", pkt)
            return
        if self.blocked and self.is_blocked(pkt.src, pkt.dst):
            self.network._drop(self.name, "blocked", pkt)
            return
        if ":" in pkt.dst[0]:
            self._forward6(pkt, att)
        elif att is self.lan:
            self._from_lan(pkt)
        else:
            self._from_wan(pkt)

    def _forward6(self, pkt: Packet, att: Attachment) -> None:
        """IPv6 is routed, not translated: only the firewall decides (qlab.nat.firewall6)."""
        fw, dst_ip = self.fw6, pkt.dst[0]
        if fw is None or dst_ip in (self.wan_ip6, self.lan_ip6):
            self.network._drop(self.name, "no_route" if fw is None else "to_router", pkt)
            return
        now = self.network.loop.time()
        if att is self.lan:
            ok = self.lan.segment.on_link(dst_ip) or fw.outbound(pkt.src, pkt.dst, now)
        elif not self.lan.segment.on_link(dst_ip):
            self.network._drop(self.name, "no_route", pkt)
            return
        else:
            ok = fw.inbound(pkt.src, pkt.dst, now)
        if not ok:
            self.network._drop(self.name, "fw6_filtered", pkt)
            return
        self._send(pkt)

    def _from_lan(self, pkt: Packet) -> None:
        dst_ip = pkt.dst[0]
        now = self.network.loop.time()
        eng = self.engine
        if dst_ip == self.lan_ip and self.gateway is not None and pkt.dst[1] in (PCP_PORT, SSDP_PORT):
            self._serve(pkt, self.gateway)
            return
        if dst_ip == self.lan_ip or (dst_ip == self.wan_ip and eng is None):
            self.network._drop(self.name, "to_router", pkt)
            return
        if self.lan.segment.on_link(dst_ip):
            self._send(pkt)  # already on the LAN: hand it back (a host that routed via us)
            return
        if eng is None:
            self._send(pkt)
            return
        if dst_ip == self.wan_ip:
            res = eng.hairpin(pkt.src, pkt.dst[1], now)
            if isinstance(res, Verdict):
                self.network._drop(self.name, res.value, pkt)
                return
            pkt.src, pkt.dst = res
            if self.blocked and self.is_blocked(pkt.src, pkt.dst):
                self.network._drop(self.name, "blocked", pkt)
                return
            self.network._count(self.name, "hairpinned")
            self._send(pkt)
            return
        out = eng.outbound_to(pkt.src, pkt.dst, now)
        if isinstance(out, Verdict):
            self.network._drop(self.name, out.value, pkt)
            return
        pkt.src, pkt.dst = out
        self._send(pkt)

    def _serve(self, pkt: Packet, gateway: MappingGateway) -> None:
        """A port mapping request to the router itself: its answers go back on the LAN."""
        self.network._count(self.name, "mapping_requests")
        for data, dst in gateway.on_udp(pkt.data, pkt.src, pkt.dst[1], self.network.loop.time()):
            self._send(Packet((self.lan_ip, pkt.dst[1]), dst, data))

    def http(self, request: bytes, src: Addr) -> bytes:
        """One HTTP exchange with the router's UPnP service (raises ConnectionRefusedError without one)."""
        if self.gateway is None:
            raise ConnectionRefusedError(f"{self.name} has no UPnP service")
        self.network._count(self.name, "mapping_requests")
        return self.gateway.on_http(request, src, self.network.loop.time())

    def _from_wan(self, pkt: Packet) -> None:
        eng = self.engine
        if eng is None:
            if self.lan.segment.on_link(pkt.dst[0]):
                self._send(pkt)
            else:
                self.network._drop(self.name, "no_route", pkt)
            return
        if pkt.dst[0] != self.wan_ip:
            self.network._drop(self.name, "not_for_router", pkt)
            return
        inside = eng.inbound_from(pkt.src, pkt.dst[1], self.network.loop.time())
        if isinstance(inside, Verdict):
            self.network._drop(self.name, inside.value, pkt)
            return
        pkt.dst, pkt.src = inside
        if self.blocked and self.is_blocked(pkt.dst):
            self.network._drop(self.name, "blocked", pkt)
            return
        self._send(pkt)


class ExplicitRedirects:
    """The port mapping model's view of a NAT engine (qlab.nat.gateway.Redirects)."""

    def __init__(self, engine: NatEngine) -> None:
        self.engine = engine

    def add(self, internal: Addr, external_port: int, lifetime: float, now: float) -> int | None:
        return self.engine.add_explicit(internal, external_port, lifetime, now)

    def remove(self, internal: Addr, external_port: int) -> None:
        self.engine.remove_explicit(internal, external_port)


class SimSocket:
    """A bound UDP socket on a simulated host (qlab.net.DatagramSocket)."""

    def __init__(self, host: SimHost, ip: str, port: int, bound_as: str, receiver: Receiver) -> None:
        self._host = host
        self._ip = ip
        self._port = port
        self._bound_as = "0.0.0.0" if bound_as == "" else bound_as
        self._receiver = receiver
        self._pending: list[tuple[bytes, Addr]] = []
        self._flush_scheduled = False
        self.closed = False
        self.sent = 0
        self.received = 0
        self.send_errors = 0
        self._classifier = Classifier()

    @property
    def local_address(self) -> Addr:
        return self._bound_as, self._port

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self.closed:
            return
        if len(data) > MAX_UDP_PAYLOAD:
            self.send_errors += 1  # EMSGSIZE on a kernel socket; RealSocket counts and drops it too
            return
        host = self._host
        dst = (str(addr[0]), int(addr[1]))
        src_ip = self._ip if self._ip != "0.0.0.0" else host.source_for(dst[0])
        if dst[0] in host.ips or dst[0].startswith("127."):
            src_ip = dst[0] if self._ip == "0.0.0.0" else src_ip
        self.sent += 1
        network = host.network
        loop = network._loop
        if loop is None:
            loop = network.loop  # raises: no socket of this network was bound from inside a loop
        now = loop.time()
        pkt = Packet((src_ip, self._port), dst, bytes(data), sent_at=now)
        leaves = now if network.cost is None else network.cost.send(now, host.name, self._classifier, pkt.data)
        if leaves <= now:
            host.output(pkt)
        else:  # the CPU protects it first
            pkt.sent_at = leaves
            loop.call_at(leaves, host.output, pkt)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._pending.clear()
            if self._host.sockets.get((self._ip, self._port)) is self:
                del self._host.sockets[(self._ip, self._port)]

    def _receive(self, pkt: Packet) -> None:
        network = self._host.network
        if network.cost is None:
            self._deliver(pkt)
        else:  # the CPU takes it in first
            network.cost.receive(network.loop, self._host.name, self._classifier, pkt.data,
                                 lambda: self._deliver(pkt))

    def _deliver(self, pkt: Packet) -> None:
        self.received += 1
        self._host.network._count_delivery(self._host.name, pkt)
        self._pending.append((pkt.data, pkt.src))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._host.network.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._pending:
            return
        batch = self._pending[:RECV_BATCH]
        del self._pending[:RECV_BATCH]
        if self._pending:
            self._flush_scheduled = True
            self._host.network.loop.call_soon(self._flush)
        self._receiver(batch)

    def __repr__(self) -> str:
        return f"<SimSocket {self._host.name} {self._bound_as}:{self._port}{' closed' if self.closed else ''}>"


class SimNet:
    """A role's view of the virtual network from one host (implements qlab.net.Net)."""

    def __init__(self, network: SimNetwork, host: SimHost) -> None:
        self.network = network
        self.host = host

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> SimSocket:
        self.network._attach_loop(asyncio.get_running_loop())
        return self.host.bind(host, port, receiver)

    def host_addresses(self) -> list[str]:
        return list(self.host.ips)

    def default_gateway(self) -> str | None:
        return self.host.gateway

    async def http_exchange(self, addr: Addr, request: bytes, timeout: float) -> bytes:
        """HTTP to a router on this host's LAN: its UPnP service answers after a TCP handshake and
        the exchange, two round trips of the host's link (the simulator carries no TCP)."""
        router = next((r for r in self.network.routers.values() if r.lan_ip == addr[0]), None)
        if router is None or addr[1] != HTTP_PORT:
            raise ConnectionRefusedError(f"nothing listens on TCP {addr[0]}:{addr[1]}")
        rtt = 2 * self.host.spec.link.delay_ms / 1000
        if 2 * rtt > timeout:
            raise TimeoutError(f"HTTP to {addr[0]}:{addr[1]} timed out")
        await asyncio.sleep(2 * rtt)
        return router.http(request, (self.host.ips[0], self.host._ephemeral(self.host.ips[0])))

    def __repr__(self) -> str:
        return f"<SimNet {self.host.name} {','.join(self.host.ips)}>"


class SimNetwork:
    """The virtual network of one topology, with fault hooks and counters.

    `seed` fixes every random choice. Use it on one event loop (the first `bind_udp` ties it to the
    running loop); on a `VirtualTimeLoop` every delay is virtual.
    """

    def __init__(self, topology: Topology, seed: int | str = 0, *, queue_limit: int = QUEUE_LIMIT,
                 cost: ProcessingCost | None = None) -> None:
        self.topology = topology
        self.seed = seed
        self.queue_limit = queue_limit
        self.cost = cost  # None: the roles' work takes no virtual time
        self.counters: Counter[str] = Counter()
        self.trace: Tracer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.segments: dict[str, Segment] = {s.name: Segment(self, s.name, s.cidr, s.cidr6) for s in topology.segments}
        self.routes6 = [(ipaddress.ip_network(cidr), via) for cidr, via in topology.routes6()]
        self.routers: dict[str, SimRouter] = {}
        self.hosts: dict[str, SimHost] = {}
        for r in topology.routers:
            self.routers[r.name] = SimRouter(self, r, self._segment(r.wan_segment), self._segment(r.lan_segment))
        for h in topology.hosts:
            self.hosts[h.name] = SimHost(self, h, self._segment(h.segment))
        self._nets: dict[str, SimNet] = {}

    def _segment(self, name: str) -> Segment:
        try:
            return self.segments[name]
        except KeyError:
            raise ValueError(f"topology names segment {name!r} but does not define it") from None

    def _rng(self, purpose: str, name: str) -> random.Random:
        return random.Random(f"qlab-sim/{self.seed}/{purpose}/{name}")

    # -- the loop -----------------------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("SimNetwork has no event loop yet: bind a socket from inside the loop first")
        return self._loop

    def _attach_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None or self._loop.is_closed():
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this SimNetwork is already used on another event loop; build one per loop")

    # -- what roles use -----------------------------------------------------------------------
    def net(self, host_name: str) -> SimNet:
        """The `Net` of host `host_name` (e.g. "agent", "connector", "intermediate")."""
        if host_name not in self.hosts:
            raise KeyError(f"no host {host_name!r} (hosts: {', '.join(self.hosts)})")
        if host_name not in self._nets:
            self._nets[host_name] = SimNet(self, self.hosts[host_name])
        return self._nets[host_name]

    def addresses(self, host_name: str) -> list[str]:
        """The host's own addresses (what its `Net.host_addresses()` returns)."""
        return self.net(host_name).host_addresses()

    # -- fault hooks --------------------------------------------------------------------------
    def _node(self, name: str) -> SimRouter | SimHost:
        node: SimRouter | SimHost | None = self.routers.get(name) or self.hosts.get(name)
        if node is None:
            raise KeyError(f"no router or host {name!r} (nodes: {', '.join([*self.routers, *self.hosts])})")
        return node

    def _router(self, name: str) -> SimRouter:
        r = self.routers.get(name)
        if r is None:
            raise KeyError(f"no router {name!r} (routers: {', '.join(self.routers) or 'none'})")
        return r

    def block(self, node_name: str, ip: str, port: int | None = None) -> None:
        """Blackhole, at a router (or host), every packet to or from ip[:port] (any port when None)."""
        self._node(node_name).blocked.add((ip, port))

    def unblock(self, node_name: str, ip: str | None = None, port: int | None = None) -> None:
        """Undo `block(node_name, ip, port)`; with no ip, lift every block on that node."""
        node = self._node(node_name)
        if ip is None:
            node.blocked.clear()
        else:
            node.blocked.discard((ip, port))

    def flush_nat(self, router_name: str) -> None:
        """Forget every binding of a router's NAT (rebinding: the next packet gets a new mapping)."""
        eng = self._router(router_name).engine
        if eng is not None:
            eng.flush()

    def set_binding_timeout(self, router_name: str, seconds: float) -> None:
        eng = self._router(router_name).engine
        if eng is None:
            raise ValueError(f"router {router_name!r} does no NAT")
        eng.set_binding_timeout(seconds)

    def set_link(self, node_name: str, profile: LinkProfile) -> None:
        """Change a host's link or a router's uplink, both directions, from now on."""
        node = self._node(node_name)
        att = node.wan if isinstance(node, SimRouter) else node.iface
        att.up.profile = profile
        att.down.profile = profile

    def nat(self, router_name: str) -> NatEngine:
        eng = self._router(router_name).engine
        if eng is None:
            raise ValueError(f"router {router_name!r} does no NAT")
        return eng

    # -- counters -----------------------------------------------------------------------------
    def _count_send(self, node: str, pkt: Packet) -> None:
        self.counters["sent"] += 1
        if self.trace is not None:
            self.trace("send", node, pkt)

    def _count_delivery(self, node: str, pkt: Packet) -> None:
        self.counters["delivered"] += 1
        if self.trace is not None:
            self.trace("deliver", node, pkt)

    def _count(self, node: str, what: str) -> None:
        self.counters[what] += 1

    def _drop(self, where: str, reason: str, pkt: Packet) -> None:
        self.counters["dropped"] += 1
        self.counters[f"dropped.{reason}"] += 1
        if self.trace is not None:
            self.trace(f"drop:{reason}", where, pkt)

    @property
    def dropped(self) -> dict[str, int]:
        """Drops per reason (loss, queue, no_route, no_socket, blocked, nat_filtered, ...)."""
        return {k.split(".", 1)[1]: v for k, v in sorted(self.counters.items()) if k.startswith("dropped.")}

    def stats(self) -> dict:
        """Counters plus each NAT's binding table size, for trial records and debugging."""
        return {
            "sent": self.counters["sent"],
            "delivered": self.counters["delivered"],
            "dropped": self.dropped,
            "hairpinned": self.counters["hairpinned"],
            "nat": {
                name: {"bindings": len(r.engine.bindings()), "created": r.engine.bindings_created}
                for name, r in self.routers.items()
                if r.engine is not None
            },
        }
