r"""Continual text-to-image customisation: a sequence of new concepts taught one at a time to the small diffusion
model (:mod:`leanfm.models.t2i`) with sequential LoRA, C-LoRA or STAMINA (METHODS.md sections 8-9), or with the
papers' token-only comparator, Textual Inversion.

Setting (C-LoRA's and STAMINA's headline experiment, at our scale): the pretrained U-Net learns the held-out emoji
of :func:`leanfm.data.t2i.held_out_concepts` (fixed order, never seen in pretraining) one after another, each from
``shots`` renders, under its own new token: concept :math:`t` is captioned ``a picture of <ct>`` (the pretraining
template, with the name replaced by the token; the class noun is omitted, as in C-LoRA). Nothing of an earlier
concept is seen again.

Per concept :math:`t`, trained with the DDPM loss :math:`E\|\epsilon - \epsilon_\theta(x_s, s, c_t)\|^2` on its
renders:

- **low-rank updates** of the cross-attention key and value projections (``attn2.to_k``, ``attn2.to_v``: the layers
  that read the caption) through :class:`leanfm.models.lora.ContinualAdapter` (PEFT LoRA),
  :math:`W = W_0 + \sum_{t'<t}\Delta_{t'} + \Delta_t`, folded into the weights after the concept;
- ``lora``: :math:`\Delta_t = s B_t A_t`, nothing else — the baseline;
- ``clora``: plus C-LoRA's self-regulariser :math:`\lambda \sum_{layers} \| |P_t| \odot \Delta_t \|_F^2` with
  :math:`P_t = \sum_{t'<t}\Delta_{t'}` (zero for the first concept);
- ``stamina``: :math:`\Delta_t = s M_t \odot (B_t A_t)` with a hard mask from a low-rank MLP (straight-through
  Gumbel-sigmoid, our reading in :mod:`leanfm.models.lora`) and the sparsity penalty
  :math:`\beta\,\overline{\sigma(L)}`;
- ``ti`` (Textual Inversion, the comparator in C-LoRA's and STAMINA's tables): :math:`\Delta_t = 0` — only the
  token learns, the U-Net is never changed, so nothing learned earlier can be forgotten; what it costs is fidelity
  (a new word can only point at what the frozen model already draws);
- **the concept token**: a new input embedding of the frozen caption encoder (:class:`leanfm.models.t2i.TokenCaptions`
  says why the input side). ``lora``, ``clora`` and ``ti`` learn the vector itself, initialised at random (C-LoRA) —
  our reading of "random": a draw from a normal with the per-dimension mean and spread of the encoder's word
  embeddings, so it starts at the scale of a real word — or, with ``token_init word``, from a real word's
  embedding (``init_word``; the custom-token initialisation variants). ``stamina`` learns STAMINA's **MLP token**:
  the vector is the output of a one-hidden-layer MLP :math:`v = W_2\,\mathrm{GELU}(W_1 z + b_1) + b_2` of a fixed
  seeded input :math:`z`, with :math:`W_2 = 0` and :math:`b_2` = the same initial vector at the start (our reading:
  the abstract gives no more), so both token kinds start at the same point. After the concept the token is folded
  to its vector: no extra parameters at inference for any method.

Renders (augmented by position, scale and background, :mod:`leanfm.data.t2i`): training uses render seed
:data:`TRAIN_SEED`, the evaluation's real images :data:`REAL_SEED` (``real`` per concept) and the floor's second
real set :data:`REAL2_SEED` (``samples`` per concept, as many as the generated sets); pretraining used 0, the
pretraining benchmark's classifier 1-4, so no evaluation image is a training image.

Evaluation (:func:`fidelity`, with the concept classifier of :mod:`leanfm.eval.t2i` — trained on real renders of
every concept including the 40 held-out emoji; its penultimate features play Inception's role): each concept is
sampled ``samples`` times (the same seeded noise every time) right after it is learned (``after``), at the end of
the sequence (``final``) and from the base model under the concept's real name, e.g. ``a picture of penguin``
(``base``: what the model does without customisation). Per concept: KID and MMD of each set against the real
renders, the same for a second real set (the floor), the fraction the classifier recognises as the concept, and
forgetting = fidelity just after learning minus at the end (recognised: after - final; KID / MMD: final - after,
so that positive always means forgotten). Without a classifier the run keeps the samples and the metrics can be
computed later (:func:`evaluate_run`).

Resume: each concept's training is one :func:`leanfm.training.fit` run (``OUT.training/concept-XX``); after a concept
is folded and sampled, ``OUT.training/progress`` holds the folded weights of the adapted layers, the adapter's
history, the tokens and the samples so far, so an interrupted sequence continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.t2i import (
    HELD_OUT,
    NOTO_FONT,
    Concept,
    check_font,
    emoji_caption,
    held_out_concepts,
    image_grid,
    render_concepts,
)
from leanfm.device import fast_bfloat16
from leanfm.errors import LeanfmError
from leanfm.eval.t2i import ConceptClassifier, image_features, kid, load_classifier, mmd, recognised_fraction
from leanfm.models.lora import AdapterSettings, ContinualAdapter, settings_from
from leanfm.models.t2i import (
    T2IModel,
    TokenCaptions,
    caption_encoder,
    load_t2i,
    load_tokens,
    read_info,
    sample,
    save_t2i,
)
from leanfm.training import DistributedContext, Runtime, Task, fit, prepare_run, warmup_cosine_lr
from leanfm.training.checkpoint import load_checkpoint, save_checkpoint
from leanfm.training.options import DEVICE_HELP, check_device_name

__all__ = ["METHODS", "ConceptToken", "T2IContinualConfig", "evaluate_run", "fidelity", "load_run",
           "parse_concepts", "train_t2i_continual"]
log = logging.getLogger(__name__)

METHODS = ("lora", "clora", "stamina", "ti")
TOKEN_INITS = ("random", "word")
TRAIN_SEED, REAL_SEED, REAL2_SEED = 100, 101, 102  # render seeds (module docstring)
RESULT_FILE, SAMPLES_FILE, ADAPTER_FILE, GRID_FILE = ("continual_t2i.json", "samples.safetensors",
                                                      "adapter.safetensors", "grid.png")
KINDS = ("base", "after", "final")


@dataclass
class T2IContinualConfig(MethodConfig):
    """``leanfm continual t2i``: the base model, the concept sequence, the method and the optimisation."""

    RESUMABLE = ("checkpoint_every", "device")

    base: str = option("artifacts/t2i-emoji-shapes", "folder of the pretrained model ('leanfm t2i pretrain')")
    method: str = option("clora", "lora (sequential), clora (+ self-regulariser), stamina (masked + MLP token) or "
                                  "ti (Textual Inversion: the token only)", choices=METHODS)
    concepts: str = option("10", "held-out concepts in order: a count N (the first N of the fixed 40) or "
                                 "comma-separated names (penguin,rocket,...)")
    shots: int = option(8, "renders each concept is learned from")
    steps: int = option(300, "optimiser steps per concept")
    batch_size: int = option(16, "noised renders per step (split across ranks)")
    lr: float = option(1e-3, "peak learning rate of the adapters (warm-up, then cosine, per concept)")
    token_lr_scale: float = option(5.0, "the concept token (STAMINA: its MLP) learns at lr times this")
    warmup: int = option(20, "warm-up steps per concept")
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(8.0, "LoRA alpha (update scale alpha / r)")
    targets: str = option("attn2.to_k,attn2.to_v", "Linear layers that get adapters (names or dotted suffixes)")
    # chosen on validation (benchmarks/continual_t2i.py --validate: held-out emoji 31-40 on artifacts/t2i-emoji-shapes;
    # grid 0 / 0.3 / 3 / 30, placed where loss / raw penalty of unregularised updates lay, 1.0-11.7)
    reg_weight: float = option(3.0, "C-LoRA's lambda on || |past| * delta ||_F^2 (method clora)")
    sparsity: float = option(0.1, "STAMINA's weight on the masks' expected density")
    mask_rank: int = option(4, "STAMINA: hidden width of the low-rank mask MLP")
    mask_init: float = option(3.0, "STAMINA: initial mask logit (3: every entry open)")
    mask_tau: float = option(1.0, "STAMINA: Gumbel-sigmoid temperature")
    mask_lr_scale: float = option(10.0, "STAMINA: the mask MLP learns at lr times this")
    token_init: str = option("random", "start of each token: random (at the word embeddings' scale) or word",
                             choices=TOKEN_INITS)
    init_word: str = option("object", "token_init word: the (single-piece) word whose embedding starts the token")
    token_hidden: int = option(64, "STAMINA: hidden width of the MLP that outputs the token")
    samples: int = option(16, "samples per concept for evaluation and the grid (one noise draw, reused)")
    sample_steps: int = option(25, "DDIM steps of those samples")
    guidance: float = option(3.0, "classifier-free guidance scale of those samples")
    real: int = option(64, "real renders per concept that samples are compared with")
    classifier: str = option("", "concept classifier folder (leanfm.eval.t2i.save_classifier) for KID / MMD / "
                                 "recognition; empty: keep the samples only")
    font: str = option(str(NOTO_FONT), "emoji font (Debian fonts-noto-color-emoji)")
    seed: int = option(0, "seed of adapters, tokens, batches and sampling noise")
    checkpoint_every: int = option(100, "steps between training checkpoints")
    autocast: bool = option(True, "bfloat16 autocast where the device runs bf16 natively (false: float32)")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        super().validate()
        parse_concepts(self.concepts)
        check_at_least(self, 1, "shots", "steps", "batch_size", "rank", "mask_rank", "token_hidden", "sample_steps",
                       "checkpoint_every")
        check_at_least(self, 2, "samples", "real")
        check_at_least(self, 0, "warmup", "seed")
        check_device_name(self.device)
        for name in ("reg_weight", "sparsity", "guidance"):
            if not getattr(self, name) >= 0:
                raise LeanfmError(f"{name.replace('_', ' ')} {getattr(self, name)} is invalid; accepted: a number >= 0")
        for name in ("alpha", "lr", "token_lr_scale", "mask_tau", "mask_lr_scale"):
            if not getattr(self, name) > 0:
                raise LeanfmError(f"{name.replace('_', ' ')} {getattr(self, name)} is invalid; accepted: a number > 0")
        if not [t for t in self.targets.split(",") if t.strip()]:
            raise LeanfmError(f"targets '{self.targets}' name no layer; accepted: e.g. attn2.to_k,attn2.to_v")

    def adapter_settings(self) -> AdapterSettings:
        """The adapter of the method: lambda only for clora, beta only for stamina; ti attaches plain LoRA factors
        that never train (B stays 0, so each fold adds exactly nothing)."""
        return settings_from(self, method="lora" if self.method == "ti" else self.method,
                             reg_weight=self.reg_weight if self.method == "clora" else 0.0,
                             sparsity=self.sparsity if self.method == "stamina" else 0.0)


def parse_concepts(text: str) -> list[Concept]:
    """``"10"`` -> the first 10 held-out concepts; ``"penguin,owl"`` -> those, in that order (one-line errors)."""
    text = str(text).strip()
    if text.isdigit():
        return held_out_concepts(int(text))
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in HELD_OUT]
    if unknown or not names or len(set(names)) != len(names):
        what = f"unknown held-out concept '{unknown[0]}'" if unknown else f"concepts '{text}' are empty or repeated"
        raise LeanfmError(f"{what}; accepted: a count 1 to {len(HELD_OUT)} or distinct names from "
                          f"{', '.join(HELD_OUT)}")
    by_name = {c.name: c for c in held_out_concepts()}
    return [by_name[n] for n in names]


def token_name(number: int) -> str:
    """The token of the ``number``-th concept (from 0): ``<c1>``, ``<c2>``, ..."""
    return f"<c{number + 1}>"


# ---------------------------------------------------------------- the concept token


class ConceptToken(nn.Module):
    """The vector a concept's token stands for: free (``hidden`` 0: the vector itself) or STAMINA's MLP token
    (``hidden`` > 0: :math:`W_2\\,\\mathrm{GELU}(W_1 z + b_1) + b_2` of a fixed input ``z``; module docstring).
    ``forward()`` -> ``[d]``; both start at ``init``."""

    def __init__(self, init: torch.Tensor, hidden: int = 0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        dim = init.shape[0]
        self.vector = nn.Parameter(init.detach().clone().float()) if hidden == 0 else None
        self.mlp: nn.Sequential | None = None
        if hidden > 0:
            self.register_buffer("z", torch.randn(dim, generator=generator))
            first, last = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            with torch.no_grad():
                bound = dim**-0.5  # torch's default Linear init, drawn from the given generator
                first.weight.uniform_(-bound, bound, generator=generator)
                first.bias.uniform_(-bound, bound, generator=generator)
                last.weight.zero_()
                last.bias.copy_(init)
            self.mlp = nn.Sequential(first, nn.GELU(), last)

    def forward(self) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp(self.z)  # [d]
        assert self.vector is not None
        return self.vector


def _init_vector(captions: TokenCaptions, config: T2IContinualConfig, generator: torch.Generator) -> torch.Tensor:
    """The starting vector of a token: a random draw at the word embeddings' scale, or ``init_word``'s row."""
    table = captions.encoder.bert.get_input_embeddings().weight.detach().float().cpu()  # [vocab, d]
    if config.token_init == "word":
        ids = captions.encoder.tokenizer(config.init_word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise LeanfmError(f"init word '{config.init_word}' is {len(ids)} word pieces; accepted: a word the "
                              "tokenizer keeps whole (e.g. object)")
        return table[ids[0]].clone()
    return table.mean(0) + table.std(0) * torch.randn(table.shape[1], generator=generator)


# ---------------------------------------------------------------- one concept


def _concept_task(model: T2IModel, adapter: ContinualAdapter, token: ConceptToken, captions: TokenCaptions,
                  images: torch.Tensor, number: int, config: T2IContinualConfig, runtime: Runtime) -> Task:
    """Concept ``number``'s part of the loop: DDPM loss on its uint8 renders ``[K, 3, S, S]`` under its token's
    caption, plus the adapter's penalty."""
    name = token_name(number)
    caption = emoji_caption(name)
    shard = runtime.context.shard

    def batch(step: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed((config.seed * 1_000_003 + number) * 10_007 + step)
        n = config.batch_size
        clean = images[torch.randint(len(images), (n,), generator=generator)].float() / 127.5 - 1  # [n, 3, S, S]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, model.config.train_timesteps, (n,), generator=generator)
        return {"noisy": shard(model.add_noise(clean, noise, timesteps)), "timesteps": shard(timesteps),
                "noise": shard(noise)}

    def loss(step: int, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        states, mask = captions.states(caption, {name: token()})  # [1, L, d]: one caption for the whole batch
        n = b["noisy"].shape[0]
        states, mask = states.to(runtime.device).expand(n, -1, -1), mask.to(runtime.device).expand(n, -1)
        with runtime.autocast():
            predicted = model(b["noisy"], b["timesteps"], states, mask)
        value = nn.functional.mse_loss(predicted.float(), b["noise"])
        if not torch.isfinite(value):
            raise FloatingPointError(f"non-finite loss at step {step} of concept {number + 1}")
        penalty, parts = adapter.penalty()
        total = value + penalty
        return total, {"loss": float(total.detach()), "mse": float(value.detach()), **parts}

    named = list(adapter.parameters().items())
    if config.method == "ti":  # the token only: the factors stay as attached (B = 0), no gradient computed for them
        for _, p in named:
            p.requires_grad_(False)
    groups: list[dict[str, Any]] = [{"params": [p for k, p in named if "lora_mask" not in k and p.requires_grad]},
                                    {"params": list(token.parameters()), "lr_scale": config.token_lr_scale}]
    groups = [g for g in groups if g["params"]]
    masks = [p for k, p in named if "lora_mask" in k]
    groups += [{"params": masks, "lr_scale": config.mask_lr_scale}] if masks else []
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    modules = {"adapter": nn.ParameterDict(dict(named)), "token": token}
    return Task(f"{config.method} concept {number + 1} ({name})", modules, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, config.warmup), log_every=50)


def _draw(model: T2IModel, captions: TokenCaptions, caption: str, config: T2IContinualConfig) -> torch.Tensor:
    """``samples`` images of ``caption`` as uint8 ``[n, 3, S, S]``; the same noise for every caption and call."""
    images = sample(model, [caption] * config.samples, steps=config.sample_steps, guidance=config.guidance,
                    seed=config.seed, encoder=captions)
    return (images * 255).round().to(torch.uint8)


def _runtime(config: T2IContinualConfig, context: DistributedContext | None) -> Runtime:
    runtime = Runtime.for_config(config, context)
    if runtime.amp and not fast_bfloat16(runtime.device):
        runtime = dataclasses.replace(runtime, amp=False)  # emulated bf16 is slower than float32
    return runtime


def _adapted_weights(model: T2IModel, adapter: ContinualAdapter) -> dict[str, torch.Tensor]:
    modules = dict(model.unet.named_modules())
    return {name: modules[name].weight.detach().cpu().clone() for name in adapter.layers}


def _load_adapted(model: T2IModel, weights: dict[str, torch.Tensor]) -> None:
    modules = dict(model.unet.named_modules())
    with torch.no_grad():
        for name, value in weights.items():
            modules[name].weight.copy_(value)


# ---------------------------------------------------------------- the sequence


def _check_inputs(config: T2IContinualConfig, concepts: list[Concept]) -> ConceptClassifier | None:
    """Every one-line error a run can foresee, before any work: the base, the font, the classifier's concepts."""
    read_info(config.base)
    check_font(config.font)
    if not config.classifier:
        return None
    classifier, _ = load_classifier(config.classifier)
    missing = [c.name for c in concepts if c.caption not in classifier.captions]
    if missing:
        raise LeanfmError(f"classifier '{config.classifier}' has no concept '{missing[0]}'; accepted: one trained "
                          "on every held-out concept (benchmarks/continual_t2i.py builds it)")
    return classifier


def train_t2i_continual(config: T2IContinualConfig, out: str | Path, *, resume: bool = False,
                        overwrite: bool = False, context: DistributedContext | None = None) -> dict[str, Any]:
    """Teach ``config.concepts`` one after another; save the customised model, samples and metrics in ``out``.

    Returns the summary written to ``OUT/continual_t2i.json`` (training records, and ``metrics`` when a classifier
    is given) plus the per-concept loss histories.
    """
    out = Path(out)
    concepts = parse_concepts(config.concepts)
    classifier = _check_inputs(config, concepts)
    runtime = _runtime(config, context)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=runtime.context)
    model, _ = load_t2i(config.base)
    captions = TokenCaptions(caption_encoder(model.config.text_encoder, model.config.max_tokens))
    adapter = ContinualAdapter(model.unet, config.adapter_settings())
    renders = render_concepts(concepts, config.shots, seed=TRAIN_SEED, font=config.font)  # [N, K, 3, S, S]
    progress_dir = checkpoint / "progress"
    state = load_checkpoint(progress_dir) if resume else None
    if state is not None:
        config.check_resume(state["fingerprint"], where=f"training checkpoint '{progress_dir}'")
        _load_adapted(model, state["folded"])
        adapter.load_state(state["adapter"])
        captions.tokens = dict(state["tokens"])
        log.info("resuming %s after %d of %d concepts", config.method, state["done"], len(concepts))
    model.to(runtime.device)
    if state is None:  # the reference: the base model under each concept's real name
        base = torch.stack([_draw(model, captions, c.caption, config) for c in concepts])
        state = {"done": 0, "base": base, "after": [], "training": [], "tokens": {}}
    for number in range(state["done"], len(concepts)):
        _learn(model, adapter, captions, renders[number], number, config, runtime, checkpoint, resume, state)
        if runtime.context.is_main:
            state |= {"folded": _adapted_weights(model, adapter), "adapter": adapter.state(),
                      "tokens": dict(captions.tokens), "fingerprint": config.fingerprint()}
            save_checkpoint(progress_dir, state)
            shutil.rmtree(checkpoint / f"concept-{number:02d}", ignore_errors=True)
        runtime.context.barrier()
    final = torch.stack([_draw(model, captions, emoji_caption(token_name(i)), config) for i in range(len(concepts))])
    samples = {"base": state["base"], "after": torch.stack(state["after"]), "final": final}
    summary: dict[str, Any] = {"method": config.method, "concepts": [c.name for c in concepts],
                               "tokens": {token_name(i): c.name for i, c in enumerate(concepts)},
                               "training": [{k: v for k, v in t.items() if k != "history"} for t in state["training"]],
                               "config": config.to_dict(), "render_seeds": {"train": TRAIN_SEED, "real": REAL_SEED,
                                                                            "real2": REAL2_SEED}}
    if classifier is not None:
        summary["metrics"] = fidelity(classifier, concepts, samples, config)
    if runtime.context.is_main:
        _save_run(out, model.cpu(), adapter, captions.tokens, samples, summary)
    runtime.context.barrier()
    return {**summary, "histories": [t["history"] for t in state["training"]]}


def _learn(model: T2IModel, adapter: ContinualAdapter, captions: TokenCaptions, images: torch.Tensor, number: int,
           config: T2IContinualConfig, runtime: Runtime, checkpoint: Path, resume: bool,
           state: dict[str, Any]) -> None:
    """Train concept ``number``, fold its update and token, sample it; appends to ``state``."""
    name = token_name(number)
    adapter.begin_task()
    generator = torch.Generator().manual_seed(config.seed * 7_919 + number)
    init = _init_vector(captions, config, generator)
    token = ConceptToken(init, config.token_hidden if config.method == "stamina" else 0, generator)
    task = _concept_task(model, adapter, token, captions, images, number, config, runtime)
    model.train()  # STAMINA's layers draw Gumbel masks in training mode (the U-Net has no dropout)
    torch.manual_seed(config.seed * 7_919 + number)  # STAMINA's Gumbel noise: the same after a resume
    result = fit(task, config, runtime, steps=config.steps, checkpoint=checkpoint / f"concept-{number:02d}",
                 resume=resume)
    adapter.end_task()
    with torch.no_grad():
        captions.tokens[name] = token().detach().float().cpu()
    captions.cache.clear()
    state["after"].append(_draw(model, captions, emoji_caption(name), config))
    losses = [h["mse"] for h in result.history[-20:]]
    state["training"].append({"concept": name, "steps": result.step, "seconds": result.seconds,
                              "final_mse": sum(losses) / max(1, len(losses)), "history": result.history})
    state["done"] = number + 1


# ---------------------------------------------------------------- evaluation


def fidelity(classifier: ConceptClassifier, concepts: list[Concept], samples: dict[str, torch.Tensor],
             config: T2IContinualConfig) -> dict[str, Any]:
    """Per concept and on average: KID, MMD and recognised fraction of the ``base``, ``after`` and ``final``
    samples (uint8 ``[N, n, 3, S, S]``) against real renders, the real-vs-real floor, and forgetting (module
    docstring)."""
    real = render_concepts(concepts, config.real, seed=REAL_SEED, font=config.font)
    real2 = render_concepts(concepts, samples["final"].shape[1], seed=REAL2_SEED, font=config.font)
    rows = []
    for i, concept in enumerate(concepts):
        reference = image_features(classifier, real[i].float() / 255)
        row: dict[str, Any] = {"concept": concept.name, "token": token_name(i)}
        sets = {"floor": real2[i], **{kind: samples[kind][i] for kind in KINDS}}
        for kind, images in sets.items():
            flat = images.float() / 255
            features = image_features(classifier, flat)
            row[kind] = {"kid": kid(reference, features), "mmd": mmd(reference, features),
                         "recognised": recognised_fraction(classifier, flat, concept.caption)}
        row["forgetting"] = {"recognised": row["after"]["recognised"] - row["final"]["recognised"],
                             "kid": row["final"]["kid"] - row["after"]["kid"],
                             "mmd": row["final"]["mmd"] - row["after"]["mmd"]}
        rows.append(row)
    mean = {kind: {m: sum(r[kind][m] for r in rows) / len(rows) for m in rows[0][kind]}
            for kind in ("floor", *KINDS, "forgetting")}
    return {"per_concept": rows, "mean": mean}


def evaluate_run(folder: str | Path, classifier: str | Path) -> dict[str, Any]:
    """:func:`fidelity` of a saved run's samples with the classifier in ``classifier`` (a folder)."""
    meta = read_result(folder)
    config = T2IContinualConfig.from_dict(meta["config"])
    concepts = parse_concepts(config.concepts)
    model, _ = load_classifier(classifier)
    try:
        samples = load_file(str(Path(folder) / SAMPLES_FILE))
    except Exception as err:  # safetensors raises its own error type for a damaged file
        raise LeanfmError(f"samples of '{folder}' cannot be read ({type(err).__name__})") from None
    return fidelity(model, concepts, samples, config)


# ---------------------------------------------------------------- saving, loading


def _save_run(out: Path, model: T2IModel, adapter: ContinualAdapter, tokens: dict[str, torch.Tensor],
              samples: dict[str, torch.Tensor], summary: dict[str, Any]) -> None:
    """The customised model folder (folded U-Net + ``tokens.safetensors``: loads with :func:`load_run`, samples
    with ``leanfm t2i sample``) plus the adapter history, the samples, the grid and ``continual_t2i.json``."""
    if out.exists():
        shutil.rmtree(out)
    final = samples["final"]  # [N, n, 3, S, S]: rows concepts, columns noise seeds
    buffer = io.BytesIO()
    image_grid(final.flatten(0, 1).float() / 255, columns=final.shape[1]).save(buffer, format="PNG")
    blobs = {ADAPTER_FILE: adapter.to_bytes(), GRID_FILE: buffer.getvalue(),
             SAMPLES_FILE: save({k: v.contiguous() for k, v in samples.items()})}
    extra = {"continual": {"method": summary["method"], "base": summary["config"]["base"],
                           "tokens": summary["tokens"]}}
    save_t2i(model, out, extra, files={RESULT_FILE: summary}, tokens=tokens, blobs=blobs)


def read_result(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RESULT_FILE
    if not path.is_file():
        raise LeanfmError(f"'{folder}' is not a continual t2i run ({RESULT_FILE} missing); "
                          "create one with 'leanfm continual t2i'")
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as err:
        raise LeanfmError(f"'{path}' is not valid JSON ({err})") from None


def load_run(folder: str | Path) -> tuple[T2IModel, TokenCaptions, dict[str, Any]]:
    """(customised model in eval mode, caption encoder knowing its tokens, ``continual_t2i.json``) of a run:
    ``sample(model, ["a picture of <c1>"], encoder=captions)`` draws concept 1."""
    meta = read_result(folder)
    model, _ = load_t2i(folder)
    captions = TokenCaptions(caption_encoder(model.config.text_encoder, model.config.max_tokens),
                             load_tokens(folder))
    return model, captions, meta


register_method("continual-t2i", "train", T2IContinualConfig, train_t2i_continual,
                description="continual text-to-image customisation: sequential LoRA, C-LoRA, STAMINA on the small "
                            "diffusion U-Net")
