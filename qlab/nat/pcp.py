"""PCP (RFC 6887), the MAP opcode: requests and responses, typed, encoded and decoded, no I/O.

Both directions are here: the client (`qlab/traversal/portmap.py`) encodes requests and decodes
responses, the gateway model (`gateway.py`) decodes requests and encodes responses. Addresses are
16 bytes on the wire; IPv4 ones are IPv4-mapped (::ffff:a.b.c.d, RFC 6887 section 5). Every decoder
raises `PcpError` (a ValueError) on malformed input.

Layout (RFC 6887 sections 7.1, 7.2, 11.1), all big-endian:
request  = version(1)=2 | R=0,opcode(1) | reserved(2) | lifetime(4) | client IP(16) | MAP body
response = version(1)=2 | R=1,opcode(1) | reserved(1) | result(1) | lifetime(4) | epoch(4) |
           reserved(12) | MAP body
MAP body = nonce(12) | protocol(1) | reserved(3) | internal port(2) | external port(2) | external IP(16)
followed by options: code(1) | reserved(1) | length(2) | data padded to 4 bytes.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

PCP_VERSION = 2
OPCODE_MAP = 1
RESPONSE_BIT = 0x80
MAX_MESSAGE = 1100  # RFC 6887 section 7: no PCP message is longer
HEADER_LEN = 24
MAP_LEN = 36
NONCE_LEN = 12
PROTO_UDP = 17
UNSPECIFIED = "0.0.0.0"  # "no suggestion" for the external address, sent as ::ffff:0.0.0.0

_REQ_HEADER = struct.Struct("!BBHI16s")
_RESP_HEADER = struct.Struct("!BBBBII12x")
_MAP = struct.Struct("!12sB3xHH16s")


class PcpError(ValueError):
    """A malformed or unacceptable PCP message."""


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def encode_address(host: str) -> bytes:
    """16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise PcpError(f"not an IP address: {host!r}") from None
    if ip.version == 4:
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def decode_address(raw: bytes) -> str:
    """The text form; an IPv4-mapped address comes back as IPv4."""
    if len(raw) != 16:
        raise PcpError(f"address of {len(raw)} bytes, expected 16")
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def _check_port(port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise PcpError(f"port {port} out of range")


def _check_u32(value: int, what: str) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise PcpError(f"{what} {value} out of range")


def _check_size(data: bytes, minimum: int) -> None:
    if len(data) > MAX_MESSAGE:
        raise PcpError(f"PCP message of {len(data)} bytes (max {MAX_MESSAGE})")
    if len(data) < minimum:
        raise PcpError(f"PCP message of {len(data)} bytes, need at least {minimum}")
    if len(data) % 4:
        raise PcpError(f"PCP message length {len(data)} is not a multiple of 4")


def decode_options(data: bytes) -> tuple[tuple[int, bytes], ...]:
    """The options after the MAP body: (code, data) pairs."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data):
            raise PcpError("truncated option header")
        code, _, length = struct.unpack_from("!BBH", data, pos)
        padded = (length + 3) & ~3
        if pos + 4 + padded > len(data):
            raise PcpError(f"option {code} of {length} bytes overruns the message")
        out.append((code, data[pos + 4 : pos + 4 + length]))
        pos += 4 + padded
    return tuple(out)


@dataclass(frozen=True)
class MapRequest:
    """A MAP request for one internal port of `client_ip`; lifetime 0 deletes the mapping."""

    nonce: bytes
    internal_port: int
    lifetime: int
    client_ip: str
    suggested_port: int = 0
    suggested_ip: str = UNSPECIFIED
    protocol: int = PROTO_UDP
    options: tuple[tuple[int, bytes], ...] = ()

    def encode(self) -> bytes:
        if len(self.nonce) != NONCE_LEN:
            raise PcpError(f"nonce of {len(self.nonce)} bytes, expected {NONCE_LEN}")
        _check_port(self.internal_port)
        _check_port(self.suggested_port)
        _check_u32(self.lifetime, "lifetime")
        if self.options:
            raise PcpError("encoding options is not supported")
        head = _REQ_HEADER.pack(PCP_VERSION, OPCODE_MAP, 0, self.lifetime, encode_address(self.client_ip))
        body = _MAP.pack(self.nonce, self.protocol, self.internal_port, self.suggested_port,
                         encode_address(self.suggested_ip))
        return head + body

    @classmethod
    def decode(cls, data: bytes) -> MapRequest:
        _check_size(data, HEADER_LEN + MAP_LEN)
        version, op, _, lifetime, client = _REQ_HEADER.unpack_from(data)
        if version != PCP_VERSION:
            raise PcpError(f"PCP version {version}, expected {PCP_VERSION}")
        if op != OPCODE_MAP:
            raise PcpError(f"opcode {op:#x} is not a MAP request")
        nonce, proto, iport, eport, eip = _MAP.unpack_from(data, HEADER_LEN)
        return cls(nonce, iport, lifetime, decode_address(client), eport, decode_address(eip), proto,
                   decode_options(data[HEADER_LEN + MAP_LEN :]))


@dataclass(frozen=True)
class MapResponse:
    """A MAP response. An error response may carry no MAP body (`nonce` is then empty)."""

    result: ResultCode
    lifetime: int
    epoch: int
    nonce: bytes = b""
    internal_port: int = 0
    external_port: int = 0
    external_ip: str = UNSPECIFIED
    protocol: int = PROTO_UDP

    def encode(self) -> bytes:
        _check_u32(self.lifetime, "lifetime")
        _check_u32(self.epoch, "epoch")
        head = _RESP_HEADER.pack(PCP_VERSION, RESPONSE_BIT | OPCODE_MAP, 0, int(self.result), self.lifetime, self.epoch)
        if not self.nonce:
            return head
        if len(self.nonce) != NONCE_LEN:
            raise PcpError(f"nonce of {len(self.nonce)} bytes, expected {NONCE_LEN}")
        _check_port(self.internal_port)
        _check_port(self.external_port)
        return head + _MAP.pack(self.nonce, self.protocol, self.internal_port, self.external_port,
                                encode_address(self.external_ip))

    @classmethod
    def decode(cls, data: bytes) -> MapResponse:
        _check_size(data, HEADER_LEN)
        version, op, _, result, lifetime, epoch = _RESP_HEADER.unpack_from(data)
        if version != PCP_VERSION:
            raise PcpError(f"PCP version {version}, expected {PCP_VERSION}")
        if op != RESPONSE_BIT | OPCODE_MAP:
            raise PcpError(f"opcode {op:#x} is not a MAP response")
        try:
            code = ResultCode(result)
        except ValueError:
            raise PcpError(f"unknown result code {result}") from None
        if len(data) == HEADER_LEN:
            if code == ResultCode.SUCCESS:
                raise PcpError("successful MAP response without a MAP body")
            return cls(code, lifetime, epoch)
        _check_size(data, HEADER_LEN + MAP_LEN)
        nonce, proto, iport, eport, eip = _MAP.unpack_from(data, HEADER_LEN)
        decode_options(data[HEADER_LEN + MAP_LEN :])
        return cls(code, lifetime, epoch, nonce, iport, eport, decode_address(eip), proto)


def error_response(result: ResultCode, epoch: int, lifetime: int = 0) -> bytes:
    """A header-only response (for a request too broken to echo its MAP body)."""
    return MapResponse(result, lifetime, epoch).encode()
