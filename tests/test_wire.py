"""Property tests for every qlab/1 codec: round trips, and arbitrary bytes never raise anything but
WireError."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import wire

names = st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=60).filter(
    lambda s: s.isprintable() and 1 <= len(s.encode()) <= 255
)
texts = st.text(max_size=80).filter(lambda s: len(s.encode()) <= 255)
u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda ip: ip.ipv4_mapped is None).map(str)
addrs = st.tuples(st.one_of(ipv4, ipv6), u16)
keys = st.binary(min_size=wire.KEY_LEN, max_size=wire.KEY_LEN)
candidates = st.lists(
    st.builds(wire.Candidate, st.sampled_from(wire.CandidateKind), addrs, u32), max_size=wire.MAX_CANDIDATES
).map(tuple)
ports = st.lists(u16, max_size=64).map(tuple)

FIELD_STRATEGIES = {
    "version": u8, "role": st.sampled_from(wire.Role), "name": names, "auth": st.binary(max_size=64),
    "client_id": u32, "max_relay_payload": u16, "seq": u32, "addr": addrs, "req": u16, "service": names,
    "code": st.sampled_from(wire.NackCode), "reason": texts, "session": u32, "key": keys, "connector": names,
    "max_payload": u16, "agent": names, "nat": st.sampled_from(wire.NatKind), "candidates": candidates,
    "delay_ms": u16, "peer_nat": st.sampled_from(wire.NatKind), "peer_candidates": candidates,
    "predicted_ports": ports, "birthday": u16, "success": st.integers(0, 1), "probes": u16, "message": texts,
    "alt_ip": st.integers(0, 1), "alt_port": st.integers(0, 1), "nonce": u64, "primary": addrs, "alternate": addrs,
}
OVERRIDES = {("DirectHello", "auth"): keys, ("DirectAccept", "auth"): keys, ("PunchResult", "addr"): st.one_of(st.none(), addrs), ("Ping", "nonce"): u32, ("Pong", "nonce"): u32}

MESSAGE_TYPES = sorted(wire._REGISTRY.values(), key=lambda c: c.TYPE)


def message_strategy(cls):
    kwargs = {}
    for f in dataclasses.fields(cls):
        kwargs[f.name] = OVERRIDES.get((cls.__name__, f.name), FIELD_STRATEGIES[f.name])
    return st.builds(cls, **kwargs)


def test_every_message_type_has_a_strategy():
    assert len(MESSAGE_TYPES) >= 20
    for cls in MESSAGE_TYPES:
        for f in dataclasses.fields(cls):
            assert (cls.__name__, f.name) in OVERRIDES or f.name in FIELD_STRATEGIES, (cls, f.name)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_message_round_trip(cls, data):
    msg = data.draw(message_strategy(cls))
    encoded = msg.encode()
    assert int.from_bytes(encoded[:2], "big") == len(encoded) - 2
    assert wire.decode_message(encoded[2:]) == msg
    framer = wire.ControlFramer()
    # byte-by-byte delivery reassembles to the same message
    out = []
    for i in range(0, len(encoded), 7):
        out += framer.feed(encoded[i : i + 7])
    assert out == [msg]


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_raise_wire_error(data):
    for fn in (
        wire.decode_message,
        lambda d: wire.ControlFramer().feed(d),
        wire.decode_app,
        lambda d: wire.decode_probe(d, b"k" * 32),
        wire.probe_session,
        wire.decode_classify_test,
    ):
        with contextlib.suppress(wire.WireError):
            fn(data)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_messages_only_raise_wire_error(data):
    cls = data.draw(st.sampled_from(MESSAGE_TYPES))
    body = bytearray(data.draw(message_strategy(cls)).encode()[2:])
    for _ in range(data.draw(st.integers(1, 4))):
        if not body:
            break
        i = data.draw(st.integers(0, len(body) - 1))
        op = data.draw(st.sampled_from(["flip", "cut", "dup"]))
        if op == "flip":
            body[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del body[i:]
        else:
            body[i:i] = body[i : i + 3]
    with contextlib.suppress(wire.WireError):
        wire.decode_message(bytes(body))


@given(u32, st.binary(max_size=1400))
def test_app_datagram_round_trip(session, payload):
    assert wire.decode_app(wire.encode_app(session, payload)) == (session, payload)


@given(st.sampled_from([wire.PROBE_REQUEST, wire.PROBE_RESPONSE]), u32, u64, addrs, keys, keys)
def test_probe_round_trip_and_authentication(kind, session, txn, addr, key, other_key):
    probe = wire.Probe(kind, session, txn, addr if kind == wire.PROBE_RESPONSE else None)
    data = wire.encode_probe(probe, key)
    assert not data[0] & 0x40, "probes must never look like QUIC (fixed bit clear)"
    assert wire.probe_session(data) == session
    assert wire.decode_probe(data, key) == probe
    if other_key != key:
        with pytest.raises(wire.WireError, match="authentication"):
            wire.decode_probe(data, other_key)
    tampered = bytearray(data)
    tampered[7] ^= 1
    with pytest.raises(wire.WireError):
        wire.decode_probe(bytes(tampered), key)


def test_ipv4_mapped_addresses_are_sent_as_ipv4():
    msg = wire.ObservedAddress(1, ("::ffff:203.0.113.7", 4433))
    assert wire.decode_message(msg.encode()[2:]).addr == ("203.0.113.7", 4433)


def test_framer_rejects_oversized_frames_and_bad_lengths():
    with pytest.raises(wire.WireError):
        wire.ControlFramer().feed(b"\x00\x00")
    with pytest.raises(wire.WireError):
        wire.ControlFramer().feed((wire.MAX_CONTROL_MESSAGE + 1).to_bytes(2, "big") + b"x")
    f = wire.ControlFramer(limit=100)
    with pytest.raises(wire.WireError, match="overflow"):
        f.feed(b"\x00\x60" + b"x" * 120)


def test_encoding_refuses_out_of_range_values():
    with pytest.raises(wire.WireError):
        wire.Register(70000, "echo").encode()
    with pytest.raises(wire.WireError):
        wire.Register(1, "x" * 256).encode()
    with pytest.raises(wire.WireError):
        wire.Register(1, "").encode()
    with pytest.raises(wire.WireError):
        wire.Offer(1, wire.NatKind.EIM, tuple([wire.Candidate(wire.CandidateKind.HOST, ("10.0.0.1", 1))] * 33)).encode()


def test_hello_auth_depends_on_secret_role_name_and_connection():
    cid = b"\x01" * 8
    tag = wire.hello_auth(b"s" * 32, wire.Role.AGENT, "a", cid)
    assert wire.check_hello(b"s" * 32, wire.Hello(1, wire.Role.AGENT, "a", tag), cid)
    assert not wire.check_hello(b"t" * 32, wire.Hello(1, wire.Role.AGENT, "a", tag), cid)
    assert not wire.check_hello(b"s" * 32, wire.Hello(1, wire.Role.CONNECTOR, "a", tag), cid)
    assert not wire.check_hello(b"s" * 32, wire.Hello(1, wire.Role.AGENT, "b", tag), cid)
    assert not wire.check_hello(b"s" * 32, wire.Hello(1, wire.Role.AGENT, "a", tag), b"\x02" * 8)  # another connection


def test_role_secrets_differ_and_depend_on_the_root():
    root = b"r" * 64
    agent, connector = wire.role_secret(root, wire.Role.AGENT), wire.role_secret(root, wire.Role.CONNECTOR)
    assert len({agent, connector, root, wire.role_secret(b"q" * 64, wire.Role.AGENT)}) == 4


def test_direct_accept_names_the_connector_and_proves_the_key():
    key = b"k" * 32
    tag = wire.direct_accept_auth(key, 7, "edge1")
    assert tag != wire.direct_accept_auth(key, 7, "edge2") != wire.direct_accept_auth(b"j" * 32, 7, "edge1")
    assert tag != wire.direct_accept_auth(key, 8, "edge1") and tag != wire.direct_auth(key, 7)


def test_lockstep_prediction_is_for_two_sequential_nats_only():
    K = wire.NatKind
    pairs = {(a, b) for a in K for b in K if wire.lockstep_prediction(a, b)}
    assert pairs == {(K.EDM_SEQUENTIAL, K.EDM_SEQUENTIAL)}
    assert wire.both_endpoint_dependent(K.EDM_SEQUENTIAL, K.EDM_RANDOM)  # still relay (random ports)
    assert wire.birthday_role(K.EDM_SEQUENTIAL, K.EDM_SEQUENTIAL) is None
