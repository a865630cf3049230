"""The kernel lab's TAP wire (`qlab/backends/netns/tapwire.py`): its flags carry a whole link
profile and refuse a bad one, each direction draws from its own seeded stream, and its loop lets
through exactly the frames each direction's link model lets through, each after that model's delay,
and with a rate serializes each direction behind its own drop-tail queue (socket pairs stand in for
the TAP devices: the loop only reads and writes file descriptors). In the kernel lab, a link with a
rate limits a burst's throughput."""

from __future__ import annotations

import argparse
import contextlib
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from qlab.backends.netns import tapwire
from qlab.backends.netns.lab import Lab
from qlab.scenario.linkmodel import LinkModel, RateQueue
from qlab.scenario.profiles import PROFILES, LinkProfile
from qlab.scenario.topology import INTERMEDIATE_IPS, build

LINKS = [
    LinkProfile(),
    LinkProfile(5.0),
    LinkProfile(10.0, 2.0, 0.05),
    LinkProfile(0.1 + 0.2, 1 / 3, 1e-7, jitter_distribution="pareto", jitter_correlation=0.999),
    LinkProfile(20.0, 8.0, 0.01, jitter_distribution="paretonormal", jitter_correlation=0.25, reorder=0.02),
    LinkProfile(5.0, rate_mbit=1 / 3),
    LinkProfile(10.0, 2.0, 0.05, 100.0, "normal", 0.5, 0.01),
    *{link for p in PROFILES.values() for link in (p.agent, p.connector, p.intermediate)},
]


@pytest.mark.parametrize("link", LINKS)
def test_the_flags_carry_the_whole_profile(link: LinkProfile) -> None:
    ap = argparse.ArgumentParser()
    tapwire.add_link_flags(ap)
    assert tapwire.parse_link(ap.parse_args(tapwire.link_args(link))) == link


def test_a_bad_profile_is_refused_before_any_device_is_touched(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        tapwire.main(["--ns-a", "none", "--if-a", "x", "--ns-b", "none", "--if-b", "y", "--delay", "5",
                      "--jitter-correlation", "1.5"])
    assert exc.value.code == 2
    assert "bad link profile: jitter_correlation must be in [0, 1), got 1.5" in capsys.readouterr().err


def test_each_direction_has_its_own_stream_fixed_by_the_seed() -> None:
    link = LinkProfile(10.0, 3.0, 0.1, jitter_distribution="pareto", jitter_correlation=0.5)

    def draws(seed: int) -> list[list[float | None]]:
        models = tapwire.direction_models(link, seed, 3, 4)
        return [[models[fd].fate() for _ in range(200)] for fd in (3, 4)]

    a_to_b, b_to_a = draws(1)
    assert draws(1) == [a_to_b, b_to_a] and a_to_b != b_to_a and draws(2) != draws(1)


def _device() -> tuple[socket.socket, socket.socket]:
    """(the wire's end, the namespace's end): a datagram socket pair keeps frames whole, as a TAP does."""
    wire_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    wire_end.setblocking(False)
    return wire_end, host_end


def _collect(ends: dict[socket.socket, bytes], got: dict[bytes, tuple[bytes, float]], stop: threading.Event) -> None:
    """Frame -> (the side it came out at, arrival time), from the namespace ends, until `stop`."""
    while not stop.is_set():
        ready, _, _ = select.select(list(ends), [], [], 0.05)
        for s in ready:
            got[s.recv(2048)] = (ends[s], time.monotonic())


def test_the_loop_lets_through_what_each_model_says_after_its_delay() -> None:
    """300 frames each way: a->b with normal jitter, loss and reordering, b->a with heavy loss. The
    frames that arrive are exactly those the twin models (same profiles, same seeds) let through, at
    the other side, none early, each within 50 ms of its due time (a shared machine schedules
    threads late, never early); reordered ones skip the 30 ms delay."""
    ab = LinkProfile(30.0, 5.0, 0.1, jitter_distribution="normal", reorder=0.05)
    ba = LinkProfile(5.0, loss=0.3)
    (a_wire, a_host), (b_wire, b_host) = _device(), _device()
    models = {a_wire.fileno(): LinkModel(ab, random.Random(1)), b_wire.fileno(): LinkModel(ba, random.Random(2))}
    twins = {b"a>b": LinkModel(ab, random.Random(1)), b"b>a": LinkModel(ba, random.Random(2))}
    got: dict[bytes, tuple[bytes, float]] = {}
    sent: dict[bytes, float] = {}
    due: dict[bytes, float] = {}
    with _wire(models, {}, ((a_wire, a_host), (b_wire, b_host)), got):
        for i in range(300):
            for host, tag in ((a_host, b"a>b"), (b_host, b"b>a")):
                frame = b"%s %d" % (tag, i)
                sent[frame] = time.monotonic()
                host.send(frame)
                fate = twins[tag].fate()  # the wire reads each direction in send order, as the twins decide
                if fate is not None:
                    due[frame] = fate
            time.sleep(0.001)
        _wait_for(got, len(due), 5)
    assert set(got) == set(due)
    assert all(side == frame[2:3] for frame, (side, _) in got.items())  # "a>b ..." comes out at b
    late = [got[f][1] - sent[f] - due[f] for f in due]
    assert min(late) > -0.001 and max(late) < 0.050, (min(late), max(late))
    skipped = [f for f, d in due.items() if f.startswith(b"a>b") and d == 0.0]
    assert skipped and all(got[f][1] - sent[f] < 0.025 for f in skipped)



@contextlib.contextmanager
def _wire(models: dict[int, LinkModel], rates: dict[int, RateQueue],
          devices: tuple[tuple[socket.socket, socket.socket], tuple[socket.socket, socket.socket]],
          got: dict[bytes, tuple[bytes, float]]) -> Iterator[float]:
    """Run the loop between two devices (frames already written to them wait there) and collect
    what comes out into `got`; yields the time just before the loop started."""
    (a_wire, a_host), (b_wire, b_host) = devices
    stop_wire, stop_collecting = threading.Event(), threading.Event()
    threads = [threading.Thread(target=tapwire.run, args=(a_wire.fileno(), b_wire.fileno(), models, 0.0,
                                                          stop_wire.is_set, rates)),
               threading.Thread(target=_collect, args=({a_host: b"a", b_host: b"b"}, got, stop_collecting))]
    start = time.monotonic()
    for t in threads:
        t.start()
    try:
        yield start
    finally:
        stop_wire.set()
        stop_collecting.set()
        for t in threads:
            t.join(5)
    assert not any(t.is_alive() for t in threads)


def _wait_for(got: dict, n: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def _frame(tag: bytes, i: int, size: int) -> bytes:
    return (b"%s %d " % (tag, i)).ljust(size, b".")


def test_a_burst_leaves_at_the_rate_never_early() -> None:
    """20 frames of 1,000 bytes (986 bytes of IP packet: 7.888 ms each at 1 Mbit/s), all waiting at
    the device when the loop starts, then a 5 ms delay: frame k comes out no earlier than
    (k + 1) x 7.888 ms + 5 ms after the loop started (the wire reads them no earlier than that, and
    releases nothing before its deadline), in order, and no more than 250 ms late (a shared
    machine runs threads late, never early). The whole burst takes at least 162.76 ms."""
    link = LinkProfile(5.0, rate_mbit=1.0)
    devices = _device(), _device()
    fds = devices[0][0].fileno(), devices[1][0].fileno()
    got: dict[bytes, tuple[bytes, float]] = {}
    frames = [_frame(b"a>b", i, 1000) for i in range(20)]
    for f in frames:
        devices[0][1].send(f)
    twin = RateQueue(1.0)
    due = [twin.admit(0.0, 1000 - tapwire.ETH_HEADER) for _ in frames]  # from the wire's reading time
    with _wire(tapwire.direction_models(link, 0, *fds), tapwire.direction_rates(link, *fds), devices, got) as start:
        _wait_for(got, len(frames), 5)
    assert list(got) == frames and {side for side, _ in got.values()} == {b"b"}
    after = [got[f][1] - start for f in frames]
    early = [a - d - 0.005 for a, d in zip(after, due, strict=True)]
    assert min(early) > -1e-6 and max(early) < 0.250, (min(early), max(early))  # float noise only
    assert due[-1] == pytest.approx(20 * 986 * 8 / 1e6)


def test_a_burst_beyond_the_limit_loses_the_excess_each_direction_its_own() -> None:
    """Queues of 5 frames: 8 frames a->b lose exactly the last 3. At the same time 12 frames b->a
    with 50 % loss lose exactly what a twin model and a twin queue say: loss comes first (a lost
    frame takes no place in the queue), and a->b's full queue takes none of b->a's places. All the
    frames wait at the devices when the loop starts, so it reads each burst at one instant:
    nothing here depends on timing."""
    ab, ba = LinkProfile(1.0, rate_mbit=1.0), LinkProfile(1.0, 0.0, 0.5, 1.0)
    devices = _device(), _device()
    fds = devices[0][0].fileno(), devices[1][0].fileno()
    models = {fds[0]: LinkModel(ab, random.Random(1)), fds[1]: LinkModel(ba, random.Random(2))}
    rates = {fd: RateQueue(1.0, limit=5) for fd in fds}
    to_b = [_frame(b"a>b", i, 1000) for i in range(8)]
    to_a = [_frame(b"b>a", i, 1000) for i in range(12)]
    for host, frames in ((devices[0][1], to_b), (devices[1][1], to_a)):
        for f in frames:
            host.send(f)
    twin_model, twin_queue = LinkModel(ba, random.Random(2)), RateQueue(1.0, limit=5)
    through_to_a = [f for f in to_a if not twin_model.lost() and twin_queue.admit(0.0, len(f) - tapwire.ETH_HEADER) is not None]
    assert len(through_to_a) == 5 and len(to_a) - len(through_to_a) > 5  # both the loss and the queue drop
    got: dict[bytes, tuple[bytes, float]] = {}
    with _wire(models, rates, devices, got):
        _wait_for(got, 10, 5)
        time.sleep(0.1)  # time for a frame that should have been dropped to show up
    assert set(got) == set(to_b[:5]) | set(through_to_a)


def test_a_rate_limited_lab_link_limits_throughput(netns_ok) -> None:
    """The agent's link at 10 Mbit/s with a 5 ms delay: 200 datagrams of 1,000 bytes (1,028 bytes of
    IP packet: 0.8224 ms each) sent at once reach the Intermediate, datagram k no earlier than
    (k + 1) x 0.8224 ms + 5 ms after the first was sent, all within 10 s: the burst takes at least
    164.5 ms, where the same burst without a rate takes a few. One datagram first, so that ARP has
    resolved before the burst. `-s` prints the throughput measured."""
    topo = build("public", "public")
    topo = replace(topo, hosts=tuple(replace(h, link=LinkProfile(5.0, rate_mbit=10.0)) if h.name == "agent" else h
                                     for h in topo.hosts))
    n, ser = 200, 1028 * 8 / 10e6
    with Lab(topo) as lab:
        rx, tx = lab.socket("intermediate"), lab.socket("agent")
        with contextlib.suppress(OSError):  # root: past rmem_max, so a stalled reader drops nothing
            rx.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), 1 << 22)
        rx.bind((INTERMEDIATE_IPS[0], 9000))
        tx.sendto(b"arp", (INTERMEDIATE_IPS[0], 9000))
        assert select.select([rx], [], [], 5)[0] and rx.recv(2048) == b"arp"
        start = time.monotonic()
        for k in range(n):
            tx.sendto(b"%04d" % k + bytes(996), (INTERMEDIATE_IPS[0], 9000))
        arrived: dict[int, float] = {}
        deadline = start + 10
        while len(arrived) < n and select.select([rx], [], [], max(0.0, deadline - time.monotonic()))[0]:
            arrived[int(rx.recv(2048)[:4])] = time.monotonic() - start
        rx.close()
        tx.close()
        mechanism = lab.link_mechanism
    assert sorted(arrived) == list(range(n))
    print(f"\n10 Mbit/s link ({mechanism}): {n} x 1028 bytes in {arrived[n - 1] * 1e3:.1f} ms, "
          f"{(n - 1) * 1028 * 8 / (arrived[n - 1] - arrived[0]) / 1e6:.3f} Mbit/s from the first arrival to the last")
    early = [arrived[k] - (k + 1) * ser - 0.005 for k in range(n)]
    assert min(early) > -1e-6, min(early)
