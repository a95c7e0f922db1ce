"""Slot F1 at span level against a hand count, intent accuracy and exact match."""

from __future__ import annotations

import pytest

from leanfm.errors import LeanfmError
from leanfm.eval.slot_metrics import slot_metrics


def test_span_f1_intent_accuracy_and_exact_match_equal_a_hand_count():
    gold = [["O", "B-from", "O", "B-to", "I-to"],     # spans: from(1), to(3-4)
            ["B-date", "I-date", "O"],                  # date(0-1)
            ["O", "B-airline", "B-time"]]               # airline(1), time(2)
    pred = [["O", "B-from", "O", "B-to", "I-to"],     # both right
            ["B-date", "O", "O"],                       # boundary wrong: a false positive and a miss
            ["O", "B-airline", "B-date"]]               # airline right, time missed, date false positive
    result = slot_metrics(gold, pred, ["flight", "flight", "airfare"], ["flight", "airfare", "airfare"])
    # gold spans 5, predicted 5, correct 3 -> P = R = F1 = 3/5
    assert result["slot_precision"] == pytest.approx(3 / 5)
    assert result["slot_recall"] == pytest.approx(3 / 5)
    assert result["slot_f1"] == pytest.approx(3 / 5)
    assert result["intent_accuracy"] == pytest.approx(2 / 3)
    assert result["exact_match"] == pytest.approx(1 / 3)  # only the first: intent and every tag right


def test_unequal_predictions_are_one_line_errors():
    with pytest.raises(LeanfmError, match="utterance 0: 1 predicted tags for 2 gold tags"):
        slot_metrics([["O", "O"]], [["O"]], ["a"], ["a"])
    with pytest.raises(LeanfmError, match="as many predictions"):
        slot_metrics([["O"]], [], ["a"], ["a"])


@pytest.mark.parametrize(("gold", "pred", "intents", "exact"), [
    (["O", "B-x"], ["O", "B-x"], ("a", "a"), 1.0),
    (["B-time"], ["B-date"], ("a", "a"), 0.0),  # gold sorts after pred
    (["B-date"], ["B-time"], ("a", "a"), 0.0),  # gold sorts before pred
    (["O"], ["O"], ("b", "a"), 0.0),
    (["O"], ["O"], ("a", "b"), 0.0),
])
def test_exact_match_needs_every_tag_and_the_intent(gold, pred, intents, exact):
    result = slot_metrics([gold], [pred], [intents[0]], [intents[1]])
    assert result["exact_match"] == exact
    assert result["intent_accuracy"] == float(intents[0] == intents[1])


@pytest.mark.parametrize("counts", [(1, 2, 1, 1), (2, 1, 2, 2), (1, 1, 2, 1), (2, 2, 1, 2), (1, 1, 1, 2),
                                    (2, 2, 2, 1), (0, 0, 0, 0)])
def test_every_count_mismatch_is_refused(counts):
    gold, pred, gold_intents, pred_intents = counts
    with pytest.raises(LeanfmError, match="as many predictions"):
        slot_metrics([["O"]] * gold, [["O"]] * pred, ["a"] * gold_intents, ["a"] * pred_intents)


def test_tag_count_mismatch_in_either_direction_is_refused():
    for gold, pred in ((["O"], ["O", "O"]), (["O", "O"], ["O"])):
        with pytest.raises(LeanfmError, match="predicted tags for"):
            slot_metrics([gold], [pred], ["a"], ["a"])
