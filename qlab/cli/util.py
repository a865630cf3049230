"""Small argument parsers shared by the command modules."""

from __future__ import annotations

import argparse


def parse_addr(text: str, default_port: int | None = None) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT, or HOST alone when a default port exists."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        sep = ":" if port else ""
    elif not sep or (":" in host):  # a bare IPv6 address or no port
        host, port = (text, "") if default_port is not None else (host, port)
    if not port:
        if default_port is None:
            raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
        port = str(default_port)
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535 or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT with a port in 0..65535")
    return host, p


def parse_advertise(text: str) -> tuple[str, str]:
    """LOCAL_IP=PUBLIC_IP, both IPv4 or IPv6 literals."""
    import ipaddress

    local, sep, public = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return str(ipaddress.ip_address(local.strip())), str(ipaddress.ip_address(public.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOCAL_IP=PUBLIC_IP") from None
