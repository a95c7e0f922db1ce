"""DISP-LLM: channel-pruned blocks, parameter counting, samplers, training (2-process gloo), CLI.

Exact resume and the resume errors are checked for every trainer in test_contract.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import TINY
from leanfm import load_model
from leanfm.cli import main
from leanfm.compress import compress_model, save_compressed
from leanfm.compress.disp import (
    MASK_NAMES,
    ChannelMasks,
    DispConfig,
    DispTrainer,
    block_shape,
    export_masks,
    gumbel_sigmoid,
    masks_count,
    prune_to_masks,
    reinmax,
)
from leanfm.compress.engine import block_parameter_count
from leanfm.models import get_adapter
from leanfm.training import load_checkpoint

TRAIN = {"steps": 4, "batch_size": 2, "seqlen": 32, "checkpoint_every": 2, "autocast": False, "width_multiple": 1,
         "train_corpus": "austen:calib"}  # a small split: tokenizing the default mix (~3M tokens) takes ~1 min


def _ids(n=2, t=20):
    return torch.randint(0, 5000, (n, t), generator=torch.Generator().manual_seed(5))


def _shapes(model):
    adapter = get_adapter(model)
    return [block_shape(adapter, block) for block in adapter.blocks(model)]


def _random_masks(shapes, keep, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(len(shapes), shapes[0].widths[n], generator=g) < keep for n in MASK_NAMES}


@pytest.mark.parametrize("name", TINY)
def test_all_ones_masks_reproduce_dense_logits(name):
    model, _ = load_model(name)
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
        prune_to_masks(model, _random_masks(_shapes(model), keep=2.0))
        torch.testing.assert_close(model(ids).logits, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_pruned_block_equals_masked_dense_block_and_count_is_exact(name):
    model, _ = load_model(name)
    shapes = _shapes(model)
    masks = _random_masks(shapes, keep=0.6)
    ids = _ids()
    with torch.no_grad():
        hooks = ChannelMasks(model)
        hooks.masks = {n: m.float() for n, m in masks.items()}
        masked = model(ids).logits
        hooks.remove()
        assert not torch.allclose(model(ids).logits, masked)  # the masks do change the model
        predicted = int(masks_count(shapes, masks))
        prune_to_masks(model, masks)
        torch.testing.assert_close(model(ids).logits, masked, atol=1e-5, rtol=1e-5)
    assert block_parameter_count(model) == predicted


@pytest.mark.parametrize("sampler", [reinmax, gumbel_sigmoid])
def test_samplers_are_hard_forward_with_gradients(sampler):
    logits = torch.linspace(-4, 4, 400, requires_grad=True)
    mask = sampler(logits, 1.0, torch.Generator().manual_seed(0))
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert mask[:50].mean() < 0.2 and mask[-50:].mean() > 0.8  # keep probability follows sigmoid(logit)
    (mask * torch.arange(400.0)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_reinmax_gradient_is_reinmax():
    """Two-class ReinMax: d out / d l = 2 π1(1-π1) - π0(1-π0)/2 with π1 = (D + σ(l/τ))/2."""
    logits = torch.tensor([0.3, -1.2], requires_grad=True)
    out = reinmax(logits, 2.0, torch.Generator().manual_seed(0))
    out.sum().backward()
    p0 = torch.sigmoid(logits.detach())
    p1 = (out.detach() + torch.sigmoid(logits.detach() / 2.0)) / 2
    torch.testing.assert_close(logits.grad, 2 * p1 * (1 - p1) - p0 * (1 - p0) / 2)


def test_export_masks_hit_the_target_and_keep_a_channel_everywhere():
    model, _ = load_model("tiny-llama")
    shapes = _shapes(model)
    g = torch.Generator().manual_seed(0)
    logits = {n: torch.randn(len(shapes), shapes[0].widths[n], generator=g) for n in MASK_NAMES}
    full = sum(int(s.constant) for s in shapes)
    total = float(masks_count(shapes, {n: torch.ones_like(v) for n, v in logits.items()}))
    target = 0.5 * total
    masks = export_masks(logits, shapes, target)
    count = float(masks_count(shapes, masks))
    assert count <= target and count > target - 0.02 * total
    assert all(bool(masks[n].any(-1).all()) for n in MASK_NAMES)
    assert full < count


def _trainer(model, tokenizer, tmp_path, **overrides):
    config = DispConfig(**{"ratio": 0.4, **TRAIN, **overrides})
    return DispTrainer(model, tokenizer, config, checkpoint=tmp_path / "ckpt")


@pytest.mark.training  # 30 steps (~10 s); the resume test below trains 4
def test_training_moves_towards_the_target_ratio(tokenizer, tmp_path):
    model, _ = load_model("tiny-llama")
    trainer = _trainer(model, tokenizer, tmp_path, steps=30, checkpoint_every=100)
    history = trainer.run()
    assert len(history) == 30 and all(torch.isfinite(torch.tensor(h["ce"])) for h in history)
    assert history[-1]["ratio"] > history[0]["ratio"] + 0.1  # the regulariser prunes
    # the model itself is untouched by training (frozen); only the hypernetwork learned
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-neox"])
def test_compressed_checkpoint_reloads_and_generates(name, tokenizer, tmp_path):
    import leanfm  # noqa: F401  (registers the compressed classes)

    model, _ = load_model(name)
    report = compress_model(model, tokenizer, method="disp", ratio=0.5, **TRAIN)
    assert report.achieved_ratio == pytest.approx(0.5, abs=0.02)
    assert report.training["steps"] == 4 and len(report.training["history"]) == 4
    save_compressed(model, tokenizer, tmp_path / "c", report)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)
    out = hf.generate(ids[:1, :5], max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        step = ids[:1, :5]
        for _ in range(5):
            step = torch.cat([step, model(step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
    assert block_parameter_count(hf) == report.block_params_after


def _cli_args(out, extra=()):
    return ["--quiet", "compress", "tiny-llama", "--method", "disp", "--ratio", "0.4", "--steps", "4",
            "--batch-size", "4", "--seqlen", "32", "--checkpoint-every", "2", "--no-autocast", "--out", str(out),
            "--json", str(out) + ".json", *extra]


@pytest.mark.distributed
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo) follows the 1-process run with the same global batch."""
    assert main(_cli_args(tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "leanfm",
           *_cli_args(tmp_path / "two")]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=300)
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["training"]["world_size"] == 2 and one["training"]["world_size"] == 1
    for a, b in zip(one["training"]["history"], two["training"]["history"], strict=True):
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-4)
        assert a["ratio"] == pytest.approx(b["ratio"], abs=1e-4)
    state_one = load_checkpoint(tmp_path / "one.training")["modules"]["hypernetwork"]
    state_two = load_checkpoint(tmp_path / "two.training")["modules"]["hypernetwork"]
    for key, value in state_one.items():
        torch.testing.assert_close(value, state_two[key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sampler", "softmax"], "unknown sampler 'softmax'; accepted: reinmax, gumbel"),
        (["--lambda", "-1"], "lambda -1.0"),
        (["--tau", "0"], "tau 0.0"),
    ],
)
def test_bad_disp_settings_give_one_line_errors(extra, message, tmp_path, capsys):
    assert main(_cli_args(tmp_path / "x", extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.training").exists()


def test_existing_checkpoint_needs_resume_or_overwrite(tmp_path, capsys):
    (tmp_path / "x.training").mkdir()
    assert main(_cli_args(tmp_path / "x")) == 2
    assert "pass --resume to continue it or --overwrite" in capsys.readouterr().err


@pytest.mark.slow  # loads the real MiniLM; test_compress.py checks every entry on a tiny BERT
def test_encoder_is_refused(tmp_path, capsys):
    args = _cli_args(tmp_path / "x")
    args[args.index("tiny-llama")] = "minilm-l6"
    assert main(args) == 2
    assert "unsupported architecture 'bert'" in capsys.readouterr().err

