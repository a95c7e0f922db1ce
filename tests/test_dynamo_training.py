"""DynaMo head training: cached stem states, the projected loss (CE + self-distillation), agreement, resume."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from leanfm import load_model
from leanfm.cli import main
from leanfm.decode.dynamo import DynamoModel, load
from leanfm.decode.stem_cache import StemCache, block_kwargs, build_stem_cache, cache_key, spaced_windows, stem_pass
from leanfm.decode.training import (
    ARTIFACT_HEADS,
    DynamoTrainConfig,
    attach_heads,
    cached_head_losses,
    cached_picks,
    export_heads,
    head_agreement,
    head_losses,
    head_metrics,
    heads_task,
    projected_loss,
    train_heads,
)
from leanfm.training import Runtime, fit

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. However little known the feelings or views of such a man may be. ") * 12


def _dynamo(name="tiny-llama", heads=3, init="copy"):
    base, tokenizer = load_model(name)
    return DynamoModel(base, heads=heads, init=init).eval(), tokenizer


def _stream(n=400, seed=0):
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-neox", "tiny-opt"])
def test_cached_states_give_the_loss_of_forward_heads(name, tmp_path):
    model, _ = _dynamo(name)
    ids = spaced_windows(_stream(), 24, 4)
    with torch.no_grad():
        reference = [float(x) for x in head_losses(model, ids)]
        # float32: the stem's states with the once-per-length block kwargs reproduce forward_heads exactly
        states, _, _ = stem_pass(model.base, ids)
        _, ces, _ = cached_head_losses(model, states, ids, block_kwargs(model.base, 24))
        assert ces == pytest.approx(reference, rel=1e-5)
        # bf16 states read back from the disk cache, bf16 autocast on both sides
        build_stem_cache(model.base, [_stream()], ["s"], tmp_path, 24, 4, shard_windows=3)
        cache = StemCache(tmp_path)
        cached_ids, cached_states = cache.batch([(0, i) for i in range(4)])
        assert torch.equal(cached_ids, ids) and cached_states.dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = [float(x) for x in head_losses(model, ids)]
            _, ces, _ = cached_head_losses(model, cached_states, cached_ids, block_kwargs(model.base, 24))
    assert ces == pytest.approx(auto, rel=1e-2)


def test_distillation_target_is_the_base_at_t_plus_j_minus_1():
    model, _ = _dynamo()
    ids = spaced_windows(_stream(), 20, 3)
    with torch.no_grad():
        states, final, kwargs = stem_pass(model.base, ids)
        _, ces, kls = cached_head_losses(model, states, ids, kwargs, final, distill=0.5)
        logits = model.logits(*model.forward_heads(ids))  # [B, T, n, V]
    for j in (2, 3):
        log_p = logits[:, j - 1 : -1, 0].log_softmax(-1)  # the base's distribution of token t+j
        log_q = logits[:, : -j, j - 1].log_softmax(-1)  # head j at t
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        ce = nn.functional.cross_entropy(logits[:, : -j, j - 1].flatten(0, 1), ids[:, j:].flatten())
        assert kls[j - 2] == pytest.approx(float(kl), rel=1e-4) and ces[j - 2] == pytest.approx(float(ce), rel=1e-5)


def test_cache_key_follows_base_sources_seqlen_and_windows():
    key = cache_key("smollm2-135m", ["austen:train", "pydocs:train"], 256, 1500)
    assert key == cache_key("smollm2-135m", ["austen:train", "pydocs:train"], 256, 1500)
    others = {cache_key("smollm2-135m", ["austen:train", "pydocs:train"], 128, 1500),
              cache_key("smollm2-135m", ["austen:train"], 256, 1500),
              cache_key("smollm2-135m", ["austen:train", "pydocs:train"], 256, 0),
              cache_key("tiny-llama", ["austen:train", "pydocs:train"], 256, 1500),
              cache_key("smollm2-135m", ["austen:train", "pydocs:train"], 256, 1500, dtype="float32")}
    assert key not in others and len(others) == 5


def test_spaced_windows_cover_the_whole_source():
    ids = torch.arange(100)
    assert spaced_windows(ids, 10, 0).shape == (10, 10)
    assert spaced_windows(ids, 10, 3)[:, 0].tolist() == [0, 40, 90]  # windows 0, 4.5 -> 4 (round half to even), 9


def test_half_built_cache_resumes_shard_by_shard(tmp_path):
    model, _ = _dynamo()
    streams = [_stream(200, 1), _stream(150, 2)]

    def interrupt(shard):
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # source 0: shard 0 and 1 written, then stopped
        build_stem_cache(model.base, streams, ["a", "b"], tmp_path, 16, 0, kinds=("penultimate", "final"),
                         shard_windows=4, on_shard=interrupt)
    done = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert done == ["s0-final-0000.safetensors", "s0-final-0001.safetensors", "s0-penultimate-0000.safetensors",
                    "s0-penultimate-0001.safetensors"]
    first = (tmp_path / "s0-penultimate-0000.safetensors").stat().st_mtime_ns
    built = []
    record = build_stem_cache(model.base, streams, ["a", "b"], tmp_path, 16, 0, kinds=("penultimate", "final"),
                              shard_windows=4, on_shard=built.append)
    assert built == [2, 0, 1, 2]  # source 0 (12 windows): shard 2 only; source 1 (9 windows): all three
    assert record["built_tokens"] == (4 + 9) * 16 and record["windows"] == [12, 9]
    assert (tmp_path / "s0-penultimate-0000.safetensors").stat().st_mtime_ns == first
    again = []
    build_stem_cache(model.base, streams, ["a", "b"], tmp_path, 16, 0, kinds=("penultimate",), shard_windows=4,
                     on_shard=again.append)
    assert again == []
    ids, states, final = StemCache(tmp_path, ("penultimate", "final")).window(1, 8)
    assert torch.equal(ids, streams[1][128:144])
    with torch.no_grad():
        reference, normed, _ = stem_pass(model.base.to(torch.bfloat16), ids[None])
    assert torch.equal(states, reference[0]) and torch.equal(final, normed[0])


def _hand_head():
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))  # logits = hidden: a row of log-probabilities is its own softmax
    return head


def test_projected_loss_is_plain_cross_entropy_at_w0():
    head = nn.Linear(5, 7, bias=True)
    hidden = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2, 2, 1])
    loss, ce, kl = projected_loss(hidden, head, targets, chunk=4)
    loss.backward()
    assert head.weight.grad is None and head.bias.grad is None  # the frozen LM head gets no gradient
    grad = hidden.grad.clone()
    hidden.grad = None
    expected = nn.functional.cross_entropy(head(hidden), targets)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(ce) == float(loss.detach()) and float(kl) == 0
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-5, atol=1e-7)


def test_projected_loss_distillation_by_hand():
    head = _hand_head()
    p, q = torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([[0.25, 0.5, 0.25]])
    student = q.log().requires_grad_(True)
    target = torch.tensor([0])
    loss, ce, kl = projected_loss(student, head, target, p.log(), distill=0.5)
    assert float(ce) == pytest.approx(math.log(4), rel=1e-6)  # -ln q_0
    assert float(kl) == pytest.approx(0.25 * math.log(2), rel=1e-6)  # 0.5 ln(0.5/0.25) + 0.25 ln(0.25/0.5) + 0
    assert float(loss.detach()) == pytest.approx(1.125 * math.log(2), rel=1e-6)
    loss.backward()
    # d/dlogits = q - ((1 - W) onehot + W p) = [0.25 - 0.75, 0.5 - 0.125, 0.25 - 0.125]
    torch.testing.assert_close(student.grad, torch.tensor([[-0.5, 0.375, 0.125]]))
    # W = 1 is minimised by copying the base's distribution: zero loss, zero gradient there, positive elsewhere
    copy = p.log().requires_grad_(True)
    loss, _, kl = projected_loss(copy, head, target, p.log(), distill=1.0)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6 and float(copy.grad.abs().max()) < 1e-6
    assert float(projected_loss(q.log(), head, target, p.log(), distill=1.0)[0]) > 0.1


class _Stub:
    """A DynaMo stand-in whose heads' logits are fixed: argmaxes chosen by hand."""

    num_heads = 3

    def __init__(self, tops):  # tops[h][t]: the argmax of head h+1 at position t
        self.logits_ = torch.zeros(1, 5, 3, 4)
        for h, row in enumerate(tops):
            for t, token in enumerate(row):
                self.logits_[0, t, h, token] = 5.0

    def forward_heads(self, ids):
        return None, []

    def logits(self, final, states):
        return self.logits_


def test_agreement_counts_head_j_against_the_base_at_t_plus_j_minus_1():
    stub = _Stub([[1, 2, 3, 0, 0], [2, 3, 1, 0, 0], [3, 1, 1, 1, 1]])
    windows = torch.tensor([[0, 1, 2, 3, 0]])  # the base (head 1) predicts every next token right
    # head 2 at t = 0..2 vs base at t+1 = [2, 3, 0]: [2, 3, 1] -> 2 of 3
    # head 3 at t = 0..1 vs base at t+2 = [3, 0]: [3, 1] -> 1 of 2
    assert head_agreement(stub, windows) == pytest.approx([2 / 3, 1 / 2])
    metrics = head_metrics(stub, windows)
    assert metrics["ppl"][0] == pytest.approx(math.exp(-math.log(math.exp(5) / (math.exp(5) + 3))))


def test_cached_picks_share_the_batch_between_sources():
    picks = cached_picks([10, 3], 5, seed=1)
    assert [s for s, _ in picks] == [0, 0, 0, 1, 1] and all(i < (10, 3)[s] for s, i in picks)
    assert picks == cached_picks([10, 3], 5, seed=1) and picks != cached_picks([10, 3], 5, seed=2)


def _config(folder, **kw):
    """Two small text sources (tokenizing the real corpora would take most of the time budget)."""
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT.upper())
    return DynamoTrainConfig(**{"model": "tiny-llama", "heads": 3, "steps": 4, "batch_size": 2, "seqlen": 16,
                                "checkpoint_every": 2, "cache_windows": 8, "device": "cpu", "lr": 5e-3,
                                "train_corpus": f"{folder / 'a.txt'},{folder / 'b.txt'}", **kw})


@pytest.mark.training
def test_cached_training_resumes_exactly(tmp_path):
    model, tokenizer = _dynamo()
    config = _config(tmp_path, distill=0.5)
    whole = train_heads(model, tokenizer, config, tmp_path / "a", cache_root=tmp_path)
    assert whole["stem_cache"]["windows"] == [8, 8] and len(whole["history"][0]["kl"]) == 2
    first, _ = _dynamo()
    runtime = Runtime.for_config(config)
    cache = StemCache(tmp_path / "cache" / "dynamo-states" / whole["stem_cache"]["key"], ("penultimate", "final"))
    fit(heads_task(first, tokenizer, config, runtime, cache), config, runtime, steps=2, checkpoint=tmp_path / "b")
    second, _ = _dynamo()
    resumed = train_heads(second, tokenizer, config, tmp_path / "b", resume=True, cache_root=tmp_path)
    assert resumed["stem_cache"]["built_tokens"] == 0  # the cache was complete
    assert resumed["history"] == whole["history"]
    for x, y in zip(second.heads.state_dict().values(), model.heads.state_dict().values(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.training
def test_uncached_training_lowers_head_losses_and_keeps_the_base_frozen(tokenizer, tmp_path):
    config = _config(tmp_path, steps=6, seqlen=32, checkpoint_every=3, autocast=False, cache_states=False)
    model, _ = _dynamo(init="random")
    model.requires_grad_(False)  # heads copied from an already frozen base (a second run on a shared base)
    reference = {k: v.clone() for k, v in model.base.state_dict().items()}
    summary = train_heads(model, tokenizer, config, checkpoint=tmp_path / "a")
    first, last = summary["history"][0]["losses"], summary["history"][-1]["losses"]
    assert sum(last) < sum(first) and summary["stem_cache"] == {}
    assert all(not p.requires_grad for p in model.base.parameters())
    assert all(torch.equal(v, reference[k]) for k, v in model.base.state_dict().items())
    assert not model.heads.training  # handed back in eval mode


def test_exported_heads_attach_to_the_base(tmp_path):
    model, _ = _dynamo()
    train = _config(tmp_path).to_dict()
    manifest = {"name": "h", "command": "x", "steps": 1, "seed": 0, "data": "text", "metrics": {}, "train": train}
    export_heads(model, tmp_path / "art", manifest)
    saved = load_file(str(tmp_path / "art" / ARTIFACT_HEADS))
    assert all(v.dtype == torch.bfloat16 for v in saved.values())
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["heads"] == 3
    attach_heads(tmp_path / "art", tmp_path / "d", base="tiny-llama")
    again, _, stats = load(tmp_path / "d")
    for name, value in again.heads.state_dict().items():
        assert torch.equal(value, saved[name].float())
    assert stats is not None and stats.total > 100


def test_cli_train_and_generate(tmp_path, capsys):
    out = tmp_path / "heads"
    corpus = _config(tmp_path).train_corpus
    assert main(["--quiet", "dynamo", "train", "tiny-llama", "--heads", "2", "--out", str(out), "--steps", "2",
                 "--seqlen", "16", "--batch-size", "1", "--no-cache-states", "--distill", "0.3",
                 "--train-corpus", corpus]) == 0
    assert (out / "dynamo_heads.safetensors").is_file() and (out / "cooccurrence.safetensors").is_file()
    capsys.readouterr()
    assert main(["--quiet", "dynamo", "generate", str(out), "--prompt", "Emma", "--prompt", "It was",
                 "--max-new-tokens", "4", "--threshold", "0", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["texts"]) == 2 and math.isfinite(data["tokens_per_step"])
    capsys.readouterr()
    assert main(["--quiet", "dynamo", "train", "tiny-llama", "--out", str(tmp_path / "x"), "--distill", "2"]) == 2
    assert "distill 2.0 is out of range" in capsys.readouterr().err
