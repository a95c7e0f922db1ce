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

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import nn
from transformers import PretrainedConfig

from leanfm.errors import LeanfmError
from leanfm.vision.merge import MODES, bipartite_soft_matching, reduce_tokens

RValue = int | list[int] | tuple[int, float]  # constant, per layer, or ToMe's (r, inflect) schedule


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
    protect_first: bool = True  # token 0 is a class token kept out of every merge
    state: ForwardState = field(default_factory=ForwardState)
    handles: list[Any] = field(default_factory=list)


class _ViTAttention(Protocol):
    """What the patch uses of a transformers ``ViTAttention``."""

    num_attention_heads: int
    k_proj: nn.Module

    def __call__(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None,
                 **kwargs: Any) -> tuple[torch.Tensor, Any]: ...


class _TimmAttention(Protocol):
    """What the patch uses of a timm ``Attention`` (timm is an optional extra, untyped here)."""

    num_heads: int
    head_dim: int
    qkv: nn.Module

    def __call__(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False) -> torch.Tensor: ...


class _TimmVisionTransformer(Protocol):
    """What the patch reads from a timm ``VisionTransformer``."""

    patch_embed: Any
    num_prefix_tokens: int


def _vit_body(model: nn.Module) -> nn.Module:
    """The module holding the blocks: ``model.vit`` / a ``ViTModel`` (transformers) or a timm ViT itself."""
    body = getattr(model, "vit", model)
    if hasattr(body, "layers") and hasattr(body, "embeddings"):
        return body
    if _is_timm_vit(model):
        return model
    kind = type(model).__name__
    raise LeanfmError(f"apply_patch expects a transformers ViTModel/ViTForImageClassification or a timm "
                      f"VisionTransformer, got {kind}")


def _is_timm_vit(model: nn.Module) -> bool:
    return hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def vit_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers or timm ViT, in order."""
    body = _vit_body(model)
    blocks = body.blocks if _is_timm_vit(body) else body.layers
    return list(cast(Iterable[nn.Module], blocks))  # a ModuleList (transformers) or a Sequential (timm)


def token_count(model: nn.Module) -> int:
    """Tokens entering the first layer: patches plus the class token (timm: plus its prefix tokens)."""
    if _is_timm_vit(model):
        timm_vit = cast(_TimmVisionTransformer, model)
        return int(timm_vit.patch_embed.num_patches) + int(timm_vit.num_prefix_tokens)
    cfg = cast(PretrainedConfig, model.config)
    return (cfg.image_size // cfg.patch_size) ** 2 + 1


def _protects_class_token(model: nn.Module) -> bool:
    """Whether token 0 is a class token to keep out of merges (timm models may pool without one)."""
    if not _is_timm_vit(model):
        return True
    prefix_tokens = cast(_TimmVisionTransformer, model).num_prefix_tokens
    if prefix_tokens > 1:
        raise LeanfmError(f"timm ViT with {prefix_tokens} prefix tokens (register/distillation tokens); "
                          "accepted: a class token only, or none")
    return prefix_tokens == 1


def parse_r(value: RValue | str) -> RValue:
    """``r`` as given on a command line or in JSON: ``"16"`` -> 16, ``"8,8,4"`` -> [8, 8, 4]; values pass through.

    Range checks need the model (its depth and token count) and happen in :func:`expand_r`.
    """
    if isinstance(value, str):
        try:
            values = [int(v) for v in value.split(",")]
        except ValueError:
            raise LeanfmError(f"r '{value}' is invalid; accepted: an integer or a comma-separated list of integers"
                              ) from None
        return values[0] if len(values) == 1 else values
    if isinstance(value, bool) or not isinstance(value, int | list | tuple):
        raise LeanfmError(f"r {value!r} is invalid; accepted: an integer, a list of integers or (r, inflect)")
    return list(value) if isinstance(value, list) else value


def expand_r(r: RValue, layers: int, tokens: int) -> list[int]:
    """Per-layer r from a constant, a per-layer list, or a schedule ``(r, inflect)`` (a tuple).

    The schedule follows ToMe's ``parse_r``: r per layer changes linearly from ``r * (1 - inflect)`` in the first
    layer to ``r * (1 + inflect)`` in the last (the mean stays r), so ``inflect`` -1 removes ``2r`` first and
    none last, 0 is constant, +1 the reverse. One-line errors for negatives, r above 50% of a layer's tokens,
    an inflection outside [-1, 1] or a list of the wrong length.
    """
    if isinstance(r, tuple):
        if len(r) != 2 or not -1 <= float(r[1]) <= 1:
            raise LeanfmError(f"r schedule {r!r} is invalid; accepted: (r, inflect) with -1 <= inflect <= 1")
        first = r[0] * (1 - float(r[1]))
        last = 2 * r[0] - first
        step = (last - first) / max(layers - 1, 1)
        schedule = [int(first + step * i) for i in range(layers)]
    else:
        schedule = [int(r)] * layers if isinstance(r, int) else [int(v) for v in r]
    if len(schedule) != layers:
        raise LeanfmError(f"r has {len(schedule)} entries; accepted: one per layer ({layers}), a constant, "
                          "or (r, inflect) with -1 <= inflect <= 1")
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


class _TokenReducingBlock(nn.Module):
    """What both hosts share: reading the per-forward state and reducing tokens between attention and MLP."""

    _leanfm_original_class: type[nn.Module]  # the host class, restored by remove_patch
    _leanfm_reduction: TokenReduction
    _leanfm_index: int
    _leanfm_keys: torch.Tensor | None  # the key source's output, stored by a forward hook

    def _attention_bias(self, hidden_states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """Record the token count; add proportional attention's ``log(size)`` to ``mask`` once sizes exist."""
        state = self._leanfm_reduction.state
        state.tokens.append(hidden_states.shape[1])
        if self._leanfm_reduction.proportional_attention and state.size is not None:
            bias = state.size.log()[:, None, None, :, 0].to(hidden_states.dtype)  # [B, 1, 1, N]
            return bias if mask is None else mask + bias
        return mask

    def _metric(self, keys: torch.Tensor) -> torch.Tensor:
        """Head-averaged keys ``[B, N, head_dim]`` from the key source's output (host specific)."""
        raise NotImplementedError(f"{type(self).__name__} must define _metric (each host block subclass does)")

    def _key_source(self) -> nn.Module:
        """The module whose output :meth:`_metric` reads (host specific)."""
        raise NotImplementedError(f"{type(self).__name__} must define _key_source (each host block subclass does)")

    def _reduce(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Match on the head-averaged keys and remove this layer's r tokens (ToMe's placement)."""
        reduction, index = self._leanfm_reduction, self._leanfm_index
        keys, self._leanfm_keys = self._leanfm_keys, None
        r = reduction.r[index]
        if r == 0:
            return hidden_states
        state = reduction.state
        assert keys is not None  # stored by the key source's forward hook during attention
        matching = bipartite_soft_matching(self._metric(keys), r, protect_first=reduction.protect_first)
        if state.size is None:
            state.size = hidden_states.new_ones(*hidden_states.shape[:2], 1)
        hidden_states, state.size = reduce_tokens(hidden_states, state.size, matching, reduction.modes[index])
        return hidden_states


class TokenReducingViTLayer(_TokenReducingBlock):
    """Forward of a patched transformers ``ViTLayer``: attention, token reduction, MLP (its own submodules)."""

    attention: _ViTAttention  # the host ViTLayer's submodules
    layernorm_before: nn.Module
    layernorm_after: nn.Module
    mlp: nn.Module
    dropout: nn.Module

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        mask = self._attention_bias(hidden_states, attention_mask)
        attended, _ = self.attention(self.layernorm_before(hidden_states), mask, **kwargs)
        hidden_states = self._reduce(hidden_states + self.dropout(attended))
        out = self.mlp(self.layernorm_after(hidden_states))
        return hidden_states + self.dropout(out)

    def _metric(self, keys: torch.Tensor) -> torch.Tensor:  # keys: k_proj output [B, N, heads * head_dim]
        return keys.view(*keys.shape[:2], self.attention.num_attention_heads, -1).mean(2)

    def _key_source(self) -> nn.Module:
        return self.attention.k_proj


class TokenReducingTimmBlock(_TokenReducingBlock):
    """Forward of a patched timm ``Block``: the same steps with timm's layer-scale and drop-path."""

    attn: _TimmAttention  # the host Block's submodules
    norm1: nn.Module
    norm2: nn.Module
    ls1: nn.Module
    ls2: nn.Module
    drop_path1: nn.Module
    drop_path2: nn.Module
    mlp: nn.Module

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        mask = self._attention_bias(x, attn_mask)
        x = self._reduce(x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=mask, is_causal=is_causal))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def _metric(self, keys: torch.Tensor) -> torch.Tensor:  # keys: fused qkv output [B, N, 3 * heads * head_dim]
        return keys.view(*keys.shape[:2], 3, self.attn.num_heads, self.attn.head_dim)[:, :, 1].mean(2)

    def _key_source(self) -> nn.Module:
        return self.attn.qkv


def apply_token_reduction(
    model: nn.Module, r: list[int], modes: list[str], proportional_attention: bool = True
) -> nn.Module:
    """Patch every block of ``model`` in place (see the module docstring); returns ``model``."""
    body = _vit_body(model)
    remove_patch(model)
    layers = vit_layers(model)
    timm = _is_timm_vit(body)
    if len(modes) != len(layers) or any(m not in MODES for m in modes):
        raise LeanfmError(f"modes must list one of {', '.join(MODES)} per layer ({len(layers)})")
    reduction = TokenReduction(list(r), list(modes), proportional_attention, _protects_class_token(body))

    def reset(_module: nn.Module, _args: tuple) -> None:
        reduction.state = ForwardState()

    reduction.handles.append(body.register_forward_pre_hook(reset))
    mixin = TokenReducingTimmBlock if timm else TokenReducingViTLayer
    for index, layer in enumerate(layers):
        original = layer.__class__
        layer.__class__ = type("TokenReducing" + original.__name__, (mixin, original), {})
        block = cast(_TokenReducingBlock, layer)  # the class swap just made it one
        block._leanfm_original_class = original
        block._leanfm_reduction, block._leanfm_index, block._leanfm_keys = reduction, index, None

        def keep_keys(_m: nn.Module, _args: tuple, out: torch.Tensor, block: _TokenReducingBlock = block) -> None:
            block._leanfm_keys = out

        reduction.handles.append(block._key_source().register_forward_hook(keep_keys))
    model._leanfm_reduction = reduction  # type: ignore[assignment]  # torch's stub: Module.__setattr__ takes any value
    return model


def remove_patch(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_token_reduction` (a no-op on an unpatched model); returns ``model``."""
    reduction = getattr(model, "_leanfm_reduction", None)
    if reduction is None:
        return model
    for handle in reduction.handles:
        handle.remove()
    for layer in vit_layers(model):
        layer.__class__ = cast(_TokenReducingBlock, layer)._leanfm_original_class
        for attr in ("_leanfm_original_class", "_leanfm_reduction", "_leanfm_index", "_leanfm_keys"):
            delattr(layer, attr)
    del model._leanfm_reduction
    return model
