"""What a side knows about its own NAT, from qlab's own QAD (RFC 5780 style).

From the one shared socket, short QUIC connections to the Intermediate's other listeners (another
port, another IP, both) each return the address they observed. Comparing the mappings tells
endpoint-independent from endpoint-dependent mapping and, for the latter, sequential from random
ports; asking a listener to send a test probe from another IP or port tells the filtering; a probe
to one's own mapping tells hairpinning. `detect_nat_kind` is the quick part every Agent and
Connector runs before it offers candidates; `classify` is the full verdict of `qlab classify`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import asdict, dataclass, field

from qlab import wire
from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.net import Addr

log = logging.getLogger("qlab.detect")

SEQUENTIAL_MAX_STEP = 16  # consecutive mappings this close together count as sequential allocation


class _QadClient(Handler):
    def __init__(self, creds: Credentials, name: str) -> None:
        loop = asyncio.get_running_loop()
        self.creds = creds
        self.name = name
        self.observed: asyncio.Future = loop.create_future()
        self.replies: dict[int, asyncio.Future] = {}

    def on_handshake(self, conn: Connection) -> None:
        conn.send_control(wire.Hello(wire.VERSION, wire.Role.PROBE, self.name,
                                     wire.hello_auth(self.creds.secret, wire.Role.PROBE, self.name)))

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.ObservedAddress) and not self.observed.done():
            self.observed.set_result((msg.addr[0], msg.addr[1]))
        elif isinstance(msg, wire.Nack) and msg.req == 0 and not self.observed.done():
            self.observed.set_exception(ConnectionRefusedError(f"QAD refused: {msg.reason}"))
        elif hasattr(msg, "req") and msg.req in self.replies and not self.replies[msg.req].done():
            self.replies[msg.req].set_result(msg)

    def on_closed(self, conn: Connection, reason: str) -> None:
        for fut in (self.observed, *self.replies.values()):
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
        self.handler: _QadClient | None = None
        self.conn: Connection | None = None
        self._req = 0

    async def __aenter__(self) -> QadSession:
        self.handler = _QadClient(self.creds, self.name)
        self.conn = self.endpoint.connect(self.addr, self.creds.client_config(INTERMEDIATE_NAME), self.handler)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.conn is not None and not self.conn.closed:
            self.endpoint.abandon(self.conn, "qad done")

    async def observed(self, timeout: float) -> Addr:
        assert self.handler is not None
        return await asyncio.wait_for(asyncio.shield(self.handler.observed), timeout)

    async def request(self, msg: wire.Message, timeout: float) -> wire.Message:
        assert self.handler is not None and self.conn is not None
        fut = asyncio.get_running_loop().create_future()
        self.handler.replies[msg.req] = fut  # type: ignore[attr-defined]
        self.conn.send_control(msg)
        return await asyncio.wait_for(fut, timeout)

    def next_req(self) -> int:
        self._req += 1
        return self._req


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

    @property
    def last_port(self) -> int | None:
        return self.observed[-1][1] if self.observed else None


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

PRESET_BY_BEHAVIOUR = {
    ("none", "none"): "public",
    ("EIM", "EIF"): "full_cone",
    ("EIM", "ADF"): "restricted_cone",
    ("EIM", "APDF"): "port_restricted",
    ("APDM", "APDF", "sequential"): "symmetric_seq",
    ("APDM", "APDF", "random"): "symmetric",
}


@dataclass
class Classification:
    mapping: str  # none / EIM / ADM / APDM / unknown
    filtering: str  # none / EIF / ADF / APDF / unknown
    ports: str  # preserve / sequential / random / unknown
    hairpinning: bool | None
    preset: str | None
    local: Addr
    observed: dict[str, Addr] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


async def classify(
    endpoint: Endpoint, creds: Credentials, intermediate: Addr, host_ips: list[str], *, name: str = "classify",
    timeout: float = 2.0, filter_wait: float = 0.6,
) -> Classification:
    """RFC 5780-style behaviour discovery on qlab's own QAD, from `endpoint`'s socket."""
    local = endpoint.local_address
    tests: dict[int, asyncio.Future] = {}
    loop = asyncio.get_running_loop()
    prev_raw = endpoint.raw_handler

    def on_raw(data: bytes, addr: Addr) -> None:
        if data[0] == wire.CLASSIFY_TEST:
            try:
                nonce, _ = wire.decode_classify_test(data)
            except wire.WireError:
                return
            fut = tests.get(nonce)
            if fut is not None and not fut.done():
                fut.set_result(addr)
        elif prev_raw is not None:
            prev_raw(data, addr)

    endpoint.raw_handler = on_raw
    notes: list[str] = []
    try:
        async with QadSession(endpoint, intermediate, creds, name) as main:
            obs_primary = await main.observed(timeout)
            primary, alternate = await server_listeners(main, timeout)
            # filtering first, before this socket sends anything to the other listeners (which would
            # open the NAT's filter towards them): test probes from another IP+port, then another port
            public = obs_primary[0] in host_ips and obs_primary[1] == local[1]
            filtering = "none" if public else "unknown"
            if not public:
                async def change(alt_ip: int, alt_port: int) -> bool:
                    nonce = secrets.randbits(64)
                    tests[nonce] = loop.create_future()
                    try:
                        reply = await main.request(wire.ChangeRequest(main.next_req(), alt_ip, alt_port, nonce), timeout)
                    except (TimeoutError, ConnectionError):
                        return False
                    if isinstance(reply, wire.Nack):
                        notes.append(f"change request ip={alt_ip} port={alt_port} refused: {reply.reason}")
                        return False
                    try:
                        await asyncio.wait_for(tests[nonce], filter_wait)
                        return True
                    except TimeoutError:
                        return False

                if alternate != primary and await change(1, 1):
                    filtering = "EIF"
                elif await change(0, 1):
                    filtering = "ADF"
                else:
                    filtering = "APDF"
            others = _other_listeners(primary, alternate)
            observed: dict[str, Addr] = {"primary": obs_primary}
            for label, addr in others.items():
                try:
                    async with QadSession(endpoint, addr, creds, f"{name}-{label}") as q:
                        observed[label] = await q.observed(timeout)
                except (TimeoutError, ConnectionError) as exc:
                    notes.append(f"no QAD from {label} listener {addr[0]}:{addr[1]}: {exc}")
            # mapping
            if public:
                mapping, ports = "none", "preserve"
            elif "alt_ip_port" not in observed:
                mapping, ports = "unknown", "unknown"
                notes.append("the Intermediate has no alternate address: mapping cannot be tested")
            else:
                same_ip = observed.get("alt_port")
                if observed["alt_ip_port"] == obs_primary and (same_ip is None or same_ip == obs_primary):
                    mapping = "EIM"
                elif same_ip is not None and same_ip == obs_primary:
                    mapping = "ADM"
                else:
                    mapping = "APDM"
                order = [observed[k] for k in ("primary", "alt_ip_port", "alt_port") if k in observed]
                if mapping == "EIM":
                    ports = "preserve" if obs_primary[1] == local[1] else "unknown"
                else:
                    kind = nat_kind_from(local, [], order)
                    ports = "sequential" if kind == wire.NatKind.EDM_SEQUENTIAL else "random"
            # hairpinning: from a second socket on this host, a probe to the first socket's mapping
            # (as in RFC 5780; the same socket would clash with its own conntrack entry)
            hairpin: bool | None = None
            if mapping != "none":
                nonce = secrets.randbits(64)
                tests[nonce] = loop.create_future()
                second = await endpoint.net.bind_udp("0.0.0.0" if ":" not in local[0] else "::", 0, lambda batch: None)
                try:
                    for _ in range(3):
                        second.sendto(wire.encode_classify_test(nonce, second.local_address), obs_primary)
                        try:
                            await asyncio.wait_for(asyncio.shield(tests[nonce]), filter_wait / 3)
                            hairpin = True
                            break
                        except TimeoutError:
                            hairpin = False
                finally:
                    second.close()
    finally:
        endpoint.raw_handler = prev_raw
    key: tuple = (mapping, filtering) if mapping in ("none", "EIM") else (mapping, filtering, ports)
    return Classification(mapping, filtering, ports, hairpin, PRESET_BY_BEHAVIOUR.get(key), local, observed, notes)
