"""Compression that runs well (issue 14): prefill computes the last position's logits only, as a server does;
reports carry both the block and the whole-model ratio, also through a saved checkpoint and ``evaluate``; weights
leave the safetensors mapping so replaced blocks are freed."""

import pytest
import torch
from torch import nn

from leanfm import load_model
from leanfm.compress import compress_model, save_compressed
from leanfm.eval.harness import count_parameters, evaluate
from leanfm.eval.speed import prefill_tokens_per_s


class _Recorder(nn.Module):
    """Stands in for a causal LM: records the keyword arguments of every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[dict] = []

    def forward(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["input_ids"].float().sum()


def test_prefill_keeps_only_the_last_logits():
    model = _Recorder()
    rate = prefill_tokens_per_s(model, torch.ones(2, 8, dtype=torch.long), repeats=2)
    assert rate > 0 and len(model.calls) == 3  # one warm-up, two timed
    assert all(c["logits_to_keep"] == 1 and c["use_cache"] is False for c in model.calls)
    real, _ = load_model("tiny-llama")
    with torch.no_grad():  # the real model honours it: one position of logits, not eight
        assert real(input_ids=torch.ones(2, 8, dtype=torch.long), logits_to_keep=1).logits.shape[:2] == (2, 1)


def test_both_ratios_reach_the_report_the_checkpoint_and_eval(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    before = count_parameters(model)
    report = compress_model(model, tokenizer, ratio=0.3, width_multiple=1, calib_samples=4, calib_seqlen=32,
                            batch_size=2)
    assert report.whole_model_ratio == pytest.approx(1 - count_parameters(model) / before)
    assert report.whole_model_ratio < report.achieved_ratio  # the embedding is kept whole
    assert report.settings["calib_seqlen"] == 32 and report.settings["batch_size"] == 2  # the config as run
    save_compressed(model, tokenizer, tmp_path / "c", report)
    again, _ = load_model(str(tmp_path / "c"))
    result = evaluate(again, tokenizer, seqlen=16, windows=1, cloze=0, speed=False).to_dict()
    assert result["ratio"] == 0.3
    assert result["achieved_ratio"] == pytest.approx(report.achieved_ratio)
    assert result["whole_model_ratio"] == pytest.approx(report.whole_model_ratio)


def test_weights_leave_the_file_mapping_and_the_checkpoint_is_unchanged(tmp_path):
    """A model loaded from safetensors (views of the file's memory map) is copied out before compression — every
    tensor gets its own memory, tied weights stay tied — and compresses to exactly what the in-memory copy gives."""
    from transformers import AutoModelForCausalLM

    from leanfm.compress.engine import copy_out_of_mapping

    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "dense")
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    pointers = {name: p.data_ptr() for name, p in mapped.named_parameters()}
    before = {name: p.clone() for name, p in mapped.state_dict().items()}
    copy_out_of_mapping(mapped)
    assert all(p.data_ptr() != pointers[name] for name, p in mapped.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in mapped.state_dict().items())
    assert mapped.lm_head.weight is mapped.model.embed_tokens.weight
    settings = {"ratio": 0.3, "calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}
    compress_model(mapped, tokenizer, **settings)
    compress_model(model, tokenizer, **settings)
    ours, theirs = mapped.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
