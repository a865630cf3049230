"""`qlab campaign run|resume|ls|show` and `qlab report`.

`ls` and `show` print tables read from the durable trials.jsonl (no pandas needed: the slim runtime
of an AWS host has these commands too); `--json` prints the same as one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

from qlab.backends.base import BACKENDS
from qlab.cli.table import pairs, table, text
from qlab.cli.util import RESULTS_HELP, example, non_negative_float, positive_int
from qlab.scenario.profiles import PROFILE_NAMES, REPORT_PROFILES

NATS_HELP = "NAT preset, comma list, or all (required: all x all is 36 cells, 1,080 trials at --trials 30)"
JSON_HELP = "one line of JSON instead of the table"


def _interrupted(campaign_id: str) -> int:
    print(f"interrupted: every finished trial is kept; continue with `qlab campaign resume {campaign_id}`",
          file=sys.stderr)
    return 130


def cmd_run(args: argparse.Namespace) -> int:
    from qlab.study import campaign, results

    spec = campaign.CampaignSpec(backend=args.backend, agent_nats=args.agent_nat, connector_nats=args.connector_nat,
                                 profile=args.profile, trials=args.trials, seed=args.seed,
                                 campaign_id=args.id or "", samples=args.samples, punch_anyway=args.punch_anyway,
                                 birthday=args.birthday, ipv6=args.ipv6 or "", mode=args.mode,
                                 punch_delay=args.punch_delay)
    folder = results.campaign_dir(spec.campaign_id, args.results)
    if (folder / "manifest.json").is_file():  # refused before the size line promises a run
        campaign.check_contract(spec, results.CampaignStore(folder).manifest())
    print(f"campaign {spec.campaign_id}: {len(spec.cells)} cell(s) x {spec.trials} trial(s) = "
          f"{len(spec.cells) * spec.trials} trial(s) on {spec.backend}, profile {spec.profile} -> {folder}",
          flush=True)  # stdout: stderr is for the progress bar and errors
    try:
        campaign.run(spec, root=args.results, workers=args.workers, cluster=args.cluster)
    except KeyboardInterrupt:
        return _interrupted(spec.campaign_id)
    print(campaign_table(campaign_summary(folder)))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from qlab.study import campaign

    try:
        folder = campaign.resume(args.id, root=args.results, workers=args.workers, cluster=args.cluster)
    except KeyboardInterrupt:
        return _interrupted(args.id)
    print(campaign_table(campaign_summary(folder)))
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from qlab.study import results

    root = results.results_root(args.results)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"results root {root} is not a directory")
    rows = results.list_campaigns(root)
    if args.json:
        print(json.dumps(rows))
    elif not rows:
        print(f"no campaigns under {root}")
    else:
        print(table(("id", "backend", "profile", "cells", "trials/cell", "done", "of", "finished", "started"),
                    [(c["id"], c.get("backend"), c.get("profile"), c.get("cells"), c.get("trials_per_cell"),
                      c.get("done"), c.get("total"), text(c.get("finished")) if "error" not in c else c["error"],
                      (c.get("started_at") or "")[:19]) for c in rows]))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from qlab.study import results

    summary = campaign_summary(results.find_campaign(args.id, args.results))
    print(json.dumps(summary) if args.json else campaign_table(summary))
    return 0


def _median(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def cell_summary(expected: str | None, recs: list[dict]) -> dict:
    """One cell's counts and medians (of the trials' own p50s), and its most frequent reason."""
    from qlab.experiment.record import is_direct

    reasons = Counter(r["reason"] for r in recs if r["reason"])
    top = reasons.most_common(1)
    return {
        "n": len(recs), "direct": sum(is_direct(r["outcome"]) for r in recs),
        "relay": sum(r["outcome"] == "relay" for r in recs), "failed": sum(r["outcome"] == "failed" for r in recs),
        "expected": expected or (recs[0]["expected"] if recs else None),
        "as_expected": sum(bool(r["as_expected"]) for r in recs),
        "ttd_p50_ms": _median([r["ttd_ms"] for r in recs]),
        "rtt_direct_p50_ms": _median([r["rtt_direct_p50_ms"] for r in recs]),
        "rtt_relay_p50_ms": _median([r["rtt_relay_p50_ms"] for r in recs]),
        "top_reason": f"{top[0][0]} ({top[0][1]} of {len(recs)})" if top else "",
    }


def campaign_summary(folder: Path) -> dict:
    """A campaign's manifest settings and, per cell (in the manifest's order), what its trials did."""
    from qlab.study.results import CampaignStore

    store = CampaignStore(folder)
    m = store.manifest()
    by_cell: dict[tuple[str, str], list[dict]] = {(a, c): [] for a, c in m.get("cells", [])}
    for r in store.records():
        by_cell.setdefault((r["agent_nat"], r["connector_nat"]), []).append(r)
    expected = m.get("expected", {})
    cells = [{"agent_nat": a, "connector_nat": c, **cell_summary(expected.get(f"{a}|{c}"), recs)}
             for (a, c), recs in by_cell.items()]
    return {"id": folder.name, "folder": str(folder), "backend": m.get("backend"), "profile": m.get("profile"),
            "trials_per_cell": m.get("trials"), "seed": m.get("seed"), "started_at": m.get("started_at"),
            "finished_at": m.get("finished_at"), "cells": cells}


def campaign_table(s: dict) -> str:
    done = sum(c["n"] for c in s["cells"])
    finished = s["finished_at"] or f"no: `qlab campaign resume {s['id']}` runs the rest"
    head = pairs([("campaign", s["id"]), ("backend", s["backend"]), ("profile", s["profile"]),
                  ("trials", f"{s['trials_per_cell']} per cell, {done} done"), ("seed", s["seed"]),
                  ("started", s["started_at"]), ("finished", finished), ("folder", s["folder"])])
    body = table(("agent", "connector", "N", "direct", "relay", "failed", "expected", "as expected",
                  "ttd p50 ms", "direct RTT p50 ms", "relay RTT p50 ms", "top reason"),
                 [(c["agent_nat"], c["connector_nat"], c["n"], c["direct"], c["relay"], c["failed"], c["expected"],
                   c["as_expected"], c["ttd_p50_ms"], c["rtt_direct_p50_ms"], c["rtt_relay_p50_ms"], c["top_reason"])
                  for c in s["cells"]])
    return f"{head}\n\n{body}"


def cmd_report(args: argparse.Namespace) -> int:
    from qlab.study.report import run_report

    try:
        index = run_report(backend=args.backend, trials=args.trials, presets=args.presets, profile=args.profile,
                           root=args.results, out=args.out)
    except KeyboardInterrupt:
        print("interrupted: every finished trial is kept; `qlab campaign ls` lists the report's campaigns and "
              "`qlab campaign resume ID` completes one", file=sys.stderr)
        return 130
    print(f"report: {index}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("campaign", help="campaigns of trials and their results store",
                       epilog=example("qlab campaign run --agent-nat all --connector-nat symmetric --trials 10",
                                      "qlab campaign ls"))
    cs = c.add_subparsers(dest="campaign_command", required=True, metavar="COMMAND")
    _register_run(cs)
    rs = cs.add_parser("resume", help="complete an interrupted campaign with its manifest's settings",
                       epilog=example("qlab campaign resume 20261128-042000-sim-full_cone-1a2b"))
    rs.add_argument("id", help="the campaign id (qlab campaign ls)")
    _add_executor_args(rs)
    rs.add_argument("--results", default=None, help=RESULTS_HELP)
    rs.set_defaults(func=cmd_resume)
    ls = cs.add_parser("ls", help="the campaigns under the results folder, as a table",
                       epilog=example("qlab campaign ls", "qlab campaign ls --results /tmp/qlab --json"))
    ls.add_argument("--json", action="store_true", help=JSON_HELP)
    ls.add_argument("--results", default=None, help=RESULTS_HELP)
    ls.set_defaults(func=cmd_ls)
    sh = cs.add_parser("show", help="one campaign's settings and, per cell, its outcomes and medians",
                       epilog=example("qlab campaign show 20261128-042000-sim-full_cone-1a2b"))
    sh.add_argument("id", help="the campaign id (qlab campaign ls)")
    sh.add_argument("--json", action="store_true", help=JSON_HELP)
    sh.add_argument("--results", default=None, help=RESULTS_HELP)
    sh.set_defaults(func=cmd_show)

    rp = sub.add_parser("report", help="run the default campaigns and publish the HTML report",
                        epilog=example("qlab report --trials 10"))
    rp.add_argument("--backend", default="sim", choices=("sim", "netns"), help="where the campaigns run")
    rp.add_argument("--trials", type=positive_int, default=30, help="trials per cell")
    rp.add_argument("--presets", default="all", help="agent NAT presets (one campaign each)")
    rp.add_argument("--profile", default=",".join(REPORT_PROFILES),
                    help=f"link profiles, comma-separated, one campaign set each (default: {','.join(REPORT_PROFILES)}; "
                         f"choices: {', '.join(PROFILE_NAMES)})")
    rp.add_argument("--results", default=None, help=RESULTS_HELP)
    rp.add_argument("--out", default=None, help="where the HTML goes (default: <results>/reports)")
    rp.set_defaults(func=cmd_report)


def _register_run(cs: argparse._SubParsersAction) -> None:
    r = cs.add_parser("run", help="run a campaign (agent NATs x connector NATs x trials)",
                      description="Run a campaign: every (agent NAT, connector NAT) cell, --trials times, durably "
                                  "(Ctrl-C keeps every finished trial; `qlab campaign resume ID` runs the rest). "
                                  "The NATs are required, so a bare `campaign run` never starts 1,080 trials; "
                                  "the size is printed before the first trial.",
                      epilog=example("qlab campaign run --agent-nat all --connector-nat symmetric --trials 10"))
    r.add_argument("--agent-nat", required=True, metavar="NATS", help=NATS_HELP)
    r.add_argument("--connector-nat", required=True, metavar="NATS", help=NATS_HELP)
    r.add_argument("--backend", default="sim", choices=BACKENDS, help="where the trials run (loopback: public, lan)")
    r.add_argument("--profile", default="wan-20ms", choices=PROFILE_NAMES, help="link profile")
    r.add_argument("--trials", type=positive_int, default=30, help="trials per cell")
    r.add_argument("--seed", type=int, default=0, help="the campaign's seed (each trial's is derived from it)")
    r.add_argument("--samples", type=positive_int, default=20, help="echo samples per path per trial")
    r.add_argument("--birthday", type=int, default=0, metavar="N",
                   help="birthday mode: the random-port side opens N mappings (0: off; Tailscale uses 256)")
    r.add_argument("--ipv6", default=None, metavar="FIREWALL",
                   help="a dual-stack lab: both sides' IPv6 firewall (open or stateful; default: IPv4 only)")
    r.add_argument("--mode", default="terminated", choices=("terminated", "sealed"),
                   help="the sessions' architecture: terminated (the relay opens traffic) or sealed (one "
                        "end-to-end connection, relayed sealed, migrated to the direct path)")
    r.add_argument("--punch-delay", type=non_negative_float, default=0.0, metavar="S",
                   help="both sides punch S seconds after the session opens: the upgrade of an established session")
    r.add_argument("--punch-anyway", action="store_true",
                   help="punch even when both sides are endpoint-dependent (policy skips it; the table says relay)")
    r.add_argument("--id", default=None,
                   help="campaign id (default: date-backend-nat-random); an existing id continues that campaign "
                        "if the settings match")
    _add_executor_args(r)
    r.add_argument("--results", default=None, help=RESULTS_HELP)
    r.set_defaults(func=cmd_run)


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=positive_int, default=None,
                   help="trial processes (default: one per CPU on sim, 1 otherwise); with --cluster local, "
                        "its workers")
    p.add_argument("--cluster", default=None, metavar="tcp://HOST:8786|local",
                   help="run the trials on a Dask cluster: a scheduler's address, or local for a LocalCluster "
                        "here (dashboard on 127.0.0.1:8787); this process still writes the results (docs/scale.md)")
