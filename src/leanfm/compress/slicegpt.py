"""SliceGPT (Ashkboos et al., ICLR 2024): rotate the residual stream by PCA and delete its least-used directions.

The invariance it rests on. Fold every RMSNorm's weight ``g`` into the Linears that read it (``W <- W diag(g)``:
q/k/v for the attention norm, gate/up for the MLP norm, the LM head for the final norm). The norms become weightless,
``N(x) = x / sqrt(|x|^2 / D + eps)``, and ``N(x Q) = N(x) Q`` for any orthogonal ``Q`` because ``|x Q| = |x|``. So the
residual stream may be expressed in any orthonormal basis, and a different one at every point where it is read, as
long as every reader's input side and every writer's output side is rotated to match.

The algorithm (our reading of the paper, section 3, and of microsoft/TransformerCompression ``rotate.py``):
- Bases by PCA. ``Q = eigenvectors of C = sum_t z_t z_t^T`` in descending eigenvalue order (float64 ``eigh``), where
  ``z`` is the signal at that point, normalised as the weightless norm will see it (``signal="normed"``: the paper's
  "output of the RMSNorm"; ``signal="raw"``: the un-normalised residual, what the official code feeds its PCA).
  ``U = Q[:, :d']`` keeps the top-``d'`` directions.
- Per block ``l`` with input basis ``U_a`` (the previous block's output basis; the embedding's PCA for block 0):
  q/k/v read ``W U_a``; the attention's residual signal ``r = h U_a^T + attn`` gives ``U_m``; o_proj writes
  ``U_m^T W_o``; the attention shortcut is ``S_attn = U_a^T U_m``; gate/up read ``W U_m``; the block output
  ``y = h_m U_m^T + mlp`` gives ``U_n``; down writes ``U_n^T W_down``; ``S_mlp = U_m^T U_n``. The embedding is
  ``E U_0``, the LM head ``W_head U_last``. ``d' x d'`` shortcuts are SliceGPT's residual adapters.
- Sequential calibration: every PCA is taken on the outputs of the already sliced blocks before it, so later blocks
  see (and their bases absorb) the error made earlier.
- RMSNorm over ``d'`` dims is compensated exactly (weight ``sqrt(D/d')``, eps ``eps D/d'``; derivation in
  :mod:`leanfm.models.sliced`), so at ``d' = D`` the sliced model *is* the dense one (up to rounding).

Where we differ from the paper / official code, on purpose:
- The budget. ``ratio`` is the fraction of *block* parameters removed, the budget every leanfm compressor uses, with
  the shortcut matrices counted as block parameters; it is mapped to the one width ``d'`` (a multiple of 8) whose
  block ratio comes closest. SliceGPT's own "slicing %" is ``1 - d'/D``, which hides the shortcuts' ``2 d'^2``.
- The head. SmolLM2 ties the embedding and the LM head; they need different rotations, so they are untied and the
  second ``V x d'`` matrix is counted (the report's ``whole_model_ratio``). The head is always sliced (the official
  code's ``--slice-head`` option; its default keeps the last block's output and the head at ``D``).
- SliceGPT uses one ``d'`` for every layer: ``allocation`` accepts only ``uniform`` and ``epsilon`` is unused.
- No damping term in the Gram: adding ``c I`` (the official code's 1% of the mean diagonal) changes no eigenvector.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import LlamaConfig

from leanfm.compress.base import (
    CompressionReport,
    LayerwiseConfig,
    calibration_for,
    calibration_record,
    on_device,
    record_ratios,
)
from leanfm.compress.engine import block_parameter_count, capture_block_inputs
from leanfm.config import option, register_method
from leanfm.device import resolve_device
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters
from leanfm.eval.speed import peak_rss_mb
from leanfm.models.sliced import SlicedLlamaForCausalLM, sliced_config

log = logging.getLogger(__name__)

SIGNALS = ("normed", "raw")
WIDTH_MULTIPLE = 8
RATIO_TOLERANCE = 0.05  # a request farther than this from every reachable block ratio is refused
# basis(gram [D, D] float64) -> orthogonal [D, D], columns in order of preference (the first d' are kept)
Basis = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SliceGptConfig(LayerwiseConfig):
    """Settings of slicegpt: the layer-wise ones (one width for all layers, so ``allocation`` is ``uniform`` only)
    plus ``signal``, what the PCA sees."""

    allocation: str = option("uniform", "slicegpt slices every layer to one width", choices=("uniform",))
    epsilon: float = option(0.1, "unused: slicegpt has no per-layer allocation", cli=False)
    signal: str = option("normed", "PCA signal: the normalised residual (paper) or the raw one (official code)",
                         choices=SIGNALS)


@dataclass
class SliceGptReport(CompressionReport):
    """The common report plus the sliced width (the common ``whole_model_ratio`` counts the untied head)."""

    width: int = 0
    hidden_size: int = 0


def check_llama(model: nn.Module) -> None:
    """One-line error unless ``model`` is a dense llama-architecture causal LM."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "gemma3_text":
        raise LeanfmError("slicegpt cannot slice gemma3_text: its post-attention/post-feedforward RMSNorms rescale "
                          "each residual channel, so no rotation folds through them; use modegpt or flap")
    if model_type != "llama":
        raise LeanfmError(f"slicegpt supports dense llama-architecture models only (e.g. smollm2-135m); "
                          f"got '{model_type}'")


def _scale_columns(linear: nn.Linear, gain: torch.Tensor) -> None:
    linear.weight.copy_((linear.weight.double() * gain.double()[None, :]).to(linear.weight.dtype))


@torch.no_grad()
def fold_norms(model: nn.Module) -> None:
    """Untie the LM head from the embedding, fold every RMSNorm weight into the Linears that read it (``W diag(g)``)
    and set the norm weights to 1. The function computed by ``model`` is unchanged."""
    body = cast(Any, model).model
    head = cast(nn.Linear, cast(Any, model).lm_head)
    if head.weight is body.embed_tokens.weight or head.weight.data_ptr() == body.embed_tokens.weight.data_ptr():
        head.weight = nn.Parameter(head.weight.detach().clone())
    for layer in body.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            _scale_columns(linear, layer.input_layernorm.weight)
        for linear in (layer.mlp.gate_proj, layer.mlp.up_proj):
            _scale_columns(linear, layer.post_attention_layernorm.weight)
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
    _scale_columns(head, body.norm.weight)
    body.norm.weight.fill_(1.0)


def pca_basis(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the symmetric ``gram`` (float64), by descending eigenvalue: the PCA basis."""
    values, vectors = torch.linalg.eigh(gram.double())
    return vectors[:, values.argsort(descending=True)]


def signal_gram(states: Sequence[torch.Tensor], signal: str, eps: float) -> torch.Tensor:
    """``sum_t z_t z_t^T`` (float64) over all tokens of ``states`` (``[B, T, D]`` each); ``z`` is the state divided
    by its RMS over ``D`` as the weightless norm computes it (``signal="normed"``) or the raw state."""
    gram = None
    for state in states:
        z = state.reshape(-1, state.shape[-1]).double()
        if signal == "normed":
            z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)
        update = z.T @ z
        gram = update if gram is None else gram + update
    assert gram is not None  # at least one calibration batch
    return gram


def sliced_block_params(config: LlamaConfig, width: int) -> int:
    """Parameters of one sliced llama block at residual width ``width``: its Linears (biases as configured), its two
    norms and its two ``width x width`` shortcuts."""
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    heads = int(config.num_attention_heads)
    q_out, kv_out = heads * head_dim, int(config.num_key_value_heads or heads) * head_dim
    inter = int(config.intermediate_size)
    attn_bias, mlp_bias = bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False))
    attention = width * (q_out + 2 * kv_out) + q_out * width + attn_bias * (q_out + 2 * kv_out + width)
    mlp = 3 * width * inter + mlp_bias * (2 * inter + width)
    return attention + mlp + 2 * width + 2 * width * width


def width_for_ratio(config: LlamaConfig, ratio: float, dense_block_params: int) -> tuple[int, float]:
    """The width ``d'`` (a multiple of 8, at most ``D``) whose block ratio ``1 - L p(d') / dense`` is closest to
    ``ratio``, and that ratio. One-line error when none is within 0.05 of the request."""
    layers = config.num_hidden_layers
    widths = list(range(WIDTH_MULTIPLE, config.hidden_size + 1, WIDTH_MULTIPLE))
    ratios = [1 - layers * sliced_block_params(config, w) / dense_block_params for w in widths]
    best = min(range(len(widths)), key=lambda i: abs(ratios[i] - ratio))
    if abs(ratios[best] - ratio) > RATIO_TOLERANCE:
        low, high = max(0.0, min(ratios)), max(ratios)
        raise LeanfmError(f"ratio {ratio} is out of reach for slicegpt on this model; accepted: {low:.3f} <= ratio "
                          f"<= {high:.3f} (widths {widths[0]}..{widths[-1]} in steps of {WIDTH_MULTIPLE})")
    return widths[best], ratios[best]


@torch.no_grad()
def _load(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Copy ``weight`` (and ``bias``) into a Linear or an Embedding, in its own dtype."""
    target = cast(nn.Linear, module)  # both hold .weight; an Embedding has no .bias
    target.weight.copy_(weight.to(target.weight.dtype))
    if getattr(module, "bias", None) is not None:
        assert bias is not None  # sliced Linears have a bias exactly where the dense ones do
        target.bias.copy_(bias.to(target.bias.dtype))


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.double()


@torch.no_grad()
def _slice_block(dense: Any, layer: Any, states: list[torch.Tensor], u_in: torch.Tensor, kwargs: dict,
                 width: int, basis: Basis, signal: str, eps: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Fill sliced block ``layer`` (a :class:`SlicedLlamaDecoderLayer`) from the folded dense ``LlamaDecoderLayer``
    ``dense``; ``states`` are its ``d'``-dim inputs in basis
    ``u_in`` ``[D, d']``. Returns the ``d'``-dim outputs and their basis (the next block's ``u_in``)."""
    attn, mlp = layer.self_attn, layer.mlp
    for name in ("q_proj", "k_proj", "v_proj"):
        src = getattr(dense.self_attn, name)
        _load(getattr(attn, name), src.weight.double() @ u_in, _bias(src))
    sliced_o, attn.o_proj = attn.o_proj, dense.self_attn.o_proj  # full-width output until U_m is known
    act = states[0].dtype
    residual = [h @ u_in.T.to(act) + attn(hidden_states=layer.input_layernorm(h), **kwargs)[0] for h in states]
    u_mid = basis(signal_gram(residual, signal, eps))[:, :width]
    attn.o_proj = sliced_o
    _load(sliced_o, u_mid.T @ dense.self_attn.o_proj.weight.double(),
          None if dense.self_attn.o_proj.bias is None else u_mid.T @ dense.self_attn.o_proj.bias.double())
    _load(layer.attn_shortcut, (u_in.T @ u_mid).T)  # Linear(h) = h S: its weight is S^T
    for name in ("gate_proj", "up_proj"):
        src = getattr(dense.mlp, name)
        _load(getattr(mlp, name), src.weight.double() @ u_mid, _bias(src))
    sliced_down, mlp.down_proj = mlp.down_proj, dense.mlp.down_proj
    middle = [r @ u_mid.to(act) for r in residual]
    del residual
    outputs = [m @ u_mid.T.to(act) + mlp(layer.post_attention_layernorm(m)) for m in middle]
    u_out = basis(signal_gram(outputs, signal, eps))[:, :width]
    mlp.down_proj = sliced_down
    _load(sliced_down, u_out.T @ dense.mlp.down_proj.weight.double(),
          None if dense.mlp.down_proj.bias is None else u_out.T @ dense.mlp.down_proj.bias.double())
    _load(layer.mlp_shortcut, (u_mid.T @ u_out).T)
    return [y @ u_out.to(act) for y in outputs], u_out


@torch.no_grad()
def slice_model(model: nn.Module, calib: torch.Tensor, width: int, batch_size: int = 4, signal: str = "normed",
                basis: Basis = pca_basis, compression: dict[str, Any] | None = None) -> SlicedLlamaForCausalLM:
    """Rotate and slice dense llama ``model`` to residual width ``width`` on calibration ids ``calib`` ``[N, T]``.

    Returns a new :class:`SlicedLlamaForCausalLM`; ``model`` is left norm-folded and untied (same function).
    ``basis`` picks the directions kept (PCA by default; tests pass worse ones).
    """
    check_llama(model)
    dense = cast(Any, model)
    config = cast(LlamaConfig, dense.config)
    if not 0 < width <= config.hidden_size:
        raise LeanfmError(f"width {width} is out of range; accepted: 1..{config.hidden_size}")
    dtype = dense.lm_head.weight.dtype
    fold_norms(model)
    sliced = SlicedLlamaForCausalLM(sliced_config(config, width, compression)).to(dtype).eval()
    sliced.generation_config = dense.generation_config
    eps = float(config.rms_norm_eps)
    inputs, kwargs = capture_block_inputs(model, calib, batch_size)
    u = basis(signal_gram(inputs, signal, eps))[:, :width]
    _load(sliced.model.embed_tokens, dense.model.embed_tokens.weight.double() @ u)
    states = [x @ u.to(x.dtype) for x in inputs]
    del inputs
    for index, (dense_layer, layer) in enumerate(zip(dense.model.layers, sliced.model.layers, strict=True)):
        states, u = _slice_block(dense_layer, layer, states, u, kwargs, width, basis, signal, eps)
        log.debug("slicegpt: block %d sliced to %d dims", index, width)
    _load(sliced.lm_head, dense.lm_head.weight.double() @ u, _bias(dense.lm_head))
    return sliced


def adopt(model: nn.Module, sliced: nn.Module) -> None:
    """Make ``model`` *be* ``sliced`` (class and state), so that compressing "in place" holds for callers that keep
    their reference to ``model`` (the CLI saves the object it passed in)."""
    model.__class__ = sliced.__class__
    model.__dict__.clear()
    model.__dict__.update(sliced.__dict__)


def compress_slicegpt(model: nn.Module, tokenizer: Any, config: SliceGptConfig) -> SliceGptReport:
    """Slice ``model`` in place with SliceGPT at ``config.ratio`` of its block parameters (the ``compress`` entry)."""
    start = time.perf_counter()
    check_llama(model)
    dense_config = cast(LlamaConfig, cast(Any, model).config)
    params_before, block_before = count_parameters(model), block_parameter_count(model)
    width, planned = width_for_ratio(dense_config, config.ratio, block_before)
    log.info("slicegpt: residual width %d of %d (block ratio %.4f)", width, dense_config.hidden_size, planned)
    calib = calibration_for(tokenizer, config)
    origin, device = next(model.parameters()).device, resolve_device(config.device)
    with on_device(device):  # the sliced model is built, and its bases computed, on the run's device
        sliced = slice_model(model.to(device), calib.to(device), width, config.batch_size, config.signal,
                             compression={"method": "slicegpt", "width": width, **config.to_dict()})
    adopt(model, sliced)
    model.to(origin)
    layers = cast(Any, model).model.layers
    block_after = sum(p.numel() for p in layers.parameters())
    params_after = count_parameters(model)
    achieved = 1 - block_after / block_before
    return record_ratios(model, SliceGptReport(
        method="slicegpt", ratio=config.ratio, params_before=params_before, params_after=params_after,
        block_params_before=block_before, block_params_after=block_after, achieved_ratio=achieved,
        layer_sparsity=[round(achieved, 4)] * len(layers), seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
        calibration=calibration_record(config, calib),
        width=width, hidden_size=int(dense_config.hidden_size),
    ))


register_method("slicegpt", "compress", SliceGptConfig, compress_slicegpt,
                description="baseline: SliceGPT, PCA rotation of the residual stream sliced to one width (llama only)")
