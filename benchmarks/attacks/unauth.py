"""Attacks that need no credential: the flow-control gap, handshake floods, unproven connections,
datagrams held for an unproven peer, and a replayed HELLO."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import socket
import threading
import time

from qlab import wire
from qlab.certs import CONNECTOR_NAME, INTERMEDIATE_NAME

from . import login
from .common import Ctx, Figures, mb, ms, wait_for
from .harness import NotApplicable, Proc, Stack, metric, run_on_stack
from .quic import RawQuic, initials, raw_connect

GAP_ROUNDS = 9  # each round doubles the window: 2^9 MiB at the end if nothing caps it


async def _gap(ctx: Ctx, addr: tuple[str, int], server_name: str, victim: Proc) -> Figures:
    rss0 = victim.rss_kb()
    q = await raw_connect(ctx.certs, addr, server_name)
    t0 = time.monotonic()
    stream = 0
    rounds = 0
    for _ in range(GAP_ROUNDS):
        window = q.peer_stream_window(stream)
        q.stream_byte_at(stream, window - 1)
        rounds += 1
        if not await wait_for(lambda w=window: q.peer_stream_window(stream) > w or not q.open, 1.5):
            break
        if not q.open:
            break
    took = time.monotonic() - t0
    await asyncio.sleep(0.5)
    rss1 = victim.rss_kb()
    closed_at = None
    if await wait_for(lambda: not q.open, ctx.seconds):
        closed_at = time.monotonic() - t0
    sent = q.bytes_sent
    q.close()
    return [("RSS before", mb(rss0)), ("RSS after", mb(rss1)), ("RSS growth", mb(rss1 - rss0)),
            ("attacker bytes sent, handshake included", sent),
            ("one-byte frames at the window edge", f"{rounds} in {took:.1f} s"),
            ("connection closed by the role", f"after {closed_at:.1f} s" if closed_at is not None
             else f"no (still open after {ctx.seconds:.0f} s)")]


def gap_intermediate(ctx: Ctx) -> Figures:
    return run_on_stack(ctx, lambda c, s: _gap(c, s.addr, INTERMEDIATE_NAME, s.intermediate), {"connector": False})


def gap_connector(ctx: Ctx) -> Figures:
    s = Stack(ctx.work, ctx.certs)
    try:
        assert s.connector is not None
        return asyncio.run(_gap(ctx, ("127.0.0.1", s.connector_port), CONNECTOR_NAME, s.connector))
    finally:
        s.close()


# -- handshake floods ------------------------------------------------------------------------------
def _initial_pool(ctx: Ctx) -> list[bytes]:
    if "initials" not in ctx.cache:
        ctx.cache["initials"] = initials(ctx.certs, INTERMEDIATE_NAME, 2000)
    return ctx.cache["initials"]


class Flood(threading.Thread):
    """Sends `pool` cyclically at `rate` per second to `to`, from one or many 127.x sources."""

    def __init__(self, pool: list[bytes], to: tuple[str, int], rate: float, seconds: float, sources: int) -> None:
        super().__init__(daemon=True)
        self.pool, self.to, self.rate, self.seconds = pool, to, rate, seconds
        self.socks = []
        for i in range(sources):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # one source is another host than the honest Agents' 127.0.0.1
            s.bind(("127.0.0.9" if sources == 1 else f"127.{1 + i // 250}.{i % 250}.{7 + i % 3}", 0))
            self.socks.append(s)
        self.sent = 0
        self.bytes = 0

    def run(self) -> None:
        t0 = time.monotonic()
        data = itertools.cycle(self.pool)
        socks = itertools.cycle(self.socks)
        while (now := time.monotonic() - t0) < self.seconds:
            due = int(now * self.rate) - self.sent
            for _ in range(max(0, due)):
                d = next(data)
                with contextlib.suppress(OSError):
                    next(socks).sendto(d, self.to)
                self.sent += 1
                self.bytes += len(d)
            time.sleep(0.005)
        for s in self.socks:
            s.close()


async def _honest_connects(ctx: Ctx, addr: tuple[str, int], seconds: float, every: float = 0.5,
                           within: float = 2.0) -> tuple[int, int, list[float]]:
    """Honest Agents connect (handshake + HELLO) every `every` s meanwhile; ok = done within `within` s."""

    async def one(i: int) -> float | None:
        t = time.monotonic()
        try:
            a = await asyncio.wait_for(login.agent(ctx.certs, addr, f"honest{i}", timeout=within), within + 0.5)
        except Exception:
            return None
        took = time.monotonic() - t
        a.close()
        return took if took <= within else None

    tasks = []
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds - within:
        tasks.append(asyncio.ensure_future(one(i)))
        i += 1
        await asyncio.sleep(every)
    results = await asyncio.gather(*tasks)
    ok = [r for r in results if r is not None]
    return len(ok), len(results), ok


def _flood_row(ctx: Ctx, rate: float, seconds: float, sources: int, pool: list[bytes]) -> Figures:
    s = Stack(ctx.work, ctx.certs, connector=False)
    try:
        cpu0 = s.intermediate.cpu_s()
        flood = Flood(pool, s.addr, rate, seconds, sources)

        async def main() -> tuple[tuple[int, int, list[float]], bool]:
            await asyncio.sleep(0.3)  # the flood first
            during = await _honest_connects(ctx, s.addr, seconds - 0.3, every=0.25)
            flood.join()
            after = await _honest_connects(ctx, s.addr, 2.6, every=1.0)
            return during, after[0] == after[1]

        flood.start()
        (ok, n, lat), after_ok = asyncio.run(main())
        cpu = s.intermediate.cpu_s() - cpu0
        m = s.metrics()
        dropped = {k.split('"')[1]: v for k, v in m.items() if k.startswith("qlab_udp_datagrams_total")
                   and ("drop" in k or "retry" in k)}
        return [("Initials sent", f"{flood.sent} ({flood.bytes / 1e6:.2f} MB) in {seconds:.0f} s from {sources} source(s)"),
                ("honest connects ok within 2 s", f"{ok}/{n} ({100 * ok / max(1, n):.0f} %)"),
                ("honest connect p50", ms(lat)), ("connect right after the flood", "ok" if after_ok else "failed"),
                ("Intermediate CPU during (busy machine)", f"{cpu:.1f} s"),
                ("Intermediate drops and Retries (metrics)", ", ".join(f"{k}={v:g}" for k, v in dropped.items() if v) or "none"),
                ("Intermediate alive", s.intermediate.alive())]
    finally:
        s.close()


def flood_one_source(ctx: Ctx) -> Figures:
    return _flood_row(ctx, 1000, max(5.0, ctx.seconds), 1, _initial_pool(ctx))


def flood_rotating_sources(ctx: Ctx) -> Figures:
    return _flood_row(ctx, 1000, max(5.0, ctx.seconds), 500, _initial_pool(ctx))


def initials_cycled(ctx: Ctx) -> Figures:
    pool = _initial_pool(ctx)
    pool = (pool * 2)[:3000] if len(pool) < 3000 else pool
    return _flood_row(ctx, 300, 10.0, 1, pool)


# -- unproven connections ----------------------------------------------------------------------------
async def _open_many(ctx: Ctx, addr: tuple[str, int], name: str, n: int, sources: int = 1, **kw) -> list[RawQuic]:
    """`n` handshakes, 50 at a time, spread over `sources` loopback addresses."""
    conns: list[RawQuic] = []
    for start in range(0, n, 50):
        batch = await asyncio.gather(*(raw_connect(ctx.certs, addr, name, bind=_source(start + i, sources), **kw)
                                       for i in range(min(50, n - start))), return_exceptions=True)
        conns += [c for c in batch if isinstance(c, RawQuic)]
    return conns


def _source(i: int, sources: int) -> str:
    return "127.0.0.1" if sources == 1 else f"127.3.{i % sources // 250}.{1 + i % sources % 250}"


def unproven_connections(ctx: Ctx, n: int = 300) -> Figures:
    return run_on_stack(ctx, lambda c, s: _unproven(c, s, n), {"connector": False})


async def _unproven(ctx: Ctx, s: Stack, n: int) -> Figures:
    m0 = s.metrics()
    rss0 = s.intermediate.rss_kb()
    conns = await _open_many(ctx, s.addr, INTERMEDIATE_NAME, n, sources=n)  # one per source address
    await asyncio.sleep(0.5)
    rss1 = s.intermediate.rss_kb()
    m1 = s.metrics()
    t0 = time.monotonic()
    half_life = None
    while time.monotonic() - t0 < ctx.seconds:
        for c in conns:
            if c.open:
                c.ping()  # an attacker keeps them alive
        if half_life is None and sum(c.open for c in conns) <= len(conns) / 2:
            half_life = time.monotonic() - t0
        await asyncio.sleep(0.5)
    still = sum(c.open for c in conns)
    for c in conns:
        c.close()
    await asyncio.sleep(1.0)
    t1 = time.monotonic()
    one = await _open_many(ctx, s.addr, INTERMEDIATE_NAME, n, timeout=2.0)  # then all from one address
    from_one = (f"{len(one)}/{n} completed, {sum(c.open for c in one)} still open once all were tried "
                f"({time.monotonic() - t1:.0f} s)")
    for c in one:
        c.close()
    changed = sorted({k.split("{")[0] for k, v in m1.items() if v != m0.get(k, 0.0)
                      and not k.startswith("qlab_udp_datagrams_total")})
    return [("handshakes without HELLO, one per source", f"{len(conns)}/{n} completed"),
            ("Intermediate RSS per connection", f"{(rss1 - rss0) / max(1, len(conns)):.1f} kB"),
            (f"still open after {ctx.seconds:.0f} s (pinging)", f"{still}/{len(conns)}"),
            ("half closed after", f"{half_life:.1f} s" if half_life is not None else "-"),
            ("metrics that saw them", ", ".join(changed) or "none (only udp_datagrams_total)"),
            ("the same from one source", from_one)]


def held_before_proof(ctx: Ctx, n: int = 30, per_conn: int = 16) -> Figures:
    """DATAGRAM frames sent on unproven connections to the Connector's P2P port (before any
    DirectHello), as large as the Connector lets a frame be; then the Intermediate: datagrams for a
    session not yet opened, which it holds for an authenticated Agent."""
    s = Stack(ctx.work, ctx.certs)
    try:
        assert s.connector is not None
        return asyncio.run(_held(ctx, s, n, per_conn))
    finally:
        s.close()


async def _held(ctx: Ctx, s: Stack, n: int, per_conn: int) -> Figures:
    assert s.connector is not None
    rss0 = s.connector.rss_kb()
    conns = await _open_many(ctx, ("127.0.0.1", s.connector_port), CONNECTOR_NAME, n, max_datagram_size=65000)
    size = min(60000, conns[0].peer_max_datagram_frame() - 16) if conns else 0
    await asyncio.sleep(0.5)
    rss_conns = s.connector.rss_kb()
    for c in conns:
        for _ in range(per_conn):
            c.send_datagram(b"\x30" + bytes(size - 1))
    await asyncio.sleep(1.0)
    rss1 = s.connector.rss_kb()
    open_after = sum(c.open for c in conns)
    await asyncio.sleep(3.0)
    rss2 = s.connector.rss_kb()
    for c in conns:
        c.close()
    figs: Figures = [("Connector: unproven connections x datagrams", f"{len(conns)} x {per_conn} x {size} B"),
                     ("Connector RSS: the connections / their datagrams on top",
                      f"{mb(rss_conns - rss0)} / {mb(rss1 - rss_conns)}"),
                     ("the datagrams' share 3 s later", mb(rss2 - rss_conns)),
                     ("connections still open", f"{open_after}/{len(conns)}")]
    return figs + await _held_intermediate(ctx, s)


class _Tap:
    """Stands in for the Agent as its link's owner: counts relayed datagrams of one session id."""

    def __init__(self, owner, sid: int) -> None:
        self.owner, self.sid, self.got = owner, sid, 0

    def link_datagram(self, data: bytes) -> None:
        with contextlib.suppress(wire.WireError):
            if wire.decode_app(data)[0] == self.sid:
                self.got += 1
                return
        self.owner.link_datagram(data)

    def __getattr__(self, name: str):
        return getattr(self.owner, name)


async def _held_intermediate(ctx: Ctx, s: Stack, sent: int = 100) -> Figures:
    """An Agent sends `sent` relay datagrams for a session id before the OPEN_SESSION that opens
    it: the Intermediate's relayed-to-Connector counter says how many it held and replayed (the echo
    replies that come back are counted too)."""
    a = await login.agent(ctx.certs, s.addr, "holder")
    try:
        conn = a.link.conn
        assert conn is not None
        figs: Figures = []
        for delay in (0.3, 3.0):  # all sent before the OPEN_SESSION leaves
            sid = secrets.randbits(31) | 1
            tap = _Tap(a.link.owner, sid)
            a.link.owner = tap
            relayed0 = metric(s.metrics(), "relayed_datagrams_total", direction="to_connector")
            for i in range(sent):
                conn.send_datagram(wire.encode_app(sid, i.to_bytes(4, "big") + bytes(60)))
            await asyncio.sleep(delay)
            try:
                await a.link.request(wire.OpenSession(a.link.next_req(), sid, s.service, wire.NatKind.UNKNOWN, ()))
            except Exception as exc:
                raise NotApplicable(f"OPEN_SESSION with a chosen id: {exc}") from None
            await asyncio.sleep(1.5)
            a.link.owner = tap.owner
            relayed = metric(s.metrics(), "relayed_datagrams_total", direction="to_connector") - relayed0
            figs.append((f"Intermediate: held, then relayed once opened {delay:.1f} s later",
                         f"{relayed:g}/{sent} (echoed back: {tap.got})"))
        return figs
    finally:
        a.close()


# -- replay ------------------------------------------------------------------------------------------
def hello_replay(ctx: Ctx, tries: int = 3) -> Figures:
    """Record the HELLO the checkout's own Agent sends, then send those bytes as the first message
    of new connections (no secret known to the replayer)."""
    return run_on_stack(ctx, lambda c, s: _replay(c, s, tries), {"connector": False})


async def _replay(ctx: Ctx, s: Stack, tries: int) -> Figures:
    with login.HelloRecorder() as rec:
        a = await login.agent(ctx.certs, s.addr, "recorded")
    a.close()
    if not rec.hellos:
        raise NotApplicable("the checkout's client sent no wire.Hello")
    answers = []
    for _ in range(tries):
        q = await raw_connect(ctx.certs, s.addr, INTERMEDIATE_NAME)
        q.send_stream(0, rec.hellos[-1])
        await wait_for(lambda q=q: bool(q.stream_data.get(0)) or not q.open, 2.0)
        await asyncio.sleep(0.2)
        answers.append(_first_answer(bytes(q.stream_data.get(0, b""))))
        q.close()
    accepted = sum(1 for x in answers if x == "Welcome")
    return [("replayed HELLO accepted", f"{accepted}/{tries}"), ("answers", ", ".join(answers))]


def _first_answer(data: bytes) -> str:
    if not data:
        return "nothing"
    try:
        msgs = wire.ControlFramer().feed(data)
    except wire.WireError as exc:
        return f"undecodable ({exc})"
    for m in msgs:
        if isinstance(m, wire.Nack):
            return f"Nack {m.code.name.lower()}"
        if not isinstance(m, wire.ObservedAddress):
            return type(m).__name__
    return "nothing"
