"""qlab: a lab for QUIC NAT traversal (Intermediate Server, App Connector and Agent behind NATs)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__version__ = "0.1.0"

# Notebooks written before the layers became folders say `from qlab import results`; for one
# release those names still resolve, with a warning that names the new home.
_MOVED = {name: f"qlab.study.{name}" for name in ("analysis", "campaign", "plots", "results", "widgets")}


def __getattr__(name: str) -> ModuleType:
    if name in _MOVED:
        warnings.warn(f"qlab.{name} is now {_MOVED[name]}; `from qlab import {name}` goes away in the next "
                      f"release", DeprecationWarning, stacklevel=2)
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'qlab' has no attribute {name!r}")


Campaigns = str | Path | Iterable[str | Path]


def load(campaigns: Campaigns | None = None, root: str | Path | None = None, *, backend: str | None = None,
         profile: str | None = None) -> pd.DataFrame:
    """Trials of one or many campaigns as a tidy pandas DataFrame (one row per trial, typed
    columns, list columns as lists); None = every campaign in the results folder. See
    `qlab.study.results.load`."""
    from qlab.study.results import load as load_results

    return load_results(campaigns, root, backend=backend, profile=profile)


def compare(a: Campaigns | pd.DataFrame, b: Campaigns | pd.DataFrame, root: str | Path | None = None) -> pd.DataFrame:
    """Two campaigns (ids, folders or DataFrames from `load`) side by side, per NAT pair: rates
    with intervals and medians of each, and the differences. See `qlab.study.analysis.compare`."""
    import pandas as pd

    from qlab.study.analysis import compare as compare_frames

    first, second = (x if isinstance(x, pd.DataFrame) else load(x, root) for x in (a, b))
    return compare_frames(first, second)
