"""Campaign throughput per executor (docs/scale.md): trials/s of one campaign run through the local
process pool and through a Dask scheduler with 1 and 2 worker processes on 127.0.0.1, and of
kernel-lab campaigns at 1 and 2 parallel labs, side by side in one run, with ratios.

Every run is a real `campaign.run` into its own results folder (the driver writes the store), so the
figure includes what a user pays: the records' transfer, the ordered durable writes, the tables. The
sim runs must give the same records (wall-clock fields aside) on every executor; the netns runs every
cell as expected.

    .venv/bin/python benchmarks/scale.py [--sim-trials 5] [--netns-trials 2] [--rounds 1] [--no-netns]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.nat.spec import PRESET_NAMES  # noqa: E402
from qlab.study import campaign  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
NETNS_NATS = ["full_cone", "port_restricted", "symmetric"]
WALL_CLOCK = ("campaign_id", "started_at")  # all a sim record takes from the machine


class Cluster:
    """A `dask scheduler` and N single-threaded `dask worker` processes on loopback."""

    def __init__(self, workers: int, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        info = folder / f"scheduler-{workers}.json"
        log = open(folder / f"dask-{workers}.log", "w")  # noqa: SIM115  (closed with the processes)
        self.log = log
        self.procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                        "--scheduler-file", str(info)], stdout=log, stderr=log, env=env,
                                       start_new_session=True)]
        deadline = time.monotonic() + 30
        while not (info.is_file() and info.read_text().strip()):
            if time.monotonic() > deadline:
                raise RuntimeError("the scheduler did not start")
            time.sleep(0.1)
        self.address = json.loads(info.read_text())["address"]
        self.procs += [subprocess.Popen([str(DASK), "worker", self.address, "--nthreads", "1", "--no-nanny",
                                         "--no-dashboard", "--host", "127.0.0.1"], stdout=log, stderr=log, env=env,
                                        start_new_session=True) for _ in range(workers)]
        from distributed import Client

        with Client(self.address, timeout=30) as c:
            c.wait_for_workers(workers, timeout=60)

    def close(self) -> None:
        """Workers first: a worker whose scheduler is gone waits for it instead of exiting."""
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.log.close()


def timed(spec: campaign.CampaignSpec, root: Path, **how) -> tuple[float, list[dict]]:
    t = time.perf_counter()
    folder = campaign.run(spec, root=root, progress=False, **how)
    wall = time.perf_counter() - t
    return wall, [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


def canonical(recs: list[dict]) -> str:
    return json.dumps([{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in recs], sort_keys=True)


def sim_rows(trials: int, rounds: int, root: Path) -> list[tuple[str, int, float]]:
    rows = []
    reference = None
    for rnd in range(rounds):
        for label, how_many, how in (("local pool", 1, {"workers": 1}), ("local pool", 2, {"workers": 2}),
                                     ("dask", 1, None), ("dask", 2, None)):
            spec = campaign.CampaignSpec(agent_nats=list(PRESET_NAMES), connector_nats=list(PRESET_NAMES),
                                         trials=trials, samples=20, seed=1,
                                         campaign_id=f"sim-{label.replace(' ', '')}-{how_many}-{rnd}")
            if how is None:
                cluster = Cluster(how_many, root)
                try:
                    wall, recs = timed(spec, root, cluster=cluster.address)
                finally:
                    cluster.close()
            else:
                wall, recs = timed(spec, root, **how)
            same = canonical(recs)
            reference = reference or same
            if same != reference:
                raise SystemExit(f"{label} x {how_many}: the records differ from the first run's")
            rows.append((label, how_many, len(recs) / wall))
            print(f"  sim {label:10} {how_many} worker(s): {len(recs)} trials in {wall:6.1f} s = "
                  f"{len(recs) / wall:5.2f} trials/s", flush=True)
    return rows


def netns_rows(trials: int, rounds: int, root: Path) -> list[tuple[str, int, float]]:
    rows = []
    for rnd in range(rounds):
        for workers in (1, 2):
            spec = campaign.CampaignSpec(backend="netns", agent_nats=NETNS_NATS, connector_nats=NETNS_NATS,
                                         trials=trials, samples=20, seed=1, campaign_id=f"netns-{workers}-{rnd}")
            wall, recs = timed(spec, root, workers=workers)
            ok = sum(bool(r["as_expected"]) for r in recs)
            if ok != len(recs):
                raise SystemExit(f"netns x {workers}: {ok} of {len(recs)} as expected")
            rows.append(("netns labs", workers, len(recs) / wall))
            print(f"  netns      {workers} lab(s) at once: {len(recs)} trials in {wall:6.1f} s = "
                  f"{len(recs) / wall:5.2f} trials/s, {ok}/{len(recs)} as expected", flush=True)
    return rows


def summary(rows: list[tuple[str, int, float]]) -> None:
    print("\nexecutor     workers  trials/s (median)  vs 1 worker")
    for label in dict.fromkeys(r[0] for r in rows):
        one = sorted(r[2] for r in rows if r[0] == label and r[1] == 1)
        for n in (1, 2):
            xs = sorted(r[2] for r in rows if r[0] == label and r[1] == n)
            print(f"{label:12} {n:7}  {xs[len(xs) // 2]:17.2f}  {xs[len(xs) // 2] / one[len(one) // 2]:10.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim-trials", type=int, default=5, help="trials per cell of the 6 x 6 sim campaign")
    ap.add_argument("--netns-trials", type=int, default=2, help="trials per cell of the 3 x 3 kernel-lab campaign")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-netns", action="store_true", help="skip the kernel lab (it needs root)")
    args = ap.parse_args()
    print(f"{os.cpu_count()} cores; sim: 36 cells x {args.sim_trials}; netns: 9 cells x {args.netns_trials}")
    with tempfile.TemporaryDirectory(prefix="qlab-scale-") as tmp:
        rows = sim_rows(args.sim_trials, args.rounds, Path(tmp))
        if not args.no_netns:
            rows += netns_rows(args.netns_trials, args.rounds, Path(tmp))
    summary(rows)
    print("sim records identical on every executor: yes")


if __name__ == "__main__":
    main()
