"""The qlab CA: a deployment's own trust root, its leaf certificates and its shared secret.

`qlab certs init DIR` writes `ca.pem` (public, every client pins it), `ca.key`, a leaf for the
Intermediate (`intermediate.pem/.key`, name `intermediate.qlab`) and one for the Connector's P2P
listener (`connector.pem/.key`, name `connector.qlab`), `secret` (the deployment's root secret: only
the Intermediate holds it) and the two role secrets derived from it, `agent.secret` and
`connector.secret` (`wire.role_secret`; an Agent's cannot register a service). Keys and secrets are
0600, created exclusively (nothing already lying in DIR is reused or followed). Keys are EC P-256;
leaves are CA-signed with CA:FALSE and serverAuth, which both aioquic and qh3 accept. Clients verify
against the CA: there is no "verify off" switch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import ipaddress
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qlab import wire

INTERMEDIATE_NAME = "intermediate.qlab"
CONNECTOR_NAME = "connector.qlab"
LEAVES = {"intermediate": INTERMEDIATE_NAME, "connector": CONNECTOR_NAME}
VALID_DAYS = 825


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qlab"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(cn: str = "qlab CA") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, dns_name: str, extra_ips: tuple[str, ...] = ()
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(dns_name), x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1", *extra_ips)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


ROLE_SECRETS = {"agent.secret": wire.Role.AGENT, "connector.secret": wire.Role.CONNECTOR}


def init_dir(directory: str | os.PathLike, *, force: bool = False) -> Path:
    """Create a CA, both leaves, the root secret and both role secrets in `directory`. Refuses to
    overwrite unless `force`. All or nothing: if any file cannot be written, none is replaced."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    existing = [p.name for p in d.iterdir() if p.name in {"ca.pem", "ca.key", "secret", *ROLE_SECRETS}]
    if existing and not force:
        raise FileExistsError(f"{d} already holds a qlab CA ({', '.join(sorted(existing))}); use --force to replace it")
    ca_cert, ca_key = make_ca()
    files = {"ca.pem": (ca_cert.public_bytes(serialization.Encoding.PEM), 0o644), "ca.key": (_pem_key(ca_key), 0o600)}
    for stem, dns in LEAVES.items():
        cert, key = make_leaf(ca_cert, ca_key, dns)
        files[f"{stem}.pem"] = (cert.public_bytes(serialization.Encoding.PEM), 0o644)
        files[f"{stem}.key"] = (_pem_key(key), 0o600)
    root = secrets.token_hex(32).encode()
    files["secret"] = (root + b"\n", 0o600)
    for name, role in ROLE_SECRETS.items():
        files[name] = (wire.role_secret(root, role) + b"\n", 0o600)
    _write(d, files)
    return d


def _write(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write each file {name: (data, mode)} into `directory` with exactly its mode, atomically.
    Each goes first to a fresh temp name that mkstemp creates with O_EXCL|O_NOFOLLOW (so a stale
    file, whatever its mode, or a symlink planted there is never reused or followed), is chmod-ed
    and fsync-ed, and only when every temp file is complete are they renamed over the old files."""
    staged: list[tuple[str, Path]] = []
    try:
        for name, (data, mode) in files.items():
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
            staged.append((tmp, directory / name))
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        while staged:
            os.replace(*staged[0])  # replaces a symlink at the final path itself, never its target
            staged.pop(0)
    finally:  # nothing half-written is left behind
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)  # the renames survive a crash
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class Credentials:
    """What a role loads from a certs directory."""

    directory: Path
    ca_pem: bytes
    secret: bytes  # the deployment's root secret; b"" on a host that holds only role secrets
    # Let's Encrypt (docs/cloud.md): the Intermediate serves a publicly trusted certificate for a DNS
    # name; its clients then verify that name against the public roots (certifi, aioquic's default).
    # The qlab CA still signs the Connector's certificate for direct paths.
    intermediate_name: str = ""
    intermediate_tls: tuple[str, str] | None = None  # (certificate chain, key) files
    # what each client role proves in its HELLO: derived from the root, or read from `<role>.secret`
    role_secrets: dict[wire.Role, bytes] = dataclasses.field(default_factory=dict, repr=False)

    def with_tls(self, *, intermediate_name: str = "", cert: str = "", key: str = "") -> Credentials:
        """These credentials with the Let's Encrypt option (a public name, or a served chain and key)."""
        if bool(cert) != bool(key):
            raise ValueError("--tls-cert and --tls-key go together")
        for f in (cert, key):
            if f and not Path(f).is_file():
                raise FileNotFoundError(f"{f}: no such certificate or key file")
        return dataclasses.replace(self, intermediate_name=intermediate_name or self.intermediate_name,
                                   intermediate_tls=(cert, key) if cert else self.intermediate_tls)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Credentials:
        """A certs directory with the root `secret` (the Intermediate's, or a lab's: every role
        secret is derived from it), or with only `agent.secret` and/or `connector.secret` (a host
        of that role)."""
        d = Path(directory)
        held = [n for n in ("secret", *ROLE_SECRETS) if (d / n).is_file()]
        missing = ([] if (d / "ca.pem").is_file() else ["ca.pem"]) + ([] if held else ["secret"])
        if missing:
            raise FileNotFoundError(f"{d}: missing {', '.join(missing)} (create it with `qlab certs init {d}`)")
        read = {n: _read_secret(d / n) for n in held}
        root = read.get("secret", b"")
        if root:
            roles = {role: wire.role_secret(root, role) for role in ROLE_SECRETS.values()}
        else:
            roles = {role: read[n] for n, role in ROLE_SECRETS.items() if n in read}
        return cls(d, (d / "ca.pem").read_bytes(), root, role_secrets=roles)

    def secret_for(self, role: wire.Role) -> bytes:
        """The secret a client of `role` proves in its HELLO. PROBE (QAD and classification) uses
        whichever role secret this host holds."""
        order = (wire.Role.AGENT, wire.Role.CONNECTOR) if role == wire.Role.PROBE else (role,)
        for r in order:
            if r in self.role_secrets:
                return self.role_secrets[r]
        raise PermissionError(f"{self.directory}: no {role.name.lower()} secret here (this host holds "
                              f"{', '.join(r.name.lower() for r in self.role_secrets) or 'none'})")

    def server_config(self, leaf: str, **kw) -> QuicConfiguration:
        """A server configuration with the `leaf` certificate (intermediate or connector)."""
        cfg = quic_config(is_client=False, **kw)
        if leaf == "intermediate" and self.intermediate_tls:
            _load_cert_chain(cfg, *map(Path, self.intermediate_tls))
        else:
            _load_cert_chain(cfg, self.directory / f"{leaf}.pem", self.directory / f"{leaf}.key")
        return cfg

    def client_config(self, server_name: str, **kw) -> QuicConfiguration:
        cfg = quic_config(is_client=True, **kw)
        if server_name == INTERMEDIATE_NAME and self.intermediate_name:
            cfg.server_name = self.intermediate_name  # no CA loaded: aioquic verifies against certifi's roots
        else:
            cfg.server_name = server_name
            cfg.load_verify_locations(cadata=self.ca_pem)
        return cfg


# Parsed certificate chains and keys, by their files' identity: a process that builds many server
# configurations (the simulator's trials: two per trial) parses each pair once. A file replaced on
# disk has another (inode, mtime, size) and is parsed again; the cached objects are immutable.
_CHAINS: dict[tuple[tuple[str, int, int, int, int], ...], tuple[Any, list[Any], Any]] = {}
CHAIN_CACHE = 64


def _load_cert_chain(cfg: QuicConfiguration, certfile: Path, keyfile: Path) -> None:
    """`cfg.load_cert_chain(certfile, keyfile)`, from the cache when the files are unchanged."""
    key = tuple((str(p), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) for p in (certfile, keyfile)
                for st in (p.stat(),))
    cached = _CHAINS.get(key)
    if cached is None:
        if len(_CHAINS) >= CHAIN_CACHE:  # many certs dirs in one process (a test suite): start over
            _CHAINS.clear()
        cfg.load_cert_chain(certfile, keyfile)
        _CHAINS[key] = (cfg.certificate, list(cfg.certificate_chain), cfg.private_key)
        return
    cfg.certificate, chain, cfg.private_key = cached
    cfg.certificate_chain = list(chain)


def _read_secret(path: Path) -> bytes:
    secret = path.read_bytes().strip()
    if len(secret) < 16:
        raise ValueError(f"{path}: the secret is too short (need >= 16 bytes)")
    return secret


def quic_config(*, is_client: bool, idle_timeout: float = 30.0) -> QuicConfiguration:
    """qlab's QUIC settings. A DATAGRAM frame never exceeds the packet carrying it, so the largest
    we accept is MAX_DATAGRAM_SIZE (aioquic refuses larger ones, PROTOCOL_VIOLATION); receive windows
    are the endpoint's (they slide, see quic_internals.BoundedQuicConnection)."""
    from qlab.endpoint import CID_LENGTH, CONNECTION_WINDOW, MAX_DATAGRAM_SIZE, STREAM_WINDOW

    cfg = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[wire.ALPN],
        max_datagram_frame_size=MAX_DATAGRAM_SIZE,
        max_datagram_size=MAX_DATAGRAM_SIZE,
        max_data=CONNECTION_WINDOW,
        max_stream_data=STREAM_WINDOW,
        idle_timeout=idle_timeout,
        connection_id_length=CID_LENGTH,
    )
    return cfg


def new_session_key() -> bytes:
    return secrets.token_bytes(wire.KEY_LEN)


def cache_dir() -> Path:
    """qlab's folder in the user's cache directory."""
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))) / "qlab"


def copy_dir(directory: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """A copy of a certificate folder's files (from another machine) in `directory`, private to
    this user: keys and secrets 0600, certificates 0644, each written atomically."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write(d, {name: (data, 0o644 if name.endswith(".pem") else 0o600) for name, data in files.items()})
    return d


def default_certs() -> str:
    """The lab's own CA for trials (created once under the user's cache directory)."""
    d = str(cache_dir() / "lab-certs")
    if not os.path.exists(os.path.join(d, "secret")):
        with contextlib.suppress(FileExistsError):
            init_dir(d)
    return d
