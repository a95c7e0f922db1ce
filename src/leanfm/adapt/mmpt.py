"""MMPT: multi-modal prompt tuning for (open-world) compositional zero-shot learning, and its peers in one harness.

Task (CZSL): images labelled with an (attribute, object) pair; training sees some pairs, the test asks for pairs
never seen together. A frozen image-text model scores an image ``x`` against the text of each candidate pair::

    s(x, (a, o)) = exp(t) * < f_img(x; P_v), f_txt([start] C [a] [o] [end]) >        (unit-norm features)

with ``exp(t)`` the base model's own logit scale (1/tau), and training minimises cross-entropy over the *seen*
pairs (the paper's and CSP's objective). The four methods differ only in what is learned:

* ``zero-shot``: nothing; C = the words "a photo of", [a] [o] = the words' own token embeddings.
* ``coop`` (CoOp): the context C is a learned sequence of vectors (initialised from "a photo of").
* ``csp`` (CSP): one learned vector per attribute and per object (initialised from the mean of the word's
  token embeddings), the context fixed.
* ``mmpt``: learned context *and* vocabulary on the text side, plus deep prompts on the image side that are a
  function of the text context — ``P_v^j = W_j C + b_j`` for ViT layer ``j < J`` (MaPLe's coupling), so one set of
  prompt parameters steers both towers and the image features move towards the text space the prompts define.

Which parts are our reading: the MMPT paper (and METHODS.md section 6) says soft prompts on both sides, coupled as
in MaPLe, plus CSP-style vocabulary. We couple with one linear map per prompted ViT layer from the (shallow) text
context, as MaPLe's coupling function, but do not add deep text prompts (MiniLM/CLIP text layers stay untouched);
the visual prompt count equals the context length. The encoders are frozen throughout (tested bit-identical).

Evaluation is the community's (``leanfm.eval.czsl``): closed world over train + split pairs; open world over all
attribute x object pairs, with feasibility scores computed from each method's own primitive text features and a
threshold chosen on the validation split.
"""

from __future__ import annotations

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
from leanfm.data.czsl import CZSLData, load_images, read_czsl
from leanfm.errors import LeanfmError
from leanfm.eval.czsl import choose_threshold, evaluate_czsl, feasibility_scores, feasible_mask
from leanfm.models.dual_encoder import DualEncoder, load_base
from leanfm.paths import atomic_directory, atomic_write_bytes, read_description
from leanfm.training import DistributedContext, Runtime, Task, fit, init_distributed, prepare_run, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name

log = logging.getLogger(__name__)
METHODS = ("zero-shot", "coop", "csp", "mmpt")
FORMAT = "leanfm-czsl-1"


@dataclass
class CZSLConfig(MethodConfig):
    """``leanfm czsl train``: the data, the frozen base, the method and its optimisation."""

    RESUMABLE = ("steps", "checkpoint_every", "device", "autocast", "eval_batch")

    data: str = option("", "CZSL dataset folder (images/, compositional-split-natural/, metadata)", cli=False)
    base: str = option("", "frozen base: a 'leanfm czsl pretrain' folder or a transformers CLIP folder", cli=False)
    method: str = option("mmpt", "zero-shot, coop (soft context), csp (attribute/object vectors) or mmpt "
                                 "(both + coupled visual prompts)", choices=METHODS)
    context: str = option("a photo of", "the prompt's context words (the soft context's initial value)")
    vision_depth: int = option(2, "mmpt: ViT layers that get coupled visual prompts (MaPLe's J; 0 = none)")
    steps: int = option(300, "training steps (ignored by zero-shot)")
    batch_size: int = option(64, "training images per step")
    lr: float = option(3e-3, "peak AdamW learning rate (warm-up, then cosine)")
    weight_decay: float = option(0.0, "AdamW weight decay of the prompt parameters")
    warmup: int = option(30, "warm-up steps")
    seed: int = option(0, "seed of the prompt initialisation and of the batches")
    eval_batch: int = option(256, "images per evaluation forward")
    checkpoint_every: int = option(100, "steps between training checkpoints")
    device: str = option("auto", DEVICE_HELP)
    autocast: bool = option(True, "bfloat16 autocast for the frozen towers where bf16 is native (false: float32)")

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 0, "steps", "warmup", "vision_depth")
        check_at_least(self, 1, "batch_size", "eval_batch", "checkpoint_every")
        check_device_name(self.device)
        if not self.lr > 0:
            raise LeanfmError(f"learning rate {self.lr} is invalid; accepted: a number > 0")
        if not self.context.strip():
            raise LeanfmError("the prompt context is empty; accepted: one or more words, e.g. 'a photo of'")


def words(name: str) -> str:
    """CZSL names use underscores inside a name (``thumbs_up``); the text towers read words."""
    return name.replace("_", " ")


class Prompts(nn.Module):
    """Everything a method learns (and the frozen token embeddings it starts from), never the encoders.

    Buffers ``start``/``end`` ``[w]``; ``ctx`` ``[n, w]``; ``attr_vec`` ``[A, w]`` / ``obj_vec`` ``[O, w]`` (the
    vocabulary methods); ``couple`` (mmpt): one ``Linear(w_text, w_image)`` per prompted ViT layer.
    """

    start: torch.Tensor
    end: torch.Tensor
    ctx: torch.Tensor
    attr_vec: torch.Tensor
    obj_vec: torch.Tensor

    def __init__(self, base: DualEncoder, attrs: list[str], objs: list[str], method: str, context: str,
                 vision_depth: int) -> None:
        super().__init__()
        self.method, self.context, self.attrs, self.objs = method, context, list(attrs), list(objs)
        ids, mask = base.tokenize([context])
        valid = int(mask[0].sum())
        if valid < 3:
            raise LeanfmError(f"context '{context}' has no tokens; accepted: one or more words")
        with torch.no_grad():
            embedded = base.token_embeddings(ids[:, :valid])[0].float()  # [n + 2, w]
        self.register_buffer("start", embedded[0].clone())
        self.register_buffer("end", embedded[-1].clone())
        ctx = embedded[1:-1].clone()  # [n, w]
        if method in ("coop", "mmpt"):
            self.ctx = nn.Parameter(ctx)
        else:
            self.register_buffer("ctx", ctx)
        self.vocabulary = method in ("csp", "mmpt")
        if self.vocabulary:
            self.attr_vec = nn.Parameter(self._mean_embeddings(base, attrs))
            self.obj_vec = nn.Parameter(self._mean_embeddings(base, objs))
        depth = vision_depth if method == "mmpt" else 0
        if depth > base.image_layers:
            raise LeanfmError(f"vision depth {depth} exceeds the base's {base.image_layers} ViT layers; "
                              f"accepted: 0..{base.image_layers}")
        layers = [nn.Linear(base.text_width, base.image_width) for _ in range(depth)]
        for layer in layers:  # small random start: the visual prompts begin as near-neutral extra tokens
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        self.couple = nn.ModuleList(layers)
        self._word_cache: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _mean_embeddings(base: DualEncoder, names: list[str]) -> torch.Tensor:
        """``[len(names), w]``: each name's mean word-piece embedding (its start/end tokens excluded)."""
        ids, mask = base.tokenize([words(n) for n in names])
        with torch.no_grad():
            embedded = base.token_embeddings(ids).float()  # [K, T, w]
        inner = mask.clone()
        inner[:, 0] = 0
        inner[torch.arange(len(names)), mask.sum(1) - 1] = 0  # drop the end token
        inner = inner[..., None].float()  # [K, T, 1]
        return (embedded * inner).sum(1) / inner.sum(1).clamp_min(1)

    def visual_prompts(self) -> list[torch.Tensor] | None:
        """``[W_j C + b_j for j < J]``, each ``[n, image_width]`` (mmpt), else None."""
        return [layer(self.ctx) for layer in self.couple] or None

    def _word_tokens(self, base: DualEncoder, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple((int(a), int(o)) for a, o in pairs.tolist())
        if key not in self._word_cache:
            texts = [f"{self.context} {words(self.attrs[a])} {words(self.objs[o])}" for a, o in key]
            self._word_cache = {key: base.tokenize(texts)}  # one pair set at a time: train, then eval
        return self._word_cache[key]

    def text_inputs(self, base: DualEncoder, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``[P, T, w]`` and mask ``[P, T]`` of ``[start] C [a] [o] [end]`` for ``pairs [P, 2]``."""
        count, n = pairs.shape[0], self.ctx.shape[0]
        ctx = self.ctx[None].expand(count, -1, -1)  # [P, n, w]
        if self.vocabulary:
            embeds = torch.cat([self.start.expand(count, 1, -1), ctx, self.attr_vec[pairs[:, 0]][:, None],
                                self.obj_vec[pairs[:, 1]][:, None], self.end.expand(count, 1, -1)], dim=1)
            return embeds, torch.ones(count, n + 4, dtype=torch.long, device=embeds.device)  # [P, n+4, w]
        ids, mask = self._word_tokens(base, pairs)
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        embedded = base.token_embeddings(ids)  # [P, T, w]: [start] context-words attr-words obj-words [end] pad
        return torch.cat([embedded[:, :1], ctx.to(embedded.dtype), embedded[:, 1 + n:]], dim=1), mask

    def primitive_inputs(self, base: DualEncoder, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``[start] C [p] [end]`` for every attribute (``kind='attr'``) or object: the method's own view of a
        primitive, used for open-world feasibility."""
        names = self.attrs if kind == "attr" else self.objs
        count, n = len(names), self.ctx.shape[0]
        ctx = self.ctx[None].expand(count, -1, -1)
        if self.vocabulary:
            vec = self.attr_vec if kind == "attr" else self.obj_vec
            embeds = torch.cat([self.start.expand(count, 1, -1), ctx, vec[:, None], self.end.expand(count, 1, -1)], 1)
            return embeds, torch.ones(count, n + 3, dtype=torch.long, device=embeds.device)
        ids, mask = base.tokenize([f"{self.context} {words(name)}" for name in names])
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        embedded = base.token_embeddings(ids)
        return torch.cat([embedded[:, :1], ctx.to(embedded.dtype), embedded[:, 1 + n:]], dim=1), mask


def pair_features(base: DualEncoder, prompts: Prompts, pairs: torch.Tensor) -> torch.Tensor:
    """Unit-norm text features ``[P, D]`` of the candidate ``pairs`` ``[P, 2]``."""
    return base.encode_text(*prompts.text_inputs(base, pairs))


def image_features(base: DualEncoder, prompts: Prompts, pixels: torch.Tensor) -> torch.Tensor:
    """Unit-norm image features ``[B, D]`` (with mmpt's coupled visual prompts)."""
    return base.encode_image(pixels, prompts.visual_prompts())


# ---------------------------------------------------------------- data as index tensors


@dataclass
class Split:
    """One split's images ``[N, 3, H, W]`` and pair labels (index into the open-world pair list ``[N]``)."""

    images: torch.Tensor
    labels: torch.Tensor


def pair_index(data: CZSLData) -> dict[tuple[str, str], int]:
    """Open-world pair -> index (attribute-major, as :meth:`CZSLData.all_pairs`)."""
    return {pair: i for i, pair in enumerate(data.all_pairs())}


def pair_tensor(data: CZSLData, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """``[P, 2]`` (attr index, obj index) of named pairs."""
    attr, obj = {a: i for i, a in enumerate(data.attrs)}, {o: i for i, o in enumerate(data.objs)}
    return torch.tensor([[attr[a], obj[o]] for a, o in pairs], dtype=torch.long).reshape(-1, 2)


def load_split(data: CZSLData, split: str, size: int) -> Split:
    samples = data.split(split)
    index = pair_index(data)
    labels = torch.tensor([index[(s.attr, s.obj)] for s in samples], dtype=torch.long)
    return Split(load_images(data, samples, size), labels)


# ---------------------------------------------------------------- training


def _train(config: CZSLConfig, base: DualEncoder, prompts: Prompts, data: CZSLData, train: Split,
           checkpoint: Path, resume: bool, context: DistributedContext | None) -> dict[str, Any]:
    runtime = Runtime.for_config(config, context)
    seen = pair_tensor(data, data.seen_pairs)  # [S, 2]
    open_index = pair_index(data)
    to_seen = torch.full((len(open_index),), -1, dtype=torch.long)
    to_seen[torch.tensor([open_index[p] for p in data.seen_pairs])] = torch.arange(len(data.seen_pairs))
    targets = to_seen[train.labels]  # [N]: index among the seen pairs
    count = len(targets)
    scale = base.logit_scale

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        rows = runtime.context.shard(torch.randperm(count, generator=generator)[: config.batch_size])
        return train.images[rows], targets[rows]

    def loss(_step: int, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        pixels, labels = pair
        with runtime.autocast():
            text = pair_features(base, prompts, seen.to(pixels.device))  # [S, D]
            image = image_features(base, prompts, pixels)  # [B, D]
        logits = scale * image.float() @ text.float().T  # [B, S]
        value = nn.functional.cross_entropy(logits, labels)
        accuracy = float((logits.argmax(1) == labels).float().mean())
        return value, {"loss": float(value.detach()), "train_accuracy": accuracy}

    params = [p for p in prompts.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    task = Task(f"czsl {config.method}", {"prompts": prompts}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, config.warmup), frozen=(base,),  # type: ignore[arg-type]
                log_every=25)
    result = fit(task, config, runtime, checkpoint=checkpoint, resume=resume)
    prompts.to("cpu")
    base.to("cpu")  # type: ignore[attr-defined]
    return {"steps": result.step, "seconds": result.seconds, "device": str(runtime.device),
            "trainable_parameters": sum(p.numel() for p in params), "history": result.history}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def score_images(base: DualEncoder, prompts: Prompts, data: CZSLData, images: torch.Tensor,
                 batch: int = 256) -> torch.Tensor:
    """Scores ``[N, P]`` of every image against every open-world pair (the base's logit scale)."""
    base_module: Any = base
    device = next(base_module.parameters()).device
    prompts.to(device).eval()
    text = pair_features(base, prompts, pair_tensor(data, data.all_pairs()).to(device)).float()  # [P, D]
    out = [image_features(base, prompts, images[i : i + batch].to(device)).float() @ text.T
           for i in range(0, len(images), batch)]
    return base.logit_scale * torch.cat(out).cpu()


@torch.no_grad()
def primitive_features(base: DualEncoder, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm text features of each attribute ``[A, D]`` and object ``[O, D]`` under the method's prompt."""
    return (base.encode_text(*prompts.primitive_inputs(base, "attr")).float().cpu(),
            base.encode_text(*prompts.primitive_inputs(base, "obj")).float().cpu())


def evaluate_model(base: DualEncoder, prompts: Prompts, data: CZSLData, splits: dict[str, Split],
                   batch: int = 256) -> dict[str, Any]:
    """Closed- and open-world metrics on val and test, and open world with feasibility masking whose threshold
    is chosen on val (never on test)."""
    all_pairs = data.all_pairs()
    index = pair_index(data)
    pairs = pair_tensor(data, all_pairs)
    seen = torch.zeros(len(all_pairs), dtype=torch.bool)
    seen[[index[p] for p in data.seen_pairs]] = True
    attr_emb, obj_emb = primitive_features(base, prompts)
    feasibility = feasibility_scores(attr_emb, obj_emb, pair_tensor(data, data.seen_pairs)).reshape(-1)  # [A*O]
    out: dict[str, Any] = {}
    scores = {name: score_images(base, prompts, data, split.images, batch) for name, split in splits.items()}
    threshold = None
    if "val" in splits:
        threshold, _ = choose_threshold(scores["val"], splits["val"].labels, seen, feasibility, pairs[:, 0],
                                        pairs[:, 1])
        out["feasibility_threshold"] = threshold
    for name, split in splits.items():
        closed = seen.clone()
        closed[[index[p] for p in data.pairs[name]]] = True
        result = {"closed": evaluate_czsl(scores[name], split.labels, seen, closed, pairs[:, 0], pairs[:, 1]),
                  "open": evaluate_czsl(scores[name], split.labels, seen, None, pairs[:, 0], pairs[:, 1])}
        if threshold is not None:
            mask = feasible_mask(feasibility, seen, threshold)
            result["open_feasible"] = evaluate_czsl(scores[name], split.labels, seen, mask, pairs[:, 0], pairs[:, 1])
        out[name] = {world: r.to_dict() for world, r in result.items()}
    return out


# ---------------------------------------------------------------- runs


def save_run(out: Path, prompts: Prompts, config: CZSLConfig, data: CZSLData, summary: dict[str, Any]) -> None:
    """``prompts.safetensors`` (the learned parameters and their frozen starting embeddings) + ``czsl.json``."""
    if out.exists():
        shutil.rmtree(out)
    meta = {"format": FORMAT, "config": config.to_dict(), "attrs": data.attrs, "objs": data.objs,
            "base": str(Path(config.base).resolve()), "data": str(data.root),
            "metrics": summary.get("metrics", {}),
            "training": {k: v for k, v in summary.get("training", {}).items() if k != "history"}}
    with atomic_directory(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in prompts.state_dict().items()}
        atomic_write_bytes(tmp / "prompts.safetensors", save(state))
        (tmp / "czsl.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if summary.get("training", {}).get("history"):
            (tmp / "history.json").write_text(json.dumps(summary["training"]["history"]) + "\n", encoding="utf-8")


def load_run(folder: str | Path, base: str | Path | None = None) -> tuple[DualEncoder, Prompts, dict[str, Any]]:
    """(frozen base, prompts in eval mode, metadata) of a run saved by :func:`train_czsl`."""
    folder = Path(folder)
    meta = read_description(folder, "czsl.json", FORMAT, "a CZSL run", "create one with 'leanfm czsl train'")
    config = CZSLConfig.from_dict(meta["config"])
    encoder = load_base(base or meta["base"])
    prompts = Prompts(encoder, meta["attrs"], meta["objs"], config.method, config.context, config.vision_depth)
    prompts.load_state_dict(load_file(str(folder / "prompts.safetensors")))
    return encoder, prompts.eval(), meta


def train_czsl(config: CZSLConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
               context: DistributedContext | None = None) -> dict[str, Any]:
    """Learn ``config.method``'s prompts on the seen pairs of ``config.data``, evaluate val and test (closed and
    open world), save the run to ``out`` (checkpoint ``OUT.training``)."""
    if not config.data or not config.base:
        raise LeanfmError("a CZSL run needs data= (a CZSL folder) and base= (a base model folder)")
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    data = read_czsl(config.data)
    base = load_base(config.base)
    torch.manual_seed(config.seed)
    prompts = Prompts(base, data.attrs, data.objs, config.method, config.context, config.vision_depth)
    training: dict[str, Any] = {"steps": 0, "seconds": 0.0, "trainable_parameters": 0}
    if config.method != "zero-shot" and config.steps > 0:
        training = _train(config, base, prompts, data, load_split(data, "train", base.image_size), checkpoint,
                          resume, context)
    summary: dict[str, Any] = {"training": training, "metrics": {}}
    if context.is_main:
        splits = {name: load_split(data, name, base.image_size) for name in ("val", "test")}
        summary["metrics"] = evaluate_model(base, prompts, data, splits, config.eval_batch)
        save_run(out, prompts, config, data, summary)
    context.barrier()
    return summary


def evaluate_run(folder: str | Path, data: str | Path | None = None, base: str | Path | None = None,
                 batch: int = 256) -> dict[str, Any]:
    """Re-evaluate a saved run (on its own data, or another folder with the same attribute/object vocabulary)."""
    encoder, prompts, meta = load_run(folder, base)
    dataset = read_czsl(data or meta["data"])
    if dataset.attrs != meta["attrs"] or dataset.objs != meta["objs"]:
        raise LeanfmError(f"'{dataset.root}' has another attribute/object vocabulary than the run was trained on; "
                          "accepted: the run's dataset or one with the same vocabulary")
    splits = {name: load_split(dataset, name, encoder.image_size) for name in ("val", "test")}
    return evaluate_model(encoder, prompts, dataset, splits, batch)


register_method("mmpt", "train", CZSLConfig, train_czsl,
                description="MMPT: multi-modal prompt tuning for open-world compositional zero-shot learning "
                            "(also zero-shot, CoOp and CSP in the same harness)")
