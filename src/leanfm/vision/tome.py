"""ToMe baseline: token merging by size-weighted averaging in every layer (Bolya et al., 2023).

``apply_patch(model, r)`` / ``remove_patch(model)`` — the interface ToMe users know — on a transformers
``ViTModel`` or ``ViTForImageClassification`` (or a timm ``VisionTransformer``). :class:`TomeConfig` holds the
same settings for the CLI and the method registry (family ``patch``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from leanfm.config import MethodConfig, option, register_method
from leanfm.errors import LeanfmError
from leanfm.vision.patch import RValue, apply_token_reduction, expand_r, parse_r, remove_patch, token_count, vit_layers

__all__ = ["TomeConfig", "apply_patch", "remove_patch"]


@dataclass
class TomeConfig(MethodConfig):
    """Tokens removed per layer; ``r_inflect`` turns a constant ``r`` into ToMe's linear schedule."""

    r: RValue | str = option(0, "tokens removed per layer: N or a list N1,N2,... (one per layer)")
    r_inflect: float | None = option(
        None, "schedule r linearly from r*(1-x) in the first layer to r*(1+x) in the last (ToMe's inflect, -1..1)")
    proportional_attention: bool = option(True, "add log(token size) to the attention logits", cli=False)

    def validate(self) -> None:
        super().validate()
        self.r = parse_r(self.r)
        if self.r_inflect is not None:
            if not isinstance(self.r, int):
                raise LeanfmError("r_inflect needs a single r value; accepted: r N with r_inflect X")
            if not -1 <= self.r_inflect <= 1:
                raise LeanfmError(f"r_inflect {self.r_inflect} is out of range; accepted: -1 <= r_inflect <= 1")

    def schedule(self) -> RValue:
        """The ``r`` argument of :func:`apply_patch`: a constant, a list, or ``(r, inflect)``."""
        r = parse_r(self.r)
        return (r, self.r_inflect) if self.r_inflect is not None and isinstance(r, int) else r


def apply_patch(model: nn.Module, r: RValue = 0, proportional_attention: bool = True) -> nn.Module:
    """Merge ``r`` tokens per layer (a constant or a per-layer list) by weighted averaging."""
    layers = len(vit_layers(model))
    schedule = expand_r(r, layers, token_count(model))
    return apply_token_reduction(model, schedule, ["average"] * layers, proportional_attention)


def apply_config(model: nn.Module, config: TomeConfig) -> nn.Module:
    """The registry's entry point: :func:`apply_patch` with ``config``'s settings."""
    return apply_patch(model, config.schedule(), config.proportional_attention)


register_method("tome", "patch", TomeConfig, apply_config, undo=remove_patch,
                description="ToMe: bipartite token merging by weighted averaging in every layer")
