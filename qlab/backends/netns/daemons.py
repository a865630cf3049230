"""The real daemons a kernel lab runs for a NAT that offers port mapping: Debian's miniupnpd
(nftables backend: UPnP IGD, NAT-PMP and PCP) in the router's namespace, and Debian's stund (an
RFC 3489 STUN server with CHANGE-REQUEST) on the Intermediate's two addresses.

Why the STUN server: miniupnpd refuses to forward when its WAN address is reserved, and the lab's
internet is TEST-NET-3. Asked to learn its public address by STUN, it sends four requests (changed
address and port among them); when all four come back unchanged it concludes it has a public address
and no filtering in front, and enables forwarding with that address (measured: "Port forwarding is
now enabled"). Behind a carrier NAT the same test fails and the router offers no mapping, as a real
one would.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from qlab.nat.nftables import DAEMON_CHAINS, DAEMON_TABLE, STUN_PORTS
from qlab.nat.spec import MappingProtocol, NatSpec

MINIUPNPD = "/usr/sbin/miniupnpd"
STUND = "/usr/sbin/stund"
HTTP_PORT = 5000  # the daemon's UPnP description and SOAP port
READY_TIMEOUT = 10.0


class DaemonFailed(RuntimeError):
    """A daemon did not come up: the message names it and quotes its last line."""


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(3)


def miniupnpd_config(spec: NatSpec, *, wan_if: str, lan_if: str, lan_cidr: str, stun_server: str,
                     uuid: str) -> str:
    """The daemon's configuration for `spec.port_mapping`. miniupnpd answers NAT-PMP and PCP
    together (one switch), so a spec offers both or neither."""
    offered = set(spec.port_mapping)
    pmp = {MappingProtocol.PCP, MappingProtocol.NATPMP}
    if offered & pmp and not pmp <= offered:
        raise ValueError(f"NatSpec {spec.name!r}: miniupnpd answers PCP and NAT-PMP together; offer both or neither")
    yes = {True: "yes", False: "no"}
    return "\n".join([
        f"ext_ifname={wan_if}",
        f"listening_ip={lan_if}",
        f"http_port={HTTP_PORT}",
        f"enable_natpmp={yes[bool(offered & pmp)]}",
        f"enable_upnp={yes[MappingProtocol.UPNP in offered]}",
        "secure_mode=yes",  # an inside host maps only its own address
        "ext_perform_stun=yes",
        f"ext_stun_host={stun_server}",
        f"ext_stun_port={STUN_PORTS[0]}",
        f"upnp_table_name={DAEMON_TABLE}",
        f"upnp_nat_table_name={DAEMON_TABLE}",
        f"upnp_forward_chain={DAEMON_CHAINS['forward']}",
        f"upnp_nat_chain={DAEMON_CHAINS['prerouting']}",
        f"upnp_nat_postrouting_chain={DAEMON_CHAINS['postrouting']}",
        f"uuid={uuid}",
        f"allow 1024-65535 {lan_cidr} 1024-65535",
        "deny 0-65535 0.0.0.0/0 0-65535",
        "",
    ])


def start(name: str, argv: list[str], log: Path, ready: tuple[str, ...], failed: tuple[str, ...] = (),
          timeout: float = READY_TIMEOUT) -> Daemon:
    """Start `argv` (already wrapped for its namespace), its output to `log`, and wait until every
    line in `ready` has appeared in it; DaemonFailed when a `failed` line appears, it exits or the
    time is up (the process is stopped then)."""
    out: IO[str] = log.open("w")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    out.close()
    d = Daemon(name, proc, log)
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        if all(r in text for r in ready):
            return d
        bad = next((f for f in failed if f in text), None)
        if bad is not None or proc.poll() is not None or time.monotonic() > deadline:
            d.stop()
            last = " | ".join(text.strip().splitlines()[-4:]) or "(no output)"
            why = f"said {bad!r}" if bad else ("exited" if proc.poll() is not None else f"not ready in {timeout:.0f} s")
            raise DaemonFailed(f"{name} {why}: {last}")
        time.sleep(0.02)


def stund_argv(primary: str, alternate: str) -> list[str]:
    """-v: it logs the ports it opened, which is how the lab knows it is ready."""
    return [STUND, "-v", "-h", primary, "-a", alternate, "-p", str(STUN_PORTS[0]), "-o", str(STUN_PORTS[1])]


def miniupnpd_argv(conf: Path, pidfile: Path) -> list[str]:
    return [MINIUPNPD, "-f", str(conf), "-d", "-P", str(pidfile)]


def miniupnpd_ready(spec: NatSpec) -> tuple[str, ...]:
    """The log lines that say the daemon is serving what `spec` offers."""
    lines = ["Port forwarding is now enabled"]
    if MappingProtocol.UPNP in spec.port_mapping:
        lines.append("HTTP listening on port")
    if MappingProtocol.PCP in spec.port_mapping or MappingProtocol.NATPMP in spec.port_mapping:
        lines.append("Listening for NAT-PMP/PCP traffic")
    return tuple(lines)


MINIUPNPD_FAILED = ("Port forwarding is now disabled", "Port forwarding is impossible")
