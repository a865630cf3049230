"""The results folder wherever qlab runs, the manifest as a campaign's contract, and `qlab.load`."""

from __future__ import annotations

import json

import pytest

import qlab
from qlab.study import campaign, results


def spec(**kw):
    base = dict(backend="sim", agent_nats="full_cone", connector_nats="port_restricted,symmetric", trials=1,
                samples=5, campaign_id="t-store")
    return campaign.CampaignSpec(**{**base, **kw})


def test_the_results_root_is_the_projects_from_any_folder_inside_it(tmp_path, monkeypatch):
    """JupyterLab starts kernels in notebooks/: they must find the same results/ as the CLI."""
    monkeypatch.delenv("QLAB_RESULTS", raising=False)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "notebooks" / "deep").mkdir(parents=True)
    for where in (tmp_path, tmp_path / "notebooks", tmp_path / "notebooks" / "deep"):
        monkeypatch.chdir(where)
        assert results.results_root() == tmp_path / "results"
    monkeypatch.setenv("QLAB_RESULTS", str(tmp_path / "elsewhere"))
    assert results.results_root() == tmp_path / "elsewhere"
    assert results.results_root(tmp_path / "given") == tmp_path / "given"


def test_a_campaign_run_from_notebooks_lands_in_the_project_results(tmp_path, monkeypatch):
    monkeypatch.delenv("QLAB_RESULTS", raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    folder = campaign.run(spec(), progress=False)
    assert folder == tmp_path / "results" / "t-store"
    monkeypatch.chdir(tmp_path)
    assert [c["id"] for c in results.list_campaigns()] == ["t-store"]
    assert len(qlab.load()) == 2


def test_running_an_existing_id_with_other_settings_is_refused_naming_each_difference(tmp_path):
    campaign.run(spec(), root=tmp_path, progress=False)
    with pytest.raises(campaign.ManifestMismatch) as e:
        campaign.run(spec(profile="lan", trials=2), root=tmp_path, progress=False)
    line = str(e.value)
    assert "\n" not in line and "profile=wan-20ms (asked lan)" in line and "trials=1 (asked 2)" in line
    assert "connector_nats" not in line
    assert len(results.load("t-store", root=tmp_path)) == 2  # nothing was added
    campaign.run(spec(), root=tmp_path, progress=False)  # the same settings: fine, nothing to do


def test_resume_runs_exactly_the_manifest(tmp_path):
    s = spec(trials=2, campaign_id="t-exact")

    def stop(rec, seen=[]):  # noqa: B006  (counts across calls of this one test)
        seen.append(rec)
        if len(seen) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        campaign.run(s, root=tmp_path, progress=False, workers=1, on_result=stop)
    campaign.resume("t-exact", root=tmp_path, progress=False)
    df = results.load("t-exact", root=tmp_path)
    assert sorted(df.trial_id) == sorted(t.trial_id for t in s.trial_specs())
    assert set(df.profile) == {"wan-20ms"} and set(df.connector_nat) == {"port_restricted", "symmetric"}


def test_an_old_manifest_without_a_newer_setting_still_resumes(tmp_path):
    folder = campaign.run(spec(campaign_id="t-old"), root=tmp_path, progress=False)
    m = json.loads((folder / "manifest.json").read_text())
    del m["parameters"]["punch_anyway"]  # written before the setting existed
    (folder / "manifest.json").write_text(json.dumps(m))
    campaign.resume("t-old", root=tmp_path, progress=False)
    m["parameters"]["from_the_future"] = 1
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(campaign.ManifestMismatch, match="from_the_future"):
        campaign.resume("t-old", root=tmp_path, progress=False)


def test_a_mistyped_id_is_refused_with_the_close_ones(tmp_path):
    campaign.run(spec(campaign_id="report-sim-full_cone"), root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="did you mean report-sim-full_cone"):
        results.find_campaign("report-sim-ful_cone", tmp_path)
    with pytest.raises(FileNotFoundError, match="did you mean"):
        campaign.resume("report-sim-fullcone", root=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no campaign"):
        results.find_campaign("x", tmp_path / "empty")


@pytest.mark.parametrize("kw, message", [
    (dict(trials=0), "trials must be"), (dict(trials="three"), "trials must be"), (dict(samples=-2), "samples"),
    (dict(backend="loopback"), "loopback backend has no NAT"),
    (dict(backend="loopback", agent_nats="public", connector_nats="public"), "cannot add delay"),
    (dict(backend="carrier-pigeon"), "unknown backend"), (dict(profile="moon"), "profile"),
])
def test_bad_settings_are_refused_before_any_trial(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        campaign.run(spec(**kw), root=tmp_path, progress=False)
    assert not (tmp_path / "t-store").exists()


def test_workers_must_be_positive(tmp_path):
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers"):
            campaign.run(spec(), root=tmp_path, progress=False, workers=bad)


def test_an_unwritable_results_folder_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError, match=r"^results folder .*/a-file/t-store: Not a directory$"):
        campaign.run(spec(), root=blocker, progress=False)
    with pytest.raises(NotADirectoryError, match="a file is in the way"):
        campaign.run(spec(campaign_id="a-file"), root=tmp_path, progress=False)
    with pytest.raises(OSError, match="results folder /proc/qlab"):
        campaign.run(spec(), root="/proc/qlab", progress=False)


def test_load_gives_typed_columns_from_every_file_kind(tmp_path):
    folder = campaign.run(spec(campaign_id="t-typed"), root=tmp_path, progress=False)
    from_tables = qlab.load("t-typed", root=tmp_path)
    for name in ("trials.parquet", "trials.csv"):
        (folder / name).unlink()
    from_jsonl = qlab.load(folder)
    for df in (from_tables, from_jsonl):
        assert str(df.ttd_ms.dtype) == "float64" and str(df.rtt_direct_n.dtype) == "Int64"
        assert df.as_expected.dtype == bool and isinstance(df.agent_candidates.iat[0], list)
        assert isinstance(df.extra.iat[0], dict) and df.error.map(type).eq(str).all()
    assert from_tables.drop(columns=["path_events", "extra"]).equals(from_jsonl.drop(columns=["path_events", "extra"]))
    assert len(qlab.load("t-typed", root=tmp_path, profile="lan")) == 0
    assert len(qlab.load("t-typed", root=tmp_path, backend="sim")) == 2


def test_compare_two_campaigns_at_the_top_level(tmp_path):
    campaign.run(spec(campaign_id="t-a"), root=tmp_path, progress=False)
    campaign.run(spec(campaign_id="t-b", profile="lan"), root=tmp_path, progress=False)
    by_id = qlab.compare("t-a", "t-b", root=tmp_path)
    by_frame = qlab.compare(qlab.load("t-a", root=tmp_path), tmp_path / "t-b")
    assert by_id.equals(by_frame) and len(by_id) == 2
