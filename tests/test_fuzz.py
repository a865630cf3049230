"""Hostile input: >= 100,000 random and mutated datagrams at a running Intermediate and Connector
(separate processes), plus real QUIC clients that send malformed qlab/1. Neither may crash, memory
stays bounded, errors are counted in /metrics, and an honest Agent keeps working."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import time

from aioquic.quic.connection import QuicConnection

from qlab import quic_internals as qi
from qlab import wire
from qlab.certs import INTERMEDIATE_NAME
from qlab.endpoint import Endpoint, Handler
from qlab.net import RealNet
from tests.procs import rss_kb
from tests.test_roles_e2e import Deployment, start_deployment

N_DATAGRAMS = 100_000



def quic_samples(creds, n: int = 20) -> list[bytes]:
    """Real QUIC Initial packets (to mutate)."""
    out = []
    for _ in range(n):
        q = QuicConnection(configuration=creds.client_config(INTERMEDIATE_NAME))
        q.connect(("127.0.0.1", 4433), now=0.0)
        out += [d for d, _ in q.datagrams_to_send(now=0.0)]
    return out


def hostile(rng: random.Random, samples: list[bytes]) -> bytes:
    kind = rng.random()
    if kind < 0.25:  # garbage of any size
        return rng.randbytes(rng.choice([0, 1, 2, 5, 20, 100, 1200, 1350, 1500]))
    if kind < 0.45:  # mutated real Initials
        b = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind < 0.55:  # truncated real Initials
        s = rng.choice(samples)
        return s[: rng.randrange(1, len(s))]
    if kind < 0.65:  # oversized
        return rng.randbytes(rng.choice([2000, 9000, 30000, 65000]))
    if kind < 0.8:  # fake short-header packets with random connection IDs
        return bytes([0x40 | rng.randrange(64)]) + rng.randbytes(rng.randint(20, 1300))
    if kind < 0.92:  # fake punch probes and classify tests (fixed bit clear)
        t = rng.choice([wire.PROBE_REQUEST, wire.PROBE_RESPONSE, wire.CLASSIFY_TEST, 0x00, 0x3F])
        return bytes([t, 1]) + struct.pack("!IQ", rng.getrandbits(32), rng.getrandbits(64)) + rng.randbytes(
            rng.randint(0, 40))
    # Initials with a valid version and a random DCID: each would cost a connection if accepted blindly
    return bytes([0xC0]) + b"\x00\x00\x00\x01" + bytes([8]) + rng.randbytes(8) + bytes([8]) + rng.randbytes(
        8) + rng.randbytes(1200)


async def bad_quic_clients(d: Deployment, creds, n: int = 40) -> None:
    """Real QUIC connections with malformed qlab/1: garbage frames, oversized lengths, junk datagrams,
    messages before HELLO."""

    class Quiet(Handler):
        def __init__(self):
            self.closed = asyncio.get_running_loop().create_future()

        def on_closed(self, conn, reason):
            if not self.closed.done():
                self.closed.set_result(reason)

    ep = Endpoint(RealNet())
    await ep.bind("127.0.0.1", 0)
    rng = random.Random(7)
    pending = []
    for i in range(n):
        h = Quiet()
        conn = ep.connect(("127.0.0.1", d.port), creds.client_config(INTERMEDIATE_NAME), h)
        try:
            await asyncio.wait_for(conn.handshake_done, 5)
        except (TimeoutError, ConnectionError):
            continue
        conn.control_stream = conn.quic.get_next_available_stream_id()
        if i % 4 == 0:
            payload = rng.randbytes(rng.randint(1, 300))
        elif i % 4 == 1:
            payload = struct.pack("!H", 65535) + rng.randbytes(100)
        elif i % 4 == 2:
            payload = wire.Register(1, "echo").encode()  # before HELLO
        else:
            auth = wire.hello_auth(creds.secret_for(wire.Role.AGENT), wire.Role.AGENT, f"f{i}", qi.peer_cid(conn.quic))
            hello = wire.Hello(1, wire.Role.AGENT, f"f{i}", auth)
            payload = hello.encode() + bytes([0, 3, 0x07, 0xFF, 0xFF])  # valid hello, then a broken message
        conn.quic.send_stream_data(conn.control_stream, payload)
        for _ in range(5):
            conn.send_datagram(rng.randbytes(rng.randint(0, 200)))
        ep.mark(conn)
        pending.append(h.closed)
    done, _ = await asyncio.wait(pending, timeout=10)
    ep.close()
    assert len(done) >= n * 0.9, "malformed clients must be closed by the server"


def test_hostile_datagrams_and_clients(certs_dir, creds):
    d = start_deployment(str(certs_dir))
    try:
        cport = int(d.connector_port)
        rss0 = {p.name: rss_kb(p.p.pid) for p in (d.intermediate, d.connector)}
        samples = quic_samples(creds)
        rng = random.Random(int(os.environ.get("QLAB_FUZZ_SEED", "1")))
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        targets = [("127.0.0.1", d.port), ("127.0.0.1", cport)]
        agent_during = d.agent("--ping", "200", "--interval", "10", name="honest-during")
        t0 = time.monotonic()
        for i in range(N_DATAGRAMS):
            with contextlib.suppress(OSError):  # EMSGSIZE for the largest on some systems; still thrown
                s.sendto(hostile(rng, samples), targets[i % 2])
            if i % 400 == 399:
                time.sleep(0.004)  # paced so the receivers read most of it rather than the kernel dropping it
        s.close()
        throw_s = time.monotonic() - t0
        asyncio.run(bad_quic_clients(d, creds))
        rc, out, err = agent_during.communicate(60)
        assert rc == 0, err
        during = json.loads(out.splitlines()[-1])
        assert during["paths"]["relay"]["received"] >= 190, during  # UDP on a flooded host may lose a few

        for p in (d.intermediate, d.connector, d.echo):
            assert p.p.poll() is None, f"{p.name} died:\n{p.log()}"
        after = d.agent("--ping", "50", "--interval", "2", name="honest-after").communicate(60)
        assert after[0] == 0, after[2]
        assert json.loads(after[1].splitlines()[-1])["paths"]["relay"]["received"] == 50
        growth = {p.name: rss_kb(p.p.pid) - rss0[p.name] for p in (d.intermediate, d.connector)}
        assert all(g < 60_000 for g in growth.values()), f"memory grew by {growth} kB"
        m = d.metrics()
        dropped = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                      if line.startswith("qlab_udp_datagrams_total") and ("dropped" in line or "raw_rx" in line))
        assert dropped > 10_000, m
        assert d.metric("errors_total") >= 20
        print(f"\nthrew {N_DATAGRAMS} datagrams in {throw_s:.1f}s; intermediate counted {dropped:.0f} dropped/raw; "
              f"RSS growth {growth} kB")
    finally:
        for p in (d.connector, d.intermediate, d.echo):
            p.terminate()
    assert all(p.p.poll() is not None for p in (d.connector, d.intermediate, d.echo))

