"""The Intermediate Server's asyncio shell: its UDP listeners, one `Peer` per QUIC connection, metrics.

The protocol (QAD, registration, signaling, the DATAGRAM relay, classification requests) is
`qlab.roles.intermediate_core`; this module only moves bytes between it and the endpoints.

It listens on a primary address (UDP 4433) and, for NAT classification, optionally on an alternate
port and an alternate IP: every listener answers QAD, and a client may ask any of them to send a
test probe from another one (RFC 5780's CHANGE-REQUEST, on qlab's own QAD).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import Credentials
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.net import Addr, Net, normalize_addr
from qlab.roles.intermediate_core import Birthday, Caps, Client, IntermediateCore, SendClassifyTest, Session
from qlab.roles.metrics import Metrics, watch_endpoints
from qlab.roles.policy import AccessPolicy
from qlab.roles.tasks import Tasks

log = logging.getLogger("qlab.roles.intermediate")
DEFAULT_CAPS = Caps()

__all__ = ["Caps", "Client", "Intermediate", "Session", "run"]


class Intermediate:
    """One Intermediate: its core and its endpoints (`listeners`, primary first)."""

    def __init__(
        self, net: Net, creds: Credentials, *, relay_enabled: bool = True, birthday_ports: int = 0,
        birthday_probes: int = 1024,
        policy: AccessPolicy | None = None, rate_limits: dict[str, tuple[float, float]] | None = None,
        advertise: dict[str, str] | None = None, caps: Caps = DEFAULT_CAPS,
    ) -> None:
        if not creds.secret:
            raise PermissionError(f"{creds.directory}: the Intermediate needs the deployment's root `secret`")
        self.net = net
        self.creds = creds
        self.metrics = Metrics()
        self.core = IntermediateCore(
            creds.secret, self.metrics, policy=policy, rate_limits=rate_limits, relay_enabled=relay_enabled,
            birthday=Birthday(birthday_ports, birthday_probes), advertise=advertise, caps=caps,
        )
        self.listeners: list[Endpoint] = []
        self.tasks = Tasks()
        self._expiry: asyncio.Task[None] | None = None
        self.metrics.counter_source("udp_datagrams_total", "what", self._socket_stats)
        watch_endpoints(self.metrics, lambda: self.listeners)

    # the core's state, as callers (trials, tests) read it
    @property
    def listener_addrs(self) -> list[Addr]:
        return self.core.listeners

    @property
    def clients(self) -> dict[int, Client]:
        return self.core.clients

    @property
    def sessions(self) -> dict[int, Session]:
        return self.core.sessions

    @property
    def services(self) -> dict[str, list[int]]:
        return self.core.services

    @property
    def relay_blocked(self) -> set[int]:
        """Sessions whose relay is switched off (a trial's direct-path proof); add and discard."""
        return self.core.relay_blocked

    async def listen(self, addrs: list[Addr]) -> list[Addr]:
        """Bind one endpoint per address; the first is the primary, the rest serve classification."""
        cfg = self.creds.server_config("intermediate")
        for i, (host, port) in enumerate(addrs):
            ep = Endpoint(self.net, server_config=cfg, server_handler=functools.partial(_PeerConn, self, listener=i),
                          raw_handler=self._on_raw)
            bound = await ep.bind(host, port)
            self.listeners.append(ep)
            self.core.listeners.append(bound)
            log.info("listening on udp %s:%d", *bound)
        if self._expiry is None:
            self._expiry = self.tasks.spawn(self._expire_forever())
        return self.core.listeners

    async def _expire_forever(self) -> None:
        """Let the core close idle sessions and release vacated services, often enough that
        nothing lives much past its bound."""
        loop = asyncio.get_running_loop()
        caps = self.core.caps
        period = max(0.05, min(30.0, caps.session_idle / 4, caps.owner_hold / 4))
        while True:
            await asyncio.sleep(period)
            self.core.expire(loop.time())

    def close(self) -> None:
        self.tasks.cancel_all()
        for ep in self.listeners:
            ep.close()

    def crash(self) -> None:
        """Disappear as a killed process would: no goodbyes, all state gone (fault injection)."""
        for ep in self.listeners:
            ep.crash()
        self.core.reset()
        self.tasks.cancel_all()
        self._expiry = None

    def _on_raw(self, data: bytes, addr: Addr) -> None:
        if data[0] == wire.RAW_SEALED:  # anything else raw is nobody's business here
            self.core.raw_datagram(data, normalize_addr(addr), asyncio.get_running_loop().time())

    def drain(self) -> None:
        """Carry out what the core asked for besides sends to its peers."""
        while (event := self.core.next_event()) is not None:
            if isinstance(event, SendClassifyTest):
                ep = self.listeners[event.listener]
                ep.send_raw(wire.encode_classify_test(event.nonce, ep.local_address), event.to)

    def _socket_stats(self) -> dict[str, float]:
        """Datagrams seen by all listeners: received, sent, raw (non-QUIC), dropped malformed or
        for an unknown connection."""
        out: dict[str, float] = {}
        for ep in self.listeners:
            for k, v in ep.stats.items():
                out[k] = out.get(k, 0) + v
        return out


class _PeerConn(Handler):
    """One client connection: the core's `Peer` over a `Connection`, and the endpoint's `Handler`
    feeding the core."""

    def __init__(self, server: Intermediate, conn: Connection, *, listener: int) -> None:
        self.server = server
        self.core = server.core
        self.conn = conn
        self.listener = listener
        self.time = asyncio.get_running_loop().time
        # made before any packet is processed: still the CID this server chose for the connection
        self.binding = conn.quic.host_cid

    # -- Peer -----------------------------------------------------------------------------------
    @property
    def address(self) -> Addr | None:
        return self.conn.peer_addr

    @property
    def validated_address(self) -> Addr | None:
        addr = qi.validated_peer_address(self.conn.quic)
        return normalize_addr(addr) if addr is not None else None

    @property
    def max_app_payload(self) -> int:
        return self.conn.max_app_payload

    @property
    def rtt(self) -> float | None:
        return self.conn.rtt

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def send_control(self, msg: wire.Message) -> None:
        self.conn.send_control(msg)

    def send_datagram(self, data: bytes) -> bool:
        return self.conn.send_datagram(data)

    def send_raw(self, data: bytes) -> None:
        addr = self.validated_address
        if addr is not None:
            self.conn.endpoint.send_raw(data, addr)

    def close(self, code: int, reason: str) -> None:
        self.conn.close_soon(code, reason)

    # -- Handler --------------------------------------------------------------------------------
    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        self.core.control(self, msg, self.time())
        if not conn.proven and self in self.core.by_peer:  # its HELLO was accepted
            conn.mark_proven()
        self.server.drain()

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        self.core.datagram(self, data, self.time())

    def on_peer_address_changed(self, conn: Connection, addr: Addr) -> None:
        self.core.address_changed(self)

    def on_closed(self, conn: Connection, reason: str) -> None:
        self.core.closed(self, reason, self.time())


async def run(
    net: Net, creds: Credentials, listen: list[Addr], *, metrics_addr: Addr | None = None,
    stop: asyncio.Event | None = None, policy: AccessPolicy | None = None, advertise: dict[str, str] | None = None,
    caps: Caps = DEFAULT_CAPS,
) -> None:
    """Run an Intermediate until `stop` is set (the CLI sets it on SIGTERM/SIGINT)."""
    server = Intermediate(net, creds, policy=policy, advertise=advertise, caps=caps)
    await server.listen(listen)
    http = None
    if metrics_addr is not None:
        from qlab.roles.metrics import serve_http

        http = await serve_http(metrics_addr[0], metrics_addr[1], server.metrics, lambda: bool(server.listeners))
        log.info("metrics on http://%s:%d/metrics", *metrics_addr)
    stop = stop or asyncio.Event()
    try:
        await stop.wait()
    finally:
        server.close()
        if http is not None:
            http.close()
        await asyncio.sleep(0)
        log.info("stopped")
