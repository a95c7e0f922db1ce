"""DynaMo's token selection and draft verification: the maths of one decoding step, free of any model.

Why a module of its own: these functions decide which tokens a step emits — the co-occurrence weight, the
reachable sub-cube of the joint, the floors, Otsu's cut, the in-step repetition penalty and the acceptance rule of
the verify mode — and they are pure tensor code that fast tests (and mutation testing) can pin down exactly.
The generation loop that feeds them model outputs is :mod:`leanfm.decode.dynamo`; the formulas and which parts
are our reading are in that module's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leanfm.config import MethodConfig, option
from leanfm.decode.ngrams import NgramCounts
from leanfm.errors import LeanfmError


@dataclass
class DecodeConfig(MethodConfig):
    """How many tokens to emit per step. ``threshold`` is ε_b in [0, 1]; ``temperature`` 0 means greedy."""

    threshold: float = option(0.5, "ε_b in [0, 1]: accept a multi-token candidate above it; 1 = the base model's "
                              "decoding")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy")
    repetition_penalty: float = option(1.1, "transformers' repetition penalty, on every head")
    top_k: int = option(50, "candidates per head in the joint")
    alpha: float = option(1.0, "exponent of the co-occurrence weight")
    mask: bool = option(True, "co-occurrence mask: down-weight combinations the n-gram counts make improbable")
    smoothing: float = option(1.0, "add-λ smoothing of the n-gram counts in the co-occurrence weight (> 0)")
    min_count: int = option(2, "n-grams seen fewer times than this count as unseen")
    adaptive: bool = option(True, "Otsu threshold on the weighted joint")
    blur: bool = option(True, "3-tap Gaussian blur before Otsu")
    verify: bool = option(False, "lossless verify mode (ours, beyond the paper): the heads draft, the next forward "
                          "keeps what the base model agrees with; the output is the base model's")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.threshold <= 1:
            raise LeanfmError(f"threshold {self.threshold} is out of range; accepted: 0 <= threshold <= 1")
        if self.temperature < 0 or self.repetition_penalty <= 0 or self.top_k < 1:
            raise LeanfmError(f"temperature {self.temperature}, repetition penalty {self.repetition_penalty}, top-k "
                              f"{self.top_k}: accepted temperature >= 0, penalty > 0, top-k >= 1")
        if self.smoothing <= 0 or self.min_count < 1:
            raise LeanfmError(f"smoothing {self.smoothing}, min count {self.min_count}: accepted smoothing > 0, "
                              "min count >= 1")


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


def _along(values: torch.Tensor, axis: int, dims: int) -> torch.Tensor:
    """A vector ``[k]`` viewed along ``axis`` of a ``dims``-dimensional grid (``[1, .., k, .., 1]``)."""
    shape = [1] * dims
    shape[axis] = -1
    return values.reshape(shape)


def cooccurrence_weight(ids: list[torch.Tensor], stats: NgramCounts, config: DecodeConfig) -> torch.Tensor:
    """``w(x_1..x_m) = min(1, (c + λ) / (E + λ))^α`` on the grid of candidate ids ``ids[j]`` (``[k_j]``).

    ``c`` is the n-gram's count (0 below ``min_count``), ``E = N_m Π p̂(x_i)`` the count independence predicts
    over the corpus's ``N_m`` m-gram positions, λ the smoothing. A combination the corpus has seen at least as
    often as chance keeps its joint (w = 1); one seen far less often than its parts predict is filtered out;
    one too rare to judge (E << λ) is left alone. Our reading of the paper's intent ("filter out improbable
    combinations"): the weight never exceeds 1, so — unlike the raw ratio, which let n-grams seen once absorb
    the mass — it can only remove probability, never raise a joint above the heads' own product.
    """
    dims = len(ids)
    grid = torch.stack(torch.meshgrid(*ids, indexing="ij"), dim=-1)  # [k_1, .., k_m, m]
    counts = stats.count(grid).float()
    counts = torch.where(counts >= config.min_count, counts, torch.zeros_like(counts))
    expected = torch.full((), float(max(1, stats.total - dims + 1)))
    for axis, token_ids in enumerate(ids):
        expected = expected * _along(stats.probability(token_ids[:, None]).float(), axis, dims)
    ratio = (counts + config.smoothing) / (expected + config.smoothing)
    return ratio.clamp(max=1.0) ** config.alpha


def repeat_penalty_grid(ids: list[torch.Tensor], factors: list[torch.Tensor]) -> torch.Tensor:
    """``ρ(x_1..x_m) = Π_{j>=2} f_j(x_j)`` over the heads j whose token repeats an earlier one of the candidate.

    ``factors[j]`` (``[V]``) is what the repetition penalty would multiply head j's probability of a token by
    if that token were already in the text (:func:`repeat_factors`). Without this, head 3 would happily
    propose the token head 2 proposes in the same step. Not renormalised (our choice): the factor only
    removes mass, so the joint stays below the heads' product, which the exact early exit relies on.
    """
    dims = len(ids)
    weight = torch.ones(())
    for j in range(1, dims):
        repeats = torch.zeros((), dtype=torch.bool)
        for i in range(j):
            repeats = repeats | (_along(ids[j], j, dims) == _along(ids[i], i, dims))
        weight = weight * torch.where(repeats, _along(factors[j][ids[j]].float(), j, dims), torch.ones(()))
    return weight


def candidate_joint(probs: list[torch.Tensor], stats: NgramCounts | None, config: DecodeConfig, floor: float,
                    factors: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The weighted joint ``J`` of the heads' top-k candidates that can reach ``floor``; returns (J, ids).

    Only a corner of the ``k^m`` grid can: a candidate of head i with ``p_i(x) Π_{j≠i} max p_j < floor`` is below
    the floor in every cell (weights and penalties are <= 1). The corner keeps one more candidate per axis,
    whose cells are all below the floor, so the blur sees the zeros it would see on the full grid: the
    selection is the full grid's, at a fraction of the cost (float32; ``floor = 0`` keeps the full grid).
    """
    dims = len(probs)
    top = [p.topk(min(config.top_k, p.numel())) for p in probs]
    peaks = [float(t.values[0]) for t in top]
    bound = math.prod(peaks)
    values, ids = [], []
    for axis, t in enumerate(top):
        others = bound / peaks[axis] if peaks[axis] > 0 else 0.0
        reach = int((t.values.float() * others >= floor).sum())
        size = min(reach + 1, t.values.numel())
        values.append(t.values[:size].float())
        ids.append(t.indices[:size])
    joint = torch.ones(())
    for axis, v in enumerate(values):
        joint = joint * _along(v, axis, dims)
    if factors is not None:
        joint = joint * repeat_penalty_grid(ids, factors)
    if config.mask and config.alpha > 0 and stats is not None and dims <= stats.max_order:
        joint = joint * cooccurrence_weight(ids, stats, config)
    return joint, ids


def reachable_levels(peaks: torch.Tensor, threshold: float) -> torch.Tensor:
    """For a batch, the largest m whose product of peaks ``Π_{j<=m} max p_j`` reaches ``ε_b^(m-1)`` (1: none).

    ``peaks`` ``[B, n]``. Rows at 1 skip the selection entirely (no cell of any level can pass its floor), so
    the caller draws their single token batched, like ``generate()``.
    """
    levels = torch.ones(peaks.shape[0], dtype=torch.long)
    if threshold >= 1:
        return levels
    products = peaks.double().cumprod(dim=1)  # [B, n]: Π_{j<=m} max p_j
    for m in range(2, peaks.shape[1] + 1):
        ok = (products[:, m - 1] > 0) & (products[:, m - 1] >= threshold ** (m - 1))
        levels = torch.where(ok, torch.full_like(levels, m), levels)
    return levels


def select_tokens(probs: list[torch.Tensor], stats: NgramCounts | None, config: DecodeConfig,
                  generator: torch.Generator | None = None, factors: list[torch.Tensor] | None = None
                  ) -> list[int] | None:
    """Tokens for one sequence's step from the heads' distributions ``probs[j]`` (``[V]``, after penalty and
    temperature); None means "one token from head 1" (sampled by the caller, batched, like ``generate``)."""
    if config.threshold >= 1:
        return None
    peaks = [float(p.max()) for p in probs]
    for m in range(len(probs), 1, -1):
        floor = config.threshold ** (m - 1)
        bound = math.prod(peaks[:m])
        if bound <= 0 or bound < floor:
            continue  # exact early exit: no cell can reach the floor
        joint, ids = candidate_joint(probs[:m], stats, config, floor, factors)
        if float(joint.max()) <= 0 or float(joint.max()) < floor:
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
            flat = int(torch.multinomial((joint / joint.sum()).flatten(), 1, generator=generator))
        index = []
        for size in reversed(joint.shape):
            index.append(flat % size)
            flat //= size
        return [int(ids[j][i]) for j, i in enumerate(reversed(index))]
    return None


def repeat_factors(logits: torch.Tensor, sequences: torch.Tensor, config: DecodeConfig) -> torch.Tensor | None:
    """Per token, the factor the repetition penalty puts on its probability once it is in the text.

    ``exp((pen(l) - l) / T)`` with ``pen(l) = l / θ`` for ``l > 0`` and ``l θ`` otherwise (transformers' rule), and
    1 for tokens already in ``sequences`` (their probabilities are penalised already). ``logits`` ``[B, V]``.
    """
    if config.repetition_penalty == 1.0:
        return None
    theta = config.repetition_penalty
    penalised = torch.where(logits > 0, logits / theta, logits * theta)
    scale = config.temperature if config.temperature not in (0.0, 1.0) else 1.0
    return torch.exp((penalised - logits) / scale).scatter(-1, sequences, 1.0)


def verify_drafts(scores_at: Callable[[int], torch.Tensor], drafts: list[int], draft_probs: list[torch.Tensor | None],
                  greedy: bool, generator: torch.Generator | None) -> tuple[int, int]:
    """(drafts accepted, the base model's token after them); ``scores_at(i)``: the base's scores at slot i.

    Greedy: accept while the draft is the base's argmax. Sampling: speculative acceptance (accept draft d
    drawn from q with probability min(1, p(d)/q(d)), else draw from norm(max(0, p - q))), which leaves every
    emitted token distributed exactly as the base model's sampling; q is the draft head's own distribution.
    """
    for accepted in range(len(drafts) + 1):
        scores = scores_at(accepted)
        if greedy:
            token = int(scores.argmax())
            if accepted < len(drafts) and token == drafts[accepted]:
                continue
            return accepted, token
        p = torch.softmax(scores, dim=-1)
        if accepted == len(drafts):
            return accepted, int(torch.multinomial(p, 1, generator=generator))
        draft, q = drafts[accepted], draft_probs[accepted]
        assert q is not None  # sampling drafts keep their distribution
        if float(torch.rand((), generator=generator)) * float(q[draft]) < float(p[draft]):
            continue
        residual = (p - q).clamp_min(0)
        return accepted, int(torch.multinomial(residual if float(residual.sum()) > 0 else p, 1, generator=generator))
    raise AssertionError("unreachable: the last slot always returns")
