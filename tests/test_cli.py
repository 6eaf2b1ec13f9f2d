"""The command line, in process (click's runner) and once as a real subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from seal_agent.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture
def note(tmp_path):
    p = tmp_path / "normans.txt"
    p.write_text("The Normans were led by Rollo. They settled in Normandy.")
    return p


def test_learn_ask_history_rollback_json(tiny_config, note, tmp_path):
    r = run("--config", tiny_config, "learn", note, "--json")
    assert r.exit_code == 0, r.output
    [doc] = jsonl(r.stdout)
    assert doc["document"] == str(note) and doc["passages"] == 1 and doc["version"] == 1
    assert {"chars", "items"} <= doc["self_edit"].keys() and doc["train_seconds"] > 0

    # global options also work after the subcommand
    r = run("ask", "Who led the Normans?", "--json", "--config", tiny_config, "--set", "qa.max_new_tokens=4")
    assert r.exit_code == 0, r.output
    [ans] = jsonl(r.stdout)
    assert ans["version"] == 1 and isinstance(ans["answer"], str)

    other = tmp_path / "other.txt"
    other.write_text("William won at Hastings in 1066.")
    assert run("--config", tiny_config, "learn", other).exit_code == 0

    r = run("--config", tiny_config, "history", "--json")
    rows = jsonl(r.stdout)
    assert [(x["version"], x["parent"], x["live"]) for x in rows] == [(0, None, False), (1, 0, False), (2, 1, True)]
    assert all({"version", "parent", "live", "documents", "created_at"} <= x.keys() for x in rows)

    r = run("--config", tiny_config, "rollback", "1")
    assert r.exit_code == 0 and "live version 2 -> 1" in r.stdout and "weights identical" in r.stdout
    rows = jsonl(run("--config", tiny_config, "history", "--json").stdout)
    assert [x["live"] for x in rows] == [False, True, False]
    r = run("--config", tiny_config, "history")
    assert r.exit_code == 0 and "normans" in r.stdout and "model versions" in r.stdout


def test_state_dir_option_keeps_instances_apart(tiny_config, note, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--config", tiny_config, "--state-dir", a, "learn", note).exit_code == 0
    assert (a / "adapters" / "knowledge" / "v0001").exists()
    assert jsonl(run("--config", tiny_config, "--state-dir", b, "history", "--json").stdout) == []
    r = run("--config", tiny_config, "--state-dir", b, "history")
    assert "no versions yet" in r.stdout


def test_user_mistakes_are_one_line_errors(tiny_config, tmp_path, note):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    r = run("--config", tiny_config, "learn", bad, note, "--json")
    assert r.exit_code == 1
    rows = jsonl(r.stdout)
    assert rows[0] == {"document": str(bad), "status": "error", "error": rows[0]["error"]}
    assert "not valid JSON" in rows[0]["error"]
    assert rows[1]["learned"] == 1  # the good file after it was still learned
    assert bad.read_text() == "{nope"  # nothing lost

    r = run("--config", tiny_config, "--set", "train.epochs=many", "history")
    assert r.exit_code == 1 and "train.epochs" in r.stderr and "Traceback" not in r.output
    r = run("--config", tiny_config, "rollback", "9")
    assert r.exit_code == 1 and "no version 9" in r.stderr
    r = run("--config", tiny_config, "learn", tmp_path / "missing.txt")
    assert r.exit_code == 1 and "no such file" in r.stderr
    r = run("--config", tmp_path / "nope.toml", "history")
    assert r.exit_code == 1 and "does not exist" in r.stderr
    r = run("--config", tiny_config, "ask", "  ")
    assert r.exit_code == 1 and "empty" in r.stderr


def test_malformed_policy_fails_at_start_naming_file_and_field(tiny_config, tmp_path):
    pol = tmp_path / "pols"
    pol.mkdir()
    (pol / "mine.toml").write_text('[chat]\nuser = "{passage}"\n[base]\nprompt = "{passage}"\n[sampling]\ntop_p = 5\n')
    r = run("--config", tiny_config, "--set", f"policy.dir='{pol}'", "--set", "policy.active='mine'", "history")
    assert r.exit_code == 1 and "mine.toml" in r.stderr and "sampling.top_p" in r.stderr


def test_console_script_runs_as_a_subprocess(tiny_config, note):
    exe = Path(sys.executable).parent / "seal-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "seal_agent"]
    proc = subprocess.run(cmd + ["--config", str(tiny_config), "learn", str(note), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["version"] == 1
    proc = subprocess.run(cmd + ["history", "--json", "--config", str(tiny_config)],
                          capture_output=True, text=True, timeout=300)
    assert [json.loads(line)["version"] for line in proc.stdout.splitlines()] == [0, 1]
    proc = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=60)
    for verb in ("learn", "ask", "history", "rollback"):
        assert verb in proc.stdout
