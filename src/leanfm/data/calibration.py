"""Turning a corpus split into token windows: evaluation windows and calibration samples.

Shared by the evaluation harness (contiguous, non-overlapping windows from the start of a split) and by
the compressors (random windows from the ``calib`` split, seeded, so every method sees the same data).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from leanfm.data.corpus import corpus
from leanfm.errors import LeanfmError


@functools.lru_cache(maxsize=8)
def split_token_ids(tokenizer: Any, corpus_name: str, split: str) -> torch.Tensor:
    """All token ids of a corpus split as one 1-D tensor (cached per tokenizer object in this process)."""
    ids = tokenizer(corpus(corpus_name, split), return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def token_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Cut ``ids`` (shape ``[T]``) into non-overlapping windows, shape ``[min(windows, T // seqlen), seqlen]``."""
    if seqlen < 2:
        raise LeanfmError(f"seqlen {seqlen} is too small; accepted: an integer >= 2")
    available = ids.numel() // seqlen
    if available == 0:
        raise LeanfmError(f"text has {ids.numel()} tokens, fewer than one window of seqlen {seqlen}")
    count = available if windows is None else min(windows, available)
    return ids[: count * seqlen].view(count, seqlen)


def calibration_windows(
    tokenizer: object,
    samples: int = 32,
    seqlen: int = 512,
    corpus_name: str = "austen",
    split: str = "calib",
    seed: int = 0,
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from a split, shape ``[samples, seqlen]``.

    Start offsets are drawn with a seeded generator, so two methods given the same arguments calibrate on
    identical data.
    """
    if samples < 1:
        raise LeanfmError(f"calibration samples {samples} must be >= 1")
    ids = split_token_ids(tokenizer, corpus_name, split)
    if ids.numel() <= seqlen:
        raise LeanfmError(f"split '{split}' has {ids.numel()} tokens, too few for seqlen {seqlen}")
    return random_windows(ids, samples, seqlen, seed)


def random_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``ids`` at start offsets drawn with ``seed``, shape ``[samples, seqlen]``."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
