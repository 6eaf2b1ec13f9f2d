"""What decodes tokens: the torch engine (the transformers model itself, with
our own decoding loop: model/generation.py) or vLLM (engine/vllm.py), chosen
per job by `model.engine` and `[engine] serve / generate` (config.engine_for).

Training stays in torch/peft either way. vLLM serves exactly what the
database says is live: the live version's weights, from a model directory
(`weights_dir`), and its knowledge modules as LoRA adapters per request.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


def weights_version(state, version: int) -> int:
    """The version whose weights `version` serves (a module version routes; it keeps its parent's weights)."""
    return state.weights_lineage(version)[-1]


def weights_dir(live, version: int) -> Path:
    """A model directory holding `version`'s weights, for an engine that loads
    weights from disk: the base checkpoint while no update changed the weights
    (every version of the modules line until a consolidation goes live), else
    the weights saved once under paths.models/versions/."""
    w = weights_version(live.state, version)
    if w == 0:
        return live.base_dir
    out = live.cfg.state_path("models") / "versions" / f"v{w:04d}"
    if (out / "config.json").is_file():
        return out
    model = live.model if live.version is not None and weights_version(live.state, live.version) == w \
        else live.build(version)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        live.tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved the weights of version %d for the engine: %s", w, out)
    return out


def check_ranks(cfg) -> None:
    """The adapters vLLM will be given must fit its slots: refused before it starts, naming the keys."""
    from ..errors import ConfigError

    for key, r in (("lora.r", cfg.lora.r), ("restem.lora_r", cfg.restem.lora_r)):
        if r > cfg.engine.max_lora_rank:
            raise ConfigError(f"{key} ({r}) is over engine.max_lora_rank ({cfg.engine.max_lora_rank}): vLLM "
                              "could not load those adapters; raise engine.max_lora_rank, or decode with torch "
                              '(engine.serve, engine.ask, engine.generate = "torch")')


def start_vllm(cfg, live, version: int):
    """A vLLM engine on `version`'s weights (EngineUnavailable, in one line, if it cannot start)."""
    from .vllm import VllmEngine

    check_ranks(cfg)
    path = weights_dir(live, version)
    return VllmEngine(path, live.tokenizer, cfg.engine, seed=cfg.model.seed,
                      label=f"version {weights_version(live.state, version)}'s weights ({path})")
