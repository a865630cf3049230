"""The network the roles see: bind a UDP socket, send, receive in batches, know the local addresses.

Roles reach sockets only through `Net`, so the same Intermediate, Connector and Agent run on real
sockets (`RealNet`, used on loopback, inside network namespaces and on cloud hosts) and on the
simulator's virtual network (`qlab.backends.sim`). Time comes from the running asyncio loop
(`loop.time()`); the simulator swaps in a loop with a virtual clock.

Receiving is batched: a socket hands its receiver every datagram that is ready at once, so the
endpoint above can process a burst and transmit once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Protocol

Addr = tuple[str, int]
Receiver = Callable[[list[tuple[bytes, Addr]]], None]

RECV_BATCH = 256  # datagrams drained per readiness event before yielding to the loop
SOCKET_BUFFER = 4 * 1024 * 1024


def normalize_addr(addr: tuple) -> Addr:
    """(host, port) with IPv4-mapped IPv6 turned back into IPv4 and scope/flow info dropped."""
    return _normalize_host(addr[0], int(addr[1]))


@functools.lru_cache(maxsize=4096)
def _normalize_host(host: str, port: int) -> Addr:  # hot path: every received datagram
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, port
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


class DatagramSocket(Protocol):
    """A bound UDP socket as the roles use it."""

    @property
    def local_address(self) -> Addr: ...

    def sendto(self, data: bytes, addr: Addr) -> None: ...

    def close(self) -> None: ...


class Net(Protocol):
    """What a backend gives a role: UDP sockets and its own host addresses."""

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> DatagramSocket: ...

    def host_addresses(self) -> list[str]: ...


class RealSocket:
    """A non-blocking kernel UDP socket read on readiness, up to RECV_BATCH datagrams per wake-up."""

    def __init__(self, sock: socket.socket, receiver: Receiver, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._receiver = receiver
        self._loop = loop
        self._closed = False
        self._v6 = sock.family == socket.AF_INET6
        self.send_errors = 0
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def local_address(self) -> Addr:
        return normalize_addr(self._sock.getsockname())

    def _on_readable(self) -> None:
        batch: list[tuple[bytes, Addr]] = []
        recv = self._sock.recvfrom
        for _ in range(RECV_BATCH):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP errors surface here (ECONNREFUSED): not fatal for UDP
                continue
            batch.append((data, normalize_addr(addr)))
        if batch:
            self._receiver(batch)

    def sendto(self, data: bytes, addr: Addr) -> None:
        if self._closed:
            return
        if self._v6 and ":" not in addr[0]:
            addr = (f"::ffff:{addr[0]}", addr[1])  # a dual-stack socket reaches IPv4 as IPv4-mapped
        try:
            self._sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError, OSError):
            self.send_errors += 1  # UDP: a full buffer or an unreachable peer is a lost datagram

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


def udp_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_real(sock: socket.socket, host: str, port: int, receiver: Receiver, where: str = "") -> RealSocket:
    """Large buffers, non-blocking, bound; the socket is closed if the bind fails."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    sock.setblocking(False)
    if sock.family == socket.AF_INET6 and host == "::":  # dual-stack: IPv4 arrives IPv4-mapped
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{where + ': ' if where else ''}cannot bind UDP {host}:{port}: {exc.strerror}") from None
    return RealSocket(sock, receiver, asyncio.get_running_loop())


class RealNet:
    """Kernel sockets in the current network namespace."""

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> RealSocket:
        return bind_real(socket.socket(udp_family(host), socket.SOCK_DGRAM), host, port, receiver)

    def host_addresses(self) -> list[str]:
        return interface_addresses()

    def default_gateway(self) -> str | None:
        return linux_default_gateway()

    async def http_exchange(self, addr: Addr, request: bytes, timeout: float) -> bytes:
        return await tcp_exchange(functools.partial(socket.socket, udp_family(addr[0]), socket.SOCK_STREAM),
                                  addr, request, timeout, HTTP_RESPONSE_LIMIT)


_SIOCGIFADDR = 0x8915


def interface_addresses() -> list[str]:
    """IPv4 addresses of this namespace's interfaces that are usable host candidates.

    Never unspecified, loopback or link-local (those would be wrong candidates for a peer).
    """
    try:
        import fcntl  # POSIX only; elsewhere there are no interface addresses to offer
    except ImportError:
        return []
    out: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                res = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            ip = ipaddress.ip_address(res[20:24])
            if usable_host_address(str(ip)) and str(ip) not in out:
                out.append(str(ip))
    return out


def usable_host_address(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not (ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast)


# --- reaching the default gateway (port mapping: qlab/traversal/portmap.py) --------------------

HTTP_RESPONSE_LIMIT = 72 * 1024  # a 64 KiB body and its headers


def linux_default_gateway(route_file: str = "/proc/net/route") -> str | None:
    """The IPv4 next hop of this namespace's default route (the first one listed), or None."""
    try:
        with open(route_file, encoding="ascii") as f:
            lines = f.read(64 * 1024).splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        cols = line.split()
        # Iface Destination Gateway Flags ...: hex, little-endian; flag 0x2 = RTF_GATEWAY
        if len(cols) >= 4 and cols[1] == "00000000" and int(cols[3], 16) & 0x2:
            try:
                return str(ipaddress.IPv4Address(struct.pack("<I", int(cols[2], 16))))
            except (ValueError, struct.error):
                continue
    return None


async def tcp_exchange(sock_factory: Callable[[], socket.socket], addr: Addr, request: bytes,
                       timeout: float, limit: int) -> bytes:
    """Send `request` on a new TCP connection from `sock_factory()` (an unconnected socket, made where
    the caller needs it, e.g. inside a namespace) and read the answer until the peer closes or the
    Content-Length is complete. At most `limit` bytes (ValueError beyond), at most `timeout` seconds
    (TimeoutError); the socket is always closed."""
    from qlab.nat.upnp import http_complete  # HTTP framing lives with the UPnP codecs

    loop = asyncio.get_running_loop()
    sock = sock_factory()
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
            await loop.sock_sendall(sock, request)
            buf = bytearray()
            while not http_complete(bytes(buf)):
                chunk = await loop.sock_recv(sock, 16 * 1024)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise ValueError(f"response from {addr[0]}:{addr[1]} larger than {limit} bytes")
            return bytes(buf)
    finally:
        sock.close()
