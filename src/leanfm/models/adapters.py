"""Architecture adapters: the one place that knows where each block's parts live.

Compressors and accelerators never special-case an architecture; they ask ``get_adapter(model)`` for the
blocks, the norms, the q/k/v/o and MLP linears and the attention-head layout. Supported: llama (incl. GQA,
e.g. SmolLM2), opt, phi, gpt-neox (fused ``query_key_value``), gemma3_text (Gemma-3, see below) and bert.

Conventions every consumer can rely on:
- A ``Linear`` maps ``in_features -> out_features`` with weight shape ``[out, in]`` (torch layout).
- Head ``h`` of a q/k/v projection owns output rows ``h*head_dim : (h+1)*head_dim``; for gpt-neox's fused
  projection, head ``h`` owns rows ``h*3*head_dim : (h+1)*3*head_dim`` laid out ``[q | k | v]``
  (see :meth:`ArchAdapter.split_qkv`).
- Rotary embeddings use the ``rotate_half`` layout on the first ``rotary_dim`` dims of each head: dim ``j`` is
  rotated together with ``j + rotary_dim // 2``. ``rotary_dim == 0`` means no rotary (opt, bert).
- Query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)`` (grouped-query attention).

Gemma-3 (``gemma3_text``, e.g. Gemma-3-270M), what its adapter records and why each method cares:
- Four RMSNorms per block, all ``x / rms(x) * (1 + w)``: ``input_layernorm`` feeds q/k/v (``attn_norm``),
  ``pre_feedforward_layernorm`` feeds the MLP (``mlp_norm``); ``post_attention_layernorm`` and
  ``post_feedforward_layernorm`` normalise the attention and MLP *outputs* before they are added to the residual
  (``out_norms``; not bert-style ``post_norm``, which normalises the sum).
- ``q_norm`` / ``k_norm`` (``qk_norms``): one RMSNorm over each head's ``head_dim`` dims of q and of k, weights
  shared by all heads, applied *before* rotary. Rotary covers all ``head_dim`` dims in the ``rotate_half`` layout
  (checked in the tests against the stock attention); sliding and global layers use different bases
  (``sliding_attention_inv_freq`` 1e4, ``full_attention_inv_freq`` 1e6), same size.
- Consequences (``normed_qk``): dropping single q/k dims (MoDeGPT type II, wanda-sp) changes the RMS the norm
  divides by, so the kept dims would no longer score as before: those methods keep q/k at full width on Gemma
  and meet the budget with V/O (type III) and the MLP. Whole heads (FLAP) keep their own norm exactly. SliceGPT
  does not apply: the output norms rescale residual channels after normalising, so no rotation folds through.
- Attention scale is ``query_pre_attn_scalar ** -0.5`` (256 = head_dim on the 270M model).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import PretrainedConfig

from leanfm.errors import LeanfmError


@dataclass(frozen=True)
class AttentionLayout:
    """How a block's attention heads are laid out (see the module docstring for the conventions)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    def kv_head_of(self, query_head: int) -> int:
        """The key/value head that ``query_head`` attends with."""
        return query_head // self.group_size


@dataclass
class BlockParts:
    """The live modules of one transformer block (``None`` where the architecture has no such part)."""

    attn_norm: nn.Module | None  # norm whose output feeds q/k/v (pre-norm) or that follows attention (post-norm)
    mlp_norm: nn.Module | None  # norm feeding the MLP; None for a parallel block (MLP reads attn_norm's output)
    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    qkv: nn.Linear | None  # fused projection (gpt-neox); q/k/v are then None
    o: nn.Linear
    mlp_in: tuple[nn.Linear, ...]  # (gate, up) for a gated MLP, (fc1,) otherwise
    mlp_out: nn.Linear
    mlp_act: str


@dataclass(frozen=True)
class ArchAdapter:
    """Attribute paths of one architecture; ``blocks_path`` etc. are tried under each of ``prefixes``."""

    model_type: str
    prefixes: tuple[str, ...]
    blocks_path: str
    embed_path: str
    final_norm_path: str
    attn_norm: str | None
    mlp_norm: str | None
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    norm_kind: str  # "rmsnorm", "layernorm" or "gemma_rmsnorm" (x / rms(x) * (1 + w))
    attn: str = "self_attn"  # the attention module inside a block
    post_norm: bool = False
    qk_norms: tuple[str, str] | None = None  # per-head norms of q and k before rotary (gemma3)
    out_norms: tuple[str, str] | None = None  # norms of the attention / MLP outputs before the residual add (gemma3)

    @property
    def normed_qk(self) -> bool:
        """True when q and k are RMS-normalised per head: single q/k dims cannot be dropped exactly."""
        return self.qk_norms is not None

    def _resolve(self, model: nn.Module, path: str) -> nn.Module:
        for prefix in self.prefixes:
            try:
                return operator.attrgetter(prefix + path)(model)
            except AttributeError:
                continue
        raise LeanfmError(f"{self.model_type} model has no '{path}' (tried prefixes {self.prefixes})")

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ``ModuleList`` of transformer blocks, input to output."""
        return cast(nn.ModuleList, self._resolve(model, self.blocks_path))

    def embeddings(self, model: nn.Module) -> nn.Module:
        """The token embedding module."""
        return self._resolve(model, self.embed_path)

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm after the last block (None for bert, which is post-norm)."""
        return self._resolve(model, self.final_norm_path) if self.final_norm_path else None

    def parts(self, block: nn.Module) -> BlockParts:
        """Handles to ``block``'s norms, projections and MLP."""
        get = operator.attrgetter

        def opt(path: str | None) -> nn.Module | None:
            return get(path)(block) if path else None

        def opt_linear(path: str | None) -> nn.Linear | None:  # the q/k/v/qkv paths name Linear layers
            return get(path)(block) if path else None

        attention = get(self.attn)(block)
        if getattr(attention, "is_leanfm_compressed", False):  # leanfm's own attention: uniform names, no fusion
            q, k, v, qkv, o = attention.q_proj, attention.k_proj, attention.v_proj, None, attention.o_proj
        else:
            q, k, v, qkv = opt_linear(self.q), opt_linear(self.k), opt_linear(self.v), opt_linear(self.qkv)
            o = get(self.o)(block)
        return BlockParts(
            attn_norm=opt(self.attn_norm), mlp_norm=opt(self.mlp_norm),
            q=q, k=k, v=v, qkv=qkv, o=o, mlp_in=tuple(get(p)(block) for p in self.mlp_in),
            mlp_out=get(self.mlp_out)(block), mlp_act=_activation_name(block),
        )

    def is_parallel(self, model: nn.Module) -> bool:
        """True when attention and MLP both read the block input (phi; gpt-neox with parallel residual)."""
        if self.model_type == "phi":
            return True
        return bool(getattr(model.config, "use_parallel_residual", False))

    def layout(self, model: nn.Module) -> AttentionLayout:
        """Head counts, head size and rotary width, read from the config and the live rotary module."""
        cfg = cast(PretrainedConfig, model.config)  # a transformers model's config (nn.Module cannot say so)
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return AttentionLayout(heads, kv_heads, head_dim, _rotary_dim(model))

    def split_qkv(self, block: nn.Module, layout: AttentionLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v weights of ``block`` as ``[heads*head_dim, in]`` tensors (views into a fused weight if any)."""
        parts = self.parts(block)
        if parts.qkv is None:
            assert parts.q is not None and parts.k is not None and parts.v is not None  # unfused: all three exist
            return parts.q.weight, parts.k.weight, parts.v.weight
        weight = parts.qkv.weight.view(layout.num_heads, 3, layout.head_dim, -1)  # [heads, qkv, head_dim, in]
        q, k, v = (weight[:, i].reshape(layout.num_heads * layout.head_dim, -1) for i in range(3))
        return q, k, v


PER_BLOCK = "leanfm_per_block"  # a block-kwargs entry: {block: the kwargs that block receives} (see below)


class _CapturedError(Exception):
    pass


class _KwargsRecorder(nn.Module):
    """Stands in for a block while :func:`layer_type_kwargs` runs: records the keyword arguments the block would
    receive and passes the hidden states on, so no block computes (a streamed model's blocks have no weights)."""

    def __init__(self, kind: str, seen: dict[str, dict[str, Any]], kinds: int) -> None:
        super().__init__()
        self.kind, self.seen, self.kinds = kind, seen, kinds

    def forward(self, hidden_states: torch.Tensor, **kw: Any) -> torch.Tensor:
        if self.kind not in self.seen:
            self.seen[self.kind] = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values")}
            self.seen[self.kind]["use_cache"] = False
        if len(self.seen) == self.kinds:
            raise _CapturedError
        return hidden_states


@torch.no_grad()
def layer_type_kwargs(model: nn.Module, ids: torch.Tensor) -> dict[nn.Module, dict[str, Any]]:
    """Each block's own keyword arguments when blocks of one model receive different ones, else ``{}``.

    Why: the layer-wise compressors replay blocks on captured inputs with the keyword arguments block 0 got.
    Gemma-3 gives each layer the mask (sliding window or global) and rotary cos/sin (base 1e4 or 1e6) of its
    ``config.layer_types`` entry, so replaying a global layer with block 0's would be wrong. One row of ``ids``
    is run with every block replaced by a recorder (the masks and rotary tables are computed before the first
    block and do not depend on block outputs) until every layer type has been seen; its mask has batch size 1
    and broadcasts over any calibration batch. The cache is dropped and ``use_cache=False`` set, as for block 0.
    """
    layer_types = list(getattr(getattr(model, "config", None), "layer_types", None) or [])
    blocks = get_adapter(model).blocks(model)
    if len(set(layer_types)) < 2 or len(layer_types) != len(blocks):
        return {}
    seen: dict[str, dict[str, Any]] = {}
    originals = list(blocks)
    for index, kind in enumerate(layer_types):
        blocks[index] = _KwargsRecorder(kind, seen, len(set(layer_types)))
    try:
        model(input_ids=ids[:1], use_cache=False)
    except _CapturedError:
        pass
    finally:
        for index, block in enumerate(originals):
            blocks[index] = block
    return {block: seen[kind] for block, kind in zip(blocks, layer_types, strict=True)}


def block_kwargs(block: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments to replay ``block`` with: its own (``kwargs[PER_BLOCK]``) where recorded."""
    own = kwargs.get(PER_BLOCK, {}).get(block)
    return own if own is not None else {k: v for k, v in kwargs.items() if k != PER_BLOCK}


def _activation_name(block: nn.Module) -> str:
    for module in block.modules():
        for attr in ("act_fn", "activation_fn", "act", "intermediate_act_fn"):
            fn = getattr(module, attr, None)
            if fn is not None:
                return type(fn).__name__
    return "unknown"


def _rotary_dim(model: nn.Module) -> int:
    """2 x the number of rotary frequencies: ``inv_freq``, or gemma3's per-layer-type ``<type>_inv_freq``."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name == "inv_freq" or (name.endswith("_inv_freq") and not name.endswith("original_inv_freq")):
                return 2 * buffer.numel()
    return 0


ADAPTERS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter(
        "llama", ("model.", ""), "layers", "embed_tokens", "norm",
        "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        None, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "rmsnorm",
    ),
    "opt": ArchAdapter(
        "opt", ("model.decoder.", "decoder."), "layers", "embed_tokens", "final_layer_norm",
        "self_attn_layer_norm", "final_layer_norm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        None, "self_attn.out_proj", ("fc1",), "fc2", "layernorm",
    ),
    "phi": ArchAdapter(
        "phi", ("model.", ""), "layers", "embed_tokens", "final_layernorm",
        "input_layernorm", None, "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        None, "self_attn.dense", ("mlp.fc1",), "mlp.fc2", "layernorm",
    ),
    "gpt_neox": ArchAdapter(
        "gpt_neox", ("gpt_neox.", ""), "layers", "embed_in", "final_layer_norm",
        "input_layernorm", "post_attention_layernorm", None, None, None,
        "attention.query_key_value", "attention.dense", ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h", "layernorm",
        attn="attention",
    ),
    "gemma3_text": ArchAdapter(
        "gemma3_text", ("model.", ""), "layers", "embed_tokens", "norm",
        "input_layernorm", "pre_feedforward_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        None, "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "gemma_rmsnorm",
        qk_norms=("self_attn.q_norm", "self_attn.k_norm"),
        out_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    ),
    "bert": ArchAdapter(
        "bert", ("bert.encoder.", "encoder."), "layer", "", "",
        "attention.output.LayerNorm", "output.LayerNorm", "attention.self.query", "attention.self.key",
        "attention.self.value", None, "attention.output.dense", ("intermediate.dense",), "output.dense", "layernorm",
        attn="attention", post_norm=True,
    ),
}


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model``'s architecture; a one-line error lists the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base_type = getattr(getattr(model, "config", None), "base_model_type", None)
    adapter = ADAPTERS.get(str(model_type)) or ADAPTERS.get(str(base_type))
    if adapter is None:
        raise LeanfmError(f"unsupported architecture '{model_type}'; supported: {', '.join(ADAPTERS)}")
    if adapter.model_type == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        return ArchAdapter(**{**adapter.__dict__, "post_norm": True})
    return adapter
