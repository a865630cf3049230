"""The operator's minimal IAM policy (qlab.cloud.operator_policy) against moto's IAM enforcement, with
the strict AWS layer on: an IAM user holding exactly that policy runs plan, up, status, run, ls, logs and
down (relay, and a nat-matrix of one preset), and is refused what lies outside it.

What moto's enforcement checks (moto 5.2, `moto.core.enable_iam_authentication`): the request's
signature and access key, then the action against the user's policies, for every service this test
reaches (EC2, S3, SSM, IAM, STS). The resource it checks is the real ARN only for S3 (bucket, object)
and for IAM calls naming an existing role; every other call is checked against "*", and conditions
are not evaluated at all (a statement's Condition is ignored). A policy scoped by ARN never matches
"*" in moto, so this test lets moto's "*" match any ARN (`moto_checks_actions`): moto then checks the
actions; the resources and conditions of the EC2, SSM and IAM statements are checked by the project's
evaluator (`policy_allows`), not by moto, and neither is AWS. Service Quotas answers come from the
strict layer, so moto checks none of those calls. Actions that AWS requires besides the called one
(ec2:CreateTags for TagSpecifications, iam:TagRole, iam:PassRole, ssm:AddTagsToResource) are not
checked by moto: the first test checks the policy names them.
"""

from __future__ import annotations

import json
import re

import boto3
import pytest
from botocore.exceptions import ClientError

from qlab.cloud.operator_policy import operator_policy
from tests.aws_strict import ACCOUNT, iam_action, policy_allows, strict_aws
from tests.cloud_support import fake_aws_env, stand_in_wheel


@pytest.fixture(autouse=True)
def fake_aws(monkeypatch, tmp_path):
    fake_aws_env(monkeypatch, key_id="AKIAQLABOPERATOR0001", secret="operator-test-secret", state=tmp_path / "state",
                 session_token=False, managed_policies=True)



@pytest.fixture
def wheel(tmp_path):
    return stand_in_wheel(tmp_path)


def spec(**kw):
    from qlab.cloud.deploy import DeploymentSpec

    return DeploymentSpec(**{"deployment_id": "qlab-op", "region": "us-east-1", **kw})


def allowed_somewhere(policy: dict, action: str) -> bool:
    """Whether some Allow statement names the action (on some resource, under some condition)."""
    return any(st["Effect"] == "Allow" and any(re.fullmatch(p.replace("*", ".*"), action, re.I)
                                               for p in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"]))
               for st in policy["Statement"])


def operate(cloud, certs_dir, wheel, tmp_path) -> None:
    """What an operator runs, relay and then a nat-matrix of one preset: plan, up, status, run
    (start, progress, collect), ls, logs (each host's console), the region search of `down` without
    local state, and down."""
    from qlab.cloud import runs
    from qlab.cloud.deploy import down, load_state, plan, status, up
    from qlab.cloud.inventory import all_regions, billable, deployment_regions

    for s in (spec(topology="relay"), spec(topology="nat-matrix", presets=["full_cone"])):
        plan(s, cloud)
        up(s, cloud, certs_dir=str(certs_dir), wheel=wheel)
        assert status(s.deployment_id, cloud)["instances"]
        if s.topology == "nat-matrix":
            state = load_state(s.deployment_id)
            commands = runs.start(state, cloud, campaign_id="c1", trials=1)
            runs.progress(state, cloud, "c1", commands)
            runs.collect(state, cloud, "c1", tmp_path / "results")
        regions = ["us-east-1", "eu-west-1"]
        assert "us-east-1" in all_regions(cloud)
        assert all(row["kind"] != "error" for row in billable(type(cloud), regions)), "ls"
        assert deployment_regions(s.deployment_id, type(cloud), regions) == ["us-east-1"]
        ec2 = cloud.client("ec2")
        for r in ec2.describe_instances(Filters=[{"Name": "tag:qlab:deployment", "Values": [s.deployment_id]}])[
                "Reservations"]:
            for inst in r["Instances"]:  # logs
                ec2.get_console_output(InstanceId=inst["InstanceId"], Latest=True)
        r = down(s.deployment_id, cloud)
        assert r["clean"] and not r["errors"], r


def test_the_policy_names_every_action_the_code_calls(certs_dir, wheel, tmp_path):
    from qlab.cloud.deploy import Cloud

    policy = operator_policy()
    with strict_aws() as strict:
        operate(Cloud("us-east-1"), certs_dir, wheel, tmp_path)
    called = strict.actions()
    assert {"ec2:RunInstances", "iam:CreateRole", "s3:PutObject", "ssm:SendCommand", "ec2:GetConsoleOutput",
            "ec2:DescribeRegions", "s3:ListAllMyBuckets", "servicequotas:GetServiceQuota"} <= called
    # what AWS checks besides the called action: tagging on create, passing the hosts' roles
    implied = {"ec2:CreateTags", "iam:TagRole", "iam:TagInstanceProfile", "iam:PassRole", "ssm:AddTagsToResource"}
    missing = sorted(a for a in called | implied if not allowed_somewhere(policy, a))
    assert not missing, f"the operator policy lacks {missing}"
    assert all(st["Effect"] == "Allow" for st in policy["Statement"]), "no Deny (moto_checks_actions relies on it)"


def test_resources_and_conditions_are_scoped():
    """What moto cannot check, by the project's evaluator: IAM, S3 and SSM only on qlab's names,
    PassRole only to EC2, EC2 changes only on tagged resources and creates only with the tag."""
    p = [operator_policy(ACCOUNT)]
    role = f"arn:aws:iam::{ACCOUNT}:role/qlab-op-agent-role"
    assert policy_allows(p, "iam:CreateRole", role)
    assert not policy_allows(p, "iam:CreateRole", f"arn:aws:iam::{ACCOUNT}:role/admin")
    assert not policy_allows(p, "iam:CreateRole", role.replace(ACCOUNT, "999999999999"))
    assert policy_allows(p, "iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"})
    assert not policy_allows(p, "iam:PassRole", role, {"iam:PassedToService": "lambda.amazonaws.com"})
    core = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
    assert policy_allows(p, "iam:AttachRolePolicy", role, {"iam:PolicyARN": core})
    assert not policy_allows(p, "iam:AttachRolePolicy", role, {"iam:PolicyARN": "arn:aws:iam::aws:policy/AdministratorAccess"})
    assert policy_allows(p, "s3:PutObject", "arn:aws:s3:::qlab-op-123456789012-us-east-1/wheels/q.whl")
    assert not policy_allows(p, "s3:GetObject", "arn:aws:s3:::someone-elses-bucket/k")
    assert policy_allows(p, "ssm:GetParameter", f"arn:aws:ssm:us-east-1:{ACCOUNT}:parameter/qlab/qlab-op/secret")
    assert not policy_allows(p, "ssm:GetParameter", f"arn:aws:ssm:us-east-1:{ACCOUNT}:parameter/prod/db-password")
    assert policy_allows(p, "ssm:GetParameter",
                         "arn:aws:ssm:us-east-1::parameter/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64")
    inst = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/i-0123"
    assert policy_allows(p, "ec2:TerminateInstances", inst, {"aws:ResourceTag/qlab:deployment": "qlab-op"})
    assert not policy_allows(p, "ec2:TerminateInstances", inst, {"aws:ResourceTag/Name": "web"}), "untagged"
    assert policy_allows(p, "ec2:RunInstances", inst, {"aws:RequestTag/qlab:deployment": "qlab-op"})
    assert not policy_allows(p, "ec2:RunInstances", inst), "launched without the tag"
    assert policy_allows(p, "ec2:CreateTags", inst, {"ec2:CreateAction": "RunInstances"})
    assert not policy_allows(p, "ec2:CreateTags", inst, {"ec2:CreateAction": "CreateKeyPair"})
    assert not policy_allows(p, "ec2:CreateTags", inst), "re-tagging someone's instance qlab's"


@pytest.fixture
def moto_checks_actions(monkeypatch):
    """moto checks most calls against the resource "*" (it knows no ARN for them): let "*" match any
    ARN a statement names, so moto checks the actions (see the module docstring)."""
    from moto.iam.access_control import IAMPolicyStatement

    plain = IAMPolicyStatement._match

    def match(pattern: str, string: str):
        return re.match(".*", string) if string == "*" else plain(pattern, string)

    monkeypatch.setattr(IAMPolicyStatement, "_match", staticmethod(match))


def operator_user(monkeypatch) -> None:
    """An IAM user with exactly operator_policy(); boto3's chain then gives its keys."""
    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="qlab-operator")
    iam.put_user_policy(UserName="qlab-operator", PolicyName="qlab-operator",
                        PolicyDocument=json.dumps(operator_policy(ACCOUNT)))
    key = iam.create_access_key(UserName="qlab-operator")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])


def test_an_operator_with_only_the_policy_runs_every_command(certs_dir, wheel, tmp_path, monkeypatch,
                                                            moto_checks_actions):
    from moto.core.authorization import enable_iam_authentication

    from qlab.cloud.deploy import Cloud

    with strict_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        untagged = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "someone-elses"}]}])["Instances"][0]["InstanceId"]
        boto3.client("iam", region_name="us-east-1").create_role(RoleName="admin", AssumeRolePolicyDocument="{}")
        operator_user(monkeypatch)
        with enable_iam_authentication():
            cloud = Cloud("us-east-1")
            operate(cloud, certs_dir, wheel, tmp_path)
            refusals = outside_the_policy(cloud, untagged)
    assert refusals == {"s3:CreateBucket": "AccessDenied", "iam:PutRolePolicy": "AccessDenied",
                        "ec2:CreateKeyPair": "AccessDenied", "ec2:TerminateInstances": "refused"}, refusals


def outside_the_policy(cloud, untagged_instance: str) -> dict[str, str]:
    """What moto refuses the operator: a bucket not named qlab-*, a policy on a role not named
    qlab-*, an EC2 action the policy does not name; and terminating an instance without the qlab
    tag, which AWS refuses through the tag condition moto does not evaluate (judged here by
    policy_allows with the instance's tags as moto has them)."""
    out = {}
    for action, call in (
        ("s3:CreateBucket", lambda: cloud.client("s3").create_bucket(Bucket="not-qlab-bucket")),
        ("iam:PutRolePolicy", lambda: cloud.client("iam").put_role_policy(
            RoleName="admin", PolicyName="x", PolicyDocument=json.dumps(operator_policy()))),
        ("ec2:CreateKeyPair", lambda: cloud.client("ec2").create_key_pair(KeyName="k")),
    ):
        try:
            call()
            out[action] = "allowed"
        except ClientError as exc:
            out[action] = exc.response["Error"]["Code"]
    # the untagged instance, judged with its real tags by the project's evaluator (moto ignores conditions)
    ec2 = cloud.client("ec2")
    (inst,) = [i for r in ec2.describe_instances(InstanceIds=[untagged_instance])["Reservations"] for i in r["Instances"]]
    tags = {f"aws:ResourceTag/{t['Key']}": t["Value"] for t in inst.get("Tags", [])}
    arn = f"arn:aws:ec2:us-east-1:{ACCOUNT}:instance/{untagged_instance}"
    out[iam_action("ec2", "TerminateInstances")] = (
        "allowed" if policy_allows([operator_policy(ACCOUNT)], "ec2:TerminateInstances", arn, tags) else "refused")
    return out
