import dataclasses
from pathlib import Path

import pytest

from seal_agent.config import Config, load_config, to_dict
from seal_agent.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_toml_states_every_default():
    """config.toml documents every knob with its default value, but for the data sets: the
    code knows none, this repository's config names its own (SQuAD dev set, ARC tasks)."""
    shipped, defaults = to_dict(load_config(ROOT / "config.toml")), to_dict(Config())
    assert shipped["eval"].pop("data") == "../shared/data/squad/eval_dev.json"
    assert defaults["eval"].pop("data") == ""
    for key in ("data", "eval_data", "eval_solutions"):
        assert "../shared/data/arc/" in str(shipped["arc"].pop(key)) and not defaults["arc"].pop(key)
    assert shipped == defaults
    text = (ROOT / "config.toml").read_text()
    for section, values in to_dict(Config()).items():
        assert f"[{section}]" in text
        for key in values:
            assert f"\n{key} = " in text, f"{section}.{key} missing from config.toml"


def test_missing_default_config_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config()
    assert cfg.train.epochs == 10 and cfg.root == tmp_path


def test_explicit_missing_config_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "train.lr=0.01", "lora.target_modules=['q_proj']",
                             "model.base=/models/x", "train.max_grad_norm=2"])
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.01
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.model.base == "/models/x"
    assert cfg.train.max_grad_norm == 2.0 and isinstance(cfg.train.max_grad_norm, float)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "must be an integer"),
    ("train.epochs=1.5", "must be an integer"),
    ("model.use_chat_template=1", "true or false"),
    ("lora.target_modules=q_proj", "must be a list"),
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("nope.x=1", "unknown config section 'nope'"),
    ("epochs=1", "section.name"),
    ("train.epochs", "KEY=VALUE"),
    ("train.loss_on='some'", "must be one of"),
    ("policy.write_batch=0", "'policy.write_batch' must be at least 1, got 0"),
    ("qa.batch_size=-2", "'qa.batch_size' must be at least 1"),
    ("replay.attempts=0", "'replay.attempts' must be at least 1, got 0"),
    ("train.lr=-1", "'train.lr' must be above 0, got -1.0"),
    ("train.lr=0", "'train.lr' must be above 0, got 0.0"),
    ("train.lr=nan", "'train.lr' must be above 0, got nan"),
    ("lora.r=0", "'lora.r' must be at least 1, got 0"),
    ("lora.dropout=1", "'lora.dropout' must be at least 0 and below 1, got 1.0"),
    ("api.port=70000", "'api.port' must be between 0 and 65535, got 70000"),
    ("api.port=-1", "'api.port' must be between 0 and 65535, got -1"),
    ("inbox.max_bytes=-1", "'inbox.max_bytes' must be at least 1, got -1"),
    ("split.max_tokens=0", "'split.max_tokens' must be at least 1, got 0"),
    ("replay.max_forgetting=1.5", "'replay.max_forgetting' must be between 0 and 1, got 1.5"),
    ("api.default_max_tokens=600", r"api.default_max_tokens \(600\) is over api.max_tokens \(512\)"),
    ("split.min_tokens=500", r"split.min_tokens \(500\) is over split.max_tokens"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_config_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[train]\nepochs = 'ten'\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*train\.epochs"):
        load_config(path)
    path.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("override", [
    "train.lr=1e-9", "lora.r=1", "lora.dropout=0", "api.port=0", "api.port=65535", "inbox.max_bytes=1",
    "split.max_tokens=32", "split.min_tokens=0", "replay.max_forgetting=1", "replay.max_forgetting=0",
    "restem.promote_margin=-3", "restem.min_reward=-1",
])
def test_values_at_the_edge_of_their_domain_are_taken(override):
    key, value = override.split("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == float(value)


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[train]\nepochs = 3 # \xff\xfe latin-1\n")
    with pytest.raises(ConfigError, match=r"c\.toml: not UTF-8"):
        load_config(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(path)


def test_paths_resolve_against_config_dir_and_state_dir_override(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    path.parent.mkdir()
    path.write_text('[paths]\nstate_dir = "st"\n')
    cfg = load_config(path)
    assert cfg.state_dir == tmp_path / "sub" / "st"
    assert cfg.state_path("database") == tmp_path / "sub" / "st" / "state" / "seal.db"
    cfg = load_config(path, state_dir=tmp_path / "other")
    assert cfg.state_path("adapters") == tmp_path / "other" / "adapters"


def test_sections_are_independent_instances():
    a, b = Config(), Config()
    a.lora.target_modules.append("lm_head")
    assert "lm_head" not in b.lora.target_modules
    assert dataclasses.is_dataclass(a.train)
