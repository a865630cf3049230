"""`qlab cloud plan|up|status|run|down|ls`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from qlab.nat.spec import parse_presets


def _spec(args: argparse.Namespace):
    from qlab.cloud.deploy import DeploymentSpec

    presets = [p for p in parse_presets(args.presets) if p != "public"]
    return DeploymentSpec(deployment_id=args.id or "", region=args.region, topology=args.topology, presets=presets,
                          agents_per_cell=args.agents, instance_type=args.instance_type, ttl_hours=args.ttl,
                          max_instances=args.max_instances, managed_nat=args.managed_nat,
                          domain=args.domain or "", acme_email=args.acme_email or "")


def _cloud(args: argparse.Namespace, region: str | None = None):
    from qlab.cloud.deploy import Cloud

    return Cloud(region or args.region, profile=args.profile, endpoint_url=args.endpoint_url)


def build_wheel() -> str:
    """A wheel of this checkout for the instances (pip wheel, no dependencies)."""
    out = tempfile.mkdtemp(prefix="qlab-wheel-")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, str(root)], check=True)
    return str(next(Path(out).glob("qlab-*.whl")))


def cmd_plan(args):
    from qlab.cloud.deploy import plan

    print(json.dumps(plan(_spec(args)), indent=1))
    return 0


def cmd_up(args):
    from qlab.cloud import runs
    from qlab.cloud.deploy import up

    wheel = args.wheel or build_wheel()
    if args.regions:
        states = runs.up_regions(_spec(args), [r for r in args.regions.split(",") if r], lambda r: _cloud(args, r),
                                 certs_dir=args.certs, wheel=wheel)
    else:
        states = [up(_spec(args), _cloud(args), certs_dir=args.certs, wheel=wheel)]
    keys = ("deployment_id", "region", "expires", "intermediate_ips")
    print(json.dumps([{k: s[k] for k in keys} for s in states], indent=1))
    return 0


def _state_cloud(args, deployment_id: str):
    """The cloud of a deployment's own region (from its local state), else --region."""
    from qlab.cloud.deploy import load_state

    try:
        return _cloud(args, load_state(deployment_id)["region"])
    except FileNotFoundError:
        return _cloud(args)


def cmd_run(args):
    from qlab.cloud import runs

    def show(p: dict) -> None:
        print(f"{p['trials']} trials so far; {p['hosts_finished']}/{len(p['hosts'])} Agent hosts finished",
              file=sys.stderr, flush=True)

    out = runs.run_regions(args.ids, lambda r: _cloud(args, r), campaign_id=args.campaign, trials=args.trials,
                           samples=args.samples, root=args.results, timeout=args.timeout, poll=args.poll,
                           on_progress=show)
    print(json.dumps({"campaign": out["campaign"], "progress": out["progress"]}, indent=1))
    return 0 if not any(p.get("timed_out") for p in out["progress"].values()) else 1


def cmd_down(args):
    from qlab.cloud.deploy import down

    results = [down(i, _state_cloud(args, i)) for i in args.ids]
    print(json.dumps(results, indent=1))
    return 0 if all(r["clean"] for r in results) else 1


def cmd_status(args):
    from qlab.cloud.deploy import status

    print(json.dumps(status(args.id, _state_cloud(args, args.id)), indent=1))
    return 0


def cmd_ls(args):
    from qlab.cloud.deploy import ls

    regions = [args.region]
    if args.all_regions:
        regions = [r["RegionName"] for r in _cloud(args).client("ec2").describe_regions()["Regions"]]
    print(json.dumps(ls(lambda r: _cloud(args, r), regions), indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cloud", help="deploy the lab on AWS (boto3's usual credentials)")
    cs = c.add_subparsers(dest="cloud_command", required=True)

    def common(p, *, spec=False):
        p.add_argument("--region", default="us-east-1")
        p.add_argument("--profile", default=None, help="an AWS profile (default: boto3's chain)")
        p.add_argument("--endpoint-url", default=None, help="another AWS endpoint (e.g. moto for a dry run)")
        if spec:
            p.add_argument("--id", default=None)
            p.add_argument("--topology", default="relay", choices=("relay", "nat-matrix"))
            p.add_argument("--presets", default="port_restricted")
            p.add_argument("--agents", type=int, default=1, help="Agent hosts per NAT cell")
            p.add_argument("--instance-type", default="t3.micro")
            p.add_argument("--ttl", type=float, default=2.0, help="hours until the instances terminate themselves")
            p.add_argument("--max-instances", type=int, default=20)
            p.add_argument("--managed-nat", action="store_true", help="add a cell behind an AWS NAT Gateway")
            p.add_argument("--domain", default=None, help="serve a Let's Encrypt certificate for this name")
            p.add_argument("--acme-email", default=None, help="Let's Encrypt contact (with --domain)")

    p = cs.add_parser("plan", help="what would be created, and the hourly cost; creates nothing")
    common(p, spec=True)
    p.set_defaults(func=cmd_plan)
    p = cs.add_parser("up", help="create the deployment")
    common(p, spec=True)
    p.add_argument("--certs", required=True, help="a `qlab certs init` directory")
    p.add_argument("--wheel", default=None, help="a prebuilt qlab wheel (default: build one)")
    p.add_argument("--regions", default=None,
                   help="comma-separated regions: one deployment per region (<id>-<region>), created in parallel")
    p.set_defaults(func=cmd_up)
    p = cs.add_parser("status", help="instances of a deployment")
    common(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_status)
    p = cs.add_parser("down", help="delete everything of one or more deployments and verify")
    common(p)
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_down)
    p = cs.add_parser("run", help="run a campaign on the Agent hosts (SSM) of one or more deployments, collect from S3")
    common(p)
    p.add_argument("ids", nargs="+", metavar="ID", help="deployment ids (several regions: one campaign)")
    p.add_argument("--campaign", required=True)
    p.add_argument("--trials", type=int, default=10, help="trials per (Agent host, Connector cell)")
    p.add_argument("--samples", type=int, default=20, help="echo samples per path")
    p.add_argument("--results", default=None, help="results root (default results/ or $QLAB_RESULTS)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to follow the run before giving up")
    p.add_argument("--poll", type=float, default=10, help="seconds between progress checks")
    p.set_defaults(func=cmd_run)
    p = cs.add_parser("ls", help="every qlab instance, with age and cost so far")
    common(p)
    p.add_argument("--all-regions", action="store_true")
    p.set_defaults(func=cmd_ls)
