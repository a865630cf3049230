"""Port mapping: the PCP, NAT-PMP and UPnP codecs, the MappingGateway model, the PortMapper client
against the model over an in-memory LAN, and the client against the real miniupnpd in namespaces.

What miniupnpd 2.3.1 (Debian, nftables backend, secure_mode=yes) really does, measured in the netns
topology below and by hand:
- it forwards only after STUN told it the TEST-NET WAN address is not behind a NAT ("Port forwarding
  is now enabled"; with stund answering on the same link that takes well under a second, the 3 s in
  its log is only the bound), and it creates no nftables table or chain of its own;
- PCP MAP: the external port is the suggested one, else the internal port; when another internal port
  holds it, the next one up (suggesting 40000 for internal 40001 gave 40001); lifetimes are clamped
  to [120, 86400] (60 -> 120, 100000 -> 86400); a client-IP field other than the sender is
  ADDRESS_MISMATCH (12) with lifetime 0 and external 0.0.0.0:0; a second MAP for the same internal
  port with another nonce SUCCEEDS and takes the mapping over (the rule's label holds the last
  nonce), after which a delete with the first nonce is NOT_AUTHORIZED (2); a delete of a mapping that
  does not exist is NO_RESOURCES (8) with lifetime 30; a successful delete answers lifetime 0, port 0;
  a truncated request gets MALFORMED_REQUEST (3); ANNOUNCE (opcode 0) is answered;
- NAT-PMP: lifetimes are granted as asked (30 s and 100000 s alike), lifetime 0 deletes and answers
  external port 0; an unknown opcode gets the 8-byte UNSUPPORTED_OPCODE (5) answer;
- the epoch (PCP and NAT-PMP) is whole seconds since the daemon started;
- it removes an expired mapping's rule on time: a 2 s NAT-PMP mapping left unrenewed was gone about
  2 s later, while one renewed every second stayed;
- NAT-PMP outside the `allow 1024-65535 ... 1024-65535` rule is not refused but searched: suggesting
  external port 80 (internal 42010) was granted 1024 with the answer later than 1 s; internal port
  1000 got no answer at all, and the daemon answered nothing else for seconds meanwhile;
- UPnP: it answers a unicast M-SEARCH (MX: 1) at once, well inside the client's 0.25 s default,
  for InternetGatewayDevice:1 and for WANIPConnection:1 (the root description it serves is IGD:2
  with WANIPConnection:2 at /ctl/IPConn on http_port);
  AddPortMapping with another NewInternalClient is 718 ConflictInMappingEntry (not 606), an external
  port below 1024 is 606 Action not authorized, the same client mapping a taken external port again
  replaces the rule, lease 0 becomes 604800 s; SOAPAction with WANIPConnection:1 is accepted too;
- every mapping is one DNAT rule `iif <wan> ... th dport E dnat ip to C:I` in upnp_nat_chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from qlab.nat import natpmp, pcp, upnp
from qlab.nat.gateway import HTTP_PORT, PCP_PORT, SSDP_PORT, MappingGateway
from qlab.nat.spec import MAPPING_PROTOCOLS, MappingProtocol
from qlab.net import (
    HTTP_RESPONSE_LIMIT,
    Addr,
    RealNet,
    RealSocket,
    Receiver,
    bind_real,
    linux_default_gateway,
    tcp_exchange,
)
from qlab.traversal.portmap import (
    GatewayNet,
    MappingChanged,
    PortMapper,
    PortMapping,
    offered_protocols,
)

PCP_, NATPMP_, UPNP_ = MappingProtocol.PCP, MappingProtocol.NATPMP, MappingProtocol.UPNP
NONCE = bytes(range(1, 13))
T = TypeVar("T")


# --- codecs: byte layouts from the RFCs and from miniupnpd's answers ---------------------------


def test_pcp_map_request_layout():
    req = pcp.MapRequest(NONCE, 40000, 7200, "10.9.0.2", 40001)
    want = (bytes([2, 1, 0, 0]) + struct.pack("!I", 7200) + b"\0" * 10 + b"\xff\xff" + bytes([10, 9, 0, 2])
            + NONCE + bytes([17, 0, 0, 0]) + struct.pack("!HH", 40000, 40001) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4)
    assert req.encode() == want and len(want) == 60
    assert pcp.MapRequest.decode(want) == req


def test_pcp_map_response_layout_and_round_trip():
    resp = pcp.MapResponse(pcp.ResultCode.SUCCESS, 120, 9, NONCE, 40000, 40000, "203.0.113.201")
    data = resp.encode()
    assert data[:4] == bytes([2, 0x81, 0, 0]) and data[4:12] == struct.pack("!II", 120, 9)
    assert data[12:24] == b"\0" * 12 and data[24:36] == NONCE and data[-4:] == bytes([203, 0, 113, 201])
    assert pcp.MapResponse.decode(data) == resp
    short = pcp.error_response(pcp.ResultCode.MALFORMED_REQUEST, 4)
    assert len(short) == 24 and pcp.MapResponse.decode(short).result == pcp.ResultCode.MALFORMED_REQUEST
    assert pcp.decode_address(pcp.encode_address("2001:db8::1")) == "2001:db8::1"


@pytest.mark.parametrize("data, message", [
    (b"\x02\x81" + b"\0" * 20, "need at least 24"),
    (b"\x02\x81" + b"\0" * 57, "multiple of 4"),
    (b"\x02\x81" + b"\0" * 1102, "max 1100"),
    (b"\x01\x81" + b"\0" * 58, "version 1"),
    (b"\x02\x82" + b"\0" * 58, "not a MAP response"),
    (b"\x02\x81\x00\x63" + b"\0" * 56, "unknown result code 99"),
    (b"\x02\x81\x00\x00" + b"\0" * 20, "without a MAP body"),
    (pcp.MapResponse(pcp.ResultCode.SUCCESS, 1, 1, NONCE).encode() + b"\x01\x00\x00\x08", "overruns"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_pcp_malformed(data, message):
    with pytest.raises(pcp.PcpError, match=message):
        pcp.MapResponse.decode(data)


def test_natpmp_layouts_and_miniupnpd_vectors():
    assert natpmp.ExternalAddressRequest().encode() == b"\x00\x00"
    assert natpmp.MapRequest(41000, 41000, 30).encode() == bytes.fromhex("00010000a028a0280000001e")
    # answers miniupnpd 2.3.1 gave (epoch 9 s): external address, a 30 s map, a delete, a bad opcode
    assert natpmp.decode_response(bytes.fromhex("0080000000000009cb0071c9")) == \
        natpmp.ExternalAddressResponse(natpmp.ResultCode.SUCCESS, 9, "203.0.113.201")
    assert natpmp.decode_response(bytes.fromhex("0081000000000009a028a0280000001e")) == \
        natpmp.MapResponse(natpmp.ResultCode.SUCCESS, 9, 41000, 41000, 30)
    assert natpmp.decode_response(bytes.fromhex("0081000000000009a028000000000000")).external_port == 0
    assert natpmp.decode_response(bytes.fromhex("0083000500000004")) == \
        natpmp.ErrorResponse(3, natpmp.ResultCode.UNSUPPORTED_OPCODE, 4)
    for resp in (natpmp.ExternalAddressResponse(natpmp.ResultCode.SUCCESS, 1, "198.51.100.7"),
                 natpmp.MapResponse(natpmp.ResultCode.OUT_OF_RESOURCES, 5, 1, 2, 0)):
        assert natpmp.decode_response(resp.encode()) == resp
    assert natpmp.decode_request(b"\x00\x01\x00\x00\xa0\x28\x00\x00\x00\x00\x00\x00") == natpmp.MapRequest(41000, 0, 0)
    assert natpmp.decode_request(b"\x01\x00") == natpmp.UnsupportedRequest(1, 0)


@pytest.mark.parametrize("data, message", [
    (b"\x00\x80\x00", "of 3 bytes"),
    (b"\x01\x80" + b"\0" * 10, "version 1"),
    (b"\x00\x00" + b"\0" * 10, "not a response"),
    (b"\x00\x80\x00\x07" + b"\0" * 8, "unknown result code 7"),
    (b"\x00\x81" + b"\0" * 10, "with 12 bytes"),
    (b"\x00\x81" + b"\0" * 20, "of 22 bytes"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_natpmp_malformed(data, message):
    with pytest.raises(natpmp.NatPmpError, match=message):
        natpmp.decode_response(data)


FAULT_BODY = (
    b'<?xml version="1.0"?>\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" s:encodingStyle="http://schemas.xmlsoap.org'
    b'/soap/encoding/"><s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>'
    b'<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode><errorDescription>ConflictInM'
    b"appingEntry</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>"
)
MINIUPNPD_FAULT = (b'HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/xml; charset="utf-8"\r\n'
                   b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(FAULT_BODY), FAULT_BODY))


def test_upnp_ssdp_description_and_soap_round_trips():
    assert upnp.parse_msearch(upnp.msearch()) == upnp.IGD_DEVICE
    answer = upnp.SsdpAnswer(upnp.IGD_DEVICE, "http://10.9.0.1:5000/rootDesc.xml", "uuid:x")
    assert upnp.parse_ssdp_answer(answer.encode()) == answer
    cp = upnp.parse_description(upnp.root_description("u-1"), "http://10.9.0.1:5000/rootDesc.xml")
    assert cp == upnp.ControlPoint(upnp.WANIP1, "http://10.9.0.1:5000/ctl/IPConn")
    req = upnp.parse_http(upnp.soap_request(cp, "AddPortMapping", upnp.add_port_mapping_args(5, 6, "10.9.0.2", 60)))
    assert req.start == ("POST", "/ctl/IPConn", "HTTP/1.1") and req.headers["connection"] == "close"
    call = upnp.parse_soap_request(req)
    assert (call.service_type, call.action, call.args["NewInternalClient"]) == (upnp.WANIP1, "AddPortMapping", "10.9.0.2")
    ok = upnp.parse_http(upnp.soap_response(upnp.WANIP1, "GetExternalIPAddress", (("NewExternalIPAddress", "1.2.3.4"),)))
    assert upnp.parse_soap_response(ok, "GetExternalIPAddress") == {"NewExternalIPAddress": "1.2.3.4"}
    fault = upnp.parse_soap_response(upnp.parse_http(MINIUPNPD_FAULT), "AddPortMapping")
    assert fault == upnp.SoapFault(718, "ConflictInMappingEntry")
    assert upnp.http_complete(MINIUPNPD_FAULT) and not upnp.http_complete(MINIUPNPD_FAULT[:-1])


def test_upnp_description_prefers_wanip2_and_resolves_relative_urls():
    doc = (b'<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device><serviceList>'
           b"<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType>"
           b"<controlURL>ctl/one</controlURL></service>"
           b"<service><serviceType>urn:schemas-upnp-org:service:WANIPConnection:2</serviceType>"
           b"<controlURL>/ctl/IPConn</controlURL></service></serviceList></device></root>")
    assert upnp.parse_description(doc, "http://10.9.0.1:5000/rootDesc.xml") == \
        upnp.ControlPoint(upnp.WANIP2, "http://10.9.0.1:5000/ctl/IPConn")


LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
          b"<root>&b;</root>")


@pytest.mark.parametrize("call, message", [
    (lambda: upnp.parse_xml(LAUGHS), "DTD"),
    (lambda: upnp.parse_xml(b'<!DOCTYPE r SYSTEM "file:///etc/passwd"><r/>'), "DTD"),
    (lambda: upnp.parse_xml(b"<r>" * 40 + b"</r>" * 40), "deeper"),
    (lambda: upnp.parse_xml(b"<r>" + b" " * upnp.MAX_BODY + b"</r>"), "max 65536"),
    (lambda: upnp.parse_xml(b"<r><unclosed></r>"), "malformed XML"),
    (lambda: upnp.parse_description(b"<root/>", "http://g/"), "no WANIPConnection"),
    (lambda: upnp.parse_http(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n"), "Content-Length"),
    (lambda: upnp.parse_http(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), "truncated"),
    (lambda: upnp.parse_http(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 100 + b"\r\n"), "more than 64"),
    (lambda: upnp.parse_http(b"HTTP/1.1 200 OK\r\nX-no-end"), "incomplete"),
    (lambda: upnp.parse_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), "chunk size"),
    (lambda: upnp.parse_ssdp_answer(b"HTTP/1.1 200 OK\r\nLOCATION: file:///x\r\n\r\n"), "not an http URL"),
    (lambda: upnp.parse_ssdp_answer(b"x" * 3000), "max 2048"),
    (lambda: upnp.parse_soap_response(upnp.parse_http(upnp.http_response(200, "OK", b"<a/>")), "X"), "not Envelope"),
    (lambda: upnp.http_request("GET", "http://g/", headers=(("X", "a\r\nb"),)), "line break"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_upnp_malformed(call, message):
    with pytest.raises(upnp.UpnpError, match=message):
        call()


def test_http_chunked_body():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert upnp.parse_http(raw).body == b"abcde"


def test_linux_default_gateway(tmp_path):
    route = tmp_path / "route"
    route.write_text("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "eth0\t0000090A\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                     "eth0\t00000000\t0100090A\t0003\t0\t0\t0\t00000000\n")
    assert linux_default_gateway(str(route)) == "10.9.0.1"
    route.write_text("Iface\tDestination\tGateway\tFlags\n")
    assert linux_default_gateway(str(route)) is None
    assert linux_default_gateway(str(tmp_path / "missing")) is None


# --- the gateway model -------------------------------------------------------------------------

HOST, GW, PUBLIC = "10.9.0.2", "10.9.0.1", "203.0.113.201"


class FakeRedirects:
    def __init__(self) -> None:
        self.rules: dict[int, tuple[Addr, float]] = {}
        self.refuse = False

    def add(self, internal: Addr, external_port: int, lifetime: float, now: float) -> int | None:
        if self.refuse:
            return None
        self.rules[external_port] = (internal, lifetime)
        return external_port

    def remove(self, internal: Addr, external_port: int) -> None:
        assert self.rules.pop(external_port)[0] == internal


def model(*protocols: MappingProtocol, started: float = 0.0) -> MappingGateway:
    return MappingGateway(protocols or MAPPING_PROTOCOLS, GW, PUBLIC, FakeRedirects(), started)


def pcp_ask(gw, iport, lifetime, *, nonce=NONCE, client=HOST, src=HOST, suggested=0, now=10.0):
    req = pcp.MapRequest(nonce, iport, lifetime, client, suggested).encode()
    [(data, dst)] = gw.on_udp(req, (src, 40999), PCP_PORT, now)
    assert dst == (src, 40999)
    return pcp.MapResponse.decode(data)


def test_model_pcp_as_miniupnpd():
    gw = model()
    r = pcp_ask(gw, 40000, 60)
    assert (r.result, r.lifetime, r.epoch, r.external_port, r.external_ip) == (0, 120, 10, 40000, PUBLIC)
    assert pcp_ask(gw, 40000, 100000).lifetime == 86400
    assert pcp_ask(gw, 40001, 3600, suggested=40000).external_port == 40001  # 40000 is taken: next up
    assert pcp_ask(gw, 40002, 3600, nonce=b"x" * 12).external_port == 40002
    mismatch = pcp_ask(gw, 40003, 3600, client="10.9.0.99")
    assert (mismatch.result, mismatch.lifetime, mismatch.external_ip) == (pcp.ResultCode.ADDRESS_MISMATCH, 0, "0.0.0.0")
    assert pcp_ask(gw, 40002, 0).result == pcp.ResultCode.NOT_AUTHORIZED  # another nonce's mapping
    assert pcp_ask(gw, 40000, 0).result == pcp.ResultCode.SUCCESS
    gone = pcp_ask(gw, 40000, 0)
    assert (gone.result, gone.lifetime) == (pcp.ResultCode.NO_RESOURCES, 30)
    assert sorted(gw.redirects.rules) == [40001, 40002]
    gw.redirects.refuse = True
    assert pcp_ask(gw, 40009, 600).result == pcp.ResultCode.NO_RESOURCES


def test_model_natpmp_and_expiry():
    gw = model(NATPMP_)
    [(data, _)] = gw.on_udp(b"\x00\x00", (HOST, 1), PCP_PORT, 3.0)
    assert natpmp.decode_response(data) == natpmp.ExternalAddressResponse(natpmp.ResultCode.SUCCESS, 3, PUBLIC)
    [(data, _)] = gw.on_udp(natpmp.MapRequest(41000, 41000, 100000).encode(), (HOST, 1), PCP_PORT, 3.0)
    assert natpmp.decode_response(data) == natpmp.MapResponse(natpmp.ResultCode.SUCCESS, 3, 41000, 41000, 100000)
    [(data, _)] = gw.on_udp(natpmp.MapRequest(41001, 0, 2).encode(), (HOST, 1), PCP_PORT, 3.0)
    assert natpmp.decode_response(data).external_port == 41001
    [(data, _)] = gw.on_udp(natpmp.MapRequest(41000, 0, 0).encode(), (HOST, 1), PCP_PORT, 4.0)
    assert natpmp.decode_response(data) == natpmp.MapResponse(natpmp.ResultCode.SUCCESS, 4, 41000, 0, 0)
    assert list(gw.redirects.rules) == [41001]
    gw.expire(5.0)  # the 2 s mapping made at 3.0
    assert gw.redirects.rules == {}
    assert gw.on_udp(pcp.MapRequest(NONCE, 1, 1, HOST).encode(), (HOST, 1), PCP_PORT, 5.0) == []  # PCP not offered
    [(data, _)] = gw.on_udp(b"\x00\x03" + b"\0" * 10, (HOST, 1), PCP_PORT, 5.0)
    assert natpmp.decode_response(data) == natpmp.ErrorResponse(3, natpmp.ResultCode.UNSUPPORTED_OPCODE, 5)


def soap(gw, action, args=(), src=HOST, now=1.0):
    cp = upnp.ControlPoint(upnp.WANIP1, f"http://{GW}:{HTTP_PORT}/ctl/IPConn")
    return upnp.parse_soap_response(upnp.parse_http(gw.on_http(upnp.soap_request(cp, action, args), (src, 5), now)),
                                    action)


def test_model_upnp_as_miniupnpd():
    gw = model(UPNP_)
    [(data, _)] = gw.on_udp(upnp.msearch(), (HOST, 7), SSDP_PORT, 0.0)
    assert upnp.parse_ssdp_answer(data).location == f"http://{GW}:{HTTP_PORT}/rootDesc.xml"
    assert soap(gw, "GetExternalIPAddress") == {"NewExternalIPAddress": PUBLIC}
    add = upnp.add_port_mapping_args
    assert soap(gw, "AddPortMapping", add(42000, 42000, HOST, 0)) == {}
    assert gw.redirects.rules[42000] == ((HOST, 42000), 604800)
    assert soap(gw, "AddPortMapping", add(42000, 42000, "10.9.0.3", 60), src="10.9.0.3") == \
        upnp.SoapFault(718, "ConflictInMappingEntry")  # taken by another host
    assert soap(gw, "AddPortMapping", add(42001, 42001, "10.9.0.99", 60)).code == 718  # secure mode
    assert soap(gw, "AddPortMapping", add(80, 42002, HOST, 60)).code == 606
    assert soap(gw, "DeletePortMapping", upnp.delete_port_mapping_args(42000), src="10.9.0.3").code == 606
    assert soap(gw, "DeletePortMapping", upnp.delete_port_mapping_args(42000)) == {}
    assert soap(gw, "DeletePortMapping", upnp.delete_port_mapping_args(42000)).code == 714
    assert soap(gw, "Reboot").code == 401
    assert upnp.parse_http(gw.on_http(b"garbage\r\n\r\n", (HOST, 5), 1.0)).status == 400
    assert model(PCP_).on_http(upnp.http_request("GET", f"http://{GW}:5000/rootDesc.xml"), (HOST, 5), 1.0) == b""


# --- the client over an in-memory LAN ------------------------------------------------------------

Tamper = Callable[[bytes, Addr], list[tuple[bytes, Addr]]]


class FakeSocket:
    def __init__(self, lan: FakeLan, addr: Addr, receiver: Receiver) -> None:
        self.lan, self.addr, self.receiver = lan, addr, receiver

    @property
    def local_address(self) -> Addr:
        return self.addr

    def sendto(self, data: bytes, addr: Addr) -> None:
        self.lan.deliver(self, data, addr)

    def close(self) -> None:
        self.lan.sockets.pop(self.addr, None)


class FakeLan:
    """One host and its gateway; `tamper` adds what a hostile LAN or gateway sends (from any address)."""

    def __init__(self, gw: MappingGateway | None) -> None:
        self.gw = gw
        self.sockets: dict[Addr, FakeSocket] = {}
        self.next_port = 50000
        self.tamper: Tamper | None = None
        self.http: Callable[[bytes], bytes] | None = None
        self.sent: list[tuple[bytes, Addr]] = []

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> FakeSocket:
        self.next_port += 1
        sock = FakeSocket(self, (host, port or self.next_port), receiver)
        self.sockets[sock.addr] = sock
        return sock

    def default_gateway(self) -> str | None:
        return GW if self.gw is not None else None

    async def http_exchange(self, addr: tuple[str, int], request: bytes, timeout: float) -> bytes:
        answer = self.http(request) if self.http else b""
        if not answer and self.gw is not None and addr == (GW, HTTP_PORT):
            answer = self.gw.on_http(request, (HOST, 40000), asyncio.get_running_loop().time())
        if not answer:
            raise ConnectionRefusedError(f"nothing listens on {addr}")
        return answer

    def deliver(self, sock: FakeSocket, data: bytes, addr: Addr) -> None:
        self.sent.append((data, addr))
        loop = asyncio.get_running_loop()
        replies = [] if self.tamper is None else self.tamper(data, addr)
        if self.gw is not None and addr[0] == GW:
            replies += [(r, (GW, addr[1])) for r, _ in self.gw.on_udp(data, sock.addr, addr[1], loop.time())]
        for reply, src in replies:
            loop.call_soon(lambda r=reply, s=src: sock.addr in self.sockets and sock.receiver([(r, s)]))


def lan(*protocols: MappingProtocol) -> tuple[FakeLan, MappingGateway]:
    gw = MappingGateway(protocols, GW, PUBLIC, FakeRedirects(), asyncio.get_running_loop().time())
    return FakeLan(gw), gw


def test_fake_lan_is_a_gateway_net():
    assert isinstance(FakeLan(None), GatewayNet)


@pytest.mark.parametrize("protocol", MAPPING_PROTOCOLS)
async def test_each_protocol_maps_and_deletes(protocol):
    net, gw = lan(*MAPPING_PROTOCOLS)
    mapper = PortMapper(net, HOST, 40000, protocols=(protocol,))
    events: list[MappingChanged] = []
    mapper.observers.subscribe(events.append)
    m = await mapper.acquire()
    assert m == PortMapping(protocol, (PUBLIC, 40000), 40000, 7200.0, GW)
    assert gw.redirects.rules == {40000: ((HOST, 40000), m.lifetime)}
    await mapper.close()
    await mapper.close()
    assert gw.redirects.rules == {} and mapper.mapping is None
    assert events == [MappingChanged(m), MappingChanged(None)]
    assert net.sockets == {}  # every request socket closed


async def test_close_during_acquire_leaves_nothing():
    net, gw = lan(UPNP_)
    mapper = PortMapper(net, HOST, 40000)
    pending = asyncio.ensure_future(mapper.acquire())
    await asyncio.sleep(0)
    await mapper.close()
    assert await pending is None
    assert gw.redirects.rules == {} and mapper.mapping is None


@pytest.mark.parametrize("offered, expected", [
    ((PCP_, NATPMP_, UPNP_), PCP_), ((NATPMP_, UPNP_), NATPMP_), ((UPNP_,), UPNP_), ((), None),
])
async def test_fallback_order(offered, expected):
    net, _ = lan(*offered)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    m = await PortMapper(net, HOST, 40000, timeout=0.1).acquire()
    assert (m.protocol if m else None) == expected
    assert loop.time() - t0 < 0.25  # none offered: the probes run alongside PCP, about one timeout


async def test_refusals_fall_back_without_waiting():
    net, gw = lan(*MAPPING_PROTOCOLS)
    now = asyncio.get_running_loop().time()
    gw.on_udp(pcp.MapRequest(NONCE, 40000, 600, "10.9.0.3").encode(), ("10.9.0.3", 9), PCP_PORT, now)
    net.tamper = lambda data, addr: []
    original = gw.on_udp

    def refuse_pcp(data, src, dst_port, now):  # the gateway answers PCP, NOT_AUTHORIZED
        out = original(data, src, dst_port, now)
        return [(r[:3] + b"\x02" + r[4:], a) if r[0] == 2 else (r, a) for r, a in out]

    gw.on_udp = refuse_pcp
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    m = await PortMapper(net, HOST, 40000, timeout=1.0).acquire()
    assert m is not None and m.protocol == NATPMP_ and m.external == (PUBLIC, 40001)  # 40000: 10.9.0.3's
    assert loop.time() - t0 < 0.2


async def test_no_default_gateway():
    assert await PortMapper(FakeLan(None), HOST, 40000).acquire() is None
    assert await offered_protocols(FakeLan(None), HOST) == ()


async def test_upnp_conflict_takes_another_port():
    net, gw = lan(UPNP_)
    soap(gw, "AddPortMapping", upnp.add_port_mapping_args(40000, 40000, "10.9.0.3", 60), src="10.9.0.3",
         now=asyncio.get_running_loop().time())
    m = await PortMapper(net, HOST, 40000).acquire()
    assert m is not None and m.external[1] != 40000 and gw.redirects.rules[m.external[1]][0] == (HOST, 40000)


async def test_renew_keeps_the_mapping_and_falls_over_to_the_next_protocol():
    net, gw = lan(*MAPPING_PROTOCOLS)
    mapper = PortMapper(net, HOST, 40000)
    events: list[MappingChanged] = []
    mapper.observers.subscribe(events.append)
    first = await mapper.acquire()
    assert await mapper.renew() == first and len(events) == 1
    gw.protocols = (UPNP_,)  # PCP and NAT-PMP stop answering
    m = await mapper.renew()
    assert m is not None and m.protocol == UPNP_ and events[-1] == MappingChanged(m)
    gw.protocols = ()
    assert await mapper.renew() is None and events[-1] == MappingChanged(None)
    await mapper.close()


async def test_renewal_loop_refreshes_before_expiry():
    net, gw = lan(NATPMP_)
    mapper = PortMapper(net, HOST, 40000, lifetime=2)
    assert await mapper.acquire() is not None
    mapper.start_renewal()
    await asyncio.sleep(2.5)  # renewals every 1 s; without them the mapping expires at 2 s
    gw.expire(asyncio.get_running_loop().time())
    assert 40000 in gw.redirects.rules
    maps = [d for d, a in net.sent if a == (GW, PCP_PORT) and d[:2] == b"\x00\x01"]
    assert len(maps) >= 3
    await mapper.close()
    assert gw.redirects.rules == {}
    await asyncio.sleep(1.1)
    assert len([d for d, _ in net.sent if d[:2] == b"\x00\x01"]) == len(maps) + 1  # only the delete


async def test_epoch_going_backwards_is_seen_as_a_gateway_reboot():
    net, gw = lan(NATPMP_)
    gw.started -= 1000  # up for 1000 s
    mapper = PortMapper(net, HOST, 40000)
    await mapper.acquire()
    net.gw = MappingGateway((NATPMP_,), GW, PUBLIC, FakeRedirects(), asyncio.get_running_loop().time())  # rebooted
    assert await mapper.renew() is not None
    assert mapper.epoch.resets == 1 and 40000 in net.gw.redirects.rules


def forged_pcp(data: bytes, result: int = 0, port: int = 1234, nonce: bytes | None = None) -> bytes:
    req = pcp.MapRequest.decode(data)
    return pcp.MapResponse(pcp.ResultCode(result), 7200, 1, nonce or req.nonce, req.internal_port, port,
                           "198.51.100.66").encode()


async def test_hostile_replies_are_ignored():
    net, gw = lan(*MAPPING_PROTOCOLS)

    def tamper(data: bytes, addr: Addr) -> list[tuple[bytes, Addr]]:
        if addr[1] == PCP_PORT and data[0] == 2:
            return [(forged_pcp(data), ("10.9.0.66", PCP_PORT)),  # not the gateway
                    (forged_pcp(data), (GW, 9999)),  # not its port
                    (forged_pcp(data, nonce=b"n" * 12), (GW, PCP_PORT)),  # not our nonce
                    (b"\x02" * 2000, (GW, PCP_PORT)), (b"junk", (GW, PCP_PORT))]
        return []

    net.tamper = tamper
    m = await PortMapper(net, HOST, 40000).acquire()
    assert m is not None and m.external == (PUBLIC, 40000)


async def test_hostile_upnp_gateway_is_refused_cleanly():
    net, _ = lan(UPNP_)
    elsewhere = upnp.SsdpAnswer(upnp.IGD_DEVICE, "http://10.9.0.66:80/evil.xml").encode()
    net.gw.protocols = ()
    net.tamper = lambda data, addr: [(elsewhere, (GW, SSDP_PORT))] * 50  # LOCATION off the gateway
    assert await PortMapper(net, HOST, 40000, timeout=0.1).acquire() is None
    net.gw.protocols = (UPNP_,)
    net.tamper = None
    bad_bodies = [upnp.http_response(200, "OK", LAUGHS), b"HTTP/1.1 200 OK\r\nContent-Length: 70000\r\n\r\n",
                  upnp.http_response(200, "OK", upnp.root_description("u").replace(b"/ctl/IPConn", b"http://10.9.0.66/c"))]
    for body in bad_bodies:
        net.http = lambda request, body=body: body if request.startswith(b"GET") else b""
        assert await PortMapper(net, HOST, 40000, timeout=0.1).acquire() is None


async def test_offered_protocols_creates_nothing():
    for offered in [MAPPING_PROTOCOLS, (UPNP_,), (PCP_, NATPMP_), ()]:
        net, gw = lan(*offered)
        assert await offered_protocols(net, HOST, timeout=0.1) == offered
        assert gw.redirects.rules == {} and net.sockets == {}


# --- against the real miniupnpd, in namespaces ---------------------------------------------------

NS_CLIENT, NS_ROUTER, NS_INET = "qpm-client", "qpm-router", "qpm-inet"
LAN_IF, WAN_IF = "qpm-lan", "qpm-wan"
STUN_IP, STUN_IP2 = "203.0.113.10", "203.0.113.11"
BINARIES = ("ip", "nft", "miniupnpd", "stund")
DAEMON_START = 20.0  # STUN alone takes about 3 s
_libc = ctypes.CDLL(None, use_errno=True)

TABLES = f"""
table inet qpm_pmap {{
    chain miniupnpd {{}}
    chain prerouting_miniupnpd {{}}
    chain postrouting_miniupnpd {{}}
    chain forward {{ type filter hook forward priority 0; policy accept; jump miniupnpd; }}
    chain prerouting {{ type nat hook prerouting priority -100; policy accept; jump prerouting_miniupnpd; }}
    chain postrouting {{ type nat hook postrouting priority 100; policy accept; jump postrouting_miniupnpd; }}
}}
table ip qpm_masq {{
    chain postrouting {{
        type nat hook postrouting priority 110; policy accept;
        oifname "{WAN_IF}" ip saddr 10.9.0.0/24 masquerade
    }}
}}
"""


def sh(*argv: str, ns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    return subprocess.run(cmd, check=check, capture_output=True, text=True, input=stdin, timeout=20).stdout


@contextlib.contextmanager
def netns(ns: str) -> Iterator[None]:
    """This thread inside namespace `ns` (sockets made meanwhile keep it), then back."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(there, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), f"setns {ns} failed")
        try:
            yield
        finally:
            _libc.setns(here, 0x40000000)
    finally:
        os.close(here)
        os.close(there)


def in_netns(ns: str, make: Callable[[], T]) -> T:
    with netns(ns):
        return make()


class NsNet:
    """A GatewayNet whose sockets live in one namespace (as the netns backend's do)."""

    def __init__(self, ns: str) -> None:
        self.ns = ns

    def socket(self, kind: int) -> socket.socket:
        return in_netns(self.ns, lambda: socket.socket(socket.AF_INET, kind))

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> RealSocket:
        return bind_real(self.socket(socket.SOCK_DGRAM), host, port, receiver)

    def default_gateway(self) -> str | None:
        return in_netns(self.ns, linux_default_gateway)

    async def http_exchange(self, addr: tuple[str, int], request: bytes, timeout: float) -> bytes:
        return await tcp_exchange(lambda: self.socket(socket.SOCK_STREAM), addr, request, timeout, HTTP_RESPONSE_LIMIT)


class MiniupnpdLab:
    """The three namespaces, stund, and one miniupnpd at a time (restarted when its config changes)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.config: tuple[bool, bool] | None = None
        self.log = workdir / "miniupnpd.log"

    def up(self) -> None:
        self.down()
        for ns in (NS_CLIENT, NS_ROUTER, NS_INET):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "qpm-c0", "netns", NS_CLIENT, "type", "veth", "peer", LAN_IF, "netns", NS_ROUTER)
        sh("ip", "link", "add", WAN_IF, "netns", NS_ROUTER, "type", "veth", "peer", "qpm-i0", "netns", NS_INET)
        for ns, dev, addrs in ((NS_CLIENT, "qpm-c0", ["10.9.0.2/24"]), (NS_ROUTER, LAN_IF, ["10.9.0.1/24"]),
                               (NS_ROUTER, WAN_IF, [f"{PUBLIC}/24"]), (NS_INET, "qpm-i0", [f"{STUN_IP}/24", f"{STUN_IP2}/24"])):
            for a in addrs:
                sh("ip", "addr", "add", a, "dev", dev, ns=ns)
            sh("ip", "link", "set", dev, "up", ns=ns)
        sh("ip", "route", "add", "default", "via", GW, ns=NS_CLIENT)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=NS_ROUTER)
        sh("nft", "-f", "-", ns=NS_ROUTER, stdin=TABLES)
        stund_log = open(self.workdir / "stund.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", NS_INET, "stund", "-h", STUN_IP, "-a", STUN_IP2],
                                           stdout=stund_log, stderr=subprocess.STDOUT))

    def ensure(self, natpmp: bool = True, upnp_: bool = True) -> None:
        """miniupnpd running with this config, and no mapping left from an earlier test."""
        if self.config != (natpmp, upnp_):
            self._stop_daemon()
            self._start_daemon(natpmp, upnp_)
        if "dnat" in self.rules():  # a failed test's mapping: not this test's business
            self._stop_daemon()
            self._start_daemon(natpmp, upnp_)

    def _start_daemon(self, natpmp: bool, upnp_: bool) -> None:
        yn = {True: "yes", False: "no"}
        conf = self.workdir / "miniupnpd.conf"
        conf.write_text("\n".join([
            f"ext_ifname={WAN_IF}", f"listening_ip={LAN_IF}", f"http_port={HTTP_PORT}",
            f"enable_natpmp={yn[natpmp]}", f"enable_upnp={yn[upnp_]}", "secure_mode=yes",
            "uuid=3e9b7a3c-1f1e-4c59-9b44-7a1c2d3e4f50", f"lease_file={self.workdir / 'leases'}",
            "ext_perform_stun=yes", f"ext_stun_host={STUN_IP}", "ext_stun_port=3478",
            "upnp_table_name=qpm_pmap", "upnp_nat_table_name=qpm_pmap", "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd", "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            "allow 1024-65535 10.0.0.0/8 1024-65535", "deny 0-65535 0.0.0.0/0 0-65535", ""]))
        self.log.write_bytes(b"")
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(["ip", "netns", "exec", NS_ROUTER, "miniupnpd", "-f", str(conf), "-d",
                                        "-P", str(self.workdir / "miniupnpd.pid")], stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        want = ["Port forwarding is now enabled"] + (["Listening for NAT-PMP/PCP"] if natpmp else []) \
            + (["HTTP listening on port"] if upnp_ else [])
        deadline = time.monotonic() + DAEMON_START
        while not all(w in self.log.read_text(errors="replace") for w in want):
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"miniupnpd did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        self.config = (natpmp, upnp_)

    def _stop_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.terminate()
            try:
                self.daemon.wait(5)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(5)
            self.daemon, self.config = None, None
            for chain in ("miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
                sh("nft", "flush", "chain", "inet", "qpm_pmap", chain, ns=NS_ROUTER, check=False)

    def rules(self) -> str:
        return sh("nft", "list", "chain", "inet", "qpm_pmap", "prerouting_miniupnpd", ns=NS_ROUTER)

    def down(self) -> None:
        self._stop_daemon()
        for p in self.procs:
            p.terminate()
            p.wait(5)
        self.procs.clear()
        for ns in (NS_CLIENT, NS_ROUTER, NS_INET):
            sh("ip", "netns", "del", ns, check=False)


def _lab_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    return f"missing {', '.join(missing)}" if missing else None


@pytest.fixture(scope="module")
def mlab(tmp_path_factory) -> Iterator[MiniupnpdLab]:
    reason = _lab_missing()
    if reason:
        if os.environ.get("QLAB_REQUIRE_NETNS", "") not in ("", "0"):
            pytest.fail(f"QLAB_REQUIRE_NETNS is set but the miniupnpd lab cannot run: {reason}")
        pytest.skip(f"miniupnpd lab unavailable: {reason}")
    lab = MiniupnpdLab(tmp_path_factory.mktemp("miniupnpd"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def role_socket(port: int) -> socket.socket:
    """The role's shared socket in the client namespace, the one the mapping is for."""
    s = in_netns(NS_CLIENT, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    s.bind((HOST, port))
    return s


def reaches(role: socket.socket, external: tuple[str, int], wait: float = 2.0) -> bool:
    """A datagram from the internet namespace to the external address arrives at the role's socket."""
    role.settimeout(wait)
    sender = in_netns(NS_INET, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with sender:
        sender.bind((STUN_IP, 0))
        sender.sendto(b"hello through the mapping", external)
        try:
            data, src = role.recvfrom(2048)
        except TimeoutError:
            return False
        return data == b"hello through the mapping" and src == sender.getsockname()


@pytest.mark.netns
@pytest.mark.parametrize("protocol, port", [(PCP_, 45001), (NATPMP_, 45002), (UPNP_, 45003)])
async def test_miniupnpd_maps_forwards_renews_and_deletes(mlab, protocol, port):
    mlab.ensure()
    with role_socket(port) as role:
        mapper = PortMapper(NsNet(NS_CLIENT), HOST, port, protocols=(protocol,), timeout=1.0)
        m = await mapper.acquire()
        assert m == PortMapping(protocol, (PUBLIC, port), port, 7200.0, GW)
        assert f"dport {port} dnat ip to {HOST}:{port}" in mlab.rules()
        assert reaches(role, m.external)
        assert await mapper.renew() == m
        await mapper.close()
        await mapper.close()
        assert f"dport {port}" not in mlab.rules()
        assert not reaches(role, m.external, wait=0.3)


@pytest.mark.netns
async def test_miniupnpd_pcp_lifetime_clamp_and_epoch(mlab):
    mlab.ensure()
    net = NsNet(NS_CLIENT)
    short = PortMapper(net, HOST, 45011, protocols=(PCP_,), lifetime=60)
    long = PortMapper(net, HOST, 45012, protocols=(PCP_,), lifetime=100000)
    assert (await short.acquire()).lifetime == 120
    assert (await long.acquire()).lifetime == 86400
    epoch, _ = short.epoch.last
    assert 0 <= epoch <= time.monotonic() - mlab.started + 1  # seconds since the daemon started
    await asyncio.sleep(1.2)
    assert (await short.renew()).external == (PUBLIC, 45011)
    assert short.epoch.last[0] >= epoch + 1 and short.epoch.resets == 0
    await short.close()
    await long.close()
    assert "dnat" not in mlab.rules()


class CountingMapper(PortMapper):
    renewals = 0

    async def renew(self) -> PortMapping | None:
        self.renewals += 1
        return await super().renew()


@pytest.mark.netns
async def test_miniupnpd_renewal_keeps_a_short_mapping_alive(mlab):
    mlab.ensure()
    net = NsNet(NS_CLIENT)
    renewed = CountingMapper(net, HOST, 45021, protocols=(NATPMP_,), lifetime=2)  # NAT-PMP: granted as asked
    left = PortMapper(net, HOST, 45022, protocols=(NATPMP_,), lifetime=2)
    try:
        assert (await renewed.acquire()).lifetime == 2 and (await left.acquire()).lifetime == 2
        renewed.start_renewal()
        # Wait for both conditions: the daemon removing the unrenewed one (at its lifetime) and
        # the renewed one's second renewal (at 2 s) land in either order.
        deadline = time.monotonic() + 8
        while ("dport 45022" in mlab.rules() or renewed.renewals < 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        assert "dport 45022" not in mlab.rules()  # the daemon removed the unrenewed one after its lifetime
        # Three renewals is 1.5 lifetimes: the renewed mapping outlived the one left alone.
        assert "dport 45021" in mlab.rules() and renewed.renewals >= 3 and renewed.mapping is not None
    finally:
        await renewed.close()
        await left.close()
    assert "dnat" not in mlab.rules()


@pytest.mark.netns
async def test_miniupnpd_offers_all_three_and_pcp_comes_first(mlab):
    mlab.ensure()
    net = NsNet(NS_CLIENT)
    assert net.default_gateway() == GW
    assert await offered_protocols(net, HOST) == MAPPING_PROTOCOLS
    assert "dnat" not in mlab.rules()  # probing created nothing
    mapper = PortMapper(net, HOST, 45031)
    assert (await mapper.acquire()).protocol == PCP_
    await mapper.close()


@pytest.mark.netns
async def test_miniupnpd_through_realnet(mlab):
    """RealNet (kernel sockets of the current namespace) is a GatewayNet: run from inside the client."""
    mlab.ensure()
    with netns(NS_CLIENT):
        net = RealNet()
        assert isinstance(net, GatewayNet) and net.default_gateway() == GW
        mapper = PortMapper(net, HOST, 45061, protocols=(UPNP_,))
        m = await mapper.acquire()
        assert m is not None and m.external == (PUBLIC, 45061) and "dport 45061" in mlab.rules()
        await mapper.close()
    assert "dnat" not in mlab.rules()


@pytest.mark.netns
async def test_miniupnpd_without_natpmp_offers_only_upnp(mlab):
    mlab.ensure(natpmp=False)
    net = NsNet(NS_CLIENT)
    assert await offered_protocols(net, HOST) == (UPNP_,)
    mapper = PortMapper(net, HOST, 45041)
    m = await mapper.acquire()
    assert m is not None and m.protocol == UPNP_ and f"dport {m.external[1]}" in mlab.rules()
    await mapper.close()
    assert "dnat" not in mlab.rules()


@pytest.mark.netns
async def test_miniupnpd_without_upnp_offers_pcp_and_natpmp(mlab):
    mlab.ensure(upnp_=False)
    net = NsNet(NS_CLIENT)
    assert await offered_protocols(net, HOST) == (PCP_, NATPMP_)
    for protocols, expected in ((MAPPING_PROTOCOLS, PCP_), ((NATPMP_, UPNP_), NATPMP_), ((UPNP_,), None)):
        mapper = PortMapper(net, HOST, 45051, protocols=protocols)
        m = await mapper.acquire()
        assert (m.protocol if m else None) == expected
        await mapper.close()
    assert "dnat" not in mlab.rules()
