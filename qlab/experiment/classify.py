"""`qlab classify` in a lab: an Intermediate with its four listeners, and the Agent host's NAT
classified from inside."""

from __future__ import annotations

import asyncio
from typing import Any

from qlab.backends.base import Environment, get_backend
from qlab.certs import Credentials, default_certs
from qlab.endpoint import Endpoint
from qlab.experiment.trial import intermediate_listeners, off_loop
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import build
from qlab.traversal.detect import classify
from qlab.traversal.punch import host_ips_for


async def classify_in(env: Environment, creds: Credentials, host: str = "agent") -> dict[str, Any]:
    """Run an Intermediate with its four listeners and classify `host`'s NAT from its socket."""
    inter_ips = env.addresses("intermediate")
    listen = intermediate_listeners(inter_ips)
    srv = Intermediate(env.net("intermediate"), creds)
    net = env.net(host)
    ep = Endpoint(net)
    try:
        await srv.listen(listen)
        await ep.bind("0.0.0.0", 0)
        host_ips = host_ips_for(ep.local_address, net.host_addresses())
        verdict = await classify(ep, creds, listen[0], host_ips)
        return verdict.to_dict()
    finally:
        ep.close()
        srv.close()
        await asyncio.sleep(0)


def run_classify(backend_name: str, nat: str, *, profile: str = "lan", seed: int = 0,
                 certs_dir: str | None = None) -> dict[str, Any]:
    """`qlab classify` in a lab: the Agent host behind `nat`, classified from inside."""
    return off_loop(_run_classify, backend_name, nat, profile=profile, seed=seed, certs_dir=certs_dir)


def _run_classify(backend_name: str, nat: str, *, profile: str = "lan", seed: int = 0,
                  certs_dir: str | None = None) -> dict[str, Any]:
    topo = build(nat, "public", profile_name=profile)
    backend = get_backend(backend_name)
    creds = Credentials.load(certs_dir or default_certs())
    with backend.environment(topo, seed) as env:
        out = backend.run(env, lambda: classify_in(env, creds, "agent"))
    out.update(backend=backend_name, configured=nat, correct=out.get("preset") == nat)
    return out
