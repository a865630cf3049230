"""The attack suite's longer runs (issue 13): every row of the issue's attack table, against real
role processes on loopback, with the figures the table measures.

Each row starts its own Intermediate / Connector / echo app (`python -m qlab.cli.main ...` from the
qlab this script imports), attacks with bounded loops, reads RSS, fds and CPU from /proc, counts
what a victim UDP socket owned by this script receives, and tears everything down. A row that cannot
run on a checkout prints "n/a" and the reason.

    .venv/bin/python benchmarks/attack.py [--only ROW ...] [--seconds S] [--json OUT]
    # the same rows against another checkout (its roles run from it too):
    cd /tmp && PYTHONPATH=/tmp/old /work/main/.venv/bin/python /work/main/benchmarks/attack.py

CPU and latency figures depend on the machine's load: say how busy it was when quoting them.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# this directory (for `attacks`) but not the repository root: `qlab` must come from PYTHONPATH or the
# installed checkout, so that the script measures the checkout it was pointed at
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attacks import authed, unauth  # noqa: E402
from attacks import keys as keyfiles  # noqa: E402
from attacks.common import Ctx, Figures  # noqa: E402
from attacks.harness import QLAB_ROOT, NotApplicable, kill_all, qlab_cli  # noqa: E402

# row -> (the attack, what the table measured for it)
ROWS: dict[str, tuple[Callable[[Ctx], Figures], str]] = {
    "gap-intermediate": (unauth.gap_intermediate, "a byte at the edge of each flow-control window, no HELLO: RSS"),
    "gap-connector": (unauth.gap_connector, "the same on the Connector's P2P port"),
    "flood-one-source": (unauth.flood_one_source, "1,000 Initials/s from one address: honest connects within 2 s"),
    "flood-rotating": (unauth.flood_rotating_sources, "1,000 Initials/s from 500 127.x addresses: the same"),
    "initials-300s": (unauth.initials_cycled, "3,000 Initials cycled at 300/s: honest connects, Intermediate CPU"),
    "unproven-300": (unauth.unproven_connections, "300 connections that never say HELLO: memory, life, /metrics"),
    "held-datagrams": (unauth.held_before_proof, "datagrams held before DirectHello / OPEN_SESSION"),
    "hello-replay": (unauth.hello_replay, "a recorded HELLO sent on new connections"),
    "victim-candidates": (authed.victim_candidates, "OPEN_SESSION with 32 candidates at a victim: bytes to it"),
    "rogue-announce": (authed.rogue_announce, "a Connector ANNOUNCEs a victim's addresses: what Agents send"),
    "service-takeover": (authed.service_takeover, "a second identity registers a service that has an owner"),
    "sessions-burst": (authed.sessions_burst, "sessions with an app socket each vs a 1,024-fd Connector"),
    "sessions-open-close": (authed.sessions_open_close, "1,000 sessions open then closed, twice: RSS, fds"),
    "identity-rate-limit": (authed.identity_rate_limit, "10 connections under one name open sessions at once"),
    "migration-classify": (authed.migration_classify, "a client moves to a victim's address, asks for NAT tests"),
    "session-id-probe": (authed.session_id_probe, "OPEN_SESSION with someone else's id: does the answer tell?"),
    "certs-force-tmp": (keyfiles.certs_force_tmp, "qlab certs init --force over stale 0644 *.tmp files"),
}


def checkout() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(QLAB_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{QLAB_ROOT} @ {rev}" if rev else f"{QLAB_ROOT} (not a git checkout)"


def run_row(name: str, ctx: Ctx) -> Figures:
    t0 = time.monotonic()
    try:
        figs = ROWS[name][0](ctx)
    except NotApplicable as exc:
        figs = [("n/a", str(exc))]
    except Exception as exc:  # a row that breaks says why, and the others still run
        where = traceback.extract_tb(exc.__traceback__)[-1]
        figs = [("n/a", f"{type(exc).__name__}: {exc or 'timed out'} ({Path(where.filename).name}:{where.lineno})")]
    finally:
        kill_all()
    return figs + [("row time", f"{time.monotonic() - t0:.0f} s")]


def print_row(name: str, figs: Figures) -> None:
    for i, (figure, value) in enumerate(figs):
        print(f"{name if i == 0 else '':<22} {figure:<52} {value}", flush=True)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(ROWS), metavar="ROW", help="rows to run (--list)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the timed attacks (default 6)")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--list", action="store_true", help="list the rows and what each measures")
    args = ap.parse_args(argv)
    if args.list:
        for name, (_, what) in ROWS.items():
            print(f"{name:<22} {what}")
        return 0
    logging.disable(logging.CRITICAL)  # the in-process clients' own logs would drown the table
    signal.signal(signal.SIGTERM, _interrupted)
    results: dict[str, dict[str, object]] = {}
    print(f"qlab checkout: {checkout()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="qlab-attack-") as tmp:
        work = Path(tmp)
        made = qlab_cli("certs", "init", str(work / "certs"), cwd=work)
        if made.returncode != 0:
            print(f"qlab certs init failed: {made.stderr[-500:]}", file=sys.stderr)
            return 2
        ctx = Ctx(work, work / "certs", args.seconds)
        try:
            for name in args.only or list(ROWS):
                figs = run_row(name, ctx)
                print_row(name, figs)
                results[name] = {f: v if isinstance(v, int | float | bool) else str(v) for f, v in figs}
        except KeyboardInterrupt:
            print("interrupted: roles stopped", file=sys.stderr)
            return 130
        finally:
            kill_all()
    if args.json is not None:
        args.json.write_text(json.dumps({"checkout": checkout(), "seconds": args.seconds, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
