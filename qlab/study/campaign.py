"""Campaigns: a backend, a set of (Agent NAT, Connector NAT) cells, a profile, N trials per cell
and a seed; run with progress, durably, resumable.

Every trial has a fixed index and seed (derived from the campaign seed, the cell and the index), so
`resume` runs exactly the missing ones. A campaign's manifest is its contract: running an existing id
with other settings is refused (`ManifestMismatch`), and `resume` runs the manifest's settings. A trial that raises is recorded as `failed` with its error,
never dropped. Trials run in worker processes where the backend allows (sim), in order otherwise,
or on a Dask cluster (`executors`); this process alone writes the store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import platform
import secrets
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from qlab import __version__
from qlab.backends.base import BACKENDS, check_loopback
from qlab.experiment.record import MODES, TrialSpec
from qlab.nat.firewall6 import PRESET6_NAMES
from qlab.nat.spec import cell_expected, parse_presets
from qlab.scenario.profiles import profile as get_profile
from qlab.study.executors import TrialKit, make_executor
from qlab.study.results import CampaignStore, campaign_dir, check_id, find_campaign

if TYPE_CHECKING:
    from distributed import Client

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


def run(spec: CampaignSpec, *, root: Path | str | None = None, workers: int | None = None, progress: bool = True,
        on_result: Callable[[dict], None] | None = None, cluster: str | Client | None = None) -> Path:
    """Run (or continue) a campaign; returns its folder. Ctrl-C keeps every finished trial.

    `cluster`: run the trials on Dask (a scheduler's address, `local`, or a Client) instead of this
    machine's worker processes. Wherever they run, this process alone writes the store, in the
    trials' own order, so the same seeds give the same trials.jsonl on every executor."""
    d = campaign_dir(spec.campaign_id, root)
    executor = make_executor(spec.backend == "sim", workers=workers, cluster=cluster)
    try:
        executor.check(spec.backend)
        if progress and executor.where:
            print(f"trials run on {executor.where}", file=sys.stderr, flush=True)
        store = CampaignStore(d)
        if (d / "manifest.json").exists():
            check_contract(spec, store.manifest())
        else:
            store.write_manifest(manifest_for(spec))
        done = {r["trial_id"] for r in store.records()}
        todo = [t for t in spec.trial_specs() if t.trial_id not in done]
        bars = _Progress(spec, len(done), progress)
        for r in store.records():
            bars.update(r)
        try:
            if todo:
                _record_in_order(executor.run(todo, TrialKit.from_here(spec.backend)), todo, store, bars, on_result)
        finally:
            bars.close()
            store.write_tables()
    finally:
        executor.close()
    m = store.manifest()
    if len(store.records()) >= len(spec.trial_specs()):
        m["finished_at"] = dt.datetime.now(dt.UTC).isoformat()
        store.write_manifest(m)
    return d


def _record_in_order(records: Iterator[dict], todo: list[TrialSpec], store: CampaignStore, bars: _Progress,
                     on_result: Callable[[dict], None] | None) -> None:
    """Append records in the trials' order as they come in (a trial that finished early waits in
    memory for those before it); whatever waits when the run stops is appended anyway, so nothing
    that finished is lost. Each trial id is appended once: it leaves `waiting` when written, and
    `order` holds it once."""
    order = [t.trial_id for t in todo]
    waiting: dict[str, dict] = {}
    nxt = 0
    try:
        for rec in records:
            waiting[rec["trial_id"]] = rec
            bars.update(rec)
            if on_result:
                on_result(rec)
            while nxt < len(order) and order[nxt] in waiting:
                store.append(waiting.pop(order[nxt]))
                nxt += 1
    finally:
        if isinstance(records, Generator):
            records.close()  # cancels what has not run
        for tid in order[nxt:]:
            if tid in waiting:
                store.append(waiting.pop(tid))


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
           workers: int | None = None, cluster: str | Client | None = None) -> Path:
    """Complete a campaign with exactly its manifest's settings."""
    d = find_campaign(campaign_id, root)
    spec = CampaignSpec(**_manifest_spec(CampaignStore(d).manifest()))
    return run(spec, root=root, progress=progress, workers=workers, cluster=cluster)


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
