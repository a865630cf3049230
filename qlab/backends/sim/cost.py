"""Processing cost in virtual time: what the roles' work on each datagram costs the CPU running them.

On kernel sockets a role's work sits on the critical path: a QUIC handshake's key exchange and
signatures, packet protection, the asyncio shell's system calls. On virtual time code runs in zero
time, so without this the simulator is optimistic by exactly that work. A `Calibration` says what
each kind of datagram costs on a machine (measured by `qlab.backends.sim.calibrate`); `ProcessingCost`
charges it: a datagram a socket receives is handed to the role when the CPU has done its work, and a
datagram a socket sends leaves when the CPU has protected it. Costs are fixed numbers per class, so a
run stays deterministic: same seed and calibration, same events.

The class of a datagram is read from its first bytes (QUIC's header is public; nothing is decrypted):
see `DatagramClass`. One CPU runs every role by default, as the netns backend runs the three roles
in one process; `per_host=True` gives each host its own (roles on separate machines).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import platform
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

QUIC_VERSION_LEN = 4
TRACKED_CIDS = 4096  # connection IDs a socket remembers for classification (bounded: a flood can't grow it)


class DatagramClass(StrEnum):
    """What a datagram costs the host that handles it, told apart by its public header."""

    CLIENT_HELLO = "client_hello"  # a server's first Initial of a connection: ClientHello, key exchange, the signed flight
    SERVER_FLIGHT = "server_flight"  # a client's first answer from its server: ServerHello, certificate check, Finished
    LONG = "long"  # any other long-header datagram (the client's Finished, ACKs, retransmissions)
    SHORT = "short"  # 1-RTT: relayed DATAGRAMs, echoes, control messages
    RAW = "raw"  # not QUIC (fixed bit clear or not a QUIC header): punch probes, the echo app's UDP


CLASSES: tuple[DatagramClass, ...] = tuple(DatagramClass)


class CalibrationError(ValueError):
    """A calibration file that cannot be used (one line: which file and why)."""


@dataclass(frozen=True)
class Calibration:
    """Microseconds of CPU per datagram: `rx` to take one in, `tx` to send one, per class, plus the
    asyncio shell's share (`shell_rx_us`, `shell_tx_us`: system call, loop wake-up) added to every
    datagram. `machine`, `python` and `measured_at` say where the numbers come from."""

    name: str
    rx_us: dict[str, float]
    tx_us: dict[str, float]
    shell_rx_us: float = 0.0
    shell_tx_us: float = 0.0
    machine: str = ""
    python: str = ""
    measured_at: str = ""
    method: str = ""

    def __post_init__(self) -> None:
        for side in (self.rx_us, self.tx_us):
            missing = [c.value for c in CLASSES if c.value not in side]
            unknown = sorted(set(side) - {c.value for c in CLASSES})
            if missing or unknown:
                raise CalibrationError(f"calibration {self.name!r}: classes missing {missing}, unknown {unknown}")
        values = [*self.rx_us.values(), *self.tx_us.values(), self.shell_rx_us, self.shell_tx_us]
        if any(not isinstance(v, int | float) or not 0 <= v < 1e6 for v in values):
            raise CalibrationError(f"calibration {self.name!r}: every cost must be a number of microseconds in [0, 1e6)")

    @property
    def digest(self) -> str:
        """Six hex digits of the numbers: two calibrations with one name but other costs differ here."""
        numbers = json.dumps([self.rx_us, self.tx_us, self.shell_rx_us, self.shell_tx_us], sort_keys=True)
        return hashlib.sha256(numbers.encode()).hexdigest()[:6]

    @property
    def label(self) -> str:
        """What a record names: `name@digest`."""
        return f"{self.name}@{self.digest}"

    def rx_seconds(self, cls: DatagramClass) -> float:
        return (self.shell_rx_us + self.rx_us[cls.value]) / 1e6

    def tx_seconds(self, cls: DatagramClass) -> float:
        return (self.shell_tx_us + self.tx_us[cls.value]) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration") -> Calibration:
        if not isinstance(data, dict):
            raise CalibrationError(f"{where}: not a calibration (expected a JSON object)")
        try:
            return cls(**data)
        except TypeError as exc:
            raise CalibrationError(f"{where}: {exc}") from None


def zero(name: str = "none") -> Calibration:
    """No processing cost: the simulator as it was, every role's work instantaneous."""
    costs = {c.value: 0.0 for c in CLASSES}
    return Calibration(name, dict(costs), dict(costs), method="no processing cost")


# Shipped for machines that never ran `qlab sim calibrate`: measured on the development machine
# (2 vCPU x86_64, Python 3.11) with `qlab sim calibrate --name default` (fitted to the kernel lab).
DEFAULT = Calibration(
    name="default",
    rx_us={'client_hello': 5685.2, 'server_flight': 6015.8, 'long': 225.2, 'short': 48.7, 'raw': 4.6},
    tx_us={'client_hello': 130.0, 'server_flight': 130.0, 'long': 130.0, 'short': 46.7, 'raw': 3.2},
    shell_rx_us=197.1,
    shell_tx_us=189.0,
    machine='x86_64, 2 CPU',
    python='3.11',
    measured_at='2026-11-28',
    method='qlab sim calibrate: 200 handshakes without sockets, fitted to 7 netns trials (full_cone -> full_cone, wan-20ms)',
)


def this_machine() -> tuple[str, str]:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU", f"{sys.version_info.major}.{sys.version_info.minor}"


def _long_header(data: bytes) -> tuple[int, bytes, bytes] | None:
    """(packet type, destination CID, source CID) of a QUIC long header, or None."""
    if len(data) < 7 or not data[0] & 0x80 or not data[0] & 0x40:
        return None
    at = 1 + QUIC_VERSION_LEN
    dlen = data[at]
    dcid = data[at + 1:at + 1 + dlen]
    at += 1 + dlen
    if at >= len(data):
        return None
    slen = data[at]
    scid = data[at + 1:at + 1 + slen]
    return (data[0] & 0x30) >> 4, bytes(dcid), bytes(scid)


INITIAL = 0


def _without_long_header(data: bytes) -> DatagramClass:
    """A 1-RTT packet (short header, fixed bit set), or anything else (qlab's probes clear the fixed bit)."""
    return DatagramClass.SHORT if data and data[0] & 0xC0 == 0x40 else DatagramClass.RAW


class _Remembered:
    """A bounded set: the oldest entries go first."""

    def __init__(self, limit: int = TRACKED_CIDS) -> None:
        self._items: OrderedDict[bytes, None] = OrderedDict()
        self._limit = limit

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def add(self, key: bytes) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)


@dataclass
class Classifier:
    """Per socket: which connections it dialed (the source CIDs of its own long headers) and which
    handshakes it has already paid for, so that only the first ClientHello of a connection and the
    first flight from a server cost a handshake."""

    own_cids: _Remembered = field(default_factory=_Remembered)  # source CIDs of connections it dialed
    accepted: _Remembered = field(default_factory=_Remembered)  # clients' CIDs of connections it accepted
    paid: _Remembered = field(default_factory=_Remembered)

    def sent(self, data: bytes) -> DatagramClass:
        if data and data[0] & 0xC0 == 0x40:  # the common case first: a 1-RTT packet
            return DatagramClass.SHORT
        header = _long_header(data)
        if header is None:
            return _without_long_header(data)
        if header[1] not in self.accepted:  # not an answer to a client: this socket dialed
            self.own_cids.add(header[2])
        return DatagramClass.LONG

    def received(self, data: bytes) -> DatagramClass:
        if data and data[0] & 0xC0 == 0x40:  # the common case first: a 1-RTT packet
            return DatagramClass.SHORT
        header = _long_header(data)
        if header is None:
            return _without_long_header(data)
        kind, dcid, scid = header
        if kind != INITIAL:
            return DatagramClass.LONG
        if dcid in self.own_cids:  # our server's Initial: the first one carries its whole flight
            cls, key = DatagramClass.SERVER_FLIGHT, b"f" + scid
        else:  # a client's Initial to a connection ID we never chose: its ClientHello
            cls, key = DatagramClass.CLIENT_HELLO, b"h" + scid  # the client's CID: same in all its Initials
            self.accepted.add(scid)
        if key in self.paid:
            return DatagramClass.LONG
        self.paid.add(key)
        return cls


class Cpu:
    """One processor running the roles' work as one thread does. A received datagram waits for the
    datagrams before it, then takes its rx cost; what handling it sends is protected right after (tx
    cost), before the next datagram is taken in. A send from a timer waits for the work in hand."""

    def __init__(self) -> None:
        self.free_at = 0.0
        self.busy_s = 0.0
        self._waiting: deque[tuple[float, Callable[[], None]]] = deque()
        self._running = False

    def protect(self, now: float, seconds: float) -> float:
        """A datagram sent at `now`: returns when it leaves."""
        self.free_at = max(now, self.free_at) + seconds
        self.busy_s += seconds
        return self.free_at

    def take_in(self, loop: asyncio.AbstractEventLoop, seconds: float, deliver: Callable[[], None]) -> None:
        """A datagram received: `deliver()` hands it to its socket when the CPU has taken it in."""
        self._waiting.append((seconds, deliver))
        if not self._running:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._waiting:
            self._running = False
            return
        self._running = True
        seconds, deliver = self._waiting.popleft()
        self.free_at = max(loop.time(), self.free_at) + seconds
        self.busy_s += seconds
        loop.call_at(self.free_at, self._finish, loop, deliver)

    def _finish(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[], None]) -> None:
        deliver()
        # the next datagram once the role has handled this one (its zero-time callbacks and sends)
        when_idle = getattr(loop, "call_when_idle", loop.call_soon)
        when_idle(self._start, loop)


class ProcessingCost:
    """Charges each datagram a socket receives or sends to the CPU of its host."""

    def __init__(self, calibration: Calibration, *, per_host: bool = False) -> None:
        self.calibration = calibration
        self.per_host = per_host
        self._shared = Cpu()
        self._cpus: dict[str, Cpu] = {}
        self.charged: Counter[str] = Counter()
        # per class, worked out once (every datagram pays one): its seconds and its counter's name
        self._rx = {c: (calibration.rx_seconds(c), f"rx_{c.value}") for c in CLASSES}
        self._tx = {c: (calibration.tx_seconds(c), f"tx_{c.value}") for c in CLASSES}

    def cpu(self, host: str) -> Cpu:
        if not self.per_host:
            return self._shared
        return self._cpus.setdefault(host, Cpu())

    def receive(self, loop: asyncio.AbstractEventLoop, host: str, classifier: Classifier, data: bytes,
                deliver: Callable[[], None]) -> None:
        seconds, counter = self._rx[classifier.received(data)]
        self.charged[counter] += 1
        (self.cpu(host) if self.per_host else self._shared).take_in(loop, seconds, deliver)

    def send(self, now: float, host: str, classifier: Classifier, data: bytes) -> float:
        """When a datagram sent at `now` leaves its host."""
        seconds, counter = self._tx[classifier.sent(data)]
        self.charged[counter] += 1
        return (self.cpu(host) if self.per_host else self._shared).protect(now, seconds)
