"""The link profiles' round trips on the simulator: what each path of a profile looks like.

For each profile, on public hosts (no NAT) in virtual time: N UDP echoes Agent -> Connector (the
direct path), Agent -> Intermediate, and Agent -> Intermediate -> Connector -> Intermediate ->
Agent (a relay that forwards, as the Intermediate relays a session). Prints each path's base RTT
(`NetProfile.direct_rtt_ms` / `relay_rtt_ms`, from the configured delays) and the measured mean,
p5, p50, p95 and p99. Deterministic: the same seed gives the same table.

    .venv/bin/python benchmarks/profiles.py [--samples 2000] [--seed 0] [--profiles home-broadband,...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.backends import sim  # noqa: E402
from qlab.scenario import topology  # noqa: E402
from qlab.scenario.profiles import PROFILE_NAMES, profile  # noqa: E402

Addr = tuple[str, int]
I1 = topology.INTERMEDIATE_IPS[0]


async def echoes(network: sim.SimNetwork, n: int) -> dict[str, list[float]]:
    """Round trips (ms) per path: n echoes each, one every 2 virtual ms."""
    loop = asyncio.get_running_loop()
    connector_ip = network.topology.host("connector").ip
    agent_addr: list[Addr] = []

    def echo(sock_of: list[sim.SimSocket]):
        return lambda batch: [sock_of[0].sendto(d, s) for d, s in batch]

    def relay(batch: list[tuple[bytes, Addr]]) -> None:
        for data, src in batch:
            if src[0] == connector_ip:
                relay_sock.sendto(data, agent_addr[0])
            else:
                agent_addr[:] = [src]
                relay_sock.sendto(data, (connector_ip, 7))

    c: list[sim.SimSocket] = []
    c.append(await network.net("connector").bind_udp("0.0.0.0", 7, echo(c)))
    i: list[sim.SimSocket] = []
    i.append(await network.net("intermediate").bind_udp(I1, 7, echo(i)))
    relay_sock = await network.net("intermediate").bind_udp(I1, 4433, relay)
    sent: dict[bytes, float] = {}
    rtts: dict[str, list[float]] = {"direct": [], "agent-intermediate": [], "relay": []}
    by_tag = {b"d": "direct", b"i": "agent-intermediate", b"r": "relay"}
    agent = await network.net("agent").bind_udp("0.0.0.0", 0, lambda batch: [
        rtts[by_tag[d[:1]]].append((loop.time() - sent[d]) * 1000) for d, _ in batch])
    for tag, dst in ((b"d", (connector_ip, 7)), (b"i", (I1, 7)), (b"r", (I1, 4433))):
        for k in range(n):
            data = b"%s%d" % (tag, k)
            sent[data] = loop.time()
            agent.sendto(data, dst)
            await asyncio.sleep(0.02)  # one echo every 20 ms, as trials send them
        await asyncio.sleep(2)
    return rtts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profiles", default=",".join(PROFILE_NAMES))
    args = ap.parse_args()
    print(f"{'profile':<18}{'path':<20}{'base':>7}{'mean':>8}{'p5':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'lost':>6}")
    for name in args.profiles.split(","):
        p = profile(name)
        network = sim.SimNetwork(topology.build("public", "public", profile_name=name), seed=args.seed)
        rtts = sim.run(echoes(network, args.samples))
        base = {"direct": p.direct_rtt_ms, "agent-intermediate": 2 * (p.agent.delay_ms + p.intermediate.delay_ms),
                "relay": p.relay_rtt_ms}
        for path, ms in rtts.items():
            ms.sort()
            q = [ms[min(len(ms) - 1, round(x * (len(ms) - 1)))] for x in (0.05, 0.5, 0.95, 0.99)]
            print(f"{name:<18}{path:<20}{base[path]:>7.1f}{statistics.fmean(ms):>8.2f}"
                  + "".join(f"{v:>8.2f}" for v in q) + f"{args.samples - len(ms):>6}")
    print(f"\n{args.samples} echoes per path, seed {args.seed}, virtual time (ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
