"""What a backend gives a trial: for each host of a topology, a `Net`; an event loop to run on;
and a few fault hooks. The roles never know which backend they run on.

Backends:
- `sim`: qlab's simulated network with its own NAT engine and virtual time (`qlab.backends.sim`);
- `netns`: Linux network namespaces, kernel NAT (`qlab.backends.netns.lab`), sockets made in each
  host's namespace from this one process;
- `loopback`: every host on its own 127.0.0.x address, no NAT and no delay (quick checks).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, Generic, Protocol, TypeVar

from qlab.net import RealNet, RealSocket, Receiver
from qlab.scenario.topology import Topology

T = TypeVar("T")
Main = Callable[[], Coroutine[Any, Any, T]]  # a trial's async main, run to completion by a backend


class Environment(Protocol):
    topology: Topology
    # What stands for the roles' processing time: the simulator's calibration label (its roles run
    # in zero time and are charged), None where the work really runs on a CPU.
    processing_cost: str | None

    def net(self, host: str) -> Any: ...

    def addresses(self, host: str) -> list[str]: ...

    def block(self, router: str, ip: str, port: int | None = None) -> None: ...

    def unblock(self, router: str, ip: str, port: int | None = None) -> None: ...

    def set_binding_timeout(self, router: str, seconds: float) -> None: ...

    def flush_nat(self, router: str) -> None: ...


E = TypeVar("E", bound=Environment)


class Backend(Protocol, Generic[E]):
    """A backend's environments are of its own kind (E), and only those are given back to `run`."""

    name: str
    parallel: bool  # trials of a campaign may run in several processes

    @contextmanager
    def environment(self, topology: Topology, seed: int) -> Iterator[E]: ...

    def run(self, env: E, main: Main[T]) -> T: ...


class BackendUnavailable(RuntimeError, ValueError):
    """The backend cannot run here; the message says what is missing."""


# --- loopback ----------------------------------------------------------------------------------


class LoopbackNet(RealNet):
    """Kernel sockets on one loopback address: a wildcard bind becomes a bind to that address."""

    def __init__(self, ip: str) -> None:
        self.ip = ip

    async def bind_udp(self, host: str, port: int, receiver: Receiver) -> RealSocket:
        if host in ("0.0.0.0", "::", ""):
            host = self.ip
        return await super().bind_udp(host, port, receiver)

    def host_addresses(self) -> list[str]:
        return [self.ip]


class LoopbackEnvironment:
    processing_cost = None

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        base = int(ipaddress.IPv4Address("127.0.0.1"))
        # distinct 127.x addresses per host (the whole 127/8 is local), the Intermediate gets two
        self.ips: dict[str, list[str]] = {}
        n = 0
        for h in topology.hosts:
            self.ips[h.name] = [str(ipaddress.IPv4Address(base + 0x10000 + n + i)) for i in range(len(h.ips))]
            n += len(h.ips)

    def net(self, host: str) -> LoopbackNet:
        return LoopbackNet(self.ips[host][0])

    def addresses(self, host: str) -> list[str]:
        return self.ips[host]

    def block(self, router: str, ip: str, port: int | None = None) -> None:
        raise BackendUnavailable("the loopback backend has no routers to block traffic in")

    unblock = block

    def set_binding_timeout(self, router: str, seconds: float) -> None:
        raise BackendUnavailable("the loopback backend has no NAT")

    def flush_nat(self, router: str) -> None:
        raise BackendUnavailable("the loopback backend has no NAT")


def check_loopback(nats: list[str], profile: str) -> None:
    """The loopback backend runs only hosts on the internet (`public`) over an ideal link (`lan`):
    refuse anything else before a trial starts, not as a failed record after it."""
    from qlab.scenario.profiles import profile as get_profile

    behind = sorted({n for n in nats if n != "public"})  # NAT presets, or a topology's router names
    if behind:
        raise BackendUnavailable(f"the loopback backend has no NAT ({', '.join(behind)}): use --backend sim "
                                 "or netns, or NAT preset public")
    if not get_profile(profile).ideal:
        raise BackendUnavailable(f"the loopback backend cannot add delay or loss (profile {profile}): use "
                                 "--backend sim or netns, or profile lan")


class LoopbackBackend:
    name = "loopback"
    parallel = True

    @contextmanager
    def environment(self, topology: Topology, seed: int) -> Iterator[LoopbackEnvironment]:
        check_loopback([r.name for r in topology.routers], topology.profile.name)
        yield LoopbackEnvironment(topology)

    def run(self, env: LoopbackEnvironment, main: Main[T]) -> T:
        return asyncio.run(main())


BACKENDS = ("sim", "netns", "loopback")


def get_backend(name: str) -> Backend[Any]:
    if name == "loopback":
        return LoopbackBackend()
    if name == "sim":
        from qlab.backends.sim.backend import SimBackend

        return SimBackend()
    if name == "netns":
        from qlab.backends.netns.backend import NetnsBackend

        return NetnsBackend()
    raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
