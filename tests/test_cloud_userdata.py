"""What instances run at boot (qlab/cloud/userdata.py) and the slim runtime a host installs.

The boot scripts are executed here by bash with stub commands in a PATH of their own, with every
absolute path moved under tmp_path (no script ever touches this machine's /etc, /proc or
shutdown), and the roles and `qlab probe` run as real processes that cannot import anything the
wheel's base dependencies do not bring (pandas, pyarrow, matplotlib, Jupyter...). The only AWS
endpoint is moto's server on 127.0.0.1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from tests.procs import Proc, free_tcp_port, free_udp_port

ROOT = Path(__file__).resolve().parent.parent
LAB = {"pandas", "pyarrow", "matplotlib", "papermill", "nbconvert", "nbclient", "ipykernel", "jupyterlab",
       "ipywidgets", "tqdm", "numpy", "nbformat", "IPython", "jupyter_core", "jupyter_client"}
TRIES = 8
HAS_SHELLCHECK = shutil.which("shellcheck") is not None or os.environ.get("QLAB_REQUIRE_NETNS") == "1"
ADDRS = (("10.80.0.10", "198.51.100.7"), ("10.80.0.11", "198.51.100.8"))
# the credential files each kind of host fetches (docs/cloud.md, "Credentials: which host holds what")
CREDENTIALS = {"intermediate": ("ca.pem", "intermediate.pem", "intermediate.key", "secret"),
               "connector": ("ca.pem", "connector.pem", "connector.key", "connector.secret"),
               "agent": ("ca.pem", "agent.secret"), "nat": ()}


def user_data(kind: str, **kw) -> str:
    """The user data of one kind of host as the deployment renders it (its own parameters only)."""
    from qlab.cloud.userdata import render_user_data

    roles = {"intermediate": ["intermediate"], "connector": ["echo", "connector"], "agent": [], "nat": []}[kind]
    base = dict(deployment="qlab-test", region="us-east-1", bucket="qlab-test-artifacts",
                wheel_key="wheels/qlab-0.1.0-py3-none-any.whl", roles=roles, ttl_minutes=120,
                params={f: f"/qlab/qlab-test/{f}" for f in CREDENTIALS[kind]}, intermediate="198.51.100.7",
                service="echo-symmetric", intermediate_addrs=ADDRS)
    return render_user_data(**{**base, **kw})


def nat_kw(preset_name: str) -> dict:
    from qlab.cloud.deploy import nat_ruleset
    from qlab.nat.nftables import conntrack_sysctls
    from qlab.nat.spec import preset

    return dict(nat_ruleset=nat_ruleset(preset_name, "10.80.0.100", "10.80.10.0/24"),
                nat_sysctls=conntrack_sysctls(preset(preset_name)))


# --- executing boot scripts with stubs ------------------------------------------------------------

# what the scripts use besides the stubbed commands (bash builtins aside)
TOOLS = ("cat", "install", "touch", "base64", "gzip", "gunzip", "seq", "grep", "mkdir", "chmod", "ls", "ln", "sed")


class Boot:
    """A sandbox to run a boot script in: stub commands that log their argv (and fail the first
    `fail_first[name]` calls), real coreutils, every absolute path of the script moved under root."""

    def __init__(self, tmp: Path, stubs: dict[str, str], fail_first: dict[str, int] | None = None) -> None:
        self.root, self.log = tmp / "root", tmp / "calls.log"
        self.bin = tmp / "bin"
        self.bin.mkdir()
        for tool in TOOLS:
            (self.bin / tool).symlink_to(shutil.which(tool))
        fail_first = fail_first or {}
        for name, body in {"sleep": "", "shutdown": "", **stubs}.items():
            fail = fail_first.get(name, 0)
            self._stub(self.bin / name, name, body, fail)
        (self.root / "opt/qlab/bin").mkdir(parents=True)
        self._stub(self.root / "opt/qlab/bin/pip", "pip", "", fail_first.get("pip", 0))
        for d in ("etc/systemd/system", "var/lib", "tmp", "proc/sys/net/ipv4/conf/ens5",
                  "proc/sys/net/ipv4/conf/ens6"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for nic in ("ens5", "ens6"):
            (self.root / f"proc/sys/net/ipv4/conf/{nic}/send_redirects").write_text("1\n")

    def _stub(self, path: Path, name: str, body: str, fail: int) -> None:
        count = self.root.parent / f"n-{name}"
        path.write_text(f'#!/bin/bash\necho "{name} $*" >> "{self.log}"\n'
                        f'n=$(( $(cat "{count}" 2>/dev/null || echo 0) + 1 )); echo "$n" > "{count}"\n'
                        f'if [ "$n" -le {fail} ]; then exit 1; fi\n{body}\n')
        path.chmod(0o755)

    def run(self, script: str) -> subprocess.CompletedProcess:
        moved = re.sub(r"(?<![\w.:/-])/(etc|opt|var|proc|tmp)/", lambda m: f"{self.root}/{m.group(1)}/", script)
        left = [line for line in moved.splitlines()[1:]  # after the shebang
                if re.search(r"(?<![\w.:/-])/(etc|opt|var|proc|tmp|usr|sbin|bin|sys|root|home)/",
                             line.replace(str(self.root), "ROOT"))]
        assert not left, f"the sandbox would leave tmp_path: {left}"
        path = self.root.parent / "boot.sh"
        path.write_text(moved)
        return subprocess.run(["/bin/bash", str(path)], capture_output=True, text=True, timeout=60,
                              env={"PATH": str(self.bin), "HOME": str(self.root)})

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def test_nat_router_loads_sysctls_then_ruleset_and_installs_no_qlab(tmp_path):
    """A NAT router's boot: the lab's conntrack sysctls for its preset (the very function the netns
    lab calls), no redirects, the ruleset byte for byte, forwarding last; nothing of qlab, Python,
    S3 or SSM; nftables installed only when missing."""
    from qlab.cloud.userdata import READY
    from qlab.nat.nftables import conntrack_sysctls
    from qlab.nat.spec import preset

    kw = nat_kw("symmetric")
    ud = user_data("nat", **kw)
    for absent in ("pip install", "python3", "aws s3", "aws ssm", "s3://", "/opt/qlab", "REGION="):
        assert absent not in ud, absent
    lines = ud.splitlines()
    assert lines[:5] == ["#!/bin/bash", lines[1], "set -euo pipefail", "DEPLOYMENT=qlab-test",
                         'shutdown -h +120 "qlab deployment $DEPLOYMENT expires"  # the TTL: instances terminate']
    boot = Boot(tmp_path, {"modprobe": "", "sysctl": "", "nft": "", "conntrack": "", "dnf": ""})
    r = boot.run(ud)
    assert r.returncode == 0, r.stderr
    calls = boot.calls()
    lab_values = " ".join(f"{k}={v}" for k, v in sorted(conntrack_sysctls(preset("symmetric")).items()))
    assert calls == ["shutdown -h +120 qlab deployment qlab-test expires", "modprobe nf_conntrack",
                     f"sysctl -qw {lab_values}", f"nft -f {boot.root}/etc/qlab/nat.nft",
                     "sysctl -qw net.ipv4.ip_forward=1"], "no dnf: nft and conntrack are there"
    assert "nf_conntrack_udp_timeout=120" in lab_values
    assert (boot.root / "etc/qlab/nat.nft").read_text() == kw["nat_ruleset"]
    for nic in ("ens5", "ens6"):
        assert (boot.root / f"proc/sys/net/ipv4/conf/{nic}/send_redirects").read_text() == "0\n"
    assert (boot.root / READY.lstrip("/")).exists()


def test_nat_router_installs_nftables_only_when_missing_and_waits_for_its_route(tmp_path):
    """No nft on the image and no route yet (the Elastic IP is attached after the instance runs):
    dnf fails twice, then installs nftables, and the ruleset loads after it, forwarding last."""
    boot = Boot(tmp_path, {"modprobe": "", "sysctl": "", "dnf": ""}, fail_first={"dnf": 2})
    nft = boot.root / "late-bin/nft"  # what `dnf install nftables` puts in place
    nft.parent.mkdir(parents=True)
    boot._stub(nft, "nft", "", 0)
    (boot.bin / "dnf").write_text((boot.bin / "dnf").read_text()
                                  + f'case "$*" in *nftables*) ln -sf "{nft}" "{boot.bin}/nft";; esac\n')
    r = boot.run(user_data("nat", **nat_kw("full_cone")))
    assert r.returncode == 0, r.stderr
    calls = boot.calls()
    dnf = [c for c in calls if c.startswith("dnf ")]
    assert dnf[:3] == ["dnf install -y -q nftables"] * 3 and calls.count("sleep 5") == 1 and "sleep 10" in calls
    assert calls.index(dnf[2]) < calls.index(f"nft -f {boot.root}/etc/qlab/nat.nft") < calls.index(
        "sysctl -qw net.ipv4.ip_forward=1")
    assert dnf[3:] == ["dnf install -y -q conntrack-tools"], "conntrack-tools after forwarding, only if missing"
    assert r.stderr.count("qlab boot: try") == 2


def test_retry_is_bounded_doubles_its_waits_and_says_when_it_gives_up(tmp_path):
    """The boot gives up after 8 tries (635 s of waits at most, sleep stubbed here), with one clear
    line, and the script stops there: nothing after it runs, the instance is never `ready`."""
    boot = Boot(tmp_path, {"dnf": ""}, fail_first={"dnf": 10**6})
    r = boot.run(user_data("agent"))
    assert r.returncode != 0
    calls = boot.calls()
    sleeps = [int(c.split()[1]) for c in calls if c.startswith("sleep ")]
    assert sleeps == [5 * 2 ** i for i in range(TRIES - 1)] and sum(sleeps) <= 11 * 60
    assert calls.count("dnf install -y -q awscli-2") == TRIES, "no aws on PATH: it installs awscli-2 first"
    assert not any(c.startswith("pip ") for c in calls)
    assert f"qlab boot: gave up after {TRIES} tries: command dnf install -y -q awscli-2" in r.stderr
    assert re.search(r"qlab boot: FAILED at line \d+: type -P aws >/dev/null \|\| dnf install -y -q awscli-2", r.stderr)
    assert not (boot.root / "var/lib/qlab/ready").exists()


def test_retry_succeeds_once_the_network_is_there(tmp_path):
    from qlab.cloud.userdata import RETRY

    boot = Boot(tmp_path, {"flaky": ""}, fail_first={"flaky": 3})
    r = boot.run(f"set -euo pipefail\n{RETRY}\nretry flaky --arg\necho done\n")
    assert r.returncode == 0 and r.stdout == "done\n", r.stderr
    assert boot.calls() == ["flaky --arg", "sleep 5", "flaky --arg", "sleep 10", "flaky --arg", "sleep 20",
                            "flaky --arg"]


def test_host_boot_retries_every_network_step_and_installs_the_slim_wheel(tmp_path):
    """The Intermediate's boot with each network step failing once (dnf, S3, pip, each SSM fetch):
    all are retried, the wheel is installed without an extra, the reaper timer is enabled before
    any credential is fetched, credentials are 0600, units started, then `ready`."""
    once = tmp_path / "ssm-failed-once"
    ssm_stub = (f'case "$*" in *get-parameter*) [ -e {once} ] || {{ : > {once}; exit 1; }}; echo "value of $7";; esac')
    boot = Boot(tmp_path, {"dnf": "", "python3.11": "", "systemctl": "", "aws": ssm_stub},
                fail_first={"dnf": 1, "aws": 1, "pip": 1})
    expires = "2026-11-28T04:30:00+00:00"
    r = boot.run(user_data("intermediate", reaper=("qlab-test", expires)))
    assert r.returncode == 0, r.stderr
    calls = boot.calls()
    assert calls.count("dnf install -y -q python3.11 python3.11-pip") == 2, "nftables is for NAT routers only"
    s3 = "aws s3 cp --region us-east-1 s3://qlab-test-artifacts/wheels/qlab-0.1.0-py3-none-any.whl"
    assert [c for c in calls if c.startswith("aws s3")] == [f"{s3} {boot.root}/tmp/"] * 2
    pip = [c for c in calls if c.startswith("pip ")]
    assert pip == [f"pip install -q {boot.root}/tmp/qlab-0.1.0-py3-none-any.whl"] * 2, "the slim runtime: no [lab]"
    ssm = [c for c in calls if "get-parameter" in c]
    assert len(ssm) == 4 + 1 and ssm[0] == ssm[1], "4 credentials, the first fetch retried once"
    assert calls.index("systemctl enable --now qlab-reaper.timer") < calls.index(ssm[0])
    certs = boot.root / "etc/qlab/certs"
    assert sorted(p.name for p in certs.iterdir()) == ["ca.pem", "intermediate.key", "intermediate.pem", "secret"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in certs.iterdir())
    assert (certs / "secret").read_text() == "value of /qlab/qlab-test/secret\n"
    assert calls[-1] == "systemctl enable --now qlab-intermediate.service"
    assert calls[0] == "shutdown -h +140 qlab deployment qlab-test expires", "TTL + 20 min: the reaper's backstop"
    assert (boot.root / "var/lib/qlab/ready").exists()
    timer = (boot.root / "etc/systemd/system/qlab-reaper.timer").read_text()
    assert "OnCalendar=2026-11-28 04:30:00 UTC\nPersistent=true\n" in timer


def test_only_the_reapers_host_shuts_down_late():
    for kind in ("connector", "agent"):
        assert 'shutdown -h +120 "' in user_data(kind)
    assert 'shutdown -h +120 "' in user_data("nat", **nat_kw("symmetric"))
    assert 'shutdown -h +120 "' in user_data("intermediate"), "no reaper, no backstop delay"
    assert 'shutdown -h +140 "' in user_data("intermediate", reaper=("qlab-test", "2026-11-28T04:30:00Z"))


def test_reaper_timer_fires_at_the_expiry_in_utc_and_runs_a_real_qlab_command():
    import shlex

    from qlab.cloud.userdata import on_calendar

    expires = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).replace(microsecond=0)
    local = expires.astimezone(dt.timezone(dt.timedelta(hours=-5)))  # an offset other than UTC
    ud = user_data("intermediate", reaper=("qlab-test", local.isoformat()))
    cal = re.search(r"^OnCalendar=(.*)$", ud, re.M).group(1)
    assert cal == expires.strftime("%Y-%m-%d %H:%M:%S UTC") == on_calendar(local.isoformat())
    if shutil.which("systemd-analyze"):
        r = subprocess.run(["systemd-analyze", "calendar", cal], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "TZ": "UTC"})
        assert r.returncode == 0, r.stderr
        assert f"Next elapse: {expires.strftime('%a %Y-%m-%d %H:%M:%S')} UTC" in r.stdout, r.stdout
    start = re.search(r"^ExecStart=(.*)$", ud.split("qlab-reaper.service", 1)[1], re.M).group(1)
    argv = shlex.split(start)
    assert argv == ["/opt/qlab/bin/qlab", "cloud", "reap", "qlab-test", "--region", "us-east-1"]
    import contextlib
    import io

    from qlab.cli.main import build_parser

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            args = None
    if args is None and "invalid choice: 'reap'" in err.getvalue():
        pytest.skip("`qlab cloud reap` is not in this tree yet: the argv shape is checked above")
    assert args is not None, err.getvalue()
    assert (args.cloud_command, args.id, args.region) == ("reap", "qlab-test", "us-east-1")


def test_reaper_and_nat_arguments_are_checked():
    for bad, match in (((("qlab-other", "2026-11-28T04:30:00+00:00"),), "cannot reap"),
                       ((("qlab-test", "2026-11-28T04:30:00"),), "UTC offset"),
                       ((("qlab-test", "tomorrow"),), "Invalid isoformat")):
        with pytest.raises(ValueError, match=match):
            user_data("intermediate", reaper=bad[0])
    with pytest.raises(ValueError, match="no role"):
        user_data("connector", **nat_kw("symmetric"))
    with pytest.raises(ValueError, match="not a sysctl"):
        user_data("nat", nat_ruleset="table ip t {}\n", nat_sysctls={"net.ipv4.ip_forward; reboot": "1"})


def test_user_data_over_16_kB_is_refused_naming_the_host_and_a_large_ruleset_is_packed(tmp_path):
    """EC2 takes at most 16 KB raw. A ruleset that does not fit as text travels gzip+base64 and the
    router writes exactly its bytes; a host whose script cannot fit is refused by name."""
    import hashlib

    from qlab.cloud.userdata import USER_DATA_LIMIT

    big = "".join(f"# {i:05d} {'x' * 60}\n" for i in range(400))  # 28 kB of text that gzip shrinks
    ud = user_data("nat", nat_ruleset=big, nat_sysctls={})
    assert len(big) > USER_DATA_LIMIT >= len(ud.encode())
    assert "base64 -d <<'QLAB_NFT' | gunzip > /etc/qlab/nat.nft" in ud and big not in ud
    boot = Boot(tmp_path, {"modprobe": "", "sysctl": "", "nft": "", "conntrack": ""})
    r = boot.run(ud)
    assert r.returncode == 0, r.stderr
    assert (boot.root / "etc/qlab/nat.nft").read_text() == big
    noise = "".join(hashlib.sha256(str(i).encode()).hexdigest() + "\n" for i in range(600))  # gzip cannot help
    with pytest.raises(ValueError, match=r"qlab-test-nat-noise .* is [\d,]+ bytes; EC2 takes at most 16,384"):
        user_data("nat", nat_ruleset=noise, nat_sysctls={}, host="qlab-test-nat-noise")
    params = {f"f{i}.pem": f"/qlab/qlab-test/{'p' * 100}{i}" for i in range(80)}
    with pytest.raises(ValueError, match="qlab-test-agent-3 "):
        user_data("agent", params=params, host="qlab-test-agent-3")


def test_every_preset_ships_its_ruleset_as_text_within_16_kB():
    """With the longest deployment id every preset's router script fits as plain text (readable in
    the console, the ruleset byte for byte), and so does every host's."""
    from qlab.cloud.deploy import ALL_PRESETS_WITH_NAT
    from qlab.cloud.userdata import USER_DATA_LIMIT

    did = "qlab-" + "x" * 26
    common = dict(deployment=did, region="ap-southeast-2", bucket=f"{did}-artifacts", ttl_minutes=1440,
                  domain="relay.example.org", acme_email="ops@example.org", service="echo-symmetric_seq")
    for p in ALL_PRESETS_WITH_NAT:
        kw = nat_kw(p)
        ud = user_data("nat", **common, **kw, params={})
        assert kw["nat_ruleset"] in ud and len(ud.encode()) <= USER_DATA_LIMIT, p
    for kind in ("intermediate", "connector", "agent"):
        extra = {"reaper": (did, "2026-11-28T04:30:00+00:00")} if kind == "intermediate" else {}
        ud = user_data(kind, **common, **extra, params={f: f"/qlab/{did}/{f}" for f in CREDENTIALS[kind]})
        assert len(ud.encode()) <= USER_DATA_LIMIT - 8192, kind


@pytest.mark.skipif(not HAS_SHELLCHECK, reason="shellcheck is not installed")
def test_every_boot_script_is_shellcheck_clean(tmp_path):
    from qlab.cloud.deploy import ALL_PRESETS_WITH_NAT

    scripts = {f"nat-{p}": user_data("nat", **nat_kw(p)) for p in ALL_PRESETS_WITH_NAT}
    scripts["nat-packed"] = user_data("nat", nat_ruleset="".join(f"# {i} {'y' * 70}\n" for i in range(300)),
                                      nat_sysctls={})
    scripts["intermediate"] = user_data("intermediate", reaper=("qlab-test", "2026-11-28T04:30:00+00:00"),
                                        domain="relay.example.org", acme_email="ops@example.org")
    scripts["connector"] = user_data("connector")
    scripts["agent"] = user_data("agent")
    assert "base64 -d" in scripts["nat-packed"]
    for name, ud in scripts.items():
        path = tmp_path / f"{name}.sh"
        path.write_text(ud)
        r = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{name}:\n{r.stdout}"


# --- the slim runtime ---------------------------------------------------------------------------


def _requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")


def slim_modules() -> set[str]:
    """The top-level modules `pip install <wheel>` (no extra) brings: the closure of pyproject's
    base dependencies over the installed distributions, mapped to the modules they provide."""
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    dists: set[str] = set()
    todo = list(base)
    while todo:
        req = todo.pop()
        if "extra" in req.partition(";")[2]:  # only an extra asks for it
            continue
        name = _requirement_name(req)
        if name in dists:
            continue
        try:
            todo += metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        dists.add(name)
    provided = metadata.packages_distributions()
    return {mod for mod, ds in provided.items() if any(_requirement_name(d) in dists for d in ds)} | {"qlab"}


# Installed first in the child: any import outside the stdlib and the slim runtime fails, and is logged.
BLOCKER = """
import os, sys
allowed, log = set(os.environ["QLAB_SLIM_ALLOWED"].split(",")), os.environ["QLAB_SLIM_LOG"]
class SlimRuntime:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed:
            return None
        with open(log, "a") as f:
            f.write(top + chr(10))
        raise ImportError(f"{top} is not in the slim runtime")
sys.meta_path.insert(0, SlimRuntime())
import runpy
runpy.run_module("qlab.cli.main", run_name="__main__")
"""


def test_the_base_dependencies_are_the_slim_runtime():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_requirement_name(r) for r in project["dependencies"]}
    assert base == {"aioquic", "cryptography", "boto3"}
    lab = {_requirement_name(r) for r in project["optional-dependencies"]["lab"]}
    assert {"pandas", "pyarrow", "matplotlib", "papermill", "jupyterlab", "tqdm"} <= lab
    assert not slim_modules() & LAB
    assert "-e '.[lab,dev]'" in (ROOT / "Makefile").read_text(), "make venv: the whole suite needs both extras"


@pytest.fixture
def moto_s3(monkeypatch):
    """moto's server on 127.0.0.1 (the children reach it through AWS_ENDPOINT_URL) and its env."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_tcp_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "AKIAQLABTESTKEY12345", "AWS_SECRET_ACCESS_KEY": "x" * 40,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
           "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        server.stop()


@pytest.mark.slow
def test_roles_and_probe_run_without_the_lab_extra(certs_dir, tmp_path, moto_s3):
    """What an AWS host runs, in processes that cannot import pandas & co.: an Intermediate, echo
    and a Connector on loopback, `qlab agent` through them, and `qlab probe` for one trial that
    writes its campaign folder (trials.jsonl, no tables) and mirrors it to S3."""
    import boto3

    allowed = slim_modules()
    log = tmp_path / "blocked.log"
    env = {"QLAB_SLIM_ALLOWED": ",".join(sorted(allowed)), "QLAB_SLIM_LOG": str(log)}
    slim = [sys.executable, "-c", BLOCKER]
    port, eport, certs = free_udp_port(), free_udp_port(), str(certs_dir)
    procs = []
    try:
        procs.append(Proc([*slim, "intermediate", "--listen", f"127.0.0.1:{port}", "--alt", f"127.0.0.1:{port + 1}",
                           "--alt", f"127.0.0.2:{port}", "--alt", f"127.0.0.2:{port + 1}", "--certs", certs],
                          name="intermediate", env=env))
        procs.append(Proc([*slim, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo", env=env))
        procs[-1].wait_for("UDP echo on", timeout=30)
        procs.append(Proc([*slim, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo-lo",
                           "--forward", f"127.0.0.1:{eport}", "--p2p-port", str(free_udp_port()), "--bind",
                           "127.0.0.1", "--certs", certs], name="connector", env=env))
        procs[-1].wait_for("registered service echo-lo", timeout=30)
        roles_blocked = set(log.read_text().split()) if log.exists() else set()
        agent = Proc([*slim, "agent", "--intermediate", f"127.0.0.1:{port}", "--service", "echo-lo", "--ping", "3",
                      "--bind", "127.0.0.1", "--certs", certs], name="agent", env=env)
        rc, out, err = agent.communicate(timeout=60)
        assert rc == 0, err[-3000:]
        assert sum(p["received"] for p in json.loads(out.splitlines()[-1])["paths"].values()) > 0
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="qlab-slim-test")
        probe = Proc([*slim, "probe", "--intermediate", f"127.0.0.1:{port}", "--certs", certs,
                      "--connector", "echo-lo=public", "--trials", "1", "--samples", "3", "--campaign", "slim",
                      "--results", str(tmp_path / "results"), "--host", "agent-1", "--bind", "127.0.0.1",
                      "--upload", "s3://qlab-slim-test/results/slim/agent-1/", "--region", "us-east-1"],
                     name="probe", env=env)
        rc, out, err = probe.communicate(timeout=120)
        assert rc == 0, err[-3000:]
    finally:
        for p in reversed(procs):
            p.terminate()
    for p in procs:
        assert "Traceback" not in "\n".join(p.err), p.log()
    folder = tmp_path / "results" / "slim"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "trials.jsonl"], "no tables without pandas"
    recs = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    assert [(r["trial_id"], r["outcome"]) for r in recs] == [("agent-1.echo-lo.0000", "direct_wan")]
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="qlab-slim-test")["Contents"])
    assert keys == ["results/slim/agent-1/manifest.json", "results/slim/agent-1/trials.jsonl"]
    assert not roles_blocked & LAB, f"the roles tried to import {roles_blocked & LAB}"
    assert set(log.read_text().split()) & LAB == {"pandas"}, "the probe only asks whether pandas is there"
