"""A userspace link between two network namespaces, with a link profile's delay, jitter, loss,
reordering and rate.

Where the kernel has no netem (this machine's: `tc qdisc ... netem` says "Specified qdisc kind is
unknown"), a link with a profile is two TAP devices, one in each namespace, and this small process copying frames
between them through a delay queue (docs/netns-lab.md has its measured precision). Each direction
asks its own `qlab.scenario.linkmodel.LinkModel` for every frame's fate, as the simulator's wires do,
and with a rate its own `RateQueue` when the frame has been serialized: loss, then the rate queue
(the IP packet's size: the frame less its Ethernet header), then the delay.

    python -m qlab.backends.netns.tapwire --ns-a NS --if-a NAME --ns-b NS --if-b NAME \
        [--delay MS] [--jitter MS] [--jitter-distribution NAME] [--jitter-correlation C] \
        [--loss P] [--reorder P] [--rate MBIT] [--seed N] [--die-with-parent]

It prints "ready" once both devices exist, and ends on SIGTERM (or with its parent).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gc
import heapq
import os
import random
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress

from qlab.scenario.linkmodel import LinkModel, RateQueue
from qlab.scenario.profiles import JITTER_DISTRIBUTIONS, LinkProfile

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_TIMERSLACK = 29
RT_PRIORITY = 20  # SCHED_FIFO; below the kernel's own threaded IRQs (50)
SPIN = 0.0003  # s of busy-waiting before a deadline
ETH_HEADER = 14  # bytes of a TAP frame before its IP packet (IFF_NO_PI: no other header)

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str):
    """Run the body in network namespace `name` (this thread only), then come back."""
    here = os.open("/proc/self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        setns(there)
        yield
    finally:
        setns(here)
        os.close(here)
        os.close(there)


def open_tap(ns: str, ifname: str) -> int:
    with in_netns(ns):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def realtime() -> str:
    """Ask for a real-time priority and the finest timer slack: a delay line must wake on time
    even when every core is busy (measured: without it, a CPU hog adds ~3 ms to a 20 ms RTT's p95).
    Returns the policy obtained; without the privilege the wire runs, less punctual."""
    _libc.prctl(PR_SET_TIMERSLACK, 1)  # ns; the default 50 us slack would be added to every wake-up
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
        return "fifo"
    except (PermissionError, OSError):
        return "other"


def deadline(model: LinkModel, rate: RateQueue | None, now: float, frame: bytes) -> float | None:
    """When a frame read at `now` is due at the other device, or None when it is lost (the model's
    loss) or dropped (its direction's rate queue is full), in the simulator's order."""
    if model.lost():
        return None
    if rate is not None:
        serialized = rate.admit(now, len(frame) - ETH_HEADER)
        if serialized is None:
            return None
        now = serialized
    return model.arrival(now)


def run(a: int, b: int, models: dict[int, LinkModel], spin: float = SPIN,
        stop: Callable[[], bool] = lambda: False, rates: dict[int, RateQueue] | None = None) -> None:
    """Copy frames between the two devices: `models[fd]` decides the fate of each frame read from
    `fd` (lost, or its delay) and `rates[fd]`, if there is one, when it has been serialized; the
    frame is written to the other device at its absolute deadline. Every frame read at one wake-up
    counts as arrived at that wake-up. The loop sleeps until `spin` seconds before the earliest
    deadline, then busy-waits the rest (a sleep overshoots by the wake-up latency). `stop` is asked
    at every wake-up (at least once a second)."""
    pending: list[tuple[float, int, int, bytes]] = []
    seq = 0
    other = {a: b, b: a}
    rates = rates or {}
    clock = time.monotonic
    while not stop():
        timeout = max(0.0, pending[0][0] - clock() - spin) if pending else 1.0
        ready, _, _ = select.select([a, b], [], [], timeout)
        now = clock()
        for fd in ready:
            model, rate = models[fd], rates.get(fd)
            for _ in range(64):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                due = deadline(model, rate, now, frame)
                if due is not None:
                    seq += 1
                    heapq.heappush(pending, (due, seq, other[fd], frame))
        while pending and pending[0][0] <= clock() + spin:
            due, _, out, frame = heapq.heappop(pending)
            while clock() < due:
                pass
            with suppress(OSError):  # the device is gone or full: a lost frame
                os.write(out, frame)


def link_args(link: LinkProfile) -> list[str]:
    """The command-line flags that give a wire `link` (what `parse_link` reads back)."""
    return ["--delay", repr(link.delay_ms), "--jitter", repr(link.jitter_ms),
            "--jitter-distribution", link.jitter_distribution,
            "--jitter-correlation", repr(link.jitter_correlation),
            "--loss", repr(link.loss), "--reorder", repr(link.reorder), *(["--in-order"] if link.in_order else []),
            *(["--rate", repr(link.rate_mbit)] if link.rate_mbit is not None else [])]


def add_link_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--delay", type=float, default=0.0, help="one-way ms")
    ap.add_argument("--jitter", type=float, default=0.0, help="ms (the distribution's spread)")
    ap.add_argument("--jitter-distribution", choices=JITTER_DISTRIBUTIONS, default="uniform")
    ap.add_argument("--jitter-correlation", type=float, default=0.0, help="0 to 1, as netem's delay correlation")
    ap.add_argument("--loss", type=float, default=0.0, help="probability per frame per direction")
    ap.add_argument("--reorder", type=float, default=0.0, help="probability that a frame skips the delay")
    ap.add_argument("--in-order", action="store_true", help="frames keep their order (jitter as queueing delay)")
    ap.add_argument("--rate", type=float, default=None,
                    help="Mbit/s each way, behind a queue of 1000 frames (netem's rate and limit); none by default")


def parse_link(args: argparse.Namespace) -> LinkProfile:
    """The profile the flags describe (ValueError, saying what is wrong, for a bad one)."""
    return LinkProfile(delay_ms=args.delay, jitter_ms=args.jitter, loss=args.loss, rate_mbit=args.rate,
                       jitter_distribution=args.jitter_distribution,
                       jitter_correlation=args.jitter_correlation, reorder=args.reorder, in_order=args.in_order)


def direction_models(link: LinkProfile, seed: int, a: int, b: int) -> dict[int, LinkModel]:
    """One model per direction, each on its own random stream (as netem has a qdisc per end)."""
    return {fd: LinkModel(link, random.Random(f"qlab-tapwire/{seed}/{side}"))
            for fd, side in ((a, "a>b"), (b, "b>a"))}


def direction_rates(link: LinkProfile, a: int, b: int) -> dict[int, RateQueue]:
    """One rate queue per direction (each end of a netem link has its own), none without a rate."""
    return {} if link.rate_mbit is None else {fd: RateQueue(link.rate_mbit) for fd in (a, b)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns-a", required=True)
    ap.add_argument("--if-a", required=True)
    ap.add_argument("--ns-b", required=True)
    ap.add_argument("--if-b", required=True)
    add_link_flags(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--die-with-parent", action="store_true")
    ap.add_argument("--spin-us", type=float, default=SPIN * 1e6, help="busy-wait before each deadline (0: sleep only)")
    ap.add_argument("--no-realtime", action="store_true", help="stay a normal task (to measure the difference)")
    args = ap.parse_args(argv)
    try:
        link = parse_link(args)
    except ValueError as exc:
        ap.error(str(exc))
    if args.die_with_parent:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    gc.disable()  # the loop makes no cycles; a collection pause would delay frames
    if not args.no_realtime:
        realtime()
    a = open_tap(args.ns_a, args.if_a)
    b = open_tap(args.ns_b, args.if_b)
    print("ready", flush=True)
    with suppress(KeyboardInterrupt):
        run(a, b, direction_models(link, args.seed, a, b), args.spin_us / 1e6, rates=direction_rates(link, a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
