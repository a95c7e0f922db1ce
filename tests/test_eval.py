import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from leanfm import evaluate, load_model
from leanfm.data.calibration import split_token_ids, token_windows
from leanfm.errors import LeanfmError
from leanfm.eval.cloze import ClozeItem, cloze_accuracy, cloze_items
from leanfm.eval.perplexity import perplexity


def test_perplexity_agrees_with_hf_loss(tokenizer):
    model, _ = load_model("tiny-llama")
    windows = token_windows(split_token_ids(tokenizer, "austen", "eval"), 64, 6)
    ours = perplexity(model, windows, batch_size=4)
    # HF's own mean token loss, per window; windows have equal length, so their mean is token-weighted
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert ours.tokens == 6 * 63 and ours.windows == 6
    assert ours.perplexity == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-4)
    assert perplexity(model, windows, batch_size=1).perplexity == pytest.approx(ours.perplexity, rel=1e-4)


class _Oracle(nn.Module):
    """A fake LM whose logits put all mass on the token that really comes next (or always on token 0)."""

    def __init__(self, perfect: bool) -> None:
        super().__init__()
        self.perfect = perfect
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 50000)
        target = torch.roll(input_ids, -1, dims=1) if self.perfect else torch.zeros_like(input_ids)
        logits.scatter_(-1, target.unsqueeze(-1), 10.0)
        return SimpleNamespace(logits=logits)


def test_cloze_accuracy_alignment(tokenizer):
    items = [ClozeItem("The cat sat on the mat and looked at the", "mat"), ClozeItem("She said that she would", "come")]
    assert cloze_accuracy(_Oracle(perfect=True), tokenizer, items) == 1.0
    assert cloze_accuracy(_Oracle(perfect=False), tokenizer, items) == 0.0


def test_cloze_items_are_lambada_like():
    para = " ".join(["word"] * 40) + " and then the garden was bright. We walked into the garden."
    items = cloze_items(para + "\n\nToo short garden.", count=10)
    assert [i.target for i in items] == ["garden"]
    assert not items[0].context.endswith("garden") and "garden" in items[0].context


def test_evaluate_tiny_model_returns_every_field(tokenizer):
    model, _ = load_model("tiny-llama")
    result = evaluate(model, tokenizer, name="tiny-llama", seqlen=32, windows=3, cloze=8, decode_tokens=4)
    data = result.to_dict()
    for key in ("model", "params", "perplexity", "seqlen", "windows", "dtype", "prefill_tokens_per_s",
                "decode_tokens_per_s", "peak_rss_mb", "seconds", "leanfm_version", "torch_version",
                "transformers_version", "cloze_accuracy"):
        assert data[key] is not None, key
    assert 1000 < data["perplexity"] < 10 * 49152  # a random model is close to uniform over the vocabulary
    assert data["params"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert data["windows"] == 3 and data["cloze_items"] == 8


@pytest.mark.parametrize(("kwargs", "message"), [({"seqlen": 1}, "seqlen 1"), ({"windows": 0}, "windows 0")])
def test_evaluate_rejects_bad_settings(tokenizer, kwargs, message):
    model, _ = load_model("tiny-llama")
    with pytest.raises(LeanfmError, match=message):
        evaluate(model, tokenizer, **kwargs)
