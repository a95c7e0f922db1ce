"""MoDeGPT: training-free modular decomposition of a causal LM (METHODS.md section 1).

Each block is three *modules*, each a pair of matrices with at most a nonlinearity between them, and each is
shrunk inside so that its output on calibration data is reconstructed as well as possible:

- Type I, MLP (Nyström): keep the ``k`` intermediate channels ``J`` with the largest ridge leverage
  ``diag(C (C + λI)^-1)`` of the intermediate Gram ``C``; rows ``J`` of gate/up (fc1) survive and the down
  projection is solved in closed form, ``W_D' = W_D C[:, J] (C[J, J] + μ I)^-1``. The paper's solve has no
  ``μ``; ours (``solve_ridge``, relative to the mean diagonal of ``C[J, J]``) exists because the exact solve can
  fit the calibration windows (issue 13 saw it at 8 x 256 tokens on 8 layers); on SmolLM2 with 8 or 32 x 512
  tokens of the default mix the validation sweep chose μ = 0, the default. ``reconstruct=False`` is the ablation
  "MoDeGPT's selection, down columns copied".
- Type II, query/key (CR decomposition per head): dim ``j`` of a head scores ``sqrt((W_q^T C W_q)_jj (W_k^T C W_k)_jj)``
  (``C`` = Gram of the attention input, i.e. before RoPE), summed over the query heads sharing a KV head (GQA).
  Rotary partners ``(j, j + R/2)`` are kept or dropped together and keep their original frequency
  (``LayerSpec.rope_index``); since RoPE mixes the two dims of a pair by a position-dependent angle, a pair
  scores by its *pair energies*, ``sqrt((E_q[j] + E_q[j']) (E_k[j] + E_k[j']))`` — the bound on ``|q_pair . k_pair|``
  — rather than the sum of the two per-dim scores (our reading; equal when the two dims carry equal energy).
- Type III, value/output (SVD per KV group): the rank-``k`` minimiser of ``||X (W_V [W_O^h..] - W_V' [W_O'^h..])||``
  via ``C^1/2 W_V = U1 S1 V1^T`` then the SVD of the small ``S1 V1^T [W_O^h..] = U2 S2 V2^T``; with
  ``R = V1 S1^-1 U2_k``: ``W_V' = W_V R`` (stays in W_V's span, no ``C^-1/2`` needed), ``W_O' = S2_k V2_k^T``.

Global sparsity allocation: ``φ_i = L φ softmax(-s/ε)_i`` from the layer importance ``s_i = 1 - cos(in, out)``,
capped at ``max_sparsity`` with the excess redistributed; ``allocation="uniform"`` gives every layer ``φ``. The
allocation and the layer-by-layer driver are shared with the baselines (:mod:`leanfm.compress.base`).
Every module of a layer keeps the same fraction ``1 - φ_i`` of its inner width, so block parameters shrink by φ —
up to the alignment of widths (``width_multiple``: MLP widths of 32, head dims of 8), whose rounding the driver
carries from block to block so that the whole model still removes φ.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanfm.compress.base import HEAD_MULTIPLE, CompressionReport, LayerwiseConfig, cholesky_solve, compress_layerwise
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
from leanfm.config import option, register_method
from leanfm.errors import LeanfmError
from leanfm.models.adapters import AttentionLayout, get_adapter
from leanfm.models.compressed import LayerSpec, restructure_block

log = logging.getLogger(__name__)


@dataclass
class ModegptConfig(LayerwiseConfig):
    """Settings of a MoDeGPT run: the layer-wise ones plus the two ridges of Type I and the ablation switch."""

    ridge: float = option(1e-2, "λ of the ridge leverage scores, relative to the mean diagonal of C", cli=False)
    # μ = 0 (the paper's exact solve) won the validation sweep at 8 and 32 x 512 calibration tokens
    # (BENCHMARKS.md, MoDeGPT): 0.01 was within 2%, 0.1 and 1 were worse on every kind of text
    solve_ridge: float = option(0.0, "μ of the Type I (Nyström) solve, relative to the mean diagonal of C[J,J]")
    reconstruct: bool = option(True, "solve the down projection (False: the ablation that copies its columns)",
                               cli=False)

    def validate(self) -> None:
        super().validate()
        for name in ("ridge", "solve_ridge"):
            if getattr(self, name) < 0:
                raise LeanfmError(f"{name} {getattr(self, name)} is invalid; accepted: {name} >= 0")


def mlp_nystrom(gram: torch.Tensor, down: torch.Tensor, keep: int, ridge: float, solve_ridge: float = 0.0,
                reconstruct: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Type I. Returns kept channels ``J`` (sorted) and the new down weight ``[out, keep]``.

    ``gram`` is ``[m, m]`` (float64), ``down`` the torch weight ``[out, m]``. ``reconstruct=False`` returns the
    kept columns of ``down`` unchanged (the selection-only ablation).
    """
    m = gram.shape[0]
    if keep >= m:
        return torch.arange(m), down
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    leverage = torch.linalg.solve(gram + lam * torch.eye(m, dtype=gram.dtype), gram).diagonal()  # diag(C(C+λI)^-1)
    kept = leverage.topk(keep).indices.sort().values
    if not reconstruct:
        return kept, down[:, kept]
    sub = gram[kept][:, kept]  # C[J, J]  [keep, keep]
    mu = solve_ridge * sub.diagonal().mean().clamp_min(1e-12)
    solved = cholesky_solve(sub + mu * torch.eye(keep, dtype=gram.dtype), gram[kept])  # (C[J,J]+μI)^-1 C[J,:]
    return kept, (down.double() @ solved.T).to(down.dtype)  # W_D C[:,J] (C[J,J]+μI)^-1  [out, keep]


def _row_energy(weight: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """diag(W C W^T) for a torch weight ``[rows, in]``: the energy of each output row on calibration data."""
    w = weight.double()
    return ((w @ gram) * w).sum(-1).clamp_min(0)


def qk_select(wq: torch.Tensor, wk: torch.Tensor, gram: torch.Tensor, layout: AttentionLayout, keep: float,
              multiple: int = 1) -> tuple:
    """Type II. Scores ``sqrt(E_q E_k)`` summed over each KV group's query heads, then selection.

    Non-rotary dims score per dim; a rotary pair ``(j, j')`` scores with its pair energies
    ``sqrt((E_q[j] + E_q[j']) (E_k[j] + E_k[j']))``, split evenly between its two dims (the selection adds them).
    """
    hd, half = layout.head_dim, layout.rotary_dim // 2
    eq = _row_energy(wq, gram).view(layout.num_kv_heads, layout.group_size, hd)  # [KV, group, hd]
    ek = _row_energy(wk, gram).view(layout.num_kv_heads, 1, hd)  # [KV, 1, hd]
    score = (eq * ek).sqrt()  # [KV, group, hd]
    if half:
        pair_q = eq[..., :half] + eq[..., half : 2 * half]  # [KV, group, R/2]
        pair_k = ek[..., :half] + ek[..., half : 2 * half]  # [KV, 1, R/2]
        pair = (pair_q * pair_k).sqrt() / 2
        score[..., :half], score[..., half : 2 * half] = pair, pair
    return select_head_dims(score.sum(1), layout, keep, multiple)


def vo_svd(wv: torch.Tensor, bv: torch.Tensor | None, wo: torch.Tensor, gram: torch.Tensor,
           layout: AttentionLayout, keep: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Type III. New v weight ``[KV*keep, in]`` (+ bias) and o weight ``[out, H*keep]`` by per-group SVD.

    ``wv`` is the torch weight ``[KV*hd, in]``, ``wo`` ``[out, H*hd]``, ``gram`` ``[in, in]`` float64.
    """
    hd, group = layout.head_dim, layout.group_size
    eigvals, eigvecs = torch.linalg.eigh(gram)
    sqrt_gram = (eigvecs * eigvals.clamp_min(0).sqrt()) @ eigvecs.T  # C^1/2
    new_v, new_b, new_o = [], [], []
    for g in range(layout.num_kv_heads):
        w_v = wv[g * hd : (g + 1) * hd].double().T  # [in, hd]
        heads = range(g * group, (g + 1) * group)
        w_o = torch.cat([wo[:, h * hd : (h + 1) * hd].double().T for h in heads], dim=1)  # [hd, group*out]
        _, s1, v1t = torch.linalg.svd(sqrt_gram @ w_v, full_matrices=False)  # s1: [hd]
        u2, s2, v2t = torch.linalg.svd(s1[:, None] * v1t @ w_o, full_matrices=False)
        s1_inv = torch.where(s1 > s1.max() * 1e-10, 1.0 / s1, torch.zeros_like(s1))
        transform = v1t.T @ (s1_inv[:, None] * u2[:, :keep])  # R = V1 S1^-1 U2_k  [hd, keep]
        new_v.append((w_v @ transform).T)  # [keep, in]
        if bv is not None:
            new_b.append(bv[g * hd : (g + 1) * hd].double() @ transform)
        o_small = s2[:keep, None] * v2t[:keep]  # [keep, group*out]
        new_o.extend(o_small.view(keep, group, -1).unbind(1))  # per head [keep, out]
    v_weight = torch.cat(new_v).to(wv.dtype)
    v_bias = torch.cat(new_b).to(wv.dtype) if bv is not None else None
    o_weight = torch.cat([o.T for o in new_o], dim=1).to(wo.dtype)  # [out, H*keep]
    return v_weight, v_bias, o_weight


def compress_block(model: nn.Module, index: int, stats: BlockStats, keep: float, ridge: float,
                   solve_ridge: float = 0.0, reconstruct: bool = True, width_multiple: int = 1) -> LayerSpec:
    """Rewrite block ``index`` in place with MoDeGPT at keep fraction ``keep``; returns its spec.

    The MLP width is a multiple of ``width_multiple`` and the head width of ``min(8, width_multiple)``.
    """
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    p = qkv_params(adapter, block, layout)
    head_multiple = min(HEAD_MULTIPLE, width_multiple)
    dims, rope_index = qk_select(p["wq"], p["wk"], stats.attn_in, layout, 1.0 if adapter.normed_qk else keep,
                                 head_multiple)
    # one width for q/k and v (unequal head sizes push SDPA onto its ~4x slower math path) unless q/k are normed
    v_dim = vo_width_with_full_qk(parts, layout, keep, head_multiple) if adapter.normed_qk else dims.shape[1]
    width = mlp_width_for_budget(parts, layout, dims.shape[1], keep, width_multiple, v_width=v_dim)
    kept, down = mlp_nystrom(stats.mlp_mid, parts.mlp_out.weight.data, width, ridge, solve_ridge, reconstruct)
    mlp_in = gather_rows(parts.mlp_in, kept)
    q = gather_heads(p["wq"], p["bq"], dims, layout.head_dim, layout.num_heads)
    k = gather_heads(p["wk"], p["bk"], dims, layout.head_dim, layout.num_kv_heads)
    v = vo_svd(p["wv"], p["bv"], parts.o.weight.data, stats.attn_in, layout, v_dim)
    heads = (layout.num_heads, layout.num_kv_heads, layout.head_dim)
    spec = LayerSpec(len(kept), dims.shape[1], v_dim, rope_index, *heads)
    down_bias, o_bias = parts.mlp_out.bias, parts.o.bias
    restructure_block(model, index, spec)
    load_block_weights(model, index, mlp_in, (down, down_bias), q, k, (v[0], v[1]), (v[2], o_bias))
    return spec


def compress_modegpt(model: nn.Module, tokenizer: Any, config: ModegptConfig,
                     stream: BlockLoader | None = None) -> CompressionReport:
    """Compress ``model`` in place with MoDeGPT (the ``compress`` family's entry point). ``stream``: the
    model's blocks are read one at a time from its checkpoint (:func:`leanfm.compress.base.compress`)."""
    block_fn = functools.partial(compress_block, ridge=config.ridge, solve_ridge=config.solve_ridge,
                                 reconstruct=config.reconstruct, width_multiple=config.width_multiple)
    return compress_layerwise(model, tokenizer, config, "modegpt", block_fn, stream)


register_method("modegpt", "compress", ModegptConfig, compress_modegpt,
                description="MoDeGPT: modular decomposition (Nyström, CR, SVD) with global sparsity allocation",
                streams=True)
