"""Birthday mode, the endpoint-dependent side: many mappings towards the peer (BirthdayPool)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable

from qlab import wire
from qlab.endpoint import Endpoint
from qlab.net import Addr

RawHandler = Callable[[bytes, Addr], None]
# opens one more bound socket whose non-QUIC datagrams go to the handler given
MakeEndpoint = Callable[[RawHandler], Awaitable[Endpoint]]


class BirthdayPool:
    """The hard (random-port symmetric) side of a birthday punch: N extra sockets, each sending
    probes to the peer's reflexive address, so its NAT opens N mappings that admit the peer. The peer
    sprays random ports; when one hits, that socket is the pair. Endpoints come from `make_endpoint`
    (the Connector's accept QUIC too); all but the winner close."""

    def __init__(self, session_id: int, key: bytes, peer: Addr, n: int, make_endpoint: MakeEndpoint,
                 on_win: Callable[[Endpoint, Addr], None]) -> None:
        self.session_id = session_id
        self.key = key
        self.peer = peer
        self.n = n
        self.make_endpoint = make_endpoint
        self.on_win = on_win
        self.endpoints: list[Endpoint] = []
        self.winner: tuple[Endpoint, Addr] | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    async def start(self, duration: float) -> None:
        for _ in range(self.n):
            box: list[Endpoint] = []
            ep = await self.make_endpoint(self._handler(box))
            box.append(ep)
            if self.closed:  # closed while the sockets were still opening
                ep.close()
                return
            self.endpoints.append(ep)
        self._task = asyncio.get_running_loop().create_task(self._keep_probing(duration))

    def _handler(self, box: list[Endpoint]) -> RawHandler:
        # the handler needs its socket, which exists only once opened: `box` holds it by then
        return lambda data, addr: self._on_raw(box[0], data, addr)

    def _probe(self, ep: Endpoint) -> None:
        txn = secrets.randbits(64)
        ep.send_raw(wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, self.session_id, txn), self.key), self.peer)

    async def _keep_probing(self, duration: float) -> None:
        end = asyncio.get_running_loop().time() + duration
        while self.winner is None and asyncio.get_running_loop().time() < end:
            for ep in list(self.endpoints):
                self._probe(ep)  # (re)opens and refreshes this socket's mapping towards the peer
            await asyncio.sleep(0.5)
        if self.winner is None:
            self.close()

    def _on_raw(self, ep: Endpoint, data: bytes, addr: Addr) -> None:
        try:
            probe = wire.decode_probe(data, self.key)
        except wire.WireError:
            return
        if probe.session != self.session_id:
            return
        if probe.kind == wire.PROBE_REQUEST:
            resp = wire.Probe(wire.PROBE_RESPONSE, self.session_id, probe.txn, addr)
            ep.send_raw(wire.encode_probe(resp, self.key), addr)
        if self.winner is None:
            self.winner = (ep, addr)
            for other in self.endpoints:
                if other is not ep:
                    other.close()
            self.endpoints = [ep]
            self.on_win(ep, addr)

    def close(self) -> None:
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        for ep in self.endpoints:
            ep.close()
