"""One Intermediate under load: >= 500 concurrent Agents (several processes) connecting,
registering, opening sessions and relaying echo traffic through one Connector, on loopback.

Reports: lost registrations/sessions (must be zero), relay echo loss, the Intermediate's memory and
CPU per client, and relay RTT p50/p95 under load versus idle (the same echo probe).

    .venv/bin/python benchmarks/load.py [--agents 500] [--workers 4] [--pings 20] [--interval 250]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.certs import Credentials, init_dir  # noqa: E402
from qlab.net import RealNet  # noqa: E402
from qlab.roles.agent import Agent, ping  # noqa: E402
from qlab.roles.echo import EchoProbe, percentile  # noqa: E402
from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")


def proc_usage(pid: int) -> tuple[int, float]:
    """(RSS in kB, CPU seconds) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / CLK


def worker(args: tuple) -> dict:
    """K agents in one process: connect all, then open sessions and ping, concurrently."""
    logging.disable(logging.CRITICAL)
    certs, port, k, idx, pings, interval, start_at = args

    async def main() -> dict:
        creds = Credentials.load(certs)
        agents = [Agent(RealNet(), creds, ("127.0.0.1", port), name=f"w{idx}a{i}", host="127.0.0.1") for i in range(k)]
        res = await asyncio.gather(*(a.start(timeout=30) for a in agents), return_exceptions=True)
        connected = [a for a, r in zip(agents, res, strict=True) if not isinstance(r, BaseException)]
        # wait for the common start so every worker loads the relay at the same time
        await asyncio.sleep(max(0.0, start_at - time.time()))
        sessions = await asyncio.gather(*(a.open_session("echo", timeout=30) for a in connected), return_exceptions=True)
        opened = [s for s in sessions if not isinstance(s, BaseException)]
        probes = [EchoProbe(asyncio.get_running_loop().time) for _ in opened]
        results = await asyncio.gather(*(ping(s, pings, interval=interval, wait=3.0, probe=p)
                                         for s, p in zip(opened, probes, strict=True)))
        rtts = []
        sent = received = foreign = 0
        for r in results:
            p = r["paths"].get("relay", {})
            sent += p.get("n", 0)
            received += p.get("received", 0)
            foreign += r["foreign"]
        for p in probes:
            rtts += [x * 1000 for x in p.paths["relay"].rtts]
        for a in agents:
            a.close()
        await asyncio.sleep(0.2)
        errors = [repr(r)[:120] for r in res if isinstance(r, BaseException)] + \
                 [repr(s)[:120] for s in sessions if isinstance(s, BaseException)]
        return {"agents": k, "connected": len(connected), "sessions": len(opened), "sent": sent,
                "received": received, "foreign": foreign, "rtts": rtts, "errors": errors[:5]}

    return asyncio.run(main())


async def idle_rtt(certs: Path, port: int, n: int) -> list[float]:
    a = Agent(RealNet(), Credentials.load(certs), ("127.0.0.1", port), name="idle", host="127.0.0.1")
    await a.start()
    s = await a.open_session("echo")
    probe = EchoProbe(asyncio.get_running_loop().time)
    await ping(s, n, interval=0.05, probe=probe)
    rtts = [x * 1000 for x in probe.paths["relay"].rtts]
    a.close()
    await asyncio.sleep(0.1)
    return rtts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=500)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--pings", type=int, default=20)
    ap.add_argument("--interval", type=float, default=250.0, help="ms between one agent's echoes")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qlab-load-"))
    certs = init_dir(tmp / "certs")
    port, mport, eport, cport = free_udp_port(), free_tcp_port(), free_udp_port(), free_udp_port()
    procs = [Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo"),
             Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs),
                   "--metrics", f"127.0.0.1:{mport}"], name="intermediate")]
    try:
        procs[1].wait_for("metrics on")
        procs.append(Proc([*QLAB, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo",
                           "--forward", f"127.0.0.1:{eport}", "--p2p-port", str(cport), "--certs", str(certs)],
                          name="connector"))
        procs[2].wait_for("registered service echo")
        pid = procs[1].p.pid
        idle = asyncio.run(idle_rtt(certs, port, 100))
        rss0, cpu0 = proc_usage(pid)
        per = [args.agents // args.workers + (1 if i < args.agents % args.workers else 0) for i in range(args.workers)]
        start_at = time.time() + 8 + args.agents / 150  # time for every worker to connect its agents
        t0 = time.time()
        with ProcessPoolExecutor(args.workers) as pool:
            futs = [pool.submit(worker, (str(certs), port, k, i, args.pings, args.interval / 1000, start_at))
                    for i, k in enumerate(per)]
            peak_rss = rss0
            while not all(f.done() for f in futs):
                peak_rss = max(peak_rss, proc_usage(pid)[0])
                time.sleep(0.2)
            results = [f.result() for f in futs]
        wall = time.time() - t0
        rss1, cpu1 = proc_usage(pid)
        tot = {k: sum(r[k] for r in results) for k in ("agents", "connected", "sessions", "sent", "received", "foreign")}
        rtts = [x for r in results for x in r["rtts"]]
        out = {
            **tot,
            "lost_registrations": tot["agents"] - tot["connected"],
            "lost_sessions": tot["connected"] - tot["sessions"],
            "relay_echo_loss": round(1 - tot["received"] / tot["sent"], 4) if tot["sent"] else None,
            "idle_rtt_p50_ms": percentile(idle, 50), "idle_rtt_p95_ms": percentile(idle, 95),
            "load_rtt_p50_ms": percentile(rtts, 50), "load_rtt_p95_ms": percentile(rtts, 95),
            "intermediate_rss_idle_mb": rss0 / 1024, "intermediate_rss_peak_mb": peak_rss / 1024,
            "rss_per_client_kb": (peak_rss - rss0) / max(1, tot["connected"]),
            "intermediate_cpu_s": cpu1 - cpu0,
            "cpu_per_client_ms": 1000 * (cpu1 - cpu0) / max(1, tot["connected"]),
            "wall_s": wall, "errors": [e for r in results for e in r["errors"]][:5],
        }
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))
        print(f"\n{tot['agents']} agents in {args.workers} processes: {out['lost_registrations']} lost registrations, "
              f"{out['lost_sessions']} lost sessions, relay echo loss {100 * (out['relay_echo_loss'] or 0):.2f}%")
        print(f"relay RTT p50/p95: idle {out['idle_rtt_p50_ms']:.2f}/{out['idle_rtt_p95_ms']:.2f} ms, under load "
              f"{out['load_rtt_p50_ms']:.2f}/{out['load_rtt_p95_ms']:.2f} ms "
              f"(x{out['load_rtt_p50_ms'] / out['idle_rtt_p50_ms']:.1f} p50)")
        print(f"Intermediate: RSS {out['intermediate_rss_idle_mb']:.1f} -> {out['intermediate_rss_peak_mb']:.1f} MB "
              f"({out['rss_per_client_kb']:.1f} kB per client), CPU {out['intermediate_cpu_s']:.2f} s "
              f"({out['cpu_per_client_ms']:.1f} ms per client for connect, session and {args.pings} echoes)")
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
