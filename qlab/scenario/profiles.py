"""Named link profiles: one-way delay, jitter (distribution, correlation), loss, reordering and
rate per access link.

A profile names what each access link of a topology looks like: the Agent side's uplink, the
Connector side's uplink and the Intermediate's link to "the internet". LAN links inside a site stay
ideal. The netns lab renders a profile with netem or its userspace wire, the simulator with its own
links; both read these numbers (and the wire and the simulator decide every packet with the same
`qlab.scenario.linkmodel`), so `wan-20ms` means the same on every backend.

`home-broadband`, `mobile-lte` and `intercontinental` look like real paths; docs/sim.md ("Link
profiles") says where each number comes from.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

JitterDistribution = Literal["uniform", "normal", "pareto", "paretonormal"]
JITTER_DISTRIBUTIONS: tuple[str, ...] = get_args(JitterDistribution)  # netem's names


@dataclass(frozen=True)
class LinkProfile:
    """One link, the same in both directions; every probability is per packet per direction.

    `delay_ms` is the base one-way delay, `jitter_ms` the spread around it drawn from
    `jitter_distribution` (netem's meaning: the half-width of `uniform`, the standard deviation of
    `normal`, the scale of netem's `pareto` and `paretonormal` tables), `jitter_correlation` how much
    each draw leans on the previous one (netem's `delay D J C`), `reorder` the chance that a packet
    skips the delay (netem's `reorder P`) and `rate_mbit` a serialization rate behind a queue.
    `in_order` keeps packets in the order they were sent: jitter then acts as queueing delay (a
    packet never arrives before the one sent ahead of it), as on a real access link, where
    independent per-packet jitter reorders them (netem's default; `in_order` is netem with a pfifo
    child queue).
    `qlab.scenario.linkmodel` turns these into each packet's fate on every backend.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None
    jitter_distribution: JitterDistribution = "uniform"
    jitter_correlation: float = 0.0
    reorder: float = 0.0
    in_order: bool = False

    def __post_init__(self) -> None:
        problem = _problem(self)
        if problem:
            raise ValueError(f"bad link profile: {problem}")

    @property
    def ideal(self) -> bool:
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.loss == 0 and self.rate_mbit is None


def _problem(link: LinkProfile) -> str:
    """What is wrong with a link's fields, or "" (written so that NaN fails every range)."""
    for name in ("delay_ms", "jitter_ms"):
        value = getattr(link, name)
        if not 0 <= value < math.inf:
            return f"{name} must be a finite number >= 0, got {value}"
    for name in ("loss", "jitter_correlation", "reorder"):
        value = getattr(link, name)
        if not 0 <= value < 1:
            return f"{name} must be in [0, 1), got {value}"
    if link.rate_mbit is not None and not 0 < link.rate_mbit < math.inf:
        return f"rate_mbit must be a finite number > 0 or None, got {link.rate_mbit}"
    if link.jitter_distribution not in JITTER_DISTRIBUTIONS:
        return (f"jitter_distribution must be one of {', '.join(JITTER_DISTRIBUTIONS)}, "
                f"got {link.jitter_distribution!r}")
    if link.reorder and link.in_order:
        return "reorder and in_order contradict each other"
    if link.reorder and not link.delay_ms:
        return "reorder needs a delay_ms > 0 to skip (netem refuses it too)"
    return ""


IDEAL = LinkProfile()


@dataclass(frozen=True)
class NetProfile:
    """Access links of a topology: `agent` and `connector` are the uplinks of their sites (the NAT
    router's WAN link, or the host's own link when it has no NAT), `intermediate` the server's link."""

    name: str
    agent: LinkProfile = IDEAL
    connector: LinkProfile = IDEAL
    intermediate: LinkProfile = IDEAL
    lan: LinkProfile = field(default=IDEAL)
    description: str = ""

    @property
    def direct_rtt_ms(self) -> float:
        """Round trip Agent <-> Connector over the direct path, from the configured base delays: the
        mean round trip when the jitter's mean is 0 (uniform, normal); pareto jitter is skewed, so
        there the median is lower and the tail longer (`qlab.scenario.linkmodel`)."""
        return 2 * (self.agent.delay_ms + self.connector.delay_ms)

    @property
    def relay_rtt_ms(self) -> float:
        """Round trip Agent -> Intermediate -> Connector and back, from the configured base delays
        (as `direct_rtt_ms`)."""
        return 2 * (self.agent.delay_ms + 2 * self.intermediate.delay_ms + self.connector.delay_ms)

    @property
    def ideal(self) -> bool:
        return all(link.ideal for link in (self.agent, self.connector, self.intermediate, self.lan))

    def to_dict(self) -> dict:
        return asdict(self)


def _wan(name: str, a: float, c: float, i: float, loss: float = 0.0, jitter: float = 0.0, desc: str = "") -> NetProfile:
    return NetProfile(
        name,
        agent=LinkProfile(a, jitter, loss),
        connector=LinkProfile(c, jitter, loss),
        intermediate=LinkProfile(i, jitter, loss),
        description=desc,
    )


# Access links of real paths (sources and how the numbers were chosen: docs/sim.md, "Link profiles").
# Home access: cable, DSL or fibre to the ISP's core; queueing there only adds, so the jitter is
# right-skewed (NISTnet's paretonormal).
# Every named real path keeps order (`in_order`): routers queue, they do not shuffle; per-packet
# jitter that reorders made aioquic drop a server flight's Handshake packets that overtook its
# Initial and wait out a PTO, a loss no real access link causes at these rates.
HOME_ACCESS = LinkProfile(12.0, 3.0, jitter_distribution="paretonormal", in_order=True)
# 4G/LTE radio access: scheduling grants and HARQ retransmissions (8 ms each) make a wide,
# right-skewed spread. No correlation in any named profile: netem's narrows the spread and, for a
# skewed distribution, moves the mean, so the numbers here would stop being the mean and spread.
LTE_ACCESS = LinkProfile(20.0, 6.0, jitter_distribution="paretonormal", in_order=True)
# a cloud region's server: well connected, little variation
CLOUD_SERVER = LinkProfile(5.0, 0.5, jitter_distribution="normal", in_order=True)

PROFILES: dict[str, NetProfile] = {
    "lan": NetProfile("lan", description="no added delay or loss (kernel speed)"),
    "wan-20ms": _wan("wan-20ms", 5, 5, 10, desc="direct RTT 20 ms, relay RTT 60 ms"),
    "home-broadband": NetProfile(
        "home-broadband", agent=HOME_ACCESS, connector=HOME_ACCESS, intermediate=CLOUD_SERVER,
        description="Agent and Connector on home broadband in one region, Intermediate in a nearby cloud "
                    "region: base direct RTT 48 ms, relay RTT 68 ms, each site to the Intermediate 34 ms; "
                    "right-skewed access jitter"),
    "mobile-lte": NetProfile(
        "mobile-lte", agent=LTE_ACCESS, connector=HOME_ACCESS, intermediate=CLOUD_SERVER,
        description="Agent on a 4G/LTE phone, Connector on home broadband, Intermediate in a nearby cloud "
                    "region: base direct RTT 64 ms, relay RTT 84 ms, phone to the Intermediate 50 ms; wide, "
                    "right-skewed radio jitter"),
    "intercontinental": NetProfile(
        "intercontinental", agent=LinkProfile(40.0, 2.0, jitter_distribution="normal", in_order=True),
        connector=LinkProfile(40.0, 2.0, jitter_distribution="normal", in_order=True),
        intermediate=LinkProfile(20.0, 1.0, jitter_distribution="normal", in_order=True),
        description="Agent and Connector on two continents (about Paris and California), Intermediate far "
                    "from both: base direct RTT 160 ms, relay RTT 240 ms; normal jitter on every access link"),
    "lossy-1pct": _wan("lossy-1pct", 5, 5, 10, loss=0.01, desc="wan-20ms with 1% loss each way on every access link"),
    "lossy-2pct": _wan("lossy-2pct", 5, 5, 10, loss=0.02, desc="wan-20ms with 2% loss each way on every access link"),
    "lossy-5pct": _wan("lossy-5pct", 5, 5, 10, loss=0.05, desc="wan-20ms with 5% loss each way on every access link"),
    "lossy-20pct": _wan("lossy-20pct", 5, 5, 10, loss=0.20, desc="wan-20ms with 20% loss each way on every access link"),
    "jittery": _wan("jittery", 5, 5, 10, jitter=2.0, desc="wan-20ms with 2 ms uniform jitter on every access link"),
}

PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
# `qlab report`'s default campaigns: paths as users have them, so its RTT and ttd plots show
# distributions; the first is the headline (its pages are `nat_<preset>`)
REPORT_PROFILES: tuple[str, ...] = ("home-broadband", "mobile-lte")


def profile(name: str) -> NetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}") from None
