"""Patch a transformers ViT in place so its layers reduce tokens (ToMe / ToFu), and undo it.

Like ToMe's ``apply_patch``: the host's existing ``ViTLayer`` objects get their ``__class__`` swapped to a
subclass whose forward adds, between attention and MLP, one bipartite-matching step; weights and
``state_dict`` keys are untouched, and :func:`remove_patch` swaps the classes back. Per-forward state (token
sizes, token counts) is a fresh :class:`ForwardState` created by a pre-hook on the root model and indexed by
layer, never popped. Keys for the similarity metric are read from the attention's own ``k_proj`` by a forward
hook (no recomputation). Proportional attention adds ``log(size)`` to the attention logits through the
attention mask argument the host already has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.vision.merge import MODES, bipartite_soft_matching, reduce_tokens


@dataclass
class ForwardState:
    """What one forward pass carries from layer to layer."""

    size: torch.Tensor | None = None  # [B, N, 1] patches each token stands for; None until the first reduction
    tokens: list[int] = field(default_factory=list)  # token count entering each layer (for inspection/tests)


@dataclass
class TokenReduction:
    """A patch's settings: tokens removed and reduction mode per layer."""

    r: list[int]
    modes: list[str]
    proportional_attention: bool = True
    state: ForwardState = field(default_factory=ForwardState)
    handles: list[Any] = field(default_factory=list)


def _vit_body(model: nn.Module) -> nn.Module:
    body = getattr(model, "vit", model)
    if not hasattr(body, "layers") or not hasattr(body, "embeddings"):
        kind = type(model).__name__
        raise LeanfmError(f"apply_patch expects a transformers ViTModel/ViTForImageClassification, got {kind}")
    return body


def token_count(model: nn.Module) -> int:
    """Tokens entering the first layer: patches plus the class token."""
    cfg = model.config
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


def expand_r(r: int | list[int] | tuple[int, ...], layers: int, tokens: int) -> list[int]:
    """Per-layer r from a constant or a list; one-line errors for negatives or r above 50% of the tokens."""
    schedule = [int(r)] * layers if isinstance(r, int) else [int(v) for v in r]
    if len(schedule) != layers:
        raise LeanfmError(f"r has {len(schedule)} entries; accepted: one per layer ({layers})")
    for index, value in enumerate(schedule):
        if value < 0:
            raise LeanfmError(f"r {value} at layer {index} is negative; accepted: 0 <= r <= 50% of the tokens")
        if value > (tokens - 1) // 2:
            raise LeanfmError(
                f"r {value} at layer {index} removes more than 50% of its {tokens} tokens; "
                f"accepted: r <= {(tokens - 1) // 2}"
            )
        tokens -= value
    return schedule


class TokenReducingViTLayer(nn.Module):
    """Forward of a patched ``ViTLayer``: attention, token reduction, MLP (the host's own submodules)."""

    _leanfm_reduction: TokenReduction
    _leanfm_index: int
    _leanfm_keys: torch.Tensor | None

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        reduction, index = self._leanfm_reduction, self._leanfm_index
        state, r = reduction.state, reduction.r[index]
        state.tokens.append(hidden_states.shape[1])
        mask = attention_mask
        if reduction.proportional_attention and state.size is not None:  # sizes exist once tokens were reduced
            bias = state.size.log()[:, None, None, :, 0].to(hidden_states.dtype)  # [B, 1, 1, N]
            mask = bias if mask is None else mask + bias
        attended, _ = self.attention(self.layernorm_before(hidden_states), mask, **kwargs)
        hidden_states = hidden_states + self.dropout(attended)
        if r > 0:
            keys = self._leanfm_keys  # [B, N, heads * head_dim]
            metric = keys.view(*keys.shape[:2], self.attention.num_attention_heads, -1).mean(2)  # [B, N, head_dim]
            matching = bipartite_soft_matching(metric, r, protect_first=True)
            if state.size is None:
                state.size = hidden_states.new_ones(*hidden_states.shape[:2], 1)
            hidden_states, state.size = reduce_tokens(hidden_states, state.size, matching, reduction.modes[index])
        self._leanfm_keys = None
        out = self.mlp(self.layernorm_after(hidden_states))
        return hidden_states + self.dropout(out)


def apply_token_reduction(
    model: nn.Module, r: list[int], modes: list[str], proportional_attention: bool = True
) -> nn.Module:
    """Patch every layer of ``model`` in place (see the module docstring); returns ``model``."""
    body = _vit_body(model)
    remove_patch(model)
    layers = list(body.layers)
    if len(modes) != len(layers) or any(m not in MODES for m in modes):
        raise LeanfmError(f"modes must list one of {', '.join(MODES)} per layer ({len(layers)})")
    reduction = TokenReduction(list(r), list(modes), proportional_attention)

    def reset(_module: nn.Module, _args: tuple) -> None:
        reduction.state = ForwardState()

    reduction.handles.append(body.register_forward_pre_hook(reset))
    for index, layer in enumerate(layers):
        layer._leanfm_original_class = layer.__class__
        layer.__class__ = type("TokenReducing" + layer.__class__.__name__, (TokenReducingViTLayer, layer.__class__), {})
        layer._leanfm_reduction, layer._leanfm_index, layer._leanfm_keys = reduction, index, None

        def keep_keys(_m: nn.Module, _args: tuple, out: torch.Tensor, layer: nn.Module = layer) -> None:
            layer._leanfm_keys = out

        reduction.handles.append(layer.attention.k_proj.register_forward_hook(keep_keys))
    model._leanfm_reduction = reduction
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_reduction` (a no-op on an unpatched model); returns ``model``."""
    reduction = getattr(model, "_leanfm_reduction", None)
    if reduction is None:
        return model
    for handle in reduction.handles:
        handle.remove()
    for layer in _vit_body(model).layers:
        layer.__class__ = layer._leanfm_original_class
        for attr in ("_leanfm_original_class", "_leanfm_reduction", "_leanfm_index", "_leanfm_keys"):
            delattr(layer, attr)
    del model._leanfm_reduction
    return model
