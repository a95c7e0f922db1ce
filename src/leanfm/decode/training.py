"""DynaMo head training (METHODS.md section 3): heads 2..n on a frozen base, with the one training loop.

Loss. The base is frozen (so PPL_1 stays the base model's, as the issue requires); head j at position t predicts
token t+j, and its loss is ``(1 - W) CE(x_{t+j}) + W KL(p_base(· | x_{<=t+j-1}) || q_j(· | x_{<=t}))`` with W the
``distill`` weight (0: plain cross-entropy; the KL term is self-distillation on the base's own distribution for
the same token, i.e. its logits at position t+j-1 — our reading of the issue's option, not the paper's). The
total is ``Σ_{j>=2}`` of these. AdamW with a cosine schedule and 1% warm-up. The paper's three learning rates
(base LR_B, heads 100 LR_B, head->stem gradient 0.1 LR_B) reduce to the heads' rate when the base is frozen.

Cost. With the stem frozen its states are the same every epoch, so by default (``cache_states``) they are computed
once in bfloat16 and cached on disk (:mod:`leanfm.decode.stem_cache`); a step then runs only the heads and the
frozen LM head. The LM head (49152 x 576 for SmolLM2) is most of a step: its cross-entropy is computed in row
chunks by :class:`ProjectedLoss`, which keeps only the gradient of the hidden states (``(q - target) W``), never
the ``[N, V]`` logits, so memory stays bounded and no weight gradient is formed for the frozen head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.calibration import mixed_windows, parse_calibration, source_token_ids
from leanfm.decode.dynamo import INITS, DynamoModel, save_dynamo
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.stem_cache import StemCache, block_kwargs, build_stem_cache, cache_folder, cache_key, stem_pass
from leanfm.errors import LeanfmError
from leanfm.eval.perplexity import summed_nll
from leanfm.models import load_model
from leanfm.models.artifacts import MANIFEST, MAX_MB, REQUIRED, read_manifest
from leanfm.paths import atomic_directory, atomic_write_bytes, atomic_write_json
from leanfm.training import DistributedContext, Runtime, Task, fit, prepare_run, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name
from leanfm.version import __version__

log = logging.getLogger(__name__)
ARTIFACT_HEADS = "heads.safetensors"


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
    train_corpus: str = option("austen:train,pydocs:train", "training text: comma-separated corpora (NAME:SPLIT) "
                               "and/or text files or folders; every batch shares its windows out evenly; the "
                               "n-grams are counted on the same text")
    cache_states: bool = option(True, "cache the frozen stem's states on disk once (false: rerun it every step)")
    cache_windows: int = option(1500, "windows per source whose stem states are cached, evenly spaced over the "
                                "source's non-overlapping windows (0: all)")
    distill: float = option(0.0, "self-distillation weight W in [0, 1]: (1-W) CE + W KL(base || head)")
    seed: int = option(0, "seed of the batches and of random head weights")
    checkpoint_every: int = option(50, "steps between training checkpoints")
    autocast: bool = option(True, "bfloat16 autocast where the device runs bf16 natively (false: float32)")
    device: str = option("auto", DEVICE_HELP)

    def validate(self) -> None:
        if self.heads < 2:
            raise LeanfmError(f"heads {self.heads} is too few; accepted: an integer >= 2 (head 1 is the base model)")
        check_at_least(self, 1, "steps", "batch_size", "checkpoint_every")
        check_at_least(self, 0, "cache_windows")
        if self.seqlen <= self.heads:
            raise LeanfmError(f"seqlen {self.seqlen} is too short for {self.heads} heads")
        if self.init not in INITS:
            raise LeanfmError(f"unknown head init '{self.init}'; accepted: {', '.join(INITS)}")
        if not 0 <= self.distill <= 1:
            raise LeanfmError(f"distill {self.distill} is out of range; accepted: 0 <= distill <= 1")
        check_device_name(self.device)
        parse_calibration(self.train_corpus)
        super().validate()


# ---------------------------------------------------------------- losses


class ProjectedLoss(torch.autograd.Function):
    """Mean over rows of ``(1 - W) CE(softmax(h Wᵀ + b), y) + W KL(softmax(g Wᵀ + b) || softmax(h Wᵀ + b))``.

    ``h`` ``[N, d]``: a head's normed states (the only input with a gradient); ``W, b``: the frozen LM head;
    ``g``: the base's final normed states for the same tokens (None when W = 0). The gradient of the loss with
    respect to the logits is ``q - ((1 - W) onehot(y) + W p)``, so ``dh = (q - t) W / N`` is formed chunk by
    chunk in the forward pass and kept instead of the logits. Matmuls run in ``dtype`` (bfloat16 under
    autocast, as the uncached path's LM head does); softmaxes in float32. Returns (loss, mean CE, mean KL).
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, teacher: torch.Tensor | None, distill: float, dtype: torch.dtype,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = weight.to(dtype)
        grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        ce = torch.zeros((), dtype=torch.float64, device=hidden.device)
        kl = torch.zeros((), dtype=torch.float64, device=hidden.device)
        rows = hidden.shape[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, rows, chunk):
                logq = _logits(hidden[start : start + chunk], w, bias).log_softmax(-1)
                target = targets[start : start + chunk]
                ce += -logq.gather(1, target[:, None]).double().sum()
                delta = logq.exp()
                delta[torch.arange(target.numel(), device=delta.device), target] -= 1 - distill
                if teacher is not None and distill > 0:
                    logp = _logits(teacher[start : start + chunk], w, bias).log_softmax(-1)
                    p = logp.exp()
                    kl += (p * (logp - logq)).sum().double()
                    delta -= distill * p
                grad[start : start + chunk] = (delta.to(dtype) @ w).float()
        ctx.save_for_backward(grad / rows)
        ctx.hidden_dtype = hidden.dtype
        ce, kl = (ce / rows).float(), (kl / rows).float()
        ctx.mark_non_differentiable(ce, kl)
        return (1 - distill) * ce + distill * kl, ce, kl

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.hidden_dtype), None, None, None, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = nn.functional.linear(hidden.to(weight.dtype), weight).float()
    return logits + bias.float() if bias is not None else logits


def projected_loss(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, teacher: torch.Tensor | None = None,
                   distill: float = 0.0, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:class:`ProjectedLoss` through the frozen ``lm_head`` (bfloat16 matmuls under autocast, else float32)."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else torch.float32
    bias = getattr(lm_head, "bias", None)
    weight: torch.Tensor = getattr(lm_head, "weight")  # noqa: B009  # typed access to a Module's parameter
    loss, ce, kl = ProjectedLoss.apply(hidden, weight.detach(), None if bias is None else bias.detach(),
                                       targets, teacher, float(distill), dtype, chunk)
    return loss, ce, kl


def cached_head_losses(model: DynamoModel, states: torch.Tensor, ids: torch.Tensor, kwargs: dict[str, Any],
                       final: torch.Tensor | None = None, distill: float = 0.0
                       ) -> tuple[torch.Tensor, list[float], list[float]]:
    """Σ_j loss_j of heads 2..n from the stem's penultimate ``states`` ``[B, T, d]`` (no stem forward here).

    ``kwargs``: the last block's keyword arguments for this window length (:func:`block_kwargs`); ``final``: the
    base's final normed states (needed when ``distill`` > 0). Returns (total, CE per head, KL per head).
    """
    norm = model.adapter.final_norm(model.base)
    lm_head = model.base.get_output_embeddings()
    states = states.float()
    total, ces, kls = None, [], []
    for j, layer in enumerate(model.heads, start=2):
        out = layer(states, **kwargs)
        hidden = (out[0] if isinstance(out, tuple) else out)[:, :-j]
        hidden = norm(hidden) if norm is not None else hidden
        teacher = final[:, j - 1 : -1].flatten(0, 1).float() if final is not None and distill > 0 else None
        loss, ce, kl = projected_loss(hidden.flatten(0, 1), lm_head, ids[:, j:].flatten(), teacher, distill)
        total = loss if total is None else total + loss
        ces.append(float(ce))
        kls.append(float(kl))
    assert total is not None  # heads >= 2: at least one extra head
    return total, ces, kls


def head_losses(model: DynamoModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of heads 2..n at their offsets (head j: position t predicts t+j), through ``forward_heads``."""
    _, states = model.forward_heads(ids)
    losses = []
    for j, state in enumerate(states, start=2):
        logits = model.project(state[:, :-j])
        losses.append(nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, j:].flatten()))
    return losses


# ---------------------------------------------------------------- data and the training task


def train_streams(tokenizer: Any, train_corpus: str) -> tuple[list[torch.Tensor], list[str]]:
    """Token ids and names of the training sources of ``train_corpus`` (a ``--train-corpus`` value)."""
    sources = parse_calibration(train_corpus)
    return [source_token_ids(tokenizer, s) for s in sources], [s.describe() for s in sources]


def _base_id(name: str) -> str:
    return str(Path(name).resolve()) if Path(name).exists() else name


def prepare_stem_cache(model: DynamoModel, tokenizer: Any, config: DynamoTrainConfig, root: Path | None = None,
                       context: DistributedContext | None = None) -> tuple[StemCache, dict[str, Any]]:
    """Build (or finish) the stem cache ``config`` needs and open it; returns (cache, build record)."""
    streams, names = train_streams(tokenizer, config.train_corpus)
    key = cache_key(_base_id(config.model), names, config.seqlen, config.cache_windows)
    folder = cache_folder(key, root)
    kinds = ("penultimate", "final") if config.distill > 0 else ("penultimate",)
    record: dict[str, Any] = {}
    if context is None or context.is_main:
        record = build_stem_cache(model.base, streams, names, folder, config.seqlen, config.cache_windows, kinds)
    if context is not None:
        context.barrier()
    return StemCache(folder, kinds), {**record, "folder": str(folder), "key": key}


def heads_task(model: DynamoModel, tokenizer: Any, config: DynamoTrainConfig, runtime: Runtime,
               cache: StemCache | None = None) -> Task:
    """The heads' part of the training loop: seeded windows (from ``cache`` when given), loss Σ_j loss_j."""
    model.heads.requires_grad_(True)  # copies of a frozen base's block start frozen
    optimizer = torch.optim.AdamW(model.heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    streams, names = ([], []) if cache is not None else train_streams(tokenizer, config.train_corpus)
    kwargs = block_kwargs(model.base, config.seqlen) if cache is not None else {}

    def batch(step: int) -> Any:
        seed = config.seed * 1_000_003 + 7919 * (step + 1)
        if cache is None:
            return runtime.context.shard(mixed_windows(streams, config.batch_size, config.seqlen, seed, names))
        picks = cached_picks(cache.windows, config.batch_size, seed)
        return tuple(runtime.context.shard(x) for x in cache.batch(picks))

    def loss(_step: int, data: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        final: torch.Tensor | None
        with runtime.autocast():
            if cache is None:
                states, final, block = stem_pass(model.base, data)
                ids = data
            else:
                ids, states, final, block = data[0], data[1], data[2] if len(data) > 2 else None, kwargs
            total, ces, kls = cached_head_losses(model, states, ids, block, final, config.distill)
        record: dict[str, Any] = {"losses": [float(runtime.context.mean(torch.tensor(x))) for x in ces]}
        if config.distill > 0:
            record["kl"] = [float(runtime.context.mean(torch.tensor(x))) for x in kls]
        return total, record

    warmup = max(1, round(0.01 * config.steps))
    return Task("dynamo heads", {"heads": model.heads}, optimizer, batch, loss,
                lr=warmup_cosine_lr(config.lr, config.steps, warmup), frozen=(model.base,), log_every=10)


def cached_picks(windows: list[int], batch_size: int, seed: int) -> list[tuple[int, int]]:
    """``batch_size`` (source, window) picks shared evenly between sources (the first ones get the remainder)."""
    generator = torch.Generator().manual_seed(seed)
    picks = []
    for source, count in enumerate(windows):
        share = batch_size // len(windows) + (1 if source < batch_size % len(windows) else 0)
        picks += [(source, int(i)) for i in torch.randint(0, count, (share,), generator=generator)]
    return picks


def train_heads(model: DynamoModel, tokenizer: Any, config: DynamoTrainConfig, checkpoint: Path | None = None,
                resume: bool = False, context: DistributedContext | None = None,
                cache_root: Path | None = None) -> dict[str, Any]:
    """Train the extra heads on the frozen base with the one training loop; returns steps, seconds, loss curve.

    With ``config.cache_states`` the stem cache is built first (under ``cache_root``, default ``$LEANFM_HOME``).
    """
    runtime = Runtime.for_config(config, context)
    cache, record = (prepare_stem_cache(model, tokenizer, config, cache_root, runtime.context)
                     if config.cache_states else (None, {}))
    result = fit(heads_task(model, tokenizer, config, runtime, cache), config, runtime, checkpoint=checkpoint,
                 resume=resume)
    tokens = result.step * config.batch_size * config.seqlen
    return {"steps": result.step, "seconds": result.seconds, "tokens_seen": tokens,
            "tokens_per_second": tokens / result.seconds if result.seconds else None,
            "world_size": runtime.context.world_size, "device": str(runtime.device), "stem_cache": record,
            "history": result.history}


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def head_metrics(model: DynamoModel, windows: torch.Tensor) -> dict[str, list[float]]:
    """PPL_1..PPL_n and top-1 agreement of heads 2..n with the base on ``windows`` ``[N, T]``.

    Head j scores token t+j from position t (token-weighted). Agreement of head j: the share of positions t
    where its argmax equals the base's greedy argmax at t+j-1 given the true prefix — the acceptance rate of
    head j's draft under greedy verification when the earlier drafts were accepted.
    """
    n = model.num_heads
    nll, count, agree, seen = [0.0] * n, [0] * n, [0] * n, [0] * n
    for row in windows:
        ids = row[None]
        final, states = model.forward_heads(ids)
        all_logits = model.logits(final, states).unbind(-2)
        base_top = all_logits[0].argmax(-1)
        for j, head in enumerate(all_logits, start=1):
            target = ids[:, j:]
            nll[j - 1] += float(summed_nll(head[:, :-j], target).double().sum())
            count[j - 1] += target.numel()
            if j > 1:
                agree[j - 1] += int((head[:, :-j].argmax(-1) == base_top[:, j - 1 : -1]).sum())
                seen[j - 1] += target.numel()
    return {"ppl": [math.exp(total / c) for total, c in zip(nll, count, strict=True)],
            "agreement": [a / s for a, s in zip(agree[1:], seen[1:], strict=True)]}


def head_perplexities(model: DynamoModel, windows: torch.Tensor) -> list[float]:
    """PPL_1..PPL_n on ``windows`` ``[N, T]`` (see :func:`head_metrics`)."""
    return head_metrics(model, windows)["ppl"]


def head_agreement(model: DynamoModel, windows: torch.Tensor) -> list[float]:
    """Top-1 agreement of heads 2..n with the base's greedy choice (see :func:`head_metrics`)."""
    return head_metrics(model, windows)["agreement"]


# ---------------------------------------------------------------- saving, artifacts


def packable_order(vocab: int, wanted: int) -> int:
    """The longest n-gram order (<= ``wanted``) whose keys fit in int64 for ``vocab`` tokens."""
    order = 1
    while order < wanted and vocab ** (order + 1) < 2**63:
        order += 1
    return order


def corpus_ngrams(tokenizer: Any, train_corpus: str, vocab: int, heads: int) -> NgramCounts:
    """N-gram counts of the training text (the sources joined end to end)."""
    streams, _ = train_streams(tokenizer, train_corpus)
    return NgramCounts.build(torch.cat(streams), vocab, packable_order(vocab, heads))


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
        stats = corpus_ngrams(tokenizer, config.train_corpus, int(model.config.vocab_size), config.heads)
        save_dynamo(model, tokenizer, stats, out, {"base": config.model, "train": config.to_dict(),
                                                   "training": summary})
    runtime.context.barrier()
    return summary


def export_heads(model: DynamoModel, folder: Path, manifest: dict[str, Any], max_mb: float = MAX_MB) -> Path:
    """Write the heads alone as a committed artifact: bf16 safetensors + ``manifest.json`` (the house rule).

    ``manifest`` must name the artifact rule's required keys and ``train`` (the training config, from which
    :func:`attach_heads` rebuilds the n-gram counts); heads count, init, size and versions are added here.
    """
    missing = [k for k in (*REQUIRED, "train") if k not in manifest]
    if missing:
        raise LeanfmError(f"heads manifest lacks {', '.join(missing)}; accepted: one with {', '.join(REQUIRED)}, train")
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.heads.state_dict().items()}
    size_mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    if size_mb > max_mb:
        raise LeanfmError(f"heads artifact would be {size_mb:.1f} MB; accepted: at most {max_mb} MB")
    with atomic_directory(Path(folder)) as tmp:
        atomic_write_bytes(tmp / ARTIFACT_HEADS, save(state))
        full = {**manifest, "heads": model.num_heads, "init": model.init, "dtype": "bfloat16",
                "size_mb": round(size_mb, 2), "parameters": sum(v.numel() for v in state.values()),
                "versions": {"leanfm": __version__, "torch": torch.__version__}}
        atomic_write_json(tmp / MANIFEST, full)
    return Path(folder)


def attach_heads(artifact_dir: str | Path, out: str | Path, base: str = "smollm2-135m") -> Path:
    """Materialise a loadable DynaMo folder at ``out``: ``base`` + the artifact's heads + n-gram counts.

    The n-gram counts are rebuilt from the manifest's training corpus, so the artifact stays small; the result
    loads with :func:`leanfm.decode.dynamo.load` like a folder written by ``leanfm dynamo train``.
    """
    manifest = read_manifest(artifact_dir)
    model_base, tokenizer = load_model(base)
    model = DynamoModel(model_base, int(manifest["heads"]), str(manifest["init"]))
    state = load_file(str(Path(artifact_dir) / ARTIFACT_HEADS))
    model.heads.load_state_dict({k: v.float() for k, v in state.items()})
    train = manifest["train"]
    stats = corpus_ngrams(tokenizer, train["train_corpus"], int(model.config.vocab_size), model.num_heads)
    return save_dynamo(model, tokenizer, stats, Path(out), {"base": base, "train": train,
                                                           "artifact": str(artifact_dir),
                                                           "metrics": manifest.get("metrics")})


register_method("dynamo", "train", DynamoTrainConfig, train_and_save,
                description="DynaMo: extra heads for multi-token decoding, trained on a frozen base")
