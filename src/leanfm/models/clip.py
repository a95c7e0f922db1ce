"""A CLIP base model: transformers ``CLIPModel`` folders, open_clip weights mapped onto it, and a frozen dual encoder.

Why: MMPT (METHODS.md section 6) tunes prompts around a frozen image-text dual encoder. Besides leanfm's own
MiniLM + small-ViT pair (``dual_encoder.py``), a user with a real CLIP checkpoint must be able to plug it in:

- :func:`load_clip` reads a transformers CLIP folder (``config.json`` + safetensors or a ``.bin`` read with
  ``weights_only=True``; never remote code).
- :func:`load_openclip` reads an open_clip ViT checkpoint *without importing open_clip* (it pulls torchvision and a
  CUDA torch): :func:`openclip_config` infers the architecture from tensor shapes, :func:`openclip_to_transformers`
  renames every tensor (open_clip's fused ``attn.in_proj_weight`` = [q; k; v] rows, as ``nn.MultiheadAttention``
  stores them, is split; ``proj``/``text_projection`` are ``x @ P`` in open_clip, so transposed for ``nn.Linear``).
  Two things the weights do not say and the user must: the head count (open_clip's default head width is 64;
  ViT-H/g/bigG image towers use 80/88/104) and the activation — OpenAI's models (and open_clip's ``-quickgelu``
  ones) use QuickGELU, ``x * sigmoid(1.702 x)``; the rest exact GELU (``quick_gelu`` parameter).
  Text pooling: open_clip pools at ``argmax(token ids)``, the EOT token being the last vocabulary entry; we set
  ``eos_token_id = vocab_size - 1`` so transformers' "first EOT" pooling picks the same position.
- :class:`CLIPDualEncoder` exposes the same interface as leanfm's other dual encoder: token embeddings in, prompt
  vectors spliced by the caller, and MaPLe-style deep visual prompts inserted layer by layer.

Our reading (not in MaPLe's text, taken from its released code's layout): the first layer's visual prompts are
appended after the positional embeddings and pass through ``ln_pre`` with the patch tokens; deeper prompts replace
the previous layer's prompt outputs directly before their layer; after the last prompted layer the prompt outputs
flow on through the remaining layers. Images are resized (bicubic) to the model's square input, not centre-cropped.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from transformers.masking_utils import create_causal_mask

from leanfm.errors import LeanfmError
from leanfm.paths import atomic_directory

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIPDualEncoder",
    "convert_openclip",
    "load_clip",
    "load_openclip",
    "openclip_config",
    "openclip_to_transformers",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (open_clip's LAION models too)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
OPENCLIP_HEAD_WIDTH = 64  # open_clip's default width per attention head
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
# open_clip keys that carry no weights: the causal mask buffer and OpenAI's scalar metadata.
_IGNORED = {"attn_mask", "input_resolution", "context_length", "vocab_size"}
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
log = logging.getLogger(__name__)


def load_clip(folder: str | Path, device: str = "cpu") -> tuple[CLIPModel, Any]:
    """A transformers CLIP folder -> (model in eval mode on ``device``, its tokenizer or None when it has none)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise LeanfmError(f"{folder} is not a CLIP checkpoint: no config.json (expected a transformers CLIPModel "
                          "folder, e.g. one written by save_pretrained)")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise LeanfmError(f"{config_path} is not a JSON config: {err}") from None
    if model_type != "clip":
        raise LeanfmError(f"{folder} holds a {model_type!r} model, not a CLIP checkpoint (model_type 'clip')")
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        raise LeanfmError(f"{folder} has no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    model, info = cast(tuple[CLIPModel, dict[str, Any]], CLIPModel.from_pretrained(
        folder, weights_only=True, local_files_only=True, output_loading_info=True))
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise LeanfmError(f"{folder} lacks {len(missing)} CLIP weights (first: {missing[0]})")
    tokenizer = None
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    nn.Module.to(model, device)  # (transformers' wrapped ``to`` confuses mypy)
    return model.eval(), tokenizer


def _towers(config: CLIPConfig) -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """The two tower configs, typed (``CLIPConfig`` builds them in ``__post_init__``)."""
    text, vision = config.text_config, config.vision_config
    if not isinstance(text, CLIPTextConfig) or not isinstance(vision, CLIPVisionConfig):
        raise TypeError("CLIPConfig without text_config/vision_config objects")
    return text, vision


def _canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel's ``module.`` prefix and move a custom-text layout's ``text.*`` keys back to the top."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("text.") and key[5:].startswith(_TEXT_KEYS):
            key = key[5:]
        out[key] = value
    return out


def _layer_count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def _heads(width: int, heads: int | None, tower: str) -> int:
    heads = heads if heads is not None else max(1, width // OPENCLIP_HEAD_WIDTH)
    if heads < 1 or width % heads:
        raise LeanfmError(f"{tower}_heads={heads} does not divide the {tower} width {width}; pass the head count "
                          "of your open_clip model (width / head_width)")
    return heads


def _check_vit(state: dict[str, torch.Tensor]) -> None:
    if any(key.startswith(("visual.attnpool.", "visual.layer1.")) for key in state):
        raise LeanfmError("open_clip checkpoint has a ResNet image tower (visual.layer1/attnpool); only ViT towers "
                          "are supported")
    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                "token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight",
                "ln_final.weight", "text_projection"):
        if key not in state:
            raise LeanfmError(f"not an open_clip ViT CLIP state dict: {key} missing (timm or HF-text towers are "
                              "not supported)")


def openclip_config(state: dict[str, torch.Tensor], quick_gelu: bool = False, vision_heads: int | None = None,
                    text_heads: int | None = None) -> CLIPConfig:
    """The ``CLIPConfig`` an open_clip ViT state dict was built with, read from its tensor shapes.

    Head counts are not in the shapes: None means open_clip's default ``width // 64``. ``quick_gelu`` picks
    QuickGELU (OpenAI's models) over exact GELU.
    """
    state = _canonical(state)
    _check_vit(state)
    conv = state["visual.conv1.weight"]  # [width, 3, patch, patch]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    act = "quick_gelu" if quick_gelu else "gelu"
    vocab = state["token_embedding.weight"].shape[0]
    embed_dim = state["text_projection"].shape[1]
    vision = dict(hidden_size=width, patch_size=patch, image_size=patch * grid, hidden_act=act,
                  intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layer_count(state, "visual.transformer.resblocks."),
                  num_attention_heads=_heads(width, vision_heads, "vision"), projection_dim=embed_dim)
    text = dict(hidden_size=text_width, vocab_size=vocab, hidden_act=act,
                max_position_embeddings=state["positional_embedding"].shape[0],
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layer_count(state, "transformer.resblocks."),
                num_attention_heads=_heads(text_width, text_heads, "text"), projection_dim=embed_dim,
                eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0)
    logit_scale = float(state["logit_scale"]) if "logit_scale" in state else 2.6592
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim,
                      logit_scale_init_value=logit_scale)


def _block_names(src: str, dst: str) -> list[tuple[str, str]]:
    """(open_clip, transformers) name pairs of one residual block, q/k/v excepted."""
    pairs = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    return [(f"{src}{a}.{p}", f"{dst}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _tower_names(config: CLIPConfig) -> list[tuple[str, str]]:
    """Every (open_clip, transformers) name pair whose tensor is copied unchanged."""
    text, vision = _towers(config)
    v, t = "vision_model.", "text_model."
    pairs = [("visual.conv1.weight", v + "embeddings.patch_embedding.weight"),
             ("visual.class_embedding", v + "embeddings.class_embedding"),
             ("visual.positional_embedding", v + "embeddings.position_embedding.weight"),
             ("token_embedding.weight", t + "embeddings.token_embedding.weight"),
             ("positional_embedding", t + "embeddings.position_embedding.weight"),
             ("logit_scale", "logit_scale")]
    for src, dst in (("visual.ln_pre", v + "pre_layrnorm"), ("visual.ln_post", v + "post_layernorm"),
                     ("ln_final", t + "final_layer_norm")):
        pairs += [(f"{src}.{p}", f"{dst}.{p}") for p in ("weight", "bias")]
    for i in range(vision.num_hidden_layers):
        pairs += _block_names(f"visual.transformer.resblocks.{i}.", f"{v}encoder.layers.{i}.")
    for i in range(text.num_hidden_layers):
        pairs += _block_names(f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}.")
    return pairs


def _take(state: dict[str, torch.Tensor], key: str, used: set[str]) -> torch.Tensor:
    if key not in state:
        raise LeanfmError(f"open_clip state dict lacks {key} (is it a ViT CLIP with the layer count inferred?)")
    used.add(key)
    return state[key]


def openclip_to_transformers(state: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """open_clip names -> ``CLIPModel`` names; every input tensor used, every model weight filled (strict load)."""
    state, used = _canonical(state), set[str]()
    text, vision = _towers(config)
    out = {dst: _take(state, src, used) for src, dst in _tower_names(config)}
    blocks = [(f"visual.transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}.")
              for i in range(vision.num_hidden_layers)]
    blocks += [(f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}.")
               for i in range(text.num_hidden_layers)]
    for src, dst in blocks:  # nn.MultiheadAttention's fused in-projection: rows [q; k; v]
        for part in ("weight", "bias"):
            q, k, v = _take(state, f"{src}attn.in_proj_{part}", used).chunk(3, dim=0)
            for name, tensor in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{dst}self_attn.{name}.{part}"] = tensor.contiguous()
    # open_clip projects with x @ P, P [width, embed]; nn.Linear stores [embed, width].
    out["visual_projection.weight"] = _take(state, "visual.proj", used).t().contiguous()
    out["text_projection.weight"] = _take(state, "text_projection", used).t().contiguous()
    left = sorted(key for key in state if key not in used and key.rsplit(".", 1)[-1] not in _IGNORED)
    if left:
        raise LeanfmError(f"open_clip state dict has {len(left)} tensors CLIPModel has no place for (first: "
                          f"{left[0]}); layer scale, attention pooling and custom towers are not supported")
    return out


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LeanfmError(f"open_clip checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix not in (".bin", ".pt", ".pth"):
        raise LeanfmError(f"open_clip checkpoint {path}: expected .safetensors, .bin, .pt or .pth")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LeanfmError(f"{path} is not a weights-only state dict (OpenAI's TorchScript .pt archives are not "
                          f"read): {first}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LeanfmError(f"{path} does not hold a state dict of tensors (or a dict with a 'state_dict' key)")
    return obj


def load_openclip(path: str | Path, quick_gelu: bool = False, vision_heads: int | None = None,
                  text_heads: int | None = None) -> CLIPModel:
    """An open_clip ViT checkpoint as a float32 ``CLIPModel`` in eval mode (see :func:`openclip_config`)."""
    state = _canonical(_read_state(Path(path)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    config = openclip_config(state, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads)
    mapped = openclip_to_transformers(state, config)
    model = CLIPModel(config)
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise LeanfmError(f"{path}: open_clip weights do not fit the inferred CLIP config: "
                          f"{' '.join(str(err).split())[:300]}") from None
    vision = _towers(config)[1]
    log.info("open_clip %s: ViT %d layers, width %d, image %d", path, vision.num_hidden_layers,
             vision.hidden_size, vision.image_size)
    return model.eval()


def convert_openclip(weights: Path, out: Path, tokenizer: Path, quick_gelu: bool = False,
                     vision_heads: int | None = None, text_heads: int | None = None) -> Path:
    """Write an open_clip ViT checkpoint as a transformers CLIP folder (safetensors + the user's CLIP tokenizer), so
    ``--base OUT`` and stock transformers load it. The tokenizer must be a transformers CLIP tokenizer folder: open_clip
    ships its BPE vocabulary inside the package, not in the checkpoint."""
    if not tokenizer.is_dir() or not any((tokenizer / name).is_file() for name in _TOKENIZER_FILES):
        raise LeanfmError(f"'{tokenizer}' is not a tokenizer folder; accepted: a folder with "
                          f"{' or '.join(_TOKENIZER_FILES)}")
    model = load_openclip(weights, quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads)
    loaded = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    with atomic_directory(out) as tmp:
        model.save_pretrained(str(tmp))
        loaded.save_pretrained(str(tmp))
    return out


class CLIPDualEncoder(nn.Module):
    """A frozen ``CLIPModel`` behind leanfm's dual-encoder interface (prompt tuning trains only the caller's tensors).

    Freezing sets ``requires_grad=False`` on the given model's weights (it is shared, not copied); ``train()``
    keeps the base model in eval mode so its dropout, if any, stays off.
    """

    pixel_mean: torch.Tensor  # [1,3,1,1] buffers
    pixel_std: torch.Tensor

    def __init__(self, model: CLIPModel, tokenizer: Any) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        text, vision = _towers(model.config)
        self.embed_dim: int = cast(int, model.config.projection_dim)
        self.text_width: int = text.hidden_size
        self.image_width: int = vision.hidden_size
        self.image_layers: int = vision.num_hidden_layers
        self.image_size: int = cast(int, vision.image_size)
        self.context_length: int = text.max_position_embeddings
        self.logit_scale: float = float(model.logit_scale.detach().exp())
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.to(model.logit_scale.device)

    def train(self, mode: bool = True) -> CLIPDualEncoder:
        super().train(mode)
        self.model.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (input_ids [B,T], attention_mask [B,T]), right-padded, BOS ... EOT, truncated to the context."""
        if self.tokenizer is None:
            raise LeanfmError("this CLIP model has no tokenizer (its folder lacks tokenizer files); pass one")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                               return_tensors="pt")
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B,T] -> token embeddings [B,T,text_width], positions not yet added."""
        return self.model.text_model.embeddings.token_embedding(input_ids)

    def encode_text(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B,T,text_width] -> unit-norm [B,embed_dim], pooled at the last valid position (EOT).

        ``embeds + positions`` -> causal transformer (padding keys masked) -> final LN -> h[b, sum(mask_b) - 1]
        -> text projection -> L2 normalisation. Gradients flow to ``embeds`` (the caller's prompt vectors).
        """
        text = self.model.text_model
        batch, length = embeds.shape[:2]
        if length > self.context_length:
            raise LeanfmError(f"text of {length} tokens is longer than CLIP's context of {self.context_length}")
        last = attention_mask.long().sum(1) - 1  # [B]
        if bool((last < 0).any()):
            raise LeanfmError("encode_text: an attention_mask row has no valid token")
        positions = text.embeddings.position_embedding(text.embeddings.position_ids[:, :length])  # [1,T,W]
        hidden = embeds + positions
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)  # [B,T,W]
        pooled = hidden[torch.arange(batch, device=hidden.device), last]  # [B,W]
        return nn.functional.normalize(self.model.text_projection(pooled), dim=-1)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] -> resized to image_size (bicubic) and normalised with CLIP's mean/std."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise LeanfmError(f"pixels must be [B,3,H,W], got {list(pixels.shape)}")
        pixels = pixels.to(self.device, torch.float32)
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = nn.functional.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(0, 1)
        return (pixels - self.pixel_mean) / self.pixel_std

    def _check_prompts(self, prompts: list[torch.Tensor]) -> None:
        if len(prompts) > self.image_layers:
            raise LeanfmError(f"{len(prompts)} visual prompt layers given; the image tower has {self.image_layers}")
        for layer, prompt in enumerate(prompts):
            if prompt.ndim != 2 or prompt.shape[1] != self.image_width:
                raise LeanfmError(f"visual prompt {layer} must be [n, {self.image_width}], got {list(prompt.shape)}")

    def encode_image(self, pixels: torch.Tensor, prompts: list[torch.Tensor] | None = None) -> torch.Tensor:
        """pixels [B,3,H,W] in [0,1] -> unit-norm [B,embed_dim]; ``prompts[l]`` [n,image_width] enter before layer l.

        Layer 0's prompts are appended after the patch tokens before ``ln_pre``; prompts of layer l > 0 replace
        the previous prompt outputs. The CLS output -> ``ln_post`` -> visual projection -> L2 normalisation.
        """
        prompts = list(prompts or [])
        self._check_prompts(prompts)
        vision = self.model.vision_model
        hidden = vision.embeddings(self.preprocess(pixels))  # [B, 1+N, W]
        batch, tokens = hidden.shape[:2]
        if prompts:
            hidden = torch.cat([hidden, prompts[0].to(hidden).expand(batch, -1, -1)], dim=1)  # [B, 1+N+n, W]
        hidden = vision.pre_layrnorm(hidden)
        for layer, block in enumerate(vision.encoder.layers):
            if 0 < layer < len(prompts):
                hidden = torch.cat([hidden[:, :tokens], prompts[layer].to(hidden).expand(batch, -1, -1)], dim=1)
            hidden = block(hidden, None)
        pooled = vision.post_layernorm(hidden[:, 0])  # [B, W]
        return nn.functional.normalize(self.model.visual_projection(pooled), dim=-1)
