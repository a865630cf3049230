"""Watching the echo probe's replies: waiting for the stragglers."""

from __future__ import annotations

from qlab.roles.echo import EchoProbe


async def drain(probe: EchoProbe, wait: float) -> None:
    await probe.wait_for_replies(wait)
    for seq in list(probe.outstanding):  # what did not come back by now is lost
        del probe.outstanding[seq]
