"""Evaluation: perplexity, zero-shot cloze, zero-shot nearest-candidate scoring, throughput and memory."""

from leanfm.eval.cloze import ClozeItem, cloze_accuracy, cloze_items
from leanfm.eval.harness import EvalConfig, EvalResult, count_parameters, evaluate
from leanfm.eval.perplexity import PerplexityResult, perplexity
from leanfm.eval.zero_shot import nearest_candidates, zero_shot_accuracy

__all__ = [
    "ClozeItem",
    "EvalConfig",
    "EvalResult",
    "PerplexityResult",
    "cloze_accuracy",
    "cloze_items",
    "count_parameters",
    "evaluate",
    "nearest_candidates",
    "perplexity",
    "zero_shot_accuracy",
]
