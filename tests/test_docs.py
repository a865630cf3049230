"""Every fenced code block in README.md and docs/*.md runs as written.

Info strings decide what a block is:
- `sh`, `bash`: run with `bash -e -o pipefail`;
- `console`: the lines starting with `$ ` (with their `\\` continuations) run as an `sh` block;
  the other lines are sample output and are not compared (timings and ids change every run);
- `python`: run in a fresh interpreter of the project's venv;
- `text` (layouts, diagrams, output samples): not run; `json`: parsed, not run.
A block without an info string fails: say what it is. Where the text after a block begins
"prints `X`", the block's output must contain X.

Every block runs in a temporary project (pyproject.toml, Makefile and the notebooks copied, `.venv`
linked), with `QLAB_RESULTS` in that folder and the venv's bin first on PATH. The comment on the
line above a block (invisible when rendered) marks the exceptions:
- `<!-- qlab-doc: root -->`: needs root and the kernel lab; runs in `test_root_block_runs`
  (marked netns: skipped without the lab, a failure when QLAB_REQUIRE_NETNS=1);
- `<!-- qlab-doc: aws tests/FILE.py::TEST -->`: needs an AWS account; not run here, the named test
  (against moto) covers it and must exist;
- `<!-- qlab-doc: skip: REASON -->`: recursive or too long to run here (`make test`, the full
  `make report`), with the reason.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"sh", "bash", "console", "python"}
STATIC = {"text", "json"}
BLOCK_TIMEOUT = 300.0
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARK = re.compile(r"^\s*<!--\s*qlab-doc:\s*(?P<kind>\w+):?\s*(?P<arg>.*?)\s*-->\s*$")
PRINTS = re.compile(r"^prints `(?P<out>[^`]+)`")

# Blocks that wait for a fix in a doc this file's owner may not edit: first line of the block -> the
# test that would fail. Not run meanwhile (an unmarked AWS block must not run); an entry whose
# block no longer needs it fails test_pending_entries_still_apply.
PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the project
    line: int  # the opening fence's line, 1-based
    info: str
    code: str
    mark: str  # "", "root", "aws", "skip"
    mark_arg: str
    prints: str = ""  # what the text after the block says it prints ("prints `...`")

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def extract(path: Path) -> list[Block]:
    """The fenced blocks of one markdown file, with the qlab-doc mark on the line above each."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        body = "\n".join(line[indent:] if not line[:indent].strip() else line for line in lines[i + 1:end])
        above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = MARK.match(above)
        below = PRINTS.match(next((line for line in lines[end + 1:] if line.strip()), ""))
        blocks.append(Block(str(path.relative_to(ROOT)), i + 1, opening["info"].strip().split(" ")[0],
                            body + "\n", mark["kind"] if mark else "", mark["arg"] if mark else "",
                            below["out"] if below else ""))
        i = end + 1
    return blocks


ALL = [b for doc in DOCS for b in extract(doc)]


def _script(block: Block) -> str:
    """What bash runs for a shell or console block."""
    if block.info != "console":
        return block.code
    commands, continuing = [], False
    for line in block.code.split("\n"):
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.endswith("\\")
    return "\n".join(commands) + "\n"


def project(tmp: Path) -> Path:
    """A throwaway copy of the project's top level for the blocks to run in."""
    work = tmp / "project"
    work.mkdir(parents=True)
    for name in ("pyproject.toml", "Makefile"):
        shutil.copy(ROOT / name, work / name)
    (work / "notebooks").mkdir()
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):  # not the sockets or checkpoints kernels leave
        shutil.copy(notebook, work / "notebooks" / notebook.name)
    for name in (".venv", "benchmarks"):
        (work / name).symlink_to(ROOT / name)
    return work


def run_block(block: Block, tmp: Path) -> subprocess.CompletedProcess[str]:
    work = project(tmp)
    shims = tmp / "shims"
    shims.mkdir()
    if os.geteuid() == 0 and shutil.which("sudo") is None:
        # as root `sudo X` is X; containers running the suite as root often have no sudo
        (shims / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
        (shims / "sudo").chmod(0o755)
    env = {**os.environ, "QLAB_RESULTS": str(work / "results"),
           "PATH": f"{ROOT / '.venv' / 'bin'}:{shims}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    env.pop("VIRTUAL_ENV", None)
    # a block that reaches for AWS by mistake gets a closed port on loopback, never the internet
    env.update(AWS_ENDPOINT_URL="http://127.0.0.1:9", AWS_ACCESS_KEY_ID="none", AWS_SECRET_ACCESS_KEY="none",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_CONFIG_FILE="/dev/null")
    if block.info == "python":
        script = tmp / "block.py"
        script.write_text(block.code)
        cmd = [str(ROOT / ".venv" / "bin" / "python"), str(script)]
    else:
        script = tmp / "block.sh"
        script.write_text(_script(block))
        cmd = ["bash", "-e", "-o", "pipefail", str(script)]
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)


def _check_ran(block: Block, tmp: Path) -> None:
    proc = run_block(block, tmp)
    assert proc.returncode == 0, (f"{block.id} ({block.info}) exited {proc.returncode}\n--- block\n{block.code}"
                                  f"--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}")
    assert block.prints in proc.stdout, f"{block.id}: the doc says it prints {block.prints!r}; it printed {proc.stdout!r}"


def _first_line(block: Block) -> str:
    return block.code.split("\n")[0]


def _params(blocks: list[Block], test: str) -> list:
    return [pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=f"pending {PENDING[_first_line(b)]}")]
                         if PENDING.get(_first_line(b)) == test else []) for b in blocks]


def _needs_label(b: Block) -> bool:
    return b.info not in RUN | STATIC


def _unmarked_command(b: Block) -> bool:
    return b.info in RUN and not b.mark


def test_pending_entries_still_apply():
    """Each PENDING entry names a block that still fails its test; fixed ones must leave the list."""
    still = {_first_line(b): test for b in ALL for test, fails in (("test_block_says_what_it_is", _needs_label(b)),
                                                                   ("test_block_runs", _unmarked_command(b))) if fails}
    stale = [line for line, test in PENDING.items() if still.get(line) != test]
    assert not stale, f"no longer pending (remove from PENDING): {stale}"


@pytest.mark.parametrize("block", _params(ALL, "test_block_says_what_it_is"))
def test_block_says_what_it_is(block):
    assert not _needs_label(block), f"{block.id}: info string {block.info!r}: one of {sorted(RUN | STATIC)}"
    assert block.mark in ("", "root", "aws", "skip"), f"{block.id}: unknown mark {block.mark!r}"
    assert not (block.mark and block.info in STATIC), f"{block.id}: a {block.mark} mark on a {block.info} block"
    assert block.mark != "skip" or len(block.mark_arg.split()) >= 5, f"{block.id}: skip without a reason"


def test_json_blocks_parse():
    for b in ALL:
        if b.info == "json":
            try:
                json.loads(b.code)
            except ValueError as exc:
                pytest.fail(f"{b.id}: {exc}")


def test_the_manifest_sample_has_the_keys_of_a_real_manifest(tmp_path):
    """docs/results.md shows a manifest: a campaign run now writes the same keys."""
    from qlab.study import campaign

    sample = next(json.loads(b.code) for b in ALL if b.doc == "docs/results.md" and b.info == "json"
                  and '"parameters"' in b.code)
    spec = campaign.CampaignSpec(agent_nats="full_cone", connector_nats="full_cone", trials=1, campaign_id="m")
    real = json.loads((campaign.run(spec, root=tmp_path, workers=1, progress=False) / "manifest.json").read_text())
    assert sorted(sample) == sorted(real)
    assert sorted(sample["parameters"]) == sorted(real["parameters"])


def test_aws_blocks_name_a_test_that_exists():
    for b in (b for b in ALL if b.mark == "aws"):
        file, _, name = b.mark_arg.partition("::")
        path = ROOT / file
        assert path.is_file() and name, f"{b.id}: the aws mark must name tests/FILE.py::TEST, not {b.mark_arg!r}"
        defined = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
        assert name in defined, f"{b.id}: {file} has no test {name}"


def test_run_block_fails_when_a_command_fails(tmp_path):
    """The runner is strict: a failing line in the middle of a block fails it (bash -e), and a
    console block runs its `$ ` lines, continuations included, and not its output lines."""
    failing = Block("x.md", 1, "sh", "true\nfalse\ntrue\n", "", "")
    assert run_block(failing, tmp_path / "a").returncode != 0
    console = Block("x.md", 1, "console", "$ echo one \\\n  two > out.txt\none two\n$ test -s out.txt\n", "", "")
    assert _script(console) == "echo one \\\n  two > out.txt\ntest -s out.txt\n"
    assert run_block(console, tmp_path / "b").returncode == 0


@pytest.mark.parametrize("block", _params([b for b in ALL if _unmarked_command(b)], "test_block_runs"))
def test_block_runs(block, tmp_path):
    _check_ran(block, tmp_path)


@pytest.mark.netns
@pytest.mark.parametrize("block", _params([b for b in ALL if b.mark == "root"], "test_root_block_runs"))
def test_root_block_runs(block, tmp_path, netns_ok):
    _check_ran(block, tmp_path)
