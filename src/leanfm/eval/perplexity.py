"""Perplexity over non-overlapping windows: the token-weighted mean negative log-likelihood.

Each window of ``seqlen`` tokens is scored independently (no context carried over), predicting tokens
``1..seqlen-1`` from their prefixes; PPL = exp(sum of NLL / number of predicted tokens). This is the
standard "non-overlapping windows" protocol of the compression literature (e.g. WikiText-2 at 2048 in the
MoDeGPT and DISP-LLM papers), here on the corpora of ``leanfm.data``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from leanfm.progress import progress


@dataclass
class PerplexityResult:
    """Perplexity with the totals it came from, so results can be pooled or re-derived."""

    perplexity: float
    nll_sum: float
    tokens: int
    windows: int
    seconds: float


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL per row, ``[B]``, of ``targets`` ``[B, T]`` under ``logits`` ``[B, T, V]``.

    The one place a summed NLL is computed, so every perplexity in the project (the harness, DynaMo's per-head
    perplexities) uses the same float32 kernel and reduction and equal models give equal numbers.
    """
    nll = nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, T]
    return nll.sum(dim=1)


@torch.inference_mode()
def window_nll(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window, shape ``[B]`` for ``windows`` of shape ``[B, T]``."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1]  # [B, T-1, V]
    return summed_nll(logits, windows[:, 1:])


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (``[N, T]`` token ids), in batches of ``batch_size``."""
    device = next(model.parameters()).device
    total, start = 0.0, time.perf_counter()
    batches = windows.split(batch_size)
    for batch in progress(batches, desc="perplexity", total=len(batches)):
        total += float(window_nll(model, batch.to(device)).double().sum())
    seconds = time.perf_counter() - start
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    if not math.isfinite(total):
        raise FloatingPointError("non-finite NLL: the model produced NaN/inf logits")
    return PerplexityResult(math.exp(total / tokens), total, tokens, windows.shape[0], seconds)
