"""The steps of `qlab cloud up`, in the order AWS needs them; `Up.state` records each resource as it
is made. Elastic IPs are attached last, by network interface, once every instance is running
(AssociateAddress refuses a pending instance, and wants the interface of an instance with several).
"""

from __future__ import annotations

import datetime as dt
import getpass
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from qlab import wire
from qlab.certs import ROLE_SECRETS
from qlab.cloud import aws
from qlab.cloud import iam as host_iam
from qlab.cloud.aws import Cloud, retry
from qlab.cloud.plan import host_kinds
from qlab.cloud.reaper import reaper_policy
from qlab.cloud.spec import (
    AMI_PARAM,
    INTERMEDIATE_IPS,
    LAN_IF,
    PUBLIC_CIDR,
    TAG,
    VPC_CIDR,
    WAN_IF,
    DeploymentSpec,
    bucket_name,
)
from qlab.cloud.userdata import render_user_data
from qlab.nat.nftables import conntrack_sysctls, render
from qlab.nat.spec import preset


def nat_ruleset(preset_name: str, wan_ip: str, lan_cidr: str) -> str:
    """The ruleset a NAT instance loads: the netns lab's renderer, on AWS interface names."""
    return render(preset(preset_name), wan_if=WAN_IF, lan_if=LAN_IF, wan_ip=wan_ip, lan_cidr=lan_cidr)


def tags(spec: DeploymentSpec, name: str, expires: str) -> list[dict]:
    # qlab:created: describe_addresses gives an Elastic IP no creation time for `ls` to price it by
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return [{"Key": TAG, "Value": spec.deployment_id}, {"Key": "qlab:expires", "Value": expires},
            {"Key": "qlab:created", "Value": created},
            {"Key": "qlab:owner", "Value": getpass.getuser()}, {"Key": "Name", "Value": f"{spec.deployment_id}-{name}"}]


@dataclass
class PendingAddress:
    """An Elastic IP to attach once its instance runs."""
    instance_id: str
    interface_id: str
    allocation_id: str
    private_ip: str = ""


class Up:
    """The steps of `up`, sharing the clients, the tags and the state being recorded."""

    def __init__(self, spec: DeploymentSpec, cloud: Cloud, checks: dict, say: Callable[[str], None]) -> None:
        self.spec, self.cloud, self.p, self.say = spec, cloud, checks, say
        self.ec2, self.s3, self.ssm, self.iam = (cloud.client(n) for n in ("ec2", "s3", "ssm", "iam"))
        self.az = checks["account"]["availability_zone"]
        self.exp = spec.expires.isoformat(timespec="seconds")
        self.did = spec.deployment_id
        self.state: dict = {"deployment_id": self.did, "region": spec.region, "spec": asdict(spec),
                            "expires": self.exp, "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                            "availability_zone": self.az, "instances": {}}
        self.sgs: dict[str, str] = {}
        self.common: dict = {}
        self.params: dict[str, str] = {}
        self.ami = ""
        self.pending: list[PendingAddress] = []

    def run(self, certs_dir: str, wheel: str) -> dict:
        spec = self.spec
        self.say("storing the wheel in S3 and the credentials in SSM")
        bucket, wheel_key = self.artefacts(certs_dir, wheel)
        self.say("creating one instance role per kind of host")
        self.instance_roles(bucket)
        self.say(f"creating the VPC in {self.az}")
        vpc, public = self.network()
        self.security_groups(vpc)
        self.common = dict(bucket=bucket, wheel_key=wheel_key, deployment=self.did, region=spec.region,
                           ttl_minutes=max(1, int(spec.ttl_hours * 60)), domain=spec.domain, acme_email=spec.acme_email)
        self.intermediate(public)
        if spec.topology == "relay":
            c = self.launch("connector", public, self.sgs["connector"], self.user_data(
                "connector", roles=["echo", "connector"], intermediate=self.state["intermediate_ip"], service="echo",
                host="connector"), kind="connector")
            self.state["connector_ip"] = self.public_ip(c, "connector")
        else:
            self.cells(vpc, public)
        self.say(f"waiting for {len(self.state['instances'])} instances to run, then attaching "
                 f"{len(self.pending)} Elastic IPs")
        self.attach_addresses()
        self.state.update(bucket=bucket, vpc=vpc, plan=self.p)
        return self.state

    def tags(self, kind: str, name: str) -> list[dict]:
        return [{"ResourceType": kind, "Tags": tags(self.spec, name, self.exp)}]

    def artefacts(self, certs_dir: str, wheel: str) -> tuple[str, str]:
        """The wheel in S3, secrets in SSM (SecureString), never in user data or tags."""
        spec = self.spec
        bucket = bucket_name(self.did, self.cloud.account(), spec.region)
        kw = {} if spec.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": spec.region}}
        try:
            self.s3.create_bucket(Bucket=bucket, **kw)
        except self.s3.exceptions.BucketAlreadyExists as exc:  # names are global: another account has it
            raise ValueError(f"the S3 bucket name {bucket} is taken by another account: choose another --id") from exc
        self.s3.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": tags(spec, "artifacts", self.exp)})
        wheel_key = f"wheels/{Path(wheel).name}"
        self.s3.upload_file(wheel, bucket, wheel_key)
        root = Path(certs_dir, "secret").read_bytes().strip()
        for fname, secure in host_iam.PARAMS.items():
            name = f"/qlab/{self.did}/{fname}"
            if fname in ROLE_SECRETS:  # derived from the root, as the Intermediate derives it (any certs dir)
                value = wire.role_secret(root, ROLE_SECRETS[fname]).decode()
            else:
                # without its final newline: `aws ssm get-parameter --output text` adds one, and a PEM
                # file ending in a blank line fails aioquic's certificate loading
                value = Path(certs_dir, fname).read_text().rstrip("\n")
            # tagged (AWS refuses Tags with Overwrite; the id is new, so nothing is overwritten)
            self.ssm.put_parameter(Name=name, Value=value, Type="SecureString" if secure else "String",
                                   Tags=tags(spec, fname, self.exp))
            self.params[fname] = name
        return bucket, wheel_key

    def user_data(self, kind: str, **kw: Any) -> str:
        """The boot script of a host of `kind`: it fetches that kind's credentials only."""
        return render_user_data(params={f: self.params[f] for f in host_iam.HOST_FILES[kind]}, **self.common, **kw)

    def instance_roles(self, bucket: str) -> None:
        """One instance role and profile per kind of host, each allowed only its own parameters."""
        region, account = self.spec.region, self.cloud.account()
        host_iam.create_roles(self.iam, host_kinds(self.spec), deployment=self.did, region=region, account=account,
                              bucket=bucket, tags=tags(self.spec, "role", self.exp),
                              reaper=reaper_policy(self.did, region, account))

    def network(self) -> tuple[str, str]:
        """The VPC, its internet gateway and the public subnet; returns (vpc id, public subnet id)."""
        ec2 = self.ec2
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR, TagSpecifications=self.tags("vpc", "vpc"))["Vpc"]["VpcId"]
        retry(lambda: ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True}))
        igw = ec2.create_internet_gateway(TagSpecifications=self.tags("internet-gateway", "igw"))
        igw_id = igw["InternetGateway"]["InternetGatewayId"]
        retry(lambda: ec2.attach_internet_gateway(InternetGatewayId=igw_id, VpcId=vpc))
        public = self.subnet(vpc, PUBLIC_CIDR, "public")
        rt_id = ec2.create_route_table(VpcId=vpc, TagSpecifications=self.tags("route-table", "public"))[
            "RouteTable"]["RouteTableId"]
        retry(lambda: ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw_id))
        retry(lambda: ec2.associate_route_table(RouteTableId=rt_id, SubnetId=public))
        return vpc, public

    def subnet(self, vpc: str, cidr: str, name: str) -> str:
        """A subnet in the deployment's one AZ (a NAT instance's interfaces must share one)."""
        return str(retry(lambda: self.ec2.create_subnet(
            VpcId=vpc, CidrBlock=cidr, AvailabilityZone=self.az,
            TagSpecifications=self.tags("subnet", name)))["Subnet"]["SubnetId"])

    def security_groups(self, vpc: str) -> None:
        spec, ec2 = self.spec, self.ec2
        for name, rules in (
            ("intermediate", [("udp", 4433, 4434, "0.0.0.0/0")]
             + ([("tcp", 80, 80, "0.0.0.0/0")] if spec.domain else [])),  # ACME http-01, only with --domain
            ("connector", [("udp", 4434, 4434, "0.0.0.0/0")] if spec.topology == "relay" else []),
            ("nat", [("udp", 1, 65535, "0.0.0.0/0"), ("-1", -1, -1, VPC_CIDR)]),  # NAT behaviour is nftables'
            # private hosts have no public address: only what their NAT forwards reaches them, so the
            # NAT's filtering is the one measured (a stateful group here would filter every preset
            # like a port-restricted one); the cell's network ACL keeps other cells out
            ("private", [("udp", 1, 65535, "0.0.0.0/0"), ("-1", -1, -1, VPC_CIDR)]),
        ):
            sg = ec2.create_security_group(GroupName=f"{self.did}-{name}", Description=f"qlab {name}", VpcId=vpc,
                                           TagSpecifications=self.tags("security-group", name))["GroupId"]
            if rules:
                retry(partial(ec2.authorize_security_group_ingress, GroupId=sg, IpPermissions=[
                    {"IpProtocol": proto, "FromPort": lo, "ToPort": hi, "IpRanges": [{"CidrIp": cidr}]}
                    if proto != "-1" else {"IpProtocol": "-1", "IpRanges": [{"CidrIp": cidr}]}
                    for proto, lo, hi, cidr in rules]))
            self.sgs[name] = sg
        self.ami = self.ssm.get_parameter(Name=AMI_PARAM)["Parameter"]["Value"]

    def launch(self, name: str, subnet: str, sg: str, user_data: str, *, kind: str, ip: str | None = None,
               extra_enis: list | None = None, public: bool = False) -> dict:
        """One instance; returns RunInstances' description of it (its interfaces included).
        `public`: an address of its own from launch, which EC2 gives it again when its Elastic IP is
        taken away (EC2 User Guide, "Elastic IP addresses": disassociating gives an instance launched
        with a public IPv4 address a new one) — so the reaper on the Intermediate can still reach
        the EC2 API after releasing the Intermediate's own Elastic IPs."""
        nics = [{"DeviceIndex": 0, "SubnetId": subnet, "Groups": [sg], "DeleteOnTermination": True,
                 **({"PrivateIpAddress": ip} if ip else {}), **({"AssociatePublicIpAddress": True} if public else {})}]
        for i, (sn, sgid, eip) in enumerate(extra_enis or [], start=1):
            nics.append({"DeviceIndex": i, "SubnetId": sn, "Groups": [sgid], "DeleteOnTermination": True,
                         **({"PrivateIpAddress": eip} if eip else {})})
        self.say(f"launching {name}")
        # retried while a new instance profile is still unknown to EC2; the client token makes a
        # retry of a launch that did happen return that instance instead of a second one
        inst = retry(lambda: self.ec2.run_instances(
            ImageId=self.ami, InstanceType=self.spec.instance_type, MinCount=1, MaxCount=1, UserData=user_data,
            NetworkInterfaces=nics, InstanceInitiatedShutdownBehavior="terminate",
            IamInstanceProfile={"Name": f"{self.did}-{kind}-profile"}, ClientToken=f"{self.did}-{name}"[:64],
            MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
            TagSpecifications=self.tags("instance", name) + self.tags("volume", name),
        ))["Instances"][0]
        self.state["instances"][name] = {"id": inst["InstanceId"], "subnet": subnet}
        return dict(inst)

    def allocate(self, name: str) -> dict:
        return dict(self.ec2.allocate_address(Domain="vpc", TagSpecifications=self.tags("elastic-ip", name)))

    def public_ip(self, inst: dict, name: str, device: int = 0, private_ip: str = "") -> str:
        """An Elastic IP for the instance's interface `device`, attached once the instance runs."""
        alloc = self.allocate(name)
        self.pending.append(PendingAddress(inst["InstanceId"], interface(inst, device), alloc["AllocationId"],
                                           private_ip))
        return str(alloc["PublicIp"])

    def attach_addresses(self) -> None:
        ids = sorted({p.instance_id for p in self.pending})
        if ids:
            self.ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig=aws.waiter_config(400))
        for p in self.pending:
            kw = {"PrivateIpAddress": p.private_ip} if p.private_ip else {}
            retry(partial(self.ec2.associate_address,
                AllocationId=p.allocation_id, NetworkInterfaceId=p.interface_id, **kw))

    def intermediate(self, public: str) -> None:
        """The Intermediate's two addresses (NAT classification needs an alternate IP): Elastic IPs
        first, so its user data can advertise them, then each bound to one of its private IPs."""
        eips = [self.allocate("intermediate"), self.allocate("intermediate-alt")]
        privs = list(INTERMEDIATE_IPS)
        inter = self.launch("intermediate", public, self.sgs["intermediate"], self.user_data(
            "intermediate", roles=["intermediate"], host="intermediate", reaper=(self.did, self.exp),
            intermediate_addrs=((privs[0], eips[0]["PublicIp"]), (privs[1], eips[1]["PublicIp"]))),
            kind="intermediate", ip=privs[0], public=True)
        eni = interface(inter, 0)
        # the secondary private IP (Amazon Linux's ec2-net-utils configures it in the OS by itself)
        retry(lambda: self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni, PrivateIpAddresses=[privs[1]]))
        for e, priv in zip(eips, privs, strict=True):
            self.pending.append(PendingAddress(inter["InstanceId"], eni, e["AllocationId"], priv))
        self.state["intermediate_ip"] = eips[0]["PublicIp"]
        self.state["intermediate_ips"] = [e["PublicIp"] for e in eips]

    def cells(self, vpc: str, public: str) -> None:
        # per cell: the NAT preset it was built with ("managed": an AWS NAT Gateway of unknown
        # behaviour, classify it on the spot), its subnet and its hosts
        self.state["rulesets"], self.state["cells"] = {}, {}
        for i, name in enumerate(self.spec.cells):
            rec = self.state["cells"][name] = self.cell(name, i)
            sub = self.subnet(vpc, rec["subnet"], f"private-{name}")
            self.isolate(vpc, sub, rec["subnet"], name)
            if name == "managed":
                rec["nat"] = self.state["nat_gateway"] = self.managed_gateway(vpc, public, sub)
            else:
                self.nat_router(vpc, public, sub, name, i)
            self.cell_hosts(rec, sub)

    def cell(self, name: str, index: int) -> dict:
        return {"preset": name, "subnet": f"10.80.{10 + index}.0/24", "nat": f"nat-{name}",
                "service": f"echo-{name}", "agents": [f"agent-{name}-{k}" for k in range(self.spec.agents_per_cell)],
                "connector": f"connector-{name}"}

    def isolate(self, vpc: str, subnet: str, cidr: str, name: str) -> None:
        """The cell's network ACL: its own subnet and anything outside the VPC, never another cell
        or the public subnet's private addresses. Without it the VPC's local route lets an Agent
        reach another cell's Connector at its host address, and every A != B pair measures
        `direct_lan` instead of two NATs (the NAT forwards with public source addresses, so it
        passes). Network ACLs are stateless: the same three rules both ways."""
        ec2 = self.ec2
        acl = ec2.create_network_acl(VpcId=vpc, TagSpecifications=self.tags("network-acl", f"private-{name}"))[
            "NetworkAcl"]["NetworkAclId"]
        for egress in (False, True):
            for number, action, block in ((100, "allow", cidr), (110, "deny", VPC_CIDR), (120, "allow", "0.0.0.0/0")):
                retry(partial(ec2.create_network_acl_entry,
                    NetworkAclId=acl, RuleNumber=number, Protocol="-1", RuleAction=action, Egress=egress,
                              CidrBlock=block))

        def association() -> str:  # a subnet always has one ACL: the VPC's default until replaced
            for n in ec2.describe_network_acls(Filters=[{"Name": "association.subnet-id", "Values": [subnet]}])[
                    "NetworkAcls"]:
                for a in n["Associations"]:
                    if a["SubnetId"] == subnet:
                        return str(a["NetworkAclAssociationId"])
            raise LookupError(f"no network ACL association for {subnet} yet")

        assoc = retry(association, when=lambda e: isinstance(e, LookupError), until=60)
        ec2.replace_network_acl_association(AssociationId=assoc, NetworkAclId=acl)

    def cell_hosts(self, rec: dict, subnet_id: str) -> None:
        for host in rec["agents"]:
            self.launch(host, subnet_id, self.sgs["private"], self.user_data("agent", roles=[], host=host), kind="agent")
        self.launch(rec["connector"], subnet_id, self.sgs["private"], self.user_data(
            "connector", roles=["echo", "connector"], intermediate=self.state["intermediate_ip"],
            service=rec["service"], host=rec["connector"]), kind="connector")

    def nat_router(self, vpc: str, public: str, sub: str, name: str, i: int) -> None:
        """A NAT instance running the preset's nftables ruleset, the cell's subnet routed through it."""
        ec2, rec = self.ec2, self.state["cells"][name]
        wan_ip, lan_ip = f"10.80.0.{100 + i}", f"10.80.{10 + i}.5"
        ruleset = nat_ruleset(name, wan_ip, rec["subnet"])
        self.state["rulesets"][name] = ruleset
        boot = self.user_data("nat", roles=[], nat_ruleset=ruleset, nat_sysctls=conntrack_sysctls(preset(name)),
                              host=rec["nat"])
        nat = self.launch(rec["nat"], public, self.sgs["nat"], boot, kind="nat", ip=wan_ip,
                          extra_enis=[(sub, self.sgs["nat"], lan_ip)])
        self.public_ip(nat, rec["nat"])
        for eni in (interface(nat, 0), interface(nat, 1)):
            retry(partial(ec2.modify_network_interface_attribute,
                NetworkInterfaceId=eni, SourceDestCheck={"Value": False}))
        rt = ec2.create_route_table(VpcId=vpc, TagSpecifications=self.tags("route-table", f"private-{name}"))
        rt_id = rt["RouteTable"]["RouteTableId"]
        retry(lambda: ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0",
                                       NetworkInterfaceId=interface(nat, 1)))
        retry(lambda: ec2.associate_route_table(RouteTableId=rt_id, SubnetId=sub))

    def managed_gateway(self, vpc: str, public: str, sub: str) -> str:
        """An AWS NAT Gateway in the public subnet with `sub` routed through it (the managed cell;
        `qlab probe` classifies what the gateway does). Returns the gateway id."""
        ec2 = self.ec2
        eip = self.allocate("nat-gateway")
        ngw_id = ec2.create_nat_gateway(SubnetId=public, AllocationId=eip["AllocationId"],
                                        TagSpecifications=self.tags("natgateway", "nat-gateway"))["NatGateway"]["NatGatewayId"]
        self.say("waiting for the NAT gateway to become available")
        ec2.get_waiter("nat_gateway_available").wait(NatGatewayIds=[ngw_id], WaiterConfig=aws.waiter_config(300))
        rt_id = ec2.create_route_table(VpcId=vpc, TagSpecifications=self.tags("route-table", "private-managed"))[
            "RouteTable"]["RouteTableId"]
        retry(lambda: ec2.create_route(RouteTableId=rt_id, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=ngw_id))
        retry(lambda: ec2.associate_route_table(RouteTableId=rt_id, SubnetId=sub))
        return str(ngw_id)


def interface(inst: dict, device: int) -> str:
    """The id of an instance's network interface at `device` (RunInstances lists them)."""
    return str(next(e["NetworkInterfaceId"] for e in inst["NetworkInterfaces"]
                    if e["Attachment"]["DeviceIndex"] == device))
