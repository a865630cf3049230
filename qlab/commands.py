"""`qlab trial`, `qlab classify` and `qlab report`: the lab-level commands."""

from __future__ import annotations

import argparse
import asyncio
import json

from qlab.cli_util import parse_addr
from qlab.nat.spec import PRESET_NAMES
from qlab.profiles import PROFILE_NAMES
from qlab.topology import SCENARIOS


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
    from qlab.trial import TrialSpec, run_trial

    spec = TrialSpec(
        backend=args.backend, agent_nat=args.agent_nat, connector_nat=args.connector_nat, profile=args.profile,
        scenario=args.scenario, seed=args.seed, samples=args.samples, echo_interval=args.echo_interval / 1000,
        punch_timeout=args.punch_timeout, blackhole=args.blackhole, birthday=args.birthday,
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
        from qlab.trial import run_classify

        out = run_classify(args.backend, args.nat, profile=args.profile, seed=args.seed, certs_dir=args.certs)
    print(json.dumps(out, indent=1))
    return 0 if out.get("preset") else 1


async def _classify_field(args: argparse.Namespace) -> dict:
    from qlab.certs import Credentials
    from qlab.endpoint import Endpoint
    from qlab.net import RealNet
    from qlab.traversal.detect import classify
    from qlab.traversal.punch import host_ips_for

    if not args.certs:
        raise ValueError("--certs DIR (the deployment's ca.pem and secret) is needed with --intermediate")
    net = RealNet()
    ep = Endpoint(net)
    await ep.bind("0.0.0.0", 0)
    try:
        v = await classify(ep, Credentials.load(args.certs), args.intermediate,
                           host_ips_for(ep.local_address, net.host_addresses()))
    finally:
        ep.close()
    return {**v.to_dict(), "backend": "field"}


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trial", help="run one hole-punch trial and print its JSON record")
    t.add_argument("--agent-nat", type=_preset, default="port_restricted")
    t.add_argument("--connector-nat", type=_preset, default="port_restricted")
    t.add_argument("--blackhole", action="store_true", help="drop the direct path mid-trial (fallback test)")
    t.add_argument("--compact", action="store_true", help="one line of JSON")
    add_trial_options(t)
    t.set_defaults(func=cmd_trial)

    c = sub.add_parser("classify", help="classify a NAT (RFC 5780 style, on qlab's own QAD)")
    c.add_argument("--nat", type=_preset, default="port_restricted", help="the preset to put in front (lab)")
    c.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), default=None,
                   help="classify this machine's NAT against a deployed Intermediate instead")
    add_trial_options(c)
    c.set_defaults(func=cmd_classify)
