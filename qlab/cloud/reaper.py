"""The reaper: at a deployment's TTL, delete everything of it that bills by the hour — NAT gateways,
Elastic IPs and instances — even when nobody runs `qlab cloud down`.

It runs inside AWS (on the Intermediate, whose instance role carries `reaper_policy`), so it may act
only on resources tagged with its own deployment. It deletes nothing that does not bill by the hour
(VPC, subnets, security groups, SSM parameters, roles): `down` removes those. Every step goes on
past a failure and the result lists what was left.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from functools import partial
from typing import Any

from qlab.cloud import aws
from qlab.cloud.aws import Cloud, brief, error_code
from qlab.cloud.spec import TAG, check_id, tag_filter, tag_map, tag_time
from qlab.roles.control import Backoff

# AWS is eventually consistent: a dependency just removed (an association, a NAT gateway's address)
# may still be reported for a while, and a busy account is throttled. Those answers mean "not yet".
# (EC2 API reference, "Eventual consistency in the Amazon EC2 API" and "Request throttling for the
# Amazon EC2 API"; botocore's own retries cover throttling only for a few attempts.)
RETRYABLE = {"DependencyViolation", "InvalidIPAddress.InUse", "RequestLimitExceeded", "Throttling",
             "ThrottlingException", "IncorrectState"}
# The reaper's host loses its route to the EC2 endpoint when its own Elastic IP is disassociated,
# until EC2 gives it a new public IPv4 address "within a few minutes" — which EC2 does only for an
# instance launched with a public address on its only interface (Amazon EC2 User Guide, "Elastic IP
# addresses"). A connection error is then "not yet" too, and its own steps wait longer.
NETWORK_ERRORS = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"}
# A delete answered "not found" found the resource already gone (a second reaper, or `down`): done.
GONE = {"InvalidAllocationID.NotFound", "InvalidAssociationID.NotFound", "InvalidInstanceID.NotFound",
        "InvalidNatGatewayID.NotFound", "NatGatewayNotFound", "InvalidAddress.NotFound"}
ATTEMPTS = 8  # delays 1, 2, 4, 8, 15, 15, 15 s: about a minute before a step is given up
OWN_ATTEMPTS = 20  # about four minutes, for the steps after the reaper's host lost its address
NAT_WAIT_ATTEMPTS = 40  # at 15 s at most: ten minutes (a NAT gateway usually takes one or two)
LIVE_INSTANCE = ("pending", "running", "stopping", "stopped")


def attempt(step: str, call: Callable[[], Any], errors: list[str], *, attempts: int = ATTEMPTS) -> bool:
    """`call()`, again after bounded exponential backoff while AWS answers "not yet"; True once it
    succeeded or the resource was already gone, False (and the error recorded) otherwise."""
    backoff = Backoff(1.0, 15.0, jitter=0.0)  # counted tries: the delays are part of the bound
    for n in range(attempts):
        try:
            call()
            return True
        except Exception as exc:
            code = error_code(exc)
            if code in GONE:
                return True
            temporary = code in RETRYABLE or type(exc).__name__ in NETWORK_ERRORS
            if not temporary or n == attempts - 1:
                errors.append(f"{step}: {brief(exc)}")
                return False
            aws.SLEEP(backoff.next())
    return False


def _find(ec2: Any, deployment_id: str) -> dict[str, list[dict]]:
    """Everything of the deployment that bills by the hour, as EC2 describes it now (terminated
    instances and deleted gateways too: their tags still tell the expiry)."""
    f = tag_filter(deployment_id)
    instances = [i for page in ec2.get_paginator("describe_instances").paginate(Filters=f)
                 for r in page["Reservations"] for i in r["Instances"]]
    gateways = [g for page in ec2.get_paginator("describe_nat_gateways").paginate(Filters=f)
                for g in page["NatGateways"]]
    # EC2 filters by tag server-side; checking again costs nothing and keeps a lenient endpoint honest
    own = [r for r in instances + gateways if tag_map(r).get(TAG) == deployment_id]
    return {"instances": [i for i in own if "InstanceId" in i],
            "nat_gateways": [g for g in own if "NatGatewayId" in g], "elastic_ips": _addresses(ec2, deployment_id)}


def _addresses(ec2: Any, deployment_id: str) -> list[dict]:
    f = tag_filter(deployment_id)
    return [a for a in ec2.describe_addresses(Filters=f)["Addresses"] if tag_map(a).get(TAG) == deployment_id]


def expiry(found: dict[str, list[dict]]) -> dt.datetime | None:
    """The deployment's expiry: the latest `qlab:expires` any of its resources carries (they all carry
    the same one; if they ever differ, the reaper waits for the last)."""
    times = [tag_time(tag_map(r).get("qlab:expires", "")) for rs in found.values() for r in rs]
    known = [t for t in times if t is not None]
    return max(known) if known else None


def _live(found: dict[str, list[dict]]) -> dict[str, list[str]]:
    return {"nat_gateways": [g["NatGatewayId"] for g in found["nat_gateways"] if g["State"] not in ("deleted",)],
            "elastic_ips": [a["AllocationId"] for a in found["elastic_ips"]],
            "instances": [i["InstanceId"] for i in found["instances"] if i["State"]["Name"] in LIVE_INSTANCE]}


def reap(deployment_id: str, cloud: Cloud, *, now: dt.datetime | None = None, force: bool = False,
         self_instance: str | None = None) -> dict:
    """Delete the deployment's NAT gateways, Elastic IPs and instances once its TTL has passed (or
    with `force`). `self_instance`, the instance the reaper runs on, goes last. Idempotent."""
    check_id(deployment_id)  # EC2 tag filters expand * and ?: never a pattern
    ec2 = cloud.client("ec2")
    now = now or dt.datetime.now(dt.UTC)
    found = _find(ec2, deployment_id)
    expires = expiry(found)
    out: dict = {"deployment_id": deployment_id, "region": cloud.region,
                 "expires": expires.isoformat() if expires else None,
                 "expired": expires is not None and expires <= now,
                 "deleted": {"nat_gateways": [], "elastic_ips": [], "instances": []}, "errors": [], "left": {}}
    if not (out["expired"] or force):
        out["left"] = _live(found)
        out["note"] = (f"{deployment_id} expires at {out['expires']}: nothing touched" if expires else
                       f"nothing of {deployment_id} carries qlab:expires in {cloud.region}: nothing touched")
        return out
    _Reaper(ec2, deployment_id, found, self_instance, out).run()
    out["left"] = _live(_find(ec2, deployment_id))
    return out


class _Reaper:
    """The deletions of one reap, in the order AWS needs them."""

    def __init__(self, ec2: Any, deployment_id: str, found: dict[str, list[dict]], self_instance: str | None,
                 out: dict) -> None:
        self.ec2, self.deployment_id, self.found, self.out = ec2, deployment_id, found, out
        self.errors: list[str] = out["errors"]
        live = _live(found)
        self.self_instance = self_instance if self_instance in live["instances"] else None
        if self_instance and not self.self_instance:
            self.errors.append(f"the reaper's own instance {self_instance} is not a live instance of this deployment")
        me = next((i for i in found["instances"] if i["InstanceId"] == self.self_instance), {})
        self.own_enis = {e["NetworkInterfaceId"] for e in me.get("NetworkInterfaces", [])}

    def run(self) -> None:
        gateways = self.delete_gateways()
        # every other instance first: a terminated instance bills nothing, and its addresses are
        # released below whether or not EC2 has dropped their association yet
        for iid in _live(self.found)["instances"]:
            if iid != self.self_instance:
                self.terminate(iid)
        self.wait_deleted(gateways)
        addresses = _addresses(self.ec2, self.deployment_id)  # as they are now the gateways are gone
        mine = [a for a in addresses if self.on_self(a)]
        # the reaper's own addresses last: releasing them may cost its host its route to the EC2 API
        for a in [a for a in addresses if not self.on_self(a)] + sorted(mine, key=lambda a: self.primary_first(a)):
            self.release(a)
        if self.self_instance:
            self.terminate(self.self_instance)

    def on_self(self, address: dict) -> bool:
        return bool(self.self_instance) and (address.get("InstanceId") == self.self_instance
                                             or address.get("NetworkInterfaceId") in self.own_enis)

    def primary_first(self, address: dict) -> int:
        """Secondary addresses before the one on the primary interface (the reaper's way out)."""
        return 1 if address.get("PrivateIpAddress") == self.primary_ip() else 0

    def primary_ip(self) -> str:
        me = next((i for i in self.found["instances"] if i["InstanceId"] == self.self_instance), {})
        return str(me.get("PrivateIpAddress", ""))

    def delete_gateways(self) -> list[str]:
        """Start deleting every gateway not already going; returns those to wait for."""
        waiting = []
        for g in self.found["nat_gateways"]:
            gid, state = g["NatGatewayId"], g["State"]
            if state == "deleting":
                waiting.append(gid)
            elif state != "deleted" and attempt(f"DeleteNatGateway {gid}", partial(
                    self.ec2.delete_nat_gateway, NatGatewayId=gid), self.errors):
                waiting.append(gid)
                self.out["deleted"]["nat_gateways"].append(gid)
        return waiting

    def wait_deleted(self, gateways: list[str]) -> None:
        """A NAT gateway's Elastic IP is freed only once the gateway is `deleted` (DeleteNatGateway,
        EC2 API reference: deleting a gateway disassociates its address but does not release it)."""
        delay = 5.0
        for _ in range(NAT_WAIT_ATTEMPTS if gateways else 0):
            try:
                states = {g["NatGatewayId"]: g["State"] for g in
                          self.ec2.describe_nat_gateways(NatGatewayIds=gateways)["NatGateways"]}
            except Exception as exc:
                if error_code(exc) not in RETRYABLE | GONE:
                    self.errors.append(f"DescribeNatGateways: {brief(exc)}")
                    return
                states = {}
            if states and all(s == "deleted" for s in states.values()):
                return
            aws.SLEEP(delay)
            delay = min(2 * delay, 15.0)
        if gateways:
            self.errors.append(f"NAT gateways {gateways} not deleted after waiting; their addresses may stay")

    def release(self, address: dict) -> None:
        aid, n = address["AllocationId"], OWN_ATTEMPTS if self.on_self(address) else ATTEMPTS
        if address.get("AssociationId"):
            assoc = address["AssociationId"]
            if not attempt(f"DisassociateAddress {aid}",
                           lambda: self.ec2.disassociate_address(AssociationId=assoc), self.errors, attempts=n):
                return
        if attempt(f"ReleaseAddress {aid}", lambda: self.ec2.release_address(AllocationId=aid), self.errors,
                   attempts=n):
            self.out["deleted"]["elastic_ips"].append(aid)

    def terminate(self, iid: str) -> None:
        n = OWN_ATTEMPTS if iid == self.self_instance else ATTEMPTS
        if attempt(f"TerminateInstances {iid}", lambda: self.ec2.terminate_instances(InstanceIds=[iid]), self.errors,
                   attempts=n):
            self.out["deleted"]["instances"].append(iid)


def reaper_policy(deployment_id: str, region: str, account: str) -> dict:
    """The inline policy of the instance role the reaper runs with: it may delete what bills by the
    hour, and only what carries its own deployment's tag.

    From AWS's "Actions, resources, and condition keys for Amazon EC2"
    (https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html): the
    required resource of TerminateInstances is `instance`, of ReleaseAddress and DisassociateAddress
    `elastic-ip`, of DeleteNatGateway `natgateway`, and each of these resource types takes the
    `aws:ResourceTag/${TagKey}` condition. DisassociateAddress is also authorized against the
    instance or network interface the address is on; those are allowed untagged (an interface
    created with an instance carries no tag of ours), which widens nothing: the address itself, the
    required resource, must still carry the tag. The Describe* actions support no resource-level
    permissions, so they take "*".
    """
    check_id(deployment_id)
    arn = f"arn:aws:ec2:{region}:{account}"
    own = {"StringEquals": {f"aws:ResourceTag/{TAG}": deployment_id}}
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "FindTheDeployment", "Effect": "Allow", "Resource": "*",
         "Action": ["ec2:DescribeInstances", "ec2:DescribeAddresses", "ec2:DescribeNatGateways"]},
        {"Sid": "TerminateOwnInstances", "Effect": "Allow", "Action": "ec2:TerminateInstances",
         "Resource": f"{arn}:instance/*", "Condition": own},
        {"Sid": "ReleaseOwnAddresses", "Effect": "Allow", "Action": ["ec2:DisassociateAddress", "ec2:ReleaseAddress"],
         "Resource": f"{arn}:elastic-ip/*", "Condition": own},
        {"Sid": "DisassociateFromTheirHosts", "Effect": "Allow", "Action": "ec2:DisassociateAddress",
         "Resource": [f"{arn}:instance/*", f"{arn}:network-interface/*"]},
        {"Sid": "DeleteOwnNatGateways", "Effect": "Allow", "Action": "ec2:DeleteNatGateway",
         "Resource": f"{arn}:natgateway/*", "Condition": own},
    ]}
