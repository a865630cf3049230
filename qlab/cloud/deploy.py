"""AWS deployments with boto3: up, status, down. Everything a deployment creates carries the tag
qlab:deployment=<id> (plus qlab:expires and qlab:created), so `down` and the reaper can find it.

`up` checks the account first (`plan.account_checks`: an AZ offering the instance type, Elastic IP
and vCPU quotas), refuses an id that already exists, and on any failure deletes what it created.
`down` never stops at the first error: every step runs, retried while AWS is eventually
consistent, and it ends with what is left.

Credentials come from boto3's usual chain (profiles, environment, SSO); nothing here reads, stores
or prints them. `Cloud(endpoint_url=...)` points boto3 at another endpoint (moto in the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial
from typing import Any

from qlab.cloud import aws
from qlab.cloud import iam as host_iam
from qlab.cloud.aws import Cloud, error_code, explain, not_yet, retry
from qlab.cloud.inventory import holds
from qlab.cloud.plan import QuotaError, plan
from qlab.cloud.spec import ID_RE, PRICES, TAG, DeploymentSpec, bucket_name, check_id, tag_filter, tag_map
from qlab.cloud.state import load_state, save_state, state_dir
from qlab.cloud.up import Up, nat_ruleset
from qlab.nat.spec import PRESET_NAMES

__all__ = ["ID_RE", "PRICES", "TAG", "Cloud", "DeploymentSpec", "QuotaError", "UpFailed", "down", "leftovers",
           "load_state", "nat_ruleset", "plan", "state_dir", "status", "tagged_instances", "up"]

Step = Callable[[str], None]


class UpFailed(RuntimeError):
    """`up` failed and rolled back: what went wrong, and what the rollback left (if anything)."""

    def __init__(self, deployment_id: str, cause: BaseException, rollback: dict | None) -> None:
        self.cause, self.rollback = cause, rollback
        if rollback is None:
            tail = "nothing was created"
        elif rollback["clean"]:
            tail = "rolled back, nothing left"
        else:
            left = ", ".join(f"{len(v)} {k}" for k, v in rollback["left"].items() if v)
            tail = f"rolled back, but left: {left} (run `qlab cloud down {deployment_id}`)"
        super().__init__(f"{explain(cause)}; {tail}")


# --- up -----------------------------------------------------------------------------------------


def up(spec: DeploymentSpec, cloud: Cloud, *, certs_dir: str, wheel: str, on_step: Step | None = None) -> dict:
    """Create the deployment. The account is checked and the id must be new before anything is
    created; on any later failure everything created so far is deleted again (`UpFailed`)."""
    say = on_step or (lambda _m: None)
    say(f"checking the account in {spec.region}")
    existing = exists(spec.deployment_id, cloud)
    if existing:
        raise ValueError(f"deployment {spec.deployment_id} already exists ({existing}): pick another --id, "
                         f"or `qlab cloud down {spec.deployment_id}` first")
    checks = plan(spec, cloud)  # quotas, AZ: refused (QuotaError) before anything exists
    try:
        state = Up(spec, cloud, checks, say).run(certs_dir, wheel)
    except BaseException as exc:
        say(f"failed: {explain(exc)}; rolling back")
        raise UpFailed(spec.deployment_id, exc, down(spec.deployment_id, cloud, on_step=say)) from exc
    save_state(state)
    say(f"up: {spec.deployment_id} in {spec.region}, expires {state['expires']}")
    return state


def exists(deployment_id: str, cloud: Cloud) -> str:
    """Why `deployment_id` is taken, or "": local state, its tag in this region, or its IAM roles
    (IAM is global: another region's deployment of that id has them)."""
    if (state_dir() / f"{deployment_id}.json").exists():
        return f"local state in {state_dir()}"
    if holds(cloud, deployment_id):
        return f"resources or SSM parameters of it in {cloud.region}"
    iam = cloud.client("iam")
    for role, _ in host_iam.role_names(deployment_id):
        with contextlib.suppress(iam.exceptions.NoSuchEntityException):
            iam.get_role(RoleName=role)
            return f"IAM role {role}"
    return ""


# --- status ------------------------------------------------------------------------------------------


def tagged_instances(cloud: Cloud, deployment_id: str, *, live_only: bool = True) -> list[dict]:
    """The deployment's instances; `live_only` drops terminated and shutting-down ones."""
    ec2 = cloud.client("ec2")
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=tag_filter(deployment_id)):
        for r in page["Reservations"]:
            for i in r["Instances"]:
                if not live_only or i["State"]["Name"] not in ("terminated", "shutting-down"):
                    out.append(i)
    return out


def status(deployment_id: str, cloud: Cloud) -> dict:
    insts = tagged_instances(cloud, deployment_id)
    return {"deployment_id": deployment_id, "region": cloud.region,
            "instances": [{"name": _name(i), "id": i["InstanceId"], "state": i["State"]["Name"],
                           "launched": str(i.get("LaunchTime"))} for i in insts]}


def _name(inst: dict) -> str:
    return tag_map(inst).get("Name", inst["InstanceId"])


# --- down ---------------------------------------------------------------------------------------

# what `down` waits out: instances still releasing their interfaces, addresses, gateways
IN_USE = {"InvalidNetworkInterface.InUse", "InvalidIPAddress.InUse", "AuthFailure.InUse"}


def _releasing(exc: BaseException) -> bool:
    return not_yet(exc) or error_code(exc) in IN_USE


class _Down:
    """The steps of `down`: each runs whatever the others did, retried while AWS releases
    dependencies (bounded), and its error is recorded rather than raised."""

    def __init__(self, deployment_id: str, cloud: Cloud, say: Step, patience: float) -> None:
        self.did, self.cloud, self.say, self.patience = deployment_id, cloud, say, patience
        self.ec2 = cloud.client("ec2")
        self.f = tag_filter(deployment_id)
        self.errors: list[str] = []

    def step(self, what: str, call: Callable[[], Any]) -> None:
        try:
            retry(call, until=self.patience, when=_releasing)
        except Exception as exc:
            self.errors.append(f"{what}: {explain(exc)}")

    def instances(self) -> None:
        ids = [i["InstanceId"] for i in tagged_instances(self.cloud, self.did, live_only=False)
               if i["State"]["Name"] != "terminated"]
        if ids:
            self.say(f"terminating {len(ids)} instances")
            self.step("terminate instances", lambda: self.ec2.terminate_instances(InstanceIds=ids))
            self.step("wait for termination", lambda: self.ec2.get_waiter("instance_terminated").wait(
                InstanceIds=ids, WaiterConfig=aws.waiter_config(600)))

    def gateways(self) -> None:
        """The deployment's gateways, and any other in its VPCs (they would block deleting the subnets)."""
        vpc_ids = [v["VpcId"] for v in self.ec2.describe_vpcs(Filters=self.f)["Vpcs"]]
        found = self.ec2.describe_nat_gateways(Filters=self.f)["NatGateways"]
        if vpc_ids:
            found += self.ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": vpc_ids}])["NatGateways"]
        gateways = sorted({g["NatGatewayId"] for g in found if g["State"] not in ("deleted", "deleting")})
        for g in gateways:
            self.step(f"delete NAT gateway {g}", partial(self.ec2.delete_nat_gateway, NatGatewayId=g))
        if gateways:  # its Elastic IP and subnet are released only once the gateway is gone
            self.say(f"waiting for {len(gateways)} NAT gateways to be deleted")
            self.step("wait for NAT gateways", lambda: self.ec2.get_waiter("nat_gateway_deleted").wait(
                NatGatewayIds=gateways, WaiterConfig=aws.waiter_config(300)))

    def addresses(self) -> None:
        for a in self.ec2.describe_addresses(Filters=self.f)["Addresses"]:
            if a.get("AssociationId"):
                self.step(f"disassociate {a['PublicIp']}",
                          partial(self.ec2.disassociate_address, AssociationId=a["AssociationId"]))
            self.step(f"release {a['PublicIp']}",
                      partial(self.ec2.release_address, AllocationId=a["AllocationId"]))

    def vpcs(self) -> None:
        for vpc in self.ec2.describe_vpcs(Filters=self.f)["Vpcs"]:
            self.say(f"deleting {vpc['VpcId']} and what is in it")
            _delete_vpc(self, vpc["VpcId"])
        # a group left by an earlier `down` whose VPC is gone (moto allows that; AWS would have kept the VPC)
        for sg in self.ec2.describe_security_groups(Filters=self.f)["SecurityGroups"]:
            self.step(f"security group {sg['GroupId']}", partial(self.ec2.delete_security_group, GroupId=sg["GroupId"]))

    def artefacts(self) -> None:
        """The deployment's buckets (only ones tagged with it), SSM parameters and instance roles."""
        s3, ssm = self.cloud.client("s3"), self.cloud.client("ssm")
        for bucket in own_buckets(self.cloud, self.did):
            self.step(f"bucket {bucket}", partial(_empty_and_delete, s3, bucket))
        names = [p["Name"] for page in ssm.get_paginator("get_parameters_by_path").paginate(
            Path=f"/qlab/{self.did}/", Recursive=True) for p in page["Parameters"]]
        for i in range(0, len(names), 10):
            self.step("SSM parameters", partial(ssm.delete_parameters, Names=names[i:i + 10]))
        self.errors += host_iam.delete_roles(self.cloud.client("iam"), self.did)


def down(deployment_id: str, cloud: Cloud, *, on_step: Step | None = None, patience: float = 300.0) -> dict:
    """Delete everything tagged with the deployment id, in dependency order; every step runs even
    when another failed, each retried for up to `patience` seconds while AWS releases
    dependencies; then list what is left. Idempotent."""
    check_id(deployment_id)
    d = _Down(deployment_id, cloud, on_step or (lambda _m: None), patience)
    for part in (d.instances, d.gateways, d.addresses, d.vpcs, d.artefacts):
        try:
            part()
        except Exception as exc:  # a describe call failing: record it and go on with the next part
            d.errors.append(f"{part.__name__}: {explain(exc)}")
    left = leftovers(deployment_id, cloud)
    clean = not any(left.values())
    if clean:
        (state_dir() / f"{deployment_id}.json").unlink(missing_ok=True)
    return {"deployment_id": deployment_id, "region": cloud.region, "left": left, "clean": clean,
            "errors": d.errors}


def _delete_vpc(d: _Down, v: str) -> None:
    ec2, vf = d.ec2, [{"Name": "vpc-id", "Values": [v]}]
    for eni in ec2.describe_network_interfaces(Filters=vf)["NetworkInterfaces"]:
        d.step(f"interface {eni['NetworkInterfaceId']}",
               partial(ec2.delete_network_interface, NetworkInterfaceId=eni["NetworkInterfaceId"]))
    for rt in ec2.describe_route_tables(Filters=vf)["RouteTables"]:
        if any(a.get("Main") for a in rt.get("Associations", [])):
            continue
        for a in rt.get("Associations", []):
            d.step("route table association",
                   partial(ec2.disassociate_route_table, AssociationId=a["RouteTableAssociationId"]))
        d.step(f"route table {rt['RouteTableId']}", partial(ec2.delete_route_table, RouteTableId=rt["RouteTableId"]))
    acls = ec2.describe_network_acls(Filters=vf)["NetworkAcls"]
    default = next((a["NetworkAclId"] for a in acls if a.get("IsDefault")), None)
    for acl in acls:  # back to the default ACL first: a custom one still associated cannot go
        for a in acl.get("Associations", []) if default and not acl.get("IsDefault") else []:
            d.step("network ACL association", partial(ec2.replace_network_acl_association,
                                                      AssociationId=a["NetworkAclAssociationId"], NetworkAclId=default))
    for sn in ec2.describe_subnets(Filters=vf)["Subnets"]:
        d.step(f"subnet {sn['SubnetId']}", partial(ec2.delete_subnet, SubnetId=sn["SubnetId"]))
    for acl in acls:
        if not acl.get("IsDefault"):
            d.step(f"network ACL {acl['NetworkAclId']}",
                   partial(ec2.delete_network_acl, NetworkAclId=acl["NetworkAclId"]))
    for igw in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [v]}])["InternetGateways"]:
        gid = igw["InternetGatewayId"]
        d.step(f"detach {gid}", partial(ec2.detach_internet_gateway, InternetGatewayId=gid, VpcId=v))
        d.step(f"internet gateway {gid}", partial(ec2.delete_internet_gateway, InternetGatewayId=gid))
    for sg in ec2.describe_security_groups(Filters=vf)["SecurityGroups"]:
        if sg["GroupName"] != "default":
            d.step(f"security group {sg['GroupId']}", partial(ec2.delete_security_group, GroupId=sg["GroupId"]))
    d.step(f"vpc {v}", lambda: ec2.delete_vpc(VpcId=v))


def own_buckets(cloud: Cloud, deployment_id: str) -> list[str]:
    """The deployment's buckets that exist and carry its tag: this account's name for it, and the
    name deployments used before names carried the account (`<id>-artifacts`). A bucket of that name
    in another account answers AccessDenied and is never touched."""
    s3 = cloud.client("s3")
    out = []
    for name in (bucket_name(deployment_id, cloud.account(), cloud.region), f"{deployment_id}-artifacts"):
        try:
            tags = s3.get_bucket_tagging(Bucket=name)["TagSet"]
        except Exception:  # NoSuchBucket, AccessDenied (another account's), NoSuchTagSet (not ours)
            continue
        if {"Key": TAG, "Value": deployment_id} in [{"Key": t["Key"], "Value": t["Value"]} for t in tags]:
            out.append(name)
    return out


def _empty_and_delete(s3: Any, bucket: str) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def leftovers(deployment_id: str, cloud: Cloud) -> dict:
    ec2, ssm, iam = (cloud.client(n) for n in ("ec2", "ssm", "iam"))
    f = tag_filter(deployment_id)
    roles = []
    for role, _ in host_iam.role_names(deployment_id):
        with contextlib.suppress(iam.exceptions.NoSuchEntityException):
            roles.append(iam.get_role(RoleName=role)["Role"]["RoleName"])
    return {
        "instances": [i["InstanceId"] for i in tagged_instances(cloud, deployment_id, live_only=False)
                      if i["State"]["Name"] != "terminated"],
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
        "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
        "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
        "elastic_ips": [a["AllocationId"] for a in ec2.describe_addresses(Filters=f)["Addresses"]],
        "nat_gateways": [g["NatGatewayId"] for g in ec2.describe_nat_gateways(Filters=f)["NatGateways"]
                         if g["State"] != "deleted"],
        "buckets": own_buckets(cloud, deployment_id),
        "iam_roles": roles,
        "ssm_parameters": [p["Name"] for p in ssm.get_parameters_by_path(Path=f"/qlab/{deployment_id}/",
                                                                         Recursive=True)["Parameters"]],
    }


ALL_PRESETS_WITH_NAT = [p for p in PRESET_NAMES if p != "public"]
