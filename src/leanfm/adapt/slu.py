r"""Compositional spoken-language understanding: JointBERT, the compositional loss and paired training.

**JointBERT** (our reading of Chen et al. 2019, as in METHODS.md section 7): one pretrained encoder (MiniLM-L6, a
plain transformers ``BertModel``), an intent head on the final [CLS] state and a slot head on every sub-token; a
word's tag is read at its *first* sub-token only (later sub-tokens carry the label ``-100`` and are ignored), and

.. math:: L = \mathrm{CE}(\text{intent}) + c\,\mathrm{CE}(\text{slots}).

Tags are the argmax per word by default (JointBERT's headline numbers); ``crf=True`` puts a linear-chain CRF
(pytorch-crf) over the words' first-sub-token emissions :math:`e_w`: the slot term becomes the CRF's negative
log-likelihood per word, :math:`-\frac{1}{W}\big(\sum_w e_w[y_w] + \sum_w T_{y_{w-1} y_w} - \log Z\big)`, and
prediction is Viterbi decoding (JointBERT's "+CRF" row).

**Compositional loss** (the abstract only says it fights *spurious slot correlations*; this is our reading). A slot
should be tagged from its own words and the carrier words around it ("from", "to", "on"), not from the *values of
other slots* — a model that learnt "boston -> fromloc because denver is a toloc here" fails on combinations it has
not seen. With gold spans known in training, let :math:`s_i > 0` be the span id of sub-token :math:`i` (0 outside
slots) and :math:`A^{l,h}` the attention of head :math:`h` in layer :math:`l`. Over the last ``comp_layers`` layers
:math:`\mathcal{L}` and every head, the attention mass a slot token sends to tokens of *other* slot spans is

.. math:: m^{l,h}_i = \sum_{j:\, s_j > 0,\, s_j \ne s_i} A^{l,h}_{ij}, \qquad
          L_{comp} = \frac{1}{|\mathcal{L}|\,H\,|\{i: s_i>0\}|} \sum_{l \in \mathcal{L}} \sum_h \sum_{i:\, s_i>0}
          m^{l,h}_i

and the objective adds :math:`\lambda L_{comp}` (``comp_weight``). It is zero for utterances with fewer than two
slots, differentiable, and costs the eager attention kernel (SDPA does not return attention weights).

**Paired training** (for length generalisation): a share ``pair_fraction`` of each batch's rows are two training
utterances concatenated (sub-tokens, tags and spans) between one [CLS] and one [SEP]. A pair has no single intent,
so its rows only train the slot head (their intent loss is masked out).

Batches are drawn from generators seeded by ``(seed, epoch)`` and ``(seed, step)``, so a resumed run takes the same
steps (:func:`leanfm.training.fit`). A run is saved as ``OUT/model.safetensors`` + ``OUT/slu.json`` (encoder config,
labels, settings, metrics); :func:`load_run` rebuilds it for :func:`evaluate` and :func:`predict`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from torchcrf import CRF
from transformers import BertConfig, BertModel

from leanfm.config import MethodConfig, check_at_least, option, register_method
from leanfm.data.slu import SluData, Utterance, load, resolve
from leanfm.errors import LeanfmError
from leanfm.eval.slot_metrics import slot_metrics
from leanfm.models.encoders import BERT_ENCODERS, bert_encoder, minilm_tokenizer
from leanfm.paths import atomic_directory, atomic_write_bytes, read_description
from leanfm.training import DistributedContext, Runtime, Task, fit, init_distributed, prepare_run, warmup_cosine_lr
from leanfm.training.options import DEVICE_HELP, check_device_name

__all__ = ["ENCODERS", "METHODS", "JointSlu", "SluConfig", "compositional_loss", "cross_slot_attention", "encode",
           "evaluate", "load_run", "predict", "predict_words", "train_slu"]
log = logging.getLogger(__name__)

ENCODERS = BERT_ENCODERS
METHODS = ("jointbert", "compositional")
FORMAT = "leanfm-slu/1"
IGNORE = -100


@dataclass
class SluConfig(MethodConfig):
    """``leanfm slu train``: the data, the encoder, the method and the optimisation."""

    RESUMABLE = ("steps", "epochs", "checkpoint_every", "device", "autocast")

    data: str = option("", "dataset folder in JointBERT's layout, or a name under $LEANFM_DATA/slu", cli=False)
    encoder: str = option("minilm-l6", "pretrained encoder (tiny-bert: random, for tests)", choices=ENCODERS)
    method: str = option("jointbert", "jointbert, or compositional (+ the cross-slot attention penalty)",
                         choices=METHODS)
    comp_weight: float = option(1.0, "weight of the compositional loss (method compositional)")
    comp_layers: int = option(2, "last encoder layers whose attention the compositional loss reads")
    paired: bool = option(False, "paired training: concatenate two training utterances and their tags")
    pair_fraction: float = option(0.5, "share of each batch's rows that are pairs (with --paired)")
    slot_weight: float = option(1.0, "c in loss = intent CE + c * slot CE")
    crf: bool = option(False, "a linear-chain CRF over the words' tags (Viterbi decoding) instead of argmax")
    epochs: int = option(3, "passes over the training utterances")
    steps: int = option(0, "train this many steps instead of --epochs (0: use --epochs)")
    batch_size: int = option(32, "utterances per step (split across ranks)")
    lr: float = option(5e-4, "peak learning rate (warm-up, then cosine; 5e-4 won on ATIS dev, BENCHMARKS.md)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup: int = option(50, "warm-up steps")
    dropout: float = option(0.1, "dropout before the intent and slot heads")
    max_length: int = option(128, "sub-tokens per example with [CLS]/[SEP]; longer ones are cut (tagged O)")
    train_limit: int = option(0, "train on the first N training utterances only (0: all)")
    eval_limit: int = option(0, "evaluate on the first N dev/test utterances only (0: all)")
    seed: int = option(0, "seed of the heads, the batches and the pairs")
    checkpoint_every: int = option(200, "steps between training checkpoints")
    device: str = option("auto", DEVICE_HELP)
    # bf16 autocast: ~1.3x faster steps on this CPU (0.59 -> 0.45 s at batch 32, one thread); weights stay float32
    autocast: bool = option(True, "bf16 autocast for training where bf16 is native (false: float32)")

    def validate(self) -> None:
        super().validate()
        check_at_least(self, 1, "epochs", "batch_size", "checkpoint_every", "comp_layers")
        check_at_least(self, 0, "steps", "warmup", "train_limit", "eval_limit")
        check_at_least(self, 8, "max_length")
        check_device_name(self.device)
        if not self.comp_weight > 0:
            raise LeanfmError(f"comp weight {self.comp_weight} is invalid; accepted: a number > 0")
        if not 0 < self.pair_fraction <= 1:
            raise LeanfmError(f"pair fraction {self.pair_fraction} is invalid; accepted: 0 < fraction <= 1")
        if not 0 <= self.dropout < 1:
            raise LeanfmError(f"dropout {self.dropout} is invalid; accepted: 0 <= dropout < 1")


# ---------------------------------------------------------------- model


class JointSlu(nn.Module):
    """Encoder + intent head on the final [CLS] state + slot head on every sub-token (+ a CRF over words)."""

    def __init__(self, encoder: BertModel, intents: int, slots: int, dropout: float = 0.1, crf: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.intent_head = nn.Linear(hidden, intents)
        self.slot_head = nn.Linear(hidden, slots)
        self.crf = CRF(slots, batch_first=True) if crf else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_attentions=attentions)
        states = self.dropout(out.last_hidden_state)
        return self.intent_head(states[:, 0]), self.slot_head(states), out.attentions if attentions else None


# ---------------------------------------------------------------- data -> sub-tokens


@dataclass(frozen=True)
class Example:
    """One utterance as sub-tokens: ids, slot label at first sub-tokens (else -100), span id per sub-token."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    spans: tuple[int, ...]
    first: tuple[int, ...]  # position (without [CLS]) of each word's first sub-token, -1 when the word has none
    intent: int


def encode(tokenizer: Any, utterances: Sequence[Utterance], intents: list[str], slots: list[str]) -> list[Example]:
    """Sub-tokenise words; only a word's first sub-token carries its tag. Unknown gold labels get -100 / -1."""
    intent_id, slot_id = {x: i for i, x in enumerate(intents)}, {x: i for i, x in enumerate(slots)}
    if not utterances:
        return []
    pieces = tokenizer([list(u.tokens) for u in utterances], is_split_into_words=True, add_special_tokens=False)
    out = []
    for row, u in enumerate(utterances):
        words = pieces.word_ids(row)
        span_of = [0] * len(u.tokens)
        for number, (_, start, end) in enumerate(u.spans(), 1):
            span_of[start:end] = [number] * (end - start)
        first = [-1] * len(u.tokens)
        labels = []
        for pos, word in enumerate(words):
            is_first = word is not None and first[word] < 0
            if is_first:
                first[word] = pos
            labels.append(slot_id.get(u.tags[word], IGNORE) if is_first else IGNORE)
        spans = tuple(span_of[w] if w is not None else 0 for w in words)
        out.append(Example(tuple(pieces["input_ids"][row]), tuple(labels), spans, tuple(first),
                           intent_id.get(u.intent, -1)))
    return out


def pair(a: Example, b: Example) -> Example:
    """``a`` then ``b`` as one example: tags stay on their sub-tokens, ``b``'s span ids follow ``a``'s."""
    shift = max(a.spans, default=0)
    spans = a.spans + tuple(s + shift if s else 0 for s in b.spans)
    first = a.first + tuple(p + len(a.ids) if p >= 0 else -1 for p in b.first)
    return Example(a.ids + b.ids, a.labels + b.labels, spans, first, a.intent)


def collate(examples: Sequence[Example], cls: int, sep: int, max_length: int,
            intent_on: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """[CLS] pieces [SEP], cut to ``max_length``, padded to the longest; ``intent_mask`` 0 for pairs.

    For the CRF, ``words`` [B, W] holds the position of each kept word's first sub-token (words cut off or without
    a sub-token are skipped, so ``word_mask`` has no holes) and ``word_labels`` its tag id (0 where unknown).
    """
    keep = max_length - 2
    length = min(keep, max(len(e.ids) for e in examples)) + 2
    kept = [[p + 1 for p in e.first if 0 <= p < keep] for e in examples]  # +1: after [CLS]
    width = max(1, max(len(k) for k in kept))
    words = torch.zeros(len(examples), width, dtype=torch.long)
    word_labels = torch.zeros(len(examples), width, dtype=torch.long)
    word_mask = torch.zeros(len(examples), width, dtype=torch.bool)
    word_mask[:, 0] = True  # pytorch-crf needs every row's first step; a row without words scores [CLS] as tag 0
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    spans = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros(len(examples), length, dtype=torch.long)
    for row, e in enumerate(examples):
        n = min(keep, len(e.ids))
        ids[row, : n + 2] = torch.tensor((cls, *e.ids[:n], sep))
        labels[row, 1 : n + 1] = torch.tensor(e.labels[:n])
        spans[row, 1 : n + 1] = torch.tensor(e.spans[:n])
        mask[row, : n + 2] = 1
        if kept[row]:
            words[row, : len(kept[row])] = torch.tensor(kept[row])
            word_labels[row, : len(kept[row])] = labels[row, kept[row]].clamp(min=0)
            word_mask[row, : len(kept[row])] = True
    on = torch.tensor([True] * len(examples) if intent_on is None else list(intent_on))
    intent = torch.tensor([e.intent for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "spans": spans,
            "intent": intent.clamp(min=0), "intent_mask": (on & (intent >= 0)).float(), "words": words,
            "word_labels": word_labels, "word_mask": word_mask}


def word_emissions(slot_logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Slot logits at each word's first sub-token, float32 for the CRF: [B, T, S] -> [B, W, S]."""
    index = words[:, :, None].expand(-1, -1, slot_logits.shape[-1])  # [B, W, S]
    return slot_logits.gather(1, index).float()


# ---------------------------------------------------------------- losses


def compositional_loss(attentions: Sequence[torch.Tensor], spans: torch.Tensor, layers: int) -> torch.Tensor:
    """Mean attention mass from slot sub-tokens to sub-tokens of *other* slot spans (module docstring, L_comp)."""
    stacked = torch.stack(tuple(attentions[-layers:]))  # [L, B, H, T, T]
    inside = spans > 0
    other = inside[:, :, None] & inside[:, None, :] & (spans[:, :, None] != spans[:, None, :])  # [B, T, T]
    mass = (stacked * other[None, :, None].to(stacked.dtype)).sum(-1)  # [L, B, H, T]
    queries = inside[None, :, None].to(stacked.dtype)
    count = queries.sum() * stacked.shape[0] * stacked.shape[2]
    return (mass * queries).sum() / count.clamp(min=1)


def joint_loss(model: JointSlu, batch: dict[str, torch.Tensor], config: SluConfig) -> tuple[torch.Tensor,
                                                                                             dict[str, float]]:
    """Intent CE (pairs masked) + c * slot CE (+ lambda * L_comp with the compositional method)."""
    comp = config.method == "compositional"
    intent_logits, slot_logits, attentions = model(batch["input_ids"], batch["attention_mask"], attentions=comp)
    per_row = nn.functional.cross_entropy(intent_logits, batch["intent"], reduction="none")
    weight = batch["intent_mask"]
    intent_ce = (per_row * weight).sum() / weight.sum().clamp(min=1)
    if model.crf is not None:  # negative log-likelihood per word of the gold tag path
        emissions = word_emissions(slot_logits, batch["words"])
        slot_ce = -model.crf(emissions, batch["word_labels"], mask=batch["word_mask"], reduction="token_mean")
    else:
        slot_ce = nn.functional.cross_entropy(slot_logits.flatten(0, 1), batch["labels"].flatten(),
                                              ignore_index=IGNORE)
    loss = intent_ce + config.slot_weight * slot_ce
    record = {"intent_ce": float(intent_ce.detach()), "slot_ce": float(slot_ce.detach())}
    if comp:
        assert attentions is not None
        penalty = compositional_loss(attentions, batch["spans"], config.comp_layers)
        loss = loss + config.comp_weight * penalty
        record["comp"] = float(penalty.detach())
    return loss, {"loss": float(loss.detach()), **record}


# ---------------------------------------------------------------- training


def _step_loss(model: JointSlu, batch: dict[str, torch.Tensor], config: SluConfig,
               runtime: Runtime) -> tuple[torch.Tensor, dict[str, float]]:
    with runtime.autocast():
        return joint_loss(model, batch, config)


def _batches(config: SluConfig, examples: list[Example], tokenizer: Any, runtime: Runtime) -> tuple[Any, int]:
    """``batch(step)`` and the steps per epoch: a seeded permutation per epoch, seeded pairs per step."""
    count = len(examples)
    per_epoch = math.ceil(count / config.batch_size)

    def batch(step: int) -> dict[str, torch.Tensor]:
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        rows = order[index * config.batch_size : (index + 1) * config.batch_size]
        pairing = torch.Generator().manual_seed(config.seed * 7_919 + step + 1)
        paired = torch.rand(len(rows), generator=pairing) < config.pair_fraction
        partners = torch.randint(count, (len(rows),), generator=pairing)
        rows, paired, partners = (runtime.context.shard(x) for x in (rows, paired, partners))
        paired = paired & config.paired
        chosen = [pair(examples[int(r)], examples[int(p)]) if twin else examples[int(r)]
                  for r, p, twin in zip(rows, partners, paired, strict=True)]
        return collate(chosen, tokenizer.cls_token_id, tokenizer.sep_token_id, config.max_length,
                       intent_on=[not bool(t) for t in paired])

    return batch, per_epoch


def _train(config: SluConfig, model: JointSlu, tokenizer: Any, data: SluData, checkpoint: Path, resume: bool,
           context: DistributedContext | None) -> dict[str, Any]:
    runtime = Runtime.for_config(config, context)
    train = data.train[: config.train_limit or None]
    examples = encode(tokenizer, train, data.intents, data.slots)
    batch, per_epoch = _batches(config, examples, tokenizer, runtime)
    total = config.steps or config.epochs * per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    task = Task(f"slu {config.method}{' paired' if config.paired else ''}", {"model": model}, optimizer, batch,
                lambda _step, b: _step_loss(model, b, config, runtime),
                lr=warmup_cosine_lr(config.lr, total, config.warmup), log_every=50)
    result = fit(task, config, runtime, steps=total, checkpoint=checkpoint, resume=resume)
    model.to("cpu")
    return {"steps": result.step, "steps_per_epoch": per_epoch, "train_utterances": len(train),
            "seconds": result.seconds, "seconds_per_epoch": result.seconds * per_epoch / max(1, result.step),
            "device": str(runtime.device), "history": result.history}


def train_slu(config: SluConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              context: DistributedContext | None = None) -> dict[str, Any]:
    """Train on ``config.data``'s train split, evaluate dev and test, save the run to ``out`` (checkpoint OUT.training).

    Returns ``{"metrics": {"dev": ..., "test": ...}, "training": ...}`` (metrics only on the main rank).
    """
    if not config.data:
        raise LeanfmError("no SLU data: pass a dataset folder (or set data= in the library)")
    out = Path(out)
    context = context or init_distributed(config.device)
    checkpoint = prepare_run(out, resume=resume, overwrite=overwrite, context=context)
    data = load(resolve(config.data), allow_unseen=True)
    encoder, tokenizer = bert_encoder(config.encoder, "eager" if config.method == "compositional" else "sdpa")
    torch.manual_seed(config.seed)
    model = JointSlu(encoder, len(data.intents), len(data.slots), config.dropout, config.crf)
    training = _train(config, model, tokenizer, data, checkpoint, resume, context)
    summary: dict[str, Any] = {"training": training, "metrics": {}}
    if context.is_main:
        limit = config.eval_limit or None
        summary["metrics"] = {split: evaluate(model, tokenizer, data.split(split)[:limit], data.intents, data.slots,
                                              config.max_length) for split in ("dev", "test")}
        save_run(out, model, tokenizer, data, config, summary)
    context.barrier()
    return summary


# ---------------------------------------------------------------- inference, saving, loading


@torch.no_grad()
def predict_utterances(model: JointSlu, tokenizer: Any, utterances: Sequence[Utterance], intents: list[str],
                       slots: list[str], max_length: int = 128, batch_size: int = 64) -> list[tuple[str, list[str]]]:
    """(intent, one tag per word) for each utterance; tags read at first sub-tokens; PAD/UNK never predicted."""
    model.eval()
    examples = encode(tokenizer, utterances, intents, slots)
    blocked_slots = torch.tensor([s in ("PAD", "UNK") for s in slots])
    blocked_intents = torch.tensor([x == "UNK" for x in intents])
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        b = collate(chunk, tokenizer.cls_token_id, tokenizer.sep_token_id, max_length)
        intent_logits, slot_logits, _ = model(b["input_ids"], b["attention_mask"])
        intent_ids = intent_logits.masked_fill(blocked_intents, -math.inf).argmax(-1)
        slot_logits = slot_logits.masked_fill(blocked_slots, -1e4 if model.crf is not None else -math.inf)
        tag_ids = slot_logits.argmax(-1)  # [B, T]
        if model.crf is not None:  # Viterbi over the kept words, written back at their first sub-tokens
            paths = model.crf.decode(word_emissions(slot_logits, b["words"]), mask=b["word_mask"])
            for row, path in enumerate(paths):
                count = int(b["word_mask"][row].sum())
                tag_ids[row, b["words"][row, :count]] = torch.tensor(path[:count])
        for row, e in enumerate(chunk):
            length = int(b["attention_mask"][row].sum()) - 2
            tags = [slots[int(tag_ids[row, p + 1])] if 0 <= p < length else "O" for p in e.first]
            out.append((intents[int(intent_ids[row])], tags))
    return out


@torch.no_grad()
def cross_slot_attention(model: JointSlu, tokenizer: Any, utterances: Sequence[Utterance], intents: list[str],
                         slots: list[str], layers: int = 2, max_length: int = 128, batch_size: int = 64) -> float:
    """:math:`L_{comp}` (module docstring) of ``model`` on gold-tagged ``utterances``: the mean attention mass a slot
    sub-token sends to other slot spans in the last ``layers`` layers — the quantity the compositional loss trains
    down, measured on any split (how much a model reads other slots' values)."""
    model.eval()
    attention = model.encoder.config._attn_implementation
    model.encoder.set_attn_implementation("eager")  # SDPA returns no attention weights
    total, weight = 0.0, 0
    try:
        examples = encode(tokenizer, utterances, intents, slots)
        for start in range(0, len(examples), batch_size):
            b = collate(examples[start : start + batch_size], tokenizer.cls_token_id, tokenizer.sep_token_id,
                        max_length)
            _, _, attentions = model(b["input_ids"], b["attention_mask"], attentions=True)
            assert attentions is not None
            count = int((b["spans"] > 0).sum())
            total += float(compositional_loss(attentions, b["spans"], layers)) * count
            weight += count
    finally:
        model.encoder.set_attn_implementation(attention)
    return total / max(1, weight)


def evaluate(model: JointSlu, tokenizer: Any, utterances: Sequence[Utterance], intents: list[str], slots: list[str],
             max_length: int = 128) -> dict[str, float]:
    """Intent accuracy, span-level slot F1 (seqeval) and exact match of ``model`` on ``utterances``."""
    predicted = predict_utterances(model, tokenizer, utterances, intents, slots, max_length)
    return slot_metrics([u.tags for u in utterances], [tags for _, tags in predicted],
                        [u.intent for u in utterances], [intent for intent, _ in predicted])


def save_run(out: Path, model: JointSlu, tokenizer: Any, data: SluData, config: SluConfig,
             summary: dict[str, Any]) -> None:
    """``model.safetensors`` + ``slu.json`` (format, encoder config, labels, settings, metrics), atomically."""
    if out.exists():
        shutil.rmtree(out)
    meta = {"format": FORMAT, "encoder_config": model.encoder.config.to_dict(), "intents": data.intents,
            "slots": data.slots, "config": config.to_dict(), "data": data.source, "metrics": summary["metrics"],
            "training": {k: v for k, v in summary["training"].items() if k != "history"}}
    with atomic_directory(out) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(tmp / "model.safetensors", save(state))
        (tmp / "slu.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_run(folder: str | Path) -> tuple[JointSlu, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, metadata) of a run saved by :func:`train_slu`."""
    folder = Path(folder)
    meta = read_description(folder, "slu.json", FORMAT, "an SLU run", "create one with 'leanfm slu train'")
    encoder = BertModel(BertConfig.from_dict(meta["encoder_config"]))
    model = JointSlu(encoder, len(meta["intents"]), len(meta["slots"]), meta["config"]["dropout"],
                     meta["config"].get("crf", False))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), minilm_tokenizer(), meta


def predict(folder: str | Path, text: str) -> dict[str, Any]:
    """Intent and slots of one utterance (whitespace-split words) with a saved run, as plain JSON values."""
    words = tuple(text.split())
    if not words:
        raise LeanfmError("nothing to predict: the text is empty")
    return predict_words(*load_run(folder), words)


def predict_words(model: JointSlu, tokenizer: Any, meta: dict[str, Any], words: Sequence[str]) -> dict[str, Any]:
    """``{"text", "intent", "tags", "slots": [{"type", "value", "start", "end"}]}`` of one utterance's words."""
    words = tuple(words)
    intent, tags = predict_utterances(model, tokenizer, [Utterance(words, ("O",) * len(words), "")],
                                      meta["intents"], meta["slots"], meta["config"]["max_length"])[0]
    spans = Utterance(words, tuple(tags), intent).spans()
    return {"text": " ".join(words), "intent": intent, "tags": tags,
            "slots": [{"type": kind, "value": " ".join(words[s:e]), "start": s, "end": e} for kind, s, e in spans]}


register_method("slu", "train", SluConfig, train_slu,
                description="compositional SLU: JointBERT on MiniLM with the compositional loss and paired training")
