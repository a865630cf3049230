"""A port-mapping router, sans-IO: what miniupnpd 2.3 answers to PCP, NAT-PMP and UPnP IGD, fed with
datagrams, HTTP requests and the time; the NAT it sits on is changed through `Redirects`.

Behaviour follows the daemon as measured in the netns lab (tests/test_portmap.py records it):
- secure mode: a host maps only its own address (PCP ADDRESS_MISMATCH when the client IP field is
  not the sender, UPnP 718 ConflictInMappingEntry when NewInternalClient is not the sender);
- external port = the suggested one (or the internal port when none is suggested) when free, else the
  next free one upwards for PCP and NAT-PMP, ConflictInMappingEntry (718) for UPnP; only ports
  1024-65535 (the lab's `allow 1024-65535 ... 1024-65535` rule; UPnP 606 below, PCP and NAT-PMP skip up);
- a host asking again for an internal port it has mapped gets the same external port, whatever the
  nonce (miniupnpd replaces the rule's nonce); a PCP delete needs the nonce of the mapping;
- PCP lifetimes are clamped to [120, 86400] (miniupnpd's min_lifetime/max_lifetime defaults), NAT-PMP
  lifetimes are granted as asked, UPnP lease 0 becomes 604800 s (IGD:2 rule), and NAT-PMP and PCP
  lifetime 0 deletes;
- a PCP delete of a mapping that does not exist is answered NO_RESOURCES with lifetime 30;
- the epoch is whole seconds since `started`.
The model maps UDP only (PCP answers other protocols UNSUPP_PROTOCOL, NAT-PMP's TCP opcode
UNSUPPORTED_OPCODE), keeps one mapping per internal endpoint, and does not answer PCP ANNOUNCE
(miniupnpd does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from qlab.nat import natpmp, pcp, upnp
from qlab.nat.spec import MappingProtocol

PCP_PORT = 5351  # NAT-PMP shares it
SSDP_PORT = 1900
HTTP_PORT = 5000  # what the lab configures miniupnpd with
PCP_MIN_LIFETIME = 120
PCP_MAX_LIFETIME = 86400
PCP_NO_MAPPING_LIFETIME = 30  # miniupnpd answers a delete of no mapping NO_RESOURCES, lifetime 30
UPNP_DEFAULT_LEASE = 604800
LOW_PORT = 1024
CONTROL_PATH = "/ctl/IPConn"
DESCRIPTION_PATH = "/rootDesc.xml"
_SEARCH_TARGETS = ("ssdp:all", "upnp:rootdevice", upnp.IGD_DEVICE, upnp.WANIP1,
                   "urn:schemas-upnp-org:device:WANDevice:1", "urn:schemas-upnp-org:device:WANConnectionDevice:1")

Endpoint = tuple[str, int]


class Redirects(Protocol):  # what the model changes in the NAT it sits on
    def add(self, internal: tuple[str, int], external_port: int, lifetime: float, now: float) -> int | None: ...

    def remove(self, internal: tuple[str, int], external_port: int) -> None: ...


@dataclass
class Entry:
    """One redirect the model made: external port -> internal, until `expires` (None: no expiry)."""

    internal: Endpoint
    external_port: int
    expires: float | None
    owner: MappingProtocol
    nonce: bytes = b""


@dataclass
class MappingGateway:
    protocols: tuple[MappingProtocol, ...]
    lan_ip: str
    public_ip: str
    redirects: Redirects
    started: float = 0.0
    uuid: str = "5a1d0b8e-7c1f-4e5a-9d1e-0a0b0c0d0e0f"
    entries: dict[int, Entry] = field(default_factory=dict)  # by external port

    # -- the two entry points -----------------------------------------------------------------
    def on_udp(self, data: bytes, src: Endpoint, dst_port: int, now: float) -> list[tuple[bytes, Endpoint]]:
        """Replies, sent from (lan_ip, dst_port). A protocol not offered gets no reply."""
        self.expire(now)
        reply: bytes | None = None
        if dst_port == PCP_PORT and data[:1] == b"\x02" and MappingProtocol.PCP in self.protocols:
            reply = self._pcp(data, src, now)
        elif dst_port == PCP_PORT and data[:1] == b"\x00" and MappingProtocol.NATPMP in self.protocols:
            reply = self._natpmp(data, src, now)
        elif dst_port == SSDP_PORT and MappingProtocol.UPNP in self.protocols:
            reply = self._ssdp(data)
        return [(reply, src)] if reply is not None else []

    def on_http(self, request: bytes, src: Endpoint, now: float) -> bytes:
        """The response to one HTTP request on HTTP_PORT; b"" when UPnP is not offered (no server:
        the caller refuses the connection)."""
        if MappingProtocol.UPNP not in self.protocols:
            return b""
        self.expire(now)
        try:
            msg = upnp.parse_http(request, closed=False)
        except upnp.UpnpError:
            return upnp.http_response(400, "Bad Request")
        if msg.start[0] == "GET" and msg.start[1] == DESCRIPTION_PATH:
            return upnp.http_response(200, "OK", upnp.root_description(self.uuid, CONTROL_PATH))
        if msg.start[0] == "POST" and msg.start[1] == CONTROL_PATH:
            return self._soap(msg, src[0], now)
        return upnp.http_response(404, "Not Found")

    def expire(self, now: float) -> None:
        for port, entry in list(self.entries.items()):
            if entry.expires is not None and entry.expires <= now:
                self._remove(port)

    def epoch(self, now: float) -> int:
        return max(0, int(now - self.started)) & 0xFFFFFFFF

    # -- the mapping table --------------------------------------------------------------------
    def _find(self, internal: Endpoint) -> Entry | None:
        return next((e for e in self.entries.values() if e.internal == internal), None)

    def _remove(self, port: int) -> None:
        entry = self.entries.pop(port)
        self.redirects.remove(entry.internal, port)

    def _free_port(self, start: int) -> int | None:
        """The first port from `start` upwards (wrapping within 1024-65535) no mapping holds."""
        span = 65536 - LOW_PORT
        first = max(start, LOW_PORT) - LOW_PORT
        for k in range(span):
            port = LOW_PORT + (first + k) % span
            if port not in self.entries:
                return port
        return None

    def _map(self, internal: Endpoint, port: int, lifetime: float | None, owner: MappingProtocol,
             now: float, nonce: bytes = b"") -> Entry | None:
        """Create or refresh the redirect of `internal` at `port`; None if the NAT refuses."""
        old = self.entries.get(port)
        if old is not None and old.internal != internal:
            return None
        if old is None:
            previous = self._find(internal)
            if previous is not None:
                self._remove(previous.external_port)
        given = self.redirects.add(internal, port, lifetime if lifetime is not None else float(UPNP_DEFAULT_LEASE), now)
        if given is None:
            self.entries.pop(port, None)
            return None
        if given != port:
            self.entries.pop(port, None)
        expires = now + lifetime if lifetime is not None else None
        entry = Entry(internal, given, expires, owner, nonce)
        self.entries[given] = entry
        return entry

    # -- PCP ----------------------------------------------------------------------------------
    def _pcp(self, data: bytes, src: Endpoint, now: float) -> bytes | None:
        epoch = self.epoch(now)
        if len(data) < pcp.HEADER_LEN or len(data) > pcp.MAX_MESSAGE or len(data) % 4:
            return None  # miniupnpd drops what it cannot frame
        if data[1] & pcp.RESPONSE_BIT:
            return None
        if data[1] != pcp.OPCODE_MAP:
            return pcp.error_response(pcp.ResultCode.UNSUPP_OPCODE, epoch)
        try:
            req = pcp.MapRequest.decode(data)
        except pcp.PcpError:
            return pcp.error_response(pcp.ResultCode.MALFORMED_REQUEST, epoch)
        code, entry = self._pcp_result(req, src, now)
        lifetime, port = (_clamp(req.lifetime), entry.external_port) if entry is not None else (0, 0)
        if code == pcp.ResultCode.NO_RESOURCES and req.lifetime == 0:
            lifetime = PCP_NO_MAPPING_LIFETIME
        ext_ip = pcp.UNSPECIFIED if code == pcp.ResultCode.ADDRESS_MISMATCH else self.public_ip
        return pcp.MapResponse(code, lifetime, epoch, req.nonce, req.internal_port, port, ext_ip,
                               req.protocol).encode()

    def _pcp_result(self, req: pcp.MapRequest, src: Endpoint, now: float) -> tuple[pcp.ResultCode, Entry | None]:
        if req.client_ip != src[0]:
            return pcp.ResultCode.ADDRESS_MISMATCH, None
        if any(code < 128 for code, _ in req.options):
            return pcp.ResultCode.UNSUPP_OPTION, None
        if req.protocol != pcp.PROTO_UDP:
            return pcp.ResultCode.UNSUPP_PROTOCOL, None
        internal = (src[0], req.internal_port)
        if req.internal_port < LOW_PORT:
            return pcp.ResultCode.NOT_AUTHORIZED, None
        existing = self._find(internal)
        if req.lifetime == 0:
            if existing is None:
                return pcp.ResultCode.NO_RESOURCES, None  # miniupnpd's answer to deleting nothing
            if existing.nonce != req.nonce:
                return pcp.ResultCode.NOT_AUTHORIZED, None
            self._remove(existing.external_port)
            return pcp.ResultCode.SUCCESS, None
        entry = self._grant(internal, existing, req.suggested_port, _clamp(req.lifetime), MappingProtocol.PCP,
                            now, req.nonce)
        return (pcp.ResultCode.SUCCESS, entry) if entry else (pcp.ResultCode.NO_RESOURCES, None)

    def _grant(self, internal: Endpoint, existing: Entry | None, suggested: int, lifetime: int,
               owner: MappingProtocol, now: float, nonce: bytes = b"") -> Entry | None:
        """PCP and NAT-PMP: keep the host's port for this internal port, else the suggestion or the next free."""
        port = existing.external_port if existing is not None else self._free_port(suggested or internal[1])
        return self._map(internal, port, lifetime, owner, now, nonce) if port is not None else None

    # -- NAT-PMP ------------------------------------------------------------------------------
    def _natpmp(self, data: bytes, src: Endpoint, now: float) -> bytes | None:
        epoch = self.epoch(now)
        try:
            req = natpmp.decode_request(data)
        except natpmp.NatPmpError:
            return None
        if isinstance(req, natpmp.UnsupportedRequest):
            code = natpmp.ResultCode.UNSUPPORTED_OPCODE if req.version == 0 else natpmp.ResultCode.UNSUPPORTED_VERSION
            return natpmp.ErrorResponse(req.op, code, epoch).encode()
        if isinstance(req, natpmp.ExternalAddressRequest):
            return natpmp.ExternalAddressResponse(natpmp.ResultCode.SUCCESS, epoch, self.public_ip).encode()
        if req.op != natpmp.OP_MAP_UDP:
            return natpmp.ErrorResponse(req.op, natpmp.ResultCode.UNSUPPORTED_OPCODE, epoch).encode()
        internal = (src[0], req.internal_port)
        existing = self._find(internal)
        if req.lifetime == 0:
            if existing is not None:
                self._remove(existing.external_port)
            return natpmp.MapResponse(natpmp.ResultCode.SUCCESS, epoch, req.internal_port, 0, 0).encode()
        if req.internal_port < LOW_PORT:
            return natpmp.MapResponse(natpmp.ResultCode.NOT_AUTHORIZED, epoch, req.internal_port, 0, 0).encode()
        entry = self._grant(internal, existing, req.suggested_port, req.lifetime, MappingProtocol.NATPMP, now)
        if entry is None:
            return natpmp.MapResponse(natpmp.ResultCode.OUT_OF_RESOURCES, epoch, req.internal_port, 0, 0).encode()
        return natpmp.MapResponse(natpmp.ResultCode.SUCCESS, epoch, req.internal_port, entry.external_port,
                                  req.lifetime).encode()

    # -- UPnP ---------------------------------------------------------------------------------
    def _ssdp(self, data: bytes) -> bytes | None:
        try:
            st = upnp.parse_msearch(data)
        except upnp.UpnpError:
            return None
        if st not in _SEARCH_TARGETS:
            return None
        st = upnp.IGD_DEVICE if st == "ssdp:all" else st
        location = f"http://{self.lan_ip}:{HTTP_PORT}{DESCRIPTION_PATH}"
        return upnp.SsdpAnswer(st, location, f"uuid:{self.uuid}::{st}").encode()

    def _soap(self, msg: upnp.HttpMessage, client: str, now: float) -> bytes:
        try:
            call = upnp.parse_soap_request(msg)
        except upnp.UpnpError:
            return upnp.soap_fault(401, "Invalid Action")
        if call.action == "GetExternalIPAddress":
            return upnp.soap_response(call.service_type, call.action, (("NewExternalIPAddress", self.public_ip),))
        try:
            if call.action == "AddPortMapping":
                fault = self._upnp_add(call.args, client, now)
            elif call.action == "DeletePortMapping":
                fault = self._upnp_delete(call.args, client)
            else:
                return upnp.soap_fault(401, "Invalid Action")
        except (KeyError, ValueError):
            return upnp.soap_fault(402, "Invalid Args")
        return upnp.soap_fault(*fault) if fault else upnp.soap_response(call.service_type, call.action)

    def _upnp_add(self, args: dict[str, str], client: str, now: float) -> tuple[int, str] | None:
        eport, iport = _port(args["NewExternalPort"]), _port(args["NewInternalPort"])
        lease = int(args["NewLeaseDuration"])
        if args["NewProtocol"].upper() != "UDP" or lease < 0:
            return 402, "Invalid Args"
        if eport == 0:
            return 716, "WildCardNotPermittedInExtPort"
        if args["NewInternalClient"] != client:
            return 718, "ConflictInMappingEntry"  # what miniupnpd 2.3.1's secure mode answers
        if eport < LOW_PORT or iport < LOW_PORT:
            return 606, "Action not authorized"
        entry = self._map((client, iport), eport, float(lease or UPNP_DEFAULT_LEASE), MappingProtocol.UPNP, now)
        return None if entry is not None else (718, "ConflictInMappingEntry")

    def _upnp_delete(self, args: dict[str, str], client: str) -> tuple[int, str] | None:
        eport = _port(args["NewExternalPort"])
        if args["NewProtocol"].upper() != "UDP":
            return 402, "Invalid Args"
        entry = self.entries.get(eport)
        if entry is None:
            return 714, "NoSuchEntryInArray"
        if entry.internal[0] != client:
            return 606, "Action not authorized"
        self._remove(eport)
        return None


def _clamp(lifetime: int) -> int:
    return min(max(lifetime, PCP_MIN_LIFETIME), PCP_MAX_LIFETIME)


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")
    return port
