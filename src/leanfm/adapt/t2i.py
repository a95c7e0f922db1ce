"""Pretrain the small text-to-image diffusion model (:mod:`leanfm.models.t2i`) that C-LoRA and STAMINA customise.

Data: the pretraining concepts of :mod:`leanfm.data.t2i` (emoji named "a picture of <name>" and the captioned
shapes), ``renders`` augmented images each, cached. The held-out emoji are never seen here.

Objective (DDPM, epsilon prediction): ``E || eps - eps_theta(x_t, t, c) ||^2`` with ``t`` uniform over the
1000 steps, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``, and the caption ``c`` replaced by the empty
caption with probability ``uncond_prob`` (0.1), so the same network also predicts unconditionally —
classifier-free guidance at sampling time. AdamW, linear warm-up then cosine decay, bf16 autocast where the
device runs bf16 natively (:func:`leanfm.device.fast_bfloat16`).

The saved weights are an exponential moving average of the trained ones (decay ``ema``, warmed up as
``min(ema, (1 + step) / (10 + step))``; 0 saves the trained weights): small diffusion models sample visibly
better from an average. The average is updated right after each optimizer step (in the record callable that
:func:`leanfm.training.fit` calls there) and checkpointed with the model, so a resume continues it exactly.

Runs on the one training loop: checkpoints in ``OUT.training``, Ctrl-C saves, ``resume`` continues exactly.
Each step's batch (concepts, renders, noise, timesteps, dropped captions) is drawn from a generator seeded by
``(seed, step)``, so it does not depend on where a run was resumed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.t2i import NOTO_FONT, check_font, parse_sources, pretraining_concepts, render_concepts
from leanfm.errors import LeanfmError
from leanfm.models.encoders import BERT_ENCODERS
from leanfm.models.t2i import CaptionEncoder, T2IConfig, T2IModel, caption_encoder, save_t2i
from leanfm.training import DistributedContext, Runtime, Task, fit, prepare_run, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name

__all__ = ["T2IPretrainConfig", "pretrain_task", "train_t2i"]
log = logging.getLogger(__name__)


@dataclass
class T2IPretrainConfig(MethodConfig):
    """``leanfm t2i pretrain``: data, U-Net size and optimisation."""

    captions: str = option("emoji,shapes", "caption sets to pretrain on: emoji, shapes or emoji,shapes")
    emoji_concepts: int = option(200, "pretraining emoji (a prefix of the fixed order; held-out emoji never)")
    renders: int = option(64, "augmented renders per concept (cached under $LEANFM_HOME/t2i)")
    font: str = option(str(NOTO_FONT), "emoji font (Debian fonts-noto-color-emoji)")
    width: int = option(32, "channels of the first U-Net level (levels: w, 2w, 2w)")
    layers_per_block: int = option(1, "ResNet blocks per U-Net level")
    heads: int = option(8, "attention heads")
    attention_levels: int = option(1, "U-Net levels with cross-attention (1: 8x8; 2: 8x8 and 16x16)", choices=(1, 2))
    text_encoder: str = option("minilm-l6", "frozen caption encoder", choices=BERT_ENCODERS, cli=False)
    steps: int = option(6000, "optimizer steps")
    batch_size: int = option(64, "images per step (global, split across ranks)")
    lr: float = option(1e-3, "peak learning rate (warm-up, then cosine)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int = option(500, "warm-up steps")
    uncond_prob: float = option(0.1, "probability of dropping a caption to '' (classifier-free guidance)")
    ema: float = option(0.999, "decay of the saved weight average (0: save the trained weights)")
    seed: int = option(0, "seed of the weights, the renders and every batch")
    checkpoint_every: int = option(500, "steps between training checkpoints")
    autocast: bool = option(True, "bfloat16 autocast where the device runs bf16 natively (false: float32)")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        parse_sources(self.captions)
        check_at_least(self, 1, "emoji_concepts", "renders", "steps", "batch_size", "checkpoint_every")
        check_at_least(self, 0, "warmup_steps", "seed")
        for name, value in (("uncond_prob", self.uncond_prob), ("ema", self.ema)):
            if not 0 <= value < 1:
                raise LeanfmError(f"{name} {value} is out of range; accepted: 0 <= {name} < 1")
        if self.lr <= 0:
            raise LeanfmError(f"lr {self.lr} is invalid; accepted: a number > 0")
        self.model_config(384)  # the architecture's own checks (width, heads), before any work
        check_device_name(self.device)
        super().validate()

    def model_config(self, text_dim: int) -> T2IConfig:
        """The U-Net settings, for a caption encoder ``text_dim`` wide."""
        return T2IConfig(width=self.width, layers_per_block=self.layers_per_block, heads=self.heads,
                         attention_levels=self.attention_levels, text_encoder=self.text_encoder,
                         cross_attention_dim=text_dim)


def pretrain_task(model: T2IModel, average: nn.Module | None, images: torch.Tensor, captions: list[str],
                  encoder: CaptionEncoder, config: T2IPretrainConfig, runtime: Runtime) -> Task:
    """The diffusion model's part of the training loop.

    ``images``: uint8 ``[C, R, 3, S, S]`` renders of the ``C`` concepts whose ``captions`` are given;
    ``average``: the EMA copy of ``model.unet`` (None: no average). Caption token states are computed once.
    """
    states, masks = encoder([*captions, ""])  # [C + 1, L, d]; row C is the empty caption
    count, renders = images.shape[:2]
    params = [p for p in model.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    shard = runtime.context.shard

    def batch(step: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        n = config.batch_size
        concept = torch.randint(count, (n,), generator=generator)
        render = torch.randint(renders, (n,), generator=generator)
        clean = images[concept, render].float() / 127.5 - 1  # [n, 3, S, S] in [-1, 1]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, model.config.train_timesteps, (n,), generator=generator)
        dropped = torch.rand(n, generator=generator) < config.uncond_prob
        row = torch.where(dropped, count, concept)
        return {"noisy": shard(model.add_noise(clean, noise, timesteps)), "timesteps": shard(timesteps),
                "states": shard(states[row]), "mask": shard(masks[row]), "noise": shard(noise)}

    def loss(step: int, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        with runtime.autocast():
            predicted = model(b["noisy"], b["timesteps"], b["states"], b["mask"])
        value = nn.functional.mse_loss(predicted.float(), b["noise"])
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step}")
        shown = float(runtime.context.mean(value))

        def record() -> dict[str, float]:  # after the optimizer step: fold the new weights into the average
            if average is not None:
                decay = min(config.ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for mean, weight in zip(average.parameters(), model.unet.parameters(), strict=True):
                        mean.lerp_(weight.detach(), 1 - decay)
            return {"loss": shown}

        return value, record

    modules: dict[str, nn.Module] = {"unet": model.unet}
    if average is not None:
        modules["average"] = average
    return Task("pretrain t2i", modules, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, config.warmup_steps), log_every=100)


def train_t2i(config: T2IPretrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              context: DistributedContext | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """``leanfm t2i pretrain``: train (or resume) and write the model folder ``out``; returns the summary.

    ``stop_at`` ends this call after that many steps (of the ``config.steps`` schedule) and writes ``out`` as the
    model so far: a benchmark alternates stretches of training with evaluation, each call resuming the last.
    """
    out = Path(out)
    if "emoji" in parse_sources(config.captions):
        check_font(config.font)
    if stop_at is not None and stop_at < 1:
        raise LeanfmError(f"stop_at {stop_at} is invalid; accepted: an integer >= 1")
    runtime = Runtime.for_config(config, context)  # float32 where bf16 is emulated
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=runtime.context)
    concepts = pretraining_concepts(config.captions, config.emoji_concepts)
    images = render_concepts(concepts, config.renders, config.seed, config.font)
    encoder = caption_encoder(config.text_encoder)
    torch.manual_seed(config.seed)
    model = T2IModel(config.model_config(encoder.dim))
    average = copy.deepcopy(model.unet).requires_grad_(False) if config.ema > 0 else None
    captions = [c.caption for c in concepts]
    task = pretrain_task(model, average, images, captions, encoder, config, runtime)
    until = config.steps if stop_at is None else min(stop_at, config.steps)
    result = fit(task, config, runtime, steps=until, checkpoint=checkpoint, resume=resume)
    losses = [h["loss"] for h in result.history[-100:]]
    summary = {"steps": result.step, "total_steps": config.steps, "finished": result.step >= config.steps,
               "loss": sum(losses) / max(1, len(losses)), "train_seconds": result.seconds,
               "parameters": model.parameter_count(), "concepts": len(concepts), "autocast": runtime.amp,
               "device": str(runtime.device), "config": config.to_dict()}
    if runtime.context.is_main:
        if average is not None:
            model.unet.load_state_dict(average.state_dict())
        save_t2i(model.cpu(), out, {"captions": captions, "concepts": [[c.source, c.name] for c in concepts],
                                    "training": summary}, files={"history.json": result.history})
    runtime.context.barrier()
    return {**summary, "history": result.history}


register_method("t2i", "train", T2IPretrainConfig, train_t2i,
                description="a small text-to-image diffusion U-Net on emoji and shapes, for continual customisation")
