"""Choosing between the relay and the direct path (TraversalConfig, PathManager).

`PathManager` is sans-IO: it is told the time and each RTT sample, and returns its decisions (the
path traffic should use). The asyncio shell (`qlab.traversal.agent_side`) applies them to the
session and runs the keepalive. Its `events` list is the trial record's `path_events`.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

from qlab.traversal.punch import PunchConfig
from qlab.wire import Path

log = logging.getLogger("qlab.traversal")


@dataclass
class TraversalConfig:
    punch: PunchConfig = field(default_factory=PunchConfig)
    direct_timeout: float = 3.0  # QUIC handshake + DirectHello on the punched pair
    keepalive: float = 0.5  # direct-path ping interval (below any NAT binding timeout in use)
    failover: float = 2.0  # a silent direct path is abandoned for the relay within this bound
    retry_after: float = 5.0  # a new upgrade attempt this long after a failed punch or a lost path
    max_attempts: int = 3  # upgrade attempts per session (the first included)
    slack_ratio: float = 0.10  # direct is "not worse" when p50 <= relay p50 * (1 + ratio) + slack_ms
    slack_ms: float = 2.0
    detect_timeout: float = 2.0
    # punch even when both sides are endpoint-dependent (policy skips it: the table says relay), so
    # those cells are measured rather than decided
    punch_anyway: bool = False
    # ask the default gateway for a port mapping (PCP, NAT-PMP, UPnP IGD) and offer it: the labs turn
    # it on (their gateways are inside the lab); a role on a real network only when told to
    port_mapping: bool = False
    # the Intermediate's IPv6 listener for QAD over IPv6 (dual-stack labs; None: IPv4 only)
    qad6: tuple[str, int] | None = None
    # both sides punch this much later than StartPunch says, so the session runs on the relay first:
    # the labs measure the upgrade of an established session with it (0: punch at once)
    punch_delay: float = 0.0


class PathManager:
    """The path choice of one Agent session: relay until the direct path is verified (an echo came
    back over it) and not worse than the relay; back to the relay when the direct path is slower
    or lost. No I/O and no clock: every call is told `now`."""

    def __init__(self, session_id: int, config: TraversalConfig, t0: float) -> None:
        self.session_id = session_id
        self.cfg = config
        self.t0 = t0
        # the record's path_events: {"t_ms": since the session began, "event": kind, "detail": text}
        self.events: list[dict[str, Any]] = []
        self.rtts: dict[Path, list[float]] = {Path.RELAY: [], Path.DIRECT: []}
        self.active = Path.RELAY
        self.verified_at: float | None = None
        self.closed = False

    def event(self, now: float, kind: str, detail: str = "") -> None:
        self.events.append({"t_ms": round((now - self.t0) * 1000, 3), "event": kind, "detail": detail})
        log.info("session %08x: %s %s", self.session_id, kind, detail)

    def median(self, path: Path) -> float | None:
        v = self.rtts[path]
        return statistics.median(v) if v else None

    def not_worse(self) -> bool:
        d, r = self.median(Path.DIRECT), self.median(Path.RELAY)
        if d is None:
            return False
        if r is None:
            return True
        return d * 1000 <= r * 1000 * (1 + self.cfg.slack_ratio) + self.cfg.slack_ms

    def observe_rtt(self, path: Path, rtt: float, now: float, direct_up: bool) -> Path | None:
        """One echo came back over `path` after `rtt` seconds. Returns the path to switch to, if
        the choice changed (`direct_up`: a direct connection is open)."""
        self.rtts[path].append(rtt)
        if path != Path.DIRECT:
            return None
        if self.verified_at is None:
            self.verified_at = now
            self.event(now, "direct_verified", f"first echo over the direct path, rtt {rtt * 1000:.2f} ms")
        return self.decide(now, direct_up)

    def decide(self, now: float, direct_up: bool) -> Path | None:
        """The path traffic should take now, when that differs from the active one."""
        if not direct_up or self.verified_at is None:
            return None
        good = self.not_worse()
        if good and self.active != Path.DIRECT:
            self.active = Path.DIRECT
            r = self.median(Path.RELAY)
            d = self.median(Path.DIRECT) or 0.0
            self.event(now, "switch_to_direct", f"direct p50 {d * 1000:.2f} ms vs relay "
                       + (f"{r * 1000:.2f} ms" if r is not None else "unmeasured"))
            return Path.DIRECT
        if not good and self.active == Path.DIRECT:
            self.active = Path.RELAY
            self.event(now, "switch_to_relay", "direct path slower than the relay")
            return Path.RELAY
        return None

    def direct_connected(self, now: float, peer: tuple[str, int] | None, how: str = "QUIC to") -> None:
        self.event(now, "direct_connected", f"{how} {peer[0]}:{peer[1]}" if peer else "")

    @property
    def dead_after(self) -> float:
        """Silence on the direct path longer than this abandons it (the keepalive's own interval
        is left out of `failover`, so that detection lands within it)."""
        return self.cfg.failover - self.cfg.keepalive

    def lost(self, now: float, reason: str) -> bool:
        """The direct path is gone: traffic is back on the relay. False once closed (nothing to do)."""
        self.active = Path.RELAY
        if self.closed:
            return False
        self.verified_at = None
        self.event(now, "direct_lost", f"{reason}; traffic continues over the relay")
        return True

    def close(self) -> None:
        self.closed = True
