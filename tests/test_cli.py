"""The command line as people use it: tables by default and JSON on request, helps with defaults and
an example, and every user error one line with a non-zero exit, never a traceback.

Errors run the real `python -m qlab.cli.main` (a traceback is what the interpreter prints, so only a
real process shows it); output and helps run `main([...])` in-process, which is cheaper."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from qlab.cli import main as cli
from qlab.nat.spec import PRESET_NAMES
from tests.procs import QLAB

TINY = ["--trials", "1", "--samples", "5", "--workers", "1"]


def qlab(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*QLAB, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    """Exactly one line on stderr, a non-zero exit, no traceback; the line says what is wrong."""
    lines = r.stderr.splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def campaign_root(tmp_path_factory) -> Path:
    """One finished campaign `c2` of two cells, one trial each: a direct cell and a relay cell."""
    root = tmp_path_factory.mktemp("results")
    assert cli.main(["campaign", "run", "--agent-nat", "full_cone,symmetric", "--connector-nat", "symmetric",
                     "--id", "c2", "--results", str(root), *TINY]) == 0
    return root


# --- one line, non-zero, no traceback ------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (["trial", "--backend", "loopback"], ["loopback", "port_restricted"]),  # its defaults have NATs
    (["trial", "--agent-nat", "nat64"], ["--agent-nat", "symmetric_seq"]),  # lists the presets
    (["campaign", "run"], ["--agent-nat", "--connector-nat"]),  # never 1,080 trials by default
    (["campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--workers", "0"], ["--workers"]),
    (["campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--workers", "-2"], ["--workers"]),
    (["campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--trials", "0"], ["--trials"]),
    (["campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--trials", "1",
      "--results", "/proc/qlab-results"], ["/proc/qlab-results"]),
])
def test_bad_input_is_one_line(args, words):
    assert_one_line_error(qlab(*args), *words)


def test_a_file_as_results_root_is_one_line(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("")
    run = qlab("campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--trials", "1",
               "--results", str(f))
    assert_one_line_error(run, str(f), "Not a directory")
    assert_one_line_error(qlab("campaign", "ls", "--results", str(f)), str(f), "not a directory")


def test_loopback_refuses_nat_presets_before_any_trial(tmp_path):
    r = qlab("campaign", "run", "--backend", "loopback", "--agent-nat", "full_cone", "--connector-nat", "public",
             "--trials", "1", "--results", str(tmp_path))
    assert_one_line_error(r, "loopback", "full_cone")
    assert list(tmp_path.iterdir()) == []  # refused before a folder, let alone a failed trial


def test_reusing_an_id_with_other_settings_and_an_unknown_id_are_one_line(campaign_root):
    r = qlab("campaign", "run", "--agent-nat", "full_cone,symmetric", "--connector-nat", "symmetric",
             "--id", "c2", "--results", str(campaign_root), "--trials", "2", "--samples", "5")
    assert_one_line_error(r, "c2", "trials=1 (asked 2)")
    assert r.stdout == ""  # refused before the size line, which promises a run
    assert_one_line_error(qlab("campaign", "show", "c3", "--results", str(campaign_root)), "c3")


def test_errors_from_the_store_and_backends_are_one_line_in_process(monkeypatch, capsys, tmp_path):
    """What main catches, whatever raises it: a results store that cannot be written, a backend that
    cannot run here (a message of several lines still prints as one)."""
    from qlab.backends.base import BackendUnavailable
    from qlab.experiment import trial
    from qlab.study import campaign

    def unwritable(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    def unavailable(*a, **k):
        raise BackendUnavailable("the netns backend needs root\nor user namespaces")

    monkeypatch.setattr(campaign, "run", unwritable)
    assert cli.main(["campaign", "run", "--agent-nat", "public", "--connector-nat", "public", "--trials", "1",
                     "--results", str(tmp_path)]) == 2
    monkeypatch.setattr(trial, "run_trial", unavailable)
    assert cli.main(["trial"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"qlab: {tmp_path / 'ro'}: Permission denied",
                        "qlab: the netns backend needs root or user namespaces"]


def _wait_for_lines(path: Path, n: int, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached {n} lines")


def test_interrupting_run_and_resume_says_how_to_continue(tmp_path):
    """Ctrl-C (SIGINT) in `campaign run` and in `campaign resume`: exit 130, the way to continue, no
    traceback. 36 cells x 2 trials in one process outlast the first trial by far."""
    jsonl = tmp_path / "ci" / "trials.jsonl"
    for step, args in enumerate((["campaign", "run", "--agent-nat", "all", "--connector-nat", "all", "--id", "ci",
                                  "--trials", "2", "--samples", "5"], ["campaign", "resume", "ci"])):
        done = len(jsonl.read_text().splitlines()) if step else 0
        p = subprocess.Popen([*QLAB, *args, "--workers", "1", "--results", str(tmp_path)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            _wait_for_lines(jsonl, done + 1)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
        assert p.returncode == 130, err
        assert "Traceback" not in err and "`qlab campaign resume ci`" in err.splitlines()[-1], err
    assert len(jsonl.read_text().splitlines()) < 72  # the resume was interrupted too, not finished


# --- tables by default, JSON on request ----------------------------------------------------------


def test_trial_prints_a_table_and_json_on_request(capsys):
    assert cli.main(["trial", "--agent-nat", "full_cone", "--connector-nat", "symmetric", "--samples", "5"]) == 0
    out = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert out.startswith("trial ") and "full_cone -> symmetric" in out.splitlines()[0]
    assert "outcome          direct_wan (by peer-reflexive)" in out and "expected         D> (as expected)" in out, out
    # wan-20ms's 20 / 60 ms plus the shipped calibration's processing, which the table names
    assert "direct RTT p50   21.93 ms (n " in out and "relay RTT p50    63.99 ms (n " in out, out
    from qlab.backends.sim.cost import DEFAULT

    assert f"processing       calibration {DEFAULT.label}" in out
    assert "direct verified  yes" in out
    for flag in ("--json", "--compact"):  # --compact: the old name, kept working
        assert cli.main(["trial", "--agent-nat", "full_cone", "--connector-nat", "symmetric", "--samples", "5",
                         flag]) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1  # one line: a record per line, for machines
        rec = json.loads(out)
        assert rec["outcome"] == "direct_wan" and rec["rtt_direct_n"] > 0 and "path_events" in rec
    from qlab.cli.roles import trial_table

    faulted = {**rec, "failover_ms": 1517.0, "echo_gap_ms": None,
               "extra": {"fault": {"fault": "rebind", "path_after": "direct", "max_echo_gap_ms": 40.0, "qad_after": []}}}
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in trial_table(faulted).splitlines()[1:])
    assert rows["fault"] == "rebind: path_after direct, max_echo_gap_ms 40"  # scalars only
    assert rows["failover"] == "1517 ms" and rows["longest echo gap"] == "-"


def test_classify_prints_a_table_and_json_on_request(capsys):
    assert cli.main(["classify", "--nat", "symmetric_seq", "--profile", "lan"]) == 0
    out = capsys.readouterr().out
    assert "preset        symmetric_seq (configured symmetric_seq: correct)" in out, out
    assert "mapping       " in out and "observed      203.0.113." in out and "port mapping  none offered" in out
    assert cli.main(["classify", "--nat", "symmetric_seq", "--profile", "lan", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["preset"] == "symmetric_seq"


def test_campaign_ls_and_show_tables_and_json(campaign_root, capsys):
    assert cli.main(["campaign", "ls", "--results", str(campaign_root)]) == 0
    head, row = capsys.readouterr().out.splitlines()
    assert head.split() == ["id", "backend", "profile", "cells", "trials/cell", "done", "of", "finished", "started"]
    assert row.split()[:8] == ["c2", "sim", "wan-20ms", "2", "1", "2", "2", "yes"]
    assert cli.main(["campaign", "ls", "--results", str(campaign_root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["done"] == 2

    assert cli.main(["campaign", "show", "c2", "--results", str(campaign_root)]) == 0
    out = capsys.readouterr().out
    assert "backend   sim" in out and "trials    1 per cell, 2 done" in out and "seed      0" in out
    cells = {tuple(line.split()[:2]): line.split()[2:8] for line in out.splitlines()
             if line.split()[:1] and line.split()[0] in PRESET_NAMES}
    # N, direct, relay, failed, expected, as expected
    assert cells[("full_cone", "symmetric")] == ["1", "1", "0", "0", "D>", "1"], out
    assert cells[("symmetric", "symmetric")] == ["1", "0", "1", "0", "R", "1"], out
    assert "staying on the relay without punching (1 of 1)" in out
    assert cli.main(["campaign", "show", "c2", "--results", str(campaign_root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["trials_per_cell"] == 1 and shown["finished_at"]
    assert [(c["agent_nat"], c["direct"], c["relay"], c["failed"]) for c in shown["cells"]] == [
        ("full_cone", 1, 0, 0), ("symmetric", 0, 1, 0)]


def test_cell_summary_counts_every_outcome_and_the_commonest_reason():
    from qlab.cli.campaign import cell_summary

    def rec(outcome: str, reason: str = "", ttd: float | None = None) -> dict:
        return {"outcome": outcome, "reason": reason, "as_expected": outcome == "direct_wan", "expected": "D",
                "ttd_ms": ttd, "rtt_direct_p50_ms": None, "rtt_relay_p50_ms": 60.0}

    s = cell_summary(None, [rec("direct_wan", ttd=80.0), rec("direct_predicted", ttd=100.0), rec("relay", "x"),
                            rec("failed", "TimeoutError: no echo"), rec("failed", "TimeoutError: no echo")])
    assert (s["n"], s["direct"], s["relay"], s["failed"], s["as_expected"]) == (5, 2, 1, 2, 1)
    assert s["ttd_p50_ms"] == 90.0 and s["rtt_direct_p50_ms"] is None and s["expected"] == "D"
    assert s["top_reason"] == "TimeoutError: no echo (2 of 5)"


def test_table_aligns_numbers_and_trims_floats():
    from qlab.cli.table import table

    assert table(("cell", "rate", "n"), [("a", 0.666667, 3), ("bb", None, 12)]).splitlines() == [
        "cell  rate   n", "a     0.67   3", "bb       -  12"]


# --- helps ---------------------------------------------------------------------------------------


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every command's parser with its words (`campaign run`), depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _commands(sub, (*path, name))


def test_every_help_shows_defaults_and_an_example():
    for words, parser in _commands(cli.build_parser()):
        text = parser.format_help()
        assert "example:\n  qlab " in text or "example:\n  sudo qlab " in text, words
        options = [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
                   and not isinstance(a, argparse._HelpAction)]
        if any(a.default not in (None, False) for a in options):
            assert "(default: " in text, words
        if any(a.dest == "results" for a in options):
            assert "default: the project's results/ or $QLAB_RESULTS" in " ".join(text.split()), words


def test_trial_help_lists_the_presets_and_classify_offers_only_its_flags():
    helps = {" ".join(w): p.format_help() for w, p in _commands(cli.build_parser())}
    trial = " ".join(helps["trial"].split())
    assert all(name in trial for name in PRESET_NAMES)
    assert "--compact" not in trial and "--json" in trial
    for flag in ("--samples", "--scenario", "--echo-interval", "--punch-timeout", "--birthday", "--agent-nat",
                 "--blackhole", "--fault"):
        assert flag not in helps["classify"], flag
    for flag in ("--nat", "--intermediate", "--backend", "--profile", "--seed", "--certs", "--json"):
        assert flag in helps["classify"], flag


def test_verbose_shows_the_traceback_for_a_bug_report():
    r = qlab("-v", "trial", "--backend", "loopback")
    assert r.returncode != 0 and "Traceback" in r.stderr and "BackendUnavailable" in r.stderr


def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    """`qlab campaign ls | head -1`: the pipe closes, qlab stops quietly (141, as a shell reports SIGPIPE)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([*QLAB, "campaign", "ls", "--results", str(tmp_path)], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (r.returncode, r.stderr) == (141, "")


def test_the_probe_command_that_cloud_hosts_run_parses():
    """`qlab cloud run` starts `qlab probe` on each Agent host with a field NAT (not a preset) as
    --agent-nat: the parser must take it."""
    import shlex

    from qlab.cloud.runs import probe_command

    cmd = probe_command(host="agent-0", cell="managed", cells={"managed": {"service": "echo"}},
                        intermediate="198.51.100.7", campaign_id="c1", bucket="b", region="us-east-1", trials=3)
    args = cli.build_parser().parse_args(shlex.split(cmd)[1:])
    assert (args.command, args.agent_nat, args.trials) == ("probe", "aws_nat_gateway", 3)
