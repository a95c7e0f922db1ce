"""A fast greedy decode path: weights fused once, a preallocated KV cache, optional ``torch.compile``.

Why: at batch 1 a 135M model spends most of ``generate()``'s time outside the matmuls (issue 22: 24.8 tokens/s in
bfloat16 on 2 threads where reading the weights once per token allows ~107). A decode step must read every weight
once, so tokens/s <= read bandwidth / bytes per token; what is left to win is Python and dispatch overhead.

Two paths, same greedy tokens as ``model.generate()`` in the same dtype:

- **fused** (llama family: dense llama and ``leanfm_llama`` with per-layer widths -- :class:`CompressedAttention`
  with its kept rotary pairs, DISP's :class:`ChannelLinear` gathers/scatters): q|k|v and gate|up are concatenated
  once into one matrix each (two matmuls fewer per block), weights are converted once to the decode dtype, and a
  hand-written step runs the block. Every op mirrors transformers' llama (RMSNorm statistics in float32, rotate-half
  rotary in the model dtype, SDPA with the arguments transformers passes), so the logits are the same numbers up to
  the summation order of the fused matmuls.
- **static-cache** (any other causal LM transformers can run with a ``StaticCache``): the model's own forward on a
  copy in the decode dtype, one token at a time.

With ``compile=True`` the one-token step is compiled with static shapes: attention then runs over the whole
preallocated cache under a boolean mask (positions > p masked), the rotary tables are indexed by a position tensor,
and the cache is written with ``index_copy_``, so one graph serves every position. Prefill stays eager (its length
varies). Inductor's artifacts are cached under ``$LEANFM_HOME/cache/inductor`` (``TORCHINDUCTOR_CACHE_DIR``), so a
second process compiles faster; ``compile_seconds`` is what this process paid.

:func:`profile` splits a token's time into embedding / attention / MLP / LM head / other (eager, section by section)
and compares each part's bytes read against :func:`read_bandwidth_gbps`, a sum over a buffer as large as the bytes
one token reads.
"""

from __future__ import annotations

import copy
import logging
import os
import statistics
import time
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as fn
from transformers import GenerationMixin, LlamaForCausalLM, StaticCache
from transformers.activations import SiLUActivation
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

from leanfm.device import decode_dtype, resolve_device
from leanfm.errors import LeanfmError
from leanfm.models.modeling_leanfm import ChannelLinear, CompressedAttention, DispLlamaDecoderLayer
from leanfm.models.registry import resolve_dtype
from leanfm.paths import leanfm_home

log = logging.getLogger(__name__)

__all__ = ["FastDecoder", "profile", "read_bandwidth_gbps"]


class _UnsupportedError(Exception):
    """A structure the fused path does not cover (the decoder falls back to the model's own forward)."""


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm``: ``w * (x / sqrt(mean(x^2) + eps))`` with the statistics in float32, scaled in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on the first ``2P`` dims of ``x`` ``[B, heads, T, D]``; ``cos, sin`` ``[KVc, T, 2P]``
    with ``KVc`` 1 (one table for every head) or the KV-group count (each group's kept frequencies)."""
    pairs2 = cos.shape[-1]
    grouped = x.unflatten(1, (cos.shape[0], -1))  # [B, KVc, G, T, D]
    rot = grouped[..., :pairs2]
    first, second = rot.chunk(2, dim=-1)
    rot = rot * cos[:, None] + torch.cat((-second, first), dim=-1) * sin[:, None]
    if pairs2 < x.shape[-1]:
        rot = torch.cat((rot, grouped[..., pairs2:]), dim=-1)
    return rot.flatten(1, 2)


def _linear_parts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, list[int] | None, list[int] | None]:
    """``(weight, bias, in_index, out_index)`` of a plain Linear or a DISP :class:`ChannelLinear`."""
    if type(module) is nn.Linear:
        return module.weight, module.bias, None, None
    if isinstance(module, ChannelLinear):
        return (module.weight, module.bias, module.in_index if module.gathers else None,
                module.out_index if module.scatters else None)
    raise _UnsupportedError(f"projection {type(module).__name__}")


def _fuse(modules: list[nn.Module], dtype: torch.dtype,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, list[int] | None]:
    """One ``[sum(out), in]`` weight (and bias) for Linears that read the same input channels."""
    parts = [_linear_parts(m) for m in modules]
    if any(p[2] != parts[0][2] for p in parts) or any(p[3] is not None for p in parts):
        raise _UnsupportedError("fused projections read different channels or scatter")
    weight = torch.cat([p[0].detach() for p in parts]).to(device=device, dtype=dtype)
    bias = None
    if any(p[1] is not None for p in parts):
        bias = torch.cat([p[1].detach() if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in parts])
        bias = bias.to(device=device, dtype=dtype)
    return weight, bias, parts[0][2]


def _index(values: list[int] | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.long, device=device)


class _FusedLayer(nn.Module):
    """One llama block with fused q|k|v and gate|up and its own KV cache ``[B, KV, max_len, D]``."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    gu_w: torch.Tensor
    gu_b: torch.Tensor | None
    o_w: torch.Tensor
    o_b: torch.Tensor | None
    down_w: torch.Tensor
    down_b: torch.Tensor | None
    attn_in: torch.Tensor | None  # DISP's kept channels (None: all)
    attn_out: torch.Tensor | None
    mlp_in: torch.Tensor | None
    mlp_out: torch.Tensor | None
    cos: torch.Tensor  # [KVc, max_len, 2P]
    sin: torch.Tensor

    def __init__(self, layer: nn.Module, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        block: Any = layer  # a llama decoder layer (checked below)
        attn, mlp = block.self_attn, block.mlp
        if type(block) not in (LlamaDecoderLayer, DispLlamaDecoderLayer):
            raise _UnsupportedError(f"block {type(block).__name__}")
        if type(attn) is CompressedAttention:
            s = attn.spec
            self.heads, self.kv_heads, self.dqk, self.dv = s.num_heads, s.num_kv_heads, s.qk_dim, s.v_dim
            rope_index: list[list[int]] | None = s.rope_index
        elif type(attn) is LlamaAttention:
            self.dqk = self.dv = int(attn.head_dim)
            self.heads = _linear_parts(attn.q_proj)[0].shape[0] // self.dqk
            self.kv_heads = _linear_parts(attn.k_proj)[0].shape[0] // self.dqk
            if cos.shape[-1] != self.dqk:
                raise _UnsupportedError("partial rotary on a llama attention")
            rope_index = None
        else:
            raise _UnsupportedError(f"attention {type(attn).__name__}")
        if type(getattr(mlp, "act_fn", None)) not in (nn.SiLU, SiLUActivation):  # both are fn.silu
            raise _UnsupportedError("MLP activation other than SiLU")
        self.scaling = float(attn.scaling)
        self.eps1 = float(block.input_layernorm.variance_epsilon)
        self.eps2 = float(block.post_attention_layernorm.variance_epsilon)
        self.register_buffer("ln1", block.input_layernorm.weight.detach().to(device=device, dtype=dtype))
        self.register_buffer("ln2", block.post_attention_layernorm.weight.detach().to(device=device, dtype=dtype))
        qkv_w, qkv_b, attn_in = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], dtype, device)
        gu_w, gu_b, mlp_in = _fuse([mlp.gate_proj, mlp.up_proj], dtype, device)
        o_w, o_b, o_in, attn_out = _linear_parts(attn.o_proj)
        down_w, down_b, down_in, mlp_out = _linear_parts(mlp.down_proj)
        if o_in is not None or down_in is not None:
            raise _UnsupportedError("gathering output projections")
        self.split = [self.heads * self.dqk, self.kv_heads * self.dqk, self.kv_heads * self.dv]
        self.inter = gu_w.shape[0] // 2
        for name, value in (("qkv_w", qkv_w), ("qkv_b", qkv_b), ("gu_w", gu_w), ("gu_b", gu_b),
                            ("o_w", _cast(o_w, dtype, device)), ("o_b", _cast(o_b, dtype, device)),
                            ("down_w", _cast(down_w, dtype, device)), ("down_b", _cast(down_b, dtype, device)),
                            ("attn_in", _index(attn_in, device)), ("attn_out", _index(attn_out, device)),
                            ("mlp_in", _index(mlp_in, device)), ("mlp_out", _index(mlp_out, device))):
            self.register_buffer(name, value)
        self.register_buffer("cos", _rope_table(cos, rope_index, self.kv_heads))
        self.register_buffer("sin", _rope_table(sin, rope_index, self.kv_heads))
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def allocate(self, batch: int, max_len: int) -> None:
        """Fresh zeroed caches ``[batch, KV, max_len, D]`` (stale positions are never read: masked or sliced)."""
        like = self.qkv_w
        self.k_cache = like.new_zeros(batch, self.kv_heads, max_len, self.dqk)
        self.v_cache = like.new_zeros(batch, self.kv_heads, max_len, self.dv)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.k_cache)
            torch._dynamo.mark_static_address(self.v_cache)

    def attend(self, x: torch.Tensor, pos: int | torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x + o(attn(norm(x)))`` for ``x`` ``[B, T, hidden]`` at positions ``pos..pos+T-1``.

        ``pos`` an int: the cache is written and read by slicing (eager). ``pos`` a ``[1]`` tensor (T = 1, compiled):
        written with ``index_copy_`` and read whole under ``mask`` ``[max_len]`` (True = position <= pos).
        """
        batch, length, _ = x.shape
        h = _rms(x, self.ln1, self.eps1)
        if self.attn_in is not None:
            h = h.index_select(-1, self.attn_in)
        q, k, v = fn.linear(h, self.qkv_w, self.qkv_b).split(self.split, dim=-1)
        q = q.view(batch, length, self.heads, self.dqk).transpose(1, 2)  # [B, H, T, Dqk]
        k = k.view(batch, length, self.kv_heads, self.dqk).transpose(1, 2)  # [B, KV, T, Dqk]
        v = v.view(batch, length, self.kv_heads, self.dv).transpose(1, 2)  # [B, KV, T, Dv]
        if self.cos.shape[-1]:
            if isinstance(pos, int):
                cos, sin = self.cos[:, pos : pos + length], self.sin[:, pos : pos + length]
            else:
                cos, sin = self.cos.index_select(1, pos), self.sin.index_select(1, pos)  # [KVc, 1, 2P]
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if isinstance(pos, int):
            self.k_cache[:, :, pos : pos + length] = k
            self.v_cache[:, :, pos : pos + length] = v
            keys, values = self.k_cache[:, :, : pos + length], self.v_cache[:, :, : pos + length]
        else:
            self.k_cache.index_copy_(2, pos, k)
            self.v_cache.index_copy_(2, pos, v)
            keys, values = self.k_cache, self.v_cache
        out = fn.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                             is_causal=length > 1 and mask is None,
                                             enable_gqa=self.heads != self.kv_heads)  # [B, H, T, Dv]
        y = fn.linear(out.transpose(1, 2).reshape(batch, length, -1), self.o_w, self.o_b)
        return x.index_add(-1, self.attn_out, y) if self.attn_out is not None else x + y

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``x + down(silu(gate(h)) * up(h))``, ``h = norm(x)`` (gathered to DISP's kept channels)."""
        h = _rms(x, self.ln2, self.eps2)
        if self.mlp_in is not None:
            h = h.index_select(-1, self.mlp_in)
        gate, up = fn.linear(h, self.gu_w, self.gu_b).split(self.inter, dim=-1)
        y = fn.linear(fn.silu(gate) * up, self.down_w, self.down_b)
        return x.index_add(-1, self.mlp_out, y) if self.mlp_out is not None else x + y


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().to(device=device, dtype=dtype)


def _rope_table(table: torch.Tensor, rope_index: list[list[int]] | None, kv_heads: int) -> torch.Tensor:
    """``[KVc, max_len, 2P]`` from the host's ``[max_len, rotary_dim]`` table: the whole table (``KVc = 1``) for a
    full-rotary llama head, else each KV group's kept pairs ``cat(angles, angles)`` as CompressedAttention gathers."""
    if rope_index is None:
        return table[None].contiguous()
    if not rope_index or not rope_index[0]:
        return table.new_zeros(1, table.shape[0], 0)
    flat = torch.tensor(rope_index, dtype=torch.long, device=table.device).flatten()
    half = table[:, : table.shape[-1] // 2][:, flat]  # [max_len, KV*P]
    kept = half.view(table.shape[0], kv_heads, -1).permute(1, 0, 2)  # [KV, max_len, P]
    return torch.cat((kept, kept), dim=-1).contiguous()


class _FusedLlama(nn.Module):
    """The whole llama decoder as fused layers; ``prefill`` / ``run`` (eager or dynamic) and ``forward`` (one
    token, static shapes)."""

    embed: torch.Tensor
    head_w: torch.Tensor
    head_b: torch.Tensor | None
    norm: torch.Tensor
    positions: torch.Tensor

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, max_len: int) -> None:
        super().__init__()
        if not isinstance(model, LlamaForCausalLM):
            raise _UnsupportedError(f"model class {type(model).__name__}")
        inner: Any = model.model
        rotary = inner.rotary_emb
        if "dynamic" in str(getattr(rotary, "rope_type", "")):
            raise _UnsupportedError("dynamic rope scaling")
        with torch.no_grad():
            probe = torch.zeros(1, dtype=dtype, device=device)
            positions = torch.arange(max_len, device=device)[None]
            rotary = copy.deepcopy(rotary).to(device)
            if next(model.parameters()).dtype != dtype:  # as model.to(dtype) would, which casts inv_freq too
                rotary = rotary.to(dtype)
            cos, sin = rotary(probe, position_ids=positions)  # [1, max_len, rotary_dim]
            self.layers = nn.ModuleList(_FusedLayer(b, cos[0], sin[0], dtype, device) for b in inner.layers)
            embed = inner.embed_tokens.weight.detach()
            self.register_buffer("embed", embed.to(device=device, dtype=dtype))
            head: Any = model.lm_head
            tied = head.weight is inner.embed_tokens.weight
            self.register_buffer("head_w", self.embed if tied else head.weight.detach().to(device=device, dtype=dtype))
            self.register_buffer("head_b", _cast(head.bias, dtype, device))
            self.register_buffer("norm", inner.norm.weight.detach().to(device=device, dtype=dtype))
        self.eps = float(inner.norm.variance_epsilon)
        self.register_buffer("positions", torch.arange(max_len, device=device))
        self.max_len, self.batch = max_len, 0

    def allocate(self, batch: int) -> None:
        for layer in cast(list[_FusedLayer], self.layers):
            layer.allocate(batch, self.max_len)
        self.batch = batch

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Last position's logits ``[B, vocab]`` (``logits_to_keep=1``, as generate() asks)."""
        return fn.linear(_rms(x[:, -1:], self.norm, self.eps), self.head_w, self.head_b)[:, 0]

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` ``[B, T]`` from position 0 (fresh caches for a new batch size)."""
        if ids.shape[0] != self.batch:
            self.allocate(ids.shape[0])
        return self.run(ids, 0)

    def run(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """``ids`` ``[B, T]`` at positions ``start..start+T-1``, the cache written and read by slicing (the prompt,
        or one decode token: then what ``torch.compile(dynamic=True)`` compiles); next-token logits ``[B, vocab]``."""
        x = fn.embedding(ids, self.embed)
        for layer in cast(list[_FusedLayer], self.layers):
            x = layer.mlp(layer.attend(x, start, None))
        return self.head(x)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step with static shapes (for CUDA graphs): ``token`` ``[B, 1]`` at position ``pos`` ``[1]``,
        attention over the whole cache under a mask; logits ``[B, vocab]``."""
        mask = (self.positions <= pos)[None]  # [1, max_len]
        x = fn.embedding(token, self.embed)
        for layer in cast(list[_FusedLayer], self.layers):
            x = layer.mlp(layer.attend(x, pos, mask))
        return self.head(x)


class _StaticForward(nn.Module):
    """Fallback: the model's own forward (a copy in the decode dtype) with a transformers ``StaticCache``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device, max_len: int) -> None:
        super().__init__()
        first = next(model.parameters())
        self.model = model if (first.dtype, first.device) == (dtype, device) else copy.deepcopy(model).to(device, dtype)
        self.max_len, self.batch = max_len, 0
        self.cache: Any = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None and ids.shape[0] == self.batch:
            self.cache.reset()  # the same tensors: a compiled step keeps its graph
        else:
            self.cache = StaticCache(config=cast(Any, self.model).config, max_cache_len=self.max_len)
        self.batch = ids.shape[0]
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        out = self.model(input_ids=ids, cache=self.cache, use_cache=True, position_ids=positions, logits_to_keep=1)
        return out.logits[:, -1]

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, cache=self.cache, use_cache=True, position_ids=pos[None], logits_to_keep=1)
        return out.logits[:, -1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inductor_cache_dir() -> str:
    """``TORCHINDUCTOR_CACHE_DIR``, set to ``$LEANFM_HOME/cache/inductor`` unless the user set it.

    Why the default check: Inductor writes its own default (``/tmp/torchinductor_<user>``) into the environment
    the first time anything asks for its cache dir, so "set" alone does not mean the user chose it; a value equal
    to that default is replaced, so compiled kernels survive a reboot that empties /tmp.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(leanfm_home() / "cache" / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


class FastDecoder:
    """Greedy decoding of a causal LM through the fused path (llama family) or the model's forward (others).

    ``dtype``: ``auto`` (bfloat16 where it runs natively, see :func:`leanfm.device.decode_dtype`), a name or a
    ``torch.dtype``; ``max_len``: prompt + new tokens the KV cache holds; ``compile``: compile the one-token step
    with :meth:`compile_options` (or a ``torch.compile`` ``mode`` instead, e.g. ``max-autotune-no-cudagraphs``).
    The model is not modified: the fused path holds its own (fused, converted) weights, the fallback a converted
    copy.
    """

    def __init__(self, model: nn.Module, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                 max_len: int = 512, compile: bool = True, mode: str | None = None) -> None:
        config = getattr(model, "config", None)
        if not isinstance(model, GenerationMixin) or config is None or getattr(config, "is_encoder_decoder", False):
            raise LeanfmError(f"FastDecoder decodes transformers decoder-only causal LMs; got {type(model).__name__}")
        if not isinstance(max_len, int) or max_len < 2:
            raise LeanfmError(f"max_len {max_len!r} too small; accepted: an int >= 2 (prompt + new tokens)")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(decode_dtype(dtype, self.device) if isinstance(dtype, str) else dtype)
        self.max_len = max_len
        try:
            self.net: nn.Module = _FusedLlama(model, self.dtype, self.device, max_len)
            self.path = "fused"
        except _UnsupportedError as why:
            log.info("fast decode: model's own forward with a static cache (%s)", why)
            self.net = _StaticForward(model, self.dtype, self.device, max_len)
            self.path = "static-cache"
        # CUDA graphs need static shapes: there the step attends over the whole cache under a mask (SDPA then sums
        # in another order than generate()'s, so bf16 logits may differ in the last bit); on CPU the compiled step
        # keeps generate()'s shapes (the cache read up to the position, a symbolic length)
        self.static = self.path != "fused" or self.device.type == "cuda"
        self.compiled = compile
        self.compile_seconds = 0.0
        self.last_prefill_seconds = self.last_decode_seconds = 0.0
        self._step: Any = self.net if self.static else cast(_FusedLlama, self.net).run
        if compile:
            inductor_cache_dir()
            self._step = torch.compile(self._step, mode=mode, options=None if mode else self.compile_options(),
                                       dynamic=None if self.static else True, fullgraph=self.path == "fused")
            start = time.perf_counter()
            prompt = 2 if max_len >= 5 else 1  # steps at positions 2, 3: not the 0 and 1 dynamo specialises on
            self.generate(torch.zeros(1, prompt, dtype=torch.long), min(3, max_len - prompt))
            self.compile_seconds = time.perf_counter() - start

    def compile_options(self) -> dict[str, Any]:
        """Inductor options: ``emulate_precision_casts`` rounds every intermediate a fused kernel computes to the
        dtype eager would store it in (without it the fused RMSNorm / rotary / SiLU keep float32 intermediates and
        SmolLM2's bfloat16 greedy tokens left generate()'s at the 4th token); ``freezing`` folds the weights in as
        constants (on CPU, prepacked for oneDNN); on CUDA, CUDA graphs (``reduce-overhead``'s option)."""
        options: dict[str, Any] = {"emulate_precision_casts": True}
        if self.device.type == "cuda":
            options["triton.cudagraphs"] = True
        else:
            options["freezing"] = True
        return options

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] < 1 or input_ids.dtype != torch.long:
            raise LeanfmError(f"input_ids of shape {tuple(input_ids.shape)} and dtype {input_ids.dtype}; "
                              "accepted: a [batch, length >= 1] long tensor")
        if max_new_tokens < 1:
            raise LeanfmError(f"max_new_tokens {max_new_tokens}; accepted: >= 1")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.max_len:
            raise LeanfmError(f"prompt of {input_ids.shape[1]} + {max_new_tokens} new tokens = {total} exceeds "
                              f"max_len {self.max_len}; accepted: build the FastDecoder with max_len >= {total}")
        return input_ids.to(self.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None,
                 pad_token_id: int = 0) -> torch.Tensor:
        """Greedy continuation ``[B, T + n]`` of ``input_ids`` ``[B, T]`` (equal-length rows, no padding).

        Rows that emitted ``eos_token_id`` continue with ``pad_token_id`` and decoding stops once all have, as
        ``generate()`` does; without it exactly ``max_new_tokens`` are produced. Times the prefill and the
        ``n - 1`` decode steps into ``last_prefill_seconds`` / ``last_decode_seconds``.
        """
        ids = self._check(input_ids, max_new_tokens)
        start = time.perf_counter()
        logits = cast(Any, self.net).prefill(ids)
        token = logits.float().argmax(-1, keepdim=True)  # [B, 1]
        _sync(self.device)
        self.last_prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        unfinished = torch.ones_like(token, dtype=torch.bool)
        out = [ids]
        for step in range(max_new_tokens):
            if eos_token_id is not None:
                token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
                unfinished &= token != eos_token_id
            out.append(token)
            if step == max_new_tokens - 1 or (eos_token_id is not None and not bool(unfinished.any())):
                break
            token = self._decode(token, ids.shape[1] + step).float().argmax(-1, keepdim=True)
        result = torch.cat(out, dim=1)
        _sync(self.device)
        self.last_decode_seconds = time.perf_counter() - start
        return result

    def _decode(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits after ``token`` ``[B, 1]`` at position ``pos`` (compiled or eager, static or sliced)."""
        if self.static:
            return cast(torch.Tensor, self._step(token.clone(), torch.tensor([pos], device=self.device)))
        return cast(torch.Tensor, self._step(token, pos))

    def decode_tokens_per_s(self, prompt_ids: torch.Tensor, new_tokens: int = 64, repeats: int = 3) -> float:
        """Median of ``repeats`` runs (after one warm-up) of ``(new_tokens - 1) / decode seconds``."""
        self.generate(prompt_ids, new_tokens)
        rates = []
        for _ in range(repeats):
            self.generate(prompt_ids, new_tokens)
            rates.append((new_tokens - 1) / max(self.last_decode_seconds, 1e-9))
        return statistics.median(rates)


def read_bandwidth_gbps(nbytes: int, device: str | torch.device = "cpu", repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: ``nbytes`` / median time of summing a float32 buffer of that size.

    Why a sum: it reads every byte once and its arithmetic is far below what the cores can do, so memory sets the
    pace, like a decode step streaming its weights. Size it to the bytes a token reads (the working set that
    matters: a buffer that fits a large cache measures the cache).
    """
    dev = resolve_device(device)
    buf = torch.ones(max(nbytes // 4, 1 << 18), dtype=torch.float32, device=dev)
    buf.sum()
    times = []
    for _ in range(repeats):
        _sync(dev)
        start = time.perf_counter()
        buf.sum()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bytes_per_token(decoder: FastDecoder, context: int) -> dict[str, int]:
    """Bytes one decode step reads at ``context`` cached positions: ``attention`` (norm, q|k|v, o, the keys and
    values), ``mlp`` (norm, gate|up, down), ``lm_head`` (final norm, head) and ``embed`` (one row per token).

    The static-shape step (CUDA graphs) attends over the whole cache (masked): ``max_len`` positions. For
    the static-cache fallback only the total is known: every parameter once (``other``).
    """
    net = decoder.net
    if not isinstance(net, _FusedLlama):
        params = {id(p): p for p in net.parameters()}  # tied weights once
        return {"other": _nbytes(*params.values())}
    positions = decoder.max_len if decoder.static else context
    attention = mlp = 0
    for layer in cast(list[_FusedLayer], net.layers):
        cache = layer.kv_heads * positions * (layer.dqk + layer.dv) * layer.qkv_w.element_size()
        attention += _nbytes(layer.ln1, layer.qkv_w, layer.qkv_b, layer.o_w, layer.o_b) + cache
        mlp += _nbytes(layer.ln2, layer.gu_w, layer.gu_b, layer.down_w, layer.down_b)
    return {"embed": net.embed[0].numel() * net.embed.element_size(), "attention": attention, "mlp": mlp,
            "lm_head": _nbytes(net.norm, net.head_w, net.head_b)}


def _timed_parts(net: _FusedLlama, prompt: torch.Tensor, steps: int, device: torch.device) -> dict[str, float]:
    """Eager per-token milliseconds of each part, timed section by section over ``steps`` decode steps."""
    parts = dict.fromkeys(("embed", "attention", "mlp", "lm_head"), 0.0)
    token = net.prefill(prompt).argmax(-1, keepdim=True)
    clock = time.perf_counter
    for step in range(steps):
        pos = prompt.shape[1] + step
        _sync(device)
        t0 = clock()
        x = fn.embedding(token, net.embed)
        _sync(device)
        parts["embed"] += clock() - t0
        for layer in cast(list[_FusedLayer], net.layers):
            t0 = clock()
            x = layer.attend(x, pos, None)
            _sync(device)
            t1 = clock()
            x = layer.mlp(x)
            _sync(device)
            parts["attention"] += t1 - t0
            parts["mlp"] += clock() - t1
        t0 = clock()
        token = net.head(x).float().argmax(-1, keepdim=True)
        _sync(device)
        parts["lm_head"] += clock() - t0
    return {name: 1000 * seconds / steps for name, seconds in parts.items()}


@torch.inference_mode()
def profile(decoder: FastDecoder, prompt_ids: torch.Tensor, new_tokens: int = 32) -> dict[str, Any]:
    """Where a decode token's time goes, against the bandwidth limit ``read GB/s / bytes per token``.

    ``tokens_per_s`` / ``token_ms``: the decoder as built (compiled or not). ``parts_ms``: eager fused step timed
    section by section (embed, attention = norm + q|k|v + rotary + cache + SDPA + o, mlp, lm_head = final norm +
    head + argmax) and ``other`` = the uninstrumented eager step minus their sum (loop and sampling overhead).
    ``parts_gbps``: each part's bytes / time -- near ``read_gbps`` means bandwidth-bound, far below means overhead.
    """
    prompt = decoder._check(prompt_ids, new_tokens)
    rate = decoder.decode_tokens_per_s(prompt, new_tokens)
    sizes = bytes_per_token(decoder, prompt.shape[1] + new_tokens // 2)
    total = sum(sizes.values())
    bandwidth = read_bandwidth_gbps(total, decoder.device)
    limit = bandwidth * 1e9 / total
    result: dict[str, Any] = {
        "path": decoder.path, "compiled": decoder.compiled, "dtype": str(decoder.dtype).replace("torch.", ""),
        "device": str(decoder.device), "threads": torch.get_num_threads(), "tokens_per_s": rate,
        "token_ms": 1000 / rate, "bytes_per_token": total, "bytes": sizes, "read_gbps": bandwidth,
        "limit_tokens_per_s": limit, "fraction_of_limit": rate / limit,
    }
    if isinstance(decoder.net, _FusedLlama):
        parts = _timed_parts(decoder.net, prompt[:1], new_tokens, decoder.device)
        step, decoder._step = decoder._step, decoder.net if decoder.static else decoder.net.run  # eager step
        try:
            eager_ms = 1000 / decoder.decode_tokens_per_s(prompt[:1], new_tokens)
        finally:
            decoder._step = step
        parts["other"] = eager_ms - sum(parts.values())
        result.update(eager_token_ms=eager_ms, parts_ms=parts,
                      parts_gbps={k: sizes[k] / (parts[k] * 1e6) for k in sizes if parts.get(k, 0.0) > 0})
    return result
