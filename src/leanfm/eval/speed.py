"""Throughput and memory: prefill tokens/s (last-position logits), greedy decode tokens/s (KV cache, batch 1), peak RSS.

Machines are noisy, so each figure is the median of ``repeats`` timed runs after one warm-up, and callers
comparing two models measure them alternately in one process (see ``benchmarks/``). :func:`pytorch_rows` is the
PyTorch part of the deployment table (``generate()`` against :mod:`leanfm.eval.fastdecode`, issue 22).
"""

from __future__ import annotations

import copy
import functools
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn
from transformers import GenerationMixin

from leanfm.device import resolve_device
from leanfm.eval.fastdecode import FastDecoder, bytes_per_token, read_bandwidth_gbps
from leanfm.models.registry import load_model


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def prefill_tokens_per_s(model: nn.Module, input_ids: torch.Tensor, repeats: int = 3) -> float:
    """Tokens per second of a forward over ``input_ids`` (``[B, T]``), no cache, logits for the last position only.

    ``logits_to_keep=1`` is what a serving stack computes at prefill (the next token's distribution): the
    ``[B, T, vocab]`` logits of every position cost SmolLM2 12.5% of its dense prefill and are the same for a
    dense and a compressed model, so counting them hid part of the speed-up (issue 14).
    """
    device = next(model.parameters()).device
    ids = input_ids.to(device)
    seconds = median_seconds(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats=repeats)
    return ids.numel() / seconds


@torch.inference_mode()
def decode_tokens_per_s(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3,
                        fast: bool = False, compile: bool = True) -> float:
    """Greedy decoding speed with the KV cache at batch 1: generated tokens per second (prefill excluded).

    The prompt's prefill is timed separately and subtracted, so the figure is the per-token decode rate.
    ``fast``: through :class:`leanfm.eval.fastdecode.FastDecoder` in the model's dtype (``compile`` its step;
    the compile is paid once here and not counted) instead of ``generate()``.
    """
    param = next(model.parameters())
    device = param.device
    ids = prompt_ids[:1].to(device)
    if fast:
        decoder = FastDecoder(model, dtype=param.dtype, device=device, max_len=ids.shape[1] + new_tokens,
                              compile=compile)
        return decoder.decode_tokens_per_s(ids, new_tokens, repeats=repeats)
    kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": 0}

    lm = cast(GenerationMixin, model)  # a transformers causal LM

    def run(n: int) -> object:
        mask = torch.ones_like(ids)
        return lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)

    full = median_seconds(lambda: run(new_tokens), repeats=repeats)
    first = median_seconds(lambda: run(1), repeats=repeats)
    return (new_tokens - 1) / max(full - first, 1e-9)


# A fixed English prompt: the first ``prompt_tokens`` of its SmolLM2 tokens are the issue-22 protocol's prompt.
PROMPT_TEXT = ("The old lighthouse keeper climbed the winding stairs every evening to light the lamp, and on the "
               "night of the storm he saw a ship")


def _generate_rates(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """One timed round of ``generate()``: decode tokens/s ((n - 1) / (t(n) - t(1))), prefill tokens/s (a forward
    with ``logits_to_keep=1``) and the greedy tokens."""
    lm = cast(GenerationMixin, model)
    kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    start = time.perf_counter()
    lm.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    tokens = cast(torch.Tensor, lm.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            **kwargs))
    full = time.perf_counter() - start
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    prefill = time.perf_counter() - start
    return (new_tokens - 1) / max(full - first, 1e-9), ids.shape[1] / prefill, tokens


def _bytes_total(decoder: FastDecoder, context: int) -> int:
    return sum(bytes_per_token(decoder, context).values())


def _fast_rates(decoder: FastDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    tokens = decoder.generate(ids, new_tokens)
    decode = (new_tokens - 1) / max(decoder.last_decode_seconds, 1e-9)
    return decode, ids.shape[1] / decoder.last_prefill_seconds, tokens


@torch.inference_mode()
def pytorch_rows(model_name_or_folder: str, new_tokens: int = 64, prompt_tokens: int = 18, rounds: int = 3,
                 device: str = "cpu", compile: bool = True) -> list[dict[str, Any]]:
    """PyTorch rows of the deployment table (issue 22): ``generate()`` in float32 and bfloat16, and the fast path
    (bfloat16 eager and compiled, float32 eager), measured in alternating rounds in this process (medians).

    Each row: decode and prefill tokens/s, compile seconds, bytes one decode token reads, the read bandwidth
    (:func:`read_bandwidth_gbps` over that many bytes), the limit ``bandwidth / bytes`` and the fraction of it
    reached, whether the greedy tokens equal ``generate()``'s in the same dtype, threads and load averages.
    """
    model32, tokenizer = load_model(model_name_or_folder)
    dev = resolve_device(device)
    model32 = model32.to(dev)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)  # as load_model(dtype="bfloat16") does
    ids = torch.tensor([tokenizer(PROMPT_TEXT)["input_ids"][:prompt_tokens]], device=dev)
    max_len = ids.shape[1] + new_tokens
    load_before = os.getloadavg()
    fast = {("bfloat16", False): FastDecoder(model16, torch.bfloat16, dev, max_len, compile=False),
            ("float32", False): FastDecoder(model32, torch.float32, dev, max_len, compile=False)}
    if compile:
        fast["bfloat16", True] = FastDecoder(model16, torch.bfloat16, dev, max_len, compile=True)
    runs: dict[tuple[str, str, bool], Callable[[], tuple[float, float, torch.Tensor]]] = {
        ("generate", "float32", False): lambda: _generate_rates(model32, ids, new_tokens),
        ("generate", "bfloat16", False): lambda: _generate_rates(model16, ids, new_tokens),
    }
    for (dtype, compiled), decoder in fast.items():
        runs["fast", dtype, compiled] = functools.partial(_fast_rates, decoder, ids, new_tokens)
    for run in runs.values():
        run()  # warm-up
    measured: dict[tuple[str, str, bool], list[tuple[float, float, torch.Tensor]]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            measured[key].append(run())
    reference = {dtype: measured["generate", dtype, False][0][2] for dtype in ("float32", "bfloat16")}
    bandwidth = read_bandwidth_gbps(_bytes_total(fast["bfloat16", False], max_len), dev)
    rows = []
    for (path, dtype, compiled), results in measured.items():
        decoder = fast[dtype, compiled] if path == "fast" else fast[dtype, False]
        size = _bytes_total(decoder, ids.shape[1] + new_tokens // 2)
        decode = statistics.median(r[0] for r in results)
        rows.append({
            "model": model_name_or_folder, "runtime": "pytorch", "path": path, "dtype": dtype, "compiled": compiled,
            "decode_tokens_per_s": decode, "prefill_tokens_per_s": statistics.median(r[1] for r in results),
            "compile_seconds": decoder.compile_seconds if path == "fast" else 0.0, "bytes_per_token": size,
            "read_gbps": bandwidth, "limit_tokens_per_s": bandwidth * 1e9 / size,
            "fraction_of_limit": decode * size / (bandwidth * 1e9),
            "tokens_equal_generate": all(torch.equal(r[2], reference[dtype]) for r in results),
            "threads": torch.get_num_threads(), "rounds": rounds, "new_tokens": new_tokens,
            "prompt_tokens": ids.shape[1], "device": str(dev), "load_average": [load_before, os.getloadavg()],
        })
    return rows
