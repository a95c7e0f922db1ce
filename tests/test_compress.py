import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BertConfig, BertModel

from conftest import TINY
from leanfm import load_model
from leanfm.cli import main
from leanfm.compress import (
    DispConfig,
    ModegptConfig,
    SliceGptConfig,
    SvdLlmConfig,
    WandaSpConfig,
    check_architecture,
    compress_model,
    save_compressed,
)
from leanfm.compress.base import allocate_sparsity
from leanfm.compress.flap import FlapConfig
from leanfm.compress.modegpt_heads import ModegptHeadsConfig
from leanfm.compress.surgery import gather_heads, load_block_weights, qkv_params
from leanfm.config import get_method, list_methods
from leanfm.errors import LeanfmError
from leanfm.eval.harness import count_parameters
from leanfm.models import get_adapter
from leanfm.models.compressed import LayerSpec, dense_spec, restructure_block

SMALL = {"calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}


def _ids(n=2, t=24):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["modegpt", "wanda-sp", "svd-llm"])
def test_keep_everything_reproduces_dense_logits(name, method):
    model, tokenizer = load_model(name)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    report = compress_model(model, tokenizer, method=method, ratio=1e-4, allocation="uniform", **SMALL)
    assert report.achieved_ratio == 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense, atol=2e-5, rtol=1e-4)


ALLOCATIONS = [("modegpt", "global"), ("modegpt", "uniform"), ("wanda-sp", "uniform"), ("svd-llm", "uniform")]


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize(("method", "allocation"), ALLOCATIONS)
def test_achieved_ratio_matches_request(name, method, allocation):
    model, tokenizer = load_model(name)
    # unaligned widths (tiny blocks: one 32-channel step is 8% of a block); aligned ones: tests/test_widths.py
    report = compress_model(model, tokenizer, method=method, ratio=0.3, allocation=allocation, width_multiple=1,
                            **SMALL)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.01)
    assert report.params_after < report.params_before
    with torch.no_grad():
        assert torch.isfinite(model(_ids()).logits).all()


def test_global_allocation_rule():
    importance = torch.tensor([0.01, 0.02, 0.5, 0.03])
    phi = allocate_sparsity(importance, ratio=0.4, epsilon=0.1, cap=0.8)
    assert phi.mean().item() == pytest.approx(0.4, abs=1e-5)
    assert phi.max() <= 0.8 + 1e-6 and phi[2] == phi.min()  # the most important layer loses the least
    assert allocate_sparsity(importance, 0.4, 1e6, 0.8).allclose(torch.full((4,), 0.4))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["modegpt", "svd-llm"])
def test_save_reload_identical_and_generate(name, method, tmp_path):
    import leanfm  # noqa: F401  (registers the compressed classes with AutoModelForCausalLM)

    model, tokenizer = load_model(name)
    report = compress_model(model, tokenizer, method=method, ratio=0.4, **SMALL)
    save_compressed(model, tokenizer, tmp_path / "c", report)
    ours, _ = load_model(str(tmp_path / "c"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(ours(ids).logits, reference) and torch.equal(hf(ids).logits, reference)
    out = hf.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # greedy decoding with the KV cache agrees with step-by-step full forwards
        step = ids[:1, :5]
        for _ in range(6):
            step = torch.cat([step, model(step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
    saved = json.loads((tmp_path / "c" / "compression.json").read_text())
    assert saved["method"] == method and saved["params_after"] == count_parameters(hf) < saved["params_before"]


def _restrict_to_pairs(name: str, rope_index: list[list[int]]):
    """tiny model whose q/k use only rotary pairs {1, 3}, and its compressed twin keeping ``rope_index``."""
    dense, _ = load_model(name)
    adapter = get_adapter(dense)
    layout = adapter.layout(dense)
    half = layout.rotary_dim // 2
    keep_dims = torch.tensor([1, 3, 1 + half, 3 + half])
    mask = torch.zeros(layout.head_dim, dtype=torch.bool)
    mask[keep_dims] = True
    for block in adapter.blocks(dense):  # zero every q/k row outside the kept dims: scores use only those pairs
        parts = adapter.parts(block)
        with torch.no_grad():
            if parts.qkv is not None:  # fused [heads, (q, k, v), head_dim, in]
                parts.qkv.weight.view(layout.num_heads, 3, layout.head_dim, -1)[:, :2, ~mask] = 0
            else:
                for linear in (parts.q, parts.k):
                    linear.weight.view(-1, layout.head_dim, linear.in_features)[:, ~mask] = 0
    compressed, _ = load_model(name)
    compressed.load_state_dict(dense.state_dict())
    dims = torch.stack([keep_dims] * layout.num_kv_heads)
    for i, block in enumerate(adapter.blocks(compressed)):
        parts, p = adapter.parts(block), qkv_params(adapter, block, layout)
        full = dense_spec(compressed, adapter, i)
        spec = LayerSpec(full.intermediate, 4, layout.head_dim, rope_index, layout.num_heads,
                         layout.num_kv_heads, layout.head_dim)
        q = gather_heads(p["wq"].clone(), p["bq"], dims, layout.head_dim, layout.num_heads)
        k = gather_heads(p["wk"].clone(), p["bk"], dims, layout.head_dim, layout.num_kv_heads)
        mlp_in = [(lin.weight.data.clone(), None if lin.bias is None else lin.bias.data) for lin in parts.mlp_in]
        down, v = (parts.mlp_out.weight.data.clone(), parts.mlp_out.bias), (p["wv"].clone(), p["bv"])
        o = (parts.o.weight.data.clone(), parts.o.bias)
        restructure_block(compressed, i, spec)
        load_block_weights(compressed, i, mlp_in, down, q, k, v, o)
    return dense, compressed


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-phi", "tiny-neox"])
def test_kept_rotary_pairs_rotate_with_their_original_frequencies(name):
    kv_heads = get_adapter(load_model(name)[0]).layout(load_model(name)[0]).num_kv_heads
    dense, right = _restrict_to_pairs(name, [[1, 3]] * kv_heads)
    _, wrong = _restrict_to_pairs(name, [[0, 1]] * kv_heads)  # as if frequencies were rebuilt for 4 dims
    ids = _ids(1, 40)
    with torch.no_grad():
        reference = dense(ids).logits
        torch.testing.assert_close(right(ids).logits, reference, atol=2e-5, rtol=1e-4)
        assert not torch.allclose(wrong(ids).logits, reference, atol=1e-3)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--ratio", "0"], "ratio 0.0 is out of range; accepted: 0 < ratio < 1"),
        (["--ratio", "1"], "ratio 1.0 is out of range"),
        (["--ratio", "-0.1"], "ratio -0.1 is out of range"),
        (["--ratio", "0.3", "--method", "sparse"],
         "unknown method 'sparse'; accepted: modegpt, modegpt-heads, wanda-sp"),
    ],
)
def test_compress_bad_input(capsys, tmp_path, argv, fragment):
    try:
        code = main(["--quiet", "compress", "tiny-llama", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as exit_:  # argparse-level errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err and not (tmp_path / "o").exists()


@pytest.mark.slow  # loads the real MiniLM; test_every_entry_refuses_an_encoder covers the check on a tiny BERT
def test_compress_cli_refuses_an_encoder(capsys, tmp_path):
    assert main(["--quiet", "compress", "minilm-l6", "--ratio", "0.3", "--out", str(tmp_path / "m")]) == 2
    assert "unsupported architecture 'bert' for compression; supported: llama" in capsys.readouterr().err


def test_compress_refuses_non_empty_out(capsys, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["--quiet", "compress", "tiny-llama", "--ratio", "0.3", "--out", str(tmp_path / "full")]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(LeanfmError, match=r"ratio 1\.5 is out of range"):
        ModegptConfig(ratio=1.5)


def test_compress_cli_end_to_end(capsys, tmp_path):
    out = tmp_path / "tiny-mg"
    code = main(["--quiet", "compress", "tiny-llama", "--ratio", "0.3", "--out", str(out), "--calib-samples", "4",
                 "--calib-seqlen", "32", "--width-multiple", "1", "--json", str(tmp_path / "c.json")])
    assert code == 0
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["method"] == "modegpt" and abs(report["achieved_ratio"] - 0.3) < 0.01
    for key in ("params_before", "params_after", "seconds", "peak_rss_mb", "calibration", "whole_model_ratio"):
        assert key in report
    assert report["settings"]["ratio"] == 0.3 and report["settings"]["calib_samples"] == 4  # how it was made
    assert json.loads((out / "compression.json").read_text())["settings"] == report["settings"]
    capsys.readouterr()
    assert main(["--quiet", "eval", str(out), "--seqlen", "32", "--windows", "2", "--cloze", "0", "--no-speed",
                 "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["params"] == report["params_after"]


def test_whitened_svd_is_optimal_on_the_calibration_data():
    """Full rank reproduces W; rank r beats plain SVD in the activation-weighted error it minimises."""
    from leanfm.compress.baselines import whitened_low_rank

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen) * torch.linspace(0.1, 3, 16)  # anisotropic activations
    w = torch.randn(12, 16, generator=gen)
    gram = (x.T @ x).double()
    down, up = whitened_low_rank(w, gram, 12)
    torch.testing.assert_close(up @ down, w, atol=1e-4, rtol=1e-4)
    down, up = whitened_low_rank(w, gram, 4)
    u, s, vt = torch.linalg.svd(w)
    plain = (u[:, :4] * s[:4]) @ vt[:4]
    assert torch.linalg.norm(x @ (w - up @ down).T) < torch.linalg.norm(x @ (w - plain).T)


@pytest.mark.slow  # lm-evaluation-harness end to end (~10 s)
def test_lm_eval_evaluates_a_compressed_checkpoint(tmp_path):
    pytest.importorskip("lm_eval")
    from leanfm.eval.lm_eval_adapter import run_cloze

    model, tokenizer = load_model("tiny-llama")
    report = compress_model(model, tokenizer, ratio=0.3, **SMALL)
    save_compressed(model, tokenizer, tmp_path / "c", report)
    metrics = run_cloze(str(tmp_path / "c"), tmp_path / "task", limit=4)
    assert metrics["sample_len"] == 4 and 0.0 <= metrics["acc,none"] <= 1.0


# ---------------------------------------------------------------- the method registry

COMPRESSORS = {"modegpt": ModegptConfig, "modegpt-heads": ModegptHeadsConfig, "wanda-sp": WandaSpConfig,
               "svd-llm": SvdLlmConfig, "flap": FlapConfig, "disp": DispConfig, "slicegpt": SliceGptConfig}


def test_every_compressor_is_registered_with_its_config():
    specs = list_methods("compress")
    assert {s.name: s.config for s in specs} == COMPRESSORS
    assert specs[0].name == "modegpt"  # the default comes first in errors and help
    for spec in specs:
        config = spec.config(ratio=0.3)
        again = spec.config.from_dict(json.loads(config.to_json()))
        assert type(again) is spec.config and again == config
        with pytest.raises(TypeError):
            spec.config()  # ratio has no default anywhere


def test_unknown_compressor_lists_the_registered_ones(tokenizer):
    model, _ = load_model("tiny-llama")
    with pytest.raises(LeanfmError, match=f"^unknown method 'sparse'; accepted: {', '.join(COMPRESSORS)}$"):
        compress_model(model, tokenizer, method="sparse", ratio=0.3)
    with pytest.raises(LeanfmError, match="unknown method 'tome'"):
        get_method("tome", "compress")


@pytest.mark.parametrize(
    ("method", "setting"),
    [("wanda-sp", {"ridge": 1e-2}), ("svd-llm", {"ridge": 1e-2}), ("modegpt", {"steps": 5}),
     ("modegpt", {"lam": 1.0}), ("disp", {"allocation": "uniform"}), ("disp", {"calib_samples": 8})],
)
def test_a_setting_of_another_method_is_refused(method, setting, tokenizer):
    config_cls = COMPRESSORS[method]
    with pytest.raises(TypeError):
        config_cls(ratio=0.3, **setting)
    model, _ = load_model("tiny-llama")
    name = next(iter(setting))
    with pytest.raises(LeanfmError, match=rf"^unknown {config_cls.__name__} setting\(s\) {name}; accepted: .*ratio"):
        compress_model(model, tokenizer, method=method, ratio=0.3, **setting)


@pytest.mark.parametrize(
    ("config_cls", "settings", "message"),
    [(WandaSpConfig, {"ratio": 1.5}, r"ratio 1\.5 is out of range; accepted: 0 < ratio < 1"),
     (SvdLlmConfig, {"ratio": 0.3, "allocation": "even"}, "unknown allocation 'even'; accepted: global, uniform"),
     (ModegptConfig, {"ratio": 0.3, "calib_samples": 0}, "calib_samples 0 is invalid"),
     (ModegptConfig, {"ratio": 0.3, "epsilon": 0}, "epsilon 0"),
     (DispConfig, {"ratio": 0}, "ratio 0 is out of range"),
     (DispConfig, {"ratio": 0.3, "device": "tpu"}, "unknown device 'tpu'; accepted: auto, cpu, cuda, cuda:N")],
)
def test_config_validation_is_one_line(config_cls, settings, message):
    with pytest.raises(LeanfmError, match=message) as err:
        config_cls(**settings)
    assert "\n" not in str(err.value)


def test_disp_config_cli_metadata_and_tau_default():
    fields = {f.name: f for f in dataclasses.fields(DispConfig)}
    assert fields["lam"].metadata["flag"] == "lambda" and fields["device"].default == "auto"
    assert DispConfig(ratio=0.3).tau == 1.0 and DispConfig(ratio=0.3, sampler="gumbel").tau == 0.4
    assert "autocast" in DispConfig.RESUMABLE and "lam" not in DispConfig.RESUMABLE


def test_every_entry_refuses_an_encoder(tokenizer):
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64)
    bert = BertModel(config)
    message = r"^unsupported architecture 'bert' for compression; supported: llama, opt, phi, gpt_neox, gemma3_text$"
    with pytest.raises(LeanfmError, match=message):
        check_architecture(bert)
    llama_only = r"^slicegpt supports dense llama-architecture models only \(e.g. smollm2-135m\); got 'bert'$"
    for spec in list_methods("compress"):  # called directly (benchmarks, other code), not only via compress_model
        with pytest.raises(LeanfmError, match=llama_only if spec.name == "slicegpt" else message):
            spec.entry(bert, tokenizer, spec.config(ratio=0.3))
