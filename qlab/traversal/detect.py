"""What a side knows about its own NAT, from qlab's own QAD (RFC 5780 style).

From the one shared socket, short QUIC connections to the Intermediate's other listeners (another
port, another IP, both) each return the address they observed. Comparing the mappings tells
endpoint-independent from endpoint-dependent mapping and, for the latter, sequential from random
ports; asking a listener to send a test probe from another IP or port tells the filtering; a probe
to one's own mapping tells hairpinning. `detect_nat_kind` is the quick part every Agent and
Connector runs before it offers candidates; `classify` is the full verdict of `qlab classify`, in
the RFC 4787 terms of `qlab.nat.spec` (its presets named by the same table the backends render).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.nat.spec import PRESETS, Filtering, Mapping, NatSpec, PortAllocation
from qlab.net import Addr
from qlab.roles.control import AddressObserved, ControlClient, HelloRefused, Replied, Request

log = logging.getLogger("qlab.detect")

SEQUENTIAL_MAX_STEP = 16  # consecutive mappings this close together count as sequential allocation


class _QadClient(Handler):
    """The asyncio side of one QAD connection: the control rules are `ControlClient`'s."""

    def __init__(self, control: ControlClient) -> None:
        loop = asyncio.get_running_loop()
        self.control = control
        self.observed: asyncio.Future[Addr] = loop.create_future()
        self.replies: dict[int, asyncio.Future[wire.Message]] = {}

    def on_handshake(self, conn: Connection) -> None:
        conn.send_control(self.control.hello(qi.peer_cid(conn.quic)))

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        event = self.control.receive(msg)
        for out in self.control.messages_to_send():
            conn.send_control(out)
        if isinstance(event, AddressObserved) and not self.observed.done():
            self.observed.set_result(event.addr)
        elif isinstance(event, HelloRefused) and not self.observed.done():
            self.observed.set_exception(ConnectionRefusedError(f"QAD refused: {event.reason}"))
        elif isinstance(event, Replied) and event.req in self.replies and not self.replies[event.req].done():
            self.replies[event.req].set_result(event.reply)

    def on_closed(self, conn: Connection, reason: str) -> None:
        futs: list[asyncio.Future[Any]] = [self.observed, *self.replies.values()]
        for fut in futs:
            if not fut.done():
                fut.set_exception(ConnectionError(f"closed: {reason}"))
                fut.exception()


class QadSession:
    """A short-lived QAD connection from `endpoint`'s socket to one Intermediate listener."""

    def __init__(self, endpoint: Endpoint, addr: Addr, creds: Credentials, name: str) -> None:
        self.endpoint = endpoint
        self.addr = addr
        self.creds = creds
        self.name = name
        self.control = ControlClient(wire.Role.PROBE, name, creds.secret_for(wire.Role.PROBE))
        self.handler: _QadClient | None = None
        self.conn: Connection | None = None

    async def __aenter__(self) -> QadSession:
        self.handler = _QadClient(self.control)
        self.conn = self.endpoint.connect(self.addr, self.creds.client_config(INTERMEDIATE_NAME), self.handler)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None and not self.conn.closed:
            self.endpoint.abandon(self.conn, "qad done")

    async def observed(self, timeout: float) -> Addr:
        assert self.handler is not None
        return await asyncio.wait_for(asyncio.shield(self.handler.observed), timeout)

    async def request(self, msg: Request, timeout: float) -> wire.Message:
        assert self.handler is not None and self.conn is not None
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self.handler.replies[msg.req] = fut
        self.control.expect(msg.req)
        self.conn.send_control(msg)
        return await asyncio.wait_for(fut, timeout)

    def next_req(self) -> int:
        return self.control.next_req()


async def server_listeners(session: QadSession, timeout: float) -> tuple[Addr, Addr]:
    info = await session.request(wire.ServerInfoRequest(session.next_req()), timeout)
    assert isinstance(info, wire.ServerInfo)
    return info.primary, info.alternate


def _other_listeners(primary: Addr, alternate: Addr) -> dict[str, Addr]:
    """The RFC 5780 test targets: alternate IP and port, alternate port only."""
    out: dict[str, Addr] = {}
    if alternate != primary:
        out["alt_ip_port"] = alternate
        if alternate[1] != primary[1]:
            out["alt_port"] = (primary[0], alternate[1])
    return out


def nat_kind_from(local: Addr, host_ips: list[str], observed: list[Addr]) -> wire.NatKind:
    """The verdict from mappings observed towards different listeners, in the order they were made."""
    if not observed:
        return wire.NatKind.UNKNOWN
    first = observed[0]
    if first[0] in host_ips and first[1] == local[1]:
        return wire.NatKind.NONE
    if all(o == first for o in observed):
        return wire.NatKind.EIM if len(observed) > 1 else wire.NatKind.UNKNOWN
    ports = [o[1] for o in observed]
    steps = [b - a for a, b in zip(ports, ports[1:], strict=False)]
    # the last step is between two mappings made back to back; earlier ones may span other flows
    if steps and 0 < steps[-1] <= SEQUENTIAL_MAX_STEP:
        return wire.NatKind.EDM_SEQUENTIAL
    return wire.NatKind.EDM_RANDOM


@dataclass
class Detection:
    kind: wire.NatKind
    observed: list[Addr]
    observed6: Addr | None = None  # QAD over IPv6 (no NAT: the host's own address), when asked

    @property
    def last_port(self) -> int | None:
        return self.observed[-1][1] if self.observed else None


async def observe_ipv6(endpoint: Endpoint, creds: Credentials, name: str, target: Addr, timeout: float) -> Addr | None:
    """QAD from the shared socket to the Intermediate's IPv6 listener, under the side's own name:
    the Intermediate then knows this IPv6 address is the side's and forwards it as a candidate."""
    try:
        async with QadSession(endpoint, target, creds, name) as q:
            return await q.observed(timeout)
    except (TimeoutError, ConnectionError) as exc:
        log.info("IPv6 QAD towards [%s]:%d failed: %s", *target, exc)
        return None


async def detect_nat_kind(
    endpoint: Endpoint, creds: Credentials, name: str, primary_observed: Addr, listeners: tuple[Addr, Addr] | None,
    host_ips: list[str], *, timeout: float = 2.0,
) -> Detection:
    """Quick check every side runs before offering: QAD towards the Intermediate's alternate IP and
    port from the shared socket. Endpoint-independent when the mappings agree; when they differ, a
    third mapping (primary IP, alternate port) tells sequential from random port allocation."""
    observed = [primary_observed]
    targets = list(_other_listeners(*listeners).values()) if listeners else []
    for i, target in enumerate(targets):
        try:
            async with QadSession(endpoint, target, creds, f"{name}-qad{i}") as q:
                observed.append(await q.observed(timeout))
        except (TimeoutError, ConnectionError) as exc:
            log.info("QAD towards %s:%d failed: %s", *target, exc)
            break
        if observed[-1] == observed[0]:
            break  # endpoint-independent: no need for a third mapping
    kind = nat_kind_from(endpoint.local_address, host_ips, observed)
    return Detection(kind, observed)


# --- full classification (qlab classify) -------------------------------------------------------


class Unclassified(StrEnum):
    """The classifier's answer where no RFC 4787 behaviour applies (same strings as the records)."""

    NO_NAT = "none"  # this host's own address is what the Intermediate saw: nothing to classify
    UNKNOWN = "unknown"  # the test could not be run (no alternate listener)


MappingVerdict = Mapping | Unclassified
FilteringVerdict = Filtering | Unclassified
PortsVerdict = PortAllocation | Unclassified
BehaviourKey = tuple[StrEnum, ...]


def behaviour_key(mapping: MappingVerdict, filtering: FilteringVerdict, ports: PortsVerdict) -> BehaviourKey:
    """What tells the presets apart: port allocation only matters once the mapping depends on the
    destination (an endpoint-independent NAT's ports are never seen to change)."""
    if mapping in (Unclassified.NO_NAT, Mapping.EIM):
        return (mapping, filtering)
    return (mapping, filtering, ports)


def _spec_key(spec: NatSpec) -> BehaviourKey:
    if not spec.nat:
        return behaviour_key(Unclassified.NO_NAT, Unclassified.NO_NAT, PortAllocation.PRESERVE)
    return behaviour_key(spec.mapping, spec.filtering, spec.ports)


PRESET_BY_BEHAVIOUR: dict[BehaviourKey, str] = {_spec_key(spec): name for name, spec in PRESETS.items()}


def preset_for(mapping: MappingVerdict, filtering: FilteringVerdict, ports: PortsVerdict) -> str | None:
    """The preset whose spec shows this behaviour, if any."""
    return PRESET_BY_BEHAVIOUR.get(behaviour_key(mapping, filtering, ports))


def filtering_from(from_other_ip_port: bool, from_other_port: bool) -> Filtering:
    """RFC 5780 §4.4: a probe from another IP and port admitted means EIF; from the same IP but
    another port, ADF; neither, APDF."""
    if from_other_ip_port:
        return Filtering.EIF
    return Filtering.ADF if from_other_port else Filtering.APDF


def mapping_from(local: Addr, observed: dict[str, Addr]) -> tuple[MappingVerdict, PortsVerdict]:
    """RFC 5780 §4.3 from the mappings seen by the primary, alternate-IP+port and alternate-port
    listeners (keys "primary", "alt_ip_port", "alt_port"; the last may be missing), behind a NAT."""
    primary, alt_ip_port, alt_port = observed["primary"], observed.get("alt_ip_port"), observed.get("alt_port")
    if alt_ip_port is None:
        return Unclassified.UNKNOWN, Unclassified.UNKNOWN
    if alt_ip_port == primary and alt_port in (None, primary):
        ports = PortAllocation.PRESERVE if primary[1] == local[1] else Unclassified.UNKNOWN
        return Mapping.EIM, ports
    mapping = Mapping.ADM if alt_port == primary else Mapping.APDM
    order = [observed[k] for k in ("primary", "alt_ip_port", "alt_port") if k in observed]
    sequential = nat_kind_from(local, [], order) == wire.NatKind.EDM_SEQUENTIAL
    return mapping, PortAllocation.SEQUENTIAL if sequential else PortAllocation.RANDOM


@dataclass
class Classification:
    mapping: MappingVerdict
    filtering: FilteringVerdict
    ports: PortsVerdict
    hairpinning: bool | None
    preset: str | None
    local: Addr
    observed: dict[str, Addr] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of `qlab classify`: the behaviours as their plain strings."""
        d = asdict(self)
        for k in ("mapping", "filtering", "ports"):
            d[k] = str(d[k])
        return d


class _TestProbes:
    """CLASSIFY_TEST probes expected on `endpoint`'s socket, by nonce. Claims them from the
    endpoint for the length of a `with`; other raw packets go where they went before."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.tests: dict[int, asyncio.Future[Addr]] = {}
        self._withdraw: Callable[[], None] | None = None

    def __enter__(self) -> _TestProbes:
        self._withdraw = self.endpoint.claim_raw(self._on_raw)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._withdraw is not None:
            self._withdraw()

    def expect(self) -> tuple[int, asyncio.Future[Addr]]:
        nonce = secrets.randbits(64)
        fut = self.tests[nonce] = asyncio.get_running_loop().create_future()
        return nonce, fut

    def _on_raw(self, data: bytes, addr: Addr) -> bool:
        if data[0] != wire.CLASSIFY_TEST:
            return False
        try:
            nonce, _ = wire.decode_classify_test(data)
        except wire.WireError:
            return True
        fut = self.tests.get(nonce)
        if fut is not None and not fut.done():
            fut.set_result(addr)
        return True


async def _probe_arrives(main: QadSession, probes: _TestProbes, alt_ip: int, alt_port: int, timeout: float,
                         filter_wait: float, notes: list[str]) -> bool:
    """Ask the Intermediate to send a test probe from its other IP and/or port: did it get in?"""
    nonce, fut = probes.expect()
    try:
        reply = await main.request(wire.ChangeRequest(main.next_req(), alt_ip, alt_port, nonce), timeout)
    except (TimeoutError, ConnectionError):
        return False
    if isinstance(reply, wire.Nack):
        notes.append(f"change request ip={alt_ip} port={alt_port} refused: {reply.reason}")
        return False
    try:
        await asyncio.wait_for(fut, filter_wait)
        return True
    except TimeoutError:
        return False


async def _filtering(main: QadSession, probes: _TestProbes, primary: Addr, alternate: Addr, timeout: float,
                     filter_wait: float, notes: list[str]) -> Filtering:
    async def arrives(alt_ip: int, alt_port: int) -> bool:
        return await _probe_arrives(main, probes, alt_ip, alt_port, timeout, filter_wait, notes)

    # in this order, and the second only when the first did not get in (as RFC 5780 runs them)
    if alternate != primary and await arrives(1, 1):
        return filtering_from(True, False)
    return filtering_from(False, await arrives(0, 1))


async def _observe_others(endpoint: Endpoint, creds: Credentials, name: str, others: dict[str, Addr],
                          timeout: float, notes: list[str]) -> dict[str, Addr]:
    observed: dict[str, Addr] = {}
    for label, addr in others.items():
        try:
            async with QadSession(endpoint, addr, creds, f"{name}-{label}") as q:
                observed[label] = await q.observed(timeout)
        except (TimeoutError, ConnectionError) as exc:
            notes.append(f"no QAD from {label} listener {addr[0]}:{addr[1]}: {exc}")
    return observed


async def _hairpinning(endpoint: Endpoint, probes: _TestProbes, mapped: Addr, filter_wait: float) -> bool:
    """From a second socket on this host, a probe to the first socket's mapping (as in RFC 5780;
    the same socket would clash with its own conntrack entry)."""
    nonce, fut = probes.expect()
    local = endpoint.local_address
    second = await endpoint.net.bind_udp("0.0.0.0" if ":" not in local[0] else "::", 0, lambda batch: None)
    try:
        for _ in range(3):
            second.sendto(wire.encode_classify_test(nonce, second.local_address), mapped)
            try:
                await asyncio.wait_for(asyncio.shield(fut), filter_wait / 3)
                return True
            except TimeoutError:
                continue
    finally:
        second.close()
    return False


async def classify(
    endpoint: Endpoint, creds: Credentials, intermediate: Addr, host_ips: list[str], *, name: str = "classify",
    timeout: float = 2.0, filter_wait: float = 0.6,
) -> Classification:
    """RFC 5780-style behaviour discovery on qlab's own QAD, from `endpoint`'s socket."""
    local = endpoint.local_address
    notes: list[str] = []
    with _TestProbes(endpoint) as probes:
        async with QadSession(endpoint, intermediate, creds, name) as main:
            obs_primary = await main.observed(timeout)
            primary, alternate = await server_listeners(main, timeout)
            # filtering first, before this socket sends anything to the other listeners (which would
            # open the NAT's filter towards them)
            public = obs_primary[0] in host_ips and obs_primary[1] == local[1]
            filtering: FilteringVerdict = Unclassified.NO_NAT
            if not public:
                filtering = await _filtering(main, probes, primary, alternate, timeout, filter_wait, notes)
            others = _other_listeners(primary, alternate)
            observed = {"primary": obs_primary, **await _observe_others(endpoint, creds, name, others, timeout, notes)}
            mapping: MappingVerdict = Unclassified.NO_NAT
            ports: PortsVerdict = PortAllocation.PRESERVE
            if not public:
                mapping, ports = mapping_from(local, observed)
                if "alt_ip_port" not in observed:
                    notes.append("the Intermediate has no alternate address: mapping cannot be tested")
            hairpin = None if public else await _hairpinning(endpoint, probes, obs_primary, filter_wait)
    preset = preset_for(mapping, filtering, ports)
    return Classification(mapping, filtering, ports, hairpin, preset, local, observed, notes)
