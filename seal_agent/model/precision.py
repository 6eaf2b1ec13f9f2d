"""Running a fp32 model's matmuls in bf16 (or another compute dtype) on the CPU.

The live weights stay fp32 (merged LoRA deltas accumulate exactly); compute
runs under autocast, with the frozen weights held in the compute dtype for the
duration of a call: autocast caches casts only of weights that require grad
(and none under inference mode), so it would otherwise cast every frozen
matrix again at every forward (every decoded token, every training step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def autocast(dtype: torch.dtype, device: str = "cpu"):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=dtype)


@contextlib.contextmanager
def computing_in(model, dtype: torch.dtype) -> Iterator[None]:
    """Inference in `dtype`: every weight held in it, autocast on the model's device."""
    device = next(model.parameters()).device.type
    with weights_in(model, dtype), autocast(dtype, device):
        yield


@contextlib.contextmanager
def weights_in(model, dtype: torch.dtype, *, training: bool = False) -> Iterator[None]:
    """Hold the fp32 Linear weights of `model` in `dtype` inside the block.

    Matmuls are bit-identical to autocast's own casts. The fp32 tensors are put
    back afterwards, untouched. The input embedding stays fp32 (its lookup is
    not autocast); an output head tied to it gets a separate cast copy for the
    block. With `training`, weights that require grad (LoRA) are left to
    autocast; otherwise (inference) every Linear weight is held."""
    if dtype == torch.float32:
        yield
        return
    embedding = model.get_input_embeddings().weight
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding \
                and not (training and module.weight.requires_grad) and module.weight.dtype == torch.float32:
            saved.append((module.weight, module.weight.data))
            module.weight.data = module.weight.data.to(dtype)
    head = model.get_output_embeddings()
    untied = head is not None and head.weight is embedding and embedding.dtype == torch.float32 \
        and not (training and embedding.requires_grad)
    if untied:
        head.weight = torch.nn.Parameter(embedding.detach().to(dtype), requires_grad=False)
    try:
        yield
    finally:
        if untied:
            head.weight = embedding
        for param, data in saved:
            param.data = data


@dataclass(frozen=True)
class ByRows:
    """A compute dtype chosen per batch: `dtype` for batches of at least
    `min_rows` rows, float32 for fewer (where `dtype` is slower for them)."""

    dtype: torch.dtype
    min_rows: int

    def __str__(self) -> str:
        name = str(self.dtype).removeprefix("torch.")
        return f"{name} from {self.min_rows} rows, float32 below"


Precision = torch.dtype | ByRows


def batch_dtype(precision: Precision, rows: int) -> torch.dtype:
    """The compute dtype of a batch of `rows` rows."""
    if isinstance(precision, ByRows):
        return precision.dtype if rows >= precision.min_rows else torch.float32
    return precision
