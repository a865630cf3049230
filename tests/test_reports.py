"""Campaigns, the results store, the notebooks under papermill, and the published HTML in a real
browser."""

from __future__ import annotations

import io
import json
import os

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

    rec = campaign.failed_record(TrialSpec(trial_id="x", campaign_id="c"), RuntimeError("lab exploded"))
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


def _execute(name, tmp_path, **params):
    from qlab.study.report import execute

    return execute(name, tmp_path / f"{name}.ipynb", params)


def test_every_notebook_runs_under_papermill(tmp_path):
    import nbformat

    root = tmp_path / "results"
    _execute("nat_campaign", tmp_path, agent_nats="port_restricted", connector_nats="full_cone,symmetric",
             trials=1, results_root=str(root), campaign_id="nb-test")
    assert (root / "nb-test" / "trials.parquet").exists()
    nb = _execute("matrix_report", tmp_path, results_root=str(root))
    _execute("explore", tmp_path, trials=1)
    text = json.dumps(nbformat.read(nb, as_version=4).cells)
    assert "image/png" in text
    for name in ("nat_campaign", "matrix_report", "explore"):  # committed without outputs
        src = nbformat.read(f"notebooks/{name}.ipynb", as_version=4)
        assert all(not c.get("outputs") for c in src.cells if c.cell_type == "code"), name
        params = [c for c in src.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and ":" in params[0].source  # typed, for papermill --help-notebook


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from qlab.study.report import run_report

    root = tmp_path_factory.mktemp("report")
    index = run_report(trials=1, presets="full_cone,symmetric", root=root, progress=False)
    return index


def test_report_pages_exist_and_reference_nothing_outside(published):
    from qlab.study.report import external_references

    pages = sorted(published.parent.glob("*.html"))
    names = {p.name for p in pages}
    assert {"index.html", "matrix_report.html", "nat_full_cone.html", "nat_symmetric.html", "explore.html"} <= names
    for p in pages:
        assert external_references(p.read_text()) == [], p.name
    for p in pages:
        if p.name != "index.html":
            assert p.read_text().count("data:image/png") >= 1, p.name


@pytest.mark.skipif(chromium() is None and os.environ.get("QLAB_REQUIRE_NETNS") != "1",
                    reason="chromium is not installed")
def test_report_renders_offline_in_chromium(published):
    from PIL import Image

    for page_name, min_images in (("nat_symmetric.html", 3), ("matrix_report.html", 3), ("index.html", 0)):
        page = Page((published.parent / page_name).resolve().as_uri()).load()
        assert page.outside_requests() == [], page.outside_requests()
        assert page.images >= min_images, (page_name, page.images)
        img = Image.open(io.BytesIO(page.png)).convert("L")
        dark = sum(img.histogram()[:200])
        assert dark > 0.005 * img.width * img.height, f"{page_name} looks blank"
    (published.parent / "screenshot-nat_symmetric.png").write_bytes(page.png)


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
