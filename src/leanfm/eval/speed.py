"""Throughput and memory: prefill tokens/s (last-position logits), greedy decode tokens/s (KV cache, batch 1), peak RSS.

Machines are noisy, so each figure is the median of ``repeats`` timed runs after one warm-up, and callers
comparing two models measure them alternately in one process (see ``benchmarks/``).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from transformers import GenerationMixin


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
def decode_tokens_per_s(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy decoding speed with the KV cache at batch 1: generated tokens per second (prefill excluded).

    The prompt's prefill is timed separately and subtracted, so the figure is the per-token decode rate.
    """
    device = next(model.parameters()).device
    ids = prompt_ids[:1].to(device)
    kwargs = {"do_sample": False, "use_cache": True, "pad_token_id": 0}

    lm = cast(GenerationMixin, model)  # a transformers causal LM

    def run(n: int) -> object:
        mask = torch.ones_like(ids)
        return lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)

    full = median_seconds(lambda: run(new_tokens), repeats=repeats)
    first = median_seconds(lambda: run(1), repeats=repeats)
    return (new_tokens - 1) / max(full - first, 1e-9)
