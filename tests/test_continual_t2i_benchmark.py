"""The continual t2i benchmark's own logic: which validation row wins, and the penalty scale that placed the grid."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling t2i_pretrain as a top-level module
    try:
        yield importlib.import_module("continual_t2i")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(method: str, recognised: float, kid: float, **overrides) -> dict:
    return {"settings": {"method": method, **overrides}, "overrides": overrides,
            "metrics": {"mean": {"final": {"recognised": recognised, "kid": kid}}}}


def test_the_winner_per_method_is_the_best_final_recognition_then_the_lower_kid(bench):
    rows = [_row("clora", 0.10, 1.0, reg_weight=0.0), _row("clora", 0.20, 5.0, reg_weight=3.0),
            _row("clora", 0.20, 4.0, reg_weight=30.0), _row("clora", 0.15, 0.5, reg_weight=0.3),
            _row("stamina", 0.05, 9.0, sparsity=0.1), _row("stamina", 0.30, 9.5, sparsity=0.01)]
    assert bench.winners(rows) == {"clora": {"reg_weight": 30.0}, "stamina": {"sparsity": 0.01}}
    # order of the rows does not matter
    assert bench.winners(rows[::-1]) == {"clora": {"reg_weight": 30.0}, "stamina": {"sparsity": 0.01}}
    assert bench.winners([]) == {}


def test_penalty_scale_is_the_loss_over_the_raw_clora_penalty_against_the_sum_of_earlier_updates(bench, tmp_path):
    gen = torch.Generator().manual_seed(0)
    layers = ("down.attn2.to_k", "down.attn2.to_v")
    tensors = {f"history.{t}.{name}.{m}": torch.randn(shape, generator=gen)
               for t in range(3) for name in layers for m, shape in (("A", (2, 5)), ("B", (4, 2)))}
    save_file(tensors, str(tmp_path / bench.ADAPTER_FILE))
    row = {"folder": str(tmp_path), "training": [{"final_mse": 0.5}, {"final_mse": 0.04}, {"final_mse": 0.03}]}

    def delta(t: int, name: str) -> torch.Tensor:
        return tensors[f"history.{t}.{name}.B"] @ tensors[f"history.{t}.{name}.A"]

    expected = []
    for t in (1, 2):
        reg = sum(float(((sum(delta(p, n) for p in range(t)).abs() * delta(t, n)) ** 2).sum()) for n in layers)
        expected.append((t + 1, reg, row["training"][t]["final_mse"] / reg))
    got = bench.penalty_scale(row)
    assert [(s["concept"], s["reg"], s["lambda_matching"]) for s in got] == [
        (c, pytest.approx(r, rel=1e-5), pytest.approx(x, rel=1e-5)) for c, r, x in expected]


def test_mask_density_is_the_kept_share_per_concept_averaged_over_layers(bench, tmp_path):
    masks = {"history.0.a.attn2.to_k.mask": torch.tensor([[True, False], [False, False]]),  # 1/4
             "history.0.a.attn2.to_v.mask": torch.tensor([[True, True], [False, False]]),  # 2/4
             "history.1.a.attn2.to_k.mask": torch.zeros(2, 2, dtype=torch.bool),
             "history.1.a.attn2.to_v.mask": torch.ones(2, 2, dtype=torch.bool),
             "history.0.a.attn2.to_k.A": torch.ones(2, 2)}  # not a mask: ignored
    save_file(masks, str(tmp_path / bench.ADAPTER_FILE))
    assert bench.mask_density({"folder": str(tmp_path)}) == [pytest.approx(0.375), pytest.approx(0.5)]


def _steps_row(method: str, steps: int, after: float, final: float, overrides: dict) -> dict:
    return {"settings": {"method": method, "steps": steps, "samples": 16}, "overrides": overrides,
            "metrics": {"mean": {k: {"recognised": v} for k, v in (("after", after), ("final", final))},
                        "per_concept": [{}] * 10}}


def test_fewer_steps_compares_only_stamina_rows_that_override_steps_below_clora(bench):
    clora = _steps_row("clora", 300, 0.15, 0.13, {})
    rows = [clora, _steps_row("stamina", 100, 0.10, 0.01, {"steps": 100}),  # 0.01 vs 0.13 over 160 draws
            _steps_row("stamina", 150, 0.14, 0.12, {"steps": 150}),
            _steps_row("stamina", 300, 0.5, 0.5, {"steps": 300}),  # not fewer steps
            _steps_row("stamina", 150, 0.5, 0.5, {"steps": 150, "sparsity": 0.1}),  # a second override
            _steps_row("lora", 150, 0.5, 0.5, {"steps": 150})]
    lines = bench.fewer_steps(clora, rows)
    assert len(lines) == 2
    assert lines[0].startswith("- 10 concepts, 150 steps per concept (plain rows: 300)")  # longest budget first
    assert "STAMINA at 150 vs C-LoRA at 300: 0.12 vs 0.13" in lines[0] and "within noise" in lines[0]
    assert "0.01 vs 0.13, Δ -0.12" in lines[1] and "within noise" not in lines[1]
    assert all(line.endswith("not run, so the claim is not read.") for line in lines)


@pytest.mark.parametrize(("clora_short", "reading"), [
    (0.12, "not told apart at the same budget: the claim is not supported here"),
    (0.01, "STAMINA keeps more at the same budget: the claim holds here"),
    (0.40, "STAMINA keeps less at the same budget: the claim fails here")])
def test_fewer_steps_reads_the_claim_against_clora_at_the_same_short_budget(bench, clora_short, reading):
    clora = _steps_row("clora", 300, 0.15, 0.13, {})
    rows = [clora, _steps_row("stamina", 150, 0.14, 0.12, {"steps": 150}),
            _steps_row("clora", 150, 0.14, clora_short, {"steps": 150})]
    (line,) = bench.fewer_steps(clora, rows)
    assert line.endswith(f"{reading}.")
    assert f"C-LoRA at 150 vs at 300: {clora_short:.2f} vs 0.13" in line
    assert f"both at 150: 0.12 vs {clora_short:.2f}" in line


def test_against_tokens_names_only_the_methods_that_beat_textual_inversion_beyond_noise(bench):
    def row(method: str, final: float) -> dict:
        row = _steps_row(method, 300, final, final, {})
        row["metrics"]["mean"]["forgetting"] = {"recognised": 0.0}
        return row

    ti = row("ti", 0.10)  # 160 draws each: sd of a difference ~0.03 to 0.05 here
    line = bench.against_tokens(ti, [row("lora", 0.12), row("clora", 0.30)])
    assert "lora 0.12 (Δ +0.02" in line and "clora 0.30 (Δ +0.20" in line
    assert "clora keeps more than the token alone. Just after learning: lora 0.12, clora 0.30 vs 0.10" in line
    line = bench.against_tokens(ti, [row("stamina", 0.11), row("clora", 0.04)])  # one tie, one worse
    assert "no adapter method keeps more than the token alone by more than the noise." in line
