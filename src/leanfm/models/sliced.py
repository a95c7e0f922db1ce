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

After ``import leanfm`` (which imports :mod:`leanfm.models`), ``AutoModelForCausalLM.from_pretrained(folder)`` loads
such a checkpoint without ``trust_remote_code``. The config sets no ``base_model_type``: the architecture adapters
do not know this layer, so compressing a sliced model again is refused with a one-line error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer


class SlicedLlamaConfig(LlamaConfig):
    """A llama config whose ``hidden_size`` is the sliced width ``d'``.

    Extra fields: ``leanfm_original_hidden_size`` (``D``), ``leanfm_original_rms_norm_eps`` (``eps``; the config's
    own ``rms_norm_eps`` is ``eps * D / d'``, see the module docstring) and ``leanfm_compression`` (the settings).
    ``head_dim`` is always written out: llama would otherwise derive it as ``d' / num_heads``.
    """

    model_type = "leanfm_sliced_llama"


def sliced_config(dense: LlamaConfig, width: int, compression: dict[str, Any] | None = None) -> SlicedLlamaConfig:
    """The config of ``dense`` sliced to residual width ``width`` (untied head, compensated norm eps)."""
    data = dense.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "tie_word_embeddings"):
        data.pop(key, None)
    hidden = int(dense.hidden_size)
    eps = float(dense.rms_norm_eps)
    data.update(
        hidden_size=width, head_dim=int(getattr(dense, "head_dim", None) or hidden // dense.num_attention_heads),
        rms_norm_eps=eps * hidden / width, leanfm_original_hidden_size=hidden, leanfm_original_rms_norm_eps=eps,
        leanfm_compression=compression or {},
    )
    config = SlicedLlamaConfig(tie_word_embeddings=False, **data)
    config.architectures = [SlicedLlamaForCausalLM.__name__]
    return config


def norm_scale(config: LlamaConfig) -> float:
    """``sqrt(D / d')``: the weight of every RMSNorm of a sliced model (1 for a dense config)."""
    return math.sqrt(getattr(config, "leanfm_original_hidden_size", config.hidden_size) / config.hidden_size)


class SlicedLlamaDecoderLayer(LlamaDecoderLayer):
    """A llama block whose two residual connections pass through ``d' x d'`` shortcut matrices.

    ``attn_shortcut`` / ``mlp_shortcut`` are bias-free Linears: ``Linear(h) = h S`` with weight ``S^T``.
    """

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        width = config.hidden_size
        self.attn_shortcut = nn.Linear(width, width, bias=False)
        self.mlp_shortcut = nn.Linear(width, width, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                position_ids: torch.LongTensor | None = None, cache: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        attended, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states), attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_shortcut(hidden_states) + attended
        return self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states))


class SlicedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` built from a :class:`SlicedLlamaConfig`: its blocks are :class:`SlicedLlamaDecoderLayer`
    and every RMSNorm starts at the compensating weight ``sqrt(D / d')``."""

    config_class = SlicedLlamaConfig

    def __init__(self, config: SlicedLlamaConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.model.layers = nn.ModuleList(
            SlicedLlamaDecoderLayer(config, index) for index in range(config.num_hidden_layers)
        )
        self.post_init()
        self.reset_norms()

    def reset_norms(self) -> None:
        """Set every RMSNorm weight to ``sqrt(D / d')`` (what a checkpoint stores anyway)."""
        scale = norm_scale(self.config)
        with torch.no_grad():
            for layer in self.model.layers:
                layer.input_layernorm.weight.fill_(scale)
                layer.post_attention_layernorm.weight.fill_(scale)
            self.model.norm.weight.fill_(scale)


AutoConfig.register(SlicedLlamaConfig.model_type, SlicedLlamaConfig)
AutoModelForCausalLM.register(SlicedLlamaConfig, SlicedLlamaForCausalLM)
