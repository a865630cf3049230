"""Logging in as a client of the deployment: the checkout's own client library, nothing else.

How a client proves itself changes between checkouts (a bearer HELLO tag before issue 13; a HELLO
bound to the connection and role secrets after), so every authenticated attack goes through
`agent()` / `connector()` here, which use the checkout's `Agent` and `Connector` classes with the
credentials its `Credentials.load` reads. `HelloRecorder` keeps the HELLO bytes those clients send
(for the replay row).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from pathlib import Path
from typing import Any

from qlab import wire
from qlab.certs import Credentials
from qlab.endpoint import Connection
from qlab.net import RealNet
from qlab.roles.agent import Agent
from qlab.roles.connector import Connector

Addr = tuple[str, int]


def credentials(certs: Path, role: wire.Role) -> Credentials:
    """The credentials a client of `role` loads, whatever this checkout's `Credentials.load` wants."""
    params = inspect.signature(Credentials.load).parameters
    if "role" in params:
        load: Any = Credentials.load  # a newer checkout's signature
        return load(certs, role=role)
    return Credentials.load(certs)


def masquerade(creds: Credentials, as_role: wire.Role, with_role: wire.Role) -> Credentials:
    """Credentials that make the checkout's client of `as_role` prove `with_role`'s secret (an Agent
    host's files used to register as a Connector). A checkout with one deployment secret needs no
    change: every client holds the same one."""
    if not hasattr(creds, "role_secrets"):
        return creds
    secret_for: Any = getattr(creds, "secret_for")  # noqa: B009  (only newer checkouts have it)
    return dataclasses.replace(creds, secret=b"", role_secrets={as_role: secret_for(with_role)})


async def agent(certs: Path, intermediate: Addr, name: str, *, timeout: float = 5.0) -> Agent:
    a = Agent(RealNet(), credentials(certs, wire.Role.AGENT), intermediate, name=name, host="127.0.0.1")
    try:
        await a.start(timeout=timeout)
    except BaseException:
        a.close()
        raise
    return a


async def connector(certs: Path, intermediate: Addr, name: str, service: str, forward: Addr,
                    *, timeout: float = 5.0, proving: wire.Role = wire.Role.CONNECTOR) -> Connector:
    """A Connector registered for `service` (or refused: `connector.fatal`), proving the secret of
    `proving` (an Agent's, for the credential-separation figure)."""
    creds = masquerade(credentials(certs, wire.Role.CONNECTOR), wire.Role.CONNECTOR, proving)
    c = Connector(RealNet(), creds, intermediate, service=service,
                  forward=forward, name=name, host="127.0.0.1", p2p_port=0)
    await c.start()
    with contextlib.suppress(TimeoutError, Exception):
        await c.wait_registered(timeout)
    return c


def close_all(clients: list[Any]) -> None:
    for c in clients:
        with contextlib.suppress(Exception):
            c.close()


class HelloRecorder:
    """Record the encoded HELLO messages this process's qlab clients send, while active."""

    def __init__(self) -> None:
        self.hellos: list[bytes] = []
        self._orig = Connection.send_control

    def __enter__(self) -> HelloRecorder:
        orig, hellos = self._orig, self.hellos

        def send_control(conn: Connection, msg: wire.Message) -> None:
            if isinstance(msg, wire.Hello):
                hellos.append(msg.encode())
            orig(conn, msg)

        _patch(Connection, "send_control", send_control)
        return self

    def __exit__(self, *exc: object) -> None:
        _patch(Connection, "send_control", self._orig)


def _patch(cls: type, attr: str, value: Any) -> None:
    setattr(cls, attr, value)  # noqa: B010  (a recording wrapper around the checkout's client)
