"""An attacker's QUIC client: aioquic directly, one socket per connection, no qlab networking code.

Only `qlab.wire` constants are borrowed (the ALPN). Everything here is what an internet peer can do
without any qlab credential: complete a handshake, open streams, send DATAGRAM frames and PINGs.
`stream_byte_at` is the one place that reaches into aioquic's stream sender, to put one byte at an
offset its public API cannot reach (the gap attack): an attack tool, not role code.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import cast

from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from qlab import wire

Addr = tuple[str, int]


def client_config(certs: Path, server_name: str, *, max_datagram_size: int = 1350,
                  idle_timeout: float = 60.0) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[wire.ALPN], server_name=server_name,
                            max_datagram_frame_size=65536, max_datagram_size=max_datagram_size,
                            idle_timeout=idle_timeout)
    cfg.load_verify_locations(cafile=str(certs / "ca.pem"))
    return cfg


class RawQuic(asyncio.DatagramProtocol):
    """One client connection on its own UDP socket; counts what it sends."""

    def __init__(self, config: QuicConfiguration) -> None:
        self.quic = QuicConnection(configuration=config)
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.DatagramTransport | None = None
        self.addr: Addr = ("127.0.0.1", 0)
        self.bytes_sent = 0
        self.packets_sent = 0
        self.handshake = self.loop.create_future()
        self.terminated = self.loop.create_future()
        self.stream_data: dict[int, bytearray] = {}
        self._timer: asyncio.TimerHandle | None = None

    async def connect(self, addr: Addr, timeout: float = 5.0, bind: str = "127.0.0.1") -> RawQuic:
        self.addr = addr
        await self.loop.create_datagram_endpoint(lambda: self, local_addr=(bind, 0))
        self.quic.connect(addr, now=self.loop.time())
        self.transmit()
        await asyncio.wait_for(asyncio.shield(self.handshake), timeout)
        return self

    # -- asyncio protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.quic.receive_datagram(data, addr, now=self.loop.time())
        self._events()
        self.transmit()

    def error_received(self, exc: Exception) -> None:
        pass

    # -- driving aioquic ---------------------------------------------------------------------------
    def _events(self) -> None:
        while (ev := self.quic.next_event()) is not None:
            if isinstance(ev, events.HandshakeCompleted) and not self.handshake.done():
                self.handshake.set_result(True)
            elif isinstance(ev, events.StreamDataReceived):
                self.stream_data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            elif isinstance(ev, events.ConnectionTerminated):
                self._end(ev.reason_phrase or f"error 0x{ev.error_code:x}")

    def _end(self, reason: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(reason))
            self.handshake.exception()
        if not self.terminated.done():
            self.terminated.set_result(reason)

    def transmit(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for data, addr in self.quic.datagrams_to_send(now=self.loop.time()):
            self.transport.sendto(data, addr)
            self.bytes_sent += len(data)
            self.packets_sent += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self.quic.get_timer()
        if at is not None:
            self._timer = self.loop.call_at(max(at, self.loop.time() + 1e-4), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self.loop.time())
        self._events()
        self.transmit()

    # -- what the attacker does ----------------------------------------------------------------------
    @property
    def open(self) -> bool:
        return not self.terminated.done()

    def send_stream(self, stream_id: int, data: bytes) -> None:
        self.quic.send_stream_data(stream_id, data)
        self.transmit()

    def send_datagram(self, data: bytes) -> None:
        self.quic.send_datagram_frame(data)
        self.transmit()

    def ping(self) -> None:
        self.quic.send_ping(0)
        self.transmit()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.quic.close(reason_phrase="bye")
            self.transmit()
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            self.transport.close()
        self._end("closed by us")

    def stream_byte_at(self, stream_id: int, offset: int) -> None:
        """One byte at `offset` of a stream this side opens, nothing before it (aioquic's flow
        control still applies: it leaves once the peer's windows reach offset + 1)."""
        stream = self.quic._get_or_create_stream_for_send(stream_id)
        sender = stream.sender
        sender._buffer = bytearray()
        sender._buffer_start = sender._buffer_stop = offset
        sender.write(b"\xff")
        self.transmit()

    def peer_max_datagram_frame(self) -> int:
        """The largest DATAGRAM frame the peer said it accepts."""
        return self.quic._remote_max_datagram_frame_size or 0

    def peer_stream_window(self, stream_id: int) -> int:
        """How far the peer lets this side write on the stream (its MAX_STREAM_DATA)."""
        stream = self.quic._get_or_create_stream_for_send(stream_id)
        return min(stream.max_stream_data_remote, self.quic._remote_max_data)


async def raw_connect(certs: Path, addr: Addr, server_name: str, *, timeout: float = 5.0,
                      max_datagram_size: int = 1350, bind: str = "127.0.0.1") -> RawQuic:
    return await RawQuic(client_config(certs, server_name, max_datagram_size=max_datagram_size)).connect(
        addr, timeout, bind)


def initials(certs: Path, server_name: str, n: int) -> list[bytes]:
    """`n` valid client Initials (each its own connection id), as a handshake flood sends them."""
    out = []
    cfg = client_config(certs, server_name)
    for _ in range(n):
        q = QuicConnection(configuration=cfg)
        q.connect(("127.0.0.1", 9), now=0.0)
        out.append(q.datagrams_to_send(now=0.0)[0][0])
    return out


class Victim:
    """UDP sockets on loopback that only count what reaches them (the reflection target)."""

    def __init__(self, n: int = 1, host: str = "127.0.0.1") -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            s.bind((host, 0))
            s.setblocking(False)
            self.socks.append(s)
        self.bytes = 0
        self.packets = 0
        self.first_bytes: dict[int, int] = {}

    @property
    def addrs(self) -> list[Addr]:
        return [s.getsockname() for s in self.socks]

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for s in self.socks:
            loop.add_reader(s.fileno(), self._drain, s)

    def _drain(self, s: socket.socket) -> None:
        for _ in range(256):
            try:
                data = s.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.bytes += len(data)
            self.packets += 1
            first = data[0] if data else -1
            self.first_bytes[first] = self.first_bytes.get(first, 0) + 1

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        for s in self.socks:
            if loop is not None:
                with contextlib.suppress(Exception):
                    loop.remove_reader(s.fileno())
            s.close()
