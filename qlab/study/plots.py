"""Figures for notebooks and reports. Every figure says what it shows: title, units, N, backend."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from qlab.nat.spec import expected_or_unknown
from qlab.study.analysis import cell_summary, matrix, rtt_samples

OUTCOME_COLORS = {"direct_lan": "#1b9e77", "direct_wan": "#66a61e", "direct_predicted": "#a6d854",
                  "relay": "#e6ab02", "failed": "#d95f02"}


def _label(df: pd.DataFrame) -> str:
    return f"backend {', '.join(sorted(df['backend'].unique()))}, profile {', '.join(sorted(df['profile'].unique()))}"


def rtt_cdf(df: pd.DataFrame, ax=None):
    """CDF of per-trial median echo RTT, direct vs relay (same probe, same size and rate)."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    series = {f"{path} (N={len(xs)})": xs for path, xs in rtt_samples(df).items()}
    return _cdf(ax, series, "echo RTT, per-trial median (ms)", f"Direct vs relay RTT, CDF ({_label(df)})")


def _cdf(ax, series: dict[str, np.ndarray], xlabel: str, title: str):
    for label, xs in series.items():
        if len(xs):
            xs = np.sort(xs)
            ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of trials")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def rtt_box(df: pd.DataFrame, ax=None):
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    data = rtt_samples(df)
    labels = [f"{k}\nN={len(v)}" for k, v in data.items() if len(v)]
    ax.boxplot([v for v in data.values() if len(v)], tick_labels=labels)
    ax.set_ylabel("echo RTT, per-trial median (ms)")
    ax.set_title(f"Direct vs relay RTT ({_label(df)})")
    ax.grid(alpha=0.3, axis="y")
    return ax


def time_to_first_byte_and_direct(df: pd.DataFrame, ax=None):
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    series = {}
    for col, name in (("ttfb_ms", "first echo over the relay (ttfb)"), ("ttd_ms", "first echo over direct (ttd)")):
        xs = df[col].dropna().to_numpy(dtype=float)
        series[f"{name}, N={len(xs)}"] = xs
    return _cdf(ax, series, "time from session request (ms)", f"Time to first byte and to direct ({_label(df)})")


def outcomes(df: pd.DataFrame, ax=None):
    """Outcome breakdown per cell, with the fallback rate's 95% CI."""
    s = cell_summary(df)
    ax = ax or plt.subplots(figsize=(8, 0.5 + 0.45 * len(s)))[1]
    labels = [f"{a} -> {c}  (exp. {e}, N={n})" for a, c, e, n in zip(s.agent_nat, s.connector_nat, s.expected, s.n,
                                                                      strict=True)]
    left = np.zeros(len(s))
    for outcome, color in OUTCOME_COLORS.items():
        vals = np.array([((df.agent_nat == a) & (df.connector_nat == c) & (df.outcome == outcome)).sum() / n
                         for a, c, n in zip(s.agent_nat, s.connector_nat, s.n, strict=True)])
        ax.barh(labels, vals, left=left, color=color, label=outcome)
        left += vals
    ax.set_xlabel("fraction of trials")
    ax.set_xlim(0, 1)
    ax.set_title(f"Outcomes per NAT pair ({_label(df)})")
    ax.legend(loc="lower right", fontsize=8)
    ax.invert_yaxis()
    return ax


def heatmap(summary: pd.DataFrame, value: str, title: str, *, backend: str | None = None, fmt: str = "{:.0%}",
            cmap: str = "viridis", ax=None, vmin: float | None = 0.0, vmax: float | None = 1.0):
    """A 6 x 6 heatmap; each cell also shows the expected outcome code, and a cross where the
    observed outcome disagrees with it."""
    m = matrix(summary, value, backend)
    ok = matrix(summary, "as_expected_rate", backend)
    decided = matrix(summary.assign(decided=summary["decided"].astype(float)), "decided", backend) \
        if "decided" in summary else None
    ax = ax or plt.subplots(figsize=(8, 6.5))[1]
    values = m.to_numpy(dtype=float)
    ok_values = ok.reindex(index=m.index, columns=m.columns).to_numpy(dtype=float)  # NaN where ok has no cell
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(m.columns)), m.columns, rotation=35, ha="right")
    ax.set_yticks(range(len(m.index)), m.index)
    ax.set_xlabel("Connector NAT")
    ax.set_ylabel("Agent NAT")
    for i, a in enumerate(m.index):
        for j, c in enumerate(m.columns):
            v, good = values[i, j], ok_values[i, j]
            code = expected_or_unknown(a, c)  # "?": a NAT of unknown behaviour expects nothing
            mark = "" if code == "?" or np.isnan(good) or good == 1 else " ✗"
            if decided is not None and a in decided.index and c in decided.columns and decided.loc[a, c] == 1:
                mark += " *"  # not punched: policy decided this cell
            txt = ("–" if np.isnan(v) else fmt.format(v)) + f"\n{code}{mark}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if not np.isnan(v) and v < ((vmin or 0) + (vmax or 1)) / 2 else "black")
    n = int(summary["n"].sum()) if backend is None else int(summary.loc[summary.backend == backend, "n"].sum())
    ax.set_title(f"{title}\n(N={n} trials{', backend ' + backend if backend else ''}; "
                 "letters = expected: D, D>, P, B, R, ? unknown NAT; ✗ = not as expected;\n"
                 "* = not punched, decided by policy (punch_anyway measures it))", fontsize=10)
    plt.colorbar(im, ax=ax, fraction=0.046)
    return ax
