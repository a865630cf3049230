"""The results store: one folder per campaign, every trial durable before the next one starts.

    results/<campaign-id>/manifest.json   what ran: versions, parameters, seed, times, host
    results/<campaign-id>/trials.jsonl    one TrialResult per line, appended and fsynced per trial
    results/<campaign-id>/trials.parquet  the same table, rewritten atomically at checkpoints
    results/<campaign-id>/trials.csv      the same, for people without pyarrow

The JSONL is the record of truth; the tables need pandas (the `lab` extra) and are not written
without it (an AWS host runs the slim runtime: its folder is manifest.json and trials.jsonl).

`load(...)` gives a pandas DataFrame of one or many campaigns, checked against the schema. The
schema is the TrialResult dataclass; docs/results.md describes every column.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from qlab.experiment.record import ADDED_FIELDS, OUTCOMES, TrialResult

RESULTS_DIR = Path(os.environ.get("QLAB_RESULTS", "results"))
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
JSON_COLUMNS = ("agent_candidates", "connector_candidates", "predicted_ports", "path_events", "extra")
REQUIRED = [f.name for f in dataclasses.fields(TrialResult) if f.name not in ADDED_FIELDS]

if TYPE_CHECKING:
    import pandas as pd


class SchemaError(ValueError):
    """A results file does not match the trial schema."""


def check_id(campaign_id: str) -> str:
    if not ID_RE.match(campaign_id) or ".." in campaign_id:
        raise ValueError(f"bad campaign id {campaign_id!r}: letters, digits, '.', '_' and '-' only")
    return campaign_id


def campaign_dir(campaign_id: str, root: Path | str | None = None) -> Path:
    return Path(root or RESULTS_DIR) / check_id(campaign_id)


def validate_record(rec: dict) -> dict:
    """Check one trial record against the schema (on write and on load)."""
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise SchemaError(f"trial record misses {', '.join(missing)}")
    for k in ADDED_FIELDS:  # a record written before the column existed: not recorded, not zero
        rec.setdefault(k, None)
    if rec["outcome"] not in OUTCOMES:
        raise SchemaError(f"unknown outcome {rec['outcome']!r}")
    for k in ("trial_id", "backend", "agent_nat", "connector_nat", "profile"):
        if not isinstance(rec[k], str) or not rec[k]:
            raise SchemaError(f"{k} must be a non-empty string")
    for k in ("ttfb_ms", "ttd_ms", "rtt_relay_p50_ms", "rtt_direct_p50_ms"):
        if rec[k] is not None and not isinstance(rec[k], (int, float)):
            raise SchemaError(f"{k} must be a number or null")
    if not isinstance(rec["direct_verified"], bool):
        raise SchemaError("direct_verified must be a boolean")
    return rec


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CampaignStore:
    """Appends trials durably; rewrites the tables atomically."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.dir / "trials.jsonl"

    def write_manifest(self, manifest: dict) -> None:
        _write_atomic(self.dir / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())

    def manifest(self) -> dict:
        return json.loads((self.dir / "manifest.json").read_text())

    def append(self, result: TrialResult | dict) -> None:
        rec = validate_record(result.to_dict() if isinstance(result, TrialResult) else dict(result))
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(self.jsonl, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a crash left a torn last line: never glue a trial onto it
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        """Every complete line (a line cut by a crash mid-write is ignored)."""
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(validate_record(json.loads(line)))
            except (json.JSONDecodeError, SchemaError):
                continue
        return out

    def write_tables(self) -> pd.DataFrame | None:
        """trials.csv (and trials.parquet with pyarrow) from the JSONL; None, and no tables, without
        pandas."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            return None
        df = to_frame(self.records())
        flat = _flatten(df)
        _write_atomic(self.dir / "trials.csv", flat.to_csv(index=False).encode())
        try:
            import pyarrow  # noqa: F401

            tmp = self.dir / ".trials.parquet.tmp"
            flat.to_parquet(tmp, index=False)
            os.replace(tmp, self.dir / "trials.parquet")
        except ImportError:
            pass
        return df


def to_frame(records: list[dict]) -> pd.DataFrame:
    import pandas as pd

    df = pd.DataFrame.from_records(records, columns=REQUIRED if not records else None)
    for col in REQUIRED:
        if col not in df.columns:
            raise SchemaError(f"column {col} missing")
    return df


def _flatten(df: pd.DataFrame) -> pd.DataFrame:
    flat = df.copy()
    for col in JSON_COLUMNS:
        if col in flat.columns:
            flat[col] = flat[col].map(lambda v: json.dumps(v, default=str))
    return flat


def _unflatten(df: pd.DataFrame) -> pd.DataFrame:
    for col in JSON_COLUMNS:
        if col in df.columns:
            df[col] = df[col].map(lambda v: json.loads(v) if isinstance(v, str) and v else v)
    return df


def load(campaigns: str | Path | Iterable[str | Path], root: Path | str | None = None) -> pd.DataFrame:
    """A DataFrame of one or many campaigns (ids under `root`, or folders), schema-checked.

    Reads trials.parquet when present, else trials.csv, else the durable trials.jsonl.
    """
    import pandas as pd

    items = [campaigns] if isinstance(campaigns, (str, Path)) else list(campaigns)
    frames = []
    for item in items:
        d = Path(item) if Path(item).is_dir() else campaign_dir(str(item), root)
        if not d.is_dir():
            raise FileNotFoundError(f"no campaign at {d}")
        store = CampaignStore(d)
        records = store.records()
        if (d / "trials.parquet").exists() and _rows(d / "trials.parquet") == len(records):
            df = _unflatten(pd.read_parquet(d / "trials.parquet"))
        elif (d / "trials.csv").exists() and records and _csv_rows(d / "trials.csv") == len(records):
            df = _unflatten(pd.read_csv(d / "trials.csv", keep_default_na=True))
        else:
            df = to_frame(records)
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise SchemaError(f"{d}: columns missing: {', '.join(missing)}")
        bad = set(df["outcome"]) - set(OUTCOMES)
        if bad:
            raise SchemaError(f"{d}: unknown outcomes {bad}")
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else to_frame([])


def _rows(path: Path) -> int:
    try:
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return -1


def _csv_rows(path: Path) -> int:
    import pandas as pd

    try:
        return len(pd.read_csv(path, usecols=["trial_id"]))
    except Exception:
        return -1


def list_campaigns(root: Path | str | None = None) -> list[dict]:
    r = Path(root or RESULTS_DIR)
    out = []
    if r.is_dir():
        for d in sorted(r.iterdir()):
            if (d / "manifest.json").exists():
                m = json.loads((d / "manifest.json").read_text())
                out.append({"id": d.name, "backend": m.get("backend"), "cells": len(m.get("cells", [])),
                            "trials_per_cell": m.get("trials"), "done": len(CampaignStore(d).records()),
                            "finished": m.get("finished_at") is not None})
    return out
