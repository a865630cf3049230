"""Kernel lab set-up speed (docs/netns-lab.md, Speed and cleanup): a two-NAT topology (six
namespaces, three TAP wires for `wan-20ms`) brought up, its NAT state reset, and torn down, N times.
Needs root and nftables.

    sudo .venv/bin/python benchmarks/lab.py [--times 5] [--agent-nat port_restricted] [--connector-nat symmetric]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.backends.netns.lab import Lab, check_requirements  # noqa: E402
from qlab.scenario.topology import build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--times", type=int, default=5)
    ap.add_argument("--agent-nat", default="port_restricted")
    ap.add_argument("--connector-nat", default="symmetric")
    ap.add_argument("--profile", default="wan-20ms")
    args = ap.parse_args()
    check_requirements()
    ups, resets, downs = [], [], []
    for _ in range(args.times):
        lab = Lab(build(args.agent_nat, args.connector_nat, profile_name=args.profile))
        lab.up()
        try:
            ups.append(lab.up_seconds)
            t0 = time.monotonic()
            lab.reset_nat()
            resets.append(time.monotonic() - t0)
        finally:
            t0 = time.monotonic()
            lab.down()
            downs.append(time.monotonic() - t0)
    print(f"{args.agent_nat} / {args.connector_nat} lab, {args.profile}, {args.times} times "
          f"({len(lab.namespaces) + 1} namespaces with the hub, links: {lab.link_mechanism}):")
    for name, xs in (("up", ups), ("NAT reset", resets), ("down", downs)):
        print(f"  {name}: {min(xs):.3f}-{max(xs):.3f} s")


if __name__ == "__main__":
    main()
