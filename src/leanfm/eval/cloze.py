"""Last-word cloze accuracy (LAMBADA-style) on held-out prose.

LAMBADA asks a model to predict the final word of a passage whose answer is recoverable from the broader
context. Offline we build the same kind of item from the ``eval`` split: a sentence end whose final word
(alphabetic, >= 4 letters) already occurred in the preceding ``min_words`` or more words of its paragraph.
The context is the paragraph up to that word (its last ``max_context_words`` words). An item counts as
correct when greedy decoding reproduces every token of ``" " + word`` — lm-evaluation-harness's
``is_greedy`` criterion for LAMBADA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from leanfm.progress import progress

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’]*\s+")
_FINAL_WORD = re.compile(r"^(.*\s)([A-Za-z]{4,})[.!?][\"'”’]*$", re.DOTALL)


@dataclass(frozen=True)
class ClozeItem:
    """One cloze question: predict ``target`` (a single word, no leading space) after ``context``."""

    context: str
    target: str


def _paragraph_items(paragraph: str, min_words: int, max_context_words: int) -> list[ClozeItem]:
    items, consumed = [], ""
    for sentence in _SENTENCE_END.split(paragraph):
        match = _FINAL_WORD.match(sentence.strip())
        if match:
            context = (consumed + " " + match.group(1)).split()
            target = match.group(2)
            if len(context) >= min_words and target.lower() in {w.strip(".,;:!?\"'()").lower() for w in context}:
                items.append(ClozeItem(" ".join(context[-max_context_words:]), target))
        consumed += " " + sentence
    return items


def cloze_items(text: str, count: int = 100, min_words: int = 30, max_context_words: int = 64) -> list[ClozeItem]:
    """Deterministically select up to ``count`` cloze items spread evenly over ``text``.

    Candidates are sentence ends inside a paragraph whose final word (alphabetic, >= 4 letters) occurred in
    the preceding ``min_words``+ words of the same paragraph.
    """
    candidates = [
        item for paragraph in text.split("\n\n") for item in _paragraph_items(paragraph, min_words, max_context_words)
    ]
    if len(candidates) <= count:
        return candidates
    step = len(candidates) / count
    return [candidates[int(i * step)] for i in range(count)]


@torch.inference_mode()
def cloze_accuracy(model: nn.Module, tokenizer: Any, items: list[ClozeItem], batch_size: int = 8) -> float:
    """Fraction of ``items`` whose target word ``model`` completes exactly by greedy decoding."""
    if not items:
        raise ValueError("no cloze items to score")
    device = next(model.parameters()).device
    encoded = []
    for item in items:
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + item.target, add_special_tokens=False)["input_ids"]
        encoded.append((context, target))
    encoded.sort(key=lambda pair: len(pair[0]) + len(pair[1]))  # similar lengths batch with little padding
    correct = 0
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    for batch in progress(batches, desc="cloze", total=len(batches)):
        sequences = [context + target for context, target in batch]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # right padding keeps positions from 0
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        predictions = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.argmax(-1)
        for row, (context, target) in enumerate(batch):
            start = len(context) - 1  # logits at position p predict token p + 1
            predicted = predictions[row, start : start + len(target)].tolist()
            correct += int(predicted == target)
    return correct / len(items)
