"""Continual adapters on PEFT (leanfm.models.lora): folding, the C-LoRA penalty, STAMINA's masks, saving."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from leanfm.errors import LeanfmError
from leanfm.models.lora import AdapterSettings, ContinualAdapter, StaminaLinear, replay


class Tiny(nn.Module):
    """Two Linear layers with the names the adapter targets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.query = nn.Linear(6, 5)
        self.value = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(torch.tanh(self.query(x)))


def _settings(**kw) -> AdapterSettings:
    return AdapterSettings(**{"method": "lora", "rank": 2, "alpha": 4.0, "targets": ("query", "value"), **kw})


def _randomise(adapter: ContinualAdapter, seed: int = 1) -> None:
    """Nonzero B (PEFT starts it at 0) and, for STAMINA, mask logits of both signs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter.lora_layers().values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g))
            if isinstance(layer, StaminaLinear):
                u = layer.lora_mask_u["default"]
                u.copy_(torch.randn(u.shape, generator=g) * 3)
                layer.lora_mask_b["default"].zero_()


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("method", ["lora", "clora", "stamina"])
def test_fold_equals_unfolded_forward_and_leaves_no_parameters(method):
    model = Tiny()
    before = sum(p.numel() for p in model.parameters())
    adapter = ContinualAdapter(model, _settings(method=method))
    adapter.begin_task()
    assert all(isinstance(m, LoraLinear) for m in adapter.lora_layers().values())  # PEFT's layers
    assert isinstance(adapter.lora_layers()["query"], StaminaLinear) == (method == "stamina")
    _randomise(adapter)
    model.eval()
    x = torch.randn(7, 6)
    unfolded = model(x)
    adapter.end_task()
    assert torch.allclose(model(x), unfolded, atol=1e-5)
    assert sum(p.numel() for p in model.parameters()) == before
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


def test_fold_adds_exactly_the_scaled_low_rank_product():
    model = Tiny()
    w0 = model.query.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings())
    adapter.begin_task()
    _randomise(adapter)
    layer = adapter.lora_layers()["query"]
    a, b = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    adapter.end_task()
    assert torch.allclose(model.query.weight, w0 + (4.0 / 2) * b @ a, atol=1e-6)


def test_clora_penalty_equals_a_hand_computation():
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="clora", reg_weight=3.0))
    past = {"query": torch.randn(5, 6), "value": torch.randn(4, 5)}  # entries of both signs: |P| matters
    adapter.past = {k: v.clone() for k, v in past.items()}
    adapter.begin_task()
    _randomise(adapter)
    layers = adapter.lora_layers()
    expected = 0.0
    for name, layer in layers.items():
        delta = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        expected += float(((past[name].abs() * delta.detach()) ** 2).sum())
    penalty, record = adapter.penalty()
    assert float(penalty.detach()) == pytest.approx(3.0 * expected, rel=1e-5)
    assert record["reg"] == pytest.approx(expected, rel=1e-5)
    penalty.backward()  # differentiable in the task's factors
    assert layers["query"].lora_B["default"].weight.grad.abs().sum() > 0


def test_clora_penalty_is_zero_on_the_first_task_and_for_plain_lora():
    adapter = ContinualAdapter(Tiny(), _settings(method="clora", reg_weight=5.0))
    adapter.begin_task()
    _randomise(adapter)
    assert float(adapter.penalty()[0]) == 0.0
    adapter.end_task()
    plain = ContinualAdapter(Tiny(), _settings(method="lora", reg_weight=5.0))
    plain.past = {"query": torch.ones(5, 6), "value": torch.ones(4, 5)}
    plain.begin_task()
    _randomise(plain)
    assert float(plain.penalty()[0]) == 0.0


def test_past_sum_accumulates_every_folded_update():
    model = Tiny()
    w0 = model.value.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings(method="clora", reg_weight=1.0))
    for seed in (1, 2):
        adapter.begin_task()
        _randomise(adapter, seed)
        adapter.end_task()
    assert torch.allclose(adapter.past["value"], model.value.weight - w0, atol=1e-6)
    fresh = Tiny()
    replay(adapter.history, fresh)
    assert torch.allclose(fresh.value.weight, model.value.weight, atol=1e-6)


def test_adapter_history_saves_and_loads_onto_the_base_model(tmp_path):
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=0.3, seed=4))
    for seed in (1, 2):
        adapter.begin_task()
        _randomise(adapter, seed)
        adapter.end_task()
    adapter.save(tmp_path / "history.safetensors")
    fresh = Tiny()
    loaded = ContinualAdapter.load(tmp_path / "history.safetensors", fresh, apply=True)
    assert loaded.settings == adapter.settings and len(loaded.history) == 2
    assert all(torch.equal(loaded.past[k], adapter.past[k]) for k in adapter.past)
    assert torch.equal(loaded.history[1]["query.mask"], adapter.history[1]["query.mask"])
    x = torch.randn(4, 6)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(LeanfmError, match="cannot read adapter history"):
        ContinualAdapter.load(tmp_path / "bad.safetensors", Tiny())


def test_stamina_masks_are_binary_at_inference_and_masked_entries_never_change():
    model = Tiny()
    w0 = model.query.weight.detach().clone()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=0.5))
    adapter.begin_task()
    _randomise(adapter)
    layer = adapter.lora_layers()["query"]
    model.eval()
    mask = layer.mask()
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(mask, (layer.mask_logits() > 0).float())
    x = torch.randn(3, 6)
    product = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    expected = nn.functional.linear(x, w0 + mask * 2.0 * product, layer.base_layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    record = adapter.end_task()
    closed = ~record["query.mask"]
    assert closed.any() and (~closed).any()
    assert torch.equal(model.query.weight[closed], w0[closed])
    assert not torch.equal(model.query.weight[~closed], w0[~closed])


def test_stamina_training_mask_is_straight_through_and_the_sparsity_penalty_closes_it():
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=1.0, mask_init=3.0))
    adapter.begin_task()
    layer = adapter.lora_layers()["query"]
    model.train()
    sampled = layer.mask()
    assert set(sampled.detach().unique().tolist()) <= {0.0, 1.0}
    _, record = adapter.penalty()
    assert 0.9 < record["density"] < 1.0  # sigmoid(3) = 0.95: every entry starts open
    params = list(adapter.parameters().values())
    optimizer = torch.optim.SGD(params, lr=5.0)
    for _ in range(40):
        optimizer.zero_grad()
        adapter.penalty()[0].backward()
        optimizer.step()
    assert adapter.penalty()[1]["density"] < 0.5
    model.eval()
    assert float(layer.mask().mean()) < 0.5


def test_adapter_bad_inputs_are_one_line_errors():
    with pytest.raises(LeanfmError, match="rank 0 is invalid"):
        _settings(rank=0)
    with pytest.raises(LeanfmError, match="unknown target module 'nope'; accepted: query, value"):
        ContinualAdapter(Tiny(), _settings(targets=("nope",)))
    adapter = ContinualAdapter(Tiny(), _settings())
    with pytest.raises(LeanfmError, match="no task has begun"):
        adapter.end_task()
    adapter.begin_task()
    with pytest.raises(LeanfmError, match="still open"):
        adapter.begin_task()


def test_begin_task_initialises_the_same_whatever_the_global_rng():
    def first_a(noise_seed: int) -> torch.Tensor:
        torch.manual_seed(noise_seed)
        adapter = ContinualAdapter(Tiny(), _settings(seed=3))
        adapter.begin_task()
        return adapter.lora_layers()["query"].lora_A["default"].weight.detach().clone()

    assert torch.equal(first_a(1), first_a(2))


class Nested(nn.Module):
    """Target names inside sub-modules, as in a transformer (``block.attn.query``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.ModuleDict({"attn": nn.ModuleDict({"query": nn.Linear(6, 6), "out": nn.Linear(6, 6)})})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block["attn"]["out"](self.block["attn"]["query"](x))


def test_targets_match_the_last_name_component_of_nested_layers():
    adapter = ContinualAdapter(Nested(), _settings(targets=("query",)))
    assert adapter.layers == ["block.attn.query"]
    with pytest.raises(LeanfmError, match="unknown target module 'attn'; accepted: query, out"):
        ContinualAdapter(Nested(), _settings(targets=("attn",)))


def test_sampled_masks_open_with_probability_sigmoid_of_the_logit_and_pass_its_gradient():
    """Logistic noise: P(sigma((L + g) / tau) > 1/2) = P(L + g > 0) = sigma(L), whatever tau."""
    model = Nested()
    adapter = ContinualAdapter(model, _settings(method="stamina", targets=("query",), mask_tau=0.5))
    adapter.begin_task()
    layer = adapter.lora_layers()["block.attn.query"]
    levels = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    with torch.no_grad():
        layer.lora_mask_b["default"].copy_(levels.repeat_interleave(2)[:6])  # rows at known logits (U = 0)
    torch.manual_seed(0)
    draws = torch.stack([layer.mask(sample=True) for _ in range(4000)])  # [4000, 6, 6]
    assert set(draws.unique().tolist()) == {0.0, 1.0}
    expected = torch.sigmoid(layer.lora_mask_b["default"].detach())
    assert torch.allclose(draws.mean(dim=(0, 2)), expected, atol=0.02)
    assert float(layer.density().detach()) == pytest.approx(float(expected.mean()), rel=1e-5)  # penalty term: tau-free
    torch.manual_seed(1)
    layer.mask(sample=True).sum().backward()  # straight-through: the soft sample's gradient reaches the logits
    grad = layer.lora_mask_b["default"].grad
    assert grad is not None and (grad > 0).all()
    torch.manual_seed(1)
    uniform = torch.rand(6, 6).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((expected.logit()[:, None] + uniform.log() - (-uniform).log1p()) / 0.5)
    assert torch.allclose(grad, (soft * (1 - soft) / 0.5).sum(1), atol=1e-4)


def test_stamina_penalty_is_beta_times_density_plus_the_masked_regulariser():
    model = Tiny()
    adapter = ContinualAdapter(model, _settings(method="stamina", sparsity=0.7, reg_weight=2.0))
    past = {"query": torch.randn(5, 6), "value": torch.randn(4, 5)}
    adapter.past = {k: v.clone() for k, v in past.items()}
    adapter.begin_task()
    _randomise(adapter)
    layers = adapter.lora_layers()
    reg = density = 0.0
    for name, layer in layers.items():
        logits = layer.mask_logits().detach()
        delta = (logits > 0).float() * 2.0 * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        reg += float(((past[name].abs() * delta) ** 2).sum())
        density += float(torch.sigmoid(logits).mean()) / len(layers)
    penalty, record = adapter.penalty()
    assert record["reg"] == pytest.approx(reg, rel=1e-5) and record["density"] == pytest.approx(density, rel=1e-5)
    assert float(penalty.detach()) == pytest.approx(2.0 * reg + 0.7 * density, rel=1e-5)
    quiet = ContinualAdapter(Tiny(), _settings(method="stamina", sparsity=0.7, reg_weight=0.0))
    quiet.past = dict(adapter.past)
    quiet.begin_task()
    assert "reg" not in quiet.penalty()[1]


def test_each_task_and_seed_gets_its_own_initialisation():
    def first_a(seed: int, tasks: int) -> torch.Tensor:
        adapter = ContinualAdapter(Tiny(), _settings(seed=seed))
        for _ in range(tasks):
            adapter.begin_task()
            adapter.end_task()
        adapter.begin_task()
        return adapter.lora_layers()["query"].lora_A["default"].weight.detach().clone()

    assert not torch.equal(first_a(0, 0), first_a(0, 1))
    assert not torch.equal(first_a(0, 0), first_a(1, 0))
    assert torch.equal(first_a(2, 1), first_a(2, 1))


@pytest.mark.parametrize(("overrides", "words"), [
    ({"mask_rank": 0}, "mask rank 0 is invalid"), ({"alpha": 0.0}, "alpha 0.0"), ({"mask_tau": 0.0}, "mask tau 0.0"),
    ({"sparsity": -0.1}, "sparsity -0.1 is invalid"), ({"reg_weight": -1.0}, "reg_weight -1.0 is invalid"),
    ({"method": "ewc"}, "unknown adapter method 'ewc'"), ({"targets": ()}, "no target modules")])
def test_bad_settings_are_one_line_errors(overrides, words):
    with pytest.raises(LeanfmError) as caught:
        _settings(**overrides)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_file_that_is_not_an_adapter_history_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "something"})
    with pytest.raises(LeanfmError, match="is not a leanfm-continual-adapter/1 file"):
        ContinualAdapter.load(tmp_path / "other.safetensors", Tiny())
    adapter = ContinualAdapter(Tiny(), _settings())
    adapter.begin_task()
    with pytest.raises(LeanfmError, match="still open"):
        adapter.save(tmp_path / "open.safetensors")
