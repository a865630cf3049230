"""Relay versus direct on loopback, and qlab's relay versus a naive aioquic relay run in the same
run: echo RTT and datagram rate, printed as ratios beside the absolute numbers.

Processes: the Intermediate, the Connector and the UDP echo app run as separate `qlab` processes;
the Agent runs here. The same Agent session measures both paths: first through the relay, then
over a direct qlab connection to the Connector's shared socket. The baseline is
benchmarks/naive_relay.py (a relay and an echo peer, separate processes; one hop fewer than qlab's
chain, which also crosses the UDP echo app), driven by an aioquic client here.

One measure for every path: echo replies that came back over the path they were sent on (the
Agent's EchoProbe), with a window of requests in flight; a reply is two datagrams carried, so the
rate is 2 x replies per second. The Intermediate's own /metrics count is printed as a cross-check.

    .venv/bin/python benchmarks/relay.py [--seconds 3] [--window 256] [--rtt-samples 500]
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

import contextlib  # noqa: E402

from benchmarks import naive_relay  # noqa: E402
from qlab.certs import Credentials, init_dir  # noqa: E402
from qlab.net import RealNet  # noqa: E402
from qlab.roles.agent import Agent  # noqa: E402
from qlab.roles.echo import EchoProbe, percentile  # noqa: E402
from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port  # noqa: E402


def scrape(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(f"qlab_{name}"))


async def sequential_rtt(session, path: str, n: int, size: int) -> list[float]:
    loop = asyncio.get_running_loop()
    probe = EchoProbe(loop.time, size)
    unsubscribe = session.subscribe(lambda e: probe.receive(e.payload, e.path))
    for _ in range(n):
        probe.replied.clear()
        session.send(probe.make(path), path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(probe.replied.wait(), 1.0)
    unsubscribe()
    return [r * 1000 for r in probe.paths[path].rtts]


async def blast(session, path: str, seconds: float, size: int, window: int) -> dict:
    """Keep `window` echo requests in flight for `seconds`; count replies."""
    loop = asyncio.get_running_loop()
    probe = EchoProbe(loop.time, size)
    unsubscribe = session.subscribe(lambda e: probe.receive(e.payload, e.path))
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
    unsubscribe()
    return {"requests": st.sent, "replies": st.received, "seconds": seconds, "not_queued": not_queued}


async def measure(session, path: str, args: argparse.Namespace, out: dict, key: str,
                  metrics_port: int | None = None) -> None:
    """RTT and rates of one path, by the one measure (matched replies)."""
    await sequential_rtt(session, path, 50, 64)  # warm up
    rtts = await sequential_rtt(session, path, args.rtt_samples, 64)
    out["rtt"][key] = {"n": len(rtts), "p50_ms": percentile(rtts, 50), "p95_ms": percentile(rtts, 95)}
    for size in (1100, 100):
        r0 = scrape(metrics_port, "relayed_datagrams_total") if metrics_port else 0.0
        t0 = time.monotonic()
        res = await blast(session, path, args.seconds, size, args.window)
        dt = time.monotonic() - t0
        rate = 2 * res["replies"] / dt
        out["rate"][f"{key}_{size}"] = {**res, "datagrams_per_s": rate, "mbit_per_s": rate * size * 8 / 1e6}
        if metrics_port:
            out["rate"][f"{key}_{size}"]["relay_metrics_per_s"] = (scrape(metrics_port, "relayed_datagrams_total")
                                                                    - r0) / dt


async def naive(args: argparse.Namespace, certs: Path, out: dict) -> None:
    port = free_udp_port()
    script = str(Path(__file__).with_name("naive_relay.py"))
    procs = [Proc([sys.executable, script, "relay", "--listen", f"127.0.0.1:{port}", "--certs", str(certs)],
                  name="naive-relay")]
    try:
        procs[0].wait_for("naive relay ready")
        procs.append(Proc([sys.executable, script, "echo", "--relay", f"127.0.0.1:{port}"], name="naive-echo"))
        procs[1].wait_for("naive echo registered")
        async with naive_relay.client("127.0.0.1", port) as proto:
            await measure(proto, "relay", args, out, "naive")
    finally:
        for p in procs:
            p.terminate()


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
        await measure(session, "relay", args, out, "relay", mport)
        await measure(session, "direct", args, out, "direct")
        agent.close()
    finally:
        for p in procs:
            p.terminate()
    await naive(args, certs, out)
    return out


def report(out: dict) -> None:
    rr, rd, rn = out["rtt"]["relay"], out["rtt"]["direct"], out["rtt"]["naive"]
    print("\nqlab relay vs direct vs a naive aioquic relay on loopback (separate processes; "
          "rates: 2 x matched echo replies per second)")
    print(f"{'metric':<34}{'relay':>11}{'direct':>11}{'naive':>11}{'relay/direct':>14}{'relay/naive':>13}")
    for k in ("p50_ms", "p95_ms"):
        print(f"{'echo RTT ' + k + ' (64 B, sequential)':<34}{rr[k]:>11.3f}{rd[k]:>11.3f}{rn[k]:>11.3f}"
              f"{rr[k] / rd[k]:>14.2f}{rr[k] / rn[k]:>13.2f}")
    for size in (1100, 100):
        a, b, c = (out["rate"][f"{k}_{size}"] for k in ("relay", "direct", "naive"))
        print(f"{f'datagrams/s carried, {size} B':<34}{a['datagrams_per_s']:>11.0f}{b['datagrams_per_s']:>11.0f}"
              f"{c['datagrams_per_s']:>11.0f}{a['datagrams_per_s'] / b['datagrams_per_s']:>14.2f}"
              f"{a['datagrams_per_s'] / c['datagrams_per_s']:>13.2f}")
        print(f"{f'  Mbit/s, {size} B':<34}{a['mbit_per_s']:>11.1f}{b['mbit_per_s']:>11.1f}{c['mbit_per_s']:>11.1f}")
        print(f"{'  the relay own /metrics count':<34}{a['relay_metrics_per_s']:>11.0f}")


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
