"""benchmarks/ice_matrix.py's ICE side, on three cells of the kernel lab (about 8 s): aioice peers
in the Agent's and the Connector's namespaces, stund on the Intermediate, the signaling relayed by
the benchmark. The full matrix is a benchmark, not a test (docs/traversal.md, last section)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

aioice = pytest.importorskip("aioice") if os.environ.get("QLAB_REQUIRE_NETNS") != "1" else None  # CI: a dev dependency

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "ice_matrix.py"


def _bench():
    spec = importlib.util.spec_from_file_location("ice_matrix", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _lab_processes() -> str:
    return subprocess.run(["pgrep", "-af", str(BENCH.parent / "ice_peer.py")], capture_output=True, text=True).stdout


@pytest.mark.netns
def test_ice_connects_across_cones_learns_a_peer_reflexive_candidate_and_fails_where_it_must(netns_ok):
    from qlab.backends.netns.daemons import STUND

    if not Path(STUND).exists():
        if os.environ.get("QLAB_REQUIRE_NETNS") == "1":
            pytest.fail("stund (Debian stun-server) is not installed: `make sysdeps` installs it")
        pytest.skip("stund (Debian stun-server) is not installed")
    bench = _bench()
    before = _lab_processes()

    easy = bench.ice_trial("full_cone", "full_cone", "wan-20ms", seed=1, timeout=10)
    assert easy["error"] == "" and easy["connected"], easy
    assert easy["agent"]["data_ok"] and easy["connector"]["data_ok"]
    assert bench._pair_types(easy) == "srflx/srflx"  # each side reached the other's STUN-learned address

    # the symmetric Agent's mapping towards the Connector is not the one stund saw: the Connector
    # learns it from the Agent's check (peer-reflexive) and answers there
    prflx = bench.ice_trial("symmetric", "full_cone", "wan-20ms", seed=2, timeout=10)
    assert prflx["connected"], prflx
    assert bench._pair_types(prflx) == "srflx/prflx"

    # APDF against a random-port symmetric NAT: no pair can work, and the benchmark says so
    hard = bench.ice_trial("port_restricted", "symmetric", "wan-20ms", seed=3, timeout=3)
    assert not hard["connected"] and hard["error"] == "", hard
    assert "connect" in hard["agent"]["error"]

    assert _lab_processes() == before, "an ICE peer outlived its trial"
