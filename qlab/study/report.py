"""`qlab report`: run the default campaigns, execute the notebooks with papermill (one executed copy
per NAT-type campaign, plus the matrix and explore notebooks) and publish self-contained HTML with
nbconvert (code hidden) under results/reports/, with an index.html.

The HTML must work offline: figures are embedded PNGs; widget views are replaced by their static
output (an offline file has no widget manager); any script or stylesheet that would be fetched from
a CDN is removed, and the result is checked to reference nothing outside the file.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import time
from pathlib import Path

from qlab.nat.spec import PRESET_NAMES, parse_presets
from qlab.study import campaign, results
from qlab.study.analysis import cell_summary

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_EXTERNAL = re.compile(r"""<(script|link)\b[^>]*\b(?:src|href)=["']https?://[^"']*["'][^>]*>(?:\s*</script>)?""", re.I)


def notebook_path(name: str) -> Path:
    p = NOTEBOOKS / f"{name}.ipynb"
    if not p.exists():
        raise FileNotFoundError(f"notebook {p} is missing")
    return p


def execute(name: str, out: Path, parameters: dict) -> Path:
    import papermill as pm

    out.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook_path(name)), str(out), parameters=parameters, kernel_name="python3",
                        progress_bar=False, cwd=str(Path.cwd()))
    return out


def to_html(executed: Path, html_out: Path) -> Path:
    """Publish an executed notebook as offline HTML with the code hidden."""
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
                data["text/plain"] = "(interactive controls: open the notebook in JupyterLab)"
            kept.append(o)
        cell["outputs"] = kept
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
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


def run_report(*, backend: str = "sim", trials: int = 30, presets: str = "all", profile: str = "wan-20ms",
               root: str | Path = "results", out: str | Path | None = None, progress: bool = True) -> Path:
    """The default campaigns (one per Agent NAT, against every Connector NAT), their notebooks and
    the index. Returns the index.html path."""
    root = Path(root)
    out = Path(out) if out else root / "reports"
    agents = parse_presets(presets)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    t0 = time.monotonic()
    ids = []
    for a in agents:
        spec = campaign.CampaignSpec(backend=backend, agent_nats=[a], connector_nats=list(PRESET_NAMES),
                                     profile=profile, trials=trials, campaign_id=f"report-{stamp}-{backend}-{a}")
        campaign.run(spec, root=root, progress=progress)
        ids.append(spec.campaign_id)
    t_campaigns = time.monotonic() - t0
    pages = []
    for a, cid in zip(agents, ids, strict=True):
        nb = execute("nat_campaign", out / "notebooks" / f"nat_{a}.ipynb",
                     {"campaign_id": cid, "results_root": str(root), "backend": backend})
        pages.append((f"Agent behind {a}", to_html(nb, out / f"nat_{a}.html"), cid))
    nb = execute("matrix_report", out / "notebooks" / "matrix_report.ipynb",
                 {"campaign_ids": ",".join(ids), "results_root": str(root)})
    pages.insert(0, ("The NAT matrix", to_html(nb, out / "matrix_report.html"), ",".join(ids)))
    nb = execute("explore", out / "notebooks" / "explore.ipynb", {"backend": backend})
    pages.append(("Explore (static snapshot)", to_html(nb, out / "explore.html"), ""))
    df = results.load(ids, root=root)
    index = write_index(out, pages, df, backend=backend, trials=trials, profile=profile,
                        seconds=time.monotonic() - t0, campaign_seconds=t_campaigns)
    return index


def write_index(out: Path, pages: list[tuple[str, Path, str]], df, **info) -> Path:
    s = cell_summary(df)
    ok = int((s.as_expected_rate == 1).sum())
    rows = "".join(
        f"<li><a href=\"{html.escape(p.name)}\">{html.escape(title)}</a>"
        f"{' — campaign ' + html.escape(cid) if cid and ',' not in cid else ''}</li>" for title, p, cid in pages)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>qlab report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.5}}code{{background:#eee}}</style>
</head><body><h1>qlab report</h1>
<p>{len(df)} hole-punch trials on backend <code>{html.escape(info['backend'])}</code>, profile
<code>{html.escape(info['profile'])}</code>, {info['trials']} per cell; {ok} of {len(s)} NAT pairs behaved as expected.
Generated {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} in {info['seconds']:.0f} s
(campaigns {info['campaign_seconds']:.0f} s).</p>
<ul>{rows}</ul>
<p>RTTs come from the same echo probe on both paths; rates carry 95% Wilson intervals. Raw data:
<code>results/&lt;campaign-id&gt;/trials.parquet</code>, schema in docs/results.md.</p>
<script type="application/json" id="qlab-summary">{json.dumps({'trials': len(df), 'pairs': len(s), 'as_expected_pairs': ok})}</script>
</body></html>"""
    path = out / "index.html"
    path.write_text(body, encoding="utf-8")
    return path
