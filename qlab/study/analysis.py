"""From trial records to the numbers a report shows: rates of every outcome (direct, relay, failed)
with 95% Wilson intervals, RTT medians with order-statistic intervals from the same echo probe, the
matrix against the expected outcomes, and two campaigns compared cell by cell.

Cells are (backend, profile, Agent NAT, Connector NAT): trials of different backends or profiles
are never pooled unless asked (`pool=True`)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from qlab.experiment.record import MODES
from qlab.nat.spec import PRESET_NAMES, expected_or_unknown

DIRECT = ("direct_lan", "direct_wan", "direct_predicted")
GROUP = ["backend", "profile"]
CELL = [*GROUP, "agent_nat", "connector_nat"]
# Each outcome family: its count column and the rate/interval prefix (`fallback` = relay, as before).
FAMILIES = (("direct", "direct"), ("relay", "fallback"), ("failed", "failed"))
# "TimeoutError: " — an exception whose message is empty (str(TimeoutError()) == "").
_EMPTY_EXC = re.compile(r"\b(\w+(?:Error|Exception|Timeout))\s*:\s*(?=$|[;)])")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate (stays inside [0, 1], sane for small N)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_ci(values, conf: float = 0.95) -> tuple[float, float, float]:
    """The median and its distribution-free interval from order statistics: the widest symmetric
    pair of ranks (j, n+1-j) whose coverage under Binomial(n, 1/2) is at least `conf`. Below 6
    samples no pair covers 95%, so the bounds are NaN (the median alone is shown)."""
    x = np.sort(np.asarray(values, dtype=float))
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    median = float(np.median(x))
    tail, j = 0, 0  # tail = number of outcomes of Binomial(n, 1/2) below rank j+1, times 2**n
    while True:
        tail += math.comb(n, j)
        if 2 * tail / 2**n > 1 - conf:
            break
        j += 1
    if j == 0:
        return (median, math.nan, math.nan)
    return (median, float(x[j - 1]), float(x[n - j]))


def full_reason(text: str) -> str:
    """A reason as a person reads it: an exception with an empty message ("TimeoutError:") says
    what happened instead of ending in a colon."""
    def say(m: re.Match) -> str:
        name = m.group(1)
        return f"{name} (timed out, no message)" if "Timeout" in name else f"{name} (no message)"
    return _EMPTY_EXC.sub(say, text.strip())


def pooled(df: pd.DataFrame) -> pd.DataFrame:
    """The same trials with backend and profile merged into one label each (pooling on request)."""
    return df.assign(**{col: " + ".join(sorted(df[col].astype(str).unique())) for col in GROUP})


def cell_summary(df: pd.DataFrame, *, pool: bool = False) -> pd.DataFrame:
    """One row per (backend, profile, Agent NAT, Connector NAT): N; counts and rates of direct,
    relay (`fallback_*`) and failed trials with 95% Wilson intervals; median RTTs on both paths
    with order-statistic 95% intervals and their ratio; ttfb and ttd medians; the expected outcome.

    `not_punched_rate`: trials whose punch policy skipped (both sides endpoint-dependent), so their
    relay outcome was decided, not measured; `punch_failed_rate`: trials that punched and stayed on
    the relay; `decided`: every trial of the cell was decided by policy. Records from before the
    `punch` column count in neither (NaN when none of the cell's records has it)."""
    if pool:
        df = pooled(df)
    rows = [_cell_row(dict(zip(CELL, key, strict=True)), g) for key, g in df.groupby(CELL, sort=False)]
    return pd.DataFrame(rows)


def _cell_row(row: dict, g: pd.DataFrame) -> dict:
    n = len(g)
    counts = {"direct": int(g["outcome"].isin(DIRECT).sum()), "relay": int((g["outcome"] == "relay").sum()),
              "failed": int((g["outcome"] == "failed").sum())}
    row.update(n=n, campaigns=int(g["campaign_id"].nunique()) if "campaign_id" in g else 1,
               expected=_expected(row, g),
               as_expected_rate=float(g["as_expected"].astype(float).mean()), **counts)
    for outcome, prefix in FAMILIES:
        lo, hi = wilson(counts[outcome], n)
        row.update({f"{prefix}_rate": counts[outcome] / n, f"{prefix}_ci_low": lo, f"{prefix}_ci_high": hi})
    punch = g["punch"] if "punch" in g else pd.Series([None] * n, index=g.index)
    known = int(punch.notna().sum())
    skipped = int((punch == "skipped").sum())
    punch_failed = int(((punch == "attempted") & (g["outcome"] == "relay")).sum())
    row.update(not_punched_rate=skipped / known if known else math.nan,
               punch_failed_rate=punch_failed / known if known else math.nan,
               decided=bool(known == n and skipped == n), top_outcome=str(g["outcome"].mode().iat[0]))
    for path in ("direct", "relay"):
        med, lo, hi = median_ci(g[f"rtt_{path}_p50_ms"])
        row.update({f"rtt_{path}_p50_ms": med, f"rtt_{path}_ci_low": lo, f"rtt_{path}_ci_high": hi})
    rd, rr = row["rtt_direct_p50_ms"], row["rtt_relay_p50_ms"]
    row.update(direct_relay_ratio=rd / rr if rr and not math.isnan(rd) else math.nan,
               ttfb_p50_ms=float(g["ttfb_ms"].median()), ttd_p50_ms=float(g["ttd_ms"].median()),
               top_reason=_top_reason(g), top_mechanism=_top_mechanism(g))
    return row


def _expected(row: dict, g: pd.DataFrame) -> str:
    """The cell's expected code as its records state it (a dual-stack trial expects D), or the NAT
    pair's where no record says."""
    codes = g["expected"].dropna().astype(str) if "expected" in g else pd.Series([], dtype=str)
    return str(codes.mode().iat[0]) if len(codes) else expected_or_unknown(str(row["agent_nat"]), str(row["connector_nat"]))


def _top_mechanism(g: pd.DataFrame) -> str:
    """What found the cell's direct paths most often (`mechanism`: mapping, prediction, ...); "" when
    none went direct or the records predate the column."""
    if "mechanism" not in g:
        return ""
    found = g["mechanism"].dropna().astype(str)
    found = found[found != ""]
    return str(found.mode().iat[0]) if len(found) else ""


def _top_reason(g: pd.DataFrame) -> str:
    reasons = g.loc[~g["outcome"].isin(DIRECT), "reason"].dropna().astype(str)
    reasons = reasons[reasons != ""]
    return full_reason(str(reasons.mode().iat[0])) if len(reasons) else ""


def groups(summary: pd.DataFrame) -> list[tuple[str, str]]:
    """The (backend, profile) pairs of a summary, in order: one matrix each."""
    return sorted({(str(b), str(p)) for b, p in zip(summary["backend"], summary["profile"], strict=True)})


def matrix(summary: pd.DataFrame, value: str, backend: str | None = None, profile: str | None = None
           ) -> pd.DataFrame:
    """A 6 x 6 table (Agent NAT rows, Connector NAT columns) of one summary column, for one backend
    and profile. Refuses to average cells of several backends or profiles into one."""
    s = summary if backend is None else summary[summary["backend"] == backend]
    s = s if profile is None else s[s["profile"] == profile]
    if s.groupby(["agent_nat", "connector_nat"]).size().max() > 1:
        raise ValueError("the summary holds several backends or profiles: pick one (backend=, profile=) "
                         "or pool them explicitly (cell_summary(df, pool=True))")
    m = s.pivot_table(index="agent_nat", columns="connector_nat", values=value, aggfunc="first", dropna=False)
    order = list(PRESET_NAMES) + sorted({*m.index, *m.columns} - set(PRESET_NAMES))  # field NATs last
    return m.reindex(index=[p for p in order if p in m.index], columns=[p for p in order if p in m.columns])


def mechanism_matrix(summary: pd.DataFrame) -> pd.DataFrame:
    """One backend and profile's cells as a table (Agent NAT rows, Connector NAT columns) of the
    mechanism that found most of each cell's direct paths."""
    m = matrix(summary, "top_mechanism").fillna("")
    return m.reset_index().rename(columns={"agent_nat": "Agent NAT \\ Connector NAT"})


def rtt_samples(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-trial p50 RTTs of both paths, from the same echo probe (ms)."""
    return {
        "direct": df["rtt_direct_p50_ms"].dropna().to_numpy(dtype=float),
        "relay": df["rtt_relay_p50_ms"].dropna().to_numpy(dtype=float),
    }


def method(measured_with: pd.Series) -> str:
    """How trials were measured, without the per-trial counts (the text before the first ';')."""
    kinds = sorted({str(m).split(";")[0].strip() for m in measured_with.dropna() if str(m).strip()})
    return " | ".join(kinds) if kinds else "no record says (trials that failed before measuring)"


def describe(df: pd.DataFrame) -> str:
    """What a table is and how it was measured, one Markdown line per (backend, profile)."""
    if df.empty:
        return "no trials"
    lines = []
    for (backend, profile), g in df.groupby(GROUP, sort=True):
        cells = g.groupby(["agent_nat", "connector_nat"]).size()
        per = f"{cells.min()}" if cells.min() == cells.max() else f"{cells.min()}–{cells.max()}"
        camps = g["campaign_id"].nunique() if "campaign_id" in g else 1
        lines.append(f"- **backend {backend}, profile {profile}**{profile_text(str(profile))}: {len(g)} trials in "
                     f"{camps} campaign(s), {len(cells)} NAT pairs, {per} per pair; measured with "
                     f"{method(g['measured_with'])}{processing_text(g)}")
    return "\n".join(lines)


def profile_text(name: str) -> str:
    from qlab.scenario.profiles import PROFILES

    known = PROFILES.get(name)
    return f" ({known.description})" if known is not None and known.description else ""


def processing_text(g: pd.DataFrame) -> str:
    """Which processing-cost calibration simulated trials were charged (docs/sim.md)."""
    if "sim_calibration" not in g or (g["backend"] != "sim").all():
        return ""
    labels = sorted({str(c) for c in g["sim_calibration"].dropna()})
    return (f"; processing charged from calibration {', '.join(labels)}" if labels
            else "; no processing time charged (records from before calibrations)")


def percent(rate: float, lo: float = math.nan, hi: float = math.nan) -> str:
    """67% (30–90%): a rate with its interval, as people read it."""
    if rate is None or math.isnan(rate):
        return "–"
    return f"{rate:.0%}" if math.isnan(lo) else f"{rate:.0%} ({lo:.0%}–{hi:.0%})"


def _ms(value: float, lo: float = math.nan, hi: float = math.nan) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{value:.1f}" if math.isnan(lo) else f"{value:.1f} ({lo:.1f}–{hi:.1f})"


def readable(summary: pd.DataFrame) -> pd.DataFrame:
    """The per-cell table for people: counts, rates as percentages with their 95% intervals, RTT
    medians in ms with theirs, and the most common reason in full."""
    out = pd.DataFrame({
        "backend": summary["backend"], "profile": summary["profile"],
        "Agent NAT": summary["agent_nat"], "Connector NAT": summary["connector_nat"], "N": summary["n"],
        "expected": summary["expected"],
        "direct / relay / failed": [f"{d} / {r} / {f}" for d, r, f in
                                    zip(summary["direct"], summary["relay"], summary["failed"], strict=True)],
        "as expected": [percent(v) for v in summary["as_expected_rate"]],
    })
    for outcome, prefix in FAMILIES:
        out[f"{outcome} rate (95% CI)"] = [percent(*v) for v in zip(
            summary[f"{prefix}_rate"], summary[f"{prefix}_ci_low"], summary[f"{prefix}_ci_high"], strict=True)]
    for path in ("direct", "relay"):
        out[f"{path} RTT ms, median (95% CI)"] = [_ms(*v) for v in zip(
            summary[f"rtt_{path}_p50_ms"], summary[f"rtt_{path}_ci_low"], summary[f"rtt_{path}_ci_high"],
            strict=True)]
    out["ttd ms, median"] = [_ms(v) for v in summary["ttd_p50_ms"]]
    out["how direct (most common)"] = summary.get("top_mechanism", "")
    out["reason (most common, non-direct)"] = summary["top_reason"]
    return out


COMPARED = ("direct_rate", "fallback_rate", "failed_rate", "rtt_direct_p50_ms", "rtt_relay_p50_ms", "ttd_p50_ms")


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Two sets of trials cell by cell: for each (backend, profile, Agent NAT, Connector NAT), N,
    direct/relay/failed rates with 95% Wilson intervals and direct RTT, relay RTT and ttd medians of
    each (suffixes `_a`, `_b`), and `<column>_diff` = b − a.

    Where each side holds a single backend (or profile) and they differ, that difference is what is
    compared: cells then match on the NAT pair alone and `backend_a`/`backend_b` name both sides.
    A cell only one side has gets NaN on the other."""
    for name, frame in (("a", a), ("b", b)):
        if frame.empty:
            raise ValueError(f"nothing to compare: {name} holds no trials")
    sa, sb = cell_summary(a), cell_summary(b)
    keys = ["agent_nat", "connector_nat"] + [c for c in GROUP if not (sa[c].nunique() == 1 == sb[c].nunique())]
    cols = ["n", *[f"{p}_{s}" for _, p in FAMILIES for s in ("rate", "ci_low", "ci_high")],
            "rtt_direct_p50_ms", "rtt_relay_p50_ms", "ttd_p50_ms"]
    side = {"a": sa[[*CELL, *cols]], "b": sb[[*CELL, *cols]]}
    for name, s in side.items():
        side[name] = s.rename(columns={c: f"{c}_{name}" for c in [*cols, *GROUP] if c not in keys})
    out = side["a"].merge(side["b"], on=keys, how="outer")
    for c in COMPARED:
        out[f"{c}_diff"] = out[f"{c}_b"] - out[f"{c}_a"]
    order = {p: i for i, p in enumerate(PRESET_NAMES)}
    return out.sort_values(keys, key=lambda s: s.map(lambda v: order.get(v, len(order))) if s.name in (
        "agent_nat", "connector_nat") else s).reset_index(drop=True)


def settings(manifest: dict) -> str:
    """A campaign's own settings, from its manifest, in one Markdown line."""
    p = manifest.get("parameters", {})
    agents, connectors = p.get("agent_nats", []), p.get("connector_nats", [])
    state = f"finished {manifest['finished_at'][:19]}" if manifest.get("finished_at") else "not finished"
    return (f"**Campaign `{manifest.get('campaign_id')}`**: backend {manifest.get('backend')}, profile "
            f"{manifest.get('profile')}, Agent NAT {', '.join(agents)} × Connector NAT {', '.join(connectors)}, "
            f"{manifest.get('trials')} trials per cell, seed {manifest.get('seed')}, {p.get('samples')} echo samples "
            f"per path{', punch_anyway' if p.get('punch_anyway') else ''}"
            f"{', birthday mode ' + str(p['birthday']) if p.get('birthday') else ''}"
            f"{', dual-stack with IPv6 firewall ' + str(p['ipv6']) if p.get('ipv6') else ''}; started "
            f"{str(manifest.get('started_at'))[:19]}, {state}.")


def readable_compare(cmp: pd.DataFrame) -> pd.DataFrame:
    """compare()'s table for people: each side's N and rates (with intervals) and the differences
    in percentage points and ms."""
    out = cmp[[c for c in ("backend", "profile", "agent_nat", "connector_nat") if c in cmp]].copy()
    for side in ("a", "b"):
        out[f"N {side}"] = cmp[f"n_{side}"]
        for outcome, prefix in FAMILIES:
            out[f"{outcome} {side}"] = [percent(*v) for v in zip(
                cmp[f"{prefix}_rate_{side}"], cmp[f"{prefix}_ci_low_{side}"], cmp[f"{prefix}_ci_high_{side}"],
                strict=True)]
    for outcome, prefix in FAMILIES:
        out[f"{outcome} b − a"] = [f"{v * 100:+.0f} pp" if not math.isnan(v) else "–"
                                   for v in cmp[f"{prefix}_rate_diff"]]
    for col, name in (("rtt_direct_p50_ms", "direct RTT"), ("rtt_relay_p50_ms", "relay RTT"), ("ttd_p50_ms", "ttd")):
        out[f"{name} ms a → b"] = [f"{_ms(a)} → {_ms(b)}" for a, b in zip(cmp[f"{col}_a"], cmp[f"{col}_b"],
                                                                            strict=True)]
    return out


# --- Two architectures (issue 19): terminated vs sealed, per NAT pair --------------------------------

# per mode: the medians compared, as (record column, summary prefix)
MODE_METRICS = (("ttfb_ms", "ttfb"), ("ttd_ms", "ttd"), ("upgrade_ms", "upgrade"),
                ("rtt_direct_p50_ms", "rtt_direct"), ("rtt_relay_p50_ms", "rtt_relay"))
MODE_NAMES = {"ttfb": "ttfb", "ttd": "ttd", "upgrade": "upgrade", "rtt_direct": "direct RTT", "rtt_relay": "relay RTT"}


def session_modes(df: pd.DataFrame) -> pd.Series:
    """Each trial's architecture: its `mode`, and "terminated" where the record has none (records
    from before issue 19, when it was the only one)."""
    if "mode" not in df:
        return pd.Series(["terminated"] * len(df), index=df.index, dtype=object)
    return df["mode"].astype(object).where(df["mode"].notna(), "terminated")


def with_campaign_settings(df: pd.DataFrame, root=None) -> pd.DataFrame:
    """The trials with `mode` and `punch_delay` filled in from each campaign's manifest where the
    records do not say: a record with no `mode` (written before issue 19, or a trial that raised and
    was recorded as failed) takes its campaign's mode, and `punch_delay` (a campaign setting the
    records do not carry) its campaign's; a manifest from before either setting means terminated and
    0 s. Campaigns are looked up by id under `root` (results.find_campaign)."""
    from qlab.study.results import CampaignStore, find_campaign

    out = df.copy()
    settings: dict[str, dict] = {}
    for cid in out["campaign_id"].dropna().unique():
        try:
            settings[str(cid)] = CampaignStore(find_campaign(str(cid), root)).manifest().get("parameters", {})
        except (FileNotFoundError, ValueError):
            settings[str(cid)] = {}
    cids = out["campaign_id"].astype(str)
    campaign_mode = cids.map(lambda c: settings.get(c, {}).get("mode") or "terminated")
    mode = out["mode"].astype(object) if "mode" in out else pd.Series([None] * len(out), index=out.index, dtype=object)
    out["mode"] = mode.where(mode.notna(), campaign_mode)
    delay = cids.map(lambda c: float(settings.get(c, {}).get("punch_delay") or 0.0))
    out["punch_delay"] = out["punch_delay"].astype(float).fillna(delay) if "punch_delay" in out else delay
    return out


def newcombe(s1: int, n1: int, s2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """The difference of two rates p2 − p1 and its 95% interval by Newcombe's hybrid score method
    (built from each rate's Wilson interval; sane for small N and rates of 0 or 1)."""
    if n1 == 0 or n2 == 0:
        return (math.nan, math.nan, math.nan)
    p1, p2 = s1 / n1, s2 / n2
    (l1, u1), (l2, u2) = wilson(s1, n1, z), wilson(s2, n2, z)
    d = p2 - p1
    return (d, d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2))


def _mode_keys(df: pd.DataFrame) -> list[str]:
    return [*CELL, "punch_delay"] if "punch_delay" in df else list(CELL)


def mode_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per NAT pair (backend, profile, Agent NAT, Connector NAT, and `punch_delay` when the
    trials carry it: with_campaign_settings) and mode: N, direct count and rate with its 95% Wilson
    interval, and the medians of ttfb, ttd, upgrade, direct RTT and relay RTT with their 95%
    order-statistic intervals (`<name>_p50_ms`, `<name>_ci_low`, `<name>_ci_high`; `<name>_n`
    trials had a value: ttd and upgrade only direct ones). A record with no mode is terminated."""
    d = df.assign(mode=session_modes(df))
    keys = _mode_keys(d)
    rows = []
    for key, g in d.groupby([*keys, "mode"], sort=True):
        row = dict(zip([*keys, "mode"], key, strict=True))
        n, direct = len(g), int(g["outcome"].isin(DIRECT).sum())
        lo, hi = wilson(direct, n)
        row.update(n=n, direct=direct, direct_rate=direct / n, direct_ci_low=lo, direct_ci_high=hi)
        for col, name in MODE_METRICS:
            values = g[col].astype(float) if col in g else pd.Series([math.nan] * n)
            med, lo, hi = median_ci(values)
            row.update({f"{name}_p50_ms": med, f"{name}_ci_low": lo, f"{name}_ci_high": hi,
                        f"{name}_n": int(values.notna().sum())})
        rows.append(row)
    return pd.DataFrame(rows)


MODE_COLUMNS = ("n", "direct", "direct_rate", "direct_ci_low", "direct_ci_high",
                *[f"{name}_{s}" for _, name in MODE_METRICS for s in ("p50_ms", "ci_low", "ci_high", "n")])


def compare_modes(df: pd.DataFrame) -> pd.DataFrame:
    """The two architectures per NAT pair, from trials holding both: one row per (backend, profile,
    Agent NAT, Connector NAT[, punch_delay]) with mode_summary's columns for each mode (suffixes
    `_terminated`, `_sealed`; NaN where a pair ran in one mode only) and sealed − terminated:
    `direct_rate_diff` with its 95% Newcombe interval (`direct_diff_ci_low`/`_high`) and
    `<name>_p50_ms_diff` for ttfb, ttd, upgrade, direct RTT and relay RTT (a difference of medians;
    each median's own interval is in its side's columns)."""
    s = mode_summary(df)
    if s.empty:
        raise ValueError("nothing to compare: no trials")
    keys = _mode_keys(df)
    sides = []
    for mode in MODES:
        side = s[s["mode"] == mode].drop(columns="mode")
        sides.append(side.rename(columns={c: f"{c}_{mode}" for c in MODE_COLUMNS}).set_index(keys))
    out = sides[0].join(sides[1], how="outer").reset_index()
    for col in MODE_COLUMNS:  # a pair that ran in one mode only: NaN on the other side
        for mode in MODES:
            if f"{col}_{mode}" not in out:
                out[f"{col}_{mode}"] = math.nan
    diffs = [newcombe(*(int(v) if not pd.isna(v) else 0 for v in vals)) for vals in zip(
        out["direct_terminated"], out["n_terminated"], out["direct_sealed"], out["n_sealed"], strict=True)]
    out["direct_rate_diff"] = [d[0] for d in diffs]
    out["direct_diff_ci_low"] = [d[1] for d in diffs]
    out["direct_diff_ci_high"] = [d[2] for d in diffs]
    for _, name in MODE_METRICS:
        out[f"{name}_p50_ms_diff"] = out[f"{name}_p50_ms_sealed"] - out[f"{name}_p50_ms_terminated"]
    return out.sort_values(keys, key=_preset_order).reset_index(drop=True)


def _preset_order(col: pd.Series) -> pd.Series:
    """Sort key: NAT presets in their documented order (field NATs last), other columns as they are."""
    if col.name not in ("agent_nat", "connector_nat"):
        return col
    order = {p: i for i, p in enumerate(PRESET_NAMES)}
    return col.map(lambda v: order.get(v, len(order)))


def mode_totals(df: pd.DataFrame) -> pd.DataFrame:
    """Per backend, profile, mode and punch_delay (when carried), pooled over the NAT pairs: trials,
    NAT pairs, direct rate with its Wilson interval, and the medians of ttfb, ttd and upgrade over
    the trials that have them (the facts a report's index states in one line)."""
    d = df.assign(mode=session_modes(df))
    keys = [*GROUP, "mode", *(["punch_delay"] if "punch_delay" in d else [])]
    rows = []
    for key, g in d.groupby(keys, sort=True):
        n, direct = len(g), int(g["outcome"].isin(DIRECT).sum())
        lo, hi = wilson(direct, n)
        row = dict(zip(keys, key, strict=True))
        row.update(n=n, pairs=int(g.groupby(["agent_nat", "connector_nat"]).ngroups), direct=direct,
                   direct_rate=direct / n, direct_ci_low=lo, direct_ci_high=hi,
                   **{f"{name}_p50_ms": float(g[col].astype(float).median()) if col in g else math.nan
                      for col, name in MODE_METRICS[:3]})
        rows.append(row)
    return pd.DataFrame(rows)


def _delta(v: float, unit: str = " ms") -> str:
    return "–" if v is None or math.isnan(v) else f"{v:+.1f}{unit}"


def readable_modes(cmp: pd.DataFrame) -> pd.DataFrame:
    """compare_modes' table for people: per NAT pair (and punch delay) each mode's N and direct rate
    with its interval, the difference in percentage points with its interval, and per timing the
    medians terminated → sealed (95% intervals) and sealed − terminated."""
    out = pd.DataFrame({"backend": cmp["backend"], "profile": cmp["profile"], "Agent NAT": cmp["agent_nat"],
                        "Connector NAT": cmp["connector_nat"]})
    if "punch_delay" in cmp:
        out["punch delay s"] = [f"{v:g}" for v in cmp["punch_delay"]]
    out["N terminated / sealed"] = [f"{'–' if pd.isna(a) else int(a)} / {'–' if pd.isna(b) else int(b)}"
                                    for a, b in zip(cmp["n_terminated"], cmp["n_sealed"], strict=True)]
    for mode in MODES:
        out[f"direct {mode}"] = [percent(*v) for v in zip(
            cmp[f"direct_rate_{mode}"], cmp[f"direct_ci_low_{mode}"], cmp[f"direct_ci_high_{mode}"], strict=True)]
    out["direct sealed − terminated"] = [
        "–" if math.isnan(d) else f"{d * 100:+.0f} pp ({lo * 100:+.0f} to {hi * 100:+.0f})"
        for d, lo, hi in zip(cmp["direct_rate_diff"], cmp["direct_diff_ci_low"], cmp["direct_diff_ci_high"], strict=True)]
    for _, name in MODE_METRICS:
        sides = [[_ms(*v) for v in zip(cmp[f"{name}_p50_ms_{m}"], cmp[f"{name}_ci_low_{m}"], cmp[f"{name}_ci_high_{m}"],
                                       strict=True)] for m in MODES]
        out[f"{MODE_NAMES[name]} ms, terminated → sealed (Δ)"] = [
            f"{a} → {b} ({_delta(d)})" for a, b, d in zip(*sides, cmp[f"{name}_p50_ms_diff"], strict=True)]
    return out


def readable_mode_totals(totals: pd.DataFrame) -> pd.DataFrame:
    """mode_totals for people: per backend, profile, mode and punch delay, trials and NAT pairs, the
    direct rate with its interval and the pooled medians."""
    out = totals[[c for c in ("backend", "profile", "mode", "punch_delay") if c in totals]].copy()
    if "punch_delay" in out:
        out["punch_delay"] = [f"{v:g} s" for v in out["punch_delay"]]
    out = out.rename(columns={"punch_delay": "punch delay"})
    out["trials"], out["NAT pairs"] = totals["n"], totals["pairs"]
    out["direct (95% CI)"] = [percent(*v) for v in zip(totals["direct_rate"], totals["direct_ci_low"],
                                                       totals["direct_ci_high"], strict=True)]
    for _, name in MODE_METRICS[:3]:
        out[f"{MODE_NAMES[name]} ms, median"] = [_ms(v) for v in totals[f"{name}_p50_ms"]]
    return out
