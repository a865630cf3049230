"""What an instance runs at boot: a bash script (user data) and systemd units.

No secret is ever in user data: the script fetches its own role's credentials, and only those (a
NAT router none), from SSM Parameter Store (SecureString) with the instance role, which may read
nothing else (deploy.HOST_FILES); it installs the qlab wheel from the deployment's S3 bucket,
writes units with restart policies, and schedules its own shutdown at the deployment's expiry
(instances are launched with shutdown behaviour `terminate`).
"""

from __future__ import annotations

import shlex

READY = "/var/lib/qlab/ready"  # written when the bootstrap has finished
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
                     domain: str = "", acme_email: str = "") -> str:
    """The boot script of one instance. `params` maps files under /etc/qlab/certs to SSM names
    (exactly the files this host's role needs);
    `intermediate_addrs` is ((private, public), (private, public)) for the Intermediate's two addresses."""
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        "# qlab instance bootstrap (generated). No secret in here: they come from SSM Parameter Store.",
        "set -euo pipefail",
        f"DEPLOYMENT={q(deployment)}",
        f"REGION={q(region)}",
        f'shutdown -h +{int(ttl_minutes)} "qlab deployment $DEPLOYMENT expires"  # the TTL: instances terminate',
        "dnf install -y -q python3.11 python3.11-pip nftables conntrack-tools awscli >/dev/null",
        "python3.11 -m venv /opt/qlab",
        f'aws s3 cp --region "$REGION" {q(f"s3://{bucket}/{wheel_key}")} /tmp/',
        f'/opt/qlab/bin/pip install -q {q("/tmp/" + wheel_key.rsplit("/", 1)[-1])}',
    ]
    if params:  # created 0600 from the first byte (umask), in a directory only root can enter
        lines += ["install -d -m 0700 /etc/qlab/certs", "umask 077"]
        for filename, name in sorted(params.items()):
            lines.append(
                f'aws ssm get-parameter --region "$REGION" --with-decryption --name {q(name)} '
                f'--query Parameter.Value --output text > {q("/etc/qlab/certs/" + filename)}')
        lines.append("umask 022")
    if nat_ruleset is not None:
        lines += [
            "sysctl -qw net.ipv4.ip_forward=1",
            "cat > /etc/qlab/nat.nft <<'QLAB_NFT'",
            nat_ruleset.rstrip("\n"),
            "QLAB_NFT",
            "nft -f /etc/qlab/nat.nft",
        ]
    if domain and "intermediate" in roles:
        lines += _certbot(domain, acme_email, (intermediate_addrs or (("", ""),))[0][1])
    lines += _units(roles, intermediate, service, intermediate_addrs, domain)
    if roles:
        lines.append("systemctl daemon-reload")
        lines.append("systemctl enable --now " + " ".join(f"qlab-{r}.service" for r in roles))
    lines += ["install -d /var/lib/qlab", f"touch {READY}  # `qlab cloud run` waits for this"]
    return "\n".join(lines) + "\n"


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
