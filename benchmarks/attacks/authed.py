"""Attacks by holders of a credential: an Agent's (candidates, sessions, rate limits, migration,
id probing) or a Connector's (rogue ANNOUNCE, service takeover). Clients are the checkout's own
(`login`); only what they send is chosen by the attacker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from typing import Any

from qlab import wire
from qlab.roles.agent import ping

from . import login
from .common import Ctx, Figures, mb, wrap_socket
from .harness import NotApplicable, Stack, metric, run_on_stack
from .quic import Victim

PUNCH_WAIT = 4.5  # a punch gives up after 3 s; what it sends by then is what a session costs


def _victim_candidates(victim: Victim, kind: wire.CandidateKind = wire.CandidateKind.HOST) -> tuple:
    return tuple(wire.Candidate(kind, addr, (126 << 24) | ((65535 - i) << 8) | 255)
                 for i, addr in enumerate(victim.addrs))


# -- reflection ------------------------------------------------------------------------------------
def victim_candidates(ctx: Ctx) -> Figures:
    return run_on_stack(ctx, _victim_candidates_attack, {"alt": True})


async def _victim_candidates_attack(ctx: Ctx, s: Stack) -> Figures:
    assert s.connector is not None
    await asyncio.sleep(1.5)  # the Connector detects its NAT and announces
    loop = asyncio.get_running_loop()
    victim = Victim(32)
    victim.attach(loop)
    a = await login.agent(ctx.certs, s.addr, "mallory")
    tx = wrap_socket(a)
    try:
        cands = _victim_candidates(victim)
        sent0 = tx.bytes if tx else 0
        sess = a.begin_session(s.service, wire.NatKind.EIM, cands)
        with contextlib.suppress(Exception):
            await sess.wait_open(3.0)
        one_req = (tx.bytes - sent0) if tx else len(wire.OpenSession(1, 1, s.service, wire.NatKind.EIM, cands).encode())
        await asyncio.sleep(PUNCH_WAIT)
        one = (victim.packets, victim.bytes)
        # sustained: a new session every 0.2 s (well inside the per-connection session rate limit)
        cpu0, sent1, v0 = s.connector.cpu_s(), tx.bytes if tx else 0, victim.bytes
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < ctx.seconds:
            a.begin_session(s.service, wire.NatKind.EIM, cands)
            n += 1
            await asyncio.sleep(0.2)
        await asyncio.sleep(PUNCH_WAIT)
        cpu = s.connector.cpu_s() - cpu0
        sent = (tx.bytes - sent1) if tx else n * one_req
        to_victim = victim.bytes - v0
    finally:
        a.close()
        victim.close(loop)
    return [("one session: probes / bytes to the victim", f"{one[0]} / {one[1] / 1000:.1f} kB"),
            ("one session: attacker bytes sent", f"{one_req} B ({one[1] / max(1, one_req):.0f}x)"),
            (f"sustained {ctx.seconds:.0f} s ({n} sessions): to the victim", f"{to_victim / 1e6:.2f} MB "
             f"({to_victim / max(1, sent):.0f}x the {sent / 1000:.1f} kB the attacker sent)"),
            ("Connector CPU during (busy machine)", f"{cpu:.1f} s")]


def rogue_announce(ctx: Ctx) -> Figures:
    return run_on_stack(ctx, _rogue_announce, {"alt": True, "connector": False})


async def _rogue_announce(ctx: Ctx, s: Stack) -> Figures:
    from qlab.traversal.agent_side import AgentTraversal

    loop = asyncio.get_running_loop()
    victim = Victim(32)
    victim.attach(loop)
    rogue = await login.connector(ctx.certs, s.addr, "rogue", "rogue-svc", ("127.0.0.1", s.echo_port))
    agents: list[Any] = [rogue]
    try:
        if rogue.fatal is not None or not rogue.registered.is_set():
            raise NotApplicable(f"the rogue Connector could not register: {rogue.fatal}")
        rogue.link.send(wire.Announce(wire.NatKind.EIM, _victim_candidates(victim, wire.CandidateKind.SRFLX)))
        await asyncio.sleep(0.3)
        per_session = []
        for i in range(2):
            a = await login.agent(ctx.certs, s.addr, f"honest{i}")
            agents.append(a)
            t = AgentTraversal(a)
            await t.prepare()
            before = (victim.packets, victim.bytes)
            st = t.begin("rogue-svc")
            with contextlib.suppress(Exception):
                await st.session.wait_open(3.0)
            await asyncio.sleep(PUNCH_WAIT)
            per_session.append((victim.packets - before[0], victim.bytes - before[1]))
            t.close()
    finally:
        login.close_all(agents)
        victim.close(loop)
    return [(f"honest Agent's session {i + 1}: probes / bytes to the victim", f"{p} / {b / 1000:.1f} kB")
            for i, (p, b) in enumerate(per_session)]


# -- service ownership --------------------------------------------------------------------------------
def service_takeover(ctx: Ctx) -> Figures:
    figs = run_on_stack(ctx, _takeover, {})
    policy = ctx.work / "policy.json"
    policy.write_text(json.dumps({"default": "allow", "clients": {
        "connector": {"role": "connector", "services": ["echo"]}}}))
    try:
        named = run_on_stack(ctx, _takeover, {"policy": policy})
    except NotApplicable as exc:
        named = [("n/a", str(exc))]
    return figs + [(f"policy names the owner, default allow: {f}", v) for f, v in named]


async def _takeover(ctx: Ctx, s: Stack) -> Figures:
    mallory = await login.connector(ctx.certs, s.addr, "mallory", s.service, ("127.0.0.1", s.echo_port))
    clients: list[Any] = [mallory]
    try:
        took = mallory.fatal is None and mallory.registered.is_set()
        borrowed = await login.connector(ctx.certs, s.addr, "agent-host", "other", ("127.0.0.1", s.echo_port),
                                         proving=wire.Role.AGENT)
        clients.append(borrowed)
        with_agent_secret = borrowed.fatal is None and borrowed.registered.is_set()
        a = await login.agent(ctx.certs, s.addr, "alice")
        clients.append(a)
        to_mallory = 0
        n = 5
        for _ in range(n):
            sess = await a.open_session(s.service, timeout=3.0)
            to_mallory += sess.connector == "mallory"
    finally:
        login.close_all(clients)
    return [("second identity's REGISTER of the service", "accepted" if took else f"refused ({mallory.fatal})"),
            ("honest sessions routed to the second identity", f"{to_mallory}/{n}"),
            ("an Agent's secret registers a (new) service", "yes" if with_agent_secret else
             f"no ({borrowed.fatal or 'not registered'})")]


# -- sessions ----------------------------------------------------------------------------------------
class Outcomes:
    """What the Intermediate answered to a burst of OPEN_SESSIONs, and SESSION_ERRORs seen."""

    def __init__(self) -> None:
        self.opened = 0
        self.refused: dict[str, int] = {}
        self.session_errors: dict[str, int] = {}
        self.cache: dict[str, Any] = {}
        self.measure: Any = lambda: (0, 0)

    def watch(self, agent: Any) -> None:
        from qlab.roles.events import ControlReceived

        def on(e: Any) -> bool:
            if isinstance(e, ControlReceived) and isinstance(e.msg, wire.SessionError):
                k = e.msg.code.name.lower()
                self.session_errors[k] = self.session_errors.get(k, 0) + 1
            return False

        agent.subscribe(on)

    async def open(self, agent: Any, service: str, payload: bytes | None = b"x", offer: tuple = ()) -> Any:
        sess = agent.begin_session(service, *offer)
        if payload is not None:
            sess.send(payload)  # the Connector opens its app socket for the session
        try:
            await sess.wait_open(5.0)
        except Exception as exc:
            code = getattr(exc, "code", None)
            k = code.name.lower() if code is not None else type(exc).__name__
            self.refused[k] = self.refused.get(k, 0) + 1
            return None
        self.opened += 1
        return sess

    def text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.refused.items())) or "none"


def sessions_burst(ctx: Ctx, conns: int = 20, rate: float = 6.0) -> Figures:
    """`conns` Agent identities open sessions (each with one relayed datagram, so the Connector opens
    an app socket for it) at `rate` per second each, against a Connector limited to 1,024 fds; an
    honest session opened before, and an honest Agent after, say whether service survived."""
    return run_on_stack(ctx, lambda c, s: _burst(c, s, conns, rate), {"connector_nofile": 1024})


async def _burst(ctx: Ctx, s: Stack, conns: int, rate: float) -> Figures:
    assert s.connector is not None
    seconds = max(10.0, ctx.seconds)
    fds0, peak = s.connector.fds(), 0
    agents = [await login.agent(ctx.certs, s.addr, f"burst{i}") for i in range(conns)]
    alice = await login.agent(ctx.certs, s.addr, "alice")
    agents.append(alice)
    before = await alice.open_session(s.service, timeout=3.0)
    await ping(before, 3, interval=0.01, wait=1.0)  # its app socket exists before the burst
    out = Outcomes()
    for a in agents:
        out.watch(a)
    pending = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            pending += [asyncio.ensure_future(out.open(a, s.service)) for a in agents[:conns]]
            if s.connector.alive():
                peak = max(peak, s.connector.fds())
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*pending)
        peak = max(peak, s.connector.fds() if s.connector.alive() else 0)
        kept = (await ping(before, 20, interval=0.02, wait=2.0))["paths"].get("relay", {}).get("received", 0)
        honest = s.agent_cli("--ping", "30", "--interval", "20", "--timeout", "5")
        rc = await asyncio.get_running_loop().run_in_executor(None, honest.p.wait, 60)
        replies = _agent_replies(honest.out)
    finally:
        login.close_all(agents)
    return [(f"{conns} connections x {rate:g} sessions/s for {seconds:.0f} s", f"{len(pending)} asked, {out.opened} opened"),
            ("refused", out.text()), ("SESSION_ERRORs to the attackers", _fmt(out.session_errors)),
            ("Connector fds (limit 1024): before / peak", f"{fds0} / {peak}"),
            ("Connector tracebacks logged", s.connector.count("Traceback")),
            ("honest session opened before: echo replies after", f"{kept}/20"),
            ("honest Agent afterwards: replies / exit code", f"{replies}/30 / {rc}"),
            ("honest Agent afterwards: SESSION_ERROR in its log", honest.count(" error: ")),
            ("Connector alive", s.connector.alive())]


def _fmt(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def _agent_replies(out: list[str]) -> str:
    for line in reversed(out):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            r = json.loads(line)
            return str(sum(p.get("received", 0) for p in r["paths"].values()))
    return "0 (no result)"


def _close_session(agent: Any, sess: Any) -> None:
    closer = getattr(agent, "close_session", None)
    if closer is not None:
        closer(sess)
        return
    agent.link.send(wire.SessionClosed(sess.id, wire.NackCode.PEER_GONE, "done"))
    agent.sessions.pop(sess.id, None)


def sessions_open_close(ctx: Ctx, total: int = 1000, conns: int = 20) -> Figures:
    return run_on_stack(ctx, lambda c, s: _open_close(c, s, total, conns), {"alt": True})


async def _open_close(ctx: Ctx, s: Stack, total: int, conns: int) -> Figures:
    """Two rounds of `total` sessions opened (with a punch each), then all closed: a leak grows again
    in the second round, memory the allocator merely kept does not."""
    assert s.connector is not None
    await asyncio.sleep(1.5)  # the Connector has announced: every session punches
    agents = [await login.agent(ctx.certs, s.addr, f"cycle{i}") for i in range(conns)]
    out = Outcomes()
    silent = Victim(2)  # candidates that never answer: each session's punch runs its full course
    loop = asyncio.get_running_loop()
    silent.attach(loop)
    offer = (wire.NatKind.EIM, _victim_candidates(silent))
    c = s.connector
    out.measure = lambda: (c.rss_kb(), c.fds())
    before = (c.rss_kb(), c.fds(), s.intermediate.rss_kb())
    rounds = []
    try:
        for _ in range(2):
            await _open_then_close(agents, out, s.service, offer, total // conns)
            await asyncio.sleep(4.0)  # punches give up after 3 s
            rounds.append((c.rss_kb(), c.fds(), s.intermediate.rss_kb()))
        sessions = metric(s.metrics(), "sessions"), metric(s.connector_metrics_now(), "sessions")
    finally:
        login.close_all(agents)
        silent.close(loop)
    peak = out.cache.get("open", (0, 0))
    return [("sessions opened, then all closed (x2 rounds)", f"{out.opened}/{2 * total} (refused: {out.text()})"),
            ("Connector RSS before / all open / closed / closed again",
             " / ".join(mb(x) for x in (before[0], peak[0], rounds[0][0], rounds[1][0]))),
            ("Connector fds before / all open / closed / closed again",
             " / ".join(str(x) for x in (before[1], peak[1], rounds[0][1], rounds[1][1]))),
            ("Intermediate RSS before / closed / closed again",
             " / ".join(mb(x) for x in (before[2], rounds[0][2], rounds[1][2]))),
            ("open sessions after (Intermediate / Connector gauges)", f"{sessions[0]:g} / {sessions[1]:g}"),
            ("punch probes to the sessions' silent candidates", silent.packets)]


async def _open_then_close(agents: list[Any], out: Outcomes, service: str, offer: tuple, each: int) -> None:
    async def open_all(a: Any) -> list[Any]:
        opened = []
        for _ in range(each):
            opened.append(asyncio.ensure_future(out.open(a, service, offer=offer)))
            await asyncio.sleep(1 / 15)  # inside the per-connection session rate limit
        return [x for x in await asyncio.gather(*opened) if x is not None]

    held = await asyncio.gather(*(open_all(a) for a in agents))
    out.cache["open"] = out.measure()
    for a, sessions_of_a in zip(agents, held, strict=True):
        for sess in sessions_of_a:
            _close_session(a, sess)


def identity_rate_limit(ctx: Ctx, conns: int = 10, each: int = 60) -> Figures:
    return run_on_stack(ctx, lambda c, s: _identity(c, s, conns, each), {})


async def _identity(ctx: Ctx, s: Stack, conns: int, each: int) -> Figures:
    agents = [await login.agent(ctx.certs, s.addr, "one-name") for _ in range(conns)]
    out = Outcomes()
    try:
        await asyncio.gather(*(out.open(a, s.service, None) for a in agents for _ in range(each)))
    finally:
        login.close_all(agents)
    return [(f"{conns} connections under one name, {each} OPEN_SESSIONs each at once", f"{out.opened} opened"),
            ("refused", out.text())]


# -- source address, id probing -------------------------------------------------------------------------
def migration_classify(ctx: Ctx, n: int = 30) -> Figures:
    return run_on_stack(ctx, lambda c, s: _migration(c, s, n), {"alt": True, "connector": False})


async def _migration(ctx: Ctx, s: Stack, n: int) -> Figures:
    """On loopback this script owns the victim's socket, so the attacker's packets are sent from it:
    the Intermediate sees exactly what a spoofed source address would show it."""
    from qlab.roles.events import RawReceived

    loop = asyncio.get_running_loop()
    victim = Victim(1)
    victim.attach(loop)
    vsock: socket.socket = victim.socks[0]
    a = await login.agent(ctx.certs, s.addr, "mover")
    own = {"tests": 0}
    a.subscribe(lambda e: isinstance(e, RawReceived) and e.data[:1] == bytes([wire.CLASSIFY_TEST])
                and bool(own.__setitem__("tests", own["tests"] + 1)))
    try:
        if wrap_socket(a, via=lambda data, addr: vsock.sendto(data, addr)) is None:
            raise NotApplicable("the checkout's Agent has no endpoint socket to send from elsewhere")
        a.link.send(wire.Ping(1))  # the first packet from the new address
        await asyncio.sleep(0.3)
        for i in range(n):
            # alternate port, or alternate IP and port: the listeners this Intermediate has
            a.link.send(wire.ChangeRequest(a.link.next_req(), i % 2, 1, secrets.randbits(64)))
            await asyncio.sleep(0.12)  # inside the change-request rate limit
        await asyncio.sleep(1.0)
        to_victim = victim.first_bytes.get(wire.CLASSIFY_TEST, 0)
    finally:
        a.close()
        victim.close(loop)
    return [("classification tests to the victim", f"{to_victim}/{n}"),
            ("to the requester's own socket", f"{own['tests']}/{n}")]


def session_id_probe(ctx: Ctx) -> Figures:
    return run_on_stack(ctx, _id_probe, {})


async def _id_probe(ctx: Ctx, s: Stack) -> Figures:
    alice = await login.agent(ctx.certs, s.addr, "alice")
    mallory = await login.agent(ctx.certs, s.addr, "mallory")
    try:
        sess = await alice.open_session(s.service, timeout=3.0)
        answers = []
        for sid in (sess.id, secrets.randbits(31) | 1):
            try:
                r = await mallory.link.request(wire.OpenSession(mallory.link.next_req(), sid, "no-such-service",
                                                                wire.NatKind.UNKNOWN, ()))
                answers.append(type(r).__name__)
            except Exception as exc:
                answers.append(str(exc) or type(exc).__name__)
    finally:
        login.close_all([alice, mallory])
    return [("OPEN_SESSION, someone else's id", answers[0]), ("OPEN_SESSION, a free id", answers[1]),
            ("ids can be probed", "yes" if answers[0] != answers[1] else "no")]
