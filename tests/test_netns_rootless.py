"""The kernel lab without root: as an unprivileged user (uid 65534) inside a user namespace it makes
itself. The lab code needs only the standard library, so the test runs it with Debian's system
Python on a copy of the package readable by that user. Also: the netem path and its arguments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlab.backends.netns.lab import Lab, netem_args, netem_available, userns_available, userns_command
from qlab.scenario.profiles import LinkProfile
from qlab.scenario.topology import build

SYSTEM_PYTHON = "/usr/bin/python3"

SMOKE = """
import os, select
from qlab.scenario.topology import build
from qlab.backends.netns.lab import Lab, lab_namespaces
def recv(s, t=1.0):
    r, _, _ = select.select([s], [], [], t)
    return s.recvfrom(2000) if r else None
print("euid", os.geteuid())
with Lab(build("port_restricted", "public")) as lab:
    srv = lab.socket("intermediate"); srv.bind(("203.0.113.10", 3478))
    other = lab.socket("intermediate"); other.bind(("203.0.113.11", 3478))
    a = lab.socket("agent"); a.bind(("0.0.0.0", 5000))
    a.sendto(b"x", ("203.0.113.10", 3478))
    got = recv(srv)
    print("mapped", got[1][0], got[1][1])
    srv.sendto(b"back", got[1]); print("reply", recv(a) is not None)
    other.sendto(b"intrude", got[1]); print("intruder", recv(a, 0.4) is not None)
print("left", len(lab_namespaces()))
"""


def test_the_lab_runs_without_root_in_a_user_namespace(netns_ok, tmp_path):
    if not userns_available():
        pytest.fail("unprivileged user namespaces are not available on this machine")
    if not (Path(SYSTEM_PYTHON).exists() and shutil.which("setpriv")):
        why = "needs Debian's system python3 and setpriv to act as an unprivileged user"
        if os.environ.get("QLAB_REQUIRE_NETNS") == "1":
            pytest.fail(f"QLAB_REQUIRE_NETNS=1: {why}")
        pytest.skip(why)
    pkg = tmp_path / "pkg"
    shutil.copytree(Path(__file__).resolve().parents[1] / "qlab", pkg / "qlab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "smoke.py").write_text(SMOKE)
    for p in [tmp_path, *tmp_path.parents]:
        if p != Path("/"):
            os.chmod(p, os.stat(p).st_mode | 0o005)  # let uid 65534 reach the copy
    for root, dirs, files in os.walk(pkg):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
           *userns_command([SYSTEM_PYTHON, str(pkg / "smoke.py")])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=pkg,
                       env={"PATH": os.environ["PATH"], "PYTHONPATH": str(pkg), "QLAB_IN_USERNS": "1"})
    assert r.returncode == 0, r.stderr
    out = r.stdout.split("\n")
    assert "euid 0" in out  # root of its own user namespace, uid 65534 outside
    assert "mapped 203.0.113.101 5000" in out  # the kernel's NAT, port preserved
    assert "reply True" in out and "intruder False" in out  # port-restricted filtering
    assert "left 0" in out


def test_netem_arguments_and_the_wire_fallback(netns_ok):
    assert netem_args(LinkProfile(10, 2, 0.05, 100)) == ["netem", "delay", "10ms", "2ms", "loss", "5%", "rate", "100mbit"]
    assert netem_args(LinkProfile(5)) == ["netem", "delay", "5ms"]
    with Lab(build("full_cone", "public", profile_name="wan-20ms")) as lab:
        expected = "netem" if netem_available() else "tapwire"
        assert lab.status()["links"] == expected
        assert bool(lab.wires) == (expected == "tapwire")


def test_lab_command_without_root_explains_itself(monkeypatch, capsys):
    from qlab.cli import main as cli

    args = cli.build_parser().parse_args(["lab", "status"])
    assert cli._rerun_in_userns(args, ["lab", "status"]) == 2
    assert "needs root" in capsys.readouterr().err
    assert userns_command(["x"])[:3] == ["unshare", "--user", "--map-root-user"]
    assert sys.executable  # the re-run uses this interpreter
