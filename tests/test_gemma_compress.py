"""Gemma-3 (gemma3_text) as a compression target, on the seeded tiny-gemma3 (3 layers: sliding, global, sliding;
window 8 < the test sequences; rotary bases 1e4 / 1e6; query_pre_attn_scalar 24 != head_dim 32; random norms).

Ratios and save/load round trips are in test_gemma_roundtrip.py; the real Gemma-3-270M runs take minutes each and
are recorded in the report of issue 14, not here."""

import dataclasses
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from leanfm import load_model
from leanfm.cli import main
from leanfm.compress import compress_model, save_compressed
from leanfm.compress.disp import MASK_NAMES, ChannelMasks, block_shape, prune_to_masks
from leanfm.compress.engine import capture_block_inputs, run_block
from leanfm.compress.surgery import load_block_weights, mlp_width_for_budget, vo_width_with_full_qk
from leanfm.errors import LeanfmError
from leanfm.models import get_adapter
from leanfm.models.adapters import PER_BLOCK, block_kwargs
from leanfm.models.compressed import dense_spec, restructure_block
from leanfm.models.modeling_leanfm import CompressedGemmaAttention
from test_export import CHILD

NAME = "tiny-gemma3"
SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2, "width_multiple": 1}  # tiny: one 32-step is ~8%
DISP = {"steps": 2, "batch_size": 2, "seqlen": 32, "checkpoint_every": 2, "autocast": False,
        "train_corpus": "austen:calib", "width_multiple": 1}
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _ids(n=2, t=24):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(3))


def test_adapter_names_gemma_parts():
    model, _ = load_model(NAME)
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.rotary_dim) == (4, 2, 32, 32)
    assert adapter.normed_qk and adapter.norm_kind == "gemma_rmsnorm" and not adapter.post_norm
    block = adapter.blocks(model)[1]
    parts = adapter.parts(block)
    assert parts.attn_norm is block.input_layernorm and parts.mlp_norm is block.pre_feedforward_layernorm
    assert (parts.q, parts.k, parts.v, parts.o) == (block.self_attn.q_proj, block.self_attn.k_proj,
                                                    block.self_attn.v_proj, block.self_attn.o_proj)
    assert parts.mlp_in == (block.mlp.gate_proj, block.mlp.up_proj) and parts.mlp_out is block.mlp.down_proj
    assert adapter.qk_norms is not None and adapter.out_norms is not None
    assert [block.get_submodule(p) for p in adapter.qk_norms] == [block.self_attn.q_norm, block.self_attn.k_norm]
    assert [block.get_submodule(p) for p in adapter.out_norms] == [block.post_attention_layernorm,
                                                                   block.post_feedforward_layernorm]
    assert all(isinstance(block.get_submodule(p), Gemma3RMSNorm) for p in (*adapter.qk_norms, *adapter.out_norms))


def test_blocks_replay_with_their_own_mask_and_rotary():
    """Replaying blocks on captured inputs reproduces the model's hidden states only with each layer type's own
    kwargs: with block 0's (sliding mask, base-1e4 rotary) the global layer's output differs."""
    model, _ = load_model(NAME)
    ids = _ids(3, 24)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True).hidden_states  # embeddings, block 0, 1, 2 (normed)
    inputs, kwargs = capture_block_inputs(model, ids, batch_size=2)  # batches of 2 and 1 share the kwargs
    blocks = get_adapter(model).blocks(model)
    own = kwargs[PER_BLOCK]
    cos = [own[b]["position_embeddings"][0] for b in blocks]
    assert cos[0].shape[-1] == 32 and torch.equal(cos[0], cos[2]) and not torch.allclose(cos[0], cos[1])
    assert own[blocks[1]]["attention_mask"] is None and own[blocks[0]]["attention_mask"].shape[0] == 1
    states = inputs
    for index, block in enumerate(blocks[:2]):
        states = run_block(block, states, kwargs)
        torch.testing.assert_close(torch.cat(states), reference[index + 1], atol=1e-5, rtol=1e-5)
    naive = block_kwargs(blocks[0], kwargs)  # block 0's kwargs (sliding mask, base-1e4 rotary) for the global layer
    wrong = blocks[1](run_block(blocks[0], inputs, kwargs)[0], **naive)
    assert not torch.allclose(wrong, reference[2][:2], atol=1e-3)


def _force_compressed_attention(model):
    """Every block rebuilt with a CompressedGemmaAttention of full widths (an o bias forces the rebuild)."""
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    for index, block in enumerate(adapter.blocks(model)):
        parts = adapter.parts(block)
        weights = [(lin.weight.data.clone(), None) for lin in (parts.q, parts.k, parts.v)]
        mlp_in = [(lin.weight.data.clone(), None) for lin in parts.mlp_in]
        down, o = (parts.mlp_out.weight.data.clone(), torch.zeros(64)), (parts.o.weight.data.clone(), torch.zeros(64))
        spec = dataclasses.replace(dense_spec(model, adapter, index), out_bias=True)
        restructure_block(model, index, spec)
        load_block_weights(model, index, mlp_in, down, *weights, o)
    assert layout.rotary_dim == layout.head_dim


def test_compressed_gemma_attention_equals_the_stock_one():
    """Same logits as Gemma3Attention with q/k norms, scale 24^-1/2, per-type rotary and the sliding window."""
    dense, _ = load_model(NAME)
    model, _ = load_model(NAME)
    _force_compressed_attention(model)
    attentions = [block.self_attn for block in get_adapter(model).blocks(model)]
    assert all(isinstance(a, CompressedGemmaAttention) for a in attentions)
    assert [a.is_sliding for a in attentions] == [t == "sliding_attention" for t in LAYER_TYPES]
    assert attentions[0].scaling == pytest.approx(24**-0.5) and attentions[0].q_norm.weight.abs().sum() > 0
    ids = _ids(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    out = model.generate(ids[:1, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)  # 15 > window 8
    reference = dense.generate(ids[:1, :5], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(out, reference)


def test_gemma_q_k_dims_are_never_cut():
    model, _ = load_model(NAME)
    spec = dataclasses.replace(dense_spec(model, get_adapter(model), 0), qk_dim=16, rope_index=[[0, 1]] * 2)
    with pytest.raises(ValueError, match=r"^gemma3 q/k head dims cannot be reduced .*qk_dim 16, accepted: 32$"):
        restructure_block(model, 0, spec)


def test_vo_width_with_full_qk_by_hand():
    """Gemma-3-270M's block at keep 0.7: q/k = v/o = 5 x 640 x 256 = 819,200, MLP 3 x 640 x 2048 = 3,932,160;
    k' = (0.7 x 5,570,560 - 819,200) / 4,751,360 = 0.64828 -> v/o width round(165.96) = 166; the MLP then gets
    round((3,899,392 - 3,200 x (256 + 166)) / 1,920) = round(1327.6) = 1328 channels."""
    parts = SimpleNamespace(o=SimpleNamespace(out_features=640), mlp_out=SimpleNamespace(in_features=2048),
                            mlp_in=(None, None))
    layout = SimpleNamespace(num_heads=4, num_kv_heads=1, head_dim=256)
    assert vo_width_with_full_qk(parts, layout, 0.7) == 166
    assert mlp_width_for_budget(parts, layout, 256, 0.7, v_width=166) == 1328
    assert mlp_width_for_budget(parts, layout, 166, 0.7) == mlp_width_for_budget(parts, layout, 166, 0.7, v_width=166)
    assert vo_width_with_full_qk(parts, layout, 1.0) == 256 and vo_width_with_full_qk(parts, layout, 0.01) == 1


@pytest.mark.parametrize("method", ["modegpt", "wanda-sp", "svd-llm", "flap"])
def test_keep_everything_reproduces_dense_logits(method):
    model, tokenizer = load_model(NAME)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    report = compress_model(model, tokenizer, method=method, ratio=1e-4, **SMALL)
    assert report.achieved_ratio == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_disp_pruned_equals_masked_and_all_ones_is_dense():
    model, _ = load_model(NAME)
    adapter = get_adapter(model)
    shapes = [block_shape(adapter, block) for block in adapter.blocks(model)]
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(len(shapes), shapes[0].widths[n], generator=g) < 0.6 for n in MASK_NAMES}
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        hooks = ChannelMasks(model)
        hooks.masks = {n: m.float() for n, m in masks.items()}
        masked = model(ids).logits  # the output masks act before the post-attention / post-feedforward norms
        hooks.remove()
        assert not torch.allclose(masked, dense, atol=1e-3)
        prune_to_masks(model, masks)
        torch.testing.assert_close(model(ids).logits, masked, atol=1e-5, rtol=1e-5)
        ones, _ = load_model(NAME)
        prune_to_masks(ones, {n: torch.ones_like(m) for n, m in masks.items()})
        torch.testing.assert_close(ones(ids).logits, dense, atol=1e-5, rtol=1e-5)


def test_standalone_export_loads_without_leanfm(tmp_path, tokenizer):
    folders = []
    for method, settings in (("modegpt", SMALL), ("flap", SMALL)):
        model, _ = load_model(NAME)
        report = compress_model(model, tokenizer, method=method, ratio=0.3, **settings)
        folder = save_compressed(model, tokenizer, tmp_path / method, report)
        assert main(["--quiet", "export", str(folder), "--standalone"]) == 0
        with torch.no_grad():
            torch.save({"ids": _ids(2, 12), "logits": model(_ids(2, 12)).logits}, folder / "expected.pt")
        folders.append(str(folder))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    child = subprocess.run([sys.executable, "-c", CHILD, *folders], capture_output=True, text=True, env=env,
                           cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout.rpartition("RESULT:")[2])
    for folder in folders:
        assert result[folder]["class"].endswith("LeanfmGemma3ForCausalLM")
        assert result[folder]["max_diff"] < 1e-6


def test_slicegpt_refuses_gemma_in_one_line(tokenizer):
    model, _ = load_model(NAME)
    with pytest.raises(LeanfmError, match=r"^slicegpt cannot slice gemma3_text: its post-attention/post-feedforward "
                                           r"RMSNorms rescale each residual channel") as err:
        compress_model(model, tokenizer, method="slicegpt", ratio=0.3, **SMALL)
    assert "\n" not in str(err.value)
