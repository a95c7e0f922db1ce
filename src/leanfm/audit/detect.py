"""Does this prompt carry a trojan? Search for a short suffix that flips most inputs to one label.

The defender has the prompt, query access to the model and some unlabelled inputs (no trigger, no target). A
trojaned prompt is one for which a short, input-independent suffix exists that sends most inputs to one class;
so for each label c we run the cheap black-box search of :mod:`leanfm.audit.search` (evolution: it needs no
policy model) for a ``length``-token suffix maximising the RLPrompt reward towards c on the inputs the prompt
does not already put in c, and score the prompt by the best flip rate found,

    score = max_c  mean_{x: argmax P(·|x) ≠ c} 1[argmax P(·|x ⊕ t_c) = c],

flagging it when the score reaches ``threshold``. Clean prompts have such suffixes too (any prompt can be
pushed), only rarer and harder to find within the budget; where the two distributions separate is measured
by the benchmark's ROC, not assumed. Our reading of the paper's "potential defensive approach".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import leanfm.audit.search as search
from leanfm.audit.victim import PromptClassifier, QueryBudget
from leanfm.errors import LeanfmError


@dataclass
class Detection:
    score: float  # best flip rate found
    label: int  # the label it flips to
    suffix: str
    flagged: bool
    queries: int
    per_label: list[float]

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def detect_trojan(clf: PromptClassifier, prompt: str, inputs: Sequence[str], decode: Any, pool: Sequence[int], *,
                  length: int = 3, budget_per_label: int = 600, threshold: float = 0.8,
                  seed: int = 0) -> Detection:
    """Score ``prompt`` (see the module docstring); ``decode`` maps token ids to text (the suffix)."""
    if not inputs:
        raise LeanfmError("the detector needs at least one input")
    clf.use_budget(None)
    base = clf.probabilities(prompt, inputs).argmax(1)
    rates, suffixes, used = [], [], 0
    for label in range(clf.classes):
        movable = [x for x, b in zip(inputs, base, strict=True) if b != label]
        if not movable:  # the prompt already sends every input to this label
            rates.append(1.0)
            suffixes.append("")
            continue
        budget = QueryBudget(budget_per_label)
        clf.use_budget(budget)
        target = np.full(len(movable), label)

        def objective(cands: Sequence[tuple[int, ...]], rows: Sequence[int] | None,
                      movable: list[str] = movable, target: np.ndarray = target) -> np.ndarray:
            return np.array([search.rlprompt_reward(clf.probabilities(prompt, movable, decode(c)), target).mean()
                             for c in cands])

        found = search.evolutionary_search(objective, objective, pool, length, budget=budget, cost=len(movable),
                                           select_cost=0, seed=seed * 31 + label, finalists=1)
        suffix = decode(found.tokens)
        rate = float((clf.probabilities(prompt, movable, suffix).argmax(1) == label).mean())
        rates.append(rate)
        suffixes.append(suffix)
        used += budget.used
    clf.use_budget(None)
    best = int(np.argmax(rates))
    return Detection(rates[best], best, suffixes[best], rates[best] >= threshold, used, rates)
