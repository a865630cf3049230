"""Campaigns on every executor: the local pool, a real Dask scheduler with worker processes on
127.0.0.1 (one killed mid-campaign), and a LocalCluster. The driver alone writes the store, in the
trials' order; the same seeds give the same records wherever the trials ran."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qlab.cli.main import main as qlab_main
from qlab.nat.spec import PRESET_NAMES
from qlab.study import campaign, executors

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
WALL_CLOCK = {"campaign_id", "started_at"}  # the only fields a sim record takes from the machine


def _spawn(log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        return subprocess.Popen([str(DASK), *args], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A `dask scheduler` and two single-threaded `dask worker` processes, on loopback only."""
    info = tmp_path / "scheduler.json"
    procs = [_spawn(tmp_path / "scheduler.log", "scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--no-dashboard", "--scheduler-file", str(info))]
    try:
        address = _wait_for(lambda: info.is_file() and json.loads(info.read_text() or "{}").get("address"),
                            "the scheduler's address")
        workers = [_spawn(tmp_path / f"worker{i}.log", "worker", address, "--nthreads", "1", "--no-nanny",
                          "--no-dashboard", "--host", "127.0.0.1", "--name", f"w{i}") for i in range(2)]
        procs += workers
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address, workers
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


def _rerun_after_a_lost_worker(address: str) -> set[str]:
    """Tasks the scheduler sent to a worker a second time because the first one's worker was lost."""
    from distributed import Client

    def rerun(dask_scheduler) -> set[str]:
        starts: dict[str, int] = {}
        for key, _start, finish, *_ in dask_scheduler.transition_log:
            if finish == "processing":
                starts[str(key)] = starts.get(str(key), 0) + 1
        return {k for k, n in starts.items() if n > 1}

    with Client(address, timeout=30) as c:
        return set(c.run_on_scheduler(rerun))


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


def _same_trials(a: list[dict], b: list[dict]) -> None:
    assert [r["trial_id"] for r in a] == [r["trial_id"] for r in b]
    for x, y in zip(a, b, strict=True):
        differ = sorted(k for k in x.keys() | y.keys() if k not in WALL_CLOCK and x.get(k) != y.get(k))
        assert not differ, f"{x['trial_id']}: {differ}"


def test_a_dask_campaign_survives_a_killed_worker_and_matches_a_local_run(cluster, tmp_path):
    address, workers = cluster
    spec = dict(backend="sim", agent_nats=list(PRESET_NAMES), connector_nats=list(PRESET_NAMES), trials=2,
                samples=3, seed=7)
    killed: list[int] = []

    def kill_one_worker(rec: dict, seen: list[dict] = []) -> None:  # noqa: B006
        seen.append(rec)
        if len(seen) == 12 and not killed:  # 60 trials still to run: the worker is mid-trial
            os.killpg(workers[0].pid, signal.SIGKILL)
            killed.append(len(seen))

    on_dask = campaign.run(campaign.CampaignSpec(**spec, campaign_id="on-dask"), root=tmp_path, progress=False,
                           cluster=address, on_result=kill_one_worker)
    assert killed and workers[0].wait(timeout=10) == -signal.SIGKILL and workers[1].poll() is None
    assert _rerun_after_a_lost_worker(address), "the killed worker was running no trial"
    local = campaign.run(campaign.CampaignSpec(**spec, campaign_id="local"), root=tmp_path, progress=False,
                         workers=2)
    a, b = _records(on_dask), _records(local)
    assert len(a) == 72 and len({r["trial_id"] for r in a}) == 72  # nothing lost, nothing twice
    assert {r["outcome"] for r in a} != {"failed"} and not any(r["outcome"] == "failed" for r in a)
    _same_trials(a, b)


def test_kernel_lab_trials_fail_fast_on_a_cluster_without_the_netns_resource(cluster, tmp_path, capsys):
    address, _ = cluster
    t0 = time.monotonic()
    rc = qlab_main(["campaign", "run", "--backend", "netns", "--agent-nat", "full_cone", "--connector-nat",
                    "full_cone", "--trials", "1", "--cluster", address, "--results", str(tmp_path), "--id", "k"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and time.monotonic() - t0 < 5 and len(err) == 1
    assert err[0].startswith("qlab: no worker of the Dask cluster declares the netns resource")
    assert "--resources netns=1" in err[0]
    assert not (tmp_path / "k").exists()  # refused before anything was written


def test_a_worker_running_other_qlab_code_stops_the_campaign_recording_nothing(cluster, tmp_path, monkeypatch):
    address, _ = cluster
    real = executors.TrialKit.from_here
    monkeypatch.setattr(executors.TrialKit, "from_here",
                        lambda backend: dataclasses.replace(real(backend), code="0" * 16))
    s = campaign.CampaignSpec(agent_nats=["full_cone"], connector_nats=["full_cone"], trials=2, campaign_id="other")
    with pytest.raises(executors.ExecutorError, match="runs other qlab code"):
        campaign.run(s, root=tmp_path, progress=False, cluster=address)
    jsonl = tmp_path / "other" / "trials.jsonl"
    assert not jsonl.exists() or jsonl.read_text() == ""


def test_an_unreachable_scheduler_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "WORKER_WAIT_S", 2.0)
    rc = qlab_main(["campaign", "run", "--agent-nat", "full_cone", "--connector-nat", "full_cone", "--trials", "1",
                    "--cluster", "tcp://127.0.0.1:9", "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("qlab: cannot reach the Dask scheduler at tcp://127.0.0.1:9")


def test_a_local_cluster_runs_a_campaign_like_the_pool(tmp_path):
    spec = dict(backend="sim", agent_nats=["full_cone", "symmetric"], connector_nats=["port_restricted"], trials=2,
                samples=3, seed=3)
    a = campaign.run(campaign.CampaignSpec(**spec, campaign_id="lc"), root=tmp_path, progress=False, cluster="local",
                     workers=1)
    b = campaign.run(campaign.CampaignSpec(**spec, campaign_id="inline"), root=tmp_path, progress=False, workers=1)
    _same_trials(_records(a), _records(b))


def test_records_are_written_in_the_trials_order_and_kept_when_the_run_stops(tmp_path, monkeypatch):
    s = campaign.CampaignSpec(agent_nats=["full_cone"], connector_nats=["full_cone"], trials=4, campaign_id="order")
    todo = s.trial_specs()

    class Shuffled:
        """Finishes trials 2, 0, 3, then the driver is interrupted before trial 1 comes back."""

        def check(self, backend: str) -> None:
            pass

        def run(self, specs, kit):
            by_id = {t.trial_id: t for t in specs}
            for i in (2, 0, 3):
                yield executors.failed_record(by_id[todo[i].trial_id], RuntimeError("stand-in"))
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    monkeypatch.setattr(campaign, "make_executor", lambda *a, **k: Shuffled())
    with pytest.raises(KeyboardInterrupt):
        campaign.run(s, root=tmp_path, progress=False)
    written = [r["trial_id"] for r in _records(tmp_path / "order")]
    assert written == [todo[0].trial_id, todo[2].trial_id, todo[3].trial_id]


def test_a_kit_carries_the_drivers_certificates_and_calibration():
    kit = executors.TrialKit.from_here("sim")
    folder = Path(kit.certs_dir())
    assert {n for n, _ in kit.certs} <= {p.name for p in folder.iterdir()}
    assert all((folder / n).read_bytes() == data for n, data in kit.certs)
    backend = kit.backend("sim")
    assert backend is not None and kit.backend("netns") is None
    from qlab.backends.sim.calibrate import active

    assert backend.calibration is not None and backend.calibration.label == active().label


def test_the_campaign_notebook_runs_its_trials_on_a_local_cluster(tmp_path):
    """What a JupyterLab user does: the notebook's `cluster` parameter, under papermill's kernel."""
    from qlab.study.report import execute

    root = tmp_path / "results"
    execute("nat_campaign", tmp_path / "nb.ipynb", dict(
        agent_nats="full_cone", connector_nats="port_restricted,symmetric", trials=2, results_root=str(root),
        new_campaign_id="nb-dask", progress=False, cluster="local"))
    recs = _records(root / "nb-dask")
    assert len(recs) == 4 and all(r["as_expected"] for r in recs)


def test_ctrl_c_on_a_local_cluster_keeps_what_finished_and_resume_completes_it(tmp_path):
    """Ctrl-C reaches the whole process group, as in a terminal: exit 130 and one line, no worker's
    traceback, no process left; `resume` on the cluster runs exactly the rest."""
    jsonl = tmp_path / "cc" / "trials.jsonl"
    qlab = [sys.executable, "-m", "qlab.cli"]
    p = subprocess.Popen([*qlab, "campaign", "run", "--agent-nat", "all", "--connector-nat", "all", "--trials", "2",
                          "--samples", "3", "--id", "cc", "--cluster", "local", "--results", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        _wait_for(lambda: jsonl.is_file() and len(jsonl.read_text().splitlines()) >= 3, "three records", 60)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("interrupted: every finished trial is kept")
    _wait_for(lambda: subprocess.run(["pgrep", "-s", str(p.pid)], capture_output=True).returncode == 1,
              "the cluster's processes to end", 30)
    kept = len(jsonl.read_text().splitlines())
    assert kept < 72
    assert qlab_main(["campaign", "resume", "cc", "--cluster", "local", "--results", str(tmp_path)]) == 0
    ids = [r["trial_id"] for r in _records(tmp_path / "cc")]
    assert len(ids) == 72 == len(set(ids))
