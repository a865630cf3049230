"""Figures for the endpoint's attack rows (issue 13, items 1, 2 and 8), longer than the tests run
them: the flow-control gap attack on the Intermediate and on the Connector's P2P port, handshake
floods from one source and from rotating 127.x sources, and waves of unproven connections.

The attacks are the ones `tests/hostile/test_flow_control.py` and `tests/hostile/test_quic_floods.py`
assert on, loaded from this checkout by path; the roles and qlab come from whatever `qlab` Python
imports, so pointing PYTHONPATH at another checkout measures that one:

    .venv/bin/python benchmarks/attack_floods.py [--only gap-intermediate ...] [--json OUT]
    cd /tmp && PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/benchmarks/attack_floods.py

The old checkout needs its own `tests/procs.py` and `tests/test_roles_e2e.py` (any since the
Endpoint), which PYTHONPATH provides. CPU figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(REPO))  # this checkout's qlab and tests, unless told otherwise

from qlab.certs import CONNECTOR_NAME, INTERMEDIATE_NAME, Credentials, init_dir  # noqa: E402


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "hostile" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flow = _load("test_flow_control")
floods = _load("test_quic_floods")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gap(certs: str, creds: Credentials, target: str) -> dict:
    d = flow.start_deployment(certs)
    try:
        if target == "intermediate":
            addr, name, pid = ("127.0.0.1", d.port), INTERMEDIATE_NAME, d.intermediate.p.pid
        else:
            addr, name, pid = ("127.0.0.1", d.connector_port), CONNECTOR_NAME, d.connector.p.pid
        return asyncio.run(flow.gap_attack(creds, addr, name, pid, rounds=8, stop_above_kb=None))
    finally:
        for p in (d.connector, d.intermediate, d.echo):
            p.terminate()


def flood(certs: str, creds: Credentials, sources: list[str], seconds: float) -> dict:
    proc, port, mport = floods.start_intermediate(certs)
    try:
        cpu0 = cpu_s(proc.p.pid)
        tries = int(4 * (seconds - 1.0 - floods.HONEST_WITHIN))
        results, rate = floods.flood_while_connecting(creds, port, sources, seconds=seconds, tries=tries)
        ok = [t for t in results if t is not None and t <= floods.HONEST_WITHIN]
        return {"initials_per_s": round(rate), "seconds": seconds, "sources": len(sources),
                "honest_ok": f"{len(ok)}/{len(results)}",
                "honest_p50_ms": round(1000 * statistics.median(ok)) if ok else None,
                "honest_max_ms": round(1000 * max(ok)) if ok else None,
                "intermediate_cpu_s": round(cpu_s(proc.p.pid) - cpu0, 1),
                "retry_sent": floods.metric(mport, 'udp_datagrams_total{what="retry_sent"}'),
                "closed_for_cause": floods.metric(mport, "connections_closed_total")}
    finally:
        proc.terminate()


def unproven(certs: str, creds: Credentials, waves: int) -> list[dict]:
    proc, port, mport = floods.start_intermediate(certs)
    try:
        return [asyncio.run(floods.unproven_connections(creds, ("127.0.0.1", port), proc.p.pid, mport))
                for _ in range(waves)]
    finally:
        proc.terminate()


def main() -> None:
    rows: dict[str, Callable[[str, Credentials, argparse.Namespace], object]] = {
        "gap-intermediate": lambda c, k, a: gap(c, k, "intermediate"),
        "gap-connector": lambda c, k, a: gap(c, k, "connector"),
        "flood-one-source": lambda c, k, a: flood(c, k, ["127.0.0.1"], a.seconds),
        "flood-rotating": lambda c, k, a: flood(c, k, [f"127.{1 + i // 250}.{i % 250}.{2 + i % 7}" for i in range(500)],
                                                a.seconds),
        "unproven-300": lambda c, k, a: unproven(c, k, a.waves),
    }
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=list(rows), default=list(rows))
    ap.add_argument("--seconds", type=float, default=12.0, help="flood duration (the honest client starts after 1 s)")
    ap.add_argument("--waves", type=int, default=3, help="waves of 300 unproven connections")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    certs = str(init_dir(Path(tempfile.mkdtemp(prefix="qlab-attack-")) / "certs"))
    creds = Credentials.load(certs)
    import qlab

    out: dict[str, object] = {"qlab": str(Path(qlab.__file__).parent)}
    print(f"# qlab from {out['qlab']}", flush=True)
    for name in args.only:
        t0 = time.monotonic()
        out[name] = rows[name](certs, creds, args)
        print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(out[name])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
