"""qlab's own UDP NAT: one `NatSpec`, implemented as a table of bindings (sans-IO, time passed in).

It renders the same spec as the nftables rulesets of the kernel lab (../../nat/spec.py), and
matches what that lab was measured to do (docs/netns-lab.md):

- mapping: EIM keys a binding on the internal ip:port, ADM adds the remote IP, APDM the remote
  ip:port (a fresh public port per new 5-tuple, as `masquerade random` does);
- filtering: EIF admits anyone to a live binding, ADF only remote IPs the inside sent to, APDF only
  remote ip:port pairs it sent to (the `permit_a` / `permit_ap` sets);
- ports: preserve the internal port when free, else a random free port (the lab's
  `udp sport @emap masquerade random` rule); random from 1024-65535; for these one public port
  belongs to one binding at a time: no port overloading (RFC 4787 REQ-3). Sequential: the k-th new
  binding of a counter (one per NAT or one per inside address, `spec.sequential_scope`) takes
  `sequential_base + k mod sequential_count`, as the lab's `numgen inc` does. After the wrap that
  port may still be bound: an APDM binding to another remote shares it (conntrack only needs the
  5-tuple unique); towards the same remote the packet is dropped (`nat_port_clash`, the kernel's
  failed conntrack insert) and the counter has moved on, so the next packet takes the next port;
- lifetime: a binding and each permission live `binding_timeout` seconds after the last packet that
  `spec.refresh` names: outbound packets always, admitted inbound ones too with `Refresh.BOTH`
  (RFC 4787 REQ-6; in the lab, the nft set `update`s those packets run);
- unsolicited inbound packets create nothing (the lab's input `policy drop`, pitfall P1);
- hairpinning (when `spec.hairpinning`): an inside host sending to the public address reaches the
  inside owner of that public port and is seen from its own public mapping. As in the lab's
  rulesets, the hairpin path does not apply inbound filtering;
- explicit mappings (port mapping protocols, `add_explicit`): a public port redirected to an inside
  endpoint for a lifetime, as the daemon's DNAT rule in the lab. A packet from anyone to it that no
  binding admits is let in and opens a flow (a conntrack entry in the lab): the inside endpoint's
  packets to that remote leave from the redirected port while the flow lives. When the inside
  endpoint already has a flow of its own to that remote (its reply tuple would clash), the remote is
  shown inside under another port, an alias, as the kernel resolves the clash (measured in the lab:
  the daemon's DNAT flow then carries the alias, the older flow keeps its port); packets to the
  alias go to the real remote from the redirected port (`inbound_from`, `outbound_to`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum

from qlab.nat.spec import CounterScope, Filtering, Mapping, NatSpec, PortAllocation, Refresh

Addr = tuple[str, int]
BindingKey = Addr | tuple[Addr, str] | tuple[Addr, Addr]  # by mapping: EIM, ADM, APDM

PORT_MIN = 1024  # masquerade keeps privileged and unprivileged source ports apart; we only hand out >= 1024
PORT_MAX = 65535
_RANDOM_TRIES = 64  # random picks before falling back to a scan for a free port
_PURGE_EVERY = 256  # new bindings between sweeps of expired ones
MAX_FLOWS = 65536  # flows opened through explicit mappings (conntrack's table is bounded too)


class Verdict(StrEnum):
    """Why the NAT did not pass a packet (used as the drop reason in the network's counters)."""

    NO_MAPPING = "nat_no_mapping"  # inbound to a public port with no live binding
    FILTERED = "nat_filtered"  # a live binding, but the filter does not admit this source
    PORTS_EXHAUSTED = "nat_ports_exhausted"  # no free public port for a new binding
    PORT_CLASH = "nat_port_clash"  # the sequential counter's port is bound to this remote already
    NO_HAIRPIN = "nat_no_hairpin"  # inside host to the public address of a NAT without hairpinning


@dataclass(eq=False)
class Explicit:
    """A public port redirected to an inside endpoint until `expires` (a port mapping)."""

    internal: Addr
    public_port: int
    expires: float


@dataclass(eq=False)
class Binding:
    """One mapping: internal endpoint <-> public port, with its filter permissions."""

    internal: Addr
    public_port: int
    key: BindingKey
    created: float
    last_refresh: float  # the last packet that refreshed it (see NatSpec.refresh)
    permit_a: dict[str, float] = field(default_factory=dict)  # remote ip -> last refresh
    permit_ap: dict[Addr, float] = field(default_factory=dict)  # remote ip:port -> last refresh
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
        self._by_key: dict[BindingKey, Binding] = {}
        self._by_port: dict[int, list[Binding]] = {}  # several only for sequential APDM after a wrap
        self._seq_next: dict[str | None, int] = {}  # counter scope (None: the NAT, else inside ip) -> k
        self._explicit: dict[int, Explicit] = {}  # public port -> explicit mapping
        self._flows: dict[tuple[Addr, Addr], tuple[int, float]] = {}  # (internal, remote seen) -> (port, last)
        self._aliases: dict[tuple[Addr, Addr], Addr] = {}  # (internal, alias) -> the real remote
        self._alias_of: dict[tuple[Addr, Addr], Addr] = {}  # (internal, real remote) -> alias
        self._since_purge = 0
        self.bindings_created = 0
        self.bindings_expired = 0

    # -- configuration and fault hooks --------------------------------------------------------
    @property
    def timeout(self) -> float:
        return self.spec.binding_timeout

    def set_binding_timeout(self, seconds: float) -> None:
        """Change the binding lifetime; live bindings expire `seconds` after their last refresh."""
        self.spec = self.spec.with_timeout(seconds)

    def flush(self) -> None:
        """Forget every binding (NAT reboot / rebinding). The sequential counter restarts, as after
        an nft ruleset reload does in the kernel lab."""
        self._by_key.clear()
        self._by_port.clear()
        self._seq_next.clear()
        self._flows.clear()
        self._aliases.clear()
        self._alias_of.clear()

    # -- packet translation -------------------------------------------------------------------
    def outbound_to(self, src: Addr, dst: Addr, now: float) -> tuple[Addr, Addr] | Verdict:
        """`outbound`, and the real destination (`dst` unless it is an alias of a remote)."""
        real = self._aliases.get((src, dst)) if self._aliases else None
        mapped = self.outbound(src, dst, now)
        return mapped if isinstance(mapped, Verdict) else (mapped, real or dst)

    def outbound(self, src: Addr, dst: Addr, now: float) -> Addr | Verdict:
        """Translate an inside source sending to `dst`: the public source to use, or why not.

        Creates the binding if needed and refreshes it and its permission for `dst`. A flow opened
        through an explicit mapping answers from the mapped port.
        """
        flow = self._flow(src, dst, now)
        if flow is not None:
            return self.public_ip, flow
        key = self._key(src, dst)
        b = self._by_key.get(key)
        if b is not None and self._expired(b, now):
            self._drop(b)
            b = None
        if b is None:
            port = self._allocate(src, dst, now)
            if isinstance(port, Verdict):
                return port
            b = Binding(src, port, key, now, now)
            self._by_key[key] = b
            self._by_port.setdefault(port, []).append(b)
            self.bindings_created += 1
            self._since_purge += 1
            if self._since_purge >= _PURGE_EVERY:
                self.purge(now)
        self._refresh(b, dst, now)
        b.packets_out += 1
        return self.public_ip, b.public_port

    def inbound(self, src: Addr, public_port: int, now: float) -> Addr | Verdict:
        """Translate a packet from outside `src` to our public port: the inside destination, or why not."""
        res = self.inbound_from(src, public_port, now)
        return res if isinstance(res, Verdict) else res[0]

    def inbound_from(self, src: Addr, public_port: int, now: float) -> tuple[Addr, Addr] | Verdict:
        """Translate a packet from outside `src` to our public port: (inside destination, source as
        seen inside), or why not.

        Creates no binding (an explicit mapping opens a flow); refreshes the binding and `src`'s
        permission when `spec.refresh` is BOTH.
        """
        live = self._live(public_port, now)
        b = next((b for b in live if self._admits(b, src, now)), None)
        if b is None:
            return self._inbound_explicit(src, public_port, now) or (Verdict.FILTERED if live else Verdict.NO_MAPPING)
        if self.spec.refresh is Refresh.BOTH:
            self._refresh(b, src, now)
        b.packets_in += 1
        return b.internal, src

    def hairpin(self, src: Addr, public_port: int, now: float) -> tuple[Addr, Addr] | Verdict:
        """An inside `src` sending to (public_ip, public_port): (public source, inside destination)."""
        if not self.spec.hairpinning:
            return Verdict.NO_HAIRPIN
        live = self._live(public_port, now)
        if not live:
            return Verdict.NO_MAPPING
        target = live[-1]
        mapped = self.outbound(src, (self.public_ip, public_port), now)
        if isinstance(mapped, Verdict):
            return mapped
        target.packets_in += 1
        return mapped, target.internal

    # -- explicit mappings (what a port mapping protocol asks for) ------------------------------
    def add_explicit(self, internal: Addr, public_port: int, lifetime: float, now: float) -> int | None:
        """Redirect `public_port` to `internal` for `lifetime` seconds (renewing if it already is);
        None when the port belongs to another inside endpoint."""
        cur = self._explicit.get(public_port)
        if cur is not None and cur.internal != internal and cur.expires > now:
            return None
        self._explicit[public_port] = Explicit(internal, public_port, now + lifetime)
        return public_port

    def remove_explicit(self, internal: Addr, public_port: int) -> None:
        cur = self._explicit.get(public_port)
        if cur is not None and cur.internal == internal:
            del self._explicit[public_port]

    def explicit(self, now: float) -> list[Explicit]:
        """The live explicit mappings."""
        return [e for e in self._explicit.values() if e.expires > now]

    def _inbound_explicit(self, src: Addr, public_port: int, now: float) -> tuple[Addr, Addr] | None:
        e = self._explicit.get(public_port)
        if e is None or e.expires <= now:
            return None
        seen = self._alias_of.get((e.internal, src), src)
        if (e.internal, seen) not in self._flows and len(self._flows) >= MAX_FLOWS:
            self._purge_flows(now)
            if len(self._flows) >= MAX_FLOWS:
                return None  # full: no flow, and no alias that no flow would ever release
        if seen == src and self._has_flow_to(e.internal, src, now):
            seen = self._new_alias(e.internal, src)
        self._flows[(e.internal, seen)] = (public_port, now)
        return e.internal, seen

    def _has_flow_to(self, internal: Addr, remote: Addr, now: float) -> bool:
        """Whether `internal` sent to `remote` within the binding lifetime (a conntrack entry)."""
        b = self._by_key.get(self._key(internal, remote))
        t = b.permit_ap.get(remote) if b is not None else None
        return t is not None and now - t < self.spec.binding_timeout

    def _new_alias(self, internal: Addr, remote: Addr) -> Addr:
        alias = (remote[0], self.rng.randint(PORT_MIN, PORT_MAX))
        while (internal, alias) in self._aliases or alias == remote:
            alias = (remote[0], self.rng.randint(PORT_MIN, PORT_MAX))
        self._aliases[(internal, alias)] = remote
        self._alias_of[(internal, remote)] = alias
        return alias

    def _flow(self, internal: Addr, remote: Addr, now: float) -> int | None:
        if not self._flows:
            return None
        f = self._flows.get((internal, remote))
        if f is None:
            return None
        if now - f[1] >= self.spec.binding_timeout:
            del self._flows[(internal, remote)]
            return None
        self._flows[(internal, remote)] = (f[0], now)
        return f[0]

    def _purge_flows(self, now: float) -> None:
        for k in [k for k, (_, t) in self._flows.items() if now - t >= self.spec.binding_timeout]:
            del self._flows[k]
            real = self._aliases.pop(k, None)
            if real is not None:
                self._alias_of.pop((k[0], real), None)

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
    def _key(self, src: Addr, dst: Addr) -> BindingKey:
        m = self.spec.mapping
        if m is Mapping.EIM:
            return src
        if m is Mapping.ADM:
            return (src, dst[0])
        return (src, dst)

    def _expired(self, b: Binding, now: float) -> bool:
        return now - b.last_refresh >= self.spec.binding_timeout

    def _refresh(self, b: Binding, remote: Addr, now: float) -> None:
        b.last_refresh = now
        b.permit_a[remote[0]] = now
        b.permit_ap[remote] = now

    def _drop(self, b: Binding) -> None:
        if self._by_key.get(b.key) is b:
            del self._by_key[b.key]
        on_port = self._by_port.get(b.public_port, [])
        if b in on_port:
            on_port.remove(b)
            if not on_port:
                del self._by_port[b.public_port]
        self.bindings_expired += 1

    def _live(self, port: int, now: float) -> list[Binding]:
        """The live bindings on a public port, oldest first (expired ones are dropped on the way)."""
        for b in [b for b in self._by_port.get(port, []) if self._expired(b, now)]:
            self._drop(b)
        return list(self._by_port.get(port, []))

    def _admits(self, b: Binding, src: Addr, now: float) -> bool:
        f = self.spec.filtering
        if f is Filtering.EIF:
            return True
        t = b.permit_a.get(src[0]) if f is Filtering.ADF else b.permit_ap.get(src)
        return t is not None and now - t < self.spec.binding_timeout

    def _free(self, port: int, now: float) -> bool:
        e = self._explicit.get(port)
        return not self._live(port, now) and (e is None or e.expires <= now)

    def _allocate(self, src: Addr, dst: Addr, now: float) -> int | Verdict:
        alloc = self.spec.ports
        if alloc is PortAllocation.SEQUENTIAL:
            scope = src[0] if self.spec.sequential_scope is CounterScope.HOST else None
            k = self._seq_next.get(scope, 0)
            self._seq_next[scope] = k + 1
            port = self.spec.sequential_base + k % self.spec.sequential_count
            live = self._live(port, now)
            # an APDM binding is told apart by its remote, any other owns the whole port
            if any(self.spec.mapping is not Mapping.APDM or b.key[1] == dst for b in live):
                return Verdict.PORT_CLASH
            return port
        internal_port = src[1]
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
        return Verdict.PORTS_EXHAUSTED
