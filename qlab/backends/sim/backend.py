"""The `sim` backend for trials: a SimNetwork per trial, run on the virtual-time loop, with the
roles' processing charged from a calibration (`qlab.backends.sim.cost`; by default the active one,
`calibrate.active()`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from qlab.backends import sim
from qlab.backends.base import Main
from qlab.backends.sim.calibrate import active
from qlab.backends.sim.cost import Calibration, ProcessingCost
from qlab.scenario.topology import Topology

T = TypeVar("T")


class SimEnvironment:
    def __init__(self, topology: Topology, seed: int, calibration: Calibration) -> None:
        self.topology = topology
        self.seed = seed
        self.calibration = calibration
        self.processing_cost = calibration.label
        self.network = sim.SimNetwork(topology, seed=seed, cost=ProcessingCost(calibration))

    def net(self, host: str) -> sim.SimNet:
        return self.network.net(host)

    def addresses(self, host: str) -> list[str]:
        return list(self.topology.host(host).addresses)

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

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration  # None: the active one, read when a trial starts

    @contextmanager
    def environment(self, topology: Topology, seed: int) -> Iterator[SimEnvironment]:
        yield SimEnvironment(topology, seed, self.calibration or active())

    def run(self, env: SimEnvironment, main: Main[T]) -> T:
        return sim.run(main(), seed=env.seed)
