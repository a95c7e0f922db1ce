"""Training-free baselines run through the same engine, budget and checkpoint format as MoDeGPT.

``wanda-sp`` — an **ablation**, not a published baseline: Wanda's score ``|W| * ||X||`` on MoDeGPT's own
granularity (single q/k head dims). MLP channel ``j`` scores ``||a_j|| * sum_i |W_down[i, j]|``; a query/key
head dim scores the Wanda mass of its q and k rows (summed over the query heads of a KV group, rotary partners
together); a value/output dim scores ``||o_in_j|| * sum_i |W_o[i, j]|`` summed over the group. No
reconstruction. Its additive row mass ignores how q and k combine, which is why it loses badly (issue 13
measured the q/k scoring as ~90% of its gap to MoDeGPT); published Wanda-SP / FLAP prune whole heads and MLP
channels — that is :mod:`leanfm.compress.flap`, the baseline to compare with.

``svd-llm``: every Linear of a block is replaced by a rank-``r`` factorisation holding the same fraction of its
parameters, computed by activation-aware (whitened) truncated SVD as in SVD-LLM, without its optional
parameter-update step. SliceGPT itself is :mod:`leanfm.compress.slicegpt`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from leanfm.compress.base import (
    HEAD_MULTIPLE,
    CompressionReport,
    LayerwiseConfig,
    compress_layerwise,
    round_to_multiple,
)
from leanfm.compress.engine import BlockLoader, BlockStats
from leanfm.compress.surgery import (
    gather_heads,
    gather_rows,
    load_block_weights,
    mlp_width_for_budget,
    qkv_params,
    select_head_dims,
    vo_width_with_full_qk,
)
from leanfm.config import register_method
from leanfm.models.adapters import get_adapter
from leanfm.models.compressed import LayerSpec, LowRankLinear, dense_spec, restructure_block


@dataclass
class WandaSpConfig(LayerwiseConfig):
    """Settings of wanda-sp: the layer-wise ones only (no reconstruction, so no ridge)."""


@dataclass
class SvdLlmConfig(LayerwiseConfig):
    """Settings of svd-llm: the layer-wise ones only (the whitening ridge is fixed, see :func:`whitened_low_rank`)."""


def _wanda_rows(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Per output row: sum_i |W[row, i]| * ||X_i||."""
    return (weight.abs().double() * input_norm[None]).sum(-1)


def wanda_block(model: nn.Module, index: int, stats: BlockStats, keep: float, width_multiple: int = 1) -> LayerSpec:
    """Prune block ``index`` in place to keep fraction ``keep`` of each inner width; returns its spec (MLP width a
    multiple of ``width_multiple``, head width of ``min(8, width_multiple)``)."""
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    hd, group = layout.head_dim, layout.group_size
    x_norm = stats.attn_in.diagonal().clamp_min(0).sqrt()
    p = qkv_params(adapter, block, layout)
    q_score = _wanda_rows(p["wq"], x_norm).view(layout.num_kv_heads, group, hd).sum(1)
    k_score = _wanda_rows(p["wk"], x_norm).view(layout.num_kv_heads, hd)
    head_multiple = min(HEAD_MULTIPLE, width_multiple)
    dims, rope_index = select_head_dims(q_score + k_score, layout, 1.0 if adapter.normed_qk else keep, head_multiple)
    q = gather_heads(p["wq"], p["bq"], dims, hd, layout.num_heads)
    k = gather_heads(p["wk"], p["bk"], dims, hd, layout.num_kv_heads)
    # one width for q/k and v (unequal head sizes push SDPA onto its ~4x slower math path) unless q/k are normed
    v_dim = vo_width_with_full_qk(parts, layout, keep, head_multiple) if adapter.normed_qk else dims.shape[1]
    width = mlp_width_for_budget(parts, layout, dims.shape[1], keep, width_multiple, v_width=v_dim)
    mid_norm = stats.mlp_mid.diagonal().clamp_min(0).sqrt()
    mlp_score = mid_norm * parts.mlp_out.weight.abs().double().sum(0)
    kept = mlp_score.topk(width).indices.sort().values
    mlp_in = gather_rows(parts.mlp_in, kept)
    down = (parts.mlp_out.weight.data[:, kept], parts.mlp_out.bias)

    o_score = stats.o_in.diagonal().clamp_min(0).sqrt() * parts.o.weight.abs().double().sum(0)  # [H*hd]
    o_score = o_score.view(layout.num_kv_heads, group, hd).sum(1)  # [KV, hd]
    v_dims = o_score.topk(v_dim, dim=1).indices.sort(dim=1).values  # [KV, v_dim]
    v = gather_heads(p["wv"], p["bv"], v_dims, hd, layout.num_kv_heads)
    o_cols = torch.cat([h * hd + v_dims[h // group] for h in range(layout.num_heads)])
    o = (parts.o.weight.data[:, o_cols], parts.o.bias)

    spec = LayerSpec(len(kept), dims.shape[1], v_dim, rope_index, layout.num_heads, layout.num_kv_heads, hd)
    restructure_block(model, index, spec)
    load_block_weights(model, index, mlp_in, down, q, k, v, o)
    return spec


def _whitening_factor(gram: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of ``C + r I`` with the smallest ridge ``r`` (1e-6 of the mean diagonal, growing by 100x)
    that makes it positive definite: fewer calibration tokens than channels leave ``C`` singular."""
    scale = gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    for ridge in (1e-6, 1e-4, 1e-2):
        factor, info = torch.linalg.cholesky_ex(gram + ridge * scale * eye)
        if int(info) == 0:
            return factor
    raise FloatingPointError("Gram matrix is not positive definite even with ridge 1e-2")


def whitened_low_rank(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD (SVD-LLM's truncation-aware whitening).

    With ``C = X^T X = S S^T`` (Cholesky), the rank-``r`` ``W'`` minimising ``||X (W - W')^T||_F`` is
    ``U_r Σ_r V_r^T S^-1`` for ``W S = U Σ V^T``. Returns ``(down [r, in], up [out, r])``.
    """
    s = _whitening_factor(gram)  # lower triangular
    u, sigma, vt = torch.linalg.svd(weight.double() @ s, full_matrices=False)
    down = torch.linalg.solve_triangular(s, sigma[:rank, None] * vt[:rank], upper=False, left=False)  # Σ V^T S^-1
    return down.to(weight.dtype), u[:, :rank].to(weight.dtype)


def svd_block(model: nn.Module, index: int, stats: BlockStats, keep: float, width_multiple: int = 1) -> LayerSpec:
    """Factorise every Linear of block ``index`` to keep fraction ``keep`` of its parameters (uniform); ranks are
    multiples of ``min(8, width_multiple)`` (a rank is a GEMM width: 8 removes the slow shapes, and a
    32-multiple rank on SmolLM2's 192-row k/v would move a block's count by 10%)."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    attention_in = {adapter.qkv: parts.qkv} if parts.qkv is not None else {
        adapter.q: parts.q, adapter.k: parts.k, adapter.v: parts.v}
    linears: dict[str, tuple[nn.Linear, torch.Tensor]] = {}
    for path, projection in attention_in.items():
        assert path is not None and projection is not None  # the adapter names each projection the block has
        linears[path] = (projection, stats.attn_in)
    linears[adapter.o] = (parts.o, stats.o_in)
    linears.update({path: (lin, stats.mlp_in) for path, lin in zip(adapter.mlp_in, parts.mlp_in, strict=True)})
    linears[adapter.mlp_out] = (parts.mlp_out, stats.mlp_mid)
    spec = dense_spec(model, adapter, index)
    if keep >= 1 - 1e-3:
        return spec
    factors = {}
    for path, (linear, gram) in linears.items():
        size_in, size_out = linear.in_features, linear.out_features
        rank = round_to_multiple(keep * size_in * size_out / (size_in + size_out), min(HEAD_MULTIPLE, width_multiple),
                                 min(size_in, size_out))
        factors[path] = (rank, *whitened_low_rank(linear.weight.data, gram, rank), linear.bias)
    spec.low_rank = {path: f[0] for path, f in factors.items()}
    restructure_block(model, index, spec)
    with torch.no_grad():
        for path, (_, down, up, bias) in factors.items():
            low = cast(LowRankLinear, block.get_submodule(path))  # restructure_block factorised it
            low.down.weight.copy_(down)
            low.up.weight.copy_(up)
            if bias is not None:
                low.up.bias.copy_(bias)
    return spec


def compress_wanda_sp(model: nn.Module, tokenizer: Any, config: WandaSpConfig,
                      stream: BlockLoader | None = None) -> CompressionReport:
    """Prune ``model`` in place with wanda-sp (the ``compress`` family's entry point). ``stream``: the
    model's blocks are read one at a time from its checkpoint (:func:`leanfm.compress.base.compress`)."""
    block_fn = functools.partial(wanda_block, width_multiple=config.width_multiple)
    return compress_layerwise(model, tokenizer, config, "wanda-sp", block_fn, stream)


def compress_svd_llm(model: nn.Module, tokenizer: Any, config: SvdLlmConfig,
                     stream: BlockLoader | None = None) -> CompressionReport:
    """Factorise ``model`` in place with svd-llm (the ``compress`` family's entry point). ``stream``: the
    model's blocks are read one at a time from its checkpoint (:func:`leanfm.compress.base.compress`)."""
    block_fn = functools.partial(svd_block, width_multiple=config.width_multiple)
    return compress_layerwise(model, tokenizer, config, "svd-llm", block_fn, stream)


register_method("wanda-sp", "compress", WandaSpConfig, compress_wanda_sp,
                description="ablation: Wanda scores on single q/k head dims and channels, no reconstruction",
                streams=True)
register_method("svd-llm", "compress", SvdLlmConfig, compress_svd_llm,
                description="baseline: activation-whitened truncated SVD of every Linear (SVD-LLM)",
                streams=True)
