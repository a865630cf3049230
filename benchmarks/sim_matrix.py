"""The full 6 x 6 NAT matrix x 30 trials on the `sim` backend: wall time and trials per second.

Target (issue 5): 1,080 trials in <= 60 s of wall time on a 2-core machine, trials spread over
worker processes. Prints the success table per cell and the ratio to the target.

    .venv/bin/python benchmarks/sim_matrix.py [--trials 30] [--workers N]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.nat.spec import PRESET_NAMES  # noqa: E402
from qlab.trial import TrialSpec, default_certs, run_trial  # noqa: E402

TARGET_S = 60.0


def one(job: tuple[str, str, int, str]) -> tuple[str, str, str, bool, float | None]:
    logging.disable(logging.CRITICAL)
    a, c, seed, certs = job
    r = run_trial(TrialSpec(backend="sim", agent_nat=a, connector_nat=c, profile="wan-20ms", seed=seed),
                  certs_dir=certs)
    return a, c, r.outcome, r.as_expected, r.ttd_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    certs = default_certs()
    jobs = [(a, c, 1000 * i + k, certs) for k in range(args.trials) for i, (a, c) in
            enumerate((a, c) for a in PRESET_NAMES for c in PRESET_NAMES)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one, jobs, chunksize=8))
    wall = time.perf_counter() - t0
    ok = Counter((a, c) for a, c, _, good, _ in results if good)
    outcomes = Counter((a, c, o) for a, c, o, _, _ in results)
    print(f"{'agent/connector':<18}" + "".join(f"{c[:12]:>14}" for c in PRESET_NAMES))
    for a in PRESET_NAMES:
        cells = []
        for c in PRESET_NAMES:
            top = max((o for (x, y, o) in outcomes if (x, y) == (a, c)), key=lambda o: outcomes[(a, c, o)])
            short = {"direct_wan": "wan", "direct_lan": "lan", "direct_predicted": "pred"}.get(top, top)
            cells.append(f"{ok[(a, c)]:>3}/{args.trials} {short:>5}")
        print(f"{a:<18}" + "".join(f"{x:>14}" for x in cells))
    n = len(results)
    good = sum(ok.values())
    print(f"\n{n} trials, {good} as expected ({100 * good / n:.1f}%), {args.workers} workers")
    print(f"wall {wall:.1f} s = {n / wall:.1f} trials/s; target {TARGET_S:.0f} s for 1,080 trials -> "
          f"{(wall * 1080 / n) / TARGET_S:.2f} x the target time (<= 1.00 meets it)")


if __name__ == "__main__":
    main()
