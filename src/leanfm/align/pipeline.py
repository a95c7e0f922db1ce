"""End-to-end alignments behind ``leanfm align``: speech or images into a frozen text encoder's space.

The data (:mod:`leanfm.data.speech`, :mod:`leanfm.data.shapes`), the towers and the frozen text encoder
(:mod:`leanfm.models.encoders`) and the zero-shot metric (:mod:`leanfm.eval.zero_shot`) live in the shared
layers; this module only puts them together: build the data, train with CWCL or CLIP, evaluate, save, load.

An aligned encoder is saved as a folder: ``encoder.safetensors`` (weights), ``align.json`` (what it is, how it
was trained, the frozen model and the zero-shot metrics). :func:`load_encoder` rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.align.cwcl import LOSSES
from leanfm.align.trainer import AlignConfig, train_aligned
from leanfm.config import check_at_least, option, register_method
from leanfm.data import shapes, speech
from leanfm.errors import LeanfmError
from leanfm.eval.zero_shot import zero_shot_accuracy
from leanfm.models.encoders import (
    TOWER_KINDS,
    ImageEncoder,
    SpeechEncoder,
    TextEncoder,
    check_text_encoder,
    embed_texts,
    load_tower,
    save_tower,
    text_encoder,
)
from leanfm.training import DistributedContext, init_distributed, prepare_run

__all__ = ["KINDS", "ImageAlignConfig", "PoolAlignConfig", "SpeechAlignConfig", "align_image", "align_pool",
           "align_speech", "check_text_encoder", "embed_texts", "evaluate_folder", "evaluate_image",
           "evaluate_speech", "load_encoder", "save_encoder", "text_encoder"]

KINDS = TOWER_KINDS
# An aligned encoder's folder format lives with the towers (models layer) so other methods can read it too.
save_encoder = save_tower
load_encoder = load_tower


@torch.no_grad()
def _encode_speech(encoder: nn.Module, data: speech.SpeechSet, batch: int = 64) -> torch.Tensor:
    encoder.eval()
    out = [encoder(*data.batch(torch.arange(i, min(i + batch, len(data))))) for i in range(0, len(data), batch)]
    return torch.cat(out)


@torch.no_grad()
def evaluate_speech(encoder: nn.Module, text_model: TextEncoder) -> dict[str, float]:
    """Zero-shot speech-to-intent and keyword accuracy (unseen voices and texts)."""
    intents, keywords = speech.intent_set(), speech.keyword_set()
    smart_home = speech.intent_set(intents=speech.SMART_HOME_INTENTS)
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


@dataclass
class SpeechAlignConfig(AlignConfig):
    """``leanfm align speech``: the optimisation settings plus the frozen model and the speech to synthesise."""

    frozen: str = option("minilm-l6", "frozen text encoder (a registered sentence encoder)")
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

    def validate(self) -> None:
        super().validate()
        check_text_encoder(self.frozen)
        check_at_least(self, 1, "per_combo")


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
    if not context.is_main:
        context.barrier()  # rank 0 synthesises (and caches) first
    data = speech.build_speech_set(texts, texts, speech.train_voices(), seed=0, renditions=config.renditions,
                                   name="austen")
    if context.is_main:
        context.barrier()
    targets = embed_texts(text_model, data.labels)
    torch.manual_seed(config.seed)
    encoder = SpeechEncoder()
    summary = train_aligned(encoder, data.batch, targets, config, checkpoint, resume, context)
    metrics = evaluate_speech(encoder, text_model) if context.is_main else {}
    meta = {"kind": "speech", "frozen": config.frozen, "train": config.to_dict(), "training": summary,
            "metrics": metrics,
            "data": {"phrases": config.phrases, "sentences": config.sentences, "renditions": config.renditions,
                     "utterances": len(data), "hours": round(speech.seconds_of(data) / 3600, 3),
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
    images, captions = shapes.render_set(train_combos, config.per_combo, seed=config.seed)
    targets = embed_texts(text_model, captions)
    torch.manual_seed(config.seed)
    encoder = ImageEncoder()
    summary = train_aligned(encoder, lambda rows: images[rows], targets, config, checkpoint, resume, context)
    metrics = evaluate_image(encoder, text_model, config.seed) if context.is_main else {}
    meta = {"kind": "image", "frozen": config.frozen, "train": config.to_dict(), "training": summary,
            "metrics": metrics,
            "data": {"images": len(captions), "train_combinations": len(train_combos), "per_combo": config.per_combo}}
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


def evaluate_folder(folder: str | Path) -> dict[str, Any]:
    """Re-run the zero-shot evaluation of a saved encoder."""
    encoder, meta = load_encoder(folder)
    text_model = text_encoder(meta["frozen"])
    if meta["kind"] == "speech":
        return evaluate_speech(encoder, text_model)
    return evaluate_image(encoder, text_model, meta["train"]["seed"])


register_method("cwcl-speech", "train", SpeechAlignConfig, align_speech,
                description="CWCL: align a speech encoder (espeak-ng) to a frozen text encoder")
register_method("cwcl-image", "train", ImageAlignConfig, align_image,
                description="CWCL: align an image encoder (rendered shapes) to a frozen text encoder")
