"""The two paths a session's traffic can take. Pure: importing it pulls in no networking stack, so
the results store and the analysis can use it."""

from __future__ import annotations

from enum import StrEnum


class Path(StrEnum):
    """A StrEnum, so records and the results store keep the plain strings "relay" and "direct"."""

    RELAY = "relay"  # DATAGRAM frames through the Intermediate
    DIRECT = "direct"  # the peer-to-peer QUIC connection
