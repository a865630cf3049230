"""The simulator's processing cost (qlab.backends.sim.cost, .calibrate): datagram classes read from
real QUIC headers, one CPU's queue, calibrations as data, the charge on the virtual network and in
trials (deterministic), and the calibration command fitted to real loopback trials."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import pull_quic_header

from qlab import wire
from qlab.backends import sim
from qlab.backends.sim import calibrate
from qlab.backends.sim.backend import SimBackend
from qlab.backends.sim.cost import (
    DEFAULT,
    Calibration,
    CalibrationError,
    Classifier,
    Cpu,
    DatagramClass,
    ProcessingCost,
    zero,
)
from qlab.certs import CONNECTOR_NAME, Credentials
from qlab.cli.main import main
from qlab.experiment.record import TrialSpec
from qlab.experiment.trial import run_trial
from qlab.scenario import topology

C = DatagramClass


def _cal(name: str = "t", rx: float = 0.0, tx: float = 0.0, **over: float) -> Calibration:
    rx_us = {c.value: rx for c in C} | {k[3:]: v for k, v in over.items() if k.startswith("rx_")}
    tx_us = {c.value: tx for c in C} | {k[3:]: v for k, v in over.items() if k.startswith("tx_")}
    return Calibration(name, rx_us, tx_us)


@pytest.fixture(scope="module")
def handshake(certs_dir):
    """A real handshake's datagrams: the client's Initial, the server's flight, the client's Finished."""
    creds = Credentials.load(certs_dir)
    client = QuicConnection(configuration=creds.client_config(CONNECTOR_NAME))
    client.connect(("10.0.0.2", 2), now=0.0)
    hello = [d for d, _ in client.datagrams_to_send(0.0)]
    dcid = pull_quic_header(Buffer(data=hello[0]), host_cid_length=8).destination_cid
    server = QuicConnection(configuration=creds.server_config("connector"), original_destination_connection_id=dcid)
    for d in hello:
        server.receive_datagram(d, ("10.0.0.1", 1), now=0.0)
    flight = [d for d, _ in server.datagrams_to_send(0.0)]
    for d in flight:
        client.receive_datagram(d, ("10.0.0.2", 2), now=0.0)
    finished = [d for d, _ in client.datagrams_to_send(0.0)]
    client.send_datagram_frame(b"x" * 64)
    short = [d for d, _ in client.datagrams_to_send(0.1)]
    return {"hello": hello, "flight": flight, "finished": finished, "short": short}


def test_classes_from_real_headers_and_each_handshake_paid_once(handshake):
    client, server = Classifier(), Classifier()
    for d in handshake["hello"]:
        assert client.sent(d) == C.LONG
    assert [server.received(d) for d in handshake["hello"]][0] == C.CLIENT_HELLO
    assert server.received(handshake["hello"][0]) == C.LONG  # a retransmitted ClientHello costs no new handshake
    for d in handshake["flight"]:
        server.sent(d)
    classes = [client.received(d) for d in handshake["flight"]]
    assert classes[0] == C.SERVER_FLIGHT and set(classes[1:]) <= {C.LONG}
    assert client.received(handshake["flight"][0]) == C.LONG
    assert [server.received(d) for d in handshake["finished"]][0] == C.LONG
    assert server.received(handshake["short"][0]) == C.SHORT
    probe = wire.encode_probe(wire.Probe(wire.PROBE_REQUEST, 1, 2), b"k" * 32)
    assert client.received(probe) == C.RAW and client.sent(probe) == C.RAW
    assert client.received(b"") == C.RAW


def test_a_client_initial_to_an_unknown_cid_is_a_hello_even_from_a_dialing_socket(handshake, certs_dir):
    """A Connector's socket dials the Intermediate and also accepts the Agent: both kinds on one socket."""
    both = Classifier()
    for d in handshake["hello"]:
        both.sent(d)  # it dialed someone
    other = QuicConnection(configuration=Credentials.load(certs_dir).client_config(CONNECTOR_NAME))
    other.connect(("10.0.0.3", 3), now=0.0)
    assert both.received(other.datagrams_to_send(0.0)[0][0]) == C.CLIENT_HELLO


def test_classifier_memory_is_bounded(handshake):
    c = Classifier()
    for i in range(10_000):
        c.paid.add(i.to_bytes(4, "big"))
        c.own_cids.add(i.to_bytes(4, "big"))
    assert len(c.paid._items) == len(c.own_cids._items) == 4096


def test_cpu_takes_datagrams_in_order_and_sends_what_each_caused_before_the_next():
    done: list[tuple[str, float]] = []

    async def main() -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        cpu = Cpu()

        def handled(name: str) -> None:
            done.append((name, loop.time()))
            if name == "a":  # handling "a" sends a reply, a moment later in zero virtual time
                loop.call_soon(lambda: done.append(("reply", cpu.protect(loop.time(), 0.5))))

        for name in "abc":
            cpu.take_in(loop, 1.0, lambda n=name: handled(n))
        await asyncio.sleep(10)
        assert cpu.protect(loop.time(), 0.25) == 10.25  # idle: a send leaves after its own cost
        assert cpu.busy_s == 3.75

    sim.run(main())
    assert done == [("a", 1.0), ("reply", 1.5), ("b", 2.5), ("c", 3.5)]


def test_calibration_is_validated_and_labelled_by_its_numbers(tmp_path):
    with pytest.raises(CalibrationError, match="missing"):
        Calibration("x", {"short": 1.0}, {c.value: 0.0 for c in C})
    with pytest.raises(CalibrationError, match="microseconds"):
        _cal(rx=-1.0)
    a, b = _cal("same", rx=5.0), _cal("same", rx=6.0)
    assert a.label.startswith("same@") and a.label != b.label and a.label == _cal("same", rx=5.0).label
    path = calibrate.save(DEFAULT, tmp_path / "c.json")
    assert calibrate.load(path) == DEFAULT
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="bad.json: not JSON"):
        calibrate.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(CalibrationError, match="not a calibration"):
        calibrate.load(tmp_path / "list.json")


def test_the_active_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(calibrate.ENV)
    assert calibrate.active() == DEFAULT  # never calibrated: the shipped one
    mine = _cal("mine", rx=3.0)
    calibrate.save(mine)
    assert calibrate.active() == mine  # this user's measured one
    monkeypatch.setenv(calibrate.ENV, "none")
    assert calibrate.active().label == zero().label
    monkeypatch.setenv(calibrate.ENV, "default")
    assert calibrate.active() == DEFAULT


def _ping_rtt(cost: ProcessingCost | None, pings: int = 1) -> list[float]:
    """Round trips Agent -> Intermediate on `lan` (no link delay): only processing takes time."""
    network = sim.SimNetwork(topology.build("public", "public", profile_name="lan"), seed=1, cost=cost)
    rtts: list[float] = []

    async def main() -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        sent: list[float] = []

        def back(batch):
            rtts.extend(loop.time() - sent[len(rtts)] for _ in batch)
            if len(rtts) == pings:
                done.set()

        server = await network.net("intermediate").bind_udp("203.0.113.10", 4433,
                                                            lambda b: [server.sendto(d, s) for d, s in b])
        client = await network.net("agent").bind_udp("0.0.0.0", 0, back)
        for _ in range(pings):
            sent.append(loop.time())
            client.sendto(b"\x01ping", ("203.0.113.10", 4433))
        await asyncio.wait_for(done.wait(), 5)

    sim.run(main())
    return rtts


def test_each_datagram_costs_its_class_on_the_network():
    assert _ping_rtt(None) == [0.0]
    cal = _cal(rx=0.0, tx=0.0, rx_raw=100.0, tx_raw=10.0)
    # client tx, server rx, server tx, client rx: 10 + 100 + 10 + 100 us
    assert _ping_rtt(ProcessingCost(cal)) == [pytest.approx(220e-6, abs=1e-12)]
    shell = dataclasses.replace(cal, shell_rx_us=1.0, shell_tx_us=2.0)
    assert _ping_rtt(ProcessingCost(shell)) == [pytest.approx(226e-6, abs=1e-12)]


def test_one_cpu_serialises_the_roles_and_per_host_cpus_do_not():
    cal = _cal(rx_raw=100.0)
    shared = _ping_rtt(ProcessingCost(cal), pings=3)
    apart = _ping_rtt(ProcessingCost(cal, per_host=True), pings=3)
    # three pings at once: on one CPU the last waits behind five other receptions
    assert shared[-1] == pytest.approx(600e-6, abs=1e-12)
    assert apart[-1] == pytest.approx(400e-6, abs=1e-12)  # its own host's queue only


def _trial(cal: Calibration, seed: int = 3):
    spec = TrialSpec(agent_nat="full_cone", connector_nat="port_restricted", seed=seed, samples=10)
    return run_trial(spec, backend=SimBackend(cal))


def test_trials_are_charged_named_and_deterministic():
    free, charged, again = _trial(zero()), _trial(DEFAULT), _trial(DEFAULT)
    assert free.sim_calibration == "none@" + zero().digest and charged.sim_calibration == DEFAULT.label
    assert free.rtt_direct_p50_ms == 20.0 and free.ttfb_ms == 60.0  # the network alone, exactly
    assert charged.rtt_direct_p50_ms > 20.0 and charged.ttd_ms > free.ttd_ms  # processing on the path
    fields = ("ttfb_ms", "ttd_ms", "punch_ms", "rtt_direct_p50_ms", "rtt_relay_p50_ms", "rtt_direct_p95_ms")
    assert [getattr(charged, f) for f in fields] == [getattr(again, f) for f in fields]


def test_the_default_backend_uses_the_active_calibration(monkeypatch, tmp_path):
    path = calibrate.save(_cal("env", rx=7.0), tmp_path / "c.json")
    monkeypatch.setenv(calibrate.ENV, str(path))
    r = run_trial(TrialSpec(agent_nat="public", connector_nat="public", samples=5))
    assert r.sim_calibration == _cal("env", rx=7.0).label


def test_fit_reproduces_the_real_figures():
    real = {"direct_rtt": 1.5, "relay_rtt": 2.5, "handshake": 20.0}
    fitted, simulated = calibrate.fit(_cal("p", rx=10.0, tx=10.0), real)
    assert simulated["direct_rtt"] == pytest.approx(1.5, abs=0.01)
    assert simulated["handshake"] == pytest.approx(20.0, rel=0.02)  # events step past timers: not exact
    assert fitted.shell_rx_us > 0 and fitted.rx_us["client_hello"] > 10.0


def test_calibrate_command_measures_stores_and_is_used(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cal.json"
    assert main(["sim", "calibrate", "--against", "loopback", "--rounds", "10", "--trials", "2", "--name", "ci",
                 "--out", str(out), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    cal = calibrate.load(out)
    assert cal.name == "ci" and shown["file"] == str(out)
    assert cal.rx_us["client_hello"] > cal.rx_us["short"] > 0 and cal.shell_rx_us > 0
    real, simulated = shown["figures"]["real"], shown["figures"]["sim"]
    assert simulated["direct_rtt"] == pytest.approx(real["direct_rtt"], rel=0.05, abs=0.01)
    monkeypatch.setenv(calibrate.ENV, str(out))
    assert main(["sim", "calibration"]) == 0
    assert cal.label in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    monkeypatch.setenv(calibrate.ENV, str(tmp_path / "bad.json"))
    assert main(["sim", "calibration"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlab: ") and err.count("\n") == 1 and "Traceback" not in err
    assert os.path.exists(out)
