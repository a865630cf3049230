"""qlab: a lab for QUIC NAT traversal (Intermediate Server, App Connector and Agent behind NATs)."""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

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
