"""What the Intermediate can read of a session (issue 19): in SEALED mode none of its application
bytes, anywhere in the Intermediate's memory; in TERMINATED mode it decrypts every payload, so they
are there (the control that proves the scan finds what is there).

The Intermediate, the Connector and the UDP echo app run as processes on loopback; the Agent runs
here. A marker drawn per test (16 random bytes, never given to the Intermediate) goes into a few
hundred echo payloads sent over the relay; once the replies are back, and while the session is still
open, every readable private mapping of the Intermediate (heap, anonymous, stack, ...) is read
through /proc/PID/mem and the marker counted. Reading another process's memory needs ptrace
permission: root (as in CI)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest

from qlab import wire
from qlab.net import RealNet
from qlab.roles.agent import Agent
from qlab.wire import Path
from tests.procs import LoopbackDeployment, stop_all

pytestmark = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="reading the Intermediate's memory through /proc/PID/mem needs ptrace permission: run as root (CI does)",
)

PAYLOADS = 300  # copies enough that some would linger in the relay's buffers if it ever held them
BATCH = 50  # sent at once, then their replies awaited (no queue or socket buffer overflows)
SIZES = (100, 1000)  # small objects (CPython's allocator) and large ones (malloc), in turn
CHUNK = 1 << 20


def count_in_memory(pid: int, needle: bytes) -> tuple[int, int, int]:
    """Occurrences of `needle` in every readable private mapping of process `pid`, the bytes read,
    and the regions that could not be read (skipped)."""
    with open(f"/proc/{pid}/maps") as f:
        regions = f.read().splitlines()
    found = scanned = unreadable = 0
    keep = len(needle) - 1  # the tail carried into the next chunk: a match across chunks is counted once
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in regions:
            span, perms = line.split()[:2]
            if perms[0] != "r" or perms[3] != "p":
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            tail = b""
            for at in range(lo, hi, CHUNK):
                try:
                    mem.seek(at)
                    data = mem.read(min(CHUNK, hi - at))
                except (OSError, ValueError, OverflowError):
                    unreadable += 1
                    break
                buf = tail + data
                found += buf.count(needle)
                tail = buf[-keep:]
                scanned += len(data)
    return found, scanned, unreadable


@pytest.fixture(scope="module")
def deployment(certs_dir):
    d = LoopbackDeployment(str(certs_dir))
    try:
        yield d
    finally:
        stop_all(d.procs)  # also fails the module if a role logged a traceback


def payload(marker: bytes, seq: int) -> bytes:
    size = SIZES[seq % len(SIZES)]
    head = struct.pack("!I", seq) + marker
    return head + os.urandom(size - len(head) - len(marker)) + marker


async def close_sealed(s) -> None:
    """Close a sealed session's end-to-end connection while the link can still carry its
    CONNECTION_CLOSE to the Connector, and wait (bounded) for its closing period to end. Agent.close()
    alone closes the link before that packet leaves, so the Connector's end stays open; and a
    Connector that shuts down with a sealed connection open raises (its CONNECTION_CLOSE goes to the
    closed tunnel's address, ("relay", session id), on the socket): reported, not this test's subject."""
    conn = s.sealed
    if conn is None or conn.closed:
        return
    conn.close(reason="test done")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while not conn.closed and loop.time() < deadline:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", ["terminated", "sealed", "sealed-framed"])
async def test_the_intermediate_holds_no_application_byte_of_a_sealed_session(deployment, creds, mode):
    """sealed: its packets as raw frames (the default); sealed-framed: as DATAGRAM frames of the
    control connections, whose outer layer the Intermediate decrypts (the inner one it cannot)."""
    marker = os.urandom(16)
    intermediate = deployment.procs[0]
    assert intermediate.name == "intermediate"
    agent = Agent(RealNet(), creds, ("127.0.0.1", deployment.port), host="127.0.0.1")
    await agent.start()
    s = agent.begin_session("echo", mode=wire.SessionMode.TERMINATED if mode == "terminated" else wire.SessionMode.SEALED)
    s.sealed_raw = mode != "sealed-framed"
    try:
        if s.mode == wire.SessionMode.SEALED:
            await agent.connect_sealed(s, timeout=5.0)
        else:
            await s.wait_open(5.0)
        sent: dict[bytes, bool] = {}
        came_back: list[Path] = []
        progress = asyncio.Event()

        def on_reply(e) -> None:
            if sent.get(e.payload) is False:
                sent[e.payload] = True
                came_back.append(e.path)
                progress.set()

        s.subscribe(on_reply)
        loop = asyncio.get_running_loop()
        for start in range(0, PAYLOADS, BATCH):
            for seq in range(start, start + BATCH):
                p = payload(marker, seq)
                assert s.send(p, Path.RELAY) == Path.RELAY, f"payload {seq} not queued"
                sent[p] = False
            deadline = loop.time() + 5.0
            while len(came_back) < start + BATCH and loop.time() < deadline:
                progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(progress.wait(), deadline - loop.time())
        assert len(came_back) >= PAYLOADS * 0.95, f"only {len(came_back)}/{PAYLOADS} echoes came back"
        assert set(came_back) == {Path.RELAY}, "every echo went through the Intermediate"
        assert not s.closed and s.id in agent.sessions, "the session is still open while the relay is read"
        found, scanned, unreadable = await asyncio.to_thread(count_in_memory, intermediate.p.pid, marker)
    finally:
        await close_sealed(s)
        agent.close()
    print(f"\n{mode}: marker found {found} times in {scanned / 2**20:.1f} MiB of the Intermediate's memory "
          f"({unreadable} regions unreadable), {len(came_back)}/{PAYLOADS} echoes relayed")
    assert scanned > 1 << 20, "the scan read next to nothing"
    if mode == wire.SessionMode.TERMINATED:
        assert found > 0, "the control failed: the terminating relay decrypts every payload, the scan should see some"
    else:
        assert found == 0, f"the Intermediate holds application bytes of a sealed session ({found} copies of the marker)"

