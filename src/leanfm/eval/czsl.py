"""The standard compositional zero-shot (CZSL) evaluator: bias sweep, AUC, best HM, open-world feasibility.

Every CZSL method is scored by the protocol of Purushwalkam et al. (2019) as implemented in ExplainableML/czsl
(``models/common.py``, class ``Evaluator``) and extended to the open world by CompCos / KG-SP / Co-CGE:

- A sample is *seen* when its true (attribute, object) pair is a training pair, *unseen* otherwise. Seen accuracy
  is top-1 pair accuracy over seen samples, unseen accuracy over unseen samples.
- Models over-score seen pairs, so a scalar bias ``b`` is added to the score of every non-seen candidate pair.
  Sweeping ``b`` from "unseen never wins" to "unseen always wins" traces a seen/unseen accuracy curve;
  ``auc`` is its trapezoid area (seen accuracy integrated over unseen accuracy, both in [0, 1]) and ``best_hm`` the
  largest harmonic mean ``2 s u / (s + u)`` on it.
- Closed world: candidates are the training pairs plus the evaluated split's pairs. Open world: every attr x obj
  pair, optionally minus the unseen pairs whose *feasibility* (similarity to the training pairs, below) is under a
  threshold chosen on validation data.

Where this module differs from ExplainableML/czsl (our reading, chosen for exactness):

- Top-1 only; their ``topk`` option is not offered.
- Bias points. The prediction of a sample only depends on ``b`` through its *gap* ``g = S - U`` (best seen
  candidate score minus best non-seen candidate score): the best non-seen pair wins exactly when ``b > g``
  (a tie goes to the seen pair). Like them we take the flip points from unseen samples whose true pair is their
  best non-seen pair (their "max seen score - true pair score"), sorted and subsampled to at most
  :data:`MAX_BIASES` points. They evaluate 1e-4 below each flip point; we evaluate at the midpoint between a flip
  point and the next larger gap of any sample, so every swept bias is a real bias with no tie, and the curve equals
  a brute-force ``argmax(scores + b * unseen)`` at each reported bias. We add both extremes (below every gap:
  unseen pairs never win, so the curve starts at the best seen accuracy; above every gap: the best unseen
  accuracy); they add only the large-bias end (``bias=1e3``).
- ``attr_acc`` / ``obj_acc`` are the unbiased (``b = 0``) top-1 pair prediction's attribute and object, over all
  samples; theirs come from the prediction at the command-line bias (1e3 by default).
- Masked candidates score ``-inf`` (theirs ``-1e10``, or ``-1`` for CompCos' feasibility mask).
- The feasibility threshold is searched over quantiles of the unseen pairs' feasibility (theirs: a linspace from
  its minimum to maximum), by AUC with ties broken by best HM.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from leanfm.errors import LeanfmError

__all__ = ["MAX_BIASES", "CZSLResult", "choose_threshold", "evaluate_czsl", "feasibility_scores", "feasible_mask"]

log = logging.getLogger(__name__)

MAX_BIASES = 50
"""Most bias values swept, extremes included (ExplainableML/czsl uses ~20 bins; 50 follows the curve closer)."""

_CHUNK_ELEMENTS = 1 << 24  # bound on the [chunk, K, K] tensor of the feasibility maximum (64 MiB of float32)


@dataclass
class CZSLResult:
    """Accuracies in [0, 1]; the curve is sorted by bias (ascending), so unseen accuracy rises along it."""

    auc: float
    best_hm: float
    best_seen: float
    best_unseen: float
    attr_acc: float  # NaN when pair_attr was not given
    obj_acc: float   # NaN when pair_obj was not given
    seen_curve: list[float]
    unseen_curve: list[float]
    biases: list[float]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_inputs(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor,
                  candidates: torch.Tensor) -> None:
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise LeanfmError(f"scores must be [N, P] with N > 0 samples; got shape {tuple(scores.shape)}")
    n, p = scores.shape
    if labels.shape != (n,) or seen.shape != (p,) or candidates.shape != (p,):
        raise LeanfmError(f"for scores [{n}, {p}] labels must be [{n}], seen and candidates [{p}]; got "
                          f"{tuple(labels.shape)}, {tuple(seen.shape)}, {tuple(candidates.shape)}")
    if seen.dtype != torch.bool or candidates.dtype != torch.bool:
        raise LeanfmError(f"seen and candidates must be bool masks; got {seen.dtype} and {candidates.dtype}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise LeanfmError(f"labels must be integer pair indices; got dtype {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= p:
        raise LeanfmError(f"labels must be pair indices in [0, {p}); got values in "
                          f"[{int(labels.min())}, {int(labels.max())}]")
    if not bool(candidates.any()):
        raise LeanfmError("candidates masks every pair; accepted: at least one pair that may be predicted")
    seen_samples = int(seen[labels].sum())
    if seen_samples in (0, n):
        raise LeanfmError(f"{seen_samples} of {n} samples have a seen (training) pair; the seen/unseen curve needs "
                          "samples of both kinds")


def _best_in(scores: torch.Tensor, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score ``[N]`` (float64, ``-inf`` when ``columns`` is empty) and its pair index ``[N]`` among ``columns``."""
    index = columns.nonzero().squeeze(1)  # [C]
    n = scores.shape[0]
    if index.numel() == 0:
        return torch.full((n,), float("-inf"), dtype=torch.float64), torch.zeros(n, dtype=torch.long)
    best, where = scores[:, index].max(dim=1)  # first maximum on ties
    return best.double(), index[where]


def _gaps(scores: torch.Tensor, seen: torch.Tensor, candidates: torch.Tensor,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: gap ``g = S - U`` [N] (float64; ``-inf`` without a seen candidate, ``+inf`` without a non-seen
    one), the best seen candidate [N] and the best non-seen candidate [N]. With bias ``b`` the prediction is the
    non-seen one exactly when ``b > g``."""
    best_seen, seen_pick = _best_in(scores, seen & candidates)
    best_unseen, unseen_pick = _best_in(scores, ~seen & candidates)
    gap = best_seen - best_unseen  # never inf - inf: at least one candidate exists
    return gap, seen_pick, unseen_pick


def _bias_points(gap: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Ascending biases [B]: one below every finite gap, the midpoint after each (subsampled) flip point, one above
    every finite gap. ``flips`` are the gaps at which an unseen sample becomes right."""
    finite = gap[torch.isfinite(gap)].unique()  # sorted
    if finite.numel() == 0:  # no sample has both a seen and a non-seen candidate: b changes nothing
        return torch.zeros(1, dtype=torch.float64)
    low, high = finite[0] - 1.0, finite[-1] + 1.0
    flips = flips[torch.isfinite(flips)].sort().values
    if flips.numel() > MAX_BIASES - 2:
        flips = flips[torch.linspace(0, flips.numel() - 1, MAX_BIASES - 2).round().long()]
    after = torch.searchsorted(finite, flips, right=True)  # index of the next larger gap
    following = torch.cat([finite, high.reshape(1)])[after]
    middles = (flips + following) / 2
    return torch.cat([low.reshape(1), middles, high.reshape(1)]).unique()


def _sweep(gap: torch.Tensor, seen_right: torch.Tensor, unseen_right: torch.Tensor, is_seen_sample: torch.Tensor,
           biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Seen and unseen accuracy [B] at each bias: a sample is right when its chosen candidate (non-seen when
    ``b > g``) is its true pair."""
    picks_unseen = biases[:, None] > gap[None, :]  # [B, N]
    right = torch.where(picks_unseen, unseen_right[None, :], seen_right[None, :]).double()  # [B, N]
    return right[:, is_seen_sample].mean(dim=1), right[:, ~is_seen_sample].mean(dim=1)


def _part_accuracy(predicted: torch.Tensor, labels: torch.Tensor, part: torch.Tensor | None, p: int) -> float:
    if part is None:
        return float("nan")
    if part.shape != (p,):
        raise LeanfmError(f"pair_attr and pair_obj must be [{p}] (one index per pair); got {tuple(part.shape)}")
    return float((part[predicted] == part[labels]).double().mean())


@torch.no_grad()
def evaluate_czsl(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor,
                  candidates: torch.Tensor | None = None, pair_attr: torch.Tensor | None = None,
                  pair_obj: torch.Tensor | None = None) -> CZSLResult:
    """The bias sweep on ``scores`` [N, P] (higher = more likely) for samples whose true pair is ``labels`` [N].

    ``seen`` [P] bool marks training pairs; ``candidates`` [P] bool the pairs that may be predicted (default all;
    the others score ``-inf``, so they are never predicted and a sample whose true pair is masked is always wrong).
    ``pair_attr`` / ``pair_obj`` [P] give each pair's attribute and object for ``attr_acc`` / ``obj_acc``.
    Vectorised: one ``max`` over the pairs, then a [B, N] comparison; N=5k, P=500 takes milliseconds.
    """
    candidates = torch.ones_like(seen) if candidates is None else candidates
    _check_inputs(scores, labels, seen, candidates)
    scores, labels, seen, candidates = scores.detach().cpu(), labels.cpu().long(), seen.cpu(), candidates.cpu()
    gap, seen_pick, unseen_pick = _gaps(scores, seen, candidates)
    seen_right, unseen_right = seen_pick == labels, unseen_pick == labels  # [N], [N]
    is_seen_sample = seen[labels]
    flips = gap[~is_seen_sample & unseen_right]
    biases = _bias_points(gap, flips)
    seen_acc, unseen_acc = _sweep(gap, seen_right, unseen_right, is_seen_sample, biases)
    auc = torch.trapezoid(seen_acc, unseen_acc)  # x = unseen accuracy, non-decreasing along the biases
    hm = torch.where(seen_acc + unseen_acc > 0, 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc),
                     torch.zeros_like(seen_acc))
    unbiased = torch.where(gap < 0, unseen_pick, seen_pick)  # the prediction at b = 0
    p = scores.shape[1]
    return CZSLResult(auc=float(auc), best_hm=float(hm.max()), best_seen=float(seen_acc.max()),
                      best_unseen=float(unseen_acc.max()),
                      attr_acc=_part_accuracy(unbiased, labels, pair_attr, p),
                      obj_acc=_part_accuracy(unbiased, labels, pair_obj, p),
                      seen_curve=seen_acc.tolist(), unseen_curve=unseen_acc.tolist(), biases=biases.tolist())


def _max_similarity_to_partners(similarity: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """``out[j, k] = max over k' != k with partners[j, k'] of similarity[k, k']``, or -1 when no such ``k'``.

    ``similarity`` [K, K] (cosines), ``partners`` [J, K] bool. For the object half of feasibility, ``j`` is an
    attribute, ``k`` an object and ``partners[j]`` the objects seen with it. The exclusion of ``k`` itself does not
    change :func:`feasibility_scores` (for an unseen pair, the object is never among its attribute's partners, and
    seen pairs are set to 1), but it gives a seen pair the score it would have if it had not been seen.
    """
    k = similarity.shape[0]
    allowed_k = ~torch.eye(k, dtype=torch.bool)  # [K, K'] k' != k
    out = torch.empty(partners.shape[0], k, dtype=similarity.dtype)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, k * k))
    for start in range(0, partners.shape[0], chunk):
        allowed = partners[start:start + chunk, None, :] & allowed_k[None]  # [c, K, K']
        masked = similarity[None].masked_fill(~allowed, float("-inf"))  # [c, K, K']
        out[start:start + chunk] = masked.max(dim=2).values.clamp(min=-1.0)  # -inf (no partner) -> -1
    return out


@torch.no_grad()
def feasibility_scores(attr_emb: torch.Tensor, obj_emb: torch.Tensor, seen_pairs: torch.Tensor) -> torch.Tensor:
    """Feasibility [A, O] of every (attribute, object) pair from the training pairs (CompCos / KG-SP / Co-CGE).

    For an unseen pair (a, o): the mean of (i) the largest cosine between ``o`` and an object seen with ``a`` in
    training, other than ``o``, and (ii) the largest cosine between ``a`` and an attribute seen with ``o``, other
    than ``a``. A pair resembling training pairs from both sides is plausible ("sliced tomato" since "sliced apple"
    and "ripe tomato" were seen). When ``a`` has no other seen object (or ``o`` no other seen attribute) that half
    is -1, the lowest cosine, as ExplainableML/czsl's ``compute_feasibility`` initialises it: no evidence reads as
    least feasible. Seen pairs score 1. ``attr_emb`` [A, d], ``obj_emb`` [O, d] are any embeddings of the
    primitives (word vectors, text-tower embeddings); ``seen_pairs`` [S, 2] holds (attribute, object) indices.
    """
    if attr_emb.dim() != 2 or obj_emb.dim() != 2 or seen_pairs.dim() != 2 or seen_pairs.shape[1] != 2:
        raise LeanfmError(f"need attr_emb [A, d], obj_emb [O, d], seen_pairs [S, 2]; got {tuple(attr_emb.shape)}, "
                          f"{tuple(obj_emb.shape)}, {tuple(seen_pairs.shape)}")
    n_attr, n_obj = attr_emb.shape[0], obj_emb.shape[0]
    pairs = seen_pairs.long().cpu()
    if pairs.numel() and (int(pairs.min()) < 0 or int(pairs[:, 0].max()) >= n_attr
                          or int(pairs[:, 1].max()) >= n_obj):
        raise LeanfmError(f"seen_pairs must index {n_attr} attributes and {n_obj} objects; got values out of range")
    seen = torch.zeros(n_attr, n_obj, dtype=torch.bool)
    seen[pairs[:, 0], pairs[:, 1]] = True
    attr = nn.functional.normalize(attr_emb.detach().float().cpu(), dim=-1)
    obj = nn.functional.normalize(obj_emb.detach().float().cpu(), dim=-1)
    by_object = _max_similarity_to_partners(obj @ obj.T, seen)          # [A, O]: o vs objects seen with a
    by_attribute = _max_similarity_to_partners(attr @ attr.T, seen.T).T  # [A, O]: a vs attributes seen with o
    return torch.where(seen, torch.ones_like(by_object), (by_object + by_attribute) / 2)


def feasible_mask(feasibility_flat: torch.Tensor, seen: torch.Tensor, threshold: float) -> torch.Tensor:
    """Candidates [P] bool: every seen pair, and the unseen pairs whose feasibility is at least ``threshold``."""
    if feasibility_flat.shape != seen.shape or feasibility_flat.dim() != 1:
        raise LeanfmError(f"feasibility and seen must both be [P]; got {tuple(feasibility_flat.shape)} and "
                          f"{tuple(seen.shape)}")
    return seen | (feasibility_flat >= threshold)


@torch.no_grad()
def choose_threshold(scores: torch.Tensor, labels: torch.Tensor, seen: torch.Tensor, feasibility: torch.Tensor,
                     pair_attr: torch.Tensor, pair_obj: torch.Tensor, grid: int = 50) -> tuple[float, CZSLResult]:
    """The feasibility threshold to use in the open world, chosen on VALIDATION data, and its result there.

    ``scores`` [N, P] over all P attr x obj pairs; ``feasibility`` is [A, O] (read at ``pair_attr``,
    ``pair_obj``) or already [P]. Tries ``grid`` quantiles (0 to 1) of the unseen pairs' feasibility as thresholds
    (quantile 0 masks nothing); keeps the one with the largest AUC, then best HM, then the lowest threshold.
    """
    if grid < 1:
        raise LeanfmError(f"grid must be a positive number of thresholds; got {grid}")
    flat = (feasibility[pair_attr, pair_obj] if feasibility.dim() == 2 else feasibility).detach().double().cpu()
    seen = seen.cpu()
    if flat.shape != seen.shape or not bool((~seen).any()):
        raise LeanfmError(f"feasibility must cover the {seen.numel()} pairs (some unseen) as [A, O] or [P]; got "
                          f"{tuple(feasibility.shape)}")
    levels = torch.linspace(0, 1, grid, dtype=torch.float64)
    thresholds = torch.quantile(flat[~seen], levels).unique().tolist()
    results = [evaluate_czsl(scores, labels, seen, feasible_mask(flat, seen, t), pair_attr, pair_obj)
               for t in thresholds]
    # max keeps the first of equal keys: the lowest threshold among those tied on AUC and HM
    index = max(range(len(thresholds)), key=lambda i: (results[i].auc, results[i].best_hm))
    best = (thresholds[index], results[index])
    log.info("feasibility threshold %.4f: validation AUC %.4f, best HM %.4f", best[0], best[1].auc, best[1].best_hm)
    return best
