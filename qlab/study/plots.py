"""Figures for notebooks and reports. Every figure says what it shows: title (with backend and
profile), units, N, labelled colour bars, intervals as error bars, and an alt text for the HTML
(`show`), built from the numbers it draws."""

from __future__ import annotations

import base64
import io
import math
import weakref

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qlab.nat.spec import expected_or_unknown
from qlab.study.analysis import CELL, FAMILIES, cell_summary, matrix, percent, rtt_samples

OUTCOME_COLORS = {"direct_lan": "#1b9e77", "direct_wan": "#66a61e", "direct_predicted": "#a6d854",
                  "relay": "#e6ab02", "failed": "#d95f02"}
RATE_NAMES = {"direct": "direct rate", "relay": "fallback (relay) rate", "failed": "failure rate"}
FAMILY_COLORS = {"direct": "#66a61e", "relay": "#e6ab02", "failed": "#d95f02"}
# What each axes shows, in words: `show` joins them into the figure's alt text.
_ALT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _label(df: pd.DataFrame) -> str:
    return f"backend {', '.join(sorted(map(str, df['backend'].unique())))}, " \
           f"profile {', '.join(sorted(map(str, df['profile'].unique())))}"


def _say(ax, text: str):
    _ALT[ax] = text
    return ax


def alt_text(fig) -> str:
    """The figure's alt text: what each of its plots shows."""
    return " ".join(_ALT[ax] for ax in fig.axes if ax in _ALT) or "a figure without a description"


def show(figure=None, alt: str | None = None) -> None:
    """Display a figure (or the figure of an Axes) as a PNG whose output metadata carries its alt
    text (the published HTML's `<img alt>`; see report.to_html), then close it so the inline
    backend does not show it a second time."""
    from IPython.display import display

    fig = plt.gcf() if figure is None else figure if isinstance(figure, Figure) else figure.figure
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    text = alt or alt_text(fig)
    plt.close(fig)
    display({"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": text}, raw=True,
            metadata={"image/png": {"alt": text}})


def _median(xs: np.ndarray) -> str:
    return f"{np.median(xs):.1f} ms" if len(xs) else "none"


def rtt_cdf(df: pd.DataFrame, ax=None):
    """CDF of per-trial median echo RTT, direct vs relay (same probe, same size and rate)."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    samples = rtt_samples(df)
    series = {f"{path} (N={len(xs)})": xs for path, xs in samples.items()}
    _cdf(ax, series, "echo RTT, per-trial median (ms)", f"Direct vs relay RTT, CDF ({_label(df)})")
    return _say(ax, f"CDF of per-trial median echo RTT ({_label(df)}): direct median {_median(samples['direct'])} "
                    f"over {len(samples['direct'])} trials, relay median {_median(samples['relay'])} over "
                    f"{len(samples['relay'])} trials.")


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
    if labels:
        ax.boxplot([v for v in data.values() if len(v)], tick_labels=labels)
    ax.set_ylabel("echo RTT, per-trial median (ms)")
    ax.set_title(f"Direct vs relay RTT ({_label(df)})")
    ax.grid(alpha=0.3, axis="y")
    return _say(ax, f"Box plot of per-trial median echo RTT ({_label(df)}): direct median "
                    f"{_median(data['direct'])}, relay median {_median(data['relay'])}.")


def rtt_by_cell(df: pd.DataFrame, ax=None):
    """Per NAT pair: the median of the per-trial direct and relay RTTs, with distribution-free 95%
    intervals from order statistics (analysis.median_ci; none below 6 trials)."""
    s = cell_summary(df)
    ax = ax or plt.subplots(figsize=(8, 0.8 + 0.45 * len(s)))[1]
    y = np.arange(len(s))
    for offset, path in ((-0.15, "direct"), (0.15, "relay")):
        med = s[f"rtt_{path}_p50_ms"].to_numpy(dtype=float)
        err = np.vstack([med - s[f"rtt_{path}_ci_low"].to_numpy(dtype=float),
                         s[f"rtt_{path}_ci_high"].to_numpy(dtype=float) - med])
        ax.errorbar(med, y + offset, xerr=np.clip(np.nan_to_num(err), 0, None), fmt="o", capsize=3, label=f"{path} path",
                    color=FAMILY_COLORS["direct" if path == "direct" else "relay"])
    ax.set_yticks(y, [_cell_label(r) for r in s.itertuples()])
    ax.invert_yaxis()
    ax.set_xlabel("echo RTT, median of per-trial medians (ms); bars: 95% order-statistic interval")
    ax.set_title(f"Direct vs relay RTT per NAT pair ({_label(df)})")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    pairs = "; ".join(f"{r.agent_nat} to {r.connector_nat}: {_ms_or('direct', r.rtt_direct_p50_ms)}, "
                      f"{_ms_or('relay', r.rtt_relay_p50_ms)}" for r in s.itertuples())
    return _say(ax, f"Median direct and relay RTT per NAT pair with 95% intervals ({_label(df)}): {pairs}.")


def _ms_or(path: str, value: object) -> str:
    ms = float(str(value))
    return f"no {path} path" if math.isnan(ms) else f"{path} {ms:.1f} ms"  # NaN: no trial of the pair had that path


def _cell_label(r) -> str:
    return f"{r.agent_nat} → {r.connector_nat} (exp. {r.expected}, N={r.n})"


def time_to_first_byte_and_direct(df: pd.DataFrame, ax=None):
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    series, said = {}, []
    for col, name in (("ttfb_ms", "first echo over the relay (ttfb)"), ("ttd_ms", "first echo over direct (ttd)")):
        xs = df[col].dropna().to_numpy(dtype=float)
        series[f"{name}, N={len(xs)}"] = xs
        said.append(f"{name} median {_median(xs)} over {len(xs)} trials")
    _cdf(ax, series, "time from session request (ms)", f"Time to first byte and to direct ({_label(df)})")
    return _say(ax, f"CDFs of the time to the first echo ({_label(df)}): {', '.join(said)}.")


def outcomes(df: pd.DataFrame, ax=None):
    """Outcome breakdown per cell (every outcome, failed included); the legend sits outside."""
    s = cell_summary(df)
    ax = ax or plt.subplots(figsize=(9, 0.8 + 0.45 * len(s)))[1]
    labels = [_cell_label(r) for r in s.itertuples()]
    shares = pd.crosstab([df[c] for c in CELL], df["outcome"], normalize="index")
    shares = shares.reindex(pd.MultiIndex.from_frame(s[CELL])).reindex(columns=list(OUTCOME_COLORS), fill_value=0)
    left = np.zeros(len(s))
    for outcome, color in OUTCOME_COLORS.items():
        vals = shares[outcome].fillna(0).to_numpy(dtype=float)
        ax.barh(labels, vals, left=left, color=color, label=outcome)
        left += vals
    ax.set_xlabel("share of trials")
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set_title(f"Outcomes per NAT pair ({_label(df)})")
    ax.legend(title="outcome", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.invert_yaxis()
    parts = "; ".join(f"{r.agent_nat} to {r.connector_nat}: {r.direct} direct, {r.relay} relay, {r.failed} failed "
                      f"of {r.n}" for r in s.itertuples())
    return _say(ax, f"Stacked bars of outcomes per NAT pair ({_label(df)}): {parts}.")


def rates(summary: pd.DataFrame, ax=None):
    """Direct, fallback (relay) and failure rate per cell with their 95% Wilson intervals as error
    bars."""
    s = summary
    ax = ax or plt.subplots(figsize=(9, 0.8 + 0.5 * len(s)))[1]
    y = np.arange(len(s))
    for offset, (outcome, prefix) in zip((-0.2, 0.0, 0.2), FAMILIES, strict=True):
        rate = s[f"{prefix}_rate"].to_numpy(dtype=float)
        err = np.vstack([rate - s[f"{prefix}_ci_low"].to_numpy(dtype=float),
                         s[f"{prefix}_ci_high"].to_numpy(dtype=float) - rate])
        ax.errorbar(rate, y + offset, xerr=np.clip(err, 0, None), fmt="o", capsize=3, color=FAMILY_COLORS[outcome],
                    label=RATE_NAMES[outcome])
    ax.set_yticks(y, [_cell_label(r) for r in s.itertuples()])
    ax.invert_yaxis()
    ax.set_xlim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set_xlabel("share of trials; bars: 95% Wilson interval")
    ax.set_title(f"Direct, fallback and failure rates per NAT pair ({_label(s)})")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    parts = "; ".join(f"{r['agent_nat']} to {r['connector_nat']}: direct {percent(r['direct_rate'])}, fallback "
                      f"{percent(r['fallback_rate'], r['fallback_ci_low'], r['fallback_ci_high'])}, failed "
                      f"{percent(r['failed_rate'], r['failed_ci_low'], r['failed_ci_high'])}"
                      for r in s.to_dict("records"))
    return _say(ax, f"Rates per NAT pair with 95% intervals ({_label(s)}): {parts}.")


def heatmap(summary: pd.DataFrame, value: str, title: str, *, backend: str | None = None,
            profile: str | None = None, fmt: str = "{:.0%}", cmap: str = "viridis", ax=None,
            vmin: float | None = 0.0, vmax: float | None = 1.0, colorbar: str | None = None):
    """A 6 x 6 heatmap of one backend and profile; each cell also shows its direct / relay / failed
    counts, the expected outcome code, a cross where the observed outcome disagrees with it and a
    star where policy decided it without punching."""
    s = summary if backend is None else summary[summary["backend"] == backend]
    s = s if profile is None else s[s["profile"] == profile]
    m = matrix(s, value)
    grid = {k: matrix(s, k).reindex(index=m.index, columns=m.columns).to_numpy(dtype=float)
            for k in ("as_expected_rate", "direct", "relay", "failed", "decided")}
    codes = matrix(s, "expected").reindex(index=m.index, columns=m.columns)
    ax = ax or plt.subplots(figsize=(9, 7))[1]
    values = m.to_numpy(dtype=float)
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(m.columns)), m.columns, rotation=35, ha="right")
    ax.set_yticks(range(len(m.index)), m.index)
    ax.set_xlabel("Connector NAT")
    ax.set_ylabel("Agent NAT")
    for i, a in enumerate(m.index):
        for j, c in enumerate(m.columns):
            v, good = values[i, j], grid["as_expected_rate"][i, j]
            stated = codes.at[a, c]  # as the records state it (a dual-stack trial expects D)
            code = stated if isinstance(stated, str) else expected_or_unknown(a, c)  # "?": unknown NAT
            mark = "" if code == "?" or np.isnan(good) or good == 1 else " ✗"
            mark += " *" if grid["decided"][i, j] == 1 else ""  # not punched: policy decided this cell
            counts = "" if np.isnan(grid["direct"][i, j]) else \
                f"\n{grid['direct'][i, j]:.0f}/{grid['relay'][i, j]:.0f}/{grid['failed'][i, j]:.0f}"
            txt = ("–" if np.isnan(v) else fmt.format(v)) + counts + f"\nexp {code}{mark}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                    color="white" if not np.isnan(v) and v < ((vmin or 0) + (vmax or 1)) / 2 else "black")
    where = _label(s)
    ax.set_title(f"{title} ({where}, N={int(s['n'].sum())} trials)\n"
                 "in each cell: value, direct/relay/failed counts, expected (D, D>, P, B, R, M, ? unknown NAT);\n"
                 "✗ = not as expected; * = not punched, decided by policy (punch_anyway measures it)", fontsize=9)
    bar = plt.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label(colorbar or title)
    if fmt == "{:.0%}":
        bar.ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    cells = s.sort_values(CELL).to_dict("records")
    off = [f"{r['agent_nat']} to {r['connector_nat']}" for r in cells if r["as_expected_rate"] < 1 and r["expected"] != "?"]
    shown = "; ".join(f"{r['agent_nat']} to {r['connector_nat']} {'–' if pd.isna(r[value]) else fmt.format(r[value])}"
                      f" ({r['direct']}/{r['relay']}/{r['failed']} direct/relay/failed, expected {r['expected']})"
                      for r in cells)
    return _say(ax, f"Heatmap of {title[:1].lower() + title[1:]} over Agent NAT by Connector NAT ({where}). "
                    f"{len(off)} of {len(s)} pairs not as expected{': ' + ', '.join(off) if off else ''}. "
                    f"Cells: {shown}.")


def table(frame: pd.DataFrame) -> None:
    """Display a table in full: no row index, no text cut short (reasons are read whole)."""
    from IPython.display import HTML, display

    with pd.option_context("display.max_colwidth", None):
        display(HTML(frame.to_html(index=False, na_rep="–")))


MODE_COLORS = {"terminated": "#7570b3", "sealed": "#e7298a"}
# the panels of modes_by_cell: (summary prefix, axis label)
MODE_PANELS = (("direct", "direct rate; bars: 95% Wilson interval"),
               ("ttfb", "ttfb: session start → first echo over the relay (ms)"),
               ("ttd", "ttd: session start → first echo over direct (ms)"),
               ("upgrade", "upgrade: punch proved → first echo over direct (ms)"))


def _delay_text(cmp: pd.DataFrame) -> str:
    if "punch_delay" not in cmp:
        return ""
    delays = sorted({float(v) for v in cmp["punch_delay"].dropna()})
    said = ", ".join(f"{d:g} s" for d in delays)
    return f", punch delay {said}" + (": a fresh session" if delays == [0.0] else ": an established session")


def modes_by_cell(cmp: pd.DataFrame, fig=None):
    """The two architectures per NAT pair, from analysis.compare_modes for one backend, profile and
    punch delay: direct rate with its Wilson interval, and the ttfb, ttd and upgrade medians with
    their order-statistic intervals (none below 6 trials), terminated and sealed side by side."""
    from qlab.study.analysis import MODES

    fig = fig or plt.figure(figsize=(16, 1.4 + 0.45 * len(cmp)))
    axes = fig.subplots(1, len(MODE_PANELS), sharey=True)
    y = np.arange(len(cmp))
    where = f"{_label(cmp)}{_delay_text(cmp)}"
    for ax, (name, xlabel) in zip(axes, MODE_PANELS, strict=True):
        for offset, mode in zip((-0.15, 0.15), MODES, strict=True):
            value = "direct_rate" if name == "direct" else f"{name}_p50_ms"
            v = cmp[f"{value}_{mode}"].to_numpy(dtype=float)
            err = np.vstack([v - cmp[f"{name}_ci_low_{mode}"].to_numpy(dtype=float),
                             cmp[f"{name}_ci_high_{mode}"].to_numpy(dtype=float) - v])
            ax.errorbar(v, y + offset, xerr=np.clip(np.nan_to_num(err), 0, None), fmt="o", capsize=3,
                        color=MODE_COLORS[mode], label=mode)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3, axis="x")
        if name == "direct":
            ax.set_xlim(-0.02, 1.02)
            ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.0%}"))
    labels = [f"{r['agent_nat']} → {r['connector_nat']} (N={_count(r['n_terminated'])}/{_count(r['n_sealed'])})"
              for r in cmp.to_dict("records")]
    axes[0].set_yticks(y, labels)
    axes[0].invert_yaxis()
    axes[-1].legend(title="architecture", loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.suptitle(f"Terminated vs sealed per NAT pair ({where}); medians with 95% intervals; N = terminated/sealed",
                 fontsize=10)
    parts = "; ".join(
        f"{r['agent_nat']} to {r['connector_nat']}: direct {percent(r['direct_rate_terminated'])} terminated, "
        f"{percent(r['direct_rate_sealed'])} sealed; "
        + ", ".join(f"{name} {_ms_pair(r, name)}" for name, _ in MODE_PANELS[1:])
        for r in cmp.to_dict("records"))
    _say(axes[0], f"Terminated vs sealed per NAT pair ({where}), medians terminated then sealed: {parts}.")
    return fig


def _count(v: object) -> str:
    n = float(str(v))  # NaN: the pair did not run in that mode
    return "–" if math.isnan(n) else str(int(n))


def _ms_pair(r: dict, name: str) -> str:
    a, b = (float(r[f"{name}_p50_ms_{m}"]) for m in ("terminated", "sealed"))
    if math.isnan(a) and math.isnan(b):
        return "none (no direct trial)" if name != "ttfb" else "none"
    return f"{_ms_text(a)} vs {_ms_text(b)}"


def _ms_text(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.1f} ms"


def modes_cdf(df: pd.DataFrame, column: str = "upgrade_ms", ax=None):
    """CDF of one timing per architecture and punch delay (trials from
    analysis.with_campaign_settings; a record with no mode is terminated)."""
    from qlab.study.analysis import session_modes

    ax = ax or plt.subplots(figsize=(7, 4))[1]
    d = df.assign(mode=session_modes(df))
    keys = ["mode", "punch_delay"] if "punch_delay" in d else ["mode"]
    series, said = {}, []
    for key, g in d.groupby(keys, sort=True):
        mode, delay = (key[0], key[1]) if len(keys) == 2 else (key[0], None)
        name = f"{mode}" + ("" if delay is None else f", punch delay {float(str(delay)):g} s")
        xs = g[column].dropna().to_numpy(dtype=float)
        series[f"{name}, N={len(xs)}"] = xs
        said.append(f"{name} median {_median(xs)} over {len(xs)} trials")
    what = {"upgrade_ms": "upgrade (punch proved → first echo over direct)",
            "ttfb_ms": "time to first byte over the relay", "ttd_ms": "time to direct"}.get(column, column)
    _cdf(ax, series, f"{what} (ms)", f"{what[:1].upper() + what[1:]}, CDF ({_label(df)})")
    drawn = [label for label, xs in series.items() if len(xs)]
    for line, label in zip(ax.get_lines(), drawn, strict=True):  # colour by mode, dashed once delayed
        line.set_color(MODE_COLORS.get(label.split(",")[0], "grey"))
        line.set_linestyle("-" if "punch delay" not in label or "delay 0 s" in label else "--")
    ax.legend()
    return _say(ax, f"CDFs of the {what} per architecture ({_label(df)}): {', '.join(said)}.")
