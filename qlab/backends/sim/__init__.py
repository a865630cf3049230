"""The `sim` backend: a virtual network with qlab's own NAT engine, run on virtual time.

    from qlab.scenario import topology
    from qlab.backends import sim

    network = sim.SimNetwork(topology.build("full_cone", "symmetric", profile_name="wan-20ms"), seed=1)

    async def main():
        sock = await network.net("agent").bind_udp("0.0.0.0", 0, on_datagrams)
        ...

    sim.run(main())  # asyncio.run on a VirtualTimeLoop: delays and timeouts cost no wall time

Needs no privilege, no namespace and no real socket, on any OS. See docs/sim.md.
"""

from qlab.backends.sim.clock import (
    SimulationDeadlock,
    SimulationError,
    SimulationLimitExceeded,
    VirtualTimeLoop,
    loop_factory,
    run,
)
from qlab.backends.sim.nat import Binding, NatEngine, Verdict
from qlab.backends.sim.network import Packet, SimHost, SimNet, SimNetwork, SimRouter, SimSocket, Wire

__all__ = [
    "Binding",
    "NatEngine",
    "Packet",
    "SimHost",
    "SimNet",
    "SimNetwork",
    "SimRouter",
    "SimSocket",
    "SimulationDeadlock",
    "SimulationError",
    "SimulationLimitExceeded",
    "VirtualTimeLoop",
    "Verdict",
    "Wire",
    "loop_factory",
    "run",
]
