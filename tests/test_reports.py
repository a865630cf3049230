"""Campaigns, the results store, the notebooks under papermill, and the published HTML in a real
browser."""

from __future__ import annotations

import html
import io
import json
import logging
import math
import os
import re
import subprocess
import sys

import pytest

from qlab.study import campaign, results
from tests.browser import Page, chromium


def small_spec(**kw):
    base = dict(backend="sim", agent_nats="full_cone,symmetric", connector_nats="port_restricted,symmetric_seq",
                trials=2, samples=5, campaign_id="t-small")
    base.update(kw)
    return campaign.CampaignSpec(**base)


def test_campaign_writes_a_schema_checked_store(tmp_path):
    spec = small_spec()
    folder = campaign.run(spec, root=tmp_path, progress=False)
    for name in ("manifest.json", "trials.jsonl", "trials.csv", "trials.parquet"):
        assert (folder / name).exists(), name
    m = json.loads((folder / "manifest.json").read_text())
    for key in ("qlab_version", "git_revision", "backend", "python", "aioquic", "kernel", "parameters", "seed",
                "started_at", "finished_at", "host"):
        assert key in m, key
    df = results.load(spec.campaign_id, root=tmp_path)
    assert len(df) == 8 and set(df.columns) >= set(results.REQUIRED)
    assert isinstance(df.path_events.iat[0], list), "JSON columns come back as objects"
    assert df.as_expected.all()
    both = results.load([folder, folder])
    assert len(both) == 16


def test_matrix_summary_tells_decided_cells_from_measured_ones(tmp_path):
    """symmetric x symmetric_seq: policy skips the punch, so the cell is decided, not measured; with
    punch_anyway the same cell punches, fails and is measured. Records from before the `punch`
    column load with it null and count in neither rate."""
    from qlab.study import analysis

    def summary(**kw):
        spec = small_spec(agent_nats="symmetric,full_cone", connector_nats="symmetric_seq", trials=1,
                          campaign_id=f"t-dec-{len(kw)}", **kw)
        return analysis.cell_summary(results.load(campaign.run(spec, root=tmp_path, progress=False)))

    by_cell = lambda s: {a: row for a, row in zip(s.agent_nat, s.itertuples(), strict=True)}  # noqa: E731
    plain, anyway = by_cell(summary()), by_cell(summary(punch_anyway=True))
    assert plain["symmetric"].decided and plain["symmetric"].not_punched_rate == 1
    assert plain["symmetric"].as_expected_rate == 1  # relay, as the table says, but by policy
    assert not anyway["symmetric"].decided and anyway["symmetric"].punch_failed_rate == 1
    assert anyway["symmetric"].not_punched_rate == 0 and anyway["symmetric"].as_expected_rate == 1
    assert not plain["full_cone"].decided and plain["full_cone"].not_punched_rate == 0
    old = {k: v for k, v in results.load("t-dec-0", root=tmp_path).iloc[0].to_dict().items()
           if k not in ("punch", "rtt_relay_received")}
    assert results.validate_record(old)["punch"] is None


def test_interrupted_campaign_keeps_finished_trials_and_resumes(tmp_path):
    spec = small_spec(campaign_id="t-resume")
    seen = []

    def stop_after_three(rec):
        seen.append(rec["trial_id"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(spec, root=tmp_path, progress=False, workers=1, on_result=stop_after_three)
    store = results.CampaignStore(results.campaign_dir("t-resume", tmp_path))
    assert [r["trial_id"] for r in store.records()] == seen  # durable before the next one started
    assert json.loads((store.dir / "manifest.json").read_text())["finished_at"] is None
    with open(store.jsonl, "ab") as f:
        f.write(b'{"trial_id": "half a line')  # a crash mid-write leaves a torn line: ignored
    campaign.resume("t-resume", root=tmp_path, progress=False)
    df = results.load("t-resume", root=tmp_path)
    assert len(df) == 8 and df.trial_id.is_unique
    assert json.loads((store.dir / "manifest.json").read_text())["finished_at"] is not None


def test_a_failing_trial_is_recorded_not_dropped(tmp_path):
    from qlab.experiment.record import TrialSpec
    from qlab.study.executors import failed_record

    rec = failed_record(TrialSpec(trial_id="x", campaign_id="c"), RuntimeError("lab exploded"))
    store = results.CampaignStore(tmp_path / "c")
    store.append(rec)
    df = store.write_tables()
    assert df.outcome.tolist() == ["failed"] and "lab exploded" in df.error.iat[0]


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="bad campaign id"):
        results.campaign_dir("../../etc", tmp_path)
    with pytest.raises(ValueError, match="unknown NAT preset"):
        small_spec(agent_nats="full_cone,cone_of_silence")
    with pytest.raises(results.SchemaError):
        results.validate_record({"trial_id": "x"})
    with pytest.raises(FileNotFoundError):
        results.load("nope", root=tmp_path)


NOTEBOOK_NAMES = ("nat_campaign", "matrix_report", "explore", "cloud_campaign", "architectures")


def _execute(name, tmp_path, **params):
    from qlab.study.report import execute

    return execute(name, tmp_path / f"{name}.ipynb", params)


def _outputs(nb_path) -> str:
    import nbformat

    return json.dumps([c.get("outputs", []) for c in nbformat.read(nb_path, as_version=4).cells], ensure_ascii=False)


def test_every_notebook_runs_under_papermill(tmp_path):
    import nbformat

    root = tmp_path / "results"
    _execute("nat_campaign", tmp_path, agent_nats="port_restricted", connector_nats="full_cone,symmetric",
             trials=1, results_root=str(root), new_campaign_id="nb-test", progress=False)
    assert (root / "nb-test" / "trials.parquet").exists()
    nb = _execute("matrix_report", tmp_path, results_root=str(root), backend="sim", compare="nb-test,nb-test")
    assert "direct b − a" in _outputs(nb) and "+0 pp" in _outputs(nb)  # the comparison table
    explore = _execute("explore", tmp_path, trials=1, progress=False)
    assert "image/png" in _outputs(nb)
    note = "interactive controls"
    from qlab.study.report import to_html

    assert to_html(explore, tmp_path / "explore.html").read_text().count(note) == 1  # the widget, once
    for name in NOTEBOOK_NAMES:  # committed without outputs
        src = nbformat.read(f"notebooks/{name}.ipynb", as_version=4)
        assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code"), name


def test_notebooks_in_a_lab_kernel_use_the_project_results(tmp_path, monkeypatch):
    """JupyterLab starts kernels in notebooks/: with the default results_root and no QLAB_RESULTS
    the campaign lands in <project>/results/ and matrix_report finds it there."""
    import shutil

    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'scratch'\n")
    for name in ("nat_campaign", "matrix_report"):
        shutil.copy(f"notebooks/{name}.ipynb", project / "notebooks")
    monkeypatch.delenv("QLAB_RESULTS", raising=False)
    monkeypatch.chdir(tmp_path)  # the caller's cwd is not the project: only the kernel's counts
    from qlab.study.report import execute

    execute("nat_campaign", tmp_path / "out" / "nat.ipynb", dict(
        agent_nats="full_cone", connector_nats="public,symmetric", trials=1, new_campaign_id="lab-run",
        progress=False), notebooks=project / "notebooks")
    assert (project / "results" / "lab-run" / "manifest.json").is_file()
    assert not (project / "notebooks" / "results").exists()
    nb = execute("matrix_report", tmp_path / "out" / "matrix.ipynb", {}, notebooks=project / "notebooks")
    assert sorted(p.name for p in (project / "notebooks").iterdir()) == ["matrix_report.ipynb", "nat_campaign.ipynb"]
    text = _outputs(nb)  # nothing left beside the notebooks (e.g. the kernels' sockets)
    assert "1 campaign(s)" in text and "backend sim, profile wan-20ms" in text and "2 NAT pairs" in text


def _declared_parameters(name: str) -> dict[str, tuple[str, str]]:
    """Every annotated assignment of a notebook's parameters cell, read with Python's own parser."""
    import ast

    import nbformat

    nb = nbformat.read(f"notebooks/{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, name
    return {n.target.id: (ast.unparse(n.annotation), ast.get_source_segment(cells[0].source, n.value))
            for n in ast.parse(cells[0].source).body if isinstance(n, ast.AnnAssign)}


def test_papermill_lists_every_parameter_with_its_type_and_default(caplog):
    import papermill as pm

    caplog.set_level(logging.WARNING)
    for name in NOTEBOOK_NAMES:
        declared = _declared_parameters(name)
        listed = pm.inspect_notebook(f"notebooks/{name}.ipynb")
        assert {k: (v["inferred_type_name"], v["default"]) for k, v in listed.items()} == declared, name
    assert [r.getMessage() for r in caplog.records] == []  # e.g. "Unable to parse line 1"
    assert "campaign_ids" in _declared_parameters("matrix_report")
    assert _declared_parameters("nat_campaign")["results_root"] == ("str", '""')


def test_bad_notebook_parameters_are_one_line(tmp_path):
    from qlab.study import params

    cases = [
        (dict(trials="three"), "trials must be a whole number, got 'three'"),
        (dict(trials=-2), "trials must be from 1 to 10000, got -2"),
        (dict(trials=True), "trials must be a whole number"),
        (dict(agent_nats="full_cone,cone_of_silence"), "unknown NAT preset 'cone_of_silence'"),
        (dict(profile="wan-2ms"), "unknown profile 'wan-2ms'; choose one of: lan"),
        (dict(backend="vm"), "unknown backend 'vm'; choose one of: sim, netns, loopback"),
        (dict(backend="loopback"), "loopback backend has no NAT"),
    ]
    base = dict(backend="sim", agent_nats="full_cone", connector_nats="public", profile="wan-20ms", trials=1,
                seed=0, campaign_id="", new_campaign_id="", results_root=str(tmp_path))
    for change, message in cases:
        with pytest.raises(params.ParameterError, match=re.escape(message)) as err:
            params.nat_campaign(**{**base, **change})
        assert err.value._render_traceback_() == [f"ParameterError: {err.value}"] and "\n" not in str(err.value)
    with pytest.raises(params.ParameterError, match="trials must be from 1 to 20"):
        params.explore(agent_nat="full_cone", connector_nat="public", profile="lan", backend="sim", trials=-2)
    with pytest.raises(params.ParameterError, match="compare takes two campaign ids"):
        params.matrix_report(campaign_ids="", compare="a,b,c", backend="", profile="", pool=False,
                             results_root=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # checked before any work: nothing written


def test_a_mistyped_campaign_id_stops_the_notebook_in_one_line(tmp_path):
    """In a real kernel: a campaign_id that does not exist names close matches and starts nothing;
    the error output is the one line (IPython calls _render_traceback_), and `qlab report` gets
    the same line as NotebookFailed."""
    import nbformat

    from qlab.study.report import NotebookFailed

    root = tmp_path / "results"
    campaign.run(small_spec(campaign_id="wan-run-1", agent_nats="full_cone", connector_nats="public", trials=1),
                 root=root, progress=False)
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(NotebookFailed) as err:
        _execute("nat_campaign", tmp_path, campaign_id="wan-run-2", results_root=str(root), progress=False)
    assert "ParameterError: no campaign 'wan-run-2'" in str(err.value) and "did you mean wan-run-1" in str(err.value)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in root.iterdir()) == before  # no new campaign
    errors = [o for c in nbformat.read(tmp_path / "nat_campaign.ipynb", as_version=4).cells
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert len(errors) == 1 and len(errors[0].traceback) == 1 and "did you mean wan-run-1" in errors[0].traceback[0]


def _frame(cells: dict[tuple[str, str, str, str], list[str]]):
    """Synthetic trials: per (backend, profile, agent, connector) the outcomes in order; direct
    trials have RTTs 10, 11, ... ms, every trial a relay RTT of 50 + index ms."""
    import pandas as pd

    from qlab.nat.spec import expected_or_unknown

    rows = []
    for (backend, profile, a, c), outs in cells.items():
        for i, o in enumerate(outs):
            direct = o.startswith("direct")
            rows.append(dict(
                campaign_id=f"c-{backend}-{profile}", backend=backend, profile=profile, agent_nat=a, connector_nat=c,
                outcome=o, as_expected=direct, punch="attempted", expected=expected_or_unknown(a, c),
                rtt_direct_p50_ms=10.0 + i if direct else None, rtt_relay_p50_ms=50.0 + i,
                ttfb_ms=60.0, ttd_ms=80.0 + i if direct else None,
                reason="" if direct else ("TimeoutError: " if o == "failed" else "no direct path was verified"),
                measured_with=f"echo probe on {backend}; proof: {i} of 10"))
    return pd.DataFrame(rows)


def test_summary_shows_failed_trials_per_backend_and_profile():
    """A cell of 2 direct and 1 failed trial reads 67% direct, 0% fallback and 33% failed, each
    with its interval; profiles stay apart unless pooled; the matrix refuses to average them."""
    from qlab.study import analysis

    cell = ("sim", "lossy-5pct", "port_restricted", "symmetric_seq")
    df = _frame({cell: ["direct_predicted", "direct_predicted", "failed"],
                 ("sim", "wan-20ms", "port_restricted", "symmetric_seq"): ["relay"] * 4})
    s = analysis.cell_summary(df)
    assert len(s) == 2
    lossy = s[s.profile == "lossy-5pct"].iloc[0]
    assert (lossy.direct, lossy.relay, lossy.failed, lossy.n) == (2, 0, 1, 3)
    assert lossy.failed_rate == pytest.approx(1 / 3) and lossy.fallback_rate == 0
    assert (lossy.failed_ci_low, lossy.failed_ci_high) == pytest.approx(analysis.wilson(1, 3))
    assert lossy.top_reason == "TimeoutError (timed out, no message)"
    table = analysis.readable(s)
    row = table[table.profile == "lossy-5pct"].iloc[0]
    assert row["failed rate (95% CI)"] == "33% (6%–79%)" and row["direct / relay / failed"] == "2 / 0 / 1"
    assert "0.33" not in table.to_string() and "0.67" not in table.to_string()
    with pytest.raises(ValueError, match="several backends or profiles"):
        analysis.matrix(s, "direct_rate")
    assert analysis.matrix(s, "failed_rate", profile="lossy-5pct").loc["port_restricted", "symmetric_seq"] == \
        pytest.approx(1 / 3)
    pooled = analysis.cell_summary(df, pool=True)
    assert len(pooled) == 1 and pooled.profile.iat[0] == "lossy-5pct + wan-20ms" and pooled.n.iat[0] == 7
    said = analysis.describe(df)
    assert said.count("\n") == 1 and "profile lossy-5pct** (wan-20ms with 5% loss each way on every access link): 3 trials" \
        in said and "echo probe on sim" in said
    df["sim_calibration"] = None  # as results.load gives records written before calibrations
    assert analysis.describe(df).count("no processing time charged") == 2
    df["sim_calibration"] = "default@541660"
    assert analysis.describe(df).count("processing charged from calibration default@541660") == 2
    assert "proof" not in said  # the method, not one row's counts


def test_median_intervals_come_from_order_statistics():
    from qlab.study import analysis

    assert analysis.median_ci([1, 2, 3, 4, 5])[1:] == (pytest.approx(float("nan"), nan_ok=True),) * 2
    assert analysis.median_ci(range(1, 7)) == (3.5, 1.0, 6.0)  # coverage 1 - 2/64 >= 95%
    med, lo, hi = analysis.median_ci(range(1, 101))
    assert (med, lo, hi) == (50.5, 40.0, 61.0)  # ranks 40 and 61 of 100: the textbook pair


def test_compare_puts_two_campaigns_side_by_side():
    """Two campaigns of different profiles compare on the NAT pair; rates, intervals, medians and
    b − a for each cell; a cell only one side ran is there with NaN on the other."""
    from qlab.study import analysis

    a = _frame({("sim", "wan-20ms", "full_cone", "symmetric"): ["direct_wan"] * 4,
                ("sim", "wan-20ms", "full_cone", "public"): ["direct_wan"] * 2})
    b = _frame({("sim", "lossy-20pct", "full_cone", "symmetric"): ["direct_wan", "relay", "failed", "failed"]})
    cmp = analysis.compare(a, b)
    sym = cmp[cmp.connector_nat == "symmetric"].iloc[0]
    assert (sym.profile_a, sym.profile_b, sym.n_a, sym.n_b) == ("wan-20ms", "lossy-20pct", 4, 4)
    assert sym.direct_rate_diff == pytest.approx(-0.75) and sym.failed_rate_diff == pytest.approx(0.5)
    assert (sym.failed_ci_low_b, sym.failed_ci_high_b) == pytest.approx(analysis.wilson(2, 4))
    assert sym.rtt_relay_p50_ms_a == pytest.approx(51.5) and sym.ttd_p50_ms_b == pytest.approx(80.0)
    public = cmp[cmp.connector_nat == "public"].iloc[0]
    assert public.n_a == 2 and math.isnan(public.n_b)
    shown = analysis.readable_compare(cmp)
    assert shown.loc[shown.connector_nat == "symmetric", "failed b − a"].iat[0] == "+50 pp"
    import qlab

    assert qlab.compare(a, b).equals(cmp)
    with pytest.raises(ValueError, match="b holds no trials"):
        analysis.compare(a, b.iloc[0:0])


def test_compare_modes_puts_the_two_architectures_side_by_side(tmp_path):
    """Per NAT pair and punch delay: each mode's N, direct rate (Wilson), timing medians, and sealed −
    terminated; a record with no mode is terminated; punch_delay and a failed trial's missing mode
    come from the campaign's manifest; the figure says its numbers."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from qlab.study import analysis, plots

    cell = ("sim", "wan-20ms", "port_restricted", "port_restricted")
    term = _frame({cell: ["direct_wan"] * 3 + ["relay"]}).assign(mode=[None, "terminated", None, None], upgrade_ms=57.0)
    sealed = _frame({cell: ["direct_wan"] * 2}).assign(mode="sealed", ttfb_ms=[120.0, 130.0], upgrade_ms=[25.0, 27.0])
    term.loc[3, "upgrade_ms"] = None  # not direct: no upgrade
    df = pd.concat([term, sealed], ignore_index=True)
    assert analysis.session_modes(df).tolist() == ["terminated"] * 4 + ["sealed"] * 2
    cmp = analysis.compare_modes(df)
    assert len(cmp) == 1 and "punch_delay" not in cmp  # the records do not carry it: not a key
    r = cmp.iloc[0]
    assert (r.n_terminated, r.direct_terminated, r.n_sealed, r.direct_sealed) == (4, 3, 2, 2)
    assert (r.direct_ci_low_terminated, r.direct_ci_high_terminated) == pytest.approx(analysis.wilson(3, 4))
    assert r.direct_rate_diff == pytest.approx(0.25)
    assert (r.direct_diff_ci_low, r.direct_diff_ci_high) == pytest.approx(analysis.newcombe(3, 4, 2, 2)[1:])
    assert r.direct_diff_ci_low < 0 < r.direct_diff_ci_high  # 4 and 2 trials: no difference shown
    assert r.ttfb_p50_ms_terminated == 60.0 and r.ttfb_p50_ms_sealed == 125.0 and r.ttfb_p50_ms_diff == 65.0
    assert r.upgrade_p50_ms_diff == pytest.approx(26.0 - 57.0) and r.upgrade_n_terminated == 3
    assert r.ttd_p50_ms_diff == pytest.approx(80.5 - 81.0)  # ttd 80, 81, 82 terminated; 80, 81 sealed
    shown = analysis.readable_modes(cmp).iloc[0]
    assert shown["ttfb ms, terminated → sealed (Δ)"] == "60.0 → 125.0 (+65.0 ms)"
    assert shown["direct terminated"] == "75% (30%–95%)" and shown["direct sealed − terminated"].startswith("+25 pp (")
    # the campaign settings the records lack come from the manifests
    for cid, mode, delay in (("c-t", "terminated", 1.0), ("c-s", "sealed", 1.0)):
        results.CampaignStore(tmp_path / cid).write_manifest({"campaign_id": cid, "parameters": {"mode": mode,
                                                                                                  "punch_delay": delay}})
    df["campaign_id"] = ["c-t"] * 4 + ["c-s"] * 2
    df.loc[5, ["mode", "outcome", "ttd_ms", "upgrade_ms"]] = [None, "failed", None, None]  # raised: no mode recorded
    full = analysis.with_campaign_settings(df, tmp_path)
    assert full["mode"].tolist() == ["terminated"] * 4 + ["sealed"] * 2 and set(full.punch_delay) == {1.0}
    cmp = analysis.compare_modes(full)
    assert cmp.punch_delay.tolist() == [1.0] and cmp.direct_rate_diff.iat[0] == pytest.approx(0.5 - 0.75)
    totals = analysis.mode_totals(full)
    assert totals.set_index("mode").loc["sealed", "upgrade_p50_ms"] == 25.0
    fig = plots.modes_by_cell(cmp)
    alt = plots.alt_text(fig)
    assert "backend sim, profile wan-20ms, punch delay 1 s: an established session" in alt
    assert "port_restricted to port_restricted: direct 75% terminated, 50% sealed; ttfb 60.0 ms vs 125.0 ms" in alt
    assert "upgrade 57.0 ms vs 25.0 ms" in alt
    assert "sealed, punch delay 1 s median 25.0 ms over 1 trials" in plots.alt_text(plots.modes_cdf(full).figure)
    plt.close("all")


def test_plots_describe_themselves_and_label_their_scales():
    """Every figure's alt text says what it shows with the numbers drawn; the heatmap's colour bar
    is labelled, its title names backend and profile; the outcome legend sits outside the bars."""
    import matplotlib.pyplot as plt

    from qlab.study import analysis, plots

    df = _frame({("sim", "lossy-5pct", "port_restricted", "symmetric_seq"): ["direct_predicted"] * 2 + ["failed"]})
    s = analysis.cell_summary(df)
    ax = plots.heatmap(s, "failed_rate", "Failure rate", profile="lossy-5pct")
    assert "backend sim, profile lossy-5pct" in ax.get_title()
    colorbar = ax.figure.axes[-1]
    assert colorbar.get_ylabel() == "Failure rate"
    alt = plots.alt_text(ax.figure)
    assert "Heatmap of failure rate" in alt and "port_restricted to symmetric_seq 33% (2/0/1 direct/relay/failed" in alt
    ax = plots.outcomes(df)
    legend = ax.get_legend().get_window_extent()
    ax.figure.canvas.draw()
    assert legend.x0 >= ax.get_window_extent().x1  # right of the plotting area, over no bar
    ax = plots.rates(s)
    assert "failed 33% (6%–79%)" in plots.alt_text(ax.figure)
    assert len(ax.containers) == 3  # one error-bar series per outcome family
    ax = plots.rtt_by_cell(df)
    assert "direct 10.5 ms, relay 51.0 ms" in plots.alt_text(ax.figure)
    ax = plots.rtt_by_cell(_frame({("sim", "wan-20ms", "symmetric", "symmetric"): ["relay"] * 2}))
    assert "symmetric to symmetric: no direct path, relay 50.5 ms" in plots.alt_text(ax.figure)
    plt.close("all")


def test_qlab_report_prints_only_progress_and_the_path(tmp_path):
    """`qlab report` prints progress and the final path, nothing else: no papermill parse warning,
    no kernel-over-TCP warning, no missing alt text."""
    env = {k: v for k, v in os.environ.items() if k != "QLAB_RESULTS"}
    r = subprocess.run([sys.executable, "-m", "qlab.cli.main", "report", "--trials", "1", "--presets", "full_cone",
                        "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=300,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    index = tmp_path / "results" / "reports" / "index.html"
    lines = [seg.strip() for seg in (r.stdout + "\n" + r.stderr).replace("\r", "\n").splitlines() if seg.strip()]
    progress = re.compile(r"^(campaign \S+|notebooks): +\d+%\|")
    assert [ln for ln in lines if not progress.match(ln)] == [f"report: {index}"], lines
    assert any(ln.startswith("notebooks:") for ln in lines)


def test_report_pages_exist_and_reference_nothing_outside(published_report):
    from qlab.study.report import external_references

    pages = sorted(published_report.parent.glob("*.html"))
    names = {p.name for p in pages}
    # the default report: two real-path profiles, the first one's pages unsuffixed
    assert {"index.html", "matrix_report.html", "nat_full_cone.html", "nat_symmetric.html", "explore.html",
            "nat_full_cone_mobile-lte.html", "nat_symmetric_mobile-lte.html", "reachable.html"} <= names
    reachable = (published_report.parent / "reachable.html").read_text()
    assert "How each cell went direct" in reachable and "mapping" in reachable and "birthday" in reachable
    for p in pages:
        assert external_references(p.read_text()) == [], p.name
    for p in pages:
        if p.name != "index.html":
            text = p.read_text()
            assert text.count("data:image/png") >= 1, p.name
            alts = re.findall(r"<img\b[^>]*\balt=\"([^\"]*)\"", text)
            assert len(alts) == text.count("<img") and "No description" not in text, p.name
            profile = "mobile-lte" if "mobile-lte" in p.name else "home-broadband"
            shown = {"backend sim, profile home-broadband", "backend sim, profile mobile-lte"} if p.name.startswith(
                "matrix") else {f"backend sim, profile {profile}"}
            assert all(any(s in a for s in shown) for a in alts), p.name
    assert (published_report.parent / "explore.html").read_text().count("interactive controls") == 1
    arch = (published_report.parent / "architectures.html").read_text()
    assert "Two architectures: terminated vs sealed" in arch and "punch delay 1 s: an established session" in arch
    assert "upgrade ms, terminated → sealed (Δ)" in arch


def test_nat_pages_give_every_reason_in_full(published_report):
    """Each non-direct trial's reason (one trial per pair: it is the pair's top reason) is on its
    page whole, not cut at pandas' 50 characters."""

    import pandas as pd

    from qlab.study.analysis import DIRECT, full_reason

    reasons = 0
    for preset in ("full_cone", "symmetric"):
        page = (published_report.parent / f"nat_{preset}.html").read_text()
        data = next((published_report.parent / "data").glob(f"*-{preset}"))
        trials = pd.read_csv(data / "trials.csv", keep_default_na=False)
        for reason in trials.loc[~trials.outcome.isin(DIRECT), "reason"]:
            assert html.escape(full_reason(reason), quote=False) in page, reason
            reasons += 1
    assert reasons >= 3  # symmetric's relay pairs at least


def test_index_links_each_campaigns_data_and_the_executed_notebooks(published_report):
    index = published_report.read_text()
    links = re.findall(r'href="([^"]+)"', index)
    for preset in ("full_cone", "symmetric"):
        assert f"notebooks/nat_{preset}.ipynb" in links
        data = [link for link in links if link.startswith("data/") and preset in link.split("/")[1]]
        assert {link.rsplit("/", 1)[1] for link in data} == {"manifest.json", "trials.parquet", "trials.csv"}
    for link in links:
        assert (published_report.parent / link).is_file(), link
    facts = json.loads(re.search(r'id="qlab-summary">([^<]*)<', index).group(1))
    assert facts["trials"] == 2 * 2 * 6 and len(facts["campaigns"]) == 4 + 2 + 4  # two profiles x two presets
    # and what is reachable, on the first profile: birthday mode (symmetric against port_restricted and
    # symmetric) and a Connector whose router maps (both Agent NATs against the five NATs +map)
    assert facts["reachable_trials"] == 1 * 2 + 2 * 5
    # and the two architectures, on the first profile, terminated and sealed: both Agent NATs against full_cone,
    # port_restricted and symmetric punching at once, full_cone's row again punching after 1 s
    assert facts["architectures_trials"] == (2 * 3 + 3) * 2 and "architectures.html" in links
    assert "two architectures (home-broadband): terminated vs sealed on 6 NAT pairs, 18 trials" in index
    from qlab.backends.sim.cost import DEFAULT
    from qlab.scenario.profiles import PROFILES

    for profile in ("home-broadband", "mobile-lte"):  # what the links are, and what processing cost the sim charged
        said = (f"backend <code>sim</code>, profile <code>{profile}</code>{html.escape(f' ({PROFILES[profile].description})')}"
                f"{html.escape(f'; processing charged from calibration {DEFAULT.label}')}: 12 trials over 12 NAT pairs, "
                "N = 1 per pair")
        assert said in index, said

@pytest.mark.skipif(chromium() is None and os.environ.get("QLAB_REQUIRE_NETNS") != "1",
                    reason="chromium is not installed")
def test_report_renders_offline_in_chromium(published_report):
    from PIL import Image

    for page_name, min_images in (("nat_symmetric.html", 3), ("matrix_report.html", 3), ("index.html", 0)):
        page = Page((published_report.parent / page_name).resolve().as_uri()).load()
        assert page.outside_requests() == [], page.outside_requests()
        assert page.images >= min_images, (page_name, page.images)
        img = Image.open(io.BytesIO(page.png)).convert("L")
        dark = sum(img.histogram()[:200])
        assert dark > 0.005 * img.width * img.height, f"{page_name} looks blank"
    (published_report.parent / "screenshot-nat_symmetric.png").write_bytes(page.png)


def test_campaign_killed_mid_run_loses_nothing_and_resumes(tmp_path):
    """A real `qlab campaign run` process is SIGKILLed mid-campaign; every finished trial survives,
    no file is left half-written, and `qlab campaign resume` completes the rest."""
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "qlab.cli.main", "campaign", "run", "--backend", "sim", "--agent-nat", "full_cone",
            "--connector-nat", "all", "--trials", "3", "--samples", "5", "--workers", "1", "--id", "t-kill",
            "--results", str(tmp_path)]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    jsonl = tmp_path / "t-kill" / "trials.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not jsonl.exists() or len(jsonl.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(10)
    kept = [json.loads(line) for line in jsonl.read_text().splitlines() if line.endswith("}")]
    assert 4 <= len(kept) < 18, len(kept)
    df = results.load("t-kill", root=tmp_path)  # loads the durable lines even without tables
    assert len(df) >= len(kept)
    r = subprocess.run([sys.executable, "-m", "qlab.cli.main", "campaign", "resume", "t-kill", "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    df = results.load("t-kill", root=tmp_path)
    assert len(df) == 18 and df.trial_id.is_unique
    assert set(kept_id["trial_id"] for kept_id in kept) <= set(df.trial_id)
