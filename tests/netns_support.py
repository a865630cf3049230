"""Namespace tests need root and nftables. Where the lab cannot run they skip, except when
QLAB_REQUIRE_NETNS=1 (set by .ci/run): then a missing lab is a failure, never a silent skip."""

from __future__ import annotations

import os

import pytest


def require_netns() -> None:
    from qlab.backends.netns.lab import LabUnavailable, check_requirements

    try:
        check_requirements()
    except LabUnavailable as exc:
        if os.environ.get("QLAB_REQUIRE_NETNS") == "1":
            pytest.fail(f"QLAB_REQUIRE_NETNS=1 but the netns lab cannot run here: {exc}")
        pytest.skip(f"netns lab unavailable: {exc}")


@pytest.fixture
def netns_ok() -> None:
    require_netns()
