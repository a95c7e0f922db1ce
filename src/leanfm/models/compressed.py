"""Compressed checkpoints: per-layer widths recorded in the config, loadable with ``from_pretrained``.

Why: structured compression (MoDeGPT, DISP-LLM, the baselines) gives every layer its own MLP width and its own
query/key and value head sizes, which no stock transformers config can express. For each supported base
architecture there is a config subclass (``model_type = "leanfm_<base>"``) carrying ``leanfm_layers`` and a
model subclass of the base ``*ForCausalLM`` whose constructor rebuilds the smaller layers. After
``import leanfm``, ``AutoModelForCausalLM.from_pretrained(folder)`` therefore works without
``trust_remote_code`` (the classes registered here win), and ``generate()`` is the base class's own.

The classes themselves live in :mod:`leanfm.models.modeling_leanfm`, a file that needs only torch and
transformers: every saved folder's ``config.json`` names them in ``auto_map`` (:func:`auto_map`), and
``leanfm export DIR --standalone`` copies that file (:func:`standalone_file`) next to the weights so that stock
transformers loads the folder with ``trust_remote_code=True``. This module re-exports them, registers them
with the Auto classes and adds what needs leanfm's architecture adapters (:func:`dense_spec`, :func:`finalize`).

Attention with compressed heads is :class:`CompressedAttention`. Query/key head dims are laid out
``[kept rotary first halves (P) | their partners (P) | kept non-rotary dims]``; each kept rotary pair keeps its
*original* frequency (``rope_index``), because a rotary embedding rebuilt for the smaller head size would
rotate with different frequencies and silently wreck the model (METHODS.md, MoDeGPT type II).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

import leanfm.models.modeling_leanfm as modeling_leanfm
from leanfm.models.adapters import ArchAdapter, AttentionLayout, get_adapter
from leanfm.models.modeling_leanfm import (
    BLOCK_PATHS,
    COMPRESSED_CLASSES,
    ChannelLinear,
    CompressedAttention,
    DispLlamaDecoderLayer,
    LayerSpec,
    LowRankLinear,
    restructure_block,
    rotate_half,
)

__all__ = [
    "BLOCK_PATHS", "COMPRESSED_CLASSES", "ChannelLinear", "CompressedAttention", "DispLlamaDecoderLayer",
    "LayerSpec", "LowRankLinear", "auto_map", "dense_spec", "finalize", "restructure_block", "rotate_half",
    "standalone_file",
]

for _config_cls, _model_cls in COMPRESSED_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls)
    AutoModelForCausalLM.register(_config_cls, _model_cls)


def standalone_file() -> Path:
    """The modeling file that ``leanfm export --standalone`` copies into a compressed folder."""
    return Path(modeling_leanfm.__file__)


def auto_map(model_type: str) -> dict[str, str] | None:
    """``config.json``'s ``auto_map`` for a leanfm ``model_type`` (None for any other model type).

    transformers resolves ``"modeling_leanfm.LeanfmLlamaConfig"`` to class ``LeanfmLlamaConfig`` of the file
    ``modeling_leanfm.py`` in the checkpoint folder, when loading with ``trust_remote_code=True``.
    """
    module = modeling_leanfm.__name__.rpartition(".")[2]
    classes = {config_cls.model_type: (config_cls, model_cls) for config_cls, model_cls in COMPRESSED_CLASSES.values()}
    classes[modeling_leanfm.SlicedLlamaConfig.model_type] = (modeling_leanfm.SlicedLlamaConfig,
                                                              modeling_leanfm.SlicedLlamaForCausalLM)
    if model_type not in classes:
        return None
    config_cls, model_cls = classes[model_type]
    return {"AutoConfig": f"{module}.{config_cls.__name__}", "AutoModelForCausalLM": f"{module}.{model_cls.__name__}"}


def dense_spec(model: nn.Module, adapter: ArchAdapter, index: int) -> LayerSpec:
    """The spec that keeps block ``index`` at full size (identity compression)."""
    layout: AttentionLayout = adapter.layout(model)
    parts = adapter.parts(adapter.blocks(model)[index])
    pairs = layout.rotary_dim // 2
    return LayerSpec(
        intermediate=parts.mlp_out.in_features, qk_dim=layout.head_dim, v_dim=layout.head_dim,
        rope_index=[list(range(pairs)) for _ in range(layout.num_kv_heads)] if pairs else [],
        num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
    )


def finalize(model: nn.Module, specs: list[LayerSpec], extra: dict[str, Any] | None = None) -> nn.Module:
    """Turn an in-place restructured model into its registered compressed class (for ``save_pretrained``)."""
    base = get_adapter(model).model_type
    config_cls, model_cls = COMPRESSED_CLASSES[base]
    hf_model = cast(PreTrainedModel, model)  # get_adapter accepted it: a transformers model
    data = hf_model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data["leanfm_layers"] = [asdict(s) for s in specs]
    data["leanfm_compression"] = extra or {}
    hf_model.config = cast(PretrainedConfig, config_cls(**data))
    hf_model.config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
    return model
