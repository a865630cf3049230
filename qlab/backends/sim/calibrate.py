"""Measure what each kind of datagram costs on this machine, for the simulator's `Calibration`.

    qlab sim calibrate [--against netns|loopback] [--rounds N] [--name NAME]   # ~30 s; stored for this user

Two parts, each the real code the roles run, then a fit:
- the protocol: aioquic connections with qlab's own QUIC and TLS settings and the lab's certificates,
  driven without sockets: the server taking a ClientHello, the client taking the server's flight,
  1-RTT DATAGRAMs each way, and qlab's punch probes (encode, authenticate, decode);
- the shell: qlab's `RealSocket` on loopback, the asyncio reader and system calls every datagram
  of a role goes through (`sendto` timed for sending; the rest of a round trip is receiving).

Each figure is the median of `rounds` repetitions: the kernel lab runs on a busy machine too. What
the roles do beyond these pieces (their own Python around each datagram, the direct handshake's
setup) and what the kernel lab's path adds is then fitted: real trials of one reference cell give the
direct echo RTT and the punch-to-first-echo time, and two knobs (a per-datagram share, a handshake
share) are set so that the simulator gives the same (`fit`). Every other cell, profile and figure
is left to check it (benchmarks/crossval.py).
Where the calibration is kept: `calibration_file()`; which one a trial uses: `active()`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import socket
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qlab.backends.sim.cost import DEFAULT, Calibration, CalibrationError, DatagramClass, this_machine, zero

ENV = "QLAB_SIM_CALIBRATION"  # a file, or "default" / "none"
Samples = dict[str, list[float]]


def calibration_file() -> Path:
    """Where `qlab sim calibrate` stores this user's calibration."""
    from qlab.certs import cache_dir

    return cache_dir() / "sim-calibration.json"


def load(path: str | os.PathLike) -> Calibration:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise CalibrationError(f"{p}: cannot read the calibration ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CalibrationError(f"{p}: not JSON ({exc})") from None
    return Calibration.from_dict(data, where=str(p))


def save(calibration: Calibration, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path else calibration_file()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
    tmp.replace(p)
    return p


def active() -> Calibration:
    """The calibration sim trials use: $QLAB_SIM_CALIBRATION ("default", "none" or a file), else this
    user's measured one, else the shipped `DEFAULT`."""
    choice = os.environ.get(ENV, "")
    if choice == "default":
        return DEFAULT
    if choice == "none":
        return zero()
    if choice:
        return load(choice)
    stored = calibration_file()
    return load(stored) if stored.is_file() else DEFAULT


def _timed(samples: Samples, key: str, fn: Callable[..., Any], *args: Any) -> Any:
    t = time.perf_counter()
    out = fn(*args)
    samples.setdefault(key, []).append(time.perf_counter() - t)
    return out


def _handshake(samples: Samples, creds, exchanges: int) -> None:
    """One connection, client and server without sockets, each step timed."""
    from aioquic.buffer import Buffer
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import pull_quic_header

    from qlab.certs import CONNECTOR_NAME
    from qlab.endpoint import CID_LENGTH

    here, there = ("10.0.0.1", 1000), ("10.0.0.2", 2000)
    now = 0.0
    client = QuicConnection(configuration=creds.client_config(CONNECTOR_NAME))
    client.connect(there, now=now)
    hello = client.datagrams_to_send(now)
    header = pull_quic_header(Buffer(data=hello[0][0]), host_cid_length=CID_LENGTH)
    server = QuicConnection(configuration=creds.server_config("connector"),
                            original_destination_connection_id=header.destination_cid)
    for data, _ in hello:
        _timed(samples, "rx_client_hello", server.receive_datagram, data, here, now)
    flight = _timed(samples, "tx_flight", server.datagrams_to_send, now)
    t = time.perf_counter()
    for data, _ in flight:
        client.receive_datagram(data, there, now)
    samples.setdefault("rx_server_flight", []).append(time.perf_counter() - t)
    for data, _ in client.datagrams_to_send(now):  # Finished
        _timed(samples, "rx_long", server.receive_datagram, data, here, now)
    for data, _ in server.datagrams_to_send(now):
        client.receive_datagram(data, there, now)
    for _ in range(exchanges):
        now += 0.02
        for a, b, addr in ((client, server, here), (server, client, there)):
            a.send_datagram_frame(b"x" * 64)
            out = _timed(samples, "tx_short", a.datagrams_to_send, now)
            for data, _ in out:
                _timed(samples, "rx_short", b.receive_datagram, data, addr, now)
    samples.setdefault("flight_datagrams", []).append(len(flight))


def _probes(samples: Samples, rounds: int) -> None:
    from qlab import wire

    key = os.urandom(wire.KEY_LEN)
    for txn in range(rounds):
        probe = wire.Probe(wire.PROBE_REQUEST, 7, txn)
        data = _timed(samples, "tx_raw", wire.encode_probe, probe, key)
        _timed(samples, "rx_raw", wire.decode_probe, data, key)


async def _shell(samples: Samples, rounds: int) -> None:
    """Ping-pong over two of qlab's RealSockets on loopback, one loop (as the roles run)."""
    from qlab.net import bind_real

    loop = asyncio.get_running_loop()
    got: asyncio.Queue[float] = asyncio.Queue()
    payload = b"\x01" * 100

    def pong(batch):
        for data, addr in batch:
            b.sendto(data, addr)

    a = bind_real(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "127.0.0.1", 0,
                  lambda batch: got.put_nowait(time.perf_counter()))
    b = bind_real(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), "127.0.0.1", 0, pong)
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            a.sendto(payload, b.local_address)
            sent = time.perf_counter() - t0
            back = await asyncio.wait_for(got.get(), 2.0)
            samples.setdefault("shell_tx", []).append(sent)
            samples.setdefault("round_trip", []).append(back - t0)
            await asyncio.sleep(0)
    finally:
        a.close()
        b.close()
    del loop


def measure_protocol(rounds: int = 200, name: str = "") -> Calibration:
    """The protocol's and the shell's costs, measured piece by piece (about 2 s at 200 rounds)."""
    from qlab.certs import Credentials, default_certs

    if rounds < 10:
        raise ValueError("rounds must be at least 10")
    creds = Credentials.load(default_certs())
    samples: Samples = {}
    for _ in range(rounds):
        _handshake(samples, creds, exchanges=5)
    _probes(samples, rounds * 5)
    asyncio.run(_shell(samples, rounds * 5))
    flight_datagrams = max(1.0, statistics.median(samples.pop("flight_datagrams")))
    us = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    tx_long = us["tx_flight"] / flight_datagrams
    shell_tx = us["shell_tx"]
    shell_rx = max(0.0, us["round_trip"] / 2 - shell_tx)  # one datagram's way: sendto, then the rest
    rx = {DatagramClass.CLIENT_HELLO: us["rx_client_hello"], DatagramClass.SERVER_FLIGHT: us["rx_server_flight"],
          DatagramClass.LONG: us["rx_long"], DatagramClass.SHORT: us["rx_short"], DatagramClass.RAW: us["rx_raw"]}
    tx = {DatagramClass.CLIENT_HELLO: tx_long, DatagramClass.SERVER_FLIGHT: tx_long, DatagramClass.LONG: tx_long,
          DatagramClass.SHORT: us["tx_short"], DatagramClass.RAW: us["tx_raw"]}
    machine, python = this_machine()
    return Calibration(
        name=name or socket.gethostname() or "measured",
        rx_us={k.value: round(v, 1) for k, v in rx.items()},
        tx_us={k.value: round(v, 1) for k, v in tx.items()},
        shell_rx_us=round(shell_rx, 1), shell_tx_us=round(shell_tx, 1),
        machine=machine, python=python, measured_at=datetime.date.today().isoformat(),
        method=f"protocol: median of {rounds} handshakes without sockets",
    )


# What the fit runs, on the real backend and on the simulator alike. `netns`: the kernel lab, so the
# fit also takes in what a datagram costs the lab's kernel path and wires (needs root); `loopback`: both
# ends public, no added delay, every millisecond is the roles' processing.
REFERENCES = {"netns": ("full_cone", "full_cone", "wan-20ms"), "loopback": ("public", "public", "lan")}


def reference_spec(against: str, backend: str, seed: int):
    from qlab.experiment.record import TrialSpec

    agent_nat, connector_nat, profile = REFERENCES[against]
    return TrialSpec(backend=backend, seed=seed, agent_nat=agent_nat, connector_nat=connector_nat, profile=profile)


def default_reference() -> str:
    """`netns` where the kernel lab can run, else `loopback`."""
    from qlab.backends.base import BackendUnavailable
    from qlab.backends.netns.lab import check_requirements

    try:
        check_requirements()
    except (BackendUnavailable, OSError, RuntimeError):
        return "loopback"
    return "netns"


def phases(result) -> dict[str, float]:
    """The figures the fit matches: echo RTTs on each path and the time from the punch to the first
    echo over the direct path (the direct QUIC handshake, its proof and the echo)."""
    punched = next((e["t_ms"] for e in result.path_events if e["event"] == "punch_ok"), None)
    if punched is None or result.ttd_ms is None or result.rtt_direct_p50_ms is None:
        raise CalibrationError(f"calibration trial did not go direct: {result.outcome} ({result.reason})")
    return {"direct_rtt": result.rtt_direct_p50_ms, "relay_rtt": result.rtt_relay_p50_ms,
            "handshake": result.ttd_ms - punched}


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def _sim(calibration: Calibration, against: str, seed: int = 1) -> dict[str, float]:
    from qlab.backends.sim.backend import SimBackend
    from qlab.experiment.trial import run_trial

    return phases(run_trial(reference_spec(against, "sim", seed), backend=SimBackend(calibration)))


def _real(trials: int, against: str) -> dict[str, float]:
    from qlab.experiment.trial import run_trial

    return _medians([phases(run_trial(reference_spec(against, against, i))) for i in range(trials)])


def _with(calibration: Calibration, shell_us: float = 0.0, handshake_us: float = 0.0) -> Calibration:
    """`calibration` with `shell_us` more on every datagram's rx and tx, `handshake_us` more on each
    side's handshake datagram."""
    rx = dict(calibration.rx_us)
    for cls in (DatagramClass.CLIENT_HELLO, DatagramClass.SERVER_FLIGHT):
        rx[cls.value] = round(rx[cls.value] + handshake_us, 1)
    return dataclasses.replace(calibration, rx_us=rx, shell_rx_us=round(calibration.shell_rx_us + shell_us, 1),
                               shell_tx_us=round(calibration.shell_tx_us + shell_us, 1))


def _solve(figure: str, real: float, calibration: Calibration, knob: str, against: str) -> float:
    """The microseconds of `knob` (an argument of `_with`) that make the simulated `figure` the real
    one. The figure grows with the knob, but not smoothly (a cost can move an event past a timer), so
    bisection: about 15 simulated trials, 2 s."""
    def at(x: float) -> float:
        return _sim(_with(calibration, **{knob: x}), against)[figure]

    lo, hi = 0.0, 100.0
    if at(lo) >= real:
        return 0.0  # the protocol's costs alone already reach it
    while at(hi) < real:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise CalibrationError(f"cannot fit {figure} = {real} ms: the simulator does not reach it")
    while hi - lo > 0.5:  # us
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) < real else (lo, mid)
    return round(hi, 1)


def fit(protocol: Calibration, real: dict[str, float], against: str = "loopback") -> tuple[Calibration, dict[str, float]]:
    """`protocol` with what the real roles spend beyond it: a per-datagram share (the roles' own
    code around each datagram) that makes the simulated direct echo RTT the real one, then a
    handshake share that makes the punch-to-first-echo time the real one."""
    shelled = _with(protocol, shell_us=_solve("direct_rtt", real["direct_rtt"], protocol, "shell_us", against))
    fitted = _with(shelled, handshake_us=_solve("handshake", real["handshake"], shelled, "handshake_us", against))
    return fitted, _sim(fitted, against)


def measure(rounds: int = 200, trials: int = 7, name: str = "",
            against: str = "") -> tuple[Calibration, dict[str, dict[str, float]]]:
    """Calibrate this machine (about 30 s): the protocol piece by piece, then fitted to `trials` real
    trials `against` the kernel lab (`netns`, the default where it runs) or `loopback`. Returns the
    calibration and the figures it matches (`real`, and `sim` with the fitted costs)."""
    if trials < 1:
        raise ValueError("trials must be at least 1")
    against = against or default_reference()
    if against not in REFERENCES:
        raise ValueError(f"cannot calibrate against {against!r}; choose one of: {', '.join(REFERENCES)}")
    protocol = measure_protocol(rounds, name)
    real = _real(trials, against)
    fitted, sim = fit(protocol, real, against)
    agent_nat, connector_nat, profile = REFERENCES[against]
    fitted = dataclasses.replace(fitted, method=f"qlab sim calibrate: {rounds} handshakes without sockets, fitted to "
                                                f"{trials} {against} trials ({agent_nat} -> {connector_nat}, {profile})")
    return fitted, {"real": real, "sim": sim}
