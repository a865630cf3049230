"""`plan`: what `up` would create and cost, and — given an account — whether the account can hold
it: an Availability Zone that offers the instance type, and enough Elastic IP and vCPU quota.
Creates nothing."""

from __future__ import annotations

from typing import Any

from qlab.cloud.spec import INSTANCE_VCPUS, PRICES, VPC_CIDR, DeploymentSpec, bucket_name

# Service Quotas codes (EC2 User Guide, "Elastic IP address quota" and "Amazon EC2 service quotas"):
# Elastic IPs per region (default 5), and the vCPUs of running on-demand standard instances
# (families A, C, D, H, I, M, R, T, Z; the default depends on the account's age and use)
EIP_QUOTA, VCPU_QUOTA = "L-0263D0A3", "L-1216C47A"
DEFAULT_EIP_QUOTA = 5
STANDARD_FAMILIES = tuple("acdhimrtz")

SSM_FILES = ("secret", "agent.secret", "connector.secret", "ca.pem", "intermediate.pem", "intermediate.key",
             "connector.pem", "connector.key")


class QuotaError(ValueError):
    """The account cannot hold the deployment (quota, offering): refused before anything exists."""


def hosts(spec: DeploymentSpec) -> list[tuple[str, str]]:
    """(instance name, subnet) of every instance `up` launches."""
    out = [("intermediate", "public")]
    if spec.topology == "relay":
        return out + [("connector", "public")]
    for cell in spec.cells:
        if cell != "managed":  # the managed cell's NAT is an AWS NAT Gateway, not an instance
            out.append((f"nat-{cell}", "public"))
        out += [(f"agent-{cell}-{i}", f"private-{cell}") for i in range(spec.agents_per_cell)]
        out.append((f"connector-{cell}", f"private-{cell}"))
    return out


def elastic_ips(spec: DeploymentSpec) -> int:
    """The Intermediate's two, then a public Connector's or one per NAT (instance or gateway)."""
    return 2 + (1 if spec.topology == "relay" else len(spec.cells))


def plan(spec: DeploymentSpec, cloud: Any = None, *, id_chosen: bool = True) -> dict:
    """What `up` would create and what it costs per hour; with `cloud`, also the account's checks
    (raises QuotaError when it cannot hold the deployment). `id_chosen=False`: the id is not fixed
    yet (`up` draws a fresh one), so names are shown with `<id>`."""
    instances = hosts(spec)
    if len(instances) > spec.max_instances:
        raise ValueError(f"{len(instances)} instances exceed --max-instances {spec.max_instances}")
    eips = elastic_ips(spec)
    hourly = len(instances) * PRICES[spec.instance_type] + eips * PRICES["public_ipv4"]
    hourly += PRICES["nat_gateway"] if spec.managed_nat else 0
    did = spec.deployment_id if id_chosen else "<id>"
    account = cloud.account() if cloud is not None else "<account>"
    subnets = ["public"] + [f"private-{c}" for c in spec.cells]
    out: dict[str, Any] = {
        "deployment_id": spec.deployment_id if id_chosen else None, "region": spec.region,
        "topology": spec.topology,
        "resources": {
            "vpc": [VPC_CIDR], "internet_gateway": 1, "subnets": subnets,
            "route_tables": len(subnets), "network_acls": len(spec.cells),
            "security_groups": ["intermediate", "connector", "nat", "private"],
            "instances": [{"name": n, "subnet": s, "type": spec.instance_type} for n, s in instances],
            "elastic_ips": eips, "s3_bucket": bucket_name(did, account, spec.region),
            "ssm_parameters": [f"/qlab/{did}/{k}" for k in SSM_FILES],
            "iam": [f"{did}-{k}-{x}" for k in host_kinds(spec) for x in ("role", "profile")],
            "nat_gateway": spec.managed_nat,
            "tls": f"Let's Encrypt for {spec.domain} (TCP 80 open for http-01)" if spec.domain else "the qlab CA",
        },
        "hourly_cost_usd": round(hourly, 4),
        "cost_for_ttl_usd": round(hourly * (spec.ttl_hours + REAPER_GRACE_H), 4),
        "price_note": ("on-demand us-east-1 prices listed 2026-11, an estimate, not a quote; the TTL cost "
                       f"counts {int(REAPER_GRACE_H * 60)} minutes for the reaper to finish"),
    }
    if not id_chosen:
        out["note"] = "`up` draws a fresh id (qlab-<6 hex>) unless you pass --id"
    if cloud is not None:
        out["account"] = account_checks(spec, cloud, len(instances), eips)
    return out


REAPER_GRACE_H = 20 / 60  # the Intermediate's own shutdown backstop comes this long after the TTL


def host_kinds(spec: DeploymentSpec) -> tuple[str, ...]:
    """The kinds of host a deployment launches (one instance role each)."""
    return ("intermediate", "connector") if spec.topology == "relay" else ("intermediate", "connector", "agent", "nat")


def account_checks(spec: DeploymentSpec, cloud: Any, n_instances: int, eips: int) -> dict:
    """The Availability Zone `up` will use, and the quotas against what the region already holds."""
    ec2 = cloud.client("ec2")
    az = choose_az(ec2, spec.instance_type, spec.region)
    eip_quota = service_quota(cloud, EIP_QUOTA) or DEFAULT_EIP_QUOTA
    eips_used = len(ec2.describe_addresses()["Addresses"])
    vcpu_quota = service_quota(cloud, VCPU_QUOTA)
    vcpus_used = standard_vcpus_in_use(ec2)
    vcpus = n_instances * INSTANCE_VCPUS[spec.instance_type]
    refusals = []
    if eips_used + eips > eip_quota:
        refusals.append(f"needs {eips} Elastic IPs, {eips_used} of the quota of {eip_quota:g} are in use in "
                        f"{spec.region} (Service Quotas {EIP_QUOTA}: request more, or use fewer presets)")
    if vcpu_quota is not None and vcpus_used + vcpus > vcpu_quota:
        refusals.append(f"needs {vcpus} vCPUs, {vcpus_used} of the quota of {vcpu_quota:g} are in use "
                        f"(Service Quotas {VCPU_QUOTA}: request more, or fewer hosts)")
    if refusals:
        raise QuotaError("; ".join(refusals))
    return {"availability_zone": az,
            "elastic_ips": {"needed": eips, "in_use": eips_used, "quota": int(eip_quota)},
            "vcpus": {"needed": vcpus, "in_use": vcpus_used,
                      "quota": vcpu_quota if vcpu_quota is not None else "unknown (not readable)"}}


def choose_az(ec2: Any, instance_type: str, region: str) -> str:
    """One Availability Zone that offers the instance type: a NAT instance's two interfaces must be
    in subnets of one AZ (EC2 User Guide, "Elastic network interfaces": an instance's interfaces
    are all in its AZ), and an AZ may not offer every type (DescribeInstanceTypeOfferings)."""
    offered = {o["Location"] for page in ec2.get_paginator("describe_instance_type_offerings").paginate(
        LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}])
        for o in page["InstanceTypeOfferings"]}
    zones = [z["ZoneName"] for z in ec2.describe_availability_zones(
        Filters=[{"Name": "state", "Values": ["available"]}, {"Name": "zone-type", "Values": ["availability-zone"]}])
        ["AvailabilityZones"] if z["ZoneName"] in offered]
    if not zones:
        raise QuotaError(f"{instance_type} is not offered in any available zone of {region}: choose another "
                         "--instance-type or --region")
    return sorted(zones)[0]


def service_quota(cloud: Any, code: str) -> float | None:
    """The account's applied EC2 quota, else AWS's default for it, else None (not readable)."""
    from botocore.exceptions import BotoCoreError, ClientError

    sq = cloud.client("service-quotas")
    for call in (sq.get_service_quota, sq.get_aws_default_service_quota):
        try:
            return float(call(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])
        except (ClientError, BotoCoreError, NotImplementedError):  # the last: moto, which lacks EC2 quotas
            continue
    return None


def standard_vcpus_in_use(ec2: Any) -> int:
    """vCPUs of this region's pending and running standard-family instances (what the quota counts)."""
    total = 0
    for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]):
        for r in page["Reservations"]:
            for i in r["Instances"]:
                if i["InstanceType"].startswith(STANDARD_FAMILIES):
                    cpu = i.get("CpuOptions") or {}
                    total += cpu.get("CoreCount", 1) * cpu.get("ThreadsPerCore", 2)
    return total
