"""FLAP: fluctuation scores, the global structure search, bias compensation and the saved checkpoint.

Expected values are computed by hand or from first principles (the o_proj output of the kept heads is the
dense one, so the only error is the removed heads' contribution minus the compensation bias).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import TINY
from leanfm import load_model
from leanfm.compress import compress_model, save_compressed
from leanfm.compress.flap import (
    FlapConfig,
    LayerScores,
    align_mlp,
    channel_moments,
    flap,
    fluctuation,
    fluctuation_pass,
    global_search,
    head_units,
    plan_removal,
    score_layers,
    structure_costs,
)
from leanfm.errors import LeanfmError
from leanfm.models import get_adapter
from leanfm.models.adapters import AttentionLayout

# unaligned widths on the tiny models (a 32-channel step is a quarter of their MLP); aligned: test_widths.py
SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2, "width_multiple": 1}


def _ids(n=4, t=32, seed=3):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(seed))


def _config(ratio, **kw):
    return FlapConfig(ratio=ratio, **{**SMALL, **kw})


@pytest.mark.parametrize("name", TINY)
def test_ratio_near_zero_reproduces_dense_logits(name):
    model, tokenizer = load_model(name)
    ids = _ids(2, 24)
    with torch.no_grad():
        dense = model(ids).logits
    report = compress_model(model, tokenizer, method="flap", ratio=1e-4, **SMALL)
    assert report.achieved_ratio == 0 and report.method == "flap"
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=2e-5, rtol=1e-4)


def test_fluctuation_score_by_hand():
    weight = torch.tensor([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0]])  # squared column norms 10, 5, 4
    var = torch.tensor([2.0, 0.5, 1.0])
    torch.testing.assert_close(fluctuation(var, weight), torch.tensor([20.0, 2.5, 4.0], dtype=torch.float64))
    x = torch.tensor([[1.0, 4.0], [3.0, 4.0], [5.0, 7.0]])  # 3 tokens: means 3, 5; sample variances 4, 3
    m = channel_moments((x.T @ x).double(), x.sum(0).double(), 3)
    torch.testing.assert_close(m.mean, torch.tensor([3.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(m.var, torch.tensor([4.0, 3.0], dtype=torch.float64))


def test_block_moments_and_scores_match_the_activations():
    """The dense pass's moments are the mean / sample variance of the o_proj and down_proj inputs, and the
    scores are FLAP's: attention (var ||W_j||^2)^2 and MLP var ||W_j||^2, standardised, heads by mean."""
    model, _ = load_model("tiny-llama")
    adapter, ids = get_adapter(model), _ids()
    parts = adapter.parts(adapter.blocks(model)[1])
    seen: dict[str, list[torch.Tensor]] = {"o": [], "mid": []}

    def keep(name):
        return lambda _m, args: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [parts.o.register_forward_pre_hook(keep("o")), parts.mlp_out.register_forward_pre_hook(keep("mid"))]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    moments = fluctuation_pass(model, ids, batch_size=2)
    o_in, mid = moments[1]
    x_o, x_mid = torch.cat(seen["o"]).double(), torch.cat(seen["mid"]).double()
    torch.testing.assert_close(o_in.mean, x_o.mean(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(o_in.var, x_o.var(0), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(mid.var, x_mid.var(0), atol=1e-6, rtol=1e-4)
    scores = score_layers(model, moments, "layer")[1]
    s_o = (x_o.var(0) * (parts.o.weight.double() ** 2).sum(0)) ** 2
    z_o = ((s_o - s_o.mean()) / s_o.std()).view(4, 16).mean(1)  # 4 heads of 16 dims
    per_group = z_o.view(2, 2).sort(dim=1).values  # 2 KV groups of 2 query heads
    torch.testing.assert_close(scores.unit_scores, per_group.mean(0), atol=1e-5, rtol=1e-4)
    s_mid = x_mid.var(0) * (parts.mlp_out.weight.double() ** 2).sum(0)
    torch.testing.assert_close(scores.mlp_scores, (s_mid - s_mid.mean()) / s_mid.std(), atol=1e-5, rtol=1e-4)


def test_standardize_over_all_layers():
    model, _ = load_model("tiny-llama")
    parts = [get_adapter(model).parts(b) for b in get_adapter(model).blocks(model)]
    moments = fluctuation_pass(model, _ids(), batch_size=2)
    raw = torch.cat([m.var * (p.mlp_out.weight.double() ** 2).sum(0) for p, (_, m) in zip(parts, moments, strict=True)])
    scores = torch.cat([layer.mlp_scores for layer in score_layers(model, moments, "all")])
    torch.testing.assert_close(scores, (raw - raw.mean()) / raw.std(), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(scores, torch.cat([s.mlp_scores for s in score_layers(model, moments, "layer")]))


def test_head_units_take_one_head_per_kv_group():
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.2, 0.8])  # 3 groups of 2 query heads
    unit_scores, heads = head_units(scores, AttentionLayout(6, 3, 16, 16))
    assert heads == [[1, 3, 4], [0, 2, 5]]
    torch.testing.assert_close(unit_scores, torch.tensor([0.2, 0.7333333]))
    unit_scores, heads = head_units(scores, AttentionLayout(6, 6, 16, 16))  # multi-head: single heads
    assert heads == [[1], [4], [3], [0], [5], [2]] and unit_scores.tolist() == sorted(scores.tolist())


def test_structure_costs_by_hand():
    model, _ = load_model("tiny-llama")  # hidden 64, head_dim 16, 2 KV groups, gated MLP, no biases
    adapter = get_adapter(model)
    assert structure_costs(adapter.parts(adapter.blocks(model)[0]), adapter.layout(model)) == (2 * 2 * 16 * 64, 192)
    model, _ = load_model("tiny-neox")  # multi-head, fused qkv with bias, fc1 with bias
    adapter = get_adapter(model)
    unit = 3 * 16 * (64 + 1) + 64 * 16
    assert structure_costs(adapter.parts(adapter.blocks(model)[0]), adapter.layout(model)) == (unit, 65 + 64)


def test_global_search_removes_the_lowest_scores_nearest_the_budget():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 4.0])
    costs = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0])  # removal order 3, 1, 2, 0, 4: cumulative 3, 5, 6, 7, 8
    assert global_search(scores, costs, 5.0).tolist() == [False, True, False, True, False]
    assert global_search(scores, costs, 5.6).tolist() == [False, True, True, True, False]
    assert not global_search(scores, costs, 1.4).any()


def _layer(units, mlp, unit_cost=10, mlp_cost=1):
    return LayerScores(torch.tensor(units), [[u] for u in range(len(units))], unit_cost, torch.tensor(mlp), mlp_cost,
                       True)


def test_plan_removal_across_layers_keeps_one_of_each():
    low = _layer([-3.0, -2.9, -2.8], [-5.0, -4.0, -3.5])  # scores below every structure of the other layer
    high = _layer([1.0, 2.0, 3.0], [0.1, -0.2, 0.3, 0.4])
    # removable, lowest first (cost): -5 (1), -4 (1), -3 (10), -2.9 (10), -0.2 (1), 0.1 (1), 0.3 (1), 1 (10), 2 (10)
    # cumulative cost: 1, 2, 12, 22, 23, 24, 25, 35, 45; the best unit and channel of each layer never go
    (units_low, mlp_low), (units_high, mlp_high) = plan_removal([low, high], [14.0, 14.0], per_layer=False)  # 28
    assert (units_low, mlp_low.tolist()) == (2, [True, True, False])
    assert (units_high, mlp_high.tolist()) == (0, [True, True, True, False])
    assert plan_removal([low, high], [16.0, 15.0], per_layer=False)[1][0] == 1  # 31: nearest is 35
    (units_low, mlp_low), (units_high, mlp_high) = plan_removal([low, high], [12.0, 3.0], per_layer=True)
    assert (units_low, mlp_low.tolist()) == (1, [True, True, False])  # 1, 2, 12
    assert (units_high, mlp_high.tolist()) == (0, [True, True, True, False])  # 1, 2, 3


@pytest.mark.parametrize("allocation", ["al-am", "uniform"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_parameter_budget_holds(ratio, allocation):
    model, _ = load_model("tiny-llama")
    report = flap(model, _ids(), _config(ratio, allocation=allocation))
    # one head unit is 4096 of 73,984 block parameters: the nearest cut is within half a unit, plus the biases
    assert report.achieved_ratio == pytest.approx(ratio, abs=0.03)
    if allocation == "uniform":
        assert all(s == pytest.approx(ratio, abs=0.06) for s in report.layer_sparsity)


def _block0_linears(model, which):
    parts = get_adapter(model).parts(get_adapter(model).blocks(model)[0])
    return [getattr(parts, w) for w in which]


def _outputs(model, ids, which):
    """Outputs of block 0's Linears ``which`` (``o``, ``mlp_out``) on ``ids``; block 0 reads the embeddings,
    the same input for the dense and the pruned model."""
    seen = []
    hooks = [linear.register_forward_hook(lambda _m, _a, out: seen.append(out.double()))
             for linear in _block0_linears(model, which)]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return seen


def _with_biases(name):
    """Tiny model ``name`` whose biases are non-zero (random init leaves them at 0): compensation must add to them."""
    model, _ = load_model(name)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
    return model


@pytest.mark.parametrize(("name", "which"), [
    ("tiny-llama", ["o"]),  # the MLP input changes with the attention: only o_proj is compared
    ("tiny-phi", ["o", "mlp_out"]),  # parallel block: the MLP reads the same input as attention
])
def test_bias_compensation_lowers_the_error_by_the_removed_mean(name, which):
    """Kept heads/channels reproduce the dense outputs, so the error of o_proj (and fc2) on the calibration
    tokens is ``sum_t ||W_r x_r,t - (b' - b)||^2``: the compensation ``b' - b = W_r mean(x_r)`` lowers it by
    exactly ``n ||W_r mean(x_r)||^2``."""
    ids = _ids(4, 32)
    dense = _with_biases(name)
    reference = _outputs(dense, ids, which)
    errors, models = {}, {}
    for compensate in (True, False):
        models[compensate] = _with_biases(name)
        flap(models[compensate], ids, _config(0.5, allocation="uniform", bias_compensation=compensate))
        errors[compensate] = [(out - ref).pow(2).sum().item()
                              for out, ref in zip(_outputs(models[compensate], ids, which), reference, strict=True)]
    pairs = zip(_block0_linears(dense, which), _block0_linears(models[True], which), strict=True)
    for (old, new), with_, without in zip(pairs, errors[True], errors[False], strict=True):
        assert new.in_features < old.in_features  # something was removed here
        shift = new.bias.double() - (old.bias.double() if old.bias is not None else 0)
        assert with_ < without
        assert with_ == pytest.approx(without - ids.numel() * shift.pow(2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-neox"])
def test_save_reload_identical_logits(name, tmp_path):
    import leanfm  # noqa: F401  (registers the compressed classes with AutoModelForCausalLM)

    model, tokenizer = load_model(name)
    report = compress_model(model, tokenizer, method="flap", ratio=0.4, **SMALL)
    save_compressed(model, tokenizer, tmp_path / "c", report)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    ids = _ids(2, 24)
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    parts = get_adapter(hf).parts(get_adapter(hf).blocks(hf)[0])
    assert parts.o.bias is not None and parts.mlp_out.bias is not None  # llama gained compensation biases


def test_gqa_heads_per_group_stay_equal(tmp_path):
    """Three query heads per KV group (SmolLM2's layout): every layer keeps whole units, >= 1 head per group."""
    import leanfm  # noqa: F401

    config = LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8, vocab_size=5000, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = _ids()
    report = flap(model, ids, _config(0.5))
    layers = model.config.leanfm_layers
    assert all(spec["num_kv_heads"] == 2 and spec["num_heads"] in (2, 4, 6) for spec in layers)
    assert any(spec["num_heads"] < 6 for spec in layers) and report.achieved_ratio == pytest.approx(0.5, abs=0.05)
    model.save_pretrained(tmp_path / "g")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize(("settings", "message"), [
    ({"ratio": 1.5}, r"ratio 1\.5 is out of range; accepted: 0 < ratio < 1"),
    ({"ratio": 0.3, "allocation": "global"}, "unknown allocation 'global'; accepted: al-am, uniform"),
    ({"ratio": 0.3, "standardize": "none"}, "unknown standardize 'none'; accepted: layer, all"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(LeanfmError, match=message) as err:
        FlapConfig(**settings)
    assert "\n" not in str(err.value)


def test_align_mlp_rounds_with_a_carry_and_keeps_the_best_channels():
    scores = torch.arange(40, dtype=torch.float64)  # channel j scores j: the best are the last
    layers = [_layer([0.0, 1.0], scores.tolist()), _layer([0.0, 1.0], scores.flip(0).tolist())]
    removed = torch.zeros(40, dtype=torch.bool)
    removed[:13] = True  # 27 kept -> 24 (multiple of 8), carrying 3 channels
    plan = align_mlp(layers, [(1, removed), (0, removed.clone())], 8)
    assert [int((~r).sum()) for _, r in plan] == [24, 32]  # 27 + 3 = 30 -> 32
    assert (~plan[0][1]).nonzero().flatten().tolist() == list(range(16, 40))  # layer 0's best 24
    assert (~plan[1][1]).nonzero().flatten().tolist() == list(range(32))  # layer 1 scores the other way round
    assert plan[0][0] == 1 and align_mlp(layers, [(1, removed)] * 2, 1)[0][1] is removed
