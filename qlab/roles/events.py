"""What a role tells the layers above it, and the one way to listen.

A role (`Agent`, `Connector`) emits small event dataclasses; the traversal layer, a trial or a test
subscribes a handler with `role.subscribe(handler)`. Handlers run in subscription order and every
one sees every event, except for the events marked *claimable*: a handler that returns True takes
one of those, and the rest (and the role's own default handling) do not see it. No one replaces
another object's callback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from qlab import wire
from qlab.net import Addr

E = TypeVar("E")
EventHandler = Callable[[E], object]  # a true return claims a claimable event; otherwise ignored


@dataclass(frozen=True)
class ControlReceived:
    """A signaling message from the Intermediate for this role (claimable)."""

    msg: wire.Message


@dataclass(frozen=True)
class RawReceived:
    """A non-QUIC datagram (a punch probe) on the role's shared socket (claimable)."""

    data: bytes
    addr: Addr


@dataclass(frozen=True)
class PayloadReceived:
    """An application payload for a session, and the path it came by."""

    payload: bytes
    path: wire.Path


@dataclass(frozen=True)
class LinkUp:
    """The connection to the Intermediate is (again) up and authenticated."""


class Observers(Generic[E]):
    """The subscribers of one role."""

    def __init__(self) -> None:
        self._handlers: list[EventHandler[E]] = []

    def subscribe(self, handler: EventHandler[E]) -> Callable[[], None]:
        """Call `handler` with every event from now on; returns the call that unsubscribes it."""
        self._handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    def emit(self, event: E) -> None:
        """Deliver `event` to every handler."""
        for handler in list(self._handlers):
            handler(event)

    def offer(self, event: E) -> bool:
        """Deliver a claimable `event` until a handler claims it; True when one did."""
        return any(handler(event) for handler in list(self._handlers))
