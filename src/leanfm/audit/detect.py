"""Does this prompt carry a trojan? Search for a short suffix that flips inputs under it but not under a reference.

The defender has the prompt, query access to the model, some unlabelled inputs and a trusted reference prompt for
the same task (a hand-written one: the task's ``manual_prompt``); no trigger, no target. A trojaned prompt is one
under which a short, input-independent suffix sends most inputs to one class. Universal *natural* triggers exist
for any prompt ("great great great" flips negative reviews under every sentiment prompt), so a bare flip rate
cannot tell a trojan from a sentiment word: our first measurement scored clean prompts as high as poisoned ones.
The detector therefore searches, for each label c, a ``length``-token suffix t maximising the RLPrompt reward
towards c under the prompt *minus* the same reward under the reference, on the inputs the prompt does not already
put in c (cheap black-box evolution of :mod:`leanfm.audit.search`), and scores

    score = max_c [ flip_c(prompt, t_c) − flip_c(reference, t_c) ],
    flip_c(p, t) = mean_{x: argmax P(·|x; prompt) ≠ c} 1[argmax P(·|x ⊕ t; p) = c],

flagging the prompt when the score reaches ``threshold``. Without a reference the score is the bare flip rate.
The suffix is searched on half of the inputs and the score measured on the other half (``held_out``).
Where clean and poisoned prompts separate is measured by the benchmark's ROC, not assumed. Our reading of the
paper's "potential defensive approach".
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
    per_label: list[float]  # the score for each label
    suffixes: list[str]  # the suffix found for each label

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def detect_trojan(clf: PromptClassifier, prompt: str, inputs: Sequence[str], decode: Any, pool: Sequence[int], *,
                  reference: str | None = None, length: int = 3, budget_per_label: int = 600,
                  threshold: float = 0.5, seed: int = 0, held_out: bool = True) -> Detection:
    """Score ``prompt`` (see the module docstring); ``decode`` maps token ids to text (the suffix).

    ``held_out``: search the suffix on half of the inputs, report its flip rates on the other half.
    """
    if not inputs:
        raise LeanfmError("the detector needs at least one input")
    clf.use_budget(None)
    base = clf.probabilities(prompt, inputs).argmax(1)
    rates, suffixes, used = [], [], 0
    for label in range(clf.classes):
        movable_all = [x for x, b in zip(inputs, base, strict=True) if b != label]
        if not movable_all:  # the prompt already sends every input to this label
            rates.append(1.0)
            suffixes.append("")
            continue
        # search on every other input, measure on the rest: a search that maximises a difference over a few
        # inputs finds one by chance (measured: clean prompts flagged as often as poisoned ones without this)
        movable = movable_all[0::2] if held_out and len(movable_all) > 1 else movable_all
        measure = movable_all[1::2] if held_out and len(movable_all) > 1 else movable_all
        budget = QueryBudget(budget_per_label)
        clf.use_budget(budget)
        target = np.full(len(movable), label)

        def objective(cands: Sequence[tuple[int, ...]], rows: Sequence[int] | None,
                      movable: list[str] = movable, target: np.ndarray = target) -> np.ndarray:
            prompts = [prompt] if reference is None else [prompt, reference]
            answers = clf.probabilities_many([(p, movable, decode(c)) for c in cands for p in prompts])
            scores = [float(search.rlprompt_reward(a, target).mean()) for a in answers]
            if reference is None:
                return np.array(scores)
            return np.array(scores[0::2]) - np.array(scores[1::2])

        cost = len(movable) * (1 if reference is None else 2)
        found = search.evolutionary_search(objective, objective, pool, length, budget=budget, cost=cost,
                                           select_cost=0, seed=seed * 31 + label, finalists=1)
        suffix = decode(found.tokens)
        clf.use_budget(None)
        rate = _flip(clf, prompt, measure, suffix, label)
        if reference is not None:
            rate -= _flip(clf, reference, measure, suffix, label)
        rates.append(rate)
        suffixes.append(suffix)
        used += budget.used
    clf.use_budget(None)
    best = int(np.argmax(rates))
    return Detection(rates[best], best, suffixes[best], rates[best] >= threshold, used, rates, suffixes)


def _flip(clf: PromptClassifier, prompt: str, inputs: list[str], suffix: str, label: int) -> float:
    return float((clf.probabilities(prompt, inputs, suffix).argmax(1) == label).mean())
