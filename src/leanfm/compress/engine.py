"""The layer-by-layer engine shared by the training-free compressors (MoDeGPT and the baselines).

Calibration activations are captured at the input of block 0, then each block in turn: its statistics are
accumulated (Gram matrices in float64, one block at a time), the method rewrites the block, and the
*compressed* block's outputs become the next block's inputs, so later layers correct for earlier errors.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from leanfm.models.adapters import PER_BLOCK, ArchAdapter, block_kwargs, get_adapter, layer_type_kwargs
from leanfm.progress import progress


class _CapturedError(Exception):
    pass


@dataclass
class BlockStats:
    """Calibration statistics of one block (float64; ``[in, in]`` Gram matrices summed over tokens)."""

    attn_in: torch.Tensor  # Gram of the attention input (after the input norm)
    mlp_in: torch.Tensor  # Gram of the MLP input (after its norm; the attention input for parallel blocks)
    mlp_mid: torch.Tensor  # Gram of the MLP's intermediate activations (input of the down projection)
    o_in: torch.Tensor  # Gram of the output projection's input (the concatenated head outputs)
    tokens: int
    # first moments (per-channel sums over tokens) of the same two inputs: with the Gram diagonals they give
    # each channel's mean and variance (FLAP's fluctuation metric and bias compensation)
    o_in_sum: torch.Tensor | None = None
    mlp_mid_sum: torch.Tensor | None = None


@torch.no_grad()
def capture_block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each calibration batch, and the keyword arguments blocks receive."""
    adapter = get_adapter(model)
    first = adapter.blocks(model)[0]
    inputs: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kw: dict) -> None:
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden)
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _CapturedError

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _CapturedError:
                pass
    finally:
        handle.remove()
    for key in ("cache", "past_key_values", "layer_past"):
        kwargs.pop(key, None)
    kwargs["use_cache"] = False
    if per_block := layer_type_kwargs(model, calib):  # gemma3: each layer's own mask and rotary (run_block)
        kwargs[PER_BLOCK] = per_block
    return inputs, kwargs


def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """Outputs of ``block`` for every input batch."""
    outputs = []
    with torch.no_grad():
        for hidden in inputs:
            out = block(hidden, **block_kwargs(block, kwargs))
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def collect_stats(adapter: ArchAdapter, block: nn.Module, inputs: list[torch.Tensor], kwargs: dict) -> tuple:
    """Run ``block`` on ``inputs`` while accumulating :class:`BlockStats`; returns ``(stats, outputs)``."""
    parts = adapter.parts(block)
    first_proj = parts.q or parts.qkv
    assert first_proj is not None  # a block has q or the fused qkv
    acc: dict[str, torch.Tensor] = {}

    def add(name: str, update: torch.Tensor) -> None:
        acc[name] = acc[name] + update if name in acc else update

    def gram(name: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # [tokens, features]
            add(name, (x.T @ x).double())
            if name in ("o_in", "mlp_mid"):
                add(f"{name}_sum", x.double().sum(0))

        return hook

    handles = [
        first_proj.register_forward_pre_hook(gram("attn_in")),
        parts.mlp_in[0].register_forward_pre_hook(gram("mlp_in")),
        parts.mlp_out.register_forward_pre_hook(gram("mlp_mid")),
        parts.o.register_forward_pre_hook(gram("o_in")),
    ]
    try:
        outputs = run_block(block, inputs, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs)
    stats = BlockStats(acc["attn_in"], acc["mlp_in"], acc["mlp_mid"], acc["o_in"], tokens, acc["o_in_sum"],
                       acc["mlp_mid_sum"])
    return stats, outputs


@torch.no_grad()
def layer_importance(model: nn.Module, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-block importance s_i = mean over tokens of 1 - cos(block input, block output) (MoDeGPT sec. 3.4)."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64, device=calib.device)  # summed where the blocks run
    handles = []
    for i, block in enumerate(blocks):
        def hook(_m: nn.Module, args: tuple, kw: dict, out: Any, i: int = i) -> None:
            x = args[0] if args else kw["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            sums[i] += (1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    # the decoder stack without the LM head: no [batch, T, vocab] logits to hold
    body = cast(PreTrainedModel, model).base_model
    try:
        for batch in progress(calib.split(batch_size), desc="importance"):
            body(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (sums / calib.numel()).float().cpu()


@torch.no_grad()
def copy_out_of_mapping(model: nn.Module) -> None:
    """Give every parameter and buffer of a CPU ``model`` its own memory, so replaced blocks can be freed.

    Why: transformers 5 loads safetensors weights as views of the file's memory map; every page a forward pass
    touches stays resident (``RssFile``) for as long as *any* view of the file lives — the embedding outlives
    every block — so the dense blocks stayed resident beside their compressed replacements (issue 14: RSS 512 MB
    after load, 1043 after the importance pass, 1191 after 3 blocks). Once copied, the mapping is unmapped and a
    replaced block's memory goes back to the system. Tied weights stay tied (one Parameter, copied once); values
    are copied exactly, so the compressed checkpoint is bit-identical.
    """
    for tensor in [*model.parameters(), *model.buffers()]:  # parameters() yields a tied weight once
        if tensor.device.type == "cpu":
            tensor.data = tensor.data.clone()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast(Callable[[int], int], ctypes.CDLL("libc.so.6").malloc_trim)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        return None


def return_freed_memory() -> None:
    """Hand memory freed by replaced blocks back to the system (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc raises its mmap threshold after large frees, so later weight-sized allocations come from the heap and
    their memory, once freed, stays in the process (RSS) unless trimmed.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def block_parameter_count(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (what a compression ratio refers to)."""
    return sum(p.numel() for block in get_adapter(model).blocks(model) for p in block.parameters())
