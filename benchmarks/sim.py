"""The simulator's own speed (docs/sim.md, Numbers): datagrams delivered per wall-clock second, one
whole trial, and the 6 x 6 matrix with one trial per cell.

Throughput: one sender on the Agent host sends bursts of 100 datagrams of 1,200 bytes every virtual
millisecond for `--ms` virtual milliseconds to a sink on the Intermediate; the figure is datagrams
delivered / wall seconds of the whole run. Three cases: no NAT and no delay (`public`, `lan`), a NAT
and two delayed wires per datagram (`full_cone`, `wan-20ms`), and every datagram on its own timer
(`full_cone`, `jittery`).

    .venv/bin/python benchmarks/sim.py [--ms 200] [--trials 5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.backends import sim  # noqa: E402
from qlab.certs import default_certs  # noqa: E402
from qlab.experiment.record import TrialSpec  # noqa: E402
from qlab.experiment.trial import run_trial  # noqa: E402
from qlab.nat.spec import PRESET_NAMES  # noqa: E402
from qlab.scenario import topology  # noqa: E402

CASES = [("public", "lan"), ("full_cone", "wan-20ms"), ("full_cone", "jittery")]


def throughput(nat: str, profile: str, ms: int, burst: int = 100, size: int = 1200) -> tuple[int, int, float]:
    """(sent, delivered, wall seconds) for `ms` virtual milliseconds of bursts."""
    network = sim.SimNetwork(topology.build(nat, "public", profile_name=profile), seed=1)
    got = [0]

    async def main() -> int:
        inter = network.net("intermediate")
        await inter.bind_udp(topology.INTERMEDIATE_IPS[0], 9000, lambda batch: got.__setitem__(0, got[0] + len(batch)))
        sock = await network.net("agent").bind_udp("0.0.0.0", 5000, lambda batch: None)
        payload = bytes(size)
        sent = 0
        for _ in range(ms):
            for _ in range(burst):
                sock.sendto(payload, (topology.INTERMEDIATE_IPS[0], 9000))
                sent += 1
            await asyncio.sleep(0.001)
        await asyncio.sleep(1.0)  # the last bursts arrive
        return sent

    t0 = time.perf_counter()
    sent = sim.run(main())
    return sent, got[0], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, default=200, help="virtual milliseconds of bursts per case")
    ap.add_argument("--trials", type=int, default=5, help="whole trials timed (median)")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    for nat, profile in CASES:
        sent, delivered, wall = throughput(nat, profile, args.ms)
        print(f"throughput {nat} over {profile}: {delivered}/{sent} delivered in {wall:.2f} s wall = "
              f"{delivered / wall / 1000:.0f} k datagrams/s")
    certs = default_certs()
    walls = []
    for seed in range(args.trials):
        t0 = time.perf_counter()
        run_trial(TrialSpec(backend="sim", agent_nat="port_restricted", connector_nat="full_cone", seed=seed),
                  certs_dir=certs)
        walls.append(time.perf_counter() - t0)
    print(f"one trial (port_restricted -> full_cone, wan-20ms, 20 samples): median {statistics.median(walls):.3f} s "
          f"wall over {args.trials}")
    t0 = time.perf_counter()
    for a in PRESET_NAMES:
        for c in PRESET_NAMES:
            run_trial(TrialSpec(backend="sim", agent_nat=a, connector_nat=c, seed=1), certs_dir=certs)
    print(f"6 x 6 matrix, one trial per cell, one process: {time.perf_counter() - t0:.1f} s wall")


if __name__ == "__main__":
    main()
