"""Hardware-aligned widths (issue 14): widths are the promised multiples, the global budget still holds, modules
are built on the device of the weights they replace, and the report carries both ratios."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leanfm import load_model
from leanfm.compress import compress_model
from leanfm.compress.base import WIDTH_MULTIPLE, carried_keep, on_device, round_to_multiple
from leanfm.compress.surgery import head_width, mlp_width_for_budget, select_head_dims
from leanfm.errors import LeanfmError
from leanfm.models import get_adapter
from leanfm.models.adapters import AttentionLayout
from leanfm.models.compressed import CompressedAttention, dense_spec, restructure_block

SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}


def test_round_to_multiple_and_carried_keep_by_hand():
    assert round_to_multiple(1073.4, 32, 1536) == 1088  # 33.54 steps -> 34
    assert round_to_multiple(1071.9, 32, 1536) == 1056  # 33.49 steps -> 33
    assert round_to_multiple(1073.4, 1, 1536) == 1073
    assert round_to_multiple(3.0, 32, 1536) == 32  # at least one step
    assert round_to_multiple(1530.0, 32, 1536) == 1536  # 1536 is a multiple: kept whole
    assert round_to_multiple(118.0, 32, 120) == 120  # 128 would pass the dense width: stays dense
    assert carried_keep(700.0, -50.0, 1000) == pytest.approx(0.65)
    assert carried_keep(990.0, 40.0, 1000) == 1.0  # never more than the whole block


def test_head_width_and_selection_by_hand():
    assert head_width(0.7, 64, 8) == 48 and head_width(0.7, 64, 1) == 45 and head_width(0.05, 64, 8) == 8
    full = AttentionLayout(num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=16)
    score = torch.arange(16, dtype=torch.float64)[None]  # pair j scores j + (j + 8): the last pairs win
    dims, rope = select_head_dims(score, full, 0.7, multiple=8)  # 11.2 -> 8 dims = 4 pairs
    assert dims.tolist() == [[4, 5, 6, 7, 12, 13, 14, 15]] and rope == [[4, 5, 6, 7]]
    partial = AttentionLayout(num_heads=2, num_kv_heads=1, head_dim=16, rotary_dim=8)
    dims, rope = select_head_dims(score, partial, 0.9, multiple=8)  # 14.4 -> 16: every dim
    assert sorted(dims[0].tolist()) == list(range(16)) and rope == [[0, 1, 2, 3]]
    dims, rope = select_head_dims(score, partial, 0.7, multiple=8)  # 8 dims: round(2.8) = 3 pairs + 2 passes
    assert dims.tolist() == [[1, 2, 3, 5, 6, 7, 14, 15]] and rope == [[1, 2, 3]]
    dims, _ = select_head_dims(score, partial, 0.7, multiple=1)  # the unaligned rule: round(11.2) = 11 dims
    assert dims.shape[1] == 11


def test_mlp_width_for_budget_by_hand():
    model, _ = load_model("tiny-llama")  # hidden 64, MLP 128, 4 query / 2 KV heads of 16 dims, gated MLP
    adapter = get_adapter(model)
    parts, layout = adapter.parts(adapter.blocks(model)[0]), adapter.layout(model)
    # per head dim (2*4 + 2*2) * 64 = 768, per channel 3 * 64 = 192: 0.7 * (768*16 + 192*128) = 25804.8,
    # minus 768 * 8 for the heads, / 192 = 102.4 channels
    assert mlp_width_for_budget(parts, layout, 8, 0.7) == 102
    assert mlp_width_for_budget(parts, layout, 8, 0.7, multiple=8) == 104
    assert mlp_width_for_budget(parts, layout, 8, 0.7, multiple=32) == 96


def _medium_llama():
    """A random llama wide enough for 32-channel steps to be small: 4 blocks, hidden 128, MLP 512, 4q/2kv x 32."""
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["modegpt", "wanda-sp", "svd-llm", "flap"])
def test_widths_are_multiples_and_the_budget_holds(method, tokenizer):
    model = _medium_llama()
    report = compress_model(model, tokenizer, method=method, ratio=0.3, **SMALL)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.01)
    assert report.whole_model_ratio == pytest.approx(1 - report.params_after / report.params_before)
    assert 0 < report.whole_model_ratio < report.achieved_ratio  # the embedding is not compressed
    layers = model.config.leanfm_layers
    if method == "svd-llm":
        ranks = [r for layer in layers for r in layer["low_rank"].values()]
        assert ranks and all(r % 8 == 0 for r in ranks)
        return
    assert all(layer["intermediate"] % WIDTH_MULTIPLE == 0 for layer in layers)
    assert all(layer["qk_dim"] % 8 == 0 and layer["v_dim"] % 8 == 0 for layer in layers)
    assert any(layer["intermediate"] < 512 for layer in layers)


def test_width_multiple_one_is_the_unaligned_rule(tokenizer):
    model = _medium_llama()
    compress_model(model, tokenizer, method="modegpt", ratio=0.3, width_multiple=1, **SMALL)
    assert any(layer["intermediate"] % 8 for layer in model.config.leanfm_layers)
    with pytest.raises(LeanfmError, match="width_multiple 0"):
        compress_model(_medium_llama(), tokenizer, method="modegpt", ratio=0.3, width_multiple=0)


def test_rebuilt_blocks_land_on_the_device_of_their_weights():
    """On the meta device (no CUDA needed): the new Linears and attention are built where the weights live."""
    model, _ = load_model("tiny-llama")
    adapter = get_adapter(model)
    spec = dense_spec(model, adapter, 0)
    spec.intermediate, spec.qk_dim, spec.v_dim = 64, 8, 8
    spec.rope_index = [[0, 1, 2, 3]] * 2
    model.to("meta")
    with on_device(torch.device("meta")):
        restructure_block(model, 0, spec)
    block = adapter.blocks(model)[0]
    assert isinstance(block.self_attn, CompressedAttention)
    assert {p.device.type for p in block.parameters()} == {"meta"}
    assert block.mlp.gate_proj.weight.shape == (64, 64)


def test_compression_returns_the_model_where_it_was(tokenizer):
    model, _ = load_model("tiny-llama")
    report = compress_model(model, tokenizer, method="modegpt", ratio=0.3, device="cpu", width_multiple=1, **SMALL)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and report.to_dict()["whole_model_ratio"] > 0
    assert model.config.leanfm_compression["device"] == "cpu"
    with pytest.raises(LeanfmError, match="unknown device 'tpu'"):
        compress_model(model, tokenizer, method="modegpt", ratio=0.3, device="tpu")


@pytest.mark.parametrize(("name", "ratio"), [("tiny-llama", 0.4), ("tiny-opt", 0.3), ("tiny-phi", 0.2)])
def test_rounding_error_is_carried_to_the_next_block(name, ratio):
    """Two blocks, MLP steps of 32 channels: with the carry the whole model misses its budget by at most half a
    step of the last block; rounding each block alone misses it by more on these three."""
    model, tokenizer = load_model(name)
    parts = get_adapter(model).parts(get_adapter(model).blocks(model)[0])
    step = 32 * sum(lin.in_features + (lin.bias is not None) for lin in parts.mlp_in)
    step += 32 * parts.mlp_out.out_features  # the down projection's 32 columns
    report = compress_model(model, tokenizer, method="modegpt", ratio=ratio, allocation="uniform", **SMALL)
    assert abs(report.block_params_before * (1 - ratio) - report.block_params_after) <= step / 2
