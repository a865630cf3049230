"""A naive aioquic relay: the baseline benchmarks/relay.py measures qlab's relay against, in the
same run. It is written the way aioquic's asyncio examples are: one `QuicConnectionProtocol` per
connection, every received datagram handled as its own event and sent on at once with its own
`transmit()` (no batching of reads or sends), in one process.

The peer that sends `HELLO_ECHO` first is the echo side; datagrams from the other connection go to
it, and its datagrams go back to the last client that sent one. The echo side returns every
datagram as it came.

    python benchmarks/naive_relay.py relay --listen 127.0.0.1:PORT --certs DIR   (DIR from `qlab certs init`)
    python benchmarks/naive_relay.py echo --relay 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from pathlib import Path

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import DatagramFrameReceived, QuicEvent

from qlab import wire
from qlab.roles.events import Observers, PayloadReceived

ALPN = ["naive-relay"]
HELLO_ECHO = b"\x00naive-echo"
MAX_DATAGRAM = 65536


class RelayProtocol(QuicConnectionProtocol):
    echo: RelayProtocol | None = None
    client: RelayProtocol | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if not isinstance(event, DatagramFrameReceived):
            return
        if event.data == HELLO_ECHO:
            RelayProtocol.echo = self
            return
        if self is RelayProtocol.echo:
            other = RelayProtocol.client
        else:
            RelayProtocol.client = self
            other = RelayProtocol.echo
        if other is not None:
            other._quic.send_datagram_frame(event.data)
            other.transmit()


class ClientProtocol(QuicConnectionProtocol):
    """A client: `send(payload, path)` and `subscribe(handler)` like a qlab session (replies come as
    PayloadReceived on the relay path)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.payloads: Observers[PayloadReceived] = Observers()
        self.subscribe = self.payloads.subscribe
        self.echo_back = False

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, DatagramFrameReceived):
            if self.echo_back:
                self._quic.send_datagram_frame(event.data)
                self.transmit()
            else:
                self.payloads.emit(PayloadReceived(event.data, wire.Path.RELAY))

    def send(self, payload: bytes, path: str = "relay") -> str | None:
        self._quic.send_datagram_frame(payload)
        self.transmit()
        return path


def client_config() -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=ALPN, max_datagram_frame_size=MAX_DATAGRAM)
    cfg.verify_mode = ssl.CERT_NONE  # a loopback benchmark: no name to check
    return cfg


def client(host: str, port: int):
    """`async with client(host, port) as proto:` a connected ClientProtocol."""
    return connect(host, port, configuration=client_config(), create_protocol=ClientProtocol)


async def run_relay(host: str, port: int, certs: Path) -> None:
    cfg = QuicConfiguration(is_client=False, alpn_protocols=ALPN, max_datagram_frame_size=MAX_DATAGRAM)
    cfg.load_cert_chain(certs / "intermediate.pem", certs / "intermediate.key")
    await serve(host, port, configuration=cfg, create_protocol=RelayProtocol)
    print("naive relay ready", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


async def run_echo(host: str, port: int) -> None:
    async with client(host, port) as proto:
        proto.echo_back = True
        proto.send(HELLO_ECHO)
        print("naive echo registered", file=sys.stderr, flush=True)
        await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    r = sub.add_parser("relay")
    r.add_argument("--listen", required=True, help="HOST:PORT")
    r.add_argument("--certs", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--relay", required=True, help="HOST:PORT")
    args = ap.parse_args()
    if args.role == "relay":
        host, port = args.listen.rsplit(":", 1)
        asyncio.run(run_relay(host, int(port), Path(args.certs)))
    else:
        host, port = args.relay.rsplit(":", 1)
        asyncio.run(run_echo(host, int(port)))


if __name__ == "__main__":
    main()
