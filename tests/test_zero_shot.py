"""The zero-shot nearest-candidate metric (leanfm.eval.zero_shot)."""

import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.eval.zero_shot import nearest_candidates, zero_shot_accuracy


def test_zero_shot_accuracy_counts_nearest_candidates():
    cands = torch.eye(3)
    emb = torch.tensor([[1.0, 0.1, 0], [0, 0, 2.0], [0.9, 1.0, 0]])
    assert zero_shot_accuracy(emb, ["a", "c", "a"], ["a", "b", "c"], cands) == pytest.approx(2 / 3)


def test_nearest_candidate_is_by_cosine_not_by_dot_product():
    cands = torch.tensor([[10.0, 10.0], [0.0, 1.0]])  # the long candidate wins every dot product
    assert nearest_candidates(torch.tensor([[0.1, 1.0], [1.0, 0.9]]), cands).tolist() == [1, 0]


def test_zero_shot_inputs_that_do_not_fit_give_one_line_errors():
    with pytest.raises(LeanfmError, match="counts must match"):
        zero_shot_accuracy(torch.ones(2, 3), ["a"], ["a"], torch.ones(1, 3))
    with pytest.raises(LeanfmError, match=r"\[N, d\]"):
        nearest_candidates(torch.ones(2, 3), torch.ones(1, 4))
