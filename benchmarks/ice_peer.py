"""One RFC 8445 ICE agent (aioice, the implementation aiortc uses) for `benchmarks/ice_matrix.py`.

Run inside a lab host's namespace (`ip netns exec ...`); its stdin and stdout are the signaling
channel, one JSON line each way:

1. gathers host and server-reflexive candidates over UDP/IPv4 (components=1, no IPv6, no TURN),
   the STUN server being the lab's stund on the Intermediate;
2. prints {"ufrag", "pwd", "candidates": [SDP a=candidate values]} on one line;
3. reads the peer's line from stdin, adds its candidates and end-of-candidates;
4. runs `connect()` within --timeout seconds, then proves the pair with one datagram each way (the
   controlling side sends "ping", the controlled side answers "pong"), within --data-timeout;
5. prints {"connected", "data_ok", "local_type", "remote_type", "local", "remote", "connect_ms",
   "gather_ms", "error"} on one line and exits 0 (an ICE failure is a result, not an error).

    ip netns exec NS python benchmarks/ice_peer.py --role controlling|controlled \
        [--stun 203.0.113.10:3478] [--timeout 10] [--data-timeout 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import aioice


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _read_line(timeout: float) -> str:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = await asyncio.wait_for(reader.readline(), timeout)
    if not line:
        raise EOFError("the signaling channel closed before the peer's candidates came")
    return line.decode()


def _selected(conn: aioice.Connection) -> Any:
    """The nominated pair of component 1 (aioice keeps it in a private dict; no public accessor)."""
    return getattr(conn, "_nominated", {}).get(1)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    host, port = args.stun.rsplit(":", 1)
    controlling = args.role == "controlling"
    conn = aioice.Connection(ice_controlling=controlling, components=1, stun_server=(host, int(port)),
                             use_ipv4=True, use_ipv6=False)
    result: dict[str, Any] = {"role": args.role, "connected": False, "data_ok": False, "local_type": None,
                              "remote_type": None, "local": None, "remote": None, "connect_ms": None,
                              "gather_ms": None, "local_candidates": [], "remote_candidates": [], "error": ""}
    try:
        t0 = time.monotonic()
        await asyncio.wait_for(conn.gather_candidates(), args.gather_timeout)
        result["gather_ms"] = round(1000 * (time.monotonic() - t0), 1)
        local = [c.to_sdp() for c in conn.local_candidates]
        result["local_candidates"] = local
        _emit({"ufrag": conn.local_username, "pwd": conn.local_password, "candidates": local})

        peer = json.loads(await _read_line(args.signal_timeout))
        conn.remote_username = peer["ufrag"]
        conn.remote_password = peer["pwd"]
        result["remote_candidates"] = peer["candidates"]
        for sdp in peer["candidates"]:
            await conn.add_remote_candidate(aioice.Candidate.from_sdp(sdp))
        await conn.add_remote_candidate(None)  # end of candidates: connect() may then report failure

        t1 = time.monotonic()
        try:
            await asyncio.wait_for(conn.connect(), args.timeout)
        except (ConnectionError, TimeoutError) as exc:
            result["error"] = f"connect: {type(exc).__name__}: {exc}" if str(exc) else f"connect: {type(exc).__name__}"
            return result
        result["connect_ms"] = round(1000 * (time.monotonic() - t1), 1)
        result["connected"] = True
        pair = _selected(conn)
        if pair is not None:
            result["local_type"] = pair.local_candidate.type
            result["remote_type"] = pair.remote_candidate.type
            result["local"] = f"{pair.local_addr[0]}:{pair.local_addr[1]}"
            result["remote"] = f"{pair.remote_addr[0]}:{pair.remote_addr[1]}"

        # one datagram each way over the selected pair
        try:
            if controlling:
                await conn.send(b"ping")
                reply = await asyncio.wait_for(conn.recv(), args.data_timeout)
                result["data_ok"] = reply == b"pong"
            else:
                got = await asyncio.wait_for(conn.recv(), args.data_timeout)
                if got == b"ping":
                    await conn.send(b"pong")
                    result["data_ok"] = True
                    # the controlling side's ping may have been the only one: stay a moment so a
                    # retransmitted check or consent request is still answered
                    await asyncio.sleep(0.2)
        except (TimeoutError, ConnectionError) as exc:
            result["error"] = f"data: {type(exc).__name__}"
        return result
    except (TimeoutError, EOFError, ValueError, KeyError, OSError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    finally:
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(conn.close(), 2)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", required=True, choices=("controlling", "controlled"))
    ap.add_argument("--stun", default="203.0.113.10:3478")
    ap.add_argument("--timeout", type=float, default=10.0, help="bound on connect() (s)")
    ap.add_argument("--data-timeout", type=float, default=3.0, help="bound on the datagram exchange (s)")
    ap.add_argument("--gather-timeout", type=float, default=8.0, help="bound on gathering (s)")
    ap.add_argument("--signal-timeout", type=float, default=15.0, help="bound on waiting for the peer's line (s)")
    _emit(asyncio.run(main(ap.parse_args())))


if __name__ == "__main__":
    cli()
