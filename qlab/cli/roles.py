"""`qlab trial`, `qlab classify` and `qlab probe`: the commands that run trials and classifications."""

from __future__ import annotations

import argparse
import asyncio
import json

from qlab.backends.base import BACKENDS, check_loopback
from qlab.cli.table import pairs, text
from qlab.cli.util import RESULTS_HELP, example, nat_preset, non_negative_float, parse_addr, positive_int
from qlab.nat.firewall6 import PRESET6_NAMES
from qlab.nat.spec import PRESET_NAMES
from qlab.scenario.profiles import PROFILE_NAMES
from qlab.scenario.topology import SCENARIOS

PRESETS_HELP = f"NAT preset, one of: {', '.join(PRESET_NAMES)}; +map, +pcp or +upnp adds port mapping"
JSON_HELP = "print the full record as one line of JSON instead of the table (the table is printed whether or " \
            "not stdout is a terminal: ask for JSON explicitly)"


def add_lab_options(p: argparse.ArgumentParser) -> None:
    """What every lab command (trial, classify) needs: where it runs and with which certificates."""
    p.add_argument("--backend", default="sim", choices=BACKENDS,
                   help="sim: simulated network; netns: kernel NAT in namespaces (root or user namespaces); "
                        "loopback: no NAT, no delay")
    p.add_argument("--profile", default="wan-20ms", choices=PROFILE_NAMES, help="link profile")
    p.add_argument("--seed", type=int, default=0, help="random seed (the sim backend's whole run)")
    p.add_argument("--certs", default=None, help="certs dir (default: the lab's own CA in ~/.cache/qlab)")


def add_trial_options(p: argparse.ArgumentParser) -> None:
    """A trial's knobs beyond the lab: the scenario, the echo measurement and the punch."""
    add_lab_options(p)
    p.add_argument("--scenario", default="pair", choices=SCENARIOS, help="where the hosts sit")
    p.add_argument("--samples", type=positive_int, default=20, help="echo samples per path")
    p.add_argument("--echo-interval", type=non_negative_float, default=20.0, help="ms between echo probes")
    p.add_argument("--punch-timeout", type=non_negative_float, default=3.0, help="seconds")
    p.add_argument("--birthday", type=int, default=0, help="birthday-mode mappings (0 = off)")
    p.add_argument("--punch-delay", type=non_negative_float, default=0.0,
                   help="seconds both sides wait before punching: the upgrade of a session already on the relay")
    p.add_argument("--mode", default="terminated", choices=("terminated", "sealed"),
                   help="terminated: the Intermediate opens relayed traffic, the direct path is a second "
                        "connection; sealed: one end-to-end connection, relayed sealed, migrated to the direct path")


def cmd_trial(args: argparse.Namespace) -> int:
    from qlab.experiment.record import TrialSpec
    from qlab.experiment.trial import run_trial

    if args.backend == "loopback":  # refused before any work, in one line
        check_loopback([args.agent_nat, args.connector_nat], args.profile)
    agent_ipv6, connector_ipv6 = args.agent_ipv6 or args.ipv6 or "", args.connector_ipv6 or args.ipv6 or ""
    if (agent_ipv6 or connector_ipv6) and args.backend not in ("sim", "netns"):
        raise SystemExit("qlab trial: IPv6 (--ipv6, --agent-ipv6, --connector-ipv6) needs --backend sim or netns")
    spec = TrialSpec(
        backend=args.backend, agent_nat=args.agent_nat, connector_nat=args.connector_nat, profile=args.profile,
        scenario=args.scenario, seed=args.seed, samples=args.samples, echo_interval=args.echo_interval / 1000,
        punch_timeout=args.punch_timeout, blackhole=args.blackhole, birthday=args.birthday,
        punch_anyway=args.punch_anyway, fault=args.fault, outage_s=args.outage, idle_s=args.idle,
        relay_off_proof=not args.relay_stays_on, agent_ipv6=agent_ipv6, connector_ipv6=connector_ipv6,
        mode=args.mode, punch_delay=args.punch_delay,
    )
    rec = run_trial(spec, certs_dir=args.certs).to_dict()
    print(json.dumps(rec) if args.json else trial_table(rec))
    return 0 if rec["outcome"] != "failed" else 1


def _rtt(rec: dict, path: str) -> str:
    p50 = rec[f"rtt_{path}_p50_ms"]
    return "-" if p50 is None else f"{text(p50)} ms (n {rec[f'rtt_{path}_n']})"


def trial_table(rec: dict) -> str:
    """A trial record for people: what happened, how fast, why; `--json` has every field."""
    verified = "yes" if rec["direct_verified"] else "no"
    if rec["verify_sent"]:
        verified += f" ({rec['verify_received']} of {rec['verify_sent']} proof echoes came back direct)"
    rows: list[tuple[str, str | None]] = [
        ("outcome", rec["outcome"] + (f" (by {rec['mechanism']})" if rec.get("mechanism") else "")),
        ("mode", rec.get("mode") or "terminated"),
        ("expected", f"{rec['expected']} ({'as expected' if rec['as_expected'] else 'NOT as expected'})"),
        ("ttd", text(rec["ttd_ms"], " ms")), ("ttfb", text(rec["ttfb_ms"], " ms")),
        ("upgrade", text(rec.get("upgrade_ms"), " ms")),
        ("direct RTT p50", _rtt(rec, "direct")), ("relay RTT p50", _rtt(rec, "relay")),
        ("direct verified", verified), ("reason", rec["reason"]),
    ]
    for side in ("agent", "connector"):
        if rec.get(f"{side}_mapping"):  # the address a router granted (PCP, NAT-PMP, UPnP IGD)
            rows.append((f"{side} mapping", rec[f"{side}_mapping"]))
    ipv6 = (rec.get("extra") or {}).get("ipv6")
    if ipv6:  # a dual-stack trial: each side's IPv6 firewall, and the family of the direct path
        fw = ", ".join(f"{side} {ipv6.get(side) or 'none'}" for side in ("agent", "connector"))
        rows.append(("IPv6 firewalls", f"{fw}; direct path over {rec.get('path_family') or '-'}"))
    if rec.get("sim_calibration"):  # what the simulator charged for the roles' work (docs/sim.md)
        rows.append(("processing", f"calibration {rec['sim_calibration']}"))
    if rec["failover_ms"] is not None or rec["echo_gap_ms"] is not None:  # --blackhole
        rows += [("failover", text(rec["failover_ms"], " ms")), ("longest echo gap", text(rec["echo_gap_ms"], " ms"))]
    fault = (rec.get("extra") or {}).get("fault")
    if fault:
        figures = ", ".join(f"{k} {text(v)}" for k, v in fault.items()
                            if k != "fault" and (v is None or isinstance(v, (str, int, float))))
        rows.append(("fault", f"{fault.get('fault')}: {figures}"))
    if rec["error"]:
        rows.append(("error", rec["error"]))
    head = (f"trial {rec['trial_id']}: {rec['agent_nat']} -> {rec['connector_nat']}, backend {rec['backend']}, "
            f"profile {rec['profile']}, seed {rec['seed']}")
    return f"{head}\n{pairs(rows)}"


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify a NAT: in a lab (`--backend sim|netns --nat PRESET`), or from this machine against
    a deployed Intermediate (`--intermediate HOST:PORT --certs DIR`)."""
    if args.intermediate:
        out = asyncio.run(_classify_field(args))
    else:
        from qlab.experiment.classify import run_classify

        if args.backend == "loopback":
            check_loopback([args.nat], args.profile)
        out = run_classify(args.backend, args.nat, profile=args.profile, seed=args.seed, certs_dir=args.certs)
    print(json.dumps(out) if args.json else classify_table(out))
    return 0 if out.get("preset") else 1


def classify_table(out: dict) -> str:
    """A classification for people: the verdict, its behaviours, what was observed."""
    preset_line = out.get("preset") or "none matches"
    if "configured" in out:
        preset_line += f" (configured {out['configured']}: {'correct' if out['correct'] else 'WRONG'})"
    observed = (out.get("observed") or {}).get("primary")
    rows: list[tuple[str, str | None]] = [
        ("preset", preset_line), ("mapping", out.get("mapping")), ("filtering", out.get("filtering")),
        ("ports", out.get("ports")), ("hairpinning", text(out.get("hairpinning"))),
        ("port mapping", _offered(out["port_mapping"]) if "port_mapping" in out else None),
        ("observed", f"{observed[0]}:{observed[1]}" if observed else None),
        ("notes", "; ".join(out.get("notes") or [])), ("backend", out.get("backend")),
    ]
    return pairs(rows)


def _offered(protocols: list[str] | None) -> str:
    if protocols is None:
        return "not asked (the Intermediate is reached over loopback)"
    return ", ".join(protocols) or "none offered"


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
        **({"setup_window": args.setup_window} if args.setup_window is not None else {}),
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
    _register_trial(sub)
    c = sub.add_parser("classify", help="classify a NAT (RFC 5780 style, on qlab's own QAD)",
                       description="Classify a NAT: the preset --nat in a lab, or this machine's own NAT against "
                                   "a deployed Intermediate (--intermediate). Prints a table; --json for machines.",
                       epilog=example("qlab classify --backend sim --nat symmetric_seq",
                                      "qlab classify --intermediate relay.example.org:4433 --certs ./certs --json"))
    c.add_argument("--nat", type=nat_preset, metavar="PRESET", default="port_restricted",
                   help=f"the NAT put in front of the lab's Agent host; {PRESETS_HELP}")
    c.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), default=None, metavar="HOST:PORT",
                   help="classify this machine's NAT against a deployed Intermediate instead (needs --certs)")
    c.add_argument("--json", action="store_true", help=JSON_HELP.replace("record", "verdict"))
    add_lab_options(c)
    c.set_defaults(func=cmd_classify)
    _register_probe(sub)


def _register_trial(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("trial", help="run one hole-punch trial and print a summary (--json: the record)",
                       description="Run one hole-punch trial: an Agent and a Connector behind the given NATs "
                                   "reach each other through an Intermediate, then try a direct path. Prints a "
                                   "table; --json prints the full record (docs/results.md).",
                       epilog=example("qlab trial --agent-nat port_restricted --connector-nat symmetric_seq",
                                      "qlab trial --backend netns --agent-nat full_cone --json | jq .ttd_ms"))
    t.add_argument("--agent-nat", type=nat_preset, metavar="PRESET", default="port_restricted",
                   help=f"the Agent's {PRESETS_HELP}")
    t.add_argument("--connector-nat", type=nat_preset, metavar="PRESET", default="port_restricted",
                   help=f"the Connector's {PRESETS_HELP}")
    t.add_argument("--json", action="store_true", help=JSON_HELP)
    fws = ", ".join(PRESET6_NAMES)
    t.add_argument("--ipv6", choices=PRESET6_NAMES, metavar="FIREWALL", default=None,
                   help=f"make the lab dual-stack; both sides' routers filter IPv6 as FIREWALL ({fws}; "
                        "docs/traversal.md, IPv6). Default: IPv4 only")
    t.add_argument("--agent-ipv6", choices=PRESET6_NAMES, metavar="FIREWALL", default=None,
                   help="the Agent side's IPv6 firewall (overrides --ipv6; alone: only the Agent side has IPv6)")
    t.add_argument("--connector-ipv6", choices=PRESET6_NAMES, metavar="FIREWALL", default=None,
                   help="the Connector side's IPv6 firewall (overrides --ipv6)")
    t.add_argument("--compact", dest="json", action="store_true", help=argparse.SUPPRESS)  # the old name of --json
    t.add_argument("--blackhole", action="store_true", help="drop the direct path mid-trial (fallback test)")
    t.add_argument("--punch-anyway", action="store_true",
                   help="punch even when both sides are endpoint-dependent (policy skips it; the table says relay)")
    t.add_argument("--fault", default="", choices=("rebind", "idle", "intermediate_restart", "connector_restart"),
                   help="a fault mid-session; its figures are in the record's extra.fault (default: none)")
    t.add_argument("--outage", type=non_negative_float, default=3.0,
                   help="seconds a restarted role stays away (--fault)")
    t.add_argument("--idle", type=non_negative_float, default=3.0, help="seconds without traffic (--fault idle)")
    t.add_argument("--relay-stays-on", action="store_true",
                   help="prove the direct path as in the field: the relay is not switched off for the proof")
    add_trial_options(t)
    t.set_defaults(func=cmd_trial)


def _register_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="from this machine: classify its NAT and run trials against a deployment",
                       epilog=example("qlab probe --intermediate relay.example.org:4433 --certs ./certs "
                                      "--connector echo=full_cone --trials 5"))
    p.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), required=True, help="HOST:PORT")
    p.add_argument("--certs", required=True, help="the deployment's certs dir (ca.pem and secret)")
    p.add_argument("--connector", action="append", metavar="SERVICE[=NAT][@same_lan]",
                   help="a Connector service to try, with the NAT in front of it if known (repeatable; default echo)")
    p.add_argument("--agent-nat", default=None, metavar="NAT",  # ProbeSpec checks it (field NATs too)
                   help=f"this machine's NAT if known (default: classify): a preset ({', '.join(PRESET_NAMES)}) "
                        "or a field NAT such as aws_nat_gateway")
    p.add_argument("--no-classify", action="store_true", help="skip classifying this machine's NAT")
    p.add_argument("--trials", type=positive_int, default=5, help="trials per Connector service")
    p.add_argument("--samples", type=positive_int, default=20, help="echo samples per path")
    p.add_argument("--echo-interval", type=non_negative_float, default=20.0, help="ms between echo probes")
    p.add_argument("--punch-timeout", type=non_negative_float, default=3.0, help="seconds")
    p.add_argument("--setup-window", type=non_negative_float, default=None,
                   help="seconds to reach the Intermediate before a trial is recorded as failed (default 20)")
    p.add_argument("--campaign", default=None, help="campaign id (default: time, label and host)")
    p.add_argument("--results", default=None, help=RESULTS_HELP)
    p.add_argument("--label", default="field", choices=("field", "aws"), help="the backend recorded")
    p.add_argument("--host", default=None, help="host name recorded in trial ids (default: this host's)")
    p.add_argument("--upload", default=None, help="s3://BUCKET/PREFIX to mirror the campaign to after every trial")
    p.add_argument("--region", default=None, help="AWS region for --upload")
    p.add_argument("--bind", default="0.0.0.0", help="local address to probe from (0.0.0.0: any)")
    p.add_argument("--intermediate-name", default=None,
                   help="the Intermediate's public DNS name when it serves a Let's Encrypt certificate")
    p.set_defaults(func=cmd_probe)
