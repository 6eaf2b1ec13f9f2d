"""One owner per state directory: only it changes or repairs the state; readers read.

A real SQLite state, real adapter directories and the real command line (tiny model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from seal_agent.agent import SealAgent
from seal_agent.config import load_config
from seal_agent.memory.lock import StateBusy, StateLock, holder, running_pid

ROOT = Path(__file__).resolve().parent.parent


def cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "seal_agent", "--config", str(config), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def _mid_commit(agent: SealAgent) -> tuple[Path, Path]:
    """What the owner's adapter folder holds between its rename and its database commit:
    a version directory the database does not know yet, and a temp directory being written."""
    version = agent.log.path(1)
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    tmp = agent.log.root / ".tmp-v0002-abcdef12"
    tmp.mkdir()
    return version, tmp


def test_readers_never_repair_what_the_owner_is_writing(tiny_config):
    cfg = load_config(tiny_config)
    owner = SealAgent(cfg, role="daemon")
    owner.own()
    owner.live  # noqa: B018 - version 0 exists, as in any used state directory
    version, tmp = _mid_commit(owner)
    try:
        for args in (["status", "--json"], ["history", "--json"], ["ask", "Who led the Normans?", "--json"],
                     ["replay", "stats", "--json"], ["policy", "list", "--json"]):
            r = cli(tiny_config, *args)
            assert r.returncode == 0, (args, r.stderr)
            assert version.is_dir() and tmp.is_dir(), f"`seal-agent {' '.join(args)}` repaired the owner's folder"
        assert json.loads(cli(tiny_config, "status", "--json").stdout.splitlines()[-1])["pid"] == os.getpid()
        reader = SealAgent(load_config(tiny_config))  # a Python reader, in the same process even
        assert reader.history()[0]["version"] == 0 and version.is_dir() and tmp.is_dir()
        reader.close()
    finally:
        owner.close()

    # the next owner repairs: the temp directory goes, the uncommitted version is moved aside (never deleted)
    nxt = SealAgent(load_config(tiny_config))
    nxt.own()
    assert not tmp.exists() and not version.exists()
    [discarded] = list((nxt.log.root / "discarded").iterdir())
    assert (discarded / "manifest.json").read_text() == "{}"
    assert [e["kind"] for e in nxt.events(10)][-1] == "discard"
    nxt.close()


@pytest.mark.parametrize("args", [["learn", "NOTE"], ["rollback", "0"], ["policy", "rollback", "0"],
                                  ["restem", "--contexts", "1"]])
def test_commands_that_change_the_state_refuse_while_another_process_owns_it(tiny_config, tmp_path, args):
    note = tmp_path / "note.txt"
    note.write_text("The Normans were led by Rollo.")
    args = [str(note) if a == "NOTE" else a for a in args]
    cfg = load_config(tiny_config)
    with StateLock(cfg.state_dir, "daemon"):
        r = cli(tiny_config, *args)
        assert r.returncode == 1 and f"a seal-agent daemon (pid {os.getpid()}) owns" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert holder(cfg.state_dir) is None  # nothing left holding it


def test_schedule_run_is_queued_for_a_daemon_but_refused_under_a_command(tiny_config):
    cfg = load_config(tiny_config)
    with StateLock(cfg.state_dir, "`seal-agent learn`"):
        assert running_pid(cfg.state_dir) is None  # a command owns it, not a daemon: nothing to queue for
        r = cli(tiny_config, "schedule", "run", "consolidate")
        assert r.returncode == 1 and f"a seal-agent `seal-agent learn` (pid {os.getpid()}) owns" in r.stderr


def test_a_python_caller_of_learn_passes_through_the_same_guard(tiny_config, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("The Normans were led by Rollo.")
    cfg = load_config(tiny_config)
    first = SealAgent(cfg, role="`seal-agent learn`")
    first.own()
    second = SealAgent(load_config(tiny_config))
    with pytest.raises(StateBusy, match=rf"`seal-agent learn` \(pid {os.getpid()}\) owns"):
        second.learn(note)
    with pytest.raises(StateBusy):
        second.policy_rollback(0)
    first.close()
    assert second.learn(note).version == 1  # free again: the second takes it
    assert holder(cfg.state_dir)[1] == "Python process"
    second.close()
    assert holder(cfg.state_dir) is None
