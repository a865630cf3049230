"""Campaigns: a backend, a set of (Agent NAT, Connector NAT) cells, a profile, N trials per cell
and a seed; run with progress, durably, resumable.

Every trial has a fixed index and seed (derived from the campaign seed, the cell and the index), so
`resume` runs exactly the missing ones. A campaign's manifest is its contract: running an existing id
with other settings is refused (`ManifestMismatch`), and `resume` runs the manifest's settings. A trial that raises is recorded as `failed` with its error,
never dropped. Trials run in worker processes where the backend allows (sim), in order otherwise.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import platform
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qlab import __version__
from qlab.backends.base import BACKENDS, check_loopback
from qlab.certs import default_certs
from qlab.experiment.record import MODES, TrialResult, TrialSpec, error_text
from qlab.experiment.trial import run_trial
from qlab.nat.firewall6 import PRESET6_NAMES
from qlab.nat.spec import cell_expected, parse_presets
from qlab.scenario.profiles import profile as get_profile
from qlab.study.results import CampaignStore, campaign_dir, check_id, find_campaign

log = logging.getLogger("qlab.study.campaign")


class ManifestMismatch(ValueError):
    """A campaign id that exists was asked to run with other settings than its manifest's."""


@dataclass
class CampaignSpec:
    backend: str = "sim"
    agent_nats: list[str] = field(default_factory=lambda: ["port_restricted"])
    connector_nats: list[str] = field(default_factory=lambda: ["port_restricted"])
    profile: str = "wan-20ms"
    trials: int = 30
    seed: int = 0
    campaign_id: str = ""
    samples: int = 20
    punch_anyway: bool = False  # measure the cells policy decides (both sides endpoint-dependent)
    birthday: int = 0  # birthday mode: mappings the random-port side opens (0: off)
    ipv6: str = ""  # a dual-stack lab: both sides' IPv6 firewall preset ("": IPv4 only)
    mode: str = "terminated"  # the sessions' architecture: terminated or sealed (TrialSpec.mode)
    punch_delay: float = 0.0  # seconds on the relay before punching: the upgrade of an established session

    def __post_init__(self) -> None:
        if isinstance(self.agent_nats, str):
            self.agent_nats = parse_presets(self.agent_nats)
        if isinstance(self.connector_nats, str):
            self.connector_nats = parse_presets(self.connector_nats)
        get_profile(self.profile)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")
        if self.backend == "loopback":
            check_loopback([*self.agent_nats, *self.connector_nats], self.profile)
        if self.ipv6 and (self.ipv6 not in PRESET6_NAMES or self.backend not in ("sim", "netns")):
            raise ValueError(f"ipv6 must be one of {', '.join(PRESET6_NAMES)} (firewall presets), on backend sim "
                             f"or netns; got {self.ipv6!r} on {self.backend}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode == "sealed" and self.birthday:
            raise ValueError("birthday mode needs mode terminated (a sealed connection lives on the shared socket)")
        if isinstance(self.punch_delay, bool) or not isinstance(self.punch_delay, int | float) \
                or not 0 <= self.punch_delay <= 30:
            raise ValueError(f"punch_delay must be from 0 to 30 seconds, got {self.punch_delay!r}")
        for name, lo, hi in (("trials", 1, 10000), ("samples", 1, 10000), ("birthday", 0, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {v!r}")
        if not self.campaign_id:
            agents = self.agent_nats[0] if len(self.agent_nats) == 1 else "multi"
            stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
            self.campaign_id = f"{stamp}-{self.backend}-{agents}-{secrets.token_hex(2)}"
        check_id(self.campaign_id)

    @property
    def cells(self) -> list[tuple[str, str]]:
        return [(a, c) for a in self.agent_nats for c in self.connector_nats]

    def trial_specs(self) -> list[TrialSpec]:
        out = []
        for a, c in self.cells:
            for i in range(self.trials):
                h = hashlib.sha256(f"{self.seed}/{a}/{c}/{i}".encode()).digest()
                out.append(TrialSpec(
                    backend=self.backend, agent_nat=a, connector_nat=c, profile=self.profile,
                    seed=int.from_bytes(h[:4], "big"), samples=self.samples, punch_anyway=self.punch_anyway,
                    birthday=self.birthday, agent_ipv6=self.ipv6, connector_ipv6=self.ipv6,
                    mode=self.mode, punch_delay=self.punch_delay,
                    trial_id=f"{a}.{c}.{i:04d}", campaign_id=self.campaign_id,
                ))
        return out


def _git_revision() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict:
    """What ran a campaign: versions, revision, kernel, host, start time (every manifest has it)."""
    import aioquic

    return {"qlab_version": __version__, "git_revision": _git_revision(), "python": platform.python_version(),
            "aioquic": aioquic.__version__, "kernel": platform.release(), "host": socket.gethostname(),
            "started_at": dt.datetime.now(dt.UTC).isoformat(), "finished_at": None}


def manifest_for(spec: CampaignSpec) -> dict:
    return {
        "campaign_id": spec.campaign_id, "backend": spec.backend, "parameters": asdict(spec),
        "cells": [list(c) for c in spec.cells], "trials": spec.trials, "seed": spec.seed, "profile": spec.profile,
        "expected": {f"{a}|{c}": cell_expected(a, c, ipv6_both=bool(spec.ipv6)) for a, c in spec.cells},
        **provenance(),
    }


def _ignore_sigint() -> None:
    """Ctrl-C is the driver's to handle (it keeps what finished); a worker interrupted mid-trial
    only prints warnings about its half-closed event loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_one(spec: TrialSpec, certs: str) -> dict:
    logging.disable(logging.CRITICAL)
    try:
        return run_trial(spec, certs_dir=certs).to_dict()
    except Exception as exc:  # a failing trial is a record, not a hole
        return failed_record(spec, exc)


def failed_record(spec: TrialSpec, exc: BaseException) -> dict:
    rec: dict[str, Any] = {f: None for f in TrialResult.__dataclass_fields__}
    rec.update(
        trial_id=spec.trial_id, campaign_id=spec.campaign_id, backend=spec.backend, scenario=spec.scenario,
        agent_nat=spec.agent_nat, connector_nat=spec.connector_nat, profile=spec.profile, seed=spec.seed,
        qlab_version=__version__, started_at=time.time(), duration_s=0.0,
        expected=cell_expected(spec.agent_nat, spec.connector_nat, ipv6_both=bool(spec.agent_ipv6 and spec.connector_ipv6)),
        outcome="failed",
        reason=f"the trial raised {type(exc).__name__}", as_expected=False, direct_verified=False,
        agent_nat_detected="UNKNOWN", connector_nat_detected="UNKNOWN", agent_candidates=[],
        connector_candidates=[], agent_probes=0, connector_probes=0, predicted_ports=[], working_pair="",
        rtt_relay_n=0, rtt_direct_n=0, relay_bytes_out=0, relay_bytes_in=0, direct_bytes_out=0,
        direct_bytes_in=0, verify_sent=0, verify_received=0, path_events=[], measured_with="",
        error=error_text(exc), extra={}, rtt_relay_sent=0, rtt_relay_received=0,
        rtt_direct_sent=0, rtt_direct_received=0, echo_direct_answered_on_relay=0,
        echo_relay_answered_on_direct=0, punch="none", mode=spec.mode, punch_delay=spec.punch_delay,
    )
    return rec


def run(spec: CampaignSpec, *, root: Path | str | None = None, workers: int | None = None, progress: bool = True,
        on_result: Callable[[dict], None] | None = None) -> Path:
    """Run (or continue) a campaign; returns its folder. Ctrl-C keeps every finished trial."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a whole number of at least 1, got {workers!r}")
    d = campaign_dir(spec.campaign_id, root)
    store = CampaignStore(d)
    if (d / "manifest.json").exists():
        check_contract(spec, store.manifest())
    else:
        store.write_manifest(manifest_for(spec))
    done = {r["trial_id"] for r in store.records()}
    todo = [t for t in spec.trial_specs() if t.trial_id not in done]
    certs = default_certs()
    parallel = spec.backend == "sim"
    workers = workers or (os.cpu_count() or 1 if parallel else 1)
    bars = _Progress(spec, len(done), progress)
    for r in store.records():
        bars.update(r)
    try:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(workers, initializer=_ignore_sigint) as pool:
                pending = {pool.submit(_run_one, t, certs) for t in todo[: workers * 2]}
                queue = list(todo[workers * 2:])
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        rec = f.result()
                        store.append(rec)
                        bars.update(rec)
                        if on_result:
                            on_result(rec)
                        if queue:
                            pending.add(pool.submit(_run_one, queue.pop(0), certs))
        else:
            for t in todo:
                rec = _run_one(t, certs)
                store.append(rec)
                bars.update(rec)
                if on_result:
                    on_result(rec)
    finally:
        bars.close()
        store.write_tables()
    m = store.manifest()
    if len(store.records()) >= len(spec.trial_specs()):
        m["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
        store.write_manifest(m)
    return d


def check_contract(spec: CampaignSpec, manifest: dict) -> None:
    """Refuse to add trials of other settings to a campaign: one line naming every difference."""
    asked = asdict(spec)
    have = _manifest_spec(manifest)
    diff = [f"{k}={_show(have[k])} (asked {_show(asked[k])})" for k in asked
            if k != "campaign_id" and have[k] != asked[k]]
    if diff:
        raise ManifestMismatch(f"campaign {spec.campaign_id} exists with other settings: {'; '.join(diff)}; "
                               f"use another id, or `qlab campaign resume {spec.campaign_id}` to complete it")


def _manifest_spec(manifest: dict) -> dict:
    """The manifest's parameters as CampaignSpec fields (a key an older qlab did not write takes its
    default, which is what that qlab ran)."""
    params = manifest.get("parameters", {})
    unknown = set(params) - {f.name for f in fields(CampaignSpec)}
    if unknown:
        raise ManifestMismatch(f"campaign {manifest.get('campaign_id')} was written by another qlab "
                               f"(unknown settings: {', '.join(sorted(unknown))})")
    return asdict(CampaignSpec(**{**params, "campaign_id": manifest.get("campaign_id") or params.get("campaign_id")}))


def _show(v: object) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def resume(campaign_id: str, *, root: Path | str | None = None, progress: bool = True,
           workers: int | None = None) -> Path:
    """Complete a campaign with exactly its manifest's settings."""
    d = find_campaign(campaign_id, root)
    spec = CampaignSpec(**_manifest_spec(CampaignStore(d).manifest()))
    return run(spec, root=root, progress=progress, workers=workers)


class _Progress:
    """An overall bar and a per-cell bar, with success counts as trials finish."""

    def __init__(self, spec: CampaignSpec, done: int, enabled: bool) -> None:
        self.enabled = enabled
        self.total = len(spec.cells) * spec.trials
        self.ok = 0
        self.direct = 0
        self.per_cell: dict[str, list[int]] = {}
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=f"campaign {spec.campaign_id}", unit="trial")

    def update(self, rec: dict) -> None:
        key = f"{rec['agent_nat']}->{rec['connector_nat']}"
        cell = self.per_cell.setdefault(key, [0, 0])
        cell[0] += 1
        cell[1] += bool(rec["as_expected"])
        self.ok += bool(rec["as_expected"])
        self.direct += str(rec["outcome"]).startswith("direct")
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{key} {cell[1]}/{cell[0]} ok | direct {self.direct} | as expected {self.ok}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
