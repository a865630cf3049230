"""Named link profiles: one-way delay, jitter, loss and rate per access link.

A profile names what each access link of a topology looks like: the Agent side's uplink, the
Connector side's uplink and the Intermediate's link to "the internet". LAN links inside a site stay
ideal. The netns lab renders a profile with netem or its userspace wire, the simulator with its own
links; both read these numbers, so `wan-20ms` means the same on every backend.
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
    `qlab.scenario.linkmodel` turns these into each packet's fate on every backend.
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None
    jitter_distribution: JitterDistribution = "uniform"
    jitter_correlation: float = 0.0
    reorder: float = 0.0

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
        """Round trip Agent <-> Connector over the direct path, from the configured delays."""
        return 2 * (self.agent.delay_ms + self.connector.delay_ms)

    @property
    def relay_rtt_ms(self) -> float:
        """Round trip Agent -> Intermediate -> Connector and back, from the configured delays."""
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


PROFILES: dict[str, NetProfile] = {
    "lan": NetProfile("lan", description="no added delay or loss (kernel speed)"),
    "wan-20ms": _wan("wan-20ms", 5, 5, 10, desc="direct RTT 20 ms, relay RTT 60 ms"),
    "intercontinental": _wan("intercontinental", 40, 40, 20, desc="direct RTT 160 ms, relay RTT 240 ms"),
    "lossy-1pct": _wan("lossy-1pct", 5, 5, 10, loss=0.01, desc="wan-20ms with 1% loss each way on every access link"),
    "lossy-2pct": _wan("lossy-2pct", 5, 5, 10, loss=0.02, desc="wan-20ms with 2% loss each way on every access link"),
    "lossy-5pct": _wan("lossy-5pct", 5, 5, 10, loss=0.05, desc="wan-20ms with 5% loss each way on every access link"),
    "lossy-20pct": _wan("lossy-20pct", 5, 5, 10, loss=0.20, desc="wan-20ms with 20% loss each way on every access link"),
    "jittery": _wan("jittery", 5, 5, 10, jitter=2.0, desc="wan-20ms with 2 ms jitter on every access link"),
}

PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)


def profile(name: str) -> NetProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; choose one of: {', '.join(PROFILE_NAMES)}") from None
