"""A link direction's per-packet fate: lost, or delivered after how long. Sans-IO.

The simulator's `Wire` and the kernel lab's `tapwire` both ask a `LinkModel` about every packet, so
a `LinkProfile` means the same on both backends; where the kernel has netem, the lab gives netem
the same parameters instead (`qlab.backends.netns.lab.netem_args`).

The semantics are Linux netem's (net/sched/sch_netem.c), in this order per packet:
- loss: dropped with probability `loss`, independently of other packets;
- reorder: with probability `reorder`, sent at once, skipping the delay (netem's `reorder P` with
  its default gap of 1);
- delay: `delay_ms + jitter_ms * x`, never below 0, where x is the jitter distribution's value
  at a uniform u in [0, 1). u is netem's correlated uniform (`get_crandom`): with correlation c,
  u = (1 - c) * fresh + c * previous u, so consecutive delays lean on each other. Mixing uniforms
  also narrows u around 0.5 (its variance is (1 - c) / (1 + c) of a uniform's), and with it the
  jitter: that is netem's arithmetic, kept so that both backends and netem's documentation agree.

The distributions are netem's tables (iproute2 netem/normal.c, pareto.c, paretonormal.c), each an
inverse cumulative distribution sampled at 4096 points and scaled by 8192 into 16-bit entries.
Here each is its continuous form evaluated at u, which the tables approximate:
- uniform: 2u - 1 (netem's default, computed without a table);
- normal: the standard normal's inverse CDF (`statistics.NormalDist().inv_cdf`, rather than the
  4096-entry table), clipped to +-4 as the 16-bit table entries are;
- pareto: a Pareto of shape 3 shifted by its mean 1.5 and scaled by 4/3, clipped at 4: from -2/3 up,
  a long right tail, mean -0.033, standard deviation 0.82 once clipped;
- paretonormal: (normal + 3 * pareto) / 4 at the same u, NISTnet's mix of the two.

One difference from the kernel, on purpose: netem indexes its table with the low bits of the
correlated 32-bit number (`rnd % size`, and `rnd % (2 * jitter)` for uniform), which scrambles the
correlation away unless it is near 100 %; here the correlated u is used whole, as netem's
documentation describes correlation.

Every draw comes from the `random.Random` given, so a seed fixes every fate. Draws happen only for
what a profile has (no loss draw without loss, no correlation state without correlation), so a
profile with uniform jitter draws exactly what the simulator's wires drew before this module.

A profile's `rate_mbit` is a `RateQueue` between the loss and the delay: a packet that was not lost
waits its turn to be serialized, or is dropped when the queue is full, and only then is delayed.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable
from statistics import NormalDist

from qlab.scenario.profiles import LinkProfile

QUEUE_LIMIT = 1000  # packets a rate queue holds before it drops (netem's default limit)
TABLE_LIMIT = 4.0  # netem's table entries are 16-bit, 8192 per unit: every value lies within +-4

_NORMAL = NormalDist()
_U_LOW, _U_HIGH = _NORMAL.cdf(-TABLE_LIMIT), _NORMAL.cdf(TABLE_LIMIT)


def uniform_jitter(u: float, spread: float) -> float:
    # random.uniform(-spread, spread)'s own arithmetic, so old uniform runs keep their exact numbers
    return -spread + 2.0 * spread * u


def normal_jitter(u: float, spread: float) -> float:
    # clipping u (not the result) also keeps inv_cdf away from 0 and 1, where it is undefined
    return spread * _NORMAL.inv_cdf(min(max(u, _U_LOW), _U_HIGH))


def pareto_jitter(u: float, spread: float) -> float:
    return spread * min(4.0 / 3.0 * (math.pow(1.0 - u, -1.0 / 3.0) - 1.5), TABLE_LIMIT)


def paretonormal_jitter(u: float, spread: float) -> float:
    return (normal_jitter(u, spread) + 3.0 * pareto_jitter(u, spread)) / 4.0


# each maps netem's uniform u and the jitter (ms) to the jitter's value (ms)
JITTER: dict[str, Callable[[float, float], float]] = {
    "uniform": uniform_jitter,
    "normal": normal_jitter,
    "pareto": pareto_jitter,
    "paretonormal": paretonormal_jitter,
}


class LinkModel:
    """The fate of each packet crossing one direction of a link with `profile`.

    Ask `lost()` first and `delay()` only for packets that were not lost (the simulator queues a
    packet for its rate in between), or `fate()` for both at once.
    """

    __slots__ = ("profile", "rng", "_base", "_jitter", "_shape", "_correlation", "_last_u", "_last_arrival")

    def __init__(self, profile: LinkProfile, rng: random.Random) -> None:
        self.profile = profile
        self.rng = rng
        self._base = profile.delay_ms / 1000.0
        self._jitter = profile.jitter_ms
        self._shape = JITTER[profile.jitter_distribution]
        self._correlation = profile.jitter_correlation if profile.jitter_ms else 0.0
        # netem seeds the correlation with a random "previous" value; drawn only when it is used
        self._last_u = rng.random() if self._correlation else 0.0
        self._last_arrival = 0.0

    def lost(self) -> bool:
        loss = self.profile.loss
        return bool(loss) and self.rng.random() < loss

    def delay(self) -> float:
        """Seconds until a packet that was not lost arrives (0 for one that skips the delay)."""
        reorder = self.profile.reorder
        if reorder and self.rng.random() < reorder:
            return 0.0
        if not self._jitter:
            return self._base
        # milliseconds first, then seconds, as the simulator always computed it (same numbers)
        return max(0.0, self._base + self._shape(self._next_u(), self._jitter) / 1000.0)

    def arrival(self, start: float) -> float:
        """When a packet that was not lost, leaving at `start` (seconds, a clock that never goes
        back), arrives: `start + delay()`, and with `in_order` no earlier than the packet before it."""
        at = start + self.delay()
        if self.profile.in_order:
            at = max(at, self._last_arrival)
            self._last_arrival = at
        return at

    def fate(self) -> float | None:
        """None for a lost packet, else its delay in seconds."""
        return None if self.lost() else self.delay()

    def _next_u(self) -> float:
        fresh = self.rng.random()
        c = self._correlation
        if not c:
            return fresh
        self._last_u = (1.0 - c) * fresh + c * self._last_u
        return self._last_u



class RateQueue:
    """One link direction's serializer: `rate_mbit` behind a drop-tail queue of `limit` packets.

    netem's `rate R` and `limit N`, as this project models them:
    - a packet of b bytes takes b * 8 / (R * 1e6) seconds to serialize, starting when it arrives or
      when the packet before it has finished, whichever is later: back to back in a burst, at once
      on an idle link;
    - b is the IP packet: the UDP payload plus 28 bytes of IPv4 and UDP header in the simulator, the
      Ethernet frame less its 14-byte header on the TAP wire. netem counts the frame it is handed,
      on a veth the Ethernet header too, so it sends 14 bytes more per packet (1.1 % at 1,250 bytes);
    - a packet that arrives while `limit` packets have not finished serializing (the one being sent
      included) is dropped. netem's limit counts every packet it holds, those waiting out their
      delay too, so with a long delay and very many packets in flight netem drops first (1000
      packets of 1,250 bytes in flight during a 20 ms delay is 500 Mbit/s);
    - the delay comes after the queue: the link model's delay starts when the packet has finished
      serializing. netem draws the delay first and serializes behind the previous packet's time to
      send, delay included; with a constant delay both give arrival = max(arrival time + delay,
      previous arrival) + serialization, the same numbers. With jitter netem never lets a packet
      out before the one queued ahead of it, where here the jitter may reorder them as it does
      without a rate; and a packet that `reorder` sends at once skips netem's rate too, where here
      it waits in the queue and skips only the delay.

    Sans-IO: the caller says when each packet arrives and how big it is. `rate_mbit` may change
    between packets (as `tc qdisc change` does): packets already admitted keep their times.
    """

    __slots__ = ("rate_mbit", "limit", "_busy_until", "_departures")

    def __init__(self, rate_mbit: float, limit: int = QUEUE_LIMIT) -> None:
        self.rate_mbit = rate_mbit
        self.limit = limit
        self._busy_until = 0.0
        self._departures: deque[float] = deque()  # when each packet not yet serialized will be

    def admit(self, now: float, ip_bytes: int) -> float | None:
        """When a packet of `ip_bytes` arriving at `now` (seconds, any clock that never goes back)
        has finished serializing, or None when the queue is full and drops it."""
        departures = self._departures
        while departures and departures[0] <= now:
            departures.popleft()
        if len(departures) >= self.limit:
            return None
        done = max(now, self._busy_until) + ip_bytes * 8 / (self.rate_mbit * 1e6)
        self._busy_until = done
        departures.append(done)
        return done
