"""`qlab campaign run|resume|ls` and `qlab report`."""

from __future__ import annotations

import argparse
import json
import sys

from qlab.scenario.profiles import PROFILE_NAMES


def cmd_run(args: argparse.Namespace) -> int:
    from qlab.study import campaign, results

    spec = campaign.CampaignSpec(backend=args.backend, agent_nats=args.agent_nat, connector_nats=args.connector_nat,
                                 profile=args.profile, trials=args.trials, seed=args.seed,
                                 campaign_id=args.id or "", samples=args.samples, punch_anyway=args.punch_anyway)
    try:
        folder = campaign.run(spec, root=args.results, workers=args.workers)
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished trial is kept; continue with `qlab campaign resume {spec.campaign_id}`",
              file=sys.stderr)
        return 130
    df = results.load(folder)
    print(f"campaign {spec.campaign_id}: {len(df)} trials, {int(df.as_expected.sum())} as expected -> {folder}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from qlab.study import campaign

    folder = campaign.resume(args.id, root=args.results)
    print(f"campaign {args.id} complete -> {folder}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from qlab.study import results

    print(json.dumps(results.list_campaigns(args.results), indent=1))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qlab.study.report import run_report

    index = run_report(backend=args.backend, trials=args.trials, presets=args.presets, profile=args.profile,
                       root=args.results, out=args.out)
    print(f"report: {index}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("campaign", help="campaigns of trials and their results store")
    cs = c.add_subparsers(dest="campaign_command", required=True)
    r = cs.add_parser("run", help="run a campaign (agent NATs x connector NATs x trials)")
    r.add_argument("--backend", default="sim", choices=("sim", "netns", "loopback"))
    r.add_argument("--agent-nat", default="all", help="preset, comma list, or all")
    r.add_argument("--connector-nat", default="all", help="preset, comma list, or all")
    r.add_argument("--profile", default="wan-20ms", choices=PROFILE_NAMES)
    r.add_argument("--trials", type=int, default=30, help="per cell")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--samples", type=int, default=20, help="echo samples per path per trial")
    r.add_argument("--punch-anyway", action="store_true",
                   help="punch even when both sides are endpoint-dependent (policy skips it; the table says relay)")
    r.add_argument("--id", default=None, help="campaign id (default: date-backend-nat-random)")
    r.add_argument("--workers", type=int, default=None)
    r.add_argument("--results", default="results")
    r.set_defaults(func=cmd_run)
    rs = cs.add_parser("resume", help="complete an interrupted campaign")
    rs.add_argument("id")
    rs.add_argument("--results", default="results")
    rs.set_defaults(func=cmd_resume)
    ls = cs.add_parser("ls", help="campaigns under the results folder")
    ls.add_argument("--results", default="results")
    ls.set_defaults(func=cmd_ls)

    rp = sub.add_parser("report", help="run the default campaigns and publish the HTML report")
    rp.add_argument("--backend", default="sim", choices=("sim", "netns"))
    rp.add_argument("--trials", type=int, default=30, help="per cell")
    rp.add_argument("--presets", default="all", help="agent NAT presets (one campaign each)")
    rp.add_argument("--profile", default="wan-20ms", choices=PROFILE_NAMES)
    rp.add_argument("--results", default="results")
    rp.add_argument("--out", default=None, help="default: <results>/reports")
    rp.set_defaults(func=cmd_report)
