"""Ask the home router for an explicit inbound mapping of the role's one UDP socket: PCP (RFC 6887
MAP) first, then NAT-PMP (RFC 6886), then UPnP IGD (SSDP to the gateway's UDP 1900, the description
over HTTP, SOAP AddPortMapping), renew it at half its lifetime, delete it on close.

The codecs are sans-IO (`qlab/nat/pcp.py`, `natpmp.py`, `upnp.py`); this module moves their bytes.
Requests leave from short-lived ephemeral sockets of the `GatewayNet` (the mapping is for
`internal_port`, the role's shared socket, which must not see the gateway's answers). Everything the
gateway or the LAN sends is untrusted: only datagrams from the gateway's address and port count, at most
MAX_REPLIES per exchange and MAX_DATAGRAM bytes each, PCP answers must carry our nonce, NAT-PMP and PCP
answers our internal port, UPnP URLs must point at the gateway, HTTP bodies are capped by the codecs,
and every exchange ends within `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit

from qlab.nat import natpmp, pcp, upnp
from qlab.nat.gateway import PCP_PORT, SSDP_PORT
from qlab.nat.spec import MAPPING_PROTOCOLS, MappingProtocol
from qlab.net import Addr, DatagramSocket, Receiver, udp_family
from qlab.roles.events import Observers

log = logging.getLogger(__name__)

SENDS = 3  # transmissions per UDP exchange; the gaps double and add up to the timeout
MAX_REPLIES = 16  # datagrams (SSDP answers included) looked at per exchange
MAX_DATAGRAM = 1100  # the longest PCP message; NAT-PMP and SSDP answers are shorter
MIN_RENEW = 1.0  # never renew more often, whatever lifetime a gateway grants
RETRY_AFTER = 30.0  # with no mapping, try again after this long
UPNP_PORT_TRIES = 3  # external ports tried when UPnP answers ConflictInMappingEntry
UPNP_DESCRIPTION = "qlab"

T = TypeVar("T")


@dataclass(frozen=True)
class PortMapping:
    protocol: MappingProtocol
    external: tuple[str, int]
    internal_port: int
    lifetime: float
    gateway: str


@dataclass(frozen=True)
class MappingChanged:
    """Published when the mapping appears, moves, or is lost (`mapping` None)."""

    mapping: PortMapping | None


@runtime_checkable
class GatewayNet(Protocol):  # a Net that can reach its default gateway
    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> DatagramSocket: ...

    def default_gateway(self) -> str | None: ...

    async def http_exchange(self, addr: tuple[str, int], request: bytes, timeout: float) -> bytes: ...


_FAILURES = (OSError, ValueError, TimeoutError, KeyError)  # a refusing, broken or hostile gateway


async def udp_exchange(net: GatewayNet, host_ip: str, dst: Addr, request: bytes,
                       accept: Callable[[bytes], T | None], timeout: float) -> T | None:
    """Send `request` to `dst` from a fresh ephemeral socket, SENDS times with doubling gaps within
    `timeout`; the first datagram from `dst` that `accept` turns into a value (None or ValueError: not
    ours) ends it. None when nothing acceptable came in time."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    seen = 0

    def receive(batch: list[tuple[bytes, Addr]]) -> None:
        nonlocal seen
        for data, src in batch:
            if src == dst and len(data) <= MAX_DATAGRAM and seen < MAX_REPLIES:
                seen += 1
                queue.put_nowait(data)

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sock = await net.bind_udp(host_ip, 0, receive)
    try:
        for k in range(SENDS):
            sock.sendto(request, dst)
            until = min(deadline, loop.time() + timeout * (1 << k) / ((1 << SENDS) - 1))
            while (left := until - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                with contextlib.suppress(ValueError):
                    if (value := accept(data)) is not None:
                        return value
        return None
    finally:
        sock.close()


def usable_external(host: str) -> str:
    """An external address a peer could send to (ValueError otherwise)."""
    ip = ipaddress.ip_address(host)
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise ValueError(f"unusable external address {ip}")
    return str(ip)


class EpochCheck:
    """RFC 6887 8.5 / RFC 6886 3.6: a server epoch that does not advance with our clock means the
    gateway lost its state (rebooted); its mappings must be made again."""

    def __init__(self) -> None:
        self.last: tuple[int, float] | None = None
        self.resets = 0

    def ok(self, epoch: int, now: float) -> bool:
        last, self.last = self.last, (epoch, now)
        if last is None:
            return True
        client_delta, server_delta = now - last[1], epoch - last[0]
        if server_delta + 2 < client_delta - client_delta / 16 or client_delta + 2 < server_delta - server_delta / 16:
            self.resets += 1
            return False
        return True


class PortMapper:
    """One explicit mapping of `internal_port` on `host_ip`, through the first protocol that works."""

    def __init__(self, net: GatewayNet, host_ip: str, internal_port: int, *,
                 protocols: tuple[MappingProtocol, ...] = MAPPING_PROTOCOLS, timeout: float = 0.25,
                 lifetime: int = 7200) -> None:
        self.net = net
        self.host_ip = host_ip
        self.internal_port = internal_port
        self.protocols = protocols
        self.timeout = timeout
        self.lifetime = lifetime
        self.gateway: str | None = None
        self.mapping: PortMapping | None = None
        self.observers: Observers[MappingChanged] = Observers()
        self.epoch = EpochCheck()
        self._nonce = os.urandom(pcp.NONCE_LEN)  # one per mapping: renewals and the delete reuse it
        self._control: upnp.ControlPoint | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._closed = False

    # -- the lifecycle ------------------------------------------------------------------------
    async def acquire(self) -> PortMapping | None:
        """The protocols in order, each bounded by `timeout`; None when the gateway offers none of them.

        The steps that create nothing (NAT-PMP's external address request, UPnP's discovery and
        GetExternalIPAddress) run at once, alongside the PCP request, so a fallback does not wait for
        the protocols before it to time out: a gateway offering none costs about one timeout."""
        if self._closed:
            return None
        self.gateway = self.net.default_gateway()
        if self.gateway is None:
            return None
        probes = {p: asyncio.ensure_future(self._probe(p)) for p in self.protocols if p != MappingProtocol.PCP}
        try:
            for protocol in self.protocols:
                ip = await probes[protocol] if protocol in probes else None
                if protocol in probes and ip is None:
                    continue
                mapping = await self._attempt(protocol, self.internal_port, ip)
                if mapping is not None:
                    return await self._adopt(mapping)
            return None
        finally:
            for task in probes.values():
                task.cancel()
            await asyncio.gather(*probes.values(), return_exceptions=True)

    async def renew(self) -> PortMapping | None:
        """Refresh the mapping with its protocol; if that fails, the protocols after it, then those before."""
        current = self.mapping
        if self.gateway is None or current is None:
            return await self.acquire()
        i = self.protocols.index(current.protocol) if current.protocol in self.protocols else 0
        for protocol in self.protocols[i:] + self.protocols[:i]:
            mapping = await self._attempt(protocol, current.external[1])
            if mapping is not None:
                return await self._adopt(mapping)
        self._set(None)
        return None

    def start_renewal(self) -> None:
        """Renew at half the granted lifetime from now on; observers hear of every change."""
        if self._renewal is None and not self._closed:
            self._renewal = asyncio.get_running_loop().create_task(self._renew_loop())

    async def close(self) -> None:
        """Stop renewing and delete the mapping. Idempotent; bounded by a few timeouts."""
        if self._closed:
            return
        self._closed = True
        task, self._renewal = self._renewal, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        mapping = self.mapping
        if mapping is not None:
            self._set(None)
            await self._delete(mapping)

    async def _adopt(self, mapping: PortMapping) -> PortMapping | None:
        """Make `mapping` current, unless close() ran meanwhile: then it goes again at once."""
        if self._closed:
            await self._delete(mapping)
            return None
        self._set(mapping)
        return mapping

    def _set(self, mapping: PortMapping | None) -> None:
        if mapping != self.mapping:
            self.mapping = mapping
            self.observers.emit(MappingChanged(mapping))

    async def _renew_loop(self) -> None:
        while True:
            m = self.mapping
            delay = RETRY_AFTER if m is None else max(MIN_RENEW, min(m.lifetime, self.lifetime) / 2)
            await asyncio.sleep(delay)
            await self.renew()

    async def _attempt(self, protocol: MappingProtocol, suggested: int, ip: str | None = None) -> PortMapping | None:
        """One protocol's mapping; `ip` is the external address when a probe already learned it."""
        try:
            if protocol == MappingProtocol.PCP:
                return await self._pcp(suggested)
            ip = ip or await self._external_ip(protocol)
            if ip is None:
                return None
            if protocol == MappingProtocol.NATPMP:
                return await self._natpmp(suggested, ip)
            return await self._upnp(suggested, ip)
        except _FAILURES as exc:
            log.info("%s mapping of port %d failed: %s", protocol, self.internal_port, exc)
            return None

    async def _probe(self, protocol: MappingProtocol) -> str | None:
        try:
            return await self._external_ip(protocol)
        except _FAILURES as exc:
            log.info("%s probe failed: %s", protocol, exc)
            return None

    async def _external_ip(self, protocol: MappingProtocol) -> str | None:
        """The external address as NAT-PMP or UPnP reports it, creating nothing; None if no answer."""
        if protocol == MappingProtocol.NATPMP:
            ext = await self._natpmp_exchange(natpmp.ExternalAddressRequest())
            if not isinstance(ext, natpmp.ExternalAddressResponse) or ext.result != natpmp.ResultCode.SUCCESS:
                return None
            return usable_external(ext.external_ip)
        cp = self._control or await self._discover()
        if cp is None:
            return None
        self._control = cp
        out = await self._soap(cp, "GetExternalIPAddress")
        return None if isinstance(out, upnp.SoapFault) else upnp.parse_ipv4(out["NewExternalIPAddress"])

    async def _delete(self, m: PortMapping) -> None:
        """PCP and NAT-PMP lifetime 0, UPnP DeletePortMapping; at most two timeouts, never raises."""
        try:
            async with asyncio.timeout(2 * self.timeout):
                if m.protocol == MappingProtocol.PCP:
                    await self._pcp_exchange(0, 0)
                elif m.protocol == MappingProtocol.NATPMP:
                    await self._natpmp_exchange(natpmp.MapRequest(self.internal_port, 0, 0))
                elif self._control is not None:
                    await self._soap(self._control, "DeletePortMapping", upnp.delete_port_mapping_args(m.external[1]))
        except _FAILURES as exc:
            log.info("deleting %s mapping %s failed: %s", m.protocol, m.external, exc)

    # -- PCP ----------------------------------------------------------------------------------
    async def _pcp_exchange(self, lifetime: int, suggested: int) -> pcp.MapResponse | None:
        assert self.gateway is not None
        request = pcp.MapRequest(self._nonce, self.internal_port, lifetime, self.host_ip, suggested).encode()
        return await udp_exchange(self.net, self.host_ip, (self.gateway, PCP_PORT), request,
                                  self._pcp_accept, self.timeout)

    def _pcp_accept(self, data: bytes) -> pcp.MapResponse | None:
        r = pcp.MapResponse.decode(data)
        if r.nonce and (r.nonce != self._nonce or r.internal_port != self.internal_port or r.protocol != pcp.PROTO_UDP):
            return None  # another client's answer, or forged
        return r

    async def _pcp(self, suggested: int) -> PortMapping | None:
        r = await self._pcp_exchange(self.lifetime, suggested)
        if r is None or r.result != pcp.ResultCode.SUCCESS or not r.external_port or not r.lifetime:
            return None
        if not self.epoch.ok(r.epoch, asyncio.get_running_loop().time()):
            log.info("PCP server epoch %d: the gateway lost its state; the mapping is made again", r.epoch)
        return self._mapping(MappingProtocol.PCP, usable_external(r.external_ip), r.external_port, r.lifetime)

    def _mapping(self, protocol: MappingProtocol, ip: str, port: int, lifetime: float) -> PortMapping:
        assert self.gateway is not None
        return PortMapping(protocol, (ip, port), self.internal_port, float(lifetime), self.gateway)

    # -- NAT-PMP ------------------------------------------------------------------------------
    async def _natpmp_exchange(self, request: natpmp.ExternalAddressRequest | natpmp.MapRequest) -> natpmp.Response | None:
        assert self.gateway is not None
        want = natpmp.OP_EXTERNAL if isinstance(request, natpmp.ExternalAddressRequest) else request.op

        def accept(data: bytes) -> natpmp.Response | None:
            r = natpmp.decode_response(data)
            op = r.op if isinstance(r, natpmp.MapResponse | natpmp.ErrorResponse) else natpmp.OP_EXTERNAL
            if op != want or (isinstance(r, natpmp.MapResponse) and r.internal_port != self.internal_port):
                return None
            return r

        return await udp_exchange(self.net, self.host_ip, (self.gateway, PCP_PORT), request.encode(), accept,
                                  self.timeout)

    async def _natpmp(self, suggested: int, ip: str) -> PortMapping | None:
        r = await self._natpmp_exchange(natpmp.MapRequest(self.internal_port, suggested, self.lifetime))
        if not isinstance(r, natpmp.MapResponse) or r.result != natpmp.ResultCode.SUCCESS:
            return None
        if not r.external_port or not r.lifetime:
            return None
        if not self.epoch.ok(r.epoch, asyncio.get_running_loop().time()):
            log.info("NAT-PMP epoch %d: the gateway lost its state; the mapping is made again", r.epoch)
        return self._mapping(MappingProtocol.NATPMP, ip, r.external_port, r.lifetime)

    # -- UPnP IGD -----------------------------------------------------------------------------
    def _on_gateway(self, url: str) -> tuple[str, int]:
        """(host, port) of an http URL on the gateway itself; ValueError for any other host."""
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme != "http" or host is None or host != self.gateway:
            raise ValueError(f"URL {url[:80]!r} does not point at the gateway {self.gateway}")
        return host, parts.port or 80

    async def _discover(self) -> upnp.ControlPoint | None:
        assert self.gateway is not None

        def accept(data: bytes) -> upnp.SsdpAnswer:
            answer = upnp.parse_ssdp_answer(data)
            self._on_gateway(answer.location)
            return answer

        answer = await udp_exchange(self.net, self.host_ip, (self.gateway, SSDP_PORT), upnp.msearch(), accept,
                                    self.timeout)
        if answer is None:
            return None
        raw = await self.net.http_exchange(self._on_gateway(answer.location),
                                           upnp.http_request("GET", answer.location), self.timeout)
        msg = upnp.parse_http(raw)
        if msg.status != 200:
            raise ValueError(f"description fetch answered {msg.status}")
        control = upnp.parse_description(msg.body, answer.location)
        self._on_gateway(control.control_url)
        return control

    async def _soap(self, cp: upnp.ControlPoint, action: str,
                    args: tuple[tuple[str, str], ...] = ()) -> dict[str, str] | upnp.SoapFault:
        raw = await self.net.http_exchange(self._on_gateway(cp.control_url), upnp.soap_request(cp, action, args),
                                           self.timeout)
        return upnp.parse_soap_response(upnp.parse_http(raw), action)

    async def _upnp(self, suggested: int, ip: str) -> PortMapping | None:
        cp = self._control
        if cp is None:
            return None
        for port in _port_candidates(suggested):
            args = upnp.add_port_mapping_args(port, self.internal_port, self.host_ip, self.lifetime, UPNP_DESCRIPTION)
            result = await self._soap(cp, "AddPortMapping", args)
            if not isinstance(result, upnp.SoapFault):
                return self._mapping(MappingProtocol.UPNP, ip, port, self.lifetime)
            if result.code != 718:  # only a taken port is worth another try
                log.info("UPnP AddPortMapping refused: %d %s", result.code, result.description)
                return None
        return None


def _port_candidates(first: int) -> list[int]:
    """The suggested external port, then a few others spread over 1024-65535 (deterministic)."""
    return [first] + [1024 + (first + k * 7919) % 64512 for k in range(1, UPNP_PORT_TRIES)]


async def offered_protocols(net: GatewayNet, host_ip: str, timeout: float = 0.25) -> tuple[MappingProtocol, ...]:
    """Which protocols the default gateway answers, probed at once, creating nothing: a PCP delete
    (lifetime 0) for a port never mapped, a NAT-PMP external address request, SSDP + description +
    GetExternalIPAddress. Any well-formed answer counts, a refusal included (the protocol is spoken)."""
    gateway = net.default_gateway()
    if gateway is None:
        return ()
    probe = PortMapper(net, host_ip, 0, timeout=timeout)
    probe.gateway = gateway

    async def pcp_answers() -> bool:
        r = await probe._pcp_exchange(0, 0)
        return r is not None and r.result != pcp.ResultCode.UNSUPP_VERSION

    async def natpmp_answers() -> bool:
        return isinstance(await probe._natpmp_exchange(natpmp.ExternalAddressRequest()), natpmp.ExternalAddressResponse)

    async def upnp_answers() -> bool:
        return await probe._external_ip(MappingProtocol.UPNP) is not None

    checks = {MappingProtocol.PCP: pcp_answers, MappingProtocol.NATPMP: natpmp_answers,
              MappingProtocol.UPNP: upnp_answers}

    async def safely(check: Callable[[], Awaitable[bool]]) -> bool:
        try:
            return await check()
        except _FAILURES:
            return False

    answers = await asyncio.gather(*(safely(checks[p]) for p in MAPPING_PROTOCOLS))
    return tuple(p for p, ok in zip(MAPPING_PROTOCOLS, answers, strict=True) if ok)


async def protocols_towards(net: GatewayNet, remote: Addr, timeout: float = 0.25) -> list[str] | None:
    """The protocols (their names) the default gateway answers, asked from the address this process's
    network namespace routes towards `remote` (`qlab classify --intermediate`: the user's own
    gateway); None when that address is loopback (no gateway on the way to ask, nothing is sent)."""
    with socket.socket(udp_family(remote[0]), socket.SOCK_DGRAM) as s:
        s.connect(remote)  # the route's source address; sends nothing
        source = s.getsockname()[0]
    if ipaddress.ip_address(source).is_loopback:
        return None
    return [p.value for p in await offered_protocols(net, source, timeout)]
