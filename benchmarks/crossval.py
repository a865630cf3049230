"""Cross-validation: the simulator against the kernel lab, cell by cell, side by side in one run.

For each profile and NAT cell, `--trials` trials on `netns` (the kernel's NAT, real sockets, one
process) and as many on `sim` (calibrated processing cost), then per cell: the outcomes (they must
agree exactly) and the medians of ttd, ttfb and the direct and relay RTT, with the ratio sim/netns
(target: within 0.90-1.10). Needs root (the kernel lab).

    sudo .venv/bin/python benchmarks/crossval.py [--trials 5] [--profiles wan-20ms,home-broadband]
                                                 [--calibration measure|active]

`--calibration measure` (default) calibrates this machine first, in this run (about 20 s), so both
backends are measured under the same load; `active` uses the stored one (`qlab sim calibration`).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.backends.sim import calibrate  # noqa: E402
from qlab.backends.sim.backend import SimBackend  # noqa: E402
from qlab.experiment.record import TrialResult, TrialSpec  # noqa: E402
from qlab.experiment.trial import run_trial  # noqa: E402

# one cell per kind of outcome: direct both ways, direct one way, predicted ports, relay
CELLS = (("full_cone", "full_cone"), ("port_restricted", "port_restricted"), ("public", "symmetric"),
         ("port_restricted", "symmetric_seq"), ("symmetric", "symmetric"))
FIGURES = ("ttd_ms", "ttfb_ms", "rtt_direct_p50_ms", "rtt_relay_p50_ms")


def median(results: list[TrialResult], field: str) -> float | None:
    xs = [getattr(r, field) for r in results if getattr(r, field) is not None]
    return statistics.median(xs) if xs else None


def run_cell(profile: str, cell: tuple[str, str], trials: int, sim: SimBackend) -> dict[str, list[TrialResult]]:
    out: dict[str, list[TrialResult]] = {"netns": [], "sim": []}
    for seed in range(trials):
        for backend in ("netns", "sim"):
            spec = TrialSpec(backend=backend, agent_nat=cell[0], connector_nat=cell[1], profile=profile, seed=seed)
            out[backend].append(run_trial(spec, backend=sim if backend == "sim" else None))
    return out


def compare(runs: dict[str, list[TrialResult]]) -> tuple[bool, dict[str, tuple[float | None, float | None, float | None]]]:
    """(outcomes agree, figure -> (netns median, sim median, ratio))."""
    same = Counter(r.outcome for r in runs["netns"]) == Counter(r.outcome for r in runs["sim"])
    figures = {}
    for f in FIGURES:
        real, simulated = median(runs["netns"], f), median(runs["sim"], f)
        figures[f] = (real, simulated, simulated / real if real and simulated is not None else None)
    return same, figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--profiles", default="wan-20ms,home-broadband,mobile-lte,intercontinental")
    ap.add_argument("--calibration", choices=("measure", "active"), default="measure")
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    t0 = time.monotonic()
    cal = calibrate.measure()[0] if args.calibration == "measure" else calibrate.active()
    # one trial per backend first, not counted: a process's first trial pays one-time imports and
    # warm-up on real sockets (measured: 126 ms ttd against 105-109 for the same cell after it)
    for backend in ("netns", "sim"):
        run_trial(TrialSpec(backend=backend, agent_nat="full_cone", connector_nat="full_cone", profile="lan"),
                  backend=SimBackend(cal) if backend == "sim" else None)
    print(f"calibration {cal.label} ({cal.method}); {args.trials} trials per cell and backend, after one "
          "uncounted warm-up trial each\n")
    print(f"{'profile':16} {'cell':34} {'outcomes':9} " + " ".join(f"{f[:-3]:>24}" for f in FIGURES))
    print(f"{'':16} {'':34} {'':9} " + " ".join(f"{'netns / sim / ratio':>24}" for _ in FIGURES))
    worst, all_same = 1.0, True
    for profile in args.profiles.split(","):
        for cell in CELLS:
            same, figures = compare(run_cell(profile, cell, args.trials, SimBackend(cal)))
            all_same &= same
            cols = []
            for real, simulated, ratio in figures.values():
                if ratio is None:
                    cols.append(f"{'-':>24}")
                    continue
                worst = max(worst, abs(ratio - 1) + 1)
                cols.append(f"{real:8.1f} {simulated:7.1f} {ratio:6.2f}")
            print(f"{profile:16} {cell[0] + ' -> ' + cell[1]:34} {'same' if same else 'DIFFER':9} " + " ".join(cols))
    print(f"\noutcomes agree in every cell: {all_same}; largest deviation of a median: "
          f"{(worst - 1) * 100:.1f} % (target 10 %); {time.monotonic() - t0:.0f} s")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
