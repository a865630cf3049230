"""Field trials (`qlab probe`): only the Agent runs here, against roles running elsewhere as their
own processes. On loopback without privileges, and through the kernel's NATs in the netns lab —
where the Agent, the Intermediate and the Connector sit in separate namespaces, exactly as on a
cloud deployment."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.procs import QLAB, LoopbackDeployment, Proc, free_udp_port


def test_targets_and_specs_refuse_bad_input(tmp_path):
    from qlab.study.field import ProbeSpec, Target, expected_for

    assert Target.parse("echo-symmetric=symmetric") == Target("echo-symmetric", "symmetric", "pair")
    assert Target.parse("echo@same_lan") == Target("echo", "unknown", "same_lan")
    for bad in ("", "echo=carrier_grade", "echo;rm -rf", "a" * 65, "echo@mesh"):
        with pytest.raises(ValueError):
            Target.parse(bad)
    for kw in (dict(label="moon"), dict(trials=0), dict(targets=[]), dict(upload="http://example/x"),
               dict(upload="s3://UPPER/x"), dict(campaign_id="../x"), dict(agent_nat="cgnat")):
        with pytest.raises(ValueError):
            ProbeSpec(intermediate=("127.0.0.1", 4433), certs=str(tmp_path), **kw)
    assert expected_for("full_cone", "symmetric") == "D>"
    assert expected_for("managed", "symmetric") == "?" and expected_for("unknown", "full_cone") == "?"


@pytest.fixture
def loopback_deployment(certs_dir):
    d = LoopbackDeployment(str(certs_dir), ["echo-lo"])
    yield d.port
    d.close()


def test_probe_on_loopback_records_field_trials(loopback_deployment, certs_dir, tmp_path):
    """The whole CLI: classification (no NAT on loopback), then trials against the service; records
    with backend `field`, the schema the notebooks load, and a resumed probe runs nothing twice."""
    from qlab.study.results import load

    argv = [*QLAB, "probe", "--intermediate", f"127.0.0.1:{loopback_deployment}", "--certs", str(certs_dir),
            "--connector", "echo-lo=public", "--trials", "2", "--samples", "5", "--campaign", "field-lo",
            "--results", str(tmp_path), "--host", "lo", "--bind", "127.0.0.1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{"):])
    assert summary["outcomes"] == {"direct_wan": 2}, r.stdout
    df = load("field-lo", root=tmp_path)
    assert list(df["trial_id"]) == ["lo.echo-lo.0000", "lo.echo-lo.0001"]
    assert set(df["backend"]) == {"field"} and set(df["agent_nat"]) == {"public"} and set(df["expected"]) == {"D"}
    assert df["as_expected"].all() and df["direct_verified"].all()
    assert (df["rtt_direct_p50_ms"] > 0).all() and (df["rtt_relay_p50_ms"] > 0).all()
    assert all("relay stayed on" in m for m in df["measured_with"])
    manifest = json.loads((tmp_path / "field-lo" / "manifest.json").read_text())
    assert manifest["classification"]["preset"] == "public" and manifest["agent_nat_source"] == "classified"
    r2 = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert r2.returncode == 1 and json.loads(r2.stdout[r2.stdout.index("{"):])["outcomes"] == {}
    assert len(load("field-lo", root=tmp_path)) == 2


def test_probe_against_nothing_records_a_failed_trial(certs_dir, tmp_path):
    """No Intermediate listening: the trial is a `failed` record with the reason, within the setup
    window (2 s here, the probe's `--setup-window`), well before the default window's 20 s (the
    slack is for a loaded machine)."""
    from qlab.study.field import ProbeSpec, Target, probe
    from qlab.study.results import load

    d = probe(ProbeSpec(intermediate=("127.0.0.1", free_udp_port()), certs=str(certs_dir), classify=False,
                        targets=[Target("echo", "symmetric")], agent_nat="full_cone", trials=1, campaign_id="dead",
                        setup_window=2.0),
              root=tmp_path)
    df = load(d.name, root=tmp_path)
    assert list(df["outcome"]) == ["failed"] and df["error"][0], df.to_dict("records")
    assert df["expected"][0] == "D>" and not df["as_expected"][0]
    assert 2.0 <= df["duration_s"][0] < 12.0, df["duration_s"][0]


def test_probe_mirrors_results_to_s3(loopback_deployment, certs_dir, tmp_path, monkeypatch):
    """With --upload the campaign folder is copied to S3 after every trial (moto in process: no
    traffic leaves this host; the QUIC traffic is loopback only)."""
    for k, v in {"AWS_ACCESS_KEY_ID": "AKIAQLABTESTKEY12345", "AWS_SECRET_ACCESS_KEY": "x" * 40,
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
                 "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
        monkeypatch.setenv(k, v)
    import boto3
    from moto import mock_aws

    from qlab.study.field import ProbeSpec, Target, probe

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="qlab-field-test")
        seen: list[int] = []

        def count(rec: dict) -> None:  # after each trial the jsonl in S3 already holds it
            body = s3.get_object(Bucket="qlab-field-test", Key="results/c9/agent-x/trials.jsonl")["Body"].read()
            seen.append(len(body.splitlines()))

        probe(ProbeSpec(intermediate=("127.0.0.1", loopback_deployment), certs=str(certs_dir), classify=False,
                        targets=[Target("echo-lo", "public")], agent_nat="public", trials=2, samples=3,
                        campaign_id="c9", host="agent-x", upload="s3://qlab-field-test/results/c9/agent-x/",
                        region="us-east-1"), root=tmp_path, on_result=count)
        assert seen == [1, 2]
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="qlab-field-test")["Contents"])
        assert keys == [f"results/c9/agent-x/{n}" for n in
                        ("manifest.json", "trials.csv", "trials.jsonl", "trials.parquet")], keys
        body = s3.get_object(Bucket="qlab-field-test", Key="results/c9/agent-x/trials.jsonl")["Body"].read()
        assert [json.loads(line)["backend"] for line in body.splitlines()] == ["field", "field"]


@pytest.mark.parametrize("agent_nat,connector_nat,outcome", [
    ("port_restricted", "full_cone", "direct_wan"),
    ("symmetric", "symmetric", "relay"),
])
def test_probe_through_kernel_nats(netns_ok, certs_dir, tmp_path, agent_nat, connector_nat, outcome):
    """The field runner in the netns lab: each role a process in its own namespace, the Agent's
    and the Connector's NATs in the kernel. The probe classifies its NAT correctly and gets the
    expected outcome without any in-process help (no relay switch, no shared loop)."""
    from qlab.backends.netns.lab import Lab
    from qlab.scenario.topology import build
    from qlab.study.results import load

    certs = str(certs_dir)
    with Lab(build(agent_nat, connector_nat, profile_name="lan")) as lab:
        ips = lab.topology.host("intermediate").ips
        cip = lab.topology.host("connector").ips[0]

        def inside(host, argv):
            return ["ip", "netns", "exec", lab.netns(host), *argv]

        procs = []
        try:
            procs.append(Proc(inside("intermediate", [*QLAB, "intermediate", "--listen", f"{ips[0]}:4433",
                                                      "--alt", f"{ips[0]}:4434", "--alt", f"{ips[1]}:4433",
                                                      "--alt", f"{ips[1]}:4434", "--certs", certs]),
                              name="intermediate"))
            procs.append(Proc(inside("connector", [*QLAB, "echo", "--listen", f"{cip}:9999"]), name="echo"))
            procs[-1].wait_for("UDP echo on")
            procs.append(Proc(inside("connector", [*QLAB, "connector", "--intermediate", f"{ips[0]}:4433",
                                                   "--service", "echo-cell", "--forward", f"{cip}:9999",
                                                   "--certs", certs]), name="connector"))
            procs[-1].wait_for("registered service echo-cell", timeout=20)
            r = subprocess.run(inside("agent", [*QLAB, "probe", "--intermediate", f"{ips[0]}:4433", "--certs", certs,
                                                "--connector", f"echo-cell={connector_nat}", "--trials", "1",
                                                "--samples", "5", "--campaign", "k", "--results", str(tmp_path)]),
                               capture_output=True, text=True, timeout=120)
        finally:
            for p in reversed(procs):
                p.terminate()
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    rec = load("k", root=tmp_path).iloc[0]
    assert rec["backend"] == "field" and rec["agent_nat"] == agent_nat, rec.to_dict()  # classified in the kernel
    assert rec["outcome"] == outcome and rec["as_expected"], rec.to_dict()


def test_classify_here_asks_no_gateway_when_the_intermediate_is_on_loopback():
    """Field classification asks the default gateway for its mapping protocols only from a real
    interface; on loopback there is no gateway in the way and nothing may leave the machine."""
    import asyncio

    from qlab.net import RealNet
    from qlab.traversal.portmap import protocols_towards

    assert asyncio.run(protocols_towards(RealNet(), ("127.0.0.1", 4433))) is None
