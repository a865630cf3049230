"""`qlab cloud plan|up|status|run|down|ls|reap|logs|policy`. Every AWS or boto3 error ends as one
line on stderr and a non-zero exit (`_one_line`), never a traceback."""

from __future__ import annotations

import argparse
import base64
import functools
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from qlab.cli.util import RESULTS_HELP, example
from qlab.nat.spec import parse_presets


def _spec(args: argparse.Namespace):
    from qlab.cloud.spec import DeploymentSpec

    presets = [p for p in parse_presets(args.presets) if p != "public"]
    if args.topology == "nat-matrix" and not presets and not args.managed_nat:
        raise ValueError(f"--presets {args.presets!r} leaves no NAT cell: nat-matrix needs at least one NAT preset")
    return DeploymentSpec(deployment_id=args.id or "", region=args.region or "", topology=args.topology,
                          presets=presets, agents_per_cell=args.agents, instance_type=args.instance_type,
                          ttl_hours=args.ttl, max_instances=args.max_instances, managed_nat=args.managed_nat,
                          domain=args.domain or "", acme_email=args.acme_email or "")


def _cloud(args: argparse.Namespace, region: str | None = None):
    from qlab.cloud.aws import Cloud

    return Cloud(region or args.region or "", profile=args.profile, endpoint_url=args.endpoint_url)


def _say(message: str) -> None:
    print(f"qlab cloud: {message}", file=sys.stderr, flush=True)


def _one_line(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """AWS's and boto3's errors as one line and exit 1 (bad input stays main()'s exit 2)."""

    @functools.wraps(cmd)
    def run(args: argparse.Namespace) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        from qlab.cloud.aws import explain
        from qlab.cloud.deploy import UpFailed

        try:
            return cmd(args)
        except (ClientError, BotoCoreError, UpFailed) as exc:
            print(f"qlab cloud {args.cloud_command}: {explain(exc) if not isinstance(exc, UpFailed) else exc}",
                  file=sys.stderr)
            return 1
    return run


def build_wheel() -> str:
    """A wheel of this checkout for the instances (pip wheel, no dependencies)."""
    out = tempfile.mkdtemp(prefix="qlab-wheel-")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, str(root)], check=True)
    return str(next(Path(out).glob("qlab-*.whl")))


def cmd_plan(args) -> int:
    from qlab.cloud.plan import plan

    spec = _spec(args)
    print(json.dumps(plan(spec, None if args.offline else _cloud(args, spec.region), id_chosen=bool(args.id)), indent=1))
    return 0


def cmd_up(args) -> int:
    from qlab.cloud import runs
    from qlab.cloud.deploy import up

    spec = _spec(args)  # bad input refused before the wheel is built
    wheel = args.wheel or build_wheel()
    if args.regions:
        states = runs.up_regions(spec, [r for r in args.regions.split(",") if r], lambda r: _cloud(args, r),
                                 certs_dir=args.certs, wheel=wheel, on_step=_say)
    else:
        states = [up(spec, _cloud(args, spec.region), certs_dir=args.certs, wheel=wheel, on_step=_say)]
    keys = ("deployment_id", "region", "expires", "intermediate_ips")
    print(json.dumps([{k: s[k] for k in keys} for s in states], indent=1))
    return 0


def _regions_of(args, deployment_id: str) -> list[str]:
    """Where a deployment is: its local state's region, else every region that holds anything of it."""
    from qlab.cloud.inventory import all_regions, deployment_regions
    from qlab.cloud.spec import check_id
    from qlab.cloud.state import load_state

    check_id(deployment_id)
    if args.region:
        return [args.region]
    try:
        return [load_state(deployment_id)["region"]]
    except FileNotFoundError:
        _say(f"no local state for {deployment_id}: searching every region")
        return deployment_regions(deployment_id, lambda r: _cloud(args, r), all_regions(_cloud(args, _home(args))))


def _home(args) -> str:
    """A region to ask for the list of regions: --region, boto3's chain, else us-east-1."""
    from qlab.cloud.aws import default_region

    return args.region or default_region(args.profile) or "us-east-1"


def cmd_run(args) -> int:
    from qlab.cloud import runs

    def show(p: dict) -> None:
        _say(f"{p['trials']} trials so far; {p['hosts_finished']}/{len(p['hosts'])} Agent hosts finished")

    out = runs.run_regions(args.ids, lambda r: _cloud(args, r), campaign_id=args.campaign, trials=args.trials,
                           samples=args.samples, root=args.results, timeout=args.timeout, poll=args.poll,
                           on_progress=show)
    print(json.dumps({"campaign": out["campaign"], "progress": out["progress"]}, indent=1))
    bad = {h: p for r in out["progress"].values() for h, p in r["hosts"].items() if p["status"] != "Success"}
    for host, p in sorted(bad.items()):
        _say(f"{host}: {p['status']}: {p.get('error') or 'no output'}")
    return 1 if bad or any(p.get("timed_out") for p in out["progress"].values()) else 0


def cmd_down(args) -> int:
    from qlab.cloud.deploy import down

    results = []
    for did in args.ids:
        regions = _regions_of(args, did)
        if not regions:
            results.append({"deployment_id": did, "region": None, "left": {}, "clean": True, "errors": []})
        results += [down(did, _cloud(args, r), on_step=_say) for r in regions]
    print(json.dumps(results, indent=1))
    for r in results:
        left = ", ".join(f"{len(v)} {k}" for k, v in r["left"].items() if v)
        _say(f"{r['deployment_id']} in {r['region']}: " + ("nothing left" if r["clean"] else f"left: {left}"))
    return 0 if all(r["clean"] for r in results) else 1


def cmd_status(args) -> int:
    from qlab.cloud.deploy import status

    print(json.dumps([status(args.id, _cloud(args, r)) for r in _regions_of(args, args.id)], indent=1))
    return 0


def cmd_ls(args) -> int:
    from qlab.cloud.inventory import all_regions, billable

    regions = [args.region] if args.region else all_regions(_cloud(args, _home(args)))
    rows = billable(lambda r: _cloud(args, r), regions)
    print(json.dumps(rows, indent=1, default=str))
    return 0


def cmd_reap(args) -> int:
    from qlab.cloud.deploy import tagged_instances
    from qlab.cloud.reaper import reap

    cloud = _cloud(args)
    # the reaper runs on the Intermediate and terminates it last
    me = [i["InstanceId"] for i in tagged_instances(cloud, args.id)
          if {"Key": "Name", "Value": f"{args.id}-intermediate"} in i.get("Tags", [])]
    out = reap(args.id, cloud, force=args.now, self_instance=me[0] if me else None)
    print(json.dumps(out, indent=1, default=str))
    return 0 if not out.get("errors") else 1


def cmd_logs(args) -> int:
    """Each instance's boot log (its serial console: cloud-init prints the user data's output there)."""
    from qlab.cloud.deploy import tagged_instances
    from qlab.cloud.spec import tag_map

    for region in _regions_of(args, args.id):
        cloud = _cloud(args, region)
        ec2 = cloud.client("ec2")
        for inst in tagged_instances(cloud, args.id):
            name = tag_map(inst).get("Name", inst["InstanceId"])
            if args.host and not name.endswith(f"-{args.host}"):
                continue
            raw = ec2.get_console_output(InstanceId=inst["InstanceId"], Latest=True).get("Output") or ""
            text = _console_text(raw)
            print(f"== {name} ({inst['InstanceId']}, {region})")
            print("\n".join(text.splitlines()[-args.lines:]) or "(no console output yet)")
    return 0


def _console_text(raw: str) -> str:
    """GetConsoleOutput's Output is base64 (the EC2 API reference says so; boto3 passes it on)."""
    try:
        return base64.b64decode(raw, validate=True).decode(errors="replace")
    except ValueError:
        return raw


def cmd_policy(args) -> int:
    from qlab.cloud.operator_policy import operator_policy

    print(json.dumps(operator_policy(args.account), indent=1))
    return 0


def _common(p: argparse.ArgumentParser, *, spec: bool = False) -> None:
    p.add_argument("--region", default=None, help="default: boto3's chain (AWS_REGION, your profile)")
    p.add_argument("--profile", default=None, help="an AWS profile (default: boto3's chain)")
    p.add_argument("--endpoint-url", default=None, help="another AWS endpoint (e.g. moto for a dry run)")
    if spec:
        p.add_argument("--id", default=None, help="deployment id (default: up draws qlab-<6 hex>)")
        p.add_argument("--topology", default="relay", choices=("relay", "nat-matrix"))
        p.add_argument("--presets", default="port_restricted")
        p.add_argument("--agents", type=int, default=1, help="Agent hosts per NAT cell")
        p.add_argument("--instance-type", default="t3.micro")
        p.add_argument("--ttl", type=float, default=2.0, help="hours until the reaper deletes what bills")
        p.add_argument("--max-instances", type=int, default=20)
        p.add_argument("--managed-nat", action="store_true", help="add a cell behind an AWS NAT Gateway")
        p.add_argument("--domain", default=None, help="serve a Let's Encrypt certificate for this name")
        p.add_argument("--acme-email", default=None, help="Let's Encrypt contact (with --domain)")


EXAMPLES = {
    "plan": "qlab cloud plan --id qlab-demo --presets full_cone,symmetric --offline",
    "up": "qlab cloud up --id qlab-demo --presets full_cone,symmetric --certs certs",
    "status": "qlab cloud status qlab-demo",
    "down": "qlab cloud down qlab-demo",
    "run": "qlab cloud run qlab-demo --campaign aws-demo --trials 5",
    "ls": "qlab cloud ls",
    "reap": "qlab cloud reap qlab-demo --now",
    "logs": "qlab cloud logs qlab-demo --host intermediate",
    "policy": "qlab cloud policy --account 123456789012",
}


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("cloud", help="deploy the lab on AWS (boto3's usual credentials)",
                       epilog=example("qlab cloud plan --offline", "qlab cloud up --certs certs"))
    cs = c.add_subparsers(dest="cloud_command", required=True)

    def command(name: str, func: Callable, help_text: str, *, spec: bool = False) -> argparse.ArgumentParser:
        p = cs.add_parser(name, help=help_text, description=help_text, epilog=example(EXAMPLES[name]))
        _common(p, spec=spec)
        p.set_defaults(func=_one_line(func))
        return p

    p = command("plan", cmd_plan, "what would be created, the cost, and the account's quotas; creates nothing",
                spec=True)
    p.add_argument("--offline", action="store_true", help="no AWS calls: resources and prices only")
    p = command("up", cmd_up, "create the deployment", spec=True)
    p.add_argument("--certs", required=True, help="a `qlab certs init` directory")
    p.add_argument("--wheel", default=None, help="a prebuilt qlab wheel (default: build one)")
    p.add_argument("--regions", default=None,
                   help="comma-separated regions: one deployment per region (<id>-<region>), created in parallel")
    command("status", cmd_status, "instances of a deployment").add_argument("id")
    p = command("down", cmd_down, "delete everything of one or more deployments and say what is left")
    p.add_argument("ids", nargs="+", metavar="ID", help="deployment ids (exact: no patterns)")
    p = command("run", cmd_run, "run a campaign on the Agent hosts (SSM) of one or more deployments, collect from S3")
    p.add_argument("ids", nargs="+", metavar="ID", help="deployment ids (several regions: one campaign)")
    p.add_argument("--campaign", required=True)
    p.add_argument("--trials", type=int, default=10, help="trials per (Agent host, Connector cell)")
    p.add_argument("--samples", type=int, default=20, help="echo samples per path")
    p.add_argument("--results", default=None, help=RESULTS_HELP)
    p.add_argument("--timeout", type=float, default=3600, help="seconds to follow the run before giving up")
    p.add_argument("--poll", type=float, default=10, help="seconds between progress checks")
    command("ls", cmd_ls, "every billable qlab resource (instances, addresses, NAT gateways, buckets), "
                          "every region unless --region, with age and cost so far")
    p = command("reap", cmd_reap, "delete what bills of an expired deployment (the Intermediate runs this at the TTL)")
    p.add_argument("id")
    p.add_argument("--now", action="store_true", help="reap even if the TTL has not passed")
    p = command("logs", cmd_logs, "each instance's boot log (serial console)")
    p.add_argument("id")
    p.add_argument("--host", default=None, help="only this host (e.g. intermediate, nat-symmetric)")
    p.add_argument("--lines", type=int, default=60)
    p = command("policy", cmd_policy, "the minimal IAM policy an operator needs for `qlab cloud`")
    p.add_argument("--account", default="*", help="your account id (default: any)")
