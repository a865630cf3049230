"""NAT-PMP (RFC 6886): requests and responses, typed, encoded and decoded, no I/O.

Both directions: the client encodes requests and decodes responses, the gateway model decodes
requests and encodes responses. Every decoder raises `NatPmpError` (a ValueError) on malformed input.

Layout (RFC 6886 sections 3.2, 3.3, 3.5), all big-endian, version 0:
external address request  = version(1) | op(1)=0
external address response = version(1) | op(1)=128 | result(2) | epoch(4) | external IPv4(4)
map request  = version(1) | op(1)=1 UDP, 2 TCP | reserved(2) | internal port(2) | suggested port(2) |
               lifetime(4)
map response = version(1) | op(1)=128+op | result(2) | epoch(4) | internal port(2) | external port(2) |
               lifetime(4)
error response (unsupported version or opcode) = version(1) | op(1)=128+op | result(2) | epoch(4)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

NATPMP_VERSION = 0
OP_EXTERNAL = 0
OP_MAP_UDP = 1
OP_MAP_TCP = 2
RESPONSE_BIT = 0x80
MAX_MESSAGE = 16  # the longest NAT-PMP message (a map response)

_EXT_RESP = struct.Struct("!BBHI4s")
_MAP_REQ = struct.Struct("!BBHHHI")
_MAP_RESP = struct.Struct("!BBHIHHI")
_ERR_RESP = struct.Struct("!BBHI")


class NatPmpError(ValueError):
    """A malformed or unacceptable NAT-PMP message."""


class ResultCode(IntEnum):
    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2  # refused
    NETWORK_FAILURE = 3  # e.g. the NAT has no external address yet
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def _result(value: int) -> ResultCode:
    try:
        return ResultCode(value)
    except ValueError:
        raise NatPmpError(f"unknown result code {value}") from None


def _check(value: int, bits: int, what: str) -> None:
    if not 0 <= value < (1 << bits):
        raise NatPmpError(f"{what} {value} out of range")


@dataclass(frozen=True)
class ExternalAddressRequest:
    def encode(self) -> bytes:
        return bytes([NATPMP_VERSION, OP_EXTERNAL])


@dataclass(frozen=True)
class MapRequest:
    """Map `internal_port` of the sender; lifetime 0 deletes (then the suggested port must be 0)."""

    internal_port: int
    suggested_port: int
    lifetime: int
    op: int = OP_MAP_UDP

    def encode(self) -> bytes:
        _check(self.internal_port, 16, "internal port")
        _check(self.suggested_port, 16, "suggested port")
        _check(self.lifetime, 32, "lifetime")
        if self.op not in (OP_MAP_UDP, OP_MAP_TCP):
            raise NatPmpError(f"opcode {self.op} is not a map request")
        return _MAP_REQ.pack(NATPMP_VERSION, self.op, 0, self.internal_port, self.suggested_port, self.lifetime)


Request = ExternalAddressRequest | MapRequest


@dataclass(frozen=True)
class UnsupportedRequest:
    """A request the server cannot parse but must answer (RFC 6886 3.5): its version and opcode."""

    version: int
    op: int


def decode_request(data: bytes) -> Request | UnsupportedRequest:
    """A request as the server sees it; unknown versions and opcodes come back as UnsupportedRequest."""
    if len(data) < 2:
        raise NatPmpError(f"NAT-PMP request of {len(data)} bytes")
    if len(data) > MAX_MESSAGE:
        raise NatPmpError(f"NAT-PMP request of {len(data)} bytes (max {MAX_MESSAGE})")
    version, op = data[0], data[1]
    if version != NATPMP_VERSION or op not in (OP_EXTERNAL, OP_MAP_UDP, OP_MAP_TCP):
        return UnsupportedRequest(version, op)
    if op == OP_EXTERNAL:
        return ExternalAddressRequest()
    if len(data) < _MAP_REQ.size:
        raise NatPmpError(f"map request of {len(data)} bytes, expected {_MAP_REQ.size}")
    _, op, _, iport, eport, lifetime = _MAP_REQ.unpack_from(data)
    return MapRequest(iport, eport, lifetime, op)


@dataclass(frozen=True)
class ExternalAddressResponse:
    result: ResultCode
    epoch: int
    external_ip: str

    def encode(self) -> bytes:
        _check(self.epoch, 32, "epoch")
        ip = ipaddress.IPv4Address(self.external_ip).packed
        return _EXT_RESP.pack(NATPMP_VERSION, RESPONSE_BIT | OP_EXTERNAL, int(self.result), self.epoch, ip)


@dataclass(frozen=True)
class MapResponse:
    result: ResultCode
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int
    op: int = OP_MAP_UDP

    def encode(self) -> bytes:
        _check(self.epoch, 32, "epoch")
        _check(self.lifetime, 32, "lifetime")
        return _MAP_RESP.pack(NATPMP_VERSION, RESPONSE_BIT | self.op, int(self.result), self.epoch,
                              self.internal_port, self.external_port, self.lifetime)


@dataclass(frozen=True)
class ErrorResponse:
    """The short answer to an unsupported version or opcode."""

    op: int
    result: ResultCode
    epoch: int

    def encode(self) -> bytes:
        return _ERR_RESP.pack(NATPMP_VERSION, RESPONSE_BIT | (self.op & 0x7F), int(self.result), self.epoch)


Response = ExternalAddressResponse | MapResponse | ErrorResponse


def decode_response(data: bytes) -> Response:
    """A response as the client sees it; the length must be exactly that of its kind."""
    if len(data) < _ERR_RESP.size or len(data) > MAX_MESSAGE:
        raise NatPmpError(f"NAT-PMP response of {len(data)} bytes")
    version, op, result, epoch = _ERR_RESP.unpack_from(data)
    if version != NATPMP_VERSION:
        raise NatPmpError(f"NAT-PMP version {version}, expected {NATPMP_VERSION}")
    if not op & RESPONSE_BIT:
        raise NatPmpError(f"opcode {op} is not a response")
    code = _result(result)
    if len(data) == _ERR_RESP.size and code != ResultCode.SUCCESS:
        return ErrorResponse(op & 0x7F, code, epoch)
    if op == RESPONSE_BIT | OP_EXTERNAL and len(data) == _EXT_RESP.size:
        return ExternalAddressResponse(code, epoch, str(ipaddress.IPv4Address(data[8:12])))
    if op in (RESPONSE_BIT | OP_MAP_UDP, RESPONSE_BIT | OP_MAP_TCP) and len(data) == _MAP_RESP.size:
        _, _, _, _, iport, eport, lifetime = _MAP_RESP.unpack(data)
        return MapResponse(code, epoch, iport, eport, lifetime, op & 0x7F)
    raise NatPmpError(f"response opcode {op} with {len(data)} bytes")
