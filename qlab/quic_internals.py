"""The one module that reads aioquic's private state (aioquic is pinned: see pyproject.toml).

aioquic's public API has no accessor for what qlab needs to know about a `QuicConnection`: whether it
is closing, how large a DATAGRAM frame may be, how many datagrams are queued, the smoothed RTT.
Every read of a private attribute lives here, as a small typed function; nothing else in qlab may
touch `QuicConnection._*`. `BoundedQuicConnection`, the connection every `Endpoint` makes, overrides
how aioquic grants receive credit (its own policy grows without bound). `tests/test_quic_internals.py`
checks each attribute and overridden method on a real connection of the pinned version, so an
aioquic upgrade that renames one fails there, not in a trial.
"""

from __future__ import annotations

from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import QuicPacketSpace
from aioquic.quic.stream import QuicStream

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


def local_close_code(quic: QuicConnection) -> int | None:
    """The error code this side closes with (aioquic's on a peer's violation, or the caller's);
    None while open or when the peer closed first."""
    # private: who initiated a close is only visible in the connection state (draining: the peer)
    event = quic._close_event
    if event is None or quic._state == QuicConnectionState.DRAINING:
        return None
    return event.error_code


class BoundedQuicConnection(QuicConnection):
    """A QuicConnection whose receive credit slides with the data consumed, and whose peer may open
    `peer_bidi_streams` bidirectional streams and no unidirectional one.

    aioquic doubles a stream's window, and the connection's, whenever the highest offset received
    passes half of it, and zero-fills every gap up to that offset: a peer sending one byte at the
    edge of each new window makes it allocate the window and grant twice as much, without bound.
    Here the credit is the offset consumed in order plus the configured window (`max_stream_data`,
    `max_data`), so a stream's reassembly buffer never exceeds its window; data beyond the credit is
    aioquic's FLOW_CONTROL_ERROR and closes the connection. It also offers 128 streams of each kind,
    not configurable; a peer opening one stream too many gets STREAM_LIMIT_ERROR.
    """

    def __init__(self, *, configuration: QuicConfiguration, peer_bidi_streams: int, **kwargs: Any) -> None:
        super().__init__(configuration=configuration, **kwargs)
        self._qlab_stream_window = configuration.max_stream_data
        self._qlab_connection_window = configuration.max_data
        # private: the stream limits are set before the transport parameters are encoded
        for limit, count in ((self._local_max_streams_bidi, peer_bidi_streams), (self._local_max_streams_uni, 0)):
            limit.value = limit.sent = count

    # Both run for every packet built: kept lean (a relayed datagram is a packet).
    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        credit = self._local_max_data
        used = consumed = credit.used
        for stream in self._streams.values():  # less what is received but not yet delivered in order
            consumed -= stream.receiver.highest_offset - stream.receiver.starting_offset()
        credit.value = _slid(credit.value, consumed, self._qlab_connection_window)
        bidi, uni = self._local_max_streams_bidi, self._local_max_streams_uni
        if credit.value == credit.sent and bidi.value == bidi.sent and uni.value == uni.sent:
            return  # no limit to raise: aioquic would write no frame (and its doubling is disabled below)
        credit.used = 0  # aioquic doubles when used > value / 2: show it none
        try:
            super()._write_connection_limits(builder, space)
        finally:
            credit.used = used

    def _write_stream_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream) -> None:
        receiver = stream.receiver
        if stream.max_stream_data_local and not receiver.is_finished:  # 0: a send-only stream
            stream.max_stream_data_local = _slid(
                stream.max_stream_data_local, receiver.starting_offset(), self._qlab_stream_window)
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return  # nothing new to grant: aioquic would write no frame (and its doubling is disabled below)
        highest = receiver.highest_offset
        receiver.highest_offset = 0  # as above: no doubling
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest


def _slid(granted: int, consumed: int, window: int) -> int:
    """The credit to grant: `consumed + window`, raised only once half a window was consumed since
    the last grant (one MAX_*_DATA frame per half window, not per packet); never lowered."""
    target = consumed + window
    return target if target - granted >= window >> 1 else granted


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


def peer_cid(quic: QuicConnection) -> bytes:
    """The connection ID this side currently sends to. On a client right after the handshake: the
    source CID the server chose for this connection (what a HELLO is bound to)."""
    # private: the peer's current connection ID is not exposed
    return quic._peer_cid.cid


def validated_peer_address(quic: QuicConnection) -> tuple[str, int] | None:
    """The most recent peer address whose path is validated (handshake or PATH_CHALLENGE answered);
    `get_peer_address()` already follows a migration before its validation."""
    # private: network paths and their validation state are not exposed
    for path in quic._network_paths:
        if path.is_validated:
            host, port = path.addr[0], path.addr[1]
            return str(host), int(port)
    return None


def migrate(quic: QuicConnection, addr: Any) -> None:
    """Client: send to `addr` from now on (RFC 9000 section 9), treating its path as validated: the
    caller proved it by other means (a punch's probes authenticated by the session key, or the
    relay's authenticated connection). The server validates the move with its own PATH_CHALLENGE.
    A spare connection ID of the peer's is used when there is one, so the paths share no CID."""
    # private: aioquic migrates a client only to a server's preferred address; the paths, the
    # current peer CID and the spare ones are not exposed
    from aioquic.quic.connection import MAX_NETWORK_PATHS, QuicNetworkPath

    paths = quic._network_paths
    if paths and paths[0].addr == addr:
        return
    path = next((p for p in paths if p.addr == addr), None)
    if path is None:
        path = QuicNetworkPath(addr)
    else:
        paths.remove(path)
    path.is_validated = True
    paths.insert(0, path)
    del paths[MAX_NETWORK_PATHS:]
    if quic._peer_cid_available:
        quic._retire_peer_cid(quic._peer_cid)
        quic._peer_cid = quic._peer_cid_available.pop(0)
        quic._spin_bit = False


def handshake_confirmed(quic: QuicConnection) -> bool:
    """Whether the handshake is confirmed (RFC 9001 section 4.1.2: a client has received
    HANDSHAKE_DONE); no migration before it (RFC 9000 section 9)."""
    # private: the confirmation state is not exposed
    return bool(quic._handshake_confirmed)
