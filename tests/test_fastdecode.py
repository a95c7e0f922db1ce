"""The fast decode path gives generate()'s greedy tokens: dense llama, a leanfm_llama with per-layer widths (kept
rotary pairs, DISP channels, a dense block), the static-cache fallback; its byte accounting by hand; one-line errors."""

import pytest
import torch
from transformers import BertConfig, BertModel

from leanfm.errors import LeanfmError
from leanfm.eval.fastdecode import FastDecoder, bytes_per_token, inductor_cache_dir, profile, read_bandwidth_gbps
from leanfm.models.compressed import COMPRESSED_CLASSES, LayerSpec
from leanfm.models.tiny import build_tiny, tiny_configs

PROMPT = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
NEW = 12


def _sharpen(model):
    """Seeded weights 8x larger than the init: a random model then emits varied tokens (at the init's scale it
    repeats one), so a wrong cache position or rotary angle changes the continuation."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(3)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.16 if param.dim() == 2 else 0.05)
    return model.eval()


def _compressed_llama():
    """3 blocks of tiny-llama's shape (4 q / 2 kv heads of 16 dims, 8 rotary pairs): block 0 has smaller q/k (10)
    and v (12) heads keeping 3 rotary pairs per KV group (different ones per group) and a 96-wide MLP; block 1
    is DISP-pruned (channel subsets, 80-wide MLP); block 2 stays dense."""
    data = tiny_configs()["tiny-llama"].to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        data.pop(key, None)
    data["num_hidden_layers"] = 3
    dense = LayerSpec(128, 16, 16, [list(range(8))] * 2, 4, 2, 16)
    rope = LayerSpec(96, 10, 12, [[0, 3, 7], [1, 2, 5]], 4, 2, 16)
    disp = LayerSpec(80, 16, 16, [list(range(8))] * 2, 4, 2, 16, channels={
        "attn_in": sorted([*range(0, 64, 2), 5]), "attn_out": list(range(40)), "mlp_in": list(range(10, 60)),
        "mlp_out": list(range(1, 64, 3))})
    config_cls, model_cls = COMPRESSED_CLASSES["llama"]
    config = config_cls(**data, leanfm_layers=[vars(rope), vars(disp), vars(dense)])
    return _sharpen(model_cls(config))


def _generate(model, dtype, ids=PROMPT):
    model = model.to(dtype)
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                          min_new_tokens=NEW, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("build", ["dense", "compressed"])
def test_greedy_tokens_equal_generate(build, dtype):
    model = _sharpen(build_tiny("tiny-llama")) if build == "dense" else _compressed_llama()
    decoder = FastDecoder(model, dtype=dtype, device="cpu", max_len=24, compile=False)
    assert decoder.path == "fused"
    expected = _generate(model, dtype)
    assert len(set(expected[0, PROMPT.shape[1]:].tolist())) > NEW // 2  # a varied continuation, not one token
    assert torch.equal(decoder.generate(PROMPT, NEW), expected)
    if dtype == torch.float32:  # the static-shape step of CUDA graphs (masked whole cache, index_copy_), eager
        decoder.static, decoder._step = True, decoder.net
        assert torch.equal(decoder.generate(PROMPT, NEW), expected)


def test_fallback_uses_the_models_forward_with_a_static_cache():
    model = _sharpen(build_tiny("tiny-gemma3"))
    decoder = FastDecoder(model, dtype=torch.float32, device="cpu", max_len=24, compile=False)
    assert decoder.path == "static-cache"
    expected = _generate(model, torch.float32)
    assert torch.equal(decoder.generate(PROMPT, NEW), expected)
    assert torch.equal(decoder.generate(PROMPT, NEW), expected)  # the cache is reset between calls


def test_eos_stops_and_pads_like_generate():
    model = _sharpen(build_tiny("tiny-llama"))
    free = FastDecoder(model, dtype=torch.float32, device="cpu", max_len=24, compile=False).generate(PROMPT, NEW)
    eos = int(free[0, PROMPT.shape[1] + 2])  # row 0 emits it as its third new token
    decoder = FastDecoder(model, dtype=torch.float32, device="cpu", max_len=24, compile=False)
    out = decoder.generate(PROMPT, NEW, eos_token_id=eos, pad_token_id=0)
    expected = model.generate(input_ids=PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW,
                              do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)


def test_bytes_per_token_by_hand():
    model = build_tiny("tiny-llama")  # hidden 64, 4 q / 2 kv heads of 16, MLP 128, tied 49152 x 64 embedding
    decoder = FastDecoder(model, dtype=torch.bfloat16, device="cpu", max_len=24, compile=False)
    sizes = bytes_per_token(decoder, context=10)
    # per block: norm 64 + q|k|v (64+32+32) x 64 + o 64 x 64 = 12352 weights, plus 2 kv heads x 10 positions x
    # (16 + 16) cached values; MLP: norm 64 + gate|up 256 x 64 + down 64 x 128 = 24640; 2 bytes each
    assert sizes["attention"] == 2 * 2 * (12352 + 2 * 10 * 32)
    assert sizes["mlp"] == 2 * 2 * 24640
    assert sizes["lm_head"] == 2 * (64 + 49152 * 64)  # the tied embedding, read once as the head
    assert sizes["embed"] == 2 * 64
    assert read_bandwidth_gbps(1 << 20) > 0.1


def test_profile_splits_a_token():
    decoder = FastDecoder(build_tiny("tiny-llama"), dtype=torch.float32, device="cpu", max_len=24, compile=False)
    report = profile(decoder, PROMPT[:1], new_tokens=4)
    assert set(report["parts_ms"]) == {"embed", "attention", "mlp", "lm_head", "other"}
    assert report["tokens_per_s"] > 0 and 0 < report["fraction_of_limit"]
    assert report["limit_tokens_per_s"] == pytest.approx(report["read_gbps"] * 1e9 / report["bytes_per_token"])


def test_bad_input_gives_one_line_errors():
    model = build_tiny("tiny-llama")
    decoder = FastDecoder(model, dtype=torch.float32, device="cpu", max_len=10, compile=False)
    with pytest.raises(LeanfmError, match=r"prompt of 7 \+ 4 new tokens = 11 exceeds max_len 10") as err:
        decoder.generate(PROMPT, 4)
    assert "\n" not in str(err.value)
    with pytest.raises(LeanfmError, match="max_len 1 too small"):
        FastDecoder(model, dtype=torch.float32, device="cpu", max_len=1, compile=False)
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(LeanfmError, match="decoder-only causal LMs; got BertModel") as err:
        FastDecoder(bert, dtype=torch.float32, device="cpu", max_len=10, compile=False)
    assert "\n" not in str(err.value)
    with pytest.raises(LeanfmError, match="accepted: a \\[batch, length >= 1\\] long tensor"):
        decoder.generate(PROMPT.float(), 2)


@pytest.mark.slow  # torch.compile of a 2-block model: ~20-40 s on 2 cores (once per cache directory)
def test_compiled_step_gives_generates_tokens(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = _sharpen(build_tiny("tiny-llama"))
    decoder = FastDecoder(model, dtype=torch.float32, device="cpu", max_len=24, compile=True)
    assert decoder.compile_seconds > 0
    assert torch.equal(decoder.generate(PROMPT[:1], NEW), _generate(model, torch.float32, PROMPT[:1]))


def test_inductor_cache_replaces_torchs_own_default_but_not_the_users(tmp_path, monkeypatch):
    """Inductor writes its /tmp default into the environment itself; that must not count as the user's choice."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("LEANFM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    cache_dir()  # what torch does on first use: sets the variable to its /tmp default
    assert inductor_cache_dir() == str(tmp_path / "home" / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")
