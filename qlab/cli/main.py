"""`qlab` command line: the roles as processes, certificates, and (via sub-modules) the lab tools."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable

from qlab import __version__, wire
from qlab.backends.base import BackendUnavailable
from qlab.cli import campaign as campaign_cli
from qlab.cli import cloud as cloud_cli
from qlab.cli import lab as lab_cli
from qlab.cli import roles as roles_cli
from qlab.cli import sim as sim_cli
from qlab.cli.util import Parser, example, parse_addr, parse_advertise, positive_int


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2) if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if verbose < 2:
        logging.getLogger("quic").setLevel(logging.WARNING)


def _run_until_signal(main: Callable[[asyncio.Event], Awaitable[int | None]]) -> int:
    """Run `main(stop)`; SIGTERM and SIGINT set `stop` so the role shuts down cleanly."""

    async def runner() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        result = await main(stop)
        return int(result or 0)

    return asyncio.run(runner())


def _creds(args: argparse.Namespace):
    from qlab.certs import Credentials

    return Credentials.load(args.certs).with_tls(intermediate_name=getattr(args, "intermediate_name", None) or "",
                                                 cert=getattr(args, "tls_cert", None) or "",
                                                 key=getattr(args, "tls_key", None) or "")


# --- roles ---------------------------------------------------------------------------------------


def cmd_certs_init(args: argparse.Namespace) -> int:
    from qlab.certs import init_dir

    d = init_dir(args.dir, force=args.force)
    print("qlab CA, leaves (intermediate.qlab, connector.qlab), the root secret (Intermediate only) and the "
          f"role secrets agent.secret and connector.secret written to {d}")
    return 0


def cmd_intermediate(args: argparse.Namespace) -> int:
    from qlab.net import RealNet
    from qlab.roles import intermediate
    from qlab.roles.policy import AccessPolicy

    creds = _creds(args)
    policy = AccessPolicy.load(args.policy) if args.policy else None
    listen = [args.listen] + list(args.alt or [])
    if args.session_idle < 2 * wire.SESSION_ALIVE_INTERVAL:
        raise ValueError(f"--session-idle must be at least {2 * wire.SESSION_ALIVE_INTERVAL:.0f} s "
                         f"(Agents say a session is alive every {wire.SESSION_ALIVE_INTERVAL:.0f} s)")
    caps = intermediate.Caps(args.sessions_per_client, args.max_sessions, args.session_idle)
    return _run_until_signal(
        lambda stop: intermediate.run(RealNet(), creds, listen, metrics_addr=args.metrics, stop=stop, policy=policy,
                                      advertise=dict(args.advertise or []), caps=caps)
    )


def cmd_connector(args: argparse.Namespace) -> int:
    from qlab.net import RealNet
    from qlab.roles.connector import Connector
    from qlab.traversal.connector_side import ConnectorTraversal
    from qlab.traversal.path import TraversalConfig

    creds = _creds(args)

    async def main(stop: asyncio.Event) -> int:
        c = Connector(
            RealNet(), creds, args.intermediate, service=args.service, forward=args.forward, name=args.name,
            host=args.bind, p2p_port=args.p2p_port,
        )
        # answers offers and punches: direct P2P on the same socket
        traversal = ConnectorTraversal(c, TraversalConfig(port_mapping=args.port_mapping))
        await c.start()
        http = None
        if args.metrics is not None:
            from qlab.roles.metrics import serve_http

            host, port = args.metrics
            http = await serve_http(host, port, c.metrics, lambda: c.link.up.is_set())
            logging.getLogger("qlab.roles.connector").info("metrics on http://%s:%d/metrics", host, port)
        fatal = asyncio.ensure_future(c.failed.wait())
        done, _ = await asyncio.wait([fatal, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        traversal.close()
        c.close()
        if http is not None:
            http.close()
        await asyncio.sleep(0.05)  # let CONNECTION_CLOSE leave
        if fatal in done and c.fatal is not None:
            print(f"qlab connector: {c.fatal}", file=sys.stderr)
            return 2
        return 0

    return _run_until_signal(main)


def cmd_agent(args: argparse.Namespace) -> int:
    from qlab.net import RealNet
    from qlab.roles.agent import Agent, ping
    from qlab.roles.link import Refused

    creds = _creds(args)

    async def main(stop: asyncio.Event) -> int:
        agent = Agent(RealNet(), creds, args.intermediate, name=args.name, host=args.bind, port=args.port,
                      expect_connector=args.expect_connector)
        try:
            await agent.start(timeout=args.timeout)
            if args.mode == "sealed":  # one end-to-end connection to the Connector, relayed sealed
                session = agent.begin_session(args.service, mode=wire.SessionMode.SEALED)
                await session.wait_open(args.timeout)
                await agent.connect_sealed(session, timeout=args.timeout)
            else:
                session = await agent.open_session(args.service, timeout=args.timeout)
            sizes = None
            if args.sizes:
                sizes = [session.max_payload if s == "max" else int(s) for s in args.sizes.split(",")]
            result = await ping(session, args.ping, interval=args.interval / 1000, size=args.size, sizes=sizes)
            result.update(agent=args.name, service=args.service, observed=agent.link.observed)
            print(json.dumps(result), flush=True)
            sent = sum(p["sent"] for p in result["paths"].values())
            if sent and not any(p["received"] for p in result["paths"].values()):
                why = f" (the session's last error: {session.error})" if session.error else ""
                print(f"qlab agent: no echo came back of {sent} sent{why}", file=sys.stderr)
                return 4
            return 0
        except Refused as exc:
            print(f"qlab agent: refused by the Intermediate: {exc}", file=sys.stderr)
            return 2
        except (TimeoutError, ConnectionError, OSError) as exc:
            print(f"qlab agent: {type(exc).__name__}: {exc or 'timed out'}", file=sys.stderr)
            return 3
        finally:
            agent.close()
            await asyncio.sleep(0.02)

    return _run_until_signal(main)


def cmd_echo(args: argparse.Namespace) -> int:
    from qlab.net import RealNet
    from qlab.roles.echo import EchoServer

    async def main(stop: asyncio.Event) -> int:
        srv = EchoServer(RealNet())
        addr = await srv.start(*args.listen)
        logging.getLogger("qlab.roles.echo").info("UDP echo on %s:%d", *addr)
        await stop.wait()
        srv.close()
        return 0

    return _run_until_signal(main)


# --- parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qlab", description="A lab for QUIC NAT traversal.",
               epilog=example("qlab trial --agent-nat port_restricted --connector-nat symmetric_seq",
                              "qlab COMMAND --help"))
    p.add_argument("--version", action="version", version=f"qlab {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for QUIC internals); an error shows its traceback")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in (_certs_and_intermediate, _connector_agent_echo, *_EXTENSIONS):
        register(sub)
    return p


def _certs_and_intermediate(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("certs", help="the deployment's CA, leaf certificates and secrets",
                       epilog=example("qlab certs init ./certs"))
    csub = c.add_subparsers(dest="certs_command", required=True)
    ci = csub.add_parser("init", help="create a CA, leaves for intermediate.qlab and connector.qlab, the root "
                                      "secret and the Agent's and Connector's secrets (all keys and secrets 0600)",
                        epilog=example("qlab certs init ./certs"))
    ci.add_argument("dir", help="where to write them (created)")
    ci.add_argument("--force", action="store_true", help="replace an existing CA")
    ci.set_defaults(func=cmd_certs_init)

    i = sub.add_parser("intermediate", help="run the Intermediate Server",
                       epilog=example("qlab intermediate --certs ./certs --listen 0.0.0.0:4433 --metrics 127.0.0.1:9100"))
    i.add_argument("--listen", type=lambda s: parse_addr(s, 4433), default=("0.0.0.0", 4433), metavar="HOST:PORT",
                   help="where clients connect (default: 0.0.0.0:4433; port alone: 4433)")
    i.add_argument("--alt", type=parse_addr, action="append",
                   help="extra HOST:PORT for NAT classification (repeat: alternate port, alternate IP, both)")
    i.add_argument("--advertise", type=parse_advertise, action="append", metavar="LOCAL_IP=PUBLIC_IP",
                   help="the public address a listener IP is reached at (1:1 NAT such as an Elastic IP; repeat)")
    i.add_argument("--certs", required=True, help="directory made by `qlab certs init`")
    i.add_argument("--tls-cert", default=None, help="serve this certificate chain instead (e.g. Let's Encrypt)")
    i.add_argument("--tls-key", default=None, help="the key of --tls-cert")
    i.add_argument("--metrics", type=parse_addr, default=None, help="HOST:PORT for /metrics and /healthz")
    i.add_argument("--policy", default=None, help="JSON access policy (per-client secrets and services)")
    i.add_argument("--sessions-per-client", type=positive_int, default=64, help="open sessions per client identity (role, name)")
    i.add_argument("--max-sessions", type=positive_int, default=10_000, help="open sessions in total")
    i.add_argument("--session-idle", type=float, default=1800.0, help="seconds without traffic before a session is closed")
    i.set_defaults(func=cmd_intermediate)


def _client_of_intermediate(p: argparse.ArgumentParser) -> None:
    """What a Connector and an Agent need to reach and trust the Intermediate."""
    p.add_argument("--intermediate", type=lambda s: parse_addr(s, 4433), required=True, metavar="HOST[:PORT]",
                   help="the Intermediate (port default 4433)")
    p.add_argument("--certs", required=True, help="directory made by `qlab certs init`")
    p.add_argument("--intermediate-name", default=None,
                   help="the Intermediate's public DNS name, verified against public CAs (Let's Encrypt)")


def _connector_agent_echo(sub: argparse._SubParsersAction) -> None:
    cn = sub.add_parser("connector", help="run an App Connector",
                        epilog=example("qlab connector --intermediate relay.example.org:4433 --service echo "
                                       "--forward 127.0.0.1:9999 --certs ./certs"))
    _client_of_intermediate(cn)
    cn.add_argument("--service", required=True, help="the service name Agents ask for")
    cn.add_argument("--forward", type=parse_addr, required=True, help="HOST:PORT of the application (UDP)")
    cn.add_argument("--p2p-port", type=int, default=4434, help="the one UDP port for everything (0 = any)")
    cn.add_argument("--bind", default="0.0.0.0", help="local address (0.0.0.0: any)")
    cn.add_argument("--name", default="connector", help="this Connector's name (in its certificate's role)")
    cn.add_argument("--metrics", type=parse_addr, default=None, help="HOST:PORT for /metrics and /healthz")
    cn.add_argument("--port-mapping", action="store_true",
                    help="ask the default gateway for a port mapping of the one socket (PCP, NAT-PMP, UPnP IGD), "
                         "renew it while running, delete it on exit, and offer it to Agents")
    cn.set_defaults(func=cmd_connector)

    a = sub.add_parser("agent", help="run an Agent: open a session and send echo probes through it",
                       epilog=example("qlab agent --intermediate relay.example.org:4433 --service echo "
                                      "--certs ./certs --ping 20"))
    _client_of_intermediate(a)
    a.add_argument("--service", required=True, help="the service to open a session to")
    a.add_argument("--ping", type=int, default=10, help="number of echo probes")
    a.add_argument("--size", type=int, default=64, help="payload bytes per probe")
    a.add_argument("--sizes", default=None, help="comma-separated payload sizes to send once each ('max' allowed)")
    a.add_argument("--interval", type=float, default=20.0, help="ms between probes")
    a.add_argument("--timeout", type=float, default=5.0, help="seconds for connect and session setup")
    a.add_argument("--bind", default="0.0.0.0", help="local address (0.0.0.0: any)")
    a.add_argument("--port", type=int, default=0, help="local UDP port (0: any)")
    a.add_argument("--name", default="agent", help="this Agent's name")
    a.add_argument("--mode", default="terminated", choices=("terminated", "sealed"),
                   help="sealed: one end-to-end QUIC connection to the Connector, relayed without the "
                        "Intermediate reading it (docs/architecture.md, 'Two architectures')")
    a.add_argument("--expect-connector", default=None, metavar="NAME",
                   help="refuse a session (and a direct path) served by any other Connector")
    a.set_defaults(func=cmd_agent)

    e = sub.add_parser("echo", help="run the lab's application: a UDP echo",
                       epilog=example("qlab echo --listen 127.0.0.1:9999"))
    e.add_argument("--listen", type=lambda s: parse_addr(s, 9999), default=("127.0.0.1", 9999), metavar="HOST:PORT",
                   help="where to answer (default: 127.0.0.1:9999; port alone: 9999)")
    e.set_defaults(func=cmd_echo)


# command groups that live in their own modules: `qlab trial/classify/probe`, `campaign`, `lab`, `cloud`
_EXTENSIONS = (roles_cli.register, campaign_cli.register, lab_cli.register, sim_cli.register, cloud_cli.register)


def _uses_netns(args: argparse.Namespace) -> bool:
    if getattr(args, "cluster", None):  # the cluster's workers run the labs; the driver only writes records
        return False
    return args.command == "lab" or getattr(args, "backend", None) == "netns"


def _rerun_in_userns(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Without root, run this very command again as root of an unprivileged user namespace (where the
    system allows them): the lab, its NATs and the trial live inside it and vanish with it."""
    from qlab.backends.netns.lab import userns_available, userns_command

    if args.command == "lab":
        print("qlab: `qlab lab` keeps a lab running between commands and needs root; without root use "
              "qlab trial/classify/campaign --backend netns, which build the lab inside a user namespace",
              file=sys.stderr)
        return 2
    if not userns_available():
        print("qlab: the netns backend needs root or unprivileged user namespaces, and neither is available "
              "here; use --backend sim", file=sys.stderr)
        return 2
    cmd = userns_command([sys.executable, "-m", "qlab.cli.main", *(argv if argv is not None else sys.argv[1:])])
    return subprocess.call(cmd, env={**os.environ, "QLAB_IN_USERNS": "1"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if _uses_netns(args) and os.geteuid() != 0 and os.environ.get("QLAB_IN_USERNS") != "1":
        return _rerun_in_userns(args, argv)
    _setup_logging(args.verbose)
    if args.command not in ("intermediate", "connector", "agent", "echo") and not args.verbose:
        logging.getLogger("qlab").setLevel(logging.WARNING)  # lab commands print results, not role chatter
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `qlab ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet too
        return 141
    except (ValueError, OSError, BackendUnavailable) as exc:
        if args.verbose:  # -v: the whole story, for a bug report
            raise
        print(f"qlab: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def one_line(exc: BaseException) -> str:
    """A user error in one line: bad parameters (ValueError, a campaign's ManifestMismatch), a path that
    cannot be used (OSError: not a directory, read-only, missing), a backend that cannot run here."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

