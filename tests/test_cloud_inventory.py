"""`qlab cloud ls` and `down`'s region search against moto (no real AWS is reachable here): every
billable resource with a qlab tag, in every region, with its cost so far; the regions a deployment
is in; a region that refuses is reported and the others are still listed."""

from __future__ import annotations

import datetime as dt

import pytest

from tests.cloud_support import fake_aws_env

TAG = "qlab:deployment"
EAST, WEST = "us-east-1", "eu-west-1"
CREATED = dt.datetime(2026, 11, 27, 0, 0, tzinfo=dt.UTC)
LATER = dt.datetime.now(dt.UTC) + dt.timedelta(hours=3)  # the `now` every listing is made at
LONG_AGO, SOON = CREATED + dt.timedelta(hours=2), LATER + dt.timedelta(hours=1)  # expiries: passed, not yet


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch):
    fake_aws_env(monkeypatch, region=EAST)


class FakeCloud:
    """What the inventory needs of a Cloud: `region` and one cached client per service."""

    def __init__(self, region: str) -> None:
        self.region = region
        self.clients: dict = {}

    def client(self, name: str):
        import boto3

        if name not in self.clients:
            self.clients[name] = boto3.client(name, region_name=self.region)
        return self.clients[name]


def _tags(deployment: str | None, name: str, expires: dt.datetime) -> list[dict]:
    base = [{"Key": "Name", "Value": name}]
    if deployment is None:
        return base
    return base + [{"Key": TAG, "Value": deployment}, {"Key": "qlab:expires", "Value": expires.isoformat()},
                   {"Key": "qlab:created", "Value": CREATED.isoformat()}, {"Key": "qlab:owner", "Value": "tester"}]


def _spec(kind, deployment, name, expires):
    return [{"ResourceType": kind, "Tags": _tags(deployment, name, expires)}]


def _build(region: str, deployment: str | None, expires: dt.datetime, *, itype="t3.micro", nat=False) -> dict:
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    vpc = ec2.create_vpc(CidrBlock="10.80.0.0/16", TagSpecifications=_spec("vpc", deployment, "vpc", expires))
    subnet = ec2.create_subnet(VpcId=vpc["Vpc"]["VpcId"], CidrBlock="10.80.0.0/24")["Subnet"]["SubnetId"]
    inst = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType=itype, SubnetId=subnet,
                             TagSpecifications=_spec("instance", deployment, "host", expires))["Instances"][0]
    eip = ec2.allocate_address(Domain="vpc", TagSpecifications=_spec("elastic-ip", deployment, "eip", expires))
    out = {"vpc": vpc["Vpc"]["VpcId"], "instance": inst["InstanceId"], "eip": eip["AllocationId"], "ec2": ec2}
    if nat:
        ngw_eip = ec2.allocate_address(Domain="vpc", TagSpecifications=_spec("elastic-ip", deployment, "ngw", expires))
        out["nat_eip"] = ngw_eip["AllocationId"]
        out["nat"] = ec2.create_nat_gateway(SubnetId=subnet, AllocationId=ngw_eip["AllocationId"],
                                            TagSpecifications=_spec("natgateway", deployment, "ngw", expires)
                                            )["NatGateway"]["NatGatewayId"]
    return out


def _bucket(region: str, name: str, deployment: str | None, expires: dt.datetime) -> None:
    import boto3

    s3 = boto3.client("s3", region_name=region)
    kw = {} if region == EAST else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    s3.create_bucket(Bucket=name, **kw)
    if deployment:
        s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": _tags(deployment, name, expires)})


@pytest.fixture
def account():
    """qlab-east (us-east-1, overdue) with a NAT gateway and a bucket, qlab-west (eu-west-1 only, not
    yet due) with a bucket; beside them an untagged instance, address and bucket and a terminated
    qlab instance."""
    from moto import mock_aws

    with mock_aws():
        east = _build(EAST, "qlab-east", LONG_AGO, nat=True)
        west = _build(WEST, "qlab-west", SOON, itype="c5.xlarge")  # a type PRICES does not list
        stray = _build(EAST, None, SOON)
        gone = _build(WEST, "qlab-west", SOON)
        gone["ec2"].terminate_instances(InstanceIds=[gone["instance"]])
        gone["ec2"].release_address(AllocationId=gone["eip"])
        _bucket(EAST, "qlab-east-artifacts", "qlab-east", LONG_AGO)
        _bucket(WEST, "qlab-west-123456789012-eu-west-1", "qlab-west", SOON)
        _bucket(EAST, "someone-elses-bucket", None, SOON)
        yield {"east": east, "west": west, "stray": stray, "gone": gone}


def _by_id(rows: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in rows}


def test_every_billable_resource_of_every_deployment_in_every_region(account):
    from qlab.cloud.deploy import PRICES
    from qlab.cloud.inventory import billable

    rows = billable(FakeCloud, [EAST, WEST], now=LATER)
    east, west = account["east"], account["west"]
    got = {(r["region"], r["kind"], r["id"], r["deployment"]) for r in rows}
    assert got == {
        (EAST, "instance", east["instance"], "qlab-east"), (EAST, "elastic_ip", east["eip"], "qlab-east"),
        (EAST, "elastic_ip", east["nat_eip"], "qlab-east"), (EAST, "nat_gateway", east["nat"], "qlab-east"),
        (EAST, "bucket", "qlab-east-artifacts", "qlab-east"),
        (WEST, "instance", west["instance"], "qlab-west"), (WEST, "elastic_ip", west["eip"], "qlab-west"),
        (WEST, "bucket", "qlab-west-123456789012-eu-west-1", "qlab-west")}  # no stray, nothing terminated
    by_id = _by_id(rows)
    inst = by_id[east["instance"]]
    launched = dt.datetime.fromisoformat(inst["created"])
    hours = (LATER - launched).total_seconds() / 3600
    assert inst["hourly_usd"] == PRICES["t3.micro"] and inst["cost_so_far_usd"] == pytest.approx(
        hours * PRICES["t3.micro"], abs=1e-3)
    assert hours > 2.9 and inst["state"] == "running"
    eip = by_id[east["eip"]]  # an Elastic IP is dated by its qlab:created tag
    assert eip["age_h"] == round((LATER - CREATED).total_seconds() / 3600, 2)
    assert eip["cost_so_far_usd"] == pytest.approx(eip["age_h"] * PRICES["public_ipv4"], abs=1e-3)
    nat = by_id[east["nat"]]
    assert nat["hourly_usd"] == PRICES["nat_gateway"] and nat["cost_so_far_usd"] > 0 and nat["state"] == "available"
    assert by_id["qlab-east-artifacts"]["hourly_usd"] is None and "GB-month" in by_id["qlab-east-artifacts"]["note"]


def test_overdue_and_unknown_prices_are_said_never_guessed(account):
    from qlab.cloud.inventory import billable

    rows = _by_id(billable(FakeCloud, [EAST, WEST], now=LATER))
    east, west = account["east"], account["west"]
    assert all(rows[i]["overdue"] for i in (east["instance"], east["eip"], east["nat"], "qlab-east-artifacts"))
    assert not any(rows[i]["overdue"] for i in (west["instance"], west["eip"]))
    unknown = rows[west["instance"]]
    assert unknown["hourly_usd"] is None and unknown["cost_so_far_usd"] is None
    assert "unknown price" in unknown["note"] and "c5.xlarge" in unknown["note"]


def test_an_instances_own_public_address_is_counted_but_not_an_elastic_ip_twice(account):
    from qlab.cloud.deploy import PRICES
    from qlab.cloud.inventory import billable

    ec2, east = account["east"]["ec2"], account["east"]
    subnet = ec2.describe_instances(InstanceIds=[east["instance"]])["Reservations"][0]["Instances"][0]["SubnetId"]
    public = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                               NetworkInterfaces=[{"DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": True}],
                               TagSpecifications=_spec("instance", "qlab-east", "public", LONG_AGO))["Instances"][0]
    ec2.associate_address(AllocationId=east["eip"], InstanceId=east["instance"])
    rows = _by_id(billable(FakeCloud, [EAST], now=LATER))
    assert rows[public["InstanceId"]]["hourly_usd"] == pytest.approx(PRICES["t3.micro"] + PRICES["public_ipv4"])
    assert rows[east["instance"]]["hourly_usd"] == PRICES["t3.micro"]  # its address is the Elastic IP's row
    assert rows[east["eip"]]["state"] == "associated"


def test_a_stopped_instance_is_still_listed(account):
    from qlab.cloud.inventory import billable

    east = account["east"]
    east["ec2"].stop_instances(InstanceIds=[east["instance"]])
    row = _by_id(billable(FakeCloud, [EAST], now=LATER))[east["instance"]]
    assert row["state"] == "stopped" and "EBS" in row["note"] and row["hourly_usd"] is None


def test_one_deployment_only(account):
    from qlab.cloud.inventory import billable

    rows = billable(FakeCloud, [EAST, WEST], now=LATER, deployment_id="qlab-west")
    assert {r["deployment"] for r in rows} == {"qlab-west"} and len(rows) == 3
    with pytest.raises(ValueError):
        billable(FakeCloud, [EAST], deployment_id="qlab-*")


def test_a_region_that_refuses_is_reported_and_the_others_still_listed(account):
    from botocore.exceptions import ClientError

    from qlab.cloud.inventory import billable

    def refusing(region: str) -> FakeCloud:
        cloud = FakeCloud(region)
        if region == WEST:
            def refuse(**_):
                raise ClientError({"Error": {"Code": "UnauthorizedOperation", "Message": "denied by an SCP"}},
                                  "DescribeInstances")
            cloud.client("ec2").meta.events.register("before-call.ec2.*", refuse)
        return cloud

    rows = billable(refusing, [EAST, WEST], now=LATER)
    errors = [r for r in rows if r["kind"] == "error"]
    assert len(errors) == 1 and errors[0]["region"] == WEST and "UnauthorizedOperation" in errors[0]["note"]
    assert {r["id"] for r in rows if r["region"] == EAST} >= {account["east"]["instance"], account["east"]["nat"]}
    # buckets are asked of S3, not of the refusing EC2 endpoint: the west bucket is still listed
    assert "qlab-west-123456789012-eu-west-1" in {r["id"] for r in rows}


def test_a_bucket_whose_tags_are_refused_is_skipped_quietly(account):
    from botocore.exceptions import ClientError

    from qlab.cloud.inventory import billable

    def clouds(region: str) -> FakeCloud:
        cloud = FakeCloud(region)

        def refuse(params, **_):
            if params["Bucket"] == "qlab-east-artifacts":  # e.g. a bucket policy denying us
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "GetBucketTagging")
        cloud.client("s3").meta.events.register("provide-client-params.s3.GetBucketTagging", refuse)
        return cloud

    rows = billable(clouds, [EAST, WEST], now=LATER)
    assert not [r for r in rows if r["kind"] == "error"]
    assert [r["id"] for r in rows if r["kind"] == "bucket"] == ["qlab-west-123456789012-eu-west-1"]


def test_deployment_regions_finds_a_deployment_in_the_second_region_only(account):
    from qlab.cloud.inventory import deployment_regions

    assert deployment_regions("qlab-west", FakeCloud, [EAST, WEST]) == [WEST]
    assert deployment_regions("qlab-east", FakeCloud, [EAST, WEST]) == [EAST]
    assert deployment_regions("qlab-none", FakeCloud, [EAST, WEST]) == []


def test_deployment_regions_finds_a_bucket_or_parameters_left_alone(account):
    import boto3

    from qlab.cloud.inventory import deployment_regions

    _bucket(WEST, "qlab-lone-123456789012-eu-west-1", "qlab-lone", SOON)
    assert deployment_regions("qlab-lone", FakeCloud, [EAST, WEST]) == [WEST]
    boto3.client("ssm", region_name=EAST).put_parameter(Name="/qlab/qlab-ssm/ca.pem", Value="x", Type="String")
    assert deployment_regions("qlab-ssm", FakeCloud, [EAST, WEST]) == [EAST]


def test_deployment_regions_keeps_a_region_it_cannot_search(account):
    from botocore.exceptions import ClientError

    from qlab.cloud.inventory import deployment_regions

    def refusing(region: str) -> FakeCloud:
        cloud = FakeCloud(region)
        if region == EAST:
            def refuse(**_):
                raise ClientError({"Error": {"Code": "AuthFailure", "Message": "no"}}, "DescribeInstances")
            cloud.client("ec2").meta.events.register("before-call.ec2.*", refuse)
        return cloud

    errors: list[str] = []
    assert deployment_regions("qlab-west", refusing, [EAST, WEST], errors) == [EAST, WEST]
    assert len(errors) == 1 and errors[0].startswith(f"{EAST}: AuthFailure")


def test_all_regions_are_the_enabled_ones(account):
    from qlab.cloud.inventory import all_regions

    regions = all_regions(FakeCloud(EAST))
    assert EAST in regions and WEST in regions and regions == sorted(regions)
    assert "ap-east-1" not in regions  # moto reports it not opted in
