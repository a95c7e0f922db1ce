"""Structured-pruning baselines run through the same engine, budget and checkpoint format as MoDeGPT.

``wanda-sp``: Wanda's score ``|W| * ||X||`` aggregated over whole structures (FLAP / Wanda-SP style). MLP
channel ``j`` scores ``||a_j|| * sum_i |W_down[i, j]|``; a query/key head dim scores the Wanda mass of its
q and k rows (summed over the query heads of a KV group, rotary partners together); a value/output dim scores
``||o_in_j|| * sum_i |W_o[i, j]|`` summed over the group. The lowest-scoring structures are removed and the
survivors are kept as they are — no reconstruction, which is exactly what MoDeGPT adds.
"""

from __future__ import annotations

import torch
from torch import nn

from leanfm.compress.engine import BlockStats
from leanfm.compress.modegpt import (
    _gather_heads,
    load_block_weights,
    mlp_width_for_budget,
    qkv_params,
    select_head_dims,
)
from leanfm.compress.structure import LayerSpec, restructure_block
from leanfm.models.adapters import get_adapter


def _wanda_rows(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Per output row: sum_i |W[row, i]| * ||X_i||."""
    return (weight.abs().double() * input_norm[None]).sum(-1)


def wanda_block(model: nn.Module, index: int, stats: BlockStats, keep: float, ridge: float = 0.0) -> LayerSpec:
    """Prune block ``index`` in place to keep fraction ``keep`` of each inner width; returns its spec."""
    del ridge  # no solve in this baseline
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    hd, group = layout.head_dim, layout.group_size
    x_norm = stats.attn_in.diagonal().clamp_min(0).sqrt()
    p = qkv_params(adapter, block, layout)
    q_score = _wanda_rows(p["wq"], x_norm).view(layout.num_kv_heads, group, hd).sum(1)
    k_score = _wanda_rows(p["wk"], x_norm).view(layout.num_kv_heads, hd)
    dims, rope_index = select_head_dims(q_score + k_score, layout, keep)
    q = _gather_heads(p["wq"], p["bq"], dims, hd, layout.num_heads)
    k = _gather_heads(p["wk"], p["bk"], dims, hd, layout.num_kv_heads)

    width = mlp_width_for_budget(parts, layout, dims.shape[1], keep)
    mid_norm = stats.mlp_mid.diagonal().clamp_min(0).sqrt()
    mlp_score = mid_norm * parts.mlp_out.weight.abs().double().sum(0)
    kept = mlp_score.topk(width).indices.sort().values
    mlp_in = [(lin.weight.data[kept], lin.bias.data[kept] if lin.bias is not None else None) for lin in parts.mlp_in]
    down = (parts.mlp_out.weight.data[:, kept], parts.mlp_out.bias)

    o_score = (stats.o_in_sq.clamp_min(0).sqrt() * parts.o.weight.abs().double().sum(0))  # [H*hd]
    o_score = o_score.view(layout.num_kv_heads, group, hd).sum(1)  # [KV, hd]
    v_dim = dims.shape[1]  # one width for q/k and v: unequal head sizes push SDPA onto its ~4x slower math path
    v_dims = o_score.topk(v_dim, dim=1).indices.sort(dim=1).values  # [KV, v_dim]
    v = _gather_heads(p["wv"], p["bv"], v_dims, hd, layout.num_kv_heads)
    o_cols = torch.cat([h * hd + v_dims[h // group] for h in range(layout.num_heads)])
    o = (parts.o.weight.data[:, o_cols], parts.o.bias)

    spec = LayerSpec(len(kept), dims.shape[1], v_dim, rope_index, layout.num_heads, layout.num_kv_heads, hd)
    restructure_block(model, index, spec)
    load_block_weights(model, index, mlp_in, down, q, k, v, o)
    return spec
