"""The sans-IO puncher and candidate gathering (qlab/traversal/punch.py), driven by hand: two
Punchers exchange datagrams through a function, time is passed in."""

from __future__ import annotations

import pytest

from qlab import wire
from qlab.backends.sim.nat import NatEngine
from qlab.nat.spec import PRESETS
from qlab.traversal.punch import (
    REQUEST_BYTES,
    PunchConfig,
    Puncher,
    gather,
    lan_candidates,
    lockstep_candidates,
    signal_bytes,
)

KEY = b"k" * 32
C = wire.CandidateKind


def cand(kind, ip, port):
    return wire.Candidate(kind, (ip, port), 1)


def exchange(a: Puncher, a_addr, b: Puncher, b_addr, rounds: int = 10, nat=lambda src, dst: src):
    """Deliver each side's output to the other (through an optional source-rewriting `nat`)."""
    t = 0.0
    out_a, out_b = a.start(t), b.start(t)
    for _ in range(rounds):
        t += a.config.interval
        nxt_a, nxt_b = [], []
        for data, dst in out_a:
            if dst == b_addr:
                nxt_b += b.receive(data, nat(a_addr, dst), t)
        for data, dst in out_b:
            if dst == a_addr:
                nxt_a += a.receive(data, nat(b_addr, dst), t)
        out_a = nxt_a + a.poll(t)
        out_b = nxt_b + b.poll(t)
    return a, b


def test_punchers_find_each_other_and_answer_where_probes_came_from():
    a_addr, b_addr = ("198.51.100.1", 1000), ("198.51.100.2", 2000)
    a = Puncher(7, KEY, (cand(C.SRFLX, *a_addr),), (cand(C.SRFLX, *b_addr),))
    b = Puncher(7, KEY, (cand(C.SRFLX, *b_addr),), (cand(C.SRFLX, *a_addr),))
    exchange(a, a_addr, b, b_addr)
    assert a.success and a.success.addr == b_addr and a.success.kind == C.SRFLX
    assert b.success and b.success.addr == a_addr
    assert a.probes_sent >= 1 and a.responses_sent >= 1


def test_peer_reflexive_address_is_learned_and_used():
    """The peer's NAT maps it to a port nobody signalled (symmetric): the side that receives its
    probe answers that address and adopts it."""
    a_addr, b_signalled, b_real = ("198.51.100.1", 1000), ("198.51.100.2", 2000), ("198.51.100.2", 3333)
    a = Puncher(7, KEY, (cand(C.SRFLX, *a_addr),), (cand(C.SRFLX, *b_signalled),))
    b = Puncher(7, KEY, (cand(C.SRFLX, *b_real),), (cand(C.SRFLX, *a_addr),))
    # b's packets leave from b_real; a's packets to b_signalled are lost
    t = 0.0
    a.start(t)
    for data, _ in b.start(t):
        out = a.receive(data, b_real, t)
        assert any(d == b_real for _, d in out), "a must answer the address the probe came from"
        for d2, dst2 in out:
            if dst2 == b_real:
                b.receive(d2, a_addr, t)
    assert a.learned == [b_real] and a.targets[b_real] == C.PRFLX
    assert a.success is not None and a.success.addr == b_real and a.success.kind == C.PRFLX
    assert b.success is not None and b.success.addr == a_addr


def test_probes_with_a_wrong_key_or_session_are_rejected():
    a = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 1),))
    forged = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 7, 1), b"x" * 32)
    with pytest.raises(wire.WireError):
        a.receive(forged, ("198.51.100.9", 9), 0.0)
    other = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 8, 1), KEY)
    with pytest.raises(wire.WireError):
        a.receive(other, ("198.51.100.9", 9), 0.0)
    unsolicited = wire.encode_probe(wire.Probe(wire.PROBE_RESPONSE, 7, 12345, ("1.2.3.4", 5)), KEY)
    with pytest.raises(wire.WireError, match="no request"):
        a.receive(unsolicited, ("198.51.100.9", 9), 0.0)
    assert a.success is None


def test_timeout_gives_a_reason_and_stops_probing():
    a = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 1),), PunchConfig(interval=0.02, timeout=0.1))
    a.start(0.0)
    t, sent = 0.0, 0
    while t < 1.0:
        t += 0.02
        sent += len(a.poll(t))
    assert a.failed and "no working pair" in a.failed
    assert a.poll(2.0) == [] and a.next_timer() is None
    assert a.probes_sent == 3  # at 0, 20 and 60 ms: the gap doubles for a target that does not answer


def test_predicted_ports_are_a_fallback():
    a = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 40000), cand(C.PREDICTED, "198.51.100.2", 40001)),
                PunchConfig(interval=0.02, predict_after=0.06))
    first = a.start(0.0)
    assert [d for _, d in first] == [("198.51.100.2", 40000)]
    later = []
    for i in range(1, 5):
        later += a.poll(0.02 * i)
    assert ("198.51.100.2", 40001) in [d for _, d in later]


def test_candidates_never_include_unusable_host_addresses():
    cands = gather(["0.0.0.0", "127.0.0.1", "169.254.1.1", "10.1.0.2"], 4434, ("203.0.113.101", 4434),
                   wire.NatKind.EDM_SEQUENTIAL, last_port=40010)
    kinds = [(c.kind, c.addr) for c in cands]
    assert kinds[0] == (C.HOST, ("10.1.0.2", 4434))
    assert (C.SRFLX, ("203.0.113.101", 4434)) in kinds
    assert [a[1] for k, a in kinds if k == C.PREDICTED] == list(range(40011, 40019))
    prios = [c.priority for c in cands]
    assert prios == sorted(prios, reverse=True), "LAN before WAN before predicted"
    assert lan_candidates(cands, (cand(C.HOST, "10.1.0.7", 1), cand(C.HOST, "10.2.0.7", 1))) == (
        cand(C.HOST, "10.1.0.7", 1),)


async def test_a_probe_during_the_start_delay_does_not_cancel_the_start():
    """Regression: a peer probe arriving before our delayed start used to cancel the start timer."""
    import asyncio

    from qlab.traversal.punch import PunchRunner

    sent: list = []
    done: list = []
    peer = ("198.51.100.2", 4434)
    p = Puncher(7, KEY, (), (cand(C.HOST, *peer),), PunchConfig(interval=0.01, timeout=0.2))
    r = PunchRunner(p, lambda d, a: sent.append(a), done.append)
    r.start(0.05)
    req = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 7, 99), KEY)
    assert r.receive(req, peer)  # answered at once
    await asyncio.wait_for(r.finished, 2)
    assert p.started_at is not None and done == [p], "the runner started and reported"
    assert sent.count(peer) >= 2 and p.probes_sent >= 2  # the answer, then our own rounds
    assert p.failed  # nobody answered our probes: a clean timeout, not a hang


def drive(p: Puncher, until: float, step: float = 0.005) -> list[tuple[bytes, tuple]]:
    """Poll `p` from its start to `until` (nobody answers); what it sent."""
    out = p.start(0.0)
    t = 0.0
    while t < until:
        t += step
        out += p.poll(t)
    return out


def test_a_silent_target_gets_a_bounded_number_of_requests_with_backoff():
    cfg = PunchConfig(interval=0.02, timeout=3.0, max_sends=7, steady_sends=3, max_gap=0.25)
    p = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 1),), cfg)
    p.budget.earn(10_000)  # the budget is not what limits here
    out = drive(p, 3.5, step=0.001)
    assert len(out) == 7 and p.failed
    # sent at 0, .02, .04, .06, then .10, .18, .34 (the gap doubles, capped at .25): the 8th would be due at .59
    assert p.sends == {("198.51.100.2", 1): 7} and p.due[("198.51.100.2", 1)] == pytest.approx(0.59, abs=0.01)


def test_candidates_at_a_victim_get_at_most_three_times_what_signalled_them():
    """32 candidates, all at one silent address: the bytes toward it stay within 3x the bytes the
    peer must have spent to signal them, and within the session cap, for the whole punch."""
    victim = [cand(C.HOST, "198.51.100.9", 1000 + i) for i in range(32)]
    p = Puncher(7, KEY, (), tuple(victim))
    sent = sum(len(d) for d, _ in drive(p, 4.0))
    assert p.failed
    assert 0 < sent <= 3 * signal_bytes(tuple(victim)) and sent <= p.budget.cap
    assert p.budget.spent == sent


def test_spoofed_requests_earn_at_most_three_times_their_bytes():
    """A holder of the key sends authentic requests from many addresses (spoofed: a victim's): what
    goes back to them is bounded by 3x what came in, and the learned targets are capped."""
    p = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 1),), PunchConfig(max_targets=8))
    p.start(0.0)
    came, went = 0, 0
    for i in range(200):
        req = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 7, i), KEY)
        came += len(req)
        went += sum(len(d) for d, _ in p.receive(req, ("198.51.100.9", 2000 + i), 0.001 * i))
    assert went <= 3 * (came + signal_bytes(p.peer)) and len(p.targets) <= 8


def test_an_address_that_answers_is_paid_back_and_may_be_probed_freely():
    peer = ("198.51.100.2", 1)
    p = Puncher(7, KEY, (), (cand(C.HOST, "10.0.0.9", 1), cand(C.SRFLX, *peer)))
    out = p.start(0.0)
    assert p.budget.spent == sum(len(d) for d, _ in out)
    txn = next(t for t, a in p.txns.items() if a == peer)
    p.receive(wire.encode_probe(wire.Probe(wire.PROBE_RESPONSE, 7, txn, ("1.2.3.4", 5)), KEY), peer, 0.01)
    assert p.success is not None and peer in p.proven
    assert p.budget.spent == sum(len(d) for d, a in out if a != peer)  # only the silent host address is charged


def test_the_birthday_spray_goes_only_to_the_given_ip_outside_the_budget():
    import random

    p = Puncher(7, KEY, (), (cand(C.SRFLX, "198.51.100.2", 1),), PunchConfig(spray_rate=1000.0))
    p.birthday_spray("198.51.100.2", 300, random.Random(1))
    out = drive(p, 1.0)
    sprayed = [a for _, a in out if a in p.sprayed]
    assert len(sprayed) == 300 and {a[0] for _, a in out} == {"198.51.100.2"}
    assert p.budget.spent == sum(len(d) for d, a in out if a not in p.sprayed)


# --- lockstep prediction: two sequential-port symmetric NATs (the simulator's NAT engine) ---------

SEQ_SPEC = PRESETS["symmetric_seq"]  # APDM, APDF, sequential ports from 40000, one counter per NAT
INTERMEDIATE = [("203.0.113.1", 443), ("203.0.113.2", 444), ("203.0.113.1", 444)]  # detection's 3 mappings


class SeqSide:
    """One side behind its own symmetric_seq NAT: the QAD mappings detection made, then a Puncher
    in lockstep mode towards the peer's predicted ports."""

    def __init__(self, public_ip: str, inside: tuple[str, int], extra_mappings: int = 0) -> None:
        self.nat = NatEngine(SEQ_SPEC, public_ip)
        self.inside = inside
        for dst in INTERMEDIATE:
            self.nat.outbound(inside, dst, 0.0)
        last = self.nat.mapped_port(inside, INTERMEDIATE[-1], 0.0)
        observed = (public_ip, self.nat.mapped_port(inside, INTERMEDIATE[0], 0.0) or 0)
        self.own = gather([inside[0]], inside[1], observed, wire.NatKind.EDM_SEQUENTIAL, last_port=last)
        for i in range(extra_mappings):  # flows nobody predicted (another host, another connection)
            self.nat.outbound(inside, ("198.51.100.50", 1000 + i), 0.0)
        self.p: Puncher | None = None

    def punch(self, peer: tuple[wire.Candidate, ...], lockstep: bool = True) -> Puncher:
        self.p = Puncher(7, KEY, self.own, (), PunchConfig(interval=0.02, timeout=1.0))
        self.p.lockstep = lockstep
        self.p.set_peer(lockstep_candidates(self.own, peer) if lockstep else peer)
        return self.p


def run_lockstep(a: SeqSide, b: SeqSide, *, lockstep: bool = True, owd: float = 0.01, b_starts: float = 0.0,
                 lost=lambda t, src, dst: False, until: float = 1.2) -> list[tuple[float, tuple, tuple]]:
    """Both sides punch through their NATs over a wire of one-way delay `owd`; `lost(t, src, dst)`
    drops a datagram sent at t. Returns what arrived inside a NAT: (time, public source, public dest)."""
    pa, pb = a.punch(b.own, lockstep), b.punch(a.own, lockstep)
    sides = {a.nat.public_ip: (a, pa), b.nat.public_ip: (b, pb)}
    flight: list[tuple[float, tuple, tuple, bytes]] = []  # (arrival, public src, public dst, data)
    arrived: list[tuple[float, tuple, tuple]] = []

    def send(side: SeqSide, out: list, t: float) -> None:
        for data, dst in out:
            src = side.nat.outbound(side.inside, dst, t)
            assert isinstance(src, tuple), src
            if not lost(t, src, dst):
                flight.append((t + owd, src, dst, data))

    t, step, started_b = 0.0, 0.001, False
    send(a, pa.start(0.0), 0.0)
    while t < until and not (pa.success and pb.success):
        t = round(t + step, 6)
        if not started_b and t + 1e-9 >= b_starts:
            started_b = True
            send(b, pb.start(t), t)
        for item in [f for f in flight if f[0] <= t + 1e-9]:
            flight.remove(item)
            _, src, dst, data = item
            if dst[0] not in sides:
                continue  # a private address of another site: nobody there
            side, p = sides[dst[0]]
            inside = side.nat.inbound(src, dst[1], t)
            if isinstance(inside, tuple) and (p is pa or started_b):
                arrived.append((t, src, dst))
                send(side, p.receive(data, src, t), t)
        send(a, pa.poll(t), t)
        if started_b:
            send(b, pb.poll(t), t)
    return arrived


def predicted(side: SeqSide) -> list[tuple[str, int]]:
    return [c.addr for c in side.own if c.kind == C.PREDICTED]


def test_lockstep_pairs_the_kth_new_mappings_of_two_sequential_nats():
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    arrived = run_lockstep(a, b)
    assert a.p and b.p and a.p.success and b.p.success
    assert a.p.success.kind == b.p.success.kind == C.PREDICTED
    assert a.p.success.addr == predicted(b)[0] and b.p.success.addr == predicted(a)[0]
    # the k-th new mapping of each NAT went to the peer's k-th predicted port, and nothing else did
    for side, peer in ((a, b), (b, a)):
        new = [bd for bd in side.nat.bindings() if bd.key[1] not in INTERMEDIATE]
        assert [(bd.public_port, bd.key[1]) for bd in new] == [(p, q) for (_, p), q in zip(
            predicted(side), predicted(peer), strict=False)][: len(new)]
    assert all(src[1] == dst[1] - 40003 + 40003 for _, src, dst in arrived)  # pair k meets pair k
    assert {(src[1] - 40003, dst[1] - 40003) for _, src, dst in arrived} <= {(k, k) for k in range(8)}


def test_lockstep_skips_reflexive_candidates_and_probes_at_once():
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    p = a.punch(b.own)
    first = p.start(0.0)
    assert [dst for _, dst in first] == predicted(b), "all eight at once, in the peer's order, no srflx"


def test_lockstep_sends_first_requests_in_order_when_the_budget_holds_some_back():
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    p = a.punch(b.own)
    p.budget.cap = 3 * REQUEST_BYTES  # room for three requests towards silent addresses
    sent = [dst for _, dst in drive(p, 0.2)]
    assert sent[:3] == predicted(b)[:3] and set(sent) == set(predicted(b)[:3])
    p.budget.cap = 100 * REQUEST_BYTES  # the budget grows (the peer's probes earn it): the rest follow in turn
    later = [dst for _, dst in p.poll(0.3)]
    assert [d for d in later if d not in predicted(b)[:3]] == predicted(b)[3:]


def test_lockstep_survives_a_lost_first_round_on_the_same_mappings():
    """Every datagram of the first round is lost: the retransmissions leave from the mappings the
    first requests made (same destination, same binding), so the pairs still meet."""
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    run_lockstep(a, b, lost=lambda t, src, dst: t < 0.015)
    assert a.p and b.p and a.p.success and b.p.success, (a.p.failed, b.p.failed)
    assert a.p.success.addr == predicted(b)[0] and a.p.success.at >= 0.02
    for side in (a, b):  # 3 detection mappings + the 8 predicted pairs: no retransmission made a new one
        assert side.nat.bindings_created == 3 + 8


def test_lockstep_works_when_one_side_starts_later():
    """The earlier side's requests die at the peer's NAT (no mapping yet); the later side's pass,
    since its peer's mappings already exist."""
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    run_lockstep(a, b, b_starts=0.1)
    assert a.p and b.p and a.p.success and b.p.success
    assert a.p.success.via == "request" and a.p.success.at >= 0.11


def test_an_unpredicted_mapping_or_probing_out_of_turn_breaks_the_pairs():
    """Why the order matters: one flow nobody predicted shifts a NAT's counter and no pair meets;
    without lockstep (the reflexive address first, predicted ports later) no pair meets either."""
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000), extra_mappings=1), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    assert run_lockstep(a, b) == [] and a.p and a.p.failed and b.p and b.p.failed
    a, b = SeqSide("203.0.113.101", ("10.1.0.2", 5000)), SeqSide("203.0.113.102", ("10.2.0.2", 4434))
    assert run_lockstep(a, b, lockstep=False) == [] and a.p and a.p.failed
