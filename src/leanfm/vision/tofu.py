"""ToFu: token fusion — prune in early layers, MLERP-merge in later layers (Kim et al., 2024).

ToFu builds on ToMe's bipartite soft matching but picks the reduction per layer: where a layer's response to
interpolated inputs is far from linear, averaging tokens would produce inputs the layer never saw, so those
(early) layers *prune*; later layers *merge* with MLERP, which keeps the norm of the largest token in a group.

``prune_layers`` chooses the split: an int (the first ``prune_layers`` layers prune), ``"half"`` (the common
reimplementation default) or a list of booleans. :func:`linearity_profile` measures the paper's criterion
on calibration images and :func:`split_by_linearity` turns it into a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanfm.config import option, register_method
from leanfm.errors import LeanfmError
from leanfm.vision.patch import (
    RValue,
    _is_timm_vit,
    _vit_body,
    apply_token_reduction,
    expand_r,
    remove_patch,
    token_count,
    vit_layers,
)
from leanfm.vision.tome import TomeConfig

__all__ = ["TofuConfig", "apply_patch", "linearity_profile", "remove_patch", "split_by_linearity"]
MERGES = ("mlerp", "average")


@dataclass
class TofuConfig(TomeConfig):
    """ToMe's settings plus where pruning stops and how later layers merge."""

    prune_layers: int | str = option("half", "leading layers that prune: 'half' or N (the rest merge)")
    merge: str = option("mlerp", "merge in the later layers", choices=MERGES)
    size_transfer: bool = option(False, "pruning adds each dropped token's size to its matched partner (ours, an "
                                 "ablation: proportional attention then keeps the dropped mass)")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.prune_layers, str) and self.prune_layers != "half":
            if not self.prune_layers.isdigit():
                raise LeanfmError(f"prune_layers '{self.prune_layers}' is invalid; accepted: half or an integer >= 0")
            self.prune_layers = int(self.prune_layers)


def apply_patch(
    model: nn.Module,
    r: RValue = 0,
    prune_layers: int | str | list[bool] = "half",
    merge: str = "mlerp",
    proportional_attention: bool = True,
    size_transfer: bool = False,
) -> nn.Module:
    """Patch ``model`` in place: ``r`` tokens per layer, pruned in the early layers and merged later."""
    if merge not in MERGES:
        raise LeanfmError(f"unknown merge '{merge}'; accepted: {', '.join(MERGES)}")
    layers = len(vit_layers(model))
    schedule = expand_r(r, layers, token_count(model))
    if prune_layers == "half":
        prune = [i < layers // 2 for i in range(layers)]
    elif isinstance(prune_layers, int):
        if not 0 <= prune_layers <= layers:
            raise LeanfmError(f"prune_layers {prune_layers} is out of range; accepted: 0..{layers}")
        prune = [i < prune_layers for i in range(layers)]
    elif isinstance(prune_layers, list | tuple) and len(prune_layers) == layers:
        prune = [bool(p) for p in prune_layers]
    else:
        raise LeanfmError(f"prune_layers {prune_layers!r} invalid; accepted: 'half', an int, or {layers} booleans")
    pruning = "prune-transfer" if size_transfer else "prune"
    modes = [pruning if p else merge for p in prune]
    return apply_token_reduction(model, schedule, modes, proportional_attention)


def apply_config(model: nn.Module, config: TofuConfig) -> nn.Module:
    """The registry's entry point: :func:`apply_patch` with ``config``'s settings."""
    return apply_patch(model, config.schedule(), config.prune_layers, config.merge, config.proportional_attention,
                       config.size_transfer)


@torch.no_grad()
def linearity_profile(model: nn.Module, pixel_values: torch.Tensor, alphas: int = 5) -> list[float]:
    """Per layer: relative error of ``f(a x1 + (1-a) x2)`` vs ``a f(x1) + (1-a) f(x2)`` on real tokens.

    ``x1``, ``x2`` are the inputs of the layer for two halves of ``pixel_values``; lower means more linear.
    """
    body, layers = _vit_body(model), vit_layers(model)
    inputs: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for layer in layers]
    try:
        body(pixel_values) if _is_timm_vit(body) else body(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    half = pixel_values.shape[0] // 2
    errors = []
    for layer, x in zip(layers, inputs, strict=True):
        x1, x2 = x[:half], x[half : 2 * half]
        f1, f2 = layer(x1), layer(x2)
        f1, f2 = (f[0] if isinstance(f, tuple) else f for f in (f1, f2))
        total = 0.0
        for a in torch.linspace(0.1, 0.9, alphas).tolist():
            mixed = layer(a * x1 + (1 - a) * x2)
            mixed = mixed[0] if isinstance(mixed, tuple) else mixed
            linear = a * f1 + (1 - a) * f2
            total += float((mixed - linear).norm() / linear.norm().clamp_min(1e-6))
        errors.append(total / alphas)
    return errors


def split_by_linearity(errors: list[float], threshold: float | None = None) -> int:
    """Number of leading layers to prune: those before the first layer whose error drops below ``threshold``.

    The default threshold is the mean error over layers.
    """
    limit = sum(errors) / len(errors) if threshold is None else threshold
    return next((i for i, e in enumerate(errors) if e < limit), len(errors))


register_method("tofu", "patch", TofuConfig, apply_config, undo=remove_patch,
                description="ToFu: prune tokens in early layers, MLERP-merge them in later layers")
