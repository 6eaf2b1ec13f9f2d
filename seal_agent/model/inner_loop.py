"""The inner loop: a short LoRA finetune on a self-edit's training sequences.

Written as a plain PyTorch loop rather than `transformers.Trainer` because the
update is tiny and latency is what matters: sequences are tokenized once, never
padded at batch size 1, and matmuls run in bf16 autocast where the CPU has it
(the LoRA weights and optimizer state stay fp32), and the model's repeated
blocks run compiled (`torch.compile`: the many small ops between the matmuls
are fused). The recipe is the paper's (AdamW, linear decay, grad-norm clip 1.0)
with every knob in `TrainConfig`.

A NaN or inf loss raises `TrainingDiverged`; the caller discards the adapter,
so the live weights are never touched by a diverged update.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import get_linear_schedule_with_warmup

from ..config import LoraConfig, TrainConfig
from ..errors import TrainingDiverged
from .generation import Decoder
from .precision import autocast, weights_in

log = logging.getLogger(__name__)


class Compilation:
    """What this process knows of compiling the model's blocks for training.

    Per process, not per model or learner: torch.compile keeps its graphs in
    the process (every later update's fresh adapter of the same shape reuses
    them, whichever learner trains it), and a toolchain that failed to compile
    once fails again, so after a failure every later update trains eagerly."""

    def __init__(self) -> None:
        self.compiled = False  # an update of this process compiled the blocks
        self.failure: str | None = None  # why compiling failed, if it did

    def fail(self, e: Exception) -> str:
        """Note why compiling failed (the error's first line) and return it."""
        self.failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return self.failure


COMPILATION = Compilation()


@dataclass(frozen=True)
class Example:
    """One training sequence: `prompt` is context, `completion` is what is learned.
    With loss_on = "all" the loss covers both."""

    prompt: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


@dataclass
class TrainStats:
    steps: int = 0
    tokens: int = 0  # tokens processed (all epochs)
    seconds: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        return self.epoch_losses[-1] if self.epoch_losses else None

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "epoch_losses": [round(x, 5) for x in self.epoch_losses],
            "final_loss": None if self.final_loss is None else round(self.final_loss, 5),
        }


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )


def attach_lora(model, cfg: LoraConfig, seed: int = 0) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter (in place; `unload()` undoes it exactly)."""
    torch.manual_seed(seed)
    return get_peft_model(model, peft_config(cfg))


def train_adapter(
    model, tokenizer, examples: list[Example], lora: LoraConfig, cfg: TrainConfig, *, seed: int = 0,
    compute_dtype: torch.dtype = torch.float32, append_eos: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[PeftModel, TrainStats]:
    """Attach a fresh adapter to `model` and train it. On any failure (a diverged
    loss included) the adapter is removed again, leaving `model` exactly as it was."""
    peft_model = attach_lora(model, lora, seed)
    try:
        stats = train(peft_model, tokenizer, examples, dataclasses.replace(cfg, seed=cfg.seed + seed),
                      compute_dtype=compute_dtype, append_eos=append_eos, on_step=on_step)
    except BaseException:
        peft_model.unload()
        raise
    return peft_model, stats


class Merged:
    """A trained adapter merged into its model's weights, reversibly.

    Answering with the merged weights costs what the plain model costs (no
    adapter matmuls) and gives exactly what the weights will give once kept.
    Until then `discard()` puts the very same weight tensors back (a merge
    cannot be undone exactly by subtraction), so a rejected update leaves the
    model bit for bit as it was; `keep()` drops the adapter, keeping the merge.
    Holding the originals costs a copy of the adapted weights (425 MB for
    SmolLM2-135M in fp32) until one of the two is called."""

    def __init__(self, peft_model: PeftModel):
        self.peft_model = peft_model
        self.kept = False
        self._originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            for module in peft_model.modules():
                if isinstance(module, BaseTunerLayer):
                    weight = module.get_base_layer().weight
                    self._originals.append((weight, weight.data))
                    weight.data = weight.data.clone()  # the merge writes into the copy
            with torch.no_grad():
                peft_model.merge_adapter()
        except BaseException:
            self.discard()
            raise

    def discard(self):
        """The model exactly as before the adapter (returned, as peft's `unload`)."""
        for weight, data in self._originals:
            weight.data = data
        self._originals = []
        return self.peft_model.unload()

    def keep(self):
        """The model with the adapter merged for good (returned)."""
        self._originals, self.kept = [], True
        return self.peft_model.unload()


@contextlib.contextmanager
def applied(model, adapter_dir) -> Iterator:
    """`model` with a stored adapter merged in for the block (`Merged`), and
    after it the very same weight tensors as before, bit for bit. A decoding
    engine (`Decoder`) gets the adapter as a request option instead."""
    if isinstance(model, Decoder):
        yield model.with_adapter(adapter_dir)
        return
    merged = Merged(PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False))
    try:
        yield model
    finally:
        merged.discard()


def tokenize(tokenizer, examples: list[Example], max_length: int, loss_on: str, append_eos: bool = False):
    """Each example -> (input_ids, labels) 1-D tensors; labels are -100 where no loss is taken."""
    out = []
    for ex in examples:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        if append_eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        labels = list(ids)
        if loss_on == "completion" and ex.prompt:
            n_prompt = len(tokenizer(ex.prompt, add_special_tokens=True)["input_ids"])
            labels[: min(n_prompt, len(labels))] = [-100] * min(n_prompt, len(labels))
        if len(ids) < 2 or all(x == -100 for x in labels[1:]):
            continue  # nothing to learn from
        out.append((torch.tensor(ids), torch.tensor(labels)))
    return out


def _rows(data, order: list[int], pack_tokens: int):
    """Group examples (in `order`) into rows: one each, or packed up to `pack_tokens`.
    A packed row restarts position ids at every example, which transformers turns
    into block-diagonal causal attention; the first label of each later example is
    masked so no example is trained to predict the next one's first token."""
    if pack_tokens <= 0:
        for i in order:
            yield data[i][0], data[i][1], None
        return
    current: list[int] = []
    size = 0
    for i in order + [None]:
        n = len(data[i][0]) if i is not None else 0
        if current and (i is None or size + n > pack_tokens):
            ids = torch.cat([data[j][0] for j in current])
            labels = torch.cat([data[j][1] for j in current])
            positions = torch.cat([torch.arange(len(data[j][0])) for j in current])
            starts = torch.cumsum(torch.tensor([len(data[j][0]) for j in current]), 0)[:-1]
            labels[starts] = -100
            yield ids, labels, positions
            current, size = [], 0
        if i is not None:
            current.append(i)
            size += n


class Batch(NamedTuple):
    ids: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None  # attention mask, for padded unpacked rows
    positions: torch.Tensor | None  # position ids, for packed rows
    tokens: int  # real (non-padding) tokens


def _batches(data, batch_size: int, generator: torch.Generator, pad_id: int, pack_tokens: int = 0):
    """One Batch per optimizer step, in a fresh random order each call (epoch)."""
    order = torch.randperm(len(data), generator=generator).tolist()
    rows = list(_rows(data, order, pack_tokens))
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        packed = chunk[0][2] is not None
        if len(chunk) == 1:
            ids, labels, pos = chunk[0]
            yield Batch(ids[None], labels[None], None, None if pos is None else pos[None], len(ids))
            continue
        width = max(len(ids) for ids, _, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (i, lab, pos) in enumerate(chunk):
            ids[row, : len(i)] = i
            labels[row, : len(lab)] = lab
            mask[row, : len(i)] = 1
            if packed:
                # Padding continues the last example's positions: it is never
                # attended to by real tokens (causal) and carries no labels.
                tail = torch.arange(pos[-1] + 1, pos[-1] + 1 + width - len(i))
                positions[row] = torch.cat([pos, tail])
        tokens = int(mask.sum())
        if packed:  # an attention mask would switch off packed-sequence detection
            yield Batch(ids, labels, None, positions, tokens)
        else:
            yield Batch(ids, labels, mask, None, tokens)


def compile_failure() -> str | None:
    """Why compiling the training step failed in this process (None: it has not)."""
    return COMPILATION.failure


def compiles_next(cfg: TrainConfig) -> bool:
    """Whether the next update compiles the blocks first (this process's first)."""
    return cfg.compile and COMPILATION.failure is None and not COMPILATION.compiled


def repeated_blocks(model) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of the classes transformers lists
    in `_no_split_modules` (LlamaDecoderLayer, ...)."""
    names = set(getattr(model.get_base_model(), "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


@contextlib.contextmanager
def compiled_blocks(model) -> Iterator[None]:
    """Inside the block, each of the model's repeated blocks runs compiled.

    All blocks run one compiled graph (same code; weights are its inputs), and
    so does every later update's fresh adapter of the same shape, so compiling
    happens once per process, and from inductor's on-disk cache after a
    machine's first time. Sequence lengths are symbolic."""
    blocks = repeated_blocks(model) if COMPILATION.failure is None else []
    if blocks and not COMPILATION.compiled:
        COMPILATION.compiled = True
        log.info("this process's first update compiles the model's blocks (about 20 s; 110 s on a machine's "
                 "first, before inductor's disk cache holds them)")
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


def train(
    model: PeftModel,
    tokenizer,
    examples: list[Example],
    cfg: TrainConfig,
    *,
    compute_dtype: torch.dtype = torch.float32,
    append_eos: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
) -> TrainStats:
    """Train the adapter attached to `model` on `examples`. Returns statistics.

    With `cfg.compile`, the blocks run compiled; if compiling fails, the adapter
    is put back as it was and trained eagerly (and so is every later one)."""
    data = tokenize(tokenizer, examples, cfg.max_length, cfg.loss_on, append_eos)
    if not data or cfg.epochs <= 0:
        return TrainStats()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if cfg.compile and COMPILATION.failure is None:
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        initial = {name: p.detach().clone() for name, p in params.items()}
        try:
            with compiled_blocks(model):
                return _train(model, data, pad_id, cfg, compute_dtype, on_step)
        except torch._dynamo.exc.TorchDynamoException as e:
            log.warning("compiling the training step failed (%s); training eagerly from now on "
                        "(set train.compile = false to skip the attempt)", COMPILATION.fail(e))
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(initial[name])
                    p.grad = None
    return _train(model, data, pad_id, cfg, compute_dtype, on_step)


def _train(model, data, pad_id: int, cfg: TrainConfig, compute_dtype: torch.dtype,
           on_step: Callable[[int, int, float], None] | None) -> TrainStats:
    stats = TrainStats()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_rows = sum(1 for _ in _rows(data, list(range(len(data))), cfg.pack_tokens))
    steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, total)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start = time.perf_counter()
    try:
        with weights_in(model, compute_dtype, training=True):
            for _epoch in range(cfg.epochs):
                epoch_loss, epoch_n = 0.0, 0
                for batch in _batches(data, cfg.batch_size, generator, pad_id, cfg.pack_tokens):
                    with autocast(compute_dtype, device.type):
                        out = model(
                            input_ids=batch.ids.to(device),
                            attention_mask=None if batch.mask is None else batch.mask.to(device),
                            position_ids=None if batch.positions is None else batch.positions.to(device),
                            labels=batch.labels.to(device),
                            use_cache=False,
                        )
                    loss = out.loss
                    if not torch.isfinite(loss):
                        raise TrainingDiverged(
                            f"training loss became {loss.item()} at step {stats.steps + 1}; "
                            "the update was abandoned (try a lower train.lr)"
                        )
                    loss.backward()
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats.steps += 1
                    stats.tokens += batch.tokens
                    epoch_loss += loss.item()
                    epoch_n += 1
                    if on_step:
                        on_step(stats.steps, total, loss.item())
                stats.epoch_losses.append(epoch_loss / max(epoch_n, 1))
            # The last optimizer step can blow the weights up after the last loss was seen.
            if not all(torch.isfinite(p).all() for p in params):
                raise TrainingDiverged("the adapter weights became NaN/inf; the update was abandoned (try a lower train.lr)")
    finally:
        model.eval()
        stats.seconds = time.perf_counter() - start
    return stats
