"""Compressed checkpoints: per-layer widths recorded in the config, loadable with ``from_pretrained``.

Why: structured compression (MoDeGPT, DISP-LLM, the baselines) gives every layer its own MLP width and its own
query/key and value head sizes, which no stock transformers config can express. For each supported base
architecture we register a config subclass (``model_type = "leanfm_<base>"``) carrying ``leanfm_layers`` and a
model subclass of the base ``*ForCausalLM`` whose constructor rebuilds the smaller layers. After
``import leanfm``, ``AutoModelForCausalLM.from_pretrained(folder)`` therefore works without
``trust_remote_code``, and ``generate()`` is the base class's own.

This module lives in ``models`` (not ``compress``) because *loading* a compressed checkpoint is a models-layer
job: ``leanfm.load_model`` and ``import leanfm`` register these classes without importing any compressor.

Attention with compressed heads is :class:`CompressedAttention`. Query/key head dims are laid out
``[kept rotary first halves (P) | their partners (P) | kept non-rotary dims]``; each kept rotary pair keeps its
*original* frequency (``rope_index``), because a rotary embedding rebuilt for the smaller head size would
rotate with different frequencies and silently wreck the model (METHODS.md, MoDeGPT type II).
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from leanfm.models.adapters import ArchAdapter, AttentionLayout, get_adapter

_BASE_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "opt": ("OPTConfig", "OPTForCausalLM"),
    "phi": ("PhiConfig", "PhiForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
}


@dataclass
class LayerSpec:
    """Widths of one compressed block. ``rope_index[g]`` = kept rotary frequency indices of KV group ``g``."""

    intermediate: int
    qk_dim: int
    v_dim: int
    rope_index: list[list[int]]
    num_heads: int
    num_kv_heads: int
    head_dim: int  # the original head size: attention keeps its original 1/sqrt(head_dim) scaling
    low_rank: dict[str, int] = field(default_factory=dict)  # block-relative Linear path -> rank (SVD baselines)
    # DISP-LLM: kept residual channels read by attention / the MLP ("attn_in", "mlp_in") and written back by
    # them ("attn_out", "mlp_out"); the blocks keep their original attention and only their Linears shrink
    channels: dict[str, list[int]] = field(default_factory=dict)
    out_bias: bool = False  # o_proj and the MLP's output Linear carry a bias even if the base has none (FLAP)

    @property
    def rope_pairs(self) -> int:
        """Number of kept rotary pairs per head."""
        return len(self.rope_index[0]) if self.rope_index else 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a | b] -> [-b | a]`` on the last dim (the rotate_half rotary layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class CompressedAttention(nn.Module):
    """Multi-/grouped-query attention whose q/k and v head sizes were reduced independently.

    Computes the original attention scores ``q k^T / sqrt(head_dim)`` on the kept dims only; rotary pairs are
    rotated with their original frequencies (gathered from the host model's ``position_embeddings``).
    """

    is_causal = True
    is_leanfm_compressed = True  # lets the architecture adapter find q/k/v/o under uniform names

    def __init__(self, spec: LayerSpec, hidden: int, bias: dict[str, bool], layer_idx: int, config: Any) -> None:
        super().__init__()
        self.spec, self.layer_idx, self.config = spec, layer_idx, config
        self.num_key_value_groups = spec.num_heads // spec.num_kv_heads
        self.scaling = spec.head_dim**-0.5
        self.q_proj = nn.Linear(hidden, spec.num_heads * spec.qk_dim, bias=bias["q"])
        self.k_proj = nn.Linear(hidden, spec.num_kv_heads * spec.qk_dim, bias=bias["k"])
        self.v_proj = nn.Linear(hidden, spec.num_kv_heads * spec.v_dim, bias=bias["v"])
        self.o_proj = nn.Linear(spec.num_heads * spec.v_dim, hidden, bias=bias["o"])
        self._rope_index: dict[torch.device, torch.Tensor] = {}  # built lazily: __init__ may run on the meta device

    def _rotate(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor:
        """Rotate the first ``2P`` dims of ``states`` ``[B, heads, T, D]`` with each group's kept frequencies."""
        pairs = self.spec.rope_pairs
        half = cos.shape[-1] // 2
        if cos.device not in self._rope_index:
            self._rope_index[cos.device] = torch.tensor(self.spec.rope_index, dtype=torch.long, device=cos.device)
        index = self._rope_index[cos.device].repeat_interleave(heads // self.spec.num_kv_heads, dim=0)  # [heads, P]
        cos_kept = cos[..., :half][:, :, index].transpose(1, 2)  # [B, T, heads, P] -> [B, heads, T, P]
        sin_kept = sin[..., :half][:, :, index].transpose(1, 2)
        cos_kept, sin_kept = torch.cat((cos_kept, cos_kept), -1), torch.cat((sin_kept, sin_kept), -1)  # [B,h,T,2P]
        rotary, rest = states[..., : 2 * pairs], states[..., 2 * pairs :]
        rotated = rotary * cos_kept.to(states.dtype) + rotate_half(rotary) * sin_kept.to(states.dtype)
        return torch.cat((rotated, rest), dim=-1)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple:
        batch, length, _ = hidden_states.shape
        s = self.spec
        q = self.q_proj(hidden_states).view(batch, length, s.num_heads, s.qk_dim).transpose(1, 2)  # [B, H, T, Dqk]
        k = self.k_proj(hidden_states).view(batch, length, s.num_kv_heads, s.qk_dim).transpose(1, 2)  # [B, KV, T, Dqk]
        v = self.v_proj(hidden_states).view(batch, length, s.num_kv_heads, s.v_dim).transpose(1, 2)  # [B, KV, T, Dv]
        position_embeddings = kwargs.pop("position_embeddings", None)
        if s.rope_pairs and position_embeddings is not None:
            cos, sin = position_embeddings  # [B, T, rotary_dim], layout cat(freqs, freqs)
            q, k = self._rotate(q, cos, sin, s.num_heads), self._rotate(k, cos, sin, s.num_kv_heads)
        cache = next((kwargs.pop(n) for n in ("cache", "past_key_values", "layer_past") if n in kwargs), None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        for unused in ("position_ids", "use_cache", "output_attentions", "cache_position", "head_mask"):
            kwargs.pop(unused, None)
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1)), None  # out: [B, T, H, Dv]


class LowRankLinear(nn.Module):
    """``W ≈ U V``: a Linear factorised through ``rank`` dims (``down``: in -> rank, ``up``: rank -> out)."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class ChannelLinear(nn.Module):
    """A Linear that reads a subset of its input channels and/or writes a subset of its output channels.

    DISP-LLM (METHODS.md section 2) lets every block pick its own channels of the full-width residual stream:
    ``y = index_add(0, S_out, W[S_out, S_in] x[S_in] + b[S_out])``. ``in_features``/``out_features`` are the
    full widths the surrounding model sees, so the block's own forward is unchanged.
    """

    def __init__(self, in_features: int, out_features: int, in_index: list[int] | None, out_index: list[int] | None,
                 bias: bool, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_index, self.out_index = in_index, out_index  # python lists: safe under meta-device init
        rows = len(out_index) if out_index is not None else out_features
        cols = len(in_index) if in_index is not None else in_features
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, dtype=dtype)) if bias else None
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _tensor(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._index:
            self._index[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=device)
        return self._index[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(-1, self._tensor("in_index", x.device))
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.out_index is None:
            return y
        full = y.new_zeros(*y.shape[:-1], self.out_features)
        return full.index_copy(-1, self._tensor("out_index", y.device), y)

    def extra_repr(self) -> str:
        return f"in={self.in_features}->{self.weight.shape[1]}, out={self.weight.shape[0]}->{self.out_features}"


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(operator.attrgetter(parent)(root) if parent else root, name, module)


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype)


def restructure_block(model: nn.Module, index: int, spec: LayerSpec) -> None:
    """Replace block ``index``'s attention and MLP linears by empty ones with ``spec``'s widths."""
    adapter = get_adapter(model)
    block = adapter.blocks(model)[index]
    if spec.low_rank:  # factorise Linears in place; head layout and widths stay as they are
        for path, rank in spec.low_rank.items():
            old = cast(nn.Linear, block.get_submodule(path))  # low_rank paths name Linear layers
            low = LowRankLinear(old.in_features, rank, old.out_features, old.bias is not None, old.weight.dtype)
            _set_module(block, path, low)
        return
    parts = adapter.parts(block)
    if spec.channels:
        _restructure_channels(block, adapter, parts, spec)
        return
    hidden = parts.o.out_features
    for path, old in zip(adapter.mlp_in, parts.mlp_in, strict=True):
        _set_module(block, path, _linear(old.in_features, spec.intermediate, old))
    out_bias, dtype = spec.out_bias or parts.mlp_out.bias is not None, parts.mlp_out.weight.dtype
    _set_module(block, adapter.mlp_out, nn.Linear(spec.intermediate, hidden, bias=out_bias, dtype=dtype))
    has_bias = {"o": spec.out_bias or parts.o.bias is not None}
    for name in "qkv":
        linear = getattr(parts, name) or parts.qkv
        assert linear is not None  # a block has q, k and v or the fused qkv
        has_bias[name] = linear.bias is not None
    attention = CompressedAttention(spec, hidden, has_bias, index, model.config)
    _set_module(block, adapter.attn, attention.to(parts.o.weight.dtype))


def _restructure_channels(block: nn.Module, adapter: ArchAdapter, parts: Any, spec: LayerSpec) -> None:
    """DISP-LLM layout: q/k/v read ``attn_in``, o writes ``attn_out``; the MLP reads ``mlp_in`` through
    ``spec.intermediate`` channels and writes ``mlp_out``. Attention heads are untouched."""
    ch = spec.channels

    def channel(old: nn.Linear, in_index: list[int] | None, out_index: list[int] | None,
                in_features: int | None = None, out_features: int | None = None) -> ChannelLinear:
        return ChannelLinear(in_features or old.in_features, out_features or old.out_features, in_index, out_index,
                             old.bias is not None, old.weight.dtype)

    for name in ("q", "k", "v", "qkv"):
        path = getattr(adapter, name)
        if path is not None:
            _set_module(block, path, channel(getattr(parts, name), ch["attn_in"], None))
    _set_module(block, adapter.o, channel(parts.o, None, ch["attn_out"]))
    for path, old in zip(adapter.mlp_in, parts.mlp_in, strict=True):
        _set_module(block, path, channel(old, ch["mlp_in"], None, out_features=spec.intermediate))
    _set_module(block, adapter.mlp_out, channel(parts.mlp_out, None, ch["mlp_out"], in_features=spec.intermediate))


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


def _compressed_classes(base: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    """The ``leanfm_<base>`` config class and the model class that rebuilds ``leanfm_layers`` on construction."""
    config_name, model_name = _BASE_CLASSES[base]
    base_config, base_model = getattr(transformers, config_name), getattr(transformers, model_name)

    config_cls = type(f"Leanfm{config_name}", (base_config,), {"model_type": f"leanfm_{base}", "base_model_type": base})

    def __init__(self: Any, config: PretrainedConfig, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        base_model.__init__(self, config, *args, **kwargs)
        for index, layer in enumerate(config.leanfm_layers):
            restructure_block(self, index, LayerSpec(**layer))
        self.post_init()

    model_cls = type(f"Leanfm{model_name}", (base_model,), {"config_class": config_cls, "__init__": __init__})
    return cast(type[PretrainedConfig], config_cls), cast(type[PreTrainedModel], model_cls)


COMPRESSED_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    base: _compressed_classes(base) for base in _BASE_CLASSES
}
for _config_cls, _model_cls in COMPRESSED_CLASSES.values():
    AutoConfig.register(_config_cls.model_type, _config_cls)
    AutoModelForCausalLM.register(_config_cls, _model_cls)


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
    hf_model.config = config_cls(**data)
    hf_model.config.architectures = [model_cls.__name__]
    model.__class__ = model_cls
    return model
