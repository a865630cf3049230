"""The simulator's IPv6 firewall: `qlab.nat.firewall6.Firewall6Spec` as a flow table.

What the kernel lab's `table ip6 qlab_fw6` does with conntrack: an outbound packet is forwarded
and creates or refreshes the flow (inside ip:port, remote ip:port); an inbound packet is forwarded
only when its flow is live, and refreshes it; a dropped packet creates nothing. `open` forwards
everything. Plain data and logic: every call takes `now`.
"""

from __future__ import annotations

from qlab.nat.firewall6 import Filter6, Firewall6Spec

Addr = tuple[str, int]
MAX_FLOWS = 65536  # conntrack's table is bounded too
_PURGE_EVERY = 256


class FirewallEngine:
    def __init__(self, spec: Firewall6Spec) -> None:
        self.spec = spec
        self._flows: dict[tuple[Addr, Addr], float] = {}  # (inside, remote) -> last packet
        self._since_purge = 0

    def outbound(self, inside: Addr, remote: Addr, now: float) -> bool:
        """An inside host sends to `remote`: always forwarded; False only when the table is full."""
        if self.spec.filtering is Filter6.OPEN:
            return True
        key = (inside, remote)
        if key not in self._flows:
            self._since_purge += 1
            if self._since_purge >= _PURGE_EVERY or len(self._flows) >= MAX_FLOWS:
                self.purge(now)
            if len(self._flows) >= MAX_FLOWS:
                return False
        self._flows[key] = now
        return True

    def inbound(self, remote: Addr, inside: Addr, now: float) -> bool:
        """`remote` sends to an inside host: forwarded only within a live flow, which it refreshes."""
        if self.spec.filtering is Filter6.OPEN:
            return True
        key = (inside, remote)
        last = self._flows.get(key)
        if last is None or now - last >= self.spec.timeout:
            self._flows.pop(key, None)
            return False
        self._flows[key] = now
        return True

    def purge(self, now: float) -> int:
        dead = [k for k, t in self._flows.items() if now - t >= self.spec.timeout]
        for k in dead:
            del self._flows[k]
        self._since_purge = 0
        return len(dead)

    def flows(self, now: float) -> list[tuple[Addr, Addr]]:
        """The live flows (inside, remote)."""
        return [k for k, t in self._flows.items() if now - t < self.spec.timeout]

    def flush(self) -> None:
        self._flows.clear()
