"""The Connector's traversal: detects its NAT after each (re)connection, answers offers, punches.

`ConnectorTraversal` observes the Connector's events (`qlab.roles.connector.ConnectorEvent`) and
keeps one `ConnectorSessionTraversal` per open session; a session that ends takes everything it
owned with it. The Connector stays usable without it (relay only).
"""

from __future__ import annotations

import asyncio
import contextlib

from qlab import wire
from qlab.net import Addr
from qlab.roles.connector import Connector, ConnectorEvent, ConnectorSession, SessionEnded, SessionStarted
from qlab.roles.events import ControlReceived, LinkUp, RawReceived
from qlab.roles.tasks import Tasks
from qlab.traversal.detect import Detection
from qlab.traversal.mapped import MappedAddress
from qlab.traversal.path import TraversalConfig
from qlab.traversal.punch import Puncher, gather, host_ips_for
from qlab.traversal.session import PunchSession, deliver_probe, deliver_signal, detect


class ConnectorSessionTraversal(PunchSession):
    """The Connector's traversal state of one session."""

    owner: ConnectorTraversal

    def __init__(self, owner: ConnectorTraversal, session: ConnectorSession) -> None:
        c = owner.c
        super().__init__(owner, session, c.link, c.endpoint.send_raw, c.new_endpoint)
        self.session = session
        self.result: Puncher | None = None  # this side's finished puncher

    def answer(self) -> None:
        """Send our candidates for this session once detection is done (or has taken too long)."""

        async def answer() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.owner.ready.wait(), self.cfg.detect_timeout * 3)
            if self.puncher is None:
                self.new_puncher()
            self.link.send(wire.Answer(self.id, self.own_nat, self.candidates))

        self.tasks.spawn(answer())

    def on_offer(self, msg: wire.Offer) -> None:
        """The Agent asks again (a retry): the last attempt is over."""
        self.session.agent_nat, self.session.agent_candidates = msg.nat, msg.candidates
        if self.runner is not None:
            self.runner.cancel()
            self.runner = None
        self.answer()

    def punch_done(self, p: Puncher) -> None:
        self.result = p
        ok = p.success is not None
        addr = p.success.addr if p.success is not None else None
        self.link.send(wire.PunchResult(self.id, int(ok), addr, min(p.probes_sent, 0xFFFF)))


class ConnectorTraversal:
    """Attach to a Connector: detects its NAT after each (re)connection, answers offers, punches.

    `close()` stops every session's punching but keeps the sessions readable (a trial reads what
    they did after the roles close); a session the Intermediate closes is released at once."""

    def __init__(self, connector: Connector, config: TraversalConfig | None = None) -> None:
        self.c = connector
        self.cfg = config or TraversalConfig()
        self.detection = Detection(wire.NatKind.UNKNOWN, [])
        self.candidates: tuple[wire.Candidate, ...] = ()
        self.ready = asyncio.Event()
        self.sessions: dict[int, ConnectorSessionTraversal] = {}
        self.announced = False
        self.host_ips: list[str] = []
        self.mapped: MappedAddress | None = None
        self.tasks = Tasks()
        self._unsubscribe = connector.subscribe(self._on_event)

    async def prepare(self) -> None:
        c = self.c
        self.host_ips = host_ips_for(c.endpoint.local_address, c.net.host_addresses())
        if self.cfg.port_mapping and self.mapped is None:  # once: it is renewed across reconnections
            self.mapped = MappedAddress(c.net, c.endpoint.local_address, self.host_ips, self._mapping_changed)
            self.mapped.start()
        try:
            self.detection = await detect(c.link, c.endpoint, c.creds, c.name, self.host_ips, self.cfg.detect_timeout,
                                         self.cfg.qad6)
            if self.mapped is not None:
                await self.mapped.settled()
        finally:
            self._announce()
            self.ready.set()

    def _announce(self) -> None:
        c = self.c
        mapped = self.mapped.address if self.mapped is not None else None
        self.candidates = gather(self.host_ips, c.endpoint.local_address[1], c.link.observed,
                                 self.detection.kind, self.detection.last_port, mapped)
        c.link.send(wire.Announce(self.detection.kind, self.candidates))
        self.announced = True

    def _mapping_changed(self, _mapping: object) -> None:
        if self.announced:  # after the first announcement: tell the Intermediate again
            self._announce()

    def _on_event(self, event: ConnectorEvent) -> bool:
        if isinstance(event, ControlReceived):
            return self._on_message(event.msg)
        if isinstance(event, RawReceived):
            return self._on_raw(event.data, event.addr)
        if isinstance(event, LinkUp):
            self.ready.clear()
            self.announced = False
            self.tasks.spawn(self.prepare())
        elif isinstance(event, SessionStarted):
            self._on_session(event.session)
        elif isinstance(event, SessionEnded):
            st = self.sessions.pop(event.session.id, None)
            if st is not None:
                st.close()
        return False

    def _on_session(self, s: ConnectorSession) -> None:
        old = self.sessions.pop(s.id, None)
        if old is not None:
            old.close()
        st = self.sessions[s.id] = ConnectorSessionTraversal(self, s)
        if self.announced:
            st.new_puncher()  # the Intermediate already has our candidates and starts the punch itself
        else:
            st.answer()

    def _on_message(self, msg: wire.Message) -> bool:
        if isinstance(msg, wire.Offer):
            st = self.sessions.get(msg.session)
            if st is not None:
                st.on_offer(msg)
            return st is not None
        return deliver_signal(self.sessions, msg)

    def _on_raw(self, data: bytes, addr: Addr) -> bool:
        return deliver_probe(self.sessions, data, addr)

    def result(self, session_id: int) -> Puncher | None:
        """This side's finished puncher for an open session (None before the punch ends)."""
        st = self.sessions.get(session_id)
        return st.result if st is not None else None

    def close(self) -> None:
        self._unsubscribe()
        self.tasks.cancel_all()
        if self.mapped is not None:
            self.mapped.close()
        for st in self.sessions.values():
            st.close()
