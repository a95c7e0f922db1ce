"""FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning", AAAI 2024): the published baseline.

What it removes: whole attention heads (their q/k/v rows and o_proj columns) and MLP intermediate channels
(their gate/up rows and down_proj columns). The kept weights are copied unchanged (no reconstruction).

The three parts of the method, as implemented here:

- Fluctuation metric (WIFV). For input channel ``j`` of o_proj / down_proj with weight ``W``,
  ``S_j = Var_tokens(x_j) * ||W[:, j]||^2`` (sample variance over all calibration tokens). As in the official
  code (``lib/prune.py``), the attention score is the *square* of this per-channel value.
- Adaptive structure search (AL-AM). Each layer's scores of each module are standardised, ``(S - mean) / std``
  over that layer's channels (the official code standardises the stacked ``[layers, channels]`` scores along
  the channel axis, i.e. per layer and module; ``standardize="all"`` uses one mean and std per module over all
  layers instead); a head scores the *mean* of its channels' standardised scores.
  All structures of all layers are then sorted together and the lowest ones removed, each costing its own
  parameter count, until the removed count is nearest to ``R x`` the block parameters (the official code picks
  the cut whose kept total is nearest the target).
- Bias compensation. The removed channels' mean contribution becomes a bias of o_proj / down_proj:
  ``b' = b + W[:, removed] @ mean(x[removed])``. Llama has no such bias, so the compressed checkpoint carries
  one (``LayerSpec.out_bias``).

Every layer is scored on the *dense* model's activations (one calibration pass, as FLAP does), then all layers
are pruned at once. Our reading where FLAP's code is silent or cannot apply:

- Grouped-query attention (SmolLM2: 9 query heads over 3 KV heads). :class:`CompressedAttention` needs the same
  number of query heads in every KV group, so with ``group > 1`` the removable unit is *one query head from
  every KV group* (the u-th lowest-scoring head of each group; unit score = mean of their head scores), costing
  ``num_kv_heads x (q rows + o columns)``; every group keeps at least one query head, so k/v are never removed.
  With multi-head attention (``group == 1``) the unit is one head with its q/k/v rows, as in FLAP.
- Every layer keeps at least one head unit and one MLP channel (FLAP's code would allow emptying a layer).
- The budget counts all block parameters (norms included, as every leanfm compressor's ``achieved_ratio``);
  the compensation biases added to llama layers (``2 x hidden`` per pruned layer) are not in the search.
- Statistics: the exact sample variance over tokens from the float64 first/second moments (the official code's
  running update is per sequence and skips the first one); calibration is the shared ``--calib-corpus`` windows,
  not FLAP's 1024 x 128 WikiText2 samples.
- ``allocation="uniform"``: every layer removes fraction R of its own parameters, heads vs channels chosen by
  the same standardised scores (FLAP's "UL" setting, but with the module split left to the scores).

Measured once (SmolLM2-135M, R = 0.3, 32 x 512 austen+pydocs windows, Austen perplexity over 20 windows):
al-am 113.4, uniform 113.0, al-am with ``standardize="all"`` 730.8 (it strips the early layers by 60-83%):
FLAP's per-layer standardisation is the sane default.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanfm.compress.base import (
    CompressionReport,
    LayerwiseConfig,
    calibration_for,
    calibration_record,
    check_architecture,
    on_device,
    record_ratios,
    round_to_multiple,
)
from leanfm.compress.engine import (
    block_parameter_count,
    capture_block_inputs,
    collect_stats,
    copy_out_of_mapping,
)
from leanfm.compress.surgery import load_block_weights, qkv_params
from leanfm.config import option, register_method
from leanfm.device import resolve_device
from leanfm.eval.harness import count_parameters
from leanfm.eval.speed import peak_rss_mb
from leanfm.models.adapters import AttentionLayout, BlockParts, get_adapter
from leanfm.models.compressed import LayerSpec, dense_spec, finalize, restructure_block
from leanfm.progress import progress

log = logging.getLogger(__name__)
ALLOCATIONS = ("al-am", "uniform")
SCOPES = ("layer", "all")


@dataclass
class FlapConfig(LayerwiseConfig):
    """Settings of FLAP: the shared calibration and ratio, FLAP's allocation and its bias compensation."""

    allocation: str = option("al-am", "al-am: one search over every layer's heads and MLP channels (FLAP); "
                             "uniform: every layer loses fraction R of its own parameters", choices=ALLOCATIONS)
    epsilon: float = option(0.1, "unused by flap (no softmax allocation)", cli=False)
    standardize: str = option("layer", "standardise scores per layer (FLAP's code) or over all layers",
                              choices=SCOPES)
    bias_compensation: bool = option(True, "turn the removed channels' mean output into a bias (FLAP)")


@dataclass
class Moments:
    """Per-channel mean and sample variance over the calibration tokens (float64)."""

    mean: torch.Tensor
    var: torch.Tensor


@dataclass
class LayerScores:
    """One layer's removable structures. Unit ``u`` removes query heads ``unit_heads[u]`` (their k/v too when
    ``drops_kv``, i.e. multi-head attention); ``unit_scores`` is non-decreasing, so units go in order."""

    unit_scores: torch.Tensor  # [U]
    unit_heads: list[list[int]]
    unit_cost: int
    mlp_scores: torch.Tensor  # [intermediate]
    mlp_cost: int
    drops_kv: bool


def channel_moments(gram: torch.Tensor, total: torch.Tensor, tokens: int) -> Moments:
    """Mean ``s/n`` and sample variance ``(G_jj - n mean_j^2) / (n - 1)`` from the Gram diagonal and the sums."""
    mean = total.double() / tokens
    var = (gram.diagonal().double() - tokens * mean**2) / max(tokens - 1, 1)
    return Moments(mean, var.clamp_min(0))


def fluctuation(var: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """WIFV score of each input channel of ``weight`` ``[out, in]``: ``Var(x_j) * ||W[:, j]||^2``."""
    return var.double() * weight.double().pow(2).sum(0)


def standardize(score: torch.Tensor) -> torch.Tensor:
    """``(S - mean(S)) / std(S)`` (unbiased std, as ``torch.std`` in FLAP's code); constant scores give 0."""
    return (score - score.mean()) / score.std().clamp_min(1e-12)


def head_units(head_scores: torch.Tensor, layout: AttentionLayout) -> tuple[torch.Tensor, list[list[int]]]:
    """Removal units of one layer, lowest first: single heads (MHA) or one head per KV group (GQA)."""
    if layout.group_size == 1:
        order = torch.sort(head_scores, stable=True).indices
        return head_scores[order], [[int(h)] for h in order]
    grouped = head_scores.view(layout.num_kv_heads, layout.group_size)
    ranked = torch.sort(grouped, dim=1, stable=True).indices  # [KV, group], lowest first within each group
    heads = ranked + torch.arange(layout.num_kv_heads)[:, None] * layout.group_size
    scores = grouped.gather(1, ranked).mean(0)  # unit u = the u-th lowest head of every group
    return scores, [sorted(int(h) for h in heads[:, u]) for u in range(layout.group_size)]


def structure_costs(parts: BlockParts, layout: AttentionLayout) -> tuple[int, int]:
    """Parameters freed by one head unit and by one MLP channel (weights and the biases they own)."""
    hidden, hd = parts.o.out_features, layout.head_dim
    if parts.qkv is not None:
        bias = {name: parts.qkv.bias is not None for name in "qkv"}
    else:
        bias = {name: getattr(parts, name).bias is not None for name in "qkv"}
    q, k, v = (hd * (hidden + bias[n]) for n in "qkv")
    o = hidden * hd
    unit = q + k + v + o if layout.group_size == 1 else layout.num_kv_heads * (q + o)
    mlp = sum(lin.in_features + (lin.bias is not None) for lin in parts.mlp_in) + parts.mlp_out.out_features
    return unit, mlp


def layer_scores(parts: BlockParts, layout: AttentionLayout, attention: torch.Tensor,
                 mlp: torch.Tensor) -> LayerScores:
    """One layer's head units and MLP channels from its standardised channel scores (heads: channel mean)."""
    head_scores = attention.view(layout.num_heads, layout.head_dim).mean(1)
    unit_scores, unit_heads = head_units(head_scores, layout)
    unit_cost, mlp_cost = structure_costs(parts, layout)
    return LayerScores(unit_scores, unit_heads, unit_cost, mlp, mlp_cost, layout.group_size == 1)


def score_layers(model: nn.Module, moments: list[tuple[Moments, Moments]], scope: str) -> list[LayerScores]:
    """FLAP's scores of every layer: attention channels ``WIFV^2`` (FLAP squares it), MLP channels ``WIFV``,
    standardised per layer and module (``scope="layer"``, FLAP's code) or over all layers of a module
    (``scope="all"``)."""
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    parts = [adapter.parts(block) for block in adapter.blocks(model)]
    attention = [fluctuation(o.var, p.o.weight) ** 2 for p, (o, _) in zip(parts, moments, strict=True)]
    mlp = [fluctuation(m.var, p.mlp_out.weight) for p, (_, m) in zip(parts, moments, strict=True)]
    if scope == "all":
        attention = list(standardize(torch.cat(attention)).split([a.numel() for a in attention]))
        mlp = list(standardize(torch.cat(mlp)).split([m.numel() for m in mlp]))
    else:
        attention, mlp = [standardize(a) for a in attention], [standardize(m) for m in mlp]
    return [layer_scores(p, layout, a, m) for p, a, m in zip(parts, attention, mlp, strict=True)]


def global_search(scores: torch.Tensor, costs: torch.Tensor, budget: float) -> torch.Tensor:
    """Remove the lowest-scoring structures, in score order, until the removed cost is nearest ``budget``.

    Returns a boolean mask of the removed entries. Ties keep their listed order (a stable sort), so units
    listed in removal order are removed as a prefix.
    """
    order = torch.sort(scores, stable=True).indices
    removed = torch.cat((torch.zeros(1, dtype=torch.float64), costs[order].double().cumsum(0)))
    count = int((removed - budget).abs().argmin())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def _candidates(layer: LayerScores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores, costs and MLP channel ids of a layer's removable structures: all head units but the last, then
    every MLP channel but the best one (a layer keeps >= 1 unit and >= 1 channel)."""
    channels = torch.arange(layer.mlp_scores.numel())
    channels = channels[channels != int(layer.mlp_scores.argmax())]
    units = layer.unit_scores[:-1]
    scores = torch.cat((units, layer.mlp_scores[channels]))
    costs = torch.cat((torch.full((units.numel(),), layer.unit_cost), torch.full((channels.numel(),),
                                                                                 layer.mlp_cost)))
    return scores, costs, channels


def plan_removal(layers: list[LayerScores], budgets: list[float], per_layer: bool) -> list[tuple[int, torch.Tensor]]:
    """For each layer, ``(head units removed, removed MLP channel mask)``: one search over all layers against
    ``sum(budgets)`` (AL-AM), or one search per layer against its own budget (``per_layer``)."""
    found = [_candidates(layer) for layer in layers]
    if per_layer:
        masks = [global_search(s, c, b) for (s, c, _), b in zip(found, budgets, strict=True)]
    else:
        flat = global_search(torch.cat([s for s, _, _ in found]), torch.cat([c for _, c, _ in found]),
                             sum(budgets))
        masks = list(flat.split([s.numel() for s, _, _ in found]))
    plan = []
    for layer, (_, _, channels), mask in zip(layers, found, masks, strict=True):
        units = layer.unit_scores.numel() - 1
        mlp_removed = torch.zeros(layer.mlp_scores.numel(), dtype=torch.bool)
        mlp_removed[channels[mask[units:]]] = True
        plan.append((int(mask[:units].sum()), mlp_removed))
    return plan


def align_mlp(layers: list[LayerScores], plan: list[tuple[int, torch.Tensor]],
              multiple: int) -> list[tuple[int, torch.Tensor]]:
    """The plan with every layer's kept MLP width a multiple of ``multiple`` (heads are whole already).

    Layer by layer, the kept count plus the channels carried from earlier layers' rounding is rounded to the
    multiple and the layer keeps its best-scoring channels (the search removed lowest scores first, so the
    kept set only changes at its boundary). A layer left dense stays dense.
    """
    if multiple <= 1:
        return plan
    aligned, carry = [], 0.0
    for layer, (units, removed) in zip(layers, plan, strict=True):
        width = removed.numel()
        wanted = width - int(removed.sum()) + carry
        kept = round_to_multiple(wanted, multiple, width)
        carry = wanted - kept
        order = torch.sort(layer.mlp_scores, descending=True, stable=True).indices
        now_removed = torch.ones(width, dtype=torch.bool)
        now_removed[order[:kept]] = False
        aligned.append((units, now_removed))
    return aligned


def _compensated(linear: nn.Linear, removed: torch.Tensor, mean: torch.Tensor, on: bool) -> torch.Tensor | None:
    """``b + W[:, removed] @ mean[removed]`` (FLAP's bias compensation), or the old bias when off."""
    if not on:
        return linear.bias.data if linear.bias is not None else None
    extra = linear.weight.data.double()[:, removed] @ mean[removed]
    old = linear.bias.data.double() if linear.bias is not None else 0.0
    return (old + extra).to(linear.weight.dtype)


def prune_block(model: nn.Module, index: int, heads: list[int], kv_heads: list[int], mlp_keep: torch.Tensor,
                moments: tuple[Moments, Moments], compensate: bool) -> LayerSpec:
    """Keep query heads ``heads``, KV heads ``kv_heads`` and MLP channels ``mlp_keep`` (bool) of block ``index``,
    moving the removed channels' mean output into the o / MLP-output biases when ``compensate``."""
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    parts = adapter.parts(adapter.blocks(model)[index])
    hd = layout.head_dim
    p = qkv_params(adapter, adapter.blocks(model)[index], layout)

    def rows(kept: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in kept])

    q_rows, kv_rows = rows(heads), rows(kv_heads)
    o_removed = torch.ones(parts.o.in_features, dtype=torch.bool)
    o_removed[q_rows] = False
    changed = bool(o_removed.any() or not mlp_keep.all())
    mlp_in = [(lin.weight.data[mlp_keep], lin.bias.data[mlp_keep] if lin.bias is not None else None)
              for lin in parts.mlp_in]
    o_in, mid = moments
    down = (parts.mlp_out.weight.data[:, mlp_keep], _compensated(parts.mlp_out, ~mlp_keep, mid.mean, compensate))
    o = (parts.o.weight.data[:, q_rows], _compensated(parts.o, o_removed, o_in.mean, compensate))

    def take(weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor) -> tuple:
        return weight[kept], bias[kept] if bias is not None else None

    full = dense_spec(model, adapter, index)
    spec = dataclasses.replace(full, intermediate=int(mlp_keep.sum()), num_heads=len(heads),
                               num_kv_heads=len(kv_heads), rope_index=full.rope_index[: len(kv_heads)],
                               out_bias=compensate and changed)
    restructure_block(model, index, spec)
    load_block_weights(model, index, mlp_in, down, take(p["wq"], p["bq"], q_rows),
                       take(p["wk"], p["bk"], kv_rows), take(p["wv"], p["bv"], kv_rows), o)
    return spec


@torch.no_grad()
def fluctuation_pass(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[tuple[Moments, Moments]]:
    """Per block, the moments of o_proj's and the MLP output's inputs, on the *dense* model's activations."""
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    inputs, kwargs = capture_block_inputs(model, calib, batch_size)
    found = []
    for block in progress(blocks, desc="flap statistics", total=len(blocks)):
        stats, inputs = collect_stats(adapter, block, inputs, kwargs)  # dense outputs feed the next block
        assert stats.o_in_sum is not None and stats.mlp_mid_sum is not None  # collect_stats always sums them
        found.append((channel_moments(stats.o_in, stats.o_in_sum, stats.tokens),
                      channel_moments(stats.mlp_mid, stats.mlp_mid_sum, stats.tokens)))
    return found


def _block_sizes(model: nn.Module) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in get_adapter(model).blocks(model)]


@torch.no_grad()
def flap(model: nn.Module, calib: torch.Tensor, config: FlapConfig) -> CompressionReport:
    """Prune ``model`` in place with FLAP on calibration ids ``calib`` ``[N, T]``, computing on ``config.device``
    (every tensor made on the way is made there) and returning the model to the device it came from."""
    origin = next(model.parameters()).device
    device = resolve_device(config.device)
    if device.type == "cpu":
        copy_out_of_mapping(model)  # see there: the dense blocks would stay resident
    with on_device(device):
        report = _flap(model.to(device), calib.to(device), config)
    model.to(origin)
    return record_ratios(model, report)


def _flap(model: nn.Module, calib: torch.Tensor, config: FlapConfig) -> CompressionReport:
    start = time.perf_counter()
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    params_before, block_before, sizes = count_parameters(model), block_parameter_count(model), _block_sizes(model)
    moments = fluctuation_pass(model, calib, config.batch_size)
    scores = score_layers(model, moments, config.standardize)
    plan = plan_removal(scores, [config.ratio * s for s in sizes], per_layer=config.allocation == "uniform")
    plan = align_mlp(scores, plan, config.width_multiple)
    specs = []
    for index, (layer, (units, mlp_removed)) in enumerate(zip(scores, plan, strict=True)):
        gone = {h for unit in layer.unit_heads[:units] for h in unit}
        heads = [h for h in range(layout.num_heads) if h not in gone]
        kv_heads = heads if layer.drops_kv else list(range(layout.num_kv_heads))
        specs.append(prune_block(model, index, heads, kv_heads, ~mlp_removed, moments[index],
                                 config.bias_compensation))
        log.info("flap layer %d: %d of %d query heads, %d of %d MLP channels kept", index, len(heads),
                 layout.num_heads, len(mlp_removed) - int(mlp_removed.sum()), len(mlp_removed))
    finalize(model, specs, {"method": "flap", **config.to_dict()})
    block_after = block_parameter_count(model)
    return CompressionReport(
        method="flap", ratio=config.ratio, params_before=params_before, params_after=count_parameters(model),
        block_params_before=block_before, block_params_after=block_after,
        achieved_ratio=1 - block_after / block_before,
        layer_sparsity=[round(1 - a / b, 4) for a, b in zip(_block_sizes(model), sizes, strict=True)],
        seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
        calibration=calibration_record(config, calib),
    )


def compress_flap(model: nn.Module, tokenizer: Any, config: FlapConfig) -> CompressionReport:
    """Prune ``model`` in place with FLAP (the ``compress`` family's entry point)."""
    check_architecture(model)
    return flap(model, calibration_for(tokenizer, config), config)


register_method("flap", "compress", FlapConfig, compress_flap,
                description="baseline: FLAP, heads + MLP channels by fluctuation, global search, bias compensation")
