"""Joint intent / slot-filling metrics: intent accuracy, span-level slot F1 (seqeval), sentence exact match.

Named for what it measures (slots and intents of an utterance), beside the other metrics of ``eval``. Slot F1 is
seqeval's default (conlleval-compatible) span-level micro F1 — the number JointBERT and the compositional-SLU
papers report: a predicted span counts only when its type and both boundaries equal a gold span's. Exact match
("sentence accuracy") needs the intent and every tag of the utterance right.
"""

from __future__ import annotations

from collections.abc import Sequence

from seqeval.metrics import f1_score, precision_score, recall_score

from leanfm.errors import LeanfmError

__all__ = ["slot_metrics"]


def slot_metrics(gold_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]],
                 gold_intents: Sequence[str], pred_intents: Sequence[str]) -> dict[str, float]:
    """``intent_accuracy``, ``slot_precision`` / ``slot_recall`` / ``slot_f1`` (spans) and ``exact_match``."""
    count = len(gold_tags)
    if not (count == len(pred_tags) == len(gold_intents) == len(pred_intents)) or count == 0:
        raise LeanfmError(f"metrics need as many predictions as gold utterances (>0); got {count} gold tag rows, "
                          f"{len(pred_tags)} predicted, {len(gold_intents)} gold and {len(pred_intents)} "
                          "predicted intents")
    gold = [list(row) for row in gold_tags]
    pred = [list(row) for row in pred_tags]
    for i, (g, p) in enumerate(zip(gold, pred, strict=True)):
        if len(g) != len(p):
            raise LeanfmError(f"utterance {i}: {len(p)} predicted tags for {len(g)} gold tags")
    intent_ok = [g == p for g, p in zip(gold_intents, pred_intents, strict=True)]
    exact = [ok and g == p for ok, g, p in zip(intent_ok, gold, pred, strict=True)]
    return {
        "intent_accuracy": sum(intent_ok) / count,
        "slot_precision": float(precision_score(gold, pred)),
        "slot_recall": float(recall_score(gold, pred)),
        "slot_f1": float(f1_score(gold, pred)),
        "exact_match": sum(exact) / count,
        "utterances": count,
    }
