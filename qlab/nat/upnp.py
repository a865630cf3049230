"""UPnP IGD port mapping, sans-IO: SSDP discovery, the root description, SOAP control, and the
HTTP/1.1 framing they travel in, as bytes in and bytes out, for both the client and the gateway model.

The flow (UPnP Device Architecture 1.1, IGD:1 WANIPConnection:1): an M-SEARCH sent to the gateway's
UDP 1900 gets a 200 OK whose LOCATION names the root description; the description names the
WANIPConnection service's control URL; GetExternalIPAddress, AddPortMapping and DeletePortMapping are
SOAP POSTs to it.

Only the standard library: miniupnpc's Python bindings need a C build, and async-upnp-client pulls
in aiohttp and its own discovery loop, which would bypass the `Net` the roles get their sockets from.
XML is parsed with xml.etree (expat) after the precautions defusedxml takes: documents are size
limited and any DTD (so any entity declaration, internal or external) is refused before parsing.
Every parser raises `UpnpError` (a ValueError) on malformed input and reads at most its limit.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

SSDP_MULTICAST = "239.255.255.250"
IGD_DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
WAN_SERVICES = (WANIP2, WANIP1, WANPPP1)  # the services that map ports, preferred first
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENCODING = "http://schemas.xmlsoap.org/soap/encoding/"
CONTROL_NS = "urn:schemas-upnp-org:control-1-0"

MAX_HEAD = 8 * 1024  # request/status line and headers
MAX_HEADERS = 64
MAX_BODY = 64 * 1024  # description XML and SOAP envelopes
MAX_SSDP = 2048  # one SSDP datagram
MAX_XML_DEPTH = 32


class UpnpError(ValueError):
    """Malformed or unacceptable UPnP, SSDP, SOAP or HTTP input."""


# --- HTTP/1.1 framing ------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpMessage:
    """A request (`start` = method, target, version) or a response (`start` = version, status, reason)."""

    start: tuple[str, str, str]
    headers: dict[str, str] = field(default_factory=dict)  # names lower-cased
    body: bytes = b""

    @property
    def status(self) -> int:
        try:
            return int(self.start[1])
        except ValueError:
            raise UpnpError(f"bad HTTP status {self.start[1]!r}") from None


def _split_head(data: bytes) -> tuple[list[str], bytes]:
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD:
        raise UpnpError(f"HTTP head incomplete or longer than {MAX_HEAD} bytes")
    lines = data[:end].decode("latin-1").split("\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise UpnpError(f"more than {MAX_HEADERS} HTTP headers")
    return lines, data[end + 4 :]


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise UpnpError(f"bad header line {line[:80]!r}")
        headers[name.lower()] = value.strip()
    return headers


def _content_length(headers: dict[str, str]) -> int | None:
    if "content-length" not in headers:
        return None
    value = headers["content-length"]
    if not value.isdigit() or int(value) > MAX_BODY:
        raise UpnpError(f"bad or too large Content-Length {value[:20]!r}")
    return int(value)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0 or eol - pos > 16:
            raise UpnpError("bad chunk header")
        try:
            size = int(data[pos:eol].split(b";")[0], 16)
        except ValueError:
            raise UpnpError("bad chunk size") from None
        if size == 0:
            return bytes(out)
        if len(out) + size > MAX_BODY or eol + 2 + size > len(data):
            raise UpnpError("chunked body too large or truncated")
        out += data[eol + 2 : eol + 2 + size]
        pos = eol + 4 + size


def parse_http(data: bytes, *, closed: bool = True) -> HttpMessage:
    """One HTTP message. With `closed`, a body without Content-Length runs to the end of `data`."""
    lines, rest = _split_head(data)
    start = lines[0].split(" ", 2)
    if len(start) != 3:
        raise UpnpError(f"bad HTTP start line {lines[0][:80]!r}")
    headers = _parse_headers(lines[1:])
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(rest)
    else:
        length = _content_length(headers)
        if length is None:
            if not closed:
                raise UpnpError("HTTP message without Content-Length")
            length = len(rest)
        if len(rest) < length:
            raise UpnpError(f"HTTP body truncated: {len(rest)} of {length} bytes")
        body = rest[:length]
    if len(body) > MAX_BODY:
        raise UpnpError(f"HTTP body larger than {MAX_BODY} bytes")
    return HttpMessage((start[0], start[1], start[2]), headers, body)


def http_complete(data: bytes) -> bool:
    """Whether `data` holds a whole response framed by Content-Length (else read until close)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return False
    match = re.search(rb"(?im)^content-length:[ \t]*(\d{1,9})[ \t]*$", data[:end])
    return match is not None and len(data) - end - 4 >= int(match.group(1))


def _encode_head(start: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [start, *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}", "Connection: close"]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise UpnpError("line break inside an HTTP header")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def http_request(method: str, url: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A request for an absolute http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpnpError(f"not an http URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _encode_head(f"{method} {target} HTTP/1.1", [("Host", parts.netloc), *headers], body)


def http_response(status: int, reason: str, body: bytes = b"", content_type: str = 'text/xml; charset="utf-8"') -> bytes:
    return _encode_head(f"HTTP/1.1 {status} {reason}", [("Content-Type", content_type)], body)


# --- SSDP ------------------------------------------------------------------------------------


def msearch(st: str = IGD_DEVICE, mx: int = 1) -> bytes:
    return (f'M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_MULTICAST}:1900\r\nMAN: "ssdp:discover"\r\n'
            f"MX: {mx}\r\nST: {st}\r\n\r\n").encode("ascii")


def parse_msearch(data: bytes) -> str:
    """The search target of an M-SEARCH (server side)."""
    msg = _parse_ssdp(data)
    if msg.start[:2] != ("M-SEARCH", "*") or msg.headers.get("man", "").strip('"') != "ssdp:discover":
        raise UpnpError("not an ssdp:discover M-SEARCH")
    if not msg.headers.get("st"):
        raise UpnpError("M-SEARCH without ST")
    return msg.headers["st"]


@dataclass(frozen=True)
class SsdpAnswer:
    st: str
    location: str
    usn: str = ""

    def encode(self, server: str = "qlab/1 UPnP/1.1 qlab-gateway/1") -> bytes:
        return (f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {self.st}\r\nUSN: {self.usn}\r\n"
                f"EXT:\r\nSERVER: {server}\r\nLOCATION: {self.location}\r\n\r\n").encode("latin-1")


def _parse_ssdp(data: bytes) -> HttpMessage:
    if len(data) > MAX_SSDP:
        raise UpnpError(f"SSDP datagram of {len(data)} bytes (max {MAX_SSDP})")
    return parse_http(data if b"\r\n\r\n" in data else data + b"\r\n\r\n")


def parse_ssdp_answer(data: bytes) -> SsdpAnswer:
    """A 200 OK answer to an M-SEARCH (client side)."""
    msg = _parse_ssdp(data)
    if msg.start[0] != "HTTP/1.1" or msg.status != 200:
        raise UpnpError(f"SSDP answer is not 200 OK: {' '.join(msg.start)[:80]!r}")
    location = msg.headers.get("location", "")
    if urlsplit(location).scheme != "http":
        raise UpnpError(f"SSDP LOCATION is not an http URL: {location[:80]!r}")
    return SsdpAnswer(msg.headers.get("st", ""), location, msg.headers.get("usn", ""))


# --- XML -------------------------------------------------------------------------------------


def parse_xml(body: bytes) -> ET.Element:
    """A document from an untrusted peer: bounded, no DTD (no entities), bounded depth."""
    if len(body) > MAX_BODY:
        raise UpnpError(f"XML document of {len(body)} bytes (max {MAX_BODY})")
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise UpnpError("XML with a DTD or entity declaration refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise UpnpError(f"malformed XML: {exc}") from None
    _check_depth(root, 0)
    return root


def _check_depth(elem: ET.Element, depth: int) -> None:
    if depth > MAX_XML_DEPTH:
        raise UpnpError(f"XML nested deeper than {MAX_XML_DEPTH}")
    for child in elem:
        _check_depth(child, depth + 1)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(elem: ET.Element, name: str) -> str:
    for child in elem:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return ""


# --- the root description --------------------------------------------------------------------


@dataclass(frozen=True)
class ControlPoint:
    """Where a WAN connection service takes SOAP actions."""

    service_type: str
    control_url: str


def root_description(uuid: str, control_path: str = "/ctl/IPConn", name: str = "qlab gateway") -> bytes:
    """A small IGD:1 root description with one WANIPConnection:1, as miniupnpd lays it out."""
    def device(dtype: str, udn: str, services: str, children: str = "") -> str:
        sub = f"<deviceList>{children}</deviceList>" if children else ""
        return (f"<device><deviceType>urn:schemas-upnp-org:device:{dtype}:1</deviceType>"
                f"<friendlyName>{escape(name)}</friendlyName><manufacturer>qlab</manufacturer>"
                f"<modelName>qlab MappingGateway</modelName><UDN>uuid:{udn}</UDN>"
                f"<serviceList>{services}</serviceList>{sub}</device>")

    def service(stype: str, sid: str, path: str) -> str:
        return (f"<service><serviceType>urn:schemas-upnp-org:service:{stype}:1</serviceType>"
                f"<serviceId>urn:upnp-org:serviceId:{sid}</serviceId><SCPDURL>/{sid}.xml</SCPDURL>"
                f"<controlURL>{escape(path)}</controlURL><eventSubURL>/evt/{sid}</eventSubURL></service>")

    conn = device("WANConnectionDevice", uuid + "-2", service("WANIPConnection", "WANIPConn1", control_path))
    wan = device("WANDevice", uuid + "-1", service("WANCommonInterfaceConfig", "WANCommonIFC1", "/ctl/CmnIfCfg"), conn)
    igd = device("InternetGatewayDevice", uuid, service("Layer3Forwarding", "L3Forwarding1", "/ctl/L3F"), wan)
    return ('<?xml version="1.0"?>\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
            f"<specVersion><major>1</major><minor>0</minor></specVersion>{igd}</root>").encode()


def parse_description(body: bytes, location: str) -> ControlPoint:
    """The preferred WAN connection service's control URL, made absolute against `location`."""
    root = parse_xml(body)
    found: dict[str, str] = {}
    for elem in root.iter():
        if _local(elem.tag) == "service":
            stype, url = _child_text(elem, "serviceType"), _child_text(elem, "controlURL")
            if stype in WAN_SERVICES and url and stype not in found:
                found[stype] = url
    for stype in WAN_SERVICES:
        if stype in found:
            url = urljoin(location, found[stype])
            if urlsplit(url).scheme != "http":
                raise UpnpError(f"control URL is not http: {url[:80]!r}")
            return ControlPoint(stype, url)
    raise UpnpError("no WANIPConnection or WANPPPConnection service in the description")


# --- SOAP ------------------------------------------------------------------------------------


def _envelope(inner: str) -> bytes:
    return (f'<?xml version="1.0"?>\n<s:Envelope xmlns:s="{SOAP_ENV}" s:encodingStyle="{SOAP_ENCODING}">'
            f"<s:Body>{inner}</s:Body></s:Envelope>").encode()


def _action_xml(tag: str, service_type: str, args: tuple[tuple[str, str], ...]) -> str:
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in args)
    return f'<u:{tag} xmlns:u="{escape(service_type)}">{inner}</u:{tag}>'


def soap_request(cp: ControlPoint, action: str, args: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The whole HTTP POST of one action."""
    body = _envelope(_action_xml(action, cp.service_type, args))
    headers = (("Content-Type", 'text/xml; charset="utf-8"'), ("SOAPAction", f'"{cp.service_type}#{action}"'))
    return http_request("POST", cp.control_url, body, headers)


def soap_response(service_type: str, action: str, args: tuple[tuple[str, str], ...] = ()) -> bytes:
    return http_response(200, "OK", _envelope(_action_xml(action + "Response", service_type, args)))


def soap_fault(code: int, description: str) -> bytes:
    detail = (f'<UPnPError xmlns="{CONTROL_NS}"><errorCode>{code}</errorCode>'
              f"<errorDescription>{escape(description)}</errorDescription></UPnPError>")
    inner = f"<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>{detail}</detail></s:Fault>"
    return http_response(500, "Internal Server Error", _envelope(inner))


def _body_element(body: bytes) -> ET.Element:
    root = parse_xml(body)
    if _local(root.tag) != "Envelope":
        raise UpnpError(f"SOAP document's root is {_local(root.tag)!r}, not Envelope")
    for child in root:
        if _local(child.tag) == "Body" and len(child):
            return child[0]
    raise UpnpError("SOAP envelope without a Body element")


@dataclass(frozen=True)
class SoapCall:
    service_type: str
    action: str
    args: dict[str, str]


def parse_soap_request(msg: HttpMessage) -> SoapCall:
    """The action of a POST (server side), checked against its SOAPAction header."""
    header = msg.headers.get("soapaction", "").strip('"')
    stype, sep, action = header.rpartition("#")
    if not sep or not action:
        raise UpnpError(f"bad SOAPAction header {header[:80]!r}")
    elem = _body_element(msg.body)
    if _local(elem.tag) != action:
        raise UpnpError(f"SOAPAction {action!r} but the body holds {_local(elem.tag)!r}")
    return SoapCall(stype, action, {_local(c.tag): (c.text or "").strip() for c in elem})


@dataclass(frozen=True)
class SoapFault:
    code: int
    description: str


def parse_soap_response(msg: HttpMessage, action: str) -> dict[str, str] | SoapFault:
    """The out arguments of `action`, or the UPnP error the gateway answered with."""
    elem = _body_element(msg.body)
    if _local(elem.tag) == "Fault":
        err = next((e for e in elem.iter() if _local(e.tag) == "UPnPError"), None)
        code = _child_text(err, "errorCode") if err is not None else ""
        if not code.isdigit() or len(code) > 6:
            raise UpnpError(f"SOAP fault without a valid UPnP errorCode ({code[:20]!r})")
        return SoapFault(int(code), _child_text(err, "errorDescription")[:200] if err is not None else "")
    if msg.status != 200 or _local(elem.tag) != action + "Response":
        raise UpnpError(f"expected {action}Response with 200, got {_local(elem.tag)!r} ({msg.status})")
    return {_local(c.tag): (c.text or "").strip() for c in elem}


def add_port_mapping_args(external_port: int, internal_port: int, client: str, lease: int,
                          description: str = "qlab") -> tuple[tuple[str, str], ...]:
    return (("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP"),
            ("NewInternalPort", str(internal_port)), ("NewInternalClient", client), ("NewEnabled", "1"),
            ("NewPortMappingDescription", description), ("NewLeaseDuration", str(lease)))


def delete_port_mapping_args(external_port: int) -> tuple[tuple[str, str], ...]:
    return (("NewRemoteHost", ""), ("NewExternalPort", str(external_port)), ("NewProtocol", "UDP"))


def parse_ipv4(text: str) -> str:
    """A usable external IPv4 address from a GetExternalIPAddress answer."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        raise UpnpError(f"not an IPv4 address: {text[:40]!r}") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise UpnpError(f"unusable external address {ip}")
    return str(ip)
