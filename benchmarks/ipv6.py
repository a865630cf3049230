"""Dual-stack cells (issue 17, part 2): N trials per cell and backend, with the direct rate, the
IPv6 share of the direct paths and the median time to direct (ttd).

    cd /work/wt-v6 && PYTHONPATH=$PWD .venv/bin/python benchmarks/ipv6.py --backend sim --trials 20
    cd /work/wt-v6 && PYTHONPATH=$PWD .venv/bin/python benchmarks/ipv6.py --backend netns --trials 20
    ... --cell port_restricted,port_restricted,   # one cell (here IPv4 only)

Seeds are 1..N. A cell is "agent NAT, connector NAT, IPv6 firewall of both sides" ("" = IPv4 only).
netns timings depend on the machine's load: say how busy it was when quoting them.
"""

from __future__ import annotations

import argparse
import json
import statistics

from qlab.experiment.record import TrialSpec, is_direct
from qlab.experiment.trial import run_trial

CELLS = [("symmetric", "symmetric", "stateful"), ("symmetric", "symmetric", ""),
         ("port_restricted", "port_restricted", "stateful"), ("port_restricted", "port_restricted", "")]


def run_cell(backend: str, a: str, c: str, fw: str, trials: int, profile: str) -> dict:
    recs = [run_trial(TrialSpec(backend=backend, agent_nat=a, connector_nat=c, agent_ipv6=fw, connector_ipv6=fw,
                                profile=profile, seed=seed, samples=10, verify_echoes=5))
            for seed in range(1, trials + 1)]
    direct = [r for r in recs if is_direct(r.outcome) and r.direct_verified]
    ttd = [r.ttd_ms for r in direct if r.ttd_ms is not None]
    return {
        "backend": backend, "cell": f"{a} x {c}, IPv6 {fw or 'none'}", "trials": len(recs),
        "direct": len(direct), "ipv6": sum(r.path_family == "ipv6" for r in direct),
        "relay": sum(r.outcome == "relay" for r in recs), "failed": sum(r.outcome == "failed" for r in recs),
        "ttd_p50_ms": round(statistics.median(ttd), 1) if ttd else None,
        "ttd_max_ms": round(max(ttd), 1) if ttd else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="sim", choices=("sim", "netns"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--profile", default="wan-20ms")
    ap.add_argument("--cell", action="append", metavar="AGENT,CONNECTOR,FIREWALL",
                    help="a cell to run instead of the default ones (FIREWALL empty: IPv4 only); repeatable")
    args = ap.parse_args()
    cells = [tuple(c.split(",")) for c in args.cell] if args.cell else CELLS
    for a, c, fw in cells:
        print(json.dumps(run_cell(args.backend, a, c, fw, args.trials, args.profile)), flush=True)


if __name__ == "__main__":
    main()
