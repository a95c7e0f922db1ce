"""DISP-LLM: dimension-independent structural pruning, learned by a hypernetwork (METHODS.md section 2).

Classic structured pruning (SliceGPT, MoDeGPT's channel choices) ties every block to one shared set of
residual channels. DISP-LLM keeps the residual stream at full width and lets each block choose its own
subsets: attention reads ``S_attn_in`` and writes ``S_attn_out``, the MLP reads ``S_mlp_in``, keeps
``S_mlp_mid`` intermediate channels and writes ``S_mlp_out``::

    x <- x + index_add(S_attn_out, W_o[S_attn_out, :] Attn(W_qkv[:, S_attn_in] norm(x)[S_attn_in]))
    x <- x + index_add(S_mlp_out, W_d[S_mlp_out, S_mid] act(W_u[S_mid, S_mlp_in] norm(x)[S_mlp_in]))

The subsets are learned on the frozen model: a hypernetwork (bidirectional GRU over fixed random inputs, one
step per block, then one linear readout per block and mask kind) produces mask logits; masks are sampled with a
straight-through Gumbel-sigmoid (hard 0/1 forward, sigmoid gradient backward) and applied by multiplying the
Linears' inputs/outputs, and the loss is

    L = CE(masked model) + λ |log(P(masks) / ((1 - ratio) P_blocks))|

with ``P(masks)`` the exact parameter count of the blocks that the masks would export (differentiable in the
mask sums). Export takes the deterministic masks ``logit > c``, with one global offset ``c`` chosen by bisection
so that the exported blocks hit the requested ratio exactly (fair comparison with MoDeGPT at equal size).
Attention heads are not pruned (the issue's optional extra): attention's ``T^2`` core is unchanged.

Training is data-parallel with ``torch.distributed`` (``torchrun``): each rank takes every ``world``-th row of
the same global batch and gradients are averaged, so N processes follow the one-process loss curve. Mask noise
and batches are drawn from generators seeded by ``(seed, step)``, which makes ``--resume`` reproduce the steps
an uninterrupted run would have taken.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from leanfm.compress.base import (
    RATIO_HELP,
    WIDTH_MULTIPLE,
    CompressionReport,
    check_architecture,
    check_ratio,
    record_ratios,
    round_to_multiple,
)
from leanfm.compress.engine import block_parameter_count
from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.calibration import mixed_windows, parse_calibration, source_token_ids
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters
from leanfm.eval.speed import peak_rss_mb
from leanfm.models.adapters import ArchAdapter, BlockParts, get_adapter
from leanfm.models.compressed import ChannelLinear, LayerSpec, dense_spec, finalize, restructure_block
from leanfm.training import DistributedContext, Runtime, Task, fit
from leanfm.training.options import check_device_name

log = logging.getLogger(__name__)
MASK_NAMES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")
SAMPLERS = ("reinmax", "gumbel")


@dataclass
class DispConfig(MethodConfig):
    """Settings of a DISP-LLM run; ``ratio`` is the fraction of transformer-block parameters removed.

    Defaults follow the reference (METHODS.md section 2) — AdamW at a constant rate with weight decay 0.05,
    ReinMax with τ = 1 (Gumbel-sigmoid: τ = 0.4), logit offset +3 so that training starts near "keep" — except
    the rate and λ: the paper's 1e-3 and λ = 6 are tuned for 10k steps; at the few hundred steps a CPU affords,
    the pruned ratio stayed at ~0.09 for 25 steps (target 0.5) while lr 1e-2 with the official
    code's λ = 16 reaches the target in ~30 steps (measured on SmolLM2-135M, BENCHMARKS.md).
    ``tau=None`` resolves to the sampler's default when the config is built.
    """

    # a resumed run may train longer, checkpoint at another interval, or change device/autocast (speed only)
    # (and export at another width multiple: training does not depend on it)
    RESUMABLE: ClassVar[tuple[str, ...]] = ("steps", "checkpoint_every", "device", "autocast", "width_multiple")

    ratio: float = option(help=RATIO_HELP)
    steps: int = option(200, "training steps")
    lr: float = option(1e-2, "hypernetwork learning rate")
    weight_decay: float = option(0.05, "AdamW weight decay of the hypernetwork", cli=False)
    lam: float = option(16.0, "parameter regulariser weight λ (paper 6, official code 16)", flag="lambda")
    sampler: str = option("reinmax", "mask sampler (gumbel: the official code's straight-through Gumbel-sigmoid)",
                          choices=SAMPLERS)
    tau: float | None = option(None, "sampler temperature (default 1.0 reinmax, 0.4 gumbel)")
    offset: float = option(3.0, "added to every mask logit before sampling", cli=False)
    batch_size: int = option(4, "global batch of windows, split across ranks")
    seqlen: int = option(256, "tokens per training window")
    train_corpus: str = option("austen:train,pydocs:train", "training text: comma-separated corpora (NAME:SPLIT) "
                               "and/or text files or folders; every batch shares its windows out evenly")
    seed: int = option(0, "seed of the hypernetwork, the mask noise and the batches", cli=False)
    checkpoint_every: int = option(25, "steps between checkpoints")
    width_multiple: int = option(WIDTH_MULTIPLE, "exported channel counts are multiples of this (1: unrounded)")
    # bfloat16 autocast for the frozen model's forward/backward (~2.7x faster on CPU)
    autocast: bool = option(True, "bfloat16 autocast for the frozen model where bf16 is native (off: float32)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        if self.tau is None:
            self.tau = 1.0 if self.sampler == "reinmax" else 0.4
        super().__post_init__()

    def validate(self) -> None:
        check_ratio(self.ratio)
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every", "width_multiple")
        if self.seqlen < 2:
            raise LeanfmError(f"seqlen {self.seqlen} is too small; accepted: an integer >= 2")
        super().validate()  # choices: the sampler
        assert self.tau is not None  # resolved in __post_init__
        if self.lr <= 0 or self.lam < 0 or self.tau <= 0:
            raise LeanfmError(f"lr {self.lr}, lambda {self.lam}, tau {self.tau}: accepted lr > 0, lambda >= 0, tau > 0")
        check_device_name(self.device)
        parse_calibration(self.train_corpus)


# ---------------------------------------------------------------- parameter counting


@dataclass(frozen=True)
class BlockShape:
    """What the parameter count of one block depends on (see :func:`block_count`)."""

    widths: dict[str, int]  # full width of each mask kind
    qkv_rows: int  # output rows of q, k and v together (unchanged by channel pruning)
    o_in: int  # input width of the output projection
    o_bias: bool
    n_mlp_in: int  # 2 for a gated MLP (gate, up), 1 otherwise
    mlp_in_bias: bool
    mlp_out_bias: bool
    constant: int  # norms, q/k/v biases and anything else channel pruning leaves alone


def _attention_inputs(parts: BlockParts) -> list[nn.Linear]:
    return [lin for lin in (parts.q, parts.k, parts.v, parts.qkv) if lin is not None]


def block_shape(adapter: ArchAdapter, block: nn.Module) -> BlockShape:
    """Read a dense block's widths and the parameter count that channel pruning cannot change."""
    parts = adapter.parts(block)
    d_in = parts.mlp_in[0].in_features
    widths = {"attn_in": _attention_inputs(parts)[0].in_features, "attn_out": parts.o.out_features,
              "mlp_in": d_in, "mlp_mid": parts.mlp_out.in_features, "mlp_out": parts.mlp_out.out_features}
    shape = BlockShape(
        widths=widths, qkv_rows=sum(lin.out_features for lin in _attention_inputs(parts)), o_in=parts.o.in_features,
        o_bias=parts.o.bias is not None, n_mlp_in=len(parts.mlp_in), mlp_in_bias=parts.mlp_in[0].bias is not None,
        mlp_out_bias=parts.mlp_out.bias is not None, constant=0,
    )
    total = sum(p.numel() for p in block.parameters())
    return BlockShape(**{**shape.__dict__, "constant": total - int(block_count(shape, widths))})


def block_count(shape: BlockShape, kept: dict[str, Any]) -> Any:
    """Parameters of a block keeping ``kept[name]`` channels per mask kind (ints or differentiable sums).

    ``P = c + n_ai·rows_qkv + (o_in + b_o)·n_ao + k·(n_mi + b_mi)·n_mid + (n_mid + b_mo)·n_mo``.
    """
    return (shape.constant + kept["attn_in"] * shape.qkv_rows + (shape.o_in + shape.o_bias) * kept["attn_out"]
            + shape.n_mlp_in * (kept["mlp_in"] + shape.mlp_in_bias) * kept["mlp_mid"]
            + (kept["mlp_mid"] + shape.mlp_out_bias) * kept["mlp_out"])


def masks_count(shapes: list[BlockShape], masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Total block parameters under ``masks[name]`` (shape ``[blocks, width]``), differentiable."""
    sums = {name: masks[name].double().sum(-1) for name in MASK_NAMES}
    return sum(block_count(s, {n: sums[n][i] for n in MASK_NAMES}) for i, s in enumerate(shapes))


# ---------------------------------------------------------------- hypernetwork and sampling


class DispHypernetwork(nn.Module):
    """Mask logits for every block: ``z ~ N(0,1) [L, 32] (fixed) -> BiGRU(64) -> LayerNorm -> GELU -> readouts``.

    The trunk (GRU, norm) is shared, so neighbouring blocks coordinate their choices (DISP-LLM section 3.2); the
    readout is one bias-free linear map per *block and mask kind* (``readouts[name][l]`` ``[width, 2 hidden]``), as
    in the official code's per-layer heads. A readout shared across blocks (issue 14's finding) coupled every
    block's ranking of channels to every other block's: a gradient that re-ranked block 0's channels moved block
    1's too. Readouts start like ``nn.Linear`` (uniform in ``±1/sqrt(2 hidden)``).
    """

    z: torch.Tensor  # the fixed noise input, a registered buffer

    def __init__(self, num_blocks: int, widths: dict[str, int], seed: int = 0, z_dim: int = 32,
                 hidden: int = 64) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.register_buffer("z", torch.randn(num_blocks, z_dim))
            self.gru = nn.GRU(z_dim, hidden, batch_first=True, bidirectional=True)
            self.norm = nn.LayerNorm(2 * hidden)
            bound = (2 * hidden) ** -0.5
            self.readouts = nn.ParameterDict({
                n: nn.Parameter(torch.empty(num_blocks, widths[n], 2 * hidden).uniform_(-bound, bound))
                for n in MASK_NAMES})

    def forward(self) -> dict[str, torch.Tensor]:
        states, _ = self.gru(self.z[None])
        states = nn.functional.gelu(self.norm(states[0]))  # [L, 2 hidden]
        # block l's logits read block l's state through block l's own readout: [L, width] each
        return {name: torch.einsum("lwh,lh->lw", self.readouts[name], states) for name in MASK_NAMES}


def gumbel_sigmoid(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Straight-through Gumbel-sigmoid: hard 0/1 values forward, ``sigmoid((l + g) / τ)``'s gradient backward.

    ``g = log u - log(1 - u)`` is logistic noise (the difference of two Gumbel samples).
    """
    u = torch.rand(logits.shape, generator=generator).to(logits.device).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # parenthesised: exactly 0 or 1 forward


def reinmax(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """ReinMax (Liu et al., 2023, Algorithm 2) for binary masks: a second-order (Heun) gradient estimator.

    With ``π0 = σ(l)`` and a sample ``D ~ Bernoulli(π0)``: ``π1 = (D + σ(l/τ)) / 2`` re-parameterised as
    ``σ(logit(π1) + l - sg(l))`` (value π1, gradient of a softmax at π1), ``π2 = 2 π1 - π0 / 2``; the output
    ``D + π2 - sg(π2)`` is exactly ``D`` forward. For two classes ``[l, 0]`` softmax is the sigmoid.
    """
    p0 = torch.sigmoid(logits)
    u = torch.rand(logits.shape, generator=generator).to(logits.device)
    hard = (u < p0.detach()).to(logits.dtype)
    p1 = ((hard + torch.sigmoid(logits / tau).detach()) / 2).clamp(1e-6, 1 - 1e-6)
    p1 = torch.sigmoid(torch.logit(p1) + logits - logits.detach())
    p2 = 2 * p1 - p0 / 2
    return hard + (p2 - p2.detach())  # parenthesised: exactly 0 or 1 forward


SAMPLER_FUNCTIONS = {"reinmax": reinmax, "gumbel": gumbel_sigmoid}


class ChannelMasks:
    """Multiplies each block's Linear inputs/outputs by the current masks (forward hooks on the dense model).

    With 0/1 masks this is exactly the pruned block: zeroed input channels contribute nothing, zeroed output
    channels add nothing to the residual, a zeroed intermediate channel is a removed MLP row.
    """

    def __init__(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        self.masks: dict[str, torch.Tensor] | None = None
        self._handles = []
        for index, block in enumerate(adapter.blocks(model)):
            parts = adapter.parts(block)
            for linear in _attention_inputs(parts):
                self._handles.append(linear.register_forward_pre_hook(self._scale_input("attn_in", index)))
            self._handles.append(parts.o.register_forward_hook(self._scale_output("attn_out", index)))
            for linear in parts.mlp_in:
                self._handles.append(linear.register_forward_pre_hook(self._scale_input("mlp_in", index)))
            self._handles.append(parts.mlp_out.register_forward_pre_hook(self._scale_input("mlp_mid", index)))
            self._handles.append(parts.mlp_out.register_forward_hook(self._scale_output("mlp_out", index)))

    def _mask(self, name: str, index: int, like: torch.Tensor) -> torch.Tensor:
        if self.masks is None:
            raise RuntimeError("ChannelMasks.masks must be set before the forward pass")
        return self.masks[name][index].to(like.dtype)

    def _scale_input(self, name: str, index: int) -> Any:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (args[0] * self._mask(name, index, args[0]), *args[1:])
        return hook

    def _scale_output(self, name: str, index: int) -> Any:
        def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * self._mask(name, index, out)
        return hook

    def remove(self) -> None:
        """Detach every hook: the model is dense again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# ---------------------------------------------------------------- export


@torch.no_grad()
def export_masks(logits: dict[str, torch.Tensor], shapes: list[BlockShape], target: float,
                 multiple: int = 1) -> dict[str, torch.Tensor]:
    """Boolean masks ``logit > c`` with the global offset ``c`` that keeps the most parameters ``<= target``.

    Every mask keeps at least its highest-logit channel, so no block loses a whole path. With ``multiple > 1``
    the channel counts are then aligned (:func:`align_masks`).
    """
    def masks_at(offset: float) -> dict[str, torch.Tensor]:
        out = {}
        for name in MASK_NAMES:
            keep = logits[name] > offset
            keep[torch.arange(keep.shape[0], device=keep.device), logits[name].argmax(-1)] = True
            out[name] = keep
        return out

    low, high = -1e4, 1e4  # count decreases as the offset rises
    for _ in range(100):
        mid = (low + high) / 2
        if float(masks_count(shapes, masks_at(mid))) > target:
            low = mid
        else:
            high = mid
    masks = masks_at(high)
    return align_masks(logits, masks, shapes, multiple) if multiple > 1 else masks


def _top(logits: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros_like(logits, dtype=torch.bool)
    keep[logits.topk(count).indices] = True
    return keep


@torch.no_grad()
def align_masks(logits: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], shapes: list[BlockShape],
                multiple: int) -> dict[str, torch.Tensor]:
    """Masks whose channel counts — the in/out widths of every exported Linear — are multiples of ``multiple``.

    Block by block: the four residual-side counts are rounded to the nearest multiple, and the intermediate
    count (the only one the parameter count is linear in once the others are fixed) absorbs the difference
    between the block's unaligned count plus the error carried from the blocks before it and its aligned count;
    its own rounding error is carried on. Each mask keeps its highest-logit channels (what ``logit > c`` kept,
    give or take the boundary). The total lands within half an intermediate step of the unaligned one.
    """
    out: dict[str, list[torch.Tensor]] = {name: [] for name in MASK_NAMES}
    carry = 0.0
    for index, shape in enumerate(shapes):
        counts = {name: int(masks[name][index].sum()) for name in MASK_NAMES}
        wanted = float(block_count(shape, counts)) + carry
        aligned = {name: round_to_multiple(counts[name], multiple, shape.widths[name]) for name in MASK_NAMES}
        rest = float(block_count(shape, {**aligned, "mlp_mid": 0}))
        per_mid = float(block_count(shape, {**aligned, "mlp_mid": 1})) - rest
        aligned["mlp_mid"] = round_to_multiple((wanted - rest) / per_mid, multiple, shape.widths["mlp_mid"])
        carry = wanted - float(block_count(shape, aligned))
        for name in MASK_NAMES:
            out[name].append(_top(logits[name][index], aligned[name]))
    return {name: torch.stack(rows) for name, rows in out.items()}


@torch.no_grad()
def prune_to_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[LayerSpec]:
    """Physically prune every block to ``masks`` (boolean ``[blocks, width]``): index_select in, index_add out."""
    adapter = get_adapter(model)
    specs = []
    for index, block in enumerate(adapter.blocks(model)):
        parts = adapter.parts(block)
        kept = {name: torch.nonzero(masks[name][index]).flatten() for name in MASK_NAMES}
        a_in, a_out, m_in, mid, m_out = (kept[n] for n in MASK_NAMES)
        new_weights: list[tuple[torch.Tensor, torch.Tensor | None]] = [
            (lin.weight[:, a_in], lin.bias) for lin in _attention_inputs(parts)]
        new_weights.append((parts.o.weight[a_out], parts.o.bias[a_out] if parts.o.bias is not None else None))
        for lin in parts.mlp_in:
            new_weights.append((lin.weight[mid][:, m_in], lin.bias[mid] if lin.bias is not None else None))
        down = parts.mlp_out
        new_weights.append((down.weight[m_out][:, mid], down.bias[m_out] if down.bias is not None else None))
        spec = dense_spec(model, adapter, index)
        spec.intermediate = int(mid.numel())
        spec.channels = {"attn_in": a_in.tolist(), "attn_out": a_out.tolist(), "mlp_in": m_in.tolist(),
                         "mlp_out": m_out.tolist()}
        restructure_block(model, index, spec)
        parts = adapter.parts(adapter.blocks(model)[index])
        targets = [*_attention_inputs(parts), parts.o, *parts.mlp_in, parts.mlp_out]
        for linear, (weight, bias) in zip(targets, new_weights, strict=True):
            assert isinstance(linear, ChannelLinear)
            linear.weight.data = weight.detach().clone()
            if bias is not None:
                assert linear.bias is not None  # built with a bias where the original had one
                linear.bias.data = bias.detach().clone()
        specs.append(spec)
    return specs


# ---------------------------------------------------------------- training


@dataclass
class DispTrainer:
    """Trains the hypernetwork on a frozen model with :func:`leanfm.training.fit` (the one training loop).

    The step function is :meth:`loss`: masks sampled for the step, the masked model's CE on the step's batch,
    plus the parameter regulariser. ``run`` resumes from ``checkpoint`` when asked.
    """

    model: nn.Module
    tokenizer: Any
    config: DispConfig
    checkpoint: Path | None = None
    context: DistributedContext | None = None

    def __post_init__(self) -> None:
        adapter = get_adapter(self.model)
        self.blocks = adapter.blocks(self.model)
        self.shapes = [block_shape(adapter, block) for block in self.blocks]
        self.block_params = sum(int(block_count(s, s.widths)) for s in self.shapes)
        self.target = (1 - self.config.ratio) * self.block_params
        self.hypernetwork = DispHypernetwork(len(self.blocks), self.shapes[0].widths, self.config.seed)
        if any(s.widths != self.shapes[0].widths for s in self.shapes):
            raise LeanfmError("DISP-LLM needs blocks of equal widths (the masks of all blocks are stacked)")
        self.optimizer = torch.optim.AdamW(self.hypernetwork.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)
        self.step, self.train_seconds = 0, 0.0
        self.history: list[dict[str, Any]] = []
        self.sources = parse_calibration(self.config.train_corpus)
        self.ids = [source_token_ids(self.tokenizer, source) for source in self.sources]
        self.source_names = [source.describe() for source in self.sources]
        self.runtime = Runtime.for_config(self.config, self.context)
        self.batch(0)  # a source too short for seqlen fails here, before any training
        self.hooks: ChannelMasks | None = None

    def sample_masks(self, step: int) -> dict[str, torch.Tensor]:
        """Masks for ``step``: same noise on every rank and after a resume."""
        logits = self.hypernetwork()
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        sample = SAMPLER_FUNCTIONS[self.config.sampler]
        assert self.config.tau is not None  # resolved in __post_init__
        tau = float(self.config.tau)
        return {n: sample(logits[n] + self.config.offset, tau, generator) for n in MASK_NAMES}

    def batch(self, step: int) -> torch.Tensor:
        """This rank's share of the global batch of ``step`` (on the CPU; the loop moves it)."""
        windows = mixed_windows(self.ids, self.config.batch_size, self.config.seqlen,
                                self.config.seed * 1_000_003 + 7919 * (step + 1), self.source_names)
        return self.runtime.context.shard(windows)

    def loss(self, step: int, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``CE(masked model) + λ |log(P(masks) / target)|`` for ``step``; the record's CE is averaged over ranks."""
        if self.hooks is None:
            raise RuntimeError("DispTrainer.loss runs inside DispTrainer.run (the mask hooks are not attached)")
        masks = self.sample_masks(step)
        self.hooks.masks = masks
        with self.runtime.autocast():
            ce = self.model(input_ids=ids, labels=ids, use_cache=False).loss.float()
        kept = masks_count(self.shapes, masks)
        regulariser = self.config.lam * torch.log(kept / self.target).abs()
        record = {"ce": float(self.runtime.context.mean(ce)), "regulariser": float(regulariser.detach()),
                  "ratio": 1 - float(kept.detach()) / self.block_params}
        return ce + regulariser.float(), record

    def task(self) -> Task:
        """The hypernetwork's part of the training loop (the model itself is frozen)."""
        return Task("disp", {"hypernetwork": self.hypernetwork}, self.optimizer, self.batch, self.loss,
                    frozen=(self.model,))

    def run(self, resume: bool = False) -> list[dict[str, float]]:
        """Train up to ``config.steps``; checkpoints every ``checkpoint_every`` steps and on Ctrl-C."""
        self.hooks = ChannelMasks(self.model)
        try:
            result = fit(self.task(), self.config, self.runtime, checkpoint=self.checkpoint, resume=resume)
        finally:
            self.hooks.remove()
            self.hooks = None
        self.step, self.history, self.train_seconds = result.step, result.history, result.seconds
        return self.history

    @torch.no_grad()
    def final_masks(self) -> dict[str, torch.Tensor]:
        """The deterministic masks to export, at exactly the requested ratio."""
        logits = self.hypernetwork()
        return export_masks({n: logits[n] + self.config.offset for n in MASK_NAMES}, self.shapes, self.target,
                            self.config.width_multiple)


def compress_disp(model: nn.Module, tokenizer: Any, config: DispConfig, checkpoint: Path | None = None,
                  resume: bool = False, context: DistributedContext | None = None) -> CompressionReport:
    """Train the hypernetwork (resumable, data-parallel under torchrun), then prune ``model`` in place.

    ``checkpoint``/``resume`` follow :func:`leanfm.training.prepare_run`'s rule (the caller applies it first).
    Called as the ``compress`` family's entry point (``model, tokenizer, config``) it trains from scratch in
    one process without a checkpoint; the CLI passes ``checkpoint``, ``resume`` and the torchrun ``context``.
    """
    check_architecture(model)
    start = time.perf_counter()
    params_before, block_before = count_parameters(model), block_parameter_count(model)
    per_block_before = [sum(p.numel() for p in b.parameters()) for b in get_adapter(model).blocks(model)]
    origin = next(model.parameters()).device
    trainer = DispTrainer(model, tokenizer, config, checkpoint, context)
    history = trainer.run(resume=resume)
    masks = {name: mask.to(origin) for name, mask in trainer.final_masks().items()}
    specs = prune_to_masks(model.to(origin), masks)  # training ran on config.device; pruning where it came from
    finalize(model, specs, {"method": "disp", **config.to_dict()})
    per_block_after = [sum(p.numel() for p in b.parameters()) for b in get_adapter(model).blocks(model)]
    block_after = block_parameter_count(model)
    return record_ratios(model, CompressionReport(
        method="disp", ratio=config.ratio, params_before=params_before, params_after=count_parameters(model),
        block_params_before=block_before, block_params_after=block_after,
        achieved_ratio=1 - block_after / block_before,
        layer_sparsity=[round(1 - a / b, 4) for a, b in zip(per_block_after, per_block_before, strict=True)],
        seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
        calibration={"sources": [s.describe() for s in parse_calibration(config.train_corpus)],
                     "samples": config.steps * config.batch_size,
                     "seqlen": config.seqlen, "seed": config.seed},
        training={"steps": trainer.step, "world_size": trainer.runtime.context.world_size,
                  "device": str(trainer.runtime.device), "train_seconds": trainer.train_seconds,
                  "tokens_seen": trainer.step * config.batch_size * config.seqlen, "history": history},
    ))


register_method("disp", "compress", DispConfig, compress_disp,
                description="DISP-LLM: per-block residual channels learned by a hypernetwork (trained)")
