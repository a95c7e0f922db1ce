"""DISP-LLM that runs well (issue 14): one readout per block and mask kind, aligned exported widths, tensors on
the run's device, and shards that are never empty."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from leanfm import load_model
from leanfm.compress import compress_model
from leanfm.compress.disp import (
    MASK_NAMES,
    DispConfig,
    DispHypernetwork,
    DispTrainer,
    align_masks,
    block_count,
    block_shape,
    export_masks,
    masks_count,
)
from leanfm.errors import LeanfmError
from leanfm.models import get_adapter
from leanfm.training import DistributedContext

WIDTHS = {"attn_in": 6, "attn_out": 6, "mlp_in": 6, "mlp_mid": 10, "mlp_out": 6}


def test_each_block_has_its_own_readout():
    """Block 0's logits do not depend on block 1's readout (a shared readout would couple them), while the
    shared GRU trunk still lets the blocks see each other."""
    net = DispHypernetwork(3, WIDTHS, seed=0, z_dim=4, hidden=5)
    assert net.readouts["mlp_mid"].shape == (3, 10, 10)
    logits = net()
    logits["mlp_mid"][0].sum().backward()
    grad = net.readouts["mlp_mid"].grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    assert net.readouts["attn_in"].grad is None  # another mask kind's readout is not involved at all
    assert net.gru.weight_hh_l0_reverse.grad.abs().sum() > 0  # the reverse pass carries blocks 1, 2 into block 0
    net.zero_grad()
    with torch.no_grad():  # hand check: block l's logits = its readout times its state
        states, _ = net.gru(net.z[None])
        states = torch.nn.functional.gelu(net.norm(states[0]))
        net.readouts["attn_out"][2] += 1.0
        moved = net()
    torch.testing.assert_close(moved["attn_out"][2], net.readouts["attn_out"][2] @ states[2])
    torch.testing.assert_close(moved["attn_out"][:2], logits["attn_out"][:2].detach())  # blocks 0, 1 unmoved


def _shapes():
    model, _ = load_model("tiny-llama")  # widths 64 (residual) and 128 (intermediate)
    adapter = get_adapter(model)
    return [block_shape(adapter, block) for block in adapter.blocks(model)]


def test_aligned_masks_are_multiples_and_keep_the_budget():
    shapes = _shapes()
    g = torch.Generator().manual_seed(2)
    logits = {n: torch.randn(len(shapes), shapes[0].widths[n], generator=g) for n in MASK_NAMES}
    target = 0.45 * float(masks_count(shapes, {n: torch.ones_like(v) for n, v in logits.items()}))
    plain = export_masks(logits, shapes, target)
    aligned = export_masks(logits, shapes, target, multiple=8)
    assert any(int(c) % 8 for n in MASK_NAMES for c in plain[n].sum(-1))  # the unaligned export is not aligned
    assert all(int(c) % 8 == 0 for n in MASK_NAMES for c in aligned[n].sum(-1))
    # the carry: off by at most half an intermediate step of the last block (8 channels x gate, up, down) —
    # rounding each block alone misses by 1.27 half-steps here
    last = {n: int(aligned[n][-1].sum()) for n in MASK_NAMES}
    per_channel = block_count(shapes[-1], last | {"mlp_mid": 1}) - block_count(shapes[-1], last | {"mlp_mid": 0})
    assert per_channel == 2 * last["mlp_in"] + last["mlp_out"]
    mid_step = 8 * float(per_channel)
    assert abs(float(masks_count(shapes, aligned)) - float(masks_count(shapes, plain))) <= mid_step / 2
    for name in MASK_NAMES:  # each mask keeps its best channels
        for row, kept in zip(logits[name], aligned[name], strict=True):
            assert row[kept].min() >= row[~kept].max() if (~kept).any() else True
    again = align_masks(logits, aligned, shapes, 8)
    assert all(torch.equal(again[n], aligned[n]) for n in MASK_NAMES)  # aligned masks are a fixed point


def test_disp_exports_aligned_channels_at_the_requested_ratio(tokenizer):
    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    report = compress_model(model, tokenizer, method="disp", ratio=0.3, steps=1, batch_size=2, seqlen=16,
                            autocast=False, device="cpu", train_corpus="austen:calib")
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.01) and report.whole_model_ratio < 0.3
    for layer in model.config.leanfm_layers:
        assert layer["intermediate"] % 32 == 0
        assert all(len(ids) % 32 == 0 for ids in layer["channels"].values())


def test_masks_live_on_the_hypernetworks_device(tokenizer):
    model, _ = load_model("tiny-llama")
    trainer = DispTrainer(model, tokenizer, DispConfig(ratio=0.4, steps=1, batch_size=2, seqlen=16, device="cpu",
                                                       train_corpus="austen:calib"))
    task = trainer.task()  # fit moves every module of the task to the run's device
    assert task.modules["hypernetwork"] is trainer.hypernetwork and model in task.frozen
    trainer.hypernetwork.to("meta")
    masks = trainer.sample_masks(0)
    assert {m.device.type for m in masks.values()} == {"meta"}


def test_a_batch_smaller_than_the_world_is_a_one_line_error():
    batch = torch.arange(6).view(3, 2)
    assert DistributedContext(1, 2).shard(batch).tolist() == [[2, 3]]
    assert DistributedContext(2, 3).shard(batch).tolist() == [[4, 5]]
    with pytest.raises(LeanfmError, match="batch of 3 rows cannot be shared by 4 processes"):
        DistributedContext(0, 4).shard(batch)
