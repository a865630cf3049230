"""The fault trials of tests/test_faults.py, once each, with the figures docs/reliability.md quotes
(its Faults table): what each fault did to the session, from the trial record's `extra.fault`,
`failover_ms` and `echo_gap_ms`.

    .venv/bin/python benchmarks/faults.py [--backend sim|netns] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlab.experiment.record import TrialSpec  # noqa: E402
from qlab.experiment.trial import run_trial  # noqa: E402

# (name, TrialSpec fields): the specs tests/test_faults.py and tests/test_traversal.py use
FAULTS = [
    ("intermediate_restart", dict(agent_nat="port_restricted", connector_nat="full_cone",
                                  fault="intermediate_restart", outage_s=3.0)),
    ("connector_restart", dict(agent_nat="port_restricted", connector_nat="full_cone", fault="connector_restart",
                               outage_s=1.0)),
    ("blackhole", dict(agent_nat="port_restricted", connector_nat="full_cone", blackhole=True)),
    ("rebind", dict(agent_nat="symmetric", connector_nat="full_cone", fault="rebind")),
    ("idle, binding 1 s < keepalive 2 s", dict(agent_nat="port_restricted", connector_nat="port_restricted",
                                               fault="idle", idle_s=7.0, binding_timeout=1.0, keepalive=2.0)),
    ("idle, binding 3 s > keepalive 0.5 s", dict(agent_nat="port_restricted", connector_nat="port_restricted",
                                                 fault="idle", idle_s=7.0, binding_timeout=3.0, keepalive=0.5)),
]


def figures(name: str, r) -> str:
    f = r.extra.get("fault", {})
    if name == "intermediate_restart":
        return (f"direct echoes during the {f['outage_s']:g} s outage: {f['outage_direct_answered']}/"
                f"{f['outage_direct_sent']} answered over the direct path; reconnects agent {f['agent_reconnects']}, "
                f"connector {f['connector_reconnects']}; session re-opened {f['session_reopened']}x; relay back "
                f"{f['recovery_ms_after_restart']} ms after the restart")
    if name == "connector_restart":
        return (f"session re-opened {f['session_reopened']}; echo gap {f['echo_gap_ms']} ms; path after: "
                f"{f['path_after']}")
    if name == "blackhole":
        return f"failover {r.failover_ms} ms; echo gap {r.echo_gap_ms} ms"
    if name == "rebind":
        return (f"QAD {f['qad_before']} -> {f['qad_after']} (reported: {f['qad_reported_new_address']}); "
                f"{f['echoes_after']} echoes after; longest echo gap {f['max_echo_gap_ms']} ms")
    return (f"direct before: {f['direct_before']}; lost: {f['direct_lost']}; direct after {f['idle_s']:g} s "
            f"idle: {f['direct_after']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="sim", choices=("sim", "netns"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.disable(logging.CRITICAL)
    print(f"backend {args.backend}, profile wan-20ms, seed {args.seed}, 5 samples and 5 proof echoes per trial")
    for name, kw in FAULTS:
        r = run_trial(TrialSpec(backend=args.backend, seed=args.seed, samples=5, verify_echoes=5, **kw))
        print(f"{name}: {r.outcome}; {figures(name, r)}", flush=True)


if __name__ == "__main__":
    main()
