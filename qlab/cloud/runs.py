"""A campaign on a deployment: `qlab probe` started on every Agent host with SSM Run Command, each
host mirroring its campaign folder to the deployment's bucket after every trial, then everything
merged into one local campaign (backend `aws`) that the notebooks load like any other.

The matrix: an Agent host in cell A runs trials against the Connector of every cell B (service
`echo-B`), through A's NAT and B's NAT, so N cells give N×N pairs of real NATs; A = B is the same
NAT (scenario `same_lan`). The managed cell (an AWS NAT Gateway) has no known behaviour: its
trials carry `aws_nat_gateway` and expect nothing, and each host's classification of its own NAT is
kept in the manifest.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from qlab.cloud.userdata import READY
from qlab.study.results import CampaignStore, campaign_dir, check_id, validate_record

if TYPE_CHECKING:
    from qlab.cloud.deploy import Cloud

MANAGED = "aws_nat_gateway"
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
REMOTE_RESULTS = "/var/lib/qlab/results"
FINAL = ("Success", "Failed", "Cancelled", "TimedOut", "Cancelling")


def nat_label(cell: str) -> str:
    return MANAGED if cell == "managed" else cell


def probe_command(*, host: str, cell: str, cells: dict[str, dict], intermediate: str, campaign_id: str,
                  bucket: str, region: str, trials: int, samples: int = 20, domain: str = "") -> str:
    """The shell command an Agent host runs (AWS-RunShellScript): every argument quoted. Trial ids
    start with region and host, so several regions can share one campaign."""
    argv = ["/opt/qlab/bin/qlab", "probe", "--intermediate", f"{intermediate}:4433", "--certs", "/etc/qlab/certs",
            "--agent-nat", nat_label(cell), "--trials", str(int(trials)), "--samples", str(int(samples)),
            "--campaign", campaign_id, "--label", "aws", "--host", f"{region}-{host}", "--results", REMOTE_RESULTS,
            "--upload", f"s3://{bucket}/results/{campaign_id}/{host}/", "--region", region]
    if domain:
        argv += ["--intermediate-name", domain]
    for b, rec in sorted(cells.items()):
        target = f"{rec['service']}={nat_label(b)}"
        argv += ["--connector", target + ("@same_lan" if b == cell else "")]
    return " ".join(shlex.quote(a) for a in argv)


# a freshly booted host may still be installing qlab: wait for its bootstrap (bounded, 15 min)
WAIT_READY = (f"for _ in $(seq 1 90); do [ -e {READY} ] && break; sleep 10; done; "
              f"[ -e {READY} ] || {{ echo 'qlab bootstrap did not finish' >&2; exit 3; }}")


def _send(ssm, instance: str, commands: list[str], comment: str, register_timeout: float) -> dict:
    """send_command, retried while the instance's SSM agent has not registered yet (bounded)."""
    from botocore.exceptions import ClientError

    deadline = time.monotonic() + register_timeout
    while True:
        try:
            return ssm.send_command(InstanceIds=[instance], DocumentName="AWS-RunShellScript",
                                    Parameters={"commands": commands, "executionTimeout": ["7200"]},
                                    TimeoutSeconds=600, Comment=comment)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidInstanceId" or time.monotonic() >= deadline:
                raise
            time.sleep(10)


def start(state: dict, cloud, *, campaign_id: str, trials: int, samples: int = 20, register_timeout: float = 600) -> dict[str, dict]:
    """Send the probe command to every Agent host; returns {host: {instance, command_id, command}}."""
    check_id(campaign_id)
    cells = state.get("cells", {})
    agents = {host: cell for cell, rec in cells.items() for host in rec["agents"]}
    if not agents:
        raise ValueError(f"deployment {state['deployment_id']} has no Agent hosts (topology "
                         f"{state['spec']['topology']}); run `qlab probe` from your own machine instead")
    ssm = cloud.client("ssm")
    out = {}
    for host, cell in sorted(agents.items()):
        info = state["instances"][host]
        cmd = probe_command(host=host, cell=cell, cells=cells, intermediate=state["intermediate_ip"],
                            campaign_id=campaign_id, bucket=state["bucket"], region=state["region"],
                            trials=trials, samples=samples, domain=state["spec"].get("domain", ""))
        r = _send(ssm, info["id"], [WAIT_READY, cmd], f"qlab campaign {campaign_id}", register_timeout)
        out[host] = {"instance": info["id"], "command_id": r["Command"]["CommandId"], "command": cmd,
                     "cells": len(cells)}
    return out


def progress(state: dict, cloud, campaign_id: str, commands: dict[str, dict]) -> dict:
    """Where the run is: each host's command status and trials mirrored to S3 so far."""
    ssm, s3 = cloud.client("ssm"), cloud.client("s3")
    hosts = {}
    for host, c in commands.items():
        error = ""
        try:
            inv = ssm.get_command_invocation(CommandId=c["command_id"], InstanceId=c["instance"])
            status = inv["Status"]
            if status in FINAL and status != "Success":  # what the host said: the last lines of its stderr
                error = " | ".join((inv.get("StandardErrorContent") or "").strip().splitlines()[-3:])
        except ssm.exceptions.InvocationDoesNotExist:
            status = "Pending"
        try:
            body = s3.get_object(Bucket=state["bucket"], Key=f"results/{campaign_id}/{host}/trials.jsonl")["Body"]
            done = sum(1 for line in body.read().splitlines() if line.strip())
        except s3.exceptions.NoSuchKey:
            done = 0
        hosts[host] = {"status": status, "trials": done, **({"error": error} if error else {})}
    finished = sum(h["status"] in FINAL for h in hosts.values())
    return {"hosts": hosts, "trials": sum(h["trials"] for h in hosts.values()), "hosts_finished": finished,
            "finished": finished == len(hosts)}


def wait(state: dict, cloud, campaign_id: str, commands: dict[str, dict], *, timeout: float = 3600,
         poll: float = 10, on_progress: Callable[[dict], None] | None = None) -> dict:
    """Poll until every host's command is final or `timeout` passes (then say which are not)."""
    deadline = time.monotonic() + timeout
    while True:
        p = progress(state, cloud, campaign_id, commands)
        if on_progress:
            on_progress(p)
        if p["finished"] or time.monotonic() >= deadline:
            p["timed_out"] = not p["finished"]
            return p
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def collect(state: dict, cloud, campaign_id: str, root: Path | str | None = None) -> Path:
    """Merge every host's mirrored campaign into results/<campaign-id>/ (backend `aws`). Runs again
    without duplicating a trial; keys that are not `results/<id>/<host>/<file>` are refused."""
    s3 = cloud.client("s3")
    bucket = state["bucket"]
    d = campaign_dir(campaign_id, root)
    store = CampaignStore(d)
    have = {r["trial_id"] for r in store.records()}
    prefix = f"results/{campaign_id}/"
    host_manifests: dict[str, dict] = {}
    added = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            host, _, name = obj["Key"][len(prefix):].partition("/")
            if not HOST_RE.match(host) or name not in ("manifest.json", "trials.jsonl", "trials.csv", "trials.parquet"):
                raise ValueError(f"refusing S3 key outside the campaign layout: {obj['Key']!r}")
            if name == "manifest.json":
                host_manifests[host] = json.loads(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            elif name == "trials.jsonl":
                for line in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode().splitlines():
                    try:
                        rec = validate_record(json.loads(line))
                    except ValueError:
                        continue  # a line cut short while the host was writing: it will be whole next time
                    if rec["trial_id"] in have:
                        continue
                    rec["backend"] = "aws"
                    rec["extra"] = {**(rec.get("extra") or {}), "deployment": state["deployment_id"],
                                    "region": state["region"]}
                    store.append(rec)
                    have.add(rec["trial_id"])
                    added += 1
    _write_manifest(store, state, campaign_id, host_manifests)
    store.write_tables()
    return d


def _write_manifest(store: CampaignStore, state: dict, campaign_id: str, host_manifests: dict[str, dict]) -> None:
    from qlab.study.campaign import provenance

    old = store.manifest() if (store.dir / "manifest.json").exists() else {}
    hosts = {**old.get("hosts", {}), **{h: {"region": state["region"], "deployment": state["deployment_id"],
                                            "classification": m.get("classification"),
                                            "qlab_version": m.get("qlab_version"), "kernel": m.get("kernel"),
                                            "finished_at": m.get("finished_at")}
                                        for h, m in host_manifests.items()}}
    cells = sorted({tuple(c) for m in host_manifests.values() for c in m.get("cells", [])}
                   | {tuple(c) for c in old.get("cells", [])})
    expected = {**old.get("expected", {}), **{k: v for m in host_manifests.values()
                                               for k, v in m.get("expected", {}).items()}}
    deployments = sorted({*old.get("deployments", []), f"{state['deployment_id']}@{state['region']}"})
    store.write_manifest({**old, **{k: v for k, v in provenance().items() if k not in old},
                          "campaign_id": campaign_id, "backend": "aws", "profile": "internet",
                          "deployments": deployments, "hosts": hosts, "cells": [list(c) for c in cells],
                          "expected": expected, "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def run_campaign(spec, cloud, *, certs_dir: str, wheel: str, campaign_id: str, trials: int, samples: int = 20,
                 dry_run: bool = False, keep: bool = False, root: Path | str | None = None, timeout: float = 3600,
                 poll: float = 10, on_progress: Callable[[dict], None] | None = None) -> dict:
    """plan -> up -> run -> collect -> down, the whole cloud campaign in one call (the notebook's).
    The deployment is taken down at the end — also when any step fails — unless `keep`."""
    from qlab.cloud import deploy

    out: dict = {"plan": deploy.plan(spec), "dry_run": dry_run, "campaign": None, "progress": None, "down": None}
    if dry_run:
        return out
    state = deploy.up(spec, cloud, certs_dir=certs_dir, wheel=wheel)
    try:
        out["status"] = deploy.status(spec.deployment_id, cloud)
        commands = start(state, cloud, campaign_id=campaign_id, trials=trials, samples=samples)
        out["progress"] = wait(state, cloud, campaign_id, commands, timeout=timeout, poll=poll,
                               on_progress=on_progress)
        out["campaign"] = collect(state, cloud, campaign_id, root)
    finally:
        if not keep:
            out["down"] = deploy.down(spec.deployment_id, cloud)
    return out


# --- several regions at once ---------------------------------------------------------------------


def regional_specs(spec, regions: list[str]) -> list:
    """One deployment per region, ids `<id>-<region>`, otherwise identical."""
    import dataclasses

    if len(set(regions)) != len(regions) or not regions:
        raise ValueError("list each region once")
    return [dataclasses.replace(spec, region=r, deployment_id=f"{spec.deployment_id}-{r}") for r in regions]


def up_regions(spec, regions: list[str], cloud_for: Callable[[str], Cloud], *, certs_dir: str, wheel: str,
               on_step: Callable[[str], None] | None = None) -> list[dict]:
    """`up` in every region in parallel; if any region fails, the regions that came up are taken
    down again (a failed `up` has rolled itself back, or refused before creating anything — an id
    that already exists there must not be deleted by this rollback)."""
    from concurrent.futures import ThreadPoolExecutor

    from qlab.cloud import deploy

    specs = regional_specs(spec, regions)
    for s in specs:
        deploy.plan(s)  # every cap and input checked before anything exists anywhere
    with ThreadPoolExecutor(len(specs)) as pool:
        futures = [pool.submit(deploy.up, s, cloud_for(s.region), certs_dir=certs_dir, wheel=wheel,
                               on_step=_prefixed(on_step, s.region)) for s in specs]
        errors = [f.exception() for f in futures]
    if any(errors):
        came_up = [s for s, e in zip(specs, errors, strict=True) if e is None]
        if came_up:
            with ThreadPoolExecutor(len(came_up)) as pool:
                list(pool.map(lambda s: deploy.down(s.deployment_id, cloud_for(s.region)), came_up))
        raise next(e for e in errors if e)
    return [f.result() for f in futures]


def _prefixed(on_step: Callable[[str], None] | None, region: str) -> Callable[[str], None] | None:
    """Progress of one region's `up` among several, each line led by the region."""
    if on_step is None:
        return None
    return lambda message: on_step(f"{region}: {message}")


def run_regions(deployment_ids: list[str], cloud_for: Callable[[str], Cloud], *, campaign_id: str, trials: int,
                samples: int = 20, root: Path | str | None = None, timeout: float = 3600, poll: float = 10,
                on_progress: Callable[[dict], None] | None = None) -> dict:
    """One campaign over several deployments (regions): started everywhere, followed in parallel,
    merged into one folder."""
    from concurrent.futures import ThreadPoolExecutor

    from qlab.cloud import deploy

    states = [deploy.load_state(d) for d in deployment_ids]
    clouds = [cloud_for(s["region"]) for s in states]
    commands = [start(s, c, campaign_id=campaign_id, trials=trials, samples=samples)
                for s, c in zip(states, clouds, strict=True)]
    with ThreadPoolExecutor(len(states)) as pool:
        finals = list(pool.map(lambda i: wait(states[i], clouds[i], campaign_id, commands[i], timeout=timeout,
                                              poll=poll, on_progress=on_progress), range(len(states))))
    folder = None
    for s, c in zip(states, clouds, strict=True):
        folder = collect(s, c, campaign_id, root)
    return {"campaign": str(folder), "progress": dict(zip(deployment_ids, finals, strict=True)),
            "commands": dict(zip(deployment_ids, commands, strict=True))}
