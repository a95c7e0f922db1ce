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
from typing import Any, Protocol, cast

import torch
from torch import nn

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


def run_block(block: nn.Module, inputs: list[torch.Tensor], kwargs: dict, in_place: bool = False) -> list[torch.Tensor]:
    """Outputs of ``block`` for every input batch; ``in_place`` writes them over ``inputs`` batch by batch (one
    copy of the calibration states instead of two) and returns that same list."""
    outputs = inputs if in_place else [torch.empty(0)] * len(inputs)
    with torch.no_grad():
        for index, hidden in enumerate(inputs):
            out = block(hidden, **block_kwargs(block, kwargs))
            outputs[index] = out[0] if isinstance(out, tuple) else out
    return outputs


def collect_stats(adapter: ArchAdapter, block: nn.Module, inputs: list[torch.Tensor], kwargs: dict,
                  keep_outputs: bool = True) -> tuple:
    """Run ``block`` on ``inputs`` while accumulating :class:`BlockStats`; returns ``(stats, outputs)``.

    The Grams are summed in place; ``keep_outputs=False`` drops each batch's output at once (``outputs`` is then
    None), for callers that rebuild the block and run the new one instead.
    """
    parts = adapter.parts(block)
    first_proj = parts.q or parts.qkv
    assert first_proj is not None  # a block has q or the fused qkv
    acc: dict[str, torch.Tensor] = {}

    def add(name: str, update: torch.Tensor) -> None:
        if name in acc:
            acc[name] += update  # in place: no second Gram-sized tensor per batch
        else:
            acc[name] = update

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
        if keep_outputs:
            outputs: list[torch.Tensor] | None = run_block(block, inputs, kwargs)
        else:
            outputs = None
            for hidden in inputs:
                run_block(block, [hidden], kwargs)
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs)
    stats = BlockStats(acc["attn_in"], acc["mlp_in"], acc["mlp_mid"], acc["o_in"], tokens, acc["o_in_sum"],
                       acc["mlp_mid_sum"])
    return stats, outputs


class BlockLoader(Protocol):
    """Where a driver's blocks come from: :class:`leanfm.models.streaming.BlockStream` reads each from the
    checkpoint when asked and lets it go again; ``None`` in the drivers means every block is resident."""

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int) -> None: ...


def load_block(model: nn.Module, index: int, loader: BlockLoader | None) -> nn.Module:
    """Block ``index`` of ``model``, read by ``loader`` first when the blocks stream."""
    return loader.load(index) if loader is not None else get_adapter(model).blocks(model)[index]


@torch.no_grad()
def layer_importance(model: nn.Module, calib: torch.Tensor, batch_size: int,
                     loader: BlockLoader | None = None) -> torch.Tensor:
    """Per-block importance s_i = mean over tokens of 1 - cos(block input, block output) (MoDeGPT sec. 3.4).

    Block by block on the captured block-0 inputs (the states are advanced in place), so that a streamed model
    needs one block at a time: ``loader`` reads block ``i`` and releases it once its outputs are computed. The
    replay gives each block the inputs and keyword arguments the model's own forward would (tested), and the
    sums run over the same batches in the same order.
    """
    inputs, kwargs = capture_block_inputs(model, calib, batch_size)
    count = len(get_adapter(model).blocks(model))
    sums = torch.zeros(count, dtype=torch.float64, device=calib.device)  # summed where the blocks run
    for i in progress(range(count), desc="importance"):
        block = load_block(model, i, loader)
        for b, x in enumerate(inputs):
            out = block(x, **block_kwargs(block, kwargs))
            y = out[0] if isinstance(out, tuple) else out
            sums[i] += (1 - nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum()
            inputs[b] = y
        if loader is not None:
            loader.release(i)
            return_freed_memory()
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


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
EAGER_THRESHOLD = 1 << 20


def release_memory_eagerly(threshold: int = EAGER_THRESHOLD) -> bool:
    """Make glibc give allocations of ``threshold`` bytes or more their own mappings, returned on ``free``.

    Why: glibc's mmap threshold is dynamic — after the first large free it rises to that size (up to 32 MiB), so
    every later Gram, decomposition workspace and activation below it comes from the heap and stays resident
    until trimmed; measured on SmolLM2 (issue 14), the transient peak of compressing one block was ~40-50 MB
    lower with a fixed 1 MiB threshold. Process-wide, so the command that owns the process calls it
    (``leanfm compress``), not the library. Returns False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def block_parameter_count(model: nn.Module) -> int:
    """Parameters inside the transformer blocks (what a compression ratio refers to)."""
    return sum(p.numel() for block in get_adapter(model).blocks(model) for p in block.parameters())
