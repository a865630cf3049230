"""The results store: one folder per campaign, every trial durable before the next one starts.

    <results>/<campaign-id>/manifest.json   what ran: versions, parameters, seed, times, host
    <results>/<campaign-id>/trials.jsonl    one TrialResult per line, appended and fsynced per trial
    <results>/<campaign-id>/trials.parquet  the same table, rewritten atomically at checkpoints
    <results>/<campaign-id>/trials.csv      the same, for people without pyarrow

<results> is one folder wherever qlab runs (`results_root`): the CLI in the project, a JupyterLab
kernel started in `notebooks/`, papermill and `make report` all read and write the project's
`results/` (or `$QLAB_RESULTS`).

The JSONL is the record of truth; the tables need pandas (the `lab` extra) and are not written
without it (an AWS host runs the slim runtime: its folder is manifest.json and trials.jsonl).

`load(...)` gives a pandas DataFrame of one or many campaigns, checked against the schema. The
schema is the TrialResult dataclass; docs/results.md describes every column.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from qlab.experiment.record import ADDED_FIELDS, OUTCOMES, TrialResult

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


def results_root(root: Path | str | None = None) -> Path:
    """The results folder: `root` if given, else `$QLAB_RESULTS`, else `<project>/results` where the
    project is the nearest folder at or above the working directory holding `pyproject.toml` (so a
    kernel that JupyterLab starts in `notebooks/` finds the same folder as the CLI), else
    `./results`. Relative paths are taken from the working directory."""
    if root:
        return Path(root).expanduser()
    if os.environ.get("QLAB_RESULTS"):
        return Path(os.environ["QLAB_RESULTS"]).expanduser()
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder / "results"
    return here / "results"


def campaign_dir(campaign_id: str, root: Path | str | None = None) -> Path:
    return results_root(root) / check_id(campaign_id)


def find_campaign(campaign_id: str, root: Path | str | None = None) -> Path:
    """The folder of an existing campaign, or FileNotFoundError naming the root and close ids."""
    d = campaign_dir(campaign_id, root)
    if (d / "manifest.json").is_file():
        return d
    ids = [c["id"] for c in list_campaigns(root)]
    close = difflib.get_close_matches(campaign_id, ids, n=3, cutoff=0.6)
    hint = (f"; did you mean {' or '.join(close)}?" if close else
            f"; {len(ids)} campaign(s) there (qlab campaign ls)" if ids else "; it holds no campaign")
    raise FileNotFoundError(f"no campaign {campaign_id!r} under {d.parent}{hint}")


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
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise NotADirectoryError(f"results folder {self.dir}: a file is in the way") from None
        except OSError as exc:  # read-only, permission, a file where a folder belongs
            raise type(exc)(f"results folder {self.dir}: {exc.strerror}") from None
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


def load(campaigns: str | Path | Iterable[str | Path] | None = None, root: Path | str | None = None, *,
         backend: str | None = None, profile: str | None = None) -> pd.DataFrame:
    """A tidy DataFrame of one or many campaigns (ids under the results root, or folders; None =
    every campaign there), schema-checked and typed as the TrialResult fields say (numbers as
    floats or nullable ints, flags as bools, list columns as lists). `backend` and `profile`
    keep only those rows.

    Reads trials.parquet when present, else trials.csv, else the durable trials.jsonl.
    """
    import pandas as pd

    if campaigns is None:
        items: list[str | Path] = [c["id"] for c in list_campaigns(root)]
    else:
        items = [campaigns] if isinstance(campaigns, (str, Path)) else list(campaigns)
    frames = [_load_one(Path(item) if Path(item).is_dir() else find_campaign(str(item), root)) for item in items]
    df = typed(pd.concat(frames, ignore_index=True) if frames else to_frame([]))
    if backend is not None:
        df = df[df["backend"] == backend].reset_index(drop=True)
    if profile is not None:
        df = df[df["profile"] == profile].reset_index(drop=True)
    return df


def _load_one(d: Path) -> pd.DataFrame:
    import pandas as pd

    records = CampaignStore(d).records()
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
    return df


def _column_kinds() -> dict[str, str]:
    """TrialResult's annotations, reduced to the pandas dtype each column gets."""
    kinds = {}
    for f in dataclasses.fields(TrialResult):
        t = str(f.type)
        kinds[f.name] = ("float64" if t.startswith("float") else "Int64" if t.startswith("int") else
                         "bool" if t == "bool" else "str" if t.startswith("str") else "object")
    return kinds


def typed(df: pd.DataFrame) -> pd.DataFrame:
    """Columns in the types the record declares, whichever file they came from (a CSV gives
    strings and floats where the JSONL gave ints and None)."""
    import pandas as pd

    out = df.copy()
    for col, kind in _column_kinds().items():
        if col not in out.columns:
            continue
        if kind == "float64":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("float64")
        elif kind == "Int64":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
        elif kind == "bool":
            out[col] = out[col].map(lambda v: v if isinstance(v, bool) else str(v).lower() == "true").astype(bool)
        elif kind == "str":
            out[col] = out[col].map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    return out


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
    """Every campaign under the results root: id, backend, profile, cells, trials per cell, total
    and done trials, finished, started_at (oldest first by id). A folder whose manifest cannot be
    read is listed with its `error`, not skipped."""
    r = results_root(root)
    out = []
    if r.is_dir():
        for d in sorted(r.iterdir()):
            if (d / "manifest.json").is_file():
                out.append(_summary(d))
    return out


def _summary(d: Path) -> dict:
    try:
        m = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {"id": d.name, "error": f"unreadable manifest: {exc}"}
    params = m.get("parameters", {})
    cells, per_cell = len(m.get("cells", [])), m.get("trials")
    return {"id": d.name, "backend": m.get("backend"), "profile": m.get("profile"), "cells": cells,
            "trials_per_cell": per_cell, "total": cells * per_cell if isinstance(per_cell, int) else None,
            "done": len(CampaignStore(d).records()), "finished": m.get("finished_at") is not None,
            "started_at": m.get("started_at"),
            **{k: params[k] for k in ("birthday", "punch_anyway") if params.get(k)}}
