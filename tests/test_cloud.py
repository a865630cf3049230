"""The AWS backend against moto (no real AWS is reachable here): plan, up, status, run, down, and
the safety rules. No test sends traffic to any address moto returns; in-process moto makes no
network calls at all, and the server test talks only to moto's own endpoint on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

import pytest

from tests.cloud_support import FAKE_KEY_ID, FAKE_SECRET, fake_aws_env, stand_in_wheel


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch, tmp_path):
    fake_aws_env(monkeypatch, state=tmp_path / "state", managed_policies=True)



@pytest.fixture
def aws():
    """moto with AWS's refusals where moto is more lenient (tests/aws_strict.py)."""
    from tests.aws_strict import strict_aws

    with strict_aws() as strict:
        yield strict


@pytest.fixture
def wheel(tmp_path):
    return stand_in_wheel(tmp_path)


def spec(**kw):
    from qlab.cloud.deploy import DeploymentSpec

    return DeploymentSpec(**{"deployment_id": "qlab-test", **kw})


def test_plan_creates_nothing_and_prices_the_deployment(aws):
    import boto3

    from qlab.cloud.deploy import plan

    p = plan(spec(topology="nat-matrix", presets=["full_cone", "symmetric"], agents_per_cell=2))
    names = [i["name"] for i in p["resources"]["instances"]]
    assert names.count("nat-full_cone") == 1 and len([n for n in names if n.startswith("agent-")]) == 4
    assert p["hourly_cost_usd"] > 0 and p["cost_for_ttl_usd"] == pytest.approx(p["hourly_cost_usd"] * (2 + 20 / 60), rel=1e-3)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    assert not [v for v in ec2.describe_vpcs()["Vpcs"] if not v.get("IsDefault")]


def test_bad_input_is_refused_before_anything_exists():
    """Each refusal names the flag to change, not an internal field."""
    from qlab.cloud.deploy import plan

    with pytest.raises(ValueError, match="exceed --max-instances 3"):
        plan(spec(topology="nat-matrix", presets=["full_cone", "symmetric"], max_instances=3))
    for bad, flag in ((dict(ttl_hours=48), "--ttl"), (dict(topology="mesh"), "--topology"),
                      (dict(presets=["public"]), "--presets"), (dict(region="moon-1"), "--region"),
                      (dict(deployment_id="Bad_Id"), "--id"), (dict(topology="nat-matrix", presets=[]), "--presets"),
                      (dict(instance_type="t4g.micro"), "--instance-type"),
                      (dict(instance_type="m7i.48xlarge"), "--instance-type"), (dict(agents_per_cell=0), "--agents")):
        with pytest.raises(ValueError, match=flag):
            spec(**bad)


def test_up_then_down_leaves_nothing(aws, certs_dir, wheel):
    import boto3

    from qlab.cloud.deploy import Cloud, down, leftovers, nat_ruleset, plan, status, up
    from qlab.nat.nftables import render
    from qlab.nat.spec import preset

    cloud = Cloud("us-east-1")
    s = spec(topology="nat-matrix", presets=["port_restricted", "symmetric_seq"])
    state = up(s, cloud, certs_dir=str(certs_dir), wheel=wheel)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    eips = ec2.describe_addresses(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["Addresses"]
    assert len(eips) == plan(s)["resources"]["elastic_ips"], "plan prices the public addresses up allocates"
    inter = next(i for r in ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["qlab-test-intermediate"]}])
                 ["Reservations"] for i in r["Instances"])
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[inter["NetworkInterfaces"][0]["NetworkInterfaceId"]])[
        "NetworkInterfaces"][0]
    assert sorted(a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]) == ["10.80.0.10", "10.80.0.11"]
    # both Elastic IPs on the Intermediate's interface (moto does not keep which private IP an
    # association names, so the pairing itself is not checked here)
    assert sorted(a["PublicIp"] for a in eips if a.get("NetworkInterfaceId") == eni["NetworkInterfaceId"]) == \
        sorted(state["intermediate_ips"])
    st = status("qlab-test", cloud)
    assert len(st["instances"]) == 1 + 2 * 3
    secret = (certs_dir / "secret").read_text().strip()
    key = (certs_dir / "intermediate.key").read_text()
    for r in ec2.describe_instances(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["Reservations"]:
        for inst in r["Instances"]:
            iid = inst["InstanceId"]
            ud = base64.b64decode(ec2.describe_instance_attribute(InstanceId=iid, Attribute="userData")
                                  ["UserData"]["Value"]).decode()
            assert secret not in ud and "PRIVATE KEY" not in ud and key not in ud, "secrets travel via SSM only"
            tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
            # the TTL; the Intermediate, which runs the reaper then, 20 minutes later as a backstop
            assert f"shutdown -h +{140 if tags['Name'].endswith('-intermediate') else 120}" in ud
            assert tags["qlab:deployment"] == "qlab-test" and "qlab:expires" in tags
            beh = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
            assert beh["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
            if tags["Name"].endswith("nat-port_restricted"):
                assert all(not e["SourceDestCheck"] for e in inst["NetworkInterfaces"])
                expected = render(preset("port_restricted"), wan_if="ens5", lan_if="ens6", wan_ip="10.80.0.100",
                                  lan_cidr="10.80.10.0/24")
                assert expected == nat_ruleset("port_restricted", "10.80.0.100", "10.80.10.0/24")
                assert expected in ud, "the NAT instance loads the lab renderer's ruleset byte for byte"
    for sg in ec2.describe_security_groups(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["SecurityGroups"]:
        for perm in sg["IpPermissions"]:
            assert perm.get("FromPort") != 22, "no SSH: SSM Session Manager instead"
        if sg["GroupName"].endswith("-intermediate"):
            assert [(p["IpProtocol"], p["FromPort"], p["ToPort"]) for p in sg["IpPermissions"]] == [("udp", 4433, 4434)]
    ssm = boto3.client("ssm", region_name="us-east-1")
    p = ssm.get_parameter(Name="/qlab/qlab-test/secret", WithDecryption=True)["Parameter"]
    assert p["Type"] == "SecureString" and p["Value"].strip() == secret
    r = down("qlab-test", cloud)
    assert r["clean"], r["left"]
    assert not any(leftovers("qlab-test", cloud).values())
    assert down("qlab-test", cloud)["clean"], "down is idempotent"


def _host_certs(instance_id: str, folder):
    """What a host's user data writes to /etc/qlab/certs: each parameter it fetches, from moto's SSM."""
    import re

    import boto3

    ec2, ssm = (boto3.client(n, region_name="us-east-1") for n in ("ec2", "ssm"))
    ud = base64.b64decode(ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
                          ["UserData"]["Value"]).decode()
    folder.mkdir()
    for name, file in re.findall(r"--name (\S+) .* > /etc/qlab/certs/(\S+)$", ud, re.M):
        (folder / file).write_text(ssm.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"] + "\n")
    return folder


def test_run_matrix_commands_remote_results_and_collection(aws, certs_dir, wheel, tmp_path):
    """`run`: one SSM command per Agent host (the matrix: every cell's Agents against every cell's
    Connector). moto cannot execute them, so this test plays the Agent hosts: it runs each command
    exactly as sent — argv parsed from the command, only the Intermediate address, certs (an Agent
    host's own two files, as its user data fetches them from SSM) and results folder swapped for a
    loopback deployment's — which mirrors real field trials into the
    deployment's bucket; then progress, collection into one `aws` campaign, idempotent re-collection,
    refusal of foreign keys, and no credential anywhere."""
    import shlex

    import boto3

    from qlab.cli.main import main as qlab_main
    from qlab.cloud import runs
    from qlab.cloud.deploy import Cloud, down, load_state, up
    from qlab.study.results import load
    from tests.procs import LoopbackDeployment

    cloud = Cloud("us-east-1")
    up(spec(topology="nat-matrix", presets=["full_cone", "symmetric"], agents_per_cell=1), cloud,
       certs_dir=str(certs_dir), wheel=wheel)
    state = load_state("qlab-test")
    with pytest.raises(ValueError, match="campaign id"):
        runs.start(state, cloud, campaign_id="../x", trials=1)
    commands = runs.start(state, cloud, campaign_id="c1", trials=1, samples=3)
    assert sorted(commands) == ["agent-full_cone-0", "agent-symmetric-0"]
    sent = boto3.client("ssm", region_name="us-east-1").list_commands()["Commands"]
    assert sorted(c["Parameters"]["commands"][-1] for c in sent) == sorted(c["command"] for c in commands.values())
    assert all(c["Parameters"]["commands"][0] == runs.WAIT_READY for c in sent)  # bootstrap first, bounded
    argv = shlex.split(commands["agent-symmetric-0"]["command"])
    assert argv[:2] == ["/opt/qlab/bin/qlab", "probe"] and argv[argv.index("--agent-nat") + 1] == "symmetric"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--connector"] == [
        "echo-full_cone=full_cone", "echo-symmetric=symmetric@same_lan"]
    assert argv[argv.index("--upload") + 1] == f"s3://{state['bucket']}/results/c1/agent-symmetric-0/"
    assert argv[argv.index("--intermediate") + 1] == f"{state['intermediate_ip']}:4433"
    before = runs.progress(state, cloud, "c1", commands)
    assert before["trials"] == 0

    agent_certs = _host_certs(state["instances"]["agent-symmetric-0"]["id"], tmp_path / "agent-certs")
    assert sorted(p.name for p in agent_certs.iterdir()) == ["agent.secret", "ca.pem"]
    for f in agent_certs.iterdir():  # byte for byte what `qlab certs init` wrote (a PEM with a blank last line fails TLS)
        assert f.read_bytes() == (certs_dir / f.name).read_bytes(), f.name
    lab = LoopbackDeployment(str(certs_dir), ["echo-full_cone", "echo-symmetric"])
    try:
        for c in commands.values():
            a = shlex.split(c["command"])[1:]
            a[a.index("--intermediate") + 1] = f"127.0.0.1:{lab.port}"
            a[a.index("--certs") + 1] = str(agent_certs)  # an Agent host's own files, nothing more
            a[a.index("--results") + 1] = str(tmp_path / "remote" / a[a.index("--host") + 1])  # one per host
            assert qlab_main([*a, "--bind", "127.0.0.1"]) == 0  # loopback has no NAT: outcomes are not the point
    finally:
        lab.close()
    seen = []
    final = runs.wait(state, cloud, "c1", commands, timeout=30, poll=0.1, on_progress=seen.append)
    assert final["trials"] == 4 and final["finished"] and not final["timed_out"] and seen
    folder = runs.collect(state, cloud, "c1", tmp_path / "results")
    df = load("c1", root=tmp_path / "results")
    assert len(df) == 4 and set(df["backend"]) == {"aws"}
    assert sorted(zip(df["agent_nat"], df["connector_nat"], df["scenario"], strict=True)) == [
        ("full_cone", "full_cone", "same_lan"), ("full_cone", "symmetric", "pair"),
        ("symmetric", "full_cone", "pair"), ("symmetric", "symmetric", "same_lan")]
    assert all(e["deployment"] == "qlab-test" for e in df["extra"])
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["hosts"]) == ["agent-full_cone-0", "agent-symmetric-0"]
    assert manifest["deployments"] == ["qlab-test@us-east-1"] and manifest["backend"] == "aws"
    runs.collect(state, cloud, "c1", tmp_path / "results")
    assert len(load("c1", root=tmp_path / "results")) == 4  # collected twice, no duplicate

    s3 = boto3.client("s3", region_name="us-east-1")
    s3.put_object(Bucket=state["bucket"], Key="results/c2/../../evil", Body=b"x")
    with pytest.raises(ValueError, match="outside"):
        runs.collect(state, cloud, "c2", tmp_path / "results")
    assert down("qlab-test", cloud)["clean"]
    for root, _, files in os.walk(tmp_path):  # no credential in anything qlab wrote
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                text = fh.read()
            assert FAKE_KEY_ID.encode() not in text and FAKE_SECRET.encode() not in text, f


def test_each_host_runs_its_role_with_only_its_own_files(aws, certs_dir, wheel, tmp_path):
    """The files each host's user data fetches suffice for its role — an Intermediate, a Connector
    and an Agent, each with only its host's files, on loopback, carry echoes — and an Agent host's
    secret cannot register a service, even passed off as `connector.secret` beside a Connector leaf
    (before, every host held the root secret, so it could)."""
    import json as json_

    from qlab.cloud.deploy import Cloud, down, up
    from tests.procs import QLAB, Proc, free_udp_port

    state = up(spec(topology="nat-matrix", presets=["full_cone"]), Cloud("us-east-1"), certs_dir=str(certs_dir),
               wheel=wheel)
    hosts = {k: _host_certs(state["instances"][n]["id"], tmp_path / k) for k, n in (
        ("intermediate", "intermediate"), ("connector", "connector-full_cone"), ("agent", "agent-full_cone-0"))}
    rogue = tmp_path / "rogue"  # an Agent host's secret passed off as a Connector's, with a Connector leaf
    rogue.mkdir()
    (rogue / "connector.secret").write_bytes((hosts["agent"] / "agent.secret").read_bytes())
    for f in ("ca.pem", "connector.pem", "connector.key"):
        (rogue / f).write_bytes((certs_dir / f).read_bytes())
    assert down("qlab-test", Cloud("us-east-1"))["clean"]
    port, eport = free_udp_port(), free_udp_port()
    procs = [Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(hosts["intermediate"])],
                  name="intermediate"), Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo")]
    try:
        procs[-1].wait_for("UDP echo on")
        for name, certs in (("echo-full_cone", hosts["connector"]), ("echo-rogue", rogue)):
            procs.append(Proc([*QLAB, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", name,
                               "--forward", f"127.0.0.1:{eport}", "--p2p-port", str(free_udp_port()),
                               "--bind", "127.0.0.1", "--certs", str(certs)], name=f"connector-{name}"))
        procs[2].wait_for("registered service echo-full_cone")
        procs[3].wait_for("the Intermediate refused this connector: unauthenticated")
        assert not any("registered service" in line for line in procs[3].err)
        agent = Proc([*QLAB, "agent", "--intermediate", f"127.0.0.1:{port}", "--service", "echo-full_cone",
                      "--ping", "3", "--bind", "127.0.0.1", "--certs", str(hosts["agent"])], name="agent")
        rc, out, err = agent.communicate(30)
        assert rc == 0, err
        assert sum(p["received"] for p in json_.loads(out.splitlines()[-1])["paths"].values()) == 3
    finally:
        for p in reversed(procs):
            p.terminate()


def test_run_refuses_a_deployment_without_agent_hosts(aws, certs_dir, wheel):
    from qlab.cloud import runs
    from qlab.cloud.deploy import Cloud, down, load_state, up

    cloud = Cloud("us-east-1")
    up(spec(topology="relay"), cloud, certs_dir=str(certs_dir), wheel=wheel)
    with pytest.raises(ValueError, match="qlab probe"):
        runs.start(load_state("qlab-test"), cloud, campaign_id="c1", trials=1)
    assert down("qlab-test", cloud)["clean"]


def _host_kind(name: str) -> str:
    return next(k for k in ("intermediate", "nat", "agent", "connector") if name.startswith(f"qlab-test-{k}"))


def _policies(iam, instance: dict) -> list[dict]:
    """Every policy document (inline and attached managed) of an instance's role."""
    profile = instance["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
    (role,) = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
    docs = [iam.get_role_policy(RoleName=role["RoleName"], PolicyName=n)["PolicyDocument"]
            for n in iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]]
    for a in iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]:
        version = iam.get_policy(PolicyArn=a["PolicyArn"])["Policy"]["DefaultVersionId"]
        docs.append(iam.get_policy_version(PolicyArn=a["PolicyArn"], VersionId=version)["PolicyVersion"]["Document"])
    return [json.loads(d) if isinstance(d, str) else d for d in docs]


def _allowed(docs: list[dict], action: str, arn: str) -> bool:
    """IAM's evaluation for one action on one resource: some Allow applies and no Deny does (moto
    does not enforce IAM on instances, so the tests evaluate the documents themselves)."""
    import fnmatch

    def matches(patterns, value: str) -> bool:
        return any(fnmatch.fnmatchcase(value.lower(), p.lower()) for p in ([patterns] if isinstance(patterns, str) else patterns))

    def applies(st: dict) -> bool:
        if not matches(st["Action"], action):
            return False
        return matches(st["Resource"], arn) if "Resource" in st else not matches(st["NotResource"], arn)

    statements = [st for d in docs for st in d["Statement"]]
    return (any(st["Effect"] == "Allow" and applies(st) for st in statements)
            and not any(st["Effect"] == "Deny" and applies(st) for st in statements))


@pytest.mark.parametrize("topology", ["relay", "nat-matrix"])
def test_each_host_fetches_and_may_read_only_its_own_credentials(aws, certs_dir, wheel, topology):
    """Before: every host (NAT routers and Agent hosts included) fetched the root secret,
    intermediate.key and connector.key, and its role could read every parameter of the deployment.
    Now the Intermediate gets ca.pem, its leaf and the root secret; Connectors ca.pem, their leaf
    and connector.secret; Agent hosts ca.pem and agent.secret; NAT routers nothing; and each role's
    policies (AmazonSSMManagedInstanceCore included, which allows GetParameter on "*") allow
    exactly those parameters."""
    import re

    import boto3

    from qlab import wire
    from qlab.cloud.deploy import Cloud, down, up
    from qlab.cloud.iam import HOST_FILES

    up(spec(topology=topology, presets=["full_cone"]), Cloud("us-east-1"), certs_dir=str(certs_dir), wheel=wheel)
    ec2, iam, ssm = (boto3.client(n, region_name="us-east-1") for n in ("ec2", "iam", "ssm"))
    prefix = "arn:aws:ssm:us-east-1:123456789012:parameter"
    every = [p["Name"] for p in ssm.get_parameters_by_path(Path="/qlab/qlab-test/")["Parameters"]]
    assert len(every) == 8 and "/qlab/qlab-test/ca.key" not in every
    kinds = set()
    for r in ec2.describe_instances(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["Reservations"]:
        for inst in r["Instances"]:
            kind = _host_kind(next(t["Value"] for t in inst["Tags"] if t["Key"] == "Name"))
            kinds.add(kind)
            ud = base64.b64decode(ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
                                  ["UserData"]["Value"]).decode()
            fetches = re.findall(r"--name /qlab/qlab-test/(\S+) .* > /etc/qlab/certs/(\S+)$", ud, re.M)
            assert sorted(fetches) == sorted((f, f) for f in HOST_FILES[kind]), kind
            assert ud.count("get-parameter") == len(HOST_FILES[kind]) and ("/etc/qlab/certs" in ud) == (kind != "nat")
            docs = _policies(iam, inst)
            for action in ("ssm:GetParameter", "ssm:GetParameters", "ssm:GetParameterHistory"):
                readable = {n.rsplit("/", 1)[1] for n in every + ["/qlab/other/secret"]
                            if _allowed(docs, action, prefix + n)}
                assert readable <= set(HOST_FILES[kind]), (kind, action)
                assert action != "ssm:GetParameter" or readable == set(HOST_FILES[kind]), kind
            assert not _allowed(docs, "ssm:GetParametersByPath", prefix + "/qlab/qlab-test")
    assert kinds == ({"intermediate", "connector"} if topology == "relay" else set(HOST_FILES))
    root = (certs_dir / "secret").read_bytes().strip()
    for name, role in (("agent.secret", wire.Role.AGENT), ("connector.secret", wire.Role.CONNECTOR)):
        value = ssm.get_parameter(Name=f"/qlab/qlab-test/{name}", WithDecryption=True)["Parameter"]
        assert value["Type"] == "SecureString" and value["Value"].strip().encode() == wire.role_secret(root, role)
    assert down("qlab-test", Cloud("us-east-1"))["clean"]


@pytest.mark.skipif(shutil.which("shellcheck") is None and os.environ.get("QLAB_REQUIRE_NETNS") != "1",
                    reason="shellcheck is not installed")
def test_user_data_is_shellcheck_clean(tmp_path):
    from qlab.cloud.deploy import nat_ruleset
    from qlab.cloud.iam import HOST_FILES
    from qlab.cloud.userdata import render_user_data

    for kind, roles, ruleset in (("intermediate", ["intermediate"], None), ("connector", ["echo", "connector"], None),
                                 ("agent", [], None),
                                 ("nat", [], nat_ruleset("symmetric", "10.80.0.100", "10.80.10.0/24"))):
        ud = render_user_data(deployment="qlab-test", region="us-east-1", bucket="b", wheel_key="wheels/q.whl",
                              roles=roles, ttl_minutes=60, params={f: f"/qlab/qlab-test/{f}" for f in HOST_FILES[kind]},
                              nat_ruleset=ruleset, intermediate="198.51.100.7", service="echo-symmetric",
                              intermediate_addrs=(("10.80.0.10", "198.51.100.7"), ("10.80.0.11", "198.51.100.8")))
        assert len(ud.encode()) < 16384, "EC2 takes at most 16 kB of user data"
        path = tmp_path / "ud.sh"
        path.write_text(ud)
        r = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
        assert ud.rstrip().endswith("touch /var/lib/qlab/ready  # `qlab cloud run` waits for this")
    from qlab.cloud.runs import WAIT_READY

    path.write_text("#!/bin/bash\n" + WAIT_READY + "\n")
    r = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_user_data_fits_in_16_kB_for_every_host_and_preset():
    """EC2 refuses user data over 16 kB; the largest is a NAT router's with symmetric_seq's ruleset
    (for qlab-test: 16,328 bytes when every host fetched every credential, 15,284 now)."""
    from qlab.cloud.deploy import ALL_PRESETS_WITH_NAT, nat_ruleset
    from qlab.cloud.iam import HOST_FILES
    from qlab.cloud.userdata import render_user_data

    did = "qlab-" + "x" * 26  # the longest id
    for kind, roles in (("intermediate", ["intermediate"]), ("connector", ["echo", "connector"]), ("agent", []),
                        *((f"nat:{p}", []) for p in ALL_PRESETS_WITH_NAT)):
        files = HOST_FILES[kind.split(":")[0]]
        ruleset = nat_ruleset(kind[4:], "10.80.0.100", "10.80.10.0/24") if kind.startswith("nat:") else None
        ud = render_user_data(deployment=did, region="ap-southeast-2", bucket=f"{did}-artifacts",
                              wheel_key="wheels/qlab-0.1.0-py3-none-any.whl", roles=roles, ttl_minutes=1440,
                              params={f: f"/qlab/{did}/{f}" for f in files}, nat_ruleset=ruleset,
                              intermediate="198.51.100.7", service="echo-symmetric_seq", domain="relay.example.org",
                              acme_email="ops@example.org",
                              intermediate_addrs=(("10.80.0.10", "198.51.100.7"), ("10.80.0.11", "198.51.100.8")))
        assert len(ud.encode()) < 16384, kind


def test_units_start_real_qlab_commands():
    """Every ExecStart in the user data parses with qlab's own CLI, with the values the roles need."""
    import shlex

    from qlab.cli.main import build_parser
    from qlab.cloud.userdata import render_user_data

    ud = render_user_data(deployment="d", region="us-east-1", bucket="b", wheel_key="wheels/q.whl",
                          roles=["intermediate", "echo", "connector"], ttl_minutes=60, params={},
                          intermediate="198.51.100.7", service="echo-full_cone",
                          intermediate_addrs=(("10.80.0.10", "198.51.100.7"), ("10.80.0.11", "198.51.100.8")))
    starts = [line.split("=", 1)[1] for line in ud.splitlines() if line.startswith("ExecStart=")]
    parsed = {}
    for cmd in starts:
        argv = shlex.split(cmd)
        assert argv[0] == "/opt/qlab/bin/qlab"
        args = build_parser().parse_args(argv[1:])
        parsed[args.command] = args
    assert sorted(parsed) == ["connector", "echo", "intermediate"]
    i = parsed["intermediate"]
    assert i.listen == ("10.80.0.10", 4433) and ("10.80.0.11", 4434) in i.alt
    assert dict(i.advertise) == {"10.80.0.10": "198.51.100.7", "10.80.0.11": "198.51.100.8"}
    c = parsed["connector"]
    assert c.service == "echo-full_cone" and c.intermediate == ("198.51.100.7", 4433) and c.p2p_port == 4434
    with pytest.raises(ValueError, match="private and public"):
        render_user_data(deployment="d", region="us-east-1", bucket="b", wheel_key="w/q.whl", roles=["intermediate"],
                         ttl_minutes=60, params={})


def test_end_to_end_against_moto_server(tmp_path, certs_dir, wheel, capsys):
    """plan -> up -> status -> run -> down through the CLI, boto3 pointed at moto on 127.0.0.1."""
    import logging

    from moto.server import ThreadedMotoServer

    from qlab.cli.main import main

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        ep = ["--endpoint-url", f"http://{host}:{port}"]
        assert main(["cloud", "plan", "--id", "qlab-e2e", "--topology", "relay", *ep]) == 0
        assert json.loads(capsys.readouterr().out)["hourly_cost_usd"] > 0
        topo = ["--topology", "nat-matrix", "--presets", "port_restricted"]
        assert main(["cloud", "up", "--id", "qlab-e2e", *topo, "--certs", str(certs_dir), "--wheel", wheel, *ep]) == 0
        err = capsys.readouterr().err  # progress while it works
        assert "qlab cloud: launching nat-port_restricted" in err and "then attaching 3 Elastic IPs" in err
        assert main(["cloud", "status", "qlab-e2e", *ep]) == 0
        assert len(json.loads(capsys.readouterr().out)[0]["instances"]) == 4  # intermediate, NAT, agent, connector
        assert main(["cloud", "ls", *ep]) == 0  # every region
        rows = json.loads(capsys.readouterr().out)
        assert {i["deployment"] for i in rows} == {"qlab-e2e"} and {i["region"] for i in rows} == {"us-east-1"}
        assert {i["kind"] for i in rows} >= {"instance", "elastic_ip", "bucket"} and not any(i["overdue"] for i in rows)
        assert main(["cloud", "reap", "qlab-e2e", "--region", "us-east-1", *ep]) == 0  # before the TTL: nothing
        reaped = json.loads(capsys.readouterr().out)
        assert not reaped["expired"] and not any(reaped["deleted"].values())
        assert main(["cloud", "logs", "qlab-e2e", "--host", "intermediate", *ep]) == 0
        assert capsys.readouterr().out.startswith("== qlab-e2e-intermediate (i-")
        assert main(["cloud", "run", "qlab-e2e", "--campaign", "c9", "--results", str(tmp_path / "r"), "--poll", "0.1",
                     *ep]) == 0
        out = capsys.readouterr()
        progress = json.loads(out.out)["progress"]["qlab-e2e"]  # moto runs nothing: hosts finish with no trial
        assert progress["finished"] and progress["trials"] == 0 and list(progress["hosts"]) == ["agent-port_restricted-0"]
        assert "0 trials so far; 1/1 Agent hosts finished" in out.err
        assert main(["cloud", "down", "qlab-e2e", *ep]) == 0
        assert json.loads(capsys.readouterr().out)[0]["clean"]
    finally:
        server.stop()


def test_cloud_notebook_runs_against_moto_server(tmp_path, certs_dir, wheel):
    """notebooks/cloud_campaign.ipynb under papermill, boto3 pointed at moto's server on 127.0.0.1:
    plan, up, run, collect, down — the notebook states that nothing came back and that nothing is
    left; the executed copy and its HTML carry no credential."""
    import logging

    import nbformat
    from moto.server import ThreadedMotoServer

    from qlab.study.report import execute, to_html

    src = nbformat.read("notebooks/cloud_campaign.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code")  # committed without outputs
    params = [c for c in src.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "dry_run: bool = True" in params[0].source

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        out = execute("cloud_campaign", tmp_path / "cloud_campaign.ipynb", dict(
            presets="full_cone,symmetric", dry_run=False, endpoint_url=f"http://{host}:{port}",
            certs_dir=str(certs_dir), wheel=wheel, deployment_id="qlab-nb", campaign_id="nb-c1",
            results_root=str(tmp_path / "results"), poll_s=0.1, trials=1))
        import boto3

        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=f"http://{host}:{port}")
        live = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-nb"]}])
                ["Reservations"] for i in r["Instances"] if i["State"]["Name"] != "terminated"]
        assert not live
    finally:
        server.stop()
    text = json.dumps([c.get("outputs", []) for c in nbformat.read(out, as_version=4).cells],  # outputs only
                      ensure_ascii=False)
    assert "**Deployment `qlab-nb`** on endpoint" in text and "USD/h" in text
    assert "No trials collected" in text and "executes no remote command" in text
    assert "clean — nothing tagged" in text and "Traceback" not in text
    page = to_html(out, tmp_path / "cloud_campaign.html").read_bytes()
    assert b"No trials collected" in page
    for f in (out, tmp_path / "cloud_campaign.html", *sorted((tmp_path / "results").rglob("*"))):
        if f.is_file():
            data = f.read_bytes()
            assert FAKE_KEY_ID.encode() not in data and FAKE_SECRET.encode() not in data, f


def test_managed_nat_cell(aws, certs_dir, wheel):
    """--managed-nat: an AWS NAT Gateway cell whose private subnet routes through the gateway, with
    its own Agent and Connector hosts; its trials expect nothing (behaviour unknown); down removes
    the gateway before its address and subnet, and verifies."""
    import shlex

    import boto3

    from qlab.cloud import runs
    from qlab.cloud.deploy import Cloud, down, leftovers, load_state, plan, up

    with pytest.raises(ValueError, match="nat-matrix"):
        spec(topology="relay", managed_nat=True)
    s = spec(topology="nat-matrix", presets=["full_cone"], managed_nat=True)
    p = plan(s)
    assert {"agent-managed-0", "connector-managed"} <= {i["name"] for i in p["resources"]["instances"]}
    assert "private-managed" in p["resources"]["subnets"] and p["resources"]["elastic_ips"] == 4
    cloud = Cloud("us-east-1")
    state = up(s, cloud, certs_dir=str(certs_dir), wheel=wheel)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    f = [{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}]
    (gw,) = ec2.describe_nat_gateways(Filters=f)["NatGateways"]
    assert gw["State"] == "available" and gw["NatGatewayId"] == state["nat_gateway"]
    assert len(ec2.describe_addresses(Filters=f)["Addresses"]) == p["resources"]["elastic_ips"]
    sub = next(x for x in ec2.describe_subnets(Filters=f)["Subnets"]
               if {"Key": "Name", "Value": "qlab-test-private-managed"} in x["Tags"])
    rt = ec2.describe_route_tables(Filters=[{"Name": "association.subnet-id", "Values": [sub["SubnetId"]]}])
    routes = rt["RouteTables"][0]["Routes"]
    assert any(r.get("NatGatewayId") == gw["NatGatewayId"] and r["DestinationCidrBlock"] == "0.0.0.0/0" for r in routes)
    assert {"agent-managed-0", "connector-managed"} <= set(load_state("qlab-test")["instances"])
    commands = runs.start(load_state("qlab-test"), cloud, campaign_id="m1", trials=1)
    argv = shlex.split(commands["agent-managed-0"]["command"])
    assert argv[argv.index("--agent-nat") + 1] == "aws_nat_gateway"
    assert "echo-managed=aws_nat_gateway@same_lan" in argv and "echo-full_cone=full_cone" in argv
    r = down("qlab-test", cloud)
    assert r["clean"], r["left"]
    assert not leftovers("qlab-test", cloud)["nat_gateways"]


def test_several_regions_in_parallel_and_rollback_everywhere(aws, certs_dir, wheel, tmp_path, monkeypatch):
    """--regions: one deployment per region, created in parallel, one campaign over all of them
    (trial ids carry the region); if one region fails, every region is taken down."""
    import shlex

    import boto3

    from qlab.cloud import deploy, runs
    from qlab.cloud.deploy import Cloud, leftovers

    s = spec(topology="nat-matrix", presets=["full_cone"])
    states = runs.up_regions(s, ["us-east-1", "eu-west-1"], Cloud, certs_dir=str(certs_dir), wheel=wheel)
    ids = [st["deployment_id"] for st in states]
    assert ids == ["qlab-test-us-east-1", "qlab-test-eu-west-1"]
    for st in states:
        ec2 = boto3.client("ec2", region_name=st["region"])
        assert ec2.describe_vpcs(Filters=[{"Name": "tag:qlab:deployment", "Values": [st["deployment_id"]]}])["Vpcs"]
    out = runs.run_regions(ids, Cloud, campaign_id="r1", trials=1, root=tmp_path, poll=0.05, timeout=10)
    hosts = [shlex.split(c["command"]) for d in ids for c in out["commands"][d].values()]
    assert sorted(a[a.index("--host") + 1] for a in hosts) == ["eu-west-1-agent-full_cone-0",
                                                               "us-east-1-agent-full_cone-0"]
    manifest = json.loads((tmp_path / "r1" / "manifest.json").read_text())
    assert manifest["deployments"] == ["qlab-test-eu-west-1@eu-west-1", "qlab-test-us-east-1@us-east-1"]
    for st in states:
        assert deploy.down(st["deployment_id"], Cloud(st["region"]))["clean"]

    from botocore.exceptions import ClientError

    class FailInEu(deploy.Up):  # eu-west-1 has its VPC made, then AWS is out of capacity
        def run(self, certs_dir, wheel):
            if self.spec.region == "eu-west-1":
                self.network()
                raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "capacity exhausted"}},
                                  "RunInstances")
            return super().run(certs_dir, wheel)

    monkeypatch.setattr(deploy, "Up", FailInEu)
    with pytest.raises(deploy.UpFailed, match="InsufficientInstanceCapacity: capacity exhausted; rolled back, nothing left"):
        runs.up_regions(spec(deployment_id="qlab-rb", topology="nat-matrix", presets=["full_cone"]),
                        ["us-east-1", "eu-west-1"], Cloud, certs_dir=str(certs_dir), wheel=wheel)
    for region in ("us-east-1", "eu-west-1"):
        assert not any(leftovers(f"qlab-rb-{region}", Cloud(region)).values())


def test_lets_encrypt_option(aws, certs_dir, wheel, tmp_path):
    """--domain: TCP 80 opens on the Intermediate only then; its user data obtains the certificate
    (bounded retries) and its unit serves it; Connectors and Agent probes verify the name."""
    import shlex

    import boto3

    from qlab.cli.main import build_parser
    from qlab.cloud import runs
    from qlab.cloud.deploy import Cloud, down, load_state, plan, up

    for bad in (dict(domain="not a name", acme_email="ops@example.org"), dict(domain="relay.example.org"),
                dict(domain="relay.example.org", acme_email="x'; rm -rf /")):
        with pytest.raises(ValueError):
            spec(**bad)
    s = spec(topology="nat-matrix", presets=["full_cone"], domain="relay.example.org", acme_email="ops@example.org")
    assert plan(s)["resources"]["tls"].startswith("Let's Encrypt for relay.example.org")
    cloud = Cloud("us-east-1")
    up(s, cloud, certs_dir=str(certs_dir), wheel=wheel)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    f = [{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}]
    perms = {g["GroupName"]: sorted((p["IpProtocol"], p.get("FromPort")) for p in g["IpPermissions"])
             for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]}
    assert perms["qlab-test-intermediate"] == [("tcp", 80), ("udp", 4433)]
    assert not any(("tcp", 80) in v for k, v in perms.items() if k != "qlab-test-intermediate")
    uds = {}
    for r in ec2.describe_instances(Filters=f)["Reservations"]:
        for inst in r["Instances"]:
            name = next(t["Value"] for t in inst["Tags"] if t["Key"] == "Name")
            uds[name] = base64.b64decode(ec2.describe_instance_attribute(
                InstanceId=inst["InstanceId"], Attribute="userData")["UserData"]["Value"]).decode()
    ud = uds["qlab-test-intermediate"]
    assert "certbot certonly --standalone" in ud and "-d relay.example.org" in ud and "for _ in $(seq 1 4)" in ud
    execs = {u: [shlex.split(line.split("=", 1)[1]) for line in text.splitlines() if line.startswith("ExecStart=")]
             for u, text in uds.items()}
    inter = build_parser().parse_args(next(a for a in execs["qlab-test-intermediate"] if a[1] == "intermediate")[1:])
    assert inter.tls_cert == "/etc/letsencrypt/live/relay.example.org/fullchain.pem"
    conn = build_parser().parse_args(execs["qlab-test-connector-full_cone"][1][1:])
    assert conn.intermediate_name == "relay.example.org"
    cmd = shlex.split(runs.start(load_state("qlab-test"), cloud, campaign_id="le", trials=1)
                      ["agent-full_cone-0"]["command"])
    assert cmd[cmd.index("--intermediate-name") + 1] == "relay.example.org"
    assert build_parser().parse_args(cmd[1:]).intermediate_name == "relay.example.org"
    path = tmp_path / "ud.sh"
    path.write_text(ud)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout
    assert down("qlab-test", cloud)["clean"]


def test_cells_in_state_and_down_removes_every_gateway_of_the_vpc_first(aws, certs_dir, wheel, monkeypatch):
    """The state records each cell's preset ("managed" for the NAT Gateway cell, whose behaviour is
    classified on the spot) and subnet; `down` deletes every NAT gateway in the deployment's VPC —
    also one it did not tag — and waits for it before releasing addresses and deleting subnets."""
    import boto3
    from moto.ec2.models.nat_gateways import NatGatewayBackend

    from qlab.cloud.deploy import Cloud, down, leftovers, up

    plain = NatGatewayBackend.describe_nat_gateways

    def honouring_tags(self, filters, ids):  # moto 5 ignores tag: filters for NAT gateways; AWS applies them
        found = plain(self, filters, ids)
        for k, values in (filters or {}).items():
            if k.startswith("tag:"):
                found = [g for g in found if g.get_filter_value(k) in values]
        return found

    monkeypatch.setattr(NatGatewayBackend, "describe_nat_gateways", honouring_tags)
    aws.eip_quota = 6  # the deployment's 5 and the hand-made gateway's below
    calls: list[str] = []

    class Recording(Cloud):
        def client(self, name):
            c = super().client(name)
            c.meta.events.register("before-call.ec2.*", lambda model, **_: calls.append(model.name),
                                   unique_id="record")  # once: Cloud hands out one client per service
            return c

    cloud = Recording("us-east-1")
    state = up(spec(topology="nat-matrix", presets=["full_cone", "symmetric"], managed_nat=True), cloud,
               certs_dir=str(certs_dir), wheel=wheel)
    cells = state["cells"]
    assert {c: v["preset"] for c, v in cells.items()} == {"full_cone": "full_cone", "symmetric": "symmetric",
                                                          "managed": "managed"}
    assert cells["managed"]["subnet"] == "10.80.12.0/24" and cells["managed"]["nat"] == state["nat_gateway"]
    ec2 = boto3.client("ec2", region_name="us-east-1")
    f = [{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}]
    subnets = {t["Value"]: s["CidrBlock"] for s in ec2.describe_subnets(Filters=f)["Subnets"] for t in s["Tags"]
               if t["Key"] == "Name"}
    assert subnets == {"qlab-test-public": "10.80.0.0/24", "qlab-test-private-full_cone": "10.80.10.0/24",
                       "qlab-test-private-symmetric": "10.80.11.0/24", "qlab-test-private-managed": "10.80.12.0/24"}
    for cell in cells.values():
        assert {*cell["agents"], cell["connector"]} <= set(state["instances"])
    # a gateway someone added by hand in the deployment's public subnet, untagged
    public = next(s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"] if s["CidrBlock"] == "10.80.0.0/24")
    alloc = ec2.allocate_address(Domain="vpc")["AllocationId"]
    stray = ec2.create_nat_gateway(SubnetId=public, AllocationId=alloc)["NatGateway"]["NatGatewayId"]
    assert [g["NatGatewayId"] for g in ec2.describe_nat_gateways(Filters=f)["NatGateways"]] == [state["nat_gateway"]]
    calls.clear()
    r = down("qlab-test", cloud)
    assert r["clean"], r["left"]
    states = {g["NatGatewayId"]: g["State"] for g in ec2.describe_nat_gateways()["NatGateways"]}
    assert states[stray] == "deleted" and states[state["nat_gateway"]] == "deleted"
    assert calls.count("DeleteNatGateway") == 2
    last_delete = max(i for i, c in enumerate(calls) if c == "DeleteNatGateway")
    waited = [i for i, c in enumerate(calls) if c == "DescribeNatGateways" and i > last_delete]
    assert waited and waited[0] < calls.index("ReleaseAddress") < calls.index("DeleteSubnet"), calls
    assert not leftovers("qlab-test", cloud)["nat_gateways"]
    ec2.release_address(AllocationId=alloc)


def test_relay_public_addresses_match_the_plan(aws, certs_dir, wheel):
    """The Intermediate's second address: 10.80.0.11 is a secondary private IP of its interface,
    each private IP has its own Elastic IP, both are in the state, and plan() prices exactly the
    public addresses up allocates (relay here; nat-matrix and the managed cell in the tests above)."""
    import boto3

    from qlab.cloud.deploy import Cloud, down, plan, up

    s = spec(topology="relay")
    state = up(s, Cloud("us-east-1"), certs_dir=str(certs_dir), wheel=wheel)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    eips = ec2.describe_addresses(Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["Addresses"]
    assert len(eips) == plan(s)["resources"]["elastic_ips"] == 3  # two for the Intermediate, one Connector
    ips = state["intermediate_ips"]
    assert len(set(ips)) == 2 and ips[0] == state["intermediate_ip"] and set(ips) <= {a["PublicIp"] for a in eips}
    inter = ec2.describe_instances(InstanceIds=[state["instances"]["intermediate"]["id"]])["Reservations"][0][
        "Instances"][0]
    eni = ec2.describe_network_interfaces(NetworkInterfaceIds=[inter["NetworkInterfaces"][0]["NetworkInterfaceId"]])[
        "NetworkInterfaces"][0]
    assert {a["PrivateIpAddress"]: a["Primary"] for a in eni["PrivateIpAddresses"]} == {"10.80.0.10": True,
                                                                                      "10.80.0.11": False}
    assert down("qlab-test", Cloud("us-east-1"))["clean"]


@pytest.mark.parametrize("resolve_at, certbot_rc, getent_calls, certbot_calls", [
    (4, 0, 4, 1),      # the A record appears on the 4th lookup: one certbot run, after it
    (1, 1, 1, 4),      # resolves at once but validation keeps failing: 4 tries (< Let's Encrypt's 5/hour)
    (10**6, 1, 180, 4),  # never resolves: the wait is bounded (30 minutes), then the 4 tries
])
def test_lets_encrypt_boot_waits_for_the_a_record(tmp_path, resolve_at, certbot_rc, getent_calls, certbot_calls):
    """The certbot part of the Intermediate's user data, executed by bash with stub commands (no
    network): no validation is attempted before the domain resolves to the first Elastic IP (an
    address that merely starts with it does not count), and everything is bounded."""
    from qlab.cloud.userdata import render_user_data

    ud = render_user_data(deployment="d", region="us-east-1", bucket="b", wheel_key="wheels/q.whl",
                          roles=["intermediate"], ttl_minutes=60, params={}, domain="relay.example.org",
                          acme_email="ops@example.org",
                          intermediate_addrs=(("10.80.0.10", "198.51.100.7"), ("10.80.0.11", "198.51.100.8")))
    lines = ud.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dnf install -y -q certbot"))
    end = next(i for i, line in enumerate(lines) if line.startswith("test -s /etc/letsencrypt/live/relay.example.org/"))
    assert start < end < next(i for i, line in enumerate(lines) if line.startswith("ExecStart="))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    stubs = {
        "dnf": "exit 0",
        "sleep": 'echo "sleep $*" >> "$LOG"',
        "certbot": f'echo "certbot $*" >> "$LOG"; exit {certbot_rc}',
        "getent": ('n=$(( $(cat "$T/n" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$T/n"; echo "getent $*" >> "$LOG"\n'
                   f'if [ "$n" -ge {resolve_at} ]; then echo "198.51.100.7    STREAM $2"; '
                   'else echo "198.51.100.70   STREAM $2"; fi'),
    }
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    script = tmp_path / "certbot.sh"
    script.write_text("set -euo pipefail\n" + "\n".join(lines[start:end]) + "\n")
    log = tmp_path / "log"
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                       env={"PATH": f"{bin_}:/usr/bin:/bin", "LOG": str(log), "T": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    getent = [i for i, c in enumerate(calls) if c.startswith("getent ")]
    certbot = [i for i, c in enumerate(calls) if c.startswith("certbot ")]
    assert len(getent) == getent_calls and len(certbot) == certbot_calls
    assert max(getent) < min(certbot), "no validation before the lookup loop is over"
    assert calls[getent[0]] == "getent ahostsv4 relay.example.org"
    assert calls[certbot[0]].startswith("certbot certonly --standalone --non-interactive --agree-tos "
                                        "-m ops@example.org -d relay.example.org")


# --- issue 14: what real AWS refuses, what must not be destroyed or keep billing ------------------


def _tagged(ec2, kind: str, deployment: str = "qlab-test") -> list[dict]:
    f = [{"Name": "tag:qlab:deployment", "Values": [deployment]}]
    return {"subnets": lambda: ec2.describe_subnets(Filters=f)["Subnets"],
            "instances": lambda: [i for r in ec2.describe_instances(Filters=f)["Reservations"] for i in r["Instances"]
                                  if i["State"]["Name"] != "terminated"],
            "acls": lambda: ec2.describe_network_acls(Filters=f)["NetworkAcls"]}[kind]()


def test_plan_checks_the_account_quotas_and_zone(aws):
    """--presets all needs 7 Elastic IPs (the Intermediate's two and one per NAT) against the default quota of 5: refused before anything
    exists, with the quota code to raise; a raised quota passes, and the vCPU quota is checked too."""
    from qlab.cloud.deploy import Cloud, QuotaError, plan
    from qlab.cloud.plan import hosts

    everything = spec(topology="nat-matrix", presets=[p for p in __import__("qlab.nat.spec", fromlist=["x"]).PRESET_NAMES
                                                      if p != "public"], max_instances=30)
    cloud = Cloud("us-east-1")
    with pytest.raises(QuotaError, match=r"needs 7 Elastic IPs, 0 of the quota of 5 are in use .*L-0263D0A3"):
        plan(everything, cloud)
    aws.eip_quota = 10
    checks = plan(everything, cloud)["account"]
    assert checks["elastic_ips"] == {"needed": 7, "in_use": 0, "quota": 10}
    assert checks["availability_zone"].startswith("us-east-1")
    assert checks["vcpus"]["needed"] == 2 * len(hosts(everything))
    aws.vcpu_quota = 16
    with pytest.raises(QuotaError, match=rf"needs {2 * len(hosts(everything))} vCPUs.*L-1216C47A"):
        plan(everything, cloud)
    assert not aws.pending, "plan created nothing"


def test_up_uses_one_zone_and_isolates_the_cells(aws, certs_dir, wheel):
    """Every subnet in the zone plan chose; each cell's network ACL admits its own subnet and the
    internet (what its NAT forwards) but not the VPC's other addresses, so an Agent of cell A can
    reach Connector B only through the two NATs; private hosts admit UDP from anywhere (the NAT
    filters); the Intermediate's role may reap, limited by the deployment's tag."""
    import boto3

    from qlab.cloud.deploy import Cloud, down, up

    state = up(spec(topology="nat-matrix", presets=["full_cone", "symmetric"]), Cloud("us-east-1"),
               certs_dir=str(certs_dir), wheel=wheel)
    ec2 = boto3.client("ec2", region_name="us-east-1")
    assert {s["AvailabilityZone"] for s in _tagged(ec2, "subnets")} == {state["availability_zone"]}
    subnet_of = {s["CidrBlock"]: s["SubnetId"] for s in _tagged(ec2, "subnets")}
    for cell in state["cells"].values():
        acl = next(a for a in _tagged(ec2, "acls") if any(x["SubnetId"] == subnet_of[cell["subnet"]]
                                                            for x in a["Associations"]))
        for egress in (False, True):
            rules = sorted((e["RuleNumber"], e["RuleAction"], e["CidrBlock"]) for e in acl["Entries"]
                           if e["Egress"] == egress and e["RuleNumber"] < 32767)
            assert rules == [(100, "allow", cell["subnet"]), (110, "deny", "10.80.0.0/16"), (120, "allow", "0.0.0.0/0")]
    groups = {g["GroupName"]: g for g in ec2.describe_security_groups(
        Filters=[{"Name": "tag:qlab:deployment", "Values": ["qlab-test"]}])["SecurityGroups"]}
    assert {"IpProtocol": "udp", "FromPort": 1, "ToPort": 65535} in [
        {k: p[k] for k in ("IpProtocol", "FromPort", "ToPort")} for p in groups["qlab-test-private"]["IpPermissions"]
        if p.get("IpRanges") == [{"CidrIp": "0.0.0.0/0"}]]
    iam = boto3.client("iam")
    reaper = iam.get_role_policy(RoleName="qlab-test-intermediate-role", PolicyName="qlab-reaper")["PolicyDocument"]
    conditions = [st.get("Condition") for st in reaper["Statement"] if "ec2:TerminateInstances" in st["Action"]]
    assert conditions == [{"StringEquals": {"aws:ResourceTag/qlab:deployment": "qlab-test"}}]
    for kind in ("connector", "agent", "nat"):
        assert "qlab-reaper" not in iam.list_role_policies(RoleName=f"qlab-test-{kind}-role")["PolicyNames"]
    # NAT routers get the lab's conntrack timeouts, and install nothing (item 12, 13)
    from qlab.nat.nftables import conntrack_sysctls
    from qlab.nat.spec import preset

    for name in ("full_cone", "symmetric"):
        ud = base64.b64decode(ec2.describe_instance_attribute(InstanceId=state["instances"][f"nat-{name}"]["id"],
                                                              Attribute="userData")["UserData"]["Value"]).decode()
        assert all(f"{k}={v}" in ud for k, v in conntrack_sysctls(preset(name)).items())
        assert "pip install" not in ud and "get-parameter" not in ud and "s3 cp" not in ud
    # `qlab probe --upload` on an Agent host may write its results; no other host may (item 2)
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", region_name="us-east-1")
    key = "results/c1/agent-full_cone-0/trials.jsonl"
    with aws.as_role(iam, "qlab-test-agent-role"):
        s3.put_object(Bucket=state["bucket"], Key=key, Body=b"{}")
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.put_object(Bucket=state["bucket"], Key="wheels/qlab-0.1.0-py3-none-any.whl", Body=b"evil")
    for kind in ("connector", "nat", "intermediate"):
        with aws.as_role(iam, f"qlab-test-{kind}-role"), pytest.raises(ClientError, match="AccessDenied"):
            s3.put_object(Bucket=state["bucket"], Key=key, Body=b"{}")
    assert down("qlab-test", Cloud("us-east-1"))["clean"]


def test_up_refuses_an_existing_id_and_leaves_that_deployment_alone(aws, certs_dir, wheel, tmp_path, monkeypatch):
    """Item 5: a second `up` with the same id used to overwrite the first's secrets and then, in its
    rollback, delete it. Now it is refused before anything is created — also when the local state
    is gone (found by its tag and IAM roles)."""
    import boto3

    from qlab.cloud.deploy import Cloud, down, up
    from qlab.cloud.state import state_dir

    s = spec(topology="nat-matrix", presets=["full_cone"])
    up(s, Cloud("us-east-1"), certs_dir=str(certs_dir), wheel=wheel)
    ec2, ssm = boto3.client("ec2", region_name="us-east-1"), boto3.client("ssm", region_name="us-east-1")
    before = sorted(i["InstanceId"] for i in _tagged(ec2, "instances"))
    secret = ssm.get_parameter(Name="/qlab/qlab-test/secret", WithDecryption=True)["Parameter"]["Value"]
    other = tmp_path / "other-certs"
    from qlab.certs import init_dir

    init_dir(str(other))
    for with_state in (True, False):
        if not with_state:
            (state_dir() / "qlab-test.json").unlink()
        with pytest.raises(ValueError, match="deployment qlab-test already exists"):
            up(s, Cloud("us-east-1"), certs_dir=str(other), wheel=wheel)
        assert sorted(i["InstanceId"] for i in _tagged(ec2, "instances")) == before
        assert ssm.get_parameter(Name="/qlab/qlab-test/secret", WithDecryption=True)["Parameter"]["Value"] == secret
    assert down("qlab-test", Cloud("us-east-1"))["clean"]


def test_down_takes_exact_ids_only(aws, capsys):
    """Item 6: EC2 tag filters expand * and ?, so `down 'qlab-aa*'` deleted two deployments."""
    from qlab.cli.main import main
    from qlab.cloud.deploy import Cloud, down

    for pattern in ("qlab-aa*", "qlab-a?", "qlab-test,x", ""):
        with pytest.raises(ValueError, match="not a deployment id"):
            down(pattern, Cloud("us-east-1"))
    assert main(["cloud", "down", "qlab-aa*", "--region", "us-east-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a deployment id: 'qlab-aa*'" in err


def test_down_runs_every_step_past_a_failure_and_says_what_is_left(aws, certs_dir, wheel, monkeypatch):
    """Item 8: a security group that AWS keeps refusing (DependencyViolation) no longer stops `down`
    at the first error: the buckets, parameters and roles still go, the result names the group and
    the VPC as left, and a second `down` once AWS lets go finishes."""
    import botocore.client

    from qlab.cloud.deploy import Cloud, down, up

    up(spec(topology="relay"), Cloud("us-east-1"), certs_dir=str(certs_dir), wheel=wheel)
    real = botocore.client.BaseClient._make_api_call
    refused = []

    def sticky_group(client, operation, params):
        if operation == "DeleteSecurityGroup" and params["GroupId"] == refused_group[0]:
            refused.append(operation)
            raise client.exceptions.from_code("DependencyViolation")(
                {"Error": {"Code": "DependencyViolation", "Message": "resource sg has a dependent object"}}, operation)
        return real(client, operation, params)

    import boto3
    refused_group = [g["GroupId"] for g in boto3.client("ec2", region_name="us-east-1").describe_security_groups(
        Filters=[{"Name": "tag:Name", "Values": ["qlab-test-connector"]}])["SecurityGroups"]]
    with monkeypatch.context() as m:
        m.setattr(botocore.client.BaseClient, "_make_api_call", sticky_group)
        r = down("qlab-test", Cloud("us-east-1"), patience=30)
    assert not r["clean"] and len(refused) > 1, "retried before giving up"
    assert r["left"]["security_groups"] == refused_group
    assert not r["left"]["instances"] and not r["left"]["elastic_ips"] and not r["left"]["buckets"]
    assert not r["left"]["iam_roles"] and not r["left"]["ssm_parameters"]
    assert any("DependencyViolation" in e for e in r["errors"])
    assert down("qlab-test", Cloud("us-east-1"))["clean"]


def test_a_bucket_name_taken_elsewhere_rolls_back_cleanly(aws, certs_dir, wheel, monkeypatch):
    """Item 9: bucket names are global. Ours carry the account and region; if one is taken all the
    same, `up` says so in one line and rolls back without touching that bucket; an old-style
    `<id>-artifacts` bucket that is not tagged ours is never deleted."""
    import boto3
    import botocore.client

    from qlab.cloud.deploy import Cloud, UpFailed, down, up
    from qlab.cloud.spec import bucket_name

    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="qlab-test-artifacts")  # someone's bucket of the old naming, not tagged ours
    assert bucket_name("qlab-test", "123456789012", "us-east-1") == "qlab-test-123456789012-us-east-1"
    real = botocore.client.BaseClient._make_api_call

    def taken(client, operation, params):
        if operation == "CreateBucket":
            raise client.exceptions.from_code("BucketAlreadyExists")(
                {"Error": {"Code": "BucketAlreadyExists", "Message": "The requested bucket name is not available"}},
                operation)
        return real(client, operation, params)

    with monkeypatch.context() as m:
        m.setattr(botocore.client.BaseClient, "_make_api_call", taken)
        with pytest.raises(UpFailed, match="taken by another account.*rolled back, nothing left"):
            up(spec(topology="relay"), Cloud("us-east-1"), certs_dir=str(certs_dir), wheel=wheel)
    assert down("qlab-test", Cloud("us-east-1"))["clean"]
    assert "qlab-test-artifacts" in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_region_comes_from_the_boto3_chain_and_down_searches_every_region(aws, certs_dir, wheel, monkeypatch,
                                                                           capsys):
    """Item 10: no --region means boto3's region (not us-east-1); with no region anywhere, one clear
    line. `down` without local state finds the deployment in whichever region holds it."""
    from qlab.cli.main import main
    from qlab.cloud.deploy import Cloud, up
    from qlab.cloud.state import state_dir

    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s = spec(topology="relay")
    assert s.region == "eu-west-1"
    up(s, Cloud(s.region), certs_dir=str(certs_dir), wheel=wheel)
    (state_dir() / "qlab-test.json").unlink()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # four regions stand for every region (moto sets up each region's services on first use, ~0.7 s
    # each; the end-to-end test lists all of them)
    from qlab.cloud import inventory

    monkeypatch.setattr(inventory, "all_regions", lambda _c: ["us-east-1", "us-west-2", "eu-west-1", "ap-south-1"])
    assert main(["cloud", "down", "qlab-test"]) == 0
    out = capsys.readouterr()
    assert [(r["region"], r["clean"]) for r in json.loads(out.out)] == [("eu-west-1", True)]
    assert "searching every region" in out.err
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("AWS_REGION", raising=False)
    with pytest.raises(ValueError, match="no AWS region"):
        spec(topology="relay")
    assert main(["cloud", "plan", "--offline"]) == 2
    assert capsys.readouterr().err.strip().endswith("no AWS region: pass --region or set one in your AWS profile or AWS_REGION")


def test_cloud_errors_are_one_line(aws, monkeypatch, capsys, tmp_path):
    """Item 14: AWS's and boto3's errors end as one line and a non-zero exit, and flags are named
    as the user typed them."""
    from qlab.cli.main import main

    assert main(["cloud", "plan", "--offline", "--ttl", "48"]) == 2
    assert capsys.readouterr().err.strip() == "qlab: --ttl: between 0.25 and 24 hours"
    assert main(["cloud", "plan", "--offline", "--topology", "nat-matrix", "--presets", "public"]) == 2
    assert "leaves no NAT cell" in capsys.readouterr().err
    assert main(["cloud", "plan", "--offline"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["deployment_id"] is None and p["resources"]["s3_bucket"] == "<id>-<account>-us-east-1" and "fresh id" in p["note"]
    assert main(["cloud", "plan", "--id", "qlab-x", "--topology", "nat-matrix", "--presets", "all"]) == 2
    assert "needs 7 Elastic IPs" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert main(["cloud", "status", "qlab-test", "--region", "us-east-1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no AWS credentials" in err and "Traceback" not in err


def test_run_exits_non_zero_when_a_host_failed_and_shows_why(monkeypatch, capsys):
    """Item 2: `run` counted `Failed` as finished and exited 0."""
    from qlab.cli.main import main
    from qlab.cloud import runs

    def one_failed(ids, cloud_for, **kw):
        hosts = {"agent-full_cone-0": {"status": "Success", "trials": 3},
                 "agent-symmetric-0": {"status": "Failed", "trials": 0,
                                       "error": "upload failed: AccessDenied on PutObject"}}
        return {"campaign": "results/c", "commands": {}, "progress": {"qlab-x": {
            "hosts": hosts, "trials": 3, "hosts_finished": 2, "finished": True, "timed_out": False}}}

    monkeypatch.setattr(runs, "run_regions", one_failed)
    assert main(["cloud", "run", "qlab-x", "--campaign", "c", "--region", "us-east-1"]) == 1
    assert "agent-symmetric-0: Failed: upload failed: AccessDenied on PutObject" in capsys.readouterr().err
