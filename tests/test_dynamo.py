"""DynaMo: exactness at ε_b = 1, KV cache across multi-token steps, selection rules, n-grams, training, CLI."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from leanfm import load_model
from leanfm.cli import main
from leanfm.decode import dynamo
from leanfm.decode.dynamo import (
    DecodeConfig,
    DynamoModel,
    blur3,
    generate,
    load,
    otsu_threshold,
    save_dynamo,
    select_tokens,
)
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.training import DynamoTrainConfig, head_perplexities, train_heads
from leanfm.errors import LeanfmError
from leanfm.eval.perplexity import perplexity

PROMPTS = ["It is a truth universally acknowledged", "Emma"]  # different lengths: left padding


def _dynamo(name="tiny-llama", heads=3, scale=1.0):
    """A tiny model with extra heads; ``scale`` sharpens its near-uniform distributions (a random tiny model has
    thousands of near-ties, which batch vs single-row float noise can flip)."""
    base, tokenizer = load_model(name)
    if scale != 1.0:
        with torch.no_grad():
            base.get_output_embeddings().weight.mul_(scale)
    return DynamoModel(base, heads=heads).eval(), tokenizer


def _hf(model, tokenizer, max_new_tokens=8, **kwargs):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.base.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return out[:, enc["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-neox", "tiny-opt"])
def test_threshold_one_is_exactly_the_base_model(name):
    model, tokenizer = _dynamo(name)
    greedy = generate(model, tokenizer, PROMPTS, 8, DecodeConfig(threshold=1.0, temperature=0.0))
    assert greedy.tokens == _hf(model, tokenizer, do_sample=False, repetition_penalty=1.1)
    assert greedy.tokens_per_step == 1.0
    torch.manual_seed(7)
    sampled = generate(model, tokenizer, PROMPTS, 8, DecodeConfig(threshold=1.0, temperature=0.7))
    torch.manual_seed(7)
    reference = _hf(model, tokenizer, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, repetition_penalty=1.1)
    assert sampled.tokens == reference


def test_kv_cache_after_a_multi_token_step_equals_one_by_one():
    model, _ = _dynamo()
    ids = torch.randint(0, 5000, (1, 9), generator=torch.Generator().manual_seed(0))
    caches = []
    for chunks in ([6, 3], [6, 1, 1, 1]):
        cache, head_cache, start = DynamicCache(), DynamicCache(), 0
        with torch.no_grad():
            for size in chunks:
                part = ids[:, start : start + size]
                mask = torch.ones(1, start + size, dtype=torch.long)
                positions = torch.arange(start, start + size)[None]
                final, states = model.forward_heads(part, mask, positions, cache, head_cache)
                start += size
        caches.append((cache, head_cache, final[:, -1], [s[:, -1] for s in states]))
    (a, ha, la, sa), (b, hb, lb, sb) = caches
    for first, second in ((a, b), (ha, hb)):
        assert len(first.layers) == len(second.layers) > 0
        for x, y in zip(first.layers, second.layers, strict=True):
            torch.testing.assert_close(x.keys, y.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(x.values, y.values, atol=1e-5, rtol=1e-5)
    assert len(ha.layers) == 2  # one cache layer per extra head
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    for x, y in zip(sa, sb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_threshold_zero_emits_all_heads_and_batch_rows_match_single_runs():
    model, tokenizer = _dynamo(scale=30.0)
    config = DecodeConfig(threshold=0.0, temperature=0.0, mask=False)
    batch = generate(model, tokenizer, PROMPTS, 9, config)
    assert batch.tokens_per_step == 3.0 and batch.level_counts == {3: 6}
    for prompt, tokens in zip(PROMPTS, batch.tokens, strict=True):
        assert generate(model, tokenizer, [prompt], 9, config).tokens[0] == tokens


def test_mixed_tokens_per_step_in_one_batch(monkeypatch):
    """Rows that emit different numbers of tokens in the same step (a stub selection: 1, 2 or 3 tokens by row)
    still match their single-prompt runs, and the batch really takes steps of every length."""
    model, tokenizer = _dynamo(scale=10.0)
    prompts = ["the the the the", "She said nothing at all to anyone", "Mr"]
    plain = generate(model, tokenizer, prompts, 1, DecodeConfig(threshold=1.0, temperature=0.0))
    count = {row[0]: length for row, length in zip(plain.tokens, (1, 2, 3), strict=True)}
    assert len(count) == 3  # three rows, three different first tokens

    def stub(probs, stats, config, generator=None, factors=None):
        take = count.get(int(probs[0].argmax()), 2)
        return None if take == 1 else [int(p.argmax()) for p in probs[:take]]

    monkeypatch.setattr(dynamo, "select_tokens", stub)
    config = DecodeConfig(threshold=0.3, temperature=0.0)
    batch = generate(model, tokenizer, prompts, 12, config)
    assert set(batch.level_counts) == {1, 2, 3}
    for prompt, tokens in zip(prompts, batch.tokens, strict=True):
        assert len(tokens) == 12
        assert generate(model, tokenizer, [prompt], 12, config).tokens[0] == tokens


def _reference_drafter(monkeypatch, rows, corrupt_every=2):
    """Drafts from the known base-model continuation ``rows`` (found by the context's last two tokens), every
    ``corrupt_every``-th call with its second draft corrupted, so both acceptance and rejection happen."""
    calls = [0]

    def drafter(head_logits, context, count, processors, greedy, generator):
        calls[0] += 1
        tail = context[-2:].tolist()
        drafts = [int(t) for t in head_logits[:count].argmax(-1)]
        for row in rows:
            for i in range(len(row) - 2):
                if row[i : i + 2] == tail:
                    drafts = (row[i + 2 : i + 2 + count] + drafts)[:count]
                    break
        if len(drafts) > 1 and calls[0] % corrupt_every == 0:
            drafts[1] = (drafts[1] + 1) % 49152
        return drafts, [None] * len(drafts)

    monkeypatch.setattr(dynamo, "_draft_row", drafter)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-neox", "tiny-opt"])
def test_verify_mode_is_generate_token_for_token(name, monkeypatch):
    """Greedy verify mode emits exactly transformers' greedy tokens (repetition penalty included), in a
    left-padded batch and alone, while accepting several tokens per step and rejecting corrupted drafts."""
    model, tokenizer = _dynamo(name, scale=3.0)
    reference = _hf(model, tokenizer, do_sample=False, repetition_penalty=1.1, max_new_tokens=12)
    full = [tokenizer(p)["input_ids"] + r for p, r in zip(PROMPTS, reference, strict=True)]
    _reference_drafter(monkeypatch, full)
    config = DecodeConfig(verify=True, temperature=0.0)
    out = generate(model, tokenizer, PROMPTS, 12, config)
    assert out.tokens == reference
    assert out.tokens_per_step > 1.3 and 0 < out.acceptance[1] < 1 and out.acceptance[0] > 0.5
    assert max(out.level_counts) == 3
    for prompt, tokens in zip(PROMPTS, reference, strict=True):
        assert generate(model, tokenizer, [prompt], 12, config).tokens[0] == tokens


def test_verify_mode_with_the_real_heads_equals_generate():
    model, tokenizer = _dynamo("tiny-llama", scale=3.0)
    reference = _hf(model, tokenizer, do_sample=False, repetition_penalty=1.1, max_new_tokens=12)
    out = generate(model, tokenizer, PROMPTS, 12, DecodeConfig(verify=True, temperature=0.0))
    assert out.tokens == reference and out.steps < 12


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
            accepted, token = dynamo._verify_row(scores_at, [d1, d2], [q, q], False, g)
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
    assert dynamo._verify_row(lambda i: scores[i], [1, 0], [None, None], True, None) == (2, 2)
    assert dynamo._verify_row(lambda i: scores[i], [1, 2], [None, None], True, None) == (1, 0)
    assert dynamo._verify_row(lambda i: scores[i], [2, 0], [None, None], True, None) == (0, 1)
    assert dynamo._verify_row(lambda i: scores[i], [], [], True, None) == (0, 1)


def test_cooccurrence_weight_formula_on_hand_counts():
    """w = min(1, (c + λ) / (E + λ))^α with E = N_m p̂(a) p̂(b) and counts below min_count treated as unseen."""
    stream = torch.tensor([1, 2, 1, 2, 1, 3, 2, 2, 1, 2])
    stats = NgramCounts.build(stream, vocab=5, max_order=2)
    config = DecodeConfig(alpha=2.0, smoothing=0.5, min_count=2)
    ids = [torch.tensor([1, 2]), torch.tensor([2, 3])]
    weight = dynamo.cooccurrence_weight(ids, stats, config)
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
    joint, ids = dynamo.candidate_joint([p1, p2], stats, config, floor=0.0)
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
        joint, ids = dynamo.candidate_joint(probs[:m], stats, config, floor=0.0)
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
    for trial in range(40):
        probs = [torch.softmax(torch.randn(60, generator=g) * (2 + trial % 5), -1) for _ in range(3)]
        for adaptive in (True, False):
            config = DecodeConfig(threshold=threshold, temperature=0.0, top_k=20, adaptive=adaptive, min_count=1)
            fast = select_tokens(probs, stats, config)
            assert fast == _full_grid_select(probs, stats, config)
            hits += fast is not None and len(fast) > 1
    assert hits > 10  # the comparison covered multi-token picks


def test_otsu_is_applied_when_sampling():
    """With the adaptive threshold, samples come only from the cells above Otsu's cut of the blurred joint."""
    g = torch.Generator().manual_seed(3)
    probs = [torch.softmax(torch.randn(40, generator=g) * 2, -1) for _ in range(2)]
    config = DecodeConfig(threshold=0.0, temperature=1.0, top_k=40, mask=False)
    joint, ids = dynamo.candidate_joint(probs, None, config, floor=0.0)
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
    factors = dynamo.repeat_factors(logits, torch.tensor([[3]]), config)[0]
    torch.testing.assert_close(factors, torch.tensor([math.exp((1 - 2) / 0.5), math.exp((0.5 - 1) / 0.5),
                                                      math.exp((-2 + 1) / 0.5), 1.0]))
    ids = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    grid = dynamo.repeat_penalty_grid(ids, [factors, factors])
    torch.testing.assert_close(grid, torch.tensor([[factors[0], 1.0], [1.0, factors[1]]]))


def test_lm_head_fast_path_equals_linear():
    model, _ = _dynamo()
    rows = torch.randn(2, 3, 64)
    torch.testing.assert_close(model.lm_head(rows), model.base.get_output_embeddings()(rows), atol=1e-5, rtol=1e-5)


def test_bfloat16_threshold_one_is_generate_in_bfloat16():
    model, tokenizer = _dynamo(scale=3.0)
    model.to(torch.bfloat16)
    out = generate(model, tokenizer, PROMPTS, 8, DecodeConfig(threshold=1.0, temperature=0.0))
    assert out.tokens == _hf(model, tokenizer, do_sample=False, repetition_penalty=1.1)


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


def test_ngram_counts_save_load_and_sparse(tmp_path):
    stats = NgramCounts.build(torch.tensor([4, 1, 4, 1, 2]), vocab=6, max_order=3)
    stats.save(tmp_path / "s.safetensors")
    again = NgramCounts.load(tmp_path / "s.safetensors")
    assert again.total == 5 and all(torch.equal(again.keys[m], stats.keys[m]) for m in (1, 2, 3))
    dense = stats.sparse(2).to_dense()
    assert dense[4, 1] == 2 and dense[1, 4] == 1 and dense[1, 2] == 1 and dense.sum() == 4
    assert stats.count(torch.tensor([4, 1, 4])).item() == 1


def test_head_one_perplexity_is_the_base_models():
    model, _ = _dynamo()
    windows = torch.randint(0, 5000, (2, 32), generator=torch.Generator().manual_seed(1))
    ppl = head_perplexities(model, windows)
    assert len(ppl) == 3
    assert ppl[0] == perplexity(model.base, windows).perplexity  # the same NLL kernel: equal, not close


@pytest.mark.training
def test_training_lowers_head_losses_and_keeps_the_base_frozen(tokenizer, tmp_path):
    """Exact resume and its errors are checked for every trainer in test_contract.py."""
    config = DynamoTrainConfig(steps=6, batch_size=2, seqlen=32, checkpoint_every=3, autocast=False, lr=5e-3,
                               device="cpu")
    model, _ = _dynamo()
    reference = {k: v.clone() for k, v in model.base.state_dict().items()}
    summary = train_heads(model, tokenizer, config, checkpoint=tmp_path / "a")
    first, last = summary["history"][0]["losses"], summary["history"][-1]["losses"]
    assert sum(last) < sum(first)
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(torch.equal(v, reference[k]) for k, v in model.base.state_dict().items())
    assert not model.heads.training  # handed back in eval mode


def test_saved_folder_loads_as_base_plus_heads(tmp_path):
    import leanfm  # noqa: F401

    model, tokenizer = _dynamo()
    save_dynamo(model, tokenizer, NgramCounts.build(torch.arange(20), 49152, 2), tmp_path / "d")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    again, _, stats = load(tmp_path / "d")
    ids = torch.randint(0, 5000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        final, ref_states = model.forward_heads(ids)
        torch.testing.assert_close(plain(ids).logits, model.logits(final, ref_states)[:, :, 0], atol=1e-5, rtol=1e-5)
        again_final, states = again.forward_heads(ids)
    assert torch.equal(again_final, final) and all(torch.equal(x, y) for x, y in zip(states, ref_states, strict=True))
    assert stats is not None and stats.total == 20
    assert json.loads((tmp_path / "d" / "dynamo.json").read_text())["heads"] == 3


def test_cli_train_and_generate(tmp_path, capsys):
    out = tmp_path / "heads"
    assert main(["--quiet", "dynamo", "train", "tiny-llama", "--heads", "2", "--out", str(out), "--steps", "2",
                 "--seqlen", "16", "--batch-size", "1"]) == 0
    assert (out / "dynamo_heads.safetensors").is_file() and (out / "cooccurrence.safetensors").is_file()
    capsys.readouterr()
    assert main(["--quiet", "dynamo", "generate", str(out), "--prompt", "Emma", "--prompt", "It was",
                 "--max-new-tokens", "4", "--threshold", "0", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["texts"]) == 2 and math.isfinite(data["tokens_per_step"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dynamo", "train", "tiny-llama", "--heads", "1", "--out", "{tmp}/x"], "heads 1 is too few"),
        (["dynamo", "generate", "{tmp}", "--prompt", "a", "--threshold", "1.5"], "1.5 is out of range"),
        (["dynamo", "generate", "{tmp}", "--prompt", "a"], "has no DynaMo heads"),
        (["dynamo", "train", "tiny-llama", "--init", "zeros", "--out", "{tmp}/x"], "unknown head init 'zeros'"),
    ],
)
def test_bad_inputs_give_one_line_errors(args, message, tmp_path, capsys):
    try:
        code = main(["--quiet", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    except SystemExit as exit_:  # argparse rejects some values itself
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_generate_rejects_bad_arguments():
    model, tokenizer = _dynamo()
    with pytest.raises(LeanfmError, match="heads 4 is out of range"):
        generate(model, tokenizer, ["a"], 2, heads=4)
    with pytest.raises(LeanfmError, match="non-empty"):
        generate(model, tokenizer, [""], 2)
    with pytest.raises(LeanfmError, match=r"threshold -0\.1"):
        DecodeConfig(threshold=-0.1)
