"""SliceGPT checkpoints: a llama whose residual stream was rotated and sliced to ``d' < D`` dims.

Why a class of its own: after SliceGPT (Ashkboos et al., ICLR 2024) every block reads and writes a residual stream
of width ``d'`` (``hidden_size = d'``), but consecutive blocks read it in different orthogonal bases, so the residual
path of each block carries two ``d' x d'`` "shortcut" matrices: ``h <- h S_attn + attn(h)`` and
``h <- h S_mlp + mlp(h)`` with ``S = U_prev^T U_next`` (see :mod:`leanfm.compress.slicegpt`). No stock llama layer
has them; :class:`SlicedLlamaDecoderLayer` adds them, everything else (attention with its original heads and
``head_dim``, rotary embeddings, KV cache, ``generate()``) is the base llama's own.

RMSNorm over ``d'`` dims: SliceGPT's norms are weightless RMSNorms that still divide by the *original* width,
``N(h) = h / sqrt(|h|^2 / D + eps)`` (the official code's ``RMSN(mean_dim=D)``), so that an orthogonal rotation
and a slice that drops nothing change nothing. A stock ``LlamaRMSNorm`` over ``d'`` dims computes
``g * h / sqrt(|h|^2 / d' + eps')``. Choosing ``g = sqrt(D / d')`` and ``eps' = eps * D / d'``:
``sqrt(D/d') * h / sqrt(|h|^2/d' + eps D/d') = h / sqrt(|h|^2/D + eps)`` — exactly ``N(h)`` (divide the root by
``D/d'``). So the checkpoint stores ``rms_norm_eps = eps * D / d'`` in its config and norm weights equal to
``sqrt(D / d')``; at ``d' = D`` both are the dense model's own values.

The classes live in :mod:`leanfm.models.modeling_leanfm` (torch and transformers only, so an exported folder
loads without leanfm); this module re-exports them and registers them. After ``import leanfm`` (which imports
:mod:`leanfm.models`), ``AutoModelForCausalLM.from_pretrained(folder)`` loads such a checkpoint without
``trust_remote_code``. The config sets no ``base_model_type``: the architecture adapters do not know
this layer, so compressing a sliced model again is refused with a one-line error.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from leanfm.models.modeling_leanfm import (
    SlicedLlamaConfig,
    SlicedLlamaDecoderLayer,
    SlicedLlamaForCausalLM,
    norm_scale,
    sliced_config,
)

__all__ = ["SlicedLlamaConfig", "SlicedLlamaDecoderLayer", "SlicedLlamaForCausalLM", "norm_scale", "sliced_config"]

AutoConfig.register(SlicedLlamaConfig.model_type, SlicedLlamaConfig)
AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM)
