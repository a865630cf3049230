"""What the cloud tests share: fake AWS credentials (never a real one), waits that do not wait,
and a stand-in wheel."""

from __future__ import annotations

from pathlib import Path

FAKE_KEY_ID = "AKIAQLABTESTKEY12345"
FAKE_SECRET = "qlabFakeSecretAccessKeyDoNotUse1234567890"


def fake_aws_env(monkeypatch, *, region: str = "us-east-1", key_id: str = FAKE_KEY_ID, secret: str = FAKE_SECRET,
                 state: Path | None = None, session_token: bool = True, managed_policies: bool = False) -> None:
    """boto3 sees only these credentials and no config file; qlab's AWS retries and waiters run
    without waiting (they keep their count). `managed_policies`: moto loads AWS's managed IAM
    policies (AmazonSSMManagedInstanceCore, which `up` attaches) — about 2.5 s per test, so only
    where a role is made."""
    env = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": region,
           "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
           "MOTO_IAM_LOAD_MANAGED_POLICIES": "true" if managed_policies else "false"}
    if state is not None:
        env["QLAB_CLOUD_STATE"] = str(state)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if session_token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    else:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    from qlab.cloud import aws

    monkeypatch.setattr(aws, "SLEEP", lambda _s: None)
    monkeypatch.setattr(aws, "WAIT_DELAY", 0)


def stand_in_wheel(folder: Path) -> str:
    """A file named like qlab's wheel: moto stores it, no instance ever installs it."""
    w = folder / "qlab-0.1.0-py3-none-any.whl"
    w.write_bytes(b"not really a wheel")
    return str(w)
