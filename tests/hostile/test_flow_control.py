"""The flow-control gap attack against real role processes (issue 13, item 1).

Right after the QUIC handshake, with no secret and no HELLO, the attacker sends one byte at the far
edge of the control stream's window, and again at the edge of each window the role then grants.
aioquic zero-fills the gap (the buffer reaches the window) and doubles the window once the highest
offset passes half of it, so before the fix each byte doubled what the role held: the Intermediate
went from 41.6 to 298 MB on 842 bytes. Now the window slides with consumed data (64 KiB): the edge
never moves, the role holds at most one window, and the connection is closed when it has not proven
itself within 5 s. Bound: RSS growth <= 2 MB.

The attack tools here use nothing of qlab that predates the fix (`benchmarks/attack_floods.py` runs
them against an old checkout).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from aioquic.quic.connection import QuicConnection

from qlab.certs import CONNECTOR_NAME, INTERMEDIATE_NAME, Credentials
from qlab.endpoint import Connection, Endpoint, Handler
from qlab.net import RealNet
from tests.procs import rss_kb
from tests.test_roles_e2e import Deployment, start_deployment

GAP_ROUNDS = 8  # doublings before the fix: 1 MiB << 8 = 256 MiB
RSS_BOUND_KB = 2048



def send_at(quic: QuicConnection, stream_id: int, offset: int, data: bytes) -> None:
    """An attacker's STREAM frame: `data` at `offset`, as if all before it had been sent, whatever
    credit the receiver granted (aioquic's own sender keeps within it). Reaches into aioquic's
    stream sender: an attack tool, not role code."""
    stream = quic._get_or_create_stream_for_send(stream_id)
    sender = stream.sender
    sender._buffer = bytearray()
    sender._buffer_start = sender._buffer_stop = sender.highest_offset = offset
    stream.max_stream_data_remote = max(stream.max_stream_data_remote, offset + len(data))
    quic._remote_max_data = max(quic._remote_max_data, quic._remote_max_data_used + len(data))
    quic.send_stream_data(stream_id, data)


def peer_window(quic: QuicConnection, stream_id: int) -> int:
    """How far the peer lets this side write on the stream (one stream: its MAX_STREAM_DATA, capped
    by MAX_DATA)."""
    stream = quic._get_or_create_stream_for_send(stream_id)
    return min(stream.max_stream_data_remote, quic._remote_max_data)


async def gap_attack(creds: Credentials, addr: tuple[str, int], server_name: str, pid: int,
                     rounds: int = GAP_ROUNDS, stop_above_kb: int | None = RSS_BOUND_KB,
                     pause: float = 0.3) -> dict:
    """Handshake, then one byte at the window edge per round; figures: the role's RSS growth (kB)
    over the attack, the windows it granted, attacker bytes, whether the role closed the connection.
    Stops early once RSS grew past `stop_above_kb` (the old code would go on doubling)."""
    ep = Endpoint(RealNet())
    await ep.bind("127.0.0.1", 0)
    conn: Connection = ep.connect(addr, creds.client_config(server_name), Handler())
    await asyncio.wait_for(conn.handshake_done, 5)
    await asyncio.sleep(pause)
    rss0 = rss_kb(pid)
    windows = [peer_window(conn.quic, 0)]
    t0 = time.monotonic()
    for _ in range(rounds):
        if conn.closed or conn.close_event is not None:
            break
        send_at(conn.quic, 0, windows[-1] - 1, b"x")
        ep.mark(conn)
        await asyncio.sleep(pause)
        windows.append(peer_window(conn.quic, 0))
        if stop_above_kb is not None and rss_kb(pid) - rss0 > stop_above_kb:
            break
    growth = rss_kb(pid) - rss0
    took = time.monotonic() - t0
    closed_at = None
    for _ in range(int(8 / 0.1)):  # the role has 5 s to close an unproven connection
        if conn.closed or conn.close_event is not None:
            closed_at = time.monotonic() - t0
            break
        await asyncio.sleep(0.1)
    sent = ep.stats["tx"]
    ep.close()
    return {"rss_before_kb": rss0, "rss_growth_kb": growth, "windows": windows, "seconds": round(took, 1),
            "attacker_datagrams": sent, "closed_after_s": closed_at}


@pytest.fixture(scope="module")
def deployment(certs_dir):
    d = start_deployment(str(certs_dir))
    yield d
    for p in (d.connector, d.intermediate, d.echo):
        p.terminate()


def _assert_bounded(fig: dict, who: str) -> None:
    assert fig["rss_growth_kb"] <= RSS_BOUND_KB, f"{who} grew by {fig['rss_growth_kb']} kB: {fig}"
    assert len(set(fig["windows"])) == 1, f"{who} kept granting more: {fig}"  # the edge never moved
    assert fig["closed_after_s"] is not None, f"{who} kept the unproven connection open: {fig}"


def test_gap_attack_on_the_intermediate(deployment: Deployment, creds):
    fig = asyncio.run(gap_attack(creds, ("127.0.0.1", deployment.port), INTERMEDIATE_NAME,
                                 deployment.intermediate.p.pid))
    _assert_bounded(fig, "the Intermediate")
    assert deployment.metric("connections_closed_total") >= 1


def test_gap_attack_on_the_connector_p2p_port(deployment: Deployment, creds):
    fig = asyncio.run(gap_attack(creds, ("127.0.0.1", deployment.connector_port), CONNECTOR_NAME,
                                 deployment.connector.p.pid))
    _assert_bounded(fig, "the Connector")
