"""vLLM's LoRA ops on a CPU, one matmul per adapter instead of one weight copy per token.

vLLM serves LoRA adapters on a CPU through PyTorch-native ops
(`vllm.lora.ops.torch_ops`): for every token of a batch they gather that
token's adapter matrices (`lora_weights[token_indices]`, a [tokens, rank,
hidden] copy per projection per layer per step) and multiply row by row. A
prompt of a few hundred tokens copies hundreds of megabytes per projection, so
a request with a module decodes many times slower than one without.

The ops here compute the same products grouped by adapter: the rows of each
adapter in the batch are multiplied by its matrices once, and rows with no
adapter (index -1) get no delta. Those rows get the adapter in the batch's last slot
under the gathering ops, since index -1 selects that slot. vLLM loads this
module in each of its processes as a general plugin (the
`vllm.general_plugins` entry point in pyproject.toml). It replaces the ops only
where its CPU punica wrapper calls them, and only for the pinned vLLM release
it was written against. `SEAL_VLLM_GROUPED_LORA=0` leaves vLLM's own ops.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

WRITTEN_FOR = "0.32.0"


def _grouped(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Row b of the result: inputs[b] @ weights[indices[b]].T, zero where indices[b] < 0."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    out = inputs.new_zeros(inputs.shape[0], weights.shape[1])
    for index in torch.unique(indices).tolist():
        if index < 0:
            continue
        rows = (indices == index).nonzero(as_tuple=True)[0]
        out.index_copy_(0, rows, inputs.index_select(0, rows) @ weights[index].to(dtype).T)
    return out


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = _grouped(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int,
                      slice_size: int, add_inputs: bool = True):
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


def _per_token(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs: bool = False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs: bool = False):
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, _per_token(lora_indices_tensor, seq_len_tensor),
                      slice_offset, slice_size, add_inputs)


OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice", "sgmv_shrink", "sgmv_expand", "sgmv_expand_slice")


def register() -> None:
    """The vLLM general plugin: put the grouped ops where vLLM's CPU punica wrapper calls them."""
    if os.environ.get("SEAL_VLLM_GROUPED_LORA", "1") == "0":
        return
    import vllm
    from vllm.lora.punica_wrapper import punica_cpu

    if vllm.__version__ != WRITTEN_FOR:
        log.warning("vLLM %s: the grouped CPU LoRA ops were written for %s; vLLM's own are used",
                    vllm.__version__, WRITTEN_FOR)
        return
    for name in OPS:
        setattr(punica_cpu, name, globals()[name])
