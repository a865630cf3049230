"""End to end on loopback: the Intermediate, a Connector, the echo application and Agents as
separate processes, traffic Agent -> Intermediate (relay) -> Connector -> app and back."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.request
from dataclasses import dataclass

import pytest

from tests.procs import QLAB, Proc, free_tcp_port, free_udp_port


@dataclass
class Deployment:
    intermediate: Proc
    connector: Proc
    echo: Proc
    port: int
    metrics_port: int
    certs: str
    connector_port: int = 0

    def agent(self, *args: str, certs: str | None = None, name: str = "agent") -> Proc:
        return Proc(
            [*QLAB, "agent", "--intermediate", f"127.0.0.1:{self.port}", "--service", "echo",
             "--certs", certs or self.certs, "--name", name, *args],
            name=name,
        )

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str) -> float:
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith(f"qlab_{name}{{") or line.startswith(f"qlab_{name} "):
                total += float(line.rsplit(" ", 1)[1])
        return total


def start_deployment(certs: str) -> Deployment:
    port, mport, eport, cport = free_udp_port(), free_tcp_port(), free_udp_port(), free_udp_port()
    echo = Proc([*QLAB, "echo", "--listen", f"127.0.0.1:{eport}"], name="echo")
    inter = Proc(
        [*QLAB, "intermediate", "--listen", f"127.0.0.1:{port}", "--certs", certs, "--metrics", f"127.0.0.1:{mport}"],
        name="intermediate",
    )
    inter.wait_for("metrics on")
    echo.wait_for("UDP echo on")
    conn = Proc(
        [*QLAB, "connector", "--intermediate", f"127.0.0.1:{port}", "--service", "echo",
         "--forward", f"127.0.0.1:{eport}", "--p2p-port", str(cport), "--certs", certs],
        name="connector",
    )
    conn.wait_for("registered service echo")
    return Deployment(inter, conn, echo, port, mport, certs, cport)


@pytest.fixture(scope="module")
def deployment(certs_dir):
    d = start_deployment(str(certs_dir))
    yield d
    procs = (d.connector, d.intermediate, d.echo)
    codes = [p.terminate() for p in procs]
    assert all(p.p.poll() is not None for p in procs), "a role is still running"
    assert codes == [0, 0, 0], f"roles did not exit cleanly on SIGTERM: {codes}"


def run_agent(d: Deployment, *args: str, **kw) -> dict:
    rc, out, err = d.agent(*args, **kw).communicate(60)
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_relay_echo_rtt_and_counters(deployment):
    before = deployment.metric("relayed_datagrams_total")
    r = run_agent(deployment, "--ping", "40", "--interval", "5")
    relay = r["paths"]["relay"]
    assert relay["n"] == 40 and relay["received"] == 40 and relay["loss"] == 0.0
    assert 0 < relay["p50_ms"] <= relay["p95_ms"] < 500
    assert r["foreign"] == 0 and r["corrupt"] == 0
    assert r["observed"][0] == "127.0.0.1"  # QAD told the agent where it was seen
    assert deployment.metric("relayed_datagrams_total") - before == 80  # both directions


def test_payload_integrity_up_to_the_largest_allowed(deployment):
    sizes = [15, 16, 17, 31, 64, 100, 255, 256, 257, 512, 1000, 1024, 1200, 1280, 1300]
    r = run_agent(deployment, "--sizes", ",".join(map(str, sizes)) + ",max", "--interval", "2")
    limit = r["max_payload"]
    assert limit >= 1200, "the usable size comes from the connection and should be near 1300 at 1350-byte packets"
    relay = r["paths"]["relay"]
    expect = [s for s in sizes if s <= limit] + [limit]
    assert relay["n"] == len(expect) and relay["received"] == len(expect), r
    assert relay["bytes_received"] == sum(expect)
    assert r["corrupt"] == 0
    assert [e for e in r["errors"] if "exceeds" in e] == [f"payload of {s} bytes exceeds the session limit of {limit}"
                                                          for s in sizes if s > limit]


def test_a_sealed_session_between_separate_processes(deployment):
    """`qlab agent --mode sealed`: one end-to-end connection to the Connector through the relay; the
    Intermediate relays its packets as they are (counted, sizes and all) and opens none of them."""
    before = deployment.metric("relayed_datagrams_total")
    r = run_agent(deployment, "--mode", "sealed", "--ping", "40", "--interval", "5", "--sizes", "16,1155,max")
    relay = r["paths"]["relay"]
    assert relay["received"] == relay["n"] == 3 and r["corrupt"] == 0 and r["max_payload"] == 1155
    assert r["errors"] == []
    relayed = deployment.metric("relayed_datagrams_total") - before
    assert relayed >= 6  # the echoes and the connection's own packets (handshake, acknowledgements), both ways


def test_two_agents_on_one_service_get_only_their_own_replies(deployment):
    agents = [deployment.agent("--ping", "150", "--interval", "2", name=f"agent{i}") for i in (1, 2)]
    results = []
    for a in agents:
        rc, out, err = a.communicate(60)
        assert rc == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r["foreign"] == 0, "an agent received another agent's replies"
        assert r["paths"]["relay"]["received"] == 150
    assert results[0]["session"] != results[1]["session"]


def test_client_without_the_secret_is_refused(deployment, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(deployment.certs, wrong)
    (wrong / "secret").write_text("0" * 64 + "\n")
    before = deployment.metric("auth_failures_total")
    rc, out, err = deployment.agent("--ping", "3", certs=str(wrong)).communicate(30)
    assert rc == 2
    assert "refused by the Intermediate: unauthenticated" in err
    assert deployment.metric("auth_failures_total") == before + 1
    assert deployment.metric("clients") == 1  # only the connector


def test_client_with_another_ca_fails_verification(deployment, tmp_path):
    from qlab.certs import init_dir

    other = init_dir(tmp_path / "other")
    shutil.copy(f"{deployment.certs}/secret", other / "secret")  # right secret, wrong trust root
    rc, out, err = deployment.agent("--ping", "1", "--timeout", "3", certs=str(other)).communicate(30)
    assert rc == 3, err


def test_metrics_and_health(deployment):
    text = deployment.metrics()
    assert "# TYPE qlab_relayed_datagrams_total counter" in text or "qlab_clients" in text
    with urllib.request.urlopen(f"http://127.0.0.1:{deployment.metrics_port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"ok\n"


async def test_malformed_and_oversized_input_is_refused_and_others_keep_working(deployment, creds):
    """A misbehaving client gets clear errors; the Intermediate keeps serving everyone else."""
    from qlab import wire
    from qlab.certs import INTERMEDIATE_NAME
    from qlab.endpoint import Endpoint, Handler
    from qlab.net import RealNet
    from qlab.roles.agent import Agent
    from qlab.roles.events import ControlReceived

    addr = ("127.0.0.1", deployment.port)
    errors_before = deployment.metric("errors_total")

    # 1. garbage on the control stream: the connection is closed with a reason
    class Recorder(Handler):
        def __init__(self) -> None:
            self.closed = asyncio.get_running_loop().create_future()
            self.msgs: list = []

        def on_control(self, conn, msg):
            self.msgs.append(msg)

        def on_closed(self, conn, reason):
            if not self.closed.done():
                self.closed.set_result(reason)

    ep = Endpoint(RealNet())
    await ep.bind("127.0.0.1", 0)
    rec = Recorder()
    conn = ep.connect(addr, creds.client_config(INTERMEDIATE_NAME), rec)
    await asyncio.wait_for(conn.handshake_done, 5)
    conn.control_stream = conn.quic.get_next_available_stream_id()
    conn.quic.send_stream_data(conn.control_stream, b"\x00\x05\xff garbage")
    ep.mark(conn)
    reason = await asyncio.wait_for(rec.closed, 5)
    assert "malformed control message" in reason

    # 2. a datagram before HELLO is not relayed, and a message before HELLO is refused
    rec2 = Recorder()
    conn2 = ep.connect(addr, creds.client_config(INTERMEDIATE_NAME), rec2)
    await asyncio.wait_for(conn2.handshake_done, 5)
    conn2.send_datagram(wire.encode_app(1, b"sneaky"))
    conn2.send_control(wire.Register(1, "echo"))
    reason = await asyncio.wait_for(rec2.closed, 5)
    assert reason == "unauthenticated"
    assert any(isinstance(m, wire.Nack) and m.code == wire.NackCode.UNAUTHENTICATED for m in rec2.msgs)

    # 3. an oversized relay payload from a client with larger packets gets TOO_LARGE
    cfg = creds.client_config(INTERMEDIATE_NAME)
    cfg.max_datagram_size = 1500
    big = Agent(RealNet(), creds, addr, name="big", host="127.0.0.1")
    big.link.creds = creds
    await big.endpoint.bind("127.0.0.1", 0)
    big.link.conn = big.endpoint.connect(addr, cfg, big.link)
    big.link._welcome = asyncio.get_running_loop().create_future()
    await asyncio.wait_for(big.link._welcome, 5)
    session = await big.open_session("echo")
    got_error = asyncio.get_running_loop().create_future()
    big.subscribe(lambda e: isinstance(e, ControlReceived) and isinstance(e.msg, wire.SessionError)
                  and not got_error.done() and (got_error.set_result(e.msg) or True))
    session.relay_max_payload = 1400  # pretend we did not read the limit we were given
    # the Intermediate accepts DATAGRAM frames up to MAX_DATAGRAM_SIZE (1350): 1330 fits, yet
    # exceeds what the Connector's 1350-byte packets carry (1305 after the app header)
    assert big.link.conn.max_app_payload >= 1330 > 1310
    session.send(b"x" * 1330)
    err = await asyncio.wait_for(got_error, 5)
    assert err.code == wire.NackCode.TOO_LARGE and "exceeds" in err.message
    big.close()
    ep.close()

    # everyone else is fine
    r = run_agent(deployment, "--ping", "20", "--interval", "2")
    assert r["paths"]["relay"]["received"] == 20
    assert deployment.metric("errors_total") >= errors_before + 3


def test_connector_reconnects_after_intermediate_restart(certs_dir):
    d = start_deployment(str(certs_dir))
    try:
        d.intermediate.kill()
        mark = len(d.connector.err)
        d.connector.wait_for("lost the Intermediate", timeout=15, start=mark)
        d.intermediate = Proc(
            [*QLAB, "intermediate", "--listen", f"127.0.0.1:{d.port}", "--certs", d.certs,
             "--metrics", f"127.0.0.1:{d.metrics_port}"], name="intermediate",
        )
        d.intermediate.wait_for("metrics on")
        d.connector.wait_for("registered service echo", timeout=40, start=mark)
        r = run_agent(d, "--ping", "10", "--interval", "5")
        assert r["paths"]["relay"]["received"] == 10
    finally:
        for p in (d.connector, d.intermediate, d.echo):
            p.terminate()
        assert all(p.p.poll() is not None for p in (d.connector, d.intermediate, d.echo))
