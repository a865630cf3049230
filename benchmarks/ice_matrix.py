"""qlab against an RFC 8445 ICE implementation (aioice, the one aiortc uses) on the 6 x 6 NAT matrix,
side by side in the kernel lab (issue 17): for every ordered pair of presets, N trials of each,
interleaved (qlab, ICE, qlab, ICE, ... within a cell; the first of each pair alternates), every
trial in a fresh lab at the same profile.

- qlab: `run_trial(TrialSpec(backend="netns", ...))`, its default configuration (no punch-anyway;
  birthday mode off unless --birthday N); a trial counts as direct when its outcome is `direct_*` (the relay was switched
  off at the Intermediate and echoes kept coming back over the direct path).
- ICE: `benchmarks/ice_peer.py` in the Agent's namespace (controlling) and in the Connector's
  (controlled), host and server-reflexive candidates over UDP/IPv4 from Debian's stund on the
  Intermediate (203.0.113.10:3478), the two JSON lines relayed by this process (the signaling
  channel), `connect()` bounded by --ice-timeout, then one datagram each way over the selected pair.
  A trial counts as connected when the controlling side connected and got the controlled side's
  answer to its datagram. The selected pair is shown as the remote candidate's type seen by the
  Agent / by the Connector (`prflx` = learned from the peer's incoming check, `srflx` = signalled).

A cell counts for a side by majority: more than half of its N trials direct (qlab) or connected
(ICE). The totals under the rule "at least one of N" are printed too.

    cd /work/wt-ice && PYTHONPATH=$PWD .venv/bin/python benchmarks/ice_matrix.py \
        [--trials 3] [--profile wan-20ms] [--json PATH] [--cells full_cone:full_cone,...] [--ice-only]
        [--birthday 256]

Needs root (the netns lab), nftables, conntrack, stund (Debian stun-server) and aioice. Nothing
leaves the lab's namespaces: the ICE peers and stund run inside them and talk over the lab's
TEST-NET-3 internet; the signaling lines go over pipes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.backends.netns import daemons  # noqa: E402
from qlab.backends.netns.lab import Lab, check_requirements  # noqa: E402
from qlab.certs import default_certs  # noqa: E402
from qlab.experiment.record import TrialSpec, is_direct  # noqa: E402
from qlab.experiment.trial import run_trial  # noqa: E402
from qlab.nat.spec import EXPECTED, PRESET_NAMES  # noqa: E402
from qlab.scenario.topology import INTERMEDIATE_IPS, build  # noqa: E402

PEER = Path(__file__).resolve().parent / "ice_peer.py"
STUN_PORT = 3478
SHORT = {"public": "public", "full_cone": "full", "restricted_cone": "restr", "port_restricted": "port_r",
         "symmetric_seq": "sym_seq", "symmetric": "sym"}


class PeerFailed(RuntimeError):
    """An ICE peer process did not say what it should have in time (not an ICE failure)."""


def _read_json_line(proc: subprocess.Popen, deadline: float, what: str) -> dict[str, Any]:
    """The next stdout line of `proc` as JSON, by `deadline` (time.monotonic)."""
    assert proc.stdout is not None
    buf = b""
    fd = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise PeerFailed(f"{what}: no line in time")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            if proc.poll() is not None:
                raise PeerFailed(f"{what}: exited ({proc.returncode}) without a line: {_stderr(proc)}")
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            raise PeerFailed(f"{what}: closed its output (exit {proc.poll()}): {_stderr(proc)}")
        buf += chunk
        if b"\n" in buf:
            line, rest = buf.split(b"\n", 1)
            if rest.strip():
                raise PeerFailed(f"{what}: more than one line at once: {rest[:200]!r}")
            return json.loads(line)


def _stderr(proc: subprocess.Popen) -> str:
    if proc.stderr is None:
        return ""
    with contextlib.suppress(OSError, ValueError):
        os.set_blocking(proc.stderr.fileno(), False)
        data = proc.stderr.read() or b""
        return data.decode(errors="replace").strip()[-400:]
    return ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(3)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


def ice_trial(agent_nat: str, connector_nat: str, profile: str, seed: int, timeout: float) -> dict[str, Any]:
    """One ICE attempt in a fresh lab: stund on the Intermediate (unless the lab runs one), the two
    peers, the signaling relayed here. Every process and the lab are gone when this returns."""
    t_start = time.monotonic()
    rec: dict[str, Any] = {"connected": False, "error": "", "agent": None, "connector": None}
    peers: list[subprocess.Popen] = []
    stund: daemons.Daemon | None = None
    with Lab(build(agent_nat, connector_nat, profile_name=profile), seed=seed) as lab, \
            tempfile.TemporaryDirectory(prefix="qlab-ice-") as tmp:
        try:
            if not any(d.name == "stund" for d in lab.services):
                stund = daemons.start("stund", ["ip", "netns", "exec", lab.netns("intermediate"),
                                                *daemons.stund_argv(*INTERMEDIATE_IPS)],
                                      Path(tmp) / "stund.log", ready=("Opened port 3478", "Opened port 3479"))
            argv = [sys.executable, str(PEER), "--stun", f"{INTERMEDIATE_IPS[0]}:{STUN_PORT}",
                    "--timeout", str(timeout)]
            for host, role in (("agent", "controlling"), ("connector", "controlled")):
                peers.append(lab.popen(host, [*argv, "--role", role], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE))
            deadline = time.monotonic() + 20  # gathering is bounded at 8 s in the peer
            offers = [_read_json_line(p, deadline, f"{h} offer") for p, h in zip(peers, ("agent", "connector"),
                                                                                  strict=True)]
            for p, offer in zip(peers, reversed(offers), strict=True):
                assert p.stdin is not None
                p.stdin.write((json.dumps(offer) + "\n").encode())
                p.stdin.flush()
            deadline = time.monotonic() + timeout + 10  # connect bound + data exchange + close
            rec["agent"] = _read_json_line(peers[0], deadline, "agent result")
            rec["connector"] = _read_json_line(peers[1], deadline, "connector result")
            rec["connected"] = bool(rec["agent"]["connected"] and rec["agent"]["data_ok"])
        except (PeerFailed, daemons.DaemonFailed, json.JSONDecodeError, OSError) as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            for p in peers:
                _stop(p)
            if stund is not None:
                stund.stop()
    rec["wall_s"] = round(time.monotonic() - t_start, 2)
    return rec


def qlab_trial(agent_nat: str, connector_nat: str, profile: str, seed: int, certs: str,
               birthday: int = 0) -> dict[str, Any]:
    t_start = time.monotonic()
    r = run_trial(TrialSpec(backend="netns", agent_nat=agent_nat, connector_nat=connector_nat, profile=profile,
                            seed=seed, birthday=birthday), certs_dir=certs).to_dict()
    return {"direct": is_direct(r["outcome"]), "outcome": r["outcome"], "mechanism": r.get("mechanism"),
            "punch": r.get("punch"), "ttd_ms": r.get("ttd_ms"), "error": r.get("error"),
            "wall_s": round(time.monotonic() - t_start, 2), "record": r}


def _pair_types(rec: dict[str, Any]) -> str | None:
    """The selected pair as `X/Y`: the remote candidate's type as the Agent saw it / as the Connector
    saw it (`prflx`: learned from the peer's incoming check). Local candidates are always the `host`
    socket (a server-reflexive candidate's base); another local type is shown as `local>remote`."""
    if not rec["connected"]:
        return None

    def one(side: dict[str, Any] | None) -> str:
        if not side or not side.get("connected"):
            return "-"
        local, remote = side.get("local_type"), side.get("remote_type")
        return str(remote) if local == "host" else f"{local}>{remote}"

    return f"{one(rec.get('agent'))}/{one(rec.get('connector'))}"


def _cells(text: str | None) -> list[tuple[str, str]]:
    if not text:
        return [(a, c) for a in PRESET_NAMES for c in PRESET_NAMES]
    out = []
    for item in text.split(","):
        a, _, c = item.strip().partition(":")
        if a not in PRESET_NAMES or c not in PRESET_NAMES:
            raise SystemExit(f"--cells: {item!r} is not AGENT_NAT:CONNECTOR_NAT of {', '.join(PRESET_NAMES)}")
        out.append((a, c))
    return out


def _aioice_version() -> str:
    try:
        from importlib.metadata import version

        return version("aioice")
    except Exception:
        return "?"


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: peers killed, labs down


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="trials per cell for each of qlab and ICE")
    ap.add_argument("--profile", default="wan-20ms")
    ap.add_argument("--ice-timeout", type=float, default=10.0, help="bound on ICE connect() (s)")
    ap.add_argument("--json", default=None, help="write every trial (and the summary) here")
    ap.add_argument("--cells", default=None, help="only these cells, AGENT:CONNECTOR,... (default: all 36)")
    ap.add_argument("--ice-only", action="store_true", help="skip the qlab trials")
    ap.add_argument("--birthday", type=int, default=0,
                    help="qlab's birthday mode (TrialSpec.birthday; default 0 = off, qlab's default)")
    args = ap.parse_args()
    if args.trials < 1:
        raise SystemExit("--trials must be >= 1")
    check_requirements()
    if not os.access(daemons.STUND, os.X_OK):
        raise SystemExit(f"the ICE peers need {daemons.STUND} (Debian: apt-get install stun-server)")
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.disable(logging.CRITICAL)
    certs = default_certs()
    cells = _cells(args.cells)
    n = args.trials
    trials: list[dict[str, Any]] = []
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        for i, (a, c) in enumerate(cells):
            seed_base = 1000 * (PRESET_NAMES.index(a) * 6 + PRESET_NAMES.index(c))
            for k in range(n):
                seed = seed_base + k
                order = ["qlab", "ice"] if k % 2 == 0 else ["ice", "qlab"]
                for kind in order:
                    if kind == "qlab" and args.ice_only:
                        continue
                    if kind == "qlab":
                        body = qlab_trial(a, c, args.profile, seed, certs, args.birthday)
                        ok, note = body["direct"], body["outcome"]
                    else:
                        body = ice_trial(a, c, args.profile, seed, args.ice_timeout)
                        ok = body["connected"]
                        note = _pair_types(body) or ((body["agent"] or {}).get("error") or body["error"] or "failed")
                    trials.append({"kind": kind, "agent_nat": a, "connector_nat": c, "trial": k, "seed": seed,
                                   "ok": ok, **body})
                    print(f"[{i + 1}/{len(cells)} {time.monotonic() - t0:6.0f} s] {a} -> {c} #{k} {kind}: "
                          f"{'ok' if ok else 'no'} ({note}, {body['wall_s']:.1f} s)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: summarising the trials done so far", file=sys.stderr)
    else:
        interrupted = False
    wall = time.monotonic() - t0
    summary = summarise(trials, cells, n, args, wall, started)
    summary["interrupted"] = interrupted
    if interrupted:
        print("INTERRUPTED: the table and totals cover only the trials done (cells without trials count as "
              "no direct path)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "trials": trials}, f, indent=1, default=str)
        print(f"trials: {args.json}")


def summarise(trials: list[dict[str, Any]], cells: list[tuple[str, str]], n: int, args: argparse.Namespace,
              wall: float, started: str) -> dict[str, Any]:
    print(f"\nkernel lab (netns), profile {args.profile}, {n} trial(s) per cell and side, interleaved; "
          f"qlab birthday mode {args.birthday or 'off'}; ICE: aioice {_aioice_version()}, connect() bound "
          f"{args.ice_timeout:.0f} s; started {started}")
    print("qlab: direct k/N (outcome direct_*); ICE: connected k/N (datagram answered over the selected pair), "
          "selected pair: remote candidate type seen by the Agent / by the Connector")
    print(f"{'agent':<16} {'connector':<16} {'exp':<3} {'qlab':>5}  {'qlab outcomes':<28} {'ICE':>5}  "
          f"{'ICE pairs / failures':<34} differ")
    rows = []
    for a, c in cells:
        q = [t for t in trials if (t["agent_nat"], t["connector_nat"]) == (a, c) and t["kind"] == "qlab"]
        ice = [t for t in trials if (t["agent_nat"], t["connector_nat"]) == (a, c) and t["kind"] == "ice"]
        qk, ik = sum(t["ok"] for t in q), sum(t["ok"] for t in ice)
        q_out = Counter(t["outcome"] for t in q)
        i_out = Counter(_pair_types(t) or "failed" for t in ice)
        row = {"agent_nat": a, "connector_nat": c, "expected": EXPECTED[(a, c)],
               "qlab_direct": qk, "qlab_n": len(q), "qlab_outcomes": dict(q_out),
               "ice_connected": ik, "ice_n": len(ice), "ice_pairs": dict(i_out),
               "qlab_majority": bool(q) and qk * 2 > len(q), "ice_majority": bool(ice) and ik * 2 > len(ice),
               "qlab_any": qk > 0, "ice_any": ik > 0}
        row["differ"] = row["qlab_majority"] != row["ice_majority"]
        rows.append(row)
        fmt = ", ".join(f"{k} {v}" for k, v in q_out.most_common())
        ifmt = ", ".join(f"{k} {v}" for k, v in i_out.most_common())
        print(f"{a:<16} {c:<16} {EXPECTED[(a, c)]:<3} {qk:>2}/{len(q):<2}  {fmt:<28} {ik:>2}/{len(ice):<2}  "
              f"{ifmt:<34} {'<--' if row['differ'] else ''}")
    totals: dict[str, Any] = {}
    for rule, key in (("majority (> N/2)", "majority"), ("at least one of N", "any")):
        qx = sum(r[f"qlab_{key}"] for r in rows)
        iy = sum(r[f"ice_{key}"] for r in rows)
        ratio = f"{qx / iy:.2f}" if iy else "n/a"
        totals[key] = {"qlab": qx, "ice": iy, "cells": len(rows)}
        print(f"cells with a direct path, {rule}: qlab {qx}/{len(rows)}, ICE {iy}/{len(rows)} -> ratio qlab/ICE {ratio}")
    qt = [t for t in trials if t["kind"] == "qlab"]
    it = [t for t in trials if t["kind"] == "ice"]
    print(f"trials: qlab {sum(t['ok'] for t in qt)}/{len(qt)} direct, ICE {sum(t['ok'] for t in it)}/{len(it)} "
          f"connected; ICE trials that failed for a reason other than connect(): "
          f"{sum(bool(t['error']) for t in it)}")
    differ = [r for r in rows if r["differ"]]
    print("cells where the majority rule differs: "
          + ("; ".join(f"{SHORT[r['agent_nat']]}->{SHORT[r['connector_nat']]} qlab {r['qlab_direct']}/{r['qlab_n']} "
                       f"ICE {r['ice_connected']}/{r['ice_n']}" for r in differ) or "none"))
    print(f"wall {wall:.0f} s")
    return {"profile": args.profile, "trials_per_cell": n, "birthday": args.birthday,
            "aioice": _aioice_version(), "ice_timeout_s": args.ice_timeout, "started": started,
            "wall_s": round(wall, 1), "cells": rows, "totals": totals}


if __name__ == "__main__":
    main()
