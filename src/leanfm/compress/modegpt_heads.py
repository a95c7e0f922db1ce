"""``modegpt-heads``: a llama.cpp-compatible MoDeGPT variant (ours, issue 22; not in the MoDeGPT paper).

Full MoDeGPT shrinks every head's q/k dims (type II, with a per-group subset of RoPE frequencies) and v/o dims
(type III); llama.cpp cannot run either (its head size is one number for the model, RoPE covers the whole
head). This variant keeps MoDeGPT's MLP module (type I: ridge-leverage selection of intermediate channels and
the Nyström solve of the down projection, :func:`leanfm.compress.modegpt.mlp_nystrom`), its global sparsity
allocation and layer-by-layer driver, and replaces types II/III by a selection of *whole* heads, so every
compressed layer is expressible in GGUF (``deci``: per-layer head counts and MLP widths).

Attention, per layer (our reading, in MoDeGPT's spirit):

- Shape. A layer keeps ``n_kv`` of its KV groups and ``g`` query heads in each (so ``n_head % n_head_kv == 0``
  holds by construction). Among all ``(n_kv, g)`` the one whose attention parameters
  ``n_kv (2 g + 2) d D`` are nearest the layer's keep fraction of the dense attention is taken (MoDeGPT keeps
  the same fraction in every module of a layer); the MLP width then absorbs the rest of the layer's budget
  (a multiple of ``width_multiple``; the driver carries the rounding to the next block, as for MoDeGPT).
- Selection = Nyström on the output projection. The concatenated head outputs ``z`` (o_proj's input, Gram
  ``C``) play the role type I gives the MLP's intermediate: keeping the channel set ``J`` of some heads and
  solving ``W_O' = W_O C[:, J] (C[J, J] + μ I)^-1`` reconstructs ``W_O z`` with residual energy
  ``tr(W_O C W_O^T) - tr(A_J C[J, J]^-1 A_J^T)``, ``A = W_O C``. Heads are removed greedily, each step the one
  (first whole KV groups, then single query heads, no group below ``g``) whose removal leaves the most
  explained energy ``tr(A_J C[J, J]^-1 A_J^T)``; where two shapes have the same parameter count, the one
  explaining more wins. Type I scores channels by leverage alone because its solve is the same for any
  ``J``; heads are few (9 in SmolLM2), so the exact explained energy is affordable and uses ``W_O`` too.
- The kept heads' q/k/v rows are copied unchanged (their RoPE is untouched: whole heads, all frequencies);
  ``μ`` is MoDeGPT's ``solve_ridge`` for both solves (o_proj and the MLP's down projection).

Default ``solve_ridge = 0.001`` (MoDeGPT's own default is 0, the exact solve), chosen for 4-bit deployment on
validation windows (``python benchmarks/deploy.py --choose-ridge``: SmolLM2 at 0.3, 8 x 512 windows of the
``train`` split of Austen and the Python docs, neither calibration nor the eval windows; results/deploy_ridge.json).
Austen / pydocs perplexity through llama.cpp, μ = 0 -> 0.001 -> 0.01: bf16 51.6 / 27.4 -> 52.1 / 27.6 -> 55.0 /
29.4; q4_0 288 / 164 -> 61.9 / 40.1 -> 64.7 / 41.7; q4_1 468 / 209 -> 54.8 / 32.0 -> 57.1 / 31.5. The exact
solve fits the calibration Gram with weights whose errors cancel finely, and 4-bit rounding breaks that; a ridge
of 0.001 of the mean diagonal costs ~1% in float and makes the model survive quantization (0.01 costs ~7%).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanfm.compress.base import CompressionReport, cholesky_solve, compress_layerwise, round_to_multiple
from leanfm.compress.engine import BlockLoader, BlockStats
from leanfm.compress.modegpt import ModegptConfig, mlp_nystrom
from leanfm.compress.surgery import gather_rows, load_block_weights, qkv_params
from leanfm.config import option, register_method
from leanfm.models.adapters import AttentionLayout, get_adapter
from leanfm.models.compressed import LayerSpec, restructure_block


@dataclass
class ModegptHeadsConfig(ModegptConfig):
    """Settings of ``modegpt-heads``: MoDeGPT's; ``solve_ridge`` (both solves) defaults to 0.001 (module docstring)."""

    solve_ridge: float = option(0.001, "μ of the o_proj and down-projection solves, relative to the mean diagonal "
                                "of C[J,J] (0.001, chosen on validation: survives 4-bit quantization)")


def attention_shapes(layout: AttentionLayout) -> list[tuple[int, int]]:
    """Every ``(kept KV groups, query heads per group)`` a layer may keep."""
    return list(itertools.product(range(1, layout.num_kv_heads + 1), range(1, layout.group_size + 1)))


def nearest_shapes(layout: AttentionLayout, keep: float) -> list[tuple[int, int]]:
    """The shapes whose attention size ``n_kv (2 g + 2)`` (in units of ``d D``) is nearest ``keep`` of the full."""
    full = layout.num_kv_heads * (2 * layout.group_size + 2)
    shapes = attention_shapes(layout)
    gaps = [abs(n_kv * (2 * g + 2) - keep * full) for n_kv, g in shapes]
    best = min(gaps)
    return [shape for shape, gap in zip(shapes, gaps, strict=True) if gap <= best + 1e-9]


def explained(cross: torch.Tensor, gram: torch.Tensor, channels: torch.Tensor, ridge: float) -> float:
    """``tr(A_J (C[J, J] + μ I)^-1 A_J^T)`` with ``cross = A = W_O C`` ``[out, n]``: the energy of ``W_O z`` that
    the Nyström solve keeps when only channels ``J`` of ``z`` survive."""
    sub = gram[channels][:, channels]
    mu = ridge * sub.diagonal().mean().clamp_min(1e-12)
    a_j = cross[:, channels]  # [out, |J|]
    solved = cholesky_solve(sub + mu * torch.eye(len(channels), dtype=gram.dtype), a_j.T)  # [|J|, out]
    return float((a_j.T * solved).sum())


def _channels(heads: list[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])


def select_heads(cross: torch.Tensor, gram: torch.Tensor, layout: AttentionLayout, shape: tuple[int, int],
                 ridge: float) -> tuple[list[list[int]], float]:
    """Greedy removal down to ``shape``: whole KV groups first, then query heads (none below ``g`` per group).

    Returns the kept query heads of each kept group (ascending) and the explained energy of the result.
    """
    n_kv, per_group = shape
    kept = {g: list(range(g * layout.group_size, (g + 1) * layout.group_size)) for g in range(layout.num_kv_heads)}

    def score(groups: dict[int, list[int]]) -> float:
        heads = sorted(h for hs in groups.values() for h in hs)
        return explained(cross, gram, _channels(heads, layout.head_dim), ridge)

    while len(kept) > n_kv:
        drop = max(kept, key=lambda g: score({k: v for k, v in kept.items() if k != g}))
        del kept[drop]
    while any(len(heads) > per_group for heads in kept.values()):
        options = [(g, h) for g, heads in kept.items() if len(heads) > per_group for h in heads]
        g, h = max(options, key=lambda gh: score({**kept, gh[0]: [x for x in kept[gh[0]] if x != gh[1]]}))
        kept[g] = [x for x in kept[g] if x != h]
    groups = [kept[g] for g in sorted(kept)]
    return groups, score(kept)


def prune_heads(wo: torch.Tensor, gram: torch.Tensor, layout: AttentionLayout, keep: float, ridge: float,
                reconstruct: bool = True) -> tuple[list[list[int]], torch.Tensor]:
    """The kept heads per kept group and the o weight: reconstructed, ``W_O C[:, J] (C[J, J] + μ I)^-1``, or its
    kept columns when ``reconstruct`` is False (the selection-only ablation). All heads kept: ``W_O`` as is."""
    cross = wo.double() @ gram  # A = W_O C  [out, H*hd]
    found = [select_heads(cross, gram, layout, shape, ridge) for shape in nearest_shapes(layout, keep)]
    groups, _ = max(found, key=lambda item: item[1])
    channels = _channels([h for heads in groups for h in heads], layout.head_dim)
    if len(channels) == wo.shape[1] or not reconstruct:
        return groups, wo[:, channels]
    sub = gram[channels][:, channels]
    mu = ridge * sub.diagonal().mean().clamp_min(1e-12)
    solved = cholesky_solve(sub + mu * torch.eye(len(channels), dtype=gram.dtype), gram[channels])  # [|J|, n]
    return groups, (wo.double() @ solved.T).to(wo.dtype)  # [out, |J|]


def mlp_width(parts: Any, layout: AttentionLayout, heads: int, kv_heads: int, keep: float, multiple: int) -> int:
    """MLP width that brings the block to fraction ``keep`` of its weights once attention keeps ``heads`` query
    and ``kv_heads`` KV heads (a multiple of ``multiple``, at most the dense width)."""
    hidden, mid = parts.o.out_features, parts.mlp_out.in_features
    per_head = layout.head_dim * hidden
    mlp_per_channel = (len(parts.mlp_in) + 1) * hidden
    budget = keep * ((2 * layout.num_heads + 2 * layout.num_kv_heads) * per_head + mlp_per_channel * mid)
    width = (budget - (2 * heads + 2 * kv_heads) * per_head) / mlp_per_channel
    return round_to_multiple(width, multiple, mid)


def _rows(weight: torch.Tensor, bias: torch.Tensor | None, heads: list[int], hd: int) -> tuple:
    rows = _channels(heads, hd)
    return weight[rows], (bias[rows] if bias is not None else None)


def compress_block(model: nn.Module, index: int, stats: BlockStats, keep: float, ridge: float,
                   solve_ridge: float = 0.0, reconstruct: bool = True, width_multiple: int = 1) -> LayerSpec:
    """Rewrite block ``index`` in place: whole heads (Nyström on o_proj) and MoDeGPT type I on the MLP."""
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    block = adapter.blocks(model)[index]
    parts = adapter.parts(block)
    p = qkv_params(adapter, block, layout)
    groups, o_weight = prune_heads(parts.o.weight.data, stats.o_in, layout, keep, solve_ridge, reconstruct)
    heads = [h for hs in groups for h in hs]
    kv_heads = [h // layout.group_size for h in (hs[0] for hs in groups)]
    width = mlp_width(parts, layout, len(heads), len(kv_heads), keep, width_multiple)
    kept, down = mlp_nystrom(stats.mlp_mid, parts.mlp_out.weight.data, width, ridge, solve_ridge, reconstruct)
    mlp_in = gather_rows(parts.mlp_in, kept)
    hd = layout.head_dim
    q, k, v = (_rows(p["wq"], p["bq"], heads, hd), _rows(p["wk"], p["bk"], kv_heads, hd),
               _rows(p["wv"], p["bv"], kv_heads, hd))
    pairs = layout.rotary_dim // 2
    spec = LayerSpec(len(kept), hd, hd, [list(range(pairs)) for _ in kv_heads] if pairs else [], len(heads),
                     len(kv_heads), hd)
    down_bias, o_bias = parts.mlp_out.bias, parts.o.bias
    restructure_block(model, index, spec)
    load_block_weights(model, index, mlp_in, (down, down_bias), q, k, v, (o_weight, o_bias))
    return spec


def compress_modegpt_heads(model: nn.Module, tokenizer: Any, config: ModegptHeadsConfig,
                           stream: BlockLoader | None = None) -> CompressionReport:
    """Compress ``model`` in place with ``modegpt-heads`` (the ``compress`` family's entry point). ``stream``: the
    model's blocks are read one at a time from its checkpoint (:func:`leanfm.compress.base.compress`)."""
    block_fn = functools.partial(compress_block, ridge=config.ridge, solve_ridge=config.solve_ridge,
                                 reconstruct=config.reconstruct, width_multiple=config.width_multiple)
    return compress_layerwise(model, tokenizer, config, "modegpt-heads", block_fn, stream)


register_method("modegpt-heads", "compress", ModegptHeadsConfig, compress_modegpt_heads,
                description="ours: MoDeGPT type I on the MLP + whole-head selection (Nyström on o_proj), "
                            "exportable to llama.cpp GGUF",
                streams=True)
