"""`qlab report`: run the default campaigns, execute the notebooks with papermill (one executed copy
per NAT-type campaign, plus the matrix and explore notebooks) and publish self-contained HTML with
nbconvert (code hidden) under <results>/reports/, with an index.html that links every page, the
executed notebooks and each campaign's data (copied next to the pages).

Notebooks run as JupyterLab runs them: the kernel's working directory is `notebooks/`, so the
notebooks' default results folder is the project's (results.results_root). The kernel talks over
IPC sockets in its runtime folder (no TCP port, so ipykernel has nothing to warn about).

The HTML must work offline: figures are embedded PNGs with their alt text (plots.show puts it in
the output metadata; the template below writes it into `<img alt>`); widget views are replaced by
their static output (an offline file has no widget manager); any script or stylesheet that would be
fetched from a CDN is removed, and the result is checked to reference nothing outside the file.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import math
import re
import shutil
import tempfile
import time
from pathlib import Path

from qlab.nat.spec import PRESET_NAMES, parse_presets, preset
from qlab.scenario.profiles import REPORT_PROFILES
from qlab.study import campaign, results
from qlab.study.analysis import (
    cell_summary,
    mode_totals,
    processing_text,
    profile_text,
    with_campaign_settings,
)

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "(interactive controls: open the notebook in JupyterLab)"
DATA_FILES = ("manifest.json", "trials.parquet", "trials.csv")
_EXTERNAL = re.compile(r"""<(script|link)\b[^>]*\b(?:src|href)=["']https?://[^"']*["'][^>]*>(?:\s*</script>)?""", re.I)
# JupyterLab's nbconvert template writes no alt attribute for images (the classic one reads the
# output's metadata); this one does, from the same metadata key.
_ALT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{% block data_png scoped %}
{%- set alttext = output | get_metadata('alt', 'image/png') -%}
{%- if alttext -%}
{{ super() | replace('<img src=', '<img alt="' ~ (alttext | escape_html) ~ '" src=', 1) }}
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock data_png %}
"""


class NotebookFailed(ValueError):
    """A notebook raised while papermill ran it: one line naming the notebook and the error (a
    ValueError, so the CLI reports it as the user error it usually is, e.g. a bad parameter)."""


def notebook_path(name: str, folder: Path | None = None) -> Path:
    p = (folder or NOTEBOOKS) / f"{name}.ipynb"
    if not p.exists():
        raise FileNotFoundError(f"notebook {p} is missing")
    return p


def execute(name: str, out: Path, parameters: dict, notebooks: Path | None = None) -> Path:
    """Run <notebooks>/<name>.ipynb (default: the project's notebooks/) with `parameters` into
    `out`, the kernel started in that folder as JupyterLab does. A cell that raises is
    NotebookFailed."""
    import papermill as pm

    source = notebook_path(name, notebooks)
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill_log = logging.getLogger("papermill")
    level = papermill_log.level
    papermill_log.setLevel(logging.WARNING)  # its INFO lines (paths, kernel name) are not progress
    try:
        with tempfile.TemporaryDirectory(prefix="qlab-kernel-") as sockets:  # private (0700), removed after
            pm.execute_notebook(str(source), str(out), parameters=parameters, kernel_name="python3",
                                progress_bar=False, cwd=str(source.parent),
                                kernel_manager_class=_ipc_kernels(Path(sockets)))
    except pm.PapermillExecutionError as exc:
        message = str(exc.evalue).strip().splitlines()[0] if str(exc.evalue).strip() else "(no message)"
        raise NotebookFailed(f"notebook {name} failed: {exc.ename}: {message} (executed copy: {out})") from None
    finally:
        papermill_log.setLevel(level)
    return out


def _ipc_kernels(sockets: Path) -> type:
    """A kernel manager whose kernels listen on IPC sockets in `sockets` (jupyter_client's default
    path is relative: the sockets would land in notebooks/), and are not interrupted on their way
    out. The notebook client owns it, so it shuts the kernel down when the notebook is done."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IpcKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:
            return str(sockets / "kernel")

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client sends SIGINT before every shutdown request; when it lands while the
            # kernel answers a message the kernel logs "KeyboardInterrupt caught in kernel". A
            # kernel whose notebook is done has nothing to interrupt.
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IpcKernelManager


def to_html(executed: Path, html_out: Path) -> Path:
    """Publish an executed notebook as offline HTML with the code hidden."""
    import jinja2
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(executed, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if not data:
                    continue
                data["text/plain"] = WIDGET_NOTE
            kept.append(o)
        cell["outputs"] = kept
    exporter = HTMLExporter(template_name="lab", template_file="qlab_lab.html.j2",
                            extra_loaders=[jinja2.DictLoader({"qlab_lab.html.j2": _ALT_TEMPLATE})],
                            exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    body = offline(body)
    html_out.parent.mkdir(parents=True, exist_ok=True)
    html_out.write_text(body, encoding="utf-8")
    return html_out


def offline(page: str) -> str:
    """Drop every script/stylesheet fetched over the network (MathJax, require.js, widget
    managers from CDNs); the report needs none of them."""
    return _EXTERNAL.sub("", page)


def external_references(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["'](https?://[^"']+)["']""", page)


def parse_profiles(profiles: str) -> list[str]:
    from qlab.scenario.profiles import profile

    names = [p.strip() for p in profiles.split(",") if p.strip()]
    if not names:
        raise ValueError("name at least one link profile")
    for name in names:
        profile(name)  # ValueError naming the choices
    return list(dict.fromkeys(names))


def run_report(*, backend: str = "sim", trials: int = 30, presets: str = "all", profile: str = ",".join(REPORT_PROFILES),
               root: str | Path | None = None, out: str | Path | None = None, progress: bool = True) -> Path:
    """The default campaigns (per link profile, one per Agent NAT against every Connector NAT; on the
    first profile also what is reachable and the two session architectures), their notebooks and the
    index. `profile`: one or several profiles, comma-separated. Returns the index.html path."""
    root = results.results_root(root).resolve()  # absolute: the kernels run in notebooks/
    out = Path(out).resolve() if out else root / "reports"
    agents, profiles = parse_presets(presets), parse_profiles(profile)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    runs = []  # (agent, profile, campaign id)
    for prof in profiles:
        for a in agents:
            spec = campaign.CampaignSpec(backend=backend, agent_nats=[a], connector_nats=list(PRESET_NAMES), profile=prof,
                                         trials=trials, campaign_id=f"report-{stamp}-{backend}-{prof}-{a}")
            campaign.run(spec, root=root, progress=progress)
            runs.append((a, prof, spec.campaign_id))
    hard = _hard_cells(backend, agents, profiles[0], trials, stamp, root, progress)
    arch = _architecture_cells(backend, agents, profiles[0], trials, stamp, root, progress)
    t_campaigns = time.monotonic() - t0
    ids = [cid for _, _, cid in runs]
    jobs = [("nat_campaign", f"nat_{a}" if prof == profiles[0] else f"nat_{a}_{prof}", f"Agent behind {a}, {prof}", cid,
             {"campaign_id": cid, "results_root": str(root), "progress": False}) for a, prof, cid in runs]
    jobs.insert(0, ("matrix_report", "matrix_report", "The NAT matrix", ",".join(ids),
                    {"campaign_ids": ",".join(ids), "results_root": str(root)}))
    jobs.insert(1, ("matrix_report", "reachable", f"What is reachable: birthday mode and port mapping, {profiles[0]}",
                    ",".join(hard), {"campaign_ids": ",".join(hard), "results_root": str(root)}))
    if arch:
        jobs.insert(2, ("architectures", "architectures", f"Two architectures: terminated vs sealed, {profiles[0]}",
                        ",".join(arch), {"campaign_ids": ",".join(arch), "results_root": str(root)}))
    jobs.append(("explore", "explore", "Explore (static snapshot)", "",
                 {"backend": backend, "profile": profiles[0], "progress": False}))
    pages = []
    for name, page, title, cid, params in _progress(jobs, progress):
        nb = execute(name, out / "notebooks" / f"{page}.ipynb", params)
        pages.append((title, to_html(nb, out / f"{page}.html"), cid))
    return write_index(out, pages, results.load(ids, root=root), {cid: root / cid for cid in ids + hard + arch},
                       seconds=time.monotonic() - t0, campaign_seconds=t_campaigns,
                       reachable=results.load(hard, root=root),
                       architectures=with_campaign_settings(results.load(arch, root=root), root) if arch else None)


# birthday mode's budget in the report: the mappings the random-port side opens (Tailscale's figure)
REPORT_BIRTHDAY = 256


def _hard_cells(backend: str, agents: list[str], prof: str, trials: int, stamp: str, root: Path,
                progress: bool) -> list[str]:
    """The campaigns that turn on what the plain matrix leaves off, where it applies: birthday mode on
    the cells a random-port NAT makes hard, and a Connector whose router grants port mappings
    (`NAME+map`) against the report's Agent NATs. Returns their ids."""
    natted = [p for p in PRESET_NAMES if preset(p).nat]
    hard = ["port_restricted", "symmetric"]  # birthday mode's cells: a random-port NAT and a cone
    specs = [campaign.CampaignSpec(backend=backend, agent_nats=agents, connector_nats=[f"{c}+map" for c in natted],
                                   profile=prof, trials=trials, campaign_id=f"report-{stamp}-{backend}-{prof}-mapping")]
    if any(a in hard for a in agents):
        specs.insert(0, campaign.CampaignSpec(
            backend=backend, agent_nats=[a for a in agents if a in hard], connector_nats=hard, profile=prof,
            trials=trials, birthday=REPORT_BIRTHDAY, campaign_id=f"report-{stamp}-{backend}-{prof}-birthday"))
    for spec in specs:
        campaign.run(spec, root=root, progress=progress)
    return [s.campaign_id for s in specs]


# the architectures page: the report's Agent NATs among these against all of them, in both modes, punching
# at once (a fresh session); and the Agent NATs whose rows go direct somewhere, punching after
# ARCHITECTURE_DELAY seconds (the upgrade of a session already running on the relay: a row that only
# relays has no upgrade to measure, and a delayed trial costs the most)
ARCHITECTURE_NATS = ("full_cone", "port_restricted", "symmetric")
ARCHITECTURE_UPGRADE_NATS = ("full_cone", "port_restricted")
ARCHITECTURE_DELAY = 1.0
ARCHITECTURE_TRIALS = 10  # per cell at most: the page compares medians, and the report's other pages hold the rates


def _architecture_cells(backend: str, agents: list[str], prof: str, trials: int, stamp: str, root: Path,
                        progress: bool) -> list[str]:
    """The campaigns of the architectures page, terminated and sealed side by side: the report's
    Agent NATs among ARCHITECTURE_NATS against all three (endpoint-independent cells, a hard one
    direct by prediction, cells that only relay) with punch delay 0, and those among
    ARCHITECTURE_UPGRADE_NATS against the same three with ARCHITECTURE_DELAY. Returns their ids
    (none when no Agent NAT of the report is among them)."""
    specs = []
    for delay, nats in ((0.0, ARCHITECTURE_NATS), (ARCHITECTURE_DELAY, ARCHITECTURE_UPGRADE_NATS)):
        chosen = [a for a in agents if a in nats]
        specs += [campaign.CampaignSpec(backend=backend, agent_nats=chosen, connector_nats=list(ARCHITECTURE_NATS),
                                        profile=prof, trials=min(trials, ARCHITECTURE_TRIALS), mode=mode,
                                        punch_delay=delay,
                                        campaign_id=f"report-{stamp}-{backend}-{prof}-{mode}-delay{delay:g}")
                  for mode in ("terminated", "sealed") if chosen]
    for spec in specs:
        campaign.run(spec, root=root, progress=progress)
    return [s.campaign_id for s in specs]


def _progress(jobs: list, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(jobs, desc="notebooks", unit="notebook", disable=not enabled)


def copy_data(out: Path, folders: dict[str, Path]) -> dict[str, list[Path]]:
    """Each campaign's manifest and tables under <out>/data/<id>/, so a published folder carries
    its own data; returns the copies per campaign id."""
    copies: dict[str, list[Path]] = {}
    for cid, folder in folders.items():
        dest = out / "data" / cid
        dest.mkdir(parents=True, exist_ok=True)
        copies[cid] = [Path(shutil.copy2(folder / f, dest / f)) for f in DATA_FILES if (folder / f).exists()]
    return copies


def _link(path: Path, out: Path, text: str | None = None) -> str:
    rel = path.relative_to(out).as_posix()
    return f'<a href="{html.escape(rel)}">{html.escape(text or path.name)}</a>'


def _architectures_fact(arch) -> str:
    """The index's line on the architectures page: its trials, and per mode the direct rate, the
    fresh session's ttfb and ttd and the established session's upgrade (medians over every pair's
    trials)."""
    t = mode_totals(arch)
    by = {(str(r["mode"]), float(r.get("punch_delay", 0.0))): r for r in t.to_dict("records")}
    said = []
    for mode in ("terminated", "sealed"):
        fresh, later = by.get((mode, 0.0)), [r for (m, d), r in sorted(by.items()) if m == mode and d > 0]
        parts = []
        if fresh:
            parts.append(f"direct {fresh['direct_rate']:.0%}, ttfb {_ms(fresh['ttfb_p50_ms'])}, ttd "
                         f"{_ms(fresh['ttd_p50_ms'])} (fresh session)")
        for r in later:
            parts.append(f"upgrade {_ms(r['upgrade_p50_ms'])} (punch after {r['punch_delay']:g} s)")
        if parts:
            said.append(f"{mode}: {', '.join(parts)}")
    return (f"two architectures ({html.escape(str(arch['profile'].iat[0]))}): terminated vs sealed on "
            f"{arch.groupby(['agent_nat', 'connector_nat']).ngroups} NAT pairs, {len(arch)} trials; medians over the "
            f"pairs' trials: {html.escape('; '.join(said))}.")


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f} ms"  # NaN: no trial had it


def write_index(out: Path, pages: list[tuple[str, Path, str]], df, folders: dict[str, Path], **info) -> Path:
    """index.html: what was measured (per backend and profile: trials, NAT pairs, N per pair, pairs
    as expected), the pages, the executed notebooks and each campaign's data."""
    s = cell_summary(df)
    copies = copy_data(out, folders)
    facts = []
    for (backend, profile), g in s.groupby(["backend", "profile"]):
        per = sorted(set(g["n"]))
        trials = df[(df["backend"] == backend) & (df["profile"] == profile)]
        facts.append(f"<li>backend <code>{html.escape(str(backend))}</code>, profile "
                     f"<code>{html.escape(str(profile))}</code>{html.escape(profile_text(str(profile)))}"
                     f"{html.escape(processing_text(trials))}: {int(g['n'].sum())} trials over {len(g)} NAT pairs, "
                     f"N = {'–'.join(map(str, (per[0], per[-1])) if len(per) > 1 else map(str, per))} per pair; "
                     f"{int((g.as_expected_rate == 1).sum())} of {len(g)} pairs behaved as expected in every trial; "
                     f"{int(g['failed'].sum())} trials failed.</li>")
    rows = []
    for title, p, cid in pages:
        executed = out / "notebooks" / f"{p.stem}.ipynb"
        data = "".join(f" · {_link(f, out)}" for f in copies.get(cid, []))
        rows.append(f"<li>{_link(p, out, title)}{' — campaign <code>' + html.escape(cid) + '</code>' if cid in copies else ''}"
                    f" · notebook {_link(executed, out)}{data}</li>")
    reach = info.get("reachable")
    if reach is not None and len(reach):
        r = cell_summary(reach)
        facts.append(f"<li>what is reachable ({html.escape(str(r['profile'].iat[0]))}): birthday mode "
                     f"({REPORT_BIRTHDAY} mappings) and a Connector whose router grants port mappings, "
                     f"{len(reach)} trials over {len(r)} NAT pairs; {int((r['direct_rate'] == 1).sum())} pairs "
                     f"direct in every trial.</li>")
    arch = info.get("architectures")
    if arch is not None and len(arch):
        facts.append(f"<li>{_architectures_fact(arch)}</li>")
    summary = {"trials": len(df), "pairs": len(s), "as_expected_pairs": int((s.as_expected_rate == 1).sum()),
               "failed_trials": int(s["failed"].sum()), "campaigns": sorted(copies),
               "reachable_trials": len(reach) if reach is not None else 0,
               "architectures_trials": len(arch) if arch is not None else 0}
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>qlab report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.5}}code{{background:#eee}}</style>
</head><body><h1>qlab report</h1>
<ul>{''.join(facts)}</ul>
<p>Generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} in {info['seconds']:.0f} s
(campaigns {info['campaign_seconds']:.0f} s). Each page is linked with the notebook that made it
(executed, with its outputs; open it in JupyterLab) and its campaign's data (manifest and trial tables,
copied under <code>data/</code>; columns in docs/results.md).</p>
<ul>{''.join(rows)}</ul>
<p>RTTs come from the same echo probe on both paths; rates carry 95% Wilson intervals, RTT medians
95% order-statistic intervals. Link profiles (delay, jitter, loss per access link) are described, with
the public measurements they come from, in docs/sim.md. Simulated trials charge each role's processing
(handshakes, packet protection, the socket shell) from the calibration named above, measured on a
machine by <code>qlab sim calibrate</code>; the simulator's agreement with the kernel lab is
measured by benchmarks/crossval.py (docs/sim.md).</p>
<script type="application/json" id="qlab-summary">{json.dumps(summary)}</script>
</body></html>"""
    path = out / "index.html"
    path.write_text(body, encoding="utf-8")
    return path
