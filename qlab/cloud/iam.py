"""Who may do what: each kind of host's instance role and what its policy allows, and the files
(SSM parameters) each kind receives.

Each kind of host receives the credentials of its own role and nothing else, so a compromised
Agent host cannot register a service and a NAT router holds no credential at all; its instance role
may read exactly these parameters (docs/cloud.md, "Credentials"). The Intermediate's role may also
reap the deployment at its TTL, limited by the deployment's tag (`qlab.cloud.reaper`).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

HOST_FILES: dict[str, tuple[str, ...]] = {
    "intermediate": ("ca.pem", "intermediate.pem", "intermediate.key", "secret"),
    "connector": ("ca.pem", "connector.pem", "connector.key", "connector.secret"),
    "agent": ("ca.pem", "agent.secret"),
    "nat": (),
}
# file -> stored as SecureString
PARAMS = {"secret": True, "agent.secret": True, "connector.secret": True, "ca.pem": False,
          "intermediate.pem": False, "intermediate.key": True, "connector.pem": False, "connector.key": True}
SSM_CORE = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
TRUST = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
INLINE = ("qlab-read", "qlab-reaper")


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
    if kind == "nat":  # a NAT router installs nothing from the bucket
        statements = statements[1:]
    return {"Version": "2012-10-17", "Statement": statements}


def role_names(deployment_id: str) -> list[tuple[str, str]]:
    """(role, instance profile) of every host kind, and the single pair deployments made before
    per-kind roles used, so `down` removes those too."""
    return [(f"{deployment_id}-{k}-role", f"{deployment_id}-{k}-profile") for k in HOST_FILES] + [
        (f"{deployment_id}-role", f"{deployment_id}-profile")]


def create_roles(iam: Any, kinds: tuple[str, ...], *, deployment: str, region: str, account: str, bucket: str,
                 tags: list[dict], reaper: dict | None) -> None:
    """One instance role and profile per kind of host; the Intermediate's also carries `reaper`."""
    for kind in kinds:
        role, profile = f"{deployment}-{kind}-role", f"{deployment}-{kind}-profile"
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=TRUST, Tags=tags)
        iam.put_role_policy(RoleName=role, PolicyName="qlab-read", PolicyDocument=json.dumps(host_policy(
            kind, deployment=deployment, region=region, account=account, bucket=bucket)))
        if kind == "intermediate" and reaper is not None:
            iam.put_role_policy(RoleName=role, PolicyName="qlab-reaper", PolicyDocument=json.dumps(reaper))
        iam.attach_role_policy(RoleName=role, PolicyArn=SSM_CORE)
        iam.create_instance_profile(InstanceProfileName=profile, Tags=tags)
        iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)


def delete_roles(iam: Any, deployment_id: str) -> list[str]:
    """Every role and profile of the deployment, each step on its own; returns the errors."""
    errors = []
    for role, profile in role_names(deployment_id):
        steps: list[tuple[Any, dict]] = [
            (iam.remove_role_from_instance_profile, {"InstanceProfileName": profile, "RoleName": role}),
            (iam.delete_instance_profile, {"InstanceProfileName": profile}),
            (iam.detach_role_policy, {"RoleName": role, "PolicyArn": SSM_CORE})]
        steps += [(iam.delete_role_policy, {"RoleName": role, "PolicyName": p}) for p in INLINE]
        steps.append((iam.delete_role, {"RoleName": role}))
        for call, kw in steps:
            with contextlib.suppress(iam.exceptions.NoSuchEntityException):
                try:
                    call(**kw)
                except iam.exceptions.NoSuchEntityException:
                    raise
                except Exception as exc:
                    errors.append(f"{call.__name__} {kw}: {exc}")
    return errors
