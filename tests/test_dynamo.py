"""DynaMo: exactness at ε_b = 1, KV cache across multi-token steps, selection rules, n-grams, training, CLI."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from leanfm import load_model
from leanfm.cli import main
from leanfm.decode import dynamo
from leanfm.decode.dynamo import (
    DecodeConfig,
    DynamoModel,
    generate,
    load,
    save_dynamo,
)
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.training import head_perplexities
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
    config = DecodeConfig(threshold=0.0, temperature=0.0)  # every row reaches level 3: the stub decides
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


def test_lm_head_fast_path_equals_linear():
    model, _ = _dynamo()
    rows = torch.randn(2, 3, 64)
    torch.testing.assert_close(model.lm_head(rows), model.base.get_output_embeddings()(rows), atol=1e-5, rtol=1e-5)


def test_bfloat16_threshold_one_is_generate_in_bfloat16():
    model, tokenizer = _dynamo(scale=3.0)
    model.to(torch.bfloat16)
    out = generate(model, tokenizer, PROMPTS, 8, DecodeConfig(threshold=1.0, temperature=0.0))
    assert out.tokens == _hf(model, tokenizer, do_sample=False, repetition_penalty=1.1)


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


def test_cli_generate_verify_and_dtype(tmp_path, capsys):
    """`dynamo generate --verify` on a saved folder: the base's greedy tokens, acceptance reported, bf16 on request."""
    model, tokenizer = _dynamo(heads=3)
    save_dynamo(model, tokenizer, None, tmp_path / "d")
    for dtype in ("float32", "bfloat16"):
        capsys.readouterr()
        assert main(["--quiet", "dynamo", "generate", str(tmp_path / "d"), "--prompt", "Emma", "--verify",
                     "--temperature", "0", "--repetition-penalty", "1.0", "--max-new-tokens", "5", "--dtype", dtype,
                     "--json", "-"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["dtype"] == dtype and len(data["acceptance"]) == 2
    reference = model.base.generate(**tokenizer(["Emma"], return_tensors="pt"), max_new_tokens=5, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    assert main(["--quiet", "dynamo", "generate", str(tmp_path / "d"), "--prompt", "Emma", "--verify", "--temperature",
                 "0", "--repetition-penalty", "1.0", "--max-new-tokens", "5", "--dtype", "float32", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["texts"][0] == tokenizer.decode(reference[0, -5:], skip_special_tokens=True)


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
