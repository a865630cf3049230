"""Small argument parsers shared by the command modules."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from qlab.nat.spec import preset


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


def positive_int(text: str) -> int:
    """An integer of at least 1 (counts: trials, samples, workers)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not allowed: at least 1")
    return n


def non_negative_float(text: str) -> float:
    """A number of at least 0 (durations, intervals)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text} is not allowed: at least 0")
    return x


RESULTS_HELP = "results root (default: the project's results/ or $QLAB_RESULTS)"


def example(*commands: str) -> str:
    """A command's epilog: the example(s) its --help ends with."""
    return "example:\n" + "\n".join(f"  {c}" for c in commands)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is nothing to show (None, False) or the
    help already says it; descriptions wrapped per line, indented lines (the example) kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS \
                or "default" in text:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n".join(indent + line if line[:1].isspace() or not line else fill(line, width, indent)
                         for line in text.splitlines())


class Parser(argparse.ArgumentParser):
    """qlab's parsers: defaults and an example in every help, and a usage error in one line (the usage
    itself is one `--help` away), exit status 2. Sub-parsers are made of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def nat_preset(text: str) -> str:
    """A NAT preset name, with or without a port-mapping suffix (`symmetric+map`)."""
    try:
        return preset(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
