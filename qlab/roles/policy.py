"""Who may connect and what they may reach: an access policy and per-client rate limits.

A role's secret (derived from the deployment's root) admits any client of that role. A policy file
can go further: clients it names must prove their own secret (so a name cannot be borrowed) and
reach only their services; a service a named Connector lists belongs to the named Connectors that
list it (no unnamed one may register it, whatever `default` says); `default` says what unnamed
clients may do. Example:

    {"default": "deny",
     "clients": {"alice": {"role": "agent", "secret": "<hex>", "services": ["echo"]},
                 "edge-1": {"role": "connector", "secret": "<hex>", "services": ["echo"]}}}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from qlab import wire


@dataclass(frozen=True)
class ClientRule:
    role: wire.Role
    secret: bytes
    services: frozenset[str]


@dataclass
class AccessPolicy:
    default_allow: bool = True
    clients: dict[str, ClientRule] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AccessPolicy:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"policy {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("default", "allow") not in ("allow", "deny"):
            raise ValueError(f"policy {path}: 'default' must be \"allow\" or \"deny\"")
        rules: dict[str, ClientRule] = {}
        for name, r in (data.get("clients") or {}).items():
            try:
                role = wire.Role[str(r["role"]).upper()]
                secret = bytes.fromhex(r["secret"]) if "secret" in r else b""
                services = frozenset(str(s) for s in r.get("services", []))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"policy {path}: client {name!r}: {exc}") from None
            if secret and len(secret) < 16:
                raise ValueError(f"policy {path}: client {name!r}: secret shorter than 16 bytes")
            rules[name] = ClientRule(role, secret, services)
        return cls(data.get("default", "allow") == "allow", rules)

    def own_secret(self, name: str) -> bytes:
        """The secret the policy gives the client `name`, or b"" (it proves its role's secret)."""
        rule = self.clients.get(name)
        return rule.secret if rule is not None else b""

    def admits(self, hello: wire.Hello) -> str | None:
        """None if the client may connect, else the reason it may not."""
        rule = self.clients.get(hello.name)
        if rule is not None and rule.role != hello.role:
            return f"{hello.name} is not a {hello.role.name.lower()}"
        return None

    def may_use(self, name: str, role: wire.Role, service: str) -> bool:
        """Agents: may open sessions to `service`; Connectors: may register it."""
        if role == wire.Role.PROBE:
            return False
        rule = self.clients.get(name)
        if rule is None:
            return self.default_allow and not (role == wire.Role.CONNECTOR and self.named_owners(service))
        return service in rule.services

    def named_owners(self, service: str) -> list[str]:
        """The named Connectors that list `service`: it belongs to them."""
        return [n for n, r in self.clients.items() if r.role == wire.Role.CONNECTOR and service in r.services]


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float, n: float = 1.0) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


# per client: (rate per second, burst)
RATE_LIMITS = {
    "control": (200.0, 400.0),  # every control message
    "register": (5.0, 10.0),
    "session": (20.0, 40.0),  # OpenSession and Offer
    "change_request": (10.0, 20.0),
}


class ClientLimits:
    def __init__(self, now: float, limits: dict[str, tuple[float, float]] | None = None) -> None:
        self.buckets = {k: TokenBucket(r, b, now) for k, (r, b) in (limits or RATE_LIMITS).items()}

    def allow(self, kind: str, now: float) -> bool:
        b = self.buckets.get(kind)
        return b is None or b.take(now)
