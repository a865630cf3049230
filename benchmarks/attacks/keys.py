"""Key files: `qlab certs init --force` over stale temporary files left world-readable."""

from __future__ import annotations

import os
import stat

from .common import Ctx, Figures
from .harness import NotApplicable, qlab_cli

SECRET_FILES = ("ca.key", "intermediate.key", "connector.key", "secret", "agent.secret", "connector.secret")


def certs_force_tmp(ctx: Ctx) -> Figures:
    d = ctx.work / "stale-certs"
    first = qlab_cli("certs", "init", str(d), cwd=ctx.work)
    if first.returncode != 0:
        raise NotApplicable(f"qlab certs init failed: {first.stderr[-200:]}")
    present = [n for n in SECRET_FILES if (d / n).exists()]
    old_umask = os.umask(0)
    try:
        for name in present:  # what an interrupted earlier run (or another user) leaves behind
            fd = os.open(d / f"{name}.tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, b"stale\n")
            os.close(fd)
    finally:
        os.umask(old_umask)
    again = qlab_cli("certs", "init", "--force", str(d), cwd=ctx.work)
    if again.returncode != 0:
        return [("certs init --force over 0644 *.tmp", f"refused: {again.stderr.strip()[-200:]}")]
    modes = {n: stat.S_IMODE((d / n).stat().st_mode) for n in present}
    readable = [f"{n} {m:04o}" for n, m in modes.items() if m & 0o077]
    left = sorted(p.name for p in d.glob("*.tmp"))
    return [("key files readable by others afterwards", ", ".join(readable) or f"none (all of {len(modes)} are 0600)"),
            ("stale *.tmp left", ", ".join(left) or "none")]
