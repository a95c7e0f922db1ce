"""End-to-end alignments behind ``leanfm align``: speech or images into a frozen text encoder's space.

The data (:mod:`leanfm.data.speech`, :mod:`leanfm.data.shapes`), the towers and the frozen text encoder
(:mod:`leanfm.models.encoders`) and the zero-shot metric (:mod:`leanfm.eval.zero_shot`) live in the shared
layers; this module only puts them together: build the data, train with CWCL or CLIP, evaluate, save, load.

An aligned encoder is saved as a folder: ``encoder.safetensors`` (weights), ``align.json`` (what it is, how it
was trained, the frozen model and the zero-shot metrics). :func:`load_encoder` rebuilds it.

The speech tower is ``scratch`` (:class:`SpeechEncoder` on 64-band log-mels) or ``whisper``
(:class:`WhisperTower`, Whisper tiny.en frozen but for its top layer). For ``whisper`` every utterance is
re-synthesised with the voice, speed and pitch the scratch set drew for it (:func:`rendition_jobs`, the same
seeded draws, so both towers see the same utterances), and the frozen body runs once per clip:
:func:`whisper_speech_set` keeps its outputs (real positions only, float16) in memory and on disk under
``$LEANFM_HOME/cache/whisper-features``, so a training step runs the top layer alone.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from leanfm.align.cwcl import LOSSES
from leanfm.align.trainer import AlignConfig, train_aligned
from leanfm.config import check_at_least, option, register_method
from leanfm.data import shapes, speech
from leanfm.errors import LeanfmError
from leanfm.eval.zero_shot import zero_shot_accuracy
from leanfm.models import whisper
from leanfm.models.encoders import (
    TOWER_KINDS,
    ImageEncoder,
    SpeechEncoder,
    TextEncoder,
    WhisperTower,
    check_text_encoder,
    embed_texts,
    load_tower,
    save_tower,
    text_encoder,
)
from leanfm.paths import atomic_directory, atomic_write_bytes, leanfm_home
from leanfm.progress import progress
from leanfm.training import DistributedContext, init_distributed, prepare_run

__all__ = ["KINDS", "SPEECH_TOWERS", "ImageAlignConfig", "PoolAlignConfig", "SpeechAlignConfig", "WhisperFeatures",
           "align_image", "align_pool", "align_speech", "check_text_encoder", "embed_texts", "evaluate_folder",
           "evaluate_image", "evaluate_speech", "load_encoder", "rendition_jobs", "save_encoder", "text_encoder",
           "whisper_speech_set"]

KINDS = TOWER_KINDS
# An aligned encoder's folder format lives with the towers (models layer) so other methods can read it too.
save_encoder = save_tower
load_encoder = load_tower


SPEECH_TOWERS = ("scratch", "whisper")
WHISPER_CHUNK = 32  # clips synthesised and run through Whisper's frozen body at once


def rendition_jobs(texts: list[str], voices: tuple[str, ...], seed: int,
                   renditions: int = 1) -> list[tuple[str, str, int, int]]:
    """(text, voice, speed, pitch) of every utterance, drawn exactly as :func:`leanfm.data.speech.build_speech_set`
    draws them (same generator, same order), so a Whisper set re-synthesises the scratch set's utterances."""
    generator = torch.Generator().manual_seed(seed)
    jobs = []
    for text in (t for t in texts for _ in range(renditions)):
        voice = voices[int(torch.randint(len(voices), (1,), generator=generator))]
        speed = int(torch.randint(130, 201, (1,), generator=generator))
        pitch = int(torch.randint(25, 76, (1,), generator=generator))
        jobs.append((text, voice, speed, pitch))
    return jobs


@dataclass
class WhisperFeatures:
    """A speech set as Whisper-body outputs: ``hidden`` ``[sum P, d]`` (each clip's real positions) + ``offsets``."""

    hidden: torch.Tensor
    offsets: torch.Tensor  # [N + 1]
    texts: list[str]
    labels: list[str]
    seconds: float

    def __len__(self) -> int:
        return len(self.texts)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-padded float32 ``[B, T, d]`` body outputs and real positions ``[B]`` of clips ``index``."""
        chunks = [self.hidden[self.offsets[i] : self.offsets[i + 1]].float() for i in index.tolist()]
        return nn.utils.rnn.pad_sequence(chunks, batch_first=True), torch.tensor([c.shape[0] for c in chunks])


def _whisper_wave(job: tuple[str, str, int, int]) -> np.ndarray:
    """One utterance at Whisper's 16 kHz (espeak-ng speaks at 22.05 kHz)."""
    return speech.resample(speech.synthesize(*job).numpy(), speech.SAMPLE_RATE, whisper.SAMPLE_RATE)


@torch.no_grad()
def _body_outputs(tower: WhisperTower, jobs: list[tuple[str, str, int, int]], dtype: torch.dtype,
                  name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Synthesise ``jobs`` chunk by chunk and run the frozen body: (hidden, offsets, total samples)."""
    frames, outs, counts, samples = int(tower.config["frames"]), [], [], 0
    tower.eval()
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:  # espeak-ng runs in subprocesses
        chunks = range(0, len(jobs), WHISPER_CHUNK)
        for first in progress(chunks, desc=f"whisper {name}", total=len(chunks)):
            waves = list(pool.map(_whisper_wave, jobs[first : first + WHISPER_CHUNK]))
            lengths = whisper.real_positions([len(w) for w in waves], tower.positions)
            hidden = tower.body(whisper.features(waves, frames, crop=True))  # [B, P, d]
            outs += [h[:n].to(dtype) for h, n in zip(hidden, lengths.tolist(), strict=True)]
            counts += lengths.tolist()
            samples += sum(min(len(w), frames * whisper.HOP) for w in waves)
    return torch.cat(outs), torch.tensor([0, *counts]).cumsum(0), samples


def whisper_speech_set(tower: WhisperTower, texts: list[str], labels: list[str], voices: tuple[str, ...],
                       seed: int = 0, renditions: int = 1, name: str = "set", dtype: torch.dtype = torch.float16,
                       cache: bool = True) -> WhisperFeatures:
    """The utterances ``build_speech_set(texts, labels, voices, seed, renditions)`` would synthesise, as Whisper's
    frozen-body outputs (computed once; cached under ``$LEANFM_HOME/cache/whisper-features`` unless ``cache`` is
    off). The key holds the tower's crop and Whisper's checkpoint name, so another crop is another cache."""
    jobs = rendition_jobs(texts, voices, seed, renditions)
    out_labels = [lab for lab in labels for _ in range(renditions)]
    key = hashlib.sha256(json.dumps([jobs, out_labels, tower.config["frames"], "whisper-tiny-en",
                                     str(dtype)]).encode()).hexdigest()[:16]
    folder = leanfm_home() / "cache" / "whisper-features" / f"{name}-{key}"
    if cache and (folder / "hidden.safetensors").is_file():
        stored = load_file(str(folder / "hidden.safetensors"))
        meta = json.loads((folder / "meta.json").read_text())
        return WhisperFeatures(stored["hidden"], stored["offsets"], [j[0] for j in jobs], out_labels, meta["seconds"])
    speech.check_synthesisers(voices)
    hidden, offsets, samples = _body_outputs(tower, jobs, dtype, name)
    result = WhisperFeatures(hidden, offsets, [j[0] for j in jobs], out_labels, samples / whisper.SAMPLE_RATE)
    if cache:
        with atomic_directory(folder) as tmp:
            atomic_write_bytes(tmp / "hidden.safetensors", save({"hidden": hidden, "offsets": offsets}))
            (tmp / "meta.json").write_text(json.dumps({"seconds": result.seconds, "frames": tower.config["frames"],
                                                       "utterances": len(jobs)}) + "\n")
    return result


@torch.no_grad()
def _encode_speech(encoder: nn.Module, data: speech.SpeechSet | WhisperFeatures, batch: int = 64) -> torch.Tensor:
    encoder.eval()
    out = [encoder(*data.batch(torch.arange(i, min(i + batch, len(data))))) for i in range(0, len(data), batch)]
    return torch.cat(out)


@torch.no_grad()
def validate_speech(encoder: nn.Module, text_model: TextEncoder, count: int = 150) -> dict[str, float]:
    """Validation (for choosing a temperature, never the tests): top-1 retrieval of ``count`` held-out spoken
    Austen spans (``calib`` split, validation voices) among their own texts embedded by the frozen model."""
    data: speech.SpeechSet | WhisperFeatures = speech.validation_set(count)
    if isinstance(encoder, WhisperTower):
        data = whisper_speech_set(encoder, data.texts, data.labels, speech.VALIDATION_VOICES, seed=3,
                                  name="validation")
    texts = list(dict.fromkeys(data.labels))
    return {"span_retrieval_accuracy": zero_shot_accuracy(_encode_speech(encoder, data), data.labels, texts,
                                                          embed_texts(text_model, texts)),
            "span_retrieval_chance": 1 / len(texts)}


def _speech_test_sets(encoder: nn.Module, voices: tuple[str, ...]) -> list[speech.SpeechSet | WhisperFeatures]:
    """Intents, keywords and smart-home intents (seeds 1, 2, 1); for a Whisper tower the same utterances re-read."""
    sets = [speech.intent_set(seed=1, voices=voices), speech.keyword_set(seed=2, voices=voices),
            speech.intent_set(seed=1, intents=speech.SMART_HOME_INTENTS, voices=voices)]
    if not isinstance(encoder, WhisperTower):
        return list(sets)
    return [whisper_speech_set(encoder, data.texts, data.labels, voices, seed=seed, name=name)
            for data, seed, name in zip(sets, (1, 2, 1), ("intents", "keywords", "smart-home"), strict=True)]


@torch.no_grad()
def evaluate_speech(encoder: nn.Module, text_model: TextEncoder,
                    voices: tuple[str, ...] = speech.EVAL_VOICES) -> dict[str, float]:
    """Zero-shot speech-to-intent and keyword accuracy (unseen voices and texts), for either speech tower;
    ``voices`` :data:`leanfm.data.speech.UNSEEN_SYNTH_VOICES` is the same test spoken by another synthesiser."""
    intents, keywords, smart_home = _speech_test_sets(encoder, voices)
    descriptions, smart_descriptions = list(speech.INTENTS), list(speech.SMART_HOME_INTENTS)
    words = list(speech.KEYWORDS)
    return {
        "intent_accuracy": zero_shot_accuracy(_encode_speech(encoder, intents), intents.labels, descriptions,
                                              embed_texts(text_model, descriptions)),
        "smart_home_intent_accuracy": zero_shot_accuracy(_encode_speech(encoder, smart_home), smart_home.labels,
                                                         smart_descriptions,
                                                         embed_texts(text_model, smart_descriptions)),
        "keyword_accuracy": zero_shot_accuracy(_encode_speech(encoder, keywords), keywords.labels, words,
                                               embed_texts(text_model, words)),
        "intent_chance": 1 / len(descriptions), "smart_home_intent_chance": 1 / len(smart_descriptions),
        "keyword_chance": 1 / len(words),
        "intent_items": len(intents), "keyword_items": len(keywords),
    }


@torch.no_grad()
def evaluate_image(encoder: nn.Module, text_model: TextEncoder, seed: int = 0,
                   per_combo: int = 10) -> dict[str, float]:
    """Zero-shot caption retrieval for images of held-out combinations: all 180 captions and unseen-only."""
    _, held_out = shapes.split_combinations(seed)
    images, captions = shapes.render_set(held_out, per_combo, seed=10_000 + seed)
    encoder.eval()
    embeddings = torch.cat([encoder(images[i : i + 256]) for i in range(0, len(images), 256)])
    every = [shapes.caption(c) for c in shapes.all_combinations()]
    unseen = [shapes.caption(c) for c in held_out]
    return {"heldout_accuracy_all": zero_shot_accuracy(embeddings, captions, every, embed_texts(text_model, every)),
            "heldout_accuracy_unseen": zero_shot_accuracy(embeddings, captions, unseen,
                                                          embed_texts(text_model, unseen)),
            "chance_all": 1 / len(every), "chance_unseen": 1 / len(unseen), "items": len(captions)}


# renders per held-out combination in image validation: 100 (1,400 items at 14 combinations). With 10 (140 items)
# render noise decided the temperature: image CWCL τ 0.2 led τ 0.5 by 0.300 to 0.279, and trailed it by 0.238 to
# 0.277 with 100 renders on the same encoders (benchmarks/cwcl.py --sweep, results/cwcl_tau.json before and after);
# its 3-seed test was 5 points worse
VALIDATION_RENDERS = 100


@torch.no_grad()
def validate_image(encoder: nn.Module, text_model: TextEncoder, combos: list, seed: int = 0,
                   per_combo: int = VALIDATION_RENDERS) -> dict[str, float]:
    """Validation (for choosing a temperature, never the tests): top-1 retrieval, among all 180 captions, for
    fresh renders of the ``combos`` held out of *training* (:func:`leanfm.data.shapes.split_validation`) — the
    same task as the test's held-out combinations, on combinations the test never uses. Empty without combos."""
    if not combos:
        return {}
    images, captions = shapes.render_set(combos, per_combo, seed=20_000 + seed)
    encoder.eval()
    embeddings = torch.cat([encoder(images[i : i + 256]) for i in range(0, len(images), 256)])
    every = [shapes.caption(c) for c in shapes.all_combinations()]
    return {"validation_accuracy": zero_shot_accuracy(embeddings, captions, every, embed_texts(text_model, every)),
            "validation_items": len(captions)}


@dataclass
class SpeechAlignConfig(AlignConfig):
    """``leanfm align speech``: the optimisation settings plus the frozen model and the speech to synthesise."""

    frozen: str = option("minilm-l6", "frozen text encoder (a registered sentence encoder)")
    tower: str = option("scratch", "speech tower: scratch (trained from nothing) or whisper (Whisper tiny.en cropped "
                                   "to 3 s, frozen but for its top layer)", choices=SPEECH_TOWERS)
    phrases: int = option(20000, "random 1-4 word Austen spans to synthesise")
    sentences: int = option(0, "whole Austen sentences to add")
    renditions: int = option(1, "voices/speeds/pitches per text")

    def validate(self) -> None:
        super().validate()
        check_text_encoder(self.frozen)
        check_at_least(self, 0, "phrases", "sentences")
        check_at_least(self, 1, "renditions")
        if self.phrases + self.sentences < 1:
            raise LeanfmError("phrases 0 and sentences 0 leave no training speech; accepted: at least one >= 1")


@dataclass
class ImageAlignConfig(AlignConfig):
    """``leanfm align image``: the optimisation settings plus the frozen model and the images per combination."""

    frozen: str = option("minilm-l6", "frozen text encoder (a registered sentence encoder)")
    per_combo: int = option(120, "training images per attribute-object combination")
    validation: float = option(0.0, "fraction of the training combinations held out of training to choose "
                                    "settings on (metric validation_accuracy); 0: train on all of them")

    def validate(self) -> None:
        super().validate()
        check_text_encoder(self.frozen)
        check_at_least(self, 1, "per_combo")
        if not 0 <= self.validation <= 0.3:
            raise LeanfmError(f"validation {self.validation} is invalid; accepted: a fraction in [0, 0.3]")


def align_speech(config: SpeechAlignConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 context: DistributedContext | None = None) -> dict[str, Any]:
    """Synthesise Austen phrases (and sentences), align a speech encoder to ``frozen``, evaluate, save to ``out``.

    Texts equal to an evaluation command or keyword are dropped from training, so the zero-shot sets stay unseen.
    The checkpoint is ``OUT.training`` (:func:`leanfm.training.prepare_run`'s rule).
    """
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    speech.espeak_binary()
    text_model = text_encoder(config.frozen)
    texts = speech.training_texts(config.phrases, config.sentences)
    torch.manual_seed(config.seed)
    encoder: SpeechEncoder | WhisperTower = (WhisperTower(out_dim=text_model.dim) if config.tower == "whisper"
                                             else SpeechEncoder())
    if not context.is_main:
        context.barrier()  # rank 0 synthesises (and caches) first
    data: speech.SpeechSet | WhisperFeatures
    if isinstance(encoder, WhisperTower):
        data = whisper_speech_set(encoder, texts, texts, speech.train_voices(), seed=0, renditions=config.renditions,
                                  name="austen")
        seconds = data.seconds
    else:
        data = speech.build_speech_set(texts, texts, speech.train_voices(), seed=0, renditions=config.renditions,
                                       name="austen")
        seconds = speech.seconds_of(data)
    if context.is_main:
        context.barrier()
    targets = embed_texts(text_model, data.labels)
    summary = train_aligned(encoder, data.batch, targets, config, checkpoint, resume, context)
    metrics = {**evaluate_speech(encoder, text_model), **validate_speech(encoder, text_model)} if context.is_main \
        else {}
    meta = {"kind": "whisper" if config.tower == "whisper" else "speech", "frozen": config.frozen,
            "train": config.to_dict(), "training": summary, "metrics": metrics,
            "data": {"phrases": config.phrases, "sentences": config.sentences, "renditions": config.renditions,
                     "utterances": len(data), "hours": round(seconds / 3600, 3),
                     "voices": list(speech.train_voices())}}
    if context.is_main:
        save_encoder(out, encoder, meta)
    context.barrier()
    return meta


def align_image(config: ImageAlignConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                context: DistributedContext | None = None) -> dict[str, Any]:
    """Render captioned shapes (held-out combinations excluded), align a ViT to ``frozen``, evaluate, save."""
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    text_model = text_encoder(config.frozen)
    train_combos, _ = shapes.split_combinations(config.seed)
    train_combos, validation_combos = shapes.split_validation(train_combos, config.validation, config.seed)
    images, captions = shapes.render_set(train_combos, config.per_combo, seed=config.seed)
    targets = embed_texts(text_model, captions)
    torch.manual_seed(config.seed)
    encoder = ImageEncoder()
    summary = train_aligned(encoder, lambda rows: images[rows], targets, config, checkpoint, resume, context)
    metrics = {**evaluate_image(encoder, text_model, config.seed),
               **validate_image(encoder, text_model, validation_combos, config.seed)} if context.is_main else {}
    meta = {"kind": "image", "frozen": config.frozen, "train": config.to_dict(), "training": summary,
            "metrics": metrics,
            "data": {"images": len(captions), "train_combinations": len(train_combos), "per_combo": config.per_combo,
                     "validation_combinations": len(validation_combos)}}
    if context.is_main:
        save_encoder(out, encoder, meta)
    context.barrier()
    return meta


@dataclass
class PoolAlignConfig(AlignConfig):
    """``leanfm czsl pretrain``: align a fresh image tower to the frozen text encoder on a captioned image pool."""

    loss: str = option("clip", "clip (a CLIP-style base, the default) or cwcl", choices=LOSSES)
    frozen: str = option("minilm-l6", "frozen text encoder (a registered sentence encoder)")
    hidden: int = option(128, "width of the image tower's ViT")
    layers: int = option(3, "layers of the image tower's ViT")
    heads: int = option(4, "attention heads of the image tower's ViT")
    image_size: int = option(32, "image side in pixels (patch 4)")

    def validate(self) -> None:
        super().validate()
        check_text_encoder(self.frozen)
        check_at_least(self, 1, "hidden", "layers", "heads")
        check_at_least(self, 4, "image_size")
        if self.hidden % self.heads or self.image_size % 4:
            raise LeanfmError(f"hidden {self.hidden} / heads {self.heads} / image size {self.image_size} invalid; "
                              "accepted: hidden divisible by heads, image size divisible by 4")


def align_pool(config: PoolAlignConfig, images: torch.Tensor, captions: list[str], out: str | Path, *,
               resume: bool = False, overwrite: bool = False, context: DistributedContext | None = None,
               data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Align a new :class:`ImageEncoder` on ``images`` ``[N, 3, H, W]`` and their ``captions``, save it to ``out``
    (an aligned-encoder folder whose ``logit_scale`` is the learned 1/tau: a CLIP-like base for prompt tuning)."""
    if len(captions) != images.shape[0] or not captions:
        raise LeanfmError(f"{images.shape[0]} images and {len(captions)} captions; accepted: equal, non-zero counts")
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    text_model = text_encoder(config.frozen)
    unique = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(unique)}
    targets = embed_texts(text_model, unique)[torch.tensor([row[c] for c in captions])]  # [N, d], one pass per text
    torch.manual_seed(config.seed)
    encoder = ImageEncoder(out_dim=text_model.dim, hidden=config.hidden, layers=config.layers, heads=config.heads,
                           image_size=config.image_size)
    summary = train_aligned(encoder, lambda rows: images[rows], targets, config, checkpoint, resume, context)
    taus = [row["tau"] for row in summary["history"] if "tau" in row]
    meta = {"kind": "image", "frozen": config.frozen, "train": config.to_dict(), "training": summary,
            "logit_scale": 1 / taus[-1] if taus else 1 / config.tau,
            "data": {"images": len(captions), "captions": len(unique), **(data or {})}}
    if context.is_main:
        save_encoder(out, encoder, meta)
    context.barrier()
    return meta


SYNTHESISERS = {"espeak-ng": speech.EVAL_VOICES, "flite": speech.UNSEEN_SYNTH_VOICES}


def evaluate_folder(folder: str | Path, synthesiser: str = "espeak-ng") -> dict[str, Any]:
    """Re-run the zero-shot evaluation of a saved encoder; a speech one's tests spoken by ``synthesiser``
    (``flite``: an engine no training voice comes from; its tests only, validation is espeak-ng's)."""
    if synthesiser not in SYNTHESISERS:
        raise LeanfmError(f"unknown synthesiser '{synthesiser}'; accepted: {', '.join(SYNTHESISERS)}")
    encoder, meta = load_encoder(folder)
    text_model = text_encoder(meta["frozen"])
    if meta["kind"] in ("speech", "whisper"):
        if synthesiser != "espeak-ng":
            return evaluate_speech(encoder, text_model, SYNTHESISERS[synthesiser])
        return {**evaluate_speech(encoder, text_model), **validate_speech(encoder, text_model)}
    if synthesiser != "espeak-ng":
        raise LeanfmError(f"synthesiser '{synthesiser}' is for speech encoders; '{folder}' holds an image encoder")
    seed = meta["train"]["seed"]
    train_combos, _ = shapes.split_combinations(seed)
    _, validation_combos = shapes.split_validation(train_combos, meta["train"].get("validation", 0.0), seed)
    return {**evaluate_image(encoder, text_model, seed), **validate_image(encoder, text_model, validation_combos, seed)}


register_method("cwcl-speech", "train", SpeechAlignConfig, align_speech,
                description="CWCL: align a speech encoder (espeak-ng) to a frozen text encoder")
register_method("cwcl-image", "train", ImageAlignConfig, align_image,
                description="CWCL: align an image encoder (rendered shapes) to a frozen text encoder")
