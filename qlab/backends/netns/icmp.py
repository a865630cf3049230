"""ICMP echo round trips measured outside qlab's own code paths: the lab's independent RTT probe.

The far end is the kernel (a router or host answers echo requests itself), so no userspace process
on the far side adds delay. Both ends of a sample are the kernel's software timestamps
(SO_TIMESTAMPING: when the request left the socket's device and when the reply arrived), so a busy
prober, preempted between its syscalls, does not inflate a round trip.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
SO_TIMESTAMPING = getattr(socket, "SO_TIMESTAMPING", 37)
# TX and RX software timestamps, reported; no packet copy on the error queue; a counter per send
TS_FLAGS = (1 << 1) | (1 << 3) | (1 << 4) | (1 << 7) | (1 << 11)
_TIMESPECS = struct.Struct("qqqqqq")  # scm_timestamping: software, (deprecated), hardware
_EXT_ERR = struct.Struct("IBBBBII")  # sock_extended_err: errno, origin, type, code, pad, info, data
SO_EE_ORIGIN_TIMESTAMPING = 4


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"qlab-rtt") -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(head + payload), ident, seq) + payload


@dataclass
class RttSamples:
    """Round trips in milliseconds, and how many requests got no reply."""

    rtts_ms: list[float] = field(default_factory=list)
    sent: int = 0
    lost: int = 0

    def quantile(self, q: float) -> float | None:
        if not self.rtts_ms:
            return None
        xs = sorted(self.rtts_ms)
        return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]

    @property
    def p50(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p95(self) -> float | None:
        return self.quantile(0.95)


def ping(sock: socket.socket, dst: str, *, count: int = 50, interval: float = 0.02, timeout: float = 1.0,
         warmup_timeout: float = 3.0) -> RttSamples:
    """Send `count` echo requests from a raw ICMP socket (made by the caller, e.g. inside a lab
    namespace) to `dst`, one every `interval` s, and collect the round trips. One request is
    answered first, unmeasured: it resolves neighbours along the path (packets queued behind an
    ARP lookup would otherwise count its round trip too)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, TS_FLAGS)
    sock.setblocking(False)
    ident = (os.getpid() ^ id(sock)) & 0xFFFF
    sent_at: dict[int, float] = {}  # seq -> send time (the kernel's when reported, else ours)
    replies: dict[int, float] = {}
    _exchange(sock, dst, ident, [0], 0.0, time.monotonic() + warmup_timeout, sent_at, replies, until_first=True)
    out = RttSamples(sent=count)
    _exchange(sock, dst, ident, list(range(1, count + 1)), interval, None, sent_at, replies, timeout=timeout)
    out.rtts_ms = [(replies[s] - sent_at[s]) * 1000 for s in range(1, count + 1) if s in replies]
    out.lost = count - len(out.rtts_ms)
    return out


def _exchange(sock: socket.socket, dst: str, ident: int, seqs: list[int], interval: float, deadline: float | None,
              sent_at: dict[int, float], replies: dict[int, float], *, timeout: float = 1.0,
              until_first: bool = False) -> None:
    """Send `seqs` paced by `interval`, then wait (bounded) for their replies."""
    pending = list(seqs)
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if pending and now >= next_send:
            seq = pending.pop(0)
            sent_at[seq] = time.time()
            sock.sendto(echo_request(ident, seq), (dst, 0))
            next_send += interval
            if not pending and deadline is None:
                deadline = time.monotonic() + timeout
        done = [s for s in seqs if s in replies]
        if (until_first and done) or len(done) == len(seqs):
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        wait = max(0.0, min(next_send - time.monotonic(), 0.05)) if pending else 0.05
        select.select([sock], [], [sock], wait)
        _drain_tx(sock, sent_at)
        _drain_rx(sock, ident, replies)


def _software_time(ancdata: list[tuple[int, int, bytes]]) -> tuple[float | None, int | None]:
    """(the software timestamp, the send counter) found in a message's ancillary data."""
    when = ident = None
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPING and len(data) >= _TIMESPECS.size:
            sec, nsec = _TIMESPECS.unpack(data[: _TIMESPECS.size])[:2]
            when = sec + nsec / 1e9
        elif len(data) >= _EXT_ERR.size:
            err = _EXT_ERR.unpack(data[: _EXT_ERR.size])
            if err[1] == SO_EE_ORIGIN_TIMESTAMPING:
                ident = err[6]
    return when, ident


def _drain_tx(sock: socket.socket, sent_at: dict[int, float]) -> None:
    while True:
        try:
            _d, anc, _f, _a = sock.recvmsg(64, 1024, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            return
        when, counter = _software_time(anc)
        if when is not None and counter is not None and counter + 1 in sent_at:
            sent_at[counter + 1] = when  # the counter starts at 0 for the first send: seq 1


def _drain_rx(sock: socket.socket, ident: int, replies: dict[int, float]) -> None:
    while True:
        try:
            data, anc, _f, _a = sock.recvmsg(2048, 1024)
        except (BlockingIOError, InterruptedError):
            return
        seq = _parse_reply(data, ident)
        when, _ = _software_time(anc)
        if seq is not None and when is not None:
            replies.setdefault(seq, when)


def _parse_reply(data: bytes, ident: int) -> int | None:
    """The sequence number of an echo reply for `ident` (raw sockets deliver the IP header too)."""
    if len(data) < 20:
        return None
    icmp = data[(data[0] & 0x0F) * 4 :]
    if len(icmp) < 8:
        return None
    typ, _code, _ck, rid, seq = struct.unpack("!BBHHH", icmp[:8])
    return seq if typ == ICMP_ECHO_REPLY and rid == ident else None
