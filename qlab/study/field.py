"""Trials in the field: only the Agent runs here. The Intermediate and the Connector are a
deployment somewhere else (the AWS backend's, or any qlab deployment), and every NAT on the way is
real — nothing is simulated and nothing can be switched off for the proof.

`qlab probe` is the entry point: classify this machine's NAT against the deployment's Intermediate,
then run trials against one or more Connector services. Every trial goes into a campaign folder like
any lab trial (same schema, same notebooks), with backend `field` — or `aws` when the cloud backend
runs it on its own Agent hosts — and, optionally, is mirrored to S3 after every trial so a remote
run can be followed and collected.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qlab.certs import Credentials
from qlab.experiment.record import TrialResult, TrialSpec, error_text
from qlab.experiment.trial import SETUP_WINDOW, AgentSide, side_result, trial_traversal_config
from qlab.experiment.trial import off_loop as _off_loop
from qlab.nat.spec import PRESET_NAMES
from qlab.nat.spec import expected_or_unknown as expected_for
from qlab.study.results import CampaignStore, campaign_dir, check_id

log = logging.getLogger("qlab.study.field")

LABELS = ("field", "aws")
UNKNOWN = "unknown"
FIELD_NATS = (UNKNOWN, "aws_nat_gateway")  # NATs that are not presets: their behaviour is measured, not known
_TARGET_RE = re.compile(r"^(?P<service>[A-Za-z0-9._-]{1,64})(=(?P<nat>[a-z_]+))?(@(?P<scenario>pair|same_lan))?$")


@dataclass(frozen=True)
class Target:
    """A Connector service to run trials against, and what is known about the NAT in front of it."""

    service: str
    connector_nat: str = UNKNOWN
    scenario: str = "pair"  # "same_lan" when Agent and Connector sit behind the same NAT

    @classmethod
    def parse(cls, text: str) -> Target:
        """`SERVICE[=NAT][@pair|@same_lan]`, e.g. `echo-symmetric=symmetric`."""
        m = _TARGET_RE.match(text)
        if not m:
            raise ValueError(f"bad target {text!r}: SERVICE[=NAT_PRESET][@pair|@same_lan]")
        nat = m["nat"] or UNKNOWN
        if nat not in FIELD_NATS and nat not in PRESET_NAMES:
            raise ValueError(f"unknown NAT preset {nat!r} in {text!r}; choose one of: {', '.join(PRESET_NAMES)}")
        return cls(m["service"], nat, m["scenario"] or "pair")


@dataclass
class ProbeSpec:
    intermediate: tuple[str, int]
    certs: str
    targets: list[Target] = field(default_factory=lambda: [Target("echo")])
    agent_nat: str = ""  # "" = use what classification finds (or "unknown")
    classify: bool = True
    trials: int = 5
    samples: int = 20
    echo_interval: float = 0.02
    punch_timeout: float = 3.0
    setup_window: float = SETUP_WINDOW  # seconds to reach the Intermediate (handshakes retried within it)
    campaign_id: str = ""
    label: str = "field"
    host: str = ""  # who ran it; trial ids start with it, so several hosts can share a campaign
    upload: str = ""  # s3://bucket/prefix/ to mirror the campaign folder to after every trial
    region: str = ""
    bind: str = "0.0.0.0"  # the local address for classification and trials
    intermediate_name: str = ""  # a Let's Encrypt deployment's DNS name (verified against public CAs)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}")
        if not self.targets:
            raise ValueError("at least one target (Connector service) is needed")
        if not 1 <= self.trials <= 10000:
            raise ValueError("trials per target must be between 1 and 10000")
        if not 1.0 <= self.setup_window <= 600.0:
            raise ValueError("the setup window must be between 1 and 600 seconds")
        if self.agent_nat and self.agent_nat not in (*PRESET_NAMES, *FIELD_NATS):
            raise ValueError(f"unknown agent NAT {self.agent_nat!r}")
        if self.upload and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?$", self.upload):
            raise ValueError(f"--upload must be s3://BUCKET/PREFIX, got {self.upload!r}")
        self.host = re.sub(r"[^A-Za-z0-9_-]", "-", self.host or socket.gethostname())[:40] or "host"
        if not self.campaign_id:
            self.campaign_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{self.label}-{self.host}"
        check_id(self.campaign_id)


async def classify_here(intermediate: tuple[str, int], creds: Credentials, bind: str = "0.0.0.0") -> dict:
    """Classify the NAT in front of this machine against a deployed Intermediate."""
    from qlab.endpoint import Endpoint
    from qlab.net import RealNet
    from qlab.traversal.detect import classify
    from qlab.traversal.portmap import protocols_towards
    from qlab.traversal.punch import host_ips_for

    net = RealNet()
    ep = Endpoint(net)
    await ep.bind(bind, 0)
    try:
        v = await classify(ep, creds, intermediate, host_ips_for(ep.local_address, net.host_addresses()))
    finally:
        ep.close()
    return {**v.to_dict(), "port_mapping": await protocols_towards(net, intermediate)}


async def field_trial(spec: TrialSpec, creds: Credentials, intermediate: tuple[str, int], service: str,
                      bind: str = "0.0.0.0", setup_window: float = SETUP_WINDOW) -> TrialResult:
    """One trial from this machine: the same Agent side as in the labs, on a real socket."""
    from qlab.net import RealNet

    loop = asyncio.get_running_loop()
    started, w0 = time.time(), loop.time()
    side, error = None, ""
    try:
        side = AgentSide(RealNet(), creds, intermediate, spec, trial_traversal_config(spec), service=service,
                         bind=bind, connect_window=setup_window)
        await side.run()
    except Exception as exc:  # a failing trial is a result too
        log.warning("trial %s failed: %s", spec.trial_id, exc)
        error = error_text(exc)
    finally:
        if side is not None:
            side.close()
        await asyncio.sleep(0)
    return side_result(spec, side, started, loop.time() - w0, error,
                       expected=expected_for(spec.agent_nat, spec.connector_nat),
                       measured_where=f", service {service} via {intermediate[0]}:{intermediate[1]}")


def probe(ps: ProbeSpec, *, root: Path | str | None = None,
          on_result: Callable[[dict], None] | None = None) -> Path:
    """Classify (optionally), then run `trials` per target; returns the campaign folder. Trials
    already in the folder (same ids) are not run again, so a probe resumes."""
    return _off_loop(lambda: asyncio.run(_probe(ps, root, on_result)))


async def _probe(ps: ProbeSpec, root, on_result) -> Path:
    from qlab.study.campaign import provenance

    creds = Credentials.load(ps.certs).with_tls(intermediate_name=ps.intermediate_name)
    d = campaign_dir(ps.campaign_id, root)
    store = CampaignStore(d)
    mirror = S3Mirror(ps.upload, ps.region) if ps.upload else None
    verdict: dict = {}
    if ps.classify:
        try:
            verdict = await classify_here(ps.intermediate, creds, ps.bind)
        except Exception as exc:  # classification failing must not cost the trials
            verdict = {"preset": None, "error": error_text(exc)}
    agent_nat = ps.agent_nat or verdict.get("preset") or UNKNOWN
    manifest = {
        "campaign_id": ps.campaign_id, "backend": ps.label, "profile": "internet",
        "parameters": {**dataclasses.asdict(ps), "targets": [dataclasses.asdict(t) for t in ps.targets]},
        "cells": [[agent_nat, t.connector_nat] for t in ps.targets], "trials": ps.trials,
        "expected": {f"{agent_nat}|{t.connector_nat}": expected_for(agent_nat, t.connector_nat) for t in ps.targets},
        "agent_nat_source": "declared" if ps.agent_nat else ("classified" if verdict.get("preset") else "unknown"),
        "classification": verdict, **provenance(),
    }
    earlier = store.manifest().get("classifications", []) if (d / "manifest.json").exists() else []
    manifest["classifications"] = [*earlier, verdict]  # one per run of the probe (it resumes)
    store.write_manifest(manifest)
    done = {r["trial_id"] for r in store.records()}
    if mirror:
        mirror.push(d)
    for t in ps.targets:
        for i in range(ps.trials):
            tid = f"{ps.host}.{t.service}.{i:04d}"
            if tid in done:
                continue
            spec = TrialSpec(backend=ps.label, agent_nat=agent_nat, connector_nat=t.connector_nat, profile="internet",
                             scenario=t.scenario, samples=ps.samples, echo_interval=ps.echo_interval,
                             punch_timeout=ps.punch_timeout, trial_id=tid, campaign_id=ps.campaign_id)
            rec = (await field_trial(spec, creds, ps.intermediate, t.service, ps.bind, ps.setup_window)).to_dict()
            rec["extra"] = {**rec["extra"], "host": ps.host, "service": t.service,
                            "agent_nat_source": manifest["agent_nat_source"]}
            store.append(rec)
            if mirror:
                mirror.push(d, tables=False)
            if on_result:
                on_result(rec)
    store.write_tables()
    manifest["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_manifest(manifest)
    if mirror:
        mirror.push(d)
    return d


class S3Mirror:
    """Copies a campaign folder's files to s3://bucket/prefix/ (credentials from boto3's chain —
    on a deployment's host, its instance role)."""

    def __init__(self, url: str, region: str = "") -> None:
        import boto3

        bucket, _, prefix = url[len("s3://"):].partition("/")
        self.bucket, self.prefix = bucket, prefix.rstrip("/") + "/" if prefix else ""
        self.s3 = boto3.client("s3", **({"region_name": region} if region else {}))

    def push(self, folder: Path, *, tables: bool = True) -> None:
        names = ["manifest.json", "trials.jsonl"] + (["trials.csv", "trials.parquet"] if tables else [])
        for name in names:
            if (folder / name).exists():
                self.s3.upload_file(str(folder / name), self.bucket, self.prefix + name)
