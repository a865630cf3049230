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

Session modes side by side (issue 19), against the same Intermediate, Connector and echo processes
and the same Agent, one session per mode: TERMINATED (the payloads ride DATAGRAM frames of the Agent's
connection to the Intermediate, which opens each one and seals it again towards the Connector) and
SEALED (one end-to-end QUIC connection Agent -> Connector whose packets the Intermediate forwards as
opaque relay frames). Per mode and payload size, the same relay blast: application datagrams carried
per second (2 x replies/s), the Intermediate's relayed frames per second (its /metrics
`qlab_relayed_datagrams_total`, both directions), application datagrams per relayed frame, and the
Intermediate process's CPU time (utime + stime from /proc/PID/stat) per relayed frame and per
application datagram; the CPU each process used during the blast (share of one core) and the CPU of
all four processes (Intermediate, Connector, echo app, the Agent here) per application datagram say
where the bottleneck is. Also the echo RTT over the relay (sequential), and the relayed frames per
echo it took. `--rounds N` repeats the pair with
the order alternating (T S, S T, T S, ...) so that drift favours neither; the table shows medians
over the rounds and the ratio sealed/terminated beside them.

    .venv/bin/python benchmarks/relay.py [--seconds 3] [--window 256] [--rtt-samples 500]
                                         [--rounds 3] [--sizes 1100,100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib  # noqa: E402

from benchmarks import naive_relay  # noqa: E402
from qlab import wire  # noqa: E402
from qlab.certs import Credentials, init_dir  # noqa: E402
from qlab.net import RealNet  # noqa: E402
from qlab.roles.agent import Agent  # noqa: E402
from qlab.roles.echo import EchoProbe, percentile  # noqa: E402
from qlab.wire import Path as QPath  # noqa: E402
from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port  # noqa: E402

# the variants measured: terminated; sealed with raw relay frames (the default); sealed with its
# packets inside the control connections (DATAGRAM frames whose outer layer the relay decrypts)
MODES = ("terminated", "sealed", "sealed-framed")


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
    for size in args.sizes:
        r0 = scrape(metrics_port, "relayed_datagrams_total") if metrics_port else 0.0
        t0 = time.monotonic()
        res = await blast(session, path, args.seconds, size, args.window)
        dt = time.monotonic() - t0
        rate = 2 * res["replies"] / dt
        out["rate"][f"{key}_{size}"] = {**res, "datagrams_per_s": rate, "mbit_per_s": rate * size * 8 / 1e6}
        if metrics_port:
            out["rate"][f"{key}_{size}"]["relay_metrics_per_s"] = (scrape(metrics_port, "relayed_datagrams_total")
                                                                    - r0) / dt


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` so far, in seconds (Linux /proc/PID/stat, fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def mode_round(session, args: argparse.Namespace, metrics_port: int, pids: dict[str, int]) -> dict:
    """One mode's measures over the relay: sequential RTT, then a blast per payload size with the
    Intermediate's relayed frames and every process's CPU time read before and after."""
    path = QPath.RELAY
    await sequential_rtt(session, path, 50, 64)  # warm up
    r0 = scrape(metrics_port, "relayed_datagrams_total")
    rtts = await sequential_rtt(session, path, args.rtt_samples, 64)
    frames_per_echo = (scrape(metrics_port, "relayed_datagrams_total") - r0) / args.rtt_samples
    out: dict = {"rtt": {"n": len(rtts), "p50_ms": percentile(rtts, 50), "p95_ms": percentile(rtts, 95),
                         "frames_per_echo": frames_per_echo}}
    limit = session.limit(path) or 0
    for size in args.sizes:
        if size > limit:
            out[size] = {"skipped": f"{size} B exceeds this session's relay limit of {limit} B"}
            continue
        r0 = scrape(metrics_port, "relayed_datagrams_total")
        c0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        t0 = time.monotonic()
        res = await blast(session, path, args.seconds, size, args.window)
        dt = time.monotonic() - t0
        cpu = {k: cpu_seconds(pid) - c0[k] for k, pid in pids.items()}
        frames = scrape(metrics_port, "relayed_datagrams_total") - r0
        carried = 2 * res["replies"]
        out[size] = {
            **res, "wall_s": dt, "frames": frames, "cpu_s": cpu,
            "datagrams_per_s": carried / dt,
            "frames_per_s": frames / dt,
            "datagrams_per_frame": carried / frames if frames else None,
            "inter_cpu_us_per_frame": 1e6 * cpu["intermediate"] / frames if frames else None,
            "inter_cpu_us_per_datagram": 1e6 * cpu["intermediate"] / carried if carried else None,
            "all_cpu_us_per_datagram": 1e6 * sum(cpu.values()) / carried if carried else None,
            "cpu_share": {k: v / dt for k, v in cpu.items()},
        }
    return out


async def modes(sessions: dict, args: argparse.Namespace, metrics_port: int, pids: dict[str, int]) -> dict:
    """`args.rounds` rounds of every variant, the order alternating (T S F, F S T, ...)."""
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        rounds.append({"order": list(order)})
        for mode in order:
            rounds[-1][mode] = await mode_round(sessions[mode], args, metrics_port, pids)
    return {"rounds": rounds, "median": {m: _medians([x[m] for x in rounds]) for m in MODES}}


def _medians(runs: list) -> object:
    """The median of each number over the rounds, keeping the structure of one round."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: _medians([r[k] for r in runs if isinstance(r, dict) and k in r]) for k in first}
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    values = [r for r in runs if isinstance(r, int | float)]
    return statistics.median(values) if values else None


@contextlib.contextmanager
def cpu_cap(pid: int, fraction: float):
    """Hold process `pid` to `fraction` of one core (a cgroup's CFS quota, v1 or v2), so that the
    relay is what limits the rate; yields whether the cap is in place. Removed on exit."""
    if fraction <= 0:
        yield False
        return
    period = 100_000
    v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
    if (v1 / "cpu.cfs_quota_us").exists():
        group, limit = v1 / f"qlab-relay-{pid}", {"cpu.cfs_period_us": str(period),
                                                  "cpu.cfs_quota_us": str(int(fraction * period))}
    elif "cpu" in (v2 / "cgroup.controllers").read_text(errors="replace") if (v2 / "cgroup.controllers").exists() else False:
        group, limit = v2 / f"qlab-relay-{pid}", {"cpu.max": f"{int(fraction * period)} {period}"}
    else:
        yield False
        return
    try:
        group.mkdir()
        for name, value in limit.items():
            (group / name).write_text(value)
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        print(f"note: the relay's CPU was not capped ({exc})", file=sys.stderr)
        with contextlib.suppress(OSError):
            group.rmdir()
        yield False
        return
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):
            (group.parent / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()


async def close_sealed(session) -> None:
    """Close the sealed connection while the link still carries its CONNECTION_CLOSE (Agent.close()
    closes the link first, and a Connector stopped with a sealed connection open logs a traceback)."""
    conn = session.sealed
    if conn is None:
        return
    conn.close(reason="benchmark done")
    end = time.monotonic() + 3.0
    while not conn.closed and time.monotonic() < end:
        await asyncio.sleep(0.01)


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
        out: dict = {"rtt": {}, "rate": {}, "sizes": args.sizes}
        await measure(session, "relay", args, out, "relay", mport)
        await measure(session, "direct", args, out, "direct")
        sealed = agent.begin_session("echo", mode=wire.SessionMode.SEALED)
        await agent.connect_sealed(sealed, timeout=5.0)
        framed = agent.begin_session("echo", mode=wire.SessionMode.SEALED)
        framed.sealed_raw = False
        await agent.connect_sealed(framed, timeout=5.0)
        pids = {"intermediate": procs[1].p.pid, "connector": procs[2].p.pid, "agent": os.getpid(),
                "echo": procs[0].p.pid}
        with cpu_cap(procs[1].p.pid, args.relay_cpu) as capped:
            out["modes"] = await modes({"terminated": session, "sealed": sealed, "sealed-framed": framed},
                                       args, mport, pids)
        out["modes"]["relay_cpu"] = args.relay_cpu if capped else None
        out["modes"]["limits"] = {"terminated": session.limit(QPath.RELAY), "sealed": sealed.limit(QPath.RELAY)}
        for s in (sealed, framed):
            await close_sealed(s)
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
    for size in out["sizes"]:
        a, b, c = (out["rate"][f"{k}_{size}"] for k in ("relay", "direct", "naive"))
        print(f"{f'datagrams/s carried, {size} B':<34}{a['datagrams_per_s']:>11.0f}{b['datagrams_per_s']:>11.0f}"
              f"{c['datagrams_per_s']:>11.0f}{a['datagrams_per_s'] / b['datagrams_per_s']:>14.2f}"
              f"{a['datagrams_per_s'] / c['datagrams_per_s']:>13.2f}")
        print(f"{f'  Mbit/s, {size} B':<34}{a['mbit_per_s']:>11.1f}{b['mbit_per_s']:>11.1f}{c['mbit_per_s']:>11.1f}")
        print(f"{'  the relay own /metrics count':<34}{a['relay_metrics_per_s']:>11.0f}")
    report_modes(out)


def _fmt(x: object, digits: int) -> str:
    return "-" if not isinstance(x, int | float) else f"{x:,.{digits}f}"


def report_modes(out: dict) -> None:
    m = out["modes"]
    t, s, f = m["median"]["terminated"], m["median"]["sealed"], m["median"]["sealed-framed"]
    orders = " | ".join(" ".join(x[0].upper() for x in r["order"]) for r in m["rounds"])
    print(f"\nsession modes over the same relay, same processes and Agent, one session each; medians of "
          f"{len(m['rounds'])} rounds (order: {orders}); largest relayed payload: terminated "
          f"{m['limits']['terminated']} B, sealed {m['limits']['sealed']} B")
    cap = m.get("relay_cpu")
    print(f"the Intermediate held to {cap:g} of one core (a cgroup quota), so that the relay limits the rate"
          if cap else "the Intermediate not capped: the rate is whatever process is slowest on this machine")
    print("sealed: its packets as raw frames the relay forwards without cryptography (the default); "
          "sealed-framed: inside the control connections, as DATAGRAM frames")
    print(f"{'metric':<50}{'terminated':>13}{'sealed':>13}{'sealed/term':>13}{'framed':>13}{'framed/term':>13}")

    def ratio(a: object, b: object) -> float | None:
        return b / a if isinstance(a, int | float) and isinstance(b, int | float) and a else None

    def row(label: str, triple: tuple, digits: int, ratios: bool = True) -> None:
        a, b, c = triple
        rb, rc = (ratio(a, b), ratio(a, c)) if ratios else (None, None)
        print(f"{label:<50}{_fmt(a, digits):>13}{_fmt(b, digits):>13}{_fmt(rb, 2):>13}{_fmt(c, digits):>13}"
              f"{_fmt(rc, 2):>13}")

    for k in ("p50_ms", "p95_ms"):
        row(f"echo RTT {k} over the relay (64 B, sequential)", (t["rtt"][k], s["rtt"][k], f["rtt"][k]), 3)
    row("relayed frames per sequential echo (/metrics)",
        (t["rtt"]["frames_per_echo"], s["rtt"]["frames_per_echo"], f["rtt"]["frames_per_echo"]), 2)
    for size in out["sizes"]:
        a, b, c = t.get(size, {}), s.get(size, {}), f.get(size, {})
        for x in (a, b, c):
            if "skipped" in x:
                print(f"{size} B: {x['skipped']}")

        def both(fn, a=a, b=b, c=c) -> tuple:
            return tuple(fn(x) if "datagrams_per_s" in x else None for x in (a, b, c))

        row(f"{size} B: app datagrams/s carried (2 x replies/s)", both(lambda x: x["datagrams_per_s"]), 0)
        row(f"{size} B:   Mbit/s of payload", both(lambda x, size=size: x["datagrams_per_s"] * size * 8 / 1e6), 1)
        row(f"{size} B: relayed frames/s (Intermediate /metrics)", both(lambda x: x["frames_per_s"]), 0)
        row(f"{size} B: app datagrams per relayed frame", both(lambda x: x["datagrams_per_frame"]), 2)
        row(f"{size} B: Intermediate CPU us per relayed frame", both(lambda x: x["inter_cpu_us_per_frame"]), 1)
        row(f"{size} B: Intermediate CPU us per app datagram", both(lambda x: x["inter_cpu_us_per_datagram"]), 1)
        row(f"{size} B:   app datagrams per Intermediate CPU-second",
            both(lambda x: 1e6 / x["inter_cpu_us_per_datagram"] if x["inter_cpu_us_per_datagram"] else None), 0)
        row(f"{size} B: CPU us per app datagram, all four processes", both(lambda x: x["all_cpu_us_per_datagram"]), 1)
        for proc in ("intermediate", "connector", "agent", "echo"):
            row(f"{size} B:   CPU busy, {proc} (% of one core)",
                both(lambda x, proc=proc: 100 * x["cpu_share"][proc]), 0)
        row(f"{size} B:   requests not queued (send returned None)", both(lambda x: x["not_queued"]), 0, ratios=False)
    print("per round, app datagrams/s (terminated / sealed / framed): " + "; ".join(
        " ".join(f"{size} B " + " / ".join(_fmt(r[v].get(size, {}).get('datagrams_per_s'), 0) for v in MODES)
                 for size in out["sizes"])
        for r in m["rounds"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--rtt-samples", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both session modes, order alternating")
    ap.add_argument("--relay-cpu", type=float, default=0.25, metavar="CORES",
                    help="hold the Intermediate to this share of one core during the mode comparison, so the "
                         "relay is the bottleneck (root and a cgroup cpu controller; 0: no cap)")
    ap.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[1100, 100],
                    help="payload sizes in bytes, comma-separated (sealed mode carries up to about 1,155)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    result = asyncio.run(main(a))
    if a.json:
        print(json.dumps(result, indent=1))
    report(result)
