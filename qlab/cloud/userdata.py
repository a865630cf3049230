"""What an instance runs at boot: a bash script (user data) and systemd units.

Two kinds of script:
- a NAT router's loads its sysctls and nftables ruleset first and installs nothing else (no Python,
  no qlab, no credentials): hosts behind it wait on its forwarding, not on a pip install;
- a host's installs the qlab wheel's slim runtime (no `lab` extra: no pandas, pyarrow, Jupyter),
  fetches its own role's credentials, and only those, from SSM Parameter Store (SecureString) with
  the instance role, which may read nothing else (iam.HOST_FILES), and starts its roles as units.

No secret is ever in user data. Every network step retries with backoff, bounded (about ten
minutes): a public instance boots before its Elastic IP is attached, and a private host before its
NAT router forwards. Every instance schedules its own shutdown at the TTL (instances are launched
with shutdown behaviour `terminate`); the Intermediate, which runs the reaper at the expiry, 20
minutes later as a backstop.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import re
import shlex
import textwrap

READY = "/var/lib/qlab/ready"  # written when the bootstrap has finished
# EC2 takes at most 16 KB of user data, counted raw, before base64 ("Work with instance user data",
# https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-add-user-data.html)
USER_DATA_LIMIT = 16 * 1024
REAPER_BACKSTOP_MINUTES = 20  # the reaper's host stays up this long after the expiry to finish the job
RETRY_TRIES = 8  # waits 5, 10, ... 320 s between tries: 635 s of waiting at most
ROLE_COMMANDS = {
    # the Intermediate listens on both private addresses, two ports each (NAT classification needs an
    # alternate IP and port), and tells clients the Elastic IPs those addresses are reached at
    "intermediate": "qlab intermediate --listen {ip1}:4433 --alt {ip1}:4434 --alt {ip2}:4433 --alt {ip2}:4434 "
                    "--advertise {ip1}={pub1} --advertise {ip2}={pub2} --certs /etc/qlab/certs "
                    "--metrics 127.0.0.1:9090",
    "connector": "qlab connector --intermediate {intermediate}:4433 --service {service} --forward 127.0.0.1:9999 "
                 "--p2p-port 4434 --certs /etc/qlab/certs --metrics 127.0.0.1:9091",
    "echo": "qlab echo --listen 127.0.0.1:9999",
}
# `retry CMD...`: bounded, doubling waits, and one clear line in the boot log (cloud-init's output,
# which `qlab cloud logs` shows) when it gives up; every dnf and aws call below goes through it. The
# wrappers return (not exit) so that the ERR trap names the script's own failing line.
RETRY = f"""retry() {{
  local n=1 w=5
  until "$@"; do
    [ $n -ge {RETRY_TRIES} ] && {{ echo "qlab boot: gave up after $n tries: $*" >&2; return 1; }}
    echo "qlab boot: try $n failed: $*" >&2; sleep $w; n=$((n + 1)) w=$((w * 2))
  done
}}
dnf() {{ retry command dnf "$@" || return 1; }}
aws() {{ retry command aws "$@" || return 1; }}
trap 'echo "qlab boot: FAILED at line $LINENO: $(sed -n "${{LINENO}}p" "$0")" >&2' ERR"""
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # what may go into a unit file unquoted
_SYSCTL = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_-]+)+$")


def render_unit(name: str, command: str) -> str:
    """A systemd unit that restarts its role (a crash or a reboot of the process must not end the
    deployment's service)."""
    return f"""[Unit]
Description=qlab {name}
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/qlab/bin/{command}
Restart=always
RestartSec=2
StartLimitIntervalSec=0
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""


def render_user_data(*, deployment: str, region: str, bucket: str, wheel_key: str, roles: list[str],
                     ttl_minutes: int, params: dict[str, str], nat_ruleset: str | None = None,
                     intermediate: str = "", service: str = "echo",
                     intermediate_addrs: tuple[tuple[str, str], tuple[str, str]] | None = None,
                     domain: str = "", acme_email: str = "", nat_sysctls: dict[str, str] | None = None,
                     reaper: tuple[str, str] | None = None, host: str = "") -> str:
    """The boot script of one instance.

    `params` maps files under /etc/qlab/certs to SSM names (exactly the files this host's role needs);
    `intermediate_addrs` is ((private, public), (private, public)) for the Intermediate's two addresses.
    With `nat_ruleset` the instance is a NAT router (no roles, no credentials): `nat_sysctls` are
    the conntrack sysctls of its preset (`qlab.nat.nftables.conntrack_sysctls(spec)`, what the
    netns lab sets for the same spec). `reaper` = (deployment id, expiry as ISO 8601 with a UTC
    offset) installs the reaper timer (the Intermediate). `host` names the instance in errors.
    ValueError when the script exceeds EC2's 16 KB.
    """
    ttl = int(ttl_minutes) + (REAPER_BACKSTOP_MINUTES if reaper else 0)
    head = ["#!/bin/bash", "# qlab instance bootstrap (generated). No secret in here: hosts fetch theirs from SSM.",
            "set -euo pipefail", f"DEPLOYMENT={shlex.quote(deployment)}",
            f'shutdown -h +{ttl} "qlab deployment $DEPLOYMENT expires"  # the TTL: instances terminate', RETRY]
    tail = ["install -d /var/lib/qlab", f"touch {READY}  # `qlab cloud run` waits for this"]
    if nat_ruleset is not None:
        if roles or params or reaper:
            raise ValueError("a NAT router runs no role, fetches no credentials and runs no reaper")
        script = _join(head + _nat_router(nat_ruleset, nat_sysctls or {}, packed=False) + tail)
        if len(script.encode()) > USER_DATA_LIMIT:
            script = _join(head + _nat_router(nat_ruleset, nat_sysctls or {}, packed=True) + tail)
    else:
        head.insert(4, f"REGION={shlex.quote(region)}")
        script = _join(head + _host(deployment, region, bucket, wheel_key, roles, params, intermediate, service,
                                    intermediate_addrs, domain, acme_email, reaper) + tail)
    size = len(script.encode())
    if size > USER_DATA_LIMIT:
        what = host or ("the NAT router" if nat_ruleset is not None else f"the host running {roles or 'no role'}")
        raise ValueError(f"user data of {what} in {deployment} is {size:,} bytes; EC2 takes at most "
                         f"{USER_DATA_LIMIT:,} (16 KB, before base64)")
    return script


def _join(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _nat_router(ruleset: str, conntrack: dict[str, str], *, packed: bool) -> list[str]:
    """Sysctls, then the ruleset, then forwarding: no packet is forwarded before the NAT exists (a
    flow's conntrack entry made without NAT would stay un-NATed). The ruleset is written as it is
    (readable in the console and in describe-instance-attribute) unless that does not fit in 16 KB;
    then gzip and base64 (symmetric_seq's, 14.6 kB, would be 6.9 kB)."""
    for key, value in conntrack.items():
        if not _SYSCTL.match(key) or not value.isdigit():
            raise ValueError(f"not a sysctl this script sets: {key}={value}")
    settings = " ".join(f"{k}={v}" for k, v in sorted(conntrack.items()))
    if packed:
        b64 = base64.b64encode(gzip.compress(ruleset.encode(), 9, mtime=0)).decode()
        write = ["base64 -d <<'QLAB_NFT' | gunzip > /etc/qlab/nat.nft", *textwrap.wrap(b64, 76), "QLAB_NFT"]
    else:
        write = ["cat > /etc/qlab/nat.nft <<'QLAB_NFT'", ruleset.rstrip("\n"), "QLAB_NFT"]
    return [
        "# the lab's conntrack timeouts for this preset, no ICMP redirects (a hairpinned flow stays NATed)",
        "modprobe nf_conntrack",
        *([f"sysctl -qw {settings}"] if settings else []),
        'for f in /proc/sys/net/ipv4/conf/*/send_redirects; do echo 0 > "$f"; done',
        "command -v nft >/dev/null || dnf install -y -q nftables >/dev/null",
        "install -d /etc/qlab",
        *write,
        "nft -f /etc/qlab/nat.nft",
        "sysctl -qw net.ipv4.ip_forward=1",
        "command -v conntrack >/dev/null || dnf install -y -q conntrack-tools >/dev/null",
    ]


def _host(deployment: str, region: str, bucket: str, wheel_key: str, roles: list[str], params: dict[str, str],
          intermediate: str, service: str, intermediate_addrs: tuple[tuple[str, str], tuple[str, str]] | None,
          domain: str, acme_email: str, reaper: tuple[str, str] | None) -> list[str]:
    q = shlex.quote
    lines = [
        # AL2023 ships the AWS CLI v2 preinstalled (package awscli-2; AL2's `awscli` is v1): Amazon
        # Linux 2023 User Guide, "Comparing AL2 and AL2023", "AWS CLI v2"
        # (https://docs.aws.amazon.com/linux/al2023/ug/awscli2.html); installed only if the AMI lacks it
        # (`type -P`: the PATH only, not the `aws` retry function)
        "type -P aws >/dev/null || dnf install -y -q awscli-2 >/dev/null",
        "dnf install -y -q python3.11 python3.11-pip >/dev/null",
        "python3.11 -m venv /opt/qlab",
        f'aws s3 cp --region "$REGION" {q(f"s3://{bucket}/{wheel_key}")} /tmp/',
        "# the slim runtime (no `lab` extra): the roles, `qlab probe` and `qlab cloud reap`",
        f'retry /opt/qlab/bin/pip install -q {q("/tmp/" + wheel_key.rsplit("/", 1)[-1])}',
    ]
    if reaper:  # right after qlab is there: a later step failing must not cost the reaper
        lines += _reaper(deployment, region, *reaper)
    if params:  # created 0600 from the first byte (umask), in a directory only root can enter
        lines += ["install -d -m 0700 /etc/qlab/certs", "umask 077"]
        for filename, name in sorted(params.items()):
            lines.append(
                f'aws ssm get-parameter --region "$REGION" --with-decryption --name {q(name)} '
                f'--query Parameter.Value --output text > {q("/etc/qlab/certs/" + filename)}')
        lines.append("umask 022")
    if domain and "intermediate" in roles:
        lines += _certbot(domain, acme_email, (intermediate_addrs or (("", ""),))[0][1])
    lines += _units(roles, intermediate, service, intermediate_addrs, domain)
    if roles:
        lines.append("systemctl daemon-reload")
        lines.append("systemctl enable --now " + " ".join(f"qlab-{r}.service" for r in roles))
    return lines


def on_calendar(expires: str) -> str:
    """An ISO 8601 time with a UTC offset as a systemd OnCalendar= value in UTC."""
    t = dt.datetime.fromisoformat(expires)
    if t.utcoffset() is None:
        raise ValueError(f"the reaper's expiry needs a UTC offset: {expires!r}")
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def reaper_command(deployment: str, region: str) -> str:
    return f"/opt/qlab/bin/qlab cloud reap {deployment} --region {region}"


def _reaper(deployment: str, region: str, reaper_deployment: str, expires: str) -> list[str]:
    """qlab-reaper.timer fires `qlab cloud reap` at the expiry (Persistent: also at the next boot if
    the instance was down then); the service retries a failed reap every minute until the
    backstop shutdown."""
    if reaper_deployment != deployment:
        raise ValueError(f"the reaper of {deployment} cannot reap {reaper_deployment}")
    if not (_SAFE.match(deployment) and _SAFE.match(region)):
        raise ValueError(f"deployment id and region must be letters, digits and '-': {deployment!r}, {region!r}")
    service = f"""[Unit]
Description=qlab reaper: what deployment {deployment} bills, deleted at its expiry
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart={reaper_command(deployment, region)}
Restart=on-failure
RestartSec=60"""
    timer = f"""[Unit]
Description=qlab reaper at the expiry of deployment {deployment}

[Timer]
OnCalendar={on_calendar(expires)}
Persistent=true

[Install]
WantedBy=timers.target"""
    return ["cat > /etc/systemd/system/qlab-reaper.service <<'QLAB_UNIT'", service, "QLAB_UNIT",
            "cat > /etc/systemd/system/qlab-reaper.timer <<'QLAB_UNIT'", timer, "QLAB_UNIT",
            "systemctl daemon-reload", "systemctl enable --now qlab-reaper.timer"]


def _certbot(domain: str, acme_email: str, first_public: str) -> list[str]:
    q = shlex.quote
    live = f"/etc/letsencrypt/live/{domain}"
    return [
        "dnf install -y -q certbot >/dev/null",
        "# Let's Encrypt (http-01 on TCP 80). Wait (up to 30 minutes) until the domain resolves to this",
        "# instance's first Elastic IP, so no validation is spent before the A record exists (Let's",
        "# Encrypt allows 5 failed validations per hostname and account per hour); then at most 4 tries",
        f"for _ in $(seq 1 180); do getent ahostsv4 {q(domain)} | grep -qwF {q(first_public)} && break; "
        "sleep 10; done",
        "for _ in $(seq 1 4); do",
        f"  certbot certonly --standalone --non-interactive --agree-tos -m {q(acme_email)} -d {q(domain)} "
        "--deploy-hook 'systemctl restart qlab-intermediate.service' && break",
        "  sleep 120",
        "done",
        f"test -s {q(live + '/fullchain.pem')}",
    ]


def _units(roles: list[str], intermediate: str, service: str,
           intermediate_addrs: tuple[tuple[str, str], tuple[str, str]] | None, domain: str) -> list[str]:
    """One systemd unit per role, written by a heredoc."""
    (ip1, pub1), (ip2, pub2) = intermediate_addrs or (("", ""), ("", ""))
    if "intermediate" in roles and not (ip1 and ip2 and pub1 and pub2):
        raise ValueError("the Intermediate needs both of its private and public addresses")
    lines = []
    for role in roles:
        cmd = ROLE_COMMANDS[role].format(intermediate=intermediate, service=service, ip1=ip1, ip2=ip2, pub1=pub1,
                                         pub2=pub2)
        if domain and role == "intermediate":
            cmd += (f" --tls-cert /etc/letsencrypt/live/{domain}/fullchain.pem"
                    f" --tls-key /etc/letsencrypt/live/{domain}/privkey.pem")
        elif domain and role == "connector":
            cmd += f" --intermediate-name {domain}"
        unit = render_unit(role, " ".join(cmd.split()))
        lines += [f"cat > /etc/systemd/system/qlab-{role}.service <<'QLAB_UNIT'", unit.rstrip("\n"), "QLAB_UNIT"]
    return lines
