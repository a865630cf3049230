"""The trial record and what defines a trial: `TrialSpec` in, `TrialResult` out, and the rules that
judge an outcome. Pure data: the results store and the notebooks import this without any
networking (no aioquic, no roles)."""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

APP_PORT = 9999  # the Connector host's echo app, the service every lab trial reaches
IPV6_FIREWALLS = ("open", "stateful")  # qlab.nat.firewall6.PRESET6_NAMES (this module imports no networking)


class Outcome(StrEnum):
    """How a trial's session ended up carrying traffic (the record's `outcome`)."""

    DIRECT_LAN = "direct_lan"  # direct, to a peer's private address on a shared LAN
    DIRECT_WAN = "direct_wan"  # direct, to an observed public address
    DIRECT_PREDICTED = "direct_predicted"  # direct, to a predicted port
    DIRECT_MAPPED = "direct_mapped"  # direct, to an address a side's router mapped (PCP, NAT-PMP, UPnP)
    RELAY = "relay"  # through the Intermediate only
    FAILED = "failed"  # no echo came back over any path


class Fault(StrEnum):
    """What a trial does to its session once it is up (`TrialSpec.fault`)."""

    NONE = ""
    REBIND = "rebind"  # the Agent's NAT forgets every mapping mid-session
    IDLE = "idle"  # no traffic for `idle_s`
    INTERMEDIATE_RESTART = "intermediate_restart"  # the Intermediate dies without a word for `outage_s`
    CONNECTOR_RESTART = "connector_restart"  # the Connector stops and a new one starts `outage_s` later


OUTCOMES: tuple[str, ...] = tuple(o.value for o in Outcome)
FAULTS: tuple[str, ...] = tuple(f.value for f in Fault)


class Mechanism(StrEnum):
    """What found a trial's direct path (the record's `mechanism`), from the kinds of the two sides'
    working pairs."""

    LAN = "lan"  # a peer's private address on a shared LAN
    SERVER_REFLEXIVE = "server-reflexive"  # both sides' public addresses as the Intermediate saw them
    PEER_REFLEXIVE = "peer-reflexive"  # an address learned from where the peer's probe came from
    PREDICTION = "prediction"  # a predicted port of a sequential-port NAT
    BIRTHDAY = "birthday"  # random ports sprayed against a random-port NAT (birthday mode)
    MAPPING = "mapping"  # an address a side's router granted by PCP, NAT-PMP or UPnP IGD
    IPV6 = "ipv6"  # a peer's global IPv6 host address (no NAT; a stateful firewall opened by both sides' probes)


class PunchState(StrEnum):
    """Whether the trial's session punched: a relay outcome after `SKIPPED` was decided by policy
    (both sides endpoint-dependent), not measured; `TrialSpec.punch_anyway` measures it."""

    ATTEMPTED = "attempted"  # probes went out (WAN, or only a shared LAN)
    SKIPPED = "skipped"  # the policy skipped the punch
    NONE = "none"  # the trial never reached a punch (it failed before)


MODES = ("terminated", "sealed")  # wire.SessionMode's values (this module imports no networking)
SEALED_MAX_PAYLOAD = 1155  # endpoint.SEALED_DATAGRAM_SIZE less DATAGRAM_OVERHEAD and wire.DGRAM_HEADER (tested)


@dataclass
class TrialSpec:
    """Everything that defines a trial (and nothing measured)."""

    backend: str = "sim"
    agent_nat: str = "port_restricted"
    connector_nat: str = "port_restricted"
    profile: str = "wan-20ms"
    scenario: str = "pair"
    seed: int = 0
    echo_interval: float = 0.02
    echo_size: int = 64
    samples: int = 20
    verify_echoes: int = 10
    punch_timeout: float = 3.0
    blackhole: bool = False
    fault: str = ""  # a Fault value
    outage_s: float = 3.0
    idle_s: float = 3.0
    binding_timeout: float | None = None  # override every NAT's binding timeout (seconds)
    keepalive: float = 0.5  # direct-path keepalive interval
    birthday: int = 0  # birthday mode: mappings the random-port side opens (0 = off); Tailscale uses 256
    birthday_probes: int = 1024  # random ports the other side probes
    birthday_rate: float = 1000.0  # of those, per second
    punch_anyway: bool = False  # punch even when both sides are endpoint-dependent (policy would skip)
    port_mapping: bool = True  # in the labs, ask the gateway for a port mapping (a NAT `+map` grants one)
    relay_off_proof: bool = True  # False: prove the direct path as in the field, with the relay left on
    agents: int = 1
    carrier_nat: str = "port_restricted"
    # each side's IPv6 firewall preset (qlab.nat.firewall6: open, stateful); "" = no IPv6 on that
    # side. Either one makes the lab dual-stack (the Intermediate gets IPv6 too)
    agent_ipv6: str = ""
    connector_ipv6: str = ""
    mode: str = "terminated"  # a wire.SessionMode value: terminated (the seed's design) or sealed
    punch_delay: float = 0.0  # both sides punch this much later: the upgrade of an established session
    trial_id: str = ""
    campaign_id: str = ""

    def __post_init__(self) -> None:
        if not self.trial_id:
            self.trial_id = secrets.token_hex(6)
        for name, lo, hi in (("samples", 1, 10000), ("verify_echoes", 1, 10000), ("echo_size", 16, 1200)):
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi}, got {v}")
        if not 0.001 <= self.echo_interval <= 5:
            raise ValueError("echo_interval must be between 1 ms and 5 s")
        if not 0 <= self.punch_delay <= 30:
            raise ValueError("punch_delay must be between 0 and 30 s")
        if not 0.1 <= self.punch_timeout <= 60:
            raise ValueError("punch_timeout must be between 0.1 and 60 s")
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; choose one of: {', '.join(f for f in FAULTS if f)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.mode == "sealed" and self.echo_size > SEALED_MAX_PAYLOAD:
            raise ValueError(f"echo_size must be at most {SEALED_MAX_PAYLOAD} in sealed mode (its packets ride in "
                             f"relayed frames), got {self.echo_size}")
        if self.mode == "sealed" and self.birthday:
            raise ValueError("birthday mode needs mode terminated: a sealed session's connection lives on the "
                             "shared socket, and birthday mode wins on a socket of its own")
        for fw in (self.agent_ipv6, self.connector_ipv6):
            if fw and fw not in IPV6_FIREWALLS:
                raise ValueError(f"unknown IPv6 firewall {fw!r}; choose one of: {', '.join(IPV6_FIREWALLS)}")

    @property
    def ipv6(self) -> dict[str, str | None] | None:
        """Each side's IPv6 firewall in a dual-stack trial (None: an IPv4-only trial)."""
        if not (self.agent_ipv6 or self.connector_ipv6):
            return None
        return {"agent": self.agent_ipv6 or None, "connector": self.connector_ipv6 or None}


@dataclass
class TrialResult:
    """One trial's record: the same fields on every backend (docs/results.md)."""

    trial_id: str
    campaign_id: str
    backend: str
    scenario: str
    agent_nat: str
    connector_nat: str
    profile: str
    seed: int
    qlab_version: str
    started_at: float
    duration_s: float
    expected: str
    outcome: str
    reason: str
    as_expected: bool
    direct_verified: bool
    agent_nat_detected: str
    connector_nat_detected: str
    agent_candidates: list[str]
    connector_candidates: list[str]
    agent_probes: int
    connector_probes: int
    predicted_ports: list[int]
    working_pair: str
    punch_ms: float | None
    ttfb_ms: float | None
    ttd_ms: float | None
    rtt_relay_p50_ms: float | None
    rtt_relay_p95_ms: float | None
    rtt_relay_loss: float | None
    rtt_relay_n: int
    rtt_direct_p50_ms: float | None
    rtt_direct_p95_ms: float | None
    rtt_direct_loss: float | None
    rtt_direct_n: int
    relay_bytes_out: int
    relay_bytes_in: int
    direct_bytes_out: int
    direct_bytes_in: int
    verify_sent: int
    verify_received: int
    failover_ms: float | None
    echo_gap_ms: float | None
    path_events: list[dict[str, Any]]
    measured_with: str
    error: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # Added by issue 21; None in records written before. Echo counts by the path each reply came back
    # on: `_received` = sent on that path and answered over it; answered over the other path = crossed.
    rtt_relay_sent: int | None = None
    rtt_relay_received: int | None = None
    rtt_direct_sent: int | None = None
    rtt_direct_received: int | None = None
    echo_direct_answered_on_relay: int | None = None
    echo_relay_answered_on_direct: int | None = None
    punch: str | None = None  # a PunchState value
    # Added by issue 20: the sim's processing-cost calibration (`name@digest`); None on kernel sockets
    # (and in sim records written before, which charged no processing time).
    sim_calibration: str | None = None
    # Added by issue 17: how the direct path was found (a Mechanism value; None when not direct), and
    # each side's port mapping as "protocol external-ip:port" ("" when its router granted none).
    mechanism: str | None = None
    agent_mapping: str | None = None
    connector_mapping: str | None = None
    # Added by issue 17 (IPv6): the address family of the verified direct path, "ipv4" or "ipv6";
    # None when not direct. A dual-stack trial's IPv6 firewalls are in `extra["ipv6"]`.
    path_family: str | None = None
    # Added by issue 19: the session's architecture, "terminated" or "sealed" (None in older records:
    # terminated, the only one then).
    mode: str | None = None
    # Added by issue 19: from the punch proving the pair to the first echo back over the direct path
    # (the upgrade's own cost: a handshake and a round trip in terminated mode, a migration and a round
    # trip in sealed mode once its connection is up); None when not direct.
    upgrade_ms: float | None = None
    # Added by issue 19: seconds both sides waited before punching (TrialSpec.punch_delay; None in
    # older records: 0, punching at once).
    punch_delay: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# columns older records may lack (loaded as None)
ADDED_FIELDS = ("rtt_relay_sent", "rtt_relay_received", "rtt_direct_sent", "rtt_direct_received",
                "echo_direct_answered_on_relay", "echo_relay_answered_on_direct", "punch", "sim_calibration",
                "mechanism", "agent_mapping", "connector_mapping", "path_family", "mode", "upgrade_ms", "punch_delay")


def error_text(exc: BaseException) -> str:
    """An exception as a record's `error`: its type and message, and what an empty message means
    (asyncio's timeouts carry none, which left reports reading just "TimeoutError:")."""
    message = str(exc) or ("timed out" if isinstance(exc, TimeoutError) else "no message")
    return f"{type(exc).__name__}: {message}"


def is_direct(outcome: str) -> bool:
    return outcome.startswith("direct")


def judge(expected: str, outcome: str, scenario: str, birthday: bool, lan_nat: str = "") -> bool:
    """Does `outcome` match the cell's expected code? `lan_nat`: the NAT of a `same_lan` scenario."""
    if outcome == Outcome.FAILED or expected == "?":  # "?": a NAT of unknown behaviour expects nothing
        return False
    if scenario == "same_lan":  # two public hosts' own addresses are not a LAN: their pair is WAN
        return outcome == (Outcome.DIRECT_WAN if lan_nat == "public" else Outcome.DIRECT_LAN)
    if expected in ("D", "D>"):  # with birthday mode on, its spray may win the race to direct
        return is_direct(outcome) if birthday else outcome in (Outcome.DIRECT_WAN, Outcome.DIRECT_LAN,
                                                               Outcome.DIRECT_MAPPED)
    if expected == "M":
        return outcome == Outcome.DIRECT_MAPPED
    if expected == "P":
        return outcome == Outcome.DIRECT_PREDICTED
    if expected == "B":
        return is_direct(outcome) if birthday else outcome == Outcome.RELAY
    return outcome == Outcome.RELAY


def punch_state(events: list[dict[str, Any]]) -> PunchState:
    """From the path events: did the session punch, or did policy skip it?"""
    kinds = {e["event"] for e in events}
    if "punch_start" in kinds:
        return PunchState.ATTEMPTED
    return PunchState.SKIPPED if "punch_skipped" in kinds else PunchState.NONE
