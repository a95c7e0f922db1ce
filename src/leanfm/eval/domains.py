"""Perplexity of one model on several kinds of text at once: where a compressed model is judged.

Why: a model compressed on one author kept that author at 1.8x its dense perplexity but other text at 9x
(issue 13), so a compression result is only trustworthy with the text it was calibrated on *and* text it never
saw side by side. A suite is a mapping ``domain -> token windows`` built once per tokenizer
(:func:`domain_windows`) and scored with the same windows for every model (:func:`domain_perplexities`).

Domains: ``austen`` and ``pydocs`` are the ``eval`` splits of the two calibration corpora (held-out documents of
the calibration *domains*); ``reviews``, ``news`` and ``questions`` are the 16-shot sentence sets of a data
folder (:data:`leanfm.data.fewshot.TEXT_DOMAINS`), in no calibration mix. With ``split="val"`` the same domains
come from text no test uses (the corpora's ``train`` splits, the 16-shot train/dev pools), for tuning.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.data.fewshot import TEXT_DOMAINS, domain_text
from leanfm.eval.perplexity import perplexity

CORPUS_DOMAINS = ("austen", "pydocs")


def domain_windows(tokenizer: Any, data: str | Path | None, seqlen: int = 512, windows: int = 8,
                   split: str = "test") -> dict[str, torch.Tensor]:
    """``{domain: ids [n, seqlen]}`` for the corpus domains and, when ``data`` is given, the 16-shot domains.

    ``split="test"``: corpus ``eval`` splits and 16-shot test sets; ``"val"``: corpus ``train`` splits and the
    16-shot train/dev pools. Each domain gives up to ``windows`` contiguous windows from its start.
    """
    corpus_split = "eval" if split == "test" else "train"
    out = {name: token_windows(split_token_ids(tokenizer, name, corpus_split), seqlen, windows)
           for name in CORPUS_DOMAINS}
    if data is not None:
        for domain in TEXT_DOMAINS:
            ids = tokenizer(domain_text(data, domain, split), return_attention_mask=False)["input_ids"]
            out[domain] = token_windows(torch.tensor(ids, dtype=torch.long), seqlen, windows)
    return out


def domain_perplexities(model: nn.Module, suite: dict[str, torch.Tensor], batch_size: int = 1) -> dict[str, float]:
    """Perplexity per domain, plus ``heldout``: the geometric mean over the domains not in :data:`CORPUS_DOMAINS`
    (absent when the suite has none)."""
    out = {name: perplexity(model, ids, batch_size=batch_size).perplexity for name, ids in suite.items()}
    held = [out[name] for name in suite if name not in CORPUS_DOMAINS]
    if held:
        out["heldout"] = math.exp(sum(math.log(p) for p in held) / len(held))
    return out
