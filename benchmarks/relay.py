"""Relay versus direct on loopback: echo RTT and datagram rate, printed as ratios beside the
absolute numbers.

Processes: the Intermediate, the Connector and the UDP echo app run as separate `qlab` processes;
the Agent runs here. The same Agent session measures both paths: first through the relay, then
over a direct qlab connection to the Connector's shared socket. Rates count datagrams the relay
forwarded (its own /metrics, both directions) and datagrams the direct path carried (both
directions), with a window of echo requests in flight.

    .venv/bin/python benchmarks/relay.py [--seconds 3] [--window 256]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib

from qlab.agent import Agent  # noqa: E402
from qlab.certs import Credentials, init_dir  # noqa: E402
from qlab.echo import EchoProbe, percentile  # noqa: E402
from qlab.net import RealNet  # noqa: E402
from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port  # noqa: E402


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"qlab_{name}"))


async def sequential_rtt(session, path: str, n: int, size: int) -> list[float]:
    loop = asyncio.get_running_loop()
    probe = EchoProbe(loop.time, size)
    session.on_payload = probe.receive
    for _ in range(n):
        probe.replied.clear()
        session.send(probe.make(path), path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.replied.wait(), 1.0)
    return [r * 1000 for r in probe.paths[path].rtts]


async def blast(session, path: str, seconds: float, size: int, window: int) -> dict:
    """Keep `window` echo requests in flight for `seconds`; count replies."""
    loop = asyncio.get_running_loop()
    probe = EchoProbe(loop.time, size)
    session.on_payload = probe.receive
    end = loop.time() + seconds
    not_queued = 0
    while loop.time() < end:
        now = loop.time()
        for seq, (t, _, _) in list(probe.outstanding.items()):  # replies lost in a full buffer
            if now - t > 0.5:
                del probe.outstanding[seq]
        budget = window - len(probe.outstanding)
        for _ in range(min(budget, 64)):
            payload = probe.make(path)
            if session.send(payload, path) is None:
                probe.unsend(payload)
                not_queued += 1
                break
        probe.replied.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.replied.wait(), 0.05)
    await asyncio.sleep(0.3)
    st = probe.paths[path]
    return {"requests": st.sent, "replies": st.received, "seconds": seconds, "not_queued": not_queued}


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="qlab-bench-"))
    certs = init_dir(tmp / "certs")
    port, mport, cmport, eport, cport = (free_udp_port(), free_tcp_port(), free_tcp_port(), free_udp_port(),
                                         free_udp_port())
    procs = [
        Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo"),
        Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs),
              "--metrics", f"127.0.0.1:{mport}"], name="intermediate"),
    ]
    try:
        procs[1].wait_for("metrics on")
        procs.append(Proc([*QLAB, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo",
                           "--forward", f"127.0.0.1:{eport}", "--p2p-port", str(cport), "--certs", str(certs),
                           "--metrics", f"127.0.0.1:{cmport}"], name="connector"))
        procs[2].wait_for("registered service echo")
        agent = Agent(RealNet(), Credentials.load(certs), ("127.0.0.1", port), host="127.0.0.1")
        await agent.start()
        session = await agent.open_session("echo")
        await agent.connect_direct(session, ("127.0.0.1", cport))
        out: dict = {"rtt": {}, "rate": {}}
        for path in ("relay", "direct"):
            await sequential_rtt(session, path, 50, 64)  # warm up
            rtts = await sequential_rtt(session, path, args.rtt_samples, 64)
            out["rtt"][path] = {"n": len(rtts), "p50_ms": percentile(rtts, 50), "p95_ms": percentile(rtts, 95)}
        for size in (1100, 100):
            for path in ("relay", "direct"):
                r0 = scrape(mport, "relayed_datagrams_total")
                t0 = time.monotonic()
                res = await blast(session, path, args.seconds, size, args.window)
                dt = time.monotonic() - t0
                relayed = scrape(mport, "relayed_datagrams_total") - r0
                carried = 2 * res["replies"]
                rate = (relayed if path == "relay" else carried) / dt
                out["rate"][f"{path}_{size}"] = {
                    **res, "datagrams_per_s": rate, "mbit_per_s": rate * size * 8 / 1e6,
                    "reply_rate": res["replies"] / dt,
                }
        agent.close()
        return out
    finally:
        for p in procs:
            p.terminate()


def report(out: dict) -> None:
    rr, rd = out["rtt"]["relay"], out["rtt"]["direct"]
    print("\nqlab relay vs direct on loopback (Intermediate, Connector, echo app: separate processes; 2 cores)")
    print(f"{'metric':<34}{'relay':>12}{'direct':>12}{'relay/direct':>14}")
    for k in ("p50_ms", "p95_ms"):
        print(f"{'echo RTT ' + k + ' (64 B, sequential)':<34}{rr[k]:>12.3f}{rd[k]:>12.3f}{rr[k] / rd[k]:>14.2f}")
    for size in (1100, 100):
        a, b = out["rate"][f"relay_{size}"], out["rate"][f"direct_{size}"]
        print(f"{f'datagrams/s forwarded, {size} B':<34}{a['datagrams_per_s']:>12.0f}{b['datagrams_per_s']:>12.0f}"
              f"{a['datagrams_per_s'] / b['datagrams_per_s']:>14.2f}")
        print(f"{f'  Mbit/s, {size} B':<34}{a['mbit_per_s']:>12.1f}{b['mbit_per_s']:>12.1f}")
    base = 5500
    r1100 = out["rate"]["relay_1100"]["datagrams_per_s"]
    print(f"\nrelay forwarding at 1,100 B: {r1100:.0f} datagrams/s = {r1100 / base:.2f}x the naive "
          f"single-process aioquic relay's best figure (5.5k/s, shared/reference/python-stack.md §2e)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rtt-samples", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        print(json.dumps(result, indent=1))
    report(result)
