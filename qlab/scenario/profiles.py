"""Named link profiles: one-way delay, jitter, loss and rate per access link.

A profile names what each access link of a topology looks like: the Agent side's uplink, the
Connector side's uplink and the Intermediate's link to "the internet". LAN links inside a site stay
ideal. The netns lab renders a profile with netem or its userspace wire, the simulator with its own
links; both read these numbers, so `wan-20ms` means the same on every backend.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LinkProfile:
    """One link, the same in both directions. `loss` is a probability per packet per direction."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay and jitter must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0")

    @property
    def ideal(self) -> bool:
        return self.delay_ms == 0 and self.jitter_ms == 0 and self.loss == 0 and self.rate_mbit is None


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
