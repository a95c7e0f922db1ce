"""SliceGPT: norm folding, rotation invariance, the norm compensation, PCA ordering, accounting, checkpoints."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from leanfm import load_model
from leanfm.compress import compress_model, save_compressed
from leanfm.compress.slicegpt import (
    fold_norms,
    pca_basis,
    signal_gram,
    slice_model,
    sliced_block_params,
    width_for_ratio,
)
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters
from leanfm.models.sliced import SlicedLlamaForCausalLM, sliced_config
from leanfm.models.tiny import build_tiny, tiny_configs

SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}
VOCAB, D = 49152, 64


def _ids(n=4, t=24, seed=3):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


def _llama(dtype=torch.float64, eps=None, seed=0):
    """tiny-llama (tied head) with non-trivial norm weights, so folding them is not a no-op."""
    if eps is None:
        model = build_tiny("tiny-llama", seed)
    else:
        config = tiny_configs()["tiny-llama"]
        config.rms_norm_eps = eps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LlamaRMSNorm):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
    return model.to(dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float64, 1e-9)])
def test_folding_norms_keeps_logits_and_unties_head(dtype, atol):
    model, ids = _llama(dtype), _ids()
    embedding = model.model.embed_tokens.weight.detach().clone()
    dense = _logits(model, ids)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tiny-llama ties them
    fold_norms(model)
    norms = [m.weight for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 5 and all(bool((w == 1).all()) for w in norms)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the final norm went into the head only
    torch.testing.assert_close(_logits(model, ids), dense, atol=atol, rtol=0)


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-4), (torch.float64, 1e-6)])
def test_full_width_rotation_reproduces_dense_logits(dtype, atol):
    model, ids = _llama(dtype), _ids()
    dense = _logits(model, ids)
    sliced = slice_model(model, ids, width=D, batch_size=2)
    assert isinstance(sliced, SlicedLlamaForCausalLM) and sliced.lm_head.weight.dtype == dtype
    # rotated, not copied: the embedding changed although the function did not
    assert not torch.allclose(sliced.model.embed_tokens.weight, model.model.embed_tokens.weight)
    torch.testing.assert_close(_logits(sliced, ids), dense, atol=atol, rtol=0)


def test_norm_compensation_exact_when_the_stream_fits_in_the_kept_dims():
    """Every write to the residual stream (embedding, o_proj, down) is confined to a 32-dim subspace, so slicing to
    32 dims loses nothing *if* the 32-dim RMSNorm is compensated exactly: weight sqrt(64/32), eps 0.1 * 64/32."""
    model, ids = _llama(torch.float64, eps=0.1), _ids()
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    keep = q[:, :32] @ q[:, :32].T  # projector onto the subspace
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ keep)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(keep @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(keep @ layer.mlp.down_proj.weight)
    dense = _logits(model, ids)
    sliced = slice_model(model, ids, width=32, batch_size=2)
    assert sliced.config.rms_norm_eps == pytest.approx(0.2)
    assert torch.allclose(sliced.model.norm.weight, torch.full((32,), math.sqrt(2.0), dtype=torch.float64))
    torch.testing.assert_close(_logits(sliced, ids), dense, atol=1e-6, rtol=0)


def _random_basis(gram):
    q, _ = torch.linalg.qr(torch.randn(gram.shape, generator=torch.Generator().manual_seed(7), dtype=gram.dtype))
    return q


def test_pca_keeps_the_top_directions():
    """With a strongly anisotropic residual stream, keeping the top-d' PCA directions gives a much lower logit error
    on the calibration batch than random or bottom-d' directions (a planted ascending sort fails here)."""
    ids = _ids(6, 24)
    errors = {}
    for name, basis in [("top", pca_basis), ("random", _random_basis), ("bottom", lambda g: pca_basis(g).flip(1))]:
        model = _llama(torch.float64)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
        spread = q @ torch.diag(torch.logspace(0, -2, D, dtype=torch.float64)) @ q.T
        with torch.no_grad():
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
            model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ spread)
        dense = _logits(model, ids)
        sliced = slice_model(model, ids, width=24, batch_size=3, basis=basis)
        errors[name] = float((_logits(sliced, ids) - dense).pow(2).mean())
    assert errors["top"] < 0.5 * min(errors["random"], errors["bottom"]), errors


def test_ratio_maps_to_width_and_parameters_are_counted_honestly(tokenizer):
    config = tiny_configs()["tiny-llama"]
    # one block at width d: q,o 64d each, k,v 32d each, gate/up/down 128d each, two norms d, two shortcuts d^2
    assert sliced_block_params(config, 64) == 64 * (64 + 32 + 32 + 64 + 3 * 128 + 2) + 2 * 64 * 64
    assert width_for_ratio(config, 0.3, 2 * 36992) == (40, pytest.approx(1 - 52640 / 73984))
    model = load_model("tiny-llama")[0]
    report = compress_model(model, tokenizer, method="slicegpt", ratio=0.3, **SMALL)
    assert isinstance(model, SlicedLlamaForCausalLM) and model.config.hidden_size == 40 and report.width == 40
    assert report.block_params_before == 2 * 36992 and report.block_params_after == 2 * (40 * 578 + 2 * 40 * 40)
    assert report.params_before == VOCAB * 64 + 2 * 36992 + 64  # tied head counted once
    assert report.params_after == 2 * VOCAB * 40 + 52640 + 40 == count_parameters(model)  # untied: two V x d'
    assert report.achieved_ratio == pytest.approx(1 - 52640 / 73984)
    assert report.whole_model_ratio == pytest.approx(1 - report.params_after / report.params_before)
    assert report.to_dict()["whole_model_ratio"] < 0  # on this tiny model untying costs more than slicing saves


def test_save_reload_identical_logits_and_greedy_generation(tokenizer, tmp_path):
    import leanfm  # noqa: F401  (registers leanfm_sliced_llama with AutoModelForCausalLM)

    model = load_model("tiny-llama")[0]
    report = compress_model(model, tokenizer, method="slicegpt", ratio=0.4, **SMALL)
    ids = _ids(2, 12)
    logits = _logits(model, ids)
    cached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert cached.shape == (2, 16) and torch.equal(cached, uncached)  # the KV cache path agrees with recomputation
    save_compressed(model, tokenizer, tmp_path / "s", report)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert type(reloaded) is SlicedLlamaForCausalLM and reloaded.config.model_type == "leanfm_sliced_llama"
    assert torch.equal(_logits(reloaded, ids), logits)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False), cached)
    ours, _ = load_model(str(tmp_path / "s"))
    assert count_parameters(ours) == report.params_after


def test_sliced_config_records_what_was_changed():
    config = sliced_config(tiny_configs()["tiny-llama"], 24)
    assert (config.hidden_size, config.head_dim, config.tie_word_embeddings) == (24, 16, False)
    assert config.leanfm_original_hidden_size == 64 and config.rms_norm_eps == pytest.approx(1e-6 * 64 / 24)


@pytest.mark.parametrize(("name", "settings", "words"), [
    ("tiny-opt", {"ratio": 0.3}, "llama"),
    ("tiny-llama", {"ratio": 1.5}, "ratio"),
    ("tiny-llama", {"ratio": 0.995}, "out of reach"),
    ("tiny-llama", {"ratio": 0.3, "allocation": "global"}, "allocation"),
])
def test_refusals_are_one_line(tokenizer, name, settings, words):
    model = load_model(name)[0]
    with pytest.raises(LeanfmError) as err:
        compress_model(model, tokenizer, method="slicegpt", **settings, **SMALL)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_signal_gram_normalises_each_token_as_the_norm_does():
    states = [torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])]  # one batch, two tokens, D = 2
    # token 1: mean square 12.5; token 2: mean square 0.5 (eps 0)
    expected = torch.tensor([[9.0, 12.0], [12.0, 16.0]], dtype=torch.float64) / 12.5 + torch.tensor(
        [[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64) / 0.5
    torch.testing.assert_close(signal_gram(states, "normed", 0.0), expected)
    torch.testing.assert_close(signal_gram(states, "raw", 0.0), torch.tensor([[10.0, 12.0], [12.0, 16.0]],
                                                                            dtype=torch.float64))
