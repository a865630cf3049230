"""`qlab classify` in a lab: an Intermediate with its four listeners, and the Agent host's NAT
classified from inside."""

from __future__ import annotations

import asyncio
from typing import Any

from qlab.backends.base import Environment, get_backend
from qlab.certs import Credentials, default_certs
from qlab.endpoint import Endpoint
from qlab.experiment.trial import intermediate_listeners, off_loop
from qlab.nat.spec import MAPPING_SUFFIXES
from qlab.roles.intermediate import Intermediate
from qlab.scenario.topology import build
from qlab.traversal.detect import classify
from qlab.traversal.portmap import GatewayNet, offered_protocols
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
        out = verdict.to_dict()
        offered = await offered_protocols(net, host_ips[0]) if isinstance(net, GatewayNet) and host_ips else ()
        out["port_mapping"] = [p.value for p in offered]
        suffix = next((k for k, v in MAPPING_SUFFIXES.items() if set(v) == set(offered)), None)
        if out.get("preset") and offered:  # the preset that names this behaviour and these protocols
            out["preset"] = f"{out['preset']}+{suffix}" if suffix else None
        return out
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
