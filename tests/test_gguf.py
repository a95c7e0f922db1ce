"""GGUF export and the llama.cpp evaluation path (issue 22).

The llama.cpp tests compare logits of the exported file with the transformers model's on the same ids: a tiny
dense llama (architecture ``llama``) and a tiny ``leanfm_llama`` whose layers differ in MLP width and head
counts (``deci``; written as ``llama`` it must fail to load, which is what settles the choice). Tolerances:
f32 files with a float32 KV cache: max |difference| <= 1e-3 x max |logit| (measured < 5e-5). bf16 files against the
model whose weights are rounded to bf16: mean |difference| <= 0.1 x mean |logit| (measured 0.03-0.04; llama.cpp
also rounds activations to bf16 in its matrix products, and the random model's sharp attention amplifies it: the
largest single difference was 0.24 of the largest logit). Without the q/k interleave both measures are 1.06-1.4
(f32 and bf16, dense and per-layer), so each logits test kills it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leanfm.cli import main
from leanfm.compress import gguf as gguf_export
from leanfm.compress.gguf import export_gguf, interleave_rotary, layer_plans
from leanfm.compress.modegpt_heads import explained, prune_heads
from leanfm.errors import LeanfmError
from leanfm.models.adapters import AttentionLayout
from leanfm.models.compressed import LayerSpec, finalize, restructure_block

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup)")
IDS = torch.randint(0, 49152, (24,), generator=torch.Generator().manual_seed(3))


def _config(layers: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=256, vocab_size=49152,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough for O(1) logits and sharp attention (q/k x4), norms away from 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                scale = 0.4 if any(k in name for k in ("q_proj", "k_proj")) else 0.1
                param.copy_(scale * noise)
    return model.eval()


def dense_folder(root):
    """A tiny dense llama (3 equal layers) saved as a transformers folder."""
    model = _randomise(LlamaForCausalLM(_config(3)), 0)
    model.save_pretrained(root / "dense")
    return root / "dense", model


SPECS = [(4, 2, 128), (2, 1, 96), (2, 2, 64)]  # (heads, kv heads, MLP width) per layer: all differ


def varied_folder(root, specs=SPECS, **extra):
    """A tiny ``leanfm_llama`` whose layers differ in heads and MLP width (``extra`` overrides spec fields)."""
    model = LlamaForCausalLM(_config(len(specs)))
    layer_specs = []
    for index, (heads, kv, width) in enumerate(specs):
        spec = LayerSpec(width, 16, 16, [list(range(8)) for _ in range(kv)], heads, kv, 16, **extra)
        restructure_block(model, index, spec)
        layer_specs.append(spec)
    finalize(model, layer_specs, {"method": "test"})
    _randomise(model, 1)
    model.save_pretrained(root / "varied")
    return root / "varied", model


def reference_logits(model: torch.nn.Module, bf16: bool = False) -> torch.Tensor:
    """The transformers logits on IDS (float32), optionally of a copy whose weights are rounded to bf16."""
    if bf16:
        model = copy.deepcopy(model)
        for param in model.parameters():
            param.data = param.data.to(torch.bfloat16).float()
    with torch.no_grad():
        return model(IDS[None]).logits[0]


def llama_cpp_logits(path) -> torch.Tensor:
    from leanfm.eval.llamacpp import open_gguf, window_logits

    llm = open_gguf(path, n_ctx=64, threads=1, logits_all=True, type_k=0, type_v=0)  # float32 KV cache
    return torch.from_numpy(window_logits(llm, IDS.tolist()))


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """max |difference| / max |logit|."""
    return float((ours - expected).abs().max() / expected.abs().max())


def mean_relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """mean |difference| / mean |logit| (bf16 activations make a few logits of the random model move more)."""
    return float((ours - expected).abs().mean() / expected.abs().mean())


# ---------------------------------------------------------------- no llama.cpp needed


def test_interleave_rotary_by_hand():
    rows = torch.arange(16.0)[:, None]  # two heads of 8 rows: (i, i + 4) pairs -> (2i, 2i + 1)
    expected = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert interleave_rotary(rows, 2)[:, 0].tolist() == expected
    assert interleave_rotary(torch.arange(8.0), 1).tolist() == expected[:8]  # a bias


def test_interleaved_rotary_gives_the_same_scores():
    """RoPE rotate-half on (q, k) == RoPE on consecutive pairs (llama.cpp's NORM) on the interleaved rows."""
    d, positions = 8, torch.tensor([3.0, 11.0])
    angles = positions[:, None] / 10000 ** (torch.arange(0, d, 2) / d)  # [2, d/2]
    q, k = torch.randn(2, d, generator=torch.Generator().manual_seed(0)).unbind()

    def rotate_half(x, a):
        first, second = x[: d // 2], x[d // 2 :]
        return torch.cat((first * a.cos() - second * a.sin(), second * a.cos() + first * a.sin()))

    def rotate_pairs(x, a):
        even, odd = x[0::2], x[1::2]
        return torch.stack((even * a.cos() - odd * a.sin(), odd * a.cos() + even * a.sin()), -1).reshape(-1)

    hf = rotate_half(q, angles[0]) @ rotate_half(k, angles[1])
    cpp = rotate_pairs(interleave_rotary(q, 1), angles[0]) @ rotate_pairs(interleave_rotary(k, 1), angles[1])
    assert torch.allclose(hf, cpp, atol=1e-5)
    assert not torch.allclose(hf, rotate_pairs(q, angles[0]) @ rotate_pairs(k, angles[1]), atol=1e-3)


def test_plans_and_arch(tmp_path):
    _, model = varied_folder(tmp_path)
    plans = layer_plans(model)
    assert [(p.n_head, p.n_head_kv, p.n_ff) for p in plans] == SPECS
    assert gguf_export.choose_arch(plans) == "deci"
    assert gguf_export.choose_arch(plans[:1] * 3) == "llama"


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"qk_dim": 8, "v_dim": 8}, "per-head q/k/v dims 8/8 of 16"),
    ({"channels": {"attn_in": list(range(32)), "attn_out": list(range(64)), "mlp_in": list(range(64)),
                   "mlp_out": list(range(64))}}, "DISP's per-block residual channels"),
    ({"rope_index": [[0, 1, 2, 3, 4, 5, 6]]}, "subset of the rotary frequencies"),
])
def test_unexpressible_blocks_are_one_line_errors(tmp_path, extra, fragment):
    spec = {"intermediate": 64, "qk_dim": 16, "v_dim": 16, "rope_index": [list(range(8))], "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 16, **extra}
    if "qk_dim" in extra:
        spec["rope_index"] = [list(range(4))]
    model = LlamaForCausalLM(_config(1))
    model.config.leanfm_layers = [spec]
    with pytest.raises(LeanfmError) as err:
        layer_plans(model)
    assert fragment in str(err.value) and "modegpt-heads" in str(err.value) and "\n" not in str(err.value)


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    cases = [([str(tmp_path / "empty"), "--gguf", str(tmp_path / "a.gguf")], "is not a model folder"),
             ([str(neox), "--gguf", str(tmp_path / "a.gguf")], "model_type 'gpt_neox'"),
             ([str(tmp_path / "empty"), "--gguf", str(tmp_path / "no" / "a.gguf")], "does not exist")]
    for argv, fragment in cases:
        assert main(["--quiet", "export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and fragment in err, err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp"))


def test_cli_writes_bf16_gguf(tmp_path, capsys):
    folder, _ = varied_folder(tmp_path)
    out = tmp_path / "m.gguf"
    assert main(["--quiet", "export", str(folder), "--gguf", str(out), "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["arch"] == "deci" and result["n_ff"] == [128, 96, 64] and result["n_head"] == [4, 2, 2]
    from gguf import GGUFReader

    reader = GGUFReader(out)
    assert reader.fields["deci.attention.head_count_kv"].contents() == [2, 1, 2]
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.2.ffn_down.weight"] == [64, 64]
    assert not list(tmp_path.glob(".*tmp"))


# ---------------------------------------------------------------- modegpt-heads maths


def test_redundant_head_is_dropped_and_folded_into_o():
    """Head 1 outputs exactly what head 0 does: removing it loses nothing and o gets W_O0 + W_O1."""
    layout = AttentionLayout(num_heads=2, num_kv_heads=1, head_dim=2, rotary_dim=2)
    z0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.cat((z0, z0), 1)  # [tokens, 4]
    gram = z.T @ z
    wo = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], dtype=torch.float64)
    total = float(torch.trace(wo @ gram @ wo.T))
    assert math.isclose(explained(wo @ gram, gram, torch.arange(2), 0.0), total, rel_tol=1e-9)
    gram_ridge = gram + 1e-9 * torch.eye(4, dtype=torch.float64)  # C itself is singular (two equal heads)
    groups, o_new = prune_heads(wo, gram_ridge, layout, keep=0.6, ridge=0.0)  # 1 of 2 heads: (1, 1) is nearest
    assert len(groups) == 1 and len(groups[0]) == 1
    expected = torch.tensor([[4.0, 6.0], [-0.5, 2.0]], dtype=torch.float64)
    assert torch.allclose(o_new, expected, atol=1e-5)


def test_modegpt_heads_keeps_whole_heads(tokenizer, tmp_path):
    from leanfm import load_model
    from leanfm.compress import compress_model, save_compressed

    model, _ = load_model("tiny-llama")
    report = compress_model(model, tokenizer, method="modegpt-heads", ratio=0.4, calib_samples=4,
                            calib_seqlen=32, batch_size=2, width_multiple=8)
    assert 0.3 < report.achieved_ratio < 0.5
    plans = layer_plans(model)  # every block expressible
    assert all(p.n_head % p.n_head_kv == 0 for p in plans) and len(set(plans)) > 1
    folder = save_compressed(model, tokenizer, tmp_path / "mh", report)
    assert export_gguf(folder, tmp_path / "mh.gguf")["arch"] == "deci"


# ---------------------------------------------------------------- through llama.cpp


@needs_llama_cpp
def test_dense_logits_match(tmp_path):
    folder, model = dense_folder(tmp_path)
    assert export_gguf(folder, tmp_path / "d32.gguf", quant="f32")["arch"] == "llama"
    expected = reference_logits(model)
    assert relative_error(llama_cpp_logits(tmp_path / "d32.gguf"), expected) < 1e-3
    export_gguf(folder, tmp_path / "d16.gguf")
    assert mean_relative_error(llama_cpp_logits(tmp_path / "d16.gguf"), reference_logits(model, bf16=True)) < 0.1


@needs_llama_cpp
def test_per_layer_widths_need_deci(tmp_path):
    folder, model = varied_folder(tmp_path)
    result = export_gguf(folder, tmp_path / "v.gguf", quant="f32")
    assert result["arch"] == "deci"
    assert relative_error(llama_cpp_logits(tmp_path / "v.gguf"), reference_logits(model)) < 1e-3
    export_gguf(folder, tmp_path / "as-llama.gguf", quant="f32", arch="llama")
    with pytest.raises(LeanfmError, match="could not load"):
        llama_cpp_logits(tmp_path / "as-llama.gguf")


@needs_llama_cpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_export_loads_and_generates(tmp_path, quant):
    from leanfm.eval.llamacpp import greedy, open_gguf

    folder, model = varied_folder(tmp_path, specs=[(4, 2, 128), (2, 1, 96)])
    plain = export_gguf(folder, tmp_path / "b.gguf")
    result = export_gguf(folder, tmp_path / f"{quant}.gguf", quant=quant)
    assert result["tensor_types"].get(quant, 0) >= 8 and result["bytes"] < plain["bytes"]
    tokens = greedy(open_gguf(tmp_path / f"{quant}.gguf", n_ctx=64, threads=1), IDS[:8].tolist(), 6)
    assert len(tokens) == 6 and all(0 <= t < 49152 for t in tokens)
    close = mean_relative_error(llama_cpp_logits(tmp_path / f"{quant}.gguf"), reference_logits(model))
    assert close < (0.1 if quant == "q8_0" else 0.8), close  # 4 bits on random weights: measured 0.56
    from leanfm.eval.llamacpp import alternating_speeds

    speeds = alternating_speeds({"a": tmp_path / f"{quant}.gguf", "b": tmp_path / "b.gguf"}, IDS[:4], IDS[:16],
                                new_tokens=4, rounds=2, threads=1)
    assert set(speeds) == {"a", "b"} and all(len(v) == 2 and min(min(r) for r in v) > 0 for v in speeds.values())


@needs_llama_cpp
def test_gguf_perplexity_equals_the_harness(tmp_path, tokenizer):
    from leanfm.eval.harness import evaluate
    from leanfm.eval.llamacpp import evaluate_gguf

    folder, model = dense_folder(tmp_path)
    export_gguf(folder, tmp_path / "d.gguf", quant="f32")
    settings = {"seqlen": 32, "windows": 2, "cloze": 0, "speed": False}
    ours = evaluate_gguf(tmp_path / "d.gguf", tokenizer, threads=1, **settings)
    torch_result = evaluate(model, tokenizer, **settings)
    assert ours.tokens == torch_result.tokens == 62
    assert math.isclose(ours.perplexity, torch_result.perplexity, rel_tol=1e-3)
    assert ours.params == sum(p.numel() for p in model.parameters())


@needs_llama_cpp
@pytest.mark.slow
def test_smollm2_q8_perplexity_near_pytorch(tmp_path, smollm2, tokenizer):
    from leanfm.eval.harness import evaluate
    from leanfm.eval.llamacpp import evaluate_gguf
    from leanfm.models.smollm2 import ensure_checkpoint

    export_gguf(ensure_checkpoint(), tmp_path / "s.gguf", quant="q8_0")
    settings = {"seqlen": 128, "windows": 2, "cloze": 0, "speed": False}
    ours = evaluate_gguf(tmp_path / "s.gguf", tokenizer, **settings).perplexity
    reference = evaluate(smollm2[0], tokenizer, **settings).perplexity
    assert abs(ours / reference - 1) < 0.05, (ours, reference)
