"""leanfm's compressed causal-LM classes, in one file that needs only torch and transformers.

Why one self-contained file: a compressed checkpoint must load for users who do not install leanfm.
``leanfm export DIR --standalone`` copies this file into a compressed folder whose ``config.json`` carries
``auto_map`` (``"AutoConfig": "modeling_leanfm.LeanfmLlamaConfig"`` ...), so stock transformers loads it with
``trust_remote_code=True``. leanfm itself imports the same classes (:mod:`leanfm.models.compressed` and
:mod:`leanfm.models.sliced` re-export them and register them with the Auto classes), so there is one copy of
the code. This file must therefore never import leanfm, and it registers nothing itself (transformers does
that for remote code; leanfm does it on ``import leanfm``).

What it holds:
- :class:`LayerSpec` (the per-block widths stored in ``config.leanfm_layers``) and :func:`restructure_block`,
  which rebuilds a block with those widths; the block paths of the five supported bases are in
  :data:`BLOCK_PATHS` (the same paths as ``leanfm.models.adapters.ADAPTERS``; a test keeps them equal).
- :class:`CompressedAttention` (MoDeGPT / baselines), :class:`LowRankLinear` (SVD baselines),
  :class:`ChannelLinear` and :class:`DispLlamaDecoderLayer` (DISP-LLM), the ``Leanfm<Base>Config`` /
  ``Leanfm<Base>ForCausalLM`` classes, and the SliceGPT classes (``SlicedLlama*``).
- Gemma-3 (``gemma3_text``): :class:`CompressedGemmaAttention` adds the per-head q/k RMSNorms (moved over from
  the original attention, full width only: see its docstring) and Gemma's ``query_pre_attn_scalar`` scale. Each
  layer keeps its attention type because the host model picks the mask (sliding window or global) and the rotary
  cos/sin (base 1e4 or 1e6) per layer from ``config.layer_types``, which the compressed config keeps; the blocks
  themselves are the stock ``Gemma3DecoderLayer`` with its four norms.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

# ---------------------------------------------------------------- per-block widths


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


@dataclass(frozen=True)
class BlockPaths:
    """Where a base architecture keeps its blocks (under one of ``prefixes``) and each block's Linears."""

    prefixes: tuple[str, ...]
    blocks: str
    attn: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None  # fused projection (gpt-neox); q/k/v are then None
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str


BLOCK_PATHS: dict[str, BlockPaths] = {
    "llama": BlockPaths(("model.", ""), "layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
                        "self_attn.v_proj", None, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"),
                        "mlp.down_proj"),
    "opt": BlockPaths(("model.decoder.", "decoder."), "layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", None, "self_attn.out_proj", ("fc1",), "fc2"),
    "phi": BlockPaths(("model.", ""), "layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", None, "self_attn.dense", ("mlp.fc1",), "mlp.fc2"),
    "gpt_neox": BlockPaths(("gpt_neox.", ""), "layers", "attention", None, None, None, "attention.query_key_value",
                           "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    "gemma3_text": BlockPaths(("model.", ""), "layers", "self_attn", "self_attn.q_proj", "self_attn.k_proj",
                              "self_attn.v_proj", None, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"),
                              "mlp.down_proj"),
}


def base_type(model: nn.Module) -> str:
    """The supported base of ``model``: its ``model_type``, or a compressed config's ``base_model_type``."""
    config = getattr(model, "config", None)
    for name in (getattr(config, "model_type", None), getattr(config, "base_model_type", None)):
        if name in BLOCK_PATHS:
            return str(name)
    raise ValueError(f"unsupported architecture '{getattr(config, 'model_type', None)}'; "
                     f"supported: {', '.join(BLOCK_PATHS)}")


def model_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of transformer blocks of a supported model."""
    paths = BLOCK_PATHS[base_type(model)]
    for prefix in paths.prefixes:
        try:
            return cast(nn.ModuleList, operator.attrgetter(prefix + paths.blocks)(model))
        except AttributeError:
            continue
    raise ValueError(f"model has no '{paths.blocks}' under {paths.prefixes}")


# ---------------------------------------------------------------- modules


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[a | b] -> [-b | a]`` on the last dim (the rotate_half rotary layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_pairs(model: nn.Module) -> int:
    """Rotary frequencies per head (rotary dims / 2) of the host model, 0 without rotary: the size of its
    ``inv_freq``, or of gemma3's per-layer-type ``<type>_inv_freq`` (same size for every type)."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name == "inv_freq" or (name.endswith("_inv_freq") and not name.endswith("original_inv_freq")):
                return int(buffer.numel())
    return 0


class CompressedAttention(nn.Module):
    """Multi-/grouped-query attention whose q/k and v head sizes were reduced independently.

    Computes the original attention scores ``q k^T / sqrt(head_dim)`` on the kept dims only. Query/key head
    dims are laid out ``[kept rotary first halves (P) | their partners (P) | kept non-rotary dims]``; each kept
    rotary pair of KV group ``g`` keeps its *original* frequency ``inv_freq[rope_index[g]]``, because a rotary
    embedding rebuilt for the smaller head size would rotate with different frequencies (METHODS.md, MoDeGPT
    type II). The kept columns of the host's ``position_embeddings`` are gathered once per layer and step at
    KV-group level and broadcast over each group's query heads, so every rope scaling type the host supports
    (its cos/sin already include it; partial rotary = a shorter cos/sin) is handled. Measured on a SmolLM2-shaped
    layer (benchmarks/compressed_block_speed.py), this beat computing ``cos(pos * inv_freq[rope_index])`` per
    layer at T = 1 (0.058 vs 0.071 ms for q and k) and tied at T = 512.
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

    def _index(self, device: torch.device) -> torch.Tensor:
        if device not in self._rope_index:
            self._rope_index[device] = torch.tensor(self.spec.rope_index, dtype=torch.long, device=device)
        return self._rope_index[device]  # [KV, P]

    def _cos_sin(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of the kept angles, ``[B, KV, 1, T, 2P]`` (layout ``cat(angles, angles)``): one gather of
        the host's ``[B, T, rotary_dim]`` columns per layer, at KV-group level (query heads broadcast)."""
        flat = self._index(cos.device).flatten()  # [KV*P]
        half = cos.shape[-1] // 2
        cos_kept, sin_kept = cos[..., :half][..., flat], sin[..., :half][..., flat]  # [B, T, KV*P]
        batch, length = cos_kept.shape[:2]
        shape = (batch, length, self.spec.num_kv_heads, 1, self.spec.rope_pairs)
        cos_kept = cos_kept.reshape(shape).permute(0, 2, 3, 1, 4)  # [B, KV, 1, T, P]
        sin_kept = sin_kept.reshape(shape).permute(0, 2, 3, 1, 4)
        return torch.cat((cos_kept, cos_kept), -1), torch.cat((sin_kept, sin_kept), -1)

    def _rotate(self, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the first ``2P`` dims of ``states`` ``[B, heads, T, D]`` (heads grouped by KV head)."""
        pairs = self.spec.rope_pairs
        grouped = states.unflatten(1, (self.spec.num_kv_heads, -1))  # [B, KV, G, T, D]
        rotary, rest = grouped[..., : 2 * pairs], grouped[..., 2 * pairs :]
        rotated = rotary * cos.to(states.dtype) + rotate_half(rotary) * sin.to(states.dtype)
        return torch.cat((rotated, rest), dim=-1).flatten(1, 2)

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, T, Dqk]``, k ``[B, KV, T, Dqk]``, v ``[B, KV, T, Dv]`` before rotary."""
        batch, length, _ = hidden_states.shape
        s = self.spec
        q = self.q_proj(hidden_states).view(batch, length, s.num_heads, s.qk_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(batch, length, s.num_kv_heads, s.qk_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(batch, length, s.num_kv_heads, s.v_dim).transpose(1, 2)
        return q, k, v

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> tuple:
        batch, length, _ = hidden_states.shape
        s = self.spec
        q, k, v = self._project(hidden_states)
        position_embeddings = kwargs.pop("position_embeddings", None)
        if s.rope_pairs and position_embeddings is not None:
            cos, sin = self._cos_sin(*position_embeddings)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        cache = next((kwargs.pop(n) for n in ("cache", "past_key_values", "layer_past") if n in kwargs), None)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        for unused in ("position_ids", "use_cache", "output_attentions", "cache_position", "head_mask"):
            kwargs.pop(unused, None)
        out, _ = sdpa_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(batch, length, -1)), None  # out: [B, T, H, Dv]


class CompressedGemmaAttention(CompressedAttention):
    """:class:`CompressedAttention` for Gemma-3: q and k pass through the per-head RMSNorms ``q_norm``/``k_norm``
    (``x / rms(x) * (1 + w)`` over the head's dims) before rotary, and scores scale by
    ``query_pre_attn_scalar ** -0.5``, as in ``Gemma3Attention``.

    q/k head dims must be the original ``head_dim``: the RMS of a head's kept dims is not the RMS of all its dims,
    so dropping single q/k dims would change every kept dim's value (inexact, unlike any other cut leanfm makes);
    the compressors keep q/k at full width on Gemma (MoDeGPT and wanda-sp cut V/O and the MLP instead, FLAP drops
    whole heads, whose norm is unchanged). Attention logit soft-capping (``attn_logit_softcapping``, None on
    Gemma-3) cannot run through SDPA and is refused. The sliding window lives in the mask the host passes.
    """

    def __init__(self, spec: LayerSpec, hidden: int, bias: dict[str, bool], layer_idx: int, config: Any) -> None:
        if spec.qk_dim != spec.head_dim:
            raise ValueError(f"gemma3 q/k head dims cannot be reduced (q/k norms): qk_dim {spec.qk_dim}, "
                             f"accepted: {spec.head_dim}")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("gemma3 attention with attn_logit_softcapping cannot be compressed; accepted: None")
        super().__init__(spec, hidden, bias, layer_idx, config)
        self.scaling = float(getattr(config, "query_pre_attn_scalar", spec.head_dim)) ** -0.5
        self.q_norm = Gemma3RMSNorm(spec.head_dim, eps=config.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(spec.head_dim, eps=config.rms_norm_eps)
        layer_types = getattr(config, "layer_types", None) or []
        self.is_sliding = layer_idx < len(layer_types) and layer_types[layer_idx] == "sliding_attention"
        self.sliding_window = config.sliding_window if self.is_sliding else None

    def _project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = super()._project(hidden_states)
        return self.q_norm(q), self.k_norm(k), v


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
    full widths the surrounding model sees. Two fast paths, same maths:
    - an input of ``len(in_index)`` channels is taken as already gathered (a block gathers ``x[S_in]`` once for
      q, k and v, or for gate and up); an input of ``in_features`` channels is gathered here;
    - with ``write_compact`` set (by :class:`DispLlamaDecoderLayer`) the output stays ``|S_out|`` wide and the
      block adds it into the residual with ``index_add``; otherwise it is scattered into zeros here.
    An index equal to ``0..n-1`` is no index at all (nothing gathered or scattered).
    """

    def __init__(self, in_features: int, out_features: int, in_index: list[int] | None, out_index: list[int] | None,
                 bias: bool, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.in_index, self.out_index = in_index, out_index  # python lists: safe under meta-device init
        self.gathers = in_index is not None and in_index != list(range(in_features))
        self.scatters = out_index is not None and out_index != list(range(out_features))
        self.write_compact = False
        rows = len(out_index) if out_index is not None else out_features
        cols = len(in_index) if in_index is not None else in_features
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(rows, dtype=dtype)) if bias else None
        self._index: dict[tuple[str, torch.device], torch.Tensor] = {}

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """``in_index`` or ``out_index`` as a long tensor on ``device`` (cached)."""
        key = (name, device)
        if key not in self._index:
            self._index[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=device)
        return self._index[key]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``x[..., S_in]`` for a full-width ``x``; ``x`` itself when there is nothing to gather."""
        return x.index_select(-1, self.index("in_index", x.device)) if self.gathers else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.in_features:
            x = self.gather(x)
        y = nn.functional.linear(x, self.weight, self.bias)
        if not self.scatters or self.write_compact:
            return y
        full = y.new_zeros(*y.shape[:-1], self.out_features)
        return full.index_add_(-1, self.index("out_index", y.device), y)

    def add_into(self, residual: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        """``residual + scatter(y)`` (``y`` as returned by ``forward``), in place on ``residual`` if ``inplace``."""
        if self.scatters and self.write_compact:
            index = self.index("out_index", y.device)
            return residual.index_add_(-1, index, y) if inplace else residual.index_add(-1, index, y)
        return residual.add_(y) if inplace else residual + y

    def extra_repr(self) -> str:
        return f"in={self.in_features}->{self.weight.shape[1]}, out={self.weight.shape[0]}->{self.out_features}"


def pre_gather(x: torch.Tensor, readers: list[nn.Module]) -> torch.Tensor:
    """Gather ``x[..., S]`` once for ``readers`` (ChannelLinears sharing ``S``), when that narrows ``x``."""
    first = readers[0]
    if not isinstance(first, ChannelLinear) or first.in_index is None or len(first.in_index) >= first.in_features:
        return x  # nothing to share (a full index is gathered, if at all, by each reader)
    assert all(isinstance(r, ChannelLinear) and r.in_index == first.in_index for r in readers)
    return first.gather(x)


class DispLlamaDecoderLayer(LlamaDecoderLayer):
    """A llama block pruned by DISP-LLM, with the block's gathers and scatters fused:

    ``x' = x + index_add(S_ao, o(attn(g[S_ai])))`` with ``g = norm(x)`` gathered once for q, k and v, then
    ``x'' = x' + index_add(S_mo, down(act(gate(h[S_mi])) * up(h[S_mi])))`` with ``h = norm(x')`` gathered once
    for gate and up. The second add is done in place on ``x'`` (a tensor this forward made) unless autograd needs
    ``x'``; the first copies the block input (a caller may still hold it). Same maths as the unfused block.
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,  # type: ignore[override]
                position_ids: torch.LongTensor | None = None, cache: Any = None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs: Any) -> torch.Tensor:
        attn, mlp = self.self_attn, self.mlp
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        normed = pre_gather(self.input_layernorm(hidden_states), [attn.q_proj, attn.k_proj, attn.v_proj])
        attended, _ = attn(hidden_states=normed, attention_mask=attention_mask, position_ids=position_ids,
                           cache=cache, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)
        hidden_states = cast(ChannelLinear, attn.o_proj).add_into(hidden_states, attended, inplace=False)
        normed = pre_gather(self.post_attention_layernorm(hidden_states), [mlp.gate_proj, mlp.up_proj])
        out = mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        inplace = not (torch.is_grad_enabled() and hidden_states.requires_grad)
        return cast(ChannelLinear, mlp.down_proj).add_into(hidden_states, out, inplace=inplace)


# ---------------------------------------------------------------- rebuilding a block


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(operator.attrgetter(parent)(root) if parent else root, name, module)


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None, dtype=like.weight.dtype)


def _attention_linears(block: nn.Module, paths: BlockPaths) -> dict[str, nn.Linear | None]:
    """q, k, v, qkv, o of ``block`` (leanfm's own attention has uniform names and no fused projection)."""
    attention = block.get_submodule(paths.attn)
    if getattr(attention, "is_leanfm_compressed", False):
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
        return {"qkv": None, **{name: cast(nn.Linear, getattr(attention, attr)) for name, attr in names.items()}}
    found = {name: getattr(paths, name) for name in ("q", "k", "v", "qkv", "o")}
    return {name: cast(nn.Linear, block.get_submodule(path)) if path else None for name, path in found.items()}


def _keeps_attention(spec: LayerSpec, attention: nn.Module, linears: dict[str, nn.Linear | None],
                     heads: tuple[int, int, int], pairs: int) -> bool:
    """Whether ``spec`` keeps the block's attention exactly as it is: every head, dim and rotary pair, and an
    attention with separate ``q_proj/k_proj/v_proj/o_proj`` (llama; the names weight loaders write to)."""
    o = linears["o"]
    assert o is not None
    full_rope = [list(range(pairs)) for _ in range(heads[1])] if pairs else []
    uniform = all(linears[n] is getattr(attention, f"{n}_proj", None) for n in "qkvo")  # what weight loaders use
    return (uniform and (spec.num_heads, spec.num_kv_heads, spec.head_dim) == heads
            and spec.qk_dim == spec.v_dim == spec.head_dim and spec.rope_index == full_rope
            and not (spec.out_bias and o.bias is None))


def restructure_block(model: nn.Module, index: int, spec: LayerSpec) -> None:
    """Replace block ``index``'s attention and MLP linears by empty ones with ``spec``'s widths.

    Parts whose widths ``spec`` leaves as they are (a layer given zero sparsity) keep their original modules:
    the MLP when ``spec.intermediate`` is its width, the attention when heads, head dims and rotary pairs are
    all kept and it is a llama attention (q_proj, k_proj, v_proj, o_proj); others become CompressedAttention.
    """
    paths = BLOCK_PATHS[base_type(model)]
    block = model_blocks(model)[index]
    if spec.low_rank:  # factorise Linears in place; head layout and widths stay as they are
        for path, rank in spec.low_rank.items():
            old = cast(nn.Linear, block.get_submodule(path))  # low_rank paths name Linear layers
            low = LowRankLinear(old.in_features, rank, old.out_features, old.bias is not None, old.weight.dtype)
            _set_module(block, path, low)
        return
    linears = _attention_linears(block, paths)
    if spec.channels:
        _restructure_channels(model, block, paths, linears, spec)
        return
    mlp_in = [cast(nn.Linear, block.get_submodule(p)) for p in paths.mlp_in]
    mlp_out = cast(nn.Linear, block.get_submodule(paths.mlp_out))
    o = linears["o"]
    assert o is not None
    hidden = o.out_features
    if spec.intermediate != mlp_out.in_features or (spec.out_bias and mlp_out.bias is None):
        for path, old in zip(paths.mlp_in, mlp_in, strict=True):
            _set_module(block, path, _linear(old.in_features, spec.intermediate, old))
        out_bias, dtype = spec.out_bias or mlp_out.bias is not None, mlp_out.weight.dtype
        _set_module(block, paths.mlp_out, nn.Linear(spec.intermediate, hidden, bias=out_bias, dtype=dtype))
    config = cast(PretrainedConfig, model.config)  # a transformers model's config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pairs = rotary_pairs(model)
    old_attention = block.get_submodule(paths.attn)
    if _keeps_attention(spec, old_attention, linears, (heads, kv_heads, head_dim), pairs):
        return
    has_bias = {"o": spec.out_bias or o.bias is not None}
    for name in "qkv":
        linear = linears[name] or linears["qkv"]
        assert linear is not None  # a block has q, k and v or the fused qkv
        has_bias[name] = linear.bias is not None
    attention: CompressedAttention
    if base_type(model) == "gemma3_text":
        gemma = CompressedGemmaAttention(spec, hidden, has_bias, index, model.config)
        gemma.q_norm = cast(Gemma3RMSNorm, old_attention.q_norm)  # the trained norms (full width, all heads)
        gemma.k_norm = cast(Gemma3RMSNorm, old_attention.k_norm)
        attention = gemma
    else:
        attention = CompressedAttention(spec, hidden, has_bias, index, model.config)
    _set_module(block, paths.attn, attention.to(o.weight.dtype))


def _restructure_channels(model: nn.Module, block: nn.Module, paths: BlockPaths,
                          linears: dict[str, nn.Linear | None], spec: LayerSpec) -> None:
    """DISP-LLM layout: q/k/v read ``attn_in``, o writes ``attn_out``; the MLP reads ``mlp_in`` through
    ``spec.intermediate`` channels and writes ``mlp_out``. Attention heads are untouched. A llama block becomes
    a :class:`DispLlamaDecoderLayer` (fused gathers, scatters into the residual)."""
    ch = spec.channels

    def channel(old: nn.Linear, in_index: list[int] | None, out_index: list[int] | None,
                in_features: int | None = None, out_features: int | None = None) -> ChannelLinear:
        return ChannelLinear(in_features or old.in_features, out_features or old.out_features, in_index, out_index,
                             old.bias is not None, old.weight.dtype)

    for name in ("q", "k", "v", "qkv"):
        path, old = getattr(paths, name), linears[name]
        if path is not None and old is not None:
            _set_module(block, path, channel(old, ch["attn_in"], None))
    o = linears["o"]
    assert o is not None
    _set_module(block, paths.o, channel(o, None, ch["attn_out"]))
    for path in paths.mlp_in:
        old = cast(nn.Linear, block.get_submodule(path))
        _set_module(block, path, channel(old, ch["mlp_in"], None, out_features=spec.intermediate))
    mlp_out = cast(nn.Linear, block.get_submodule(paths.mlp_out))
    _set_module(block, paths.mlp_out, channel(mlp_out, None, ch["mlp_out"], in_features=spec.intermediate))
    if base_type(model) == "llama" and isinstance(block, LlamaDecoderLayer):
        block.__class__ = DispLlamaDecoderLayer
        for path in (paths.o, paths.mlp_out):
            cast(ChannelLinear, block.get_submodule(path)).write_compact = True


# ---------------------------------------------------------------- compressed model classes


def _rebuild(model: PreTrainedModel, config: PretrainedConfig) -> None:
    for index, layer in enumerate(getattr(config, "leanfm_layers", None) or []):
        restructure_block(model, index, LayerSpec(**layer))
    model.post_init()


class LeanfmLlamaConfig(LlamaConfig):
    """A llama config carrying ``leanfm_layers`` (one :class:`LayerSpec` dict per block)."""

    model_type = "leanfm_llama"
    base_model_type = "llama"


class LeanfmLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` whose blocks are rebuilt to ``config.leanfm_layers`` on construction."""

    config_class = LeanfmLlamaConfig

    def __init__(self, config: LeanfmLlamaConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self, config)


class LeanfmOPTConfig(OPTConfig):
    """An OPT config carrying ``leanfm_layers``."""

    model_type = "leanfm_opt"
    base_model_type = "opt"


class LeanfmOPTForCausalLM(OPTForCausalLM):
    """``OPTForCausalLM`` whose blocks are rebuilt to ``config.leanfm_layers`` on construction."""

    config_class = LeanfmOPTConfig

    def __init__(self, config: LeanfmOPTConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self, config)


class LeanfmPhiConfig(PhiConfig):
    """A phi config carrying ``leanfm_layers``."""

    model_type = "leanfm_phi"
    base_model_type = "phi"


class LeanfmPhiForCausalLM(PhiForCausalLM):
    """``PhiForCausalLM`` whose blocks are rebuilt to ``config.leanfm_layers`` on construction."""

    config_class = LeanfmPhiConfig

    def __init__(self, config: LeanfmPhiConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self, config)


class LeanfmGPTNeoXConfig(GPTNeoXConfig):
    """A gpt-neox config carrying ``leanfm_layers``."""

    model_type = "leanfm_gpt_neox"
    base_model_type = "gpt_neox"


class LeanfmGPTNeoXForCausalLM(GPTNeoXForCausalLM):
    """``GPTNeoXForCausalLM`` whose blocks are rebuilt to ``config.leanfm_layers`` on construction."""

    config_class = LeanfmGPTNeoXConfig

    def __init__(self, config: LeanfmGPTNeoXConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self, config)


class LeanfmGemma3TextConfig(Gemma3TextConfig):
    """A gemma3_text config carrying ``leanfm_layers`` (``layer_types``, the per-layer attention kind, is kept)."""

    model_type = "leanfm_gemma3_text"
    base_model_type = "gemma3_text"


class LeanfmGemma3ForCausalLM(Gemma3ForCausalLM):
    """``Gemma3ForCausalLM`` whose blocks are rebuilt to ``config.leanfm_layers`` on construction."""

    config_class = LeanfmGemma3TextConfig

    def __init__(self, config: LeanfmGemma3TextConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _rebuild(self, config)


COMPRESSED_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "llama": (LeanfmLlamaConfig, LeanfmLlamaForCausalLM),
    "opt": (LeanfmOPTConfig, LeanfmOPTForCausalLM),
    "phi": (LeanfmPhiConfig, LeanfmPhiForCausalLM),
    "gpt_neox": (LeanfmGPTNeoXConfig, LeanfmGPTNeoXForCausalLM),
    "gemma3_text": (LeanfmGemma3TextConfig, LeanfmGemma3ForCausalLM),
}


# ---------------------------------------------------------------- SliceGPT (see leanfm.models.sliced for the maths)


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
