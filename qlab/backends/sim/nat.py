"""qlab's own UDP NAT: one `NatSpec`, implemented as a table of bindings (sans-IO, time passed in).

It renders the same spec as the nftables rulesets of the kernel lab (../../nat/spec.py), and
matches what that lab was measured to do (shared/reference/nat-lab.md §3, §5, §6):

- mapping: EIM keys a binding on the internal ip:port, ADM adds the remote IP, APDM the remote
  ip:port (a fresh public port per new 5-tuple, as `masquerade random` does);
- filtering: EIF admits anyone to a live binding, ADF only remote IPs the inside sent to, APDF only
  remote ip:port pairs it sent to (the `permit_a` / `permit_ap` sets);
- ports: preserve the internal port when free, else a random free port (the lab's
  `udp sport @emap masquerade random` rule); sequential from `spec.sequential_base`, +1 per new
  binding, wrapping after `spec.sequential_count` and skipping ports in use; random from 1024-65535.
  One public port belongs to one binding at a time: no port overloading (RFC 4787 REQ-3);
- lifetime: a binding and each permission live `binding_timeout` seconds after the last OUTBOUND
  packet that used them; inbound packets do not refresh (RFC 4787 REQ-6, like the nft set
  `update`s, which only outbound packets run);
- unsolicited inbound packets create nothing (the lab's input `policy drop`, pitfall P1);
- hairpinning (when `spec.hairpinning`): an inside host sending to the public address reaches the
  inside owner of that public port and is seen from its own public mapping. As in the lab's
  rulesets, the hairpin path does not apply inbound filtering.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

from qlab.nat.spec import Filtering, Mapping, NatSpec, PortAllocation

Addr = tuple[str, int]

PORT_MIN = 1024  # masquerade keeps privileged and unprivileged source ports apart; we only hand out >= 1024
PORT_MAX = 65535
_RANDOM_TRIES = 64  # random picks before falling back to a scan for a free port
_PURGE_EVERY = 256  # new bindings between sweeps of expired ones


class Verdict(StrEnum):
    """Why the NAT did not pass a packet (used as the drop reason in the network's counters)."""

    NO_MAPPING = "nat_no_mapping"  # inbound to a public port with no live binding
    FILTERED = "nat_filtered"  # a live binding, but the filter does not admit this source
    PORTS_EXHAUSTED = "nat_ports_exhausted"  # no free public port for a new binding
    NO_HAIRPIN = "nat_no_hairpin"  # inside host to the public address of a NAT without hairpinning


@dataclass(eq=False)
class Binding:
    """One mapping: internal endpoint <-> public port, with its filter permissions."""

    internal: Addr
    public_port: int
    key: tuple
    created: float
    last_out: float
    permit_a: dict[str, float] = field(default_factory=dict)  # remote ip -> last outbound time
    permit_ap: dict[Addr, float] = field(default_factory=dict)  # remote ip:port -> last outbound time
    packets_out: int = 0
    packets_in: int = 0


class NatEngine:
    """The binding table of one NAT router with public address `public_ip`.

    All methods take `now` (seconds, any monotonic clock) so the engine is plain data + logic:
    the simulator passes virtual time, tests pass whatever instants they need.
    """

    def __init__(self, spec: NatSpec, public_ip: str, rng: random.Random | None = None) -> None:
        if not spec.nat:
            raise ValueError(f"NatSpec {spec.name!r} is not a NAT (nat=False); route without a NatEngine")
        self.spec = spec
        self.public_ip = public_ip
        self.rng = rng or random.Random(0)
        self._by_key: dict[tuple, Binding] = {}
        self._by_port: dict[int, Binding] = {}
        self._seq_next = 0
        self._since_purge = 0
        self.bindings_created = 0
        self.bindings_expired = 0

    # -- configuration and fault hooks --------------------------------------------------------
    @property
    def timeout(self) -> float:
        return self.spec.binding_timeout

    def set_binding_timeout(self, seconds: float) -> None:
        """Change the binding lifetime; live bindings expire `seconds` after their last outbound use."""
        self.spec = self.spec.with_timeout(seconds)

    def flush(self) -> None:
        """Forget every binding (NAT reboot / rebinding). The sequential counter restarts, as after
        an nft ruleset reload (nat-lab.md P10)."""
        self._by_key.clear()
        self._by_port.clear()
        self._seq_next = 0

    # -- packet translation -------------------------------------------------------------------
    def outbound(self, src: Addr, dst: Addr, now: float) -> Addr | Verdict:
        """Translate an inside source sending to `dst`: the public source to use, or why not.

        Creates the binding if needed and refreshes it and its permission for `dst`.
        """
        key = self._key(src, dst)
        b = self._by_key.get(key)
        if b is not None and self._expired(b, now):
            self._drop(b)
            b = None
        if b is None:
            port = self._allocate(src[1], now)
            if port is None:
                return Verdict.PORTS_EXHAUSTED
            b = Binding(src, port, key, now, now)
            self._by_key[key] = b
            self._by_port[port] = b
            self.bindings_created += 1
            self._since_purge += 1
            if self._since_purge >= _PURGE_EVERY:
                self.purge(now)
        b.last_out = now
        b.permit_a[dst[0]] = now
        b.permit_ap[dst] = now
        b.packets_out += 1
        return self.public_ip, b.public_port

    def inbound(self, src: Addr, public_port: int, now: float) -> Addr | Verdict:
        """Translate a packet from outside `src` to our public port: the inside destination, or why not.

        Never creates or refreshes state.
        """
        b = self._live(public_port, now)
        if b is None:
            return Verdict.NO_MAPPING
        if not self._admits(b, src, now):
            return Verdict.FILTERED
        b.packets_in += 1
        return b.internal

    def hairpin(self, src: Addr, public_port: int, now: float) -> tuple[Addr, Addr] | Verdict:
        """An inside `src` sending to (public_ip, public_port): (public source, inside destination)."""
        if not self.spec.hairpinning:
            return Verdict.NO_HAIRPIN
        target = self._live(public_port, now)
        if target is None:
            return Verdict.NO_MAPPING
        mapped = self.outbound(src, (self.public_ip, public_port), now)
        if isinstance(mapped, Verdict):
            return mapped
        target.packets_in += 1
        return mapped, target.internal

    # -- inspection ---------------------------------------------------------------------------
    def bindings(self, now: float | None = None) -> list[Binding]:
        """Live bindings (all stored ones when `now` is None), oldest first."""
        out = list(self._by_key.values())
        if now is not None:
            out = [b for b in out if not self._expired(b, now)]
        return sorted(out, key=lambda b: (b.created, b.public_port))

    def mapped_port(self, internal: Addr, dst: Addr, now: float) -> int | None:
        """The public port `internal` would use towards `dst` right now, without creating one."""
        b = self._by_key.get(self._key(internal, dst))
        return None if b is None or self._expired(b, now) else b.public_port

    def purge(self, now: float) -> int:
        """Drop expired bindings; returns how many. Lookups expire lazily, this bounds memory."""
        dead = [b for b in self._by_key.values() if self._expired(b, now)]
        for b in dead:
            self._drop(b)
        self._since_purge = 0
        return len(dead)

    # -- internals ----------------------------------------------------------------------------
    def _key(self, src: Addr, dst: Addr) -> tuple:
        m = self.spec.mapping
        if m is Mapping.EIM:
            return src
        if m is Mapping.ADM:
            return (src, dst[0])
        return (src, dst)

    def _expired(self, b: Binding, now: float) -> bool:
        return now - b.last_out >= self.spec.binding_timeout

    def _drop(self, b: Binding) -> None:
        self._by_key.pop(b.key, None)
        if self._by_port.get(b.public_port) is b:
            del self._by_port[b.public_port]
        self.bindings_expired += 1

    def _live(self, port: int, now: float) -> Binding | None:
        b = self._by_port.get(port)
        if b is not None and self._expired(b, now):
            self._drop(b)
            return None
        return b

    def _admits(self, b: Binding, src: Addr, now: float) -> bool:
        f = self.spec.filtering
        if f is Filtering.EIF:
            return True
        t = b.permit_a.get(src[0]) if f is Filtering.ADF else b.permit_ap.get(src)
        return t is not None and now - t < self.spec.binding_timeout

    def _free(self, port: int, now: float) -> bool:
        return self._live(port, now) is None

    def _allocate(self, internal_port: int, now: float) -> int | None:
        alloc = self.spec.ports
        if alloc is PortAllocation.SEQUENTIAL:
            base, count = self.spec.sequential_base, self.spec.sequential_count
            for _ in range(count):
                port = base + self._seq_next % count
                self._seq_next += 1
                if self._free(port, now):
                    return port
            return None
        if alloc is PortAllocation.PRESERVE and self._free(internal_port, now):
            return internal_port
        for _ in range(_RANDOM_TRIES):
            port = self.rng.randint(PORT_MIN, PORT_MAX)
            if self._free(port, now):
                return port
        start = self.rng.randint(PORT_MIN, PORT_MAX)
        span = PORT_MAX - PORT_MIN + 1
        for i in range(span):
            port = PORT_MIN + (start - PORT_MIN + i) % span
            if self._free(port, now):
                return port
        return None
