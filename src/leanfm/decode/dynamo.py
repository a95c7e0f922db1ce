"""DynaMo: dynamic multi-token decoding with extra heads (METHODS.md section 3).

Model. The base causal LM is untouched: head 1 is its own last block + LM head (token t+1). Heads 2..n each
add one new decoder layer (same class as the base's last block) on the *penultimate* hidden state — the
input of the last block — and reuse the base's final norm and LM head; head j predicts token t+j. The heads
are an add-on: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads the plain base model, :func:`load` adds
the heads, and with ``threshold = 1`` generation is exactly the base model's.

Decoding, per sequence and step (:func:`select_tokens`):

1. each head's next-token distribution after the repetition penalty and temperature (transformers' own
   logits processors, so head 1 matches ``generate()``);
2. for m = n..2: the joint ``J = p_1^top-k ⊗ ... ⊗ p_m^top-k`` (k = 50) times the co-occurrence weight
   ``min(1, (c + λ)/(E + λ))^α`` (:func:`cooccurrence_weight`) and the in-step repetition penalty; if
   ``max J < ε_b^(m-1)`` fall back to m-1 tokens; else zero entries below ``ε_b^(m-1)``, then below Otsu's
   threshold of ``J`` after a 3-tap Gaussian blur, and sample (or take the argmax of) the surviving entries;
3. at m = 1 sample head 1 alone — exactly the base model's step.

Interpretation (written down because the paper is terse): the static floor that zeroes entries is the same
``ε_b^(m-1)`` as the fall-back test (so ``ε_b = 0`` always emits n tokens and ``ε_b = 1`` always one, without
running the heads). The co-occurrence weight only removes mass: an earlier reading (the raw ratio
``p̂(x_1..x_m)/Π p̂(x_i)`` rescaled to the unweighted mass) raised n-grams seen once to most of the joint and
made the mask *raise* confidence (measured: 1.29 tokens/step and worse text with it, 1.01 without). Because
weights and penalties are <= 1, only candidates with ``p_i Π_{j≠i} max p_j >= floor`` can pass, so the joint
is built on that corner of the grid, in float32, and a level whose product of peaks is below its floor is
skipped without building anything (:func:`candidate_joint`; same selection as the full grid, tested).
Ablations: ``mask=False`` (α = 0), ``adaptive=False`` (no Otsu), ``blur=False``.

Verify mode (``verify=True``; ours, beyond the paper). The heads' proposals are drafts: the next forward
feeds the base's token plus the drafts, the base's logits at those slots say how many it agrees with (greedy:
equal to its argmax; sampling: speculative acceptance with each draft head's own distribution, so every token
is distributed as the base model's), the agreed prefix and the base's next token are emitted, the rejected
slots are masked (and cropped from the caches when no row needs them), and the heads draft again at the last
accepted slot. Tokens per step = 1 + a_2 + a_2 a_3; the output is the base model's.

Static cache + compile (the deploy issue's fast path, :mod:`leanfm.eval.fastdecode`, greedy one token a step):
DynaMo's steps feed 1..n tokens, so a compiled decoder needs one graph per width (n <= 3 here: three graphs, not one
per step), and "cropping" a static cache is rewinding its write position (``cache_position``): rejected slots are
overwritten by the next step and never attended to because positions, not columns, define the causal mask. Nothing
in the method prevents it, but the fast path does not take it yet: DynaMo and its ``generate()`` baseline run
transformers' dynamic cache eagerly, and the benchmark shows the compiled fast path beside them as a peer.

Batches: each sequence chooses its own number of tokens per step; a step feeds ``max_b n_b`` slots, shorter
rows are padded with masked slots, and each row reads its next distributions at its own last valid slot.
The base KV cache and the heads' cache (one layer per extra head) advance together.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save
from torch import nn
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from leanfm.config import register_method
from leanfm.decode.ngrams import NgramCounts
from leanfm.decode.selection import (
    DecodeConfig,
    reachable_levels,
    repeat_factors,
    select_tokens,
    verify_drafts,
)
from leanfm.errors import LeanfmError
from leanfm.models import load_model
from leanfm.models.adapters import get_adapter
from leanfm.paths import atomic_directory, atomic_write_bytes

log = logging.getLogger(__name__)
HEADS_FILE, STATS_FILE, META_FILE = "dynamo_heads.safetensors", "cooccurrence.safetensors", "dynamo.json"
INITS = ("copy", "random")
_CACHE_KWARGS = ("cache", "layer_past", "past_key_values")
_FEW_ROWS = 32  # up to this many rows the float32 LM head runs as W x^T (see DynamoModel.lm_head)


# ---------------------------------------------------------------- model


class DynamoModel(nn.Module):
    """A base causal LM plus ``heads - 1`` extra decoder layers predicting tokens t+2..t+n."""

    def __init__(self, base: nn.Module, heads: int = 3, init: str = "copy", seed: int = 0) -> None:
        super().__init__()
        if heads < 2:
            raise LeanfmError(f"heads {heads} is too few; accepted: an integer >= 2 (head 1 is the base model)")
        if init not in INITS:
            raise LeanfmError(f"unknown head init '{init}'; accepted: {', '.join(INITS)}")
        self.base = cast(PreTrainedModel, base)  # a transformers causal LM (get_adapter checks its architecture)
        self.num_heads, self.init = heads, init
        self.adapter = get_adapter(base)
        last = self.adapter.blocks(base)[-1]
        layers = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for index in range(heads - 1):
                layer = copy.deepcopy(last)
                if init == "random":
                    layer.apply(self.base._init_weights)
                for module in layer.modules():  # each extra layer owns slot `index` of the heads' cache
                    if hasattr(module, "layer_idx"):
                        module.layer_idx = index  # type: ignore[assignment]  # torch stub: __setattr__ takes any value
                layers.append(layer)
        self.heads = nn.ModuleList(layers)

    @property
    def config(self) -> Any:
        """The base model's config."""
        return self.base.config

    def lm_head(self, rows: torch.Tensor) -> torch.Tensor:
        """The shared LM head on ``rows`` (``[..., d]`` -> ``[..., V]``), computed the fast way for a few rows.

        Why not ``F.linear``: in float32 a handful of rows takes PyTorch's slow path for ``x W^T`` (a review
        measured 54-97 ms for 3 rows of SmolLM2's ``[49152, 576]`` head vs 10-16 ms for ``W x^T``); bfloat16
        is fast either way. Numerically the same product.
        """
        head = self.base.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        flat = rows.reshape(-1, rows.shape[-1])  # [R, d]
        if weight.dtype == torch.float32 and 1 < flat.shape[0] <= _FEW_ROWS:
            out = (weight @ flat.T).T  # [R, V]
        else:
            out = nn.functional.linear(flat, weight)
        if bias is not None:
            out = out + bias
        return out.reshape(*rows.shape[:-1], out.shape[-1])

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + the shared LM head: an extra head's hidden states -> logits."""
        norm = self.adapter.final_norm(self.base)
        return self.base.get_output_embeddings()(norm(hidden) if norm is not None else hidden)

    def logits(self, final: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """Logits of every head, ``[..., n, V]``, from the base's final (normed) hidden states and the heads'.

        One LM-head product for all heads: at batch 1 decoding is memory-bound and the LM head is a fifth of
        SmolLM2's weights, so reading it once per step instead of n times is most of what the heads cost.
        """
        norm = self.adapter.final_norm(self.base)
        rows = [final] + [norm(s) if norm is not None else s for s in states]
        return self.lm_head(torch.stack(rows, dim=-2))

    def forward_heads(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: Any = None, head_cache: Any = None,
                      base_grad: bool = False, heads: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base's final hidden states (after its final norm) and the extra heads' (before it), ``[B, T, d]``.

        The base decoder stack runs once (without its LM head — :meth:`logits` applies it to the positions
        that are needed); a pre-hook on its last block captures the penultimate hidden state and the exact
        keyword arguments (mask, rotary embeddings, positions, cache) the block received, which the extra
        layers reuse with their own cache. ``heads`` runs only the first few extra layers (0: none).
        """
        captured: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        handle = self.adapter.blocks(self.base)[-1].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.set_grad_enabled(base_grad and torch.is_grad_enabled()):
                out = self.base.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, cache=cache, use_cache=cache is not None)
        finally:
            handle.remove()
        hidden, kwargs = captured["hidden"], captured["kwargs"]
        for name in _CACHE_KWARGS:
            if name in kwargs:
                kwargs[name] = head_cache
        kwargs["use_cache"] = head_cache is not None
        if not base_grad:
            hidden = hidden.detach()
        states = []
        for layer in list(self.heads)[: len(self.heads) if heads is None else heads]:
            result = layer(hidden, **kwargs)
            states.append(result[0] if isinstance(result, tuple) else result)
        return out.last_hidden_state, states


def load(folder: str | Path, dtype: str = "float32") -> tuple[DynamoModel, Any, NgramCounts | None]:
    """Load a folder written by :func:`save_dynamo`: (model with heads, tokenizer, co-occurrence counts)."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise LeanfmError(f"'{folder}' has no DynaMo heads ({META_FILE} missing); train them with 'leanfm dynamo "
                          "train MODEL --out DIR'")
    meta = json.loads((folder / META_FILE).read_text())
    base, tokenizer = load_model(str(folder), dtype=dtype)
    model = DynamoModel(base, heads=meta["heads"], init=meta["init"])
    state = load_file(str(folder / HEADS_FILE))
    model.heads.load_state_dict(state)
    model.heads.to(next(base.parameters()).dtype)
    stats = NgramCounts.load(folder / STATS_FILE) if (folder / STATS_FILE).is_file() else None
    return model.eval(), tokenizer, stats


def save_dynamo(model: DynamoModel, tokenizer: Any, stats: NgramCounts | None, out: Path,
                extra: dict[str, Any] | None = None) -> Path:
    """Write base model, tokenizer, heads, n-gram counts and ``dynamo.json`` to ``out`` atomically."""
    with atomic_directory(out) as tmp:
        model.base.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        state = {k: v.detach().contiguous() for k, v in model.heads.state_dict().items()}
        atomic_write_bytes(tmp / HEADS_FILE, save(state))
        if stats is not None:
            stats.save(tmp / STATS_FILE)
        meta = {"heads": model.num_heads, "init": model.init, **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


# ---------------------------------------------------------------- generation


@dataclass
class DynamoOutput:
    """Generated continuations (new tokens only) and how many tokens each step emitted."""

    tokens: list[list[int]]
    texts: list[str]
    steps: int  # forward passes, the prompt's included (each emits 1..n tokens per row)
    tokens_per_step: float  # mean over active (row, step) pairs
    seconds: float
    level_counts: dict[int, int] = field(default_factory=dict)
    acceptance: list[float] = field(default_factory=list)  # verify mode: share of drafts j = 2..n the base accepted


def _processors(config: DecodeConfig) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature not in (0.0, 1.0):
        processors.append(TemperatureLogitsWarper(config.temperature))
    return processors


def _scores(processors: LogitsProcessorList, context: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """One row's processed scores (``[V]``) after the text ``context`` (``[L]``)."""
    return processors(cast(torch.LongTensor, context[None]), logits[None].clone())[0] if len(processors) else logits


@dataclass
class _Batch:
    """Decoding state. Every column the KV caches hold is a column of ``sequences``/``attention``; columns
    that no longer count (left padding, empty slots of shorter rows, rejected drafts) are masked, and hold
    the pad token or a token the row already has, so the repetition penalty sees exactly the row's text."""

    sequences: torch.Tensor  # [B, L]
    attention: torch.Tensor  # [B, L]
    emitted: list[list[int]]
    done: list[bool]
    max_new_tokens: int
    eos: int | None
    level_counts: dict[int, int] = field(default_factory=dict)
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    def emit(self, b: int, tokens: list[int]) -> list[int]:
        """Append ``tokens`` to row ``b`` (cut at the length limit and after EOS); returns what was kept."""
        tokens = tokens[: self.max_new_tokens - len(self.emitted[b])]
        if self.eos is not None and self.eos in tokens:
            tokens = tokens[: tokens.index(self.eos) + 1]
        self.level_counts[len(tokens)] = self.level_counts.get(len(tokens), 0) + 1
        self.emitted[b].extend(tokens)
        self.done[b] = len(self.emitted[b]) >= self.max_new_tokens or (self.eos is not None and tokens[-1] == self.eos)
        return tokens

    def remaining(self, b: int) -> int:
        return 0 if self.done[b] else self.max_new_tokens - len(self.emitted[b])


def _lossy_step(model: DynamoModel, final: torch.Tensor, states: list[torch.Tensor], batch: _Batch,
                slots: list[int], config: DecodeConfig, stats: NgramCounts | None, n: int,
                generator: torch.Generator | None) -> list[list[int]]:
    """DynaMo's step: each row's 1..n tokens from the heads' distributions at its last fed slot (all kept)."""
    rows = len(slots)
    pick, slot = torch.arange(rows), torch.tensor(slots)
    logits = model.logits(final[pick, slot], [s[pick, slot] for s in states[: n - 1]]).float()  # [B, n, V]
    processors = _processors(config)
    head_logits = list(logits.unbind(1))
    text = cast(torch.LongTensor, batch.sequences)
    scores = [processors(text, h.clone()) if len(processors) else h for h in head_logits]
    probs = [torch.softmax(s, dim=-1) for s in scores]
    factors = [repeat_factors(h, batch.sequences, config) for h in head_logits] if n > 1 else []
    choices: list[list[int] | None] = [None] * rows
    levels = reachable_levels(torch.stack([p.max(-1).values for p in probs], dim=1), config.threshold)  # [B]
    for b in range(rows):
        if not batch.done[b] and int(levels[b]) > 1:
            row_factors = [f[b] for f in factors if f is not None] or None
            choices[b] = select_tokens([p[b] for p in probs], stats, config, generator, row_factors)
    single = [b for b in range(rows) if choices[b] is None and not batch.done[b]]
    if single:
        if config.temperature == 0:
            drawn = scores[0][single].argmax(-1)
        else:
            drawn = torch.multinomial(probs[0][single], 1, generator=generator).squeeze(1)
        for b, token in zip(single, drawn.tolist(), strict=True):
            choices[b] = [token]
    return [batch.emit(b, row) if row is not None and not batch.done[b] else [] for b, row in enumerate(choices)]


def _draft_row(head_logits: torch.Tensor, context: torch.Tensor, count: int, processors: LogitsProcessorList,
               greedy: bool, generator: torch.Generator | None) -> tuple[list[int], list[torch.Tensor | None]]:
    """Drafts for the next ``count`` tokens from heads 2.. (``head_logits`` ``[n-1, V]``), each head penalised
    for the text so far *and* the drafts before it; sampling keeps each draft's distribution for acceptance."""
    drafts: list[int] = []
    probs: list[torch.Tensor | None] = []
    for j in range(count):
        scores = _scores(processors, context, head_logits[j])
        if greedy:
            token, q = int(scores.argmax()), None
        else:
            q = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(q, 1, generator=generator))
        drafts.append(token)
        probs.append(q)
        context = torch.cat([context, context.new_tensor([token])])
    return drafts, probs


def _verify_step(model: DynamoModel, final: torch.Tensor, states: list[torch.Tensor], batch: _Batch,
                 starts: list[int], drafts: list[list[int]], draft_probs: list[list[torch.Tensor | None]],
                 config: DecodeConfig, n: int, generator: torch.Generator | None) -> list[list[int]]:
    """Verify mode's step: accept each row's longest agreed prefix of drafts, emit it and the base's next token,
    mask the rejected drafts' columns, and draft again from the heads at the last accepted slot."""
    rows, width = final.shape[0], final.shape[1]
    before = batch.sequences.shape[1] - width  # columns held before this step's inputs
    low = min(starts)  # the prompt step verifies nothing: only its last slot is needed
    # One LM-head product for the base's rows at every slot and the heads' rows too (drafts are read at the
    # accepted slot, known only after verification): the head's weights are read once per step, not twice.
    every = model.logits(final[:, low:], [s[:, low:] for s in states[: n - 1]]).float()  # [B, W - low, n, V]
    base = every[:, :, 0]  # [B, W - low, V]: the base's next-token logits from slot `low` on
    processors, greedy = _processors(config), config.temperature == 0
    slots: list[int] = []
    feeds: list[list[int]] = []
    for b in range(rows):
        if batch.done[b]:
            slots.append(starts[b])
            feeds.append([])
            continue
        row = batch.sequences[b]

        def scores_at(i: int, b: int = b, row: torch.Tensor = row) -> torch.Tensor:
            return _scores(processors, row[: before + starts[b] + i + 1], base[b, starts[b] + i - low])

        accepted, token = verify_drafts(scores_at, drafts[b], draft_probs[b], greedy, generator)
        for j in range(len(drafts[b])):
            batch.drafted[j] += 1
            batch.accepted[j] += int(j < accepted)
        last = before + starts[b] + accepted  # column of the last accepted token
        rejected = slice(last + 1, before + starts[b] + len(drafts[b]) + 1)
        batch.attention[b, rejected] = 0
        batch.sequences[b, rejected] = batch.sequences[b, last]
        slots.append(starts[b] + accepted)
        feeds.append(batch.emit(b, [*drafts[b][:accepted], token]))
    head_logits = every[torch.arange(rows), torch.tensor(slots) - low, 1:]  # [B, n-1, V] at each accepted slot
    for b in range(rows):
        drafts[b], draft_probs[b] = [], []
        if not batch.done[b]:
            context = torch.cat([batch.sequences[b, : before + slots[b] + 1], torch.tensor(feeds[b][-1:])])
            count = min(n - 1, batch.remaining(b) - 1)
            drafts[b], draft_probs[b] = _draft_row(head_logits[b], context, count, processors, greedy, generator)
    return feeds


def _left_padded(tokenizer: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(prompts, return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


def _crop_masked_tail(batch: _Batch, caches: tuple[Any, ...]) -> None:
    """Drop trailing columns no row attends to (rejected drafts) from the caches and the state."""
    alive = batch.attention.any(0).nonzero()
    tail = batch.attention.shape[1] - (int(alive[-1]) + 1 if alive.numel() else 0)
    if tail > 0:
        for cache in caches:
            cache.crop(-tail)
        batch.sequences, batch.attention = batch.sequences[:, :-tail], batch.attention[:, :-tail]


@torch.no_grad()
def generate(model: DynamoModel, tokenizer: Any, prompts: list[str] | str, max_new_tokens: int = 64,
             config: DecodeConfig | None = None, stats: NgramCounts | None = None, heads: int | None = None,
             generator: torch.Generator | None = None) -> DynamoOutput:
    """Generate for a batch of prompts with 1..n tokens per step (left padding, one KV cache per batch).

    ``heads`` limits the heads used (1 = plain autoregressive decoding through the same loop; ``threshold = 1``
    in the lossy mode means the same, so the heads are not run). Sampling draws from ``generator`` (the global
    RNG when None, as ``transformers.generate`` does). ``config.verify`` selects the lossless verify mode.
    """
    config = config or DecodeConfig()
    if max_new_tokens < 1:
        raise LeanfmError(f"max_new_tokens {max_new_tokens} is invalid; accepted: an integer >= 1")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or any(not p for p in prompts):
        raise LeanfmError("prompts must be non-empty strings")
    n = model.num_heads if heads is None else heads
    if not 1 <= n <= model.num_heads:
        raise LeanfmError(f"heads {n} is out of range; accepted: 1..{model.num_heads}")
    if not config.verify and config.threshold >= 1:
        n = 1
    start = time.perf_counter()
    encoded = _left_padded(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batch = _Batch(encoded["input_ids"], encoded["attention_mask"], [[] for _ in prompts], [False] * len(prompts),
                   max_new_tokens, tokenizer.eos_token_id, drafted=[0] * (n - 1), accepted=[0] * (n - 1))
    rows = len(prompts)
    caches = (DynamicCache(), DynamicCache())
    new_ids = batch.sequences
    slots = [new_ids.shape[1] - 1] * rows  # each row's last certain token among the new inputs
    drafts: list[list[int]] = [[] for _ in range(rows)]
    draft_probs: list[list[torch.Tensor | None]] = [[] for _ in range(rows)]
    steps = 0
    while True:
        positions = (batch.attention.cumsum(-1) - 1).masked_fill(batch.attention == 0, 1)[:, -new_ids.shape[1]:]
        final, states = model.forward_heads(new_ids, batch.attention, positions, *caches, heads=n - 1)
        steps += 1
        feeds: list[list[int]]
        if config.verify:
            feeds = _verify_step(model, final, states, batch, slots, drafts, draft_probs, config, n, generator)
            feeds = [f[-1:] + d for f, d in zip(feeds, drafts, strict=True)]  # next: the base's token, then drafts
            _crop_masked_tail(batch, caches)
        else:
            feeds = _lossy_step(model, final, states, batch, slots, config, stats, n, generator)
        if all(batch.done):
            break
        width = max(len(f) for f in feeds)
        new_ids = torch.full((rows, width), pad, dtype=torch.long)
        new_mask = torch.zeros((rows, width), dtype=batch.attention.dtype)
        for b, feed in enumerate(feeds):
            if feed and not batch.done[b]:
                new_ids[b] = feed[0]  # empty slots hold a token the row already has (see _Batch)
                new_ids[b, : len(feed)] = torch.tensor(feed)
                new_mask[b, : len(feed)] = 1
            slots[b] = 0 if config.verify else max(len(feed), 1) - 1
        batch.sequences = torch.cat([batch.sequences, new_ids], dim=1)
        batch.attention = torch.cat([batch.attention, new_mask], dim=1)
    texts = tokenizer.batch_decode(batch.emitted, skip_special_tokens=True)
    counts = batch.level_counts
    return DynamoOutput(tokens=batch.emitted, texts=texts, steps=steps,
                        tokens_per_step=sum(k * v for k, v in counts.items()) / max(1, sum(counts.values())),
                        seconds=time.perf_counter() - start, level_counts=counts,
                        acceptance=[a / d if d else 0.0 for a, d in zip(batch.accepted, batch.drafted, strict=True)]
                        if config.verify else [])


register_method("dynamo", "decode", DecodeConfig, load,
                description="DynaMo: 1..n tokens per step from the trained heads (ε_b = 1 equals generate())")
