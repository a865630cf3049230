"""The simulator's speed, old code against new, side by side in one run (issue 18: a faster
simulator, same answers).

Each side is a checkout of qlab run as a subprocess with its own PYTHONPATH: the matrix's trials (6 x 6
presets, `--trials` per cell, the seeds of benchmarks/matrix.py) one after the other in one process
(workers=1: the figure is per core). Rounds alternate the order (old, new, new, old, ...) so that a
machine that speeds up or slows down during the run favours neither. Printed: trials, wall and CPU
seconds and trials/s per side, the ratio new/old, and whether both sides gave the same answers: a
hash of the outcome table (agent_nat, connector_nat, outcome counts per cell) and a hash of every
record (canonical JSON, without the fields that measure real time: `WALL_FIELDS`), which must be
equal across every round of both sides.

`--share N` also measures, after each side's timed rounds, how much of a trial's CPU is aioquic's own
work: N trials per cell again, with process-time clocks around every call into `QuicConnection`'s
API (less the clocks' own cost, measured on an empty method). That work is the same on both sides
(the same packets, built and read by the same aioquic), so it bounds what any change outside aioquic
can reach: if everything else cost nothing, old CPU / aioquic CPU.

    .venv/bin/python benchmarks/sim_speed.py --base OLD [--trials 30] [--rounds 2] [--share 1]
                                             [--profile wan-20ms] [--mode terminated|sealed]

`--base PATH`: the old checkout (e.g. `git worktree add PATH 1f762d8`); `--new PATH`: the new one
(default: this file's checkout). `--profile` and `--mode` run the matrix on another link profile or
in sealed mode (more paths for the identity check). `--child ROOT` is the subprocess's own mode.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]
# what differs between two runs of one seed on the same code: when it ran and its random id
# (`duration_s` is virtual time on the simulator, so it stays)
WALL_FIELDS = ("started_at", "trial_id")


def canonical(records: list[dict]) -> str:
    """Every record without its wall-clock fields, as one JSON text (key order fixed)."""
    kept = [{k: v for k, v in r.items() if k not in WALL_FIELDS} for r in records]
    return json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)


def outcome_table(records: list[dict]) -> str:
    """Outcome counts per (agent_nat, connector_nat) cell, as one JSON text."""
    cells: dict[str, Counter[str]] = {}
    for r in records:
        cells.setdefault(f"{r['agent_nat']}/{r['connector_nat']}", Counter())[r["outcome"]] += 1
    return json.dumps({cell: dict(sorted(c.items())) for cell, c in sorted(cells.items())}, separators=(",", ":"))


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# every QuicConnection method qlab calls
AIOQUIC_API = ("receive_datagram", "datagrams_to_send", "connect", "handle_timer", "get_timer", "send_datagram_frame",
               "send_stream_data", "next_event", "close", "change_connection_id", "get_next_available_stream_id",
               "get_peer_address")


@dataclass
class Clock:
    """Process time spent inside the methods it wraps; a wrapped call made from inside another one
    of them is already on the clock."""

    seconds: float = 0.0
    calls: int = 0

    def wrap(self, f: Callable[..., Any]) -> Callable[..., Any]:
        inside = False

        def call(obj: object, *args: Any, **kwargs: Any) -> Any:
            nonlocal inside
            if inside:
                return f(obj, *args, **kwargs)
            inside, t = True, time.process_time()
            try:
                return f(obj, *args, **kwargs)
            finally:
                self.seconds += time.process_time() - t
                self.calls += 1
                inside = False
        return call

    def ms(self, bias: float) -> float:
        """Milliseconds inside, less the clock's own cost per call."""
        return 1000 * (self.seconds - self.calls * bias)


def clock_aioquic() -> tuple[Clock, Clock, float]:
    """Clocks on QuicConnection's API and, inside it, on the TLS state machine (handshakes: key
    shares, signatures, certificate checks); and a clock's own cost per call, measured on an empty
    method wrapped the same way."""
    from aioquic import tls
    from aioquic.quic.connection import QuicConnection

    probe, n = Clock(), 200_000
    empty = probe.wrap(lambda obj: None)
    for _ in range(n):
        empty(None)
    api, handshakes = Clock(), Clock()
    for name in AIOQUIC_API:
        setattr(QuicConnection, name, api.wrap(getattr(QuicConnection, name)))
    setattr(tls.Context, "handle_message", handshakes.wrap(tls.Context.handle_message))  # noqa: B010 (mypy: a method)
    return api, handshakes, probe.seconds / n


def child(root: str, trials: int, profile: str, mode: str, share: int) -> None:
    """Run the matrix's trials here, on the qlab under `root`; print one JSON line."""
    sys.path.insert(0, root)
    import qlab
    from qlab.certs import default_certs
    from qlab.experiment.record import TrialSpec
    from qlab.experiment.trial import run_trial
    from qlab.nat.spec import PRESET_NAMES

    if not Path(qlab.__file__).resolve().is_relative_to(Path(root).resolve()):
        raise SystemExit(f"qlab was imported from {qlab.__file__}, not from {root}")
    logging.disable(logging.CRITICAL)  # as benchmarks/matrix.py's workers
    certs = default_certs()
    cells = [(a, c) for a in PRESET_NAMES for c in PRESET_NAMES]
    specs = [TrialSpec(backend="sim", agent_nat=a, connector_nat=c, profile=profile, mode=mode, seed=1000 * i + k)
             for k in range(trials) for i, (a, c) in enumerate(cells)]
    wall, cpu = time.perf_counter(), time.process_time()
    records = [run_trial(s, certs_dir=certs).to_dict() for s in specs]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    out = {"trials": len(records), "wall": wall, "cpu": cpu, "table": digest(outcome_table(records)),
           "records": digest(canonical(records))}
    if share:
        api, handshakes, bias = clock_aioquic()
        again = [s for s in specs if s.seed % 1000 < share]
        for s in again:
            run_trial(s, certs_dir=certs)
        out["aioquic_ms"], out["tls_ms"] = api.ms(bias) / len(again), handshakes.ms(bias) / len(again)
    print(json.dumps(out))


def run_side(root: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, __file__, "--child", str(root), "--trials", str(args.trials),
                          "--profile", args.profile, "--mode", args.mode, "--share", str(args.share)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=30, help="trials per cell (36 cells)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per side, alternating the order")
    ap.add_argument("--base", default=None, help="the old checkout")
    ap.add_argument("--new", default=str(HERE), help="the new checkout (default: this one)")
    ap.add_argument("--profile", default="wan-20ms", help="the link profile (the matrix's: wan-20ms)")
    ap.add_argument("--mode", default="terminated", choices=("terminated", "sealed"))
    ap.add_argument("--share", type=int, default=0, help="also measure aioquic's CPU per trial on N trials per cell")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.trials, args.profile, args.mode, args.share)
        return
    if not args.base:
        ap.error("--base PATH (the old checkout) is required")
    sides = {"old": Path(args.base).resolve(), "new": Path(args.new).resolve()}
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            res = run_side(sides[side], args)
            runs[side].append(res)
            print(f"round {r + 1} {side}: {res['trials']} trials, wall {res['wall']:.1f} s, cpu {res['cpu']:.1f} s, "
                  f"table {res['table']}, records {res['records']}", flush=True)
    report(runs, sides, args)


def report(runs: dict[str, list[dict]], sides: dict[str, Path], args: argparse.Namespace) -> None:
    print(f"\nold: {sides['old']}\nnew: {sides['new']}")
    print(f"36 cells x {args.trials} trials, profile {args.profile}, mode {args.mode}, one process per side and round")
    print(f"{'':<5}{'trials':>8}{'wall s':>9}{'trials/s':>10}{'cpu s':>9}{'cpu ms/trial':>14}")
    rate = {}
    for side, rs in runs.items():
        n, wall, cpu = sum(r["trials"] for r in rs), sum(r["wall"] for r in rs), sum(r["cpu"] for r in rs)
        rate[side] = (n / wall, n / cpu)
        print(f"{side:<5}{n:>8}{wall:>9.1f}{n / wall:>10.2f}{cpu:>9.1f}{1000 * cpu / n:>14.1f}")
    print(f"new/old trials/s: {rate['new'][0] / rate['old'][0]:.2f} x (wall), "
          f"{rate['new'][1] / rate['old'][1]:.2f} x (cpu)")
    if args.share:
        report_share(runs)
    all_runs = runs["old"] + runs["new"]
    same_table = len({r["table"] for r in all_runs}) == 1
    same_records = len({r["records"] for r in all_runs}) == 1
    print(f"outcome tables byte-identical: {'yes' if same_table else 'NO'}; records without "
          f"{', '.join(WALL_FIELDS)} byte-identical: {'yes' if same_records else 'NO'}")
    if not (same_table and same_records):
        raise SystemExit(1)


def report_share(runs: dict[str, list[dict]]) -> None:
    """aioquic's CPU per trial on each side, and the most any change outside aioquic could give."""
    inside = {side: sum(r["aioquic_ms"] for r in rs) / len(rs) for side, rs in runs.items()}
    per_trial = {side: 1000 * sum(r["cpu"] for r in rs) / sum(r["trials"] for r in rs) for side, rs in runs.items()}
    handshakes = {side: sum(r["tls_ms"] for r in rs) / len(rs) for side, rs in runs.items()}
    for side in runs:
        print(f"{side}: aioquic's own CPU {inside[side]:.1f} ms of {per_trial[side]:.1f} ms per trial "
              f"({inside[side] / per_trial[side]:.0%}), of which its TLS handshakes {handshakes[side]:.1f} ms")
    print(f"bound, everything but aioquic at zero cost: old cpu / aioquic cpu = "
          f"{per_trial['old'] / inside['new']:.2f} x; 2x needs <= {per_trial['old'] / 2:.1f} ms per trial")


if __name__ == "__main__":
    main()
