"""AWS deployments with boto3: plan, up, status, run, down, ls. Everything a deployment creates
carries the tag qlab:deployment=<id> (plus qlab:expires), so `down` can find and delete it in
dependency order and then prove nothing is left.

Credentials come from boto3's usual chain (profiles, environment, SSO); nothing here reads, stores
or prints them. `endpoint_url` points boto3 at another endpoint (moto in the tests).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlab import wire
from qlab.certs import ROLE_SECRETS
from qlab.cloud.userdata import render_user_data
from qlab.nat.nftables import render
from qlab.nat.spec import PRESET_NAMES, preset

TAG = "qlab:deployment"
VPC_CIDR = "10.80.0.0/16"
PUBLIC_CIDR = "10.80.0.0/24"
INTERMEDIATE_IPS = ("10.80.0.10", "10.80.0.11")
WAN_IF, LAN_IF = "ens5", "ens6"  # Amazon Linux 2023 names for the first two interfaces
AMI_PARAM = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
# On-demand USD per hour, us-east-1, as listed by AWS in 2026-11 (an estimate; other regions differ
# by up to ~25%); the public IPv4 charge applies to every public address.
PRICES = {"t3.micro": 0.0104, "t3.small": 0.0208, "c6in.large": 0.1134, "public_ipv4": 0.005,
          "nat_gateway": 0.045, "nat_gateway_gb": 0.045}
TOPOLOGIES = ("relay", "nat-matrix")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{2,30}$")
DOMAIN_RE = re.compile(r"^(?=.{4,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")


@dataclass
class DeploymentSpec:
    deployment_id: str = ""
    region: str = "us-east-1"
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
            raise ValueError("deployment id: 3-31 lowercase letters, digits and '-'")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {self.topology!r}; choose one of: {', '.join(TOPOLOGIES)}")
        for p in self.presets:
            if preset(p).name == "public":
                raise ValueError("'public' needs no NAT instance; list NAT presets only")
        if not 0.25 <= self.ttl_hours <= 24:
            raise ValueError("ttl_hours must be between 0.25 and 24")
        if not 1 <= self.agents_per_cell <= 10:
            raise ValueError("agents_per_cell must be between 1 and 10")
        if self.domain and not DOMAIN_RE.match(self.domain):
            raise ValueError(f"not a DNS name: {self.domain!r}")
        if self.domain and not re.match(r"^[^@\s'\"]+@[^@\s'\"]+\.[a-z]{2,}$", self.acme_email):
            raise ValueError("--domain needs --acme-email (Let's Encrypt's contact for the certificate)")
        if self.acme_email and not self.domain:
            raise ValueError("--acme-email is only used with --domain")
        if self.managed_nat and self.topology != "nat-matrix":
            raise ValueError("--managed-nat adds a cell to the nat-matrix topology only")
        if not re.match(r"^[a-z]{2}-[a-z]+-\d$", self.region):
            raise ValueError(f"not an AWS region name: {self.region!r}")

    @property
    def expires(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + dt.timedelta(hours=self.ttl_hours)


# --- planning -------------------------------------------------------------------------------------


def plan(spec: DeploymentSpec) -> dict:
    """What `up` would create and what it costs per hour. Creates nothing."""
    instances = [("intermediate", "public")]
    if spec.topology == "relay":
        instances.append(("connector", "public"))
    else:
        for p in spec.presets:
            instances.append((f"nat-{p}", "public"))
            instances += [(f"agent-{p}-{i}", f"private-{p}") for i in range(spec.agents_per_cell)]
            instances.append((f"connector-{p}", f"private-{p}"))
        if spec.managed_nat:  # a cell behind an AWS NAT Gateway: behaviour measured, not configured
            instances += [(f"agent-managed-{i}", "private-managed") for i in range(spec.agents_per_cell)]
            instances.append(("connector-managed", "private-managed"))
    if len(instances) > spec.max_instances:
        raise ValueError(f"{len(instances)} instances exceed the cap of {spec.max_instances} (raise --max-instances)")
    public_ips = 2 + (1 if spec.topology == "relay" else len(spec.presets)) + (1 if spec.managed_nat else 0)
    hourly = len(instances) * PRICES.get(spec.instance_type, PRICES["t3.small"]) + public_ips * PRICES["public_ipv4"]
    if spec.managed_nat:
        hourly += PRICES["nat_gateway"]
    subnets = ["public"] + ([f"private-{p}" for p in spec.presets] if spec.topology == "nat-matrix" else [])
    subnets += ["private-managed"] if spec.managed_nat else []
    return {
        "deployment_id": spec.deployment_id, "region": spec.region, "topology": spec.topology,
        "resources": {
            "vpc": [VPC_CIDR], "internet_gateway": 1, "subnets": subnets,
            "route_tables": len(subnets), "security_groups": ["intermediate", "connector", "nat", "private"],
            "instances": [{"name": n, "subnet": s, "type": spec.instance_type} for n, s in instances],
            "elastic_ips": public_ips, "s3_bucket": f"{spec.deployment_id}-artifacts",
            "ssm_parameters": [f"/qlab/{spec.deployment_id}/{k}" for k in _PARAMS],
            "iam": [n for k in host_kinds(spec) for n in (f"{spec.deployment_id}-{k}-role",
                                                           f"{spec.deployment_id}-{k}-profile")],
            "nat_gateway": spec.managed_nat,
            "tls": f"Let's Encrypt for {spec.domain} (TCP 80 open for http-01)" if spec.domain else "the qlab CA",
        },
        "hourly_cost_usd": round(hourly, 4),
        "cost_for_ttl_usd": round(hourly * spec.ttl_hours, 4),
        "price_note": "on-demand us-east-1 prices listed 2026-11; an estimate, not a quote",
    }


# Each kind of host receives the credentials of its own role and nothing else, so a compromised
# Agent host cannot register a service and a NAT router holds no credential at all; its instance
# role may read exactly these parameters (docs/cloud.md, "Credentials").
HOST_FILES: dict[str, tuple[str, ...]] = {
    "intermediate": ("ca.pem", "intermediate.pem", "intermediate.key", "secret"),
    "connector": ("ca.pem", "connector.pem", "connector.key", "connector.secret"),
    "agent": ("ca.pem", "agent.secret"),
    "nat": (),
}
_PARAMS = {"secret": True, "agent.secret": True, "connector.secret": True, "ca.pem": False,
           "intermediate.pem": False, "intermediate.key": True, "connector.pem": False, "connector.key": True}
SSM_CORE = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def host_kinds(spec: DeploymentSpec) -> tuple[str, ...]:
    """The kinds of host a deployment launches (one instance role each)."""
    return ("intermediate", "connector") if spec.topology == "relay" else tuple(HOST_FILES)


def host_policy(kind: str, *, deployment: str, region: str, account: str, bucket: str) -> dict:
    """The inline policy of one kind of host: the wheel, its own parameters and no other, and for
    Agent hosts their results (`qlab probe --upload`)."""
    own = [f"arn:aws:ssm:{region}:{account}:parameter/qlab/{deployment}/{f}" for f in HOST_FILES[kind]]
    statements: list[dict] = [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket}/wheels/*"},
        # SSM_CORE (Run Command, Session Manager) allows ssm:GetParameter(s) on every parameter: an
        # explicit Deny is what keeps each host to its own
        {"Effect": "Deny", "Action": "ssm:GetParameter*", **({"NotResource": own} if own else {"Resource": "*"})}]
    if own:
        statements.append({"Effect": "Allow", "Action": "ssm:GetParameter", "Resource": own})
    if kind == "agent":
        statements.append({"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/results/*"})
    return {"Version": "2012-10-17", "Statement": statements}


def _iam_names(deployment_id: str) -> list[tuple[str, str]]:
    """(role, instance profile) of every host kind, and the single pair deployments made before
    per-kind roles used, so `down` removes those too."""
    return [(f"{deployment_id}-{k}-role", f"{deployment_id}-{k}-profile") for k in HOST_FILES] + [
        (f"{deployment_id}-role", f"{deployment_id}-profile")]


# --- AWS plumbing -------------------------------------------------------------------------------


class Cloud:
    """boto3 clients for one region (and an optional endpoint, for moto)."""

    def __init__(self, region: str, *, profile: str | None = None, endpoint_url: str | None = None) -> None:
        import boto3

        self.region = region
        self.session = boto3.Session(profile_name=profile, region_name=region)
        self.endpoint_url = endpoint_url

    def client(self, name: str):
        return self.session.client(name, region_name=self.region, endpoint_url=self.endpoint_url)


def _tags(spec: DeploymentSpec, name: str, expires: str) -> list[dict]:
    # qlab:created: describe_addresses gives an Elastic IP no creation time for `ls` to price it by
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return [{"Key": TAG, "Value": spec.deployment_id}, {"Key": "qlab:expires", "Value": expires},
            {"Key": "qlab:created", "Value": created},
            {"Key": "qlab:owner", "Value": getpass.getuser()}, {"Key": "Name", "Value": f"{spec.deployment_id}-{name}"}]


def _spec_tags(kind: str, spec: DeploymentSpec, name: str, expires: str) -> list[dict]:
    return [{"ResourceType": kind, "Tags": _tags(spec, name, expires)}]


def state_dir() -> Path:
    return Path(os.environ.get("QLAB_CLOUD_STATE", Path.home() / ".qlab" / "cloud"))


def _save(state: dict) -> Path:
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{state['deployment_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)
    return path


def load_state(deployment_id: str) -> dict:
    path = state_dir() / f"{deployment_id}.json"
    if not path.exists():
        raise FileNotFoundError(f"no local state for deployment {deployment_id!r} in {path.parent}")
    return json.loads(path.read_text())


# --- up -----------------------------------------------------------------------------------------


def up(spec: DeploymentSpec, cloud: Cloud, *, certs_dir: str, wheel: str) -> dict:
    """Create the deployment. On any failure everything created so far is deleted again."""
    p = plan(spec)  # validates the instance cap before anything exists
    try:
        return _up(spec, cloud, p, certs_dir, wheel)
    except BaseException:
        down(spec.deployment_id, cloud)
        raise


def _up(spec: DeploymentSpec, cloud: Cloud, p: dict, certs_dir: str, wheel: str) -> dict:
    """Create everything, in the order AWS needs it; `state` records each resource as it is made."""
    up = _Up(spec, cloud, p)
    bucket, wheel_key, params = up.artefacts(certs_dir, wheel)
    up.instance_roles(bucket)
    vpc, public = up.network()
    up.security_groups(vpc)
    up.params = params
    up.common = dict(bucket=bucket, wheel_key=wheel_key, deployment=spec.deployment_id, region=spec.region,
                     ttl_minutes=max(1, int(spec.ttl_hours * 60)), domain=spec.domain, acme_email=spec.acme_email)
    up.intermediate(public)
    if spec.topology == "relay":
        c = up.launch("connector", public, up.sgs["connector"], up.user_data(
            "connector", roles=["echo", "connector"], intermediate=up.state["intermediate_ip"], service="echo"),
                      kind="connector")
        up.state["connector_ip"] = up.public_ip(c, "connector")
    else:
        up.state["rulesets"] = {}
        # per cell: the NAT preset it was built with ("managed": an AWS NAT Gateway of unknown
        # behaviour, classify it on the spot), its subnet and its hosts
        up.state["cells"] = {}
        for i, name in enumerate(spec.presets):
            up.nat_cell(vpc, public, name, i)
        if spec.managed_nat:
            rec = up.state["cells"]["managed"] = up.cell("managed", len(spec.presets))
            rec["nat"], sub = _managed_gateway(up.ec2, spec, up.exp, vpc, public, rec["subnet"], up.allocate)
            up.state["nat_gateway"] = rec["nat"]
            up.cell_hosts(rec, sub)
    up.state.update(bucket=bucket, vpc=vpc, plan=p)
    _save(up.state)
    return up.state


class _Up:
    """The steps of `up`, sharing the clients, the tags and the state being recorded."""

    def __init__(self, spec: DeploymentSpec, cloud: Cloud, p: dict) -> None:
        self.spec, self.cloud, self.p = spec, cloud, p
        self.ec2, self.s3, self.ssm, self.iam = (cloud.client(n) for n in ("ec2", "s3", "ssm", "iam"))
        self.exp = spec.expires.isoformat(timespec="seconds")
        self.did = spec.deployment_id
        self.state: dict = {"deployment_id": self.did, "region": spec.region, "spec": asdict(spec),
                            "expires": self.exp, "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                            "instances": {}}
        self.sgs: dict[str, str] = {}
        self.common: dict = {}
        self.params: dict[str, str] = {}
        self.ami = ""

    def tags(self, kind: str, name: str) -> list:
        return _spec_tags(kind, self.spec, name, self.exp)

    def artefacts(self, certs_dir: str, wheel: str) -> tuple[str, str, dict[str, str]]:
        """The wheel in S3, secrets in SSM (SecureString), never in user data or tags."""
        spec = self.spec
        bucket = self.p["resources"]["s3_bucket"]
        kw = {} if spec.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": spec.region}}
        self.s3.create_bucket(Bucket=bucket, **kw)
        self.s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": _tags(spec, "artifacts", self.exp)})
        wheel_key = f"wheels/{Path(wheel).name}"
        self.s3.upload_file(wheel, bucket, wheel_key)
        params = {}
        root = Path(certs_dir, "secret").read_bytes().strip()
        for fname, secure in _PARAMS.items():
            name = f"/qlab/{self.did}/{fname}"
            if fname in ROLE_SECRETS:  # derived from the root, as the Intermediate derives it (any certs dir)
                value = wire.role_secret(root, ROLE_SECRETS[fname]).decode()
            else:
                # without its final newline: `aws ssm get-parameter --output text` adds one, and a PEM
                # file ending in a blank line fails aioquic's certificate loading
                value = Path(certs_dir, fname).read_text().rstrip("\n")
            self.ssm.put_parameter(Name=name, Value=value, Type="SecureString" if secure else "String",
                                   Overwrite=True)
            params[fname] = name
        return bucket, wheel_key, params

    def user_data(self, kind: str, **kw) -> str:
        """The boot script of a host of `kind`: it fetches that kind's credentials only."""
        return render_user_data(params={f: self.params[f] for f in HOST_FILES[kind]}, **self.common, **kw)

    def instance_roles(self, bucket: str) -> None:
        """One instance role and profile per kind of host, each allowed only its own parameters."""
        did, iam = self.did, self.iam
        account = self.cloud.client("sts").get_caller_identity()["Account"]
        trust = json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
        for kind in host_kinds(self.spec):
            role, profile = f"{did}-{kind}-role", f"{did}-{kind}-profile"
            iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust, Tags=_tags(self.spec, f"{kind}-role", self.exp))
            iam.put_role_policy(RoleName=role, PolicyName="qlab-read", PolicyDocument=json.dumps(host_policy(
                kind, deployment=did, region=self.spec.region, account=account, bucket=bucket)))
            iam.attach_role_policy(RoleName=role, PolicyArn=SSM_CORE)
            iam.create_instance_profile(InstanceProfileName=profile)
            iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)

    def network(self) -> tuple[str, str]:
        """The VPC, its internet gateway and the public subnet; returns (vpc id, public subnet id)."""
        ec2 = self.ec2
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR, TagSpecifications=self.tags("vpc", "vpc"))["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        igw = ec2.create_internet_gateway(TagSpecifications=self.tags("internet-gateway", "igw"))
        igw_id = igw["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=vpc)
        public = ec2.create_subnet(VpcId=vpc, CidrBlock=PUBLIC_CIDR,
                                   TagSpecifications=self.tags("subnet", "public"))["Subnet"]["SubnetId"]
        rt = ec2.create_route_table(VpcId=vpc, TagSpecifications=self.tags("route-table", "public"))
        rt_id = rt["RouteTable"]["RouteTableId"]
        ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id)
        ec2.associate_route_table(RouteTableId=rt_id, SubnetId=public)
        return vpc, public

    def security_groups(self, vpc: str) -> None:
        spec, ec2 = self.spec, self.ec2
        for name, rules in (
            ("intermediate", [("udp", 4433, 4434, "0.0.0.0/0")]
             + ([("tcp", 80, 80, "0.0.0.0/0")] if spec.domain else [])),  # ACME http-01, only with --domain
            ("connector", [("udp", 4434, 4434, "0.0.0.0/0")] if spec.topology == "relay" else []),
            ("nat", [("udp", 1024, 65535, "0.0.0.0/0"), ("-1", -1, -1, "10.80.0.0/16")]),  # NAT behaviour is nftables'
            ("private", [("-1", -1, -1, "10.80.0.0/16")]),
        ):
            sg = ec2.create_security_group(GroupName=f"{self.did}-{name}", Description=f"qlab {name}", VpcId=vpc,
                                           TagSpecifications=self.tags("security-group", name))["GroupId"]
            if rules:
                ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[
                    {"IpProtocol": proto, "FromPort": lo, "ToPort": hi, "IpRanges": [{"CidrIp": cidr}]}
                    if proto != "-1" else {"IpProtocol": "-1", "IpRanges": [{"CidrIp": cidr}]}
                    for proto, lo, hi, cidr in rules])
            self.sgs[name] = sg
        self.ami = self.cloud.client("ssm").get_parameter(Name=AMI_PARAM)["Parameter"]["Value"]

    def launch(self, name: str, subnet: str, sg: str, user_data: str, *, kind: str, ip: str | None = None,
               extra_enis: list | None = None) -> str:
        nics = [{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [sg], "DeleteOnTermination": True,
                 **({"PrivateIpAddress": ip} if ip else {})}]
        for i, (sn, sgid, eip) in enumerate(extra_enis or [], start=1):
            nics.append({"DeviceIndex": i, "SubnetId": sn, "Groups": [sgid], "DeleteOnTermination": True,
                         **({"PrivateIpAddress": eip} if eip else {})})
        inst = self.ec2.run_instances(
            ImageId=self.ami, InstanceType=self.spec.instance_type, MinCount=1, MaxCount=1, UserData=user_data,
            NetworkInterfaces=nics, InstanceInitiatedShutdownBehavior="terminate",
            IamInstanceProfile={"Name": f"{self.did}-{kind}-profile"},
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
            TagSpecifications=self.tags("instance", name) + self.tags("volume", name),
        )["Instances"][0]
        self.state["instances"][name] = {"id": inst["InstanceId"], "subnet": subnet}
        return inst["InstanceId"]

    def allocate(self, name: str) -> dict:
        return self.ec2.allocate_address(Domain="vpc", TagSpecifications=self.tags("elastic-ip", name))

    def public_ip(self, instance_id: str, name: str) -> str:
        alloc = self.allocate(name)
        self.ec2.associate_address(AllocationId=alloc["AllocationId"], InstanceId=instance_id)
        return alloc["PublicIp"]

    def intermediate(self, public: str) -> None:
        """The Intermediate's two addresses (NAT classification needs an alternate IP): Elastic IPs
        first, so its user data can advertise them, then each bound to one of its private IPs."""
        ec2 = self.ec2
        eips = [self.allocate("intermediate"), self.allocate("intermediate-alt")]
        privs = [INTERMEDIATE_IPS[0], INTERMEDIATE_IPS[1]]
        inter = self.launch("intermediate", public, self.sgs["intermediate"], self.user_data(
            "intermediate", roles=["intermediate"],
            intermediate_addrs=((privs[0], eips[0]["PublicIp"]), (privs[1], eips[1]["PublicIp"]))),
                            kind="intermediate", ip=privs[0])
        ec2.get_waiter("instance_running").wait(InstanceIds=[inter], WaiterConfig={"Delay": 2, "MaxAttempts": 90})
        eni = ec2.describe_instances(InstanceIds=[inter])["Reservations"][0]["Instances"][0]["NetworkInterfaces"][0]
        # the secondary private IP (Amazon Linux's ec2-net-utils configures it in the OS by itself)
        ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=[privs[1]])
        for e, priv in zip(eips, privs, strict=True):
            ec2.associate_address(AllocationId=e["AllocationId"], NetworkInterfaceId=eni["NetworkInterfaceId"],
                                  PrivateIpAddress=priv)
        self.state["intermediate_ip"] = eips[0]["PublicIp"]
        self.state["intermediate_ips"] = [e["PublicIp"] for e in eips]

    def cell(self, name: str, index: int) -> dict:
        return {"preset": name, "subnet": f"10.80.{10 + index}.0/24", "nat": f"nat-{name}",
                "service": f"echo-{name}", "agents": [f"agent-{name}-{k}" for k in range(self.spec.agents_per_cell)],
                "connector": f"connector-{name}"}

    def cell_hosts(self, rec: dict, subnet_id: str) -> None:
        for host in rec["agents"]:
            self.launch(host, subnet_id, self.sgs["private"], self.user_data("agent", roles=[]), kind="agent")
        self.launch(rec["connector"], subnet_id, self.sgs["private"], self.user_data(
            "connector", roles=["echo", "connector"], intermediate=self.state["intermediate_ip"],
            service=rec["service"]), kind="connector")

    def nat_cell(self, vpc: str, public: str, name: str, i: int) -> None:
        """A NAT instance running the preset's nftables ruleset, its private subnet and hosts."""
        ec2 = self.ec2
        rec = self.state["cells"][name] = self.cell(name, i)
        cidr = rec["subnet"]
        sub = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr,
                                TagSpecifications=self.tags("subnet", f"private-{name}"))["Subnet"]["SubnetId"]
        wan_ip, lan_ip = f"10.80.0.{100 + i}", f"10.80.{10 + i}.5"
        ruleset = nat_ruleset(name, wan_ip, cidr)
        self.state["rulesets"][name] = ruleset
        nat = self.launch(rec["nat"], public, self.sgs["nat"], self.user_data("nat", roles=[], nat_ruleset=ruleset),
                          kind="nat", ip=wan_ip, extra_enis=[(sub, self.sgs["nat"], lan_ip)])
        self.public_ip(nat, rec["nat"])
        for eni in ec2.describe_instances(InstanceIds=[nat])["Reservations"][0]["Instances"][0]["NetworkInterfaces"]:
            ec2.modify_network_interface_attribute(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                                   SourceDestCheck={"Value": False})
        prt = ec2.create_route_table(VpcId=vpc, TagSpecifications=self.tags("route-table", f"private-{name}"))
        lan_eni = next(e["NetworkInterfaceId"] for e in ec2.describe_instances(InstanceIds=[nat])["Reservations"][0]
                       ["Instances"][0]["NetworkInterfaces"] if e["Attachment"]["DeviceIndex"] == 1)
        ec2.create_route(RouteTableId=prt["RouteTable"]["RouteTableId"], DestinationCidrBlock="0.0.0.0/0",
                         NetworkInterfaceId=lan_eni)
        ec2.associate_route_table(RouteTableId=prt["RouteTable"]["RouteTableId"], SubnetId=sub)
        self.cell_hosts(rec, sub)


def _managed_gateway(ec2, spec: DeploymentSpec, exp: str, vpc: str, public: str, cidr: str, allocate) -> tuple[str, str]:
    """An AWS NAT Gateway in the public subnet and a private subnet `cidr` routed through it (the
    managed cell; `qlab probe` classifies what the gateway does). Returns (gateway id, subnet id)."""
    eip = allocate("nat-gateway")
    ngw = ec2.create_nat_gateway(SubnetId=public, AllocationId=eip["AllocationId"],
                                 TagSpecifications=_spec_tags("natgateway", spec, "nat-gateway", exp))
    ngw_id = ngw["NatGateway"]["NatGatewayId"]
    ec2.get_waiter("nat_gateway_available").wait(NatGatewayIds=[ngw_id], WaiterConfig={"Delay": 5, "MaxAttempts": 60})
    sub = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr,
                            TagSpecifications=_spec_tags("subnet", spec, "private-managed", exp))["Subnet"]["SubnetId"]
    rt = ec2.create_route_table(VpcId=vpc, TagSpecifications=_spec_tags("route-table", spec, "private-managed", exp))
    rt_id = rt["RouteTable"]["RouteTableId"]
    ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=ngw_id)
    ec2.associate_route_table(RouteTableId=rt_id, SubnetId=sub)
    return ngw_id, sub


def nat_ruleset(preset_name: str, wan_ip: str, lan_cidr: str) -> str:
    """The ruleset a NAT instance loads: the netns lab's renderer, on AWS interface names."""
    return render(preset(preset_name), wan_if=WAN_IF, lan_if=LAN_IF, wan_ip=wan_ip, lan_cidr=lan_cidr)


# --- status ------------------------------------------------------------------------------------------


def tagged_instances(cloud: Cloud, deployment_id: str, *, live_only: bool = True) -> list[dict]:
    ec2 = cloud.client("ec2")
    out = []
    for page in ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": f"tag:{TAG}", "Values": [deployment_id]}]):
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
    return next((t["Value"] for t in inst.get("Tags", []) if t["Key"] == "Name"), inst["InstanceId"])


# --- down and ls --------------------------------------------------------------------------------


def down(deployment_id: str, cloud: Cloud) -> dict:
    """Delete everything tagged with the deployment id, in dependency order; idempotent; then
    verify that nothing is left and say so."""
    ec2 = cloud.client("ec2")
    f = [{"Name": f"tag:{TAG}", "Values": [deployment_id]}]
    ids = [i["InstanceId"] for i in tagged_instances(cloud, deployment_id)]
    if ids:
        ec2.terminate_instances(InstanceIds=ids)
        ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 2, "MaxAttempts": 150})
    _delete_gateways(ec2, f)
    for a in ec2.describe_addresses(Filters=f)["Addresses"]:
        if a.get("AssociationId"):
            ec2.disassociate_address(AssociationId=a["AssociationId"])
        ec2.release_address(AllocationId=a["AllocationId"])
    for vpc in ec2.describe_vpcs(Filters=f)["Vpcs"]:
        _delete_vpc(ec2, vpc["VpcId"])
    _delete_artefacts(cloud, deployment_id)
    left = leftovers(deployment_id, cloud)
    with_state = state_dir() / f"{deployment_id}.json"
    if not any(left.values()) and with_state.exists():
        with_state.unlink()
    return {"deployment_id": deployment_id, "left": left, "clean": not any(left.values())}


def _delete_gateways(ec2: Any, f: list) -> None:
    """The deployment's gateways, and any other in its VPCs (they would block deleting the subnets)."""
    vpc_ids = [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]]
    found = ec2.describe_nat_gateways(Filters=f)["NatGateways"]
    if vpc_ids:
        found += ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": vpc_ids}])["NatGateways"]
    gateways = sorted({g["NatGatewayId"] for g in found if g["State"] not in ("deleted", "deleting")})
    for g in gateways:
        ec2.delete_nat_gateway(NatGatewayId=g)
    if gateways:  # its Elastic IP and subnet are released only once the gateway is gone
        ec2.get_waiter("nat_gateway_deleted").wait(NatGatewayIds=gateways, WaiterConfig={"Delay": 5, "MaxAttempts": 60})


def _delete_vpc(ec2: Any, v: str) -> None:
    vf = [{"Name": "vpc-id", "Values": [v]}]
    for eni in ec2.describe_network_interfaces(Filters=vf)["NetworkInterfaces"]:
        ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
    for rt in ec2.describe_route_tables(Filters=vf)["RouteTables"]:
        if any(a.get("Main") for a in rt.get("Associations", [])):
            continue
        for a in rt.get("Associations", []):
            ec2.disassociate_route_table(AssociationId=a["RouteTableAssociationId"])
        ec2.delete_route_table(RouteTableId=rt["RouteTableId"])
    for sn in ec2.describe_subnets(Filters=vf)["Subnets"]:
        ec2.delete_subnet(SubnetId=sn["SubnetId"])
    for igw in ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [v]}])["InternetGateways"]:
        ec2.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=v)
        ec2.delete_internet_gateway(InternetGatewayId=igw["InternetGatewayId"])
    for sg in ec2.describe_security_groups(Filters=vf)["SecurityGroups"]:
        if sg["GroupName"] != "default":
            ec2.delete_security_group(GroupId=sg["GroupId"])
    ec2.delete_vpc(VpcId=v)


def _delete_artefacts(cloud: Cloud, deployment_id: str) -> None:
    """The wheel bucket, the SSM parameters and the instance role."""
    s3, ssm, iam = (cloud.client(n) for n in ("s3", "ssm", "iam"))
    bucket = f"{deployment_id}-artifacts"
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)
    except s3.exceptions.NoSuchBucket:
        pass
    names = [p["Name"] for page in ssm.get_paginator("get_parameters_by_path").paginate(
        Path=f"/qlab/{deployment_id}/", Recursive=True) for p in page["Parameters"]]
    for i in range(0, len(names), 10):
        ssm.delete_parameters(Names=names[i:i + 10])
    for role, profile in _iam_names(deployment_id):
        for call, kw in ((iam.remove_role_from_instance_profile, {"InstanceProfileName": profile, "RoleName": role}),
                         (iam.delete_instance_profile, {"InstanceProfileName": profile}),
                         (iam.detach_role_policy, {"RoleName": role, "PolicyArn": SSM_CORE}),
                         (iam.delete_role_policy, {"RoleName": role, "PolicyName": "qlab-read"}),
                         (iam.delete_role, {"RoleName": role})):
            with contextlib.suppress(iam.exceptions.NoSuchEntityException):
                call(**kw)


def leftovers(deployment_id: str, cloud: Cloud) -> dict:
    ec2, s3, ssm, iam = (cloud.client(n) for n in ("ec2", "s3", "ssm", "iam"))
    f = [{"Name": f"tag:{TAG}", "Values": [deployment_id]}]
    roles = []
    for role, _ in _iam_names(deployment_id):
        with contextlib.suppress(iam.exceptions.NoSuchEntityException):
            roles.append(iam.get_role(RoleName=role)["Role"]["RoleName"])
    try:
        s3.head_bucket(Bucket=f"{deployment_id}-artifacts")
        bucket = [f"{deployment_id}-artifacts"]
    except Exception:
        bucket = []
    return {
        "instances": [i["InstanceId"] for i in tagged_instances(cloud, deployment_id)],
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
        "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
        "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
        "elastic_ips": [a["AllocationId"] for a in ec2.describe_addresses(Filters=f)["Addresses"]],
        "nat_gateways": [g["NatGatewayId"] for g in ec2.describe_nat_gateways(Filters=f)["NatGateways"]
                         if g["State"] != "deleted"],
        "buckets": bucket,
        "iam_roles": roles,
        "ssm_parameters": [p["Name"] for p in ssm.get_parameters_by_path(Path=f"/qlab/{deployment_id}/",
                                                                         Recursive=True)["Parameters"]],
    }


def ls(cloud_for_region, regions: list[str]) -> list[dict]:
    """Every live qlab instance in `regions`, with its deployment, age and cost so far."""
    out = []
    now = dt.datetime.now(dt.UTC)
    for region in regions:
        ec2 = cloud_for_region(region).client("ec2")
        for page in ec2.get_paginator("describe_instances").paginate(Filters=[{"Name": "tag-key", "Values": [TAG]}]):
            for r in page["Reservations"]:
                for i in r["Instances"]:
                    if i["State"]["Name"] in ("terminated",):
                        continue
                    tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
                    launched = i["LaunchTime"]
                    hours = max(0.0, (now - launched).total_seconds() / 3600)
                    out.append({"region": region, "deployment": tags.get(TAG), "name": tags.get("Name"),
                                "id": i["InstanceId"], "state": i["State"]["Name"], "age_h": round(hours, 2),
                                "expires": tags.get("qlab:expires"),
                                "cost_so_far_usd": round(hours * PRICES.get(i["InstanceType"], PRICES["t3.small"]), 4)})
    return out


ALL_PRESETS_WITH_NAT = [p for p in PRESET_NAMES if p != "public"]
