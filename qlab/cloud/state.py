"""The local record of each deployment (`~/.qlab/cloud/<id>.json`, or $QLAB_CLOUD_STATE): what `up`
created, so `run` and `status` know the hosts. AWS's tags remain the truth for `down`."""

from __future__ import annotations

import json
import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("QLAB_CLOUD_STATE", Path.home() / ".qlab" / "cloud"))


def save_state(state: dict) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{state['deployment_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_state(deployment_id: str) -> dict:
    path = state_dir() / f"{deployment_id}.json"
    if not path.exists():
        raise FileNotFoundError(f"no local state for deployment {deployment_id!r} in {path.parent}")
    return dict(json.loads(path.read_text()))
