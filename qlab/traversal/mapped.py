"""A role's port mapping, as its traversal uses it: asked for when the role starts, beside NAT
detection; candidates are gathered once both are done (`settled`, bounded: a gateway that offers
nothing costs about one request timeout, before the first session and never inside one), renewed
while the role runs, deleted when it closes. A mapping that comes later joins the next offer.

The mapped address becomes a MAPPED candidate (`qlab.traversal.punch.gather`). Only a role bound to
a real interface asks, and only its own default gateway; a role on loopback never does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable

from qlab.net import Addr, Net
from qlab.traversal.portmap import GatewayNet, MappingChanged, PortMapper, PortMapping

log = logging.getLogger("qlab.traversal")
SETTLE_TIMEOUT = 1.0  # the most gathering waits for the first attempt (PCP's timeout is 0.25 s)


class MappedAddress:
    """The mapping of one role's socket (`local`), kept up to date in `current`. `on_change` is
    told when a mapping arrives, changes or is lost."""

    def __init__(self, net: Net, local: Addr, host_ips: list[str],
                 on_change: Callable[[PortMapping | None], None] | None = None) -> None:
        self.net = net
        self.local = local
        self.host_ip = _mapping_source(local, host_ips)
        self.on_change = on_change
        self.current: PortMapping | None = None
        self.mapper: PortMapper | None = None
        self._task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def address(self) -> Addr | None:
        return self.current.external if self.current is not None else None

    def start(self) -> bool:
        """Begin asking (once); False when this role cannot have a mapping (loopback, no gateway)."""
        if self._task is not None or self.closed:
            return self._task is not None
        if self.host_ip is None or not isinstance(self.net, GatewayNet) or self.net.default_gateway() is None:
            return False
        self.mapper = PortMapper(self.net, self.host_ip, self.local[1])
        self.mapper.observers.subscribe(self._changed)  # acquired, renewed elsewhere, or lost
        self._task = asyncio.get_running_loop().create_task(self._acquire())
        return True

    async def _acquire(self) -> None:
        assert self.mapper is not None
        try:
            got = await self.mapper.acquire()
        except (OSError, ValueError) as exc:  # a gateway that answers nonsense is no gateway
            log.debug("port mapping: %s", exc)
            got = None
        if got is not None and not self.closed:
            self.mapper.start_renewal()

    async def settled(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until the first attempt has a mapping or knows there is none (at most `timeout`)."""
        if self._task is None or self._task.done():
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    def _changed(self, event: MappingChanged) -> None:
        if event.mapping == self.current or self.closed:
            return
        self.current = event.mapping
        if self.on_change is not None:
            self.on_change(event.mapping)

    def close(self) -> None:
        """Stop renewing and delete the mapping (in the background: the gateway is one LAN hop away)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
        if self.mapper is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: the process is ending
                asyncio.get_running_loop().create_task(self.mapper.close())


def _mapping_source(local: Addr, host_ips: list[str]) -> str | None:
    """The address a mapping is asked for from: the socket's own, or its host's first IPv4 address
    when it is bound to a wildcard (the NAT, and so the mapping, is IPv4's); None on loopback
    (nothing there to map)."""
    ip = local[0]
    if ip in ("0.0.0.0", "::", ""):
        ip = next((h for h in host_ips if ":" not in h), "")
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    return None if addr.is_loopback or addr.is_unspecified else ip
