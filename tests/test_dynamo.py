"""DynaMo: exactness at ε_b = 1, KV cache across multi-token steps, selection rules, n-grams, training, CLI."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from leanfm import load_model
from leanfm.cli import main
from leanfm.decode.dynamo import (
    DecodeConfig,
    DynamoModel,
    blur3,
    generate,
    load,
    otsu_threshold,
    save_dynamo,
    select_tokens,
    weighted_joint,
)
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.training import DynamoTrainConfig, head_perplexities, train_heads
from leanfm.errors import LeanfmError
from leanfm.eval.perplexity import perplexity

PROMPTS = ["It is a truth universally acknowledged", "Emma"]  # different lengths: left padding


def _dynamo(name="tiny-llama", heads=3):
    base, tokenizer = load_model(name)
    return DynamoModel(base, heads=heads).eval(), tokenizer


def _hf(model, tokenizer, **kwargs):
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = model.base.generate(**enc, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id, **kwargs)
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
    model, tokenizer = _dynamo()
    config = DecodeConfig(threshold=0.0, temperature=0.0, mask=False)
    batch = generate(model, tokenizer, PROMPTS, 9, config)
    assert batch.tokens_per_step == 3.0 and batch.level_counts == {3: 6}
    for prompt, tokens in zip(PROMPTS, batch.tokens, strict=True):
        assert generate(model, tokenizer, [prompt], 9, config).tokens[0] == tokens


def test_mixed_tokens_per_step_in_one_batch():
    """Rows that emit different numbers of tokens per step still match their single-prompt runs."""
    model, tokenizer = _dynamo()
    stats = NgramCounts.build(torch.randint(0, 300, (5000,), generator=torch.Generator().manual_seed(0)), 49152)
    config = DecodeConfig(threshold=0.02, temperature=0.0)
    prompts = ["the the the the", "She said nothing at all to anyone", "Mr"]
    batch = generate(model, tokenizer, prompts, 12, config, stats=stats)
    for prompt, tokens in zip(prompts, batch.tokens, strict=True):
        assert len(tokens) == 12
        assert generate(model, tokenizer, [prompt], 12, config, stats=stats).tokens[0] == tokens


def test_cooccurrence_mask_formula_on_a_hand_made_joint():
    stream = torch.tensor([1, 2, 1, 2, 1, 3, 2, 2])
    stats = NgramCounts.build(stream, vocab=5, max_order=2)
    assert stats.count(torch.tensor([[1, 2], [2, 1], [1, 3], [3, 1]])).tolist() == [2, 2, 1, 0]
    p1 = torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0])
    p2 = torch.tensor([0.0, 0.1, 0.5, 0.4, 0.0])
    config = DecodeConfig(top_k=2, alpha=1.0)
    joint, ids = weighted_joint([p1, p2], stats, config)
    assert ids[0].tolist() == [1, 2] and ids[1].tolist() == [2, 3]
    unigram = {1: 3 / 8, 2: 4 / 8, 3: 1 / 8}
    pair = {(1, 2): 2 / 7, (1, 3): 1 / 7, (2, 2): 1 / 7, (2, 3): 0.0}
    raw = torch.tensor([[p1[a] * p2[b] for b in (2, 3)] for a in (1, 2)], dtype=torch.float64)
    weight = torch.tensor([[pair[(a, b)] / (unigram[a] * unigram[b]) for b in (2, 3)] for a in (1, 2)],
                          dtype=torch.float64)
    expected = raw * weight * raw.sum() / (raw * weight).sum()
    torch.testing.assert_close(joint, expected)
    assert joint[1, 1] == 0  # (2, 3) never occurs: masked out
    unmasked, _ = weighted_joint([p1, p2], stats, DecodeConfig(top_k=2, mask=False))
    torch.testing.assert_close(unmasked, raw)


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
    assert select_tokens([sharp, sharp, sharp], None, DecodeConfig(threshold=1.0, mask=False)) == [7, 7, 7]
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
