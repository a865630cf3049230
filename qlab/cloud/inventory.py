"""What qlab has in an AWS account that bills, in every region: instances, Elastic IPs, NAT gateways
and buckets carrying the `qlab:deployment` tag, with their age and cost so far (`qlab cloud ls`),
and the regions where anything of one deployment is (so `down` can search them all).

Costs are estimates from `PRICES` (us-east-1 on-demand): never guessed for what PRICES does not
list — such a row says "unknown price" and counts nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qlab.cloud.aws import Cloud, brief, error_code
from qlab.cloud.spec import PRICES, TAG, tag_filter, tag_map, tag_time

CloudFor = Callable[[str], Cloud]
FIELDS = ("region", "kind", "id", "deployment", "name", "state", "created", "age_h", "expires", "hourly_usd",
          "cost_so_far_usd", "overdue", "note")
MAX_PARALLEL = 8  # regions asked at once (each region is a few Describe calls)
# S3 answers these for a bucket we may not read the tags of, or one without tags: not ours to list
QUIET_BUCKET_ERRORS = {"NoSuchTagSet", "AccessDenied", "NoSuchBucket", "AllAccessDisabled"}


def all_regions(cloud: Cloud) -> list[str]:
    """The regions enabled for the account. DescribeRegions without AllRegions returns only those
    (EC2 API reference, DescribeRegions); the opt-in status is checked as well because moto lists
    every region."""
    regions = cloud.client("ec2").describe_regions(AllRegions=False)["Regions"]
    return sorted(r["RegionName"] for r in regions if r.get("OptInStatus") != "not-opted-in")


def _filters(deployment_id: str | None) -> list[dict]:
    return [{"Name": "tag-key", "Values": [TAG]}] if deployment_id is None else tag_filter(deployment_id)


def _ours(resource: dict, deployment_id: str | None) -> bool:
    value = tag_map(resource).get(TAG)
    return value is not None and (deployment_id is None or value == deployment_id)


def _row(region: str, kind: str, rid: str, tags: dict[str, str], state: str, created: dt.datetime | None,
         hourly: float | None, now: dt.datetime, note: str = "") -> dict:
    """One billable resource: age and cost from `created` and `hourly` (None when unknown)."""
    age = max(0.0, (now - created).total_seconds() / 3600) if created else None
    expires = tag_time(tags["qlab:expires"]) if "qlab:expires" in tags else None
    return {"region": region, "kind": kind, "id": rid, "deployment": tags.get(TAG), "name": tags.get("Name"),
            "state": state, "created": created.isoformat() if created else None,
            "age_h": round(age, 2) if age is not None else None, "expires": tags.get("qlab:expires"),
            "hourly_usd": hourly,
            "cost_so_far_usd": round(age * hourly, 4) if age is not None and hourly is not None else None,
            "overdue": expires is not None and expires <= now, "note": note}


def _instance_rows(ec2: Any, region: str, f: list[dict], did: str | None, now: dt.datetime) -> list[dict]:
    """An instance bills its type's price, and its public IPv4 address unless that is an Elastic IP
    (listed on its own row): AWS charges every public IPv4 address by the hour (Amazon VPC pricing)."""
    elastic = {a.get("PublicIp") for a in ec2.describe_addresses()["Addresses"]}
    rows = []
    for page in ec2.get_paginator("describe_instances").paginate(Filters=f):
        for i in (i for r in page["Reservations"] for i in r["Instances"] if _ours(i, did)):
            state = i["State"]["Name"]
            if state == "terminated":
                continue
            price, note = PRICES.get(i["InstanceType"]), ""
            if state in ("stopped", "stopping"):  # no instance-hours, but its EBS volumes bill on
                price, note = None, "stopped: its EBS volumes bill per GB-month (not counted)"
            elif price is None:
                note = f"unknown price for {i['InstanceType']}"
            elif i.get("PublicIpAddress") and i["PublicIpAddress"] not in elastic:
                price, note = price + PRICES["public_ipv4"], "includes its public IPv4 address"
            # LaunchTime is the last start: an instance stopped and started again counts from there
            rows.append(_row(region, "instance", i["InstanceId"], tag_map(i), state, tag_time(i["LaunchTime"]),
                             price, now, note))
    return rows


def _address_rows(ec2: Any, region: str, f: list[dict], did: str | None, now: dt.datetime) -> list[dict]:
    """Every public IPv4 address bills by the hour, associated or not (Amazon VPC pricing); EC2 keeps
    no creation time for an Elastic IP, so qlab's own `qlab:created` tag dates it."""
    rows = []
    for a in (a for a in ec2.describe_addresses(Filters=f)["Addresses"] if _ours(a, did)):
        tags = tag_map(a)
        created = tag_time(tags["qlab:created"]) if "qlab:created" in tags else None
        state = "associated" if a.get("AssociationId") else "unassociated"
        rows.append(_row(region, "elastic_ip", a["AllocationId"], tags, state, created, PRICES["public_ipv4"], now,
                         "" if created else "no qlab:created tag: age unknown"))
    return rows


def _gateway_rows(ec2: Any, region: str, f: list[dict], did: str | None, now: dt.datetime) -> list[dict]:
    rows = []
    for page in ec2.get_paginator("describe_nat_gateways").paginate(Filters=f):
        for g in (g for g in page["NatGateways"] if _ours(g, did) and g["State"] != "deleted"):
            rows.append(_row(region, "nat_gateway", g["NatGatewayId"], tag_map(g), g["State"], tag_time(g["CreateTime"]),
                             PRICES["nat_gateway"], now, "plus data processed per GB (not counted)"))
    return rows


def _region_rows(cloud: Cloud, region: str, did: str | None, now: dt.datetime) -> list[dict]:
    ec2, f = cloud.client("ec2"), _filters(did)
    return (_instance_rows(ec2, region, f, did, now) + _address_rows(ec2, region, f, did, now)
            + _gateway_rows(ec2, region, f, did, now))


def _error_row(region: str, exc: BaseException) -> dict:
    row: dict = dict.fromkeys(FIELDS)
    row.update(region=region, kind="error", overdue=False, note=brief(exc))
    return row


def _bucket_region(s3: Any, bucket: str) -> str:
    """GetBucketLocation answers no constraint for us-east-1 and the legacy "EU" for eu-west-1
    (Amazon S3 API reference, GetBucketLocation)."""
    loc = s3.get_bucket_location(Bucket=bucket).get("LocationConstraint")
    return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(loc, loc)


def _buckets(cloud_for_region: CloudFor, regions: list[str], did: str | None) -> list[tuple[str, dict, dict]]:
    """(region, bucket, tags) of every bucket in `regions` tagged with a deployment. Bucket names are
    global: one ListBuckets, then each bucket's location and tags."""
    s3 = cloud_for_region("us-east-1" if "us-east-1" in regions else regions[0]).client("s3")
    paged = s3.get_paginator("list_buckets").paginate() if s3.can_paginate("list_buckets") else [s3.list_buckets()]
    out = []
    for b in (b for page in paged for b in page.get("Buckets", [])):
        try:
            region = _bucket_region(s3, b["Name"])
            if region not in regions:
                continue
            tags = {t["Key"]: t["Value"] for t in cloud_for_region(region).client("s3").get_bucket_tagging(
                Bucket=b["Name"])["TagSet"]}
        except Exception as exc:
            if error_code(exc) in QUIET_BUCKET_ERRORS:
                continue
            raise
        if TAG in tags and (did is None or tags[TAG] == did):
            out.append((region, b, tags))
    return out


def _bucket_rows(cloud_for_region: CloudFor, regions: list[str], did: str | None, now: dt.datetime) -> list[dict]:
    rows = []
    for region, b, tags in _buckets(cloud_for_region, regions, did):
        created = tag_time(tags["qlab:created"]) if "qlab:created" in tags else tag_time(b.get("CreationDate"))
        rows.append(_row(region, "bucket", b["Name"], tags, "exists", created, None, now,
                         "storage bills per GB-month (not counted)"))
    return rows


def billable(cloud_for_region: CloudFor, regions: list[str], *, now: dt.datetime | None = None,
             deployment_id: str | None = None) -> list[dict]:
    """Every billable resource with a qlab tag in `regions` (all of them with `deployment_id=None`),
    one row each (FIELDS). A region that refuses (no permission, not enabled) gives one row of kind
    "error" saying so; the other regions are listed all the same."""
    now = now or dt.datetime.now(dt.UTC)
    _filters(deployment_id)  # refuse a pattern before asking anything
    if not regions:
        return []

    def one(region: str) -> list[dict]:
        try:
            return _region_rows(cloud_for_region(region), region, deployment_id, now)
        except Exception as exc:
            return [_error_row(region, exc)]

    def buckets() -> list[dict]:
        try:
            return _bucket_rows(cloud_for_region, regions, deployment_id, now)
        except Exception as exc:
            return [_error_row("s3 (all regions)", exc)]

    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(regions) + 1)) as pool:
        jobs = [pool.submit(one, r) for r in regions] + [pool.submit(buckets)]
        rows = [row for job in jobs for row in job.result()]
    order = {r: n for n, r in enumerate(regions)}
    return sorted(rows, key=lambda r: (order.get(r["region"], len(order)), r["kind"], r["id"] or ""))


def holds(cloud: Cloud, deployment_id: str) -> bool:
    """Anything of the deployment in this region: a live instance, an address, a NAT gateway, a VPC
    (its subnets and security groups are inside it) or an SSM parameter."""
    ec2, f = cloud.client("ec2"), _filters(deployment_id)
    if any(_ours(i, deployment_id) and i["State"]["Name"] != "terminated"
           for page in ec2.get_paginator("describe_instances").paginate(Filters=f)
           for r in page["Reservations"] for i in r["Instances"]):
        return True
    if any(_ours(a, deployment_id) for a in ec2.describe_addresses(Filters=f)["Addresses"]):
        return True
    if any(_ours(g, deployment_id) and g["State"] != "deleted" for g in ec2.describe_nat_gateways(Filters=f)["NatGateways"]):
        return True
    if any(_ours(v, deployment_id) for v in ec2.describe_vpcs(Filters=f)["Vpcs"]):
        return True
    params = cloud.client("ssm").get_parameters_by_path(Path=f"/qlab/{deployment_id}/", Recursive=True, MaxResults=1)
    return bool(params["Parameters"])


def deployment_regions(deployment_id: str, cloud_for_region: CloudFor, regions: list[str],
                       errors: list[str] | None = None) -> list[str]:
    """The regions of `regions` where anything of the deployment exists, buckets included. A region
    that cannot be searched is returned too (it may hold the deployment: `down` there will say what
    it can do) and its error appended to `errors`."""
    _filters(deployment_id)
    errors = errors if errors is not None else []
    if not regions:
        return []

    def one(region: str) -> bool:
        try:
            return holds(cloud_for_region(region), deployment_id)
        except Exception as exc:
            errors.append(f"{region}: {brief(exc)}")
            return True

    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(regions))) as pool:
        found = {r for r, hit in zip(regions, pool.map(one, regions), strict=True) if hit}
    try:
        found |= {region for region, _, _ in _buckets(cloud_for_region, regions, deployment_id)}
    except Exception as exc:
        errors.append(f"s3: {brief(exc)}")
    return [r for r in regions if r in found]
