"""What every compressor shares: the report, the layer-wise driver and its config, the architecture check.

Why here: MoDeGPT, the training-free baselines (wanda-sp, svd-llm) and DISP-LLM all return the same
:class:`CompressionReport` and refuse the same architectures; the three training-free methods also share one
driver (:func:`compress`) and differ only in the ``block_fn`` that rewrites one block. Keeping these out of
any one method's module lets each method import them without importing another method.

The driver: calibration activations enter block 0; for each block in turn its statistics are collected
(:mod:`leanfm.compress.engine`), ``block_fn`` rewrites it at keep fraction ``1 - φ_i``, and the *compressed*
block's outputs feed the next block. ``φ_i`` is the per-layer sparsity: ``φ`` everywhere
(``allocation="uniform"``) or MoDeGPT's global rule (section 3.4), ``φ_i = L φ softmax(-s/ε)_i`` from the
layer importance ``s_i = 1 - cos(in, out)``, capped at ``max_sparsity`` with the excess redistributed.

Hardware-aligned widths (issue 14): every width a method chooses is a multiple of ``width_multiple`` (MLP
channels; q/k/v head dims and low-rank ranks of ``min(8, width_multiple)``). Rounding one block moves its
parameter count by up to half a step, so the driver *carries* the error: block ``i`` is asked to keep its own
share ``t_i = (1 - φ_i) P_i`` plus what the blocks before it kept too little (``keep_i = (t_i + carry) / P_i``),
and the whole model misses the budget by at most half a step of the last block. ``width_multiple=1`` is the
unrounded behaviour. The default, 32 (:data:`WIDTH_MULTIPLE`), was measured here with ``benchmarks/gemm_widths.py``
(SmolLM2's 576-wide GEMMs, W = 1024..1100 and 1392..1440): in float32 any multiple of 8 removes the slow widths
(worst width 1.6-1.8x the best per column at 2 threads unaligned, <= 1.08x at multiples of 8); in bfloat16 only 32
and 64 do (multiples of 8 and 16 still had widths 1.3-3x slower); 32 costs half the rounding of 64.

``device``: the calibration statistics and the rebuilt blocks live there (``auto``: CUDA when available); the
model comes back on the device it came from. On the CPU the weights are first copied out of the safetensors
mapping (:func:`leanfm.compress.engine.copy_out_of_mapping`) so that replaced blocks are freed.

Streaming (issue 14: peak memory <= 2x the float32 model): given a ``stream``
(:class:`leanfm.models.streaming.BlockStream`), the driver asks it for block ``i`` just before it needs it —
the importance pass reads and releases every block in turn, the compression pass reads it again and keeps only
the rewritten block — so the process holds the embedding, the compressed blocks so far and one dense block.
The calibration states are advanced batch by batch in place and the Grams summed in place; freed memory goes
back to the system after each block. The arithmetic is the same as for a loaded model, so the checkpoint is
bit-identical (``tests/test_streaming.py``). Which methods stream: those on this driver (MoDeGPT,
``modegpt-heads``, wanda-sp, svd-llm; ``register_method(..., streams=True)``). FLAP, SliceGPT and DISP load the
whole model: FLAP ranks the channels of all blocks together on the dense activations before pruning any (it
could stream with two reads per block, as the importance pass does; not done), SliceGPT rotates the embedding
and every block, DISP trains masks through the whole model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from leanfm.compress.engine import (
    BlockLoader,
    BlockStats,
    block_parameter_count,
    capture_block_inputs,
    collect_stats,
    copy_out_of_mapping,
    layer_importance,
    load_block,
    return_freed_memory,
    run_block,
)
from leanfm.config import MethodConfig, check_at_least, option
from leanfm.data.calibration import DEFAULT_CALIBRATION, mixed_calibration_windows, parse_calibration
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters
from leanfm.eval.speed import peak_rss_mb
from leanfm.models.adapters import get_adapter
from leanfm.models.compressed import COMPRESSED_CLASSES, LayerSpec, finalize
from leanfm.progress import progress
from leanfm.training.options import DEVICE_HELP, check_device_name

ALLOCATIONS = ("global", "uniform")
RATIO_HELP = "fraction of block parameters to remove, 0 < R < 1"
# MLP widths and ranks are multiples of this by default (see the module docstring and BENCHMARKS.md)
WIDTH_MULTIPLE = 32
HEAD_MULTIPLE = 8  # q/k/v head dims: a multiple of min(HEAD_MULTIPLE, width_multiple)
ReportT = TypeVar("ReportT", bound="CompressionReport")
# block_fn(model, index, stats, keep) rewrites block ``index`` in place to keep fraction ``keep``; returns its spec
BlockFn = Callable[[nn.Module, int, BlockStats, float], LayerSpec]


def record_ratios(model: nn.Module, report: ReportT) -> ReportT:
    """Write the achieved block and whole-model ratios into the checkpoint's ``leanfm_compression`` settings, so
    ``leanfm eval`` of the saved folder reports both without the dense model; returns ``report``."""
    settings = getattr(getattr(model, "config", None), "leanfm_compression", None)
    if isinstance(settings, dict):
        settings.update(achieved_ratio=report.achieved_ratio, whole_model_ratio=report.whole_model_ratio,
                        params_before=report.params_before)
    return report


def check_ratio(ratio: float) -> None:
    """One-line error unless ``0 < ratio < 1`` (the fraction of block parameters removed)."""
    if not 0 < ratio < 1:
        raise LeanfmError(f"ratio {ratio} is out of range; accepted: 0 < ratio < 1")


def check_architecture(model: nn.Module) -> None:
    """Fail early when ``model`` cannot be compressed (e.g. an encoder such as bert)."""
    model_type = get_adapter(model).model_type
    if model_type not in COMPRESSED_CLASSES:
        raise LeanfmError(
            f"unsupported architecture '{model_type}' for compression; supported: {', '.join(COMPRESSED_CLASSES)}"
        )


@dataclass
class CompressionReport:
    """What ``leanfm compress`` reports (``--json``).

    ``achieved_ratio`` is the fraction of *block* parameters removed (what ``ratio`` asks for);
    ``whole_model_ratio`` the fraction of *all* parameters (embedding and head included) — the one a user sees.
    ``settings`` is the method's whole config as run, so a saved folder says how it was made.
    """

    method: str
    ratio: float
    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    achieved_ratio: float
    layer_sparsity: list[float]
    seconds: float
    peak_rss_mb: float
    calibration: dict[str, Any]
    training: dict[str, Any] | None = None  # trained methods (DISP-LLM): steps, wall time, tokens, loss curve
    whole_model_ratio: float = field(init=False, default=0.0)
    settings: dict[str, Any] = field(default_factory=dict)  # the method's config, as run (filled by compress_model)

    def __post_init__(self) -> None:
        self.whole_model_ratio = 1 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class LayerwiseConfig(MethodConfig):
    """Settings every layer-wise (training-free) compressor shares; ``ratio`` has no default on purpose."""

    ratio: float = option(help=RATIO_HELP)
    allocation: str = option("global", "per-layer sparsity rule", choices=ALLOCATIONS)
    # softmax temperature of the global allocation (METHODS.md: 0.05-0.15, unsure); 0.05 had the best validation
    # score of {0.05, 0.1, 0.2} for MoDeGPT at 0.3 on SmolLM2 — by under 1%, so the choice matters little there
    epsilon: float = option(0.05, "softmax temperature of the global allocation")
    max_sparsity: float = option(0.8, "no layer loses more than this (the excess goes to the others)", cli=False)
    calib_corpus: str = option(DEFAULT_CALIBRATION, "calibration text: comma-separated corpora (austen, pydocs, "
                               "NAME:SPLIT) and/or text files or folders, windows shared out evenly")
    calib_samples: int = option(32, "calibration windows")
    calib_seqlen: int = option(512, "tokens per window")
    batch_size: int = option(4, "calibration windows per forward pass", cli=False)
    seed: int = option(0, "seed of the calibration windows", cli=False)
    width_multiple: int = option(WIDTH_MULTIPLE, "chosen widths are multiples of this (1: unrounded); head dims of "
                                 f"min({HEAD_MULTIPLE}, this)")
    device: str = option("auto", DEVICE_HELP.replace("train", "compute statistics and rebuild blocks"))

    def validate(self) -> None:
        super().validate()
        check_ratio(self.ratio)
        check_device_name(self.device)
        if not 0 < self.max_sparsity <= 1 or self.epsilon <= 0:
            raise LeanfmError(f"max_sparsity {self.max_sparsity}, epsilon {self.epsilon}: "
                              "accepted 0 < max_sparsity <= 1, epsilon > 0")
        check_at_least(self, 1, "calib_samples", "calib_seqlen", "batch_size", "width_multiple")
        parse_calibration(self.calib_corpus)


def allocate_sparsity(importance: torch.Tensor, ratio: float, epsilon: float, cap: float) -> torch.Tensor:
    """Per-layer sparsity φ_i = L φ softmax(-s/ε)_i, capped at ``cap`` with the excess redistributed."""
    n = importance.numel()
    phi = n * ratio * torch.softmax(-importance.double() / epsilon, dim=0)
    for _ in range(n):
        over = phi > cap
        if not over.any():
            break
        excess = float((phi[over] - cap).sum())
        phi[over] = cap
        free = phi < cap
        phi[free] += excess * phi[free] / phi[free].sum()
    return phi.float()


def layer_sparsity(model: nn.Module, calib: torch.Tensor, config: LayerwiseConfig,
                   loader: BlockLoader | None = None) -> torch.Tensor:
    """φ_i for every block under ``config.allocation`` (see the module docstring); ``loader`` streams the blocks."""
    if config.allocation == "global":
        importance = layer_importance(model, calib, config.batch_size, loader)
        return allocate_sparsity(importance, config.ratio, config.epsilon, config.max_sparsity)
    return torch.full((len(get_adapter(model).blocks(model)),), config.ratio)


def round_to_multiple(value: float, multiple: int, high: int) -> int:
    """``value`` rounded to the nearest multiple of ``multiple``, within ``[multiple, high]``.

    ``high`` (the dense width) is returned as is when rounding up would pass it, so a layer that keeps
    everything stays dense even when its width is no multiple.
    """
    if multiple <= 1:
        return int(min(high, max(1, round(value))))
    return int(min(high, max(multiple, multiple * round(value / multiple))))


def carried_keep(target: float, carry: float, size: int) -> float:
    """Keep fraction of a block of ``size`` parameters asked to keep ``target`` plus the ``carry`` its
    predecessors' rounding left over (clipped to ``(0, 1]``)."""
    return float(min(1.0, max(1e-6, (target + carry) / size)))


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Modules built inside are created on ``device`` (``torch.device`` as a context), so a rebuilt block's new
    Linears land where the weights they replace live, without a CPU copy first. A no-op for the CPU (already the
    default): the context intercepts every torch call, which would slow a forward pass run inside it."""
    if device.type == "cpu":
        yield
        return
    with device:
        yield


@torch.no_grad()
def compress(model: nn.Module, calib: torch.Tensor, config: LayerwiseConfig, method: str,
             block_fn: BlockFn, stream: BlockLoader | None = None) -> CompressionReport:
    """Compress ``model`` in place, layer by layer, on calibration ids ``calib`` ``[N, T]`` with ``block_fn``.

    Runs on ``config.device`` and returns the model to the device it came from. Block ``i`` is asked for its
    share ``(1 - φ_i) P_i`` plus the carried rounding error of the blocks before it (module docstring).
    ``stream`` (a :class:`leanfm.models.streaming.BlockStream` of ``model``, opened on ``config.device``): the
    blocks are read from the checkpoint one at a time, once for the importance pass and once to be compressed,
    so only one dense block is ever resident; the result is bit-identical to compressing the loaded model and
    comes back on the CPU, as a loaded model would.
    """
    start = time.perf_counter()
    origin = torch.device("cpu") if stream is not None else next(model.parameters()).device  # as loaded
    device = resolve_device(config.device)
    if stream is None:
        if device.type == "cpu":
            copy_out_of_mapping(model)  # else the dense blocks stay resident beside the compressed ones
        model.to(device)
    calib = calib.to(device)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    params_before, block_before = count_parameters(model), block_parameter_count(model)
    sparsity = layer_sparsity(model, calib, config, stream)
    inputs, kwargs = capture_block_inputs(model, calib, config.batch_size)
    specs, carry = [], 0.0
    for index in progress(range(len(blocks)), desc=method, total=len(blocks)):
        block = load_block(model, index, stream)
        size = sum(p.numel() for p in block.parameters())
        target = (1.0 - float(sparsity[index])) * size
        stats, _ = collect_stats(adapter, block, inputs, kwargs, keep_outputs=False)
        return_freed_memory()  # the forward's activations
        with on_device(device):
            specs.append(block_fn(model, index, stats, carried_keep(target, carry, size)))
        del stats, block
        return_freed_memory()  # the replaced dense block's weights, the Grams
        carry += target - sum(p.numel() for p in adapter.blocks(model)[index].parameters())
        # the compressed outputs feed the next block, advanced batch by batch
        run_block(adapter.blocks(model)[index], inputs, kwargs, in_place=True)
        return_freed_memory()
    finalize(model, specs, {"method": method, **config.to_dict()})
    model.to(origin)
    block_after = block_parameter_count(model)
    return record_ratios(model, CompressionReport(
        method=method, ratio=config.ratio, params_before=params_before, params_after=count_parameters(model),
        block_params_before=block_before, block_params_after=block_after,
        achieved_ratio=1 - block_after / block_before, layer_sparsity=[round(float(s), 4) for s in sparsity],
        seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(),
        calibration=calibration_record(config, calib),
    ))


def compress_layerwise(model: nn.Module, tokenizer: Any, config: LayerwiseConfig, method: str,
                       block_fn: BlockFn, stream: BlockLoader | None = None) -> CompressionReport:
    """Check the architecture, draw the calibration windows and run :func:`compress` (``stream``: see there)."""
    check_architecture(model)
    calib = calibration_for(tokenizer, config)
    return_freed_memory()  # what tokenising the calibration text left behind
    return compress(model, calib, config, method, block_fn, stream)


def calibration_record(config: LayerwiseConfig, calib: torch.Tensor) -> dict[str, Any]:
    """What a report records about the calibration windows ``calib`` drawn for ``config``."""
    return {"sources": [src.describe() for src in parse_calibration(config.calib_corpus)],
            "samples": int(calib.shape[0]), "seqlen": int(calib.shape[1]), "seed": config.seed}


def calibration_for(tokenizer: Any, config: LayerwiseConfig) -> torch.Tensor:
    """The calibration ids ``[calib_samples, calib_seqlen]`` of ``config``: its sources and seed, so every
    training-free method given the same settings calibrates on identical windows."""
    return mixed_calibration_windows(tokenizer, config.calib_corpus, config.calib_samples, config.calib_seqlen,
                                     config.seed)


def cholesky_solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix X = rhs`` for SPD ``matrix``, adding a growing ridge when Cholesky fails."""
    scale = matrix.diagonal().mean().clamp_min(1e-12)
    for ridge in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        factor, info = torch.linalg.cholesky_ex(matrix + ridge * scale * torch.eye(len(matrix), dtype=matrix.dtype))
        if int(info) == 0:
            return torch.cholesky_solve(rhs, factor)
    raise FloatingPointError("Gram matrix is not positive definite even with ridge 1e-2")
