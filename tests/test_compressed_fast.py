"""The fast paths of the compressed classes keep the maths: ChannelLinear by hand, the fused DISP llama block
against the masked dense block, per-layer rotary angles against the host's, dense layers left as they are."""

import copy

import pytest
import torch
from transformers import LlamaConfig

from leanfm import load_model
from leanfm.compress.disp import MASK_NAMES, block_shape, prune_to_masks
from leanfm.models import ADAPTERS, get_adapter
from leanfm.models.compressed import (
    BLOCK_PATHS,
    ChannelLinear,
    CompressedAttention,
    DispLlamaDecoderLayer,
    LayerSpec,
    dense_spec,
    restructure_block,
)
from leanfm.models.tiny import build_tiny

IDS = torch.randint(0, 5000, (2, 20), generator=torch.Generator().manual_seed(11))


def test_channel_linear_by_hand():
    lin = ChannelLinear(3, 4, in_index=[0, 2], out_index=[1, 3], bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        lin.bias.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[1.0, 10.0, 2.0]])  # channel 1 is not read
    # rows: 1*1 + 2*2 + 0.5 = 5.5 -> channel 1;  3*1 - 1*2 - 0.5 = 0.5 -> channel 3
    assert torch.equal(lin(x), torch.tensor([[0.0, 5.5, 0.0, 0.5]]))
    assert torch.equal(lin(x[:, [0, 2]]), lin(x))  # an input of |S_in| channels is taken as gathered
    lin.write_compact = True
    assert torch.equal(lin(x), torch.tensor([[5.5, 0.5]]))
    residual = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(lin.add_into(residual, lin(x), inplace=False), torch.tensor([[1.0, 6.5, 1.0, 1.5]]))
    assert torch.equal(residual, torch.ones(1, 4))  # out of place left it alone
    lin.add_into(residual, lin(x), inplace=True)
    assert torch.equal(residual, torch.tensor([[1.0, 6.5, 1.0, 1.5]]))
    full = ChannelLinear(3, 4, in_index=[0, 1, 2], out_index=[0, 1, 2, 3], bias=False)
    assert not full.gathers and not full.scatters  # identity indices: nothing to gather or scatter


def _masked_dense(model, masks):
    """``model`` with every weight row/column outside the kept channels zeroed (the masked dense block)."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for i, block in enumerate(adapter.blocks(model)):
            parts = adapter.parts(block)
            drop = {name: ~masks[name][i] for name in MASK_NAMES}
            for lin in (parts.q, parts.k, parts.v):
                lin.weight[:, drop["attn_in"]] = 0
            parts.o.weight[drop["attn_out"]] = 0
            for lin in parts.mlp_in:
                lin.weight[:, drop["mlp_in"]] = 0
                lin.weight[drop["mlp_mid"]] = 0
            parts.mlp_out.weight[drop["mlp_out"]] = 0
            parts.mlp_out.weight[:, drop["mlp_mid"]] = 0
    return model


@pytest.mark.parametrize("keep", [0.5, 0.8])
def test_fused_disp_block_equals_masked_dense_block(keep):
    model, _ = load_model("tiny-llama")
    adapter = get_adapter(model)
    widths = block_shape(adapter, adapter.blocks(model)[0]).widths
    g = torch.Generator().manual_seed(2)
    masks = {n: torch.rand(2, widths[n], generator=g) < keep for n in MASK_NAMES}
    dense = _masked_dense(copy.deepcopy(model), masks)
    prune_to_masks(model, masks)
    block = adapter.blocks(model)[0]
    assert isinstance(block, DispLlamaDecoderLayer) and block.self_attn.o_proj.write_compact
    with torch.no_grad():
        reference = dense(IDS, output_hidden_states=True)
        fused = model(IDS, output_hidden_states=True)
    torch.testing.assert_close(fused.logits, reference.logits, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(fused.hidden_states, reference.hidden_states, strict=True):  # in-place adds spared them
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_(True)  # autograd: out-of-place adds
    out = model(inputs_embeds=embeds).logits
    out.sum().backward()
    torch.testing.assert_close(out.detach(), reference.logits, atol=1e-5, rtol=1e-5)
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()


def _swap_in_compressed_attention(model):
    """Every llama block's attention replaced by a CompressedAttention of the dense widths, same weights."""
    adapter = get_adapter(model)
    for i, block in enumerate(adapter.blocks(model)):
        old = block.self_attn
        spec = dense_spec(model, adapter, i)
        bias = {n: getattr(old, f"{n}_proj").bias is not None for n in "qkvo"}
        new = CompressedAttention(spec, model.config.hidden_size, bias, i, model.config)
        new.load_state_dict(old.state_dict())
        block.self_attn = new


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
                                  {"rope_type": "llama3", "factor": 8.0, "rope_theta": 50000.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}])
def test_per_layer_rotary_matches_the_host(rope):
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=5000, max_position_embeddings=256,
                         **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        dense = model(IDS).logits
        _swap_in_compressed_attention(model)
        torch.testing.assert_close(model(IDS).logits, dense, atol=1e-5, rtol=1e-5)
    attention = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    positions = torch.arange(3, 8)[None]
    cos, sin = model.model.rotary_emb(x, positions)
    attention.spec.rope_index = [[0, 2, 4, 6, 1, 3, 5, 7], [7, 6, 5, 4, 3, 2, 1, 0]]  # any kept order per group
    attention._rope_index.clear()
    kept_cos, kept_sin = attention._cos_sin(cos, sin)  # [B, KV, 1, T, 2P]
    assert torch.equal(kept_cos[0, 1, 0, :, 0], cos[0, :, 7]) and torch.equal(kept_sin[0, 0, 0, :, 1], sin[0, :, 2])
    assert torch.equal(kept_cos[0, 1, 0, :, 8], cos[0, :, 7])  # the partner dim rotates with the same angle


def test_dense_spec_keeps_the_original_modules():
    llama = build_tiny("tiny-llama")
    adapter = get_adapter(llama)
    block = adapter.blocks(llama)[0]
    attention, gate, down = block.self_attn, block.mlp.gate_proj, block.mlp.down_proj
    with torch.no_grad():
        before = llama(IDS).logits
    restructure_block(llama, 0, dense_spec(llama, adapter, 0))
    assert block.self_attn is attention and block.mlp.gate_proj is gate and block.mlp.down_proj is down
    with torch.no_grad():
        assert torch.equal(llama(IDS).logits, before)
    smaller = dense_spec(llama, adapter, 1)
    smaller.intermediate -= 8
    restructure_block(llama, 1, smaller)
    assert isinstance(adapter.blocks(llama)[1].self_attn, type(attention))  # attention widths kept: untouched
    assert adapter.blocks(llama)[1].mlp.down_proj.in_features == smaller.intermediate
    neox = build_tiny("tiny-neox")
    block = get_adapter(neox).blocks(neox)[0]
    mlp_in = block.mlp.dense_h_to_4h
    restructure_block(neox, 0, dense_spec(neox, get_adapter(neox), 0))
    assert block.mlp.dense_h_to_4h is mlp_in  # the MLP is kept; a fused qkv is always split
    assert isinstance(block.attention, CompressedAttention)


def test_block_paths_agree_with_the_adapters():
    for base, paths in BLOCK_PATHS.items():
        adapter = ADAPTERS[base]
        assert paths.prefixes == adapter.prefixes and paths.blocks == adapter.blocks_path
        assert (paths.attn, paths.q, paths.k, paths.v, paths.qkv, paths.o, paths.mlp_in, paths.mlp_out) == (
            adapter.attn, adapter.q, adapter.k, adapter.v, adapter.qkv, adapter.o, adapter.mlp_in, adapter.mlp_out)


def test_layer_spec_json_of_old_checkpoints_still_loads():
    old = {"channels": {}, "head_dim": 64, "intermediate": 1411, "low_rank": {}, "num_heads": 9, "num_kv_heads": 3,
           "qk_dim": 40, "rope_index": [[0, 3], [1, 2], [5, 9]], "v_dim": 50}  # written before out_bias existed
    spec = LayerSpec(**old)
    assert spec.rope_pairs == 2 and spec.out_bias is False
