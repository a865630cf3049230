"""What delay correlation does inside Linux netem, emulated from its integer arithmetic.

netem mixes each fresh 32-bit random number with the previous result (`get_crandom` in
net/sched/sch_netem.c: `(value * (2^32 - rho) + last * rho) >> 32`), then keeps only the low
bits: `rnd % (2 * jitter)` for uniform jitter (jitter in ns) and `rnd % 4096` to index a
distribution table. This prints the lag-1 correlation of what reaches the delay for a few
correlations: near 0 unless rho is near 100 %. qlab's link model (`qlab/scenario/linkmodel.py`) uses
the mixed value whole instead, so there a 25 % correlation correlates consecutive delays by 0.25.

    .venv/bin/python benchmarks/netem_correlation.py [--draws 50000] [--jitter-ms 2]
"""

from __future__ import annotations

import argparse
import random
import statistics


def lag1_after_modulo(correlation: float, modulus: int, draws: int, seed: int = 1) -> float:
    rng = random.Random(seed)
    rho = int(correlation * 0xFFFFFFFF) + 1  # iproute2 scales a percentage to u32; netem adds 1
    last = rng.getrandbits(32)
    kept = []
    for _ in range(draws):
        last = (rng.getrandbits(32) * ((1 << 32) - rho) + last * rho) >> 32
        kept.append(last % modulus)
    return statistics.correlation(kept[:-1], kept[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=50000)
    ap.add_argument("--jitter-ms", type=float, default=2.0)
    args = ap.parse_args()
    uniform_modulus = 2 * int(args.jitter_ms * 1_000_000)
    print(f"{'correlation':>12}{'uniform jitter':>16}{'table index':>14}   (lag-1 correlation netem keeps)")
    for c in (0.25, 0.5, 0.9, 0.99):
        print(f"{c:>12.0%}{lag1_after_modulo(c, uniform_modulus, args.draws):>+16.3f}"
              f"{lag1_after_modulo(c, 4096, args.draws):>+14.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
