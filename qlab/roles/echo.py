"""The lab's application (a UDP echo service) and the echo probe that measures both paths the same way.

An `EchoProbe` puts a sequence number and a per-probe nonce in each payload, remembers locally when
and on which path it sent each one (nothing the network could forge decides a sample), and matches
replies. A reply counts for a path only when it came back over the path its echo was sent on (the
path the session delivered it by, never the one written in the payload); a reply that came back over
the other path is counted as crossed and gives no RTT sample. The same probe, with the same payload
size and rate, runs over the relay and over the direct path, so their RTTs compare like with like
(the seed system compared ping with HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from qlab.net import Addr, DatagramSocket, Net
from qlab.roles.events import EventHandler, Observers
from qlab.wire import Path

log = logging.getLogger("qlab.roles.echo")

MAGIC = b"QE"
_HDR = struct.Struct("!2s8sIB")  # magic, nonce, seq, path
HEADER_LEN = _HDR.size
PATHS = (Path.RELAY, Path.DIRECT)  # the index is the byte on the wire


@dataclass(frozen=True)
class EchoReplied:
    """An echo came back over the path it was sent on, after `rtt` seconds."""

    path: Path
    rtt: float
    seq: int


@dataclass(frozen=True)
class EchoCrossed:
    """An echo sent on `sent_on` came back over the other path (`via`): no RTT sample."""

    sent_on: Path
    via: Path
    seq: int


EchoEvent = EchoReplied | EchoCrossed


class EchoServer:
    """UDP echo: every datagram goes back to its sender unchanged."""

    def __init__(self, net: Net) -> None:
        self.net = net
        self.sock: DatagramSocket | None = None
        self.echoed = 0

    async def start(self, host: str, port: int) -> Addr:
        def receiver(batch: list[tuple[bytes, Addr]]) -> None:
            for data, addr in batch:
                sock.sendto(data, addr)
                self.echoed += 1

        sock = self.sock = await self.net.bind_udp(host, port, receiver)
        return sock.local_address

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no values."""
    if not values:
        return None
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


@dataclass
class PathStats:
    """Echoes sent on one path, and what came back for them.

    `received`, `bytes_received`, `rtts` and `first_reply_at` count only replies that came back over
    this same path; `crossed` counts replies that came back over the other path (no RTT sample: the
    round trip used both paths). `loss` is 1 - received / sent, so a crossed reply is a loss of this
    path's round trip."""

    sent: int = 0
    received: int = 0
    crossed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rtts: list[float] = field(default_factory=list)  # seconds
    first_reply_at: float | None = None

    def summary(self) -> dict:
        ms = [r * 1000 for r in self.rtts]
        return {
            "n": self.sent,
            "sent": self.sent,
            "received": self.received,
            "crossed": self.crossed,
            "loss": round(1 - self.received / self.sent, 4) if self.sent else None,
            "p50_ms": _r(percentile(ms, 50)),
            "p95_ms": _r(percentile(ms, 95)),
            "min_ms": _r(min(ms)) if ms else None,
            "mean_ms": _r(statistics.fmean(ms)) if ms else None,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


class EchoProbe:
    """Sequence-numbered echo payloads over named paths; replies matched to what was sent."""

    def __init__(self, clock: Callable[[], float], size: int = 64) -> None:
        if size < HEADER_LEN:
            raise ValueError(f"echo payloads need at least {HEADER_LEN} bytes")
        self.clock = clock
        self.size = size
        self.nonce = os.urandom(8)
        self.seq = 0
        self.outstanding: dict[int, tuple[float, Path, bytes]] = {}
        self.paths: dict[Path, PathStats] = {p: PathStats() for p in PATHS}
        self.foreign = 0  # replies that are not ours (another agent's traffic would show up here)
        self.corrupt = 0  # replies whose bytes differ from what we sent
        self.duplicates = 0
        self.replied = asyncio.Event()
        self.events: Observers[EchoEvent] = Observers()

    def subscribe(self, handler: EventHandler[EchoEvent]) -> Callable[[], None]:
        """Observe every matched reply (`EchoEvent`); returns the call that unsubscribes."""
        return self.events.subscribe(handler)

    def make(self, path: Path, size: int | None = None) -> bytes:
        """A new payload for `path`; the caller sends it and `record`s nothing else."""
        size = self.size if size is None else size
        if size < HEADER_LEN:
            raise ValueError(f"echo payloads need at least {HEADER_LEN} bytes")
        self.seq += 1
        body = _HDR.pack(MAGIC, self.nonce, self.seq, PATHS.index(path)) + os.urandom(size - HEADER_LEN)
        self.outstanding[self.seq] = (self.clock(), path, body)
        st = self.paths[path]
        st.sent += 1
        st.bytes_sent += len(body)
        return body

    def unsend(self, payload: bytes) -> None:
        """Take back a payload that could not be sent (it must not count as lost)."""
        _, _, seq, p = _HDR.unpack_from(payload)
        if self.outstanding.pop(seq, None) is not None:
            st = self.paths[PATHS[p]]
            st.sent -= 1
            st.bytes_sent -= len(payload)

    def receive(self, payload: bytes, via: str) -> None:
        """A reply arrived over path `via` (what the session delivered it by)."""
        if len(payload) < HEADER_LEN:
            self.foreign += 1
            return
        magic, nonce, seq, _ = _HDR.unpack_from(payload)
        if magic != MAGIC or nonce != self.nonce:
            self.foreign += 1
            return
        entry = self.outstanding.pop(seq, None)
        if entry is None:
            self.duplicates += 1
            return
        sent_at, path, body = entry
        if payload != body:
            self.corrupt += 1
            return
        now = self.clock()
        st = self.paths[path]
        self.replied.set()
        if via != path:  # sent on one path, answered over the other: no sample for either
            st.crossed += 1
            self.events.emit(EchoCrossed(path, Path(via), seq))
            return
        st.received += 1
        st.bytes_received += len(payload)
        st.rtts.append(now - sent_at)
        if st.first_reply_at is None:
            st.first_reply_at = now
        self.events.emit(EchoReplied(path, now - sent_at, seq))

    async def wait_for_replies(self, wait: float) -> None:
        """Wait up to `wait` seconds for outstanding replies (float-safe on a virtual clock)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.pending() and deadline - loop.time() > 1e-6:
            self.replied.clear()
            try:
                await asyncio.wait_for(self.replied.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break

    def pending(self, path: str | None = None) -> int:
        return sum(1 for _, p, _ in self.outstanding.values() if path is None or p == path)

    def summary(self) -> dict:
        return {
            "paths": {p: st.summary() for p, st in self.paths.items() if st.sent},
            "foreign": self.foreign,
            "corrupt": self.corrupt,
            "duplicates": self.duplicates,
        }
