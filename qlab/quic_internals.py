"""The one module that reads aioquic's private state (aioquic is pinned: see pyproject.toml).

aioquic's public API has no accessor for what qlab needs to know about a `QuicConnection`: whether it
is closing, how large a DATAGRAM frame may be, how many datagrams are queued, the smoothed RTT.
Every read of a private attribute lives here, as a small typed function; nothing else in qlab may
touch `QuicConnection._*`. `tests/test_quic_internals.py` checks each attribute on a real connection
of the pinned version, so an aioquic upgrade that renames one fails there, not in a trial.
"""

from __future__ import annotations

from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated

_ENDING = frozenset({QuicConnectionState.CLOSING, QuicConnectionState.DRAINING, QuicConnectionState.TERMINATED})


def close_event(quic: QuicConnection) -> ConnectionTerminated | None:
    """Why the connection closes or closed (None while it is open)."""
    # private: aioquic exposes the close reason only as an event, which the endpoint has consumed
    return quic._close_event


def is_ending(quic: QuicConnection) -> bool:
    """Whether the connection is closing, draining or terminated."""
    # private: the connection state has no public accessor
    return quic._state in _ENDING


def is_terminated(quic: QuicConnection) -> bool:
    """Whether the connection is over (its ConnectionTerminated event is due or delivered)."""
    # private: the connection state has no public accessor
    return quic._state == QuicConnectionState.TERMINATED


def decrypted_any(quic: QuicConnection) -> bool:
    """Whether any packet of this connection has been decrypted, in any packet number space."""
    # private: aioquic records received packets only in its per-epoch packet spaces
    return any(space.largest_received_packet >= 0 for space in quic._spaces.values())


def max_datagram_payload(quic: QuicConnection, overhead: int) -> int:
    """Largest DATAGRAM frame payload sendable now: the peer's limit (less the frame header) and our
    packet size less `overhead`; 0 if the peer accepts no DATAGRAM frames (or has not said yet)."""
    # private: the peer's max_datagram_frame_size transport parameter and our packet size are not exposed
    remote = quic._remote_max_datagram_frame_size
    if not remote:
        return 0
    return max(0, min(remote - 4, quic._max_datagram_size - overhead))


def pending_datagrams(quic: QuicConnection) -> int:
    """DATAGRAM frames queued and not yet sent (aioquic's queue has no bound of its own)."""
    # private: the queue of send_datagram_frame() is not exposed
    return len(quic._datagrams_pending)


def rtt_estimate(quic: QuicConnection) -> float | None:
    """QUIC's smoothed RTT in seconds, once a first sample was taken."""
    # private: the loss recovery's RTT estimate is not exposed
    loss = quic._loss
    return loss._rtt_smoothed if loss._rtt_initialized else None
