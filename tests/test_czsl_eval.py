"""The CZSL evaluator against sweeps and feasibilities computed by hand, and against brute-force argmax loops."""

from __future__ import annotations

import math

import pytest
import torch

from leanfm.errors import LeanfmError
from leanfm.eval import czsl
from leanfm.eval.czsl import choose_threshold, evaluate_czsl, feasibility_scores, feasible_mask

# Pairs p0 = (a0, o0) and p1 = (a1, o1) are seen; p2 = (a0, o1) and p3 = (a1, o0) are not.
PAIR_ATTR = torch.tensor([0, 1, 0, 1])
PAIR_OBJ = torch.tensor([0, 1, 1, 0])
SEEN = torch.tensor([True, True, False, False])

# Per sample: S = best seen score, U = best unseen score, gap g = S - U; with bias b the unseen pair wins iff b > g.
HAND_SCORES = torch.tensor([
    #  p0   p1   p2   p3       label  seen pick  unseen pick  gap
    [0.9, 0.1, 0.5, 0.2],  # A  p0     p0 right   p2           0.4
    [0.2, 0.8, 0.7, 0.1],  # B  p1     p1 right   p2           0.1
    [0.3, 0.6, 0.1, 0.0],  # C  p0     p1 wrong   p2           0.5
    [0.1, 0.7, 0.9, 0.0],  # D  p1     p1 right   p2          -0.2
    [0.6, 0.1, 0.9, 0.3],  # E  p2     p0         p2 right    -0.3
    [0.8, 0.2, 0.1, 0.5],  # F  p3     p0         p3 right     0.3
    [0.7, 0.0, 0.1, 0.4],  # G  p2     p0         p3 wrong     0.3
    [0.5, 0.4, 0.2, 0.6],  # H  p3     p0         p3 right    -0.1
], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3])


def test_hand_made_sweep_gives_the_hand_computed_curve_auc_and_hm():
    # Flip points (unseen samples right once their unseen pick wins): E -0.3, H -0.1, F 0.3. Distinct gaps sorted:
    # -0.3 -0.2 -0.1 0.1 0.3 0.4 0.5, so biases: -1.3 (below all), -0.25, 0.0, 0.35 (midpoints after each flip
    # and the next gap), 1.5 (above all). Samples picking unseen (b > g), accuracies (seen of A-D, unseen of E-H):
    #   b=-1.3  none               seen A B D = 3/4  unseen 0
    #   b=-0.25 E                  seen 3/4          unseen E = 1/4
    #   b=0     E D H              seen A B = 2/4    unseen E H = 2/4
    #   b=0.35  E D H B F G        seen A = 1/4      unseen E H F = 3/4 (G picks p3)
    #   b=1.5   all                seen 0            unseen 3/4
    # AUC (trapezoid, seen over unseen) = .25*.75 + .25*(.75+.5)/2 + .25*(.5+.25)/2 + 0 = 0.4375.
    # HM: 0, 2*.75*.25/1 = .375, .5, .375, 0 -> best 0.5.
    result = evaluate_czsl(HAND_SCORES, HAND_LABELS, SEEN, pair_attr=PAIR_ATTR, pair_obj=PAIR_OBJ)
    assert result.seen_curve == pytest.approx([0.75, 0.75, 0.5, 0.25, 0.0])
    assert result.unseen_curve == pytest.approx([0.0, 0.25, 0.5, 0.75, 0.75])
    assert result.biases == pytest.approx([-1.3, -0.25, 0.0, 0.35, 1.5], abs=1e-9)
    assert result.auc == pytest.approx(0.4375)
    assert result.best_hm == pytest.approx(0.5)
    assert (result.best_seen, result.best_unseen) == pytest.approx((0.75, 0.75))
    # Unbiased predictions (unseen pick iff g < 0): A p0, B p1, C p1, D p2, E p2, F p0, G p0, H p3.
    # Attribute right: A B E G H = 5/8; object right: A B D E F H = 6/8.
    assert (result.attr_acc, result.obj_acc) == pytest.approx((5 / 8, 6 / 8))
    assert result.to_dict()["auc"] == pytest.approx(0.4375)


def test_a_model_right_on_every_sample_at_some_bias_has_auc_one():
    # Seen samples: true score 1, the rest 0 -> g = 1. Unseen samples: g = -1. At b = 0 (midpoint of -1 and 1)
    # everything is right: curve (0, 1) -> (1, 1) -> (1, 0), area 1 x 1 = 1, HM 1.
    labels = torch.tensor([0, 1, 2, 3, 2])
    result = evaluate_czsl(torch.eye(4)[labels], labels, SEEN)
    assert result.unseen_curve == pytest.approx([0.0, 1.0, 1.0])
    assert result.seen_curve == pytest.approx([1.0, 1.0, 0.0])
    assert (result.auc, result.best_hm, result.best_seen, result.best_unseen) == pytest.approx((1, 1, 1, 1))


def test_unseen_samples_never_right_give_auc_zero():
    # The unseen samples' best unseen pair is always the wrong one: no flip points, only the two extremes.
    labels = torch.tensor([0, 1, 2, 3])
    scores = torch.tensor([[1.0, 0, 0, 0.5],
                           [0, 1.0, 0.2, 0],
                           [0, 0, 0.1, 0.9],   # true p2, p3 above it
                           [0, 0, 0.8, 0.3]])  # true p3, p2 above it
    result = evaluate_czsl(scores, labels, SEEN)
    assert result.seen_curve == pytest.approx([1.0, 0.0])
    assert result.unseen_curve == pytest.approx([0.0, 0.0])
    assert (result.auc, result.best_unseen, result.best_hm, result.best_seen) == pytest.approx((0, 0, 0, 1))


def test_curve_equals_a_brute_force_argmax_with_the_bias_added_to_unseen_pairs():
    generator = torch.Generator().manual_seed(0)
    pairs, samples = 12, 300
    seen = torch.arange(pairs) < 5
    candidates = torch.ones(pairs, dtype=torch.bool)
    candidates[[3, 9]] = False
    labels = torch.randint(0, pairs, (samples,), generator=generator)
    scores = torch.randn(samples, pairs, generator=generator, dtype=torch.float64)
    scores[torch.arange(samples), labels] += 1.0
    result = evaluate_czsl(scores, labels, seen, candidates)
    assert 3 <= len(result.biases) <= czsl.MAX_BIASES
    masked = scores.masked_fill(~candidates, float("-inf"))
    for bias, seen_acc, unseen_acc in zip(result.biases, result.seen_curve, result.unseen_curve, strict=True):
        right = (masked + bias * (~seen).double()).argmax(1) == labels
        assert seen_acc == pytest.approx(right[seen[labels]].double().mean().item())
        assert unseen_acc == pytest.approx(right[~seen[labels]].double().mean().item())
    # the extremes: unseen pairs never win / always win
    assert result.seen_curve[0] == pytest.approx((masked[:, seen].argmax(1) == labels)[seen[labels]].double().mean())
    best_unseen_pair = torch.where(~seen & candidates)[0][masked[:, ~seen & candidates].argmax(1)]
    assert result.unseen_curve[-1] == pytest.approx((best_unseen_pair == labels)[~seen[labels]].double().mean())
    assert result.auc == pytest.approx(float(torch.trapezoid(torch.tensor(result.seen_curve),
                                                             torch.tensor(result.unseen_curve))))


def test_many_flip_points_are_subsampled_to_at_most_max_biases():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 40, (3000,), generator=generator)
    scores = torch.randn(3000, 40, generator=generator)
    result = evaluate_czsl(scores, labels, torch.arange(40) < 20)
    assert len(result.biases) == czsl.MAX_BIASES
    assert result.biases == sorted(result.biases)
    assert result.unseen_curve == sorted(result.unseen_curve)  # unseen accuracy only rises with the bias
    assert result.seen_curve == sorted(result.seen_curve, reverse=True)


def test_a_masked_pair_is_never_predicted_even_with_the_highest_score():
    scores = torch.tensor([[0.5, 0.1, 0.2, 9.0],   # label p0, p3 on top
                           [0.1, 0.5, 0.2, 9.0],   # label p1
                           [0.1, 0.2, 0.5, 9.0]])  # label p2
    labels = torch.tensor([0, 1, 2])
    open_world = evaluate_czsl(scores, labels, SEEN, pair_attr=PAIR_ATTR, pair_obj=PAIR_OBJ)
    assert open_world.best_unseen == 0.0  # p3 always beats p2
    masked = evaluate_czsl(scores, labels, SEEN, torch.tensor([True, True, True, False]), PAIR_ATTR, PAIR_OBJ)
    assert masked.best_unseen == 1.0 and masked.best_seen == 1.0 and masked.auc == pytest.approx(1.0)
    assert masked.attr_acc == 1.0 and masked.obj_acc == 1.0  # the unbiased prediction is the true pair, not p3
    assert open_world.attr_acc == pytest.approx(1 / 3)  # p3 = (a1, o0) predicted for all three; only p1 shares a1


def _toy_embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attrs = torch.tensor([[1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]])   # cos(a0,a1)=.8 cos(a0,a2)=-1 cos(a1,a2)=-.8
    objs = torch.tensor([[2.0, 0.0], [0.6, 0.8], [0.0, 3.0]])     # cos(o0,o1)=.6 cos(o0,o2)=0 cos(o1,o2)=.8
    seen_pairs = torch.tensor([[0, 0], [0, 1], [1, 2], [2, 0]])  # a0: o0 o1; a1: o2; a2: o0
    return attrs, objs, seen_pairs


def test_feasibility_of_a_toy_vocabulary_equals_the_hand_computation():
    # (a0,o2): objects with a0 {o0,o1}: max(cos(o2,o0)=0, cos(o2,o1)=.8)=.8; attrs with o2 {a1}: .8 -> .8
    # (a1,o0): objects with a1 {o2}: 0; attrs with o0 {a0,a2}: max(.8, -.8)=.8 -> .4 (a mean would give 0)
    # (a1,o1): {o2}: .8; attrs with o1 {a0}: .8 -> .8
    # (a2,o1): {o0}: .6; {a0}: -1 -> -.2
    # (a2,o2): {o0}: 0; {a1}: -.8 -> -.4; seen pairs 1
    attrs, objs, seen_pairs = _toy_embeddings()
    expected = torch.tensor([[1.0, 1.0, 0.8], [0.4, 0.8, 1.0], [1.0, -0.2, -0.4]])
    assert torch.allclose(feasibility_scores(attrs, objs, seen_pairs), expected, atol=1e-6)


def test_partner_similarity_excludes_the_item_itself_and_reads_minus_one_without_partners():
    # similarity of k=0 to itself is 1; its only other partner of row 0 is k=1 (cos .3); row 1 has only k=0 as a
    # partner, so for k=0 nothing is left (-1), and for k=1, k=2 the partner k=0 counts.
    similarity = torch.tensor([[1.0, 0.3, -0.5], [0.3, 1.0, 0.2], [-0.5, 0.2, 1.0]])
    partners = torch.tensor([[True, True, False], [True, False, False]])
    out = czsl._max_similarity_to_partners(similarity, partners)
    assert torch.allclose(out, torch.tensor([[0.3, 0.3, 0.2], [-1.0, 0.3, -0.5]]))


def test_an_attribute_without_other_seen_objects_gives_minus_one_for_that_half():
    attrs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    objs = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # a1 seen with nothing; o1 seen with nothing: (a1, o1) = (-1 + -1) / 2; (a1, o0) = (cos(o0, -)=-1 + cos(a1,a0)=0)/2
    feasibility = feasibility_scores(attrs, objs, torch.tensor([[0, 0]]))
    assert torch.allclose(feasibility, torch.tensor([[1.0, (0.6 - 1.0) / 2], [-0.5, -1.0]]))


def test_threshold_masking_removes_exactly_the_unseen_pairs_below_it_and_never_a_seen_pair():
    attrs, objs, seen_pairs = _toy_embeddings()
    flat = feasibility_scores(attrs, objs, seen_pairs).flatten()  # pair index a * 3 + o
    seen = flat == 1.0
    # unseen feasibilities: (a0,o2)=.8 (a1,o0)=.4 (a1,o1)=.8 (a2,o1)=-.2 (a2,o2)=-.4
    kept = feasible_mask(flat, seen, 0.0)
    assert kept.tolist() == [True, True, True, True, True, True, True, False, False]
    assert feasible_mask(flat, seen, 0.4 - 1e-6).tolist() == kept.tolist()  # .4 itself is kept
    assert feasible_mask(flat, seen, 0.5).tolist() == [True, True, True, False, True, True, True, False, False]
    assert feasible_mask(flat, seen, 2.0).tolist() == seen.tolist()  # above every score: seen pairs only


def _brute_force_threshold(scores, labels, seen, flat, grid):
    thresholds = torch.quantile(flat[~seen].double(), torch.linspace(0, 1, grid, dtype=torch.float64)).unique()
    best_key, best_threshold = None, None
    for threshold in thresholds.tolist():
        result = evaluate_czsl(scores, labels, seen, seen | (flat.double() >= threshold))
        if best_key is None or (result.auc, result.best_hm) > best_key:
            best_key, best_threshold = (result.auc, result.best_hm), threshold
    return best_threshold, best_key


def test_choose_threshold_picks_what_a_brute_force_loop_over_the_same_grid_picks():
    generator = torch.Generator().manual_seed(2)
    n_attr, n_obj, samples = 5, 6, 400
    pair_attr = torch.arange(n_attr).repeat_interleave(n_obj)
    pair_obj = torch.arange(n_obj).repeat(n_attr)
    seen = torch.rand(n_attr * n_obj, generator=generator) < 0.4
    feasibility = torch.rand(n_attr, n_obj, generator=generator)
    flat = feasibility.flatten()
    feasible_or_seen = seen | (flat > 0.5)
    labels = torch.where(feasible_or_seen)[0][torch.randint(0, int(feasible_or_seen.sum()), (samples,),
                                                           generator=generator)]
    scores = torch.randn(samples, n_attr * n_obj, generator=generator, dtype=torch.float64)
    scores[torch.arange(samples), labels] += 1.5
    scores[:, ~feasible_or_seen] += 1.0  # infeasible distractors: masking them pays
    threshold, result = choose_threshold(scores, labels, seen, feasibility, pair_attr, pair_obj, grid=20)
    expected_threshold, expected_key = _brute_force_threshold(scores, labels, seen, flat, 20)
    assert threshold == pytest.approx(expected_threshold)
    assert (result.auc, result.best_hm) == pytest.approx(expected_key)
    no_mask = evaluate_czsl(scores, labels, seen)
    assert result.auc > no_mask.auc  # the chosen threshold masks some distractors
    assert not math.isnan(result.attr_acc)
    flat_threshold, _ = choose_threshold(scores, labels, seen, flat, pair_attr, pair_obj, grid=20)
    assert flat_threshold == threshold  # [P] feasibility is read as is


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(LeanfmError, match="labels must be pair indices"):
        evaluate_czsl(HAND_SCORES, HAND_LABELS + 4, SEEN)
    with pytest.raises(LeanfmError, match="samples of both kinds"):
        evaluate_czsl(HAND_SCORES[:4], HAND_LABELS[:4], SEEN)
    with pytest.raises(LeanfmError, match="candidates masks every pair"):
        evaluate_czsl(HAND_SCORES, HAND_LABELS, SEEN, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(LeanfmError, match=r"seen and candidates \[4\]"):
        evaluate_czsl(HAND_SCORES, HAND_LABELS, SEEN[:3])
    with pytest.raises(LeanfmError, match="seen_pairs must index"):
        feasibility_scores(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([[0, 5]]))
    with pytest.raises(LeanfmError, match="grid must be"):
        choose_threshold(HAND_SCORES, HAND_LABELS, SEEN, torch.zeros(4), PAIR_ATTR, PAIR_OBJ, grid=0)


def test_choose_threshold_ranks_by_auc_then_hm_then_the_lowest_threshold(monkeypatch):
    # Seen pair 0; unseen feasibilities .1 .2 .3; grid 3 -> thresholds .1 .2 .3 keeping 3, 2, 1 unseen pairs.
    canned = {3: (0.5, 0.9), 2: (0.6, 0.1), 1: (0.6, 0.2)}  # kept unseen pairs -> (AUC, HM)

    def fake_evaluate(scores, labels, seen, candidates, pair_attr=None, pair_obj=None):
        auc, hm = canned[int((candidates & ~seen).sum())]
        return czsl.CZSLResult(auc, hm, 0.0, 0.0, 0.0, 0.0, [], [], [])

    monkeypatch.setattr(czsl, "evaluate_czsl", fake_evaluate)
    flat = torch.tensor([1.0, 0.1, 0.2, 0.3])
    seen = torch.tensor([True, False, False, False])
    threshold, result = choose_threshold(HAND_SCORES, HAND_LABELS, seen, flat, PAIR_ATTR, PAIR_OBJ, grid=3)
    assert threshold == pytest.approx(0.3) and (result.auc, result.best_hm) == (0.6, 0.2)  # AUC tie -> HM
    canned[1] = (0.6, 0.1)
    threshold, _ = choose_threshold(HAND_SCORES, HAND_LABELS, seen, flat, PAIR_ATTR, PAIR_OBJ, grid=3)
    assert threshold == pytest.approx(0.2)  # tie on both -> the lower threshold (masks less)
