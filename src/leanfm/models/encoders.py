"""Encoders shared by methods: a frozen sentence encoder and two small trainable towers (speech, image).

* :class:`TextEncoder` embeds texts with a registered ``sentence-encoder`` model (``minilm-l6``) through
  sentence-transformers; names and folders come from :mod:`leanfm.models.registry` (one source of truth).
* :class:`SpeechEncoder` (log-mel frames -> one vector) and :class:`ImageEncoder` (a transformers ``ViTModel``,
  so prompt tuning can insert prompts into its layers) are trained from scratch: CWCL aligns them to the
  frozen text space; compositional SLU and MMPT reuse them.
* :class:`WhisperTower` is the pretrained alternative to :class:`SpeechEncoder` (CWCL's paper aligns pretrained
  towers): Whisper tiny.en's encoder cropped to 3 s, frozen but for its top layer, plus a projection.

Each trainable tower keeps its constructor arguments in ``.config`` so a saved one can be rebuilt.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save
from sentence_transformers import SentenceTransformer
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertModel, ViTConfig, ViTModel

from leanfm.errors import LeanfmError
from leanfm.models.registry import list_models, load_model, minilm_folder, model_spec
from leanfm.models.whisper import crop_encoder, load_whisper
from leanfm.paths import atomic_directory, atomic_write_bytes

SENTENCE_ENCODER = "sentence-encoder"  # the ModelSpec.kind a frozen text encoder must have
BERT_ENCODERS = ("minilm-l6", "tiny-bert")  # fine-tunable BERT bodies: the real MiniLM, a random one for tests


def minilm_tokenizer() -> Any:
    """MiniLM's WordPiece tokenizer (also the tiny random BERT's)."""
    return AutoTokenizer.from_pretrained(minilm_folder())


def bert_encoder(name: str, attention: str = "sdpa") -> tuple[BertModel, Any]:
    """A fine-tunable BERT body and its tokenizer: the pretrained MiniLM through the model registry, or a seeded
    random 2-layer BERT (``tiny-bert``, 32 wide) that shares MiniLM's vocabulary, for fast tests."""
    if name == "minilm-l6":
        loaded, tokenizer = load_model("minilm-l6")
        if not isinstance(loaded, BertModel):
            raise LeanfmError(f"minilm-l6 loaded as {type(loaded).__name__}; accepted: a transformers BertModel")
        model = loaded
    elif name == "tiny-bert":
        tokenizer = minilm_tokenizer()
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=256)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertModel(config)
    else:
        raise LeanfmError(f"unknown encoder '{name}'; accepted: {', '.join(BERT_ENCODERS)}")
    model.set_attn_implementation(attention)
    return model, tokenizer


def text_encoder_names() -> list[str]:
    """Registered models usable as the frozen text encoder, in registration order."""
    return [spec.name for spec in list_models() if spec.kind == SENTENCE_ENCODER and spec.folder is not None]


def check_text_encoder(name: str) -> str:
    """``name`` if it is a registered sentence encoder, else a one-line error (cheap: loads nothing)."""
    names = text_encoder_names()
    if name not in names:
        raise LeanfmError(f"unknown frozen model '{name}'; accepted: {', '.join(names)}")
    return name


class TextEncoder:
    """A frozen sentence encoder: ``encoder(texts)`` -> unit-norm embeddings ``[N, d]`` (float32, CPU).

    sentence-transformers runs the model's own pipeline (for all-MiniLM-L6-v2: Transformer -> mean pooling ->
    Normalize, from its ``modules.json``), so pooling and truncation are the checkpoint's, not ours.
    """

    def __init__(self, model: SentenceTransformer) -> None:
        self.model = model.eval()
        self.dim = int(model.get_embedding_dimension() or 0)  # width of the pooled embedding

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 128) -> torch.Tensor:
        """Unit-norm embeddings ``[len(texts), d]`` in the order of ``texts``."""
        if not texts:
            return torch.empty(0, self.dim)
        embeddings = self.model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                                       normalize_embeddings=True, show_progress_bar=False)
        return embeddings.float().cpu()


def text_encoder(name: str = "minilm-l6", device: str = "cpu") -> TextEncoder:
    """The frozen text encoder ``name`` (a registered sentence encoder with a folder), in eval mode."""
    folder = model_spec(check_text_encoder(name)).folder
    assert folder is not None  # check_text_encoder accepts only encoders with a folder
    return TextEncoder(SentenceTransformer(str(folder()), device=device))


def embed_texts(encoder: TextEncoder, texts: list[str]) -> torch.Tensor:
    """Unit-norm embeddings ``[N, d]`` (float32, CPU) of ``texts`` by the frozen ``encoder``."""
    return encoder(texts)


class SpeechEncoder(nn.Module):
    """log-mel ``[B, T, n_mels]`` -> conv front-end (8x down-sampling) -> transformer -> masked mean -> ``[B, out]``.

    Sized for CPU training (128 wide, 3 layers): the first version (192 wide, 4 layers, 4x down-sampling) took
    over 2 s per batch of 128 utterances on 2 cores. ``n_mels`` defaults to :mod:`leanfm.data.speech`'s 64 bands.
    """

    def __init__(self, out_dim: int = 384, width: int = 128, layers: int = 3, heads: int = 4,
                 max_frames: int = 1024, n_mels: int = 64) -> None:
        super().__init__()
        self.config = {"out_dim": out_dim, "width": width, "layers": layers, "heads": heads, "max_frames": max_frames,
                       "n_mels": n_mels}
        self.norm_in = nn.LayerNorm(n_mels)
        self.front = nn.ModuleList([nn.Conv1d(n_mels if i == 0 else width, width, 5, stride=2, padding=2)
                                    for i in range(3)])  # 8x down-sampling: 80 ms per token
        self.position = nn.Parameter(torch.zeros(1, max_frames // 8 + 1, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout=0.1, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``features`` ``[B, T, n_mels]`` zero-padded after ``lengths``; padding never changes the output."""
        x = self.norm_in(features).transpose(1, 2)  # [B, n_mels, T]
        valid_len = lengths.to(x.device)
        for conv in self.front:  # zero the padded frames before each conv, as a conv on the unpadded input sees
            x = x * (torch.arange(x.shape[-1], device=x.device)[None] < valid_len[:, None])[:, None]
            x = nn.functional.gelu(conv(x))
            valid_len = torch.div(valid_len + 1, 2, rounding_mode="floor")
        x = x.transpose(1, 2)[:, : self.position.shape[1]]  # [B, T/8, width]
        steps = valid_len.clamp(1, x.shape[1])
        valid = torch.arange(x.shape[1], device=x.device)[None] < steps[:, None]  # [B, T/8]
        x = self.transformer(x + self.position[:, : x.shape[1]], src_key_padding_mask=~valid)
        x = self.norm_out(x) * valid[..., None]
        return self.proj(x.sum(1) / steps[:, None])


class ImageEncoder(nn.Module):
    """A small transformers ViT (patch 4: 64 tokens at 32 px) whose class token is projected to ``out_dim``.

    Pixels in [0, 1] are centred and scaled, ``(x - 0.5) / 0.25``, before the patch embedding.
    """

    def __init__(self, out_dim: int = 384, hidden: int = 128, layers: int = 3, heads: int = 4,
                 image_size: int = 32) -> None:
        super().__init__()
        self.config = {"out_dim": out_dim, "hidden": hidden, "layers": layers, "heads": heads, "image_size": image_size}
        self.vit = ViTModel(ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=hidden,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=2 * hidden), add_pooling_layer=False)
        self.proj = nn.Linear(hidden, out_dim)

    def forward(self, images: torch.Tensor, prompts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``images`` ``[B, 3, H, W]`` in [0, 1] -> ``[B, out_dim]``.

        ``prompts[l]`` ``[n, hidden]`` (MaPLe-style deep visual prompts): before layer ``l`` the ``n`` prompt tokens
        are appended after the patch tokens, replacing the previous layer's prompt outputs (``l > 0``). Prompts
        only reach the output through attention; with none (or all empty) this is the plain ViT.
        """
        if not prompts or all(p.shape[0] == 0 for p in prompts):
            cls = self.vit(pixel_values=(images - 0.5) / 0.25).last_hidden_state[:, 0]  # [B, hidden]
            return self.proj(cls)
        if len(prompts) > len(self.vit.layers):
            raise LeanfmError(f"{len(prompts)} prompt depths for a {len(self.vit.layers)}-layer ViT; "
                              f"accepted: at most {len(self.vit.layers)}")
        x = self.vit.embeddings((images - 0.5) / 0.25)  # [B, 1 + P, hidden]
        tokens = x.shape[1]
        for depth, layer in enumerate(self.vit.layers):
            if depth < len(prompts):
                prompt = prompts[depth].to(x.dtype).expand(x.shape[0], -1, -1)  # [B, n, hidden]
                x = torch.cat([x[:, :tokens], prompt], dim=1)  # [B, 1 + P + n, hidden]
            x = layer(x, None)
        cls = self.vit.layernorm(x)[:, 0]  # [B, hidden]
        return self.proj(cls)


class WhisperTower(nn.Module):
    """Whisper tiny.en's encoder as a speech tower: log-mel ``[B, 80, frames]`` -> ``[B, out_dim]``.

    Split in two so training runs one layer (the paper aligns pretrained towers; training a projection plus the
    top layer is the issue's choice):

    * :meth:`body` (frozen, no gradient): the encoder cropped to ``frames`` mel frames (``frames / 2`` positions,
      :func:`leanfm.models.whisper.crop_encoder`) up to the *input* of its top layer, over the whole window
      (silence included, as Whisper always runs). Its output depends only on the clip, so callers compute it once
      per clip and cache it (``leanfm.align.pipeline``).
    * :meth:`forward` (trained): the top layer, Whisper's final LayerNorm, a mean over the clip's real positions,
      then ``proj``. Our reading: the top layer attends only to the real positions (keys of the padding are
      masked), so a cache may keep the real positions alone and the output does not depend on how a batch is
      padded.

    ``state_dict`` holds only the trained parts (top layer, final norm, ``proj``); the frozen body is rebuilt from
    the cached Whisper checkpoint (:func:`leanfm.models.whisper.load_whisper`), never copied into a tower folder.
    """

    def __init__(self, out_dim: int = 384, frames: int = 300) -> None:
        super().__init__()
        if frames < 2 or frames % 2 or frames > 3000:
            raise LeanfmError(f"Whisper tower of {frames} mel frames; accepted: an even number from 2 to 3000")
        self.config = {"out_dim": out_dim, "frames": frames}
        model, _ = load_whisper()
        self.whisper = crop_encoder(model.model.encoder, frames // 2)
        self.whisper.requires_grad_(False)
        self.whisper.layers[-1].requires_grad_(True)
        self.whisper.layer_norm.requires_grad_(True)
        self.proj = nn.Linear(self.whisper.config.d_model, out_dim)
        self.frozen_keys = {k for k, v in self.named_parameters() if not v.requires_grad} | {
            k for k, _ in self.named_buffers()}
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_post_hook(_frozen_not_missing)

    @property
    def top(self) -> nn.Module:
        """Whisper's top encoder layer (trained)."""
        return cast(nn.ModuleList, self.whisper.layers)[-1]

    @property
    def positions(self) -> int:
        """Encoder positions of the cropped window (``frames / 2``)."""
        return int(self.config["frames"]) // 2

    @torch.no_grad()
    def body(self, mel: torch.Tensor) -> torch.Tensor:
        """``[B, 80, frames]`` log-mel -> ``[B, frames / 2, d]``, the input of the top layer (no gradient)."""
        w = self.whisper
        x = nn.functional.gelu(w.conv2(nn.functional.gelu(w.conv1(mel)))).transpose(1, 2)  # [B, P, d]
        x = x + w.embed_positions.weight
        for layer in list(cast(nn.ModuleList, w.layers))[:-1]:
            x = layer(x, None)
        return x

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``hidden`` ``[B, T, d]`` (body outputs, real positions first) and ``lengths`` ``[B]`` (real positions,
        1..T) -> ``[B, out_dim]``; positions at or after ``lengths`` never change the output."""
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths.to(hidden.device)[:, None]
        mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None]  # [B, 1, 1, T] additive
        x = self.whisper.layer_norm(self.top(hidden, mask)) * valid[..., None]
        return self.proj(x.sum(1) / valid.sum(1, keepdim=True))

    def embed(self, mel: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The uncached path: :meth:`forward` of :meth:`body`, cut to the longest clip's real positions."""
        return self(self.body(mel)[:, : int(lengths.max())], lengths)


def _drop_frozen(module: WhisperTower, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """``state_dict`` hook: the frozen body is Whisper's checkpoint, not the tower's."""
    for key in module.frozen_keys:
        state.pop(prefix + key, None)


def _frozen_not_missing(module: WhisperTower, incompatible: Any) -> None:
    """``load_state_dict`` hook: a tower's weights never include the frozen body, so it is not missing."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if not any(k == f or k.endswith("." + f) for f in module.frozen_keys)]


TOWER_KINDS = ("speech", "image", "whisper")


def build_tower(kind: str, config: dict[str, Any]) -> nn.Module:
    """A fresh tower of ``kind`` from its saved constructor arguments (``whisper`` loads the cached checkpoint)."""
    if kind not in TOWER_KINDS:
        raise LeanfmError(f"unknown aligned encoder kind '{kind}'; accepted: {', '.join(TOWER_KINDS)}")
    towers: dict[str, type[nn.Module]] = {"speech": SpeechEncoder, "image": ImageEncoder, "whisper": WhisperTower}
    return towers[kind](**config)


def save_tower(out: Path, encoder: nn.Module, meta: dict[str, Any]) -> Path:
    """Write an aligned tower's folder atomically: ``encoder.safetensors`` (weights) and ``align.json``
    (``meta`` plus the constructor arguments under ``encoder``). ``leanfm align`` writes these; MMPT reads them."""
    if out.exists():
        shutil.rmtree(out)
    with atomic_directory(out) as tmp:
        atomic_write_bytes(tmp / "encoder.safetensors",
                           save({k: v.contiguous() for k, v in encoder.state_dict().items()}))
        (tmp / "align.json").write_text(json.dumps({**meta, "encoder": encoder.config}, indent=2) + "\n")
    return out


def load_tower(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a saved aligned tower: (module in eval mode, metadata)."""
    folder = Path(folder)
    if not (folder / "align.json").is_file():
        raise LeanfmError(f"'{folder}' is not an aligned encoder (align.json missing); create one with "
                          "'leanfm align speech|image --out DIR' or 'leanfm czsl pretrain'")
    try:
        meta = json.loads((folder / "align.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeanfmError(f"'{folder / 'align.json'}' is not valid JSON ({err})") from None
    encoder = build_tower(meta.get("kind", ""), meta["encoder"])
    encoder.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    return encoder.eval(), meta
