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
