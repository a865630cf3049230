"""`qlab lab up|status|exec|down`: the kernel NAT lab by hand.

A lab made here persists after the command (its wires run in their own sessions) until `qlab lab
down`; its state lives in /run/qlab/<run id>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from qlab.cli.roles import PRESETS_HELP
from qlab.cli.util import example, nat_preset, positive_int
from qlab.scenario.profiles import PROFILE_NAMES
from qlab.scenario.topology import SCENARIOS, build

RUN_HELP = "the lab's run id (default: the only lab that is up)"


def _pick(run: str | None) -> dict:
    from qlab.backends.netns.lab import saved_labs

    labs = saved_labs()
    if run:
        for lab in labs:
            if lab["run_id"] == run:
                return lab
        raise ValueError(f"no lab with run id {run!r} (labs: {', '.join(x['run_id'] for x in labs) or 'none'})")
    if len(labs) != 1:
        raise ValueError(f"{len(labs)} labs exist: name one with --run ({', '.join(x['run_id'] for x in labs)})"
                         if labs else "no lab is up (qlab lab up ...)")
    return labs[0]


def cmd_up(args: argparse.Namespace) -> int:
    from qlab.backends.netns.lab import Lab

    topo = build(args.agent_nat, args.connector_nat, scenario=args.scenario, profile_name=args.profile,
                 agents=args.agents)
    lab = Lab(topo, persistent=True)
    try:
        lab.up()
    except BaseException:
        lab.down()
        raise
    print(json.dumps(lab.status(), indent=1))
    print(f"lab {lab.run_id} is up; `qlab lab exec agent -- ip addr`, `qlab lab down --run {lab.run_id}`",
          file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from qlab.backends.netns.lab import lab_namespaces, saved_labs

    print(json.dumps({"labs": saved_labs(), "namespaces": lab_namespaces()}, indent=1))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    lab = _pick(args.run)
    ns = lab["namespaces"].get(args.host)
    if ns is None:
        raise ValueError(f"no host {args.host!r} in lab {lab['run_id']} (hosts: {', '.join(lab['namespaces'])})")
    cmd = [c for c in args.cmd if c != "--"]
    if not cmd:
        raise ValueError("give a command after --, e.g. qlab lab exec agent -- ip addr")
    return subprocess.call(["ip", "netns", "exec", ns, *cmd])


def attach(state: dict):
    """A `Lab` for a lab that is up (from its saved state): its namespaces, no new resources."""
    from qlab.backends.netns.lab import Lab

    t = state["topology_args"]
    topo = build(t["agent_nat"], t["connector_nat"], scenario=t["scenario"], profile_name=t["profile"],
                 agents=t.get("agents", 1))
    return Lab(topo, run_id=state["run_id"])


def cmd_check(args: argparse.Namespace) -> int:
    from qlab.backends.netns.labcheck import RttBounds, check, format_table

    if args.samples < 10:
        raise ValueError("--samples must be at least 10")
    if args.p95_slack < 0 or any(x is not None and x < 0 for x in (args.p50_tolerance, args.p50_above)):
        raise ValueError("--p50-tolerance, --p50-above and --p95-slack must be >= 0")
    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    lab = attach(_pick(args.run))
    try:
        rows = check(lab, samples=args.samples, refresh=not args.no_refresh, rounds=args.rounds,
                     bounds=RttBounds(p50_ms=args.p50_tolerance, p50_above_ms=args.p50_above,
                                      p95_slack_ms=args.p95_slack))
    except (RuntimeError, OSError) as exc:  # a namespace gone, a lab half down: say so in one line
        print(f"qlab lab check: the lab could not be measured: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
    else:
        print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def cmd_down(args: argparse.Namespace) -> int:
    from qlab.backends.netns.lab import STATE_DIR, down_all, lab_namespaces

    if args.all:
        removed = down_all()
        print(f"removed {len(removed)} namespaces: {' '.join(removed) or '-'}")
        return 0
    lab = _pick(args.run)
    for pid in lab.get("wires", []):
        with contextlib.suppress(ProcessLookupError, PermissionError, FileNotFoundError):
            if "tapwire" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGTERM)
    prefix = f"qlab-{lab['run_id']}-"
    for ns in lab_namespaces():
        if ns.startswith(prefix):
            subprocess.run(["ip", "netns", "del", ns], check=False)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{lab['run_id']}.json").unlink()
    print(f"lab {lab['run_id']} is down")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    lab = sub.add_parser("lab", help="the kernel NAT lab in network namespaces (root)",
                         epilog=example("sudo qlab lab up --agent-nat symmetric", "sudo qlab lab down --all"))
    lsub = lab.add_subparsers(dest="lab_command", required=True)
    up = lsub.add_parser("up", help="build a lab and leave it running",
                         epilog=example("sudo qlab lab up --agent-nat symmetric --profile wan-20ms"))
    up.add_argument("--agent-nat", type=nat_preset, metavar="PRESET", default="port_restricted",
                    help=f"the Agent's {PRESETS_HELP}")
    up.add_argument("--connector-nat", type=nat_preset, metavar="PRESET", default="port_restricted",
                    help=f"the Connector's {PRESETS_HELP}")
    up.add_argument("--profile", choices=PROFILE_NAMES, default="lan", help="link profile")
    up.add_argument("--scenario", choices=SCENARIOS, default="pair", help="where the hosts sit")
    up.add_argument("--agents", type=positive_int, default=1, help="Agent hosts (scenario multi_agent)")
    up.set_defaults(func=cmd_up)
    st = lsub.add_parser("status", help="labs that are up, and their namespaces (JSON)",
                         epilog=example("sudo qlab lab status"))
    st.set_defaults(func=cmd_status)
    ex = lsub.add_parser("exec", help="run a command inside a lab host: qlab lab exec HOST -- CMD",
                         epilog=example("sudo qlab lab exec agent -- ip addr"))
    ex.add_argument("--run", default=None, help=RUN_HELP)
    ex.add_argument("host", help="a host of the lab: agent, connector, intermediate, nat-a, ...")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    ex.set_defaults(func=cmd_exec)
    ck = lsub.add_parser("check", help="measure a lab that is up against its NAT specs and link profile",
                         epilog=example("sudo qlab lab check --samples 200"))
    ck.add_argument("--run", default=None, help=RUN_HELP)
    ck.add_argument("--samples", type=int, default=100, help="ICMP round trips per path")
    ck.add_argument("--rounds", type=int, default=3,
                    help="measure a path whose round fails again, up to this many rounds")
    ck.add_argument("--p50-tolerance", type=float, default=None, metavar="MS",
                    help="how far a path's RTT p50 may be from the profile (default: 5 %% or 1 ms)")
    ck.add_argument("--p50-above", type=float, default=None, metavar="MS",
                    help="how far above the profile a path's RTT p50 may be (default: as --p50-tolerance)")
    ck.add_argument("--p95-slack", type=float, default=3.0, metavar="MS",
                    help="how far above the p95 its profile gives a path's RTT p95 may be")
    ck.add_argument("--no-refresh", action="store_true", help="skip the binding-refresh check (5 s per NAT)")
    ck.add_argument("--json", action="store_true", help="the rows as JSON")
    ck.set_defaults(func=cmd_check)
    dn = lsub.add_parser("down", help="tear a lab down (--all: everything qlab left behind)",
                         epilog=example("sudo qlab lab down --all"))
    dn.add_argument("--run", default=None, help=RUN_HELP)
    dn.add_argument("--all", action="store_true", help="every namespace and wire qlab left behind")
    dn.set_defaults(func=cmd_down)
