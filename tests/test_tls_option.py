"""The Let's Encrypt option without Let's Encrypt: the Intermediate serves the chain given by
--tls-cert/--tls-key (here signed by a CA the test makes, standing in for a public one), and
clients given the Intermediate's DNS name verify it against public roots instead of the qlab CA.
Loopback only."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from cryptography.hazmat.primitives import serialization

from tests.procs import QLAB, Proc, free_udp_port


def _observed(creds, port: int) -> tuple | None:
    from qlab.endpoint import Endpoint
    from qlab.net import RealNet
    from qlab.traversal.detect import QadSession

    async def go():
        ep = Endpoint(RealNet())
        await ep.bind("127.0.0.1", 0)
        try:
            async with QadSession(ep, ("127.0.0.1", port), creds, "tls-test") as s:
                return await s.observed(3.0)
        except (TimeoutError, ConnectionError):  # e.g. "self-signed certificate in certificate chain"
            return None
        finally:
            ep.close()

    return asyncio.run(go())


def test_intermediate_serves_the_given_chain(tmp_path, certs_dir, creds):
    from qlab.certs import INTERMEDIATE_NAME, make_ca, make_leaf

    other_ca, other_key = make_ca("stand-in public CA")
    leaf, key = make_leaf(other_ca, other_key, INTERMEDIATE_NAME)
    cert_file, key_file = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + other_ca.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    port = free_udp_port()
    inter = Proc([*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", str(certs_dir),
                  "--tls-cert", str(cert_file), "--tls-key", str(key_file)], name="intermediate")
    try:
        inter.wait_for("listening")
        trusting_other = dataclasses.replace(creds, ca_pem=other_ca.public_bytes(serialization.Encoding.PEM))
        assert _observed(trusting_other, port) is not None, "a client trusting the chain's CA connects"
        assert _observed(creds, port) is None, "the qlab CA did not sign what is served now"
    finally:
        inter.terminate()


def test_clients_verify_a_named_intermediate_against_public_roots(creds, tmp_path):
    from qlab.certs import CONNECTOR_NAME, INTERMEDIATE_NAME

    named = creds.with_tls(intermediate_name="relay.example.org")
    cfg = named.client_config(INTERMEDIATE_NAME)
    assert cfg.server_name == "relay.example.org" and cfg.cadata is None and cfg.cafile is None  # certifi roots
    direct = named.client_config(CONNECTOR_NAME)  # direct paths stay on the qlab CA
    assert direct.server_name == CONNECTOR_NAME and direct.cadata == creds.ca_pem
    with pytest.raises(ValueError, match="together"):
        creds.with_tls(cert=str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError):
        creds.with_tls(cert=str(tmp_path / "x"), key=str(tmp_path / "y"))
