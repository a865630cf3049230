"""Watching the echo probe's replies while something happens to the session: record each reply as
it arrives, and wait for the stragglers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from qlab.roles.echo import EchoEvent, EchoProbe, EchoReplied
from qlab.wire import Path


class SendEcho(Protocol):
    """Send one echo probe on `path`, or on the session's active path when None."""

    def __call__(self, path: Path | None = None) -> None: ...


@dataclass(frozen=True)
class Reply:
    """An echo reply that came back over the path it was sent on."""

    at: float  # loop time it arrived
    path: Path
    seq: int


@contextlib.contextmanager
def recording(probe: EchoProbe, clock: Callable[[], float]) -> Iterator[list[Reply]]:
    """Append every reply to the yielded list while the block runs (the probe's other subscribers,
    such as the path manager's RTT feed, see each reply as before)."""
    replies: list[Reply] = []

    def on_event(e: EchoEvent) -> None:
        if isinstance(e, EchoReplied):
            replies.append(Reply(clock(), e.path, e.seq))

    unsubscribe = probe.subscribe(on_event)
    try:
        yield replies
    finally:
        unsubscribe()


async def drain(probe: EchoProbe, wait: float) -> None:
    """Wait up to `wait` s for outstanding replies; what did not come back by then is lost."""
    await probe.wait_for_replies(wait)
    for seq in list(probe.outstanding):
        del probe.outstanding[seq]
