"""What a deployment is: its spec (validated, errors named by the `qlab cloud` flag), the names it
gives AWS resources, and the prices and sizes `plan` and `ls` count with."""

from __future__ import annotations

import datetime as dt
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from qlab.nat.spec import preset

TAG = "qlab:deployment"
VPC_CIDR = "10.80.0.0/16"
PUBLIC_CIDR = "10.80.0.0/24"
INTERMEDIATE_IPS = ("10.80.0.10", "10.80.0.11")
WAN_IF, LAN_IF = "ens5", "ens6"  # Amazon Linux 2023 names for the first two interfaces
AMI_PARAM = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
# On-demand USD per hour, us-east-1, as listed by AWS in 2026-11 (an estimate; other regions differ
# by up to ~25%); the public IPv4 charge applies to every public address.
PRICES = {"t3.micro": 0.0104, "t3.small": 0.0208, "t3.medium": 0.0416, "c5n.large": 0.108,
          "c6in.large": 0.1134, "c7i.large": 0.08925, "m7i.large": 0.1008, "public_ipv4": 0.005,
          "nat_gateway": 0.045, "nat_gateway_gb": 0.045}
# The instance types qlab launches: x86_64 (the AMI above), all 2 vCPUs, each with a known price.
# Another type is refused rather than priced by a guess (an arm64 t4g would not boot the AMI).
INSTANCE_VCPUS = {"t3.micro": 2, "t3.small": 2, "t3.medium": 2, "c5n.large": 2, "c6in.large": 2,
                  "c7i.large": 2, "m7i.large": 2}
TOPOLOGIES = ("relay", "nat-matrix")
# "qlab-" first: the operator's policy (`qlab cloud policy`) allows IAM, S3 and SSM on qlab-* names only
ID_RE = re.compile(r"^qlab-[a-z0-9][a-z0-9-]{0,25}$")
DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
REGION_RE = re.compile(r"^[a-z]{2}(-gov)?-[a-z]+-\d$")


def check_id(deployment_id: str) -> str:
    """A deployment id as `down` and `status` accept it: never a pattern (EC2 tag filters expand `*`
    and `?`, so `qlab-aa*` would match other deployments)."""
    if not ID_RE.match(deployment_id):
        raise ValueError(f"not a deployment id: {deployment_id!r} ('qlab-' and up to 26 lowercase letters, "
                         "digits and '-')")
    return deployment_id


def tag_filter(deployment_id: str) -> list[dict]:
    """The EC2 filter for one deployment's resources (the id checked first: never a pattern)."""
    return [{"Name": f"tag:{TAG}", "Values": [check_id(deployment_id)]}]


def tag_map(resource: dict) -> dict[str, str]:
    """A resource's tags as EC2 lists them, as a dict."""
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def tag_time(value: Any) -> dt.datetime | None:
    """A time from a tag (ISO 8601) or from EC2 (a datetime), in UTC when it names no zone; None
    when it is not one."""
    if isinstance(value, dt.datetime):
        t = value
    else:
        try:
            t = dt.datetime.fromisoformat(str(value))
        except ValueError:
            return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def bucket_name(deployment_id: str, account: str, region: str) -> str:
    """S3 bucket names are global across all accounts: the account and region make ours unique to
    us (at most 31 + 12 + 14 + 2 = 59 of the 63 characters allowed)."""
    return f"{deployment_id}-{account}-{region}"


@dataclass
class DeploymentSpec:
    deployment_id: str = ""
    region: str = ""  # "" = boto3's chain (AWS_REGION, the profile); an error if it has none
    topology: str = "relay"
    presets: list[str] = field(default_factory=lambda: ["port_restricted"])
    agents_per_cell: int = 1
    instance_type: str = "t3.micro"
    ttl_hours: float = 2.0
    max_instances: int = 20
    managed_nat: bool = False
    domain: str = ""  # Let's Encrypt for the Intermediate (needs an A record -> its Elastic IP)
    acme_email: str = ""

    def __post_init__(self) -> None:
        if not self.deployment_id:
            self.deployment_id = f"qlab-{secrets.token_hex(3)}"
        if not ID_RE.match(self.deployment_id):
            raise ValueError("--id: 'qlab-' and up to 26 lowercase letters, digits and '-'")
        if not self.region:
            from qlab.cloud.aws import default_region

            self.region = default_region()
        if not REGION_RE.match(self.region or ""):
            raise ValueError(f"--region: not an AWS region name: {self.region!r}" if self.region else
                             "no AWS region: pass --region or set one in your AWS profile or AWS_REGION")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"--topology: unknown {self.topology!r}; choose one of: {', '.join(TOPOLOGIES)}")
        self._check_cells()
        if self.instance_type not in INSTANCE_VCPUS:
            raise ValueError(f"--instance-type: {self.instance_type!r} is not one qlab knows the price and "
                             f"architecture of; choose one of: {', '.join(INSTANCE_VCPUS)}")
        if not 0.25 <= self.ttl_hours <= 24:
            raise ValueError("--ttl: between 0.25 and 24 hours")
        if not 1 <= self.agents_per_cell <= 10:
            raise ValueError("--agents: between 1 and 10 Agent hosts per cell")
        self._check_tls()

    def _check_cells(self) -> None:
        for p in self.presets:
            if preset(p).name == "public":
                raise ValueError("--presets: 'public' needs no NAT instance; list NAT presets only")
        if self.topology == "nat-matrix" and not self.presets and not self.managed_nat:
            raise ValueError("--presets: nat-matrix needs at least one NAT preset (or --managed-nat)")
        if self.managed_nat and self.topology != "nat-matrix":
            raise ValueError("--managed-nat adds a cell to the nat-matrix topology only")

    def _check_tls(self) -> None:
        if self.domain and not DOMAIN_RE.match(self.domain):
            raise ValueError(f"--domain: not a DNS name: {self.domain!r}")
        if self.domain and not re.match(r"^[^@\s'\"]+@[^@\s'\"]+\.[a-z]{2,}$", self.acme_email):
            raise ValueError("--domain needs --acme-email (Let's Encrypt's contact for the certificate)")
        if self.acme_email and not self.domain:
            raise ValueError("--acme-email is only used with --domain")

    @property
    def expires(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(hours=self.ttl_hours)

    @property
    def cells(self) -> list[str]:
        """The nat-matrix cells in order: one per preset, then `managed` (an AWS NAT Gateway)."""
        if self.topology != "nat-matrix":
            return []
        return list(self.presets) + (["managed"] if self.managed_nat else [])
