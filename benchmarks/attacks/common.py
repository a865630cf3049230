"""What every row shares: the run's context, figures, and wrappers around a client's socket."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Figures = list[tuple[str, Any]]


@dataclass
class Ctx:
    work: Path  # scratch directory of this run
    certs: Path  # made by the checkout's `qlab certs init`
    seconds: float  # attack length of the timed rows
    cache: dict[str, Any] = field(default_factory=dict)


def mb(kb: float) -> str:
    return f"{kb / 1024:.1f} MB"


def ms(seconds: list[float]) -> str:
    return f"{statistics.median(seconds) * 1000:.0f} ms" if seconds else "-"


class SockWrap:
    """Stands in for a client endpoint's socket: counts what it sends, and may send it from another
    socket instead (`via`: the source-address row)."""

    def __init__(self, inner: Any, via: Callable[[bytes, tuple[str, int]], None] | None = None) -> None:
        self.inner = inner
        self.via = via
        self.bytes = 0
        self.packets = 0

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.bytes += len(data)
        self.packets += 1
        (self.via or self.inner.sendto)(data, addr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def wrap_socket(client: Any, via: Callable[[bytes, tuple[str, int]], None] | None = None) -> SockWrap | None:
    """Wrap the socket of a checkout client's `endpoint` (None when it has no such attribute)."""
    ep = getattr(client, "endpoint", None)
    if ep is None or getattr(ep, "sock", None) is None:
        return None
    w = SockWrap(ep.sock, via)
    ep.sock = w
    return w


async def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= end:
            return False
        await asyncio.sleep(step)
    return True
