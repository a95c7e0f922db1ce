"""DynaMo: dynamic multi-token decoding with extra heads (METHODS.md section 3).

Model. The base causal LM is untouched: head 1 is its own last block + LM head (token t+1). Heads 2..n each
add one new decoder layer (same class as the base's last block) on the *penultimate* hidden state — the
input of the last block — and reuse the base's final norm and LM head; head j predicts token t+j. The heads
are an add-on: ``AutoModelForCausalLM.from_pretrained(DIR)`` loads the plain base model, :func:`load` adds
the heads, and with ``threshold = 1`` generation is exactly the base model's.

Decoding, per sequence and step (:func:`select_tokens`):

1. each head's next-token distribution after the repetition penalty and temperature (transformers' own
   logits processors, so head 1 matches ``generate()``);
2. for m = n..2: the joint ``J = p_1^top-k ⊗ ... ⊗ p_m^top-k`` (k = 50), reweighted by the co-occurrence ratio
   ``[p̂(x_1..x_m) / Π p̂(x_i)]^α`` from the training corpus's n-gram counts and rescaled to the unweighted mass;
   if ``max J < ε_b^(m-1)`` fall back to m-1 tokens; else zero entries below ``ε_b^(m-1)``, then below Otsu's
   threshold of ``J`` after a 3-tap Gaussian blur, and sample (or take the argmax of) the surviving entries;
3. at m = 1 sample head 1 alone — exactly the base model's step.

Interpretation (written down because the paper is terse): the static floor that zeroes entries is the same
``ε_b^(m-1)`` as the fall-back test (so ``ε_b = 0`` always emits n tokens and ``ε_b = 1`` always one), and the
co-occurrence weights redistribute, never add, probability mass (without the rescaling a rare n-gram's ratio of
10^5 would pass any threshold). Ablations: ``mask=False`` (α = 0), ``adaptive=False`` (no Otsu), ``blur=False``.

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

from leanfm.config import MethodConfig, option, register_method
from leanfm.decode.ngrams import NgramCounts
from leanfm.errors import LeanfmError
from leanfm.models import load_model
from leanfm.models.adapters import get_adapter
from leanfm.paths import atomic_directory, atomic_write_bytes

log = logging.getLogger(__name__)
HEADS_FILE, STATS_FILE, META_FILE = "dynamo_heads.safetensors", "cooccurrence.safetensors", "dynamo.json"
INITS = ("copy", "random")
_CACHE_KWARGS = ("cache", "layer_past", "past_key_values")


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

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + the shared LM head: an extra head's hidden states -> logits."""
        norm = self.adapter.final_norm(self.base)
        return self.base.get_output_embeddings()(norm(hidden) if norm is not None else hidden)

    def logits(self, final: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """Logits of every head, ``[..., n, V]``, from the base's final (normed) hidden states and the heads'.

        One LM-head matmul for all heads: at batch 1 decoding is memory-bound and the LM head is a fifth of
        SmolLM2's weights, so reading it once per step instead of n times is most of what the heads cost.
        """
        norm = self.adapter.final_norm(self.base)
        rows = [final] + [norm(s) if norm is not None else s for s in states]
        return self.base.get_output_embeddings()(torch.stack(rows, dim=-2))

    def forward_heads(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: Any = None, head_cache: Any = None,
                      base_grad: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base's final hidden states (after its final norm) and the extra heads' (before it), ``[B, T, d]``.

        The base decoder stack runs once (without its LM head — :meth:`logits` applies it to the positions
        that are needed); a pre-hook on its last block captures the penultimate hidden state and the exact
        keyword arguments (mask, rotary embeddings, positions, cache) the block received, which the extra
        layers reuse with their own cache.
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
        for layer in self.heads:
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


# ---------------------------------------------------------------- token selection


@dataclass
class DecodeConfig(MethodConfig):
    """How many tokens to emit per step. ``threshold`` is ε_b in [0, 1]; ``temperature`` 0 means greedy."""

    threshold: float = option(0.5, "ε_b in [0, 1]: accept a multi-token candidate above it; 1 = the base model's "
                              "decoding")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy")
    repetition_penalty: float = option(1.1, "transformers' repetition penalty on head 1")
    top_k: int = option(50, "top-k filtering of head 1")
    alpha: float = option(1.0, "exponent of the co-occurrence weighting")
    mask: bool = option(True, "co-occurrence weighted masking of the joint")
    adaptive: bool = option(True, "Otsu threshold on the weighted joint")
    blur: bool = option(True, "3-tap Gaussian blur before Otsu")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.threshold <= 1:
            raise LeanfmError(f"threshold {self.threshold} is out of range; accepted: 0 <= threshold <= 1")
        if self.temperature < 0 or self.repetition_penalty <= 0 or self.top_k < 1:
            raise LeanfmError(f"temperature {self.temperature}, repetition penalty {self.repetition_penalty}, top-k "
                              f"{self.top_k}: accepted temperature >= 0, penalty > 0, top-k >= 1")


def blur3(joint: torch.Tensor) -> torch.Tensor:
    """Separable 3-tap Gaussian ``[1/4, 1/2, 1/4]`` along every axis (edges replicated)."""
    out = joint
    for axis in range(joint.dim()):
        moved = out.movedim(axis, -1)
        padded = torch.cat([moved[..., :1], moved, moved[..., -1:]], dim=-1)
        moved = 0.25 * padded[..., :-2] + 0.5 * padded[..., 1:-1] + 0.25 * padded[..., 2:]
        out = moved.movedim(-1, axis)
    return out


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a ``bins``-histogram that maximises the between-class variance."""
    v = values.flatten().double()
    low, high = float(v.min()), float(v.max())
    if high - low <= 1e-12 * max(abs(high), 1e-30):
        return low
    hist = torch.histc(v, bins=bins, min=low, max=high)
    p = hist / hist.sum()
    width = (high - low) / bins
    centers = low + (torch.arange(bins, dtype=torch.double) + 0.5) * width
    w0 = p.cumsum(0)
    mu = (p * centers).cumsum(0)
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    between = torch.where((w0 > 0) & (w0 < 1), between, torch.zeros_like(between))
    return low + (int(between.argmax()) + 1) * width


def weighted_joint(probs: list[torch.Tensor], stats: NgramCounts | None, config: DecodeConfig
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The top-k joint of ``len(probs)`` heads with co-occurrence weighting; returns (J, top-k token ids)."""
    m = len(probs)
    top = [p.topk(min(config.top_k, p.numel())) for p in probs]
    joint = torch.ones((), dtype=torch.float64)
    for values in (t.values.double() for t in top):
        joint = joint.unsqueeze(-1) * values
    ids = [t.indices for t in top]
    if config.mask and config.alpha > 0 and stats is not None and m <= stats.max_order:
        grid = torch.stack(torch.meshgrid(*ids, indexing="ij"), dim=-1)  # [k]*m x m
        together = stats.probability(grid)  # p̂(x_1..x_m), one lookup per cell
        apart = torch.ones((), dtype=torch.float64)  # Π p̂(x_i) as an outer product of k-vectors
        for token_ids in ids:
            apart = apart.unsqueeze(-1) * stats.probability(token_ids[:, None])
        ratio = torch.where(apart > 0, together / apart.clamp_min(1e-300), torch.zeros_like(together))
        mass = joint.sum()
        joint = joint * ratio**config.alpha
        total = joint.sum()
        joint = joint * (mass / total) if total > 0 else joint
    return joint, ids


def select_tokens(probs: list[torch.Tensor], stats: NgramCounts | None, config: DecodeConfig,
                  generator: torch.Generator | None = None) -> list[int] | None:
    """Tokens for one sequence's step from the heads' distributions ``probs[j]`` (``[V]``, after penalty and
    temperature); None means "one token from head 1" (sampled by the caller, batched, like ``generate``)."""
    for m in range(len(probs), 1, -1):
        joint, ids = weighted_joint(probs[:m], stats, config)
        floor = config.threshold ** (m - 1)
        peak = float(joint.max())
        if peak <= 0 or peak < floor:
            continue
        joint = torch.where(joint >= floor, joint, torch.zeros_like(joint))
        if config.adaptive:
            smooth = blur3(joint) if config.blur else joint
            alive = joint > 0
            cut = otsu_threshold(smooth[alive])
            kept = torch.where(alive & (smooth >= cut), joint, torch.zeros_like(joint))
            joint = kept if kept.sum() > 0 else joint
        if config.temperature == 0:
            flat = int(joint.flatten().argmax())
        else:
            flat = int(torch.multinomial((joint / joint.sum()).flatten().float(), 1, generator=generator))
        index = []
        for size in reversed(joint.shape):
            index.append(flat % size)
            flat //= size
        return [int(ids[j][i]) for j, i in enumerate(reversed(index))]
    return None


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


def _processors(config: DecodeConfig) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature not in (0.0, 1.0):
        processors.append(TemperatureLogitsWarper(config.temperature))
    return processors


@torch.no_grad()
def generate(model: DynamoModel, tokenizer: Any, prompts: list[str] | str, max_new_tokens: int = 64,
             config: DecodeConfig | None = None, stats: NgramCounts | None = None, heads: int | None = None,
             generator: torch.Generator | None = None) -> DynamoOutput:
    """Generate for a batch of prompts with 1..n tokens per step (left padding, one KV cache per batch).

    ``heads`` limits the heads used (1 = plain autoregressive decoding through the same loop). Sampling draws
    from ``generator`` (the global RNG when None, as ``transformers.generate`` does).
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
    start = time.perf_counter()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    sequences, attention = batch["input_ids"], batch["attention_mask"]
    rows = sequences.shape[0]
    cache, head_cache = DynamicCache(), DynamicCache()
    new_ids = sequences
    slot = torch.full((rows,), sequences.shape[1] - 1)  # each row's last valid slot among the new inputs
    emitted: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    processors = _processors(config)
    steps, active_steps, active_tokens = 0, 0, 0
    level_counts: dict[int, int] = {}
    while True:
        positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)[:, -new_ids.shape[1]:]
        final, states = model.forward_heads(new_ids, attention, positions, cache, head_cache)
        pick = torch.arange(rows)
        logits = model.logits(final[pick, slot], [s[pick, slot] for s in states[: n - 1]]).float()  # [B, n, V]
        head_logits = list(logits.unbind(1))
        scores = [processors(sequences, h.clone()) if len(processors) else h for h in head_logits]
        probs = [torch.softmax(s, dim=-1) for s in scores]
        choices: list[list[int] | None] = [None] * rows
        for b in range(rows):
            if not done[b] and n > 1:
                choices[b] = select_tokens([p[b] for p in probs], stats, config, generator)
        single = [b for b in range(rows) if choices[b] is None]
        if single:
            if config.temperature == 0:
                drawn = scores[0][single].argmax(-1)
            else:
                drawn = torch.multinomial(probs[0][single], 1, generator=generator).squeeze(1)
            for b, token in zip(single, drawn.tolist(), strict=True):
                choices[b] = [token]
        width = 1
        for b in range(rows):
            if done[b]:
                continue
            row = choices[b]
            assert row is not None  # every row chose above: by select_tokens or a single draw
            chosen = row[: max_new_tokens - len(emitted[b])]
            if eos is not None and eos in chosen:
                chosen = chosen[: chosen.index(eos) + 1]
            choices[b] = chosen
            level_counts[len(chosen)] = level_counts.get(len(chosen), 0) + 1
            active_steps, active_tokens = active_steps + 1, active_tokens + len(chosen)
            emitted[b].extend(chosen)
            if len(emitted[b]) >= max_new_tokens or (eos is not None and chosen[-1] == eos):
                done[b] = True
            width = max(width, len(chosen))
        steps += 1
        if bool(done.all()):
            break
        new_ids = torch.full((rows, width), pad, dtype=torch.long)
        new_mask = torch.zeros((rows, width), dtype=attention.dtype)
        for b in range(rows):
            row = choices[b]
            assert row is not None  # as above: every row chose
            count = 0 if done[b] else len(row)
            if count:
                new_ids[b, :count] = torch.tensor(row)
                new_mask[b, :count] = 1
            slot[b] = max(count, 1) - 1
        sequences = torch.cat([sequences, new_ids], dim=1)
        attention = torch.cat([attention, new_mask], dim=1)
    texts = tokenizer.batch_decode(emitted, skip_special_tokens=True)
    return DynamoOutput(tokens=emitted, texts=texts, steps=steps,
                        tokens_per_step=active_tokens / max(1, active_steps), seconds=time.perf_counter() - start,
                        level_counts=level_counts)


register_method("dynamo", "decode", DecodeConfig, load,
                description="DynaMo: 1..n tokens per step from the trained heads (ε_b = 1 equals generate())")
