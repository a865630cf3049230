"""`qlab certs init`: what it writes, with which modes, and that nothing lying in the directory
(stale temp files of any mode, planted symlinks) changes that or gets written through."""

from __future__ import annotations

import os
import stat

import pytest

SECRET_FILES = ("ca.key", "intermediate.key", "connector.key", "secret", "agent.secret", "connector.secret")
PUBLIC_FILES = ("ca.pem", "intermediate.pem", "connector.pem")


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_init_writes_the_root_and_both_role_secrets(tmp_path):
    from qlab import wire
    from qlab.certs import init_dir

    d = init_dir(tmp_path / "c")
    assert sorted(p.name for p in d.iterdir()) == sorted(SECRET_FILES + PUBLIC_FILES)
    root = (d / "secret").read_bytes()
    assert root.endswith(b"\n") and len(root.strip()) == 64
    for name, role in (("agent.secret", wire.Role.AGENT), ("connector.secret", wire.Role.CONNECTOR)):
        assert (d / name).read_bytes() == wire.role_secret(root.strip(), role) + b"\n"
    assert (d / "agent.secret").read_bytes() != (d / "connector.secret").read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        init_dir(d)


def test_force_over_stale_temp_files_and_planted_symlinks(tmp_path):
    """Before: stale 0644 `*.tmp` files left ca.key, intermediate.key and secret at 0644, and a
    symlink at `connector.key.tmp` made init write the Connector's private key into its target."""
    from cryptography import x509

    from qlab.certs import init_dir
    from qlab.cli.main import main

    d = init_dir(tmp_path / "c")
    victim = tmp_path / "victim"
    victim.write_text("victim\n")
    victim.chmod(0o644)
    for name in SECRET_FILES + PUBLIC_FILES:
        stale = d / f"{name}.tmp"
        stale.write_text("stale")
        stale.chmod(0o644)
    (d / "connector.key.tmp").unlink()
    (d / "connector.key.tmp").symlink_to(victim)  # the old temp path
    (d / "agent.secret").unlink()
    (d / "agent.secret").symlink_to(victim)  # the final path itself
    umask = os.umask(0)  # modes are exact, not whatever the umask lets through
    try:
        assert main(["certs", "init", "--force", str(d)]) == 0
    finally:
        os.umask(umask)
    assert victim.read_text() == "victim\n" and _mode(victim) == 0o644, "nothing written through a symlink"
    for name in SECRET_FILES:
        assert stat.S_ISREG(os.lstat(d / name).st_mode) and _mode(d / name) == 0o600, name
    for name in PUBLIC_FILES:
        assert stat.S_ISREG(os.lstat(d / name).st_mode) and _mode(d / name) == 0o644, name
    ca = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    for leaf in ("intermediate.pem", "connector.pem"):
        x509.load_pem_x509_certificate((d / leaf).read_bytes()).verify_directly_issued_by(ca)


def test_a_failed_init_replaces_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import tempfile

    from qlab.certs import init_dir

    d = init_dir(tmp_path / "c")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    real = tempfile.mkstemp
    calls = []

    def disk_full_at_the_sixth(*a, **kw):
        calls.append(1)
        if len(calls) == 6:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", disk_full_at_the_sixth)
    with pytest.raises(OSError, match="No space"):
        init_dir(d, force=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before, "the old CA, keys and secrets are intact"


def test_server_configs_share_a_parsed_chain_until_the_files_change(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from qlab.certs import Credentials, init_dir

    d = init_dir(tmp_path / "c")
    creds = Credentials.load(d)
    first, second = creds.server_config("connector"), creds.server_config("connector")
    assert first is not second and first.certificate is second.certificate
    assert first.certificate_chain is not second.certificate_chain  # a list each: nothing shared to mutate

    def pem(cfg) -> bytes:
        return cfg.certificate.public_bytes(serialization.Encoding.PEM)

    assert pem(first) == (d / "connector.pem").read_bytes()
    init_dir(d, force=True)  # new files in their place: parsed again
    assert pem(creds.server_config("connector")) == (d / "connector.pem").read_bytes() != pem(first)
