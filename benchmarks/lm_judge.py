"""What the compression benchmarks share: the text a compressed LM is judged on, and the judging.

Used by ``benchmarks/modegpt.py`` and ``benchmarks/disp.py`` so that every row of both tables is scored on the
same windows: the ``eval`` splits of the two calibration corpora (``austen`` = Persuasion, ``pydocs``) and, from
``--data`` (any folder in the 16-shot layout), three kinds of text in no calibration mix (reviews, news,
questions: :mod:`leanfm.eval.domains`), plus last-word cloze accuracy on Austen.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from leanfm.data.corpus import corpus
from leanfm.eval.cloze import cloze_accuracy, cloze_items
from leanfm.eval.domains import domain_perplexities, domain_windows

HELD = ("reviews", "news", "questions")


def default_data() -> Path | None:
    """``../shared/data`` beside the project when it exists (a developer's checkout), else nothing."""
    guess = Path(__file__).resolve().parents[2] / "shared" / "data"
    return guess if (guess / "fewshot").is_dir() else None


class Judge:
    """The windows every model is scored on (built once per tokenizer), and the scoring."""

    def __init__(self, tokenizer: object, args: argparse.Namespace, split: str = "test") -> None:
        seqlen = getattr(args, "eval_seqlen", 512)  # Gemma-3's 512-token sliding windows need >= 1024 to matter
        self.suite = domain_windows(tokenizer, args.data, seqlen, args.windows, split=split)
        self.items = cloze_items(corpus("austen", "eval"), count=args.cloze) if split == "test" and args.cloze else []
        self.tokenizer = tokenizer

    def __call__(self, model: torch.nn.Module) -> dict:
        out: dict = {"perplexity": domain_perplexities(model, self.suite)}
        out["windows"] = {name: int(ids.shape[0]) for name, ids in self.suite.items()}
        if self.items:
            out["cloze_accuracy"] = cloze_accuracy(model, self.tokenizer, self.items)
        return out
