"""qlab/1: every message, typed, with encode/decode and no I/O.

Three channels carry qlab/1 (docs/protocol.md has the byte layouts):
- the control stream, a client-initiated bidirectional QUIC stream: length-framed messages
  (`u16 length | u8 type | body`), reliable and ordered;
- QUIC DATAGRAM frames: relayed and direct application payloads (`u8 type | u32 session | payload`);
- raw UDP probes with the QUIC fixed bit (0x40) clear, so the endpoint never mistakes them for QUIC:
  hole-punch probes authenticated with the session key, and NAT-classification tests.

Every decoder raises `WireError` (and only that) on malformed input.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Generic, TypeVar, dataclass_transform

VERSION = 1
ALPN = "qlab/1"
MAX_CONTROL_MESSAGE = 16 * 1024
MAX_CANDIDATES = 32
KEY_LEN = 32
MAC_LEN = 16


# QUIC application close codes used by qlab/1
CLOSE_MALFORMED = 0x101
CLOSE_UNAUTHENTICATED = 0x102
CLOSE_BAD_VERSION = 0x103


class WireError(ValueError):
    """Malformed or unacceptable qlab/1 input. The only exception a decoder raises."""


class Role(IntEnum):
    AGENT = 1
    CONNECTOR = 2
    PROBE = 3  # NAT classifier / monitoring: QAD and change-requests only


class NackCode(IntEnum):
    UNAUTHENTICATED = 1
    BAD_VERSION = 2
    NOT_ALLOWED = 3
    NO_SUCH_SERVICE = 4
    NO_CONNECTOR = 5
    NO_SUCH_SESSION = 6
    NOT_SESSION_PARTY = 7
    MALFORMED = 8
    TOO_LARGE = 9
    RATE_LIMITED = 10
    BAD_STATE = 11
    PEER_GONE = 12


class CandidateKind(IntEnum):
    HOST = 0
    SRFLX = 1  # server-reflexive: what the Intermediate observed (QAD)
    PRFLX = 2  # peer-reflexive: where a peer's probe actually came from
    PREDICTED = 3  # a guessed port of a sequential-port symmetric NAT
    RELAY = 4
    MAPPED = 5  # an explicit mapping the side's router granted (PCP, NAT-PMP or UPnP IGD)


class NatKind(IntEnum):
    """What a side learned about its own NAT from QAD (sent in offers)."""

    UNKNOWN = 0
    NONE = 1  # observed address equals a host address
    EIM = 2  # same mapping towards both Intermediate addresses
    EDM_SEQUENTIAL = 3  # endpoint-dependent, ports step by a small delta
    EDM_RANDOM = 4  # endpoint-dependent, ports unpredictable

    @property
    def endpoint_dependent(self) -> bool:
        """A new mapping per destination (RFC 4787 ADM/APDM): the "hard" NATs."""
        return self in (NatKind.EDM_SEQUENTIAL, NatKind.EDM_RANDOM)

    @property
    def endpoint_independent(self) -> bool:
        """One mapping for every destination, or no NAT at all: the "easy" side of a pair."""
        return self in (NatKind.EIM, NatKind.NONE)


class Path(StrEnum):
    """The two ways a session's datagrams travel. A StrEnum, so records and the results store keep
    the plain strings "relay" and "direct"."""

    RELAY = "relay"  # DATAGRAM frames through the Intermediate
    DIRECT = "direct"  # the peer-to-peer QUIC connection


class SessionMode(StrEnum):
    """How a session's traffic is secured: two architectures, measured side by side."""

    # the Agent's QUIC connection ends at the Intermediate, which decrypts every relayed datagram and
    # encrypts it again; the direct path is a second QUIC connection with its own handshake
    TERMINATED = "terminated"
    # one QUIC connection end to end (Agent to Connector), its packets relayed unopened (raw frames
    # the Intermediate forwards), migrated to the punched path (RFC 9000 section 9) without a handshake
    SEALED = "sealed"


class BirthdayRole(StrEnum):
    """A side's part in birthday mode (docs/traversal.md): the random-port
    endpoint-dependent side opens many mappings (HARD), the endpoint-independent side sprays probes
    at random ports of the peer's public address (EASY)."""

    HARD = "hard"
    EASY = "easy"


def birthday_role(own: NatKind, peer: NatKind) -> BirthdayRole | None:
    """The one rule for which pairs need birthday mode, and which side plays which part."""
    if own == NatKind.EDM_RANDOM and peer.endpoint_independent:
        return BirthdayRole.HARD
    if peer == NatKind.EDM_RANDOM and own.endpoint_independent:
        return BirthdayRole.EASY
    return None


def lockstep_prediction(own: NatKind, peer: NatKind) -> bool:
    """The one rule for two-sided port prediction (docs/traversal.md): both NATs map per
    destination with sequential ports, so each side's k-th new mapping can be aimed at the peer's
    k-th predicted port while the peer's k-th aims at ours. Every other endpoint-dependent pair
    stays `both_endpoint_dependent`."""
    return own == NatKind.EDM_SEQUENTIAL and peer == NatKind.EDM_SEQUENTIAL


def both_endpoint_dependent(a: NatKind, b: NatKind) -> bool:
    """Neither side's mapping can be learned in advance: punching needs luck or a LAN (a pair
    that `lockstep_prediction` admits is checked for that first)."""
    return a.endpoint_dependent and b.endpoint_dependent


# --- primitive codecs ------------------------------------------------------------------------


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(f"truncated: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        s = struct.Struct(fmt)
        return s.unpack(self.take(s.size))

    def end(self) -> None:
        if self.pos != len(self.data):
            raise WireError(f"{len(self.data) - self.pos} trailing bytes")


class _Codec:
    def put(self, out: bytearray, value: Any) -> None:
        raise NotImplementedError

    def get(self, r: _Reader) -> Any:
        raise NotImplementedError


class _Int(_Codec):
    def __init__(self, fmt: str) -> None:
        self.s = struct.Struct(fmt)
        self.max = (1 << (8 * self.s.size)) - 1

    def put(self, out: bytearray, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= self.max:
            raise WireError(f"integer {value!r} out of range 0..{self.max}")
        out += self.s.pack(value)

    def get(self, r: _Reader) -> int:
        value: int = r.unpack(self.s.format)[0]
        return value


U8, U16, U32, U64 = _Int("!B"), _Int("!H"), _Int("!I"), _Int("!Q")


class _Str(_Codec):
    """u8 length + UTF-8; names are 1..255 bytes of printable text."""

    def __init__(self, allow_empty: bool = False) -> None:
        self.allow_empty = allow_empty

    def put(self, out: bytearray, value: str) -> None:
        b = value.encode("utf-8")
        if len(b) > 255 or (not b and not self.allow_empty):
            raise WireError(f"string of {len(b)} bytes does not fit (1..255)")
        out.append(len(b))
        out += b

    def get(self, r: _Reader) -> str:
        n = r.take(1)[0]
        if n == 0 and not self.allow_empty:
            raise WireError("empty name")
        try:
            s = r.take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"invalid UTF-8: {exc}") from None
        if not self.allow_empty and not s.isprintable():
            raise WireError("name has unprintable characters")
        return s


NAME, TEXT = _Str(), _Str(allow_empty=True)


class _Bytes(_Codec):
    def __init__(self, exact: int | None = None) -> None:
        self.exact = exact

    def put(self, out: bytearray, value: bytes) -> None:
        if len(value) > 255 or (self.exact is not None and len(value) != self.exact):
            raise WireError(f"byte string of length {len(value)} not allowed")
        out.append(len(value))
        out += value

    def get(self, r: _Reader) -> bytes:
        n = r.take(1)[0]
        if self.exact is not None and n != self.exact:
            raise WireError(f"expected {self.exact} bytes, got {n}")
        return bytes(r.take(n))


KEY = _Bytes(KEY_LEN)
BLOB = _Bytes()


class _Addr(_Codec):
    """family u8 (4 or 6) | address | port u16. IPv4-mapped IPv6 is sent as IPv4."""

    def put(self, out: bytearray, value: tuple[str, int]) -> None:
        host, port = value
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise WireError(f"not an IP address: {host!r}") from None
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not 0 <= port <= 0xFFFF:
            raise WireError(f"port {port} out of range")
        out.append(ip.version)
        out += ip.packed
        out += struct.pack("!H", port)

    def get(self, r: _Reader) -> tuple[str, int]:
        fam = r.take(1)[0]
        if fam == 4:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(r.take(4))
        elif fam == 6:
            ip = ipaddress.IPv6Address(r.take(16))
        else:
            raise WireError(f"unknown address family {fam}")
        (port,) = r.unpack("!H")
        return str(ip), port


ADDR = _Addr()


class _Optional(_Codec):
    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def put(self, out: bytearray, value: Any) -> None:
        if value is None:
            out.append(0)
        else:
            out.append(1)
            self.inner.put(out, value)

    def get(self, r: _Reader) -> Any:
        flag = r.take(1)[0]
        if flag == 0:
            return None
        if flag != 1:
            raise WireError(f"bad optional flag {flag}")
        return self.inner.get(r)


_E = TypeVar("_E", bound=IntEnum)


class _Enum(_Codec, Generic[_E]):
    def __init__(self, enum: type[_E]) -> None:
        self.enum = enum

    def put(self, out: bytearray, value: _E) -> None:
        U8.put(out, int(value))

    def get(self, r: _Reader) -> _E:
        v = r.take(1)[0]
        try:
            return self.enum(v)
        except ValueError:
            raise WireError(f"unknown {self.enum.__name__} {v}") from None


@dataclass(frozen=True)
class Candidate:
    kind: CandidateKind
    addr: tuple[str, int]
    priority: int = 0


class _Candidates(_Codec):
    def put(self, out: bytearray, value: list[Candidate] | tuple[Candidate, ...]) -> None:
        if len(value) > MAX_CANDIDATES:
            raise WireError(f"too many candidates ({len(value)} > {MAX_CANDIDATES})")
        out.append(len(value))
        for c in value:
            U8.put(out, int(c.kind))
            U32.put(out, c.priority)
            ADDR.put(out, c.addr)

    def get(self, r: _Reader) -> tuple[Candidate, ...]:
        n = r.take(1)[0]
        if n > MAX_CANDIDATES:
            raise WireError(f"too many candidates ({n})")
        out = []
        for _ in range(n):
            kind = _Enum(CandidateKind).get(r)
            prio = U32.get(r)
            out.append(Candidate(kind, ADDR.get(r), prio))
        return tuple(out)


CANDIDATES = _Candidates()


# --- control messages ------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[_Codec, ...]] = ()

    def encode(self) -> bytes:
        body = bytearray([self.TYPE])
        for codec, f in zip(self.FIELDS, fields(self), strict=True):
            codec.put(body, getattr(self, f.name))
        if len(body) > MAX_CONTROL_MESSAGE:
            raise WireError(f"{type(self).__name__} too large ({len(body)} bytes)")
        return struct.pack("!H", len(body)) + bytes(body)


_REGISTRY: dict[int, type[Message]] = {}


_M = TypeVar("_M", bound=type[Message])


@dataclass_transform(frozen_default=True)  # so that type checkers see each message's fields
def _message(type_id: int, *codecs: _Codec) -> Callable[[_M], _M]:
    def deco(cls: _M) -> _M:
        dataclass(frozen=True)(cls)  # in place: without slots it returns `cls` itself
        cls.TYPE = type_id
        cls.FIELDS = codecs
        if len(fields(cls)) != len(codecs):
            raise TypeError(f"{cls.__name__}: {len(fields(cls))} fields, {len(codecs)} codecs")
        _REGISTRY[type_id] = cls
        return cls

    return deco


@_message(0x01, U8, _Enum(Role), NAME, BLOB)
class Hello(Message):
    """Client -> Intermediate, first message: protocol version, role, name and the auth tag."""

    version: int
    role: Role
    name: str
    auth: bytes


@_message(0x02, U8, U32, U16)
class Welcome(Message):
    """Intermediate -> client: accepted; the client's id and the relay payload limit it will forward."""

    version: int
    client_id: int
    max_relay_payload: int


@_message(0x03, U32, ADDR)
class ObservedAddress(Message):
    """QUIC Address Discovery: the address the Intermediate sees this client at, sent on connect
    and again whenever it changes (sequence numbers increase)."""

    seq: int
    addr: tuple[str, int]


@_message(0x04, U16, NAME)
class Register(Message):
    req: int
    service: str


@_message(0x05, U16)
class Ack(Message):
    req: int


@_message(0x06, U16, _Enum(NackCode), TEXT)
class Nack(Message):
    req: int
    code: NackCode
    reason: str


@_message(0x07, U16, U32, NAME, _Enum(NatKind), CANDIDATES)
class OpenSession(Message):
    """Agent -> Intermediate: open `session` (an id the Agent proposes, so relay datagrams can
    follow in the same flight) to `service`, with the Agent's offer (NAT verdict, candidates)."""

    req: int
    session: int
    service: str
    nat: NatKind
    candidates: tuple[Candidate, ...]


@_message(0x08, U16, U32, KEY, NAME, U16)
class SessionOpened(Message):
    """Intermediate -> Agent: the session is open; its key (authenticates probes and the direct
    path), the Connector's name and the largest application payload the relay carries for it."""

    req: int
    session: int
    key: bytes
    connector: str
    max_payload: int


@_message(0x09, U32, KEY, NAME, NAME, U16, _Enum(NatKind), CANDIDATES)
class SessionNew(Message):
    """Intermediate -> Connector: an Agent opened a session to one of its services, with its offer."""

    session: int
    key: bytes
    agent: str
    service: str
    max_payload: int
    nat: NatKind
    candidates: tuple[Candidate, ...]


@_message(0x0B, U32, KEY)
class DirectHello(Message):
    """Agent -> Connector, first message on a direct P2P connection: which session, and
    HMAC-SHA256(session key, "qlab/1 direct" | session) to prove it belongs to it."""

    session: int
    auth: bytes


@_message(0x0C, U32, NAME, KEY)
class DirectAccept(Message):
    """Connector -> Agent on a direct connection, the answer to a valid DirectHello: which session,
    the Connector's name and `direct_accept_auth(key, session, connector)`, so the Agent knows the
    peer holds the session key and is the Connector the Intermediate named in SessionOpened."""

    session: int
    connector: str
    auth: bytes


@_message(0x0A, U32, _Enum(NackCode), TEXT)
class SessionClosed(Message):
    session: int
    code: NackCode
    reason: str


@_message(0x10, U32, _Enum(NatKind), CANDIDATES)
class Offer(Message):
    """Agent -> Intermediate -> Connector: a new offer on an open session (another upgrade attempt
    after a failed punch or a lost direct path)."""

    session: int
    nat: NatKind
    candidates: tuple[Candidate, ...]


@_message(0x11, U32, _Enum(NatKind), CANDIDATES)
class Answer(Message):
    """Connector -> Intermediate -> Agent (as part of StartPunch): the Connector's side."""

    session: int
    nat: NatKind
    candidates: tuple[Candidate, ...]


@_message(0x12, U32, U16, _Enum(NatKind), CANDIDATES, U16)
class StartPunch(Message):
    """Intermediate -> both sides: the peer's NAT and candidates (including the ports it predicts
    for itself), and when to start (ms from receipt, from each side's RTT so that the probes
    cross); `birthday` is the number of extra mappings a birthday-mode sender opens (0 = off)."""

    session: int
    delay_ms: int
    peer_nat: NatKind
    peer_candidates: tuple[Candidate, ...]
    birthday: int


@_message(0x13, U32, U8, _Optional(ADDR), U16)
class PunchResult(Message):
    """Either side -> Intermediate -> peer: whether a pair worked, which address, and how many
    probes were sent."""

    session: int
    success: int
    addr: tuple[str, int] | None
    probes: int


@_message(0x14, U32, _Enum(NackCode), TEXT)
class SessionError(Message):
    session: int
    code: NackCode
    message: str


@_message(0x15, _Enum(NatKind), CANDIDATES)
class Announce(Message):
    """Connector -> Intermediate: its NAT verdict and candidates, the same for every session on its
    one socket. With them the Intermediate starts the punch the moment an Agent opens a session
    (no Offer/Answer round trip); sent again whenever they change."""

    nat: NatKind
    candidates: tuple[Candidate, ...]


@_message(0x16, U32)
class SessionAlive(Message):
    """Agent -> Intermediate, every `SESSION_ALIVE_INTERVAL` s per open session: the session is in
    use, even when its traffic runs on the direct path where the Intermediate sees none. Keeps the
    Intermediate's idle expiry for the sessions that are really abandoned. Never answered."""

    session: int


SESSION_ALIVE_INTERVAL = 60.0  # s; an Intermediate's idle expiry must be longer (the CLI refuses less than 2x)


@_message(0x20, U16, U8, U8, U64)
class ChangeRequest(Message):
    """Client -> Intermediate (RFC 5780 style): send a raw Test probe carrying `nonce` to my
    observed address from the alternate IP and/or port."""

    req: int
    alt_ip: int
    alt_port: int
    nonce: int


@_message(0x21, U16, ADDR, ADDR)
class ServerInfo(Message):
    """Intermediate -> client on request (req echoed): its primary and alternate addresses."""

    req: int
    primary: tuple[str, int]
    alternate: tuple[str, int]


@_message(0x22, U16)
class ServerInfoRequest(Message):
    req: int


@_message(0x23, U32)
class Ping(Message):
    """Either way on the control stream; answered with Pong (liveness and stream RTT)."""

    nonce: int


@_message(0x24, U32)
class Pong(Message):
    nonce: int


def decode_message(data: bytes) -> Message:
    """One control message body (type byte + fields, without the length prefix)."""
    if not data:
        raise WireError("empty message")
    cls = _REGISTRY.get(data[0])
    if cls is None:
        raise WireError(f"unknown message type 0x{data[0]:02x}")
    r = _Reader(data)
    r.take(1)
    try:
        values = [codec.get(r) for codec in cls.FIELDS]
    except WireError:
        raise
    except (ValueError, struct.error) as exc:  # ipaddress etc.
        raise WireError(f"{cls.__name__}: {exc}") from None
    r.end()
    return cls(*values)


class ControlFramer:
    """Reassembles length-framed control messages from stream data, bounded in size."""

    def __init__(self, limit: int = 4 * MAX_CONTROL_MESSAGE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        if len(self._buf) > self._limit:
            raise WireError("control stream buffer overflow")
        out: list[Message] = []
        while len(self._buf) >= 2:
            (n,) = struct.unpack_from("!H", self._buf)
            if n == 0 or n > MAX_CONTROL_MESSAGE:
                raise WireError(f"bad control frame length {n}")
            if len(self._buf) < 2 + n:
                break
            body = bytes(self._buf[2 : 2 + n])
            del self._buf[: 2 + n]
            out.append(decode_message(body))
        return out


# --- datagrams ---------------------------------------------------------------------------------

DGRAM_APP = 0x30  # application payload within a session (relay or direct)
DGRAM_HEADER = 5


# a packet of a sealed session's end-to-end QUIC connection, relayed as it is: the Intermediate
# reads the session id and nothing else (it holds none of that connection's keys)
DGRAM_SEALED = 0x31
# filler a receiver drops: the first datagram on a path a sealed connection migrated to carries it,
# so that the peer's anti-amplification budget on that path (3x what it received, RFC 9000
# section 8.1) covers its padded PATH_CHALLENGE and the replies, rather than holding the replies
# until the challenge is answered
DGRAM_PAD = 0x32


def padding(size: int) -> bytes:
    return bytes([DGRAM_PAD]) + bytes(max(0, size - 1))


# Sealed packets as raw UDP (QUIC fixed bit clear), once the sender knows the session key: to the
# Intermediate's primary listener with the sender's relay tag, forwarded without the tag to the
# other party. The relay then spends no cryptography on them (a TURN-style forwarder): a tag and
# an address compared, one datagram sent.
RAW_SEALED = 0x33  # a party to the Intermediate: type, session, tag, packet
RAW_SEALED_RELAYED = 0x34  # the Intermediate to the other party: type, session, packet
RELAY_TAG_LEN = 8


@functools.lru_cache(maxsize=1024)  # a party sends every packet with it: one HMAC per session, not per packet
def relay_tag(key: bytes, session: int, role: Role) -> bytes:
    """What proves a raw sealed frame is the session party's (`role`): derived from the session
    key, which only the Intermediate and the two parties hold."""
    msg = b"qlab/1 relay tag" + bytes([role.value]) + session.to_bytes(4, "big")
    return hmac.new(key, msg, hashlib.sha256).digest()[:RELAY_TAG_LEN]


def encode_raw_sealed(session: int, tag: bytes, packet: bytes) -> bytes:
    return _encode(RAW_SEALED, session, tag + packet)


def decode_raw_sealed(data: bytes) -> tuple[int, bytes, bytes]:
    """(session, tag, packet); WireError when it is not one."""
    session, body = _decode(RAW_SEALED, data)
    if len(body) <= RELAY_TAG_LEN:
        raise WireError("raw sealed frame without a packet")
    return session, body[:RELAY_TAG_LEN], body[RELAY_TAG_LEN:]


def encode_raw_relayed(session: int, packet: bytes) -> bytes:
    return _encode(RAW_SEALED_RELAYED, session, packet)


def decode_raw_relayed(data: bytes) -> tuple[int, bytes]:
    return _decode(RAW_SEALED_RELAYED, data)


def _encode(kind: int, session: int, body: bytes) -> bytes:
    return struct.pack("!BI", kind, session) + body


def _decode(kind: int, data: bytes) -> tuple[int, bytes]:
    if len(data) < DGRAM_HEADER or data[0] != kind:
        raise WireError(f"not a datagram of type 0x{kind:02x}")
    (session,) = struct.unpack_from("!I", data, 1)
    return session, data[DGRAM_HEADER:]


def encode_app(session: int, payload: bytes) -> bytes:
    return _encode(DGRAM_APP, session, payload)


def decode_app(data: bytes) -> tuple[int, bytes]:
    return _decode(DGRAM_APP, data)


def encode_sealed(session: int, packet: bytes) -> bytes:
    return _encode(DGRAM_SEALED, session, packet)


def decode_sealed(data: bytes) -> tuple[int, bytes]:
    return _decode(DGRAM_SEALED, data)


def relayed_session(data: bytes) -> int:
    """The session a relayed DATAGRAM belongs to, of either kind: all the relay reads of it."""
    if len(data) < DGRAM_HEADER or data[0] not in (DGRAM_APP, DGRAM_SEALED):
        raise WireError("not a relayed datagram")
    return int.from_bytes(data[1:DGRAM_HEADER], "big")


TUNNEL_HOST = "relay"  # not an IP address: a tunnel address is never a socket's


def relay_tunnel(session: int) -> tuple[str, int]:
    """The peer address a sealed session's QUIC connection gives its relay path: not an IP, so it
    is never a socket's; the endpoint hands packets to or from it to the session's relay frames."""
    return (TUNNEL_HOST, session)


# --- raw probes (QUIC fixed bit clear) ---------------------------------------------------------

PROBE_REQUEST = 0x21
PROBE_RESPONSE = 0x22
CLASSIFY_TEST = 0x23
_PROBE = struct.Struct("!BBIQ")  # type, version, session, txn


def is_raw(first_byte: int) -> bool:
    """True when a datagram is not QUIC (fixed bit 0x40 clear; long-header VN excluded by caller)."""
    return not first_byte & 0x40


@dataclass(frozen=True)
class Probe:
    """A hole-punch probe or its response. `observed` (responses only) is where the request came from."""

    kind: int
    session: int
    txn: int
    observed: tuple[str, int] | None = None


def _mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_LEN]


def encode_probe(probe: Probe, key: bytes) -> bytes:
    if probe.kind not in (PROBE_REQUEST, PROBE_RESPONSE):
        raise WireError(f"bad probe kind {probe.kind}")
    body = bytearray(_PROBE.pack(probe.kind, VERSION, probe.session, probe.txn))
    if probe.kind == PROBE_RESPONSE:
        _Optional(ADDR).put(body, probe.observed)
    return bytes(body) + _mac(key, bytes(body))


def probe_session(data: bytes) -> int:
    """The session id of a probe, read before the key is known (to look the key up)."""
    if len(data) < _PROBE.size + MAC_LEN or data[0] not in (PROBE_REQUEST, PROBE_RESPONSE):
        raise WireError("not a probe")
    session: int = struct.unpack_from("!I", data, 2)[0]
    return session


def decode_probe(data: bytes, key: bytes) -> Probe:
    """Verify and decode a probe; WireError for anything malformed or not signed with `key`."""
    if len(data) < _PROBE.size + MAC_LEN:
        raise WireError("probe too short")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    if not hmac.compare_digest(mac, _mac(key, body)):
        raise WireError("probe authentication failed")
    r = _Reader(body)
    kind, version, session, txn = r.unpack(_PROBE.format)
    if kind not in (PROBE_REQUEST, PROBE_RESPONSE):
        raise WireError(f"bad probe kind {kind}")
    if version != VERSION:
        raise WireError(f"probe version {version} unsupported")
    observed = _Optional(ADDR).get(r) if kind == PROBE_RESPONSE else None
    r.end()
    return Probe(kind, session, txn, observed)


def encode_classify_test(nonce: int, sent_from: tuple[str, int]) -> bytes:
    out = bytearray(struct.pack("!BBQ", CLASSIFY_TEST, VERSION, nonce))
    ADDR.put(out, sent_from)
    return bytes(out)


def decode_classify_test(data: bytes) -> tuple[int, tuple[str, int]]:
    r = _Reader(data)
    kind, version, nonce = r.unpack("!BBQ")
    if kind != CLASSIFY_TEST or version != VERSION:
        raise WireError("not a classify test")
    addr = ADDR.get(r)
    r.end()
    return nonce, addr


# --- authentication ----------------------------------------------------------------------------


def role_secret(root: bytes, role: Role) -> bytes:
    """A role's own secret, derived from the deployment's root secret: HMAC-SHA256(root,
    "qlab/1 role" | role), as 64 hex digits (the format of the files `qlab certs init` writes).
    Agents hold only the Agent secret and Connectors only the Connector secret, so an Agent's
    credentials cannot register a service; the Intermediate holds the root and derives both."""
    return hmac.new(root, b"qlab/1 role\x00" + bytes([int(role)]), hashlib.sha256).hexdigest().encode()


def hello_auth(secret: bytes, role: Role, name: str, binding: bytes) -> bytes:
    """The HELLO tag: HMAC-SHA256(secret, "qlab/1 hello" | role | name | 0x00 | binding). Sent inside
    TLS 1.3. `binding` is the connection ID the server chose for this connection (fresh and random
    per connection, known to the client from the handshake), so a recorded HELLO is useless on any
    other connection."""
    body = b"qlab/1 hello\x00" + bytes([int(role)]) + name.encode() + b"\x00" + binding
    return hmac.new(secret, body, hashlib.sha256).digest()


def check_hello(secret: bytes, hello: Hello, binding: bytes) -> bool:
    return hmac.compare_digest(hello.auth, hello_auth(secret, hello.role, hello.name, binding))


def direct_auth(key: bytes, session: int) -> bytes:
    return hmac.new(key, b"qlab/1 direct\x00" + struct.pack("!I", session), hashlib.sha256).digest()


def direct_accept_auth(key: bytes, session: int, connector: str) -> bytes:
    """The Connector's proof on a direct connection: it holds the session key and is `connector`."""
    body = b"qlab/1 direct accept\x00" + struct.pack("!I", session) + connector.encode()
    return hmac.new(key, body, hashlib.sha256).digest()
