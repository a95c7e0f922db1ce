import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPT2Config

from conftest import TINY
from leanfm import load_model
from leanfm.errors import LeanfmError
from leanfm.models import AttentionLayout, get_adapter
from leanfm.models.tiny import build_tiny

EXPECTED = {  # heads, kv heads, head_dim, rotary dim
    "tiny-llama": (4, 2, 16, 16),
    "tiny-opt": (4, 4, 16, 0),
    "tiny-phi": (4, 4, 16, 8),
    "tiny-neox": (4, 4, 16, 8),
}


@pytest.mark.parametrize("name", TINY)
def test_layout_and_shapes(name):
    model = build_tiny(name)
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    assert (layout.num_heads, layout.num_kv_heads, layout.head_dim, layout.rotary_dim) == EXPECTED[name]
    blocks = adapter.blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    hidden = model.config.hidden_size
    for block in blocks:
        parts = adapter.parts(block)
        wq, wk, wv = adapter.split_qkv(block, layout)
        assert wq.shape == (layout.num_heads * layout.head_dim, hidden)
        assert wk.shape == wv.shape == (layout.num_kv_heads * layout.head_dim, hidden)
        assert parts.o.in_features == layout.num_heads * layout.head_dim and parts.o.out_features == hidden
        assert parts.mlp_out.in_features == parts.mlp_in[0].out_features and parts.mlp_out.out_features == hidden
        assert parts.attn_norm is not None
    assert adapter.embeddings(model).weight.shape == (model.config.vocab_size, hidden)


def test_llama_mlp_parts_reproduce_the_block_mlp():
    model = build_tiny("tiny-llama")
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    parts = adapter.parts(block)
    x = torch.randn(3, 5, 64)
    gate, up = parts.mlp_in
    manual = parts.mlp_out(torch.nn.functional.silu(gate(x)) * up(x))
    assert parts.mlp_act == "SiLUActivation" or "silu" in parts.mlp_act.lower()
    torch.testing.assert_close(manual, block.mlp(x))


def test_neox_fused_qkv_split_matches_hf_layout():
    model = build_tiny("tiny-neox")
    adapter = get_adapter(model)
    layout = adapter.layout(model)
    block = adapter.blocks(model)[0]
    x = torch.randn(2, 7, 64)
    fused = adapter.parts(block).qkv(x).view(2, 7, layout.num_heads, 3 * layout.head_dim)  # HF's own view
    q_ref, k_ref, v_ref = fused.chunk(3, dim=-1)
    wq, wk, wv = adapter.split_qkv(block, layout)
    bias = adapter.parts(block).qkv.bias.view(layout.num_heads, 3, layout.head_dim)
    for i, (weight, ref) in enumerate(((wq, q_ref), (wk, k_ref), (wv, v_ref))):
        ours = (x @ weight.T + bias[:, i].reshape(-1)).view(2, 7, layout.num_heads, layout.head_dim)
        torch.testing.assert_close(ours, ref)


def test_parallel_and_post_norm_flags():
    assert get_adapter(build_tiny("tiny-phi")).is_parallel(build_tiny("tiny-phi"))
    assert not get_adapter(build_tiny("tiny-llama")).is_parallel(build_tiny("tiny-llama"))
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64))
    adapter = get_adapter(bert)
    assert adapter.post_norm and len(adapter.blocks(bert)) == 2
    assert adapter.layout(bert) == AttentionLayout(2, 2, 16, 0)


@pytest.mark.slow  # the real MiniLM
def test_minilm_adapter():
    minilm, _ = load_model("minilm-l6")
    adapter = get_adapter(minilm)
    assert adapter.post_norm and len(adapter.blocks(minilm)) == 6
    layout = adapter.layout(minilm)
    assert (layout.num_heads, layout.head_dim, layout.rotary_dim) == (12, 32, 0)


def test_unsupported_architecture():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(LeanfmError, match="unsupported architecture 'gpt2'; supported: llama, opt"):
        get_adapter(gpt2)
