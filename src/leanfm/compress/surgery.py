"""Block surgery shared by every training-free compressor: which rows survive, and copying them in.

MoDeGPT and the baselines differ only in how they *score and reconstruct*; reading q/k/v (fused or not),
choosing RoPE-paired head dims, sizing the MLP to the parameter budget and loading the new weights into a
restructured block are the same for all of them and live here.
"""

from __future__ import annotations

from typing import Any, TypedDict, cast

import torch
from torch import nn

from leanfm.models.adapters import ArchAdapter, AttentionLayout, get_adapter
from leanfm.models.compressed import CompressedAttention


def head_width(keep: float, head_dim: int, multiple: int = 1) -> int:
    """Kept q/k (and v) dims per head: ``keep * head_dim`` rounded to a multiple of ``multiple`` (even, so rotary
    pairs stay whole), at least one step and at most ``head_dim``."""
    step = max(1, multiple)
    return int(min(head_dim, max(step, step * round(keep * head_dim / step))))


def select_head_dims(score: torch.Tensor, layout: AttentionLayout, keep: float, multiple: int = 1) -> tuple:
    """Kept q/k dims per KV group from per-dim scores ``[KV, hd]``, rotary partners kept together.

    The width is :func:`head_width` (``multiple=1``: ``round(keep * hd)``, the unaligned rule). Returns
    ``(dims [KV, qk_dim], rope_index [KV][pairs])`` with dims ordered
    ``[kept pair firsts | their partners | kept non-rotary dims]`` (the :class:`CompressedAttention` layout).
    """
    hd, rot = layout.head_dim, layout.rotary_dim
    half = rot // 2
    if multiple > 1:
        width = head_width(keep, hd, multiple if multiple % 2 == 0 else 2 * multiple)
        n_pairs = min(half, round(keep * half))
        n_pass = max(0, min(hd - rot, width - 2 * n_pairs))
        n_pairs = (width - n_pass) // 2  # the non-rotary dims ran out: pairs fill the rest (hd - rot is even)
    else:
        width = max(2 if half else 1, round(keep * hd))
        n_pairs = min(half, max(1 if half else 0, round(keep * half)))
        n_pass = min(hd - rot, max(0, width - 2 * n_pairs))
    dims, rope_index = [], []
    for g in range(layout.num_kv_heads):
        pairs = (score[g, :half] + score[g, half:rot]).topk(n_pairs).indices.sort().values
        rest = (score[g, rot:].topk(n_pass).indices.sort().values + rot) if n_pass else torch.empty(0, dtype=torch.long)
        dims.append(torch.cat((pairs, pairs + half, rest)))
        rope_index.append(pairs.tolist())
    return torch.stack(dims), (rope_index if half else [])


def mlp_width_for_budget(parts: Any, layout: AttentionLayout, head_width: int, keep: float,
                         multiple: int = 1, v_width: int | None = None) -> int:
    """MLP width that makes the block keep fraction ``keep`` of its weights, given the chosen head width(s)
    (``head_width`` for q/k, ``v_width`` for v/o, default the same).

    Head widths move in steps of whole dims (pairs with RoPE), so the MLP absorbs the rounding; the width is a
    multiple of ``multiple`` (the remaining error is carried to the next block by
    :func:`leanfm.compress.base.compress`).
    """
    hidden, mid = parts.o.out_features, parts.mlp_out.in_features
    per_head_dim = (2 * layout.num_heads + 2 * layout.num_kv_heads) * hidden  # q, o and k, v weights
    mlp_per_channel = (len(parts.mlp_in) + 1) * hidden
    budget = keep * (per_head_dim * layout.head_dim + mlp_per_channel * mid)
    heads = per_head_dim // 2 * (head_width + (head_width if v_width is None else v_width))
    width = (budget - heads) / mlp_per_channel
    if multiple <= 1:
        return int(min(mid, max(1, round(width))))
    return int(min(mid, max(multiple, multiple * round(width / multiple))))


def vo_width_with_full_qk(parts: Any, layout: AttentionLayout, keep: float, multiple: int = 1) -> int:
    """v/o head width when q/k stay at full width (gemma3's q/k norms): V/O and the MLP keep one common
    fraction ``k'`` with ``qk + k' (vo + mlp) = keep (qk + vo + mlp)``; the MLP then absorbs the rounding.
    The width is :func:`head_width` of ``k'`` (a multiple of ``multiple``)."""
    hidden, mid, hd = parts.o.out_features, parts.mlp_out.in_features, layout.head_dim
    qk = vo = (layout.num_heads + layout.num_kv_heads) * hidden * hd
    mlp = (len(parts.mlp_in) + 1) * hidden * mid
    rest = (keep * (qk + vo + mlp) - qk) / (vo + mlp)
    return head_width(rest, hd, multiple)


class QKVParams(TypedDict):
    """q/k/v weights ``[rows, in]`` (always there) and biases (None where the projection has none)."""

    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    bq: torch.Tensor | None
    bk: torch.Tensor | None
    bv: torch.Tensor | None


def qkv_params(adapter: ArchAdapter, block: nn.Module, layout: AttentionLayout) -> QKVParams:
    """q/k/v weights ``[rows, in]`` and biases of a block, splitting a fused projection when needed."""
    parts = adapter.parts(block)
    wq, wk, wv = adapter.split_qkv(block, layout)
    if parts.qkv is not None:
        bias = parts.qkv.bias
        split = bias.view(layout.num_heads, 3, layout.head_dim) if bias is not None else None
        biases = [split[:, i].reshape(-1) if split is not None else None for i in range(3)]
    else:
        biases = [getattr(parts, n).bias for n in "qkv"]
    return {"wq": wq, "wk": wk, "wv": wv, "bq": biases[0], "bk": biases[1], "bv": biases[2]}


def gather_heads(weight: torch.Tensor, bias: torch.Tensor | None, dims: torch.Tensor, hd: int, heads: int) -> tuple:
    """Rows of ``weight`` for each head's kept ``dims`` (``dims[g]`` used by all heads of group g)."""
    group = heads // dims.shape[0]
    rows = torch.cat([h * hd + dims[h // group] for h in range(heads)])
    return weight[rows], (bias[rows] if bias is not None else None)


def gather_rows(linears: tuple[nn.Linear, ...], kept: torch.Tensor) -> list[tuple]:
    """``(weight, bias)`` of each Linear restricted to output rows ``kept`` (bias may be None)."""
    return [(lin.weight.data[kept], lin.bias.data[kept] if lin.bias is not None else None) for lin in linears]


def load_block_weights(model: nn.Module, index: int, mlp_in: list, down: tuple, q: tuple, k: tuple, v: tuple,
                       o: tuple) -> None:
    """Copy ``(weight, bias)`` pairs into a restructured block (biases may be None)."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    attention = cast(CompressedAttention, block.get_submodule(adapter.attn))  # restructure_block put it there
    targets = [*zip(parts.mlp_in, mlp_in, strict=True), (parts.mlp_out, down), (attention.q_proj, q),
               (attention.k_proj, k), (attention.v_proj, v), (attention.o_proj, o)]
    with torch.no_grad():
        for linear, (weight, bias) in targets:
            linear.weight.copy_(weight)
            if linear.bias is not None and bias is not None:
                linear.bias.copy_(bias)
