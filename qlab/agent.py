"""The Agent: the user's endpoint. Relay first, from the first moment; direct when proven.

ONE socket carries everything: the connection to the Intermediate (QAD, signaling, relay), the
punch probes, and the direct QUIC connection to the Connector. An `AgentSession` sends application
payloads over its active path; the traversal layer (`qlab.traversal`) upgrades it to direct.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from qlab import wire
from qlab.certs import Credentials
from qlab.client import IntermediateLink
from qlab.echo import EchoProbe
from qlab.endpoint import Connection, DatagramTooLarge, Endpoint, Handler
from qlab.net import Addr, Net

log = logging.getLogger("qlab.agent")


class AgentSession:
    def __init__(self, agent: Agent, msg: wire.SessionOpened, service: str) -> None:
        self.agent = agent
        self.id = msg.session
        self.key = msg.key
        self.connector = msg.connector
        self.service = service
        self.relay_max_payload = msg.max_payload
        self.direct: Connection | None = None
        self.active_path = "relay"
        self.on_payload: Callable[[bytes, str], None] = lambda payload, path: None
        self.counters = {"relay_out": 0, "relay_in": 0, "direct_out": 0, "direct_in": 0}
        self.closed: str | None = None
        self.punch: object | None = None  # traversal state, when punching

    @property
    def max_payload(self) -> int:
        """Largest application payload every usable path carries (relay, and direct when up)."""
        limits = [self.relay_max_payload, self.agent.link.conn.max_app_payload if self.agent.link.conn else 0]
        if self.direct is not None and not self.direct.closed:
            limits.append(self.direct.max_app_payload)
        return min(limits)

    def send(self, payload: bytes, path: str | None = None) -> str | None:
        """Send one application payload over `path` (default: the active one). Returns the path
        used, or None when it could not be queued. Raises DatagramTooLarge for oversized payloads."""
        path = path or self.active_path
        if len(payload) > self.max_payload:
            raise DatagramTooLarge(f"payload of {len(payload)} bytes exceeds the session limit of {self.max_payload}")
        data = wire.encode_app(self.id, payload)
        if path == "direct":
            if self.direct is None or self.direct.closed:
                return None
            ok = self.direct.send_datagram(data)
        else:
            conn = self.agent.link.conn
            if conn is None or conn.closed:
                return None
            ok = conn.send_datagram(data)
        if not ok:
            return None
        self.counters[f"{path}_out"] += 1
        return path

    def on_direct_pong(self, nonce: int) -> None:
        """Hook for the path manager (liveness of the direct path)."""

    def on_direct_lost(self, reason: str) -> None:
        """Hook for the path manager: the direct connection is gone; traffic goes to the relay."""
        self.active_path = "relay"

    def deliver(self, payload: bytes, path: str) -> None:
        self.counters[f"{path}_in"] += 1
        self.on_payload(payload, path)


class Agent:
    def __init__(
        self,
        net: Net,
        creds: Credentials,
        intermediate: Addr,
        *,
        name: str = "agent",
        host: str = "0.0.0.0",
        port: int = 0,
    ) -> None:
        self.net = net
        self.creds = creds
        self.name = name
        self.host = host
        self.port = port
        self.sessions: dict[int, AgentSession] = {}
        self.endpoint = Endpoint(net, raw_handler=self._on_raw)
        self.link = IntermediateLink(
            self.endpoint, intermediate, creds, wire.Role.AGENT, name,
            on_message=self._on_message, on_datagram=self._on_relay,
        )
        self.raw_hooks: list[Callable[[bytes, Addr], bool]] = []
        self.message_hooks: list[Callable[[wire.Message], bool]] = []

    async def start(self, timeout: float = 5.0) -> Addr:
        """Bind the one socket and connect to the Intermediate (raises Refused on a bad secret)."""
        addr = await self.endpoint.bind(self.host, self.port)
        await self.link.connect(timeout)
        return addr

    async def open_session(self, service: str, timeout: float = 5.0) -> AgentSession:
        reply = await self.link.request(wire.OpenSession(self.link.next_req(), service), timeout)
        assert isinstance(reply, wire.SessionOpened)
        s = AgentSession(self, reply, service)
        self.sessions[s.id] = s
        return s

    async def connect_direct(self, session: AgentSession, addr: Addr, timeout: float = 3.0) -> Connection:
        """Open the direct QUIC connection to the Connector at `addr` from the shared socket and
        prove the session key; the session's `direct` path is set once the Connector accepts."""
        from qlab.certs import CONNECTOR_NAME

        loop = asyncio.get_running_loop()
        accepted = loop.create_future()
        handler = _DirectClient(session, accepted)
        conn = self.endpoint.connect(addr, self.creds.client_config(CONNECTOR_NAME), handler)
        try:
            async with asyncio.timeout(timeout):
                await conn.handshake_done
                conn.send_control(wire.DirectHello(session.id, wire.direct_auth(session.key, session.id)))
                await accepted
        except BaseException:
            self.endpoint.abandon(conn, "direct connection attempt failed")
            raise
        session.direct = conn
        return conn

    def close(self) -> None:
        for s in self.sessions.values():
            if s.direct is not None:
                s.direct.close(reason="agent closing")
        self.link.close()
        self.endpoint.close()

    def _on_relay(self, data: bytes) -> None:
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        s = self.sessions.get(sid)
        if s is not None:
            s.deliver(payload, "relay")

    def _on_message(self, msg: wire.Message) -> None:
        for hook in self.message_hooks:
            if hook(msg):
                return
        if isinstance(msg, wire.SessionClosed):
            s = self.sessions.pop(msg.session, None)
            if s is not None:
                s.closed = f"{msg.code.name.lower()}: {msg.reason}"
                log.warning("session %08x closed: %s", s.id, s.closed)
        elif isinstance(msg, wire.SessionError):
            log.warning("session %08x error: %s %s", msg.session, msg.code.name, msg.message)

    def _on_raw(self, data: bytes, addr: Addr) -> None:
        for hook in self.raw_hooks:
            if hook(data, addr):
                return


class _DirectClient(Handler):
    """The Agent's side of a direct connection: waits for the Connector's Ack, then carries the
    session's application datagrams."""

    def __init__(self, session: AgentSession, accepted: asyncio.Future) -> None:
        self.session = session
        self.accepted = accepted

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        if isinstance(msg, wire.Ack) and not self.accepted.done():
            self.accepted.set_result(True)
        elif isinstance(msg, wire.Nack) and not self.accepted.done():
            self.accepted.set_exception(ConnectionRefusedError(f"connector refused the direct path: {msg.reason}"))
        elif isinstance(msg, wire.Ping):
            conn.send_control(wire.Pong(msg.nonce))
        elif isinstance(msg, wire.Pong):
            self.session.on_direct_pong(msg.nonce)

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        try:
            sid, payload = wire.decode_app(data)
        except wire.WireError:
            return
        if sid == self.session.id:
            self.session.deliver(payload, "direct")

    def on_closed(self, conn: Connection, reason: str) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(ConnectionError(f"direct connection closed: {reason}"))
            self.accepted.exception()
        if self.session.direct is conn:
            self.session.direct = None
            self.session.on_direct_lost(reason)


async def ping(
    session: AgentSession, count: int, *, interval: float = 0.02, size: int = 64, sizes: list[int] | None = None,
    wait: float = 2.0,
) -> dict:
    """Send `count` echo probes over the active path (or one per entry of `sizes`), wait up to
    `wait` seconds for stragglers, and summarise: RTT p50/p95, loss, bytes, integrity."""
    loop = asyncio.get_running_loop()
    probe = EchoProbe(loop.time, size=max(size, 16))
    session.on_payload = probe.receive
    plan = sizes if sizes is not None else [size] * count
    errors: list[str] = []
    for sz in plan:
        payload = probe.make(session.active_path, sz)
        try:
            if session.send(payload) is None:
                probe.unsend(payload)
                errors.append(f"size {sz}: not sent")
        except DatagramTooLarge as exc:
            probe.unsend(payload)
            errors.append(str(exc))
        await asyncio.sleep(interval)
    deadline = loop.time() + wait
    while probe.pending() and loop.time() < deadline:
        probe.replied.clear()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await probe.replied.wait()
        except TimeoutError:
            break
    out = probe.summary()
    out.update(session=f"{session.id:08x}", max_payload=session.max_payload, errors=errors[:10])
    return out
