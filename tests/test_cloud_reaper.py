"""The reaper against moto (no real AWS is reachable here): at the TTL every NAT gateway, Elastic IP
and instance of one deployment goes, nothing of another deployment or untagged is touched, the
reaper's own instance goes last, and each call it makes is one its own policy allows.

The deployment is built here with boto3 (not `deploy.up`), shaped like a nat-matrix one: a VPC, a
public subnet, an internet gateway, three instances (one with two interfaces), three Elastic IPs
associated by interface, and a NAT gateway with its own Elastic IP.
"""

from __future__ import annotations

import datetime as dt

import pytest

from tests.aws_strict import policy_allows
from tests.cloud_support import fake_aws_env

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's account
DID, OTHER = "qlab-reap", "qlab-other"
CREATED = dt.datetime(2026, 11, 28, 0, 0, tzinfo=dt.UTC)
EXPIRES = CREATED + dt.timedelta(hours=2)
BEFORE, AFTER = EXPIRES - dt.timedelta(minutes=1), EXPIRES + dt.timedelta(minutes=1)
TAG = "qlab:deployment"


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch):
    fake_aws_env(monkeypatch, region=REGION)


@pytest.fixture
def sleeps(monkeypatch):
    from qlab.cloud import aws as cloud_aws

    waited: list[float] = []
    monkeypatch.setattr(cloud_aws, "SLEEP", waited.append)
    return waited


@pytest.fixture
def aws():
    from moto import mock_aws

    with mock_aws():
        yield


class RecordingCloud:
    """What `reap` needs of a Cloud (`region`, `client`), recording every EC2 call in order."""

    def __init__(self) -> None:
        import boto3

        self.region = REGION
        self.calls: list[tuple[str, dict]] = []
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.ec2.meta.events.register("provide-client-params.ec2.*", self._record)

    def _record(self, params, model, **_):
        self.calls.append((model.name, dict(params)))

    def client(self, name: str):
        assert name == "ec2", f"the reaper needs EC2 only, asked for {name}"
        return self.ec2

    def changes(self) -> list[tuple[str, dict]]:
        return [(op, p) for op, p in self.calls if not op.startswith("Describe")]


def _specs(kind: str, deployment: str | None, name: str, expires: dt.datetime = EXPIRES) -> list[dict]:
    if deployment is None:
        return [{"ResourceType": kind, "Tags": [{"Key": "Name", "Value": name}]}]
    return [{"ResourceType": kind, "Tags": [
        {"Key": TAG, "Value": deployment}, {"Key": "qlab:expires", "Value": expires.isoformat()},
        {"Key": "qlab:created", "Value": CREATED.isoformat()}, {"Key": "qlab:owner", "Value": "tester"},
        {"Key": "Name", "Value": f"{deployment}-{name}"}]}]


def _instance(ec2, deployment, name, subnets) -> dict:
    nics = [{"DeviceIndex": i, "SubnetId": s} for i, s in enumerate(subnets)]
    return ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                             NetworkInterfaces=nics, TagSpecifications=_specs("instance", deployment, name))["Instances"][0]


def _address_on(ec2, deployment, name, inst) -> str:
    alloc = ec2.allocate_address(Domain="vpc", TagSpecifications=_specs("elastic-ip", deployment, name))
    eni = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]  # by interface: AWS refuses InstanceId on 2 ENIs
    ec2.associate_address(AllocationId=alloc["AllocationId"], NetworkInterfaceId=eni)
    return str(alloc["AllocationId"])


def _deployment(ec2, deployment: str, *, hosts=("intermediate", "connector", "nat")) -> dict:
    vpc = ec2.create_vpc(CidrBlock="10.80.0.0/16", TagSpecifications=_specs("vpc", deployment, "vpc"))["Vpc"]["VpcId"]
    public, private = (ec2.create_subnet(VpcId=vpc, CidrBlock=c, AvailabilityZone=f"{REGION}a")["Subnet"]["SubnetId"]
                       for c in ("10.80.0.0/24", "10.80.10.0/24"))
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    out: dict = {"instances": {}, "addresses": {}}
    for name in hosts:
        inst = _instance(ec2, deployment, name, [public, private] if name == "nat" else [public])
        out["instances"][name] = inst["InstanceId"]
        out["addresses"][name] = _address_on(ec2, deployment, name, inst)
        if name == "intermediate":  # its second address, on a secondary private IP (NAT classification)
            eni = inst["NetworkInterfaces"][0]["NetworkInterfaceId"]
            ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=["10.80.0.11"])
            alt = ec2.allocate_address(Domain="vpc", TagSpecifications=_specs("elastic-ip", deployment, "alt"))
            ec2.associate_address(AllocationId=alt["AllocationId"], NetworkInterfaceId=eni, PrivateIpAddress="10.80.0.11")
            out["addresses"]["intermediate-alt"] = alt["AllocationId"]
    nat_eip = ec2.allocate_address(Domain="vpc", TagSpecifications=_specs("elastic-ip", deployment, "nat-gateway"))
    out["addresses"]["nat-gateway"] = nat_eip["AllocationId"]
    out["nat_gateway"] = ec2.create_nat_gateway(
        SubnetId=public, AllocationId=nat_eip["AllocationId"],
        TagSpecifications=_specs("natgateway", deployment, "nat-gateway"))["NatGateway"]["NatGatewayId"]
    return out


@pytest.fixture
def lab(aws):
    """Two deployments (both past their TTL at AFTER), an untagged instance and address beside them."""
    import boto3

    ec2 = boto3.client("ec2", region_name=REGION)
    mine, other = _deployment(ec2, DID), _deployment(ec2, OTHER, hosts=("intermediate",))
    vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    stray = _instance(ec2, None, "someone-elses", [subnet])
    stray_eip = _address_on(ec2, None, "someone-elses", stray)
    return {"ec2": ec2, "mine": mine, "other": other, "stray": stray["InstanceId"], "stray_eip": stray_eip}


def _state(ec2, iid: str) -> str:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["State"]["Name"]


def _allocations(ec2) -> set[str]:
    return {a["AllocationId"] for a in ec2.describe_addresses()["Addresses"]}


def _nat_state(ec2, gid: str) -> str:
    return ec2.describe_nat_gateways(NatGatewayIds=[gid])["NatGateways"][0]["State"]


def test_before_the_ttl_nothing_is_touched(lab, sleeps):
    from qlab.cloud.reaper import reap

    cloud = RecordingCloud()
    out = reap(DID, cloud, now=BEFORE)
    assert out["expired"] is False and "nothing touched" in out["note"]
    assert cloud.changes() == [] and out["deleted"] == {"nat_gateways": [], "elastic_ips": [], "instances": []}
    ec2, mine = lab["ec2"], lab["mine"]
    assert all(_state(ec2, i) == "running" for i in mine["instances"].values())
    assert set(mine["addresses"].values()) <= _allocations(ec2)
    assert _nat_state(ec2, mine["nat_gateway"]) == "available"
    assert sorted(out["left"]["instances"]) == sorted(mine["instances"].values())
    assert out["expires"] == EXPIRES.isoformat()


def test_after_the_ttl_everything_billable_of_the_deployment_goes_and_nothing_else(lab, sleeps):
    from qlab.cloud.reaper import reap

    out = reap(DID, RecordingCloud(), now=AFTER)
    ec2, mine, other = lab["ec2"], lab["mine"], lab["other"]
    assert out["expired"] is True and out["errors"] == []
    assert out["left"] == {"nat_gateways": [], "elastic_ips": [], "instances": []}
    assert all(_state(ec2, i) in ("shutting-down", "terminated") for i in mine["instances"].values())
    assert not set(mine["addresses"].values()) & _allocations(ec2)
    assert _nat_state(ec2, mine["nat_gateway"]) == "deleted"
    assert sorted(out["deleted"]["elastic_ips"]) == sorted(mine["addresses"].values())
    # the other deployment (also past its TTL) and the untagged resources are untouched
    assert _state(ec2, other["instances"]["intermediate"]) == "running" and _state(ec2, lab["stray"]) == "running"
    assert {*other["addresses"].values(), lab["stray_eip"]} <= _allocations(ec2)
    assert _nat_state(ec2, other["nat_gateway"]) == "available"


def test_force_reaps_before_the_ttl(lab, sleeps):
    from qlab.cloud.reaper import reap

    out = reap(DID, RecordingCloud(), now=BEFORE, force=True)
    assert out["expired"] is False and out["errors"] == []
    assert sorted(out["deleted"]["instances"]) == sorted(lab["mine"]["instances"].values())


def test_the_reapers_own_instance_goes_last_after_its_addresses(lab, sleeps):
    from qlab.cloud.reaper import reap

    me = lab["mine"]["instances"]["intermediate"]
    cloud = RecordingCloud()
    alt = lab["mine"]["addresses"]["intermediate-alt"]

    def on_secondary_ip(parsed, **_):  # AWS reports an association's private IP; moto always the primary
        for a in parsed.get("Addresses", []):
            if a["AllocationId"] == alt:
                a["PrivateIpAddress"] = "10.80.0.11"

    cloud.ec2.meta.events.register("after-call.ec2.DescribeAddresses", on_secondary_ip)
    out = reap(DID, cloud, now=AFTER, self_instance=me)
    changes = cloud.changes()
    assert changes[-1] == ("TerminateInstances", {"InstanceIds": [me]})
    terminated = [p["InstanceIds"][0] for op, p in changes if op == "TerminateInstances"]
    assert terminated[-1] == me and terminated.count(me) == 1 and len(terminated) == 3
    released = [p["AllocationId"] for op, p in changes if op == "ReleaseAddress"]
    # its own addresses last, the one on its primary IP (its route to the EC2 API) the very last
    assert released[-2:] == [alt, lab["mine"]["addresses"]["intermediate"]]
    # the NAT gateway is deleted before any address is released (its address is freed only then)
    ops = [op for op, _ in changes]
    assert ops.index("DeleteNatGateway") < ops.index("ReleaseAddress")
    assert out["errors"] == [] and out["left"]["instances"] == []


def test_the_nat_gateways_address_is_released_only_once_the_gateway_is_deleted(lab, sleeps):
    from qlab.cloud.reaper import reap

    cloud = RecordingCloud()
    polls: list[str] = []
    gw = lab["mine"]["nat_gateway"]

    def still_deleting(parsed, **_):  # real AWS takes a minute or two; moto deletes at once
        for g in parsed.get("NatGateways", []):
            if g["NatGatewayId"] == gw and g["State"] in ("deleting", "deleted"):
                g["State"] = "deleting" if len(polls) < 2 else g["State"]
                polls.append(g["State"])

    cloud.ec2.meta.events.register("after-call.ec2.DescribeNatGateways", still_deleting)
    out = reap(DID, cloud, now=AFTER)
    assert out["errors"] == [] and sleeps[:2] == [5.0, 10.0]
    nat_eip = lab["mine"]["addresses"]["nat-gateway"]
    ops = [(op, p.get("AllocationId")) for op, p in cloud.calls if op in ("DescribeNatGateways", "ReleaseAddress")]
    seen_deleted = [i for i, (op, _) in enumerate(ops) if op == "DescribeNatGateways"][3]  # _find, then 3 polls
    assert ops.index(("ReleaseAddress", nat_eip)) > seen_deleted
    assert polls[:3] == ["deleting", "deleting", "deleted"]
    assert nat_eip in out["deleted"]["elastic_ips"]


def test_reaping_twice_is_harmless(lab, sleeps):
    from qlab.cloud.reaper import reap

    reap(DID, RecordingCloud(), now=AFTER)
    cloud = RecordingCloud()
    again = reap(DID, cloud, now=AFTER)
    assert again["errors"] == [] and again["expired"] is True  # terminated instances still carry the tags
    assert again["deleted"] == {"nat_gateways": [], "elastic_ips": [], "instances": []}
    assert cloud.changes() == []


def test_a_dependency_violation_on_the_first_release_is_retried(lab, sleeps):
    from botocore.exceptions import ClientError

    from qlab.cloud.reaper import reap

    cloud = RecordingCloud()
    refused: list[str] = []

    def refuse_once(params, **_):
        if not refused:
            refused.append(params["AllocationId"])
            raise ClientError({"Error": {"Code": "DependencyViolation", "Message": "in use"}}, "ReleaseAddress")

    cloud.ec2.meta.events.register("provide-client-params.ec2.ReleaseAddress", refuse_once)
    out = reap(DID, cloud, now=AFTER)
    assert out["errors"] == [] and out["left"]["elastic_ips"] == []
    assert refused and refused[0] in out["deleted"]["elastic_ips"]
    assert sleeps == [1.0]  # one backoff, then the second try succeeded
    assert not set(lab["mine"]["addresses"].values()) & _allocations(lab["ec2"])


def test_the_reaper_waits_out_losing_its_route_with_its_own_address(lab, sleeps):
    from botocore.exceptions import EndpointConnectionError

    from qlab.cloud.reaper import ATTEMPTS, reap

    me = lab["mine"]["instances"]["intermediate"]
    primary = lab["mine"]["addresses"]["intermediate"]
    assoc = lab["ec2"].describe_addresses(AllocationIds=[primary])["Addresses"][0]["AssociationId"]
    cloud = RecordingCloud()
    cut = [0]  # calls refused since its own primary address went, until EC2 gives it a new one

    def route(params, model, **_):
        if model.name == "DisassociateAddress" and params["AssociationId"] == assoc:
            cut[0] = 1
        elif 0 < cut[0] <= ATTEMPTS + 2:
            cut[0] += 1
            raise EndpointConnectionError(endpoint_url=f"https://ec2.{REGION}.amazonaws.com/")

    cloud.ec2.meta.events.register("provide-client-params.ec2.*", route)
    out = reap(DID, cloud, now=AFTER, self_instance=me)
    assert out["errors"] == [] and primary in out["deleted"]["elastic_ips"]
    assert len(sleeps) == ATTEMPTS + 2  # more than any other step may wait
    assert cloud.changes()[-1] == ("TerminateInstances", {"InstanceIds": [me]})


def test_a_refused_step_is_recorded_and_the_others_still_run(lab, sleeps):
    from botocore.exceptions import ClientError

    from qlab.cloud.reaper import reap

    cloud = RecordingCloud()
    nat = lab["mine"]["instances"]["nat"]

    def refuse(params, **_):
        if params["InstanceIds"] == [nat]:
            raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}, "TerminateInstances")

    cloud.ec2.meta.events.register("provide-client-params.ec2.TerminateInstances", refuse)
    out = reap(DID, cloud, now=AFTER)
    assert len(out["errors"]) == 1 and nat in out["errors"][0] and "UnauthorizedOperation" in out["errors"][0]
    assert out["left"]["instances"] == [nat] and sleeps == []  # refused is final: no retry
    assert out["left"]["elastic_ips"] == [] and out["left"]["nat_gateways"] == []


def test_ids_are_never_patterns(aws):
    from qlab.cloud.reaper import reap, reaper_policy

    for bad in ("qlab-*", "qlab-a?", ""):
        with pytest.raises(ValueError):
            reap(bad, RecordingCloud(), force=True)
        with pytest.raises(ValueError):
            reaper_policy(bad, REGION, ACCOUNT)


# --- the reaper's own policy --------------------------------------------------------------------------
# Each call the reaper makes is evaluated, as IAM would, against the policy its role carries
# (tests.aws_strict.policy_allows: identity-policy evaluation with Allow/Deny, wildcards and String
# conditions).


def _arn(kind: str, rid: str) -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:{kind}/{rid}"


def _context(tags: dict[str, str]) -> dict[str, str]:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


def _tag_index(ec2) -> tuple[dict[str, dict[str, str]], dict[str, tuple[str, str]]]:
    """Each resource's tags by id, and each association's (allocation, interface), before the reap."""
    tags: dict[str, dict[str, str]] = {}
    for r in ec2.describe_instances()["Reservations"]:
        for i in r["Instances"]:
            tags[i["InstanceId"]] = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
    assoc = {}
    for a in ec2.describe_addresses()["Addresses"]:
        tags[a["AllocationId"]] = {t["Key"]: t["Value"] for t in a.get("Tags", [])}
        if a.get("AssociationId"):
            assoc[a["AssociationId"]] = (a["AllocationId"], a["NetworkInterfaceId"])
    for g in ec2.describe_nat_gateways()["NatGateways"]:
        tags[g["NatGatewayId"]] = {t["Key"]: t["Value"] for t in g.get("Tags", [])}
    return tags, assoc


def _requests(op: str, params: dict, tags, assoc) -> list[tuple[str, str, dict[str, str]]]:
    """The (action, resource, context) triples IAM authorizes for one call; all must be allowed."""
    action = f"ec2:{op}"
    if op.startswith("Describe"):
        return [(action, "*", {})]
    if op == "TerminateInstances":
        return [(action, _arn("instance", i), _context(tags[i])) for i in params["InstanceIds"]]
    if op == "ReleaseAddress":
        return [(action, _arn("elastic-ip", params["AllocationId"]), _context(tags[params["AllocationId"]]))]
    if op == "DisassociateAddress":
        alloc, eni = assoc[params["AssociationId"]]
        return [(action, _arn("elastic-ip", alloc), _context(tags[alloc])),
                (action, _arn("network-interface", eni), _context(tags.get(eni, {})))]
    if op == "DeleteNatGateway":
        return [(action, _arn("natgateway", params["NatGatewayId"]), _context(tags[params["NatGatewayId"]]))]
    raise AssertionError(f"the reaper made a call its policy was not written for: {op}")


def test_every_call_the_reaper_makes_is_allowed_by_its_policy(lab, sleeps):
    from qlab.cloud.reaper import reap, reaper_policy

    policy = reaper_policy(DID, REGION, ACCOUNT)
    tags, assoc = _tag_index(lab["ec2"])
    cloud = RecordingCloud()
    out = reap(DID, cloud, now=AFTER, self_instance=lab["mine"]["instances"]["intermediate"])
    assert out["errors"] == []
    ops = {op for op, _ in cloud.changes()}
    assert ops == {"TerminateInstances", "DisassociateAddress", "ReleaseAddress", "DeleteNatGateway"}
    for op, params in cloud.calls:
        for action, resource, context in _requests(op, params, tags, assoc):
            assert policy_allows([policy], action, resource, context), (action, resource, context)


def test_the_policy_refuses_anything_of_another_deployment_or_untagged(lab):
    from qlab.cloud.reaper import reaper_policy

    policy = [reaper_policy(DID, REGION, ACCOUNT)]
    tags, assoc = _tag_index(lab["ec2"])
    other, mine = lab["other"], lab["mine"]
    other_inst = other["instances"]["intermediate"]
    assert policy_allows(policy, "ec2:TerminateInstances", _arn("instance", mine["instances"]["nat"]),
                         _context(tags[mine["instances"]["nat"]]))
    assert not policy_allows(policy, "ec2:TerminateInstances", _arn("instance", other_inst), _context(tags[other_inst]))
    assert not policy_allows(policy, "ec2:TerminateInstances", _arn("instance", lab["stray"]), _context(tags[lab["stray"]]))
    other_eip = other["addresses"]["intermediate"]
    assert not policy_allows(policy, "ec2:ReleaseAddress", _arn("elastic-ip", other_eip), _context(tags[other_eip]))
    assert not policy_allows(policy, "ec2:ReleaseAddress", _arn("elastic-ip", lab["stray_eip"]), {})
    # disassociating another deployment's address: its interface is allowed, the address is not
    other_assoc = next(a for a, (alloc, _) in assoc.items() if alloc == other_eip)
    verdicts = [policy_allows(policy, *r) for r in _requests("DisassociateAddress", {"AssociationId": other_assoc},
                                                              tags, assoc)]
    assert verdicts == [False, True]
    gw = other["nat_gateway"]
    assert not policy_allows(policy, "ec2:DeleteNatGateway", _arn("natgateway", gw), _context(tags[gw]))
    # nor anything the reaper never needs, even on its own deployment
    for action in ("ec2:DeleteVpc", "ec2:RunInstances", "ec2:CreateTags", "ec2:StopInstances"):
        assert not policy_allows(policy, action, _arn("instance", mine["instances"]["nat"]),
                                 _context(tags[mine["instances"]["nat"]]))
