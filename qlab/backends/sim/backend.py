"""The `sim` backend for trials: a SimNetwork per trial, run on the virtual-time loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from qlab.backends import sim
from qlab.backends.base import Main
from qlab.scenario.topology import Topology

T = TypeVar("T")


class SimEnvironment:
    def __init__(self, topology: Topology, seed: int) -> None:
        self.topology = topology
        self.seed = seed
        self.network = sim.SimNetwork(topology, seed=seed)

    def net(self, host: str) -> sim.SimNet:
        return self.network.net(host)

    def addresses(self, host: str) -> list[str]:
        return list(self.topology.host(host).ips)

    def block(self, router: str, ip: str, port: int | None = None) -> None:
        self.network.block(router, ip, port)

    def set_binding_timeout(self, router: str, seconds: float) -> None:
        self.network.set_binding_timeout(router, seconds)

    def flush_nat(self, router: str) -> None:
        self.network.flush_nat(router)

    def unblock(self, router: str, ip: str, port: int | None = None) -> None:
        self.network.unblock(router, ip, port)


class SimBackend:
    name = "sim"
    parallel = True

    @contextmanager
    def environment(self, topology: Topology, seed: int) -> Iterator[SimEnvironment]:
        yield SimEnvironment(topology, seed)

    def run(self, env: SimEnvironment, main: Main[T]) -> T:
        return sim.run(main(), seed=env.seed)
