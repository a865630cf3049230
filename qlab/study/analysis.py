"""From trial records to the numbers a report shows: rates with confidence intervals, RTT
distributions from the same echo probe, and the matrix against the expected outcomes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from qlab.nat.spec import PRESET_NAMES, expected_or_unknown

DIRECT = ("direct_lan", "direct_wan", "direct_predicted")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (stays inside [0, 1], sane for small N)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def cell_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (backend, Agent NAT, Connector NAT): N, direct and fallback rates with 95% CIs,
    median RTTs on both paths, their ratio, ttfb and ttd medians, the expected outcome.

    `not_punched_rate`: trials whose punch policy skipped (both sides endpoint-dependent), so their
    relay outcome was decided, not measured; `punch_failed_rate`: trials that punched and stayed on
    the relay; `decided`: every trial of the cell was decided by policy. Records from before the
    `punch` column count in neither (NaN when none of the cell's records has it)."""
    rows = []
    for (backend, a, c), g in df.groupby(["backend", "agent_nat", "connector_nat"], sort=False):
        n = len(g)
        direct = int(g["outcome"].isin(DIRECT).sum())
        relay = int((g["outcome"] == "relay").sum())
        punch = g["punch"] if "punch" in g else pd.Series([None] * n, index=g.index)
        known = int(punch.notna().sum())
        skipped = int((punch == "skipped").sum())
        punch_failed = int(((punch == "attempted") & (g["outcome"] == "relay")).sum())
        lo, hi = wilson(direct, n)
        flo, fhi = wilson(relay, n)
        rd, rr = g["rtt_direct_p50_ms"].median(), g["rtt_relay_p50_ms"].median()
        rows.append({
            "backend": backend, "agent_nat": a, "connector_nat": c, "n": n,
            "expected": expected_or_unknown(str(a), str(c)),
            "as_expected_rate": float(g["as_expected"].mean()),
            "direct_rate": direct / n, "direct_ci_low": lo, "direct_ci_high": hi,
            "fallback_rate": relay / n, "fallback_ci_low": flo, "fallback_ci_high": fhi,
            "failed": int((g["outcome"] == "failed").sum()),
            "not_punched_rate": skipped / known if known else math.nan,
            "punch_failed_rate": punch_failed / known if known else math.nan,
            "decided": bool(known == n and skipped == n),
            "top_outcome": g["outcome"].mode().iat[0],
            "rtt_direct_p50_ms": rd, "rtt_relay_p50_ms": rr,
            "direct_relay_ratio": rd / rr if rr and not math.isnan(rd) else math.nan,
            "ttfb_p50_ms": g["ttfb_ms"].median(), "ttd_p50_ms": g["ttd_ms"].median(),
            "top_reason": _top_reason(g),
        })
    return pd.DataFrame(rows)


def _top_reason(g: pd.DataFrame) -> str:
    reasons = g.loc[~g["outcome"].isin(DIRECT), "reason"].dropna()
    reasons = reasons[reasons != ""]
    return str(reasons.mode().iat[0]) if len(reasons) else ""


def matrix(summary: pd.DataFrame, value: str, backend: str | None = None) -> pd.DataFrame:
    """A 6 x 6 table (Agent NAT rows, Connector NAT columns) of one summary column."""
    s = summary if backend is None else summary[summary["backend"] == backend]
    m = s.pivot_table(index="agent_nat", columns="connector_nat", values=value, aggfunc="mean")
    order = list(PRESET_NAMES) + sorted({*m.index, *m.columns} - set(PRESET_NAMES))  # field NATs last
    return m.reindex(index=[p for p in order if p in m.index], columns=[p for p in order if p in m.columns])


def rtt_samples(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-trial p50 RTTs of both paths, from the same echo probe (ms)."""
    return {
        "direct": df["rtt_direct_p50_ms"].dropna().to_numpy(dtype=float),
        "relay": df["rtt_relay_p50_ms"].dropna().to_numpy(dtype=float),
    }


def describe(df: pd.DataFrame) -> str:
    """One sentence on what a table is and how it was measured."""
    if df.empty:
        return "no trials"
    backends = ", ".join(sorted(df["backend"].unique()))
    profiles = ", ".join(sorted(df["profile"].unique()))
    how = df["measured_with"].dropna()
    return (f"{len(df)} trials on backend {backends}, profile {profiles}; "
            f"{str(how.iat[0]) if len(how) else 'echo probe'}")
