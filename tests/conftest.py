"""Shared fixtures. HOME and the Jupyter/IPython/matplotlib dirs point at a temporary folder so
nothing a test runs writes into the user's home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.netns_support import netns_ok  # noqa: F401  (a fixture for every test module)

_HOME = tempfile.mkdtemp(prefix="qlab-test-home-")
for var, sub in (
    ("HOME", ""),
    ("IPYTHONDIR", ".ipython"),
    ("JUPYTER_CONFIG_DIR", ".jupyter"),
    ("JUPYTER_DATA_DIR", ".local/share/jupyter"),
    ("JUPYTER_RUNTIME_DIR", ".local/share/jupyter/runtime"),
    ("MPLCONFIGDIR", ".config/matplotlib"),
):
    os.environ[var] = str(Path(_HOME, sub))
os.environ.setdefault("MPLBACKEND", "Agg")
# a test that forgets `root=` writes here, never into the checkout's results/
os.environ["QLAB_RESULTS"] = str(Path(_HOME, "results"))
# sim trials charge the shipped calibration, whatever this machine's user measured
os.environ["QLAB_SIM_CALIBRATION"] = "default"


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory) -> Path:
    from qlab.certs import init_dir

    return init_dir(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def creds(certs_dir):
    from qlab.certs import Credentials

    return Credentials.load(certs_dir)


@pytest.fixture(scope="session")
def published_report(tmp_path_factory) -> Path:
    """One small published report (two Agent NATs, one trial per cell) for every test that reads
    the HTML: the report tests and the browser checks share it."""
    from qlab.study.report import run_report

    root = tmp_path_factory.mktemp("report")
    return run_report(trials=1, presets="full_cone,symmetric", root=root, progress=False)
