"""The full 6 x 6 NAT matrix, N trials per cell, on a backend: the success table, the time-to-direct
and time-to-first-byte ratios, and (on sim) the speed target.

- sim (issue 5): 1,080 trials (30 per cell) in <= 60 s of wall time on a 2-core machine, trials
  spread over worker processes;
- netns (issue 4): every cell as expected; on endpoint-independent cells the median ttd
  <= 1.25 x (relay RTT + 2 x direct RTT) and the median ttfb <= 1.25 x relay RTT.

    .venv/bin/python benchmarks/matrix.py [--backend sim|netns] [--trials 30] [--workers N] [--out FILE.csv]
                                          [--punch-anyway] [--birthday N] [--mapping agent|connector]
                                          [--ask-mapping-ab] [--mode terminated|sealed|both]
                                          [--punch-delay S]

`--mode terminated|sealed|both` picks the sessions' architecture; `both` runs every trial in both
modes, interleaved (same seed), prints the matrix per mode and compares the endpoint-independent
cells: median ttfb, ttd and upgrade (from the punch's success to the first direct echo) per mode
and their differences in direct RTTs. `--punch-delay S`: both sides punch S seconds after the
session opened, so the upgrade is that of an established session.

`--mapping SIDE` gives that side's NATs a router that grants port mappings (`NAME+map`); `--birthday
N` turns birthday mode on; `--ask-mapping-ab` runs every trial twice, interleaved, with and without
asking the gateway for a mapping, and compares the endpoint-independent cells' median ttd (asking
must not make time to direct worse where no mapping is offered).

Cells marked `R-pol` were not punched: both sides are endpoint-dependent and policy keeps them on
the relay, so "as expected" there is decided, not measured; `--punch-anyway` measures them.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.certs import default_certs  # noqa: E402
from qlab.experiment.record import TrialSpec  # noqa: E402
from qlab.experiment.trial import run_trial  # noqa: E402
from qlab.nat.spec import PRESET_NAMES  # noqa: E402

TARGET_S = 60.0


EIM = {"public", "full_cone", "restricted_cone", "port_restricted"}


def one(job: tuple[str, str, str, str, int, str, bool, int, bool, str, float]) -> dict:
    logging.disable(logging.CRITICAL)
    backend, profile, a, c, seed, certs, anyway, birthday, ask, mode, delay = job
    r = run_trial(TrialSpec(backend=backend, agent_nat=a, connector_nat=c, profile=profile, seed=seed,
                            punch_anyway=anyway, birthday=birthday, port_mapping=ask, mode=mode,
                            punch_delay=delay), certs_dir=certs)
    return {**r.to_dict(), "asked_mapping": ask}


def mapped(nat: str) -> str:
    return f"{nat}+map" if nat != "public" else nat


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="sim", choices=("sim", "netns"))
    ap.add_argument("--profile", default="wan-20ms")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--workers", type=int, default=None, help="processes (sim: cpu count; netns: 1)")
    ap.add_argument("--out", default=None, help="write every trial record as CSV here")
    ap.add_argument("--punch-anyway", action="store_true", help="punch the cells policy would decide")
    ap.add_argument("--birthday", type=int, default=0, help="birthday mode: mappings the random-port side opens")
    ap.add_argument("--mapping", choices=("agent", "connector"), default=None,
                    help="that side's router grants port mappings (NAME+map)")
    ap.add_argument("--ask-mapping-ab", action="store_true",
                    help="each trial with and without asking for a mapping, interleaved; compares ttd")
    ap.add_argument("--eim-only", action="store_true", help="only the 4 x 4 endpoint-independent cells")
    ap.add_argument("--mode", choices=("terminated", "sealed", "both"), default="terminated",
                    help="the sessions' architecture; both: every trial in both, interleaved, compared")
    ap.add_argument("--punch-delay", type=float, default=0.0, help="seconds on the relay before punching")
    ap.add_argument("--markdown", action="store_true",
                    help="also print the direct rate per cell with its 95%% Wilson interval as a Markdown table")
    args = ap.parse_args()
    workers = args.workers or (os.cpu_count() or 1 if args.backend == "sim" else 1)
    certs = default_certs()
    cells = [(mapped(a) if args.mapping == "agent" else a, mapped(c) if args.mapping == "connector" else c)
             for a in PRESET_NAMES for c in PRESET_NAMES]
    if args.eim_only:
        cells = [(a, c) for a, c in cells if a.partition("+")[0] in EIM and c.partition("+")[0] in EIM]
    asks = (True, False) if args.ask_mapping_ab else (True,)
    modes = ("terminated", "sealed") if args.mode == "both" else (args.mode,)
    jobs = [(args.backend, args.profile, a, c, 1000 * i + k, certs, args.punch_anyway, args.birthday, ask, mode,
             args.punch_delay)
            for k in range(args.trials) for i, (a, c) in enumerate(cells) for ask in asks for mode in modes]
    t0 = time.perf_counter()
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(one, jobs, chunksize=4))
    else:
        results = [one(j) for j in jobs]
    wall = time.perf_counter() - t0
    if args.ask_mapping_ab:
        compare_asking(results)
        results = [r for r in results if r["asked_mapping"]]
    if args.mode == "both":
        for mode in modes:
            print(f"\n== mode {mode}")
            report(args, cells, [r for r in results if r["mode"] == mode], workers, wall)
        compare_modes(results, args.punch_delay)
        return
    report(args, cells, results, workers, wall)


def report(args: argparse.Namespace, cells: list[tuple[str, str]], results: list[dict], workers: int,
           wall: float) -> None:
    by_cell: dict[tuple[str, str], list[dict]] = {cell: [] for cell in cells}
    for r in results:
        by_cell[(r["agent_nat"], r["connector_nat"])].append(r)
    print(f"backend {args.backend}, profile {args.profile}, {args.trials} trials per cell, {workers} worker(s)"
          + (", punch anyway" if args.punch_anyway else ""))
    if args.markdown:
        markdown(cells, by_cell)
    if len(cells) != 36:
        summary(args, results, wall)
        return
    print("cells: as-expected/N and the most frequent outcome")
    print(f"{'agent/connector':<22}" + "".join(f"{c:>21}" for _a, c in cells[:6]))
    short = {"direct_wan": "wan", "direct_lan": "lan", "direct_predicted": "pred", "direct_mapped": "map"}
    for i in range(len(PRESET_NAMES)):
        row = []
        for j in range(len(PRESET_NAMES)):
            rs = by_cell[cells[6 * i + j]]
            top = Counter(r["outcome"] for r in rs).most_common(1)[0][0]
            label = "R-pol" if all(r["punch"] == "skipped" for r in rs) else short.get(top, top)
            row.append(f"{sum(r['as_expected'] for r in rs):>3}/{len(rs)} {label:>5}")
        print(f"{cells[6 * i][0]:<22}" + "".join(f"{x:>21}" for x in row))
    summary(args, results, wall)


def markdown(cells: list[tuple[str, str]], by_cell: dict[tuple[str, str], list[dict]]) -> None:
    """Direct k/N per cell with its 95% Wilson interval (rows: Agent NAT, columns: Connector NAT)."""
    from qlab.study.analysis import wilson

    agents = list(dict.fromkeys(a for a, _ in cells))
    conns = list(dict.fromkeys(c for _, c in cells))
    print("| Agent \\ Connector | " + " | ".join(conns) + " |")
    print("|---" * (len(conns) + 1) + "|")
    for a in agents:
        row = []
        for c in conns:
            rs = by_cell.get((a, c), [])
            k = sum(r["outcome"].startswith("direct") for r in rs)
            lo, hi = wilson(k, len(rs)) if rs else (float("nan"), float("nan"))
            row.append(f"{k}/{len(rs)} ({100 * lo:.0f}–{100 * hi:.0f} %)" if rs else "–")
        print(f"| {a} | " + " | ".join(row) + " |")


def summary(args: argparse.Namespace, results: list[dict], wall: float) -> None:
    n = len(results)
    good = sum(r["as_expected"] for r in results)
    connected = sum(r["outcome"] != "failed" for r in results)
    direct = [r for r in results if r["outcome"].startswith("direct")]
    # checks that could fail: a direct outcome needs replies that came back over the direct path
    no_reply = sum(not (r["rtt_direct_received"] and r["direct_bytes_in"] and r["verify_received"]) for r in direct)
    crossed = sum(r["echo_direct_answered_on_relay"] + r["echo_relay_answered_on_direct"] for r in results)
    skipped = sum(r["punch"] == "skipped" for r in results)
    failed_punch = sum(r["punch"] == "attempted" and r["outcome"] == "relay" for r in results)
    print(f"\n{n} trials: {good} as expected ({100 * good / n:.1f}%), {connected} connected "
          f"({100 * connected / n:.1f}%); {len(direct)} direct, {no_reply} of them without replies over the direct "
          f"path; {crossed} replies came back over the other path than sent")
    print(f"relay outcomes: {failed_punch} punched and failed, {skipped} not punched (policy decided, not measured)")
    mechanisms = Counter(r["mechanism"] for r in direct)
    print("direct trials by mechanism: " + ", ".join(f"{k} {v}" for k, v in mechanisms.most_common()))
    easy = [r for r in results if r["agent_nat"] in EIM and r["connector_nat"] in EIM and r["ttd_ms"] is not None]
    if easy:
        ttd = median([r["ttd_ms"] for r in easy])
        bound = median([r["rtt_relay_p50_ms"] + 2 * r["rtt_direct_p50_ms"] for r in easy])
        ttfb = median([r["ttfb_ms"] for r in easy if r["ttfb_ms"] is not None])
        relay = median([r["rtt_relay_p50_ms"] for r in easy])
        print(f"endpoint-independent cells (N={len(easy)}): median ttd {ttd:.1f} ms vs relay+2*direct RTT "
              f"{bound:.1f} ms -> ratio {ttd / bound:.2f} (target <= 1.25)")
        print(f"  median ttfb {ttfb:.1f} ms vs relay RTT {relay:.1f} ms -> ratio {ttfb / relay:.2f} (target <= 1.25)")
    print(f"wall {wall:.1f} s = {n / wall:.1f} trials/s", end="")
    if args.backend == "sim":
        print(f"; 1,080-trial target {TARGET_S:.0f} s -> {(wall * 1080 / n) / TARGET_S:.2f} x the target time "
              "(<= 1.00 meets it)")
    else:
        print()
    if args.out:
        import csv

        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(results[0]))
            w.writeheader()
            w.writerows(results)
        print(f"records: {args.out}")


def compare_modes(results: list[dict], delay: float) -> None:
    """The endpoint-independent cells' medians per mode, same run, and sealed minus terminated in ms
    and in direct RTTs (the issue's target: ttd lower by at least one direct RTT)."""
    easy = [r for r in results if r["agent_nat"] in EIM and r["connector_nat"] in EIM and r["ttd_ms"] is not None]
    if not easy:
        return
    rtt = median([r["rtt_direct_p50_ms"] for r in easy]) or 1.0
    print(f"\nendpoint-independent cells, punch delay {delay:g} s, direct RTT p50 {rtt:.2f} ms:")
    print(f"{'':<18}{'terminated':>12}{'sealed':>12}{'sealed-term':>13}{'in RTTs':>9}")
    for field in ("ttfb_ms", "ttd_ms", "upgrade_ms", "rtt_direct_p50_ms", "rtt_relay_p50_ms"):
        t = median([r[field] for r in easy if r["mode"] == "terminated" and r[field] is not None])
        s = median([r[field] for r in easy if r["mode"] == "sealed" and r[field] is not None])
        if t is None or s is None:
            continue
        print(f"{field:<18}{t:>12.1f}{s:>12.1f}{s - t:>+13.1f}{(s - t) / rtt:>+9.2f}")
    n = Counter(r["mode"] for r in easy)
    print(f"N per mode: {dict(n)}; target (sealed ttd <= terminated ttd - 1 direct RTT): see the ttd row")


def compare_asking(results: list[dict]) -> None:
    """Median ttd of the endpoint-independent cells with and without asking for a mapping, same run."""
    meds = {}
    for ask in (True, False):
        ttd = [r["ttd_ms"] for r in results if r["asked_mapping"] is ask and r["agent_nat"] in EIM
               and r["connector_nat"] in EIM and r["ttd_ms"] is not None]
        meds[ask] = (median(ttd), len(ttd))
    (on, n_on), (off, n_off) = meds[True], meds[False]
    if on is not None and off is not None:
        print(f"endpoint-independent cells, median ttd: asking for a mapping {on:.1f} ms (N={n_on}), not asking "
              f"{off:.1f} ms (N={n_off}) -> ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
