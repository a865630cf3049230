"""moto, plus the refusals real AWS makes and moto does not: the strict AWS layer of the cloud tests.

`strict_aws()` enters `moto.mock_aws()` and routes every boto3 call of this process through
`StrictAWS.call`: it records `(service, operation)`, refuses what a rule below says AWS refuses
(raising the `ClientError` AWS would send, with AWS's error code), serves what moto lacks (EC2's
Service Quotas) and watches responses (which instances the code has seen `running`).

It patches `botocore.client.BaseClient._make_api_call` (restored on exit) rather than registering
botocore `before-call` handlers: handlers live on one session's event emitter, and the code under test
makes its own sessions and clients; the patched method sees every client of every session, with the
parameters as the caller passed them (UserData before boto3 base64-encodes it) and the parsed answer.

No real AWS is reachable here: each rule encodes what the AWS documentation page it names says.
`policy_allows` evaluates IAM policy documents (the subset qlab writes) and `role_documents` collects
a role's documents, so a test can act as a host (`StrictAWS.as_role`) and be refused what the host
role does not allow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import botocore.client

USER_DATA_LIMIT = 16 * 1024
DEFAULT_EIP_QUOTA = 5
EIP_QUOTA_CODE, VCPU_QUOTA_CODE = "L-0263D0A3", "L-1216C47A"
ACCOUNT = "123456789012"  # moto's default account (moto.core.DEFAULT_ACCOUNT_ID)


@dataclass
class Call:
    """One boto3 call as the strict layer sees it."""
    service: str
    operation: str
    params: dict
    region: str
    client: Any


@dataclass
class StrictAWS:
    """What `strict_aws()` yields: the calls made, and the settings of its rules.

    `eip_quota` / `vcpu_quota`: the account's applied quotas (Service Quotas answers them, and
    AllocateAddress is refused past `eip_quota`). `profile_propagation` / `describe_lag`: the two
    eventual-consistency rules, on by default."""
    calls: list[tuple[str, str]] = field(default_factory=list)
    eip_quota: int = DEFAULT_EIP_QUOTA
    vcpu_quota: int = 32  # a stand-in for an applied quota: AWS sets a new account's by its history
    profile_propagation: bool = True
    describe_lag: bool = True
    pending: set[str] = field(default_factory=set)  # launched, not yet seen running by the code
    fresh_profiles: set[str] = field(default_factory=set)  # created, no RunInstances has named them yet
    just_launched: set[str] = field(default_factory=set)  # the last RunInstances' ids, not yet described
    acting: tuple[str, list[dict]] | None = None  # (role name, its policy documents) while as_role
    last: tuple[str, str] | None = None
    quiet_depth: int = 0

    def actions(self) -> set[str]:
        """The IAM actions of the calls made (`iam_action` of each)."""
        return {iam_action(s, o) for s, o in self.calls}

    @contextlib.contextmanager
    def as_role(self, iam_client: Any, role_name: str) -> Iterator[None]:
        """Make the S3 and SSM calls inside the block as a host with `role_name`'s instance role:
        each is evaluated against the role's policy documents and refused like AWS refuses it."""
        with self.quiet():
            docs = role_documents(iam_client, role_name)
        self.acting = (role_name, docs)
        try:
            yield
        finally:
            self.acting = None

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Calls inside go straight to moto: neither recorded nor checked (the layer's own look-ups)."""
        self.quiet_depth += 1
        try:
            yield
        finally:
            self.quiet_depth -= 1

    def call(self, original: Callable[..., Any], c: Call) -> Any:
        previous, self.last = self.last, (c.service, c.operation)
        self.calls.append((c.service, c.operation))
        served = serve_quota(self, c)
        if served is not None:
            return served
        for rule in RULES:
            refusal = rule(self, c, previous)
            if refusal is not None:
                code, message = refusal
                raise c.client.exceptions.from_code(code)(
                    {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                    c.operation)
        response = original(c.client, c.operation, c.params)
        observe(self, c, response)
        return response


Refusal = tuple[str, str] | None


@contextlib.contextmanager
def strict_aws() -> Iterator[StrictAWS]:
    """moto with the rules below, for every boto3 client of this process while active."""
    from moto import mock_aws

    strict = StrictAWS()
    original = botocore.client.BaseClient._make_api_call

    def make_api_call(client: Any, operation_name: str, api_params: dict) -> Any:
        if strict.quiet_depth:
            return original(client, operation_name, api_params)
        c = Call(client.meta.service_model.service_name, operation_name, api_params, client.meta.region_name, client)
        return strict.call(original, c)

    # moto rebuilds every backend when the mock ends; AWS's managed IAM policies (~2.5 s to load)
    # are not needed again then
    key = "MOTO_IAM_LOAD_MANAGED_POLICIES"
    saved = os.environ.get(key)
    try:
        with mock_aws(), mock.patch.object(botocore.client.BaseClient, "_make_api_call", make_api_call):
            try:
                yield strict
            finally:
                os.environ[key] = "false"
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


# --- the rules: each takes the call (and the call before it) and returns (error code, message) or None


def ec2_backend(region: str) -> Any:
    from moto.ec2.models import ec2_backends

    return ec2_backends[ACCOUNT][region]


def _lookup(get: Callable[[str], Any], key: str) -> Any:
    """A moto object by id, or None when moto does not know it (moto then answers the call itself)."""
    try:
        return get(key)
    except Exception:
        return None


def eip_by_instance_on_multi_eni(_s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # AssociateAddress names an instance only if it has exactly one network interface; with more,
    # the interface must be named (EC2 API Reference, "AssociateAddress", InstanceId)
    if (c.service, c.operation) != ("ec2", "AssociateAddress") or "InstanceId" not in c.params:
        return None
    inst = _lookup(ec2_backend(c.region).get_instance, c.params["InstanceId"])
    if inst is None or len(inst.nics) <= 1:
        return None
    return ("InvalidInstanceID", f"There are multiple interfaces attached to instance '{inst.id}'. "
            "Please specify an interface ID for the operation instead.")


def association_to_pending(s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # an address goes only to a running instance: RunInstances answers while it is still pending, and
    # code learns it runs from DescribeInstances (the instance_running waiter) (EC2 User Guide,
    # "Amazon EC2 instance state changes": pending, then running; Elastic IP addresses, "Associate")
    if (c.service, c.operation) != ("ec2", "AssociateAddress"):
        return None
    instance_id = c.params.get("InstanceId")
    if not instance_id and "NetworkInterfaceId" in c.params:
        eni = _lookup(ec2_backend(c.region).get_network_interface, c.params["NetworkInterfaceId"])
        instance_id = eni.instance.id if eni is not None and eni.instance is not None else None
    if instance_id in s.pending:
        return "IncorrectInstanceState", f"The pending instance '{instance_id}' is not in a valid state for this operation."
    return None


def interfaces_in_two_zones(_s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # every network interface of an instance is in the instance's Availability Zone: subnets of two
    # zones in one RunInstances cannot be (EC2 User Guide, "Elastic network interfaces": the interface
    # and the instance must reside in the same Availability Zone). Judged by the subnets' actual
    # zones: a subnet created without AvailabilityZone got one that moto (and AWS) picked
    if (c.service, c.operation) != ("ec2", "RunInstances"):
        return None
    ec2 = ec2_backend(c.region)
    zones = {}
    for nic in c.params.get("NetworkInterfaces", []):
        if "SubnetId" in nic:
            sn = _lookup(ec2.get_subnet, nic["SubnetId"])
        else:
            eni = _lookup(ec2.get_network_interface, nic.get("NetworkInterfaceId", ""))
            sn = eni.subnet if eni is not None else None
        if sn is not None:
            zones[sn.id] = sn.availability_zone
    if len(set(zones.values())) > 1:
        return ("InvalidParameterCombination", "The network interfaces of an instance must be in one Availability "
                f"Zone; these subnets are in several: {zones}")
    return None


def address_quota(s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # a region holds at most the account's Elastic IP quota, 5 unless raised (EC2 User Guide,
    # "Elastic IP address quota"; Service Quotas code L-0263D0A3)
    if (c.service, c.operation) != ("ec2", "AllocateAddress"):
        return None
    if len(ec2_backend(c.region).addresses) >= s.eip_quota:
        return "AddressLimitExceeded", "The maximum number of addresses has been reached."
    return None


def user_data_size(_s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # user data is at most 16 KB raw, before base64 (EC2 User Guide, "Work with instance user data");
    # boto3 encodes it after this layer sees it
    if (c.service, c.operation) != ("ec2", "RunInstances") or "UserData" not in c.params:
        return None
    raw = c.params["UserData"]
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > USER_DATA_LIMIT:
        return "InvalidParameterValue", f"User data is limited to {USER_DATA_LIMIT} bytes ({size} given)."
    return None


def profile_not_yet_known(s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # IAM is eventually consistent: an instance profile created a moment ago is unknown to EC2 for some
    # seconds, so the first RunInstances naming it fails (IAM User Guide, "Troubleshoot IAM roles" /
    # "Changes that I make are not always immediately visible")
    if not s.profile_propagation or (c.service, c.operation) != ("ec2", "RunInstances"):
        return None
    spec = c.params.get("IamInstanceProfile") or {}
    name = spec.get("Name") or spec.get("Arn", "").rsplit("/", 1)[-1]
    if name in s.fresh_profiles:
        s.fresh_profiles.discard(name)
        return ("InvalidParameterValue",
                f"Value ({name}) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name")
    return None


def describe_right_after_launch(s: StrictAWS, c: Call, prev: tuple[str, str] | None) -> Refusal:
    # the ids RunInstances returned may be unknown to the very next call (EC2 Developer Guide,
    # "Eventual consistency in the Amazon EC2 API": InvalidInstanceID.NotFound after RunInstances)
    if not s.describe_lag or (c.service, c.operation) != ("ec2", "DescribeInstances"):
        return None
    named = set(c.params.get("InstanceIds", [])) & s.just_launched
    if prev != ("ec2", "RunInstances") or not named:
        return None
    s.just_launched.clear()
    return "InvalidInstanceID.NotFound", f"The instance ID '{sorted(named)[0]}' does not exist"


def host_role_refuses(s: StrictAWS, c: Call, _prev: object) -> Refusal:
    # inside as_role: an S3 or SSM call its role's policies do not allow is refused (IAM User Guide,
    # "Policy evaluation logic": allowed only if some statement allows it and none denies it)
    if s.acting is None or c.service not in ("s3", "ssm"):
        return None
    role, docs = s.acting
    action = iam_action(c.service, c.operation)
    for resource in request_resources(c):
        if not policy_allows(docs, action, resource):
            if c.service == "s3":
                return "AccessDenied", "Access Denied"
            return ("AccessDeniedException", f"User: arn:aws:sts::{ACCOUNT}:assumed-role/{role}/i-0 is not "
                    f"authorized to perform: {action} on resource: {resource} because no identity-based policy "
                    f"allows the {action} action")
    return None


RULES: list[Callable[[StrictAWS, Call, Any], Refusal]] = [
    eip_by_instance_on_multi_eni, association_to_pending, interfaces_in_two_zones, address_quota,
    user_data_size, profile_not_yet_known, describe_right_after_launch, host_role_refuses]


def observe(s: StrictAWS, c: Call, response: dict) -> None:
    """What the code has now seen: instances it launched (pending), instances a DescribeInstances
    answer showed running, instance profiles it created."""
    if (c.service, c.operation) == ("ec2", "RunInstances"):
        ids = {i["InstanceId"] for i in response.get("Instances", [])}
        s.pending |= ids
        s.just_launched = ids
    elif (c.service, c.operation) == ("ec2", "DescribeInstances"):
        for r in response.get("Reservations", []):
            for i in r.get("Instances", []):
                if i["State"]["Name"] == "running":
                    s.pending.discard(i["InstanceId"])
    elif (c.service, c.operation) == ("iam", "CreateInstanceProfile"):
        s.fresh_profiles.add(c.params["InstanceProfileName"])


def serve_quota(s: StrictAWS, c: Call) -> dict | None:
    """Service Quotas' answer for EC2's Elastic IP and standard vCPU quotas: moto 5.2 knows no EC2
    quota (GetServiceQuota: NoSuchResourceException; GetAWSDefaultServiceQuota: not implemented)."""
    if c.service != "service-quotas" or c.params.get("ServiceCode") != "ec2":
        return None
    code = c.params.get("QuotaCode")
    if c.operation == "GetServiceQuota":
        value = {EIP_QUOTA_CODE: s.eip_quota, VCPU_QUOTA_CODE: s.vcpu_quota}.get(code or "")
    elif c.operation == "GetAWSDefaultServiceQuota":
        value = {EIP_QUOTA_CODE: DEFAULT_EIP_QUOTA, VCPU_QUOTA_CODE: s.vcpu_quota}.get(code or "")
    else:
        return None
    if value is None:
        return None
    return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": float(value), "Unit": "None",
                      "QuotaArn": f"arn:aws:servicequotas:{c.region}:{ACCOUNT}:ec2/{code}",
                      "Adjustable": True, "GlobalQuota": False},
            "ResponseMetadata": {"HTTPStatusCode": 200, "RetryAttempts": 0}}


# --- IAM: action names, resources of a request, policy evaluation


# S3 operations whose IAM action has another name (Amazon S3 User Guide, "Amazon S3 API operations
# and their required permissions"); every other operation's action is its own name
S3_ACTIONS = {"ListObjectsV2": "ListBucket", "ListObjects": "ListBucket", "HeadBucket": "ListBucket",
              "HeadObject": "GetObject", "ListBuckets": "ListAllMyBuckets", "CreateMultipartUpload": "PutObject",
              "UploadPart": "PutObject", "CompleteMultipartUpload": "PutObject", "DeleteObjects": "DeleteObject"}
PREFIXES = {"service-quotas": "servicequotas"}


def iam_action(service: str, operation: str) -> str:
    """The IAM action a call needs, e.g. ("s3", "ListObjectsV2") -> "s3:ListBucket"."""
    if service == "s3":
        operation = S3_ACTIONS.get(operation, operation)
    return f"{PREFIXES.get(service, service)}:{operation}"


def request_resources(c: Call) -> list[str]:
    """The ARNs an S3 or SSM call acts on ("*" where the call names none)."""
    p = c.params
    if c.service == "s3":
        if "Bucket" not in p:
            return ["*"]
        return [f"arn:aws:s3:::{p['Bucket']}" + (f"/{p['Key']}" if "Key" in p else "")]
    names = p.get("Names") or ([p["Name"]] if "Name" in p else [p["Path"].rstrip("/")] if "Path" in p else [])
    return [f"arn:aws:ssm:{c.region}:{ACCOUNT}:parameter{n if n.startswith('/') else '/' + n}" for n in names] or ["*"]


def role_documents(iam_client: Any, role_name: str) -> list[dict]:
    """Every policy document of a role: its inline policies and its attached managed policies'
    default versions."""
    docs: list[Any] = [iam_client.get_role_policy(RoleName=role_name, PolicyName=n)["PolicyDocument"]
                       for n in iam_client.list_role_policies(RoleName=role_name)["PolicyNames"]]
    for a in iam_client.list_attached_role_policies(RoleName=role_name)["AttachedPolicies"]:
        version = iam_client.get_policy(PolicyArn=a["PolicyArn"])["Policy"]["DefaultVersionId"]
        docs.append(iam_client.get_policy_version(PolicyArn=a["PolicyArn"], VersionId=version)
                    ["PolicyVersion"]["Document"])
    return [json.loads(d) if isinstance(d, str) else d for d in docs]


def policy_allows(documents: list[dict], action: str, resource: str, context: dict[str, str] | None = None) -> bool:
    """IAM's decision for one action on one resource under identity policies (IAM User Guide,
    "Policy evaluation logic"): allowed when a statement allows it and no statement denies it (an
    explicit Deny wins). Supports Action/NotAction, Resource/NotResource with * and ? wildcards
    (actions case-insensitive) and Condition with the String operators and ArnEquals/ArnLike; `context` holds the
    request's condition keys (e.g. "aws:ResourceTag/qlab:deployment"). Anything else raises
    ValueError rather than guessing."""
    statements = [st for d in documents for st in _statements(d)]
    applying = [st for st in statements if _applies(st, action, resource, context or {})]
    if any(st["Effect"] == "Deny" for st in applying):
        return False
    return any(st["Effect"] == "Allow" for st in applying)


def _statements(document: dict | str) -> list[dict]:
    doc = json.loads(document) if isinstance(document, str) else document
    st = doc["Statement"]
    return [st] if isinstance(st, dict) else list(st)


def _listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _wildcard(pattern: str, value: str, *, fold: bool) -> bool:
    """IAM's * (any run of characters) and ? (one character); nothing else is special."""
    if "${" in pattern:
        raise ValueError(f"policy variables are not supported here: {pattern!r}")
    regex = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE if fold else 0) is not None


def _names(st: dict, element: str, value: str, *, fold: bool) -> bool:
    """Whether `value` is named by the statement's `element` (e.g. Action) or left out by its
    Not-element (NotAction)."""
    for key, named in ((element, True), (f"Not{element}", False)):
        if key in st:
            return any(_wildcard(p, value, fold=fold) for p in _listed(st[key])) == named
    raise ValueError(f"statement without {element} or Not{element}: {st}")


def _applies(st: dict, action: str, resource: str, context: dict[str, str]) -> bool:
    if st.get("Effect") not in ("Allow", "Deny"):
        raise ValueError(f"statement without Effect Allow or Deny: {st}")
    acted = _names(st, "Action", action, fold=True)  # actions are case-insensitive, resources are not
    on = _names(st, "Resource", resource, fold=False)
    return acted and on and all(_condition(op, key, _listed(values), context)
                                for op, keys in st.get("Condition", {}).items() for key, values in keys.items())


def _condition(operator: str, key: str, expected: list[str], context: dict[str, str]) -> bool:
    # condition key names are case-insensitive; a key the request lacks makes a positive operator
    # false and a negated one true (IAM User Guide, "IAM JSON policy elements: Condition operators")
    found = {k.lower(): v for k, v in context.items()}.get(key.lower())
    match = {"StringEquals": lambda v: v in expected,
             "StringNotEquals": lambda v: v not in expected,
             "StringLike": lambda v: any(_wildcard(e, v, fold=False) for e in expected),
             "StringNotLike": lambda v: not any(_wildcard(e, v, fold=False) for e in expected),
             "ArnEquals": lambda v: v in expected,
             "ArnLike": lambda v: any(_wildcard(e, v, fold=False) for e in expected)}.get(operator)
    if match is None:
        raise ValueError(f"condition operator {operator!r} is not supported by this evaluator")
    if found is None:
        return "Not" in operator
    return bool(match(found))
