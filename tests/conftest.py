"""Shared fixtures.

Most tests run on a tiny randomly initialised Llama (built here from a config,
with SmolLM2's real tokenizer) so they take seconds on a CPU; tests marked
`slow` use the real embedded SmolLM2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
SQUAD_DEV = SHARED_DATA / "squad" / "eval_dev.json"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("SEAL_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="SEAL_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer, read from the embedded GGUF (no weights are loaded)."""
    from transformers import AutoTokenizer

    from seal_agent.model.loader import embedded_gguf

    gguf = embedded_gguf("smollm2-135m-instruct")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.1,  # larger than usual so a few LoRA steps visibly lower the loss
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def _tiny_llama(tokenizer_dir: Path, out: Path, hidden: int, pad: bool = True) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        initializer_range=0.1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if pad else None,
    )
    torch.manual_seed(1234)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vllm_tiny_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """The tiny Llama 128 wide: heads of 32, the smallest vLLM's CPU attention takes (16 it refuses)."""
    return _tiny_llama(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama-128"), 128)


@pytest.fixture(scope="session")
def arc_tiny_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """The tiny Llama without a padding index. SmolLM2's pad token is its end token, and
    an embedding's padding row stays zero: with tied embeddings the tiny model could
    never learn to end a grid, which the ARC tests need it to (test-time training that
    solves a task)."""
    return _tiny_llama(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny-llama-arc"), 64, pad=False)


# A daemon under test: quick to take files, no schedules unless a test sets one.
DAEMON_SECTIONS = """
[inbox]
stable_s = 0.3
poll_s = 0.2
[schedule]
replay_check = ""
consolidate = ""
restem = ""
"""


def write_config(path: Path, model_base: str | Path, state_dir: Path, extra: str = "", mode: str = "merge",
                 engine: str = 'serve = "torch"') -> Path:
    """A config.toml for tests: tiny model, small budgets, the project's policies.
    `mode`: memory.mode; the tests written for the merge line and its gate pin it,
    those of the knowledge modules (test_modules.py) ask for "modules".
    `engine`: the [engine] section; the torch engine serves, as vLLM takes no
    tiny model with heads of 16 (tests/test_engine.py runs vLLM on one of its own)."""
    path.write_text(
        f"""
[paths]
state_dir = "{state_dir}"

[memory]
mode = "{mode}"

[model]
base = "{model_base}"

[policy]
dir = "{ROOT / 'policies'}"

[train]
# one example per step, so step counts are easy to state (packing has its own tests)
epochs = 2
batch_size = 1
pack_tokens = 0
compile = false  # compiling costs more than these tiny updates; test_inner_loop, test_bench and the real-model tests compile

[qa]
max_new_tokens = 8

[engine]
{engine}
{extra}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir) -> Path:
    return write_config(tmp_path / "config.toml", tiny_model_dir, tmp_path / "state")


@pytest.fixture
def tiny_cfg(tiny_config):
    """Loaded tiny config; self-edits short so random-model generation is quick."""
    from seal_agent.config import load_config

    return load_config(tiny_config)


@pytest.fixture
def squad_file(tmp_path) -> Path:
    """Two real SQuAD passages with their questions, as a SQuAD-style JSON file."""
    items = json.loads(SQUAD_DEV.read_text())[:2]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps([{k: it[k] for k in ("title", "context", "questions")} for it in items]))
    return path
