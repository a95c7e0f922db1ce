"""DynaMo head training (METHODS.md section 3): heads 2..n on a frozen base, with the one training loop.

Training (:func:`train_heads`). The base is frozen (so PPL_1 stays the base model's, as the issue requires);
the loss is ``Σ_{j>=2} CE(head_j(x_{<=t}), x_{t+j})``; AdamW with a cosine schedule and 1% warm-up. The paper's
three learning rates (base LR_B, heads 100 LR_B, head->stem gradient 0.1 LR_B) reduce to the heads' rate when
the base is frozen; we freeze it because CPU budgets allow a few hundred steps, not a re-training of the stem.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.calibration import random_windows, split_token_ids
from leanfm.decode.dynamo import INITS, DynamoModel, save_dynamo
from leanfm.decode.ngrams import NgramCounts
from leanfm.errors import LeanfmError
from leanfm.eval.perplexity import summed_nll
from leanfm.models import load_model
from leanfm.training import DistributedContext, Runtime, Task, fit, prepare_run, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name


@dataclass
class DynamoTrainConfig(MethodConfig):
    """Head training settings (the base model stays frozen); ``model`` is the base the heads are trained on."""

    model: str = option("smollm2-135m", "base model: registered name, checkpoint folder or hub id", cli=False)
    heads: int = option(3, "total heads incl. the base model's")
    steps: int = option(300, "training steps")
    lr: float = option(1e-3, "learning rate of the new heads (warm-up over 1% of the steps, then cosine)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    batch_size: int = option(4, "global batch of training windows, split across ranks")
    seqlen: int = option(256, "tokens per training window")
    init: str = option("copy", "new layers start as a copy of the last block (copy) or random", choices=INITS)
    split: str = option("train", "Austen split the heads train on (and the n-grams are counted on)")
    seed: int = option(0, "seed of the batches and of random head weights")
    checkpoint_every: int = option(50, "steps between training checkpoints")
    autocast: bool = option(True, "bfloat16 autocast for the forward pass (false: float32)")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        if self.heads < 2:
            raise LeanfmError(f"heads {self.heads} is too few; accepted: an integer >= 2 (head 1 is the base model)")
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every")
        if self.seqlen <= self.heads:
            raise LeanfmError(f"seqlen {self.seqlen} is too short for {self.heads} heads")
        if self.init not in INITS:
            raise LeanfmError(f"unknown head init '{self.init}'; accepted: {', '.join(INITS)}")
        check_device_name(self.device)
        super().validate()


def head_losses(model: DynamoModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of heads 2..n at their offsets (head j: position t predicts t+j)."""
    _, states = model.forward_heads(ids)
    losses = []
    for j, state in enumerate(states, start=2):
        logits = model.project(state[:, :-j])
        losses.append(nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, j:].flatten()))
    return losses


def heads_task(model: DynamoModel, tokenizer: Any, config: DynamoTrainConfig, runtime: Runtime) -> Task:
    """The heads' part of the training loop: seeded windows of the split, loss ``Σ_j CE_j`` under autocast."""
    optimizer = torch.optim.AdamW(model.heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ids = split_token_ids(tokenizer, "austen", config.split)

    def batch(step: int) -> torch.Tensor:
        windows = random_windows(ids, config.batch_size, config.seqlen, config.seed * 1_000_003 + 7919 * (step + 1))
        return runtime.context.shard(windows)

    def loss(_step: int, windows: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        with runtime.autocast():
            losses = head_losses(model, windows)
        total = sum(losses)
        assert isinstance(total, torch.Tensor)  # heads >= 2: never the empty sum 0
        return total, {"losses": [float(runtime.context.mean(x)) for x in losses]}

    warmup = max(1, round(0.01 * config.steps))
    return Task("dynamo heads", {"heads": model.heads}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, warmup), frozen=(model.base,))


def train_heads(model: DynamoModel, tokenizer: Any, config: DynamoTrainConfig, checkpoint: Path | None = None,
                resume: bool = False, context: DistributedContext | None = None) -> dict[str, Any]:
    """Train the extra heads on the frozen base with the one training loop; returns steps, seconds, loss curve."""
    runtime = Runtime.for_config(config, context)
    result = fit(heads_task(model, tokenizer, config, runtime), config, runtime, checkpoint=checkpoint, resume=resume)
    return {"steps": result.step, "seconds": result.seconds, "tokens_seen": result.step * config.batch_size
            * config.seqlen, "world_size": runtime.context.world_size, "device": str(runtime.device),
            "history": result.history}


@torch.no_grad()
def head_perplexities(model: DynamoModel, windows: torch.Tensor) -> list[float]:
    """PPL_1..PPL_n on ``windows`` ``[N, T]``: head j scores token t+j from position t (token-weighted)."""
    nll = [0.0] * model.num_heads
    count = [0] * model.num_heads
    for row in windows:
        ids = row[None]
        final, states = model.forward_heads(ids)
        all_logits = model.logits(final, states).unbind(-2)
        for j, head in enumerate(all_logits, start=1):
            target = ids[:, j:]
            nll[j - 1] += float(summed_nll(head[:, :-j], target).double().sum())
            count[j - 1] += target.numel()
    return [math.exp(total / c) for total, c in zip(nll, count, strict=True)]


def packable_order(vocab: int, wanted: int) -> int:
    """The longest n-gram order (<= ``wanted``) whose keys fit in int64 for ``vocab`` tokens."""
    order = 1
    while order < wanted and vocab ** (order + 1) < 2**63:
        order += 1
    return order


def train_and_save(config: DynamoTrainConfig, out: Path, *, resume: bool = False, overwrite: bool = False,
                   context: DistributedContext | None = None) -> dict[str, Any]:
    """``leanfm dynamo train``: add heads to ``config.model``, train them, count n-grams, save to ``out``.

    The checkpoint is ``OUT.training`` (:func:`leanfm.training.prepare_run`'s rule). Returns the training summary.
    """
    out = Path(out)
    runtime = Runtime.for_config(config, context)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=runtime.context)
    base, tokenizer = load_model(config.model)
    model = DynamoModel(base, config.heads, config.init, config.seed)
    summary = train_heads(model, tokenizer, config, checkpoint, resume, runtime.context)
    if runtime.context.is_main:
        model.cpu()
        vocab = int(model.config.vocab_size)
        ids = split_token_ids(tokenizer, "austen", config.split)
        stats = NgramCounts.build(ids, vocab, packable_order(vocab, config.heads))
        save_dynamo(model, tokenizer, stats, out, {"base": config.model, "train": config.to_dict(),
                                                   "training": summary})
    runtime.context.barrier()
    return summary



register_method("dynamo", "train", DynamoTrainConfig, train_and_save,
                description="DynaMo: extra heads for multi-token decoding, trained on a frozen base")
