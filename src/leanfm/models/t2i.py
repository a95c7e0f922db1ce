"""A small text-to-image diffusion model: a diffusers ``UNet2DConditionModel`` on 32x32 RGB, conditioned by
cross-attention on the token states of a frozen BERT sentence encoder (MiniLM-L6: 384 wide).

Why this shape: no pretrained diffusion model exists offline, and C-LoRA / STAMINA customise the cross-attention
key/value projections of such a U-Net (the ones reading text features), so the model trained here has exactly
those layers. Defaults: levels of 32, 64, 64 channels at 32x32, 16x16 and 8x8, one ResNet per level, 8 heads,
a transformer block (self-attention, cross-attention to the caption, feed-forward) at 8x8 on the way down, in
the middle and on the way up — about 1.6M parameters. Cross-attention at 16x16 as well (``attention_levels=2``,
2.0M) doubled the cost of a training step on a CPU core (self-attention over 256 positions) for a model that
must train in a few CPU-hours.

Diffusion (DDPM, Ho et al. 2020): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with the cosine schedule
(``squaredcos_cap_v2``, 1000 steps); the U-Net predicts ``eps``. Sampling is DDIM (eta = 0, deterministic given
the initial noise) with "trailing" timestep spacing, so the first step starts at t = 999, from pure noise.
Classifier-free guidance (Ho & Salimans 2022): ``eps = eps(x, "") + g (eps(x, caption) - eps(x, ""))``, the
empty caption being the unconditional input the trainer drops captions to.

A saved model is a folder: ``t2i.json`` (format, :class:`T2IConfig`, anything the trainer adds), ``unet/``
(diffusers' ``config.json`` + ``diffusion_pytorch_model.safetensors``, so ``UNet2DConditionModel.from_pretrained``
reads it too) and ``scheduler/`` (the DDPM schedule), written atomically. A customised model (``leanfm continual
t2i``) adds ``tokens.safetensors``: its learned concept tokens (:class:`TokenCaptions`), one input embedding each.

Concept tokens (textual inversion's reading, which C-LoRA and STAMINA follow): a new token ``<c1>`` in a caption is
a new *input* embedding of the frozen caption encoder. The caption is tokenised with BERT's ``[MASK]`` in the
token's place and the mask's word-embedding row is replaced by the learned vector before BERT runs, so the token's
state is contextualised by the caption ("a picture of <c1>") exactly as a real word's would be, and the token is a
vector in the space of the vocabulary it joins. The other choice, writing the vector over the placeholder's output
state, would skip BERT (no gradient through it, a cheaper step) but lets the token be any point of the
cross-attention input space, where the key/value LoRA already acts; the input-side token costs one BERT
forward/backward of one caption per step, small beside the U-Net's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option
from leanfm.errors import LeanfmError
from leanfm.models.artifacts import MANIFEST, MAX_MB, REQUIRED
from leanfm.models.encoders import BERT_ENCODERS, bert_encoder
from leanfm.paths import atomic_directory, atomic_write_bytes, atomic_write_json, read_description
from leanfm.version import __version__

__all__ = ["FORMAT", "CaptionEncoder", "T2IConfig", "T2IModel", "TokenCaptions", "caption_encoder", "load_t2i",
           "load_tokens", "sample", "save_t2i", "write_t2i_artifact"]

FORMAT = "leanfm-t2i/1"
INFO_FILE = "t2i.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' own file name
TOKENS_FILE = "tokens.safetensors"


@dataclass
class T2IConfig(MethodConfig):
    """The architecture and noise schedule of a :class:`T2IModel` (saved in ``t2i.json``)."""

    width: int = option(32, "channels of the first U-Net level; the others have 2x (levels: w, 2w, 2w)")
    layers_per_block: int = option(1, "ResNet blocks per U-Net level")
    heads: int = option(8, "attention heads (must divide 2 x width)")
    attention_levels: int = option(1, "lowest-resolution levels with transformer blocks (1: 8x8; 2: 8x8 and 16x16)",
                                   choices=(1, 2))
    text_encoder: str = option("minilm-l6", "frozen caption encoder", choices=BERT_ENCODERS)
    cross_attention_dim: int = option(384, "width of the caption token states (MiniLM: 384)")
    max_tokens: int = option(24, "caption tokens read by cross-attention (longer captions are cut)")
    image_size: int = option(32, "image side in pixels")
    train_timesteps: int = option(1000, "diffusion steps of the DDPM schedule")
    beta_schedule: str = option("squaredcos_cap_v2", "DDPM noise schedule",
                                choices=("squaredcos_cap_v2", "linear", "scaled_linear"))

    def validate(self) -> None:
        check_at_least(self, 1, "width", "layers_per_block", "heads", "cross_attention_dim", "train_timesteps")
        check_at_least(self, 3, "max_tokens")
        if self.width % 4 or (2 * self.width) % self.heads:
            raise LeanfmError(f"width {self.width} with {self.heads} heads is invalid; accepted: a multiple of 4 "
                              "whose double is divisible by heads")
        if self.image_size < 8 or self.image_size % 4:
            raise LeanfmError(f"image_size {self.image_size} is invalid; accepted: a multiple of 4, at least 8")
        super().validate()


def build_unet(config: T2IConfig) -> UNet2DConditionModel:
    """A fresh U-Net for ``config`` (initialised from torch's RNG: seed it first).

    diffusers' ``attention_head_dim`` of this class is, for historical reasons, the number of heads.
    """
    w, attend = config.width, [False, config.attention_levels == 2, True]  # per level, highest resolution first
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=3, out_channels=3, block_out_channels=(w, 2 * w, 2 * w),
        layers_per_block=config.layers_per_block, norm_num_groups=w // 4,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        cross_attention_dim=config.cross_attention_dim, attention_head_dim=config.heads,
    )


class CaptionEncoder:
    """Frozen token states of captions: ``encoder(captions)`` -> (``[N, max_tokens, d]`` float32, ``[N, max_tokens]``
    bool mask), on the CPU, cached per caption (training reads the same few hundred captions again and again).

    The states are BERT's last hidden layer for ``[CLS] caption [SEP]`` padded to ``max_tokens``; the mask marks
    real tokens, so padding never reaches cross-attention. The empty caption is ``[CLS] [SEP]``.
    """

    def __init__(self, name: str = "minilm-l6", max_tokens: int = 24) -> None:
        self.bert, self.tokenizer = bert_encoder(name)
        self.bert.requires_grad_(False).eval()
        self.name, self.max_tokens = name, max_tokens
        self.dim = int(self.bert.config.hidden_size)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``[N, max_tokens]`` (padded, cut at ``max_tokens``)."""
        return self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_tokens,
                              return_tensors="pt")

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        for start in range(0, len(todo), 256):
            chunk = todo[start : start + 256]
            tokens = self.tokenize(chunk)
            states = self.bert(**tokens).last_hidden_state.float()  # [n, max_tokens, d]
            for i, caption in enumerate(chunk):
                self.cache[caption] = (states[i].clone(), tokens["attention_mask"][i].bool())
        if not captions:
            return torch.empty(0, self.max_tokens, self.dim), torch.empty(0, self.max_tokens, dtype=torch.bool)
        states, masks = zip(*(self.cache[c] for c in captions), strict=True)
        return torch.stack(states), torch.stack(masks)


@functools.cache
def caption_encoder(name: str = "minilm-l6", max_tokens: int = 24) -> CaptionEncoder:
    """The shared frozen :class:`CaptionEncoder` ``name`` (loaded once per process)."""
    return CaptionEncoder(name, max_tokens)


class TokenCaptions:
    """Caption states where learned concept tokens (``<c1>``, ...) stand for new input embeddings (module docstring).

    ``tokens``: token string -> vector ``[d]`` (the caption encoder's width). Calling it like a
    :class:`CaptionEncoder` (what :func:`sample` does) gives ``(states [N, L, d], mask [N, L])`` with every known
    token injected, cached per caption; a caption without tokens is the plain encoder's. :meth:`states` is the
    differentiable path a trainer uses, with the vectors it is learning.
    """

    def __init__(self, encoder: CaptionEncoder, tokens: dict[str, torch.Tensor] | None = None) -> None:
        self.encoder = encoder
        self.tokens = {k: v.detach().float().cpu() for k, v in (tokens or {}).items()}
        self.max_tokens, self.dim = encoder.max_tokens, encoder.dim
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _split(self, caption: str, known: dict[str, torch.Tensor]) -> tuple[str, list[str]]:
        """The caption with each known token word replaced by ``[MASK]``, and those tokens in order."""
        mask_word = self.encoder.tokenizer.mask_token
        words = caption.split(" ")
        used = [w for w in words if w in known]
        if any(w == mask_word for w in words):
            raise LeanfmError(f"caption '{caption}' holds {mask_word}; accepted: captions without it")
        return " ".join(mask_word if w in known else w for w in words), used

    def states(self, caption: str, vectors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states [1, L, d], mask [1, L])`` of one caption whose tokens are ``vectors`` (token -> ``[d]``);
        gradients flow to the vectors through the frozen BERT."""
        text, used = self._split(caption, vectors)
        ids = self.encoder.tokenize([text])
        slots = (ids["input_ids"][0] == self.encoder.tokenizer.mask_token_id).nonzero().flatten()
        if len(slots) != len(used):  # cut off at max_tokens
            raise LeanfmError(f"caption '{caption}' is longer than {self.max_tokens} tokens; accepted: a shorter one")
        bert = self.encoder.bert
        device = next(bert.parameters()).device
        embeds = bert.get_input_embeddings()(ids["input_ids"].to(device))  # [1, L, d]
        if used:
            embeds = embeds.clone()
            embeds[0, slots.to(device)] = torch.stack([vectors[w].to(device, embeds.dtype) for w in used])  # [k, d]
        out = bert(inputs_embeds=embeds, attention_mask=ids["attention_mask"].to(device),
                   token_type_ids=ids["token_type_ids"].to(device)).last_hidden_state.float()
        return out, ids["attention_mask"].to(device).bool()

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        plain = [c for c in captions if not any(w in self.tokens for w in c.split(" "))]
        base = dict(zip(plain, zip(*self.encoder(plain), strict=True), strict=True)) if plain else {}
        for caption in captions:
            if caption not in base and caption not in self.cache:
                states, mask = self.states(caption, self.tokens)
                self.cache[caption] = (states[0].cpu(), mask[0].cpu())
        if not captions:
            return self.encoder([])
        rows = [base[c] if c in base else self.cache[c] for c in captions]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


class T2IModel(nn.Module):
    """The U-Net (``unet``, the only weights) with its DDPM schedule (``noise_scheduler``) and ``config``.

    ``unet`` and the schedulers are typed ``Any``: mypy does not see diffusers' classes as ``nn.Module`` /
    scheduler mixins (their bases are assembled at import time).
    """

    def __init__(self, config: T2IConfig) -> None:
        super().__init__()
        self.config = config
        self.unet: Any = build_unet(config)
        self.noise_scheduler: Any = DDPMScheduler(num_train_timesteps=config.train_timesteps,
                                             beta_schedule=config.beta_schedule, prediction_type="epsilon")

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Predicted noise ``[B, 3, S, S]`` for ``noisy`` images at ``timesteps`` ``[B]`` given caption ``states``
        ``[B, L, d]`` and their ``mask`` ``[B, L]``."""
        return self.unet(noisy, timesteps, encoder_hidden_states=states, encoder_attention_mask=mask).sample

    def add_noise(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` for images in [-1, 1]."""
        return self.noise_scheduler.add_noise(images, noise, timesteps)

    def sampler(self) -> Any:
        """A fresh DDIM scheduler on this model's betas (eta 0, trailing spacing, samples clipped to [-1, 1])."""
        return DDIMScheduler.from_config(self.noise_scheduler.config, timestep_spacing="trailing", clip_sample=True)

    def parameter_count(self) -> int:
        """Parameters of the U-Net (the frozen caption encoder is not part of the model)."""
        return sum(p.numel() for p in self.unet.parameters())


def _guided(model: T2IModel, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
            null: tuple[torch.Tensor, torch.Tensor], guidance: float) -> torch.Tensor:
    """Classifier-free guided noise ``eps_u + g (eps_c - eps_u)``; one batched forward for both halves."""
    steps = t.expand(x.shape[0])
    if guidance == 1.0:
        return model(x, steps, *cond)
    if guidance == 0.0:
        return model(x, steps, *null)
    n = x.shape[0]
    states = torch.cat([null[0].expand(n, -1, -1), cond[0]])  # [2n, L, d]: unconditional half first
    mask = torch.cat([null[1].expand(n, -1), cond[1]])
    eps_u, eps_c = model(torch.cat([x, x]), torch.cat([steps, steps]), states, mask).chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def sample(model: T2IModel, captions: list[str], steps: int = 50, guidance: float = 3.0, seed: int = 0,
           encoder: CaptionEncoder | TokenCaptions | None = None, batch_size: int = 64) -> torch.Tensor:
    """Images ``[len(captions), 3, S, S]`` in [0, 1], one per caption (repeat a caption for several).

    Deterministic: the initial noise of image ``i`` is row ``i`` of one seeded draw (independent of
    ``batch_size``) and DDIM with eta = 0 adds no other noise. Runs on the model's device in float32.
    """
    if steps < 1:
        raise LeanfmError(f"steps {steps} is invalid; accepted: an integer >= 1")
    if guidance < 0:
        raise LeanfmError(f"guidance {guidance} is invalid; accepted: a number >= 0")
    model.eval()
    encoder = encoder or caption_encoder(model.config.text_encoder, model.config.max_tokens)
    device = next(model.parameters()).device
    size = model.config.image_size
    noise = torch.randn(len(captions), 3, size, size, generator=torch.Generator().manual_seed(seed))
    null = tuple(t.to(device) for t in encoder([""]))
    out = []
    for start in range(0, len(captions), batch_size):
        cond = tuple(t.to(device) for t in encoder(captions[start : start + batch_size]))
        x = noise[start : start + batch_size].to(device)
        scheduler = model.sampler()
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            eps = _guided(model, x, t.to(device), cond, null, guidance)  # type: ignore[arg-type]
            x = scheduler.step(eps, int(t), x).prev_sample
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    return torch.cat(out) if out else torch.empty(0, 3, size, size)


def save_t2i(model: T2IModel, folder: str | Path, extra: dict[str, Any] | None = None,
             dtype: torch.dtype = torch.float32, files: dict[str, Any] | None = None,
             tokens: dict[str, torch.Tensor] | None = None, blobs: dict[str, bytes] | None = None) -> Path:
    """Write the model folder atomically: ``t2i.json`` (with ``extra``), ``unet/``, ``scheduler/``, ``files``
    (file name -> JSON-ready object, e.g. a training history), learned concept ``tokens`` (token -> ``[d]``, in
    ``tokens.safetensors``) and ``blobs`` (file name -> bytes, e.g. a PNG) beside them."""
    target = Path(folder)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.unet.state_dict().items()}
    with atomic_directory(target) as tmp:
        model.unet.save_config(tmp / "unet")
        atomic_write_bytes(tmp / "unet" / WEIGHTS, save(state))
        model.noise_scheduler.save_config(tmp / "scheduler")
        atomic_write_json(tmp / INFO_FILE, {**(extra or {}), "format": FORMAT, "config": model.config.to_dict(),
                                            "dtype": str(dtype).removeprefix("torch.")})
        for name, data in (files or {}).items():
            atomic_write_json(tmp / name, data)
        if tokens:
            atomic_write_bytes(tmp / TOKENS_FILE, save({k: v.detach().float().cpu().contiguous()
                                                        for k, v in tokens.items()}))
        for name, blob in (blobs or {}).items():
            atomic_write_bytes(tmp / name, blob)
    return target


def read_info(folder: str | Path) -> dict[str, Any]:
    """``t2i.json`` of a model folder; a folder that is not a t2i model is a one-line error."""
    return read_description(folder, INFO_FILE, FORMAT, "a t2i model", "create one with 'leanfm t2i pretrain --out DIR'")


def load_t2i(folder: str | Path) -> tuple[T2IModel, dict[str, Any]]:
    """(model in float32, eval mode, on the CPU; ``t2i.json``) of a folder written by :func:`save_t2i`."""
    info = read_info(folder)
    model = T2IModel(T2IConfig.from_dict(info["config"]))
    weights = Path(folder) / "unet" / WEIGHTS
    try:
        state = load_file(str(weights))
        model.unet.load_state_dict({k: v.float() for k, v in state.items()})
    except (OSError, RuntimeError) as err:  # a missing/damaged file, or weights of another architecture
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LeanfmError(f"t2i weights '{weights}' cannot be loaded ({first})") from None
    return model.eval(), info


def load_tokens(folder: str | Path) -> dict[str, torch.Tensor]:
    """The learned concept tokens of a customised model folder (token -> ``[d]``); ``{}`` when it has none."""
    path = Path(folder) / TOKENS_FILE
    if not path.is_file():
        return {}
    try:
        return load_file(str(path))
    except (OSError, RuntimeError, SafetensorError) as err:
        raise LeanfmError(f"concept tokens '{path}' cannot be loaded ({type(err).__name__})") from None


def write_t2i_artifact(model: T2IModel, folder: str | Path, manifest: dict[str, Any],
                       max_mb: float = MAX_MB) -> Path:
    """A committed artifact (the house rule): the model folder in bf16 plus ``manifest.json`` (``REQUIRED`` keys:
    the command that rebuilds it, steps, seed, data, metrics measured on the bf16 weights)."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise LeanfmError(f"artifact manifest lacks {', '.join(missing)}; accepted: one with {', '.join(REQUIRED)}")
    size_mb = model.parameter_count() * 2 / 2**20
    if size_mb > max_mb:
        raise LeanfmError(f"t2i artifact would be {size_mb:.1f} MB; accepted: at most {max_mb} MB")
    full = {**manifest, "dtype": "bfloat16", "size_mb": round(size_mb, 2), "parameters": model.parameter_count(),
            "versions": {"leanfm": __version__, "torch": torch.__version__}}
    return save_t2i(model, folder, {"artifact": manifest["name"]}, dtype=torch.bfloat16, files={MANIFEST: full})
