"""`qlab lab check`: does a kernel lab that is up do what its spec and profile say?

For every NAT router whose WAN is the internet, the check measures, with plain UDP sockets made in
the lab's namespaces (none of qlab's roles or probes take part):
- mapping: one inside socket towards three destinations (two addresses, two ports);
- port allocation: new mappings' public ports (preserved, counting up, or neither);
- filtering: who may send to a fresh mapping (the same address and port, the same address from
  another port, another address);
- hairpinning: an inside socket to the public mapping of another socket of the same host, and of
  another host of the same LAN where the LAN has one; the receiver must see the public mapping;
- refresh: with a 2 s binding timeout, whether inbound packets alone keep a mapping alive
  (it is put back afterwards);
and for the links, ICMP round trips with the kernel's timestamps (see `icmp.py`) between the
Agent's site, the Connector's site and the Intermediate, compared with what the profile gives those
round trips (the link model's own p50 and p95, `expected_rtt_ms`): p50 within ±5 % or ±1 ms (the
larger), p95 at most 3 ms above.

The check measures the rulesets as they are loaded (it reloads one only to shorten and then restore
the binding timeout for the refresh check): run it on a lab no trial is using.
"""

from __future__ import annotations

import functools
import math
import random
import select
import socket
import time
from dataclasses import dataclass

from qlab.backends.netns.icmp import RttSamples, ping
from qlab.backends.netns.lab import Lab
from qlab.nat.spec import Filtering, Mapping, PortAllocation
from qlab.scenario.linkmodel import LinkModel
from qlab.scenario.profiles import LinkProfile
from qlab.scenario.topology import INTERMEDIATE_IPS, INTERNET

I1, I2 = INTERMEDIATE_IPS
REFLECTOR_PORTS = (3478, 3479)  # free on the Intermediate's host: qlab listens on 4433/4434
REFRESH_TIMEOUT_S = 2  # whole seconds: the kernel's set timeouts have that granularity


@dataclass(frozen=True)
class CheckRow:
    """One verdict: `subject` (a router or a path) and `check`, what the spec or profile says and
    what was measured."""

    subject: str
    check: str
    expected: str
    measured: str
    ok: bool

    def to_dict(self) -> dict:
        return {"subject": self.subject, "check": self.check, "expected": self.expected,
                "measured": self.measured, "ok": self.ok}


# -- UDP helpers ---------------------------------------------------------------------------------
def _recv(sock: socket.socket, timeout: float) -> tuple[bytes, tuple[str, int]] | None:
    ready, _, _ = select.select([sock], [], [], timeout)
    return sock.recvfrom(2048) if ready else None


def _recv_tagged(sock: socket.socket, tag: bytes, timeout: float) -> tuple[str, int] | None:
    """The source of the first datagram carrying `tag` within `timeout` (others are stale)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        got = _recv(sock, left)
        if got is None:
            return None
        if got[0] == tag:
            return got[1]
    return None


class _Reflectors:
    """UDP sockets on the Intermediate's two addresses and two ports: what a STUN server sees."""

    def __init__(self, lab: Lab) -> None:
        self.socks: dict[tuple[str, int], socket.socket] = {}
        for ip in (I1, I2):
            for port in REFLECTOR_PORTS:
                s = lab.socket("intermediate")
                s.bind((ip, port))
                self.socks[(ip, port)] = s
        self._n = 0

    def mapped(self, inside: socket.socket, target: tuple[str, int], timeout: float = 2.0) -> tuple[str, int]:
        """The public source the reflector at `target` sees for `inside`."""
        self._n += 1
        tag = b"map%d" % self._n
        inside.sendto(tag, target)
        src = _recv_tagged(self.socks[target], tag, timeout)
        if src is None:
            raise RuntimeError(f"nothing from the inside socket reached {target[0]}:{target[1]}")
        return src

    def send(self, frm: tuple[str, int], to: tuple[str, int], tag: bytes) -> None:
        self.socks[frm].sendto(tag, to)

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


def _verdict_mapping(ports: dict[tuple[str, int], tuple[str, int]]) -> str:
    a, b, c = ports[(I1, 3478)], ports[(I2, 3478)], ports[(I1, 3479)]
    if a == b == c:
        return Mapping.EIM.value
    if a == c:
        return Mapping.ADM.value
    return Mapping.APDM.value


# -- the checks ------------------------------------------------------------------------------------
def check_nat(lab: Lab, router: str, refl: _Reflectors, *, refresh: bool = True) -> list[CheckRow]:
    r = lab.topology.router(router)
    spec = lab.spec(router)
    inside_hosts = [h.name for h in lab.topology.hosts if h.segment == r.lan_segment]
    host = inside_hosts[0]
    rows: list[CheckRow] = []

    def row(check: str, expected: str, measured: str) -> None:
        rows.append(CheckRow(router, check, expected, measured, expected == measured))

    # mapping: one socket, three destinations
    s = lab.socket(host)
    s.bind(("0.0.0.0", 0))
    local_port = s.getsockname()[1]
    seen = {t: refl.mapped(s, t) for t in ((I1, 3478), (I2, 3478), (I1, 3479))}
    row("mapping", spec.mapping.value, _verdict_mapping(seen))
    row("public address", r.wan_ip, ",".join(sorted({a[0] for a in seen.values()})))
    row("port allocation", spec.ports.value, _port_allocation(lab, host, refl, spec.mapping, local_port,
                                                              [a[1] for a in seen.values()]))
    s.close()
    row("filtering", spec.filtering.value, _filtering(lab, host, refl))
    # hairpinning: same host, and another host of the LAN
    pairs = [("same host", host, host)] + ([("two hosts", host, inside_hosts[1])] if len(inside_hosts) > 1 else [])
    for label, ha, hb in pairs:
        row(f"hairpin ({label})", "yes" if spec.hairpinning else "no", _hairpin(lab, ha, hb, refl, r.wan_ip))
    if refresh:
        rows.append(_check_refresh(lab, router, host, refl))
    return rows


def _port_allocation(lab: Lab, host: str, refl: _Reflectors, mapping: Mapping, local_port: int,
                     ports: list[int]) -> str:
    """The first mapping of fresh sockets (EIM), or of new flows of one socket (ADM/APDM)."""
    if mapping == Mapping.EIM:
        fresh = []
        for _ in range(3):
            f = lab.socket(host)
            f.bind(("0.0.0.0", 0))
            fresh.append((f.getsockname()[1], refl.mapped(f, (I1, 3478))[1]))
            f.close()
        preserved = all(lp == pp for lp, pp in [(local_port, ports[0]), *fresh])
        return PortAllocation.PRESERVE.value if preserved else "other"
    steps = [b - a for a, b in zip(ports, ports[1:], strict=False)]
    if all(d == 1 for d in steps):
        return PortAllocation.SEQUENTIAL.value
    if local_port in ports:
        return PortAllocation.PRESERVE.value
    return PortAllocation.RANDOM.value


def _filtering(lab: Lab, host: str, refl: _Reflectors) -> str:
    """Which reflectors get into a fresh mapping that has sent to (I1, 3478) only."""
    f = lab.socket(host)
    f.bind(("0.0.0.0", 0))
    m = refl.mapped(f, (I1, 3478))
    admitted = {}
    for src, tag in (((I1, 3478), b"same"), ((I1, 3479), b"port"), ((I2, 3478), b"addr")):
        refl.send(src, m, tag)
        admitted[tag] = _recv_tagged(f, tag, 0.5) is not None
    f.close()
    if not admitted[b"same"]:
        return "nothing admitted"
    if admitted[b"addr"]:
        return Filtering.EIF.value
    if admitted[b"port"]:
        return Filtering.ADF.value
    return Filtering.APDF.value


def _hairpin(lab: Lab, ha: str, hb: str, refl: _Reflectors, wan_ip: str) -> str:
    """Two sockets (of one host or two) send to each other's public mapping, as in a punch."""
    a, b = lab.socket(ha), lab.socket(hb)
    a.bind(("0.0.0.0", 0))
    b.bind(("0.0.0.0", 0))
    ma, mb = refl.mapped(a, (I1, 3478)), refl.mapped(b, (I1, 3478))
    for _ in range(3):  # both send (filtering NATs admit only answered peers)
        a.sendto(b"hp-a", mb)
        b.sendto(b"hp-b", ma)
    hairpin_src = _recv_tagged(b, b"hp-a", 0.5)
    a.close()
    b.close()
    if hairpin_src is None:
        return "no"
    if hairpin_src[0] == wan_ip:
        return "yes"
    return f"yes, but seen from {hairpin_src[0]}:{hairpin_src[1]}"


def _check_refresh(lab: Lab, router: str, host: str, refl: _Reflectors) -> CheckRow:
    """Only inbound packets for 2.5 binding timeouts: a mapping refreshed by outbound traffic only
    is gone by then; one refreshed both ways still admits."""
    spec = lab.spec(router)
    original = spec.binding_timeout
    lab.set_binding_timeout(router, REFRESH_TIMEOUT_S)
    lab.flush_nat(router)  # a reloaded sequential counter would reuse the ports of live flows
    try:
        s = lab.socket(host)
        s.bind(("0.0.0.0", 0))
        m = refl.mapped(s, (I1, 3478))
        end = time.monotonic() + 2.5 * REFRESH_TIMEOUT_S
        n = 0
        last_ok = True
        while time.monotonic() < end:
            n += 1
            tag = b"in%d" % n
            refl.send((I1, 3478), m, tag)
            last_ok = _recv_tagged(s, tag, 0.25) is not None
            time.sleep(0.1)
        s.close()
    finally:
        lab.set_binding_timeout(router, original)
    measured = "both" if last_ok else "outbound"
    return CheckRow(router, "refresh", spec.refresh.value, measured, spec.refresh.value == measured)


@dataclass(frozen=True)
class ProbePath:
    """A path a trial uses, probed with ICMP from `host` to `dst` across two access links."""

    label: str
    host: str
    dst: str
    near: LinkProfile
    far: LinkProfile

    @property
    def configured_ms(self) -> float:
        """The round trip from the configured base delays (jitter aside)."""
        return 2 * (self.near.delay_ms + self.far.delay_ms)

    @property
    def loss(self) -> float:
        return 1 - ((1 - self.near.loss) * (1 - self.far.loss)) ** 2


def _site_target(lab: Lab, host: str) -> str:
    """The address that answers for a host's site: its router's WAN, or the host itself when public."""
    router = lab.topology.router_of(host)
    if router is not None and router.wan_segment == INTERNET:
        return router.wan_ip
    return lab.topology.host(host).ip


def probe_paths(lab: Lab) -> list[ProbePath]:
    """Agent site <-> Connector site, and each <-> the Intermediate (one path on a shared LAN)."""
    prof = lab.topology.profile
    paths = [
        ProbePath("agent -> connector site (direct path)", "agent", _site_target(lab, "connector"),
                  prof.agent, prof.connector),
        ProbePath("agent -> intermediate", "agent", I1, prof.agent, prof.intermediate),
        ProbePath("connector -> intermediate", "connector", I1, prof.connector, prof.intermediate),
    ]
    return paths[1:2] if lab.topology.scenario == "same_lan" else paths


def measure(lab: Lab, path: ProbePath, *, samples: int = 100, interval: float = 0.02) -> RttSamples:
    sock = lab.socket(path.host, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        return ping(sock, path.dst, count=samples, interval=interval)
    finally:
        sock.close()


@functools.cache
def expected_rtt_ms(near: LinkProfile, far: LinkProfile, qs: tuple[float, ...] = (0.5, 0.95),
                    samples: int = 20000) -> tuple[float, ...]:
    """Quantiles (ms) of the round trip across `near` and `far` that the profile itself gives:
    a delay from each of the four link directions a probe crosses, drawn by the same model as the
    wires, over `samples` seeded round trips (so jitter of any distribution, correlation and
    reordering count as the wires apply them). Quantiles are taken as `RttSamples.quantile` does."""
    rng = random.Random("qlab-labcheck-expected")
    legs = [LinkModel(link, rng) for link in (near, far, far, near)]
    rtts = sorted(1000.0 * math.fsum(leg.delay() for leg in legs) for _ in range(samples))
    return tuple(rtts[round(q * (samples - 1))] for q in qs)


def rtt_tolerance_ms(configured: float) -> float:
    """The p50 tolerance: ±5 % or ±1 ms, whichever is larger."""
    return max(0.05 * configured, 1.0)


@dataclass(frozen=True)
class RttBounds:
    """How far a path's RTT may be from what its profile gives (`expected_rtt_ms`): p50 within ±5 %
    or ±1 ms (`p50_ms` overrides both sides, `p50_above_ms` the upper one), p95 at most
    `p95_slack_ms` above the profile's p95. The defaults are the lab's target on a quiet machine
    (benchmarks/wire.py measures it). A busy or virtual host only adds delay, so tests keep the
    lower bound tight and the upper ones loose: links without the profile, or with another one,
    still fail."""

    p50_ms: float | None = None
    p50_above_ms: float | None = None
    p95_slack_ms: float = 3.0

    def p50_range(self, expected: float) -> tuple[float, float]:
        below = self.p50_ms if self.p50_ms is not None else rtt_tolerance_ms(expected)
        above = self.p50_above_ms if self.p50_above_ms is not None else below
        return expected - below, expected + above


def _path_rows(path: ProbePath, r: RttSamples, samples: int, note: str, bounds: RttBounds) -> list[CheckRow]:
    label, loss = path.label, path.loss
    p50, p95 = expected_rtt_ms(path.near, path.far)
    if r.p50 is None or r.p95 is None:
        return [CheckRow(label, "rtt", f"{p50:.4g} ms", "no reply" + note, False)]
    (lo, hi), p95_max = bounds.p50_range(p50), p95 + bounds.p95_slack_ms
    expected = f"{p50:.4g} ± {hi - p50:.2g} ms" if hi - p50 == p50 - lo else f"{lo:.3g} to {hi:.3g} ms"
    # loss within 4 standard deviations of the configured rate (and one packet)
    slack = 4 * math.sqrt(max(samples * loss * (1 - loss), 1.0)) + 1
    return [
        CheckRow(label, "rtt p50", expected, f"{r.p50:.2f} ms{note}", lo <= r.p50 <= hi),
        CheckRow(label, "rtt p95", f"<= {p95_max:.4g} ms", f"{r.p95:.2f} ms{note}", r.p95 <= p95_max),
        CheckRow(label, "loss", f"{loss:.1%}", f"{r.lost / samples:.1%}{note}",
                 abs(r.lost - loss * samples) <= slack),
    ]


def check_links(lab: Lab, *, samples: int = 100, interval: float = 0.02, rounds: int = 3,
                bounds: RttBounds = RttBounds()) -> list[CheckRow]:
    """ICMP round trips on the paths a trial uses, against the profile.

    A path whose round fails is measured again, up to `rounds` rounds, and its rows say which round
    they come from: a burst of load elsewhere on the host can delay a few percent of one round's
    samples (enough to move a p95), while links that do not have the profile fail every round."""
    rows = []
    for path in probe_paths(lab):
        for k in range(1, rounds + 1):
            note = f" (round {k} of {rounds})" if k > 1 else ""
            found = _path_rows(path, measure(lab, path, samples=samples, interval=interval), samples, note, bounds)
            if all(r.ok for r in found):
                break
        rows += found
    return rows


def check(lab: Lab, *, samples: int = 100, refresh: bool = True, rounds: int = 3,
          bounds: RttBounds = RttBounds()) -> list[CheckRow]:
    """Every NAT against its spec, then every path against the profile."""
    rows: list[CheckRow] = []
    refl = _Reflectors(lab)
    try:
        for r in lab.topology.routers:
            if r.wan_segment != INTERNET:
                rows.append(CheckRow(r.name, "nat", "checked", "not checked: behind another NAT", True))
                continue
            rows += check_nat(lab, r.name, refl, refresh=refresh)
    finally:
        refl.close()
    rows += check_links(lab, samples=samples, rounds=rounds, bounds=bounds)
    return rows


def format_table(rows: list[CheckRow]) -> str:
    head = ("subject", "check", "expected", "measured", "")
    body = [(r.subject, r.check, r.expected, r.measured, "ok" if r.ok else "FAIL") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in [head, *body]]
    bad = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - bad} of {len(rows)} checks passed" + (f"; {bad} FAILED" if bad else ""))
    return "\n".join(lines)
