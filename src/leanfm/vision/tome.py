"""ToMe baseline: token merging by size-weighted averaging in every layer (Bolya et al., 2023).

``apply_patch(model, r)`` / ``remove_patch(model)`` — the interface ToMe users know — on a transformers
``ViTModel`` or ``ViTForImageClassification``.
"""

from __future__ import annotations

from torch import nn

from leanfm.vision.patch import RValue, apply_token_reduction, expand_r, remove_patch, token_count, vit_layers

__all__ = ["apply_patch", "remove_patch"]


def apply_patch(model: nn.Module, r: RValue = 0, proportional_attention: bool = True) -> nn.Module:
    """Merge ``r`` tokens per layer (a constant or a per-layer list) by weighted averaging."""
    layers = len(vit_layers(model))
    schedule = expand_r(r, layers, token_count(model))
    return apply_token_reduction(model, schedule, ["average"] * layers, proportional_attention)
