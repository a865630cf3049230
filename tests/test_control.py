"""The control-stream core (qlab.roles.control) as tables: messages in, events and messages out.
No sockets, no event loop."""

from __future__ import annotations

import random

import pytest

from qlab import wire
from qlab.roles.control import (
    REQ_MAX,
    AddressObserved,
    Backoff,
    ControlClient,
    HelloRefused,
    Liveness,
    Replied,
    RoleMessage,
    Welcomed,
)

SECRET = b"s" * 32


def client() -> ControlClient:
    return ControlClient(wire.Role.AGENT, "agent", SECRET)


def test_hello_carries_version_role_name_and_the_secrets_tag():
    hello = client().hello(b"server-cid")
    assert hello == wire.Hello(wire.VERSION, wire.Role.AGENT, "agent", wire.hello_auth(SECRET, wire.Role.AGENT, "agent", b"server-cid"))
    assert client().hello(b"another-cid") != hello  # bound to the connection


def test_request_ids_start_at_one_and_wrap_past_the_u16_without_zero():
    c = client()
    assert [c.next_req() for _ in range(3)] == [1, 2, 3]
    c._next_req = REQ_MAX - 1
    assert [c.next_req() for _ in range(3)] == [REQ_MAX - 1, REQ_MAX, 1]


@pytest.mark.parametrize(
    ("msg", "pending", "event"),
    [
        (wire.Welcome(wire.VERSION, 7, 1200), set(), Welcomed(7, 1200)),
        (wire.ObservedAddress(1, ("192.0.2.1", 4000)), set(), AddressObserved(("192.0.2.1", 4000))),
        (wire.Nack(0, wire.NackCode.UNAUTHENTICATED, "bad secret"), set(),
         HelloRefused(wire.NackCode.UNAUTHENTICATED, "bad secret")),
        (wire.Ack(3), {3}, Replied(3, wire.Ack(3))),
        (wire.Nack(3, wire.NackCode.BAD_STATE, "no"), {3}, Replied(3, wire.Nack(3, wire.NackCode.BAD_STATE, "no"))),
        (wire.ServerInfo(4, ("192.0.2.9", 4433), ("192.0.2.10", 4434)), {4},
         Replied(4, wire.ServerInfo(4, ("192.0.2.9", 4433), ("192.0.2.10", 4434)))),
        # a reply nobody waits for (timed out) goes to the role like any other message
        (wire.Ack(5), {3}, RoleMessage(wire.Ack(5))),
        (wire.SessionClosed(9, wire.NackCode.BAD_STATE, "bye"), set(), RoleMessage(wire.SessionClosed(9, wire.NackCode.BAD_STATE, "bye"))),
        (wire.Pong(1), set(), None),
    ],
)
def test_receive(msg, pending, event):
    c = client()
    for req in pending:
        c.expect(req)
    assert c.receive(msg) == event
    assert c.messages_to_send() == []


def test_welcome_is_remembered():
    c = client()
    c.receive(wire.Welcome(wire.VERSION, 7, 1200))
    assert (c.client_id, c.max_relay_payload) == (7, 1200)


def test_a_ping_is_answered_with_its_nonce():
    c = client()
    assert c.receive(wire.Ping(42)) is None
    assert c.messages_to_send() == [wire.Pong(42)]
    assert c.messages_to_send() == []


def test_qad_reports_only_changes():
    c = client()
    a, b = ("192.0.2.1", 4000), ("192.0.2.1", 4001)
    events = [c.receive(wire.ObservedAddress(i, x)) for i, x in enumerate((a, a, b, b, a))]
    assert events == [AddressObserved(a), None, AddressObserved(b), None, AddressObserved(a)]
    assert c.observed == a


def test_a_forgotten_request_is_no_longer_matched():
    c = client()
    c.expect(3)
    c.forget(3)
    assert c.receive(wire.Ack(3)) == RoleMessage(wire.Ack(3))


@pytest.mark.parametrize(
    ("heard", "now", "dead"),
    [(10.0, 10.0, False), (10.0, 16.0, False), (10.0, 16.01, True), (0.0, 100.0, True)],
)
def test_liveness_dead_after_silence(heard, now, dead):
    live = Liveness(interval=2.0, dead_after=6.0)
    live.heard(heard)
    assert live.dead(now) is dead
    assert live.silent_for(now) == pytest.approx(now - heard)


def test_liveness_pings_once_per_interval_with_fresh_nonces():
    live = Liveness(interval=0.5, dead_after=1.5)
    assert live.ping_due(100.0)
    assert live.ping(100.0) == wire.Ping(1)
    assert [live.ping_due(t) for t in (100.1, 100.49, 100.5, 101.0)] == [False, False, True, True]
    assert live.ping(100.5) == wire.Ping(2)


def test_liveness_nonce_wraps_at_32_bits():
    live = Liveness(interval=1.0, dead_after=3.0)
    live._nonce = 0xFFFFFFFF
    assert live.ping(0.0) == wire.Ping(0)


@pytest.mark.parametrize(
    ("first", "cap", "factor", "expected"),
    [
        (0.2, 30.0, 2.0, [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]),
        (0.2, 2.0, 2.0, [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]),
        (2.0, 8.0, 1.5, [2.0, 3.0, 4.5, 6.75, 8.0, 8.0]),
        (20.0, 8.0, 1.5, [20.0, 8.0, 8.0]),  # a first delay above the cap is used once
    ],
)
def test_backoff_without_jitter(first, cap, factor, expected):
    b = Backoff(first, cap, factor=factor, jitter=0.0)
    assert [b.next() for _ in expected] == pytest.approx(expected)


def test_backoff_jitter_stays_within_bounds_and_is_reproducible_with_a_seed():
    a, b = Backoff(0.2, 30.0, rng=random.Random(5)), Backoff(0.2, 30.0, rng=random.Random(5))
    delays = [a.next() for _ in range(12)]
    assert delays == [b.next() for _ in range(12)]
    nominal = [min(0.2 * 2**i, 30.0) for i in range(12)]
    assert all(0.8 * n <= d <= 1.2 * n for d, n in zip(delays, nominal, strict=True))
    assert len({round(d / n, 6) for d, n in zip(delays, nominal, strict=True)}) > 1  # jittered


def test_backoff_reset_starts_over():
    b = Backoff(0.2, 30.0, jitter=0.0)
    b.next(), b.next()
    assert b.current == pytest.approx(0.8)
    b.reset()
    assert b.next() == pytest.approx(0.2)


@pytest.mark.parametrize(("first", "cap", "factor", "jitter"), [(0, 1, 2, 0), (1, 0, 2, 0), (1, 2, 0.5, 0), (1, 2, 2, 1)])
def test_backoff_rejects_nonsense(first, cap, factor, jitter):
    with pytest.raises(ValueError):
        Backoff(first, cap, factor=factor, jitter=jitter)


def test_backoff_without_an_rng_draws_from_the_process_random_as_the_link_always_did():
    random.seed(11)
    old, delay = [], 0.2
    for _ in range(8):
        old.append(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, 30.0)
    random.seed(11)
    b = Backoff(0.2, 30.0)
    assert [b.next() for _ in range(8)] == old
