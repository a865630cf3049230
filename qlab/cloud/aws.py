"""The AWS plumbing every `qlab cloud` step shares: clients for one region, the one retry for AWS's
eventual consistency, and one clear line for every error AWS or boto3 can raise.

Throttling and 5xx answers are botocore's job (its `standard` retry mode, configured here); what
botocore does not retry is AWS being eventually consistent — a resource just created is not yet
visible to the next call, a dependency is not yet released — and that is `retry`'s job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from qlab.roles.control import Backoff

T = TypeVar("T")

# Error codes that mean "not yet", never "no" (EC2 API reference, "Eventual consistency in the
# Amazon EC2 API": a resource created by one call may be reported missing by the next for a while;
# IAM, "Changes that I make are not always immediately visible": a new instance profile is refused
# by RunInstances as an invalid name for some seconds)
NOT_YET = {
    "InvalidInstanceID.NotFound", "InvalidNetworkInterfaceID.NotFound", "InvalidAllocationID.NotFound",
    "InvalidSubnetID.NotFound", "InvalidGroup.NotFound", "InvalidRouteTableID.NotFound",
    "InvalidVpcID.NotFound", "InvalidNatGatewayID.NotFound", "IncorrectInstanceState", "DependencyViolation",
    "InvalidIPAddress.InUse",
}


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def not_yet(exc: BaseException) -> bool:
    """AWS's answer to a call that will succeed once earlier changes have propagated."""
    code = error_code(exc)
    if code in NOT_YET:
        return True
    # a just-created instance profile (IAM is eventually consistent across regions)
    return code == "InvalidParameterValue" and "instance profile" in str(exc).lower()


def retry(call: Callable[[], T], *, until: float = 120.0, when: Callable[[BaseException], bool] = not_yet,
          sleep: Callable[[float], None] | None = None) -> T:
    """`call()` again, after capped exponential delays (roles.control.Backoff: 1 s doubling to 15 s),
    while it fails with an error that `when` calls temporary, until the delays add up to `until`
    seconds (counted from the delays, so a test that skips the sleeping still gets the same tries)."""
    pause = sleep or SLEEP
    backoff = Backoff(1.0, 15.0)
    waited = 0.0
    while True:
        try:
            return call()
        except Exception as exc:
            delay = backoff.next()
            waited += delay
            if not when(exc) or waited > until:
                raise
            pause(delay)


SLEEP: Callable[[float], None] = time.sleep  # tests replace it to run retries without waiting
WAIT_DELAY = 5  # seconds between a waiter's polls (tests against moto set 0)


def waiter_config(max_wait: float) -> dict:
    """A waiter's polling: every WAIT_DELAY seconds, for about `max_wait` seconds in all."""
    return {"Delay": WAIT_DELAY, "MaxAttempts": max(1, int(max_wait / max(WAIT_DELAY, 1)))}


class Cloud:
    """boto3 clients for one region (and an optional endpoint, for moto)."""

    def __init__(self, region: str, *, profile: str | None = None, endpoint_url: str | None = None) -> None:
        import boto3

        self.session = boto3.Session(botocore_session=_botocore_session(), profile_name=profile,
                                     region_name=region or None)
        self.region = region or self.session.region_name or ""
        if not self.region:
            raise ValueError("no AWS region: pass --region or set one in your AWS profile or AWS_REGION")
        self.endpoint_url = endpoint_url
        self._clients: dict[str, Any] = {}
        self._account = ""

    def client(self, name: str) -> Any:
        from botocore.config import Config

        if name not in self._clients:
            # Service Quotas is read once by `plan`, which falls back to AWS's defaults: no long retries
            attempts = 2 if name == "service-quotas" else 8
            self._clients[name] = self.session.client(
                name, region_name=self.region, endpoint_url=self.endpoint_url,
                config=Config(retries={"mode": "standard", "max_attempts": attempts}))
        return self._clients[name]

    def account(self) -> str:
        if not self._account:
            self._account = str(self.client("sts").get_caller_identity()["Account"])
        return self._account


_LOADER: Any = None


def _botocore_session() -> Any:
    """A new botocore session (its own credentials and config) sharing one loader of AWS's service
    models: each session would otherwise parse the EC2 model (megabytes of JSON) again."""
    import botocore.session

    global _LOADER
    session = botocore.session.get_session()
    if _LOADER is None:
        _LOADER = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _LOADER)
    return session


def default_region(profile: str | None = None) -> str:
    """The region boto3's chain gives (AWS_REGION, AWS_DEFAULT_REGION, the profile), or ""."""
    import boto3

    return boto3.Session(profile_name=profile).region_name or ""


def brief(exc: BaseException) -> str:
    """An error as its AWS code and message (or its type and text), on one line."""
    code = error_code(exc)
    if code:
        return f"{code}: {getattr(exc, 'response', {}).get('Error', {}).get('Message', '')}".replace("\n", " ")
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


def explain(exc: BaseException) -> str:
    """One line for an error of a cloud step: what AWS or boto3 said, without a traceback."""
    if error_code(exc):
        return f"AWS refused {getattr(exc, 'operation_name', '')}: {brief(exc)}"
    name = type(exc).__name__
    hints = {
        "NoCredentialsError": "no AWS credentials found (boto3's chain: environment, profile, SSO)",
        "NoRegionError": "no AWS region: pass --region or set one in your AWS profile",
        "EndpointConnectionError": f"cannot reach the AWS endpoint: {exc}",
        "ProfileNotFound": str(exc),
        "WaiterError": f"gave up waiting: {exc}",
    }
    return hints.get(name, f"{exc}" if isinstance(exc, ValueError | FileNotFoundError) else f"{name}: {exc}")
