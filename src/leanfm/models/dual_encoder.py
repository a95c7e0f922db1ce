"""A frozen image-text dual encoder with room for prompts: the base model of prompt tuning (MMPT and its peers).

Prompt-tuning methods never change an encoder's weights; they change what goes *into* the towers. So the
interface a method sees is the towers' entry points, not their ``forward``:

* text: ``tokenize`` -> ``token_embeddings`` (the method replaces some positions with learnable vectors) ->
  ``encode_text(embeds, mask)`` -> unit-norm joint-space vectors;
* image: ``encode_image(pixels, prompts)`` with MaPLe-style deep visual prompts per layer.

:class:`TowerDualEncoder` is leanfm's own pair: the frozen MiniLM sentence encoder (BERT, mean pooling over the
mask, L2 norm — the all-MiniLM-L6-v2 pipeline, so ``encode_text`` of plain tokens equals what the image tower was
aligned to) and an image tower aligned to it by ``leanfm align`` / ``leanfm czsl pretrain``. ``leanfm.models.clip``
offers the same interface over a transformers ``CLIPModel``; :func:`load_base` picks by folder contents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn import functional
from transformers import BertModel

from leanfm.errors import LeanfmError
from leanfm.models.clip import CLIPDualEncoder, load_clip
from leanfm.models.encoders import BERT_ENCODERS, ImageEncoder, bert_encoder, load_tower

DEFAULT_TAU = 0.07  # CLIP's initial temperature, used when a base folder records none


class DualEncoder(Protocol):
    """What a prompt-tuning method needs from a frozen image-text model (every weight frozen)."""

    embed_dim: int
    text_width: int
    image_width: int
    image_layers: int
    image_size: int
    logit_scale: float  # the base model's 1 / tau

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...
    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def encode_text(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...
    def encode_image(self, pixels: torch.Tensor, prompts: list[torch.Tensor] | None = None) -> torch.Tensor: ...
    def parameters(self, recurse: bool = True) -> Any: ...


class TowerDualEncoder(nn.Module):
    """Frozen BERT sentence encoder (mean pooling, L2 norm) + an aligned :class:`ImageEncoder`."""

    def __init__(self, bert: BertModel, tokenizer: Any, image: ImageEncoder, logit_scale: float) -> None:
        super().__init__()
        self.bert, self.tokenizer, self.image = bert.eval(), tokenizer, image.eval()
        for param in self.parameters():
            param.requires_grad_(False)
        self.embed_dim = int(image.config["out_dim"])
        if self.embed_dim != bert.config.hidden_size:
            raise LeanfmError(f"image tower projects to {self.embed_dim} but the text encoder is "
                              f"{bert.config.hidden_size} wide; accepted: equal widths")
        self.text_width = int(bert.config.hidden_size)
        self.image_width = int(image.config["hidden"])
        self.image_layers = int(image.config["layers"])
        self.image_size = int(image.config["image_size"])
        self.logit_scale = float(logit_scale)

    def train(self, mode: bool = True) -> TowerDualEncoder:
        """Always eval: the towers are frozen, and dropout in a frozen tower would only add noise."""
        return super().train(False)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[B, T]`` with [CLS] ... [SEP], right-padded."""
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word-piece embeddings ``[B, T, text_width]`` (positions are added inside ``encode_text``)."""
        return self.bert.embeddings.word_embeddings(input_ids)

    def encode_text(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, w]`` -> unit-norm ``[B, embed_dim]``: BERT, mean over unmasked positions, L2 norm."""
        states = self.bert(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state  # [B, T, w]
        mask = attention_mask[..., None].to(states.dtype)  # [B, T, 1]
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1)  # [B, w]
        return functional.normalize(pooled.float(), dim=-1)

    def encode_image(self, pixels: torch.Tensor, prompts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> unit-norm ``[B, embed_dim]`` (resized to the tower's size if needed)."""
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return functional.normalize(self.image(pixels, prompts).float(), dim=-1)


def tower_logit_scale(meta: dict[str, Any]) -> float:
    """The base's 1/tau: ``logit_scale`` if recorded, else the last learned tau of its training, else 1/0.07."""
    if "logit_scale" in meta:
        return float(meta["logit_scale"])
    history = meta.get("training", {}).get("history") or []
    taus = [row["tau"] for row in history if "tau" in row]
    return 1 / float(taus[-1]) if taus else 1 / DEFAULT_TAU


def load_base(base: str | Path, device: str = "cpu") -> DualEncoder:
    """The frozen dual encoder in ``base``: an aligned image tower folder (``align.json``: paired with the text
    encoder it was aligned to), a transformers CLIP folder (``config.json``), or an open_clip weights file."""
    path = Path(base)
    if (path / "align.json").is_file():
        tower, meta = load_tower(path)
        if meta.get("kind") != "image":
            raise LeanfmError(f"'{path}' holds a {meta.get('kind')} tower; accepted: an image tower")
        frozen = meta.get("frozen", "minilm-l6")
        if frozen not in BERT_ENCODERS:
            raise LeanfmError(f"base text encoder '{frozen}' is unknown; accepted: {', '.join(BERT_ENCODERS)}")
        bert, tokenizer = bert_encoder(frozen)
        assert isinstance(tower, ImageEncoder)
        return TowerDualEncoder(bert, tokenizer, tower, tower_logit_scale(meta)).to(device)
    if (path / "config.json").is_file():
        model, tokenizer = load_clip(path, device)
        return CLIPDualEncoder(model, tokenizer)
    if path.is_file() and path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        raise LeanfmError(f"'{path}' is open_clip weights without a tokenizer; convert it first with "
                          "'leanfm czsl convert-openclip FILE --out DIR --tokenizer DIR'")
    raise LeanfmError(f"'{path}' is not a base model; accepted: a folder from 'leanfm czsl pretrain' (align.json), "
                      "a transformers CLIP folder (config.json)")

