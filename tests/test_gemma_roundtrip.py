"""Gemma-3 compressed checkpoints on tiny-gemma3 (see test_gemma_compress.py): every compressor reaches the ratio,
keeps q/k at full width, and its folder reloads (leanfm and ``from_pretrained``) and decodes with the sliding cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from leanfm import load_model
from leanfm.compress import compress_model, save_compressed
from leanfm.models import get_adapter
from test_gemma_compress import DISP, LAYER_TYPES, NAME, SMALL, _ids

METHODS = [("modegpt", SMALL), ("wanda-sp", SMALL), ("svd-llm", SMALL), ("flap", SMALL), ("disp", DISP)]


@pytest.mark.parametrize(("method", "settings"), METHODS)
def test_ratio_and_round_trip(method, settings, tmp_path):
    import leanfm  # noqa: F401  (registers the compressed classes with AutoModelForCausalLM)

    model, tokenizer = load_model(NAME)
    report = compress_model(model, tokenizer, method=method, ratio=0.3, **settings)
    assert report.achieved_ratio == pytest.approx(0.3, abs=0.02)
    assert report.params_after < report.params_before
    layout = get_adapter(model).layout(model)
    layers = model.config.leanfm_layers
    assert all(layer["qk_dim"] == layer["head_dim"] == layout.head_dim for layer in layers)  # q/k: every dim
    assert method not in ("modegpt", "wanda-sp") or any(layer["v_dim"] < layout.head_dim for layer in layers)
    assert model.config.layer_types == LAYER_TYPES and model.config.model_type == "leanfm_gemma3_text"
    folder = save_compressed(model, tokenizer, tmp_path / "c", report)
    ours, _ = load_model(str(folder))
    hf = AutoModelForCausalLM.from_pretrained(folder)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(ours(ids).logits, reference) and torch.equal(hf(ids).logits, reference)
    out = hf.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)  # 11 > the window (8)
    with torch.no_grad():  # greedy decoding with the (sliding) KV cache agrees with step-by-step full forwards
        step = ids[:1, :5]
        for _ in range(6):
            step = torch.cat([step, model(step).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, step)
