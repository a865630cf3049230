"""The strict AWS layer (tests/aws_strict.py): each rule refuses what moto alone accepts, with the
error code AWS sends, and accepts the way real AWS accepts; and the IAM policy evaluator. Everything
runs against in-process moto; no test sends traffic anywhere."""

from __future__ import annotations

import json
from collections.abc import Callable

import boto3
import botocore.client
import pytest
from botocore.exceptions import ClientError

from tests.aws_strict import (
    DEFAULT_EIP_QUOTA,
    EIP_QUOTA_CODE,
    VCPU_QUOTA_CODE,
    iam_action,
    policy_allows,
    role_documents,
    strict_aws,
)
from tests.cloud_support import fake_aws_env

AMI = "ami-12c6146b"  # one of moto's AMIs
FAST = {"Delay": 1, "MaxAttempts": 5}  # moto runs an instance at once; the layer makes the waiter retry once


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch):
    fake_aws_env(monkeypatch, key_id="AKIAQLABSTRICTTEST01", secret="strict-test-secret", session_token=False)



def ec2():
    return boto3.client("ec2", region_name="us-east-1")


def subnets(zones: list[str | None]) -> list[str]:
    """A VPC with one subnet per entry: in that AZ, or (None) wherever AWS/moto puts it."""
    c = ec2()
    vpc = c.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    return [c.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", **({"AvailabilityZone": z} if z else {}))
            ["Subnet"]["SubnetId"] for i, z in enumerate(zones)]


def launch(subnet_ids: list[str], **kw) -> dict:
    nics = [{"DeviceIndex": i, "SubnetId": s} for i, s in enumerate(subnet_ids)]
    return ec2().run_instances(ImageId=AMI, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                               NetworkInterfaces=nics, **kw)["Instances"][0]


def refused(code: str, call: Callable[[], object]) -> str:
    with pytest.raises(ClientError) as info:
        call()
    assert info.value.response["Error"]["Code"] == code, info.value.response
    return str(info.value.response["Error"]["Message"])


def associate_by_instance_to_two_enis() -> str:
    inst = launch(subnets(["us-east-1a", "us-east-1a"]))
    c = ec2()
    c.get_waiter("instance_running").wait(InstanceIds=[inst["InstanceId"]], WaiterConfig=FAST)
    alloc = c.allocate_address(Domain="vpc")["AllocationId"]
    return str(c.associate_address(AllocationId=alloc, InstanceId=inst["InstanceId"])["AssociationId"])


def test_moto_alone_accepts_what_the_layer_refuses():
    """The point of the layer: moto lets each of these through (if one day it refuses one, the
    layer's rule for it can go)."""
    from moto import mock_aws

    with mock_aws():
        assert associate_by_instance_to_two_enis()
        inst = launch(subnets([None]))  # pending, never described
        assert ec2().associate_address(AllocationId=ec2().allocate_address(Domain="vpc")["AllocationId"],
                                       InstanceId=inst["InstanceId"])["AssociationId"]
        assert launch(subnets(["us-east-1a", "us-east-1b"]))["InstanceId"]
        for _ in range(DEFAULT_EIP_QUOTA + 1):
            ec2().allocate_address(Domain="vpc")
        assert launch(subnets([None]), UserData="x" * 16385)["InstanceId"]
        with pytest.raises(ClientError):  # moto knows no EC2 quota at all
            boto3.client("service-quotas", region_name="us-east-1").get_service_quota(
                ServiceCode="ec2", QuotaCode=EIP_QUOTA_CODE)


def test_address_by_instance_id_on_two_interfaces_is_refused_by_interface_accepted():
    with strict_aws() as strict:
        msg = refused("InvalidInstanceID", associate_by_instance_to_two_enis)
        assert "multiple interfaces attached to instance" in msg and "specify an interface ID" in msg
        (inst,) = [i for r in ec2().describe_instances()["Reservations"] for i in r["Instances"]]
        second = next(e["NetworkInterfaceId"] for e in inst["NetworkInterfaces"] if e["Attachment"]["DeviceIndex"] == 1)
        alloc = ec2().allocate_address(Domain="vpc")["AllocationId"]
        ec2().associate_address(AllocationId=alloc, NetworkInterfaceId=second)
        (addr,) = ec2().describe_addresses(AllocationIds=[alloc])["Addresses"]
        assert addr["NetworkInterfaceId"] == second
        assert ("ec2", "AssociateAddress") in strict.calls


@pytest.mark.parametrize("by", ["InstanceId", "NetworkInterfaceId"])
def test_association_to_a_pending_instance_is_refused_until_the_waiter_saw_it_run(by):
    with strict_aws():
        inst = launch(subnets([None]))
        target = {"InstanceId": inst["InstanceId"],
                  "NetworkInterfaceId": inst["NetworkInterfaces"][0]["NetworkInterfaceId"]}[by]
        c = ec2()
        alloc = c.allocate_address(Domain="vpc")["AllocationId"]
        msg = refused("IncorrectInstanceState", lambda: c.associate_address(AllocationId=alloc, **{by: target}))
        assert inst["InstanceId"] in msg and "pending" in msg
        c.get_waiter("instance_running").wait(InstanceIds=[inst["InstanceId"]], WaiterConfig=FAST)
        assert c.associate_address(AllocationId=alloc, **{by: target})["AssociationId"]


def test_interfaces_in_two_zones_are_refused_judged_by_the_subnets_actual_zones():
    with strict_aws():
        c = ec2()
        first = subnets([None])[0]  # no AvailabilityZone given: moto picks one
        zone = c.describe_subnets(SubnetIds=[first])["Subnets"][0]["AvailabilityZone"]
        other = next(z["ZoneName"] for z in c.describe_availability_zones()["AvailabilityZones"] if z["ZoneName"] != zone)
        vpc = c.describe_subnets(SubnetIds=[first])["Subnets"][0]["VpcId"]
        elsewhere = c.create_subnet(VpcId=vpc, CidrBlock="10.9.20.0/24", AvailabilityZone=other)["Subnet"]["SubnetId"]
        alongside = c.create_subnet(VpcId=vpc, CidrBlock="10.9.21.0/24", AvailabilityZone=zone)["Subnet"]["SubnetId"]
        msg = refused("InvalidParameterCombination", lambda: launch([first, elsewhere]))
        assert zone in msg and other in msg
        assert not c.describe_instances()["Reservations"], "nothing was launched"
        assert len(launch([first, alongside])["NetworkInterfaces"]) == 2


def test_elastic_ips_past_the_quota_are_refused_and_service_quotas_tells_it():
    with strict_aws() as strict:
        c, sq = ec2(), boto3.client("service-quotas", region_name="us-east-1")
        allocs = [c.allocate_address(Domain="vpc")["AllocationId"] for _ in range(DEFAULT_EIP_QUOTA)]
        refused("AddressLimitExceeded", lambda: c.allocate_address(Domain="vpc"))
        assert len(c.describe_addresses()["Addresses"]) == DEFAULT_EIP_QUOTA
        c.release_address(AllocationId=allocs[0])
        c.allocate_address(Domain="vpc")  # released: room for one again
        assert sq.get_service_quota(ServiceCode="ec2", QuotaCode=EIP_QUOTA_CODE)["Quota"]["Value"] == 5.0
        strict.eip_quota = 8  # an account with a raised quota
        for _ in range(3):
            c.allocate_address(Domain="vpc")
        refused("AddressLimitExceeded", lambda: c.allocate_address(Domain="vpc"))
        assert sq.get_service_quota(ServiceCode="ec2", QuotaCode=EIP_QUOTA_CODE)["Quota"]["Value"] == 8.0
        assert sq.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode=EIP_QUOTA_CODE)["Quota"]["Value"] == 5.0
        strict.vcpu_quota = 16
        assert sq.get_service_quota(ServiceCode="ec2", QuotaCode=VCPU_QUOTA_CODE)["Quota"]["Value"] == 16.0
        assert ("service-quotas", "GetServiceQuota") in strict.calls


def test_user_data_over_16_kB_raw_is_refused():
    with strict_aws():
        sn = subnets([None])
        assert launch(sn, UserData="x" * 16384)["InstanceId"]  # exactly 16 KB: fine
        msg = refused("InvalidParameterValue", lambda: launch(sn, UserData="é" * 8193))  # 16,386 bytes as UTF-8
        assert "16384" in msg


def test_a_new_instance_profile_fails_the_first_launch_and_a_retry_passes():
    from qlab.cloud.aws import retry

    with strict_aws() as strict:
        iam = boto3.client("iam", region_name="us-east-1")
        sn = subnets([None])
        for name in ("p1", "p2", "p3"):
            iam.create_instance_profile(InstanceProfileName=name)
        msg = refused("InvalidParameterValue", lambda: launch(sn, IamInstanceProfile={"Name": "p1"}))
        assert "Invalid IAM Instance Profile name" in msg
        assert launch(sn, IamInstanceProfile={"Name": "p1"})["InstanceId"], "known on the second attempt"
        waits: list[float] = []
        assert retry(lambda: launch(sn, IamInstanceProfile={"Name": "p2"}), sleep=waits.append)["InstanceId"]
        assert len(waits) == 1, "qlab's retry waited once, then launched"
        strict.profile_propagation = False
        assert launch(sn, IamInstanceProfile={"Name": "p3"})["InstanceId"]


def test_describe_instances_right_after_run_instances_fails_once():
    with strict_aws() as strict:
        c = ec2()
        sn = subnets([None])
        iid = launch(sn)["InstanceId"]
        msg = refused("InvalidInstanceID.NotFound", lambda: c.describe_instances(InstanceIds=[iid]))
        assert iid in msg
        assert c.describe_instances(InstanceIds=[iid])["Reservations"], "found on the next try"
        iid = launch(sn)["InstanceId"]
        c.describe_vpcs()  # a call in between: by then the id is known
        assert c.describe_instances(InstanceIds=[iid])["Reservations"]
        iid = launch(sn)["InstanceId"]  # the waiter retries InvalidInstanceID.NotFound by itself
        c.get_waiter("instance_running").wait(InstanceIds=[iid], WaiterConfig=FAST)
        assert strict.calls[-3:] == [("ec2", "RunInstances"), ("ec2", "DescribeInstances"), ("ec2", "DescribeInstances")]
        strict.describe_lag = False
        iid = launch(sn)["InstanceId"]
        assert c.describe_instances(InstanceIds=[iid])["Reservations"]


def test_a_host_role_may_do_only_what_its_policy_allows(monkeypatch):
    """As an Agent host and as a Connector host, with the policies qlab.cloud.iam writes for them
    (and AmazonSSMManagedInstanceCore attached, which allows ssm:GetParameter on everything)."""
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from qlab.cloud.iam import SSM_CORE, host_policy

    with strict_aws() as strict:
        iam, s3, ssm = (boto3.client(n, region_name="us-east-1") for n in ("iam", "s3", "ssm"))
        s3.create_bucket(Bucket="qlab-b")
        s3.put_object(Bucket="qlab-b", Key="wheels/q.whl", Body=b"w")
        for f in ("agent.secret", "connector.secret", "ca.pem"):
            ssm.put_parameter(Name=f"/qlab/d1/{f}", Value="v", Type="SecureString")
        for kind in ("agent", "connector"):
            iam.create_role(RoleName=f"d1-{kind}-role", AssumeRolePolicyDocument="{}")
            iam.put_role_policy(RoleName=f"d1-{kind}-role", PolicyName="qlab-read", PolicyDocument=json.dumps(
                host_policy(kind, deployment="d1", region="us-east-1", account="123456789012", bucket="qlab-b")))
            iam.attach_role_policy(RoleName=f"d1-{kind}-role", PolicyArn=SSM_CORE)
        with strict.as_role(iam, "d1-agent-role"):
            assert s3.get_object(Bucket="qlab-b", Key="wheels/q.whl")["Body"].read() == b"w"
            s3.put_object(Bucket="qlab-b", Key="results/c1/agent-0/t.json", Body=b"{}")  # probe --upload
            refused("AccessDenied", lambda: s3.put_object(Bucket="qlab-b", Key="wheels/evil.whl", Body=b"x"))
            assert ssm.get_parameter(Name="/qlab/d1/agent.secret", WithDecryption=True)["Parameter"]["Value"] == "v"
            msg = refused("AccessDeniedException", lambda: ssm.get_parameter(Name="/qlab/d1/connector.secret"))
            assert "ssm:GetParameter" in msg and "/qlab/d1/connector.secret" in msg
            refused("AccessDeniedException", lambda: ssm.get_parameters(Names=["/qlab/d1/ca.pem",
                                                                                "/qlab/d1/connector.secret"]))
        with strict.as_role(iam, "d1-connector-role"):
            refused("AccessDenied", lambda: s3.put_object(Bucket="qlab-b", Key="results/c1/x.json", Body=b"{}"))
        s3.put_object(Bucket="qlab-b", Key="wheels/evil.whl", Body=b"x")  # outside as_role: the operator may
        assert ("iam", "ListAttachedRolePolicies") not in strict.calls, "the layer's own look-ups are not recorded"


def test_calls_are_recorded_and_the_patch_is_undone():
    before = botocore.client.BaseClient._make_api_call
    with strict_aws() as strict:
        assert botocore.client.BaseClient._make_api_call is not before
        c = ec2()
        c.describe_vpcs()
        list(c.get_paginator("describe_instances").paginate())
        boto3.client("sts", region_name="us-east-1").get_caller_identity()
    assert botocore.client.BaseClient._make_api_call is before
    assert strict.calls == [("ec2", "DescribeVpcs"), ("ec2", "DescribeInstances"), ("sts", "GetCallerIdentity")]
    assert strict.actions() == {"ec2:DescribeVpcs", "ec2:DescribeInstances", "sts:GetCallerIdentity"}


def test_iam_action_names():
    assert iam_action("s3", "ListObjectsV2") == "s3:ListBucket"
    assert iam_action("s3", "ListBuckets") == "s3:ListAllMyBuckets"
    assert iam_action("s3", "GetBucketTagging") == "s3:GetBucketTagging"
    assert iam_action("service-quotas", "GetServiceQuota") == "servicequotas:GetServiceQuota"
    assert iam_action("ec2", "RunInstances") == "ec2:RunInstances"


# --- policy_allows


def allow(action, resource="*", **extra):
    return {"Effect": "Allow", "Action": action, "Resource": resource, **extra}


def test_deny_beats_allow_and_nothing_is_allowed_by_default():
    docs = [{"Statement": [allow("s3:*")]}, {"Statement": {"Effect": "Deny", "Action": "s3:DeleteBucket",
                                                           "Resource": "arn:aws:s3:::keep"}}]
    assert policy_allows(docs, "s3:DeleteBucket", "arn:aws:s3:::other")
    assert not policy_allows(docs, "s3:DeleteBucket", "arn:aws:s3:::keep")
    assert not policy_allows(docs, "ec2:RunInstances", "*")
    assert not policy_allows([], "s3:GetObject", "*")


def test_not_resource_and_not_action():
    own = "arn:aws:ssm:us-east-1:1:parameter/qlab/d/agent.secret"
    docs = [{"Statement": [allow("ssm:GetParameter*"),
                           {"Effect": "Deny", "Action": "ssm:GetParameter*", "NotResource": [own]}]}]
    assert policy_allows(docs, "ssm:GetParameter", own)
    assert not policy_allows(docs, "ssm:GetParameter", own.replace("agent", "connector"))
    assert not policy_allows(docs, "ssm:GetParametersByPath", "arn:aws:ssm:us-east-1:1:parameter/qlab/d")
    not_iam = [{"Statement": [{"Effect": "Allow", "NotAction": "iam:*", "Resource": "*"}]}]
    assert policy_allows(not_iam, "ec2:RunInstances", "*") and not policy_allows(not_iam, "iam:CreateRole", "*")


def test_wildcards_actions_fold_case_resources_do_not():
    docs = [{"Statement": [allow("EC2:describe*"), allow("s3:GetObject", "arn:aws:s3:::qlab-?/wheels/*")]}]
    assert policy_allows(docs, "ec2:DescribeInstances", "*")
    assert policy_allows(docs, "s3:GetObject", "arn:aws:s3:::qlab-a/wheels/x.whl")
    assert not policy_allows(docs, "s3:GetObject", "arn:aws:s3:::qlab-ab/wheels/x.whl"), "? is one character"
    assert not policy_allows(docs, "s3:GetObject", "arn:aws:s3:::QLAB-a/wheels/x.whl"), "ARNs are case-sensitive"
    assert not policy_allows([{"Statement": [allow("s3:Get[O]bject")]}], "s3:GetObject", "*"), "[ ] is not special"
    assert policy_allows([json.dumps({"Statement": [allow("s3:GetObject")]})], "s3:GetObject", "*")


def test_tag_conditions():
    tagged = {"StringLike": {"aws:ResourceTag/qlab:deployment": "*"}}
    docs = [{"Statement": [allow("ec2:TerminateInstances", Condition=tagged),
                           allow("ec2:DeleteVpc", Condition={"StringEquals": {"ec2:ResourceTag/qlab:deployment":
                                                                                   ["qlab-a", "qlab-b"]}})]}]
    inst = "arn:aws:ec2:us-east-1:1:instance/i-1"
    assert policy_allows(docs, "ec2:TerminateInstances", inst, {"aws:ResourceTag/qlab:deployment": "qlab-x"})
    assert not policy_allows(docs, "ec2:TerminateInstances", inst), "a key the request lacks: the condition is false"
    assert not policy_allows(docs, "ec2:TerminateInstances", inst, {"aws:ResourceTag/Name": "x"})
    assert policy_allows(docs, "ec2:DeleteVpc", "*", {"EC2:ResourceTag/qlab:deployment": "qlab-b"}), "key names fold"
    assert not policy_allows(docs, "ec2:DeleteVpc", "*", {"ec2:ResourceTag/qlab:deployment": "qlab-c"})
    both = [{"Statement": [allow("ec2:X", Condition={"StringEquals": {"aws:ResourceTag/a": "1",
                                                                       "aws:ResourceTag/b": "2"}})]}]
    assert policy_allows(both, "ec2:X", "*", {"aws:ResourceTag/a": "1", "aws:ResourceTag/b": "2"})
    assert not policy_allows(both, "ec2:X", "*", {"aws:ResourceTag/a": "1"}), "every key of a condition must hold"
    negated = [{"Statement": [allow("ec2:X", Condition={"StringNotEquals": {"aws:ResourceTag/a": "1"}})]}]
    assert policy_allows(negated, "ec2:X", "*") and not policy_allows(negated, "ec2:X", "*", {"aws:ResourceTag/a": "1"})


def test_what_the_evaluator_cannot_judge_raises():
    for st in (allow("s3:*", Condition={"DateLessThan": {"aws:CurrentTime": "2030-01-01T00:00:00Z"}}),
               allow("s3:*", Condition={"StringEqualsIfExists": {"aws:ResourceTag/a": "1"}}),
               allow("s3:*", "arn:aws:s3:::${aws:username}/*"),
               {"Effect": "Allow", "Action": "s3:*"},
               {"Effect": "Maybe", "Action": "s3:*", "Resource": "*"}):
        with pytest.raises(ValueError):
            policy_allows([{"Statement": [st]}], "s3:GetObject", "arn:aws:s3:::b/k")


def test_role_documents_collects_inline_and_attached_managed_policies(monkeypatch):
    monkeypatch.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    with strict_aws():
        iam = boto3.client("iam", region_name="us-east-1")
        iam.create_role(RoleName="r", AssumeRolePolicyDocument="{}")
        iam.put_role_policy(RoleName="r", PolicyName="inline", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [allow("s3:GetObject", "arn:aws:s3:::b/*")]}))
        iam.attach_role_policy(RoleName="r", PolicyArn="arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore")
        docs = role_documents(iam, "r")
        assert len(docs) == 2
        assert policy_allows(docs, "s3:GetObject", "arn:aws:s3:::b/k")
        assert policy_allows(docs, "ssm:GetParameter", "arn:aws:ssm:us-east-1:1:parameter/any"), "the managed one"
        assert not policy_allows(docs, "s3:PutObject", "arn:aws:s3:::b/k")
