"""The Agent's and the Connector's link to the Intermediate: hello, QAD, requests, reconnects.

Both roles keep one QUIC connection to the Intermediate on their one shared socket. This class owns
that connection and moves its messages: the control rules (hello, QAD, request ids and reply
matching, keepalive, backoff) are `qlab.roles.control`'s, shared with the QAD probes of
`qlab.traversal.detect`. Role-specific control messages go to the owning role (`LinkOwner`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import INTERMEDIATE_NAME, Credentials
from qlab.endpoint import Connection, DatagramTooLarge, Endpoint, Handler
from qlab.net import Addr, normalize_addr
from qlab.roles.control import (
    AddressObserved,
    Backoff,
    ControlClient,
    ControlEvent,
    HelloRefused,
    Liveness,
    Replied,
    Request,
    RoleMessage,
    Welcomed,
)

log = logging.getLogger("qlab.roles.link")

HANDSHAKE_TIMEOUT = 10.0  # connect(): every attempt together
# One attempt (QUIC handshake + HELLO/WELCOME). A stalled attempt is abandoned and a fresh connection
# started: aioquic doubles its probe timeout after each unanswered Initial (0.2, 0.4, 0.8, 1.6, 3.2 s),
# so under loss a fresh connection is answered sooner than an old one's next retransmission. Later
# attempts get longer (x1.5, capped) so that a slow but working path still completes one.
ATTEMPT_TIMEOUT, ATTEMPT_TIMEOUT_MAX = 2.0, 8.0
REQUEST_TIMEOUT = 5.0
BACKOFF_MIN, BACKOFF_MAX = 0.2, 30.0  # between reconnection rounds (jittered)
RETRY_MAX = 2.0  # between the attempts of one connect()
KEEPALIVE = 2.0  # a Ping on the control stream this often...
DEAD_AFTER = 6.0  # ...and the Intermediate is given up when it has said nothing for this long


class Refused(Exception):
    """The Intermediate answered NACK: the reason is final (bad secret, unknown service...)."""

    def __init__(self, code: wire.NackCode, reason: str) -> None:
        super().__init__(f"{code.name.lower()}: {reason}")
        self.code = code
        self.reason = reason


def _tls_failure(conn: Connection | None) -> bool:
    """Whether this connection ended on a TLS alert (QUIC CRYPTO_ERROR 0x100-0x1ff), loss never does."""
    event = conn.close_event if conn is not None else None
    return event is not None and 0x100 <= event.error_code <= 0x1FF


class LinkOwner(Protocol):
    """What a link tells the role that owns it (the one observer protocol of a link, as
    `endpoint.Handler` is a connection's)."""

    def link_up(self) -> None:
        """Connected and welcomed (again)."""

    def link_message(self, msg: wire.Message) -> None:
        """A role-specific control message (signaling) from the Intermediate."""

    def link_reply(self, msg: wire.Message) -> None:
        """A reply to a request, before it wakes the requester and before later messages of its
        batch (a StartPunch that follows a SessionOpened needs the session key)."""

    def link_datagram(self, data: bytes) -> None:
        """A relayed DATAGRAM."""


class _NoOwner:
    """A link nobody listens to (handshake tests, benchmarks)."""

    def link_up(self) -> None:
        pass

    def link_message(self, msg: wire.Message) -> None:
        pass

    def link_reply(self, msg: wire.Message) -> None:
        pass

    def link_datagram(self, data: bytes) -> None:
        pass


class IntermediateLink(Handler):
    """One role's connection to the Intermediate, kept up across losses (the asyncio shell of
    `ControlClient`)."""

    def __init__(
        self,
        endpoint: Endpoint,
        intermediate: Addr,
        creds: Credentials,
        role: wire.Role,
        name: str,
        owner: LinkOwner | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.intermediate = intermediate
        self.creds = creds
        self.role = role
        self.name = name
        self.control = ControlClient(role, name, creds.secret_for(role))
        self.owner: LinkOwner = owner or _NoOwner()
        self.conn: Connection | None = None
        self._welcome: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[wire.Message]] = {}
        self._closed = False
        self.reconnects = 0
        self.attempts = 0  # handshake attempts, over the link's life
        self.attempt_timeout = ATTEMPT_TIMEOUT
        self.liveness = Liveness(KEEPALIVE, DEAD_AFTER)
        self._keepalive_task: asyncio.Task[None] | None = None
        self.up = asyncio.Event()
        self.lost = asyncio.Event()

    @property
    def client_id(self) -> int | None:
        return self.control.client_id

    @property
    def max_relay_payload(self) -> int:
        return self.control.max_relay_payload

    @property
    def observed(self) -> Addr | None:
        return self.control.observed

    # -- connection lifecycle -------------------------------------------------------------------
    async def connect(self, timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """Connect and authenticate within `timeout`, retrying a failed or stalled handshake with a
        fresh connection (first retry after BACKOFF_MIN, then doubling up to RETRY_MAX). Raises
        Refused (final) or ConnectionError/TimeoutError when the time is up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        attempt_timeout = Backoff(self.attempt_timeout, ATTEMPT_TIMEOUT_MAX, factor=1.5, jitter=0.0)
        retry = Backoff(BACKOFF_MIN, RETRY_MAX)
        while True:
            self.attempts += 1
            try:
                await self._attempt(min(attempt_timeout.next(), max(0.0, deadline - loop.time())))
                return
            except Refused:
                raise
            except (ConnectionError, TimeoutError) as exc:
                tls = _tls_failure(self.conn)
                self._drop_attempt("handshake stalled" if isinstance(exc, TimeoutError) else "handshake failed")
                wait = retry.next()
                if self._closed or tls or loop.time() + wait >= deadline:
                    raise  # a TLS failure (certificate, ALPN) would only repeat itself
                log.info("%s: handshake with the Intermediate %s:%d failed (%s); retry in %.2fs",
                         self.name, *self.intermediate, exc or type(exc).__name__, wait)
            await asyncio.sleep(wait)

    async def _attempt(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.creds.client_config(INTERMEDIATE_NAME)
        self.lost.clear()
        self._welcome = loop.create_future()
        self.conn = self.endpoint.connect(self.intermediate, cfg, self)
        async with asyncio.timeout(timeout):
            await self.conn.handshake_done
            await self._welcome
        self.up.set()
        self.liveness.heard(loop.time())
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        self._keepalive_task = loop.create_task(self._keep_alive(self.conn))
        self.owner.link_up()

    def _drop_attempt(self, reason: str) -> None:
        """Give up the current attempt at once. It is detached first: its end (now, or after its
        closing period) must not touch the attempt that replaces it."""
        conn, self.conn = self.conn, None
        if conn is not None and not conn.closed:
            self.endpoint.abandon(conn, reason)

    async def _keep_alive(self, conn: Connection) -> None:
        """Ping the Intermediate and give the connection up when it stays silent (a killed
        Intermediate sends no CONNECTION_CLOSE; QUIC's idle timeout alone would take 30 s)."""
        loop = asyncio.get_running_loop()
        live = self.liveness
        while not conn.closed:
            await asyncio.sleep(live.interval)
            if conn.closed:
                break
            if live.dead(loop.time()):
                log.warning("the Intermediate has been silent for %.1fs; giving the connection up", live.dead_after)
                self.endpoint.abandon(conn, "intermediate unresponsive")
                break
            conn.send_control(live.ping(loop.time()))

    async def run_forever(self, first_timeout: float = HANDSHAKE_TIMEOUT, *, connected: bool = False) -> None:
        """Stay connected: after a loss, reconnect at once (connect() retries within its window),
        then in rounds with capped exponential backoff (jittered) while the Intermediate stays away.
        A NACK on hello is final and raised. `connected`: the first connection is already up."""
        backoff = Backoff(BACKOFF_MIN, BACKOFF_MAX)
        while not self._closed:
            try:
                if not connected:
                    await self.connect(first_timeout)
                connected = False
                backoff.reset()
                await self.lost.wait()
                log.warning("%s: lost the Intermediate (%s); reconnecting", self.name,
                            self.conn.close_reason if self.conn else "")
                self.up.clear()
                if self.conn is not None:
                    self.conn.close()
                self.reconnects += 1
                continue  # the first reconnection round starts now
            except Refused:
                raise
            except (ConnectionError, TimeoutError) as exc:
                log.info("Intermediate %s:%d not reachable (%s); next round in %.1fs", *self.intermediate,
                         exc or type(exc).__name__, backoff.current)
            self.up.clear()
            if self._closed:
                break
            await asyncio.sleep(backoff.next())
            self.reconnects += 1

    def close(self) -> None:
        self._closed = True
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        if self.conn is not None:
            self.conn.close(reason="bye")

    # -- requests -------------------------------------------------------------------------------
    def next_req(self) -> int:
        return self.control.next_req()

    async def request(self, msg: Request, timeout: float | None = REQUEST_TIMEOUT) -> wire.Message:
        """Send a message with a `req` field and wait for the reply carrying the same `req`.
        `timeout=None`: wait as long as the connection lives (replies come on a reliable stream;
        the keepalive gives a silent Intermediate up, which fails the wait)."""
        if self.conn is None or self.conn.closed:
            raise ConnectionError("not connected to the Intermediate")
        fut: asyncio.Future[wire.Message] = asyncio.get_running_loop().create_future()
        self._pending[msg.req] = fut
        self.control.expect(msg.req)
        self.conn.send_control(msg)
        try:
            async with asyncio.timeout(timeout):
                reply = await fut
        finally:
            self._pending.pop(msg.req, None)
            self.control.forget(msg.req)
        if isinstance(reply, wire.Nack):
            raise Refused(reply.code, reply.reason)
        return reply

    def send(self, msg: wire.Message) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.send_control(msg)

    # -- a sealed session's relayed packets (both parties alike) ----------------------------------
    def send_sealed(self, session: int, packet: bytes, key: bytes | None) -> None:
        """One packet of a sealed session's connection, to the relay: a raw frame with this side's
        relay tag when `key` is given (the Intermediate forwards it without cryptography), else a
        DATAGRAM frame of this connection (before the key is known, or when asked for)."""
        if key is not None:
            tag = wire.relay_tag(key, session, self.role)
            self.endpoint.send_raw(wire.encode_raw_sealed(session, tag, packet), self.intermediate)
            return
        if self.conn is not None:
            try:
                self.conn.send_datagram(wire.encode_sealed(session, packet))
            except DatagramTooLarge:
                log.warning("session %08x: a sealed packet of %d bytes does not fit the relay", session, len(packet))

    def sealed_from(self, data: bytes, addr: Addr) -> tuple[int, bytes] | None:
        """(session, packet) of a raw datagram that is a sealed packet the Intermediate relayed to
        us; None for anything else (from elsewhere, or malformed)."""
        if data[0] != wire.RAW_SEALED_RELAYED or normalize_addr(addr) != self.intermediate:
            return None
        try:
            return wire.decode_raw_relayed(data)
        except wire.WireError:
            return None

    # -- Handler --------------------------------------------------------------------------------
    def on_handshake(self, conn: Connection) -> None:
        if conn is not self.conn:
            return  # an attempt already given up
        conn.send_control(self.control.hello(qi.peer_cid(conn.quic)))

    def on_control(self, conn: Connection, msg: wire.Message) -> None:
        self.liveness.heard(asyncio.get_running_loop().time())
        event = self.control.receive(msg)
        for out in self.control.messages_to_send():
            conn.send_control(out)
        if event is not None:
            self._on_event(event)

    def _on_event(self, event: ControlEvent) -> None:
        if isinstance(event, Welcomed):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(None)
        elif isinstance(event, AddressObserved):
            log.info("QAD: %s observed at %s:%d", self.name, *event.addr)
        elif isinstance(event, HelloRefused):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(Refused(event.code, event.reason))
        elif isinstance(event, Replied):
            self.owner.link_reply(event.reply)  # now, before later messages of this batch
            fut = self._pending.get(event.req)
            if fut is not None and not fut.done():
                fut.set_result(event.reply)
        elif isinstance(event, RoleMessage):
            self.owner.link_message(event.msg)

    def on_datagram(self, conn: Connection, data: bytes) -> None:
        self.liveness.heard(asyncio.get_running_loop().time())
        self.owner.link_datagram(data)

    def on_closed(self, conn: Connection, reason: str) -> None:
        if conn is not self.conn:
            return  # an earlier connection or attempt ending late: the current one is not affected
        if self._welcome is not None and not self._welcome.done():
            if reason in ("unauthenticated", "bad version"):  # the NACK itself may not have arrived
                code = wire.NackCode.UNAUTHENTICATED if reason == "unauthenticated" else wire.NackCode.BAD_VERSION
                self._welcome.set_exception(Refused(code, "closed by the Intermediate"))
            else:
                self._welcome.set_exception(ConnectionError(f"connection closed: {reason}"))
            self._welcome.exception()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection closed: {reason}"))
        self.up.clear()
        self.lost.set()
