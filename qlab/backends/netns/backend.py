"""The `netns` backend for trials: a kernel NAT lab per trial (or per cell, reset between trials),
with every role's socket created inside its host's namespace from this one process.

The roles run on real kernel sockets through the kernel's NAT (nftables) and the lab's links; only
the process is shared, which lets a trial switch the relay off for its session and blackhole a path
in a NAT router directly.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from qlab.backends.base import Main
from qlab.net import HTTP_RESPONSE_LIMIT, Addr, RealSocket, Receiver, bind_real, tcp_exchange, udp_family
from qlab.scenario.topology import Topology

T = TypeVar("T")


class NetnsNet:
    """Kernel UDP sockets created in one lab host's network namespace."""

    def __init__(self, lab, host: str) -> None:
        self.lab = lab
        self.host = host

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> RealSocket:
        sock = self.lab.socket(self.host, udp_family(host), socket.SOCK_DGRAM)
        return bind_real(sock, host, port, receiver, where=self.host)

    def host_addresses(self) -> list[str]:
        return list(self.lab.topology.host(self.host).addresses)

    def default_gateway(self) -> str | None:
        return self.lab.topology.host(self.host).gateway

    async def http_exchange(self, addr: Addr, request: bytes, timeout: float) -> bytes:
        """HTTP over a TCP socket made in this host's namespace (a UPnP gateway's service)."""
        return await tcp_exchange(lambda: self.lab.socket(self.host, socket.AF_INET, socket.SOCK_STREAM),
                                  addr, request, timeout, HTTP_RESPONSE_LIMIT)


class NetnsEnvironment:
    processing_cost = None

    def __init__(self, lab) -> None:
        self.lab = lab
        self.topology: Topology = lab.topology

    def net(self, host: str) -> NetnsNet:
        return NetnsNet(self.lab, host)

    def addresses(self, host: str) -> list[str]:
        return list(self.topology.host(host).addresses)

    def block(self, router: str, ip: str, port: int | None = None) -> None:
        self.lab.block(router, ip, port)

    def set_binding_timeout(self, router: str, seconds: float) -> None:
        self.lab.set_binding_timeout(router, seconds)

    def flush_nat(self, router: str) -> None:
        self.lab.flush_nat(router)

    def unblock(self, router: str, ip: str, port: int | None = None) -> None:
        self.lab.unblock(router, ip, port)


class NetnsBackend:
    name = "netns"
    parallel = False  # trials share the kernel and both cores: one lab at a time keeps timings honest

    @contextmanager
    def environment(self, topology: Topology, seed: int) -> Iterator[NetnsEnvironment]:
        from qlab.backends.netns.lab import Lab, check_requirements

        check_requirements()
        with Lab(topology, seed=seed) as lab:
            yield NetnsEnvironment(lab)

    def run(self, env: NetnsEnvironment, main: Main[T]) -> T:
        return asyncio.run(main())
