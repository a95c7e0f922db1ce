"""DynaMo's selection and verification maths on hand-made distributions (no model): fast, exact, mutation-tested."""

import math

import pytest
import torch

from leanfm.decode import selection
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.selection import DecodeConfig, blur3, otsu_threshold, select_tokens
from leanfm.errors import LeanfmError


def _emitted_law(p_first, p_second, q, trials, accept_all=False, seed=0):
    """Monte Carlo of one verify step with two drafts: counts of the first emitted token, and of the second
    given the first was an accepted draft."""
    g = torch.Generator().manual_seed(seed)
    first = torch.zeros(len(p_first))
    second = torch.zeros(len(p_first), len(p_first))
    for _ in range(trials):
        d1 = int(torch.multinomial(q, 1, generator=g))
        d2 = int(torch.multinomial(q, 1, generator=g))

        def scores_at(i, d1=d1):
            return (p_first if i == 0 else p_second[d1]).log()

        if accept_all:
            accepted, token = 2, 0
        else:
            accepted, token = selection.verify_drafts(scores_at, [d1, d2], [q, q], False, g)
        emitted = [*[d1, d2][:accepted], token]
        first[emitted[0]] += 1
        if accepted >= 1:
            second[emitted[0], emitted[1]] += 1
    return first / trials, second / second.sum(1, keepdim=True).clamp_min(1)


def test_speculative_acceptance_keeps_the_base_distribution():
    """Sampled verify mode: the first emitted token follows the base's p exactly, and the token after an
    accepted draft follows p(. | that draft), although drafts come from a different q (Monte Carlo, 4 sigma);
    accepting every draft (the bug this guards against) gives q instead."""
    p_first = torch.tensor([0.6, 0.3, 0.1])
    p_second = torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]])
    q = torch.tensor([0.2, 0.5, 0.3])
    trials = 6000
    first, second = _emitted_law(p_first, p_second, q, trials)
    sigma = (0.25 / trials) ** 0.5
    assert torch.allclose(first, p_first, atol=4 * sigma)
    assert torch.allclose(second[0], p_second[0], atol=0.05) and torch.allclose(second[1], p_second[1], atol=0.05)
    wrong, _ = _emitted_law(p_first, p_second, q, trials, accept_all=True)
    assert not torch.allclose(wrong, p_first, atol=4 * sigma)


def test_greedy_verification_accepts_the_argmax_prefix():
    scores = [torch.tensor([0.0, 3.0, 1.0]), torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 5.0])]
    assert selection.verify_drafts(lambda i: scores[i], [1, 0], [None, None], True, None) == (2, 2)
    assert selection.verify_drafts(lambda i: scores[i], [1, 2], [None, None], True, None) == (1, 0)
    assert selection.verify_drafts(lambda i: scores[i], [2, 0], [None, None], True, None) == (0, 1)
    assert selection.verify_drafts(lambda i: scores[i], [], [], True, None) == (0, 1)


def test_cooccurrence_weight_formula_on_hand_counts():
    """w = min(1, (c + λ) / (E + λ))^α with E = N_m p̂(a) p̂(b) and counts below min_count treated as unseen."""
    stream = torch.tensor([1, 2, 1, 2, 1, 3, 2, 2, 1, 2])
    stats = NgramCounts.build(stream, vocab=5, max_order=2)
    config = DecodeConfig(alpha=2.0, smoothing=0.5, min_count=2)
    ids = [torch.tensor([1, 2]), torch.tensor([2, 3])]
    weight = selection.cooccurrence_weight(ids, stats, config)
    unigram = {1: 4 / 10, 2: 5 / 10, 3: 1 / 10}
    pairs = {(1, 2): 3, (1, 3): 1, (2, 2): 1, (2, 3): 0}  # (1, 3) and (2, 2) seen once: below min_count
    expected = torch.tensor([[min(1.0, ((pairs[(a, c)] if pairs[(a, c)] >= 2 else 0) + 0.5)
                                  / (9 * unigram[a] * unigram[c] + 0.5)) ** 2 for c in (2, 3)] for a in (1, 2)])
    torch.testing.assert_close(weight, expected)
    assert weight[0, 0] == 1.0 and weight[1, 0] < 0.3  # seen more than chance: kept; (2, 2) expected 2.25x: cut


def test_cooccurrence_mask_only_removes_mass():
    """The issue's toy: an n-gram seen once between rare tokens used to rise from 0.04% to 44% of the joint and a
    common pair from 0.25 to 0.56 (passing ε_b = 0.5). The weight never raises a cell above the heads' product."""
    g = torch.Generator().manual_seed(0)
    stream = torch.cat([torch.tensor([7, 8]), torch.randint(20, 40, (4000,), generator=g),
                        torch.tensor([11, 12] * 300 + [13, 14] * 300)])
    stats = NgramCounts.build(stream, vocab=50, max_order=2)
    p1, p2 = torch.zeros(50), torch.zeros(50)
    p1[[11, 7, 13]] = torch.tensor([0.5, 0.02, 0.48])
    p2[[12, 8, 14]] = torch.tensor([0.5, 0.02, 0.48])
    config = DecodeConfig(threshold=0.0, top_k=3)
    joint, ids = selection.candidate_joint([p1, p2], stats, config, floor=0.0)
    raw = p1[ids[0]][:, None] * p2[ids[1]][None, :]
    assert bool((joint <= raw + 1e-7).all())
    assert float(joint[0, 0]) == pytest.approx(0.25) and float(joint[2, 2]) == pytest.approx(0.0004, rel=1e-3)
    assert select_tokens([p1, p2], stats, DecodeConfig(threshold=0.5, temperature=0.0)) is None
    never = joint[ids[0] == 13][:, ids[1] == 12]  # 13 then 12: both common, never adjacent: filtered
    assert float(never) < 0.1 * 0.48 * 0.5


def _full_grid_select(probs, stats, config):
    """Reference: the selection on the whole top-k grid (no sub-cube, no early exit), greedy."""
    for m in range(len(probs), 1, -1):
        floor = config.threshold ** (m - 1)
        joint, ids = selection.candidate_joint(probs[:m], stats, config, floor=0.0)
        if float(joint.max()) < floor or float(joint.max()) <= 0:
            continue
        joint = torch.where(joint >= floor, joint, torch.zeros_like(joint))
        if config.adaptive:
            smooth = blur3(joint) if config.blur else joint
            cut = otsu_threshold(smooth[joint > 0])
            kept = torch.where((joint > 0) & (smooth >= cut), joint, torch.zeros_like(joint))
            joint = kept if kept.sum() > 0 else joint
        index = torch.unravel_index(joint.flatten().argmax(), joint.shape)
        return [int(ids[j][int(i)]) for j, i in enumerate(index)]
    return None


@pytest.mark.parametrize("threshold", [0.02, 0.1, 0.3, 0.6])
def test_subcube_selection_equals_the_full_grid(threshold):
    """Selection on the corner of candidates that can reach the floor (plus one layer) is the full grid's."""
    g = torch.Generator().manual_seed(int(threshold * 100))
    stream = torch.randint(0, 60, (3000,), generator=g)
    stats = NgramCounts.build(stream, vocab=60, max_order=3)
    hits = 0
    for trial in range(20):
        probs = [torch.softmax(torch.randn(60, generator=g) * (2 + trial % 5), -1) for _ in range(3)]
        for adaptive in (True, False):
            config = DecodeConfig(threshold=threshold, temperature=0.0, top_k=20, adaptive=adaptive, min_count=1)
            fast = select_tokens(probs, stats, config)
            assert fast == _full_grid_select(probs, stats, config)
            hits += fast is not None and len(fast) > 1
    assert hits > 5  # the comparison covered multi-token picks


def test_otsu_is_applied_when_sampling():
    """With the adaptive threshold, samples come only from the cells above Otsu's cut of the blurred joint."""
    g = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(40, generator=g) * 2, -1) for _ in range(2)]
    config = DecodeConfig(threshold=0.0, temperature=1.0, top_k=40, mask=False)
    joint, ids = selection.candidate_joint(probs, None, config, floor=0.0)
    smooth = blur3(joint)
    kept = {(int(ids[0][a]), int(ids[1][b])) for a, b in (smooth >= otsu_threshold(smooth)).nonzero().tolist()}
    assert 0 < len(kept) < 0.5 * joint.numel()
    adaptive = {tuple(select_tokens(probs, None, config, g)) for _ in range(300)}
    plain = {tuple(select_tokens(probs, None, DecodeConfig(threshold=0.0, temperature=1.0, top_k=40, mask=False,
                                                            adaptive=False), g)) for _ in range(300)}
    assert adaptive <= kept and not plain <= kept


def test_the_floor_for_m_tokens_is_threshold_to_the_m_minus_1():
    """m = 3 needs a joint >= ε^2 (not ε), m = 2 needs >= ε (not ε^2)."""
    def peaked(top):
        p = torch.full((50,), (1 - top) / 49)
        p[5] = top
        return p

    config = DecodeConfig(threshold=0.5, temperature=0.0, mask=False, adaptive=False)
    assert select_tokens([peaked(1.0), peaked(0.6), peaked(0.5)], None, config) == [5, 5, 5]  # 0.3 >= 0.25
    assert select_tokens([peaked(1.0), peaked(0.45), peaked(0.02)], None, config) is None  # 0.45 < 0.5
    assert select_tokens([peaked(1.0), peaked(0.55), peaked(0.02)], None, config) == [5, 5]


def test_in_step_repetition_penalty_lowers_repeated_candidates():
    """Head 2 proposing head 1's token of the same candidate gets the penalty it would get in the text."""
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    config = DecodeConfig(repetition_penalty=2.0, temperature=0.5)
    factors = selection.repeat_factors(logits, torch.tensor([[3]]), config)[0]
    torch.testing.assert_close(factors, torch.tensor([math.exp((1 - 2) / 0.5), math.exp((0.5 - 1) / 0.5),
                                                      math.exp((-2 + 1) / 0.5), 1.0]))
    ids = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    grid = selection.repeat_penalty_grid(ids, [factors, factors])
    torch.testing.assert_close(grid, torch.tensor([[factors[0], 1.0], [1.0, factors[1]]]))


def test_otsu_threshold_splits_a_bimodal_array():
    g = torch.Generator().manual_seed(0)
    values = torch.cat([0.1 + 0.02 * torch.randn(500, generator=g), 0.8 + 0.02 * torch.randn(200, generator=g)])
    cut = otsu_threshold(values)
    assert values[:500].max() < cut <= values[500:].min()  # any cut in the gap is optimal; it must be in it
    assert otsu_threshold(torch.full((10,), 0.3)) == pytest.approx(0.3)


def test_blur3_is_a_normalised_three_tap_kernel():
    delta = torch.zeros(5, 5, dtype=torch.float64)
    delta[2, 2] = 1
    out = blur3(delta)
    torch.testing.assert_close(out[1:4, 2], torch.tensor([0.125, 0.25, 0.125], dtype=torch.float64))
    assert out.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(blur3(torch.full((4, 4, 4), 2.0)), torch.full((4, 4, 4), 2.0))


def test_select_tokens_falls_back_to_fewer_tokens():
    sharp = torch.zeros(50)
    sharp[7] = 1.0
    flat = torch.full((50,), 1 / 50)
    config = DecodeConfig(threshold=0.5, temperature=0.0, mask=False)
    assert select_tokens([sharp, sharp, sharp], None, config) == [7, 7, 7]
    assert select_tokens([sharp, sharp, flat], None, config) == [7, 7]  # third head too unsure: drop to 2
    assert select_tokens([sharp, flat, flat], None, config) is None  # one token from head 1
    assert select_tokens([sharp, sharp, sharp], None, DecodeConfig(threshold=1.0, mask=False)) is None  # ε_b = 1: base
    assert select_tokens([sharp * 0.99 + 0.0002, sharp, sharp], None, DecodeConfig(threshold=1.0)) is None


def test_reachable_levels_are_the_exact_early_exit():
    """Per row, the deepest level whose product of peaks reaches ε^(m-1): rows at 1 never build a joint."""
    peaks = torch.tensor([[1.0, 0.6, 0.5], [1.0, 0.45, 0.9], [0.9, 0.9, 0.2], [0.3, 1.0, 1.0]])
    assert selection.reachable_levels(peaks, 0.5).tolist() == [3, 3, 2, 3]  # m = 3 may pass where m = 2 fails
    assert selection.reachable_levels(peaks, 0.7).tolist() == [1, 1, 2, 1]
    assert selection.reachable_levels(peaks, 1.0).tolist() == [1, 1, 1, 1]
    assert selection.reachable_levels(peaks, 0.0).tolist() == [3, 3, 3, 3]
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        probs = [torch.softmax(torch.randn(30, generator=g) * 3, -1) for _ in range(3)]
        level = int(selection.reachable_levels(torch.stack([p.max() for p in probs])[None], 0.4)[0])
        picked = select_tokens(probs, None, DecodeConfig(threshold=0.4, temperature=0.0, mask=False))
        assert (1 if picked is None else len(picked)) <= level


def test_otsu_matches_a_brute_force_between_class_variance():
    """The cut maximises w0 w1 (mu0 - mu1)^2 over the histogram's bin edges (computed here by brute force)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        values = torch.cat([torch.rand(300, generator=g) * 0.5, 0.3 + torch.rand(100 + 50 * trial, generator=g)])
        bins = 64
        low, high = float(values.min()), float(values.max())
        width = (high - low) / bins
        hist = torch.histc(values.double(), bins=bins, min=low, max=high)
        centers = low + (torch.arange(bins, dtype=torch.double) + 0.5) * width
        best, best_cut = -1.0, None
        for k in range(1, bins):
            w0, w1 = hist[:k].sum(), hist[k:].sum()
            if w0 == 0 or w1 == 0:
                continue
            mu0, mu1 = (hist[:k] * centers[:k]).sum() / w0, (hist[k:] * centers[k:]).sum() / w1
            score = float(w0 * w1 * (mu0 - mu1) ** 2)
            if score > best:
                best, best_cut = score, low + k * width
        assert otsu_threshold(values, bins=bins) == pytest.approx(best_cut)


def test_the_corner_holds_only_candidates_that_can_reach_the_floor():
    """Sizes: every candidate with p_i x (product of the other peaks) >= floor, plus one below it."""
    p1 = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    p2 = torch.tensor([0.8, 0.1, 0.05, 0.03, 0.02])
    config = DecodeConfig(top_k=5, mask=False)
    joint, ids = selection.candidate_joint([p1, p2], None, config, floor=0.2)
    assert joint.shape == (3, 2)  # p1 x 0.8 >= 0.2: 0.5, 0.3 (+1); p2 x 0.5 >= 0.2: 0.8 (+1)
    assert ids[0].tolist() == [0, 1, 2] and ids[1].tolist() == [0, 1]
    full, _ = selection.candidate_joint([p1, p2], None, config, floor=0.0)
    assert full.shape == (5, 5)


def test_levels_that_cannot_reach_their_floor_build_no_joint(monkeypatch):
    calls = []
    real = selection.candidate_joint

    def counting(probs, *args, **kwargs):
        calls.append(len(probs))
        return real(probs, *args, **kwargs)

    monkeypatch.setattr(selection, "candidate_joint", counting)
    sharp, flat = torch.zeros(50), torch.full((50,), 1 / 50)
    sharp[3] = 1.0
    config = DecodeConfig(threshold=0.5, temperature=0.0, mask=False)
    assert select_tokens([sharp, flat, flat], None, config) is None
    assert calls == []  # neither m = 3 nor m = 2 can pass: no grid is built
    assert select_tokens([sharp, sharp, flat], None, config) == [3, 3]
    assert calls == [2]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.0])
def test_repeat_factors_at_greedy_unit_and_other_temperatures(temperature):
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    factors = selection.repeat_factors(logits, torch.tensor([[2]]), DecodeConfig(repetition_penalty=1.5,
                                                                                 temperature=temperature))
    scale = temperature if temperature not in (0.0, 1.0) else 1.0
    expected = torch.tensor([math.exp((2 / 1.5 - 2) / scale), math.exp((-1.5 + 1) / scale), 1.0])
    torch.testing.assert_close(factors[0], expected)
    assert selection.repeat_factors(logits, torch.tensor([[2]]), DecodeConfig(repetition_penalty=1.0)) is None


def test_mask_applies_below_the_counted_order_and_settings_are_checked():
    """Trigram counts also weigh pairs (m = 2 <= max order 3); top-k 0 and non-positive smoothing are refused."""
    stream = torch.tensor([1, 2] * 200 + [3, 4] * 200)
    stats = NgramCounts.build(stream, vocab=6, max_order=3)
    p = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.5])
    q = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.0, 0.5])
    joint, ids = selection.candidate_joint([p, q], stats, DecodeConfig(top_k=2), floor=0.0)
    raw = p[ids[0]][:, None] * q[ids[1]][None, :]
    cut = (ids[0] == 3)[:, None] & (ids[1] == 2)[None, :]  # "3 2": both common, never adjacent
    assert float(joint[cut]) < 0.1 * float(raw[cut])
    for bad in ({"top_k": 0}, {"smoothing": 0.0}, {"min_count": 0}):
        with pytest.raises(LeanfmError):
            DecodeConfig(**bad)
    DecodeConfig(top_k=1, min_count=1)


def test_in_step_penalty_lowers_the_joint_of_repeating_candidates():
    p = torch.zeros(8)
    p[[2, 5]] = torch.tensor([0.6, 0.4])
    factors = torch.ones(8)
    factors[2] = 0.5
    joint, ids = selection.candidate_joint([p, p.clone()], None, DecodeConfig(top_k=2, mask=False), floor=0.0,
                                           factors=[factors, factors])
    assert ids[0].tolist() == [2, 5]
    torch.testing.assert_close(joint, torch.tensor([[0.36 * 0.5, 0.24], [0.24, 0.16]]))


def test_greedy_verification_compares_token_values():
    """Token ids beyond Python's small-int cache: equality, not identity."""
    scores = torch.full((3, 50000), -1.0)
    scores[0, 40000], scores[1, 41000], scores[2, 42000] = 5.0, 5.0, 5.0
    drafts = [int(torch.tensor(41000)), int(torch.tensor(40000) + 2000)]
    assert selection.verify_drafts(lambda i: scores[i], drafts, [None, None], True, None) == (0, 40000)
    scores[0, 41000], scores[1, 42000] = 9.0, 9.0
    assert selection.verify_drafts(lambda i: scores[i], drafts, [None, None], True, None) == (2, 42000)


def test_mask_switches_and_count_boundaries():
    """mask=False or alpha=0 leaves the heads' product even with counts present; a count equal to min_count counts."""
    stream = torch.tensor([1, 2, 1, 2] + [3, 4] * 100 + [1, 3])
    stats = NgramCounts.build(stream, vocab=6, max_order=2)
    p = torch.tensor([0.0, 0.6, 0.0, 0.4, 0.0, 0.0])
    q = torch.tensor([0.0, 0.0, 0.7, 0.3, 0.0, 0.0])
    raw = p[[1, 3]][:, None] * q[[2, 3]][None, :]
    for config in (DecodeConfig(top_k=2, mask=False), DecodeConfig(top_k=2, alpha=0.0)):
        joint, _ = selection.candidate_joint([p, q], stats, config, floor=0.0)
        torch.testing.assert_close(joint, raw)
    ids = [torch.tensor([1]), torch.tensor([2])]  # "1 2" seen exactly twice
    at_two = selection.cooccurrence_weight(ids, stats, DecodeConfig(min_count=2, smoothing=0.01))
    at_three = selection.cooccurrence_weight(ids, stats, DecodeConfig(min_count=3, smoothing=0.01))
    assert float(at_two) == 1.0 and float(at_three) < 0.5


def test_reachable_levels_with_a_zero_peak_and_the_config_ranges():
    peaks = torch.tensor([[1.0, 0.0, 0.5], [0.9, 0.9, 0.9]])
    assert selection.reachable_levels(peaks, 0.0).tolist() == [1, 3]  # a head with no mass stops every level
    for bad in ({"temperature": -0.1}, {"repetition_penalty": 0.0}, {"threshold": 1.01}):
        with pytest.raises(LeanfmError):
            DecodeConfig(**bad)
