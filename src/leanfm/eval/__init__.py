"""Evaluation: perplexity, zero-shot cloze, throughput and memory."""

from leanfm.eval.cloze import ClozeItem, cloze_accuracy, cloze_items
from leanfm.eval.harness import EvalConfig, EvalResult, count_parameters, evaluate
from leanfm.eval.perplexity import PerplexityResult, perplexity

__all__ = [
    "ClozeItem",
    "EvalConfig",
    "EvalResult",
    "PerplexityResult",
    "cloze_accuracy",
    "cloze_items",
    "count_parameters",
    "evaluate",
    "perplexity",
]
