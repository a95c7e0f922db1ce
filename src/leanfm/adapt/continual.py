r"""Rehearsal-free class-incremental text classification with continual adapters (C-LoRA, STAMINA) on MiniLM.

Setting (C-LoRA's and STAMINA's classification experiments, on text): a pretrained encoder (MiniLM-L6) learns a
sequence of tasks with disjoint classes (:func:`leanfm.data.fewshot.build_sequence`), one after another, never
seeing an earlier task's data again. A classifier is mean-pooled encoder states -> one linear head over every class
of the sequence. While task :math:`t` trains, only its own classes' logits enter the cross-entropy (the usual
rehearsal-free recipe of L2P / CODA-Prompt / C-LoRA), so earlier classes' head rows receive no gradient and stay
bit-identical (the optimiser has no weight decay on them). At test time the prediction is the argmax over every
class seen so far, without the task identity.

Methods (``--method``):

- ``lora``: sequential PEFT LoRA on the target layers, folded after each task — the baseline;
- ``clora``: the same plus C-LoRA's self-regulariser (:mod:`leanfm.models.lora`), weight ``reg_weight``;
- ``stamina``: hard-masked LoRA updates with a sparsity penalty (our reading, :mod:`leanfm.models.lora`);
- ``frozen``: the encoder never changes, only the head learns — the zero-forgetting-of-features reference;
- ``joint``: one LoRA trained on every task's data at once (all classes) for the same total steps — the upper
  bound that rehearsal-free methods approach.

Every method folds into the weights: the saved model is a plain ``BertModel`` plus a head, no extra parameters.
After each task the run evaluates every task seen so far on its test split and its validation split (the
accuracy matrices ``R``, :mod:`leanfm.eval.continual`: :math:`A_N`, :math:`F_N`); validation figures are for
choosing ``lr`` / ``reg_weight`` / ``sparsity``, test figures for reporting. A third matrix, ``test_task_aware``,
takes the argmax over the task's own classes only: it separates forgetting in the features from the head's bias
towards recent classes.

Resume: each task's training is one :func:`leanfm.training.fit` run (checkpoint ``OUT.training/task-XX``); after a
task is folded and evaluated, ``OUT.training/progress`` holds the folded weights of the adapted layers, the head,
the adapter history and the accuracy rows, so an interrupted sequence continues exactly where it stopped.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.fewshot import SEQUENCES, Example, TaskSequence, build_sequence
from leanfm.device import autocast as device_autocast
from leanfm.errors import LeanfmError
from leanfm.eval.continual import average_accuracy, forgetting
from leanfm.models.encoders import BERT_ENCODERS, bert_encoder
from leanfm.models.lora import AdapterSettings, ContinualAdapter, replay, settings_from, split_history, target_layers
from leanfm.paths import atomic_directory, atomic_write_bytes, read_description
from leanfm.training import DistributedContext, Runtime, Task, fit, init_distributed, prepare_run, warmup_cosine_lr
from leanfm.training.checkpoint import load_checkpoint, save_checkpoint
from leanfm.training.options import DEVICE_HELP, check_device_name

__all__ = ["METHODS", "ContinualConfig", "TextClassifier", "accuracy", "evaluate_run", "export_run", "load_run",
           "train_continual"]
log = logging.getLogger(__name__)

METHODS = ("lora", "clora", "stamina", "frozen", "joint")
FORMAT = "leanfm-continual/1"
SPLITS = ("test", "val")
TASK_AWARE = "test_task_aware"  # test accuracy with the argmax over the task's own classes (task identity given)


@dataclass
class ContinualConfig(MethodConfig):
    """``leanfm continual train``: the task sequence, the encoder, the adapter method and the optimisation."""

    RESUMABLE = ("checkpoint_every", "device")

    data: str = option("", "folder with the 16-shot data (fewshot/) and, for text11, slu/snips", cli=False)
    sequence: str = option("text4", "task sequence (text4: 4 datasets; text11: 11 tasks of 2-3 classes)",
                           choices=tuple(SEQUENCES))
    method: str = option("clora", "lora, clora, stamina, frozen (head only) or joint (all tasks at once)",
                         choices=METHODS)
    encoder: str = option("minilm-l6", "pretrained encoder (tiny-bert: random, for tests)", choices=BERT_ENCODERS)
    rank: int = option(8, "LoRA rank r")
    alpha: float = option(16.0, "LoRA alpha (update scale alpha / r)")
    targets: str = option("query,key,value", "comma-separated Linear layer names that get adapters")
    reg_weight: float = option(1e2, "C-LoRA's lambda on || |past| * delta ||_F^2 (1e2 won on validation, "
                               "BENCHMARKS.md; stamina too with --stamina-reg)")
    stamina_reg: bool = option(False, "add C-LoRA's regulariser to STAMINA too")
    sparsity: float = option(0.1, "STAMINA's weight on the masks' expected density")
    mask_rank: int = option(4, "STAMINA: hidden width of the low-rank mask MLP")
    mask_init: float = option(3.0, "STAMINA: initial mask logit (3: every entry open)")
    mask_tau: float = option(1.0, "STAMINA: Gumbel-sigmoid temperature")
    # at the adapters' lr (1e-3) 100 Adam steps move a mask logit by ~0.1, so no mask could close from 3 (measured)
    mask_lr_scale: float = option(10.0, "STAMINA: the mask MLP learns at lr times this")
    steps_per_task: int = option(100, "optimiser steps per task (joint: this times the number of tasks)")
    batch_size: int = option(32, "examples per step (split across ranks)")
    lr: float = option(1e-3, "peak learning rate of adapters and head (warm-up, then cosine, per task)")
    warmup: int = option(10, "warm-up steps per task")
    dropout: float = option(0.1, "dropout before the head")
    max_length: int = option(64, "sub-tokens per sentence with [CLS]/[SEP]; longer ones are cut")
    train_per_class: int = option(200, "training examples per class (0: all)")
    val_per_class: int = option(50, "validation examples per class (0: all)")
    test_per_class: int = option(200, "test examples per class (0: all)")
    split_seed: int = option(0, "seed of the train/test halves of each test set (fixed across runs)")
    seed: int = option(0, "seed of adapters, head and batches")
    checkpoint_every: int = option(50, "steps between training checkpoints")
    device: str = option("auto", DEVICE_HELP)
    autocast: bool = option(True, "bf16 autocast (training and evaluation) where bf16 is native (false: float32)")

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 1, "rank", "mask_rank", "steps_per_task", "batch_size", "checkpoint_every")
        check_at_least(self, 0, "warmup", "train_per_class", "val_per_class", "test_per_class")
        check_at_least(self, 8, "max_length")
        check_device_name(self.device)
        for name in ("reg_weight", "sparsity"):
            if not getattr(self, name) >= 0:
                raise LeanfmError(f"{name.replace('_', ' ')} {getattr(self, name)} is invalid; accepted: a number >= 0")
        for name in ("alpha", "lr", "mask_tau", "mask_lr_scale"):
            if not getattr(self, name) > 0:
                raise LeanfmError(f"{name.replace('_', ' ')} {getattr(self, name)} is invalid; accepted: a number > 0")
        if not 0 <= self.dropout < 1:
            raise LeanfmError(f"dropout {self.dropout} is invalid; accepted: 0 <= dropout < 1")
        if not [t for t in self.targets.split(",") if t.strip()]:
            raise LeanfmError(f"targets '{self.targets}' name no layer; accepted: e.g. query,key,value")


# ---------------------------------------------------------------- model


class TextClassifier(nn.Module):
    """Encoder -> masked mean pooling -> dropout -> one linear head over every class of the sequence."""

    def __init__(self, encoder: nn.Module, classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(int(cast(Any, encoder).config.hidden_size), classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
        weights = attention_mask[..., None].to(states.dtype)  # [B, T, 1]
        pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
        return self.head(self.dropout(pooled))  # [B, C]


def _encode(tokenizer: Any, examples: Sequence[Example], max_length: int) -> list[list[int]]:
    if not examples:
        return []
    return tokenizer([e.text for e in examples], truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    length = max(len(x) for x in ids)
    input_ids = torch.zeros(len(ids), length, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x)
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


@torch.no_grad()
def class_logits(model: TextClassifier, tokenizer: Any, examples: Sequence[Example], *, max_length: int = 64,
                 batch_size: int = 128, amp: bool = False) -> torch.Tensor:
    """Logits ``[len(examples), C]`` (float32, CPU) in the order of ``examples``; batches of similar lengths."""
    model.eval()
    device = next(model.parameters()).device
    ids = _encode(tokenizer, examples, max_length)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
    out = torch.zeros(len(ids), model.head.out_features)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in _collate([ids[i] for i in rows]).items()}
        with device_autocast(device, amp):
            out[rows] = model(batch["input_ids"], batch["attention_mask"]).float().cpu()  # [B, C]
    return out


def accuracy_of(logits: torch.Tensor, examples: Sequence[Example], allowed: Sequence[int]) -> float:
    """Share of ``examples`` whose argmax of ``logits`` over the ``allowed`` classes is their label."""
    if not examples:
        return math.nan
    allowed_t = torch.tensor(list(allowed))
    predicted = allowed_t[logits[:, allowed_t].argmax(-1)]
    return float((predicted == torch.tensor([e.label for e in examples])).float().mean())


def accuracy(model: TextClassifier, tokenizer: Any, examples: Sequence[Example], allowed: Sequence[int], *,
             max_length: int = 64, batch_size: int = 128, amp: bool = False) -> float:
    """Share of ``examples`` whose argmax over the ``allowed`` classes is their label (class-incremental)."""
    if not examples:
        return math.nan
    logits = class_logits(model, tokenizer, examples, max_length=max_length, batch_size=batch_size, amp=amp)
    return accuracy_of(logits, examples, allowed)


# ---------------------------------------------------------------- training


@dataclass
class _Stage:
    """One training stage: a task of the sequence, or every task at once (joint)."""

    name: str
    classes: tuple[int, ...]
    train: list[Example]
    steps: int


def _stages(config: ContinualConfig, sequence: TaskSequence) -> list[_Stage]:
    if config.method == "joint":
        every = tuple(c for t in sequence.tasks for c in t.classes)
        return [_Stage("joint", every, [e for t in sequence.tasks for e in t.train],
                       config.steps_per_task * len(sequence.tasks))]
    return [_Stage(t.name, t.classes, t.train, config.steps_per_task) for t in sequence.tasks]


def _batches(config: ContinualConfig, stage: _Stage, number: int, tokenizer: Any, runtime: Runtime) -> Any:
    ids = _encode(tokenizer, stage.train, config.max_length)
    local = {c: i for i, c in enumerate(stage.classes)}
    labels = torch.tensor([local[e.label] for e in stage.train])
    per_epoch = max(1, math.ceil(len(ids) / config.batch_size))

    def batch(step: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step, per_epoch)
        seed = (config.seed * 1_000_003 + number) * 10_007 + epoch
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
        rows = runtime.context.shard(order[index * config.batch_size : (index + 1) * config.batch_size])
        return {**_collate([ids[int(r)] for r in rows]), "labels": labels[rows]}

    return batch


def _stage_loss(model: TextClassifier, adapter: ContinualAdapter | None, classes: torch.Tensor, runtime: Runtime,
                _step: int, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    return _step_loss(model, adapter, classes, batch, runtime)


def _step_loss(model: TextClassifier, adapter: ContinualAdapter | None, classes: torch.Tensor,
               batch: dict[str, torch.Tensor], runtime: Runtime) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over the stage's own classes (+ the adapter's penalty)."""
    with runtime.autocast():
        logits = model(batch["input_ids"], batch["attention_mask"])  # [B, C]
    ce = nn.functional.cross_entropy(logits.float()[:, classes.to(logits.device)], batch["labels"])
    loss, record = ce, {"ce": float(ce.detach())}
    if adapter is not None:
        penalty, parts = adapter.penalty()
        loss = loss + penalty
        record |= parts
    return loss, {"loss": float(loss.detach()), **record}


def _folded_weights(model: TextClassifier, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    modules = dict(model.encoder.named_modules())
    return {name: modules[name].weight.detach().cpu().clone() for name in layers}  # type: ignore[union-attr]


def _load_folded(model: TextClassifier, weights: dict[str, torch.Tensor]) -> None:
    modules = dict(model.encoder.named_modules())
    with torch.no_grad():
        for name, value in weights.items():
            modules[name].weight.copy_(value)  # type: ignore[union-attr, operator]


def _evaluate_row(model: TextClassifier, tokenizer: Any, sequence: TaskSequence, upto: int, config: ContinualConfig,
                  runtime: Runtime) -> dict[str, list[float]]:
    """Accuracy on tasks 0..upto (test and val), predicting over every class of those tasks."""
    seen = [c for t in sequence.tasks[: upto + 1] for c in t.classes]
    row: dict[str, list[float]] = {split: [] for split in (*SPLITS, TASK_AWARE)}
    for task in sequence.tasks[: upto + 1]:
        for split in SPLITS:  # one forward per split: the task-aware figure reuses the test logits
            examples = getattr(task, split)
            logits = class_logits(model, tokenizer, examples, max_length=config.max_length, amp=runtime.amp)
            row[split].append(accuracy_of(logits, examples, seen))
            if split == "test":
                row[TASK_AWARE].append(accuracy_of(logits, examples, task.classes))
    return row


def train_continual(config: ContinualConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                    context: DistributedContext | None = None) -> dict[str, Any]:
    """Train ``config.method`` through ``config.sequence``; save the folded model, the history and the metrics.

    Returns ``{"metrics": {"test": {...}, "val": {...}}, "matrices": ..., "training": [...]}``.
    """
    if not config.data:
        raise LeanfmError("no data folder: pass the folder holding fewshot/ (or set data= in the library)")
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    sequence = build_sequence(config.data, config.sequence, split_seed=config.split_seed,
                              train_per_class=config.train_per_class, val_per_class=config.val_per_class,
                              test_per_class=config.test_per_class)
    runtime = Runtime.for_config(config, context)
    encoder, tokenizer = bert_encoder(config.encoder)
    layers = target_layers(encoder, [t.strip() for t in config.targets.split(",") if t.strip()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TextClassifier(encoder, len(sequence.class_names), config.dropout)
    model.requires_grad_(False)
    uses_adapter = config.method in ("lora", "clora", "stamina", "joint")
    adapter = ContinualAdapter(encoder, _settings(config)) if uses_adapter else None
    stages = _stages(config, sequence)
    rows: dict[str, list[list[float]]] = {split: [] for split in (*SPLITS, TASK_AWARE)}
    training: list[dict[str, Any]] = []
    done = 0
    progress_dir = checkpoint / "progress"
    if resume and (state := load_checkpoint(progress_dir)) is not None:
        config.check_resume(state["fingerprint"], where=f"training checkpoint '{progress_dir}'")
        _load_folded(model, state["folded"])
        model.head.load_state_dict(state["head"])
        if adapter is not None:
            adapter.load_state(state["adapter"])
        rows, training, done = state["rows"], state["training"], state["done"]
        log.info("resuming %s after %d of %d tasks", config.method, done, len(stages))
    model.to(runtime.device)
    for number in range(done, len(stages)):
        stage = stages[number]
        if adapter is not None:
            adapter.begin_task()
        trainable: dict[str, nn.Module] = {"head": model.head.requires_grad_(True)}
        if adapter is not None:
            trainable["adapter"] = nn.ParameterDict(adapter.parameters())
        model.train()
        named = [(k, p) for m in trainable.values() for k, p in m.named_parameters()]
        masks = [p for k, p in named if "lora_mask" in k]
        groups: list[dict[str, Any]] = [{"params": [p for k, p in named if "lora_mask" not in k]}]
        groups += [{"params": masks, "lr_scale": config.mask_lr_scale}] if masks else []
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
        classes = torch.tensor(stage.classes)
        task = Task(f"{config.method} task {number + 1}/{len(stages)} ({stage.name})", trainable, optimizer,
                    _batches(config, stage, number, tokenizer, runtime),
                    functools.partial(_stage_loss, model, adapter, classes, runtime),
                    lr=warmup_cosine_lr(config.lr, stage.steps, config.warmup), log_every=25)
        torch.manual_seed(config.seed * 7_919 + number)  # dropout / Gumbel noise: the same after a resume
        result = fit(task, config, runtime, steps=stage.steps, checkpoint=checkpoint / f"task-{number:02d}",
                     resume=resume)
        model.head.requires_grad_(False)
        if adapter is not None:
            adapter.end_task()
        last = len(sequence.tasks) - 1 if config.method == "joint" else number
        info = {"task": stage.name, "steps": result.step, "seconds": result.seconds,
                "final_loss": result.history[-1]["loss"] if result.history else None, "history": result.history}
        if context.is_main:
            row = _evaluate_row(model, tokenizer, sequence, last, config, runtime)
            for split, values in row.items():
                rows[split].append(values)
            training.append(info)
            state = {"done": number + 1, "folded": _folded_weights(model, layers),
                     "head": {k: v.detach().cpu() for k, v in model.head.state_dict().items()},
                     "adapter": adapter.state() if adapter is not None else {}, "rows": rows,
                     "training": training, "fingerprint": config.fingerprint()}
            save_checkpoint(progress_dir, state)
            shutil.rmtree(checkpoint / f"task-{number:02d}", ignore_errors=True)
            log.info("%s after %s: test %s", config.method, stage.name, " ".join(f"{a:.3f}" for a in row["test"]))
        context.barrier()
    model.to("cpu").eval()
    summary = {"metrics": {split: _metrics(matrix) for split, matrix in rows.items()}, "matrices": rows,
               "training": training, "sequence": _describe(sequence)}
    if context.is_main:
        save_run(out, model, layers, adapter, config, sequence, summary)
    context.barrier()
    return summary


def _settings(config: ContinualConfig) -> AdapterSettings:
    """The adapter of a method: joint trains plain LoRA; lambda and beta only where the method uses them."""
    method = "lora" if config.method == "joint" else config.method
    reg = config.reg_weight if method == "clora" or (method == "stamina" and config.stamina_reg) else 0.0
    sparsity = config.sparsity if method == "stamina" else 0.0
    return settings_from(config, method=method, reg_weight=reg, sparsity=sparsity)


def _metrics(matrix: list[list[float]]) -> dict[str, Any]:
    if not matrix:
        return {}
    return {"average_accuracy": average_accuracy(matrix), "forgetting": forgetting(matrix),
            "final_row": matrix[-1]}


def _describe(sequence: TaskSequence) -> dict[str, Any]:
    return {"name": sequence.name, "class_names": sequence.class_names,
            "tasks": [{"name": t.name, "classes": list(t.classes), **size}
                      for t, size in zip(sequence.tasks, sequence.sizes(), strict=True)]}


# ---------------------------------------------------------------- saving, loading


def save_run(out: Path, model: TextClassifier, layers: Sequence[str], adapter: ContinualAdapter | None,
             config: ContinualConfig, sequence: TaskSequence, summary: dict[str, Any]) -> None:
    """``weights.safetensors`` (folded adapted layers, head, every task's update), ``adapter.safetensors`` (the
    adapter history for :meth:`leanfm.models.lora.ContinualAdapter.load`) and ``continual.json``, atomically."""
    if out.exists():
        shutil.rmtree(out)
    tensors = {f"folded.{name}": w for name, w in _folded_weights(model, layers).items()}
    tensors |= {f"head.{k}": v.detach().contiguous() for k, v in model.head.state_dict().items()}
    for number, record in enumerate(adapter.history if adapter is not None else []):
        tensors |= {f"history.{number}.{k}": v.contiguous() for k, v in record.items()}
    meta = {"format": FORMAT, "encoder": config.encoder, "config": config.to_dict(), "layers": list(layers),
            "sequence": summary["sequence"], "metrics": summary["metrics"], "matrices": summary["matrices"],
            "training": [{k: v for k, v in t.items() if k != "history"} for t in summary["training"]]}
    with atomic_directory(out) as tmp:
        atomic_write_bytes(tmp / "weights.safetensors", save(tensors))
        if adapter is not None:  # the adapter history alone: ContinualAdapter.load(..., base_encoder, apply=True)
            adapter.save(tmp / "adapter.safetensors")
        (tmp / "continual.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def read_meta(folder: str | Path) -> dict[str, Any]:
    return read_description(folder, "continual.json", FORMAT, "a continual run",
                            "create one with 'leanfm continual train'")


def load_run(folder: str | Path, *, from_history: bool = False) -> tuple[TextClassifier, Any, dict[str, Any]]:
    """(classifier in eval mode, tokenizer, metadata) of a saved run: the base encoder with the folded layers.

    ``from_history`` rebuilds the adapted layers from the base weights and every task's recorded update instead
    (:func:`leanfm.models.lora.replay`) — equal up to float rounding; a check that the history is complete.
    """
    meta = read_meta(folder)
    tensors = load_file(str(Path(folder) / "weights.safetensors"))
    encoder, tokenizer = bert_encoder(meta["encoder"])
    model = TextClassifier(encoder, len(meta["sequence"]["class_names"]), meta["config"]["dropout"])
    if from_history:
        replay(split_history(tensors), encoder)
    else:
        _load_folded(model, {k[len("folded."):]: v for k, v in tensors.items() if k.startswith("folded.")})
    model.head.load_state_dict({k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")})
    return model.eval(), tokenizer, meta


register_method("continual", "train", ContinualConfig, train_continual,
                description="continual adapters: sequential LoRA, C-LoRA and STAMINA on PEFT, class-incremental")


def evaluate_run(folder: str | Path, data: str | Path | None = None, split: str = "test") -> dict[str, Any]:
    """Accuracy of a saved run on every task's ``split`` (argmax over all classes) and their mean, :math:`A_N`."""
    if split not in (*SPLITS, TASK_AWARE):
        raise LeanfmError(f"unknown split '{split}'; accepted: {', '.join((*SPLITS, TASK_AWARE))}")
    model, tokenizer, meta = load_run(folder)
    config = meta["config"]
    sequence = build_sequence(data if data is not None else config["data"], config["sequence"],
                              split_seed=config["split_seed"], train_per_class=config["train_per_class"],
                              val_per_class=config["val_per_class"], test_per_class=config["test_per_class"])
    if sequence.class_names != meta["sequence"]["class_names"]:
        raise LeanfmError(f"'{data}' gives classes other than the run's; accepted: data in the run's layout")
    every = [c for t in sequence.tasks for c in t.classes]
    per_task = {t.name: accuracy(model, tokenizer, t.test if split == TASK_AWARE else getattr(t, split),
                                 t.classes if split == TASK_AWARE else every, max_length=config["max_length"])
                for t in sequence.tasks}
    return {"split": split, "average_accuracy": sum(per_task.values()) / len(per_task), "per_task": per_task}


def export_run(folder: str | Path, out: str | Path) -> dict[str, Any]:
    """The folded encoder as a transformers folder (``save_pretrained``) + ``head.safetensors`` + ``labels.json``:
    loads with ``BertModel.from_pretrained(out)`` and no leanfm — there is nothing else to load."""
    model, tokenizer, meta = load_run(folder)
    out = Path(out)
    with atomic_directory(out) as tmp:
        model.encoder.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        atomic_write_bytes(tmp / "head.safetensors",
                           save({k: v.contiguous() for k, v in model.head.state_dict().items()}))
        labels = {"classes": meta["sequence"]["class_names"], "pooling": "mean over attention_mask",
                  "max_length": meta["config"]["max_length"]}
        (tmp / "labels.json").write_text(json.dumps(labels, indent=2) + "\n", encoding="utf-8")
    return {"out": str(out), "classes": len(meta["sequence"]["class_names"])}
