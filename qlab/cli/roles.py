"""`qlab trial`, `qlab classify` and `qlab probe`: the commands that run trials and classifications."""

from __future__ import annotations

import argparse
import asyncio
import json

from qlab.cli.util import parse_addr
from qlab.nat.spec import PRESET_NAMES
from qlab.scenario.profiles import PROFILE_NAMES
from qlab.scenario.topology import SCENARIOS


def _preset(text: str) -> str:
    if text not in PRESET_NAMES:
        raise argparse.ArgumentTypeError(f"unknown NAT preset {text!r}; choose one of: {', '.join(PRESET_NAMES)}")
    return text


def add_trial_options(p: argparse.ArgumentParser, default_backend: str = "sim") -> None:
    p.add_argument("--backend", default=default_backend, choices=("sim", "netns", "loopback"))
    p.add_argument("--profile", default="wan-20ms", choices=PROFILE_NAMES, help="link profile")
    p.add_argument("--scenario", default="pair", choices=SCENARIOS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=20, help="echo samples per path")
    p.add_argument("--echo-interval", type=float, default=20.0, help="ms between echo probes")
    p.add_argument("--punch-timeout", type=float, default=3.0, help="seconds")
    p.add_argument("--birthday", type=int, default=0, help="birthday-mode mappings (0 = off)")
    p.add_argument("--certs", default=None, help="certs dir (default: the lab's own CA in ~/.cache/qlab)")


def cmd_trial(args: argparse.Namespace) -> int:
    from qlab.experiment.record import TrialSpec
    from qlab.experiment.trial import run_trial

    spec = TrialSpec(
        backend=args.backend, agent_nat=args.agent_nat, connector_nat=args.connector_nat, profile=args.profile,
        scenario=args.scenario, seed=args.seed, samples=args.samples, echo_interval=args.echo_interval / 1000,
        punch_timeout=args.punch_timeout, blackhole=args.blackhole, birthday=args.birthday,
        punch_anyway=args.punch_anyway, fault=args.fault, outage_s=args.outage, idle_s=args.idle,
        relay_off_proof=not args.relay_stays_on,
    )
    result = run_trial(spec, certs_dir=args.certs)
    print(json.dumps(result.to_dict(), indent=None if args.compact else 1))
    return 0 if result.outcome != "failed" else 1


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify a NAT: in a lab (`--backend sim|netns --nat PRESET`), or from this machine against
    a deployed Intermediate (`--intermediate HOST:PORT --certs DIR`)."""
    if args.intermediate:
        out = asyncio.run(_classify_field(args))
    else:
        from qlab.experiment.classify import run_classify

        out = run_classify(args.backend, args.nat, profile=args.profile, seed=args.seed, certs_dir=args.certs)
    print(json.dumps(out, indent=1))
    return 0 if out.get("preset") else 1


def _certs_needed(args: argparse.Namespace) -> str:
    if not args.certs:
        raise ValueError("--certs DIR (the deployment's ca.pem and secret) is needed with --intermediate")
    return args.certs


async def _classify_field(args: argparse.Namespace) -> dict:
    from qlab.certs import Credentials
    from qlab.study.field import classify_here

    return {**await classify_here(args.intermediate, Credentials.load(_certs_needed(args))), "backend": "field"}


def cmd_probe(args: argparse.Namespace) -> int:
    """Classify this machine's NAT against a deployment, then run trials against its Connectors."""
    from qlab.study.field import ProbeSpec, Target, probe

    spec = ProbeSpec(
        intermediate=args.intermediate, certs=_certs_needed(args),
        targets=[Target.parse(t) for t in (args.connector or ["echo"])], agent_nat=args.agent_nat or "",
        classify=not args.no_classify, trials=args.trials, samples=args.samples,
        echo_interval=args.echo_interval / 1000, punch_timeout=args.punch_timeout, campaign_id=args.campaign or "",
        label=args.label, host=args.host or "", upload=args.upload or "", region=args.region or "", bind=args.bind,
        intermediate_name=args.intermediate_name or "",
    )
    counts: dict[str, int] = {}

    def show(rec: dict) -> None:
        counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
        rtt = rec["rtt_direct_p50_ms"] if rec["rtt_direct_p50_ms"] is not None else rec["rtt_relay_p50_ms"]
        print(f"{rec['trial_id']}: {rec['outcome']} (expected {rec['expected']}) p50 {rtt} ms"
              + (f" - {rec['reason']}" if rec["reason"] else ""), flush=True)

    d = probe(spec, root=args.results, on_result=show)
    print(json.dumps({"campaign": str(d), "outcomes": counts}, indent=1))
    return 0 if counts and "failed" not in counts else 1


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trial", help="run one hole-punch trial and print its JSON record")
    t.add_argument("--agent-nat", type=_preset, default="port_restricted")
    t.add_argument("--connector-nat", type=_preset, default="port_restricted")
    t.add_argument("--blackhole", action="store_true", help="drop the direct path mid-trial (fallback test)")
    t.add_argument("--compact", action="store_true", help="one line of JSON")
    t.add_argument("--punch-anyway", action="store_true",
                   help="punch even when both sides are endpoint-dependent (policy skips it; the table says relay)")
    t.add_argument("--fault", default="", choices=("rebind", "idle", "intermediate_restart", "connector_restart"),
                   help="a fault mid-session; its figures are in the record's extra.fault")
    t.add_argument("--outage", type=float, default=3.0, help="seconds a restarted role stays away (--fault)")
    t.add_argument("--idle", type=float, default=3.0, help="seconds without traffic (--fault idle)")
    t.add_argument("--relay-stays-on", action="store_true",
                   help="prove the direct path as in the field: the relay is not switched off for the proof")
    add_trial_options(t)
    t.set_defaults(func=cmd_trial)

    c = sub.add_parser("classify", help="classify a NAT (RFC 5780 style, on qlab's own QAD)")
    c.add_argument("--nat", type=_preset, default="port_restricted", help="the preset to put in front (lab)")
    c.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), default=None,
                   help="classify this machine's NAT against a deployed Intermediate instead")
    add_trial_options(c)
    c.set_defaults(func=cmd_classify)

    p = sub.add_parser("probe", help="from this machine: classify its NAT and run trials against a deployment")
    p.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), required=True, help="HOST:PORT")
    p.add_argument("--certs", required=True, help="the deployment's certs dir (ca.pem and secret)")
    p.add_argument("--connector", action="append", metavar="SERVICE[=NAT][@same_lan]",
                   help="a Connector service to try, with the NAT in front of it if known (repeatable; default echo)")
    p.add_argument("--agent-nat", default=None, help="this machine's NAT preset if known (default: classify)")
    p.add_argument("--no-classify", action="store_true")
    p.add_argument("--trials", type=int, default=5, help="trials per Connector service")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--echo-interval", type=float, default=20.0, help="ms between echo probes")
    p.add_argument("--punch-timeout", type=float, default=3.0)
    p.add_argument("--campaign", default=None, help="campaign id (default: time, label and host)")
    p.add_argument("--results", default=None, help="results root (default results/ or $QLAB_RESULTS)")
    p.add_argument("--label", default="field", choices=("field", "aws"), help="the backend recorded")
    p.add_argument("--host", default=None, help="host name recorded in trial ids (default: this host's)")
    p.add_argument("--upload", default=None, help="s3://BUCKET/PREFIX to mirror the campaign to after every trial")
    p.add_argument("--region", default=None, help="AWS region for --upload")
    p.add_argument("--bind", default="0.0.0.0", help="local address to probe from (default: any)")
    p.add_argument("--intermediate-name", default=None,
                   help="the Intermediate's public DNS name when it serves a Let's Encrypt certificate")
    p.set_defaults(func=cmd_probe)
